//! `kekfs audit check|summary|last-use|follow`, and the CLI's audit hooks: settings from the
//! command line, and one line per key lifecycle command (create, rotate, disable, enable,
//! set, delete, recover, purge, protect, policy).

use super::error::CliError;
use super::exit;
use super::keys::{self, KeyLifecycleCmd};
use super::timespec::parse_time;
use crate::audit::follow::{self, Allow, Checkpoint, Follower, Item};
use crate::audit::query::{Dedup, Dim, Filter, LastUses, Summary};
use crate::audit::reader::{self, LogFile};
use crate::audit::{self, Lifecycle, chain, record, sink};
use crate::kek::{KekUri, ProviderOptions};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `println!` that never panics: a closed stdout (`kekfs audit summary | head`) just ends
/// the output.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
pub(crate) use outln;

/// `kekfs audit …` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Verify the hash chain of audit logs and report where it breaks.
    ///
    /// Reports every edited, deleted, reordered, torn or inserted line (file, line number,
    /// sequence number); exit 23 if any. Without PATH: the keystore's log and every volume
    /// and token log under the audit directory.
    Check {
        /// Log directories or log files (`audit.<seq>.log`).
        paths: Vec<PathBuf>,
        /// The log key to verify with (default: `audit.key` beside each log).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Count operations by keystore, key, version, caller, operation and result.
    ///
    /// Group by the columns given with --by (all by default), over a time window.
    Summary {
        /// Only lines from T on (RFC 3339, `now`, `-1h`, `-7d`…).
        #[arg(long, value_name = "T", allow_hyphen_values = true)]
        since: Option<String>,
        /// Only lines before T.
        #[arg(long, value_name = "T", allow_hyphen_values = true)]
        until: Option<String>,
        /// Group by these columns: keystore, key, version, caller, operation, result.
        #[arg(long, value_name = "COLUMNS", value_delimiter = ',')]
        by: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        logs: LogArgs,
    },
    /// Last successful and last failed use of each key version by each caller.
    ///
    /// Uses are wraps, unwraps and polls: is an old version still in use?
    LastUse {
        /// Only this key (name or token label).
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        logs: LogArgs,
    },
    /// Print new lines of a log as they are written, from a saved checkpoint on.
    ///
    /// Resumable without duplicates or gaps; prints an alert line for callers outside the
    /// allow-list and for breaks in the chain.
    Follow {
        /// Checkpoint file: read at start, updated after each line printed.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// Expected callers: a uid, a program or kekfs command name (mount, rewrap, …), or
        /// UID:NAME; repeatable. Without it no caller alerts are raised.
        #[arg(long = "allow-caller", value_name = "CALLER")]
        allow_caller: Vec<String>,
        /// Exit with code 24 at the first alert (after saving the checkpoint).
        #[arg(long)]
        fail_on_alert: bool,
        /// Print what is there and exit instead of waiting for more.
        #[arg(long)]
        once: bool,
        /// How often to look for new lines.
        #[arg(long, value_name = "DURATION", default_value = "1s")]
        interval: String,
        #[command(flatten)]
        logs: LogArgs,
    },
}

/// Which logs a query reads.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Read this log directory (repeatable). Default: the keystore's log and every token log.
    #[arg(long = "log", value_name = "DIR")]
    log: Vec<PathBuf>,
    /// Read the log of this volume (backing directory or mountpoint).
    #[arg(long, value_name = "PATH")]
    volume: Option<PathBuf>,
}

impl From<sink::AuditError> for CliError {
    fn from(e: sink::AuditError) -> CliError {
        CliError::new(exit::AUDIT_FAILED, e.0)
    }
}

/// Apply the global `--audit-dir` and the environment to the audit settings, and name the
/// running command in `caller`.
pub fn configure(audit_dir: Option<&Path>, command: &str) -> Result<(), CliError> {
    let mut s = sink::Settings::from_env().map_err(|m| CliError::new(exit::USAGE, m))?;
    if let Some(d) = audit_dir {
        s.base_dir = d.to_path_buf();
    }
    s.command = command.to_string();
    sink::configure(s);
    Ok(())
}

/// The HTTP-like code of a failed command.
pub fn code_of_cli(e: &CliError) -> u16 {
    match e.code {
        exit::USAGE => 400,
        exit::BAD_PASSPHRASE => 401,
        exit::KEK_REFUSED => 403,
        exit::KEY_NOT_FOUND | exit::NO_KEYSTORE | exit::NOT_A_VOLUME => 404,
        exit::CHANGE_REFUSED | exit::EXISTS => 409,
        exit::CORRUPT => 422,
        exit::PIN_LOCKED => 423,
        exit::UNSUPPORTED => 501,
        exit::PROVIDER_UNREACHABLE | exit::TOKEN_ABSENT | exit::MODULE_LOAD => 503,
        _ => 500,
    }
}

/// Run a lifecycle command (`kekfs key disable …`) with its audit line: under fail-closed
/// the command is refused when the key's log cannot be written.
pub fn lifecycle(cmd: KeyLifecycleCmd, popts: &ProviderOptions) -> Result<(), CliError> {
    let Some((uri, operation, version, detail)) = describe(&cmd) else {
        return keys::run(cmd, popts);
    };
    let lc = Lifecycle::begin(&uri, &popts.keystore_dir, operation, version)?;
    finish(lc, keys::run(cmd, popts), detail)
}

/// `kekfs key create|rotate` with its audit line (the version created is recorded).
pub fn create_or_rotate(
    uri: &KekUri,
    rotate: bool,
    popts: &ProviderOptions,
) -> Result<(), CliError> {
    let operation = if rotate { "rotate" } else { "create" };
    let mut lc = Lifecycle::begin(uri, &popts.keystore_dir, operation, uri.version())?;
    let _ = audit::take_noted_version();
    let r = super::token::create_or_rotate(uri, rotate, popts);
    if let Some(v) = audit::take_noted_version() {
        lc.set_version(Some(v));
    }
    finish(lc, r, String::new())
}

fn finish(lc: Lifecycle, r: Result<(), CliError>, detail: String) -> Result<(), CliError> {
    let (code, message) = match &r {
        Ok(()) => (200, detail),
        Err(e) => (code_of_cli(e), e.message.clone()),
    };
    let logged = lc.end(code, message);
    match (r, logged) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
        (Ok(()), Err(e)) => Err(CliError::new(
            exit::AUDIT_FAILED,
            format!("the change was made, but its audit line could not be written: {e}"),
        )),
    }
}

/// The name of a lifecycle subcommand (`disable`, `show`, …), for `caller.command`.
pub fn lifecycle_name(cmd: &KeyLifecycleCmd) -> &'static str {
    match describe(cmd) {
        Some((_, op, _, _)) => op,
        None => match cmd {
            KeyLifecycleCmd::Show { .. } => "show",
            _ => "lifecycle",
        },
    }
}

/// The `init` line of a new volume, in the key's log and the volume's log (sharing the
/// `ActivityId` of the wraps that made it).
pub fn init_line(
    provider: &crate::audit::Audited,
    vol: &crate::volume::Volume,
    backing: &Path,
) -> Result<(), CliError> {
    let path = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_path_buf());
    let audit = provider.audit().and_volume(vol.id(), &path);
    let mut ev = record::Event::new(record::TASK_VOLUME_STATE, record::op::INIT, 200);
    ev.version = Some(vol.header().slots[0].key_version);
    ev.message = format!("volume created under {}", vol.header().kek_uri);
    audit.emit(&ev, crate::audit::To::Both)?;
    Ok(())
}

/// The key, operation, version and detail text of a lifecycle command (`None`: no line,
/// e.g. `show`, or arguments the command itself will reject).
fn describe(cmd: &KeyLifecycleCmd) -> Option<(KekUri, &'static str, Option<u32>, String)> {
    let soft = |name: &str| KekUri::Soft {
        name: name.to_string(),
        version: None,
    };
    let target = |t: &Option<String>, kek: &Option<String>, v: Option<u32>| match kek {
        Some(k) => {
            let uri = KekUri::parse(k).ok()?;
            let version = v.or(uri.version());
            Some((uri, version))
        }
        None => {
            let (name, version) = keys::parse_target(t.as_deref()?).ok()?;
            Some((soft(&name), version))
        }
    };
    match cmd {
        KeyLifecycleCmd::Disable {
            target: t,
            kek,
            version,
            ..
        } => {
            let (u, v) = target(t, kek, *version)?;
            Some((u, "disable", v, String::new()))
        }
        KeyLifecycleCmd::Enable {
            target: t,
            kek,
            version,
            ..
        } => {
            let (u, v) = target(t, kek, *version)?;
            Some((u, "enable", v, String::new()))
        }
        KeyLifecycleCmd::Set {
            target: t,
            not_before,
            expires,
            retention,
            ..
        } => {
            let (name, v) = keys::parse_target(t).ok()?;
            let mut parts = Vec::new();
            for (k, val) in [
                ("not-before", not_before),
                ("expires", expires),
                ("retention", retention),
            ] {
                if let Some(x) = val {
                    parts.push(format!("{k}={x}"));
                }
            }
            Some((soft(&name), "set", v, parts.join(" ")))
        }
        KeyLifecycleCmd::Delete { name, .. } => Some((soft(name), "delete", None, String::new())),
        KeyLifecycleCmd::Recover { name, .. } => Some((soft(name), "recover", None, String::new())),
        KeyLifecycleCmd::Purge { name, .. } => Some((soft(name), "purge", None, String::new())),
        KeyLifecycleCmd::Protect { name, .. } => Some((soft(name), "protect", None, String::new())),
        KeyLifecycleCmd::Policy {
            name,
            allow_uid,
            deny_uid,
            ops,
            clear,
            ..
        } => {
            let detail = if *clear {
                "cleared".to_string()
            } else {
                format!(
                    "allow-uid={:?} deny-uid={:?} ops={:?}",
                    allow_uid, deny_uid, ops
                )
            };
            Some((soft(name), "policy", None, detail))
        }
        _ => None,
    }
}

/// Run `kekfs audit …`.
pub fn run(cmd: AuditCmd, popts: &ProviderOptions) -> Result<(), CliError> {
    match cmd {
        AuditCmd::Check { paths, key, json } => check(&paths, key.as_deref(), json, popts),
        AuditCmd::Summary {
            since,
            until,
            by,
            json,
            logs,
        } => {
            let dims = by
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<Dim>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| CliError::new(exit::USAGE, format!("--by: {m}")))?;
            let filter = Filter {
                since: window(since.as_deref(), "--since")?,
                until: window(until.as_deref(), "--until")?,
                key: None,
            };
            let mut s = Summary::new(&dims);
            for_lines(&query_logs(&logs, popts)?, &filter, |l| s.add(l))?;
            print_summary(&s, json)
        }
        AuditCmd::LastUse { key, json, logs } => {
            let filter = Filter {
                key,
                ..Filter::default()
            };
            let mut lu = LastUses::default();
            for_lines(&query_logs(&logs, popts)?, &filter, |l| lu.add(l))?;
            print_last_use(&lu, json)
        }
        AuditCmd::Follow {
            checkpoint,
            allow_caller,
            fail_on_alert,
            once,
            interval,
            logs,
        } => {
            let mut dirs = query_logs(&logs, popts)?;
            if dirs.len() != 1 {
                return Err(CliError::new(
                    exit::USAGE,
                    format!(
                        "follow reads one log; {} match: choose one with --log DIR or \
                         --volume PATH",
                        dirs.len()
                    ),
                ));
            }
            let allow = allow_caller
                .iter()
                .map(|s| s.parse::<Allow>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| CliError::new(exit::USAGE, format!("--allow-caller: {m}")))?;
            let interval = sink::parse_secs(&interval)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    CliError::new(exit::USAGE, "--interval: expected a duration like 1s")
                })?;
            follow_log(
                &dirs.remove(0),
                checkpoint.as_deref(),
                allow,
                fail_on_alert,
                once,
                interval,
            )
        }
    }
}

fn window(t: Option<&str>, flag: &str) -> Result<Option<String>, CliError> {
    let Some(t) = t else { return Ok(None) };
    let now = crate::kek::keystore::unix_now();
    let secs =
        parse_time(t, now).map_err(|e| CliError::new(exit::USAGE, format!("{flag}: {e}")))?;
    Ok(secs.map(record::time_key))
}

fn io_err(e: std::io::Error) -> CliError {
    CliError::failure(e.to_string())
}

/// Log directories a query reads: `--log` and `--volume`, else the keystore's log and every
/// token log (the provider-side logs, which hold every key operation once).
fn query_logs(a: &LogArgs, popts: &ProviderOptions) -> Result<Vec<PathBuf>, CliError> {
    let mut dirs = a.log.clone();
    if let Some(v) = &a.volume {
        dirs.push(volume_log(v)?);
    }
    if !dirs.is_empty() {
        return Ok(dirs);
    }
    let ks = sink::keystore_log_dir(&popts.keystore_dir);
    if ks.is_dir() {
        dirs.push(ks);
    }
    dirs.extend(subdirs(&sink::settings().base_dir.join("tokens")));
    if dirs.is_empty() {
        return Err(CliError::new(
            exit::FAILURE,
            format!(
                "no audit log found: none in keystore {} and no token logs in {}; name one with \
                 --log DIR or --volume PATH",
                popts.keystore_dir.display(),
                sink::settings().base_dir.join("tokens").display()
            ),
        ));
    }
    Ok(dirs)
}

/// The log directory of the volume at `path` (backing directory or mountpoint).
pub fn volume_log(path: &Path) -> Result<PathBuf, CliError> {
    let backing = super::rewrap::backing_of(path)?;
    let (h, _) = crate::volume::read_header(&backing)?;
    Ok(sink::volume_log_dir(
        &sink::settings().base_dir,
        &h.volume_id,
    ))
}

fn subdirs(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn for_lines(
    dirs: &[PathBuf],
    filter: &Filter,
    mut f: impl FnMut(&record::Line),
) -> Result<(), CliError> {
    let mut seen = Dedup::default();
    let mut skipped = 0;
    for d in dirs {
        let files = reader::files_of(d).map_err(io_err)?;
        skipped += reader::read_lines(&files, |l| {
            if filter.admits(&l) && seen.first(&l) {
                f(&l);
            }
        })
        .map_err(io_err)?;
    }
    if skipped > 0 {
        eprintln!(
            "kekfs: warning: {skipped} malformed line(s) skipped; run `kekfs audit check` to \
             see where"
        );
    }
    Ok(())
}

fn dim_name(d: Dim) -> &'static str {
    match d {
        Dim::Keystore => "KEYSTORE",
        Dim::Key => "KEY",
        Dim::Version => "VERSION",
        Dim::Caller => "CALLER",
        Dim::Operation => "OPERATION",
        Dim::Result => "RESULT",
    }
}

fn print_summary(s: &Summary, json: bool) -> Result<(), CliError> {
    let rows = s.rows();
    if json {
        let out =
            serde_json::to_string_pretty(&rows).map_err(|e| CliError::failure(e.to_string()))?;
        outln!("{out}");
        return Ok(());
    }
    if rows.is_empty() {
        outln!("no audit lines in the window");
        return Ok(());
    }
    let dims = s.dims();
    let mut table: Vec<Vec<String>> = vec![
        dims.iter()
            .map(|d| dim_name(*d).to_string())
            .chain(["COUNT".to_string()])
            .collect(),
    ];
    for r in &rows {
        table.push(
            dims.iter()
                .map(|d| r.get(*d).to_string())
                .chain([r.count.to_string()])
                .collect(),
        );
    }
    print_table(&table);
    Ok(())
}

fn print_table(table: &[Vec<String>]) {
    let cols = table.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for r in table {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == cols {
                    format!("{c:>w$}", w = widths[i])
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}

fn print_last_use(lu: &LastUses, json: bool) -> Result<(), CliError> {
    let rows = lu.rows();
    if json {
        let out =
            serde_json::to_string_pretty(&rows).map_err(|e| CliError::failure(e.to_string()))?;
        outln!("{out}");
        return Ok(());
    }
    if rows.is_empty() {
        outln!("no key use recorded");
        return Ok(());
    }
    let show = |u: &Option<crate::audit::query::Use>| match u {
        None => "never".to_string(),
        Some(u) if u.message.is_empty() => format!("{} {} ({})", u.time, u.operation, u.code),
        Some(u) => format!("{} {} ({}: {})", u.time, u.operation, u.code, u.message),
    };
    let mut last = (String::new(), String::new());
    for r in &rows {
        if (r.keystore.as_str(), r.key.as_str()) != (last.0.as_str(), last.1.as_str()) {
            outln!("key {} in {}", r.key, r.keystore);
            last = (r.keystore.clone(), r.key.clone());
        }
        let v = if r.version.is_empty() {
            "?"
        } else {
            &r.version
        };
        outln!("  version {v}, caller {}", r.caller);
        outln!("    last success: {}", show(&r.last_success));
        outln!("    last failure: {}", show(&r.last_failure));
    }
    Ok(())
}

/// One log's check result, for output.
#[derive(Debug, serde::Serialize)]
struct CheckOut {
    log: PathBuf,
    ok: bool,
    #[serde(flatten)]
    report: reader::Report,
}

fn check(
    paths: &[PathBuf],
    key: Option<&Path>,
    json: bool,
    popts: &ProviderOptions,
) -> Result<(), CliError> {
    // Group the inputs by log directory.
    let mut groups: Vec<(PathBuf, Vec<LogFile>)> = Vec::new();
    fn add(groups: &mut Vec<(PathBuf, Vec<LogFile>)>, dir: PathBuf, files: Vec<LogFile>) {
        match groups.iter_mut().find(|g| g.0 == dir) {
            Some(g) => g.1.extend(files),
            None => groups.push((dir, files)),
        }
    }
    if paths.is_empty() {
        let s = sink::settings();
        let mut dirs = vec![sink::keystore_log_dir(&popts.keystore_dir)];
        dirs.extend(subdirs(&s.base_dir.join("volumes")));
        dirs.extend(subdirs(&s.base_dir.join("tokens")));
        for d in dirs.into_iter().filter(|d| d.is_dir()) {
            let files = reader::log_files(&d).map_err(io_err)?;
            add(&mut groups, d, files);
        }
        if groups.is_empty() {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "no audit logs found in keystore {} or under {}; name them as arguments",
                    popts.keystore_dir.display(),
                    s.base_dir.display()
                ),
            ));
        }
    }
    for p in paths {
        let files = reader::files_of(p).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
        let dir = if p.is_dir() {
            p.clone()
        } else {
            p.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        add(&mut groups, dir, files);
    }
    let mut outs = Vec::new();
    for (dir, mut files) in groups {
        files.sort_by_key(|f| f.first_seq);
        files.dedup();
        let key_path = key.map_or_else(|| dir.join(chain::KEY_FILE), Path::to_path_buf);
        let k = chain::load_key(&key_path).map_err(|e| {
            CliError::failure(format!(
                "cannot read the log key {}: {e}; give it with --key FILE",
                key_path.display()
            ))
        })?;
        let report = reader::check(&files, &k);
        outs.push(CheckOut {
            log: dir,
            ok: report.findings.is_empty(),
            report,
        });
    }
    let bad = outs.iter().filter(|o| !o.ok).count();
    if json {
        let s =
            serde_json::to_string_pretty(&outs).map_err(|e| CliError::failure(e.to_string()))?;
        outln!("{s}");
    } else {
        for o in &outs {
            let r = &o.report;
            if o.ok {
                outln!(
                    "ok: {}: {} line(s), seq {}..{}, chain intact",
                    o.log.display(),
                    r.lines,
                    r.first_seq,
                    r.last_seq
                );
            } else {
                outln!(
                    "TAMPERED: {}: {} problem(s) in {} line(s)",
                    o.log.display(),
                    r.findings.len(),
                    r.lines
                );
                for f in &r.findings {
                    outln!("  {f}");
                }
            }
            for n in &r.notes {
                outln!("  note: {n}");
            }
        }
    }
    if bad > 0 {
        return Err(CliError::new(
            exit::AUDIT_TAMPERED,
            format!("{bad} audit log(s) failed the chain check"),
        ));
    }
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Turn SIGINT/SIGTERM into a flag checked between lines (so a stopped follower saves its
/// checkpoint after the last line it printed).
pub(crate) fn catch_stop_signals() {
    let h = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, h);
        libc::signal(libc::SIGTERM, h);
    }
}

/// Has SIGINT or SIGTERM arrived since `catch_stop_signals`?
pub(crate) fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn follow_log(
    dir: &Path,
    checkpoint: Option<&Path>,
    allow: Vec<Allow>,
    fail_on_alert: bool,
    once: bool,
    interval: Duration,
) -> Result<(), CliError> {
    let cp: Option<Checkpoint> = match checkpoint {
        Some(p) => follow::load_checkpoint(p).map_err(CliError::failure)?,
        None => None,
    };
    if let Some(c) = &cp
        && c.log != dir
    {
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "the checkpoint is for log {}, not {}; use another checkpoint file",
                c.log.display(),
                dir.display()
            ),
        ));
    }
    let key = chain::load_key(&dir.join(chain::KEY_FILE)).ok();
    if key.is_none() {
        eprintln!(
            "kekfs: warning: cannot read {}: lines are checked for their chain links only, \
             not their macs",
            dir.join(chain::KEY_FILE).display()
        );
    }
    let (mut fol, alerts) = Follower::open(dir, key, allow, cp.as_ref()).map_err(io_err)?;
    catch_stop_signals();
    let mut out = std::io::stdout().lock();
    let emit_alert = |out: &mut std::io::StdoutLock<'_>, a: &follow::Alert| {
        eprintln!("kekfs: ALERT ({}): {}", a.kind, a.message);
        if let Ok(s) = serde_json::to_string(a) {
            let _ = writeln!(out, "{s}");
        }
    };
    let alerted = !alerts.is_empty();
    for a in &alerts {
        emit_alert(&mut out, a);
    }
    let save = |fol: &Follower| -> Result<(), CliError> {
        match checkpoint {
            Some(p) => follow::save_checkpoint(p, &fol.checkpoint())
                .map_err(|e| CliError::failure(format!("saving checkpoint {}: {e}", p.display()))),
            None => Ok(()),
        }
    };
    loop {
        // One line at a time, so the checkpoint never runs ahead of what was printed.
        let mut stopped_on_alert = false;
        let mut write_err = None;
        let n = fol
            .poll(1, |item| match item {
                Item::Line(text, _) => {
                    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
                        write_err = Some(e);
                    }
                }
                Item::Alert(a) => {
                    emit_alert(&mut out, &a);
                    stopped_on_alert = fail_on_alert;
                }
            })
            .map_err(io_err)?;
        if let Some(e) = write_err {
            // Output gone (a closed pipe): stop without moving the checkpoint past the line.
            return Err(CliError::failure(format!("writing output: {e}")));
        }
        let _ = out.flush();
        if n > 0 {
            save(&fol)?;
        }
        if stopped_on_alert || (fail_on_alert && alerted) {
            save(&fol)?;
            return Err(CliError::new(
                exit::AUDIT_ALERT,
                "alert raised (--fail-on-alert); the checkpoint is past the alerting line",
            ));
        }
        if STOP.load(Ordering::SeqCst) {
            return Ok(());
        }
        if n == 0 {
            if once {
                return Ok(());
            }
            let end = std::time::Instant::now() + interval;
            while std::time::Instant::now() < end && !STOP.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50).min(interval));
            }
        }
    }
}
