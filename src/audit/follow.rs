//! Following a log (seed 003's pipeline, without its timestamp sync point): a checkpoint
//! holds the last line delivered (sequence number and mac), so a restarted follower goes on
//! exactly after it, across file changes, and notices if the log was cut or rewritten
//! behind it; every new line is checked against the chain and the caller allow-list.

use super::chain::{self, LogKey};
use super::reader::{self, LineReader, LogFile, RawLine};
use super::record::{Caller, Line};
use serde::{Deserialize, Serialize};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Where a follower stands: the last line it delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The log directory followed.
    pub log: PathBuf,
    /// Sequence number of the last line delivered (0: none yet).
    pub seq: u64,
    /// Its mac (the next line's `prev`).
    pub mac: String,
}

/// Read a checkpoint file; `Ok(None)` if it does not exist.
pub fn load_checkpoint(path: &Path) -> Result<Option<Checkpoint>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading checkpoint {}: {e}", path.display())),
    };
    let cp: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "checkpoint {} is not a kekfs audit checkpoint ({e}); delete it to start from \
             the beginning of the log",
            path.display()
        )
    })?;
    if !chain::is_mac(&cp.mac) {
        return Err(format!(
            "checkpoint {} holds a malformed mac; delete it to start over",
            path.display()
        ));
    }
    Ok(Some(cp))
}

/// Write a checkpoint atomically (temporary file, fsync, rename).
pub fn save_checkpoint(path: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other("checkpoint path has no file name"))?;
    let bytes = serde_json::to_vec(cp).map_err(std::io::Error::other)?;
    crate::volume::write_atomic(dir, name, &bytes, 0o600)
}

/// One entry of an allow-list: a uid, a name (program or kekfs command), or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// Any caller with this uid.
    Uid(u32),
    /// Any caller whose program or kekfs command (`mount`, `key disable`) is this.
    Name(String),
    /// Both must match (`UID:NAME`).
    Both(u32, String),
}

impl std::str::FromStr for Allow {
    type Err = String;
    fn from_str(s: &str) -> Result<Allow, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an allowed caller must not be empty".into());
        }
        if let Some((u, n)) = s.split_once(':')
            && let Ok(uid) = u.parse()
            && !n.is_empty()
        {
            return Ok(Allow::Both(uid, n.to_string()));
        }
        Ok(match s.parse() {
            Ok(uid) => Allow::Uid(uid),
            Err(_) => Allow::Name(s.to_string()),
        })
    }
}

impl Allow {
    fn name_matches(n: &str, c: &Caller) -> bool {
        c.program == n || c.command == n
    }

    /// Does this entry allow `c`?
    pub fn allows(&self, c: &Caller) -> bool {
        match self {
            Allow::Uid(u) => c.uid == *u,
            Allow::Name(n) => Self::name_matches(n, c),
            Allow::Both(u, n) => c.uid == *u && Self::name_matches(n, c),
        }
    }
}

/// An alert raised while following.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// `unexpected-caller` or `integrity`.
    #[serde(rename = "kekfsAlert")]
    pub kind: &'static str,
    /// The line's sequence number, if known.
    pub seq: Option<u64>,
    /// When (the line's time), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The caller, for unexpected-caller alerts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<Caller>,
    /// The operation and key, for unexpected-caller alerts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// The key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl Alert {
    fn integrity(seq: Option<u64>, message: String) -> Alert {
        Alert {
            kind: "integrity",
            seq,
            time: None,
            caller: None,
            operation: None,
            key: None,
            message,
        }
    }
}

/// What the follower hands out.
#[derive(Debug)]
pub enum Item {
    /// A new line: its text as stored and its parsed form (if it parses).
    Line(String, Option<Box<Line>>),
    /// An alert about the line just handed out (or about the log).
    Alert(Alert),
}

/// Reads a log from a checkpoint on.
pub struct Follower {
    dir: PathBuf,
    key: Option<LogKey>,
    allow: Vec<Allow>,
    /// Current file and byte offset / line number in it of the next line.
    file: Option<LogFile>,
    offset: u64,
    lineno: u64,
    last_seq: u64,
    last_mac: String,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("dir", &self.dir)
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// A follower of the log in `dir`, starting after `from` (from the beginning if
    /// `None`). `key` verifies macs when given (else only the chain links are checked).
    /// Problems found while positioning (the log was cut or rewritten behind the checkpoint)
    /// are returned as alerts.
    pub fn open(
        dir: &Path,
        key: Option<LogKey>,
        allow: Vec<Allow>,
        from: Option<&Checkpoint>,
    ) -> std::io::Result<(Follower, Vec<Alert>)> {
        let mut f = Follower {
            dir: dir.to_path_buf(),
            key,
            allow,
            file: None,
            offset: 0,
            lineno: 1,
            last_seq: 0,
            last_mac: chain::GENESIS.to_string(),
        };
        let mut alerts = Vec::new();
        let files = reader::log_files(dir)?;
        let Some(cp) = from.filter(|c| c.seq > 0) else {
            f.file = files.first().cloned();
            if let Some(first) = files.first()
                && first.first_seq > 1
            {
                // Started on a log whose oldest files are gone: begin where it begins.
                f.last_seq = first.first_seq - 1;
                f.last_mac = String::new();
            }
            return Ok((f, alerts));
        };
        f.last_seq = cp.seq;
        f.last_mac = cp.mac.clone();
        // The file holding seq+1 (or the end of the one holding seq).
        let next = cp.seq.saturating_add(1);
        let idx = files.iter().rposition(|lf| lf.first_seq <= next);
        let Some(idx) = idx else {
            match files.first() {
                Some(first) => alerts.push(Alert::integrity(
                    Some(cp.seq),
                    format!(
                        "the log now starts at seq {} but the checkpoint is at seq {}: lines \
                         were removed",
                        first.first_seq, cp.seq
                    ),
                )),
                None => alerts.push(Alert::integrity(
                    Some(cp.seq),
                    format!(
                        "the log in {} is empty but the checkpoint is at seq {}: the log was \
                         removed",
                        dir.display(),
                        cp.seq
                    ),
                )),
            }
            f.file = files.first().cloned();
            return Ok((f, alerts));
        };
        let lf = files[idx].clone();
        // Scan to the first line after the checkpoint; remember the last one before it.
        let file = std::fs::File::open(&lf.path)?;
        let mut lr = LineReader::new(file, 0, 1, false);
        let mut before: Option<(u64, String)> = None;
        loop {
            let at = (lr.offset, lr.lineno);
            let Some((_, raw)) = lr.next_line()? else {
                f.offset = at.0;
                f.lineno = at.1;
                break;
            };
            let RawLine::Text(t) = raw else { continue };
            let Some(seq) = reader::seq_of(&t) else {
                continue;
            };
            if seq > cp.seq {
                f.offset = at.0;
                f.lineno = at.1;
                break;
            }
            let mac = chain::split(&t)
                .map(|(_, m)| m.to_string())
                .unwrap_or_default();
            before = Some((seq, mac));
        }
        match before {
            Some((s, m)) if s == cp.seq && m != cp.mac => alerts.push(Alert::integrity(
                Some(cp.seq),
                format!(
                    "line seq {} is no longer the line delivered before (its mac changed): \
                     the log was rewritten behind the checkpoint",
                    cp.seq
                ),
            )),
            Some((s, _)) if s < cp.seq && f.at_end(&files, idx) => alerts.push(Alert::integrity(
                Some(cp.seq),
                format!(
                    "the log ends at seq {s} but seq {} was delivered before: lines were \
                         cut off its end",
                    cp.seq
                ),
            )),
            None if lf.first_seq <= cp.seq && f.at_end(&files, idx) => {
                alerts.push(Alert::integrity(
                    Some(cp.seq),
                    format!(
                        "{} no longer holds seq {}: lines were cut off the log's end",
                        lf.path.display(),
                        cp.seq
                    ),
                ))
            }
            _ => {}
        }
        f.file = Some(lf);
        Ok((f, alerts))
    }

    fn at_end(&self, files: &[LogFile], idx: usize) -> bool {
        idx + 1 == files.len()
    }

    /// The checkpoint after the last line handed out.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            log: self.dir.clone(),
            seq: self.last_seq,
            mac: if chain::is_mac(&self.last_mac) {
                self.last_mac.clone()
            } else {
                chain::GENESIS.to_string()
            },
        }
    }

    /// Hand out every complete line written since the last call (at most `max` lines),
    /// each followed by its alerts. Returns how many lines were handed out.
    pub fn poll(&mut self, max: usize, mut out: impl FnMut(Item)) -> std::io::Result<usize> {
        let mut n = 0;
        loop {
            let files = reader::log_files(&self.dir)?;
            let Some(cur) = self.file.clone().or_else(|| files.first().cloned()) else {
                return Ok(n);
            };
            if self.file.is_none() {
                self.file = Some(cur.clone());
                self.offset = 0;
                self.lineno = 1;
            }
            let mut fh = match std::fs::File::open(&cur.path) {
                Ok(h) => h,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Removed under us: go on with the next file.
                    out(Item::Alert(Alert::integrity(
                        None,
                        format!("{} disappeared while being followed", cur.path.display()),
                    )));
                    self.file = files.iter().find(|f| f.first_seq > cur.first_seq).cloned();
                    self.offset = 0;
                    self.lineno = 1;
                    if self.file.is_none() {
                        return Ok(n);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            fh.seek(SeekFrom::Start(self.offset))?;
            let mut lr = LineReader::new(fh, self.offset, self.lineno, false);
            while n < max {
                let Some((_, raw)) = lr.next_line()? else {
                    break;
                };
                self.offset = lr.offset;
                self.lineno = lr.lineno;
                n += 1;
                self.deliver(raw, &mut out);
            }
            if n >= max {
                return Ok(n);
            }
            // End of this file: is there a newer one?
            match files.iter().find(|f| f.first_seq > cur.first_seq) {
                Some(next) => {
                    self.file = Some(next.clone());
                    self.offset = 0;
                    self.lineno = 1;
                }
                None => return Ok(n),
            }
        }
    }

    fn deliver(&mut self, raw: RawLine, out: &mut impl FnMut(Item)) {
        let text = match raw {
            RawLine::Text(t) => t,
            RawLine::Bad(why) => {
                out(Item::Alert(Alert::integrity(
                    None,
                    format!("unreadable line ({why}) after seq {}", self.last_seq),
                )));
                return;
            }
        };
        let Some((body, mac)) = chain::split(&text) else {
            out(Item::Line(text.clone(), None));
            out(Item::Alert(Alert::integrity(
                reader::seq_of(&text),
                format!("not a sealed audit line after seq {}", self.last_seq),
            )));
            return;
        };
        let mac = mac.to_string();
        let authentic = self
            .key
            .as_ref()
            .is_none_or(|k| k.verify(body.as_bytes(), &mac));
        let parsed: Option<Line> = serde_json::from_str(&text).ok();
        out(Item::Line(text.clone(), parsed.clone().map(Box::new)));
        let seq = parsed
            .as_ref()
            .map(|l| l.seq)
            .or_else(|| reader::seq_of(&text));
        if !authentic {
            out(Item::Alert(Alert::integrity(
                seq,
                "the line does not authenticate (edited)".into(),
            )));
        }
        if let Some(l) = &parsed {
            let linked = l.seq == self.last_seq.saturating_add(1)
                && (self.last_mac.is_empty() || l.prev == self.last_mac);
            if !linked {
                out(Item::Alert(Alert::integrity(
                    Some(l.seq),
                    format!(
                        "seq {} does not follow seq {} in the chain: lines missing, \
                         reordered or replaced",
                        l.seq, self.last_seq
                    ),
                )));
            }
            if !self.allow.is_empty() && !self.allow.iter().any(|a| a.allows(&l.caller)) {
                out(Item::Alert(Alert {
                    kind: "unexpected-caller",
                    seq: Some(l.seq),
                    time: Some(l.time.clone()),
                    caller: Some(l.caller.clone()),
                    operation: Some(l.operation.clone()),
                    key: Some(l.key.clone()),
                    message: format!(
                        "caller uid {} program {}{} is not in the allow-list ({} of key {:?})",
                        l.caller.uid,
                        l.caller.program,
                        if l.caller.command.is_empty() {
                            String::new()
                        } else {
                            format!(" command {:?}", l.caller.command)
                        },
                        l.operation,
                        l.key
                    ),
                }));
            }
            self.last_seq = l.seq;
        } else if let Some(s) = seq {
            self.last_seq = s;
        }
        self.last_mac = mac;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::writer::LogWriter;

    fn write(w: &LogWriter, uid: u32) {
        let mut l = crate::audit::writer::tests_line("unwrapKey");
        l.caller.uid = uid;
        w.append(&mut l).unwrap();
    }

    fn lines(f: &mut Follower) -> (Vec<u64>, Vec<Alert>) {
        let mut seqs = Vec::new();
        let mut alerts = Vec::new();
        f.poll(usize::MAX, |i| match i {
            Item::Line(_, Some(l)) => seqs.push(l.seq),
            Item::Line(_, None) => {}
            Item::Alert(a) => alerts.push(a),
        })
        .unwrap();
        (seqs, alerts)
    }

    #[test]
    fn resumes_without_gaps_or_duplicates_across_files() {
        let d = tempfile::tempdir().unwrap();
        let w = LogWriter::new(d.path(), 1500);
        for _ in 0..5 {
            write(&w, 0);
        }
        let key = || chain::load_key(&d.path().join(chain::KEY_FILE)).ok();
        let allow = vec!["0".parse().unwrap()];
        let (mut f, a) = Follower::open(d.path(), key(), allow.clone(), None).unwrap();
        assert!(a.is_empty());
        let (s, a) = lines(&mut f);
        assert_eq!(s, vec![1, 2, 3, 4, 5]);
        assert!(a.is_empty(), "{a:?}");
        let cp = f.checkpoint();
        for _ in 0..12 {
            write(&w, 0);
        }
        write(&w, 1000);
        assert!(reader::log_files(d.path()).unwrap().len() > 2);
        let (mut f, a) = Follower::open(d.path(), key(), allow, Some(&cp)).unwrap();
        assert!(a.is_empty(), "{a:?}");
        let (s, a) = lines(&mut f);
        assert_eq!(s, (6..=18).collect::<Vec<_>>());
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].kind, "unexpected-caller");
        assert_eq!(a[0].seq, Some(18));
        assert_eq!(f.checkpoint().seq, 18);
        // Nothing new: nothing handed out.
        assert_eq!(lines(&mut f).0, Vec::<u64>::new());
    }

    #[test]
    fn notices_a_log_cut_behind_the_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let w = LogWriter::new(d.path(), 1 << 20);
        for _ in 0..4 {
            write(&w, 0);
        }
        let (mut f, _) = Follower::open(d.path(), None, vec![], None).unwrap();
        lines(&mut f);
        let cp = f.checkpoint();
        let p = reader::log_files(d.path()).unwrap()[0].path.clone();
        let all = reader::read_all_lines(&p).unwrap();
        std::fs::write(&p, format!("{}\n{}\n", all[0], all[1])).unwrap();
        let (_, a) = Follower::open(d.path(), None, vec![], Some(&cp)).unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(a[0].message.contains("cut off"), "{}", a[0].message);
    }

    #[test]
    fn allow_entries() {
        let c = Caller {
            uid: 0,
            pid: 1,
            program: "kekfs".into(),
            command: "mount".into(),
        };
        assert!("0".parse::<Allow>().unwrap().allows(&c));
        assert!("mount".parse::<Allow>().unwrap().allows(&c));
        assert!("kekfs".parse::<Allow>().unwrap().allows(&c));
        assert!("0:mount".parse::<Allow>().unwrap().allows(&c));
        assert!(!"1000:mount".parse::<Allow>().unwrap().allows(&c));
        assert!(!"rewrap".parse::<Allow>().unwrap().allows(&c));
        assert!("".parse::<Allow>().is_err());
    }
}
