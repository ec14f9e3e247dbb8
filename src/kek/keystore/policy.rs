//! Per-key access policies by effective uid: which uids may use a key for which operations, and
//! setting or clearing a key's policy.

use super::Keystore;
use super::lifecycle::live_key;
use crate::kek::KekError;
use serde::{Deserialize, Serialize};

/// The effective user id of this process.
pub(crate) fn current_euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions, touches no memory we own and cannot fail.
    unsafe { libc::geteuid() }
}

/// Operations a [`KeyPolicy`] can govern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyOp {
    /// Wrapping an AEK.
    Wrap,
    /// Unwrapping an AEK.
    Unwrap,
}

/// A per-key access policy by effective uid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPolicy {
    /// If non-empty, only these uids may use the key.
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// These uids may never use the key (wins over `allow_uids`).
    #[serde(default)]
    pub deny_uids: Vec<u32>,
    /// The operations the policy governs; empty means all of them.
    #[serde(default)]
    pub ops: Vec<KeyOp>,
}

impl KeyPolicy {
    /// Whether `uid` is refused. With `op = None` the policy applies whatever `ops` says
    /// (the conservative answer for a caller that does not say what it will do).
    pub fn denies(&self, uid: u32, op: Option<KeyOp>) -> bool {
        if let Some(op) = op
            && !self.ops.is_empty()
            && !self.ops.contains(&op)
        {
            return false;
        }
        self.deny_uids.contains(&uid)
            || (!self.allow_uids.is_empty() && !self.allow_uids.contains(&uid))
    }
}

impl Keystore {
    /// Replace the access policy of key `name` (uid lists are sorted and de-duplicated).
    pub fn set_policy(&mut self, name: &str, policy: KeyPolicy) -> Result<(), KekError> {
        let mut policy = policy;
        policy.allow_uids.sort_unstable();
        policy.allow_uids.dedup();
        policy.deny_uids.sort_unstable();
        policy.deny_uids.dedup();
        let mut ops = Vec::new();
        for op in [KeyOp::Wrap, KeyOp::Unwrap] {
            if policy.ops.contains(&op) {
                ops.push(op);
            }
        }
        policy.ops = ops;
        let dir = self.dir.clone();
        self.mutate(|file, _| {
            live_key(file, &dir, name)?.policy = Some(policy);
            Ok(())
        })
    }

    /// Remove the access policy of key `name` (any uid may use it). Returns whether there
    /// was one.
    pub fn clear_policy(&mut self, name: &str) -> Result<bool, KekError> {
        let dir = self.dir.clone();
        self.mutate(|file, _| Ok(live_key(file, &dir, name)?.policy.take().is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::Refusal;
    use crate::kek::keystore::clock::unix_now;
    use crate::kek::keystore::testutil::{new_store, second_handle};

    #[test]
    fn policy_set_and_clear() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        let now = unix_now();
        let me = current_euid();
        let mut mount = second_handle(&ks);
        ks.set_policy(
            "k",
            KeyPolicy {
                allow_uids: vec![7, 3, 7],
                deny_uids: vec![me, me],
                ops: vec![KeyOp::Unwrap, KeyOp::Wrap, KeyOp::Unwrap],
            },
        )
        .unwrap();
        mount.reload().unwrap();
        assert_eq!(
            mount.key_info("k").unwrap().policy,
            Some(KeyPolicy {
                allow_uids: vec![3, 7],
                deny_uids: vec![me],
                ops: vec![KeyOp::Wrap, KeyOp::Unwrap],
            })
        );
        for op in [KeyOp::Wrap, KeyOp::Unwrap] {
            assert!(matches!(
                mount.key_material_for("k", None, now, op),
                Err(KekError::Refused {
                    reason: Refusal::Denied,
                    ..
                })
            ));
        }
        ks.set_policy(
            "k",
            KeyPolicy {
                deny_uids: vec![me],
                ops: vec![KeyOp::Wrap],
                ..KeyPolicy::default()
            },
        )
        .unwrap();
        mount.reload().unwrap();
        assert!(
            mount
                .key_material_for("k", None, now, KeyOp::Unwrap)
                .is_ok()
        );
        assert!(mount.key_material_for("k", None, now, KeyOp::Wrap).is_err());
        assert!(ks.clear_policy("k").unwrap());
        assert!(!ks.clear_policy("k").unwrap());
        mount.reload().unwrap();
        assert_eq!(mount.key_info("k").unwrap().policy, None);
        assert!(mount.key_material_for("k", None, now, KeyOp::Wrap).is_ok());
        assert!(matches!(
            ks.set_policy("nope", KeyPolicy::default()),
            Err(KekError::NotFound(_))
        ));
    }
}
