//! The key lifecycle monitor: holds the unlocked volume behind a gate, polls the KEK
//! provider, and on refusal (or an outage longer than the grace period) drops every key
//! and tells the frontend to purge what it cached; on restore it unlocks again.

pub mod status;

use crate::format::volume_header::VolumeHeader;
use crate::kek::{KekError, KekProvider, KekUri, Refusal};
use crate::volume::{self, Volume, VolumeError};
use log::{error, info, warn};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Why the volume's plaintext is not available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// The KEK (version) is disabled, or a token key may no longer unwrap.
    Disabled,
    /// The KEK version is past its expiry date.
    Expired,
    /// The KEK version is not valid yet.
    NotYetValid,
    /// The key was deleted (soft delete) or is gone from the token.
    Deleted,
    /// The key's access policy denies this caller.
    Denied,
    /// The provider stayed unreachable for longer than the grace period.
    Unreachable,
    /// The wrapped key no longer unwraps under the KEK (wrong key, tampered header).
    Invalid,
}

impl Cause {
    /// The errno returned for operations that need plaintext (documented in README).
    pub fn errno(self) -> i32 {
        match self {
            Cause::Disabled => libc::EKEYREVOKED,
            Cause::Expired => libc::EKEYEXPIRED,
            Cause::NotYetValid => libc::EKEYREJECTED,
            Cause::Deleted => libc::ENOKEY,
            Cause::Denied => libc::EACCES,
            Cause::Unreachable => libc::EHOSTDOWN,
            Cause::Invalid => libc::EKEYREJECTED,
        }
    }

    /// Classify a provider error: `Some(cause)` for an explicit refusal (no grace),
    /// `None` for a transient failure (grace applies).
    pub fn of(e: &KekError) -> Option<Cause> {
        match e {
            KekError::Refused { reason, .. } => Some(match reason {
                Refusal::Disabled => Cause::Disabled,
                Refusal::Expired => Cause::Expired,
                Refusal::NotYetValid => Cause::NotYetValid,
                Refusal::Deleted => Cause::Deleted,
                Refusal::Denied => Cause::Denied,
            }),
            // The key, or the whole keystore ("vault gone"), no longer exists.
            KekError::NotFound(_) | KekError::NoKeystore(_) => Some(Cause::Deleted),
            KekError::UnwrapFailed(_) => Some(Cause::Invalid),
            _ => None,
        }
    }
}

/// The volume's key state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum State {
    /// Keys loaded, serving.
    Active,
    /// The provider is failing transiently; still serving from the cached key.
    Grace {
        /// When the first failed poll happened (Unix seconds).
        since: u64,
        /// The last error.
        error: String,
    },
    /// Keys wiped, not serving (explicit refusal).
    Revoked {
        /// Why.
        cause: Cause,
        /// The provider's message.
        error: String,
    },
    /// Keys wiped after the grace period ran out.
    Unavailable {
        /// The last error.
        error: String,
    },
}

type Hook = Box<dyn Fn() + Send + Sync>;
/// Called after each poll with the gate, the time of the last successful poll and the
/// KEK version slot 0 of the volume header is wrapped with (if the header could be read).
pub type PollHook = Box<dyn Fn(&Gate, Option<SystemTime>, Option<u32>) + Send>;
/// Called on the monitor thread for each [`Event`] (the audit log listens here).
pub type EventHook = Box<dyn Fn(&Event<'_>) + Send>;

/// What the monitor reports to an observer, in order, on its own thread.
#[derive(Debug)]
pub enum Event<'a> {
    /// A poll starts; its unwrap follows.
    PollStart,
    /// The poll's unwrap is done: `None` if the key is usable, else why not.
    Polled(Option<&'a VolumeError>),
    /// Keys dropped after an explicit refusal.
    Revoked(Cause, &'a str),
    /// A transient failure began: still serving from the cached key, for the grace period.
    GraceEntered(&'a str),
    /// The grace period ran out: keys dropped.
    Unavailable(&'a str),
    /// Serving again: keys loaded again (`true`) or a grace period ended (`false`).
    Resumed(bool),
    /// The AEK was rewrapped online from one KEK version to another (follow-latest).
    Rewrapped { from: u32, to: u32 },
    /// An online rewrap to `to` failed.
    RewrapFailed {
        from: u32,
        to: u32,
        error: &'a VolumeError,
    },
    /// The poll is over and its state published (observers may do slow work now).
    PollEnd,
}

/// The gate every plaintext operation passes: the unlocked volume, or why there is none.
pub struct Gate {
    inner: RwLock<Inner>,
    on_revoke: Mutex<Vec<Hook>>,
}

struct Inner {
    vol: Option<Arc<Volume>>,
    state: State,
    epoch: u64,
}

impl Gate {
    /// A gate holding an unlocked volume.
    pub fn new(vol: Volume) -> Self {
        Self {
            inner: RwLock::new(Inner {
                vol: Some(Arc::new(vol)),
                state: State::Active,
                epoch: 1,
            }),
            on_revoke: Mutex::new(Vec::new()),
        }
    }

    /// The volume, or the cause that makes plaintext unavailable.
    pub fn volume(&self) -> Result<Arc<Volume>, Cause> {
        let g = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        match (&g.vol, &g.state) {
            (Some(v), _) => Ok(v.clone()),
            (None, State::Revoked { cause, .. }) => Err(*cause),
            (None, _) => Err(Cause::Unreachable),
        }
    }

    /// Changes whenever keys are dropped or reloaded; cached key material is valid only
    /// for the epoch it was derived in.
    pub fn epoch(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .epoch
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .state
            .clone()
    }

    /// Run `hook` after every revocation (the frontend purges caches there).
    pub fn on_revoke(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.on_revoke
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(hook));
    }

    /// Drop the keys and enter `state`.
    fn drop_keys(&self, state: State) {
        let old = {
            let mut g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
            g.state = state;
            g.epoch += 1;
            g.vol.take()
        };
        // The AEK and derived keys are zeroized when the last Arc goes (in-flight
        // operations finish first; new ones are refused).
        drop(old);
        for h in self
            .on_revoke
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            h();
        }
    }

    /// Explicit refusal: keys go at once.
    pub fn revoke(&self, cause: Cause, error: String) {
        self.drop_keys(State::Revoked { cause, error });
    }

    /// Grace ran out.
    pub fn make_unavailable(&self, error: String) {
        self.drop_keys(State::Unavailable { error });
    }

    /// Enter (or stay in) grace, keeping the keys.
    pub fn enter_grace(&self, since: SystemTime, error: String) {
        let mut g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if g.vol.is_some() {
            g.state = State::Grace {
                since: crate::time::unix_secs(since),
                error,
            };
        }
    }

    /// Keys are usable again (or still): serve with `vol` if given.
    pub fn activate(&self, vol: Option<Volume>) {
        let mut g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = vol {
            g.vol = Some(Arc::new(v));
            g.epoch += 1;
        }
        if g.vol.is_some() {
            g.state = State::Active;
        }
    }

    /// Is a volume loaded?
    pub fn has_keys(&self) -> bool {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .vol
            .is_some()
    }
}

/// Polling settings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Interval between polls.
    pub poll: Duration,
    /// How long a transient provider failure is tolerated.
    pub grace: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(2),
            grace: Duration::from_secs(300),
        }
    }
}

/// Stops the monitor thread when dropped or asked.
#[derive(Clone, Default)]
pub struct Stop(Arc<(Mutex<bool>, Condvar)>);

impl Stop {
    /// Ask the monitor to stop.
    pub fn stop(&self) {
        let (m, c) = &*self.0;
        *m.lock().unwrap_or_else(PoisonError::into_inner) = true;
        c.notify_all();
    }

    /// Sleep up to `d`; true if stop was requested.
    pub fn wait(&self, d: Duration) -> bool {
        let (m, c) = &*self.0;
        let g = m.lock().unwrap_or_else(PoisonError::into_inner);
        let (g, _) = c
            .wait_timeout_while(g, d, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        *g
    }
}

/// What one poll concluded.
#[derive(Debug, PartialEq, Eq)]
pub enum PollOutcome {
    /// Key usable.
    Ok,
    /// Explicit refusal.
    Refused(Cause),
    /// Transient failure.
    Failed,
}

/// The monitor: polls the provider by a real unwrap of the volume's wrapped AEK.
pub struct Monitor {
    gate: Arc<Gate>,
    provider: Box<dyn KekProvider>,
    /// The backing directory as given (for messages).
    backing: PathBuf,
    /// The same directory as `/proc/self/fd/N` of a descriptor opened when the monitor
    /// was made, for reading and rewriting the header: whoever can write the backing
    /// directory's parent could swap the directory for a link to another one later, and
    /// the header (and its temp and lock files) must not be read or written there.
    dir: Option<(std::os::fd::OwnedFd, PathBuf)>,
    timing: Timing,
    grace_since: Option<(Instant, SystemTime)>,
    /// Called after each poll with the gate (to publish status).
    pub on_poll: Option<PollHook>,
    /// Called for every [`Event`] (polls, state changes, rewraps).
    pub on_event: Option<EventHook>,
    last_ok: Option<SystemTime>,
}

/// An `O_PATH` descriptor of directory `p`, and the `/proc/self/fd` path that reaches it.
fn open_dir(p: &Path) -> std::io::Result<(std::os::fd::OwnedFd, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(p)?;
    let fd = std::os::fd::OwnedFd::from(f);
    let path = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ));
    Ok((fd, path))
}

impl Monitor {
    /// A monitor for the volume in `backing`.
    pub fn new(
        gate: Arc<Gate>,
        provider: Box<dyn KekProvider>,
        backing: PathBuf,
        timing: Timing,
    ) -> Self {
        let dir = open_dir(&backing)
            .map_err(|e| {
                warn!(
                    "{}: cannot hold the backing directory open: {e}",
                    backing.display()
                )
            })
            .ok();
        Self {
            gate,
            provider,
            backing,
            dir,
            timing,
            grace_since: None,
            on_poll: None,
            on_event: None,
            last_ok: Some(SystemTime::now()),
        }
    }

    /// Where the header is read and rewritten (see `dir`).
    fn header_dir(&self) -> &Path {
        self.dir.as_ref().map_or(self.backing.as_path(), |(_, p)| p)
    }

    fn emit(&self, ev: Event<'_>) {
        if let Some(f) = &self.on_event {
            f(&ev);
        }
    }

    /// One poll: read the volume header (once), unwrap, then update the gate.
    pub fn poll_once(&mut self) -> PollOutcome {
        let read = volume::read_header(self.header_dir());
        let mut key_version = None;
        if let Ok((h, _)) = &read {
            self.follow_kek_change(h);
            key_version = Some(h.slots[0].key_version);
        }
        self.emit(Event::PollStart);
        let opened = read.and_then(|(h, mac)| {
            Volume::open_header(h.clone(), &mac, self.provider.as_ref()).map(|v| (v, h))
        });
        self.emit(Event::Polled(opened.as_ref().err()));
        let outcome = match opened {
            Ok((vol, header)) => {
                self.grace_since = None;
                self.last_ok = Some(SystemTime::now());
                let st = self.gate.state();
                if self.gate.has_keys() {
                    // Keep the loaded keys (same AEK); just clear grace.
                    drop(vol);
                    if st != State::Active {
                        info!(
                            "{}: KEK reachable again; grace ended",
                            self.backing.display()
                        );
                        self.emit(Event::Resumed(false));
                    }
                    self.gate.activate(None);
                } else {
                    info!(
                        "{}: KEK usable again; volume resumes",
                        self.backing.display()
                    );
                    self.gate.activate(Some(vol));
                    self.emit(Event::Resumed(true));
                }
                if let Ok(v) = self.gate.volume()
                    && let Some(now) = self.follow_latest(&v, &header)
                {
                    key_version = Some(now);
                }
                PollOutcome::Ok
            }
            Err(VolumeError::Kek(e)) => match Cause::of(&e) {
                Some(cause) => {
                    if self.gate.has_keys()
                        || !matches!(self.gate.state(), State::Revoked { cause: c, .. } if c == cause)
                    {
                        error!(
                            "{}: {e}; keys wiped, I/O now fails with errno {}",
                            self.backing.display(),
                            cause.errno()
                        );
                        self.gate.revoke(cause, e.to_string());
                        self.emit(Event::Revoked(cause, &e.to_string()));
                    }
                    self.grace_since = None;
                    PollOutcome::Refused(cause)
                }
                None => {
                    self.transient(e.to_string());
                    PollOutcome::Failed
                }
            },
            Err(e) => {
                // Header unreadable (I/O) — treat as transient; a corrupted header is
                // reported but does not by itself revoke the loaded keys.
                self.transient(e.to_string());
                PollOutcome::Failed
            }
        };
        if let Some(f) = &self.on_poll {
            f(&self.gate, self.last_ok, key_version);
        }
        self.emit(Event::PollEnd);
        outcome
    }

    /// After `kekfs rewrap --to-kek` on the mounted volume, poll the new KEK: the
    /// provider opens it with the secret it already holds (same keystore or token).
    fn follow_kek_change(&mut self, h: &VolumeHeader) {
        let (Ok(want), Ok(have)) = (
            KekUri::parse(&h.kek_uri),
            KekUri::parse(&self.provider.uri()),
        ) else {
            return;
        };
        if want.with_version(None) == have.with_version(None) {
            return;
        }
        match self.provider.reopen(&want) {
            Some(p) => {
                info!(
                    "{}: volume rewrapped to KEK {}; polling it from now on",
                    self.backing.display(),
                    h.kek_uri
                );
                self.provider = p;
            }
            None => error!(
                "{}: volume rewrapped to KEK {}, which this mount cannot open without \
                 asking for its secret; remount the volume",
                self.backing.display(),
                h.kek_uri
            ),
        }
    }

    /// A volume that follows the latest KEK version rewraps itself when a newer usable
    /// version appears (the data is not re-encrypted). `h` is the header this poll read.
    /// Returns the version slot 0 is wrapped with after a rewrap.
    fn follow_latest(&self, vol: &Volume, h: &VolumeHeader) -> Option<u32> {
        if h.pinned_version != 0 {
            return None;
        }
        if let Ok(Some(latest)) = self.provider.current_version()
            && latest > h.slots[0].key_version
        {
            let from = h.slots[0].key_version;
            match vol.rewrap(self.header_dir(), self.provider.as_ref(), 0) {
                Ok(nh) => {
                    info!(
                        "{}: rewrapped online from KEK version {from} to {}",
                        self.backing.display(),
                        nh.slots[0].key_version
                    );
                    self.emit(Event::Rewrapped {
                        from,
                        to: nh.slots[0].key_version,
                    });
                    return Some(nh.slots[0].key_version);
                }
                Err(e) => {
                    warn!("{}: online rewrap failed: {e}", self.backing.display());
                    self.emit(Event::RewrapFailed {
                        from,
                        to: latest,
                        error: &e,
                    });
                }
            }
        }
        None
    }

    fn transient(&mut self, msg: String) {
        let now_i = Instant::now();
        let (since_i, since_t) = *self.grace_since.get_or_insert((now_i, SystemTime::now()));
        if !self.gate.has_keys() {
            warn!("{}: poll failed: {msg}", self.backing.display());
            return;
        }
        if now_i.duration_since(since_i) >= self.timing.grace {
            error!(
                "{}: KEK provider unreachable for longer than the grace period ({} s): {msg}; keys wiped",
                self.backing.display(),
                self.timing.grace.as_secs()
            );
            self.emit(Event::Unavailable(&msg));
            self.gate.make_unavailable(msg);
        } else {
            warn!(
                "{}: poll failed (grace period, serving from cache): {msg}",
                self.backing.display()
            );
            if !matches!(self.gate.state(), State::Grace { .. }) {
                self.emit(Event::GraceEntered(&msg));
            }
            self.gate.enter_grace(since_t, msg);
        }
    }

    /// Poll until `stop`.
    pub fn run(mut self, stop: Stop) {
        while !stop.wait(self.timing.poll) {
            self.poll_once();
        }
    }
}

/// Re-exported for the status file.
pub use volume::hex;
