//! `Audited`: a KEK provider around another one that writes a line for every wrap and
//! unwrap (operation, key version, HTTP-like code, duration) and, under fail-closed, refuses
//! the operation when the line cannot be written. A mount daemon's polls are captured
//! instead, and logged by the monitor hook only on change and as a heartbeat.

use super::record::{self, Event, TASK_KEY_OPERATION, op};
use super::sink::{Audit, Policy, To};
use crate::crypto::Key32;
use crate::kek::{KekError, KekProvider, WrappedKey};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The result of a captured (poll) unwrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// HTTP-like code.
    pub code: u16,
    /// Key version asked for.
    pub version: Option<u32>,
    /// Error text (empty on success).
    pub message: String,
    /// How long it took.
    pub duration: Duration,
}

/// Switches an `Audited` provider between logging each operation and capturing it (polls).
#[derive(Debug, Default)]
pub struct Capture {
    on: AtomicBool,
    got: Mutex<Option<Captured>>,
}

impl Capture {
    /// Capture the operations from now on instead of logging them.
    pub fn start(&self) {
        *self.got.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stop capturing; the captured result: the success if any operation succeeded, else the
    /// first failure.
    pub fn finish(&self) -> Option<Captured> {
        self.on.store(false, Ordering::SeqCst);
        self.got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn active(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    fn record(&self, c: Captured) {
        let mut g = self.got.lock().unwrap_or_else(PoisonError::into_inner);
        let keep_old = g
            .as_ref()
            .is_some_and(|old| old.code == 200 || c.code != 200);
        if !keep_old {
            *g = Some(c);
        }
    }
}

/// A provider whose wraps and unwraps are audited.
pub struct Audited {
    inner: Box<dyn KekProvider>,
    audit: Arc<Audit>,
    pinned: Option<u32>,
    capture: Arc<Capture>,
}

impl std::fmt::Debug for Audited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audited")
            .field("uri", &self.inner.uri())
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

impl Audited {
    /// Audit `inner` into `audit`'s logs; `pinned` is the KEK version the URI pins (the
    /// version recorded for a failed wrap).
    pub fn new(inner: Box<dyn KekProvider>, audit: Arc<Audit>, pinned: Option<u32>) -> Audited {
        Audited {
            inner,
            audit,
            pinned,
            capture: Arc::new(Capture::default()),
        }
    }

    /// The capture switch (for the monitor hook).
    pub fn capture(&self) -> Arc<Capture> {
        self.capture.clone()
    }

    /// The audit context.
    pub fn audit(&self) -> &Arc<Audit> {
        &self.audit
    }

    fn to(&self) -> To {
        if self.audit.volume_log_dir().is_some() {
            To::Both
        } else {
            To::Provider
        }
    }

    /// Log (or capture) one operation's outcome; under fail-closed an unwritable log turns
    /// the outcome into an error.
    fn after<T>(
        &self,
        operation: &str,
        version: Option<u32>,
        started: Instant,
        r: Result<T, KekError>,
    ) -> Result<T, KekError> {
        let duration = started.elapsed();
        let (code, message) = match &r {
            Ok(_) => (200, String::new()),
            Err(e) => (record::code_of(e), e.to_string()),
        };
        if self.capture.active() {
            self.capture.record(Captured {
                code,
                version,
                message,
                duration,
            });
            // Nothing is written for a captured poll; fail-closed still refuses when the
            // logs could not take its line.
            if self.audit.policy() == Policy::FailClosed && r.is_ok() {
                self.audit.probe(self.to())?;
            }
            return r;
        }
        let mut ev = Event::new(TASK_KEY_OPERATION, operation, code);
        ev.version = version;
        ev.message = message;
        ev.duration = duration;
        self.audit.emit(&ev, self.to())?;
        r
    }
}

impl KekProvider for Audited {
    fn uri(&self) -> String {
        self.inner.uri()
    }

    fn wrap(&self, aek: &Key32) -> Result<WrappedKey, KekError> {
        let t = Instant::now();
        let r = self.inner.wrap(aek);
        let version = r.as_ref().ok().map(|w| w.key_version).or(self.pinned);
        self.after(op::WRAP, version, t, r)
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Key32, KekError> {
        let t = Instant::now();
        let r = self.inner.unwrap(wrapped);
        self.after(op::UNWRAP, Some(wrapped.key_version), t, r)
    }

    fn register_volume(
        &self,
        volume_id: &[u8; 16],
        backing: &std::path::Path,
    ) -> Result<(), KekError> {
        self.inner.register_volume(volume_id, backing)
    }

    fn current_version(&self) -> Result<Option<u32>, KekError> {
        self.inner.current_version()
    }

    fn reopen(&self, uri: &crate::kek::KekUri) -> Option<Box<dyn KekProvider>> {
        let inner = self.inner.reopen(uri)?;
        Some(Box::new(Audited {
            inner,
            audit: self.audit.clone(),
            pinned: uri.version(),
            capture: self.capture.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_prefers_success_else_first_failure() {
        let c = Capture::default();
        c.start();
        let cap = |code| Captured {
            code,
            version: Some(1),
            message: String::new(),
            duration: Duration::ZERO,
        };
        c.record(cap(503));
        c.record(cap(403));
        assert_eq!(c.finish().unwrap().code, 503);
        c.start();
        c.record(cap(503));
        c.record(cap(200));
        c.record(cap(403));
        assert_eq!(c.finish().unwrap().code, 200);
        assert!(!c.active());
        assert_eq!(c.finish(), None);
    }
}
