//! Where audit logs live and how one event reaches them: the settings (base directory,
//! policy, size limit, heartbeat), the per-keystore, per-token and per-volume log
//! directories, and [`Audit`], which seals an event into every log it concerns.

use super::record::{self, Caller, Event, Line};
use super::writer::{DEFAULT_MAX_BYTES, LogWriter};
use crate::kek::{KekError, KekUri};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

/// Environment variable naming the audit base directory.
pub const ENV_DIR: &str = "KEKFS_AUDIT_DIR";
/// Environment variable choosing the policy (`best-effort` or `fail-closed`).
pub const ENV_POLICY: &str = "KEKFS_AUDIT";
/// Environment variable setting the file size at which a new log file starts (bytes).
pub const ENV_MAX_BYTES: &str = "KEKFS_AUDIT_MAX_BYTES";
/// Environment variable setting the poll heartbeat (`10m`, `30s`, …).
pub const ENV_HEARTBEAT: &str = "KEKFS_AUDIT_HEARTBEAT";
/// Default interval of poll heartbeat lines.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(600);

/// What happens when a line cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Warn (stderr / daemon log) and go on: availability over auditability. The default.
    #[default]
    BestEffort,
    /// Refuse the key operation: no wrap or unwrap happens without its line on disk.
    FailClosed,
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::BestEffort => "best-effort",
            Policy::FailClosed => "fail-closed",
        })
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "best-effort" => Ok(Policy::BestEffort),
            "fail-closed" => Ok(Policy::FailClosed),
            _ => Err(format!(
                "unknown audit policy {s:?}: expected best-effort or fail-closed"
            )),
        }
    }
}

/// Process-wide audit settings (set once by the CLI, adjusted by mount options).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base directory of per-volume and per-token logs.
    pub base_dir: PathBuf,
    /// Policy when a line cannot be written.
    pub policy: Policy,
    /// Size at which a log file is closed and the next one started.
    pub max_bytes: u64,
    /// Interval of poll heartbeat lines (polls are otherwise logged only on change).
    pub heartbeat: Duration,
    /// The kekfs command running (`mount`, `key disable`, …), recorded in `caller`.
    pub command: String,
    /// Print write failures on stderr (off in a detached daemon, which logs them).
    pub warn_on_stderr: bool,
}

impl Settings {
    /// Settings from the environment (`KEKFS_AUDIT_DIR`, `KEKFS_AUDIT`,
    /// `KEKFS_AUDIT_MAX_BYTES`, `KEKFS_AUDIT_HEARTBEAT`) and the defaults. Invalid values
    /// are an error naming the variable.
    pub fn from_env() -> Result<Settings, String> {
        let policy = match std::env::var(ENV_POLICY) {
            Ok(v) if !v.is_empty() => v.parse().map_err(|e| format!("${ENV_POLICY}: {e}"))?,
            _ => Policy::default(),
        };
        let max_bytes = match std::env::var(ENV_MAX_BYTES) {
            Ok(v) if !v.is_empty() => v
                .parse::<u64>()
                .map_err(|_| format!("${ENV_MAX_BYTES}: expected a number of bytes, got {v:?}"))?,
            _ => DEFAULT_MAX_BYTES,
        };
        let heartbeat = match std::env::var(ENV_HEARTBEAT) {
            Ok(v) if !v.is_empty() => parse_secs(&v)
                .ok_or_else(|| format!("${ENV_HEARTBEAT}: expected a duration like 30s or 10m"))?,
            _ => DEFAULT_HEARTBEAT,
        };
        Ok(Settings {
            base_dir: default_base_dir(),
            policy,
            max_bytes,
            heartbeat,
            command: String::new(),
            warn_on_stderr: true,
        })
    }
}

/// A duration `N` (seconds) or `N` with unit `ms`, `s`, `m`, `h`.
pub fn parse_secs(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let d = match &s[split..] {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    Some(d)
}

static SETTINGS: RwLock<Option<Settings>> = RwLock::new(None);

/// Set the process's audit settings.
pub fn configure(s: Settings) {
    *SETTINGS.write().unwrap_or_else(PoisonError::into_inner) = Some(s);
}

/// The process's audit settings (from the environment if never configured).
pub fn settings() -> Settings {
    if let Some(s) = SETTINGS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    {
        return s;
    }
    Settings::from_env().unwrap_or(Settings {
        base_dir: default_base_dir(),
        policy: Policy::default(),
        max_bytes: DEFAULT_MAX_BYTES,
        heartbeat: DEFAULT_HEARTBEAT,
        command: String::new(),
        warn_on_stderr: true,
    })
}

/// Change some settings in place.
pub fn update(f: impl FnOnce(&mut Settings)) {
    let mut s = settings();
    f(&mut s);
    configure(s);
}

/// The base directory of per-volume and per-token logs: `$KEKFS_AUDIT_DIR`, else
/// `/var/log/kekfs` for root, else `$XDG_STATE_HOME/kekfs/audit` (default
/// `~/.local/state/kekfs/audit`).
pub fn default_base_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(ENV_DIR).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/log/kekfs");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kekfs/audit");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/state/kekfs/audit"),
        None => std::env::temp_dir().join("kekfs-audit"),
    }
}

/// The log of a `soft:` keystore: `<keystore>/audit`.
pub fn keystore_log_dir(keystore: &Path) -> PathBuf {
    keystore.join("audit")
}

/// The log of a volume: `<base>/volumes/<volume id hex>`.
pub fn volume_log_dir(base: &Path, volume_id: &[u8; 16]) -> PathBuf {
    base.join("volumes").join(crate::volume::hex(volume_id))
}

/// The log of a PKCS#11 token: `<base>/tokens/<token label or serial, sanitised>`.
pub fn token_log_dir(base: &Path, u: &crate::kek::pkcs11_uri::Pkcs11Uri) -> PathBuf {
    let raw = u
        .token
        .as_deref()
        .or(u.serial.as_deref())
        .unwrap_or("any-token");
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        name = "any-token".into();
    }
    base.join("tokens").join(name)
}

/// The `keyVault` and `key` of a KEK, and the directory of its provider-side log.
/// `keyVault` never holds a secret: `soft:<keystore dir>`, or the token-selecting part of a
/// `pkcs11:` URI plus its module (no object, id or PIN source).
pub fn vault_of(uri: &KekUri, keystore: &Path, base: &Path) -> (String, String, PathBuf) {
    match uri {
        KekUri::Soft { name, .. } => (
            format!("soft:{}", keystore.display()),
            name.clone(),
            keystore_log_dir(keystore),
        ),
        KekUri::Pkcs11(u) => {
            let mut v = (**u).clone();
            v.object = None;
            v.id = None;
            v.object_type = None;
            v.pin_source = None;
            let vault = v.to_string();
            (
                vault,
                u.object.clone().unwrap_or_default(),
                token_log_dir(base, u),
            )
        }
    }
}

/// One writer per log directory per process, so cached chain tails are shared. A
/// keystore's log (`keystore/audit`) never creates the keystore directory.
fn writer(dir: &Path, max_bytes: u64, in_keystore: bool) -> Arc<LogWriter> {
    static WRITERS: OnceLock<Mutex<HashMap<PathBuf, Arc<LogWriter>>>> = OnceLock::new();
    let mut m = WRITERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    m.entry(dir.to_path_buf())
        .or_insert_with(|| {
            Arc::new(if in_keystore {
                LogWriter::inside_existing(dir, max_bytes)
            } else {
                LogWriter::new(dir, max_bytes)
            })
        })
        .clone()
}

static ACTIVITY: Mutex<Option<String>> = Mutex::new(None);

/// The current `ActivityId` (one per CLI command; the daemon starts one per poll).
pub fn activity() -> String {
    ACTIVITY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(record::new_id)
        .clone()
}

/// Start a new activity: the lines written from now on share a fresh `ActivityId`.
pub fn new_activity() {
    *ACTIVITY.lock().unwrap_or_else(PoisonError::into_inner) = Some(record::new_id());
}

/// A line could not be written (and the policy is fail-closed).
#[derive(Debug, Clone)]
pub struct AuditError(pub String);

impl std::fmt::Display for AuditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<AuditError> for KekError {
    fn from(e: AuditError) -> KekError {
        KekError::AuditFailed(e.0)
    }
}

/// Which logs an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// The keystore's or token's log.
    Provider,
    /// The volume's log.
    Volume,
    /// Both.
    Both,
}

/// The audit context of one KEK (and, once known, one volume): writes events to the
/// provider-side log and the volume log under the process's policy.
pub struct Audit {
    provider_log: Option<Arc<LogWriter>>,
    volume_log: Option<Arc<LogWriter>>,
    /// `keyVault` of the KEK.
    pub vault: String,
    /// `key` of the KEK.
    pub key: String,
    resource: String,
    policy: Policy,
    warn_on_stderr: bool,
    warned: AtomicBool,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("vault", &self.vault)
            .field("key", &self.key)
            .field("resource", &self.resource)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// The audit context of the KEK `uri` (`keystore` is the `soft:` keystore directory).
    pub fn for_kek(uri: &KekUri, keystore: &Path) -> Audit {
        let s = settings();
        let (vault, key, dir) = vault_of(uri, keystore, &s.base_dir);
        Audit {
            provider_log: Some(writer(
                &dir,
                s.max_bytes,
                matches!(uri, KekUri::Soft { .. }),
            )),
            volume_log: None,
            vault,
            key,
            resource: String::new(),
            policy: s.policy,
            warn_on_stderr: s.warn_on_stderr,
            warned: AtomicBool::new(false),
        }
    }

    /// The same, also writing to the log of volume `volume_id` in `backing`.
    pub fn with_volume(mut self, volume_id: &[u8; 16], backing: &Path) -> Audit {
        let s = settings();
        let dir = volume_log_dir(&s.base_dir, volume_id);
        self.volume_log = Some(writer(&dir, s.max_bytes, false));
        self.resource = record::resource_id(volume_id, backing);
        self
    }

    /// A copy of this context that also writes to the log of volume `volume_id`.
    pub fn and_volume(&self, volume_id: &[u8; 16], backing: &Path) -> Audit {
        Audit {
            provider_log: self.provider_log.clone(),
            volume_log: None,
            vault: self.vault.clone(),
            key: self.key.clone(),
            resource: String::new(),
            policy: self.policy,
            warn_on_stderr: self.warn_on_stderr,
            warned: AtomicBool::new(false),
        }
        .with_volume(volume_id, backing)
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Change the policy (mount option `audit=`).
    pub fn set_policy(&mut self, p: Policy) {
        self.policy = p;
    }

    /// Print warnings on stderr or not (a detached daemon logs them instead).
    pub fn set_warn_on_stderr(&mut self, on: bool) {
        self.warn_on_stderr = on;
    }

    /// The volume log's directory, if any.
    pub fn volume_log_dir(&self) -> Option<&Path> {
        self.volume_log.as_deref().map(LogWriter::dir)
    }

    /// The provider log's directory, if any.
    pub fn provider_log_dir(&self) -> Option<&Path> {
        self.provider_log.as_deref().map(LogWriter::dir)
    }

    fn targets(&self, to: To) -> Vec<&LogWriter> {
        let p = self.provider_log.as_deref();
        let v = self.volume_log.as_deref();
        match to {
            To::Provider => p.into_iter().collect(),
            To::Volume => v.into_iter().collect(),
            To::Both => p.into_iter().chain(v).collect(),
        }
    }

    /// Write `ev` to the logs `to` names. Under best-effort a failure is reported (once per
    /// streak) and `Ok` returned; under fail-closed it is an error.
    pub fn emit(&self, ev: &Event, to: To) -> Result<(), AuditError> {
        let s = settings();
        let mut line = Line {
            time: record::format_time_ms(SystemTime::now()),
            seq: 0,
            task_name: ev.task.to_string(),
            activity_id: activity(),
            event_id: record::new_id(),
            category: ev.category().to_string(),
            resource_id: if ev.resource_id.is_empty() {
                self.resource.clone()
            } else {
                ev.resource_id.clone()
            },
            key_vault: if ev.key_vault.is_empty() {
                self.vault.clone()
            } else {
                ev.key_vault.clone()
            },
            key: if ev.key.is_empty() {
                self.key.clone()
            } else {
                ev.key.clone()
            },
            version: ev.version.map(|v| v.to_string()).unwrap_or_default(),
            operation: ev.operation.clone(),
            code: ev.code.to_string(),
            message: ev.message.clone(),
            caller: Caller::current(&s.command),
            duration_ms: (ev.duration.as_micros() as f64) / 1000.0,
            count: ev.count.max(1),
            prev: String::new(),
        };
        let mut errors = Vec::new();
        for w in self.targets(to) {
            if let Err(e) = w.append(&mut line) {
                errors.push(format!("audit log {}: {e}", w.dir().display()));
            }
        }
        self.outcome(errors)
    }

    /// Check the logs `to` names could be written now (fail-closed callers use it before
    /// acting when there is no line to write yet).
    pub fn probe(&self, to: To) -> Result<(), AuditError> {
        let errors = self
            .targets(to)
            .into_iter()
            .filter_map(|w| {
                w.probe()
                    .err()
                    .map(|e| format!("audit log {}: {e}", w.dir().display()))
            })
            .collect();
        self.outcome(errors)
    }

    fn outcome(&self, errors: Vec<String>) -> Result<(), AuditError> {
        if errors.is_empty() {
            self.warned.store(false, Ordering::Relaxed);
            return Ok(());
        }
        let msg = errors.join("; ");
        match self.policy {
            Policy::FailClosed => Err(AuditError(format!(
                "{msg}; refusing the key operation (audit=fail-closed): make the log \
                 writable, or mount with -o audit=best-effort"
            ))),
            Policy::BestEffort => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    log::warn!("{msg}; continuing without it (audit=best-effort)");
                    if self.warn_on_stderr && settings().warn_on_stderr {
                        eprintln!(
                            "kekfs: warning: {msg}; continuing without it (audit=best-effort)"
                        );
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_and_durations() {
        assert_eq!("fail-closed".parse::<Policy>(), Ok(Policy::FailClosed));
        assert_eq!("best-effort".parse::<Policy>(), Ok(Policy::BestEffort));
        assert!("closed".parse::<Policy>().is_err());
        assert_eq!(parse_secs("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_secs("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_secs("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_secs("x"), None);
        assert_eq!(parse_secs("99999999999999999999h"), None);
    }

    #[test]
    fn vaults_hold_no_secrets() {
        let base = Path::new("/b");
        let u = KekUri::parse(
            "pkcs11:token=my%20tok;object=k;id=%02?module-path=/m.so&pin-source=file:/pin",
        )
        .unwrap();
        let (vault, key, dir) = vault_of(&u, Path::new("/ks"), base);
        assert_eq!(key, "k");
        assert!(
            !vault.contains("pin") && !vault.contains("object"),
            "{vault}"
        );
        assert!(vault.contains("token=my%20tok"), "{vault}");
        assert_eq!(dir, Path::new("/b/tokens/my_tok"));
        let (vault, key, dir) = vault_of(
            &KekUri::parse("soft:vk?version=2").unwrap(),
            Path::new("/ks"),
            base,
        );
        assert_eq!((vault.as_str(), key.as_str()), ("soft:/ks", "vk"));
        assert_eq!(dir, Path::new("/ks/audit"));
    }
}
