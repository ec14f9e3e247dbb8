//! The `soft:` keystore on disk: named, versioned 256-bit keys sealed under an Argon2id-derived master key.
//!
//! A keystore is a directory holding `keystore.json` (the state, replaced atomically on every
//! change) and `keystore.lock` (an `flock(2)` target: exclusive while reading-modifying-writing,
//! shared while only reading). See `docs/FORMAT.md`, "soft: keystore", for the file format.

use super::passphrase::Passphrase;
use super::{KekError, Refusal};
use crate::crypto::Key32;
use crate::crypto::aead::{Cipher, OVERHEAD};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Name of the state file inside the keystore directory.
pub const KEYSTORE_FILE: &str = "keystore.json";
/// Name of the lock file inside the keystore directory.
pub const LOCK_FILE: &str = "keystore.lock";
/// Value of the `format` field.
pub const FORMAT_NAME: &str = "kekfs-keystore";
/// The only `version` this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Environment variable overriding [`default_keystore_dir`].
pub const ENV_KEYSTORE: &str = "KEKFS_KEYSTORE";

/// Plaintext of the `check` field, sealed under the master key.
pub const CHECK_PLAINTEXT: &[u8] = b"kekfs keystore check v1";
/// AAD of the `check` field.
pub const CHECK_AAD: &[u8] = b"kekfs keystore check";
/// AAD prefix of each key version's sealed material (followed by name ‖ 0x00 ‖ version u32 LE).
pub const MATERIAL_AAD_LABEL: &[u8] = b"kekfs key material v1";

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

/// Longest key name, in bytes.
pub const MAX_KEY_NAME_LEN: usize = 64;

/// Soft-delete retention period of a keystore that sets none: 7 days, in seconds.
pub const DEFAULT_RETENTION_SECS: u64 = 7 * 86_400;
/// Longest retention period accepted (3650 days), in seconds.
pub const MAX_RETENTION_SECS: u64 = 3650 * 86_400;
/// Longest backing path recorded for a volume, in bytes.
pub const MAX_VOLUME_PATH_LEN: usize = 4096;
/// Length of a volume id in hex digits.
pub const VOLUME_ID_HEX_LEN: usize = 32;

// Bounds applied to parameters read from a file, so a damaged file cannot make us allocate
// terabytes or spin for hours.
const MIN_SALT_LEN: usize = 16;
const MAX_SALT_LEN: usize = 64;
const MAX_M_KIB: u32 = 4 * 1024 * 1024;
const MAX_T: u32 = 100;
const MAX_P: u32 = 64;
const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;
const SEALED_KEY_LEN: usize = Key32::LEN + OVERHEAD;

/// Check a key name: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_key_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_KEY_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with(['.', '-']);
    if ok {
        return Ok(());
    }
    let shown: String = name.chars().take(80).collect();
    let more = if shown.len() < name.len() { "…" } else { "" };
    Err(format!(
        "invalid key name {shown:?}{more}: a key name is 1-{MAX_KEY_NAME_LEN} characters of \
         A-Z a-z 0-9 . _ - and does not start with '.' or '-'"
    ))
}

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

/// Format Unix seconds as RFC 3339 in UTC (`2027-01-01T00:00:00Z`), without a time crate.
pub fn format_time(t: u64) -> String {
    // Days since the epoch to a civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Format a number of seconds briefly: `7d`, `36h`, `90m`, `45s`.
pub fn format_duration(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The effective user id of this process.
pub(crate) fn current_euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions, touches no memory we own and cannot fail.
    unsafe { libc::geteuid() }
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The keystore directory used when none is given: `$KEKFS_KEYSTORE` if set; else
/// `/var/lib/kekfs` for root; else `$XDG_DATA_HOME/kekfs` or `$HOME/.local/share/kekfs`
/// (falling back to `/var/lib/kekfs` when neither is set to an absolute path).
pub fn default_keystore_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(ENV_KEYSTORE).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if current_euid() == 0 {
        return PathBuf::from("/var/lib/kekfs");
    }
    let abs = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(x) = abs("XDG_DATA_HOME") {
        return x.join("kekfs");
    }
    if let Some(h) = abs("HOME") {
        return h.join(".local/share/kekfs");
    }
    PathBuf::from("/var/lib/kekfs")
}

/// AAD binding a sealed key material to its key name and version.
fn material_aad(name: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(MATERIAL_AAD_LABEL.len() + name.len() + 5);
    aad.extend_from_slice(MATERIAL_AAD_LABEL);
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_le_bytes());
    aad
}

/// Base64 (standard alphabet, padded) for byte fields in the JSON.
mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(|e| D::Error::custom(format!("invalid base64: {e}")))
    }
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfParams {
    alg: String,
    m_kib: u32,
    t: u32,
    p: u32,
    #[serde(with = "b64")]
    salt: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionEntry {
    version: u32,
    created: u64,
    enabled: bool,
    #[serde(default)]
    not_before: Option<u64>,
    #[serde(default)]
    expires: Option<u64>,
    #[serde(with = "b64")]
    material: Vec<u8>,
}

impl VersionEntry {
    fn info(&self) -> VersionInfo {
        VersionInfo {
            version: self.version,
            created: self.created,
            enabled: self.enabled,
            not_before: self.not_before,
            expires: self.expires,
        }
    }
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    created: u64,
    #[serde(default)]
    purge_protection: bool,
    #[serde(default)]
    deleted_at: Option<u64>,
    /// Soft-delete retention of this key; `None` = the keystore's `retention_secs`.
    #[serde(default)]
    retention_secs: Option<u64>,
    #[serde(default)]
    policy: Option<KeyPolicy>,
    versions: Vec<VersionEntry>,
    #[serde(default)]
    volumes: Vec<VolumeRef>,
}

impl KeyEntry {
    /// The retention period in effect for this key.
    fn retention(&self, default: u64) -> u64 {
        self.retention_secs.unwrap_or(default)
    }

    /// End of the recovery window (deleted_at + retention), if deleted.
    fn window_end(&self, default: u64) -> Option<u64> {
        self.deleted_at
            .map(|d| d.saturating_add(self.retention(default)))
    }
}

fn default_retention() -> u64 {
    DEFAULT_RETENTION_SECS
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeystoreFile {
    format: String,
    version: u32,
    kdf: KdfParams,
    #[serde(with = "b64")]
    check: Vec<u8>,
    /// Default soft-delete retention of the keys, in seconds.
    #[serde(default = "default_retention")]
    retention_secs: u64,
    keys: BTreeMap<String, KeyEntry>,
}

impl KeystoreFile {
    /// Structural checks serde cannot express. Errors describe the problem only.
    fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT_NAME || self.version != FORMAT_VERSION {
            return Err(format!(
                "format {:?} version {} is not {FORMAT_NAME:?} version {FORMAT_VERSION}",
                self.format, self.version
            ));
        }
        let k = &self.kdf;
        if k.alg != KDF_ALG {
            return Err(format!(
                "unknown key derivation {:?} (this kekfs supports {KDF_ALG:?})",
                k.alg
            ));
        }
        if !(1..=MAX_P).contains(&k.p)
            || !(1..=MAX_T).contains(&k.t)
            || !(8 * k.p..=MAX_M_KIB).contains(&k.m_kib)
        {
            return Err(format!(
                "Argon2id parameters out of range (m_kib={}, t={}, p={}; allowed: p 1-{MAX_P}, \
                 t 1-{MAX_T}, m_kib 8*p-{MAX_M_KIB})",
                k.m_kib, k.t, k.p
            ));
        }
        if !(MIN_SALT_LEN..=MAX_SALT_LEN).contains(&k.salt.len()) {
            return Err(format!(
                "KDF salt is {} bytes (expected {MIN_SALT_LEN}-{MAX_SALT_LEN})",
                k.salt.len()
            ));
        }
        if self.check.len() != CHECK_PLAINTEXT.len() + OVERHEAD {
            return Err(format!(
                "\"check\" is {} bytes (expected {})",
                self.check.len(),
                CHECK_PLAINTEXT.len() + OVERHEAD
            ));
        }
        if self.retention_secs > MAX_RETENTION_SECS {
            return Err(format!(
                "\"retention_secs\" is {} (at most {MAX_RETENTION_SECS})",
                self.retention_secs
            ));
        }
        for (name, key) in &self.keys {
            validate_key_name(name)?;
            if let Some(r) = key.retention_secs
                && r > MAX_RETENTION_SECS
            {
                return Err(format!(
                    "key {name:?}: \"retention_secs\" is {r} (at most {MAX_RETENTION_SECS})"
                ));
            }
            let mut ids = std::collections::BTreeSet::new();
            for vol in &key.volumes {
                validate_volume_id(&vol.id).map_err(|e| format!("key {name:?}: {e}"))?;
                if vol.path.is_empty() || vol.path.len() > MAX_VOLUME_PATH_LEN {
                    return Err(format!(
                        "key {name:?}: volume {} has a path of {} bytes (expected 1-\
                         {MAX_VOLUME_PATH_LEN})",
                        vol.id,
                        vol.path.len()
                    ));
                }
                if !ids.insert(vol.id.as_str()) {
                    return Err(format!("key {name:?}: volume {} is listed twice", vol.id));
                }
            }
            if key.versions.is_empty() {
                return Err(format!("key {name:?} has no versions"));
            }
            let mut prev = 0u32;
            for v in &key.versions {
                if v.version <= prev {
                    return Err(format!(
                        "key {name:?}: versions must be listed in increasing order from 1 \
                         (found {} after {prev})",
                        v.version
                    ));
                }
                prev = v.version;
                if v.material.len() != SEALED_KEY_LEN {
                    return Err(format!(
                        "key {name:?} version {}: material is {} bytes (expected {SEALED_KEY_LEN})",
                        v.version,
                        v.material.len()
                    ));
                }
            }
        }
        Ok(())
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

/// Holds `keystore.lock` locked until dropped (closing the descriptor releases the flock).
struct LockGuard {
    _file: Option<File>,
}

/// Take the keystore lock. Exclusive locks create the lock file (0600) if needed. Shared locks
/// use an existing lock file only: a reader needs no lock for consistency, since every write is
/// an atomic rename, so a read-only or lock-less keystore directory can still be read.
fn lock(dir: &Path, exclusive: bool) -> Result<LockGuard, KekError> {
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

/// Parse and validate keystore.json contents. Never panics, whatever `bytes` holds.
fn parse_keystore(bytes: &[u8], path: &Path) -> Result<KeystoreFile, KekError> {
    let corrupt = |what: String| {
        KekError::Corrupt(format!(
            "{} is damaged: {what}; restore it from a backup (nothing was changed)",
            path.display()
        ))
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON ({e})")))?;
    let Some(obj) = value.as_object() else {
        return Err(corrupt("the top level is not a JSON object".into()));
    };
    match obj.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT_NAME) => {}
        other => {
            return Err(KekError::Corrupt(format!(
                "{} is not a kekfs keystore (its \"format\" is {}, expected {FORMAT_NAME:?}); \
                 check the --keystore path",
                path.display(),
                other.map_or_else(|| "missing".to_string(), |s| format!("{s:?}"))
            )));
        }
    }
    match obj.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(KekError::Corrupt(format!(
                "{} has keystore format version {v}, but this kekfs reads only version \
                 {FORMAT_VERSION}; use the kekfs release that wrote it, or upgrade kekfs",
                path.display()
            )));
        }
        None => return Err(corrupt("\"version\" is missing or not a number".into())),
    }
    // Parsed again from the bytes (not the Value) so errors carry a line and column.
    let file: KeystoreFile = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(format!("unexpected structure ({e})")))?;
    file.validate().map_err(corrupt)?;
    Ok(file)
}

/// A `keystore.json` that every user may write could have had its key states, dates and
/// policies changed by anyone (only the key material is sealed): refuse it.
fn refuse_world_writable(file: &File, path: &Path) -> Result<(), KekError> {
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

fn warn_permissions(dir: &Path) {
    for w in permission_warnings(dir) {
        eprintln!("kekfs: warning: {w}");
    }
}

/// Read and parse `dir/keystore.json`. The caller holds whatever lock it needs.
fn read_keystore(dir: &Path) -> Result<KeystoreFile, KekError> {
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
fn write_atomic(dir: &Path, file: &KeystoreFile) -> Result<(), KekError> {
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

/// Argon2id(passphrase, salt) with the file's parameters. The Argon2 working memory (from
/// which the output could be recomputed) is wiped before returning.
fn derive_master(pass: &Passphrase, kdf: &KdfParams) -> Result<Key32, KekError> {
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
fn verify_master(
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

fn seal_new_material(master: &Key32, name: &str, version: u32) -> Vec<u8> {
    let key = Key32::generate();
    Cipher::new(master).seal(&material_aad(name, version), key.expose())
}

fn key_names(file: &KeystoreFile) -> String {
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
fn any_key<'a>(
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
fn live_key<'a>(
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

    /// Open the keystore in `dir` with an already derived master key (no Argon2 run).
    /// Open this keystore again (a second handle with the same master key).
    pub fn reopen(&self) -> Result<Keystore, KekError> {
        Keystore::open_with_master(&self.dir, self.master.duplicate())
    }

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
    use serde_json::{Value, json};
    use std::os::unix::fs::MetadataExt;

    const PASS: &[u8] = b"correct horse battery staple";

    fn pass(p: &[u8]) -> Passphrase {
        Passphrase::new(p.to_vec()).unwrap()
    }

    /// A fresh keystore in a not-yet-existing subdirectory of a temp dir.
    fn new_store() -> (tempfile::TempDir, Keystore) {
        let tmp = tempfile::tempdir().unwrap();
        let ks = Keystore::init(&tmp.path().join("ks"), &pass(PASS)).unwrap();
        (tmp, ks)
    }

    fn second_handle(ks: &Keystore) -> Keystore {
        Keystore::open_with_master(ks.dir(), ks.master.duplicate()).unwrap()
    }

    fn edit_json(dir: &Path, f: impl FnOnce(&mut Value)) {
        let p = dir.join(KEYSTORE_FILE);
        let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn key_names() {
        for ok in ["a", "vol-kek", "A.b_c-9", "0", &"x".repeat(64)] {
            assert!(validate_key_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(65),
            "ключ",
        ] {
            let e = validate_key_name(bad).unwrap_err();
            assert!(e.contains("A-Z a-z 0-9"), "{e}");
        }
    }

    #[test]
    fn default_dir_is_absolute_or_overridden() {
        let d = default_keystore_dir();
        match std::env::var_os(ENV_KEYSTORE).filter(|d| !d.is_empty()) {
            Some(v) => assert_eq!(d, PathBuf::from(v)),
            None => {
                assert!(d.is_absolute());
                assert!(d.ends_with("kekfs"));
            }
        }
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

    #[test]
    fn init_refuses_existing() {
        let (_tmp, ks) = new_store();
        let e = Keystore::init(ks.dir(), &pass(b"other")).unwrap_err();
        assert!(matches!(&e, KekError::AlreadyExists(m) if m.contains("keystore already exists")));
    }

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

    /// Expect a clear `Corrupt` (or for tampered KDF/check fields, `BadPassphrase`), never a panic.
    fn feed(ks: &mut Keystore, content: &[u8]) -> Result<(), KekError> {
        std::fs::write(ks.dir().join(KEYSTORE_FILE), content).unwrap();
        let r = ks.reload();
        if r.is_ok() {
            // Whatever was accepted must also be safe to use.
            for name in ks.key_names() {
                for v in [None, Some(1), Some(2), Some(u32::MAX)] {
                    let _ = ks.key_material(&name, v, unix_now());
                }
            }
            let _ = ks.list();
        }
        r
    }

    #[test]
    fn garbage_files_are_corrupt_not_panics() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        ks.rotate_key("k").unwrap();
        let good = std::fs::read(ks.dir().join(KEYSTORE_FILE)).unwrap();
        let good_v: Value = serde_json::from_slice(&good).unwrap();

        // Truncations: all corrupt.
        for n in 0..good.len() {
            if good[..n].trim_ascii_end() == good.trim_ascii_end() {
                continue;
            }
            let e = feed(&mut ks, &good[..n]).unwrap_err();
            assert!(matches!(e, KekError::Corrupt(_)), "truncated at {n}: {e}");
        }
        // Byte mutations anywhere: an error or a still-valid file, never a panic.
        for i in 0..good.len() {
            for x in [0x01u8, 0x20, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= x;
                if let Err(e) = feed(&mut ks, &bad) {
                    assert!(
                        matches!(e, KekError::Corrupt(_) | KekError::BadPassphrase(_)),
                        "flip {x:#x} at {i}: {e}"
                    );
                }
            }
        }
        // Random garbage and odd JSON.
        let mut rnd = [0u8; 512];
        crate::crypto::random_bytes(&mut rnd);
        for g in [
            &rnd[..],
            b"",
            b"null",
            b"[]",
            b"{}",
            b"\"kekfs-keystore\"",
            b"{\"format\":\"kekfs-keystore\"}",
            &[b'['; 10_000],
            b"\xef\xbb\xbf{}",
        ] {
            assert!(matches!(feed(&mut ks, g), Err(KekError::Corrupt(_))));
        }

        // Targeted structural damage, each with a helpful message.
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["format"] = json!("other")),
                "not a kekfs keystore",
            ),
            (Box::new(|v| v["version"] = json!(2)), "version 2"),
            (Box::new(|v| v["version"] = json!("1")), "version"),
            (Box::new(|v| v["kdf"]["alg"] = json!("scrypt")), "scrypt"),
            (
                Box::new(|v| v["kdf"]["m_kib"] = json!(u32::MAX)),
                "out of range",
            ),
            (Box::new(|v| v["kdf"]["m_kib"] = json!(-1)), "expected u32"),
            (Box::new(|v| v["kdf"]["p"] = json!(0)), "out of range"),
            (Box::new(|v| v["kdf"]["t"] = json!(0)), "out of range"),
            (Box::new(|v| v["kdf"]["salt"] = json!("!!")), "base64"),
            (Box::new(|v| v["kdf"]["salt"] = json!("AAAA")), "salt"),
            (Box::new(|v| v["check"] = json!("AAAA")), "check"),
            (Box::new(|v| v["check"] = json!(7)), "expected a string"),
            (Box::new(|v| v["extra"] = json!(1)), "extra"),
            (Box::new(|v| v["keys"] = json!([])), "expected a map"),
            (
                Box::new(|v| v["keys"]["k"]["versions"][0]["material"] = json!("AAAA")),
                "material",
            ),
            (
                Box::new(|v| v["keys"]["k"]["versions"] = json!([])),
                "no versions",
            ),
            (
                Box::new(|v| v["keys"]["k"]["versions"][1]["version"] = json!(1)),
                "increasing",
            ),
            (
                Box::new(|v| v["keys"]["k"]["versions"][0]["version"] = json!(0)),
                "increasing",
            ),
            (
                Box::new(|v| {
                    let k = v["keys"]["k"].clone();
                    v["keys"]["../evil"] = k;
                }),
                "invalid key name",
            ),
            (
                Box::new(|v| v["keys"]["k"]["policy"] = json!({"ops": ["sign"]})),
                "sign",
            ),
            (
                Box::new(|v| v["keys"]["k"]["created"] = json!(-5)),
                "expected u64",
            ),
        ];
        for (edit, needle) in cases {
            let mut v = good_v.clone();
            edit(&mut v);
            let e = feed(&mut ks, &serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(
                matches!(&e, KekError::Corrupt(m) if m.contains(needle) && m.contains(KEYSTORE_FILE)),
                "{needle}: {e}"
            );
        }
        // The original still works after all that, and open() also reports garbage as Corrupt.
        assert!(feed(&mut ks, &good).is_ok());
        std::fs::write(ks.dir().join(KEYSTORE_FILE), b"{oops").unwrap();
        assert!(matches!(
            Keystore::open(ks.dir(), &pass(PASS)),
            Err(KekError::Corrupt(_))
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

    fn refusal(ks: &Keystore, name: &str, v: Option<u32>, now: u64) -> Option<Refusal> {
        match ks.key_material(name, v, now) {
            Ok(_) => None,
            Err(KekError::Refused { reason, .. }) => Some(reason),
            Err(e) => panic!("{e}"),
        }
    }

    fn change_refused(r: Result<impl fmt::Debug, KekError>, needle: &str) {
        match r {
            Err(KekError::ChangeRefused(m)) => assert!(m.contains(needle), "{needle:?} in {m}"),
            other => panic!("expected ChangeRefused({needle:?}), got {other:?}"),
        }
    }

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

    #[test]
    fn older_files_without_new_fields_still_open() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        edit_json(ks.dir(), |v| {
            v.as_object_mut().unwrap().remove("retention_secs");
            let k = v["keys"]["k"].as_object_mut().unwrap();
            k.remove("retention_secs");
            k.remove("volumes");
        });
        ks.reload().unwrap();
        assert_eq!(ks.default_retention(), DEFAULT_RETENTION_SECS);
        assert!(ks.key_info("k").unwrap().volumes.is_empty());
        // Damaged new fields are reported, not panicked on.
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["retention_secs"] = json!(MAX_RETENTION_SECS + 1)),
                "retention_secs",
            ),
            (
                Box::new(|v| v["keys"]["k"]["retention_secs"] = json!(u64::MAX)),
                "retention_secs",
            ),
            (
                Box::new(|v| {
                    v["keys"]["k"]["volumes"] = json!([{"id": "zz", "path": "/a", "registered": 1}])
                }),
                "invalid volume id",
            ),
            (
                Box::new(|v| {
                    v["keys"]["k"]["volumes"] =
                        json!([{"id": "00".repeat(16), "path": "", "registered": 1}])
                }),
                "path",
            ),
            (
                Box::new(|v| {
                    let e = json!({"id": "00".repeat(16), "path": "/a", "registered": 1});
                    v["keys"]["k"]["volumes"] = json!([e.clone(), e]);
                }),
                "listed twice",
            ),
            (
                Box::new(|v| {
                    v["keys"]["k"]["volumes"] =
                        json!([{"id": "00".repeat(16), "path": "/a", "registered": 1, "x": 1}])
                }),
                "unknown field",
            ),
        ];
        let good: Value =
            serde_json::from_slice(&std::fs::read(ks.dir().join(KEYSTORE_FILE)).unwrap()).unwrap();
        for (edit, needle) in cases {
            let mut v = good.clone();
            edit(&mut v);
            let e = feed(&mut ks, &serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(
                matches!(&e, KekError::Corrupt(m) if m.contains(needle)),
                "{needle}: {e}"
            );
        }
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

    #[test]
    fn time_formatting() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(253_402_300_799), "9999-12-31T23:59:59Z");
        assert!(!format_time(u64::MAX).is_empty());
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(7 * 86_400), "7d");
        assert_eq!(format_duration(36 * 3600), "36h");
        assert_eq!(format_duration(90 * 60), "90m");
        assert_eq!(format_duration(61), "61s");
    }
}
