//! A mounted volume's lines: mount and unmount, and the monitor's events turned into lines
//! (polls only when their result changes and as a periodic heartbeat; revoked, grace,
//! unavailable, resumed, rewrap always).

use super::provider::Capture;
use super::record::{Event, TASK_KEY_OPERATION, TASK_VOLUME_STATE, code_of, op};
use super::sink::{self, Audit, To};
use crate::monitor::{self, Cause};
use crate::volume::VolumeError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The HTTP-like code of a volume error (a provider error's own code, else 500).
pub fn volume_code(e: &VolumeError) -> u16 {
    match e {
        VolumeError::Kek(k) => code_of(k),
        VolumeError::NotAVolume(_) => 404,
        VolumeError::Corrupt(_) => 422,
        _ => 500,
    }
}

/// The code of a revocation cause.
pub fn cause_code(c: Cause) -> u16 {
    match c {
        Cause::Deleted => 404,
        Cause::Unreachable => 503,
        Cause::Invalid => 422,
        _ => 403,
    }
}

/// Write a volume state line (`op::MOUNT`, `op::UNMOUNT`, …) to the volume log, and to
/// the provider log too when `both`.
pub fn state_line(
    audit: &Audit,
    operation: &str,
    code: u16,
    version: Option<u32>,
    message: String,
    both: bool,
) -> Result<(), sink::AuditError> {
    let mut ev = Event::new(TASK_VOLUME_STATE, operation, code);
    ev.version = version;
    ev.message = message;
    audit.emit(&ev, if both { To::Both } else { To::Volume })
}

/// What the poll logger remembers between polls.
struct PollLog {
    /// Lines of the current poll and where they go, written at its end.
    pending: Vec<(Event, To)>,
    /// (code, message) of the last poll line written.
    last: (u16, String),
    /// When the last poll line was written.
    at: Instant,
    /// Polls since then (the next poll line stands for them).
    since: u64,
}

/// The monitor hook of a mounted volume: polls are captured from the `Audited` provider and
/// written when their code or message changes, and at least every `heartbeat` (one line
/// with `count` = polls since the last line); state changes always. A poll's lines are
/// written at its end, after the gate changed and the status was published, so the audit
/// write never delays a revocation.
pub fn monitor_hook(
    audit: Arc<Audit>,
    capture: Arc<Capture>,
    heartbeat: Duration,
) -> monitor::EventHook {
    let state = std::sync::Mutex::new(PollLog {
        pending: Vec::new(),
        last: (200, String::new()),
        at: Instant::now(),
        since: 0,
    });
    Box::new(move |ev| {
        // Failures are reported by `Audit` (best-effort) or already refused the poll's
        // unwrap (fail-closed); nothing more to do with them here.
        let mut st = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(line) = on_event(&capture, heartbeat, &mut st, ev) {
            st.pending.push(line);
        }
        if matches!(ev, monitor::Event::PollEnd) {
            let lines = std::mem::take(&mut st.pending);
            drop(st);
            for (line, to) in &lines {
                let _ = audit.emit(line, *to);
            }
        }
    })
}

fn state_event(operation: &str, code: u16, version: Option<u32>, message: String) -> Event {
    let mut ev = Event::new(TASK_VOLUME_STATE, operation, code);
    ev.version = version;
    ev.message = message;
    ev
}

/// The line an event calls for, if any (and where it goes).
fn on_event(
    capture: &Capture,
    heartbeat: Duration,
    st: &mut PollLog,
    ev: &monitor::Event<'_>,
) -> Option<(Event, To)> {
    use monitor::Event as E;
    match ev {
        E::PollStart => {
            sink::new_activity();
            capture.start();
            None
        }
        E::Polled(err) => {
            let got = capture.finish();
            let (code, version, message, duration) = match (got, err) {
                (Some(c), _) => (c.code, c.version, c.message, c.duration),
                (None, Some(e)) => (volume_code(e), None, e.to_string(), Duration::ZERO),
                (None, None) => (200, None, String::new(), Duration::ZERO),
            };
            st.since += 1;
            let changed = st.last != (code, message.clone());
            if !changed && st.at.elapsed() < heartbeat {
                return None;
            }
            let mut e = Event::new(TASK_KEY_OPERATION, op::POLL, code);
            e.version = version;
            e.message = if changed || message.is_empty() {
                message.clone()
            } else {
                format!("{message} (unchanged)")
            };
            e.duration = duration;
            e.count = st.since;
            st.last = (code, message);
            st.at = Instant::now();
            st.since = 0;
            Some((e, To::Both))
        }
        E::Revoked(cause, msg) => Some((
            state_event(
                op::REVOKED,
                cause_code(*cause),
                None,
                format!("keys wiped, I/O fails with errno {}: {msg}", cause.errno()),
            ),
            To::Volume,
        )),
        E::GraceEntered(msg) => Some((
            state_event(
                op::GRACE,
                503,
                None,
                format!("provider failing, serving from the cached key: {msg}"),
            ),
            To::Volume,
        )),
        E::Unavailable(msg) => {
            let mut e = state_event(
                op::UNAVAILABLE,
                503,
                None,
                format!("grace period over, keys wiped: {msg}"),
            );
            e.category = Some("error");
            Some((e, To::Volume))
        }
        E::Resumed(reloaded) => Some((
            state_event(
                op::RESUMED,
                200,
                None,
                if *reloaded {
                    "KEK usable again: keys reloaded, serving".into()
                } else {
                    "provider reachable again: grace period ended".into()
                },
            ),
            To::Volume,
        )),
        E::Rewrapped { from, to } => Some((
            state_event(
                op::REWRAP,
                200,
                Some(*to),
                format!("rewrapped online from version {from} to {to}"),
            ),
            To::Volume,
        )),
        E::RewrapFailed { from, to, error } => Some((
            state_event(
                op::REWRAP,
                volume_code(error),
                Some(*to),
                format!("online rewrap from version {from} to {to} failed: {error}"),
            ),
            To::Volume,
        )),
        E::PollEnd => None,
    }
}
