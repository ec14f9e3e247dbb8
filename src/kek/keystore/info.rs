//! Secret-free descriptions of keys and versions (`KeyInfo`, `VersionInfo`) as listed and shown to
//! users, with the usability rules that follow from them.

use super::Keystore;
use super::format::VersionEntry;
use super::policy::KeyPolicy;
use super::volumes::VolumeRef;
use crate::kek::Refusal;
use serde::Serialize;

impl VersionEntry {
    pub(super) fn info(&self) -> VersionInfo {
        VersionInfo {
            version: self.version,
            created: self.created,
            enabled: self.enabled,
            not_before: self.not_before,
            expires: self.expires,
        }
    }
}

/// Public description of one key version (no secrets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// Version number, from 1.
    pub version: u32,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Whether the version may be used.
    pub enabled: bool,
    /// Not usable before this time (Unix seconds), if set.
    pub not_before: Option<u64>,
    /// Not usable from this time on (Unix seconds), if set.
    pub expires: Option<u64>,
}

impl VersionInfo {
    /// Why this version may not be used at `now`, or `None` if it may
    /// (ignores key-level state: deletion and policy).
    pub fn refusal_at(&self, now: u64) -> Option<Refusal> {
        if !self.enabled {
            Some(Refusal::Disabled)
        } else if self.not_before.is_some_and(|nb| now < nb) {
            Some(Refusal::NotYetValid)
        } else if self.expires.is_some_and(|ex| now >= ex) {
            Some(Refusal::Expired)
        } else {
            None
        }
    }
}

/// Public description of one key (no secrets), as printed by `kekfs key list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Key name.
    pub name: String,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Whether purging a deleted key is forbidden.
    pub purge_protection: bool,
    /// Soft-deletion time (Unix seconds), if deleted.
    pub deleted_at: Option<u64>,
    /// The soft-delete retention period in effect for this key, in seconds.
    pub retention_secs: u64,
    /// Access policy, if any.
    pub policy: Option<KeyPolicy>,
    /// All versions, oldest first.
    pub versions: Vec<VersionInfo>,
    /// Volumes recorded as using this key.
    pub volumes: Vec<VolumeRef>,
}

impl KeyInfo {
    /// For a soft-deleted key, the end of its recovery window (`deleted_at + retention`):
    /// recoverable before it, purgeable (unless protected) from it on.
    pub fn recoverable_until(&self) -> Option<u64> {
        self.deleted_at
            .map(|d| d.saturating_add(self.retention_secs))
    }

    /// The version `soft:NAME` would use at `now` (the newest usable one), ignoring the
    /// access policy; `None` if the key is deleted or no version is usable.
    pub fn usable_version_at(&self, now: u64) -> Option<u32> {
        if self.deleted_at.is_some() {
            return None;
        }
        self.versions
            .iter()
            .rev()
            .find(|v| v.refusal_at(now).is_none())
            .map(|v| v.version)
    }
}

impl Keystore {
    /// Names of all keys (including soft-deleted ones), sorted.
    pub fn key_names(&self) -> Vec<String> {
        self.file.keys.keys().cloned().collect()
    }

    /// Describe key `name`, if it exists.
    pub fn key_info(&self, name: &str) -> Option<KeyInfo> {
        self.file.keys.get(name).map(|k| KeyInfo {
            name: name.to_string(),
            created: k.created,
            purge_protection: k.purge_protection,
            deleted_at: k.deleted_at,
            retention_secs: k.retention(self.file.retention_secs),
            policy: k.policy.clone(),
            versions: k.versions.iter().map(VersionEntry::info).collect(),
            volumes: k.volumes.clone(),
        })
    }

    /// The keystore's default soft-delete retention period, in seconds.
    pub fn default_retention(&self) -> u64 {
        self.file.retention_secs
    }

    /// Describe all keys (including soft-deleted ones), sorted by name.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.file
            .keys
            .keys()
            .filter_map(|n| self.key_info(n))
            .collect()
    }
}
