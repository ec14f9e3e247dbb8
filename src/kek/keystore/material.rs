//! Key material: creating and rotating keys (fresh random versions sealed under the master key,
//! bound to name and version), and unsealing a version for use once its state, dates and access
//! policy allow it.

use super::Keystore;
use super::clock::unix_now;
use super::format::{KeyEntry, VersionEntry, validate_key_name};
use super::lifecycle::key_names;
use super::policy::{KeyOp, current_euid};
use super::storage::KEYSTORE_FILE;
use crate::crypto::Key32;
use crate::crypto::aead::{Cipher, OVERHEAD};
use crate::kek::{KekError, Refusal};
use zeroize::Zeroizing;

/// AAD prefix of each key version's sealed material (followed by name ‖ 0x00 ‖ version u32 LE).
pub const MATERIAL_AAD_LABEL: &[u8] = b"kekfs key material v1";

pub(super) const SEALED_KEY_LEN: usize = Key32::LEN + OVERHEAD;

/// AAD binding a sealed key material to its key name and version.
fn material_aad(name: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(MATERIAL_AAD_LABEL.len() + name.len() + 5);
    aad.extend_from_slice(MATERIAL_AAD_LABEL);
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_le_bytes());
    aad
}

fn seal_new_material(master: &Key32, name: &str, version: u32) -> Vec<u8> {
    let key = Key32::generate();
    Cipher::new(master).seal(&material_aad(name, version), key.expose())
}

impl Keystore {
    /// Create key `name` with a fresh random version 1. Returns the version (1).
    pub fn create_key(&mut self, name: &str) -> Result<u32, KekError> {
        validate_key_name(name).map_err(KekError::BadUri)?;
        let dir = self.dir.clone();
        self.mutate(|file, master| {
            if let Some(k) = file.keys.get(name) {
                let hint = if k.deleted_at.is_some() {
                    "it is soft-deleted: recover or purge it, or choose another name"
                } else {
                    "choose another name, or rotate it to add a version"
                };
                return Err(KekError::AlreadyExists(format!(
                    "key {name:?} already exists in keystore {}; {hint}",
                    dir.display()
                )));
            }
            let now = unix_now();
            file.keys.insert(
                name.to_string(),
                KeyEntry {
                    created: now,
                    purge_protection: false,
                    deleted_at: None,
                    retention_secs: None,
                    policy: None,
                    versions: vec![VersionEntry {
                        version: 1,
                        created: now,
                        enabled: true,
                        not_before: None,
                        expires: None,
                        material: seal_new_material(master, name, 1),
                    }],
                    volumes: Vec::new(),
                },
            );
            Ok(1)
        })
    }

    /// Add a new random version to key `name` (N+1). Returns the new version number.
    pub fn rotate_key(&mut self, name: &str) -> Result<u32, KekError> {
        let dir = self.dir.clone();
        self.mutate(|file, master| {
            let names = key_names(file);
            let Some(key) = file.keys.get_mut(name) else {
                return Err(KekError::NotFound(format!(
                    "no key {name:?} in keystore {} (existing keys: {names}); create it first",
                    dir.display()
                )));
            };
            if key.deleted_at.is_some() {
                return Err(KekError::Refused {
                    key: format!("soft:{name}"),
                    reason: Refusal::Deleted,
                });
            }
            let last = key.versions.last().map_or(0, |v| v.version);
            let Some(next) = last.checked_add(1) else {
                return Err(KekError::AlreadyExists(format!(
                    "key {name:?} has used up all version numbers; create a new key instead"
                )));
            };
            key.versions.push(VersionEntry {
                version: next,
                created: unix_now(),
                enabled: true,
                not_before: None,
                expires: None,
                material: seal_new_material(master, name, next),
            });
            Ok(next)
        })
    }

    /// The material of key `name`: `version = None` picks the latest version usable at `now`,
    /// `Some(v)` exactly version `v`. The key's access policy applies to every operation.
    pub fn key_material(
        &self,
        name: &str,
        version: Option<u32>,
        now: u64,
    ) -> Result<(u32, Key32), KekError> {
        self.material_checked(name, version, now, None)
    }

    /// Like [`Keystore::key_material`], for a stated operation (the policy's `ops` apply).
    pub fn key_material_for(
        &self,
        name: &str,
        version: Option<u32>,
        now: u64,
        op: KeyOp,
    ) -> Result<(u32, Key32), KekError> {
        self.material_checked(name, version, now, Some(op))
    }

    fn material_checked(
        &self,
        name: &str,
        version: Option<u32>,
        now: u64,
        op: Option<KeyOp>,
    ) -> Result<(u32, Key32), KekError> {
        let Some(key) = self.file.keys.get(name) else {
            return Err(KekError::NotFound(format!(
                "no key {name:?} in keystore {} (existing keys: {}); create it with \
                 `kekfs key create {name}` or fix the KEK URI",
                self.dir.display(),
                key_names(&self.file)
            )));
        };
        let refused = |v: Option<u32>, reason| KekError::Refused {
            key: match v {
                Some(v) => format!("soft:{name}?version={v}"),
                None => format!("soft:{name}"),
            },
            reason,
        };
        if key.deleted_at.is_some() {
            return Err(refused(None, Refusal::Deleted));
        }
        if key
            .policy
            .as_ref()
            .is_some_and(|p| p.denies(current_euid(), op))
        {
            return Err(refused(None, Refusal::Denied));
        }
        let chosen = match version {
            Some(v) => {
                let Some(entry) = key.versions.iter().find(|e| e.version == v) else {
                    let last = key.versions.last().map_or(0, |e| e.version);
                    return Err(KekError::NotFound(format!(
                        "key {name:?} has no version {v} (latest is {last}); fix the version \
                         in the KEK URI"
                    )));
                };
                if let Some(r) = entry.info().refusal_at(now) {
                    return Err(refused(Some(v), r));
                }
                entry
            }
            None => {
                match key
                    .versions
                    .iter()
                    .rev()
                    .find(|e| e.info().refusal_at(now).is_none())
                {
                    Some(e) => e,
                    None => {
                        // Nothing usable: report why the newest version is not.
                        let newest = key.versions.last().ok_or_else(|| {
                            KekError::NotFound(format!("key {name:?} has no versions"))
                        })?;
                        let reason = newest.info().refusal_at(now).unwrap_or(Refusal::Disabled);
                        return Err(refused(Some(newest.version), reason));
                    }
                }
            }
        };
        let path = self.dir.join(KEYSTORE_FILE);
        let damaged = || {
            KekError::Corrupt(format!(
                "{}: the material of key {name:?} version {} does not authenticate under the \
                 keystore master key (the file was modified or damaged); restore it from a backup",
                path.display(),
                chosen.version
            ))
        };
        let pt = Cipher::new(&self.master)
            .open(&material_aad(name, chosen.version), &chosen.material)
            .map(Zeroizing::new)
            .map_err(|_| damaged())?;
        let key = Key32::from_slice(&pt).ok_or_else(damaged)?;
        Ok((chosen.version, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::keystore::KeyPolicy;
    use crate::kek::keystore::testutil::{edit_json, new_store, second_handle};
    use serde_json::{Value, json};

    #[test]
    fn create_duplicate_and_bad_name() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("a").unwrap();
        assert!(matches!(
            ks.create_key("a"),
            Err(KekError::AlreadyExists(_))
        ));
        assert!(matches!(ks.create_key("../x"), Err(KekError::BadUri(_))));
        // A second handle with stale state still sees the key (create re-reads under the lock).
        let mut other = second_handle(&ks);
        ks.create_key("b").unwrap();
        assert!(matches!(
            other.create_key("b"),
            Err(KekError::AlreadyExists(_))
        ));
        assert_eq!(other.key_names(), ["a"]);
        other.reload().unwrap();
        assert_eq!(other.key_names(), ["a", "b"]);
    }

    #[test]
    fn rotate() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        assert_eq!(ks.rotate_key("k").unwrap(), 2);
        assert_eq!(ks.rotate_key("k").unwrap(), 3);
        let now = unix_now();
        let (v, latest) = ks.key_material("k", None, now).unwrap();
        assert_eq!(v, 3);
        let m: Vec<[u8; 32]> = (1..=3)
            .map(|v| *ks.key_material("k", Some(v), now).unwrap().1.expose())
            .collect();
        assert_eq!(&m[2], latest.expose());
        assert!(m[0] != m[1] && m[1] != m[2] && m[0] != m[2]);
        assert!(matches!(
            ks.key_material("k", Some(4), now),
            Err(KekError::NotFound(_))
        ));
        assert!(matches!(
            ks.key_material("nope", None, now),
            Err(KekError::NotFound(_))
        ));
        let e = ks.rotate_key("nope").unwrap_err();
        assert!(
            matches!(&e, KekError::NotFound(m) if m.contains("existing keys: k")),
            "{e}"
        );
        let info = ks.list();
        assert_eq!(info.len(), 1);
        assert_eq!(
            info[0]
                .versions
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            [1, 2, 3]
        );
        // KeyInfo serialises for --json.
        let j = serde_json::to_value(&info).unwrap();
        assert_eq!(j[0]["name"], "k");
        assert!(j[0].get("material").is_none());
    }

    #[test]
    fn disabled_versions() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        ks.rotate_key("k").unwrap();
        edit_json(ks.dir(), |v| {
            v["keys"]["k"]["versions"][1]["enabled"] = json!(false)
        });
        ks.reload().unwrap();
        let now = unix_now();
        // Latest usable is version 1 now; version 2 is refused explicitly.
        assert_eq!(ks.key_material("k", None, now).unwrap().0, 1);
        assert!(matches!(
            ks.key_material("k", Some(2), now),
            Err(KekError::Refused {
                reason: Refusal::Disabled,
                ..
            })
        ));
        edit_json(ks.dir(), |v| {
            v["keys"]["k"]["versions"][0]["enabled"] = json!(false)
        });
        ks.reload().unwrap();
        assert!(matches!(
            ks.key_material("k", None, now),
            Err(KekError::Refused {
                reason: Refusal::Disabled,
                ..
            })
        ));
    }

    #[test]
    fn validity_dates() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        let t = 1_000_000u64;
        edit_json(ks.dir(), |v| {
            v["keys"]["k"]["versions"][0]["not_before"] = json!(t);
            v["keys"]["k"]["versions"][0]["expires"] = json!(t + 100);
        });
        ks.reload().unwrap();
        let r = |now| match ks.key_material("k", Some(1), now) {
            Ok(_) => None,
            Err(KekError::Refused { reason, .. }) => Some(reason),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(r(t - 1), Some(Refusal::NotYetValid));
        assert_eq!(r(t), None);
        assert_eq!(r(t + 99), None);
        assert_eq!(r(t + 100), Some(Refusal::Expired));
        assert!(matches!(
            ks.key_material("k", None, t + 100),
            Err(KekError::Refused {
                reason: Refusal::Expired,
                ..
            })
        ));
    }

    #[test]
    fn deleted_and_policy() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        let now = unix_now();
        let me = current_euid();
        edit_json(ks.dir(), |v| v["keys"]["k"]["deleted_at"] = json!(now));
        ks.reload().unwrap();
        assert!(matches!(
            ks.key_material("k", None, now),
            Err(KekError::Refused {
                reason: Refusal::Deleted,
                ..
            })
        ));
        assert!(matches!(
            ks.rotate_key("k"),
            Err(KekError::Refused {
                reason: Refusal::Deleted,
                ..
            })
        ));
        assert!(
            matches!(ks.create_key("k"), Err(KekError::AlreadyExists(m)) if m.contains("deleted"))
        );

        let denied = |ks: &Keystore, op| {
            matches!(
                ks.key_material_for("k", None, now, op),
                Err(KekError::Refused {
                    reason: Refusal::Denied,
                    ..
                })
            )
        };
        let cases = [
            (json!({"deny_uids": [me]}), true, true),
            (json!({"allow_uids": [me.wrapping_add(1)]}), true, true),
            (json!({"allow_uids": [me]}), false, false),
            (json!({"allow_uids": [me], "deny_uids": [me]}), true, true),
            (json!({"deny_uids": [me], "ops": ["wrap"]}), true, false),
            (json!({}), false, false),
        ];
        for (policy, wrap_denied, unwrap_denied) in cases {
            edit_json(ks.dir(), |v| {
                v["keys"]["k"]["deleted_at"] = Value::Null;
                v["keys"]["k"]["policy"] = policy.clone();
            });
            ks.reload().unwrap();
            assert_eq!(denied(&ks, KeyOp::Wrap), wrap_denied, "{policy}");
            assert_eq!(denied(&ks, KeyOp::Unwrap), unwrap_denied, "{policy}");
            let generic = matches!(
                ks.key_material("k", None, now),
                Err(KekError::Refused {
                    reason: Refusal::Denied,
                    ..
                })
            );
            assert_eq!(generic, wrap_denied || unwrap_denied, "{policy}");
        }
        assert_eq!(ks.key_info("k").unwrap().policy, Some(KeyPolicy::default()));
    }

    #[test]
    fn material_is_bound_to_name_and_version() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("a").unwrap();
        ks.rotate_key("a").unwrap();
        ks.create_key("b").unwrap();
        edit_json(ks.dir(), |v| {
            let m1 = v["keys"]["a"]["versions"][0]["material"].clone();
            let m2 = v["keys"]["a"]["versions"][1]["material"].clone();
            v["keys"]["a"]["versions"][0]["material"] = m2;
            v["keys"]["a"]["versions"][1]["material"] = m1.clone();
            v["keys"]["b"]["versions"][0]["material"] = m1;
        });
        ks.reload().unwrap();
        let now = unix_now();
        for (k, v) in [("a", 1), ("a", 2), ("b", 1)] {
            let e = ks.key_material(k, Some(v), now).unwrap_err();
            assert!(
                matches!(&e, KekError::Corrupt(m) if m.contains("does not authenticate")),
                "{e}"
            );
        }
    }
}
