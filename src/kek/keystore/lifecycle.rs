//! Key lifecycle changes: enabling, disabling and dating versions, soft deletion, recovery,
//! purging, purge protection and retention periods.

use super::Keystore;
use super::clock::{format_duration, format_time};
use super::format::{KeyEntry, KeystoreFile, VersionEntry};
use super::volumes::VolumeRef;
use crate::kek::KekError;
use std::path::Path;

/// Soft-delete retention period of a keystore that sets none: 7 days, in seconds.
pub const DEFAULT_RETENTION_SECS: u64 = 7 * 86_400;
/// Longest retention period accepted (3650 days), in seconds.
pub const MAX_RETENTION_SECS: u64 = 3650 * 86_400;

impl KeyEntry {
    /// The retention period in effect for this key.
    pub(super) fn retention(&self, default: u64) -> u64 {
        self.retention_secs.unwrap_or(default)
    }

    /// End of the recovery window (deleted_at + retention), if deleted.
    pub(super) fn window_end(&self, default: u64) -> Option<u64> {
        self.deleted_at
            .map(|d| d.saturating_add(self.retention(default)))
    }
}

pub(super) fn key_names(file: &KeystoreFile) -> String {
    if file.keys.is_empty() {
        "none".into()
    } else {
        file.keys.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn missing_key(file: &KeystoreFile, dir: &Path, name: &str) -> KekError {
    KekError::NotFound(format!(
        "no key {name:?} in keystore {} (existing keys: {}); check the name with `kekfs key list`",
        dir.display(),
        key_names(file)
    ))
}

/// Key `name` for any change, deleted or not.
pub(super) fn any_key<'a>(
    file: &'a mut KeystoreFile,
    dir: &Path,
    name: &str,
) -> Result<&'a mut KeyEntry, KekError> {
    if !file.keys.contains_key(name) {
        return Err(missing_key(file, dir, name));
    }
    file.keys
        .get_mut(name)
        .ok_or_else(|| KekError::NotFound(format!("no key {name:?}")))
}

/// Key `name` for a change that needs it alive (not soft-deleted).
pub(super) fn live_key<'a>(
    file: &'a mut KeystoreFile,
    dir: &Path,
    name: &str,
) -> Result<&'a mut KeyEntry, KekError> {
    let key = any_key(file, dir, name)?;
    if let Some(at) = key.deleted_at {
        return Err(KekError::ChangeRefused(format!(
            "key {name:?} was deleted at {}; recover it first with `kekfs key recover {name}`",
            format_time(at)
        )));
    }
    Ok(key)
}

/// The versions a change applies to: all of them (`None`) or exactly `version`.
fn select_versions<'a>(
    key: &'a mut KeyEntry,
    name: &str,
    version: Option<u32>,
) -> Result<Vec<&'a mut VersionEntry>, KekError> {
    let Some(v) = version else {
        return Ok(key.versions.iter_mut().collect());
    };
    let last = key.versions.last().map_or(0, |e| e.version);
    match key.versions.iter_mut().find(|e| e.version == v) {
        Some(e) => Ok(vec![e]),
        None => Err(KekError::NotFound(format!(
            "key {name:?} has no version {v} (its versions are 1-{last}); see `kekfs key show \
             {name}`"
        ))),
    }
}

fn check_retention(secs: Option<u64>) -> Result<(), KekError> {
    match secs {
        Some(s) if s > MAX_RETENTION_SECS => Err(KekError::ChangeRefused(format!(
            "a retention period of {} is too long (at most {})",
            format_duration(s),
            format_duration(MAX_RETENTION_SECS)
        ))),
        _ => Ok(()),
    }
}

impl Keystore {
    /// Disable key `name`: one version (`Some(v)`) or every version (`None`). Wrap and
    /// unwrap with a disabled version are refused from the next operation on. Returns whether
    /// anything changed (false if already disabled).
    pub fn disable_version(&mut self, name: &str, version: Option<u32>) -> Result<bool, KekError> {
        self.set_enabled(name, version, false)
    }

    /// Enable key `name`: one version (`Some(v)`) or every version (`None`). Returns whether
    /// anything changed (false if already enabled).
    pub fn enable_version(&mut self, name: &str, version: Option<u32>) -> Result<bool, KekError> {
        self.set_enabled(name, version, true)
    }

    fn set_enabled(
        &mut self,
        name: &str,
        version: Option<u32>,
        enabled: bool,
    ) -> Result<bool, KekError> {
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            let key = live_key(file, &dir, name)?;
            let mut changed = false;
            for v in select_versions(key, name, version)? {
                changed |= v.enabled != enabled;
                v.enabled = enabled;
            }
            Ok(changed)
        })
    }

    /// Set the validity dates of one version (`Some(v)`) or every version (`None`) of key
    /// `name`. For each date, `None` leaves it as it is, `Some(None)` clears it and
    /// `Some(Some(t))` sets it (Unix seconds). Refused if a version would end up with
    /// `not_before >= expires` (it could never be used).
    pub fn set_dates(
        &mut self,
        name: &str,
        version: Option<u32>,
        not_before: Option<Option<u64>>,
        expires: Option<Option<u64>>,
    ) -> Result<(), KekError> {
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            let key = live_key(file, &dir, name)?;
            for v in select_versions(key, name, version)? {
                if let Some(nb) = not_before {
                    v.not_before = nb;
                }
                if let Some(ex) = expires {
                    v.expires = ex;
                }
                if let (Some(nb), Some(ex)) = (v.not_before, v.expires)
                    && nb >= ex
                {
                    return Err(KekError::ChangeRefused(format!(
                        "key {name:?} version {}: not-before {} is not earlier than expiry {}, \
                         so the version could never be used; choose other dates (or `none` to \
                         clear one)",
                        v.version,
                        format_time(nb),
                        format_time(ex)
                    )));
                }
            }
            Ok(())
        })
    }

    /// Soft-delete key `name` at `now`: it refuses all use at once, and can be recovered
    /// until `now + retention`. Returns the end of that recovery window.
    pub fn delete_key(&mut self, name: &str, now: u64) -> Result<u64, KekError> {
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            let default = file.retention_secs;
            let key = any_key(file, &dir, name)?;
            if let Some(at) = key.deleted_at {
                let end = key.window_end(default).unwrap_or(at);
                let what_next = if now < end {
                    format!(
                        "it can be recovered with `kekfs key recover {name}` until {}",
                        format_time(end)
                    )
                } else if key.purge_protection {
                    "its retention period is over and it is purge-protected".to_string()
                } else {
                    format!("its retention period is over: purge it with `kekfs key purge {name}`")
                };
                return Err(KekError::ChangeRefused(format!(
                    "key {name:?} is already deleted (at {}); {what_next}",
                    format_time(at)
                )));
            }
            key.deleted_at = Some(now);
            Ok(now.saturating_add(key.retention(default)))
        })
    }

    /// Undo the soft deletion of key `name`; allowed only while `now` is before
    /// `deleted_at + retention`.
    pub fn recover_key(&mut self, name: &str, now: u64) -> Result<(), KekError> {
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            let default = file.retention_secs;
            let key = any_key(file, &dir, name)?;
            let Some(end) = key.window_end(default) else {
                return Err(KekError::ChangeRefused(format!(
                    "key {name:?} is not deleted; there is nothing to recover"
                )));
            };
            if now >= end {
                let next = if key.purge_protection {
                    "it is purge-protected, so it stays in the keystore, unusable".to_string()
                } else {
                    format!("remove it with `kekfs key purge {name}`")
                };
                return Err(KekError::ChangeRefused(format!(
                    "the retention period of deleted key {name:?} ended at {}; the deletion is \
                     final and the key can no longer be recovered ({next})",
                    format_time(end)
                )));
            }
            key.deleted_at = None;
            Ok(())
        })
    }

    /// Remove soft-deleted key `name` and all its versions for good. Refused while purge
    /// protection is on (always, for that key) or before `deleted_at + retention`. Returns
    /// the volumes that were recorded as using it (now unrecoverable).
    pub fn purge_key(&mut self, name: &str, now: u64) -> Result<Vec<VolumeRef>, KekError> {
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            let default = file.retention_secs;
            let key = any_key(file, &dir, name)?;
            let Some(end) = key.window_end(default) else {
                return Err(KekError::ChangeRefused(format!(
                    "key {name:?} is not deleted; delete it first with `kekfs key delete \
                     {name}` (purging then removes it for good once its retention period has \
                     passed)"
                )));
            };
            if key.purge_protection {
                let recover = if now < end {
                    format!(
                        "; it can be recovered with `kekfs key recover {name}` until {}",
                        format_time(end)
                    )
                } else {
                    String::new()
                };
                return Err(KekError::ChangeRefused(format!(
                    "purge protection is on for key {name:?}: a protected key can never be \
                     purged{recover}"
                )));
            }
            if now < end {
                return Err(KekError::ChangeRefused(format!(
                    "the retention period of deleted key {name:?} ends at {}; it cannot be \
                     purged before then. To undo the deletion use `kekfs key recover {name}`",
                    format_time(end)
                )));
            }
            let volumes = std::mem::take(&mut key.volumes);
            file.keys.remove(name);
            Ok(volumes)
        })
    }

    /// Turn purge protection of key `name` on (`true`). Like cloud key vaults, it cannot be
    /// turned off again: `false` on a protected key is refused. Turning it on also pins the
    /// key's retention period, which can then only be lengthened. Returns whether anything
    /// changed.
    pub fn set_purge_protection(&mut self, name: &str, on: bool) -> Result<bool, KekError> {
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            let default = file.retention_secs;
            let key = any_key(file, &dir, name)?;
            match (key.purge_protection, on) {
                (true, false) => Err(KekError::ChangeRefused(format!(
                    "purge protection of key {name:?} is on and cannot be turned off (as in \
                     cloud key vaults: that is what makes it a protection)"
                ))),
                (false, true) => {
                    key.purge_protection = true;
                    key.retention_secs = Some(key.retention(default));
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    /// Set the soft-delete retention period of key `name` (seconds, at most
    /// [`MAX_RETENTION_SECS`]); `None` makes it follow the keystore default. A purge-protected
    /// key's retention can only be lengthened.
    pub fn set_retention(&mut self, name: &str, secs: Option<u64>) -> Result<(), KekError> {
        check_retention(secs)?;
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            let default = file.retention_secs;
            let key = any_key(file, &dir, name)?;
            let old = key.retention(default);
            let new = secs.unwrap_or(default);
            if key.purge_protection && new < old {
                return Err(KekError::ChangeRefused(format!(
                    "key {name:?} is purge-protected, so its retention period ({}) can only be \
                     lengthened",
                    format_duration(old)
                )));
            }
            key.retention_secs = if key.purge_protection {
                Some(new)
            } else {
                secs
            };
            Ok(())
        })
    }

    /// Set the keystore's default soft-delete retention period (seconds, at most
    /// [`MAX_RETENTION_SECS`]), used by keys that set none. Purge-protected keys keep the
    /// retention they had.
    pub fn set_default_retention(&mut self, secs: u64) -> Result<(), KekError> {
        check_retention(Some(secs))?;
        self.mutate(|file, _| {
            let old = file.retention_secs;
            for key in file.keys.values_mut() {
                if key.purge_protection && key.retention_secs.is_none() {
                    key.retention_secs = Some(old);
                }
            }
            file.retention_secs = secs;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::Refusal;
    use crate::kek::keystore::clock::unix_now;
    use crate::kek::keystore::storage::KEYSTORE_FILE;
    use crate::kek::keystore::testutil::{
        change_refused, edit_json, new_store, refusal, second_handle,
    };
    use serde_json::Value;

    #[test]
    fn disable_enable_versions_and_whole_key() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        ks.rotate_key("k").unwrap();
        ks.rotate_key("k").unwrap();
        let now = unix_now();
        // A second handle (a running mount) sees each change at its next re-read.
        let mut mount = second_handle(&ks);

        assert!(ks.disable_version("k", Some(3)).unwrap());
        assert!(!ks.disable_version("k", Some(3)).unwrap());
        mount.reload().unwrap();
        assert_eq!(refusal(&mount, "k", Some(3), now), Some(Refusal::Disabled));
        assert_eq!(mount.key_material("k", None, now).unwrap().0, 2);
        let info = mount.key_info("k").unwrap();
        assert_eq!(
            info.versions.iter().map(|v| v.enabled).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert_eq!(info.usable_version_at(now), Some(2));

        // Whole key: every version.
        assert!(ks.disable_version("k", None).unwrap());
        mount.reload().unwrap();
        for v in [None, Some(1), Some(2), Some(3)] {
            assert_eq!(refusal(&mount, "k", v, now), Some(Refusal::Disabled));
        }
        assert_eq!(mount.key_info("k").unwrap().usable_version_at(now), None);
        assert!(ks.enable_version("k", Some(1)).unwrap());
        mount.reload().unwrap();
        assert_eq!(mount.key_material("k", None, now).unwrap().0, 1);
        assert!(ks.enable_version("k", None).unwrap());
        assert!(!ks.enable_version("k", None).unwrap());
        mount.reload().unwrap();
        assert_eq!(mount.key_material("k", None, now).unwrap().0, 3);

        // Unknown key or version.
        assert!(matches!(
            ks.disable_version("k", Some(4)),
            Err(KekError::NotFound(m)) if m.contains("no version 4") && m.contains("1-3")
        ));
        assert!(matches!(
            ks.enable_version("nope", None),
            Err(KekError::NotFound(m)) if m.contains("existing keys: k")
        ));
        // Changes to a deleted key are refused until it is recovered.
        ks.delete_key("k", now).unwrap();
        change_refused(ks.disable_version("k", None), "recover it first");
    }

    #[test]
    fn set_dates_per_version_and_key() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        ks.rotate_key("k").unwrap();
        let t = 2_000_000_000u64;
        ks.set_dates("k", Some(2), Some(Some(t)), None).unwrap();
        assert_eq!(
            refusal(&ks, "k", Some(2), t - 1),
            Some(Refusal::NotYetValid)
        );
        assert_eq!(refusal(&ks, "k", Some(2), t), None);
        // Following "latest" falls back to version 1 before t.
        assert_eq!(ks.key_material("k", None, t - 1).unwrap().0, 1);
        assert_eq!(ks.key_material("k", None, t).unwrap().0, 2);

        ks.set_dates("k", None, None, Some(Some(t + 100))).unwrap();
        let info = ks.key_info("k").unwrap();
        assert_eq!(info.versions[0].not_before, None);
        assert_eq!(info.versions[1].not_before, Some(t));
        assert!(info.versions.iter().all(|v| v.expires == Some(t + 100)));
        assert_eq!(refusal(&ks, "k", None, t + 100), Some(Refusal::Expired));

        // Clearing.
        ks.set_dates("k", None, Some(None), Some(None)).unwrap();
        let info = ks.key_info("k").unwrap();
        assert!(
            info.versions
                .iter()
                .all(|v| v.not_before.is_none() && v.expires.is_none())
        );

        // not_before >= expires is refused, and nothing is written.
        change_refused(
            ks.set_dates("k", Some(1), Some(Some(t)), Some(Some(t))),
            "not earlier than expiry",
        );
        ks.set_dates("k", Some(1), None, Some(Some(t))).unwrap();
        change_refused(
            ks.set_dates("k", None, Some(Some(t + 1)), None),
            "could never be used",
        );
        ks.reload().unwrap();
        let info = ks.key_info("k").unwrap();
        assert_eq!(info.versions[0].not_before, None);
        assert_eq!(info.versions[1].not_before, None);
        assert!(matches!(
            ks.set_dates("k", Some(9), None, None),
            Err(KekError::NotFound(_))
        ));
    }

    #[test]
    fn delete_recover_within_and_after_window() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        let t = 1_900_000_000u64;
        let until = ks.delete_key("k", t).unwrap();
        assert_eq!(until, t + DEFAULT_RETENTION_SECS);
        let info = ks.key_info("k").unwrap();
        assert_eq!(info.deleted_at, Some(t));
        assert_eq!(info.recoverable_until(), Some(until));
        assert_eq!(info.usable_version_at(t), None);
        assert_eq!(refusal(&ks, "k", None, t), Some(Refusal::Deleted));
        change_refused(ks.delete_key("k", t + 5), "already deleted");
        change_refused(ks.delete_key("k", until), "purge it");

        // Recovery just before the end of the window works; at the end it is refused.
        let saved = std::fs::read(ks.dir().join(KEYSTORE_FILE)).unwrap();
        ks.recover_key("k", until - 1).unwrap();
        assert_eq!(ks.key_info("k").unwrap().deleted_at, None);
        assert_eq!(refusal(&ks, "k", None, t), None);
        change_refused(ks.recover_key("k", t), "not deleted");

        std::fs::write(ks.dir().join(KEYSTORE_FILE), &saved).unwrap();
        ks.reload().unwrap();
        change_refused(ks.recover_key("k", until), "can no longer be recovered");
        change_refused(ks.recover_key("k", until + 1000), "kekfs key purge k");
        assert!(matches!(
            ks.recover_key("nope", t),
            Err(KekError::NotFound(_))
        ));
    }

    #[test]
    fn purge_refused_by_retention_and_protection() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        ks.create_key("p").unwrap();
        let t = 1_900_000_000u64;
        change_refused(ks.purge_key("k", t), "delete it first");

        let until = ks.delete_key("k", t).unwrap();
        change_refused(
            ks.purge_key("k", t),
            "retention period of deleted key \"k\" ends at",
        );
        change_refused(ks.purge_key("k", until - 1), "kekfs key recover k");
        assert!(ks.key_info("k").is_some());
        ks.register_volume("k", &"ab".repeat(16), Path::new("/srv/v"), t)
            .unwrap();
        let vols = ks.purge_key("k", until).unwrap();
        assert_eq!(vols.len(), 1);
        assert_eq!(vols[0].path, "/srv/v");
        assert!(ks.key_info("k").is_none());
        assert!(matches!(
            ks.key_material("k", None, until),
            Err(KekError::NotFound(_))
        ));
        assert!(matches!(
            ks.purge_key("k", until),
            Err(KekError::NotFound(_))
        ));
        // The name is free again.
        ks.create_key("k").unwrap();

        // Purge protection: never purgeable, cannot be turned off.
        assert!(ks.set_purge_protection("p", true).unwrap());
        assert!(!ks.set_purge_protection("p", true).unwrap());
        change_refused(ks.set_purge_protection("p", false), "cannot be turned off");
        assert!(!ks.set_purge_protection("k", false).unwrap());
        let until = ks.delete_key("p", t).unwrap();
        change_refused(ks.purge_key("p", t), "purge protection is on");
        change_refused(
            ks.purge_key("p", t),
            "recovered with `kekfs key recover p` until",
        );
        change_refused(
            ks.purge_key("p", until + 10 * 365 * 86_400),
            "never be purged",
        );
        change_refused(ks.recover_key("p", until), "purge-protected");
        ks.recover_key("p", until - 1).unwrap();
        assert!(ks.key_info("p").unwrap().purge_protection);
    }

    #[test]
    fn retention_settings() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        ks.create_key("p").unwrap();
        assert_eq!(ks.default_retention(), DEFAULT_RETENTION_SECS);
        assert_eq!(
            ks.key_info("k").unwrap().retention_secs,
            DEFAULT_RETENTION_SECS
        );

        // Per key, including zero (purgeable at once).
        ks.set_retention("k", Some(0)).unwrap();
        let t = 1_900_000_000u64;
        assert_eq!(ks.delete_key("k", t).unwrap(), t);
        change_refused(ks.recover_key("k", t), "can no longer be recovered");
        ks.purge_key("k", t).unwrap();
        change_refused(
            ks.set_retention("p", Some(MAX_RETENTION_SECS + 1)),
            "too long",
        );
        assert!(matches!(
            ks.set_retention("nope", Some(1)),
            Err(KekError::NotFound(_))
        ));

        // Keystore default; protection pins the key's retention at the value then in effect.
        ks.create_key("k").unwrap();
        ks.set_default_retention(30 * 86_400).unwrap();
        assert_eq!(ks.key_info("k").unwrap().retention_secs, 30 * 86_400);
        ks.set_purge_protection("p", true).unwrap();
        ks.set_default_retention(86_400).unwrap();
        assert_eq!(ks.key_info("k").unwrap().retention_secs, 86_400);
        assert_eq!(ks.key_info("p").unwrap().retention_secs, 30 * 86_400);
        change_refused(ks.set_retention("p", Some(86_400)), "only be lengthened");
        change_refused(ks.set_retention("p", None), "only be lengthened");
        ks.set_retention("p", Some(60 * 86_400)).unwrap();
        assert_eq!(ks.key_info("p").unwrap().retention_secs, 60 * 86_400);
        change_refused(ks.set_default_retention(MAX_RETENTION_SECS + 1), "too long");

        // A hand-edited protected key that follows the default keeps its retention too.
        edit_json(ks.dir(), |v| {
            v["keys"]["p"]["retention_secs"] = Value::Null;
        });
        ks.reload().unwrap();
        ks.set_default_retention(3600).unwrap();
        assert_eq!(ks.key_info("p").unwrap().retention_secs, 86_400);
        // The file records both levels.
        let v: Value =
            serde_json::from_slice(&std::fs::read(ks.dir().join(KEYSTORE_FILE)).unwrap()).unwrap();
        assert_eq!(v["retention_secs"], 3600);
        assert_eq!(v["keys"]["p"]["retention_secs"], 86_400);
        assert_eq!(v["keys"]["k"]["retention_secs"], Value::Null);
    }

    #[test]
    fn lifecycle_changes_are_locked_and_all_land() {
        let (_tmp, mut ks) = new_store();
        for i in 0..8 {
            ks.create_key(&format!("k{i}")).unwrap();
        }
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let mut h = second_handle(&ks);
                std::thread::spawn(move || {
                    let name = format!("k{i}");
                    h.disable_version(&name, Some(1)).unwrap();
                    h.set_dates(&name, None, None, Some(Some(4_000_000_000)))
                        .unwrap();
                    h.set_purge_protection(&name, true).unwrap();
                    h.register_volume(&name, &format!("{i:032x}"), Path::new("/v"), 1)
                        .unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        ks.reload().unwrap();
        for info in ks.list() {
            assert!(!info.versions[0].enabled, "{}", info.name);
            assert_eq!(info.versions[0].expires, Some(4_000_000_000));
            assert!(info.purge_protection);
            assert_eq!(info.volumes.len(), 1);
        }
    }
}
