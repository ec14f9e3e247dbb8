//! Shared harness for integration tests: a private temp dir per test holding a keystore,
//! a passphrase file, a backing dir and a mountpoint; mounts are real FUSE mounts of the
//! built `kekfs` binary and are always unmounted (the guard's Drop), even on failure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The passphrase every test keystore uses.
pub const PASS: &str = "correct horse battery staple";

/// Path of the built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kekfs"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
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
    if in_ci() {
        panic!("{test}: {why}, and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
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
        let mut c = Command::new(bin());
        c.arg("--keystore")
            .arg(&self.keystore)
            .arg("--passfile")
            .arg(&self.passfile)
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

    /// Run `kekfs ARGS` and assert success.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "kekfs {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Keystore + key `k` + volume in `backing`.
    pub fn init_volume(&self) {
        self.ok(&["keystore", "init"]);
        self.ok(&["key", "create", "k"]);
        let b = self.backing.to_str().expect("utf-8 path");
        self.ok(&["init", b, "--kek", "soft:k"]);
    }

    /// Mount `backing` on `mnt` with extra `-o` options; the guard unmounts on drop.
    pub fn mount_with(&self, opts: &[&str]) -> Mounted {
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
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&refs);
        assert!(
            is_mounted(&self.mnt),
            "mount returned 0 but nothing is mounted"
        );
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
        std::fs::read_to_string(self.backing.join("kekfs.lock"))
            .expect("lock file")
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid in lock file")
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
