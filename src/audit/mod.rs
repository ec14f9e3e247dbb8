//! The audit log: one tamper-evident JSON line per KEK operation and volume state change.
//!
//! - [`record`]: the fields of a line (seed-000 schema plus time, caller, duration) and codes.
//! - [`chain`]: the keyed hash chain (HMAC-SHA256 under `audit.key`) sealing each line.
//! - [`writer`]: appends lines under a lock, with size-based files that keep the chain.
//! - [`reader`]: reads untrusted lines and checks the chain, saying where it breaks.
//! - [`sink`]: where logs live, settings and policy, and the `Audit` handle that writes.
//! - [`provider`]: the `Audited` KEK provider wrapper that logs wraps and unwraps.
//! - [`volume`]: a mounted volume's lines (mount, polls on change + heartbeat, states).
//! - [`query`]: `summary` and `last-use` aggregations.
//! - [`follow`]: streaming new lines from a checkpoint, with a caller allow-list.
//!
//! Lines are written only for provider operations, polls and state changes, never per
//! block: the data path never touches the log.

pub mod chain;
pub mod follow;
pub mod provider;
pub mod query;
pub mod reader;
pub mod record;
pub mod sink;
pub mod volume;
pub mod writer;

pub use provider::Audited;
pub use sink::{Audit, Policy, Settings, To};

use crate::kek::{KekError, KekUri, ProviderOptions, open_provider};
use record::{Event, TASK_KEY_LIFECYCLE, TASK_KEY_OPERATION, code_of, op};
use std::path::Path;
use std::sync::Arc;

static NOTED_VERSION: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);

/// Record the key version a lifecycle command just created (`create`, `rotate`), for its
/// audit line.
pub fn note_version(v: u32) {
    *NOTED_VERSION
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(v);
}

/// The version noted by [`note_version`], if any (and forget it).
pub fn take_noted_version() -> Option<u32> {
    NOTED_VERSION
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

/// Open the provider `uri` names, wrapped in [`Audited`]; with `volume` (id and backing
/// directory) its lines also go to that volume's log. A failure to open that concerns the
/// key (wrong passphrase or PIN, key missing or refused, token absent) is logged too.
pub fn open_audited(
    uri: &KekUri,
    popts: &ProviderOptions,
    volume: Option<(&[u8; 16], &Path)>,
) -> Result<Audited, KekError> {
    let mut audit = Audit::for_kek(uri, &popts.keystore_dir);
    if let Some((id, backing)) = volume {
        audit = audit.with_volume(id, backing);
    }
    let audit = Arc::new(audit);
    let popts = &ProviderOptions {
        volume_dir: volume.map(|(_, backing)| backing.to_path_buf()),
        ..popts.clone()
    };
    match open_provider(uri, popts) {
        Ok(p) => Ok(Audited::new(p, audit, uri.version())),
        Err(e) => {
            let loggable = matches!(
                e,
                KekError::BadPassphrase(_)
                    | KekError::NotFound(_)
                    | KekError::Refused { .. }
                    | KekError::PinLocked(_)
                    | KekError::TokenAbsent(_)
                    | KekError::Unreachable(_)
            );
            if loggable && provider_log_exists(uri, &popts.keystore_dir) {
                let mut ev = Event::new(TASK_KEY_OPERATION, op::OPEN, code_of(&e));
                ev.version = uri.version();
                ev.message = e.to_string();
                let to = if volume.is_some() {
                    To::Both
                } else {
                    To::Provider
                };
                audit.emit(&ev, to)?;
            }
            Err(e)
        }
    }
}

/// Whether the provider-side log has a home: a `soft:` keystore that exists (a log is
/// never the reason a keystore directory gets created); always for tokens.
fn provider_log_exists(uri: &KekUri, keystore: &Path) -> bool {
    match uri {
        KekUri::Soft { .. } => keystore.join(crate::kek::keystore::KEYSTORE_FILE).exists(),
        KekUri::Pkcs11(_) => true,
    }
}

/// A key lifecycle change (create, rotate, disable, enable, set, delete, recover, purge,
/// protect, policy) about to happen: under fail-closed, [`Lifecycle::begin`] refuses when
/// the log cannot be written; [`Lifecycle::end`] writes the one line with the outcome.
#[derive(Debug)]
pub struct Lifecycle {
    audit: Option<Audit>,
    operation: String,
    version: Option<u32>,
    started: std::time::Instant,
}

impl Lifecycle {
    /// Prepare the line for `operation` on the key `uri` names (`version` if one version).
    pub fn begin(
        uri: &KekUri,
        keystore: &Path,
        operation: &str,
        version: Option<u32>,
    ) -> Result<Lifecycle, KekError> {
        let audit = provider_log_exists(uri, keystore).then(|| Audit::for_kek(uri, keystore));
        if let Some(a) = &audit
            && a.policy() == Policy::FailClosed
        {
            a.probe(To::Provider)?;
        }
        Ok(Lifecycle {
            audit,
            operation: operation.to_string(),
            version,
            started: std::time::Instant::now(),
        })
    }

    /// Set the version the line names (e.g. the one `rotate` created).
    pub fn set_version(&mut self, v: Option<u32>) {
        self.version = v;
    }

    /// Write the line: `code` 200 and a description, or the failure's code and message.
    pub fn end(self, code: u16, message: String) -> Result<(), KekError> {
        let Some(a) = &self.audit else {
            return Ok(());
        };
        let mut ev = Event::new(TASK_KEY_LIFECYCLE, &self.operation, code);
        ev.version = self.version;
        ev.message = message;
        ev.duration = self.started.elapsed();
        a.emit(&ev, To::Provider)?;
        Ok(())
    }
}
