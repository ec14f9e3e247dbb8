//! Permission checks on a keystore directory: refusing a world-writable `keystore.json` and warning
//! about a file or directory other users can read or replace.

use super::storage::KEYSTORE_FILE;
use crate::kek::KekError;
use std::fs::File;
use std::path::Path;

/// A `keystore.json` that every user may write could have had its key states, dates and
/// policies changed by anyone (only the key material is sealed): refuse it.
pub(super) fn refuse_world_writable(file: &File, path: &Path) -> Result<(), KekError> {
    use std::os::unix::fs::MetadataExt;
    let mode = file
        .metadata()
        .map_err(|e| KekError::Io(format!("cannot stat {}: {e}", path.display())))?
        .mode();
    if mode & 0o002 != 0 {
        return Err(KekError::Corrupt(format!(
            "{} is writable by every user (mode {:04o}), so anyone could have changed its key \
             states and access policies; kekfs refuses to use it. Check that it was not \
             tampered with, then `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        )));
    }
    Ok(())
}

/// Warnings about unsafe permissions of the keystore in `dir`: a `keystore.json` that
/// other users may read or write (its key material is sealed by the passphrase, but its
/// states and policies are not, and offline guessing of the passphrase becomes possible),
/// or a directory others may write, where anyone could replace `keystore.json`. Empty
/// when the modes are safe (or cannot be read; opening reports that).
pub fn permission_warnings(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let path = dir.join(KEYSTORE_FILE);
    if let Ok(m) = std::fs::metadata(&path) {
        let mode = m.mode() & 0o7777;
        if mode & 0o077 != 0 {
            out.push(format!(
                "{} has mode {mode:04o}: other users can read{} it; run `chmod 600 {}`",
                path.display(),
                if mode & 0o022 != 0 { " or write" } else { "" },
                path.display()
            ));
        }
    }
    if let Ok(m) = std::fs::metadata(dir) {
        let mode = m.mode() & 0o7777;
        // With the sticky bit (like /tmp), others cannot replace files they do not own.
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            out.push(format!(
                "keystore directory {} has mode {mode:04o}: other users can replace \
                 keystore.json in it; run `chmod 700 {}`",
                dir.display(),
                dir.display()
            ));
        }
    }
    out
}

pub(super) fn warn_permissions(dir: &Path) {
    for w in permission_warnings(dir) {
        eprintln!("kekfs: warning: {w}");
    }
}
