//! A hostile backing directory: someone who can modify it (a storage admin, a sync folder)
//! puts a symbolic link or a FIFO where kekfs expects one of its own files (`kekfs.lock`,
//! `kekfs.volume`, `kekfs.hdrlock`, a directory's `kekfs.dirid`, a long name's sidecar).
//! kekfs, often running as root, must neither write through the link (overwriting or
//! creating a file anywhere on the machine) nor block on the FIFO (hanging a mount, a
//! `status`, a lookup or a listing for good): it refuses anything that is not a regular
//! file. Every step that could hang runs with a time limit, and a FIFO a daemon blocks on
//! is released before the mount is taken down, so a regression fails the test rather than
//! hanging the suite.

mod common;
use common::tamper::assert_eio;
use common::*;

use std::ffi::CString;
use std::io::{self, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long any one command or file system call may take.
const LIMIT: Duration = Duration::from_secs(30);

/// The content of a file outside the backing directory that kekfs must never write.
const VICTIM: &[u8] = b"victim\n";

/// A 200-byte name: too long for an encrypted entry name, so stored with a sidecar.
fn long_name() -> String {
    "x".repeat(200)
}

/// A file outside the backing directory (mode 0644) holding `VICTIM`.
fn victim(env: &Env) -> PathBuf {
    let p = env.dir.path().join("victim");
    std::fs::write(&p, VICTIM).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// The victim still holds exactly `VICTIM`, with mode 0644.
#[track_caller]
fn assert_victim_untouched(p: &Path, what: &str) {
    let md = std::fs::symlink_metadata(p).expect("victim still exists");
    let now = std::fs::read(p).unwrap();
    assert!(
        md.is_file() && now == VICTIM && md.len() == VICTIM.len() as u64,
        "{what}: the victim file outside the backing dir was changed to {:?} ({} bytes)",
        String::from_utf8_lossy(&now),
        md.len()
    );
    assert_eq!(
        md.permissions().mode() & 0o7777,
        0o644,
        "{what}: victim mode"
    );
}

/// A directory outside the backing directory for copies and link targets.
fn outside(env: &Env) -> PathBuf {
    let p = env.dir.path().join("outside");
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Replace `p` (if present) by a FIFO.
fn make_fifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(
        r,
        0,
        "mkfifo {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

/// Replace `p` (if present) by a symbolic link to `target`.
fn make_symlink(target: &Path, p: &Path) {
    let _ = std::fs::remove_file(p);
    std::os::unix::fs::symlink(target, p).unwrap();
}

/// Replace the regular file `p` by a symbolic link to a copy of it outside the backing
/// directory (same content: only the link itself is wrong).
fn symlink_to_copy(env: &Env, p: &Path) {
    let copy = outside(env).join(format!(
        "copy-of-{}",
        p.file_name().unwrap().to_string_lossy()
    ));
    std::fs::copy(p, &copy).unwrap();
    make_symlink(&copy, p);
}

/// Unblock whoever is blocked opening the FIFO `p` (a reader waiting for a writer or the
/// other way round), remove it so that nobody blocks on it again, and close our end so
/// that a reader sees end of file.
fn release_fifo(p: &Path) {
    // O_RDWR on a FIFO never blocks (Linux) and counts as both a reader and a writer.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p);
    let _ = std::fs::remove_file(p);
    std::thread::sleep(Duration::from_millis(200));
    drop(f);
}

/// Pids of `kekfs` processes working on this env (their command line names its temp dir):
/// daemons a failed test may leave behind.
fn strays(env: &Env) -> Vec<i32> {
    let me = std::process::id() as i32;
    let exe = std::fs::canonicalize(bin()).unwrap_or_else(|_| bin());
    let needle = env.dir.path().as_os_str().as_bytes();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(link) = std::fs::read_link(e.path().join("exe")) else {
            continue;
        };
        // A binary rebuilt meanwhile reads as "PATH (deleted)".
        if !link
            .as_os_str()
            .as_bytes()
            .starts_with(exe.as_os_str().as_bytes())
        {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            out.push(pid);
        }
    }
    out
}

/// Take down whatever a test left: a mount on `env.mnt` (lazily, without asking kekfs,
/// which may itself hang on the hostile files) and any kekfs process of this env.
fn tidy(env: &Env) {
    if is_mounted(&env.mnt) {
        force_unmount(&env.mnt);
    }
    if !wait_for(Duration::from_secs(5), || strays(env).is_empty()) {
        for pid in strays(env) {
            // SAFETY: signalling a kekfs process this test started (its command line
            // names this test's private temp dir).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Tidies up when dropped, also when the test fails. Declare it after the env and before
/// any mount guard, so that it runs after the guard's unmount.
struct Tidy<'a>(&'a Env);

impl Drop for Tidy<'_> {
    fn drop(&mut self) {
        tidy(self.0);
    }
}

/// Run `kekfs ARGS` (with the env's keystore and passphrase) for at most `LIMIT`. On
/// timeout it is killed, `fifo` (if any) released, the env tidied, and the test fails.
/// Output goes to files, not pipes: a daemon the command forks keeps its copies.
fn run_bounded(env: &Env, args: &[&str], fifo: Option<&Path>) -> Output {
    let mut out = tempfile::tempfile_in(env.dir.path()).unwrap();
    let mut err = tempfile::tempfile_in(env.dir.path()).unwrap();
    let mut child = env
        .kekfs()
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .expect("spawn kekfs");
    let end = Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(f) = fifo {
                release_fifo(f);
            }
            tidy(env);
            panic!("kekfs {args:?} did not finish within {LIMIT:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |f: &mut std::fs::File| {
        let mut b = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut b).unwrap();
        b
    };
    Output {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// `kekfs mount BACKING MNT`, bounded (see `run_bounded`). Returns its output and whether
/// it mounted; a mount is taken down at once (without asking kekfs).
fn mount_bounded(env: &Env, fifo: Option<&Path>) -> (Output, bool) {
    let args = env.mount_args(&[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_bounded(env, &refs, fifo);
    let mounted = is_mounted(&env.mnt);
    if mounted {
        if let Some(f) = fifo {
            release_fifo(f);
        }
        tidy(env);
    }
    (o, mounted)
}

/// The mount must have been refused: nonzero exit, nothing mounted, stderr names `file`.
#[track_caller]
fn assert_refused(o: &Output, mounted: bool, file: &str, what: &str) {
    assert!(
        !mounted,
        "{what}: the mount went ahead (exit {:?}, stderr {})",
        o.status.code(),
        stderr(o)
    );
    assert!(!o.status.success(), "{what}: mount exited 0");
    assert!(
        stderr(o).contains(file),
        "{what}: the error does not name {file}: {}",
        stderr(o)
    );
}

/// Run `f` on another thread for at most `LIMIT`. On timeout, `on_timeout` runs (release
/// what the daemon blocks on, take the mount down) and the test fails.
fn in_time<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
    on_timeout: impl FnOnce(),
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            on_timeout();
            panic!("{what} did not finish within {LIMIT:?}: kekfs hangs");
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the thread panicked"),
    }
}

/// The names in directory `p` (every entry, or the first error).
fn list(p: &Path) -> io::Result<Vec<String>> {
    std::fs::read_dir(p)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect()
}

/// List `dir` with a time limit; on timeout the FIFO is released and the mount removed.
fn list_in_time(env: &Env, dir: PathBuf, fifo: &Path) -> io::Result<Vec<String>> {
    let what = format!("listing {}", dir.display());
    in_time(
        &what,
        move || list(&dir),
        || {
            release_fifo(fifo);
            tidy(env);
        },
    )
}

/// Stat `p` (a lookup) with a time limit, like `list_in_time`.
fn lookup_in_time(env: &Env, p: PathBuf, fifo: &Path) -> io::Result<std::fs::Metadata> {
    let what = format!("looking up {}", p.display());
    in_time(
        &what,
        move || std::fs::symlink_metadata(&p),
        || {
            release_fifo(fifo);
            tidy(env);
        },
    )
}

/// Backing entries of `dir` other than kekfs's own files.
fn user_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("kekfs.")
        })
        .collect()
}

/// A volume with a directory `d` made through the mount (then unmounted): returns the
/// backing path of `d`'s `kekfs.dirid`.
fn volume_with_subdir(env: &Env) -> PathBuf {
    env.init_volume();
    let m = env.mount();
    std::fs::create_dir(m.p("d")).unwrap();
    std::fs::write(m.p("d/f"), b"inside").unwrap();
    m.unmount();
    let dirs: Vec<PathBuf> = user_entries(&env.backing)
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "one backing subdirectory: {dirs:?}");
    let id = dirs[0].join("kekfs.dirid");
    assert!(id.is_file(), "{} is a regular file", id.display());
    id
}

/// A volume whose root holds the 200-byte-named file and "ok" (then unmounted): returns
/// the backing path of the long name's sidecar.
fn volume_with_long_name(env: &Env) -> PathBuf {
    env.init_volume();
    let m = env.mount();
    std::fs::write(m.p(&long_name()), b"long").unwrap();
    std::fs::write(m.p("ok"), b"ok").unwrap();
    m.unmount();
    let sidecars: Vec<PathBuf> = std::fs::read_dir(&env.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("kekfs.") && n.ends_with(".n")
        })
        .collect();
    assert_eq!(sidecars.len(), 1, "one long-name sidecar: {sidecars:?}");
    let entry = sidecars[0].with_extension("");
    assert!(entry.is_file(), "long entry {} exists", entry.display());
    sidecars[0].clone()
}

// ---------------------------------------------------------------------------------------
// kekfs.lock
// ---------------------------------------------------------------------------------------

#[test]
fn lock_symlink_mount_refused_victim_untouched() {
    let Some(env) = Env::new("lock_symlink_mount_refused_victim_untouched") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let v = victim(&env);
    make_symlink(&v, &env.backing.join("kekfs.lock"));
    let (o, mounted) = mount_bounded(&env, None);
    assert_victim_untouched(&v, "mount with kekfs.lock -> victim");
    assert_refused(&o, mounted, "kekfs.lock", "kekfs.lock is a symlink");
    assert!(
        stderr(&o).contains("remove it and try again"),
        "the error says what to do: {}",
        stderr(&o)
    );
    // Which works, and leaves the victim alone.
    std::fs::remove_file(env.backing.join("kekfs.lock")).unwrap();
    env.mount().unmount();
    assert_victim_untouched(&v, "mount after removing the link");
}

/// A backing directory copied with hard links (`cp -al`, rsnapshot): kekfs.lock has two
/// names, one of them another volume's. The mount is refused with what to do, rather
/// than writing its pid into the other copy's lock.
#[test]
fn hard_linked_lock_is_refused_with_a_remedy() {
    let Some(env) = Env::new("hard_linked_lock_is_refused_with_a_remedy") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let other = outside(&env).join("kekfs.lock");
    std::fs::write(&other, b"").unwrap();
    let lock = env.backing.join("kekfs.lock");
    let _ = std::fs::remove_file(&lock);
    std::fs::hard_link(&other, &lock).unwrap();
    let (o, mounted) = mount_bounded(&env, None);
    assert_refused(&o, mounted, "kekfs.lock", "kekfs.lock has two names");
    assert!(
        stderr(&o).contains("hard links") && stderr(&o).contains("remove it"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(&other).unwrap(),
        b"",
        "the other copy's lock was written"
    );
    std::fs::remove_file(&lock).unwrap();
    env.mount().unmount();
}

#[test]
fn lock_dangling_symlink_mount_refused_nothing_created() {
    let Some(env) = Env::new("lock_dangling_symlink_mount_refused_nothing_created") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let target = outside(&env).join("created-by-kekfs");
    make_symlink(&target, &env.backing.join("kekfs.lock"));
    let (o, mounted) = mount_bounded(&env, None);
    assert!(
        std::fs::symlink_metadata(&target).is_err(),
        "mount created {} through a dangling kekfs.lock symlink",
        target.display()
    );
    assert_refused(
        &o,
        mounted,
        "kekfs.lock",
        "kekfs.lock is a dangling symlink",
    );
}

#[test]
fn lock_fifo_mount_refused_in_time() {
    let Some(env) = Env::new("lock_fifo_mount_refused_in_time") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let fifo = env.backing.join("kekfs.lock");
    make_fifo(&fifo);
    let (o, mounted) = mount_bounded(&env, Some(&fifo));
    assert_refused(&o, mounted, "kekfs.lock", "kekfs.lock is a FIFO");
}

#[test]
fn lock_fifo_status_returns_in_time() {
    let Some(env) = Env::new("lock_fifo_status_returns_in_time") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let fifo = env.backing.join("kekfs.lock");
    make_fifo(&fifo);
    // Its exit code is not the point (the volume is not mounted either way): it returns.
    run_bounded(
        &env,
        &["status", env.backing.to_str().unwrap()],
        Some(&fifo),
    );
    release_fifo(&fifo);
}

/// A mounted volume whose `kekfs.lock` was then replaced by a FIFO (the daemon keeps its
/// lock on the file it opened): `status` and `unmount` read the lock of a mounted volume.
fn mounted_then_lock_fifo(env: &Env) -> (Mounted, PathBuf) {
    env.init_volume();
    let m = env.mount();
    let fifo = env.backing.join("kekfs.lock");
    make_fifo(&fifo);
    (m, fifo)
}

#[test]
fn lock_fifo_status_of_mounted_volume_returns_in_time() {
    let Some(env) = Env::new("lock_fifo_status_of_mounted_volume_returns_in_time") else {
        return;
    };
    let _tidy = Tidy(&env);
    let (m, fifo) = mounted_then_lock_fifo(&env);
    for path in [&env.backing, &env.mnt] {
        // Its exit code is not the point: it returns.
        run_bounded(&env, &["status", path.to_str().unwrap()], Some(&fifo));
    }
    release_fifo(&fifo);
    m.unmount();
}

#[test]
fn lock_fifo_unmount_returns_in_time() {
    let Some(env) = Env::new("lock_fifo_unmount_returns_in_time") else {
        return;
    };
    let _tidy = Tidy(&env);
    let (_m, fifo) = mounted_then_lock_fifo(&env);
    let o = run_bounded(&env, &["unmount", env.mnt.to_str().unwrap()], Some(&fifo));
    release_fifo(&fifo);
    assert!(
        !is_mounted(&env.mnt),
        "kekfs unmount left the volume mounted (exit {:?}): {}",
        o.status.code(),
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------------------
// kekfs.volume
// ---------------------------------------------------------------------------------------

#[test]
fn volume_header_fifo_mount_refused_in_time() {
    let Some(env) = Env::new("volume_header_fifo_mount_refused_in_time") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let fifo = env.backing.join("kekfs.volume");
    make_fifo(&fifo);
    let (o, mounted) = mount_bounded(&env, Some(&fifo));
    assert_refused(&o, mounted, "kekfs.volume", "kekfs.volume is a FIFO");
}

#[test]
fn volume_header_fifo_status_fails_in_time() {
    let Some(env) = Env::new("volume_header_fifo_status_fails_in_time") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let fifo = env.backing.join("kekfs.volume");
    make_fifo(&fifo);
    let o = run_bounded(
        &env,
        &["status", env.backing.to_str().unwrap()],
        Some(&fifo),
    );
    release_fifo(&fifo);
    assert!(
        !o.status.success(),
        "status of a volume whose header is a FIFO exited 0: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        stderr(&o).contains("kekfs.volume"),
        "the error does not name kekfs.volume: {}",
        stderr(&o)
    );
}

#[test]
fn volume_header_symlink_mount_refused() {
    let Some(env) = Env::new("volume_header_symlink_mount_refused") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    symlink_to_copy(&env, &env.backing.join("kekfs.volume"));
    let (o, mounted) = mount_bounded(&env, None);
    assert_refused(&o, mounted, "kekfs.volume", "kekfs.volume is a symlink");
}

// ---------------------------------------------------------------------------------------
// kekfs.hdrlock
// ---------------------------------------------------------------------------------------

#[test]
fn hdrlock_symlink_rewrap_refused_victim_untouched() {
    let Some(env) = Env::new("hdrlock_symlink_rewrap_refused_victim_untouched") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let v = victim(&env);
    make_symlink(&v, &env.backing.join("kekfs.hdrlock"));
    let o = run_bounded(&env, &["rewrap", env.backing.to_str().unwrap()], None);
    assert_victim_untouched(&v, "rewrap with kekfs.hdrlock -> victim");
    assert!(
        !o.status.success(),
        "rewrap went ahead with kekfs.hdrlock a symlink: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        stderr(&o).contains("kekfs.hdrlock") && stderr(&o).contains("symbolic link"),
        "the error names the file and what is wrong with it: {}",
        stderr(&o)
    );
}

#[test]
fn hdrlock_dangling_symlink_rewrap_refused_nothing_created() {
    let Some(env) = Env::new("hdrlock_dangling_symlink_rewrap_refused_nothing_created") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let target = outside(&env).join("created-by-kekfs");
    make_symlink(&target, &env.backing.join("kekfs.hdrlock"));
    let o = run_bounded(&env, &["rewrap", env.backing.to_str().unwrap()], None);
    assert!(
        std::fs::symlink_metadata(&target).is_err(),
        "rewrap created {} through a dangling kekfs.hdrlock symlink",
        target.display()
    );
    assert!(
        !o.status.success(),
        "rewrap went ahead with kekfs.hdrlock a dangling symlink: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

// ---------------------------------------------------------------------------------------
// A directory's kekfs.dirid
// ---------------------------------------------------------------------------------------

#[test]
fn dirid_fifo_gives_eio_not_a_hang() {
    let Some(env) = Env::new("dirid_fifo_gives_eio_not_a_hang") else {
        return;
    };
    let _tidy = Tidy(&env);
    let id = volume_with_subdir(&env);
    make_fifo(&id);
    let m = env.mount();
    let r = list_in_time(&env, m.p("d"), &id);
    assert_eio(r, "listing d (kekfs.dirid is a FIFO)");
    let r = lookup_in_time(&env, m.p("d/anything"), &id);
    assert_eio(r, "lookup in d (kekfs.dirid is a FIFO)");
    // The root is unaffected.
    assert!(list(&env.mnt).unwrap().contains(&"d".to_string()));
    release_fifo(&id);
    m.unmount();
}

#[test]
fn dirid_symlink_gives_eio() {
    let Some(env) = Env::new("dirid_symlink_gives_eio") else {
        return;
    };
    let _tidy = Tidy(&env);
    let id = volume_with_subdir(&env);
    symlink_to_copy(&env, &id);
    let m = env.mount();
    let r = list_in_time(&env, m.p("d"), &id);
    assert_eio(r, "listing d (kekfs.dirid is a symlink)");
    let r = lookup_in_time(&env, m.p("d/f"), &id);
    assert_eio(r, "lookup in d (kekfs.dirid is a symlink)");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// Long-name sidecars
// ---------------------------------------------------------------------------------------

#[test]
fn sidecar_fifo_listing_skips_entry_in_time() {
    let Some(env) = Env::new("sidecar_fifo_listing_skips_entry_in_time") else {
        return;
    };
    let _tidy = Tidy(&env);
    let side = volume_with_long_name(&env);
    make_fifo(&side);
    let m = env.mount();
    let names = list_in_time(&env, env.mnt.clone(), &side).expect("listing the root");
    assert!(names.contains(&"ok".to_string()), "{names:?}");
    assert!(
        !names.contains(&long_name()),
        "long name listed through a FIFO sidecar: {names:?}"
    );
    release_fifo(&side);
    m.unmount();
}

#[test]
fn sidecar_symlink_listing_skips_entry() {
    let Some(env) = Env::new("sidecar_symlink_listing_skips_entry") else {
        return;
    };
    let _tidy = Tidy(&env);
    let side = volume_with_long_name(&env);
    symlink_to_copy(&env, &side);
    let m = env.mount();
    let names = list_in_time(&env, env.mnt.clone(), &side).expect("listing the root");
    assert!(names.contains(&"ok".to_string()), "{names:?}");
    assert!(
        !names.contains(&long_name()),
        "long name listed through a symlinked sidecar: {names:?}"
    );
    m.unmount();
}

#[test]
fn sidecar_symlink_rename_refused_victim_untouched() {
    let Some(env) = Env::new("sidecar_symlink_rename_refused_victim_untouched") else {
        return;
    };
    let _tidy = Tidy(&env);
    let side = volume_with_long_name(&env);
    let v = victim(&env);
    make_symlink(&v, &side);
    let m = env.mount();
    std::fs::write(m.p("short"), b"short").unwrap();
    let r = std::fs::rename(m.p("short"), m.p(&long_name()));
    assert_victim_untouched(&v, "rename onto a long name whose sidecar -> victim");
    assert_eio(r, "rename onto a long name whose sidecar is a symlink");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// The KEK URI in kekfs.volume
// ---------------------------------------------------------------------------------------

/// Rewrite the KEK URI in the volume header at `backing` and fix its checksum, as someone
/// without the keys can (the MAC, which they cannot forge, is checked only once the AEK is
/// unwrapped). Layout: magic 8, version 2, flags 2, volume id 16, block size 4, pinned
/// version 4, URI length 2 (little endian), URI, ..., MAC 32, SHA-256 of all before 32.
fn forge_header_uri(backing: &Path, uri: &str) {
    use sha2::{Digest, Sha256};
    let p = backing.join("kekfs.volume");
    let b = std::fs::read(&p).unwrap();
    let old_len = u16::from_le_bytes([b[36], b[37]]) as usize;
    let mut n = b[..36].to_vec();
    n.extend_from_slice(&(uri.len() as u16).to_le_bytes());
    n.extend_from_slice(uri.as_bytes());
    n.extend_from_slice(&b[38 + old_len..b.len() - 32]);
    let sum = Sha256::digest(&n);
    n.extend_from_slice(&sum);
    std::fs::write(&p, n).unwrap();
}

/// A volume header whose KEK URI names a PKCS#11 module planted in the backing directory
/// (a library whose constructor would run as root on load): mount, status, rewrap and
/// verify must refuse the module before loading it.
#[test]
fn header_naming_a_planted_module_is_refused_before_loading_it() {
    let Some(env) = Env::new("header_naming_a_planted_module_is_refused_before_loading_it") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let marker = outside(&env).join("module-code-ran");
    let src = env.dir.path().join("evil.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void run(void) {{ \
             FILE *f = fopen(\"{}\", \"w\"); if (f) fclose(f); }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let module = env.backing.join("zz.so");
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&module)
        .arg(&src)
        .output()
        .expect("run cc (needed to build Rust, so present)");
    assert!(cc.status.success(), "cc: {}", stderr(&cc));
    forge_header_uri(
        &env.backing,
        &format!(
            "pkcs11:token=t;object=k?module-path={}&pin-source=env:KEKFS_TEST_PIN",
            module.display()
        ),
    );
    let b = env.backing.to_str().unwrap();
    let (o, mounted) = mount_bounded(&env, None);
    assert!(!mounted && !o.status.success(), "mount went ahead");
    assert!(
        stderr(&o).contains("zz.so") && stderr(&o).contains("PKCS#11 module"),
        "the error names the module: {}",
        stderr(&o)
    );
    for args in [
        vec!["rewrap", b],
        vec!["verify", b],
        vec!["status", b, "--json"],
    ] {
        let _ = run_bounded(&env, &args, None);
    }
    assert!(
        !marker.exists(),
        "the planted module's code ran (it created {})",
        marker.display()
    );
}

/// Someone holding `kekfs.hdrlock` for good (anyone who can open it can) makes a rewrap
/// fail after a bounded wait, naming the lock, instead of blocking it (and, online, the
/// key monitor) forever.
#[test]
fn held_hdrlock_fails_rewrap_in_bounded_time() {
    let Some(env) = Env::new("held_hdrlock_fails_rewrap_in_bounded_time") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(env.backing.join("kekfs.hdrlock"))
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let o = run_bounded(&env, &["rewrap", env.backing.to_str().unwrap()], None);
    assert!(!o.status.success(), "rewrap went ahead under a held lock");
    assert!(
        stderr(&o).contains("kekfs.hdrlock"),
        "the error names the lock: {}",
        stderr(&o)
    );
    drop(lock);
    env.ok(&["rewrap", env.backing.to_str().unwrap()]);
}

/// The backing directory itself swapped for a link to another directory while mounted
/// (by whoever can write its parent, a sync folder say): the key monitor keeps reading
/// and rewriting the header of the directory it mounted, and writes nothing into the
/// other one.
#[test]
fn online_rewrap_stays_in_the_mounted_directory_after_a_swap() {
    let Some(env) = Env::new("online_rewrap_stays_in_the_mounted_directory_after_a_swap") else {
        return;
    };
    let _tidy = Tidy(&env);
    env.init_volume();
    let m = env.mount_with(&["poll=100ms"]);
    std::fs::write(m.p("f"), b"data").unwrap();
    let moved = env.dir.path().join("backing-moved");
    let decoy = outside(&env).join("decoy");
    std::fs::create_dir(&decoy).unwrap();
    std::fs::rename(&env.backing, &moved).unwrap();
    make_symlink(&decoy, &env.backing);
    env.ok(&["key", "rotate", "k"]);
    assert!(
        wait_for(Duration::from_secs(20), || env.wrapped_by(&moved) == [2, 1]),
        "the mounted volume's header was not rewrapped in place: {:?}",
        env.wrapped_by(&moved)
    );
    let stray: Vec<_> = std::fs::read_dir(&decoy)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        stray.is_empty(),
        "written into the decoy directory: {stray:?}"
    );
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"data");
    // Put it back so that the guard's unmount finds the volume where it was mounted.
    std::fs::remove_file(&env.backing).unwrap();
    std::fs::rename(&moved, &env.backing).unwrap();
    m.unmount();
}
