//! Appending lines to one log directory: under an exclusive lock, continue the chain from the
//! last line on disk (whoever wrote it), seal the line and append it with one write, fsync;
//! start a new file when the current one would exceed the size limit (the chain continues).

use super::chain::{self, GENESIS, LogKey};
use super::reader;
use super::record::Line;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Lock file serialising writers of one log directory.
pub const LOCK_FILE: &str = "audit.lock";
/// Default size at which a new log file is started (16 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// Longest `message` kept (bytes); longer ones are cut at a character boundary.
pub const MAX_MESSAGE: usize = 2048;

/// Where the chain stands: the last line on disk.
#[derive(Debug, Clone)]
struct Tail {
    /// The file it is in and that file's identity and length when last seen.
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    /// Its sequence number and mac.
    seq: u64,
    mac: String,
}

#[derive(Default)]
struct State {
    key: Option<LogKey>,
    tail: Option<Tail>,
}

/// Appends to the log in one directory. Several processes may write the same directory;
/// each append takes the directory's lock and re-reads the tail if someone else wrote.
pub struct LogWriter {
    dir: PathBuf,
    max_bytes: u64,
    /// Create only the log directory itself, never its parent (a keystore's log must not
    /// bring back a keystore directory that was moved or deleted).
    parent_must_exist: bool,
    state: Mutex<State>,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogWriter({})", self.dir.display())
    }
}

fn ctx(what: String) -> impl FnOnce(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl LogWriter {
    /// A writer for the log in `dir` (created on first append), starting a new file when the
    /// current one would grow beyond `max_bytes`.
    pub fn new(dir: &Path, max_bytes: u64) -> LogWriter {
        LogWriter {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1024),
            parent_must_exist: false,
            state: Mutex::new(State::default()),
        }
    }

    /// The same, but never creating the log directory's parent.
    pub fn inside_existing(dir: &Path, max_bytes: u64) -> LogWriter {
        LogWriter {
            parent_must_exist: true,
            ..LogWriter::new(dir, max_bytes)
        }
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::io::Result<File> {
        let made = if self.parent_must_exist {
            match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && self.dir.is_dir() => {
                    Ok(())
                }
                other => other,
            }
        } else {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
        };
        made.map_err(ctx(format!(
            "creating audit log directory {}",
            self.dir.display()
        )))?;
        let path = self.dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(ctx(format!("opening {}", path.display())))?;
        // SAFETY: flock on a valid descriptor; released when `f` is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ctx(format!("locking {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(f)
    }

    /// Check that a line could be appended now (directory, lock, key and current file are
    /// writable), without writing one.
    pub fn probe(&self) -> std::io::Result<()> {
        let _lock = self.lock()?;
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.key.is_none() {
            st.key = Some(chain::load_or_create_key(&self.dir)?);
        }
        if let Some(active) = reader::log_files(&self.dir)?.pop() {
            open_append(&active.path)?;
        } else {
            // A brand-new log: the directory must take a file.
            let t = tempfile::Builder::new()
                .prefix("audit.probe.")
                .tempfile_in(&self.dir)
                .map_err(ctx(format!("writing in {}", self.dir.display())))?;
            drop(t);
        }
        Ok(())
    }

    /// Append `line`: its `seq` and `prev` are set here to continue the chain. Returns the
    /// line's mac.
    pub fn append(&self, line: &mut Line) -> std::io::Result<String> {
        let _lock = self.lock()?;
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.key.is_none() {
            st.key = Some(chain::load_or_create_key(&self.dir)?);
        }
        let files = reader::log_files(&self.dir)?;
        let tail = match (files.last(), st.tail.take()) {
            (Some(active), Some(t)) if t.path == active.path && same_file(&t) => t,
            _ => self.find_tail(&files)?,
        };
        if line.message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !line.message.is_char_boundary(cut) {
                cut -= 1;
            }
            line.message.truncate(cut);
            line.message.push('…');
        }
        line.seq = tail.seq + 1;
        line.prev = tail.mac.clone();
        let json = serde_json::to_string(line)
            .map_err(|e| std::io::Error::other(format!("serializing an audit line: {e}")))?;
        let body = json.strip_suffix('}').unwrap_or(&json);
        let Some(key) = st.key.as_ref() else {
            return Err(std::io::Error::other("audit log key not loaded"));
        };
        let (sealed, mac) = chain::seal(key, body);
        let mut bytes = sealed.into_bytes();
        bytes.push(b'\n');
        // A new file when this one is full; the first line of each file is named in its
        // file name, so a cut head is detected.
        let active = files.last().map(|lf| lf.path.clone());
        let active_len = active
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        let path = match active {
            Some(p) if tail.seq > 0 && active_len + bytes.len() as u64 <= self.max_bytes => p,
            _ => self.dir.join(reader::file_name_for(line.seq)),
        };
        let new_file = !files.iter().any(|lf| lf.path == path);
        let mut f = open_append(&path)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_data())
            .map_err(ctx(format!("appending to {}", path.display())))?;
        if new_file {
            // A new file: make its directory entry durable too.
            File::open(&self.dir).and_then(|d| d.sync_all())?;
        }
        let md = f.metadata()?;
        st.tail = Some(Tail {
            path,
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            seq: line.seq,
            mac: mac.clone(),
        });
        Ok(mac)
    }

    /// Read the last line on disk: the newest file's last valid line. A file left without a
    /// final newline (a writer died mid-line) gets one, so the torn line stays a line of its
    /// own that `audit check` reports. An empty newest file is skipped.
    fn find_tail(&self, files: &[reader::LogFile]) -> std::io::Result<Tail> {
        for lf in files.iter().rev() {
            let mut f = open_append(&lf.path)?;
            let len = f.metadata()?.len();
            if len == 0 {
                continue;
            }
            let window = len.min(1 << 20);
            let mut buf = vec![0u8; window as usize];
            f.seek(SeekFrom::Start(len - window))?;
            f.read_exact(&mut buf)?;
            if buf.last() != Some(&b'\n') {
                f.write_all(b"\n")?;
                f.sync_data()?;
            }
            let last = buf
                .split(|&b| b == b'\n')
                .rev()
                .filter_map(|l| std::str::from_utf8(l).ok())
                .find_map(|l| {
                    let (_, mac) = chain::split(l)?;
                    let seq = reader::seq_of(l)?;
                    Some((seq, mac.to_string()))
                });
            let md = f.metadata()?;
            if let Some((seq, mac)) = last {
                return Ok(Tail {
                    path: lf.path.clone(),
                    dev: md.dev(),
                    ino: md.ino(),
                    len: md.len(),
                    seq,
                    mac,
                });
            }
            // No valid line at the end of this file (garbage): `check` reports it; go on
            // from the file before, so the sequence stays monotonic.
        }
        Ok(Tail {
            path: PathBuf::new(),
            dev: 0,
            ino: 0,
            len: 0,
            seq: 0,
            mac: GENESIS.to_string(),
        })
    }
}

fn same_file(t: &Tail) -> bool {
    std::fs::metadata(&t.path)
        .is_ok_and(|m| m.dev() == t.dev && m.ino() == t.ino && m.len() == t.len)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(ctx(format!("opening {}", path.display())))
}

/// A sample line for unit tests of this module and its neighbours.
#[cfg(test)]
pub(crate) fn tests_line(op: &str) -> Line {
    tests::line(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Caller, Line};

    pub(crate) fn line(op: &str) -> Line {
        Line {
            time: "2027-01-01T00:00:00.000Z".into(),
            seq: 0,
            task_name: "T".into(),
            activity_id: "a".into(),
            event_id: "e".into(),
            category: "info".into(),
            resource_id: String::new(),
            key_vault: "soft:/ks".into(),
            key: "k".into(),
            version: "1".into(),
            operation: op.into(),
            code: "200".into(),
            message: String::new(),
            caller: Caller {
                uid: 0,
                pid: 1,
                program: "kekfs".into(),
                command: String::new(),
            },
            duration_ms: 0.0,
            count: 1,
            prev: String::new(),
        }
    }

    #[test]
    fn chain_continues_across_writers_and_files() {
        let d = tempfile::tempdir().unwrap();
        let w1 = LogWriter::new(d.path(), 1024);
        let w2 = LogWriter::new(d.path(), 1024);
        for i in 0..20 {
            let w = if i % 3 == 0 { &w1 } else { &w2 };
            w.append(&mut line("unwrapKey")).unwrap();
        }
        let files = reader::log_files(d.path()).unwrap();
        assert!(files.len() > 2, "{files:?}");
        let key = chain::load_key(&d.path().join(chain::KEY_FILE)).unwrap();
        let r = reader::check(&files, &key);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert_eq!(r.lines, 20);
        assert_eq!(r.last_seq, 20);
    }

    #[test]
    fn torn_last_line_is_kept_and_chain_goes_on() {
        let d = tempfile::tempdir().unwrap();
        let w = LogWriter::new(d.path(), 1 << 20);
        w.append(&mut line("a")).unwrap();
        let f = reader::log_files(d.path()).unwrap().pop().unwrap().path;
        let mut h = OpenOptions::new().append(true).open(&f).unwrap();
        h.write_all(b"{\"time\":\"torn").unwrap();
        let w2 = LogWriter::new(d.path(), 1 << 20);
        w2.append(&mut line("b")).unwrap();
        let key = chain::load_key(&d.path().join(chain::KEY_FILE)).unwrap();
        let r = reader::check(&reader::log_files(d.path()).unwrap(), &key);
        assert_eq!(r.findings.len(), 1, "{:?}", r.findings);
        assert_eq!(r.findings[0].line, 2);
        assert_eq!(r.last_seq, 2);
    }

    #[test]
    fn a_keystore_log_never_recreates_its_keystore() {
        let d = tempfile::tempdir().unwrap();
        let ks = d.path().join("keystore");
        let w = LogWriter::inside_existing(&ks.join("audit"), 1 << 20);
        assert!(w.append(&mut line("a")).is_err());
        assert!(!ks.exists());
        std::fs::create_dir(&ks).unwrap();
        w.append(&mut line("a")).unwrap();
        w.append(&mut line("b")).unwrap();
    }

    #[test]
    fn long_messages_are_cut() {
        let d = tempfile::tempdir().unwrap();
        let w = LogWriter::new(d.path(), 1 << 20);
        let mut l = line("a");
        l.message = "é".repeat(5000);
        w.append(&mut l).unwrap();
        assert!(l.message.len() <= MAX_MESSAGE + 3);
        w.probe().unwrap();
    }
}
