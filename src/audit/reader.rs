//! Reading logs, which are untrusted input: the files of a log directory in chain order,
//! lines with a length cap, parsing, and `check`, which verifies the chain and says where
//! it breaks (edited, deleted, reordered, torn or inserted lines).

use super::chain::{self, GENESIS, LogKey};
use super::record::Line;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Longest line accepted (bytes); longer ones are reported and skipped.
pub const MAX_LINE: usize = 1 << 20;
/// File name prefix and suffix of log files: `audit.<first seq, 12 digits>.log`.
const PREFIX: &str = "audit.";
const SUFFIX: &str = ".log";

/// One file of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// Its path.
    pub path: PathBuf,
    /// The sequence number of its first line, from its name.
    pub first_seq: u64,
}

/// The file name of a log file whose first line has sequence number `seq`.
pub fn file_name_for(seq: u64) -> String {
    format!("{PREFIX}{seq:012}{SUFFIX}")
}

/// The first sequence number a log file's name announces, if it is a log file name.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The log files in `dir`, oldest first (the last is the one being written). A missing
/// directory has none.
pub fn log_files(dir: &Path) -> std::io::Result<Vec<LogFile>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("reading audit log directory {}: {e}", dir.display()),
            ));
        }
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let Some(first_seq) = e.file_name().to_str().and_then(parse_file_name) else {
            continue;
        };
        if e.file_type().is_ok_and(|t| t.is_file()) {
            out.push(LogFile {
                path: e.path(),
                first_seq,
            });
        }
    }
    out.sort_by_key(|f| f.first_seq);
    Ok(out)
}

/// The `seq` of a line, read without trusting the rest of it.
pub fn seq_of(line: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    serde_json::from_str::<SeqOnly>(line).ok().map(|s| s.seq)
}

/// A line as read from a file.
#[derive(Debug)]
pub enum RawLine {
    /// The text (without its newline).
    Text(String),
    /// Not UTF-8, or longer than `MAX_LINE`.
    Bad(String),
}

/// Reads lines with a length cap, tracking byte offsets. A final line without a newline is
/// returned only when `partial_ok` (a writer may be in the middle of it).
pub struct LineReader<R> {
    r: BufReader<R>,
    /// Byte offset of the next line.
    pub offset: u64,
    /// 1-based number of the next line.
    pub lineno: u64,
    partial_ok: bool,
}

impl<R: Read> LineReader<R> {
    /// Read from `r`, which is positioned at byte `offset`, line `lineno`.
    pub fn new(r: R, offset: u64, lineno: u64, partial_ok: bool) -> Self {
        Self {
            r: BufReader::with_capacity(64 << 10, r),
            offset,
            lineno,
            partial_ok,
        }
    }

    /// The next line: `Ok(None)` at the end (or before an incomplete last line when
    /// partial lines are not wanted; the offset then stays at its start).
    pub fn next_line(&mut self) -> std::io::Result<Option<(u64, RawLine)>> {
        let mut buf = Vec::new();
        let mut too_long = false;
        let mut consumed = 0u64;
        loop {
            let chunk = match self.r.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                if consumed == 0 {
                    return Ok(None);
                }
                if !self.partial_ok {
                    // Incomplete last line: not ours yet. BufReader cannot un-read, so the
                    // caller must reopen at `self.offset` to try again.
                    return Ok(None);
                }
                break;
            }
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            let data = if done { &chunk[..take - 1] } else { chunk };
            if !too_long {
                if buf.len() + data.len() > MAX_LINE {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(data);
                }
            }
            self.r.consume(take);
            consumed += take as u64;
            if done {
                break;
            }
        }
        let lineno = self.lineno;
        self.lineno += 1;
        self.offset += consumed;
        let raw = if too_long {
            RawLine::Bad(format!("longer than {MAX_LINE} bytes"))
        } else {
            match String::from_utf8(buf) {
                Ok(s) => RawLine::Text(s),
                Err(_) => RawLine::Bad("not UTF-8".into()),
            }
        };
        Ok(Some((lineno, raw)))
    }
}

/// What is wrong at one place of a log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    /// Not a sealed audit line (garbage, torn, cut in the middle, not UTF-8, too long).
    Malformed,
    /// The line does not authenticate: edited, or sealed with another key.
    Edited,
    /// Lines are missing before this one (sequence number jumps forward).
    Missing,
    /// The line is out of order or repeated (sequence number goes back or repeats).
    Reordered,
    /// The line does not chain to the one before although the numbering fits (replaced or
    /// inserted line).
    ChainBroken,
    /// A file's first line is not the one its name announces (the file's head was cut).
    HeadCut,
    /// A file could not be read.
    Unreadable,
}

/// One finding of `check`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number in the file (0: the file as a whole).
    pub line: u64,
    /// The line's sequence number, if it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: Problem,
    /// Details.
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// The result of `check`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Lines read.
    pub lines: u64,
    /// Sequence number of the first valid line (0 if none).
    pub first_seq: u64,
    /// Sequence number of the last valid line (0 if none).
    pub last_seq: u64,
    /// Its mac.
    pub last_mac: String,
    /// Problems, in file order.
    pub findings: Vec<Finding>,
    /// Remarks that are not failures (older files absent, empty files).
    pub notes: Vec<String>,
}

/// Verify the chain through `files` (oldest first) with `key`. Every line must
/// authenticate and chain to the one before it; each finding names the file and line. The
/// chain continues past a bad line from what that line claims, so one edit is one finding.
/// Lines cut off at the end of the newest file cannot be detected from the log alone (see
/// `follow`'s checkpoint).
pub fn check(files: &[LogFile], key: &LogKey) -> Report {
    let mut r = Report::default();
    // (expected seq, expected prev) once the chain has started.
    let mut expect: Option<(u64, String)> = None;
    // Jumps forward: (index of their finding, first missing seq, seq found).
    let mut gaps: Vec<(usize, u64, u64)> = Vec::new();
    for lf in files {
        let f = match std::fs::File::open(&lf.path) {
            Ok(f) => f,
            Err(e) => {
                r.findings.push(Finding {
                    file: lf.path.clone(),
                    line: 0,
                    seq: None,
                    problem: Problem::Unreadable,
                    detail: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let mut lr = LineReader::new(f, 0, 1, true);
        let mut first_in_file = true;
        loop {
            let (lineno, raw) = match lr.next_line() {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    r.findings.push(Finding {
                        file: lf.path.clone(),
                        line: lr.lineno,
                        seq: None,
                        problem: Problem::Unreadable,
                        detail: format!("read error: {e}"),
                    });
                    break;
                }
            };
            r.lines += 1;
            let mut finding = |seq, problem, detail: String| {
                r.findings.push(Finding {
                    file: lf.path.clone(),
                    line: lineno,
                    seq,
                    problem,
                    detail,
                })
            };
            let text = match raw {
                RawLine::Text(t) => t,
                RawLine::Bad(why) => {
                    finding(
                        None,
                        Problem::Malformed,
                        format!("not an audit line ({why})"),
                    );
                    continue;
                }
            };
            let Some((body, mac)) = chain::split(&text) else {
                finding(
                    seq_of(&text),
                    Problem::Malformed,
                    "not a sealed audit line (torn, cut or garbage)".into(),
                );
                continue;
            };
            let authentic = key.verify(body.as_bytes(), mac);
            let parsed: Option<Line> = serde_json::from_str(&text).ok();
            let seq = parsed.as_ref().map(|l| l.seq).or_else(|| seq_of(&text));
            if !authentic {
                finding(
                    seq,
                    Problem::Edited,
                    "the line does not authenticate: it was edited (or sealed with another \
                     log key)"
                        .into(),
                );
                // Go on from what the line claims: the next line chains to its mac.
                if let Some(s) = seq {
                    expect = Some((s.saturating_add(1), mac.to_string()));
                }
                first_in_file = false;
                continue;
            }
            let Some(line) = parsed else {
                finding(seq, Problem::Malformed, "authentic but unparseable".into());
                continue;
            };
            if first_in_file && line.seq != lf.first_seq {
                finding(
                    Some(line.seq),
                    Problem::HeadCut,
                    format!(
                        "the file's name says it starts at seq {}, but its first line is seq {}: \
                         its first lines were removed",
                        lf.first_seq, line.seq
                    ),
                );
            }
            first_in_file = false;
            match &expect {
                None => {
                    if line.seq != 1 || line.prev != GENESIS {
                        r.notes.push(format!(
                            "the log starts at seq {} in {}: older lines are not present \
                             (older files removed or archived); they cannot be checked",
                            line.seq,
                            lf.path.display()
                        ));
                    }
                }
                Some((want_seq, want_prev)) => {
                    if line.seq < *want_seq {
                        // Out of order: if a jump earlier skipped this seq, that jump was
                        // a reorder too, not a deletion.
                        let earlier = gaps.iter().find(|g| g.1 <= line.seq && line.seq < g.2);
                        let detail = match earlier {
                            Some(&(i, _, _)) => {
                                let f = &mut r.findings[i];
                                f.problem = Problem::Reordered;
                                f.detail = format!(
                                    "comes before seq {} (line {} of {}): lines reordered",
                                    line.seq,
                                    lineno,
                                    lf.path.display()
                                );
                                format!(
                                    "seq {} after seq {}: lines reordered",
                                    line.seq,
                                    want_seq.saturating_sub(1)
                                )
                            }
                            None => format!(
                                "seq {} after seq {}: a line repeated or out of order",
                                line.seq,
                                want_seq.saturating_sub(1)
                            ),
                        };
                        r.findings.push(Finding {
                            file: lf.path.clone(),
                            line: lineno,
                            seq: Some(line.seq),
                            problem: Problem::Reordered,
                            detail,
                        });
                        // The chain goes on from the newest line seen.
                        continue;
                    }
                    if line.prev != *want_prev || line.seq != *want_seq {
                        let (problem, detail) = if line.seq > *want_seq {
                            let n = line.seq - want_seq;
                            gaps.push((r.findings.len(), *want_seq, line.seq));
                            (
                                Problem::Missing,
                                format!(
                                    "{n} line(s) missing before this one (expected seq \
                                     {want_seq}): deleted lines"
                                ),
                            )
                        } else {
                            (
                                Problem::ChainBroken,
                                "does not chain to the line before it (a line was replaced \
                                 or inserted)"
                                    .into(),
                            )
                        };
                        r.findings.push(Finding {
                            file: lf.path.clone(),
                            line: lineno,
                            seq: Some(line.seq),
                            problem,
                            detail,
                        });
                    }
                }
            }
            if r.first_seq == 0 {
                r.first_seq = line.seq;
            }
            r.last_seq = line.seq;
            r.last_mac = mac.to_string();
            expect = Some((line.seq.saturating_add(1), mac.to_string()));
        }
        if first_in_file {
            r.notes.push(format!("{} is empty", lf.path.display()));
        }
    }
    r
}

/// Every well-formed line of `files` (oldest first), parsed, without verifying the chain
/// (queries; run `check` for integrity). Malformed lines are counted and skipped.
pub fn read_lines(files: &[LogFile], mut f: impl FnMut(Line)) -> std::io::Result<u64> {
    let mut skipped = 0;
    for lf in files {
        let file = match std::fs::File::open(&lf.path) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("reading {}: {e}", lf.path.display()),
                ));
            }
        };
        let mut lr = LineReader::new(file, 0, 1, false);
        while let Some((_, raw)) = lr.next_line()? {
            match raw {
                RawLine::Text(t) => match serde_json::from_str::<Line>(&t) {
                    Ok(l) => f(l),
                    Err(_) => skipped += 1,
                },
                RawLine::Bad(_) => skipped += 1,
            }
        }
    }
    Ok(skipped)
}

/// The files of a log given as a directory or as files.
pub fn files_of(path: &Path) -> std::io::Result<Vec<LogFile>> {
    if path.is_dir() {
        return log_files(path);
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let first_seq = parse_file_name(name).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is neither an audit log directory nor an audit.<seq>.log file",
                path.display()
            ),
        )
    })?;
    Ok(vec![LogFile {
        path: path.to_path_buf(),
        first_seq,
    }])
}

/// Read a whole small file the way lines are read (for tests and tools).
pub fn read_all_lines(path: &Path) -> std::io::Result<Vec<String>> {
    let f = std::fs::File::open(path)?;
    Ok(BufReader::new(f).lines().map_while(Result::ok).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(file_name_for(1), "audit.000000000001.log");
        assert_eq!(parse_file_name("audit.000000000001.log"), Some(1));
        assert_eq!(parse_file_name("audit.99.log"), Some(99));
        for bad in [
            "audit..log",
            "audit.x.log",
            "audit.1.log.tmp",
            "audit.key",
            "audit.-1.log",
            "audit.999999999999999999999.log",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn line_reader_caps_and_offsets() {
        let mut data = b"one\n".to_vec();
        data.extend(vec![b'x'; MAX_LINE + 10]);
        data.extend(b"\n\xff\xfe\nlast");
        let mut lr = LineReader::new(&data[..], 0, 1, false);
        let (n, l) = lr.next_line().unwrap().unwrap();
        assert!(matches!((n, l), (1, RawLine::Text(t)) if t == "one"));
        assert_eq!(lr.offset, 4);
        assert!(matches!(
            lr.next_line().unwrap(),
            Some((2, RawLine::Bad(_)))
        ));
        assert!(matches!(
            lr.next_line().unwrap(),
            Some((3, RawLine::Bad(_)))
        ));
        let at = lr.offset;
        assert!(lr.next_line().unwrap().is_none(), "partial last line");
        assert_eq!(lr.offset, at);
        let mut lr = LineReader::new(&b"a\nb"[..], 0, 1, true);
        lr.next_line().unwrap();
        assert!(matches!(lr.next_line().unwrap(), Some((2, RawLine::Text(t))) if t == "b"));
    }

    fn sample_log(n: usize) -> (tempfile::TempDir, LogKey, Vec<String>) {
        let d = tempfile::tempdir().unwrap();
        let w = crate::audit::writer::LogWriter::new(d.path(), 1 << 20);
        for _ in 0..n {
            w.append(&mut crate::audit::writer::tests_line("unwrapKey"))
                .unwrap();
        }
        let key = chain::load_key(&d.path().join(chain::KEY_FILE)).unwrap();
        let lines = read_all_lines(&d.path().join(file_name_for(1))).unwrap();
        (d, key, lines)
    }

    fn check_with(lines: &[String], d: &Path, key: &LogKey) -> Vec<(u64, Problem)> {
        std::fs::write(d.join(file_name_for(1)), lines.join("\n") + "\n").unwrap();
        check(&log_files(d).unwrap(), key)
            .findings
            .into_iter()
            .map(|f| (f.line, f.problem))
            .collect()
    }

    #[test]
    fn each_kind_of_tampering_is_named_at_its_line() {
        let (d, key, lines) = sample_log(8);
        assert!(check_with(&lines, d.path(), &key).is_empty());
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("unwrapKey", "wrapKey");
        assert_eq!(check_with(&edited, d.path(), &key), [(3, Problem::Edited)]);
        let mut deleted = lines.clone();
        deleted.remove(4);
        assert_eq!(
            check_with(&deleted, d.path(), &key),
            [(5, Problem::Missing)]
        );
        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        assert_eq!(
            check_with(&swapped, d.path(), &key),
            [(4, Problem::Reordered), (5, Problem::Reordered)]
        );
        let mut repeated = lines.clone();
        repeated.insert(5, lines[2].clone());
        assert_eq!(
            check_with(&repeated, d.path(), &key),
            [(6, Problem::Reordered)]
        );
        let mut cut = lines.clone();
        cut[6].truncate(40);
        assert_eq!(
            check_with(&cut, d.path(), &key),
            [(7, Problem::Malformed), (8, Problem::Missing)]
        );
        let mut head = lines.clone();
        head.remove(0);
        let f = check_with(&head, d.path(), &key);
        assert_eq!(f, [(1, Problem::HeadCut)]);
    }

    #[test]
    fn garbage_never_panics() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(file_name_for(1));
        let key = LogKey::from_slice(&[1; 32]).unwrap();
        let samples: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\n\n\n".to_vec(),
            b"{}\n".to_vec(),
            b"{\"seq\":18446744073709551615,\"mac\":\"x\"}\n".to_vec(),
            format!("{{\"seq\":1,\"mac\":\"{}\"}}\n", "a".repeat(64)).into_bytes(),
            vec![0xff; 100],
            b"\"}\"}\"}".to_vec(),
        ];
        for s in samples {
            std::fs::write(&p, &s).unwrap();
            let files = log_files(d.path()).unwrap();
            let _ = check(&files, &key);
            let _ = read_lines(&files, |_| {});
        }
    }
}
