//! From passphrase to master key: the Argon2id parameters of new keystores, the derivation itself,
//! and the sealed `check` field that tells a right master key from a wrong one.

use super::format::{KdfParams, KeystoreFile};
use crate::crypto::Key32;
use crate::crypto::aead::Cipher;
use crate::kek::KekError;
use crate::kek::passphrase::Passphrase;
use std::path::Path;
use zeroize::Zeroizing;

/// Plaintext of the `check` field, sealed under the master key.
pub const CHECK_PLAINTEXT: &[u8] = b"kekfs keystore check v1";
/// AAD of the `check` field.
pub const CHECK_AAD: &[u8] = b"kekfs keystore check";

/// The only key derivation function supported (`kdf.alg`).
pub const KDF_ALG: &str = "argon2id";
/// Argon2id memory cost for new keystores, in KiB.
pub const DEFAULT_M_KIB: u32 = 19456;
/// Argon2id iterations for new keystores.
pub const DEFAULT_T: u32 = 2;
/// Argon2id lanes for new keystores.
pub const DEFAULT_P: u32 = 1;
/// Salt length for new keystores, in bytes.
pub const SALT_LEN: usize = 16;

/// Argon2id(passphrase, salt) with the file's parameters. The Argon2 working memory (from
/// which the output could be recomputed) is wiped before returning.
pub(super) fn derive_master(pass: &Passphrase, kdf: &KdfParams) -> Result<Key32, KekError> {
    use argon2::{Algorithm, Argon2, Block, Params, Version};
    let params = Params::new(kdf.m_kib, kdf.t, kdf.p, Some(Key32::LEN)).map_err(|e| {
        KekError::Corrupt(format!(
            "keystore KDF parameters are invalid ({e}); restore keystore.json from a backup"
        ))
    })?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let n = argon.params().block_count();
    let mut blocks: Vec<Block> = Vec::new();
    blocks.try_reserve_exact(n).map_err(|_| {
        KekError::Io(format!(
            "not enough memory for the keystore key derivation ({} KiB); free some memory \
             and retry",
            kdf.m_kib
        ))
    })?;
    blocks.resize(n, Block::new());
    let mut out = Zeroizing::new([0u8; Key32::LEN]);
    let res =
        argon.hash_password_into_with_memory(pass.as_bytes(), &kdf.salt, &mut out[..], &mut blocks);
    blocks.fill(Block::new());
    std::hint::black_box(&blocks);
    res.map_err(|e| {
        KekError::BadPassphrase(format!(
            "the key derivation rejected the passphrase ({e}); use a shorter passphrase"
        ))
    })?;
    Key32::from_slice(&out[..])
        .ok_or_else(|| KekError::Io("key derivation returned a wrong-sized key".into()))
}

/// Verify `check` under `master`. An authentication failure becomes `on_mismatch()`;
/// a check that authenticates but holds the wrong constant means a damaged file.
pub(super) fn verify_master(
    file: &KeystoreFile,
    master: &Key32,
    path: &Path,
    on_mismatch: impl FnOnce() -> KekError,
) -> Result<(), KekError> {
    let pt = Cipher::new(master)
        .open(CHECK_AAD, &file.check)
        .map(Zeroizing::new)
        .map_err(|_| on_mismatch())?;
    if pt.as_slice() != CHECK_PLAINTEXT {
        return Err(KekError::Corrupt(format!(
            "{} is damaged: its \"check\" field decrypts to an unexpected value; restore it \
             from a backup",
            path.display()
        )));
    }
    Ok(())
}
