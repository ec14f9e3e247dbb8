//! Bookkeeping of the volumes that use each key: the `VolumeRef` record, volume id checks, and
//! recording a volume against a key.

use super::Keystore;
use super::lifecycle::any_key;
use crate::kek::KekError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Longest backing path recorded for a volume, in bytes.
pub const MAX_VOLUME_PATH_LEN: usize = 4096;
/// Length of a volume id in hex digits.
pub const VOLUME_ID_HEX_LEN: usize = 32;

/// Check a volume id as recorded in the keystore: 32 lower-case hex digits.
pub fn validate_volume_id(id: &str) -> Result<(), String> {
    if id.len() == VOLUME_ID_HEX_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Ok(());
    }
    let shown: String = id.chars().take(40).collect();
    Err(format!(
        "invalid volume id {shown:?}: expected {VOLUME_ID_HEX_LEN} lower-case hex digits"
    ))
}

/// A volume recorded as using a key (by `kekfs init`), as shown by `kekfs key show`.
/// Bookkeeping only: nothing is enforced from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRef {
    /// The volume id: 32 lower-case hex digits.
    pub id: String,
    /// The backing directory when it was recorded (absolute if it could be resolved).
    pub path: String,
    /// When it was (last) recorded, Unix seconds.
    pub registered: u64,
}

impl Keystore {
    /// Record that volume `volume_id_hex` (32 hex digits), in `backing_path`, uses key
    /// `name` (shown by `kekfs key show`). Recording the same volume again updates its path
    /// and time. Bookkeeping only: it grants nothing.
    pub fn register_volume(
        &mut self,
        name: &str,
        volume_id_hex: &str,
        backing_path: &Path,
        now: u64,
    ) -> Result<(), KekError> {
        let id = volume_id_hex.to_ascii_lowercase();
        validate_volume_id(&id).map_err(KekError::ChangeRefused)?;
        let path = backing_path.to_string_lossy().into_owned();
        if path.is_empty() || path.len() > MAX_VOLUME_PATH_LEN {
            return Err(KekError::ChangeRefused(format!(
                "backing path of {} bytes cannot be recorded (1-{MAX_VOLUME_PATH_LEN})",
                path.len()
            )));
        }
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            let key = any_key(file, &dir, name)?;
            let entry = VolumeRef {
                id,
                path,
                registered: now,
            };
            match key.volumes.iter_mut().find(|v| v.id == entry.id) {
                Some(v) => *v = entry,
                None => key.volumes.push(entry),
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::keystore::testutil::{change_refused, new_store, second_handle};

    #[test]
    fn register_volumes() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        let a = "0123456789abcdef".repeat(2);
        let b = "FEDCBA9876543210".repeat(2);
        ks.register_volume("k", &a, Path::new("/srv/a"), 10)
            .unwrap();
        ks.register_volume("k", &b, Path::new("/srv/b"), 11)
            .unwrap();
        ks.register_volume("k", &a, Path::new("/srv/a2"), 12)
            .unwrap();
        let info = second_handle(&ks).key_info("k").unwrap();
        assert_eq!(
            info.volumes,
            [
                VolumeRef {
                    id: a.clone(),
                    path: "/srv/a2".into(),
                    registered: 12
                },
                VolumeRef {
                    id: b.to_ascii_lowercase(),
                    path: "/srv/b".into(),
                    registered: 11
                },
            ]
        );
        for bad in ["", "xyz", &"0".repeat(31), &"g".repeat(32), &"0".repeat(33)] {
            change_refused(
                ks.register_volume("k", bad, Path::new("/x"), 1),
                "invalid volume id",
            );
        }
        change_refused(
            ks.register_volume("k", &a, Path::new(&"x".repeat(5000)), 1),
            "cannot be recorded",
        );
        assert!(matches!(
            ks.register_volume("nope", &a, Path::new("/x"), 1),
            Err(KekError::NotFound(_))
        ));
        // Non-UTF-8 paths are recorded lossily, never refused.
        use std::os::unix::ffi::OsStrExt;
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"/srv/\xff"));
        ks.register_volume("k", &a, odd, 13).unwrap();
        assert_eq!(ks.key_info("k").unwrap().volumes[0].path, "/srv/\u{fffd}");
    }
}
