//! The one AEAD used for file blocks, xattr values and key wrapping: AES-256-GCM with a
//! 96-bit random nonce and a 128-bit tag. Swapping the implementation happens only here.
//!
//! Implementation: ring. Chosen by measurement (benches/crypto.rs, README "Crypto"): ring
//! has a VAES+AVX2 AES-GCM path that AWS-LC lacks, so on CPUs with VAES but no AVX-512
//! (the AMD EPYC this was measured on) it seals 4 KiB blocks a little faster than
//! aws-lc-rs and opens them up to 1.7x as fast; on an AVX-512 CPU it was level on
//! sealing and 1.25x on opening. Both are about twice the RustCrypto `aes-gcm` crate.
//!
//! ring does not wipe its key schedule, so this module does: the schedule lives in one
//! heap allocation that is overwritten when the cipher drops, and the stack where ring
//! built it is overwritten right after it is built (see `Cipher::new` and `Drop`).
use super::Key32;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use std::hint::black_box;
use std::sync::OnceLock;

/// Nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// Authentication tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Bytes added to each sealed message: nonce in front, tag behind.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Authentication failed: wrong key, wrong associated data or modified ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthError;

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("authentication failed")
    }
}
impl std::error::Error for AuthError {}

/// Fresh random nonces drawn from the OS CSPRNG in one call and handed out once each.
/// Not `Clone`: a nonce taken from a batch cannot be taken again.
pub struct NonceBatch {
    bytes: Vec<u8>,
    next: usize,
}

impl NonceBatch {
    /// `n` fresh nonces.
    pub fn new(n: usize) -> Self {
        let mut bytes = vec![0u8; n * NONCE_LEN];
        super::random_bytes(&mut bytes);
        Self { bytes, next: 0 }
    }

    fn take(&mut self) -> [u8; NONCE_LEN] {
        let end = self.next + NONCE_LEN;
        let s = self
            .bytes
            .get_mut(self.next..end)
            .expect("NonceBatch sized for every block it seals");
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(s);
        // Wipe the used nonce from the batch so it can never be handed out twice.
        s.fill(0);
        self.next = end;
        n
    }
}

/// An initialised AES-256-GCM cipher for one key. Holds the expanded key schedule,
/// which is overwritten when the cipher is dropped.
pub struct Cipher {
    /// Boxed so that the schedule has one home for its whole life, which `Drop` can
    /// overwrite (a move would leave a copy behind).
    inner: Box<LessSafeKey>,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(<redacted>)")
    }
}

/// Bytes of stack overwritten after a key is expanded: well beyond what `build` and ring's
/// key set-up use (the schedule is under 1 KiB; `stack_scrub_dwarfs_the_schedule` checks).
const SCRUB_LEN: usize = 16 << 10;

/// Expand `key` straight into its heap home. Not inlined, so that every temporary copy of
/// the schedule is in this frame or ring's below it, which `scrub_stack` then overwrites.
#[inline(never)]
fn build(key: &[u8; 32]) -> Box<LessSafeKey> {
    let unbound =
        UnboundKey::new(&AES_256_GCM, key).expect("AES-256-GCM accepts every 32-byte key");
    Box::new(LessSafeKey::new(unbound))
}

/// Overwrite `SCRUB_LEN` bytes of stack below the caller's frame with zeros.
/// `black_box` makes the compiler keep the writes.
#[inline(never)]
fn scrub_stack() {
    let mut zeros = [0u8; SCRUB_LEN];
    black_box(&mut zeros);
}

/// The schedule of the all-zero key, written over a dropped cipher's. Same type and CPU
/// dispatch as every other key here, so it covers the whole allocation.
fn wiped() -> &'static LessSafeKey {
    static WIPED: OnceLock<LessSafeKey> = OnceLock::new();
    WIPED.get_or_init(|| *build(&[0u8; 32]))
}

/// `dst.copy_from_slice(src)` in pieces of at most 1 KiB. ring seals and opens in place,
/// so every block is copied once first; glibc's `memcpy` uses `rep movsb` from 2 KiB up,
/// which on an AMD EPYC here (VAES, no AVX-512) ran at under 3 GB/s (against 40-70) when
/// `dst` is 1-31 bytes past `src` modulo 4 KiB, as a sealed block's body is past a
/// plaintext block allocated just before it. Smaller copies take glibc's vector loop at
/// every offset.
fn copy(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.chunks_mut(1024).zip(src.chunks(1024)) {
        d.copy_from_slice(s);
    }
}

impl Drop for Cipher {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl Cipher {
    /// Build the cipher for `key`.
    pub fn new(key: &Key32) -> Self {
        let inner = build(key.expose());
        scrub_stack();
        Self { inner }
    }

    /// Overwrite the key schedule in place with a public one. `black_box` keeps the
    /// compiler from dropping the store as dead (the allocation is freed right after).
    fn wipe(&mut self) {
        (*self.inner).clone_from(wiped());
        black_box(&*self.inner);
    }

    /// Seal `plaintext` into `out`, which must be exactly `plaintext.len() + OVERHEAD` bytes:
    /// a fresh random nonce, the ciphertext, the tag.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut [u8]) {
        self.seal_into_batch(&mut NonceBatch::new(1), aad, plaintext, out);
    }

    /// Like `seal_into`, taking the next fresh nonce from `nonces` (so many blocks can be
    /// sealed with one call to the OS RNG). Panics if the batch is exhausted.
    pub fn seal_into_batch(
        &self,
        nonces: &mut NonceBatch,
        aad: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) {
        assert_eq!(
            out.len(),
            plaintext.len() + OVERHEAD,
            "seal_into: bad output length"
        );
        let nonce = nonces.take();
        let (nonce_out, rest) = out.split_at_mut(NONCE_LEN);
        nonce_out.copy_from_slice(&nonce);
        let (body, tag_out) = rest.split_at_mut(plaintext.len());
        copy(body, plaintext);
        let tag = self
            .inner
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .expect("AES-GCM encryption of a block-sized message cannot fail");
        tag_out.copy_from_slice(tag.as_ref());
    }

    /// Seal into a new vector.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; plaintext.len() + OVERHEAD];
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Open a sealed message into `out` (exactly `sealed.len() - OVERHEAD` bytes).
    /// On failure `out` is zeroed so no unauthenticated plaintext escapes.
    pub fn open_into(&self, aad: &[u8], sealed: &[u8], out: &mut [u8]) -> Result<(), AuthError> {
        if sealed.len() < OVERHEAD || out.len() != sealed.len() - OVERHEAD {
            return Err(AuthError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AuthError)?;
        let tag = Tag::from(<[u8; TAG_LEN]>::try_from(tag).map_err(|_| AuthError)?);
        copy(out, ct);
        match self
            .inner
            .open_in_place_separate_tag(nonce, Aad::from(aad), tag, out, 0..)
        {
            Ok(_) => Ok(()),
            Err(_) => {
                // ring leaves `out` in an unspecified state on failure.
                out.fill(0);
                Err(AuthError)
            }
        }
    }

    /// Open into a new vector.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        if sealed.len() < OVERHEAD {
            return Err(AuthError);
        }
        let mut out = vec![0u8; sealed.len() - OVERHEAD];
        self.open_into(aad, sealed, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_tamper() {
        let c = Cipher::new(&Key32::from_bytes([9u8; 32]));
        let sealed = c.seal(b"aad", b"hello world");
        assert_eq!(sealed.len(), 11 + OVERHEAD);
        assert_eq!(c.open(b"aad", &sealed).unwrap(), b"hello world");
        assert_eq!(c.open(b"other", &sealed), Err(AuthError));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert_eq!(c.open(b"aad", &bad), Err(AuthError), "flip at {i}");
        }
        assert_eq!(c.open(b"aad", &sealed[..5]), Err(AuthError));
    }

    #[test]
    fn batch_nonces_are_distinct() {
        let c = Cipher::new(&Key32::from_bytes([9u8; 32]));
        let mut b = NonceBatch::new(64);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let mut out = vec![0u8; 4 + OVERHEAD];
            c.seal_into_batch(&mut b, b"a", b"abcd", &mut out);
            assert!(seen.insert(out[..NONCE_LEN].to_vec()));
            assert_eq!(c.open(b"a", &out).unwrap(), b"abcd");
        }
    }

    #[test]
    #[should_panic(expected = "NonceBatch")]
    fn exhausted_batch_panics_rather_than_reuse() {
        let c = Cipher::new(&Key32::from_bytes([9u8; 32]));
        let mut b = NonceBatch::new(1);
        let mut out = vec![0u8; 1 + OVERHEAD];
        c.seal_into_batch(&mut b, b"", b"x", &mut out);
        c.seal_into_batch(&mut b, b"", b"x", &mut out);
    }

    #[test]
    fn nonces_are_fresh() {
        let c = Cipher::new(&Key32::from_bytes([9u8; 32]));
        let a = c.seal(b"", b"same");
        let b = c.seal(b"", b"same");
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
    }

    #[test]
    fn wipe_replaces_the_schedule_in_place() {
        let mut c = Cipher::new(&Key32::from_bytes([9u8; 32]));
        let sealed = c.seal(b"aad", b"secret");
        c.wipe();
        // The same allocation now holds the all-zero key's schedule: the old key's
        // messages no longer open, and what it seals now opens under the zero key.
        assert_eq!(c.open(b"aad", &sealed), Err(AuthError));
        let zero = Cipher::new(&Key32::from_bytes([0u8; 32]));
        assert_eq!(zero.open(b"aad", &c.seal(b"aad", b"x")).unwrap(), b"x");
    }

    #[test]
    fn stack_scrub_dwarfs_the_schedule() {
        // `build` holds at most a couple of copies of the schedule (the unbound key and
        // the boxed value) and ring's set-up below it is a few small frames plus leaf
        // assembly; 16 KiB is many times that.
        let sched = std::mem::size_of::<LessSafeKey>();
        assert!(sched > 32, "schedule of {sched} bytes");
        assert!(8 * sched <= SCRUB_LEN, "schedule of {sched} bytes");
    }
}
