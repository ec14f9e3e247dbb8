//! The one AEAD used for file blocks, xattr values and key wrapping: AES-256-GCM with a
//! 96-bit random nonce and a 128-bit tag. Swapping the implementation happens only here.
//!
//! Implementation: aws-lc-rs (AWS-LC). Chosen by measurement (benches/crypto.rs): on this
//! machine's VAES/AVX-512 CPU it seals 4 KiB blocks at 4-6x the RustCrypto `aes-gcm`
//! rate, and unlike `ring` it wipes the expanded key: the AEAD context lives in memory
//! from `OPENSSL_malloc`, and AWS-LC's `OPENSSL_free` cleanses it before freeing.

use super::Key32;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

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
/// which AWS-LC wipes when the cipher is dropped.
pub struct Cipher {
    inner: LessSafeKey,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(<redacted>)")
    }
}

impl Cipher {
    /// Build the cipher for `key`.
    pub fn new(key: &Key32) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, key.expose())
            .expect("AES-256-GCM accepts every 32-byte key");
        Self {
            inner: LessSafeKey::new(unbound),
        }
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
        // Encrypted straight from `plaintext` into `rest` (ciphertext, then the tag): the
        // "extra" input of a scatter seal with nothing to seal in place.
        self.inner
            .seal_in_place_scatter(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut [],
                plaintext,
                rest,
            )
            .expect("AES-GCM encryption of a block-sized message cannot fail");
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
        match self
            .inner
            .open_separate_gather(nonce, Aad::from(aad), ct, tag, out)
        {
            Ok(()) => Ok(()),
            Err(_) => {
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
}
