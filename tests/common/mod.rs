//! Shared harness for integration tests: a private temp dir per test holding a keystore,
//! a passphrase file, a backing dir and a mountpoint; mounts are real FUSE mounts of the
//! built `kekfs` binary and are always unmounted (the guard's Drop), even on failure.
//!
//! Helpers for one topic live in submodules: `softhsm` (SoftHSM2 tokens) and `tamper`
//! (content file layout and tampering checks).
#![allow(dead_code)]

pub mod softhsm;
pub mod tamper;

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The passphrase every test keystore uses.
pub const PASS: &str = "correct horse battery staple";

/// Generous bound for "within one poll interval" on a shared, noisy machine.
pub const BOUND: Duration = Duration::from_secs(15);

/// The `-o` option of a mount that polls its key often (tests of revocation and rotation).
pub const POLL: &str = "poll=300ms";

/// Path of the built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kekfs"))
}

/// Is this a CI run (`CI=true`)? Then a missing test dependency is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `test` cannot run here because of `why`: outside CI it is skipped (saying so); with
/// CI=true it fails.
pub fn skip(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: {why}, and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Does `NAME --version` run and succeed?
pub fn tool_ok(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Is fio installed? Outside CI a missing fio skips the test; with CI=true it fails.
pub fn fio_available(test: &str) -> bool {
    if tool_ok("fio") {
        return true;
    }
    skip(test, "fio is not installed");
    false
}

/// Can this machine run FUSE mount tests? Outside CI a missing dependency skips the test
/// (saying so); with CI=true it is a failure.
pub fn fuse_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    let why = if !dev {
        "/dev/fuse is missing"
    } else {
        "mounting needs root here (/dev/fuse is 0600)"
    };
    skip(test, why);
    false
}

/// One test's world.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub keystore: PathBuf,
    pub passfile: PathBuf,
    pub backing: PathBuf,
    pub mnt: PathBuf,
}

impl Env {
    /// A fresh env (no keystore yet). `None` when FUSE tests must be skipped.
    pub fn new(test: &str) -> Option<Env> {
        if !fuse_available(test) {
            return None;
        }
        Some(Self::new_unchecked())
    }

    /// A fresh env without the FUSE check (for CLI tests that never mount).
    pub fn new_unchecked() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("kekfs-test-")
            .tempdir()
            .expect("tempdir");
        let keystore = dir.path().join("keystore");
        let passfile = dir.path().join("pass");
        std::fs::write(&passfile, format!("{PASS}\n")).expect("write passfile");
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        Env {
            dir,
            keystore,
            passfile,
            backing,
            mnt,
        }
    }

    /// A `kekfs` command with this env's keystore and passphrase file.
    pub fn kekfs(&self) -> Command {
        let mut c = self.kekfs_no_passphrase();
        c.arg("--passfile").arg(&self.passfile);
        c
    }

    /// A `kekfs` command with this env's keystore and audit dir but no passphrase source.
    pub fn kekfs_no_passphrase(&self) -> Command {
        let mut c = Command::new(bin());
        c.arg("--keystore")
            .arg(&self.keystore)
            .env_remove("KEKFS_PASSPHRASE")
            .env_remove("KEKFS_PASSFILE")
            .env_remove("KEKFS_KEYSTORE")
            .env("KEKFS_AUDIT_DIR", self.audit_dir());
        c
    }

    /// Where this env's per-volume and per-token audit logs go (`$KEKFS_AUDIT_DIR`).
    pub fn audit_dir(&self) -> PathBuf {
        self.dir.path().join("audit")
    }

    /// Run `kekfs ARGS`, returning the output (no assertion).
    pub fn run(&self, args: &[&str]) -> Output {
        self.kekfs().args(args).output().expect("run kekfs")
    }

    /// Run `kekfs ARGS` and assert success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        check_ok(args, self.run(args))
    }

    /// Run `kekfs ARGS` and assert it exits with `code`.
    #[track_caller]
    pub fn fails(&self, args: &[&str], code: i32) -> Output {
        let o = self.run(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "kekfs {args:?}: stdout {} stderr {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// `kekfs status PATH --json`, parsed.
    pub fn status_json(&self, path: &Path) -> serde_json::Value {
        let out = self.ok(&["status", path.to_str().unwrap(), "--json"]);
        serde_json::from_str(&out).expect("status --json")
    }

    /// The key versions wrapping the volume at `path` (`wrapped_by_versions`).
    pub fn wrapped_by(&self, path: &Path) -> Vec<u64> {
        wrapped_by_versions(&self.status_json(path))
    }

    /// Keystore + key `k` + volume in `backing`.
    pub fn init_volume(&self) {
        self.ok(&["keystore", "init"]);
        self.ok(&["key", "create", "k"]);
        let b = self.backing.to_str().expect("utf-8 path");
        self.ok(&["init", b, "--kek", "soft:k"]);
    }

    /// `kekfs` arguments that mount `backing` on `mnt`, logging to `daemon.log`, with
    /// extra `-o` options.
    pub fn mount_args(&self, opts: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "mount".into(),
            self.backing.display().to_string(),
            self.mnt.display().to_string(),
            "--log".into(),
            self.dir.path().join("daemon.log").display().to_string(),
        ];
        for o in opts {
            args.push("-o".into());
            args.push((*o).into());
        }
        args
    }

    /// Mount `backing` on `mnt` with extra `-o` options; the guard unmounts on drop.
    pub fn mount_with(&self, opts: &[&str]) -> Mounted {
        self.mount_by(opts, |args| {
            self.ok(args);
        })
    }

    /// Mount like `mount_with`, running the `kekfs` arguments with `run` (which asserts
    /// success), for commands that need more than `kekfs()` (a token's environment).
    pub fn mount_by(&self, opts: &[&str], run: impl FnOnce(&[&str])) -> Mounted {
        let args = self.mount_args(opts);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&refs);
        assert!(
            is_mounted(&self.mnt),
            "mount returned 0 but nothing is mounted"
        );
        self.guard()
    }

    /// `kekfs mount BACKING MNT` that must be refused: if it mounted anyway, the mount is
    /// removed and the test fails with `what`. Returns the output (exit code, message).
    #[track_caller]
    pub fn mount_refused(&self, mnt: &Path, what: &str) -> Output {
        let o = self.run(&[
            "mount",
            self.backing.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ]);
        if is_mounted(mnt) {
            force_unmount(mnt);
            panic!("{what}");
        }
        o
    }

    /// The guard for a mount of `backing` on `mnt` made some other way: it unmounts on
    /// drop.
    pub fn guard(&self) -> Mounted {
        Mounted {
            mnt: self.mnt.clone(),
            backing: self.backing.clone(),
        }
    }

    /// Mount with default options.
    pub fn mount(&self) -> Mounted {
        self.mount_with(&[])
    }

    /// The daemon's log so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

/// Is `path` a kekfs mountpoint right now?
pub fn is_mounted(path: &Path) -> bool {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.len() > 2 && Path::new(f[1]) == p && f[2] == "fuse.kekfs"
        })
}

/// A live mount; dropping it unmounts (falling back to a lazy unmount).
pub struct Mounted {
    pub mnt: PathBuf,
    pub backing: PathBuf,
}

impl Mounted {
    /// Path inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Unmount now, asserting it worked. EBUSY is retried for a bounded time: a process
    /// another test thread is spawning holds copies of this process's descriptors (files
    /// just closed here included) until it execs.
    pub fn unmount(self) {
        let run = || {
            Command::new(bin())
                .arg("unmount")
                .arg(&self.mnt)
                .output()
                .expect("run kekfs unmount")
        };
        let mut o = run();
        let end = Instant::now() + Duration::from_secs(10);
        while !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("busy")
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(50));
            o = run();
        }
        assert!(
            o.status.success(),
            "unmount failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!is_mounted(&self.mnt));
        std::mem::forget(self);
    }

    /// The daemon's pid from the lock file.
    pub fn pid(&self) -> i32 {
        lock_pid(&self.backing)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(bin()).arg("unmount").arg(&self.mnt).output();
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
    }
}

/// Daemon pid recorded in the lock file of `backing`.
pub fn lock_pid(backing: &Path) -> i32 {
    std::fs::read_to_string(backing.join("kekfs.lock"))
        .expect("lock file")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid in lock file")
}

/// Is the volume lock of `backing` free (no live daemon holds it)?
pub fn lock_is_free(backing: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(backing.join("kekfs.lock")) else {
        return true;
    };
    // SAFETY: flock on a valid descriptor; released when `f` is closed.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Lazily detach a (possibly dead) mount.
pub fn force_unmount(mnt: &Path) {
    let _ = Command::new("umount").arg("-l").arg(mnt).output();
}

/// Wait until `cond` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Every regular file under `dir` (recursively), for ciphertext scans.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// Content files in the backing dir (excluding kekfs's own metadata files).
pub fn content_files(backing: &Path) -> Vec<PathBuf> {
    files_under(backing)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !n.starts_with("kekfs.")
        })
        .collect()
}

/// Assert a `kekfs ARGS` run succeeded; returns its stdout.
#[track_caller]
pub fn check_ok(args: &[&str], o: Output) -> String {
    assert!(
        o.status.success(),
        "kekfs {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `wrapped_by_versions` of a `kekfs status --json` object.
pub fn wrapped_by_versions(status: &serde_json::Value) -> Vec<u64> {
    status["wrapped_by_versions"]
        .as_array()
        .expect("wrapped_by_versions")
        .iter()
        .map(|v| v.as_u64().expect("version"))
        .collect()
}

/// fallocate(2) on an open file.
pub fn fallocate(f: &std::fs::File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate takes no pointers; the descriptor is open.
    match unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// statvfs(3) of `path`.
pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let cp = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: zeroed is valid for the plain-data statvfs struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    match unsafe { libc::statvfs(cp.as_ptr(), &mut st) } {
        0 => Ok(st),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The errno of reading `p` whole (a fresh open), `None` when the read works.
pub fn read_errno(p: &Path) -> Option<i32> {
    match std::fs::read(p) {
        Ok(_) => None,
        Err(e) => Some(e.raw_os_error().unwrap_or(-1)),
    }
}

/// The errno of reading an open handle from its start, `None` when the read works.
pub fn handle_errno(f: &mut std::fs::File) -> Option<i32> {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    match f.read_to_end(&mut buf) {
        Ok(_) => None,
        Err(e) => Some(e.raw_os_error().unwrap_or(-1)),
    }
}

/// The OS error code of a failed result (`None` on success).
pub fn errno<T>(r: io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

/// setxattr(2) on `p` (following symlinks) with `flags` (0, XATTR_CREATE, XATTR_REPLACE).
pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (cp, cn) = (c_path(p), CString::new(name).unwrap());
    // SAFETY: valid C strings; value pointer/length describe `value`.
    let r = unsafe {
        libc::setxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// getxattr(2) on `p` (following symlinks): the whole value.
pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (cp, cn) = (c_path(p), CString::new(name).unwrap());
    // SAFETY: size query with a null buffer.
    let n = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: buffer pointer/length describe `buf`.
    let m = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(m as usize);
    Ok(buf)
}

/// Every line of every audit log file (`audit.*.log`) in `dir`, oldest first, parsed.
pub fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        let n = p.file_name().unwrap().to_str().unwrap();
        n.starts_with("audit.") && n.ends_with(".log")
    });
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// "OPERATION CODE" of each audit line.
pub fn ops(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            format!(
                "{} {}",
                l["operation"].as_str().unwrap(),
                l["code"].as_str().unwrap()
            )
        })
        .collect()
}

/// xorshift64*: a small deterministic generator for random workloads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True `percent`% of the time.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A directory stream read with libc's opendir/readdir, one entry at a time (glibc fetches
/// entries a 32 KiB buffer at a time, so the kernel asks kekfs in chunks of ~200).
pub struct DirStream(*mut libc::DIR);

impl DirStream {
    pub fn open(p: &Path) -> DirStream {
        let cp = c_path(p);
        // SAFETY: valid C string; the result is checked for NULL.
        let d = unsafe { libc::opendir(cp.as_ptr()) };
        assert!(
            !d.is_null(),
            "opendir {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
        DirStream(d)
    }

    /// The next name, or `None` at the end (an error panics).
    pub fn next_name(&mut self) -> Option<OsString> {
        self.try_next()
            .unwrap_or_else(|e| panic!("readdir failed: {e}"))
    }

    /// The next name, `Ok(None)` at the end, or readdir's error.
    pub fn try_next(&mut self) -> io::Result<Option<OsString>> {
        // SAFETY: errno is thread-local; resetting it tells the end from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: self.0 is an open DIR* until drop.
        let e = unsafe { libc::readdir64(self.0) };
        if e.is_null() {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(0) | None => Ok(None),
                Some(_) => Err(err),
            };
        }
        // SAFETY: readdir64 returned a valid entry with a NUL-terminated name, which we
        // copy before the next call on this stream.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        Ok(Some(OsString::from_vec(name.to_bytes().to_vec())))
    }

    pub fn tell(&mut self) -> libc::c_long {
        // SAFETY: self.0 is an open DIR*.
        unsafe { libc::telldir(self.0) }
    }

    pub fn seek(&mut self, pos: libc::c_long) {
        // SAFETY: self.0 is an open DIR*; pos came from telldir on it.
        unsafe { libc::seekdir(self.0, pos) }
    }

    pub fn rewind(&mut self) {
        // SAFETY: self.0 is an open DIR*.
        unsafe { libc::rewinddir(self.0) }
    }

    /// The names left, without "." and "..".
    pub fn rest(&mut self) -> Vec<OsString> {
        std::iter::from_fn(|| self.next_name())
            .filter(|n| n != "." && n != "..")
            .collect()
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: self.0 came from opendir and is closed exactly once.
        unsafe { libc::closedir(self.0) };
    }
}
