//! One audit line: the seed-000 fields (`TaskName`, `ActivityId`, `category`, `resourceId`,
//! `keyVault`, `key`, `version`, `operation`, `code`, `message`) plus time, sequence number,
//! caller, duration and the chain fields; and how provider errors map to HTTP-like codes.

use crate::kek::{KekError, Refusal};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// `TaskName` of key operations (wrap, unwrap, provider open).
pub const TASK_KEY_OPERATION: &str = "KekfsKeyOperation";
/// `TaskName` of key lifecycle changes (create, rotate, disable, …).
pub const TASK_KEY_LIFECYCLE: &str = "KekfsKeyLifecycle";
/// `TaskName` of volume state changes (init, mount, poll, revoked, …).
pub const TASK_VOLUME_STATE: &str = "KekfsVolumeState";

/// Operation names used in the `operation` field.
pub mod op {
    /// A wrap of an AEK under the KEK (`kekfs init`, rewrap).
    pub const WRAP: &str = "wrapKey";
    /// An unwrap of an AEK (mount, rewrap check, verify, …).
    pub const UNWRAP: &str = "unwrapKey";
    /// Opening a provider failed before any key operation (wrong passphrase, no keystore).
    pub const OPEN: &str = "open";
    /// A poll of the KEK by a mount daemon (a real unwrap), logged on change and as a
    /// periodic heartbeat.
    pub const POLL: &str = "poll";
    /// Volume created.
    pub const INIT: &str = "init";
    /// Volume mounted.
    pub const MOUNT: &str = "mount";
    /// Volume unmounted.
    pub const UNMOUNT: &str = "unmount";
    /// Keys dropped after an explicit refusal.
    pub const REVOKED: &str = "revoked";
    /// Provider failing transiently: serving from the cached key.
    pub const GRACE: &str = "grace";
    /// Keys dropped after the grace period.
    pub const UNAVAILABLE: &str = "unavailable";
    /// Serving again (keys reloaded, or grace ended).
    pub const RESUMED: &str = "resumed";
    /// AEK wrapped under another KEK version.
    pub const REWRAP: &str = "rewrap";
    /// The disable-the-key drill.
    pub const DRILL: &str = "drill";
    /// `kekfs verify`.
    pub const VERIFY: &str = "verify";

    /// Operations that use a key (what `last-use` reports).
    pub const KEY_USES: &[&str] = &[WRAP, UNWRAP, POLL];
}

/// Who caused the line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// Effective uid (the one key policies check).
    pub uid: u32,
    /// Process id.
    pub pid: u32,
    /// Program name (file name of the executable).
    pub program: String,
    /// The kekfs command (`mount`, `key disable`, …), empty for other programs.
    #[serde(default)]
    pub command: String,
}

impl Caller {
    /// The calling process, with `command` as given.
    pub fn current(command: &str) -> Caller {
        let program = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "?".into());
        Caller {
            // SAFETY: geteuid has no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
            pid: std::process::id(),
            program,
            command: command.to_string(),
        }
    }

    /// The grouping key of a caller in queries: `uid:program command` (no pid).
    pub fn label(&self) -> String {
        if self.command.is_empty() {
            format!("{}:{}", self.uid, self.program)
        } else {
            format!("{}:{} {}", self.uid, self.program, self.command)
        }
    }
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// One parsed audit line (everything but the trailing `mac`, which covers the rest).
/// Field order here is the order on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// RFC 3339 UTC time with milliseconds (`2027-01-01T00:00:00.000Z`).
    pub time: String,
    /// Position in the chain: 1 for the first line ever written to the log, +1 per line.
    pub seq: u64,
    /// Class of task (`KekfsKeyOperation`, `KekfsKeyLifecycle`, `KekfsVolumeState`).
    #[serde(rename = "TaskName")]
    pub task_name: String,
    /// One id per logical operation (a CLI command, a poll), shared by its lines.
    #[serde(rename = "ActivityId")]
    pub activity_id: String,
    /// One id per event: the copies of one event in several logs share it.
    #[serde(rename = "eventId")]
    pub event_id: String,
    /// `info`, `warning` or `error`.
    pub category: String,
    /// The volume: `volume/<id hex>:<backing path>`; empty when no volume is involved.
    #[serde(rename = "resourceId")]
    pub resource_id: String,
    /// The provider without secrets: `soft:<keystore dir>`, or the token part of a
    /// `pkcs11:` URI.
    #[serde(rename = "keyVault")]
    pub key_vault: String,
    /// Key name (`soft:`) or label (`pkcs11:`).
    pub key: String,
    /// Key version, empty when not known or not applicable.
    pub version: String,
    /// What was done (`record::op`).
    pub operation: String,
    /// HTTP-like result: 200 ok, 400 bad request, 401 wrong passphrase/PIN, 403 refused,
    /// 404 not found/deleted, 409 conflict, 422 does not unwrap, 423 PIN locked,
    /// 500 local failure, 501 unsupported, 503 unreachable.
    pub code: String,
    /// Error or detail text.
    pub message: String,
    /// Who did it.
    pub caller: Caller,
    /// How long the operation took, in milliseconds (0 for instant events).
    #[serde(rename = "durationMs")]
    pub duration_ms: f64,
    /// How many operations this line stands for (poll heartbeats summarise several).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u64,
    /// The `mac` of the previous line in the chain (64 zeros for the first).
    pub prev: String,
}

impl Line {
    /// The numeric code, if the field holds one.
    pub fn code_num(&self) -> Option<u16> {
        self.code.parse().ok()
    }

    /// Did the operation succeed (code 2xx)?
    pub fn ok(&self) -> bool {
        self.code_num().is_some_and(|c| (200..300).contains(&c))
    }
}

/// What a caller reports; the writer adds time, sequence, ids, caller and chain fields.
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// `TaskName`.
    pub task: &'static str,
    /// `resourceId`.
    pub resource_id: String,
    /// `keyVault`.
    pub key_vault: String,
    /// `key`.
    pub key: String,
    /// `version` (`None` = unknown).
    pub version: Option<u32>,
    /// `operation`.
    pub operation: String,
    /// HTTP-like code.
    pub code: u16,
    /// Category override; by default derived from the code.
    pub category: Option<&'static str>,
    /// `message`.
    pub message: String,
    /// How long it took.
    pub duration: Duration,
    /// Operations summarised by this line (1 unless a heartbeat).
    pub count: u64,
}

impl Event {
    /// An event with the given task, operation and code.
    pub fn new(task: &'static str, operation: &str, code: u16) -> Event {
        Event {
            task,
            operation: operation.to_string(),
            code,
            count: 1,
            ..Event::default()
        }
    }

    /// The `category` written: the override, else info for 2xx, warning for 503 (transient),
    /// error otherwise.
    pub fn category(&self) -> &'static str {
        self.category.unwrap_or(match self.code {
            200..=299 => "info",
            503 => "warning",
            _ => "error",
        })
    }
}

/// The HTTP-like code of a provider error.
pub fn code_of(e: &KekError) -> u16 {
    match e {
        KekError::Refused { reason, .. } => match reason {
            Refusal::Deleted => 404,
            _ => 403,
        },
        KekError::NotFound(_) | KekError::NoKeystore(_) => 404,
        KekError::Unreachable(_) | KekError::TokenAbsent(_) | KekError::ModuleLoad(_) => 503,
        KekError::BadPassphrase(_) => 401,
        KekError::PinLocked(_) => 423,
        KekError::UnwrapFailed(_) | KekError::Corrupt(_) => 422,
        KekError::BadUri(_) => 400,
        KekError::AlreadyExists(_) | KekError::ChangeRefused(_) => 409,
        KekError::Unsupported(_) => 501,
        _ => 500,
    }
}

/// Format a time as RFC 3339 UTC with milliseconds: `2027-01-01T00:00:00.000Z`.
pub fn format_time_ms(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let s = crate::time::format_time(d.as_secs());
    // format_time ends in 'Z'; put the milliseconds before it.
    let base = s.strip_suffix('Z').unwrap_or(&s);
    format!("{base}.{:03}Z", d.subsec_millis())
}

/// The `time` string that sorts like Unix time `secs` (for `--since`/`--until` filters):
/// lines' times compare as strings because the format is fixed.
pub fn time_key(secs: u64) -> String {
    format_time_ms(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A random id in UUID layout (8-4-4-4-12 lower-case hex, version 4 bits set).
pub fn new_id() -> String {
    let mut b: [u8; 16] = crate::crypto::random_array();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::volume::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `resourceId` of a volume.
pub fn resource_id(volume_id: &[u8; 16], backing: &std::path::Path) -> String {
    format!(
        "volume/{}:{}",
        crate::volume::hex(volume_id),
        backing.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let refused = |reason| KekError::Refused {
            key: "k".into(),
            reason,
        };
        assert_eq!(code_of(&refused(Refusal::Disabled)), 403);
        assert_eq!(code_of(&refused(Refusal::Expired)), 403);
        assert_eq!(code_of(&refused(Refusal::Denied)), 403);
        assert_eq!(code_of(&refused(Refusal::Deleted)), 404);
        assert_eq!(code_of(&KekError::NotFound("x".into())), 404);
        assert_eq!(code_of(&KekError::Unreachable("x".into())), 503);
        assert_eq!(code_of(&KekError::BadPassphrase("x".into())), 401);
        assert_eq!(code_of(&KekError::Io("x".into())), 500);
        assert_eq!(
            Event::new(TASK_KEY_OPERATION, op::WRAP, 200).category(),
            "info"
        );
        assert_eq!(
            Event::new(TASK_KEY_OPERATION, op::POLL, 503).category(),
            "warning"
        );
        assert_eq!(
            Event::new(TASK_KEY_OPERATION, op::POLL, 403).category(),
            "error"
        );
    }

    #[test]
    fn times_and_ids() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(format_time_ms(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(time_key(0), "1970-01-01T00:00:00.000Z");
        assert!(time_key(1) > time_key(0));
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert_ne!(new_id(), id);
    }

    #[test]
    fn line_round_trip_keeps_order() {
        let l = Line {
            seq: 1,
            task_name: TASK_KEY_OPERATION.into(),
            caller: Caller {
                command: "mount".into(),
                ..crate::audit::writer::tests_line(op::UNWRAP).caller
            },
            duration_ms: 1.5,
            prev: "0".repeat(64),
            ..crate::audit::writer::tests_line(op::UNWRAP)
        };
        let s = serde_json::to_string(&l).unwrap();
        assert!(s.starts_with("{\"time\":"), "{s}");
        assert!(
            s.contains("\"TaskName\":") && !s.contains("\"count\""),
            "{s}"
        );
        assert_eq!(serde_json::from_str::<Line>(&s).unwrap(), l);
        assert!(l.ok());
        assert_eq!(l.caller.label(), "0:kekfs mount");
    }
}
