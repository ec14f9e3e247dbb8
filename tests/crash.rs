//! Crash consistency: a random workload (writes at random offsets, appends, truncates,
//! creates, unlinks, renames within and across directories, fsyncs, `kekfs rewrap` of the
//! backing directory) runs against an in-memory model while the mount daemon is killed
//! with SIGKILL at a random moment; then the dead mount is detached (`umount -l`), the
//! volume remounted, and every file checked against the model:
//!
//! - a file fsync'd and not modified since reads back exactly (no EIO, no other bytes);
//! - every other file (written since its last fsync, or touched by an operation the crash
//!   interrupted) serves, block by block, either EIO (a torn block) or the content that
//!   block had after one of the writes since the last fsync (zero-filled past the end of
//!   that version, where the file was shorter: a truncate may have extended it, or
//!   write-back written later blocks first): never bytes the file never held;
//! - names: every completed create, rename and unlink is there; interrupted ones either
//!   happened or not (atomic);
//! - the volume header (rewrapped concurrently, the rewrap sometimes killed too) mounts.
//!
//! Rounds alternate the FUSE write-back cache (`cache=writeback`) and `cache=writethrough` (the default). CI runs
//! about 30 seconds; `KEKFS_CRASH_SECS=N` (scripts/crash.sh) runs longer, and
//! `KEKFS_CRASH_SEED=S` replays a run (the seed is printed).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
/// Largest file the workload makes.
const MAX_SIZE: usize = 384 << 10;
/// Most files at once.
const MAX_FILES: usize = 14;
/// Versions kept per file since its last fsync before the workload fsyncs it.
const MAX_VERSIONS: usize = 24;
const DIRS: [&str; 3] = ["", "a", "b"];

/// One file of the model.
struct FileModel {
    /// Path relative to the mountpoint.
    path: String,
    /// Content now (as the workload last saw it succeed).
    current: Vec<u8>,
    /// Content at the last successful fsync (empty for a new file).
    durable: Vec<u8>,
    /// Every content since the last fsync, `durable` first: what a block may hold after a
    /// crash if the file is not clean.
    versions: Vec<Vec<u8>>,
    /// fsync'd and not modified since: must survive exactly.
    clean: bool,
    /// An operation on it was interrupted by the crash: its name is `path` or `alt_path`
    /// (None: possibly gone), its content any version.
    uncertain: bool,
    alt_path: Option<Option<String>>,
    fd: Option<File>,
    /// What was done to it since its last fsync (for failure reports).
    log: Vec<String>,
}

impl FileModel {
    fn new(path: String) -> Self {
        FileModel {
            path,
            current: Vec::new(),
            durable: Vec::new(),
            versions: vec![Vec::new()],
            clean: false,
            uncertain: false,
            alt_path: None,
            fd: None,
            log: Vec::new(),
        }
    }

    fn changed(&mut self, what: String) {
        self.clean = false;
        self.versions.push(self.current.clone());
        self.log.push(what);
    }

    fn synced(&mut self) {
        self.durable = self.current.clone();
        self.versions = vec![self.current.clone()];
        self.clean = true;
        self.log.clear();
    }
}

#[derive(Default)]
struct Stats {
    rounds: u64,
    ops: u64,
    fsyncs: u64,
    rewraps_started: u64,
    rewraps_killed: u64,
    checked_clean: u64,
    checked_dirty: u64,
    torn_blocks: u64,
    interrupted: u64,
}

struct Harness {
    env: Env,
    rng: Rng,
    files: BTreeMap<u64, FileModel>,
    next_id: u64,
    stats: Stats,
    rewrap: Option<Child>,
    rewrap_pid: Arc<AtomicI32>,
    /// Cache mode of the round that just crashed (for failure reports).
    last_mode: String,
}

fn fill(rng: &mut Rng, n: usize) -> Vec<u8> {
    let seed = rng.next();
    (0..n)
        .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9).wrapping_add(seed) >> 13) as u8)
        .collect()
}

impl Harness {
    fn p(&self, rel: &str) -> PathBuf {
        self.env.mnt.join(rel)
    }

    /// An operation failed: fine (outcome unknown) once the daemon is being killed;
    /// otherwise a bug.
    #[track_caller]
    fn failed(&self, crashed: &AtomicBool, what: &str, e: &io::Error) {
        if !crashed.load(Ordering::SeqCst) {
            panic!(
                "{what} failed while the daemon was alive: {e}\ndaemon log:\n{}",
                self.env.daemon_log()
            );
        }
    }

    fn pick_file(&mut self) -> Option<u64> {
        if self.files.is_empty() {
            return None;
        }
        let i = self.rng.below(self.files.len() as u64) as usize;
        self.files.keys().nth(i).copied()
    }

    fn fd(&mut self, id: u64) -> io::Result<&File> {
        let path = self.p(&self.files[&id].path);
        let f = self.files.get_mut(&id).unwrap();
        if f.fd.is_none() {
            f.fd = Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)?,
            );
        }
        Ok(f.fd.as_ref().unwrap())
    }

    fn fresh_name(&mut self) -> String {
        let dir = DIRS[self.rng.below(DIRS.len() as u64) as usize];
        let n = self.next_id;
        self.next_id += 1;
        // Some names long enough for the hashed long-name form (entry plus sidecar).
        let name = if self.rng.chance(20) {
            format!("f{n}-{}", "L".repeat(200))
        } else {
            format!("f{n}")
        };
        if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        }
    }

    /// One random operation. Returns false once an operation failed after the kill.
    fn step(&mut self, crashed: &AtomicBool) -> bool {
        self.stats.ops += 1;
        self.reap_rewrap(crashed);
        let roll = self.rng.below(100);
        let Some(mut id) = self.pick_file().filter(|_| roll >= 8) else {
            return self.create(crashed);
        };
        // Data changes mostly go to files already dirty, so that files fsync'd earlier
        // often stay untouched until the crash (the ones that must survive exactly).
        if (8..=52).contains(&roll) && self.rng.chance(75) {
            let dirty: Vec<u64> = self
                .files
                .iter()
                .filter(|(_, f)| !f.clean)
                .map(|(&k, _)| k)
                .collect();
            if !dirty.is_empty() {
                id = dirty[self.rng.below(dirty.len() as u64) as usize];
            }
        }
        match roll {
            8..=34 => self.write(id, crashed, false),
            35..=44 => self.write(id, crashed, true),
            45..=52 => self.truncate(id, crashed),
            53..=66 => self.fsync(id, crashed),
            67..=71 => self.unlink(id, crashed),
            72..=80 => self.rename(id, crashed),
            81..=84 => {
                self.files.get_mut(&id).unwrap().fd = None;
                true
            }
            85..=96 => self.verify_live(id, crashed),
            _ => {
                self.start_rewrap();
                true
            }
        }
    }

    fn create(&mut self, crashed: &AtomicBool) -> bool {
        if self.files.len() >= MAX_FILES {
            return true;
        }
        let path = self.fresh_name();
        let id = self.next_id;
        self.next_id += 1;
        let r = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.p(&path));
        let mut f = FileModel::new(path);
        match r {
            Ok(fd) => {
                f.fd = Some(fd);
                self.files.insert(id, f);
                true
            }
            Err(e) => {
                self.failed(crashed, "create", &e);
                f.uncertain = true;
                f.alt_path = Some(None);
                self.files.insert(id, f);
                false
            }
        }
    }

    fn write(&mut self, id: u64, crashed: &AtomicBool, append: bool) -> bool {
        let len = self.files[&id].current.len();
        let off = if append {
            len
        } else {
            self.rng.below(len as u64 + 2 * BLOCK as u64) as usize
        };
        let n = match self.rng.below(4) {
            0 => 1 + self.rng.below(100) as usize,
            1 => BLOCK * (1 + self.rng.below(4) as usize),
            2 => 1 + self.rng.below(3 * BLOCK as u64) as usize,
            _ => 1 + self.rng.below(96 << 10) as usize,
        };
        let off = if self.rng.chance(30) {
            off / BLOCK * BLOCK
        } else {
            off
        };
        let n = n.min(MAX_SIZE.saturating_sub(off));
        if n == 0 {
            return true;
        }
        let data = fill(&mut self.rng, n);
        let r = self.fd(id).and_then(|f| f.write_all_at(&data, off as u64));
        let f = self.files.get_mut(&id).unwrap();
        if f.current.len() < off + n {
            f.current.resize(off + n, 0);
        }
        f.current[off..off + n].copy_from_slice(&data);
        f.changed(format!("write({off}, {n})"));
        if let Err(e) = r {
            self.failed(crashed, "write", &e);
            self.files.get_mut(&id).unwrap().uncertain = true;
            return false;
        }
        if self.files[&id].versions.len() > MAX_VERSIONS {
            return self.fsync(id, crashed);
        }
        true
    }

    fn truncate(&mut self, id: u64, crashed: &AtomicBool) -> bool {
        let len = self.files[&id].current.len();
        let new = match self.rng.below(4) {
            0 => 0,
            1 => self.rng.below(len as u64 + 1) as usize,
            2 => self.rng.below(len as u64 + 1) as usize / BLOCK * BLOCK,
            _ => (len + self.rng.below(3 * BLOCK as u64) as usize).min(MAX_SIZE),
        };
        let r = self.fd(id).and_then(|f| f.set_len(new as u64));
        let f = self.files.get_mut(&id).unwrap();
        f.current.resize(new, 0);
        f.changed(format!("truncate({new})"));
        if let Err(e) = r {
            self.failed(crashed, "truncate", &e);
            self.files.get_mut(&id).unwrap().uncertain = true;
            return false;
        }
        true
    }

    fn fsync(&mut self, id: u64, crashed: &AtomicBool) -> bool {
        let data = self.rng.chance(30);
        let r = self
            .fd(id)
            .and_then(|f| if data { f.sync_data() } else { f.sync_all() });
        match r {
            Ok(()) => {
                self.stats.fsyncs += 1;
                self.files.get_mut(&id).unwrap().synced();
                true
            }
            Err(e) => {
                self.failed(crashed, "fsync", &e);
                false
            }
        }
    }

    fn unlink(&mut self, id: u64, crashed: &AtomicBool) -> bool {
        let path = self.files[&id].path.clone();
        self.files.get_mut(&id).unwrap().fd = None;
        match std::fs::remove_file(self.p(&path)) {
            Ok(()) => {
                self.files.remove(&id);
                true
            }
            Err(e) => {
                self.failed(crashed, "unlink", &e);
                let f = self.files.get_mut(&id).unwrap();
                f.uncertain = true;
                f.alt_path = Some(None);
                false
            }
        }
    }

    fn rename(&mut self, id: u64, crashed: &AtomicBool) -> bool {
        let from = self.files[&id].path.clone();
        // Sometimes over another file (which is then replaced), else to a fresh name.
        let target = self
            .pick_file()
            .filter(|&t| t != id && self.rng.chance(35) && !self.files[&t].uncertain);
        let to = match target {
            Some(t) => self.files[&t].path.clone(),
            None => self.fresh_name(),
        };
        match std::fs::rename(self.p(&from), self.p(&to)) {
            Ok(()) => {
                if let Some(t) = target {
                    self.files.remove(&t);
                }
                self.files.get_mut(&id).unwrap().path = to;
                true
            }
            Err(e) => {
                self.failed(crashed, "rename", &e);
                if let Some(t) = target {
                    // Replaced or not.
                    let tf = self.files.get_mut(&t).unwrap();
                    tf.uncertain = true;
                    tf.alt_path = Some(None);
                }
                let f = self.files.get_mut(&id).unwrap();
                f.uncertain = true;
                f.alt_path = Some(Some(to));
                false
            }
        }
    }

    /// While the daemon lives, reads return exactly the model's current content.
    fn verify_live(&mut self, id: u64, crashed: &AtomicBool) -> bool {
        let len = self.files[&id].current.len();
        let off = self.rng.below(len as u64 + 1) as usize;
        let n = (1 + self.rng.below(64 << 10) as usize).min(len - off);
        let mut buf = vec![0u8; n];
        match self
            .fd(id)
            .and_then(|f| f.read_exact_at(&mut buf, off as u64))
        {
            Ok(()) => {
                let f = &self.files[&id];
                assert!(
                    buf == f.current[off..off + n],
                    "{}: read({off}, {n}) while mounted differs from what was written",
                    f.path
                );
                true
            }
            Err(e) => {
                self.failed(crashed, "read", &e);
                false
            }
        }
    }

    fn start_rewrap(&mut self) {
        if self.rewrap.is_some() {
            return;
        }
        let child = self
            .env
            .kekfs()
            .args(["rewrap", self.env.backing.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kekfs rewrap");
        self.rewrap_pid.store(child.id() as i32, Ordering::SeqCst);
        self.rewrap = Some(child);
        self.stats.rewraps_started += 1;
    }

    /// A finished rewrap must have succeeded, unless it was killed.
    fn reap_rewrap(&mut self, _crashed: &AtomicBool) {
        let Some(c) = self.rewrap.as_mut() else {
            return;
        };
        if let Ok(Some(st)) = c.try_wait() {
            let c = self.rewrap.take().unwrap();
            self.rewrap_pid.store(0, Ordering::SeqCst);
            let out = c.wait_with_output().unwrap();
            if st.code().is_none() {
                self.stats.rewraps_killed += 1;
            } else {
                assert!(
                    st.success(),
                    "kekfs rewrap failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// After the crash and the remount: check every file against the model, then drop
    /// what is not clean (so each round starts from known content).
    fn check_after_crash(&mut self, m: &Mounted) {
        let ids: Vec<u64> = self.files.keys().copied().collect();
        for id in ids {
            let f = &self.files[&id];
            let mut where_: Vec<Option<String>> = vec![Some(f.path.clone())];
            if let Some(alt) = &f.alt_path {
                where_.push(alt.clone());
            }
            let found: Vec<String> = where_
                .iter()
                .flatten()
                .filter(|p| std::fs::symlink_metadata(m.p(p)).is_ok())
                .cloned()
                .collect();
            if f.clean && !f.uncertain {
                self.stats.checked_clean += 1;
                assert_eq!(
                    found,
                    std::slice::from_ref(&f.path),
                    "clean file {} is missing",
                    f.path
                );
                let got = std::fs::read(m.p(&f.path)).unwrap_or_else(|e| {
                    panic!(
                        "fsync'd file {} is unreadable after the crash: {e}\ndaemon log:\n{}",
                        f.path,
                        self.env.daemon_log()
                    )
                });
                assert!(
                    got == f.durable,
                    "fsync'd file {}: {} bytes read, {} fsync'd, content differs",
                    f.path,
                    got.len(),
                    f.durable.len()
                );
                continue;
            }
            self.stats.checked_dirty += 1;
            // Only an interrupted create, unlink or rename may have made it disappear.
            assert!(
                !found.is_empty() || where_.contains(&None) || where_.len() > 1,
                "{} is gone although no unlink or rename of it was interrupted",
                f.path
            );
            for p in &found {
                // Whoever may be at `p` now: this file, or the other side of an interrupted
                // rename over it.
                let cands: Vec<&FileModel> = self
                    .files
                    .values()
                    .filter(|c| {
                        (!c.clean || c.uncertain)
                            && (c.path == *p || matches!(&c.alt_path, Some(Some(a)) if a == p))
                    })
                    .collect();
                let results: Vec<Result<u64, String>> = cands
                    .iter()
                    .map(|c| check_versions(&m.p(p), c, &self.last_mode))
                    .collect();
                match results.iter().find_map(|r| r.as_ref().ok()) {
                    Some(torn) => self.stats.torn_blocks += torn,
                    None => panic!(
                        "{p} after the crash: {}\ndaemon log:\n{}",
                        results
                            .into_iter()
                            .filter_map(Result::err)
                            .collect::<Vec<_>>()
                            .join("\n"),
                        self.env.daemon_log()
                    ),
                }
            }
        }
        // Every file whose name is certain is listed (long names need their sidecar for
        // that), and no entry the model does not know (interrupted creates and renames
        // are known).
        let mut listed = Vec::new();
        for dir in DIRS {
            for e in std::fs::read_dir(m.p(dir)).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                if e.file_type().unwrap().is_dir() {
                    assert!(
                        dir.is_empty() && DIRS.contains(&name.as_str()),
                        "dir {name}"
                    );
                    continue;
                }
                let rel = if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                let known = self
                    .files
                    .values()
                    .any(|f| f.path == rel || matches!(&f.alt_path, Some(Some(a)) if *a == rel));
                assert!(known, "unexpected entry {rel} after the crash");
                listed.push(rel);
            }
        }
        for f in self.files.values().filter(|f| !f.uncertain) {
            assert!(
                listed.contains(&f.path),
                "{} is missing from its directory listing\ndaemon log:\n{}",
                f.path,
                self.env.daemon_log()
            );
        }
        // Start the next round from clean files only.
        let dirty: Vec<u64> = self
            .files
            .iter()
            .filter(|(_, f)| !f.clean || f.uncertain)
            .map(|(&id, _)| id)
            .collect();
        for id in dirty {
            let f = self.files.remove(&id).unwrap();
            for p in std::iter::once(Some(f.path.clone()))
                .chain(f.alt_path.clone())
                .flatten()
            {
                let _ = std::fs::remove_file(m.p(&p));
            }
        }
        for f in self.files.values_mut() {
            f.fd = None;
            f.current = f.durable.clone();
            f.versions = vec![f.durable.clone()];
        }
    }
}

/// A file that was not clean at the crash: each block is EIO or the block of some version
/// since the last fsync (zero-filled past that version's end, where it ended inside or
/// before the block). Returns the number of EIO blocks.
fn check_versions(path: &Path, f: &FileModel, mode: &str) -> Result<u64, String> {
    let file = match File::open(path) {
        Ok(file) => file,
        // A create interrupted before its header was complete.
        Err(e) if f.uncertain && e.raw_os_error() == Some(libc::EIO) => return Ok(1),
        Err(e) => return Err(format!("{}: open after the crash: {e}", f.path)),
    };
    let size = file.metadata().unwrap().len() as usize;
    let longest = f.versions.iter().map(Vec::len).max().unwrap_or(0);
    if size > longest.max(f.durable.len()) {
        return Err(format!(
            "{}: size {size} after the crash, larger than any version ({longest})",
            f.path
        ));
    }
    let mut torn = 0;
    for off in (0..size).step_by(BLOCK) {
        let n = BLOCK.min(size - off);
        let mut buf = vec![0u8; n];
        match file.read_exact_at(&mut buf, off as u64) {
            Ok(()) => {
                let from_version = f
                    .versions
                    .iter()
                    .any(|v| v.len() >= off + n && v[off..off + n] == buf[..]);
                // Where some version ended before this block's end (the file was shorter),
                // the rest may be zeros: the file was extended (by a truncate, or because a
                // later block was written back first) before this block's data arrived.
                let hole = f.versions.iter().any(|v| {
                    v.len() < off + n
                        && buf.iter().enumerate().all(|(i, &b)| match v.get(off + i) {
                            Some(&x) => b == x,
                            None => b == 0,
                        })
                });
                if !(from_version || hole) {
                    let zero = buf.iter().all(|&b| b == 0);
                    let elsewhere: Vec<(usize, usize)> = f
                        .versions
                        .iter()
                        .enumerate()
                        .flat_map(|(k, v)| {
                            v.windows(64)
                                .enumerate()
                                .filter(|(_, w)| *w == &buf[..64.min(n)])
                                .map(move |(o, _)| (k, o))
                        })
                        .take(5)
                        .collect();
                    let agree: Vec<usize> = f
                        .versions
                        .iter()
                        .map(|v| (0..n).filter(|&i| v.get(off + i) == Some(&buf[i])).count())
                        .collect();
                    let last = f.versions.last().unwrap();
                    let diff: Vec<(usize, u8, Option<&u8>)> = (0..n)
                        .filter(|&i| last.get(off + i) != Some(&buf[i]))
                        .map(|i| (off + i, buf[i], last.get(off + i)))
                        .take(8)
                        .collect();
                    return Err(format!(
                        "{}: block at {off} ({n} bytes, file size {size}, {mode} round) holds \
                         bytes no write put there: all zero {zero}, durable size {}, version sizes {:?}, \
                         bytes agreeing per version {agree:?}, first 64 bytes found at \
                         (version, offset) {elsewhere:?}; first differences from the last \
                         version (offset, read, model) {diff:?}; operations since the last \
                         fsync: {:?}",
                        f.path,
                        f.durable.len(),
                        f.versions.iter().map(Vec::len).collect::<Vec<_>>(),
                        f.log
                    ));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => torn += 1,
            Err(e) => return Err(format!("{}: block at {off}: {e}", f.path)),
        }
    }
    Ok(torn)
}

fn run(secs: u64, seed: u64) -> Stats {
    let env = Env::new("crash_consistency").expect("checked by the caller");
    env.init_volume();
    {
        let m = env.mount();
        for d in &DIRS[1..] {
            std::fs::create_dir(m.p(d)).unwrap();
        }
        m.unmount();
    }
    let mut h = Harness {
        env,
        rng: Rng(seed | 1),
        files: BTreeMap::new(),
        next_id: 0,
        stats: Stats::default(),
        rewrap: None,
        rewrap_pid: Arc::new(AtomicI32::new(0)),
        last_mode: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut round = 0u64;
    while round < 4 || Instant::now() < deadline {
        let opts: &[&str] = if round.is_multiple_of(2) {
            &["cache=writeback"]
        } else {
            &["cache=writethrough"]
        };
        let m = h.env.mount_with(opts);
        h.check_after_crash(&m);
        let pid = m.pid();
        let crashed = Arc::new(AtomicBool::new(false));
        let delay = Duration::from_millis(20 + h.rng.below(350));
        let kill_rewrap = h.rng.chance(50);
        let killer = {
            let crashed = crashed.clone();
            let rewrap_pid = h.rewrap_pid.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                crashed.store(true, Ordering::SeqCst);
                // SAFETY: signalling the daemon (and our own rewrap child) by pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let rp = rewrap_pid.load(Ordering::SeqCst);
                if kill_rewrap && rp > 0 {
                    // SAFETY: as above.
                    unsafe { libc::kill(rp, libc::SIGKILL) };
                }
            })
        };
        // Work until an operation fails after the kill (or, if the kill lands between
        // operations, a few operations later).
        let mut after_kill = 0;
        while h.step(&crashed) {
            if crashed.load(Ordering::SeqCst) {
                after_kill += 1;
                if after_kill > 50 {
                    break;
                }
            }
        }
        killer.join().unwrap();
        h.stats.interrupted += h.files.values().filter(|f| f.uncertain).count() as u64;
        for f in h.files.values_mut() {
            f.fd = None;
        }
        assert!(
            wait_for(Duration::from_secs(10), || lock_is_free(&h.env.backing)),
            "the killed daemon still holds the volume"
        );
        force_unmount(&h.env.mnt);
        assert!(
            wait_for(Duration::from_secs(10), || !is_mounted(&h.env.mnt)),
            "the dead mount is still listed"
        );
        drop(m);
        if let Some(mut c) = h.rewrap.take() {
            let st = c.wait().unwrap();
            h.rewrap_pid.store(0, Ordering::SeqCst);
            if st.code().is_none() {
                h.stats.rewraps_killed += 1;
            } else {
                let mut err = String::new();
                use std::io::Read;
                let _ = c.stderr.take().unwrap().read_to_string(&mut err);
                assert!(st.success(), "kekfs rewrap failed: {err}");
            }
        }
        h.last_mode = if opts == ["cache=writeback"] {
            "write-back".into()
        } else {
            "write-through".into()
        };
        round += 1;
        h.stats.rounds = round;
    }
    // A last, clean mount: everything clean is there, and the volume unmounts cleanly.
    let m = h.env.mount();
    h.check_after_crash(&m);
    m.unmount();
    h.stats
}

#[test]
fn crash_consistency() {
    if Env::new("crash_consistency").is_none() {
        return;
    }
    let secs = std::env::var("KEKFS_CRASH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed = std::env::var("KEKFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash_consistency: seed {seed} (KEKFS_CRASH_SEED={seed} replays it), {secs} s");
    let s = run(secs, seed);
    eprintln!(
        "crash_consistency: {} rounds, {} operations, {} fsyncs, {} rewraps ({} killed), \
         {} clean and {} dirty files checked, {} torn blocks (EIO), {} interrupted operations",
        s.rounds,
        s.ops,
        s.fsyncs,
        s.rewraps_started,
        s.rewraps_killed,
        s.checked_clean,
        s.checked_dirty,
        s.torn_blocks,
        s.interrupted
    );
    assert!(
        s.rounds >= 4 && s.fsyncs > 0 && s.checked_clean > 0,
        "too little was tested"
    );
}
