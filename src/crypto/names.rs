//! Deterministic authenticated encryption (AES-256-SIV, RFC 5297) for names, symlink
//! targets and xattr names. Deterministic so that a lookup can encrypt the name it is given
//! and find the entry; the associated data (e.g. the directory id) makes equal names in
//! different directories encrypt differently and binds each entry to its directory.

use super::Key64;
use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;

/// The SIV tag length: the ciphertext is this much longer than the plaintext.
pub const SIV_OVERHEAD: usize = 16;

/// A SIV key for one purpose (names, symlinks, xattr names).
pub struct SivCipher {
    key: Key64,
}

impl std::fmt::Debug for SivCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SivCipher(<redacted>)")
    }
}

impl SivCipher {
    /// Use `key` (two AES-256 halves: MAC then CTR).
    pub fn new(key: Key64) -> Self {
        Self { key }
    }

    fn siv(&self) -> Aes256Siv {
        Aes256Siv::new(self.key.expose().into())
    }

    /// Encrypt `plaintext` bound to `context` (associated data).
    pub fn encrypt(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        self.siv()
            .encrypt([context], plaintext)
            .expect("SIV encryption of a short message cannot fail")
    }

    /// Decrypt; `None` if the ciphertext does not authenticate under `context`.
    pub fn decrypt(&self, context: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
        self.batch().decrypt(context, ciphertext)
    }

    /// The cipher with its key schedules expanded once, for decrypting many names in a
    /// row (a directory listing): about 0.4 instead of 0.6 µs per name here.
    pub fn batch(&self) -> SivBatch {
        SivBatch(self.siv())
    }
}

/// An expanded SIV cipher (see `SivCipher::batch`); aes-siv wipes its key on drop and
/// the AES and CMAC key schedules are wiped by their `zeroize` features.
pub struct SivBatch(Aes256Siv);

impl std::fmt::Debug for SivBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SivBatch(<redacted>)")
    }
}

impl SivBatch {
    /// Decrypt; `None` if the ciphertext does not authenticate under `context`.
    pub fn decrypt(&mut self, context: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
        if ciphertext.len() < SIV_OVERHEAD {
            return None;
        }
        self.0.decrypt([context], ciphertext).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_context_bound() {
        let c = SivCipher::new(Key64::from_bytes([5u8; 64]));
        let a = c.encrypt(b"dir1", b"name");
        assert_eq!(a, c.encrypt(b"dir1", b"name"));
        assert_ne!(a, c.encrypt(b"dir2", b"name"));
        assert_eq!(a.len(), 4 + SIV_OVERHEAD);
        assert_eq!(c.decrypt(b"dir1", &a).unwrap(), b"name");
        assert!(c.decrypt(b"dir2", &a).is_none());
        let mut bad = a.clone();
        bad[3] ^= 1;
        assert!(c.decrypt(b"dir1", &bad).is_none());
        assert!(c.decrypt(b"dir1", &a[..10]).is_none());
        // One expanded cipher over many names, good and bad, gives the same answers.
        let mut batch = c.batch();
        for _ in 0..3 {
            assert_eq!(batch.decrypt(b"dir1", &a).unwrap(), b"name");
            assert!(batch.decrypt(b"dir2", &a).is_none());
            assert!(batch.decrypt(b"dir1", &bad).is_none());
            assert!(batch.decrypt(b"dir1", &a[..10]).is_none());
        }
    }

    /// Names already on disk must decrypt after any crate upgrade: this ciphertext was
    /// produced by aes-siv 0.8 on aes 0.9 and by aes-siv 0.7 on aes 0.8 alike.
    #[test]
    fn known_answer() {
        let c = SivCipher::new(Key64::from_bytes([7u8; 64]));
        let ct = c.encrypt(&[4u8; 16], b"a-typical-file-name.txt");
        let hex: String = ct.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "16d3c57bf8a51747185cdb7746907141332bd22ded0f3a27044f787e02b6f39d01faa4250849ee"
        );
        assert_eq!(
            c.decrypt(&[4u8; 16], &ct).unwrap(),
            b"a-typical-file-name.txt"
        );
    }
}
