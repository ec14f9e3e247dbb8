//! The `soft:` keystore: the open-keystore handle [`Keystore`] (create, open, re-read, and the
//! locked read-modify-write behind every change) over named, versioned 256-bit keys sealed under an
//! Argon2id-derived master key.
//!
//! A keystore is a directory holding `keystore.json` (the state, replaced atomically on every
//! change) and `keystore.lock` (an `flock(2)` target: exclusive while reading-modifying-writing,
//! shared while only reading). See `docs/FORMAT.md`, "soft: keystore", for the file format.
//!
//! The rest of the keystore lives in submodules, each re-exported here:
//! - `format`: the `keystore.json` schema, parsing and validation of every field;
//! - `storage`: the lock file, reading `keystore.json` and replacing it atomically;
//! - `permissions`: refusing or warning about keystore files others can read or write;
//! - `kdf`: Argon2id from passphrase to master key, and the master key `check`;
//! - `material`: creating and rotating keys, sealing and unsealing their material;
//! - `lifecycle`: enable/disable, dates, delete/recover/purge, purge protection, retention;
//! - `policy`: per-key access policies by uid;
//! - `volumes`: the volumes recorded as using each key;
//! - `info`: the secret-free `KeyInfo`/`VersionInfo` views;
//! - `clock`, `location`: time helpers and the default keystore directory.

mod clock;
mod format;
mod info;
mod kdf;
mod lifecycle;
mod location;
mod material;
mod permissions;
mod policy;
mod storage;
#[cfg(test)]
mod testutil;
mod volumes;

pub use clock::{format_duration, format_time, unix_now};
pub use format::{FORMAT_NAME, FORMAT_VERSION, MAX_KEY_NAME_LEN, validate_key_name};
pub use info::{KeyInfo, VersionInfo};
pub use kdf::{CHECK_AAD, CHECK_PLAINTEXT, DEFAULT_M_KIB, DEFAULT_P, DEFAULT_T, KDF_ALG, SALT_LEN};
pub use lifecycle::{DEFAULT_RETENTION_SECS, MAX_RETENTION_SECS};
pub use location::{ENV_KEYSTORE, default_keystore_dir};
pub use material::MATERIAL_AAD_LABEL;
pub use permissions::permission_warnings;
pub use policy::{KeyOp, KeyPolicy};
pub use storage::{KEYSTORE_FILE, LOCK_FILE};
pub use volumes::{MAX_VOLUME_PATH_LEN, VOLUME_ID_HEX_LEN, VolumeRef, validate_volume_id};

use self::format::{KdfParams, KeystoreFile};
use self::kdf::{derive_master, verify_master};
use self::permissions::warn_permissions;
use self::storage::{lock, read_keystore, write_atomic};
use super::KekError;
use super::passphrase::Passphrase;
use crate::crypto::Key32;
use crate::crypto::aead::Cipher;
use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// An open `soft:` keystore: the directory, the master key derived from its passphrase, and
/// the last state read from `keystore.json`.
pub struct Keystore {
    dir: PathBuf,
    master: Key32,
    file: KeystoreFile,
}

impl fmt::Debug for Keystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keystore")
            .field("dir", &self.dir)
            .field("keys", &self.file.keys.len())
            .finish_non_exhaustive()
    }
}

impl Keystore {
    /// Create a new, empty keystore in `dir` (created 0700 if missing) protected by `pass`.
    /// Refuses if `dir/keystore.json` already exists.
    pub fn init(dir: &Path, pass: &Passphrase) -> Result<Keystore, KekError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                KekError::Io(format!(
                    "cannot create keystore directory {}: {e}; check the path and the \
                     permissions of its parent",
                    dir.display()
                ))
            })?;
        let _lock = lock(dir, true)?;
        let path = dir.join(KEYSTORE_FILE);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {
                return Err(KekError::AlreadyExists(format!(
                    "a keystore already exists in {} ({}); use it as it is, or choose another \
                     directory with --keystore",
                    dir.display(),
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(KekError::Io(format!(
                    "cannot check for {}: {e}; check the directory permissions",
                    path.display()
                )));
            }
        }
        let kdf = KdfParams {
            alg: KDF_ALG.into(),
            m_kib: DEFAULT_M_KIB,
            t: DEFAULT_T,
            p: DEFAULT_P,
            salt: crate::crypto::random_array::<SALT_LEN>().to_vec(),
        };
        let master = derive_master(pass, &kdf)?;
        let check = Cipher::new(&master).seal(CHECK_AAD, CHECK_PLAINTEXT);
        let file = KeystoreFile {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            kdf,
            check,
            retention_secs: DEFAULT_RETENTION_SECS,
            keys: BTreeMap::new(),
        };
        write_atomic(dir, &file)?;
        Ok(Keystore {
            dir: dir.to_path_buf(),
            master,
            file,
        })
    }

    /// Open the keystore in `dir` with `pass` (Argon2id with the cost stored in the file).
    pub fn open(dir: &Path, pass: &Passphrase) -> Result<Keystore, KekError> {
        warn_permissions(dir);
        let file = {
            let _lock = lock(dir, false)?;
            read_keystore(dir)?
        };
        // The slow KDF runs without holding the lock.
        let master = derive_master(pass, &file.kdf)?;
        let path = dir.join(KEYSTORE_FILE);
        verify_master(&file, &master, &path, || {
            KekError::BadPassphrase(format!(
                "the passphrase does not unlock the keystore {}; check --passfile, \
                 $KEKFS_PASSPHRASE or what you typed",
                path.display()
            ))
        })?;
        Ok(Keystore {
            dir: dir.to_path_buf(),
            master,
            file,
        })
    }

    /// Open this keystore again (a second handle with the same master key).
    pub fn reopen(&self) -> Result<Keystore, KekError> {
        Keystore::open_with_master(&self.dir, self.master.duplicate())
    }

    /// Open the keystore in `dir` with an already derived master key (no Argon2 run).
    pub fn open_with_master(dir: &Path, master: Key32) -> Result<Keystore, KekError> {
        warn_permissions(dir);
        let file = {
            let _lock = lock(dir, false)?;
            read_keystore(dir)?
        };
        let path = dir.join(KEYSTORE_FILE);
        verify_master(&file, &master, &path, || {
            KekError::BadPassphrase(format!(
                "the master key given does not unlock the keystore {}; open it with its \
                 passphrase instead",
                path.display()
            ))
        })?;
        Ok(Keystore {
            dir: dir.to_path_buf(),
            master,
            file,
        })
    }

    /// Re-read `keystore.json` (under a shared lock) and re-verify it with the held master
    /// key, so changes made by other processes are seen. On error the old state is kept.
    pub fn reload(&mut self) -> Result<(), KekError> {
        let file = {
            let _lock = lock(&self.dir, false)?;
            read_keystore(&self.dir)?
        };
        self.verified(&file)?;
        self.file = file;
        Ok(())
    }

    fn verified(&self, file: &KeystoreFile) -> Result<(), KekError> {
        let path = self.dir.join(KEYSTORE_FILE);
        verify_master(file, &self.master, &path, || {
            KekError::BadPassphrase(format!(
                "{} no longer opens with the master key this process derived when it opened \
                 the keystore (was the keystore re-created or its passphrase changed?); open it \
                 again with the current passphrase",
                path.display()
            ))
        })
    }

    /// Lock exclusively, re-read, apply `f` to the fresh state, save atomically, unlock.
    fn mutate<R>(
        &mut self,
        f: impl FnOnce(&mut KeystoreFile, &Key32) -> Result<R, KekError>,
    ) -> Result<R, KekError> {
        let _lock = lock(&self.dir, true)?;
        let mut file = read_keystore(&self.dir)?;
        self.verified(&file)?;
        let r = f(&mut file, &self.master)?;
        write_atomic(&self.dir, &file)?;
        self.file = file;
        Ok(r)
    }

    /// A copy of the master key, for tests that need more handles without Argon2 runs.
    #[cfg(test)]
    pub(crate) fn master_for_tests(&self) -> Key32 {
        self.master.duplicate()
    }

    /// The keystore directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::keystore::testutil::{PASS, new_store, pass, second_handle};
    use serde_json::{Value, json};
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn init_open_roundtrip_and_modes() {
        let (tmp, mut ks) = new_store();
        let dir = tmp.path().join("ks");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEYSTORE_FILE)), 0o600);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        assert_eq!(ks.create_key("k1").unwrap(), 1);
        assert_eq!(mode(&dir.join(KEYSTORE_FILE)), 0o600);
        // No temp files left behind.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [KEYSTORE_FILE, LOCK_FILE]);

        let ks2 = Keystore::open(&dir, &pass(PASS)).unwrap();
        assert_eq!(ks2.key_names(), ["k1"]);
        let now = unix_now();
        let (v1, m1) = ks.key_material("k1", None, now).unwrap();
        let (v2, m2) = ks2.key_material("k1", Some(1), now).unwrap();
        assert_eq!((v1, v2), (1, 1));
        assert_eq!(m1.expose(), m2.expose());
        // The file records the KDF cost it was created with.
        let v: Value =
            serde_json::from_slice(&std::fs::read(dir.join(KEYSTORE_FILE)).unwrap()).unwrap();
        assert_eq!(v["format"], "kekfs-keystore");
        assert_eq!(v["version"], 1);
        assert_eq!(
            v["kdf"],
            json!({"alg": "argon2id", "m_kib": 19456, "t": 2, "p": 1, "salt": v["kdf"]["salt"]})
        );
        assert!(format!("{ks:?}").contains("keys: 1"));
    }

    #[test]
    fn wrong_passphrase_and_wrong_master() {
        let (_tmp, ks) = new_store();
        let e = Keystore::open(ks.dir(), &pass(b"wrong")).unwrap_err();
        assert!(
            matches!(&e, KekError::BadPassphrase(m) if m.contains("does not unlock")),
            "{e}"
        );
        let e = Keystore::open_with_master(ks.dir(), Key32::generate()).unwrap_err();
        assert!(matches!(e, KekError::BadPassphrase(_)), "{e}");
    }

    #[test]
    fn init_refuses_existing() {
        let (_tmp, ks) = new_store();
        let e = Keystore::init(ks.dir(), &pass(b"other")).unwrap_err();
        assert!(matches!(&e, KekError::AlreadyExists(m) if m.contains("keystore already exists")));
    }

    #[test]
    fn reload_after_reinit_is_bad_passphrase() {
        let (_tmp, mut ks) = new_store();
        std::fs::remove_file(ks.dir().join(KEYSTORE_FILE)).unwrap();
        assert!(matches!(ks.reload(), Err(KekError::NoKeystore(_))));
        Keystore::init(ks.dir(), &pass(b"new passphrase")).unwrap();
        let e = ks.reload().unwrap_err();
        assert!(
            matches!(&e, KekError::BadPassphrase(m) if m.contains("no longer opens")),
            "{e}"
        );
        assert!(matches!(
            ks.create_key("x"),
            Err(KekError::BadPassphrase(_))
        ));
    }

    #[test]
    fn concurrent_writers_all_land() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("shared").unwrap();
        const THREADS: u32 = 8;
        const ROTATIONS: u32 = 4;
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let mut h = second_handle(&ks);
                std::thread::spawn(move || {
                    h.create_key(&format!("k{i}")).unwrap();
                    let mut got = Vec::new();
                    for _ in 0..ROTATIONS {
                        got.push(h.rotate_key("shared").unwrap());
                    }
                    got
                })
            })
            .collect();
        let mut versions: Vec<u32> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        versions.sort();
        assert_eq!(versions, (2..=1 + THREADS * ROTATIONS).collect::<Vec<_>>());
        ks.reload().unwrap();
        assert_eq!(ks.key_names().len(), 1 + THREADS as usize);
        let now = unix_now();
        for i in 0..THREADS {
            ks.key_material(&format!("k{i}"), Some(1), now).unwrap();
        }
        assert_eq!(
            ks.key_material("shared", None, now).unwrap().0,
            1 + THREADS * ROTATIONS
        );
    }
}
