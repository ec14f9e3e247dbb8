//! Open directories: a directory's entries decrypted from its backing directory a step at
//! a time, as the kernel asks for them, and a worker thread that decrypts the next
//! entries and reads their attributes ahead of the kernel's READDIRPLUS requests.
//!
//! Why ahead: a listing is a chain of READDIRPLUS requests, and between two of them the
//! kernel spends about as long building dentries and inodes from a reply as the daemon
//! spends answering (a `fstatat` per entry, name decryption). Those alternate on one CPU,
//! the caller's, since a request is served on its caller's CPU. The worker does the
//! daemon's part for the next entries on another CPU while the kernel does its part, so
//! the next request finds them ready.
//!
//! An attribute read ahead is used only if nothing changed in the volume since it was
//! read (every change through the mount bumps `Lister::changed`) and it is younger than
//! the attribute cache's TTL; otherwise the entry is stat'ed again when it is sent. So a
//! READDIRPLUS reply carries attributes as fresh as an inline `fstatat` would give,
//! except the access time, which a read in between may have moved (reads do not count as
//! changes; the kernel caches access times for the TTL anyway).

use super::nodes::{Node, kind_of, kind_of_dtype};
use super::{Res, TTL, errno, sys};
use crate::format::names::{self, Found};
use crate::monitor::Gate;
use crate::untrusted;
use crate::volume::{NameDecryptor, Volume};
use fuser::{Errno, FileType};
use log::warn;
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Weak};
use std::time::Instant;

/// Entries decrypted (and stat'ed, ahead) per step; the worker lets go of the directory
/// between steps so a request waiting for it gets in.
const STEP: usize = 64;

/// How far ahead of the last entry sent the worker reads (the kernel asks for about 200
/// entries per READDIRPLUS here: two requests' worth).
const LOOKAHEAD: usize = 384;

/// What listing a directory needs from the filesystem, shared with the worker.
pub struct Lister {
    gate: Arc<Gate>,
    root_backing_ino: u64,
    /// Bumped after every change made through the mount (see `changed`).
    changes: AtomicU64,
}

impl Lister {
    pub fn new(gate: Arc<Gate>, root_backing_ino: u64) -> Lister {
        Lister {
            gate,
            root_backing_ino,
            changes: AtomicU64::new(0),
        }
    }

    /// Record that an operation may have changed an entry's attributes or a directory's
    /// entries: call it after the change reached the backing tree (so any attribute read
    /// before it is discarded), whether or not the operation succeeded.
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    fn change(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// The unlocked volume, or the errno of the reason there is none (revoked keys).
    pub fn vol(&self) -> Res<Arc<Volume>> {
        self.gate
            .volume()
            .map_err(|cause| Errno::from_i32(cause.errno()))
    }
}

/// One entry of an open directory.
pub struct DirEntry {
    /// Plaintext name.
    pub name: Vec<u8>,
    /// Inode number (backing inode; 1 for the root).
    pub ino: u64,
    pub kind: FileType,
    /// The backing entry name; empty for "." and "..".
    pub backing: Vec<u8>,
    /// Attributes the worker read ahead, if any.
    ahead: Option<Box<Ahead>>,
}

struct Ahead {
    st: libc::stat,
    /// `Lister::change()` before the `fstatat`, and when it was made.
    change: u64,
    at: Instant,
}

/// An open directory: the entries read so far, in order (offsets are indexes + 1, so they
/// stay valid until a rewind), and where reading goes on.
pub struct OpenDir {
    dir: Arc<Node>,
    id: [u8; 16],
    state: Mutex<DirState>,
}

struct DirState {
    entries: Vec<DirEntry>,
    /// The backing directory, read up to here; `None` once read to the end.
    source: Option<sys::DirReader>,
    /// One past the last entry a READDIRPLUS reply carried.
    served: usize,
    /// Entries before this index have been stat'ed ahead (or did not need it).
    ahead_to: usize,
}

impl OpenDir {
    /// Open directory node `dir` (ino `ino`, id `id`) for listing: "." and ".." now, the
    /// rest as it is asked for.
    pub fn open(dir: Arc<Node>, ino: u64, id: [u8; 16]) -> Res<OpenDir> {
        let source = sys::DirReader::open(dir.raw()).map_err(|e| errno(&e))?;
        let dot = |n: &[u8]| DirEntry {
            name: n.to_vec(),
            ino,
            kind: FileType::Directory,
            backing: Vec::new(),
            ahead: None,
        };
        Ok(OpenDir {
            dir,
            id,
            state: Mutex::new(DirState {
                entries: vec![dot(b"."), dot(b"..")],
                source: Some(source),
                served: 0,
                ahead_to: 2,
            }),
        })
    }

    /// Exclusive access to the entries, for answering one request for entries from
    /// `offset` on. A request for offset 0 after entries went out is a `rewinddir` (or a
    /// seek back to the start): the directory is then read afresh, as POSIX asks, instead
    /// of replaying what was read before.
    pub fn lock<'a>(&'a self, lister: &'a Lister, offset: u64) -> Res<Cursor<'a>> {
        let mut st = self.state.lock();
        if offset == 0 && st.served > 0 {
            st.source = Some(sys::DirReader::open(self.dir.raw()).map_err(|e| errno(&e))?);
            st.entries.truncate(2); // "." and ".."
            st.served = 0;
            st.ahead_to = 2;
        }
        Ok(Cursor {
            dir: self,
            lister,
            st,
            now: Instant::now(),
            change: lister.change(),
        })
    }

    /// Decrypt and stat entries ahead of what the kernel has been sent, up to `LOOKAHEAD`
    /// entries past it, a `STEP` at a time.
    fn read_ahead(&self, lister: &Lister) {
        loop {
            let mut st = self.state.lock();
            let start = st.ahead_to.max(st.served);
            let end = (st.served + LOOKAHEAD).min(start + STEP);
            if start >= end || st.load(lister, self, end).is_err() {
                return;
            }
            let end = end.min(st.entries.len());
            if start >= end {
                return;
            }
            let change = lister.change();
            let at = Instant::now();
            for e in &mut st.entries[start..end] {
                if e.backing.is_empty() || e.ahead.is_some() {
                    continue;
                }
                let Ok(c) = sys::cstr(&e.backing) else {
                    continue;
                };
                if let Ok(s) = sys::fstatat(self.dir.raw(), &c, libc::AT_SYMLINK_NOFOLLOW) {
                    e.ahead = Some(Box::new(Ahead { st: s, change, at }));
                }
            }
            st.ahead_to = end;
            // Hand the directory to a request waiting for it, rather than take it again.
            MutexGuard::unlock_fair(st);
        }
    }
}

impl DirState {
    /// Read and decrypt backing entries until there are `upto` entries or none are left.
    fn load(&mut self, lister: &Lister, od: &OpenDir, upto: usize) -> Res<()> {
        if self.entries.len() >= upto || self.source.is_none() {
            return Ok(());
        }
        // One expanded name cipher for the step, dropped at its end: an open directory
        // keeps no key material between requests.
        let vol = lister.vol()?;
        let mut dec = vol.name_decryptor();
        while self.entries.len() < upto {
            let Some(source) = self.source.as_mut() else {
                break;
            };
            match source.next_entry() {
                Ok(Some((bname, bino, dtype))) => {
                    if let Some(e) = decode(lister, od, &mut dec, bname, bino, dtype)? {
                        self.entries.push(e);
                    }
                }
                Ok(None) => self.source = None,
                Err(e) => return Err(errno(&e)),
            }
        }
        Ok(())
    }
}

/// One request's hold on an open directory.
pub struct Cursor<'a> {
    dir: &'a OpenDir,
    lister: &'a Lister,
    st: MutexGuard<'a, DirState>,
    now: Instant,
    change: u64,
}

impl Cursor<'_> {
    /// Entry `i`, reading and decrypting up to it if need be, with its attributes if
    /// they were read ahead and are still good (see the module comment; taken, so they
    /// are used once); `None` past the end.
    pub fn get(&mut self, i: usize) -> Res<Option<(&DirEntry, Option<libc::stat>)>> {
        if i >= self.st.entries.len() {
            let (lister, dir) = (self.lister, self.dir);
            self.st.load(lister, dir, i + STEP)?;
        }
        let (change, now) = (self.change, self.now);
        Ok(self.st.entries.get_mut(i).map(|e| {
            let ahead = e
                .ahead
                .take()
                .filter(|a| a.change == change && now.saturating_duration_since(a.at) < TTL)
                .map(|a| a.st);
            (&*e, ahead)
        }))
    }

    /// Record that entries before `end` have been sent.
    pub fn served(&mut self, end: usize) {
        self.st.served = end;
    }
}

/// One entry of the backing listing as a plaintext entry; `None` for kekfs's own files
/// and for entries that do not decrypt (logged).
fn decode(
    lister: &Lister,
    od: &OpenDir,
    dec: &mut NameDecryptor,
    bname: Vec<u8>,
    bino: u64,
    dtype: u8,
) -> Res<Option<DirEntry>> {
    let dir = &od.dir;
    let ct = match names::classify(&bname) {
        Found::Short(ct) => ct,
        Found::Long => {
            let side = [bname.as_slice(), names::LONG_SIDECAR_SUFFIX.as_bytes()].concat();
            let read = sys::cstr(&side).and_then(|c| untrusted::read_at(dir.raw(), &c, 4096));
            match read
                .ok()
                .and_then(|s| names::decode_long(&String::from_utf8_lossy(&bname), &s))
            {
                Some(ct) => ct,
                None => {
                    warn!(
                        "{}: long-name entry with a missing or bad sidecar skipped",
                        dir.backing_path()
                    );
                    return Ok(None);
                }
            }
        }
        Found::Internal => return Ok(None),
    };
    let Some(name) = dec.decrypt(&od.id, &ct) else {
        warn!(
            "{}: entry {:?} does not decrypt in this directory; skipped",
            dir.backing_path(),
            String::from_utf8_lossy(&bname)
        );
        return Ok(None);
    };
    let ino = if bino == lister.root_backing_ino {
        1
    } else {
        bino
    };
    let kind = match kind_of_dtype(dtype) {
        Some(k) => k,
        None => {
            let c = sys::cstr(&bname).map_err(|e| errno(&e))?;
            match sys::fstatat(dir.raw(), &c, libc::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => kind_of(st.st_mode),
                Err(_) => return Ok(None),
            }
        }
    };
    Ok(Some(DirEntry {
        name,
        ino,
        kind,
        backing: bname,
        ahead: None,
    }))
}

/// The worker that reads directories ahead (one thread per mount; it ends when the
/// filesystem is dropped).
pub struct ReadAhead {
    tx: Sender<Job>,
}

/// A directory to read ahead in, and the CPU of the request that asked (where the
/// caller, whose kernel work the read-ahead is to overlap, is running).
type Job = (Weak<OpenDir>, Option<usize>);

impl ReadAhead {
    pub fn start(lister: Arc<Lister>) -> std::io::Result<ReadAhead> {
        let (tx, rx) = channel();
        // Made when the filesystem is, which may be before the daemon blocks signals.
        sys::spawn_without_signals("kekfs-readdir", move || run(&lister, rx))?;
        Ok(ReadAhead { tx })
    }

    /// Have the worker read ahead in `dir` (right after answering a request on it).
    pub fn kick(&self, dir: &Arc<OpenDir>) {
        // A closed channel means the worker died; listings still work without it.
        let _ = self.tx.send((Arc::downgrade(dir), sys::current_cpu()));
    }
}

fn run(lister: &Lister, rx: Receiver<Job>) {
    let cpus = sys::affinity().ok();
    let mut avoiding = None;
    for (d, cpu) in rx {
        // Keep off the caller's CPU: there, the worker would only take turns with the
        // caller and the request threads (and a woken worker preempts the thread that
        // woke it), instead of running beside them.
        if let (Some(set), Some(cpu)) = (&cpus, cpu)
            && avoiding != Some(cpu)
        {
            match sys::avoid_cpu(set, cpu) {
                Ok(true) => avoiding = Some(cpu),
                Ok(false) => {}
                Err(e) => log::debug!("readdir worker: cannot set affinity: {e}"),
            }
        }
        if let Some(d) = d.upgrade() {
            d.read_ahead(lister);
        }
    }
}
