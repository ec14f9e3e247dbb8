//! Locking and file I/O of a keystore directory: the `flock` guard on `keystore.lock`, reading
//! `keystore.json` (with size and permission checks) and replacing it atomically.

use super::format::{KeystoreFile, parse_keystore};
use super::location::ENV_KEYSTORE;
use super::permissions::refuse_world_writable;
use crate::kek::KekError;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Name of the state file inside the keystore directory.
pub const KEYSTORE_FILE: &str = "keystore.json";
/// Name of the lock file inside the keystore directory.
pub const LOCK_FILE: &str = "keystore.lock";

// Bound on the size of keystore.json, so a damaged file cannot make us allocate without limit.
const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;

/// Holds `keystore.lock` locked until dropped (closing the descriptor releases the flock).
pub(super) struct LockGuard {
    _file: Option<File>,
}

/// Take the keystore lock. Exclusive locks create the lock file (0600) if needed. Shared locks
/// use an existing lock file only: a reader needs no lock for consistency, since every write is
/// an atomic rename, so a read-only or lock-less keystore directory can still be read.
pub(super) fn lock(dir: &Path, exclusive: bool) -> Result<LockGuard, KekError> {
    let path = dir.join(LOCK_FILE);
    let file = if exclusive {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                KekError::Io(format!(
                    "cannot open lock file {}: {e}; check that the keystore directory exists \
                     and is writable by you",
                    path.display()
                ))
            })?
    } else {
        match File::open(&path) {
            Ok(f) => f,
            Err(_) => return Ok(LockGuard { _file: None }),
        }
    };
    let locked = if exclusive {
        file.lock()
    } else {
        file.lock_shared()
    };
    locked.map_err(|e| {
        KekError::Io(format!(
            "cannot lock {}: {e}; check that the keystore is on a local file system",
            path.display()
        ))
    })?;
    Ok(LockGuard { _file: Some(file) })
}

fn no_keystore(dir: &Path) -> KekError {
    KekError::NoKeystore(format!(
        "{} does not exist; run `kekfs keystore init` to create a keystore there, or point \
         --keystore (or ${ENV_KEYSTORE}) at an existing keystore directory",
        dir.join(KEYSTORE_FILE).display()
    ))
}

/// Read and parse `dir/keystore.json`. The caller holds whatever lock it needs.
pub(super) fn read_keystore(dir: &Path) -> Result<KeystoreFile, KekError> {
    let path = dir.join(KEYSTORE_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no_keystore(dir)),
        Err(e) => {
            return Err(KekError::Io(format!(
                "cannot open {}: {e}; check that it exists and is readable by you",
                path.display()
            )));
        }
    };
    refuse_world_writable(&file, &path)?;
    let mut buf = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            KekError::Io(format!(
                "cannot read {}: {e}; check that it is a regular, readable file",
                path.display()
            ))
        })?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(KekError::Corrupt(format!(
            "{} is larger than {MAX_FILE_LEN} bytes, which no keystore is; restore it from \
             a backup",
            path.display()
        )));
    }
    parse_keystore(&buf, &path)
}

/// Replace `dir/keystore.json` atomically: temp file in `dir`, fsync, rename, fsync `dir`.
pub(super) fn write_atomic(dir: &Path, file: &KeystoreFile) -> Result<(), KekError> {
    let path = dir.join(KEYSTORE_FILE);
    let failed = |what: &str, e: std::io::Error| {
        KekError::Io(format!(
            "cannot {what} while updating {}: {e}; the keystore was not changed — check free \
             space and permissions of {}",
            path.display(),
            dir.display()
        ))
    };
    let mut json = serde_json::to_vec_pretty(file)
        .map_err(|e| KekError::Io(format!("cannot serialise the keystore: {e}")))?;
    json.push(b'\n');
    let mut tmp = tempfile::Builder::new()
        .prefix(".keystore.json.")
        .suffix(".tmp")
        .permissions(Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| failed("create a temporary file", e))?;
    tmp.write_all(&json)
        .map_err(|e| failed("write the temporary file", e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| failed("fsync the temporary file", e))?;
    tmp.persist(&path)
        .map_err(|e| failed("rename the temporary file", e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| {
        KekError::Io(format!(
            "{} was updated but fsync of {} failed ({e}); the change may not survive a \
             crash — check the file system",
            path.display(),
            dir.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::keystore::Keystore;
    use crate::kek::keystore::testutil::{PASS, pass};

    #[test]
    fn missing_keystore() {
        let tmp = tempfile::tempdir().unwrap();
        for dir in [tmp.path().to_path_buf(), tmp.path().join("absent")] {
            let e = Keystore::open(&dir, &pass(PASS)).unwrap_err();
            assert!(
                matches!(&e, KekError::NoKeystore(m) if m.contains("kekfs keystore init")),
                "{e}"
            );
        }
        // Reading does not litter the directory.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
