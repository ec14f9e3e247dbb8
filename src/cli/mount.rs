//! `kekfs mount`, `unmount` and `status`: the volume lock, mount options, the daemon's
//! life cycle, and reporting on active mounts.

use super::daemon::{self, Ready};
use super::error::CliError;
use super::{exit, logger, mounts};
use crate::format::LOCK_FILE;
use crate::fuse::KekFs;
use crate::kek::{KekUri, ProviderOptions};
use crate::monitor::{Gate, Monitor, Stop, Timing, status};
use crate::untrusted;
use crate::volume::{self, Volume};
use fuser::{Config, MountOption, SessionACL};
use log::{error, info};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options for `kekfs mount`.
#[derive(Debug, Default)]
pub struct MountArgs {
    /// The backing directory.
    pub backing: PathBuf,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// `-o` option strings (comma-separated lists).
    pub options: Vec<String>,
    /// Stay in the foreground.
    pub foreground: bool,
    /// Log file for the daemon (default: syslog once detached).
    pub log: Option<PathBuf>,
    /// Debug logging.
    pub verbose: bool,
}

/// Parsed `-o` options.
#[derive(Debug, Default)]
pub struct Options {
    /// Mount read-only.
    pub read_only: bool,
    /// Let other users access the mount.
    pub allow_other: bool,
    /// Let root (and the owner) access the mount.
    pub allow_root: bool,
    /// Kernel mount flags passed through.
    pub flags: Vec<MountOption>,
    /// `kek=URI`: must match the volume's KEK.
    pub kek: Option<String>,
    /// `passfile=FILE`.
    pub passfile: Option<PathBuf>,
    /// `keystore=DIR`.
    pub keystore: Option<PathBuf>,
    /// `log=FILE`.
    pub log: Option<PathBuf>,
    /// `threads=N`.
    pub threads: Option<usize>,
    /// `poll=DURATION`: KEK poll interval.
    pub poll: Option<Duration>,
    /// `grace=DURATION`: how long a transient provider outage is tolerated.
    pub grace: Option<Duration>,
    /// `cache=writeback`: kernel write-back caching (default: write-through).
    pub writeback: bool,
    /// `uring=off`: serve /dev/fuse only, even where the kernel offers FUSE over io_uring.
    pub no_uring: bool,
    /// `spin=DURATION`: how long an io_uring thread looks for the next request before it
    /// sleeps.
    pub spin: Option<Duration>,
    /// `audit=fail-closed|best-effort`: what to do when the audit log cannot be written.
    pub audit: Option<crate::audit::Policy>,
    /// `audit_dir=DIR`: base directory of the volume's audit log.
    pub audit_dir: Option<PathBuf>,
    /// `audit_heartbeat=DURATION`: interval of poll lines while nothing changes.
    pub audit_heartbeat: Option<Duration>,
}

/// Threads serving each CPU's io_uring queue. Two, so one long request (an fsync, a
/// big read) does not hold up every other caller on that CPU.
const URING_THREADS_PER_CPU: usize = 2;

/// How long an io_uring thread looks for the next request before it sleeps (`spin=`).
/// Back-to-back requests (queue depth 1) then find the thread awake: measured here, 4 KiB
/// direct random reads 43k -> 74-83k IOPS. Costs CPU time only while requests keep coming
/// (at most this long after the last one).
const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// How requests reach the daemon, for `kekfs status`.
fn transport(uring_active: &std::sync::atomic::AtomicBool) -> &'static str {
    if uring_active.load(std::sync::atomic::Ordering::Relaxed) {
        "io_uring"
    } else {
        "/dev/fuse"
    }
}

/// The daemon's published status. The key monitor and the transport thread both update
/// it; each update takes the current key state and transport, and publishes under the
/// lock, so a later update never loses to an earlier one.
struct StatusBoard {
    current: std::sync::Mutex<status::Published>,
    uring_active: Arc<std::sync::atomic::AtomicBool>,
}

impl StatusBoard {
    fn update(&self, gate: &Gate, f: impl FnOnce(&mut status::Published)) {
        let mut p = self.current.lock().unwrap_or_else(|e| e.into_inner());
        p.key_state = status::state_json(gate);
        p.transport = transport(&self.uring_active).into();
        f(&mut p);
        status::publish(&p);
    }
}

/// Parse a duration: `50us`, `500ms`, `2s`, `5m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let mult = match unit {
        "us" => 0.000_001,
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    let secs = n * mult;
    (secs.is_finite() && (0.0..=86_400.0 * 365.0).contains(&secs))
        .then(|| Duration::from_secs_f64(secs))
}

/// Parse `-o` option lists. Unknown options are an error; fstab-only ones are ignored.
pub fn parse_options(list: &[String]) -> Result<Options, CliError> {
    let mut o = Options::default();
    for opt in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let need = |v: Option<&str>| {
            v.filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or_else(|| {
                    CliError::new(
                        exit::USAGE,
                        format!("mount option {k} needs a value ({k}=...)"),
                    )
                })
        };
        match k {
            "ro" => o.read_only = true,
            "rw" => o.read_only = false,
            "allow_other" => o.allow_other = true,
            "allow_root" => o.allow_root = true,
            "default_permissions" => {}
            "dev" => o.flags.push(MountOption::Dev),
            "nodev" => o.flags.push(MountOption::NoDev),
            "suid" => o.flags.push(MountOption::Suid),
            "nosuid" => o.flags.push(MountOption::NoSuid),
            "exec" => o.flags.push(MountOption::Exec),
            "noexec" => o.flags.push(MountOption::NoExec),
            "atime" => o.flags.push(MountOption::Atime),
            "noatime" => o.flags.push(MountOption::NoAtime),
            "sync" => o.flags.push(MountOption::Sync),
            "async" => o.flags.push(MountOption::Async),
            "dirsync" => o.flags.push(MountOption::DirSync),
            "kek" => o.kek = Some(need(v)?),
            "audit" => {
                o.audit = Some(
                    need(v)?
                        .parse()
                        .map_err(|m: String| CliError::new(exit::USAGE, format!("audit=: {m}")))?,
                )
            }
            "audit_dir" => o.audit_dir = Some(need(v)?.into()),
            "audit_heartbeat" => {
                let raw = need(v)?;
                o.audit_heartbeat = Some(parse_duration(&raw).ok_or_else(|| {
                    CliError::new(
                        exit::USAGE,
                        format!("audit_heartbeat={raw}: expected a duration like 30s or 10m"),
                    )
                })?);
            }
            "passfile" => o.passfile = Some(need(v)?.into()),
            "keystore" => o.keystore = Some(need(v)?.into()),
            "log" => o.log = Some(need(v)?.into()),
            "cache" => match need(v)?.as_str() {
                "writeback" => o.writeback = true,
                "writethrough" => o.writeback = false,
                other => {
                    return Err(CliError::new(
                        exit::USAGE,
                        format!("cache={other}: expected writeback or writethrough"),
                    ));
                }
            },
            "uring" => match need(v)?.as_str() {
                "auto" => o.no_uring = false,
                "off" => o.no_uring = true,
                other => {
                    return Err(CliError::new(
                        exit::USAGE,
                        format!("uring={other}: expected auto or off"),
                    ));
                }
            },
            "spin" => {
                let raw = need(v)?;
                let d = parse_duration(&raw)
                    .filter(|d| *d <= Duration::from_millis(10))
                    .ok_or_else(|| {
                        CliError::new(
                            exit::USAGE,
                            format!("spin={raw}: expected a duration from 0 to 10ms, like 50us"),
                        )
                    })?;
                o.spin = Some(d);
            }
            "poll" | "grace" => {
                let raw = need(v)?;
                let d = parse_duration(&raw).ok_or_else(|| {
                    CliError::new(
                        exit::USAGE,
                        format!("{k}={raw}: expected a duration like 500ms, 2s, 5m or 1h"),
                    )
                })?;
                if k == "poll" {
                    if d < Duration::from_millis(100) {
                        return Err(CliError::new(exit::USAGE, "poll must be at least 100ms"));
                    }
                    o.poll = Some(d);
                } else {
                    o.grace = Some(d);
                }
            }
            "threads" => {
                let n: usize = need(v)?.parse().map_err(|_| {
                    CliError::new(exit::USAGE, "threads=N needs a number from 1 to 64")
                })?;
                if !(1..=64).contains(&n) {
                    return Err(CliError::new(
                        exit::USAGE,
                        "threads=N needs a number from 1 to 64",
                    ));
                }
                o.threads = Some(n);
            }
            "remount" => {
                return Err(CliError::new(
                    exit::USAGE,
                    "kekfs cannot change a mounted volume's options (remount); unmount it and mount it again",
                ));
            }
            // fstab / mount(8) options that concern mount(8), systemd or fuse helpers only.
            "defaults" | "auto" | "noauto" | "user" | "users" | "nouser" | "owner" | "_netdev"
            | "nofail" | "relatime" | "norelatime" | "strictatime" => {}
            _ if k.starts_with("x-") || k.starts_with("comment") => {}
            _ => {
                return Err(CliError::new(
                    exit::USAGE,
                    format!("unknown mount option {opt:?} (see `kekfs mount --help`)"),
                ));
            }
        }
    }
    o.flags = last_flag_wins(std::mem::take(&mut o.flags));
    Ok(o)
}

/// As mount(8) does, a later flag overrides an earlier opposite one (`nodev,…,dev` is
/// `dev`: mount.fuse3 appends `dev,suid` to the options it passes on).
fn last_flag_wins(flags: Vec<MountOption>) -> Vec<MountOption> {
    use MountOption::*;
    let opposite = |f: &MountOption| match f {
        Dev => Some(NoDev),
        NoDev => Some(Dev),
        Suid => Some(NoSuid),
        NoSuid => Some(Suid),
        Exec => Some(NoExec),
        NoExec => Some(Exec),
        Atime => Some(NoAtime),
        NoAtime => Some(Atime),
        Sync => Some(Async),
        Async => Some(Sync),
        _ => None,
    };
    let mut out: Vec<MountOption> = Vec::new();
    for f in flags {
        out.retain(|g| Some(g) != opposite(&f).as_ref() && *g != f);
        out.push(f);
    }
    out
}

/// How long `VolumeLock::acquire` waits for a holder that has no mount (see there).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The lock a mounted volume holds in its backing directory.
pub struct VolumeLock {
    file: File,
}

impl VolumeLock {
    /// Take the lock, or say who holds it. A holder whose volume is not mounted any more is
    /// a daemon still shutting down after an unmount (`umount` returns before the daemon
    /// has zeroized its keys and exited), or one still mounting: wait up to
    /// `LOCK_WAIT` for it, so that `umount M && kekfs mount B M` works.
    pub fn acquire(backing: &Path) -> Result<VolumeLock, CliError> {
        let path = backing.join(LOCK_FILE);
        // The backing directory is untrusted: no symlink (the pid is written into this
        // file, as root), no FIFO (see `untrusted`).
        let mut file =
            untrusted::open(&path, libc::O_RDWR | libc::O_CREAT, 0o600).map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::InvalidData {
                    "; if no kekfs process is using this volume, remove it and try again"
                } else {
                    ""
                };
                CliError::failure(format!("cannot open {}: {e}{hint}", path.display()))
            })?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on a valid descriptor.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(VolumeLock { file });
            }
            let mounted = mounts::find_by_backing(backing).is_some();
            if mounted || Instant::now() >= deadline {
                let mut who = String::new();
                let _ = file.rewind();
                // The backing directory is untrusted: read a bounded amount.
                let _ = (&mut file).take(4096).read_to_string(&mut who);
                // Written by whoever can write the backing directory: shown with any
                // control characters escaped.
                let mut it = who.lines().map(super::printable);
                let pid = it.next().unwrap_or_else(|| "?".into());
                let mp = it.next().unwrap_or_else(|| "?".into());
                let msg = if mounted {
                    format!(
                        "{} is already mounted at {mp} (pid {pid}); unmount it first with `kekfs unmount {mp}`",
                        backing.display()
                    )
                } else {
                    format!(
                        "{} is locked by kekfs pid {pid}, which has not mounted it (still \
                         starting, or still shutting down after an unmount) and did not let \
                         go within {} s",
                        backing.display(),
                        LOCK_WAIT.as_secs()
                    )
                };
                return Err(CliError::new(exit::ALREADY_MOUNTED, msg));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Record the holder (pid and mountpoint) for error messages and `status`.
    pub fn record(&mut self, mountpoint: &Path) {
        let _ = self.file.set_len(0);
        let _ = self.file.rewind();
        let _ = write!(
            self.file,
            "{}\n{}\n",
            std::process::id(),
            mountpoint.display()
        );
        let _ = self.file.sync_data();
    }

    /// Is the lock of `backing` held by a running daemon?
    pub fn is_held(backing: &Path) -> bool {
        let Ok(f) = untrusted::open(&backing.join(LOCK_FILE), libc::O_RDONLY, 0) else {
            return false;
        };
        // SAFETY: flock on a valid descriptor; released at once if we got it.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        r != 0
    }

    /// The pid recorded in the lock file.
    pub fn holder_pid(backing: &Path) -> Option<u32> {
        let who = untrusted::read(&backing.join(LOCK_FILE), 4096).ok()?;
        String::from_utf8_lossy(&who)
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

fn canonical_dir(p: &Path, what: &str) -> Result<PathBuf, CliError> {
    let c = std::fs::canonicalize(p)
        .map_err(|e| CliError::new(exit::MOUNT_FAILED, format!("{what} {}: {e}", p.display())))?;
    if !c.is_dir() {
        return Err(CliError::new(
            exit::MOUNT_FAILED,
            format!("{what} {} is not a directory", p.display()),
        ));
    }
    Ok(c)
}

/// `kekfs mount`: unlock the volume, mount it, and (unless `--foreground`) return once the
/// mount is ready while a detached daemon serves it.
pub fn mount(args: MountArgs, mut popts: ProviderOptions) -> Result<(), CliError> {
    let opts = parse_options(&args.options)?;
    // Before any secret is read: no core dumps (inherited by the daemon), key memory
    // locked where the limits allow (not inherited: the daemon locks again below).
    let mut hardening = super::harden::disable_core_dumps();
    if let Err(m) = super::harden::lock_memory() {
        eprintln!("kekfs: warning: {m}");
    }
    if let Some(ks) = &opts.keystore {
        popts.keystore_dir = ks.clone();
    }
    if let Some(pf) = &opts.passfile {
        popts.passphrase = crate::kek::passphrase::PassphraseSource::File(pf.clone());
    }
    let backing = std::fs::canonicalize(&args.backing).map_err(|e| {
        CliError::new(
            exit::NOT_A_VOLUME,
            format!("backing directory {}: {e}", args.backing.display()),
        )
    })?;
    let mountpoint = canonical_dir(&args.mountpoint, "mountpoint")?;
    if mountpoint == backing || mountpoint.starts_with(&backing) {
        return Err(CliError::new(
            exit::MOUNT_FAILED,
            "the mountpoint must not be inside the backing directory",
        ));
    }
    let (header, _) = volume::read_header(&backing)?;
    if let Some(m) = mounts::find_by_mountpoint(&mountpoint) {
        return Err(CliError::new(
            exit::ALREADY_MOUNTED,
            format!(
                "{} already has a kekfs volume mounted ({}); unmount it first",
                mountpoint.display(),
                m.backing.display()
            ),
        ));
    }
    let mut lock = VolumeLock::acquire(&backing)?;
    let uri = KekUri::parse(&header.kek_uri)?;
    if let Some(k) = &opts.kek
        && KekUri::parse(k)? != uri
    {
        return Err(CliError::new(
            exit::USAGE,
            format!("kek={k} does not match the volume's KEK {}", header.kek_uri),
        ));
    }
    crate::audit::sink::update(|s| {
        s.policy = opts.audit.unwrap_or(s.policy);
        s.base_dir = opts.audit_dir.clone().unwrap_or(s.base_dir.clone());
        s.heartbeat = opts.audit_heartbeat.unwrap_or(s.heartbeat);
        if s.command.is_empty() {
            // Run as mount.kekfs / by mount.fuse3: still a mount.
            s.command = "mount".into();
        }
    });
    let started = Instant::now();
    let provider = crate::audit::open_audited(&uri, &popts, Some((&header.volume_id, &backing)))?;
    let provider_open = started.elapsed();
    let vol = Volume::open(&backing, &provider)?;
    let times = MountTimes {
        started,
        provider_open,
        volume_open: started.elapsed() - provider_open,
    };

    let mut ready = if args.foreground {
        Ready::foreground()
    } else {
        daemon::daemonize()?
    };
    let log_target = match args.log.clone().or(opts.log.clone()) {
        Some(p) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
        {
            Ok(f) => logger::Target::File(f),
            Err(e) => {
                let err = CliError::failure(format!("cannot open log file {}: {e}", p.display()));
                ready.fail(&err);
                return Err(err);
            }
        },
        None if ready.detached() => logger::Target::Syslog,
        None => logger::Target::Stderr,
    };
    logger::init(log_target, args.verbose);
    // Memory locks do not survive fork; in the foreground the warning was printed above.
    if let Err(m) = super::harden::lock_memory()
        && ready.detached()
    {
        hardening.push(m);
    }
    match super::harden::raise_nofile_limit() {
        Ok(n) => log::debug!("descriptor limit {n}"),
        Err(e) => hardening.push(format!("could not raise the descriptor limit: {e}")),
    }
    super::harden::presize_fd_table(super::harden::nofile_limit());
    for m in &hardening {
        log::warn!("{m}");
    }
    // From here on audit write failures go to the daemon log only.
    crate::audit::sink::update(|s| s.warn_on_stderr = false);
    match serve(
        vol,
        provider,
        &backing,
        &mountpoint,
        &opts,
        &mut ready,
        &mut lock,
        &times,
    ) {
        Ok(()) => Ok(()),
        Err(e) => {
            error!("{}", e.message);
            ready.fail(&e);
            Err(e)
        }
    }
}

/// The sequential read-ahead window of a mount, in KiB: as large as the read-ahead the
/// daemon asks for in INIT (`fuse::MAX_READAHEAD`). Linux starts a FUSE mount at its default
/// window (128 KiB) whatever the filesystem asks for; only /sys/class/bdi raises it.
/// Measured on a tmpfs backing, 512 MiB sequential 1 MiB reads, same mount alternating:
/// 1150-1260 MiB/s at 128 KiB, 1530-1565 at 1024 KiB, 1430 at 4096 KiB. Later, with the
/// reads over io_uring, 2048 KiB against 1024 (ten rounds): median 2028 against 1822
/// MiB/s (1395-2370 against 1610-2256); 3072 and 4096 KiB were no better than 2048.
const READAHEAD_KB: u32 = crate::fuse::MAX_READAHEAD / 1024;

/// Raise the mount's read-ahead window to `READAHEAD_KB` (needs root; without it the
/// kernel default stays, which only costs sequential read speed).
fn set_readahead(mountpoint: &Path) {
    let Some(dev) = mounts::device_of(mountpoint) else {
        info!("read-ahead left at the kernel default: mount not found in mountinfo");
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, format!("{READAHEAD_KB}\n")) {
        Ok(()) => log::debug!("read-ahead {READAHEAD_KB} KiB ({path})"),
        Err(e) => info!("read-ahead left at the kernel default ({path}: {e})"),
    }
}

/// When a mount started and how long its phases took, for the "mounted" log line.
struct MountTimes {
    started: Instant,
    /// Opening the KEK provider: the passphrase KDF for `soft:`, login for `pkcs11:`.
    provider_open: Duration,
    /// Reading, unwrapping and checking the volume header.
    volume_open: Duration,
}

// Everything a mount needs is decided in `mount` before the fork and handed over here;
// bundling the arguments into a one-use struct would only rename them.
#[allow(clippy::too_many_arguments)]
fn serve(
    vol: Volume,
    provider: crate::audit::Audited,
    backing: &Path,
    mountpoint: &Path,
    opts: &Options,
    ready: &mut Ready,
    lock: &mut VolumeLock,
    times: &MountTimes,
) -> Result<(), CliError> {
    crate::fuse::sys::set_umask(0);
    let vid = volume::hex(vol.id());
    let gate = Arc::new(Gate::new(vol));
    // `spin=0` turns off the write helper's spinning too.
    let split_spin = match opts.spin {
        Some(d) if d.is_zero() => Duration::ZERO,
        _ => crate::fuse::SPLIT_SPIN,
    };
    let fs = KekFs::with_cache(
        gate.clone(),
        backing,
        opts.read_only,
        opts.writeback,
        split_spin,
    )
    .map_err(|e| {
        CliError::new(
            exit::MOUNT_FAILED,
            format!("opening backing directory: {e}"),
        )
    })?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(backing.display().to_string()),
        MountOption::CUSTOM("subtype=kekfs".into()),
        MountOption::DefaultPermissions,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.mount_options.extend(opts.flags.iter().cloned());
    config.acl = if opts.allow_other {
        SessionACL::All
    } else if opts.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.unwrap_or(4));
    // One /dev/fuse descriptor per thread: no contention on a shared channel lock.
    config.clone_fd = true;
    if !opts.no_uring {
        config.io_uring_threads = URING_THREADS_PER_CPU;
        config.io_uring_spin = opts.spin.unwrap_or(DEFAULT_SPIN);
    }
    let purger = fs.cache_purger();
    fs.set_fd_limit(super::harden::nofile_limit());
    daemon::block_signals();
    let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(|e| {
        CliError::new(
            exit::MOUNT_FAILED,
            format!("mounting at {} failed: {e}", mountpoint.display()),
        )
    })?;
    lock.record(mountpoint);
    set_readahead(mountpoint);
    let uring_active = session.io_uring_active();
    let notifier = session.notifier();
    gate.on_revoke(move || purger.purge(&notifier));
    let timing = Timing {
        poll: opts.poll.unwrap_or(Timing::default().poll),
        grace: opts.grace.unwrap_or(Timing::default().grace),
    };
    let audit = provider.audit().clone();
    let capture = provider.capture();
    let slot0 = volume::read_header(backing)
        .map(|(h, _)| h.slots[0].key_version)
        .ok();
    crate::audit::volume::state_line(
        &audit,
        crate::audit::record::op::MOUNT,
        200,
        slot0,
        format!(
            "mounted at {} (poll {:?}, grace {:?}, audit={})",
            mountpoint.display(),
            timing.poll,
            timing.grace,
            audit.policy()
        ),
        true,
    )?;
    let mut monitor = Monitor::new(
        gate.clone(),
        Box::new(provider),
        backing.to_path_buf(),
        timing,
    );
    monitor.on_event = Some(crate::audit::volume::monitor_hook(
        audit.clone(),
        capture,
        crate::audit::sink::settings().heartbeat,
    ));
    let published = status::Published {
        pid: std::process::id(),
        volume_id: vid.clone(),
        backing: backing.to_path_buf(),
        mountpoint: mountpoint.to_path_buf(),
        key_state: status::state_json(&gate),
        key_version: slot0.unwrap_or(0),
        last_ok_poll: Some(crate::time::unix_now()),
        poll_ms: timing.poll.as_millis() as u64,
        grace_ms: timing.grace.as_millis() as u64,
        transport: transport(&uring_active).into(),
    };
    status::publish(&published);
    let board = Arc::new(StatusBoard {
        current: std::sync::Mutex::new(published),
        uring_active,
    });
    // The rings register a few milliseconds into the session, after this first
    // publication: publish again once they have, rather than at the next key poll; or
    // say why the mount stays on /dev/fuse.
    // The session can end first (an unmount right after mounting): the thread then stops
    // and is joined before the status file is removed, so it cannot publish after that.
    let stop = Stop::default();
    let mut transport_thread = None;
    if !opts.no_uring {
        let board = board.clone();
        let gate = gate.clone();
        let stop = stop.clone();
        transport_thread = std::thread::Builder::new()
            .name("kekfs-transport".into())
            .spawn(move || {
                let since = std::time::Instant::now();
                while !board
                    .uring_active
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    if stop.wait(Duration::from_millis(5)) {
                        return;
                    }
                    if since.elapsed() > Duration::from_secs(3) {
                        // The first publication (/dev/fuse) stands.
                        info!(
                            "FUSE over io_uring unavailable (it needs Linux 6.14+ with \
                             /sys/module/fuse/parameters/enable_uring=Y); serving /dev/fuse"
                        );
                        return;
                    }
                }
                board.update(&gate, |_| {});
            })
            .ok();
    }
    monitor.on_poll = Some(Box::new(move |gate, last_ok, key_version| {
        board.update(gate, |p| {
            p.last_ok_poll = last_ok.map(crate::time::unix_secs);
            p.key_version = key_version.unwrap_or(p.key_version);
        });
    }));
    let stop_monitor = stop.clone();
    let monitor_thread = std::thread::Builder::new()
        .name("kekfs-monitor".into())
        .spawn(move || monitor.run(stop_monitor))
        .map_err(|e| CliError::failure(format!("starting the key monitor: {e}")))?;
    let mut unmounter = session.unmount_callable();
    let mp = mountpoint.to_path_buf();
    daemon::on_termination(move |sig| {
        info!("signal {sig}: unmounting {}", mp.display());
        if let Err(e) = unmounter.unmount() {
            if e.raw_os_error() != Some(libc::EBUSY) {
                error!("unmount on signal failed: {e}");
                return;
            }
            // Busy (a process works inside): detach lazily, as libfuse does; the session
            // ends once the last user lets go.
            info!("{} is busy; detaching it lazily", mp.display());
            let r = crate::fuse::sys::cstr(mp.as_os_str().as_encoded_bytes()).and_then(|c| {
                // SAFETY: valid C string path.
                match unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            });
            if let Err(e) = r {
                error!("lazy unmount of {} on signal failed: {e}", mp.display());
            }
        }
    });
    let total = times.started.elapsed();
    info!(
        "volume {vid} ({}) mounted at {} in {} ms (KEK provider {} ms, including any \
         passphrase KDF; volume header {} ms; FUSE mount {} ms)",
        backing.display(),
        mountpoint.display(),
        total.as_millis(),
        times.provider_open.as_millis(),
        times.volume_open.as_millis(),
        total
            .saturating_sub(times.provider_open + times.volume_open)
            .as_millis(),
    );
    ready.ok();
    if ready.detached() {
        daemon::detach_stdio();
    }
    let r = session.run();
    stop.stop();
    let _ = monitor_thread.join();
    if let Some(t) = transport_thread {
        let _ = t.join();
    }
    status::remove(&vid);
    crate::audit::sink::new_activity();
    let _ = crate::audit::volume::state_line(
        &audit,
        crate::audit::record::op::UNMOUNT,
        200,
        None,
        format!("unmounted from {}", mountpoint.display()),
        true,
    );
    info!("volume {vid} unmounted from {}", mountpoint.display());
    r.map_err(|e| CliError::failure(format!("FUSE session ended with an error: {e}")))
}

/// `kekfs unmount`: unmount and wait for the daemon to finish.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), CliError> {
    let abs = if mountpoint.is_absolute() {
        mountpoint.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| CliError::failure(e.to_string()))?
            .join(mountpoint)
    };
    // A dead mount (daemon killed) cannot be canonicalized; fall back to the given path.
    let mp = std::fs::canonicalize(&abs).unwrap_or(abs);
    let Some(entry) = mounts::find_by_mountpoint(&mp) else {
        return Err(CliError::new(
            exit::NOT_MOUNTED,
            format!("{} is not a mounted kekfs volume", mp.display()),
        ));
    };
    let c = crate::fuse::sys::cstr(mp.as_os_str().as_encoded_bytes())
        .map_err(|e| CliError::failure(e.to_string()))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid C string path.
    let r = unsafe { libc::umount2(c.as_ptr(), flags) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EBUSY) => {
                return Err(CliError::failure(format!(
                    "{} is busy (open files or a process inside it); close them or use `kekfs unmount --lazy`",
                    mp.display()
                )));
            }
            Some(libc::EPERM) => {
                let st = std::process::Command::new("fusermount3")
                    .arg("-u")
                    .args(lazy.then_some("-z"))
                    .arg(&mp)
                    .status()
                    .map_err(|e| CliError::failure(format!("running fusermount3: {e}")))?;
                if !st.success() {
                    return Err(CliError::failure(format!(
                        "fusermount3 -u {} failed",
                        mp.display()
                    )));
                }
            }
            _ => {
                return Err(CliError::failure(format!(
                    "unmounting {}: {e}",
                    mp.display()
                )));
            }
        }
    }
    // Wait for the daemon to let go of the volume (it flushes and zeroizes keys first).
    let deadline = Instant::now() + Duration::from_secs(10);
    while VolumeLock::is_held(&entry.backing) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What `status` reports for one volume.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// Backing directory.
    pub backing: PathBuf,
    /// Mountpoint, if mounted.
    pub mountpoint: Option<PathBuf>,
    /// Daemon pid, if mounted.
    pub pid: Option<u32>,
    /// Volume id (hex).
    pub volume_id: String,
    /// KEK URI.
    pub kek: String,
    /// Pinned KEK version (0 = follows latest).
    pub pinned_version: u32,
    /// Key versions wrapping the AEK, slot 0 first.
    pub wrapped_by_versions: Vec<u32>,
    /// Mount options, if mounted.
    pub options: Option<String>,
    /// Key state published by the mount daemon (active / grace / revoked / unavailable,
    /// with cause), if mounted.
    pub key_state: Option<serde_json::Value>,
    /// Last successful KEK poll (Unix seconds), if mounted.
    pub last_ok_poll: Option<u64>,
    /// How the kernel's requests reach the daemon (`io_uring` or `/dev/fuse`), if mounted.
    pub transport: Option<String>,
}

fn status_of(backing: &Path, entry: Option<&mounts::MountEntry>) -> Result<Status, CliError> {
    let (h, _) = volume::read_header(backing)?;
    let mounted = entry.is_some();
    let published = if mounted {
        status::read(&volume::hex(&h.volume_id))
    } else {
        None
    };
    Ok(Status {
        backing: backing.to_path_buf(),
        mountpoint: entry.map(|e| e.mountpoint.clone()),
        // A dead daemon (killed) leaves its mount listed and its pid in the lock file;
        // only a live lock holder is reported.
        pid: if mounted && VolumeLock::is_held(backing) {
            VolumeLock::holder_pid(backing)
        } else {
            None
        },
        volume_id: volume::hex(&h.volume_id),
        kek: h.kek_uri.clone(),
        pinned_version: h.pinned_version,
        wrapped_by_versions: h.slots.iter().map(|s| s.key_version).collect(),
        options: entry.map(|e| e.options.clone()),
        key_state: published.as_ref().map(|p| p.key_state.clone()),
        last_ok_poll: published.as_ref().and_then(|p| p.last_ok_poll),
        transport: published.as_ref().map(|p| p.transport.clone()),
    })
}

/// `kekfs status [PATH]`: one volume (backing dir or mountpoint), or every kekfs mount.
pub fn status(path: Option<&Path>, json: bool) -> Result<(), CliError> {
    let list: Vec<Status> = match path {
        Some(p) => {
            let c = std::fs::canonicalize(p)
                .map_err(|e| CliError::new(exit::NOT_A_VOLUME, format!("{}: {e}", p.display())))?;
            let s = if let Some(m) = mounts::find_by_mountpoint(&c) {
                status_of(&m.backing.clone(), Some(&m))?
            } else {
                let m = mounts::find_by_backing(&c);
                status_of(&c, m.as_ref())?
            };
            vec![s]
        }
        None => mounts::kekfs_mounts()
            .iter()
            .filter_map(|m| status_of(&m.backing, Some(m)).ok())
            .collect(),
    };
    if json {
        let v = if path.is_some() {
            serde_json::to_string_pretty(&list[0])
        } else {
            serde_json::to_string_pretty(&list)
        };
        println!("{}", v.map_err(|e| CliError::failure(e.to_string()))?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no kekfs volumes mounted");
    }
    for s in &list {
        println!("volume {}", s.volume_id);
        println!("  backing:    {}", s.backing.display());
        match (&s.mountpoint, s.pid) {
            (Some(m), Some(pid)) => println!("  mounted at: {} (pid {pid})", m.display()),
            (Some(m), None) => println!(
                "  mounted at: {} (daemon not running; clean up with `kekfs unmount {}`)",
                m.display(),
                m.display()
            ),
            _ => println!("  mounted at: (not mounted)"),
        }
        println!("  kek:        {}", s.kek);
        println!(
            "  key version: {} (slots wrapped by versions {:?})",
            if s.pinned_version == 0 {
                "follows latest".to_string()
            } else {
                format!("pinned to {}", s.pinned_version)
            },
            s.wrapped_by_versions
        );
        if let Some(o) = &s.options {
            println!("  options:    {o}");
        }
        if let Some(t) = s.transport.as_deref().filter(|t| !t.is_empty()) {
            println!("  transport:  {t}");
        }
        if let Some(st) = &s.key_state {
            let name = st.get("state").and_then(|v| v.as_str()).unwrap_or("?");
            let detail = st
                .get("cause")
                .and_then(|v| v.as_str())
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            println!("  key state:  {name}{detail}");
        }
        if let Some(t) = s.last_ok_poll {
            println!("  last ok poll: {}", crate::time::format_time(t));
        }
    }
    Ok(())
}
