//! POSIX behaviour through the kernel: every FUSE operation kekfs serves, exercised with
//! std::fs and libc calls on a real mount and checked against expected outcomes (and, for
//! content, against an in-memory model), with remounts where persistence matters.

mod common;
use common::*;

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// An env with an initialised volume, or `None` when FUSE tests are skipped.
fn setup(test: &str) -> Option<Env> {
    let env = Env::new(test)?;
    env.init_volume();
    Some(env)
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The errno of a failed io::Result, panicking if it succeeded.
fn errno_of<T: std::fmt::Debug>(r: io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: not an OS error: {e}")),
    }
}

/// Deterministic pseudo-random bytes (never all-zero blocks).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// A tiny LCG for choosing offsets and sizes.
struct Rng(u64);
impl Rng {
    fn below(&mut self, m: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % m
    }
}

/// Sorted names of a directory, as raw bytes.
fn list(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    v.sort();
    v
}

fn names(v: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = v.iter().map(OsString::from).collect();
    v.sort();
    v
}

/// Position of the first differing byte, for readable assertion messages.
fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: content differs (got {} bytes, want {}; first difference at byte {first})",
        got.len(),
        want.len()
    );
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64), flags: i32) -> io::Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let cp = c(p);
    // SAFETY: valid C string and a two-element timespec array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), ts.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn renameat2(old: &Path, new: &Path, flags: u32) -> io::Result<()> {
    let (o, n) = (c(old), c(new));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            o.as_ptr(),
            libc::AT_FDCWD,
            n.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    let cp = c(p);
    // SAFETY: size query with a null buffer.
    let n = unsafe { libc::listxattr(cp.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; n as usize];
    // SAFETY: buffer pointer/length describe `buf`.
    let m = unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(m as usize);
    let mut v: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8(n.to_vec()).unwrap())
        .collect();
    v.sort();
    Ok(v)
}

fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (cp, cn) = (c(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    let r = unsafe { libc::removexattr(cp.as_ptr(), cn.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Run `child` in a child process as uid/gid 65534; returns its exit code (`child` must
/// only make raw libc calls).
///
/// The child is a `clone(CLONE_VM | CLONE_FILES | CLONE_VFORK)`: it shares the memory and
/// the descriptor table instead of copying them, so it never holds extra references to
/// files other tests (running in parallel threads) have open or mapped on their mounts —
/// a forked copy would, and would make their unmounts fail with EBUSY while it lives.
/// Credentials are per task, so setuid in the child leaves this process root; it uses the
/// raw syscalls (glibc's wrappers would broadcast the change to this process's threads).
fn as_nobody(mut child: impl FnMut() -> i32) -> i32 {
    type Job<'a> = &'a mut dyn FnMut() -> i32;
    extern "C" fn trampoline(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` points at the `Job` below, alive while the parent waits (VFORK).
        let job = unsafe { &mut *arg.cast::<Job<'_>>() };
        // SAFETY: raw credential syscalls affecting only this task.
        let dropped = unsafe {
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
                && libc::syscall(libc::SYS_setgid, 65534) == 0
                && libc::syscall(libc::SYS_setuid, 65534) == 0
        };
        if !dropped {
            return 120;
        }
        job()
    }
    let mut job: Job<'_> = &mut child;
    let mut stack = vec![0u8; 512 * 1024];
    // SAFETY: one past the end of `stack`, rounded down to 16 bytes (stacks grow down).
    let top = unsafe { stack.as_mut_ptr().add(stack.len()) };
    let top = top.wrapping_sub(top as usize % 16);
    // SAFETY: the child runs `trampoline` on its own stack and exits when it returns;
    // CLONE_VFORK suspends this thread until then, so `job` and `stack` outlive it.
    let pid = unsafe {
        libc::clone(
            trampoline,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut job as *mut Job<'_>).cast(),
        )
    };
    assert!(pid > 0, "clone failed: {}", io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", io::Error::last_os_error());
    drop(stack);
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally: {status:#x}"
    );
    libc::WEXITSTATUS(status)
}

/// Total backing usage (allocated bytes) of every file under `dir`.
fn allocated_bytes(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .map(|p| {
            fs::symlink_metadata(p)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0)
        })
        .sum()
}

fn umask() -> u32 {
    let s = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = s
        .lines()
        .find(|l| l.starts_with("Umask:"))
        .expect("Umask line");
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).expect("octal umask")
}

// ---------------------------------------------------------------------------------------
// Content: create, write, read, overwrite, append, truncate-on-open
// ---------------------------------------------------------------------------------------

const SIZES: [usize; 12] = [
    0,
    1,
    2,
    100,
    4095,
    4096,
    4097,
    8191,
    8192,
    8193,
    65536 + 17,
    (1 << 20) + 3,
];

#[test]
fn write_read_sizes_across_block_boundaries() {
    let Some(env) = setup("write_read_sizes_across_block_boundaries") else {
        return;
    };
    let m = env.mount();
    for (i, &n) in SIZES.iter().enumerate() {
        let data = pattern(i as u64 + 1, n);
        fs::write(m.p(&format!("f{n}")), &data).unwrap();
        let md = fs::metadata(m.p(&format!("f{n}"))).unwrap();
        assert_eq!(md.len(), n as u64, "st_size of a {n}-byte file");
        assert!(md.is_file());
        if n > 0 {
            assert!(md.blocks() > 0, "st_blocks of a written {n}-byte file is 0");
        }
        assert_bytes_eq(
            &fs::read(m.p(&format!("f{n}"))).unwrap(),
            &data,
            "read back",
        );
    }
    // Reads in odd-sized chunks see the same bytes.
    let mut f = File::open(m.p(&format!("f{}", (1 << 20) + 3))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4097];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    drop(f);
    m.unmount();
    let m = env.mount();
    for (i, &n) in SIZES.iter().enumerate() {
        let data = pattern(i as u64 + 1, n);
        let p = m.p(&format!("f{n}"));
        assert_eq!(fs::metadata(&p).unwrap().len(), n as u64);
        assert_bytes_eq(&fs::read(&p).unwrap(), &data, "read after remount");
        if n == (1 << 20) + 3 {
            assert_bytes_eq(&got, &data, "chunked read");
        }
    }
}

#[test]
fn overwrite_at_odd_offsets_matches_model() {
    let Some(env) = setup("overwrite_at_odd_offsets_matches_model") else {
        return;
    };
    let m = env.mount();
    let path = m.p("model");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng(7);
    // Fixed edge cases first, then random ones.
    let mut ops: Vec<(u64, usize)> = vec![
        (0, 4097),
        (4095, 2),
        (4096, 1),
        (1, 4094),
        (4000, 9000),
        (12287, 1),
        (20000, 3), // past EOF: leaves a zero gap
        (8192, 4096),
        (16383, 4098),
        (0, 0),
        ((1 << 20) - 1, 5),
    ];
    for _ in 0..60 {
        ops.push((rng.below(70_000), rng.below(12_000) as usize));
    }
    for (i, (off, len)) in ops.into_iter().enumerate() {
        let data = pattern(100 + i as u64, len);
        f.write_all_at(&data, off).unwrap();
        let end = off as usize + len;
        if len > 0 && model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..off as usize + len].copy_from_slice(&data);
        assert_eq!(f.metadata().unwrap().len(), model.len() as u64, "op {i}");
        // A partial read around the written range.
        let rs = off.saturating_sub(100);
        let mut buf = vec![0u8; len + 200];
        let n = f.read_at(&mut buf, rs).unwrap();
        let ms = (rs as usize).min(model.len());
        let me = (rs as usize + len + 200).min(model.len());
        assert_eq!(n, me - ms, "op {i}: short read length");
        assert_bytes_eq(&buf[..n], &model[ms..me], &format!("op {i} partial read"));
        if i % 10 == 0 {
            assert_bytes_eq(&fs::read(&path).unwrap(), &model, &format!("op {i}"));
        }
    }
    f.sync_data().unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_bytes_eq(&fs::read(&path).unwrap(), &model, "after fsync/close");
    m.unmount();
    let m = env.mount();
    assert_bytes_eq(&fs::read(m.p("model")).unwrap(), &model, "after remount");
}

#[test]
fn read_past_eof_returns_nothing() {
    let Some(env) = setup("read_past_eof_returns_nothing") else {
        return;
    };
    let m = env.mount();
    let data = pattern(3, 5000);
    fs::write(m.p("f"), &data).unwrap();
    let f = File::open(m.p("f")).unwrap();
    let mut buf = vec![0xAAu8; 8192];
    assert_eq!(f.read_at(&mut buf, 5000).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, 5001).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, 1 << 40).unwrap(), 0);
    let n = f.read_at(&mut buf, 4990).unwrap();
    assert_eq!(n, 10);
    assert_eq!(&buf[..10], &data[4990..]);
    // An empty file reads as nothing.
    File::create(m.p("empty")).unwrap();
    assert_eq!(fs::read(m.p("empty")).unwrap(), b"");
    assert_eq!(fs::metadata(m.p("empty")).unwrap().len(), 0);
    let mut f = File::open(m.p("f")).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    assert_eq!(f.read(&mut buf).unwrap(), 0);
}

#[test]
fn append_and_truncate_on_open() {
    let Some(env) = setup("append_and_truncate_on_open") else {
        return;
    };
    let m = env.mount();
    let path = m.p("log");
    let mut want = Vec::new();
    {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        for i in 0..5u64 {
            let chunk = pattern(i + 50, 1000 + 1500 * i as usize);
            f.write_all(&chunk).unwrap();
            want.extend_from_slice(&chunk);
        }
    }
    // Another O_APPEND open appends after what is there; so does a positioned write
    // through an O_APPEND descriptor (Linux ignores the offset).
    {
        let f = OpenOptions::new().append(true).open(&path).unwrap();
        let chunk = pattern(99, 4097);
        (&f).write_all(&chunk).unwrap();
        want.extend_from_slice(&chunk);
        f.sync_all().unwrap();
    }
    assert_bytes_eq(&fs::read(&path).unwrap(), &want, "appended");
    assert_eq!(fs::metadata(&path).unwrap().len(), want.len() as u64);

    // O_TRUNC on open empties the file; a write then starts at 0.
    {
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
        f.write_all(b"fresh").unwrap();
    }
    assert_eq!(fs::read(&path).unwrap(), b"fresh");
    // O_TRUNC without writing leaves an empty file; fs::write replaces longer content.
    fs::write(&path, pattern(5, 10_000)).unwrap();
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(fs::read(&path).unwrap(), b"");
    fs::write(&path, pattern(6, 9000)).unwrap();
    fs::write(&path, b"short").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"short");
    // O_EXCL on an existing name fails.
    let e = OpenOptions::new().write(true).create_new(true).open(&path);
    assert_eq!(errno_of(e, "O_EXCL on existing"), libc::EEXIST);
    m.unmount();
    let m = env.mount();
    assert_eq!(fs::read(m.p("log")).unwrap(), b"short");
}

#[test]
fn fsync_and_dir_fsync_succeed() {
    let Some(env) = setup("fsync_and_dir_fsync_succeed") else {
        return;
    };
    let m = env.mount();
    fs::create_dir(m.p("d")).unwrap();
    let mut f = File::create(m.p("d/f")).unwrap();
    f.write_all(&pattern(1, 12345)).unwrap();
    f.flush().unwrap();
    f.sync_data().unwrap();
    f.sync_all().unwrap();
    drop(f);
    let d = File::open(m.p("d")).unwrap();
    d.sync_all().unwrap();
    drop(d);
    // The ciphertext reached the backing directory.
    let backing_total: u64 = content_files(&env.backing)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(backing_total > 12345, "backing holds {backing_total} bytes");
    assert_bytes_eq(&fs::read(m.p("d/f")).unwrap(), &pattern(1, 12345), "read");
}

#[test]
fn new_files_get_requested_mode_minus_umask() {
    let Some(env) = setup("new_files_get_requested_mode_minus_umask") else {
        return;
    };
    let m = env.mount();
    let mask = umask();
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(m.p("f"))
        .unwrap();
    let mode = fs::metadata(m.p("f")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o666 & !mask, "file mode with umask {mask:o}");
    fs::create_dir(m.p("d")).unwrap();
    let mode = fs::metadata(m.p("d")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o777 & !mask, "dir mode with umask {mask:o}");
    let md = fs::metadata(m.p("f")).unwrap();
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!((md.uid(), md.gid()), (uid, gid), "owner of a new file");
}

// ---------------------------------------------------------------------------------------
// setattr: chmod, chown, truncate, utimens, sizes
// ---------------------------------------------------------------------------------------

#[test]
fn chmod_and_chown() {
    let Some(env) = setup("chmod_and_chown") else {
        return;
    };
    let m = env.mount();
    fs::write(m.p("f"), b"data").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    for (p, mode) in [("f", 0o640), ("f", 0o4755), ("d", 0o2750), ("f", 0o600)] {
        fs::set_permissions(m.p(p), fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(
            fs::metadata(m.p(p)).unwrap().mode() & 0o7777,
            mode,
            "chmod {p} {mode:o}"
        );
    }
    std::os::unix::fs::chown(m.p("f"), Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    std::os::unix::fs::chown(m.p("d"), None, Some(4321)).unwrap();
    let md = fs::metadata(m.p("d")).unwrap();
    assert_eq!((md.uid(), md.gid()), (0, 4321));
    // fchmod / fchown through an open descriptor.
    let f = File::open(m.p("f")).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o604))
        .unwrap();
    std::os::unix::fs::fchown(&f, Some(42), None).unwrap();
    drop(f);
    m.unmount();
    let m = env.mount();
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o604);
    assert_eq!((md.uid(), md.gid()), (42, 5678));
    assert_eq!(fs::read(m.p("f")).unwrap(), b"data");
    let md = fs::metadata(m.p("d")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o2750);
    assert_eq!(md.gid(), 4321);
}

#[test]
fn truncate_shrink_and_extend() {
    let Some(env) = setup("truncate_shrink_and_extend") else {
        return;
    };
    let m = env.mount();
    let path = m.p("t");
    let data = pattern(11, 10_000);
    fs::write(&path, &data).unwrap();
    let mut model = data.clone();

    // Path truncate (no open handle) and ftruncate through a descriptor.
    let by_path = |size: u64| {
        let cp = c(&path);
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::truncate(cp.as_ptr(), size as i64) }, 0);
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let steps: [(u64, bool); 10] = [
        (20_000, true),
        (5_000, false),
        (9_000, true),
        (4096, false),
        (4097, false),
        (12_288, true),
        (1, false),
        (8193, true),
        (0, false),
        (3, true),
    ];
    for (i, (size, via_path)) in steps.into_iter().enumerate() {
        if via_path {
            by_path(size);
        } else {
            f.set_len(size).unwrap();
        }
        model.resize(size as usize, 0);
        assert_eq!(fs::metadata(&path).unwrap().len(), size, "step {i}");
        assert_bytes_eq(&fs::read(&path).unwrap(), &model, &format!("step {i}"));
    }
    // Shrink to mid-block, write after a gap, and the cut region reads as zeros.
    fs::write(&path, &data).unwrap();
    f.set_len(6000).unwrap();
    f.write_all_at(b"END", 9000).unwrap();
    let mut want = data[..6000].to_vec();
    want.resize(9000, 0);
    want.extend_from_slice(b"END");
    assert_bytes_eq(
        &fs::read(&path).unwrap(),
        &want,
        "shrink then write past EOF",
    );
    drop(f);
    m.unmount();
    let m = env.mount();
    assert_bytes_eq(&fs::read(m.p("t")).unwrap(), &want, "after remount");
}

#[test]
fn utimens_sets_exact_times() {
    let Some(env) = setup("utimens_sets_exact_times") else {
        return;
    };
    let m = env.mount();
    fs::write(m.p("f"), b"x").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    for p in ["f", "d"] {
        set_times(
            &m.p(p),
            (1_000_000_000, 123_456_789),
            (1_500_000_000, 987_654_321),
            0,
        )
        .unwrap();
        let md = fs::metadata(m.p(p)).unwrap();
        assert_eq!(
            (md.atime(), md.atime_nsec()),
            (1_000_000_000, 123_456_789),
            "{p} atime"
        );
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (1_500_000_000, 987_654_321),
            "{p} mtime"
        );
    }
    // UTIME_OMIT leaves a time alone; UTIME_NOW sets the current time.
    set_times(&m.p("f"), (0, libc::UTIME_OMIT), (1_600_000_000, 0), 0).unwrap();
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!(md.atime(), 1_000_000_000);
    assert_eq!(md.mtime(), 1_600_000_000);
    set_times(&m.p("f"), (0, libc::UTIME_OMIT), (0, libc::UTIME_NOW), 0).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let md = fs::metadata(m.p("f")).unwrap();
    assert!(
        (md.mtime() - now).abs() < 600,
        "UTIME_NOW set mtime {} (now {now})",
        md.mtime()
    );
    // Times before 1970.
    set_times(&m.p("d"), (-86_400, 0), (-1, 500), 0).unwrap();
    let md = fs::metadata(m.p("d")).unwrap();
    assert_eq!(md.atime(), -86_400);
    assert_eq!((md.mtime(), md.mtime_nsec()), (-1, 500));
    m.unmount();
    let m = env.mount();
    let md = fs::metadata(m.p("d")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (-1, 500), "after remount");
}

#[test]
fn writing_updates_mtime_and_size() {
    let Some(env) = setup("writing_updates_mtime_and_size") else {
        return;
    };
    let m = env.mount();
    fs::write(m.p("f"), b"abc").unwrap();
    set_times(&m.p("f"), (1_000_000_000, 0), (1_000_000_000, 0), 0).unwrap();
    let f = OpenOptions::new().write(true).open(m.p("f")).unwrap();
    f.write_all_at(&pattern(1, 5000), 3).unwrap();
    drop(f);
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!(md.len(), 5003);
    assert!(md.mtime() > 1_000_000_000, "write did not update mtime");
    assert!(md.blocks() > 0);
}

// ---------------------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------------------

#[test]
fn mkdir_rmdir_readdir_unlink() {
    let Some(env) = setup("mkdir_rmdir_readdir_unlink") else {
        return;
    };
    let m = env.mount();
    assert_eq!(
        list(&m.mnt),
        Vec::<OsString>::new(),
        "fresh volume lists empty"
    );
    fs::create_dir(m.p("a")).unwrap();
    fs::create_dir_all(m.p("a/b/c/d")).unwrap();
    fs::write(m.p("a/b/c/d/leaf"), b"leaf").unwrap();
    fs::write(m.p("a/file"), b"file").unwrap();
    // Names that look like kekfs internals are ordinary names inside the mount.
    for n in ["kekfs.dirid", "kekfs.volume", "kekfs.L.x", "x.n", ".hidden"] {
        fs::write(m.p(n), n.as_bytes()).unwrap();
    }
    assert_eq!(
        list(&m.mnt),
        names(&[
            "a",
            "kekfs.dirid",
            "kekfs.volume",
            "kekfs.L.x",
            "x.n",
            ".hidden"
        ])
    );
    assert_eq!(list(&m.p("a")), names(&["b", "file"]));
    assert_eq!(list(&m.p("a/b/c/d")), names(&["leaf"]));
    assert!(fs::metadata(m.p("a/b")).unwrap().is_dir());
    // File types in readdir.
    for e in fs::read_dir(m.p("a")).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if e.file_name() == "b" {
            assert!(ft.is_dir());
        } else {
            assert!(ft.is_file());
        }
    }
    // Errors: rmdir non-empty, mkdir existing, rmdir a file, unlink a dir, missing names.
    let cases: [(&str, io::Result<()>, i32); 7] = [
        (
            "rmdir non-empty",
            fs::remove_dir(m.p("a/b")),
            libc::ENOTEMPTY,
        ),
        ("mkdir existing", fs::create_dir(m.p("a")), libc::EEXIST),
        ("rmdir file", fs::remove_dir(m.p("a/file")), libc::ENOTDIR),
        ("unlink dir", fs::remove_file(m.p("a/b")), libc::EISDIR),
        ("unlink missing", fs::remove_file(m.p("nope")), libc::ENOENT),
        (
            "stat missing",
            fs::metadata(m.p("a/nope/x")).map(drop),
            libc::ENOENT,
        ),
        (
            "mkdir in missing",
            fs::create_dir(m.p("nope/x")),
            libc::ENOENT,
        ),
    ];
    for (what, r, want) in cases {
        assert_eq!(errno_of(r, what), want, "{what}");
    }
    // Many entries: readdir needs several kernel round-trips.
    fs::create_dir(m.p("many")).unwrap();
    let mut want = Vec::new();
    for i in 0..300 {
        let n = format!("entry-{i:04}-{}", "x".repeat(i % 120));
        fs::write(m.p(&format!("many/{n}")), i.to_string()).unwrap();
        want.push(OsString::from(n));
    }
    want.sort();
    assert_eq!(list(&m.p("many")), want);
    m.unmount();
    let m = env.mount();
    assert_eq!(list(&m.p("many")), want, "after remount");
    assert_eq!(fs::read(m.p("a/b/c/d/leaf")).unwrap(), b"leaf");
    // Unlink and rmdir everything; the names disappear.
    fs::remove_file(m.p("a/b/c/d/leaf")).unwrap();
    assert_eq!(list(&m.p("a/b/c/d")), Vec::<OsString>::new());
    fs::remove_dir(m.p("a/b/c/d")).unwrap();
    assert_eq!(list(&m.p("a/b/c")), Vec::<OsString>::new());
    fs::remove_dir_all(m.p("a")).unwrap();
    fs::remove_dir_all(m.p("many")).unwrap();
    for n in ["kekfs.dirid", "kekfs.volume", "kekfs.L.x", "x.n", ".hidden"] {
        assert_eq!(fs::read(m.p(n)).unwrap(), n.as_bytes());
        fs::remove_file(m.p(n)).unwrap();
    }
    assert_eq!(list(&m.mnt), Vec::<OsString>::new());
    assert!(!m.p("a").exists());
    m.unmount();
    // Nothing but kekfs's own files is left in the backing directory.
    assert_eq!(content_files(&env.backing), Vec::<PathBuf>::new());
    let leftovers: Vec<_> = fs::read_dir(&env.backing)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.as_bytes().starts_with(b"kekfs."))
        .collect();
    assert!(leftovers.is_empty(), "backing leftovers: {leftovers:?}");
    let m = env.mount();
    assert_eq!(list(&m.mnt), Vec::<OsString>::new());
}

#[test]
fn directory_nlink_and_dotdot() {
    let Some(env) = setup("directory_nlink_and_dotdot") else {
        return;
    };
    let m = env.mount();
    fs::create_dir_all(m.p("p/c1")).unwrap();
    fs::create_dir(m.p("p/c2")).unwrap();
    assert_eq!(fs::metadata(m.p("p")).unwrap().nlink(), 4);
    assert_eq!(
        fs::metadata(m.p("p/c1/..")).unwrap().ino(),
        fs::metadata(m.p("p")).unwrap().ino()
    );
    fs::write(m.p("p/c1/../c2/f"), b"via dotdot").unwrap();
    assert_eq!(fs::read(m.p("p/c2/f")).unwrap(), b"via dotdot");
}

// ---------------------------------------------------------------------------------------
// Rename
// ---------------------------------------------------------------------------------------

#[test]
fn rename_files_and_dirs() {
    let Some(env) = setup("rename_files_and_dirs") else {
        return;
    };
    let m = env.mount();
    fs::create_dir(m.p("d1")).unwrap();
    fs::create_dir(m.p("d2")).unwrap();
    let a = pattern(1, 5000);
    fs::write(m.p("d1/a"), &a).unwrap();

    // Within a directory.
    fs::rename(m.p("d1/a"), m.p("d1/b")).unwrap();
    assert_eq!(list(&m.p("d1")), names(&["b"]));
    assert_bytes_eq(&fs::read(m.p("d1/b")).unwrap(), &a, "renamed within dir");
    // Across directories.
    fs::rename(m.p("d1/b"), m.p("d2/c")).unwrap();
    assert_eq!(list(&m.p("d1")), Vec::<OsString>::new());
    assert_eq!(list(&m.p("d2")), names(&["c"]));
    assert_bytes_eq(&fs::read(m.p("d2/c")).unwrap(), &a, "renamed across dirs");
    // Over an existing file: the old content is gone.
    fs::write(m.p("d1/victim"), pattern(2, 7000)).unwrap();
    fs::rename(m.p("d2/c"), m.p("d1/victim")).unwrap();
    assert_bytes_eq(&fs::read(m.p("d1/victim")).unwrap(), &a, "replaced file");
    assert_eq!(fs::metadata(m.p("d1/victim")).unwrap().len(), 5000);
    assert_eq!(list(&m.p("d2")), Vec::<OsString>::new());
    // Rename onto itself is a no-op.
    fs::rename(m.p("d1/victim"), m.p("d1/victim")).unwrap();
    assert_bytes_eq(&fs::read(m.p("d1/victim")).unwrap(), &a, "self rename");

    // A directory over an empty directory.
    fs::create_dir(m.p("src")).unwrap();
    fs::write(m.p("src/child"), b"child").unwrap();
    fs::create_dir(m.p("src/sub")).unwrap();
    fs::write(m.p("src/sub/grandchild"), b"grandchild").unwrap();
    fs::create_dir(m.p("empty")).unwrap();
    fs::rename(m.p("src"), m.p("empty")).unwrap();
    assert!(!m.p("src").exists());
    assert_eq!(list(&m.p("empty")), names(&["child", "sub"]));
    assert_eq!(fs::read(m.p("empty/child")).unwrap(), b"child");
    assert_eq!(
        fs::read(m.p("empty/sub/grandchild")).unwrap(),
        b"grandchild"
    );
    // A directory over a non-empty directory fails and changes nothing.
    fs::create_dir(m.p("other")).unwrap();
    fs::write(m.p("other/keep"), b"keep").unwrap();
    assert_eq!(
        errno_of(fs::rename(m.p("other"), m.p("empty")), "dir over non-empty"),
        libc::ENOTEMPTY
    );
    assert_eq!(fs::read(m.p("other/keep")).unwrap(), b"keep");
    assert_eq!(list(&m.p("empty")), names(&["child", "sub"]));
    // Type mismatches.
    assert_eq!(
        errno_of(fs::rename(m.p("d1/victim"), m.p("other")), "file over dir"),
        libc::EISDIR
    );
    assert_eq!(
        errno_of(fs::rename(m.p("other"), m.p("d1/victim")), "dir over file"),
        libc::ENOTDIR
    );
    assert_eq!(
        errno_of(fs::rename(m.p("missing"), m.p("x")), "missing source"),
        libc::ENOENT
    );
    // A directory with children moved into another directory keeps them readable.
    fs::rename(m.p("empty"), m.p("d2/moved")).unwrap();
    assert_eq!(list(&m.p("d2/moved")), names(&["child", "sub"]));
    assert_eq!(
        fs::read(m.p("d2/moved/sub/grandchild")).unwrap(),
        b"grandchild"
    );
    fs::write(m.p("d2/moved/sub/new"), b"new").unwrap();
    m.unmount();
    let m = env.mount();
    assert_eq!(list(&m.mnt), names(&["d1", "d2", "other"]));
    assert_eq!(list(&m.p("d2/moved/sub")), names(&["grandchild", "new"]));
    assert_eq!(fs::read(m.p("d2/moved/child")).unwrap(), b"child");
    assert_bytes_eq(&fs::read(m.p("d1/victim")).unwrap(), &a, "after remount");
}

#[test]
fn rename_noreplace_and_exchange() {
    let Some(env) = setup("rename_noreplace_and_exchange") else {
        return;
    };
    let m = env.mount();
    fs::create_dir(m.p("d")).unwrap();
    let (x, y) = (pattern(1, 3000), pattern(2, 9000));
    fs::write(m.p("x"), &x).unwrap();
    fs::write(m.p("d/y"), &y).unwrap();

    // RENAME_NOREPLACE onto an existing name: EEXIST, both untouched.
    assert_eq!(
        errno_of(
            renameat2(&m.p("x"), &m.p("d/y"), libc::RENAME_NOREPLACE),
            "noreplace"
        ),
        libc::EEXIST
    );
    assert_bytes_eq(&fs::read(m.p("x")).unwrap(), &x, "x after EEXIST");
    assert_bytes_eq(&fs::read(m.p("d/y")).unwrap(), &y, "y after EEXIST");
    // …and onto a free name it works.
    renameat2(&m.p("x"), &m.p("x2"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(list(&m.mnt), names(&["d", "x2"]));

    // RENAME_EXCHANGE swaps two files (across directories).
    renameat2(&m.p("x2"), &m.p("d/y"), libc::RENAME_EXCHANGE).unwrap();
    assert_bytes_eq(&fs::read(m.p("x2")).unwrap(), &y, "exchanged x2");
    assert_bytes_eq(&fs::read(m.p("d/y")).unwrap(), &x, "exchanged d/y");
    assert_eq!(fs::metadata(m.p("x2")).unwrap().len(), 9000);
    // …a file with a directory.
    fs::create_dir(m.p("dir")).unwrap();
    fs::write(m.p("dir/inside"), b"inside").unwrap();
    renameat2(&m.p("x2"), &m.p("dir"), libc::RENAME_EXCHANGE).unwrap();
    assert!(fs::metadata(m.p("x2")).unwrap().is_dir());
    assert_eq!(fs::read(m.p("x2/inside")).unwrap(), b"inside");
    assert_bytes_eq(&fs::read(m.p("dir")).unwrap(), &y, "file now named dir");
    // …and with a missing target it fails.
    assert_eq!(
        errno_of(
            renameat2(&m.p("dir"), &m.p("nothing"), libc::RENAME_EXCHANGE),
            "exchange with missing"
        ),
        libc::ENOENT
    );
    m.unmount();
    let m = env.mount();
    assert_eq!(fs::read(m.p("x2/inside")).unwrap(), b"inside");
    assert_bytes_eq(&fs::read(m.p("dir")).unwrap(), &y, "after remount");
    assert_bytes_eq(&fs::read(m.p("d/y")).unwrap(), &x, "after remount");
    assert_eq!(list(&m.mnt), names(&["d", "dir", "x2"]));
}

// ---------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------

fn backing_has_long_entries(backing: &Path) -> usize {
    files_under(backing)
        .iter()
        .filter(|p| p.file_name().unwrap().as_bytes().starts_with(b"kekfs.L."))
        .count()
}

#[test]
fn short_long_and_max_names() {
    let Some(env) = setup("short_long_and_max_names") else {
        return;
    };
    let m = env.mount();
    let n1 = "q".to_string();
    let n200 = "m".repeat(200);
    let n255 = "L".repeat(255);
    for (i, n) in [&n1, &n200, &n255].into_iter().enumerate() {
        fs::write(m.p(n), pattern(i as u64, 100 + i)).unwrap();
    }
    assert!(
        backing_has_long_entries(&env.backing) >= 2,
        "200- and 255-byte names should use the hashed long-name form"
    );
    assert_eq!(list(&m.mnt), names(&[&n1, &n200, &n255]));
    for (i, n) in [&n1, &n200, &n255].into_iter().enumerate() {
        assert_eq!(fs::read(m.p(n)).unwrap(), pattern(i as u64, 100 + i));
    }
    // 256 bytes is too long, for files and directories alike.
    let n256 = "z".repeat(256);
    assert_eq!(
        errno_of(fs::write(m.p(&n256), b"x"), "create 256"),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(fs::create_dir(m.p(&n256)), "mkdir 256"),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(fs::rename(m.p(&n1), m.p(&n256)), "rename to 256"),
        libc::ENAMETOOLONG
    );
    // Long-named directories hold files; rename long <-> short, across directories.
    let d255 = "D".repeat(255);
    fs::create_dir(m.p(&d255)).unwrap();
    fs::write(m.p(&format!("{d255}/{n255}")), b"deep").unwrap();
    fs::rename(m.p(&n1), m.p(&format!("{d255}/{n200}"))).unwrap();
    fs::rename(m.p(&n255), m.p("short")).unwrap();
    fs::rename(m.p(&n200), m.p(&"k".repeat(254))).unwrap();
    assert_eq!(list(&m.mnt), names(&[&d255, "short", &"k".repeat(254)]));
    assert_eq!(list(&m.p(&d255)), names(&[&n200, &n255]));
    assert_eq!(fs::read(m.p("short")).unwrap(), pattern(2, 102));
    // Exchange a long name with a short one.
    renameat2(
        &m.p(&format!("{d255}/{n255}")),
        &m.p("short"),
        libc::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(fs::read(m.p("short")).unwrap(), b"deep");
    assert_eq!(
        fs::read(m.p(&format!("{d255}/{n255}"))).unwrap(),
        pattern(2, 102)
    );
    // Replace a long name by rename.
    fs::rename(m.p("short"), m.p(&format!("{d255}/{n200}"))).unwrap();
    assert_eq!(fs::read(m.p(&format!("{d255}/{n200}"))).unwrap(), b"deep");
    assert_eq!(list(&m.mnt), names(&[&d255, &"k".repeat(254)]));
    m.unmount();
    let m = env.mount();
    assert_eq!(list(&m.p(&d255)), names(&[&n200, &n255]));
    assert_eq!(fs::read(m.p(&format!("{d255}/{n200}"))).unwrap(), b"deep");
    // Unlink everything: no orphaned sidecars or entries remain in the backing tree.
    fs::remove_dir_all(m.p(&d255)).unwrap();
    fs::remove_file(m.p(&"k".repeat(254))).unwrap();
    assert_eq!(list(&m.mnt), Vec::<OsString>::new());
    m.unmount();
    let left: Vec<_> = files_under(&env.backing)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            !(n == "kekfs.volume" || n == "kekfs.dirid" || n == "kekfs.lock")
        })
        .collect();
    assert!(left.is_empty(), "backing leftovers: {left:?}");
}

#[test]
fn non_utf8_names() {
    let Some(env) = setup("non_utf8_names") else {
        return;
    };
    let m = env.mount();
    let raw1 = OsStr::from_bytes(b"caf\xe9-\xff\xfe");
    let raw2 = OsStr::from_bytes(b"\x80\x81 bin\xc3(");
    let raw_dir = OsStr::from_bytes(b"dir\xf0\x28\x8c\xbc");
    fs::write(m.mnt.join(raw1), b"latin1").unwrap();
    fs::create_dir(m.mnt.join(raw_dir)).unwrap();
    assert_eq!(list(&m.mnt), {
        let mut v = vec![raw1.to_os_string(), raw_dir.to_os_string()];
        v.sort();
        v
    });
    assert_eq!(fs::read(m.mnt.join(raw1)).unwrap(), b"latin1");
    fs::rename(m.mnt.join(raw1), m.mnt.join(raw_dir).join(raw2)).unwrap();
    assert_eq!(list(&m.mnt.join(raw_dir)), vec![raw2.to_os_string()]);
    // Names full of control bytes and a 255-byte non-UTF-8 name.
    let ctl = OsString::from_vec((1u8..=31).chain([0x7f, 0xff]).collect());
    let long = OsString::from_vec(vec![0xfe; 255]);
    fs::write(m.mnt.join(&ctl), b"ctl").unwrap();
    fs::write(m.mnt.join(&long), b"long").unwrap();
    m.unmount();
    let m = env.mount();
    assert_eq!(fs::read(m.mnt.join(raw_dir).join(raw2)).unwrap(), b"latin1");
    assert_eq!(fs::read(m.mnt.join(&ctl)).unwrap(), b"ctl");
    assert_eq!(fs::read(m.mnt.join(&long)).unwrap(), b"long");
    let mut want = vec![raw_dir.to_os_string(), ctl.clone(), long.clone()];
    want.sort();
    assert_eq!(list(&m.mnt), want);
    fs::remove_file(m.mnt.join(raw_dir).join(raw2)).unwrap();
    fs::remove_file(m.mnt.join(&long)).unwrap();
    assert_eq!(list(&m.mnt.join(raw_dir)), Vec::<OsString>::new());
}

// ---------------------------------------------------------------------------------------
// Symlinks, hard links, special files
// ---------------------------------------------------------------------------------------

#[test]
fn symlinks() {
    let Some(env) = setup("symlinks") else {
        return;
    };
    let m = env.mount();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/target"), b"through the link").unwrap();
    let long_target: String = (0..1000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let mut links: Vec<(String, String)> = vec![
        ("rel".into(), "d/target".into()),
        ("abs".into(), m.p("d/target").display().to_string()),
        ("dangling".into(), "../no/such/file".into()),
        ("long".into(), long_target.clone()),
    ];
    // Every target length mod 3 (base64 rounding) over a range of sizes.
    for len in 1..=12 {
        links.push((format!("len{len}"), "t".repeat(len)));
    }
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, m.p(name)).unwrap();
    }
    for (name, target) in &links {
        let md = fs::symlink_metadata(m.p(name)).unwrap();
        assert!(md.file_type().is_symlink(), "{name} is a symlink");
        assert_eq!(md.len(), target.len() as u64, "{name}: lstat size");
        assert_eq!(
            fs::read_link(m.p(name)).unwrap(),
            PathBuf::from(target),
            "{name}: readlink"
        );
    }
    assert_eq!(fs::read(m.p("rel")).unwrap(), b"through the link");
    assert_eq!(fs::read(m.p("abs")).unwrap(), b"through the link");
    assert_eq!(
        errno_of(fs::read(m.p("dangling")), "follow dangling"),
        libc::ENOENT
    );
    // A symlink to a directory resolves through it.
    std::os::unix::fs::symlink("d", m.p("dlink")).unwrap();
    assert_eq!(fs::read(m.p("dlink/target")).unwrap(), b"through the link");
    assert_eq!(
        errno_of(
            std::os::unix::fs::symlink("x", m.p("rel")),
            "symlink over existing"
        ),
        libc::EEXIST
    );
    // lchown changes the link itself.
    std::os::unix::fs::lchown(m.p("rel"), Some(777), Some(888)).unwrap();
    let md = fs::symlink_metadata(m.p("rel")).unwrap();
    assert_eq!((md.uid(), md.gid()), (777, 888));
    assert_eq!(fs::metadata(m.p("d/target")).unwrap().uid(), 0);
    // Rename and unlink a symlink.
    fs::rename(m.p("rel"), m.p("d/rel2")).unwrap();
    assert_eq!(
        fs::read_link(m.p("d/rel2")).unwrap(),
        PathBuf::from("d/target")
    );
    fs::remove_file(m.p("dangling")).unwrap();
    m.unmount();
    let m = env.mount();
    assert_eq!(
        fs::read_link(m.p("long")).unwrap(),
        PathBuf::from(&long_target)
    );
    assert_eq!(fs::symlink_metadata(m.p("long")).unwrap().len(), 1000);
    assert_eq!(fs::read(m.p("abs")).unwrap(), b"through the link");
    assert!(!m.p("dangling").exists());
    assert!(fs::symlink_metadata(m.p("dangling")).is_err());
}

#[test]
fn hard_links() {
    let Some(env) = setup("hard_links") else {
        return;
    };
    let m = env.mount();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("a"), b"shared").unwrap();
    let long = "h".repeat(255);
    fs::hard_link(m.p("a"), m.p("d/b")).unwrap();
    assert_eq!(fs::metadata(m.p("a")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.p("d/b")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.p("a")).unwrap().ino(),
        fs::metadata(m.p("d/b")).unwrap().ino()
    );
    fs::hard_link(m.p("a"), m.p(&long)).unwrap();
    assert_eq!(fs::metadata(m.p("a")).unwrap().nlink(), 3);
    // Content is shared: a write through one name shows through the others.
    let f = OpenOptions::new().write(true).open(m.p("d/b")).unwrap();
    f.write_all_at(&pattern(9, 6000), 3).unwrap();
    drop(f);
    let mut want = b"sha".to_vec();
    want.extend_from_slice(&pattern(9, 6000));
    assert_bytes_eq(&fs::read(m.p("a")).unwrap(), &want, "via a");
    assert_bytes_eq(&fs::read(m.p(&long)).unwrap(), &want, "via long name");
    assert_eq!(
        errno_of(fs::hard_link(m.p("a"), m.p("d/b")), "link over existing"),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(fs::hard_link(m.p("d"), m.p("dlink")), "link a directory"),
        libc::EPERM
    );
    m.unmount();
    let m = env.mount();
    assert_eq!(fs::metadata(m.p("d/b")).unwrap().nlink(), 3);
    // Unlinking one name keeps the others.
    fs::remove_file(m.p("a")).unwrap();
    assert_bytes_eq(&fs::read(m.p("d/b")).unwrap(), &want, "after unlink");
    assert_eq!(fs::metadata(m.p("d/b")).unwrap().nlink(), 2);
    fs::remove_file(m.p(&long)).unwrap();
    assert_eq!(fs::metadata(m.p("d/b")).unwrap().nlink(), 1);
    assert_eq!(list(&m.mnt), names(&["d"]));
    assert_bytes_eq(&fs::read(m.p("d/b")).unwrap(), &want, "last name");
}

#[test]
fn fifo_via_mknod() {
    let Some(env) = setup("fifo_via_mknod") else {
        return;
    };
    let m = env.mount();
    let cp = c(&m.p("fifo"));
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::mkfifo(cp.as_ptr(), 0o640) },
        0,
        "mkfifo: {}",
        last_errno()
    );
    let md = fs::symlink_metadata(m.p("fifo")).unwrap();
    assert!(md.file_type().is_fifo(), "not a fifo: {:?}", md.file_type());
    assert_eq!(md.mode() & 0o777, 0o640 & !umask());
    {
        // (A DirEntry keeps its directory open: scope it so the unmount below succeeds.)
        let e = fs::read_dir(&m.mnt).unwrap().next().unwrap().unwrap();
        assert!(e.file_type().unwrap().is_fifo());
    }
    // A regular file made with mknod(S_IFREG) is an ordinary, writable file.
    let cp = c(&m.p("reg"));
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::mknod(cp.as_ptr(), libc::S_IFREG | 0o644, 0) },
        0
    );
    fs::write(m.p("reg"), b"regular").unwrap();
    assert_eq!(fs::read(m.p("reg")).unwrap(), b"regular");
    m.unmount();
    let m = env.mount();
    assert!(
        fs::symlink_metadata(m.p("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(fs::read(m.p("reg")).unwrap(), b"regular");
    fs::remove_file(m.p("fifo")).unwrap();
    assert_eq!(list(&m.mnt), names(&["reg"]));
}

#[test]
fn statvfs_reports_name_max() {
    let Some(env) = setup("statvfs_reports_name_max") else {
        return;
    };
    let m = env.mount();
    let st = statvfs(&m.mnt).unwrap_or_else(|e| panic!("statvfs: {e}"));
    assert_eq!(st.f_namemax, 255);
    assert!(st.f_bsize > 0);
    assert!(st.f_blocks > 0);
    assert!(st.f_bfree <= st.f_blocks && st.f_bavail <= st.f_blocks);
}

// ---------------------------------------------------------------------------------------
// Extended attributes
// ---------------------------------------------------------------------------------------

#[test]
fn xattrs_user_namespace() {
    let Some(env) = setup("xattrs_user_namespace") else {
        return;
    };
    let m = env.mount();
    fs::write(m.p("f"), b"x").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    for p in [m.p("f"), m.p("d")] {
        assert_eq!(listxattr(&p).unwrap(), Vec::<String>::new());
        setxattr(&p, "user.color", b"blue", 0).unwrap();
        setxattr(&p, "user.empty", b"", 0).unwrap();
        let big = pattern(4, 3000);
        setxattr(&p, "user.big", &big, 0).unwrap();
        assert_eq!(getxattr(&p, "user.color").unwrap(), b"blue");
        assert_eq!(getxattr(&p, "user.empty").unwrap(), b"");
        assert_eq!(getxattr(&p, "user.big").unwrap(), big);
        assert_eq!(
            listxattr(&p).unwrap(),
            ["user.big", "user.color", "user.empty"]
        );
        // Replace a value; XATTR_CREATE on an existing name and XATTR_REPLACE on a
        // missing one fail.
        setxattr(&p, "user.color", b"green!", 0).unwrap();
        assert_eq!(getxattr(&p, "user.color").unwrap(), b"green!");
        assert_eq!(
            errno_of(
                setxattr(&p, "user.color", b"x", libc::XATTR_CREATE),
                "create"
            ),
            libc::EEXIST
        );
        assert_eq!(
            errno_of(
                setxattr(&p, "user.nope", b"x", libc::XATTR_REPLACE),
                "replace"
            ),
            libc::ENODATA
        );
        // Missing attribute.
        assert_eq!(
            errno_of(getxattr(&p, "user.missing"), "get missing"),
            libc::ENODATA
        );
        // A too-small buffer gives ERANGE.
        let (cp, cn) = (c(&p), CString::new("user.color").unwrap());
        let mut small = [0u8; 2];
        // SAFETY: buffer pointer/length describe `small`.
        let r = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), small.as_mut_ptr().cast(), 2) };
        assert_eq!((r, last_errno()), (-1, libc::ERANGE));
        // Remove.
        removexattr(&p, "user.empty").unwrap();
        assert_eq!(
            errno_of(getxattr(&p, "user.empty"), "get removed"),
            libc::ENODATA
        );
        assert_eq!(
            errno_of(removexattr(&p, "user.empty"), "remove missing"),
            libc::ENODATA
        );
        assert_eq!(listxattr(&p).unwrap(), ["user.big", "user.color"]);
        // Other namespaces are refused.
        assert!(setxattr(&p, "trusted.x", b"v", 0).is_err(), "trusted.x set");
        assert!(
            setxattr(&p, "security.x", b"v", 0).is_err(),
            "security.x set"
        );
        assert!(getxattr(&p, "trusted.x").is_err());
        assert_eq!(listxattr(&p).unwrap(), ["user.big", "user.color"]);
    }
    // setfattr/getfattr agree.
    let ok = Command::new("setfattr")
        .args(["-n", "user.tool", "-v", "fromtool"])
        .arg(m.p("f"))
        .status();
    if let Ok(st) = ok {
        assert!(st.success());
        let out = Command::new("getfattr")
            .args(["--only-values", "-n", "user.tool"])
            .arg(m.p("f"))
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"fromtool");
        removexattr(&m.p("f"), "user.tool").unwrap();
    }
    m.unmount();
    let m = env.mount();
    assert_eq!(getxattr(&m.p("f"), "user.color").unwrap(), b"green!");
    assert_eq!(getxattr(&m.p("d"), "user.big").unwrap(), pattern(4, 3000));
    assert_eq!(listxattr(&m.p("f")).unwrap(), ["user.big", "user.color"]);
}

// ---------------------------------------------------------------------------------------
// fallocate
// ---------------------------------------------------------------------------------------

#[test]
fn fallocate_modes() {
    let Some(env) = setup("fallocate_modes") else {
        return;
    };
    let m = env.mount();
    let path = m.p("fa");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    // Mode 0 extends an empty file with zeros.
    fallocate(&f, 0, 0, 10_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10_000);
    assert_eq!(fs::read(&path).unwrap(), vec![0u8; 10_000]);
    // Mode 0 inside the file changes nothing; past the end it extends.
    let data = pattern(21, 30_000);
    f.write_all_at(&data, 0).unwrap();
    let mut model = data.clone();
    fallocate(&f, 0, 100, 5000).unwrap();
    assert_bytes_eq(&fs::read(&path).unwrap(), &model, "fallocate inside");
    fallocate(&f, 0, 29_000, 3_001).unwrap();
    model.resize(32_001, 0);
    assert_eq!(f.metadata().unwrap().len(), 32_001);
    assert_bytes_eq(&fs::read(&path).unwrap(), &model, "fallocate extend");
    // KEEP_SIZE past the end keeps the size.
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 32_000, 50_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 32_001);

    // Punch a hole across block boundaries (unaligned both ends, spanning full blocks).
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    for (off, len) in [
        (3000u64, 9000u64),
        (20_480, 4096),
        (100, 10),
        (31_000, 5000),
    ] {
        fallocate(&f, punch, off, len).unwrap();
        let e = ((off + len) as usize).min(model.len());
        model[off as usize..e].fill(0);
        assert_eq!(f.metadata().unwrap().len(), model.len() as u64);
        assert_bytes_eq(
            &fs::read(&path).unwrap(),
            &model,
            &format!("punch {off}+{len}"),
        );
    }
    // PUNCH_HOLE without KEEP_SIZE is invalid.
    assert_eq!(
        errno_of(
            fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 10),
            "punch w/o keep"
        ),
        libc::EOPNOTSUPP
    );
    // Refill, then ZERO_RANGE.
    let data2 = pattern(22, model.len());
    f.write_all_at(&data2, 0).unwrap();
    model.copy_from_slice(&data2);
    for (off, len) in [(5000u64, 12_000u64), (0, 1), (4095, 2), (28_000, 4001)] {
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, off, len).unwrap();
        let e = ((off + len) as usize).min(model.len());
        model[off as usize..e].fill(0);
        assert_eq!(f.metadata().unwrap().len(), model.len() as u64);
        assert_bytes_eq(
            &fs::read(&path).unwrap(),
            &model,
            &format!("zero {off}+{len}"),
        );
    }
    // ZERO_RANGE past the end without KEEP_SIZE extends the file.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 30_000, 10_000).unwrap();
    model[30_000..].fill(0);
    model.resize(40_000, 0);
    assert_eq!(f.metadata().unwrap().len(), 40_000);
    assert_bytes_eq(&fs::read(&path).unwrap(), &model, "zero range extend");
    drop(f);
    m.unmount();
    let m = env.mount();
    assert_bytes_eq(&fs::read(m.p("fa")).unwrap(), &model, "after remount");
}

// ---------------------------------------------------------------------------------------
// Permissions for a non-root user
// ---------------------------------------------------------------------------------------

/// The mount's sequential read-ahead window is raised from the kernel's 128 KiB default to
/// the 2 MiB the daemon sets (mounted as root here; see `set_readahead`).
#[test]
fn read_ahead_window_is_raised() {
    let Some(env) = setup("read_ahead_window_is_raised") else {
        return;
    };
    let m = env.mount();
    let dev = fs::metadata(&m.mnt).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let kb = fs::read_to_string(&path).unwrap();
    assert_eq!(kb.trim(), "2048", "{path}");
    // Sequential reads through the larger window still return the file exactly.
    let data = pattern(11, 5 << 20);
    fs::write(m.p("big"), &data).unwrap();
    let f = File::open(m.p("big")).unwrap();
    // SAFETY: fadvise on a valid descriptor: drop this file's cached pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    let mut back = Vec::new();
    (&f).read_to_end(&mut back).unwrap();
    drop(f);
    assert!(back == data, "content differs");
    m.unmount();
}

/// Writing, truncating or allocating by a user other than root clears the setuid bit, and
/// the setgid bit when the group may execute (as Linux does on its own filesystems); root
/// keeps them. Checked with the default cache mode and with the write-back cache, which
/// reach kekfs by different kernel paths.
#[test]
fn writes_by_other_users_clear_setuid_and_setgid() {
    let Some(env) = setup("writes_by_other_users_clear_setuid_and_setgid") else {
        return;
    };
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for opts in [&["allow_other"][..], &["allow_other", "cache=writeback"]] {
        let m = env.mount_with(opts);
        fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
        let mode = |name: &str| fs::metadata(m.p(name)).unwrap().mode() & 0o7777;
        let make = |name: &str, mode: u32| {
            fs::write(m.p(name), b"0123456789").unwrap();
            fs::set_permissions(m.p(name), fs::Permissions::from_mode(mode)).unwrap();
        };
        make("w", 0o6777);
        make("w-nogx", 0o6767);
        make("t", 0o6777);
        make("a", 0o6777);
        make("root", 0o6777);
        let (w, w_nogx, t, a) = (c(&m.p("w")), c(&m.p("w-nogx")), c(&m.p("t")), c(&m.p("a")));
        let code = as_nobody(|| {
            // SAFETY: async-signal-safe syscalls only, on valid C strings and buffers.
            unsafe {
                for (i, path) in [&w, &w_nogx].into_iter().enumerate() {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return 100 + i as i32;
                    }
                    let n = libc::pwrite(fd, b"x".as_ptr().cast(), 1, 3);
                    libc::close(fd);
                    if n != 1 {
                        return 110 + i as i32;
                    }
                }
                if libc::truncate(t.as_ptr(), 4) != 0 {
                    return 120;
                }
                let fd = libc::open(a.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::fallocate(fd, 0, 0, 8192) != 0 {
                    return 130;
                }
                libc::close(fd);
                0
            }
        });
        assert_eq!(
            code, 0,
            "nobody's write/truncate/fallocate failed ({opts:?})"
        );
        assert_eq!(mode("w"), 0o777, "written by nobody ({opts:?})");
        assert_eq!(
            mode("w-nogx"),
            0o2767,
            "written by nobody, group may not execute: setgid stays ({opts:?})"
        );
        assert_eq!(mode("t"), 0o777, "truncated by nobody ({opts:?})");
        assert_eq!(mode("a"), 0o777, "fallocate by nobody ({opts:?})");
        assert_eq!(fs::read(m.p("w")).unwrap(), b"012x456789");
        assert_eq!(fs::read(m.p("t")).unwrap(), b"0123");
        assert_eq!(fs::metadata(m.p("a")).unwrap().len(), 8192);
        // Root writing keeps both bits.
        let f = OpenOptions::new().write(true).open(m.p("root")).unwrap();
        f.write_all_at(b"y", 2).unwrap();
        f.set_len(5).unwrap();
        drop(f);
        assert_eq!(mode("root"), 0o6777, "written by root ({opts:?})");
        m.unmount();
    }
}

#[test]
fn permissions_enforced_for_other_users() {
    let Some(env) = setup("permissions_enforced_for_other_users") else {
        return;
    };
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = env.mount_with(&["allow_other"]);
    fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(m.p("secret"), b"root only").unwrap();
    fs::set_permissions(m.p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.p("public"), b"everyone").unwrap();
    fs::set_permissions(m.p("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(m.p("closed")).unwrap();
    fs::set_permissions(m.p("closed"), fs::Permissions::from_mode(0o755)).unwrap();

    let secret = c(&m.p("secret"));
    let public = c(&m.p("public"));
    let mine = c(&m.p("mine"));
    let in_closed = c(&m.p("closed/x"));
    let mine_dir = c(&m.p("mydir"));

    // Reading a 0600 root file: EACCES.
    let code = as_nobody(|| {
        // SAFETY: async-signal-safe syscalls only.
        unsafe {
            let fd = libc::open(secret.as_ptr(), libc::O_RDONLY);
            if fd >= 0 {
                libc::close(fd);
                return 100;
            }
            *libc::__errno_location()
        }
    });
    assert_eq!(code, libc::EACCES, "open 0600 root file as nobody");
    // Reading a 0644 file works, writing it does not.
    let code = as_nobody(|| {
        // SAFETY: async-signal-safe syscalls only.
        unsafe {
            let fd = libc::open(public.as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                return 101;
            }
            let mut buf = [0u8; 16];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            if n != 8 || &buf[..8] != b"everyone" {
                return 102;
            }
            let fd = libc::open(public.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::close(fd);
                return 103;
            }
            *libc::__errno_location()
        }
    });
    assert_eq!(
        code,
        libc::EACCES,
        "open 0644 root file for writing as nobody"
    );
    // Creating in a root-owned 0755 directory: EACCES; chmod of root's file: EPERM.
    let code = as_nobody(|| {
        // SAFETY: async-signal-safe syscalls only.
        unsafe {
            let fd = libc::open(in_closed.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644);
            if fd >= 0 {
                libc::close(fd);
                return 104;
            }
            if *libc::__errno_location() != libc::EACCES {
                return 105;
            }
            if libc::chmod(public.as_ptr(), 0o666) == 0 {
                return 106;
            }
            *libc::__errno_location()
        }
    });
    assert_eq!(code, libc::EPERM, "chmod of root's file as nobody");
    // Creating its own file and directory in the 0777 root works; they belong to nobody.
    let code = as_nobody(|| {
        // SAFETY: async-signal-safe syscalls only.
        unsafe {
            let fd = libc::open(
                mine.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o600,
            );
            if fd < 0 {
                return 110;
            }
            let msg = b"nobody's data";
            let n = libc::write(fd, msg.as_ptr().cast(), msg.len());
            libc::close(fd);
            if n != msg.len() as isize {
                return 111;
            }
            if libc::mkdir(mine_dir.as_ptr(), 0o700) != 0 {
                return 112;
            }
            0
        }
    });
    assert_eq!(code, 0, "nobody creates its own file");
    let md = fs::metadata(m.p("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    assert_eq!(md.mode() & 0o777, 0o600);
    assert_eq!(fs::read(m.p("mine")).unwrap(), b"nobody's data");
    let md = fs::metadata(m.p("mydir")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    assert!(!m.p("closed/x").exists());
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the test process itself stays root"
    );
    m.unmount();
    let m = env.mount();
    let md = fs::metadata(m.p("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534), "after remount");
}

// ---------------------------------------------------------------------------------------
// mmap
// ---------------------------------------------------------------------------------------

#[test]
fn mmap_shared_write_and_read() {
    let Some(env) = setup("mmap_shared_write_and_read") else {
        return;
    };
    let m = env.mount();
    let len = 3 * 4096 + 100;
    let want = pattern(31, len);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.p("mapped"))
            .unwrap();
        f.set_len(len as u64).unwrap();
        // SAFETY: mapping a file we own of exactly `len` bytes; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
        // SAFETY: `p` maps `len` writable bytes.
        unsafe {
            std::slice::from_raw_parts_mut(p.cast::<u8>(), len).copy_from_slice(&want);
            assert_eq!(
                libc::msync(p, len, libc::MS_SYNC),
                0,
                "msync: {}",
                last_errno()
            );
            assert_eq!(libc::munmap(p, len), 0);
        }
        f.sync_all().unwrap();
    }
    assert_bytes_eq(
        &fs::read(m.p("mapped")).unwrap(),
        &want,
        "read after mmap write",
    );

    // mmap-read a file written with write(2).
    let data = pattern(32, 2 * 4096 + 7);
    fs::write(m.p("written"), &data).unwrap();
    {
        let f = File::open(m.p("written")).unwrap();
        // SAFETY: read-only mapping of the file's length; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                data.len(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
        // SAFETY: `p` maps `data.len()` readable bytes.
        let got = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), data.len()).to_vec() };
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, data.len()) };
        assert_bytes_eq(&got, &data, "mmap read");
    }
    m.unmount();
    let m = env.mount();
    assert_bytes_eq(
        &fs::read(m.p("mapped")).unwrap(),
        &want,
        "mmap write after remount",
    );
    assert_bytes_eq(&fs::read(m.p("written")).unwrap(), &data, "after remount");
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

#[test]
fn concurrent_writers_disjoint_unaligned_ranges() {
    let Some(env) = setup("concurrent_writers_disjoint_unaligned_ranges") else {
        return;
    };
    let m = env.mount();
    const T: usize = 4;
    const SPAN: usize = 10_000;
    for round in 0..8 {
        let path = m.p(&format!("shared{round}"));
        File::create(&path).unwrap();
        let chunk = [SPAN, 4096, 777, 61][round % 4];
        std::thread::scope(|s| {
            for t in 0..T {
                let path = path.clone();
                s.spawn(move || {
                    let f = OpenOptions::new().write(true).open(&path).unwrap();
                    let fill = vec![(t as u8 + 1) * 0x11; SPAN];
                    let base = t * SPAN;
                    let mut pos = 0;
                    // Alternate the direction so writers meet at the shared blocks.
                    let mut order: Vec<usize> = (0..SPAN.div_ceil(chunk)).collect();
                    if (t + round) % 2 == 1 {
                        order.reverse();
                    }
                    for i in order {
                        let s = i * chunk;
                        let e = (s + chunk).min(SPAN);
                        f.write_all_at(&fill[s..e], (base + s) as u64).unwrap();
                        pos += e - s;
                    }
                    assert_eq!(pos, SPAN);
                });
            }
        });
        let got = fs::read(&path).unwrap();
        assert_eq!(got.len(), T * SPAN, "round {round}: size");
        for (i, &b) in got.iter().enumerate() {
            let want = (i / SPAN) as u8 + 1;
            assert_eq!(b, want * 0x11, "round {round} (chunk {chunk}): byte {i}");
        }
    }
    m.unmount();
    let m = env.mount();
    let got = fs::read(m.p("shared0")).unwrap();
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| b == ((i / SPAN) as u8 + 1) * 0x11)
    );
}

#[test]
fn concurrent_readers_see_consistent_blocks() {
    let Some(env) = setup("concurrent_readers_see_consistent_blocks") else {
        return;
    };
    let m = env.mount();
    const LEN: usize = 16 * 4096;
    let path = m.p("rw");
    fs::write(&path, vec![1u8; LEN]).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let reads = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        // O_DIRECT readers go to the daemon every time: each block must be one version.
        for r in 0..3 {
            let (path, done, reads) = (&path, &done, &reads);
            s.spawn(move || {
                let direct = r < 2;
                let mut o = OpenOptions::new();
                o.read(true);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                let f = o.open(path).unwrap();
                let mut raw = vec![0u8; LEN + 4096];
                let off = raw.as_ptr().align_offset(4096);
                let buf = &mut raw[off..off + LEN];
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = f.read_at(buf, 0).expect("concurrent read failed");
                    assert_eq!(n, LEN, "short read while rewriting");
                    if direct {
                        for (bi, blk) in buf.chunks(4096).enumerate() {
                            assert!(
                                blk.iter().all(|&b| b == blk[0]) && blk[0] != 0,
                                "block {bi} mixes versions or reads zeros: {:?}…",
                                &blk[..8]
                            );
                        }
                    }
                    reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        // Stop the readers however this writer ends (a panic here must not hang the scope).
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&done);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        for k in 0..300u32 {
            let v = (k % 250) as u8 + 2;
            f.write_all_at(&vec![v; LEN], 0).unwrap();
        }
        // Let readers run at least a few passes after the writes (bounded polling).
        let start = reads.load(std::sync::atomic::Ordering::Relaxed);
        wait_for(Duration::from_secs(10), || {
            reads.load(std::sync::atomic::Ordering::Relaxed) >= start + 6
        });
    });
    assert!(reads.load(std::sync::atomic::Ordering::Relaxed) > 0);
    let last = (299 % 250) as u8 + 2;
    assert_eq!(fs::read(&path).unwrap(), vec![last; LEN]);
}

// ---------------------------------------------------------------------------------------
// Large sparse files
// ---------------------------------------------------------------------------------------

#[test]
fn sparse_file_past_4gib() {
    let Some(env) = setup("sparse_file_past_4gib") else {
        return;
    };
    let m = env.mount();
    let off = 5u64 << 30;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("sparse"))
        .unwrap();
    f.write_all_at(b"far away", off).unwrap();
    assert_eq!(f.metadata().unwrap().len(), off + 8);
    let mut buf = vec![0xFFu8; 8192];
    f.read_exact_at(&mut buf, 1 << 30).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "hole at 1 GiB is not zeros");
    f.read_exact_at(&mut buf[..8], off).unwrap();
    assert_eq!(&buf[..8], b"far away");
    let mut tail = vec![0xFFu8; 4104];
    f.read_exact_at(&mut tail, off - 4096).unwrap();
    assert!(tail[..4096].iter().all(|&b| b == 0));
    assert_eq!(&tail[4096..], b"far away");
    // Write just below 4 GiB too (32-bit offset edge).
    f.write_all_at(b"edge", (4u64 << 30) - 2).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let used = allocated_bytes(&env.backing);
    assert!(
        used < 100 << 20,
        "backing uses {used} bytes for a sparse file"
    );
    m.unmount();
    let m = env.mount();
    let f = File::open(m.p("sparse")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), off + 8);
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    assert_eq!(&b, b"far away");
    let mut b = [0u8; 6];
    f.read_exact_at(&mut b, (4u64 << 30) - 3).unwrap();
    assert_eq!(&b, b"\0edge\0");
}

// ---------------------------------------------------------------------------------------
// fio verification
// ---------------------------------------------------------------------------------------

fn run_fio(env: &Env, m: &Mounted, args: &[&str]) {
    let out = Command::new("fio")
        .args(args)
        .arg(format!("--directory={}", m.mnt.display()))
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio {args:?} failed ({:?}):\n{}\n{}\ndaemon log:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        env.daemon_log()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("err= 0"), "fio reported errors:\n{stdout}");
}

#[test]
fn fio_random_read_write_verify() {
    if !fio_available("fio_random_read_write_verify") {
        return;
    }
    let Some(env) = setup("fio_random_read_write_verify") else {
        return;
    };
    let m = env.mount();
    run_fio(
        &env,
        &m,
        &[
            "--name=v",
            "--rw=randrw",
            "--bs=4k",
            "--size=64m",
            "--verify=crc32c",
        ],
    );
    assert!(m.p("v.0.0").exists(), "fio data file");
}

#[test]
fn fio_sequential_write_verify() {
    if !fio_available("fio_sequential_write_verify") {
        return;
    }
    let Some(env) = setup("fio_sequential_write_verify") else {
        return;
    };
    let m = env.mount();
    run_fio(
        &env,
        &m,
        &[
            "--name=s",
            "--rw=write",
            "--bs=1m",
            "--size=64m",
            "--direct=0",
            "--verify=crc32c",
            "--do_verify=1",
        ],
    );
    assert_eq!(fs::metadata(m.p("s.0.0")).unwrap().len(), 64 << 20);
    // Unaligned block sizes with odd offsets also verify.
    run_fio(
        &env,
        &m,
        &[
            "--name=u",
            "--rw=randwrite",
            "--bs=3000",
            "--size=8m",
            "--verify=md5",
            "--do_verify=1",
        ],
    );
    m.unmount();
    // The sequential file still reads in full after a remount.
    let m = env.mount();
    let mut f = File::open(m.p("s.0.0")).unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, 64 << 20);
}

// ---------------------------------------------------------------------------------------
// More edge cases
// ---------------------------------------------------------------------------------------

#[test]
fn unlinked_and_replaced_files_stay_usable_while_open() {
    let Some(env) = setup("unlinked_and_replaced_files_stay_usable_while_open") else {
        return;
    };
    let m = env.mount();
    let old = pattern(1, 9000);
    fs::write(m.p("a"), &old).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("a"))
        .unwrap();
    fs::remove_file(m.p("a")).unwrap();
    assert!(!m.p("a").exists());
    // Read, write and stat through the descriptor of the unlinked file.
    let mut buf = vec![0u8; 9000];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_bytes_eq(&buf, &old, "read after unlink");
    f.write_all_at(b"more", 9000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 9004);
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop(f);
    // Renaming over an open file: the open descriptor still sees the old content.
    fs::write(m.p("b"), &old).unwrap();
    let f = File::open(m.p("b")).unwrap();
    fs::write(m.p("c"), b"replacement").unwrap();
    fs::rename(m.p("c"), m.p("b")).unwrap();
    let mut buf = vec![0u8; 9000];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_bytes_eq(&buf, &old, "replaced file through old descriptor");
    drop(f);
    assert_eq!(fs::read(m.p("b")).unwrap(), b"replacement");
    assert_eq!(list(&m.mnt), names(&["b"]));
}

#[test]
fn symlink_times_can_be_set() {
    let Some(env) = setup("symlink_times_can_be_set") else {
        return;
    };
    let m = env.mount();
    fs::write(m.p("t"), b"t").unwrap();
    set_times(&m.p("t"), (1_000_000_000, 0), (1_000_000_000, 0), 0).unwrap();
    std::os::unix::fs::symlink("t", m.p("l")).unwrap();
    set_times(
        &m.p("l"),
        (1_200_000_000, 5),
        (1_300_000_000, 7),
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let md = fs::symlink_metadata(m.p("l")).unwrap();
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (1_300_000_000, 7),
        "link mtime"
    );
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        (1_200_000_000, 5),
        "link atime"
    );
    // The target is untouched.
    assert_eq!(fs::metadata(m.p("t")).unwrap().mtime(), 1_000_000_000);
}

#[test]
fn setgid_directories_and_special_mode_bits() {
    let Some(env) = setup("setgid_directories_and_special_mode_bits") else {
        return;
    };
    let m = env.mount();
    let mask = umask();
    fs::create_dir(m.p("g")).unwrap();
    std::os::unix::fs::chown(m.p("g"), None, Some(4321)).unwrap();
    fs::set_permissions(m.p("g"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::write(m.p("g/f"), b"f").unwrap();
    fs::create_dir(m.p("g/sub")).unwrap();
    assert_eq!(fs::metadata(m.p("g/f")).unwrap().gid(), 4321, "file gid");
    let md = fs::metadata(m.p("g/sub")).unwrap();
    assert_eq!(md.gid(), 4321, "subdir gid");
    assert_ne!(md.mode() & 0o2000, 0, "subdir inherits the setgid bit");
    // A file created with setuid/setgid bits keeps them (root creating its own file).
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o6755)
        .open(m.p("suid"))
        .unwrap();
    assert_eq!(
        fs::metadata(m.p("suid")).unwrap().mode() & 0o7777,
        0o6755 & !mask,
        "mode of a file created with S_ISUID|S_ISGID"
    );
    fs::create_dir(m.p("sticky")).unwrap();
    fs::set_permissions(m.p("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(fs::metadata(m.p("sticky")).unwrap().mode() & 0o7777, 0o1777);
}

#[test]
fn sizes_beyond_the_limit_fail_with_efbig() {
    let Some(env) = setup("sizes_beyond_the_limit_fail_with_efbig") else {
        return;
    };
    let m = env.mount();
    let data = pattern(8, 5000);
    fs::write(m.p("f"), &data).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("f"))
        .unwrap();
    let huge = i64::MAX as u64 - 4096;
    assert_eq!(errno_of(f.set_len(huge), "truncate huge"), libc::EFBIG);
    assert_eq!(f.metadata().unwrap().len(), 5000);
    // With the kernel's write-back cache (cache=writeback) the write is accepted into the
    // page cache and the error surfaces when it is written back (fsync); with
    // cache=writethrough it fails at once. Either way it is reported, and the file on
    // disk is untouched.
    match f.write_at(b"x", huge) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EFBIG)),
        Ok(_) => assert_eq!(
            errno_of(f.sync_all(), "fsync after huge write"),
            libc::EFBIG
        ),
    }
    drop(f);
    m.unmount();
    let m = env.mount_with(&["cache=writeback"]);
    let f = OpenOptions::new().write(true).open(m.p("f")).unwrap();
    match f.write_at(b"x", huge) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EFBIG)),
        Ok(_) => assert_eq!(errno_of(f.sync_all(), "fsync, write-back"), libc::EFBIG),
    }
    drop(f);
    m.unmount();
    let m = env.mount_with(&["cache=writethrough"]);
    assert_eq!(fs::metadata(m.p("f")).unwrap().len(), 5000);
    assert_bytes_eq(&fs::read(m.p("f")).unwrap(), &data, "unchanged after EFBIG");
    let f = OpenOptions::new().write(true).open(m.p("f")).unwrap();
    assert_eq!(
        errno_of(f.write_at(b"x", huge), "write huge, write-through"),
        libc::EFBIG
    );
    assert_eq!(f.metadata().unwrap().len(), 5000);
}

#[test]
fn copy_file_range_and_fs_copy() {
    let Some(env) = setup("copy_file_range_and_fs_copy") else {
        return;
    };
    let m = env.mount();
    let data = pattern(77, 3 * 4096 + 1234);
    fs::write(m.p("src"), &data).unwrap();
    fs::set_permissions(m.p("src"), fs::Permissions::from_mode(0o640)).unwrap();
    // fs::copy uses copy_file_range where it can and copies permissions.
    assert_eq!(fs::copy(m.p("src"), m.p("dst")).unwrap(), data.len() as u64);
    assert_bytes_eq(&fs::read(m.p("dst")).unwrap(), &data, "fs::copy");
    assert_eq!(fs::metadata(m.p("dst")).unwrap().mode() & 0o7777, 0o640);
    // An explicit copy_file_range at odd offsets into an existing file.
    let src = File::open(m.p("src")).unwrap();
    let dst = OpenOptions::new().write(true).open(m.p("dst")).unwrap();
    let (mut off_in, mut off_out): (i64, i64) = (1000, 5000);
    let mut left = 7000usize;
    while left > 0 {
        // SAFETY: valid descriptors and offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(n > 0, "copy_file_range: {}", io::Error::last_os_error());
        left -= n as usize;
    }
    drop((src, dst));
    let mut want = data.clone();
    want.copy_within(1000..8000, 5000);
    assert_bytes_eq(&fs::read(m.p("dst")).unwrap(), &want, "copy_file_range");
    // Copying a file out of and into the mount round-trips.
    let outside = env.dir.path().join("outside");
    fs::copy(m.p("dst"), &outside).unwrap();
    fs::copy(&outside, m.p("back")).unwrap();
    assert_bytes_eq(&fs::read(m.p("back")).unwrap(), &want, "copy out and back");
}

/// Nodes that a listing creates start without a backing descriptor (opened on first use).
/// After a remount, list a directory (readdirplus looks every entry up) and then use each
/// entry only through what the listing gave the kernel: read, write, rename, hard link,
/// unlink, chmod, truncate, xattrs.
#[test]
fn entries_known_only_from_a_listing_work_for_every_operation() {
    let Some(env) = setup("entries_known_only_from_a_listing_work_for_every_operation") else {
        return;
    };
    let m = env.mount();
    fs::create_dir(m.p("d")).unwrap();
    for i in 0..8 {
        fs::write(m.p(&format!("d/f{i}")), pattern(i, 5000 + i as usize)).unwrap();
    }
    m.unmount();

    let m = env.mount();
    let listed: Vec<(OsString, u64)> = fs::read_dir(m.p("d"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), e.metadata().unwrap().len())
        })
        .collect();
    assert_eq!(listed.len(), 8, "{listed:?}");
    for (name, len) in &listed {
        let i: u64 = name.to_str().unwrap()[1..].parse().unwrap();
        assert_eq!(*len, 5000 + i, "size of {name:?} from the listing");
    }
    assert_bytes_eq(
        &fs::read(m.p("d/f0")).unwrap(),
        &pattern(0, 5000),
        "read f0",
    );
    let f = OpenOptions::new().write(true).open(m.p("d/f1")).unwrap();
    f.write_all_at(b"XYZ", 4095).unwrap();
    drop(f);
    let mut want = pattern(1, 5001);
    want[4095..4098].copy_from_slice(b"XYZ");
    assert_bytes_eq(&fs::read(m.p("d/f1")).unwrap(), &want, "write f1");
    fs::rename(m.p("d/f2"), m.p("d/g2")).unwrap();
    assert_bytes_eq(
        &fs::read(m.p("d/g2")).unwrap(),
        &pattern(2, 5002),
        "renamed f2",
    );
    fs::hard_link(m.p("d/f3"), m.p("d/h3")).unwrap();
    assert_eq!(fs::metadata(m.p("d/f3")).unwrap().nlink(), 2);
    assert_bytes_eq(
        &fs::read(m.p("d/h3")).unwrap(),
        &pattern(3, 5003),
        "link to f3",
    );
    fs::remove_file(m.p("d/f4")).unwrap();
    assert_eq!(
        errno_of(fs::metadata(m.p("d/f4")), "stat removed f4"),
        libc::ENOENT
    );
    fs::set_permissions(m.p("d/f5"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(m.p("d/f5")).unwrap().mode() & 0o777, 0o600);
    OpenOptions::new()
        .write(true)
        .open(m.p("d/f6"))
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_bytes_eq(
        &fs::read(m.p("d/f6")).unwrap(),
        &pattern(6, 10),
        "truncated f6",
    );
    let st = Command::new("setfattr")
        .args(["-n", "user.k", "-v", "v7"])
        .arg(m.p("d/f7"))
        .status()
        .expect("setfattr (package attr)");
    assert!(st.success(), "setfattr on f7");
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", "user.k"])
        .arg(m.p("d/f7"))
        .output()
        .expect("getfattr (package attr)");
    assert_eq!(out.stdout, b"v7");
    m.unmount();

    // Everything above persisted.
    let m = env.mount();
    assert_eq!(
        list(&m.p("d")),
        names(&["f0", "f1", "f3", "f5", "f6", "f7", "g2", "h3"])
    );
    assert_bytes_eq(&fs::read(m.p("d/f1")).unwrap(), &want, "f1 after remount");
    assert_bytes_eq(
        &fs::read(m.p("d/h3")).unwrap(),
        &pattern(3, 5003),
        "h3 after remount",
    );
    assert_bytes_eq(
        &fs::read(m.p("d/f6")).unwrap(),
        &pattern(6, 10),
        "f6 after remount",
    );

    m.unmount();
}

// ---------------------------------------------------------------------------------------
// Listings read ahead
// ---------------------------------------------------------------------------------------

fn names_of(prefix: &str, n: usize) -> Vec<OsString> {
    let mut v: Vec<OsString> = (0..n).map(|i| format!("{prefix}{i:05}").into()).collect();
    v.sort();
    v
}

/// Directory "d" holding the files `names_of(prefix, n)`, each with `content`, on a fresh
/// mount (so the kernel knows none of them yet).
fn remounted_with_files(env: &Env, prefix: &str, n: usize, content: &[u8]) -> Mounted {
    let m = env.mount();
    fs::create_dir(m.p("d")).unwrap();
    for name in names_of(prefix, n) {
        fs::write(m.p("d").join(&name), content).unwrap();
    }
    m.unmount();
    env.mount()
}

/// kekfs stats the next entries of a listing ahead of the kernel's requests. A file
/// written between two requests must still be reported with its new size: attributes
/// read before a change are never sent (the kernel would take a stale size from a
/// listing and cut the file's cached pages to it).
#[test]
fn listing_never_reports_attributes_read_before_a_change() {
    let Some(env) = setup("listing_never_reports_attributes_read_before_a_change") else {
        return;
    };
    const N: usize = 1200;
    let m = remounted_with_files(&env, "f", N, b"");
    let mut d = DirStream::open(&m.p("d"));
    let mut seen = vec![d.next_name().expect("first entry")];
    // Let the read-ahead run past the first chunk (it would have stat'ed the next
    // entries at size 0), then grow every file through the mount.
    std::thread::sleep(Duration::from_millis(200));
    for n in names_of("f", N) {
        fs::write(m.p("d").join(&n), b"0123456789").unwrap();
    }
    seen.extend(std::iter::from_fn(|| d.next_name()));
    drop(d);
    seen.retain(|n| n != "." && n != "..");
    seen.sort();
    assert_eq!(seen, names_of("f", N), "the listing");
    // Within the attribute TTL (1 s) of the listing, so what it sent is what the kernel
    // answers with.
    let wrong: Vec<(OsString, u64)> = names_of("f", N)
        .into_iter()
        .filter_map(|n| {
            let len = fs::metadata(m.p("d").join(&n)).unwrap().len();
            (len != 10).then_some((n, len))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} stale sizes from the listing, first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(8)]
    );
    assert_eq!(fs::read(m.p("d/f00700")).unwrap(), b"0123456789");
    m.unmount();
}

/// A listing of a big directory that is read in steps: telldir/seekdir come back to the
/// same entry, files removed and created meanwhile leave the listing whole (every
/// untouched entry exactly once, nothing twice), and rewinddir lists the directory as it
/// is now.
#[test]
fn listing_in_steps_seeks_and_survives_changes() {
    let Some(env) = setup("listing_in_steps_seeks_and_survives_changes") else {
        return;
    };
    const N: usize = 1500;
    let m = remounted_with_files(&env, "k", N, b"k");
    let mut d = DirStream::open(&m.p("d"));
    let mut first = Vec::new();
    for _ in 0..700 {
        first.push(d.next_name().unwrap());
    }
    let pos = d.tell();
    let after: Vec<OsString> = (0..300).map(|_| d.next_name().unwrap()).collect();
    d.seek(pos);
    let again: Vec<OsString> = (0..300).map(|_| d.next_name().unwrap()).collect();
    assert_eq!(again, after, "seekdir back to a telldir position");
    // Remove every third file and add new ones while the stream is open.
    let removed: Vec<OsString> = names_of("k", N).into_iter().step_by(3).collect();
    for n in &removed {
        fs::remove_file(m.p("d").join(n)).unwrap();
    }
    for n in names_of("new", 400) {
        fs::write(m.p("d").join(&n), b"n").unwrap();
    }
    let mut all = first;
    all.extend(after);
    all.extend(d.rest());
    all.retain(|n| n != "." && n != "..");
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), all.len(), "a name listed twice");
    for n in names_of("k", N) {
        if !removed.contains(&n) {
            assert!(sorted.binary_search(&n).is_ok(), "{n:?} missing");
        }
    }
    for n in &sorted {
        let s = n.to_str().unwrap();
        assert!(
            s.starts_with('k') || s.starts_with("new"),
            "unexpected {n:?}"
        );
    }
    // From the start again: rewinddir reads the directory afresh (POSIX: as opendir
    // would), so the removed files are gone and the new ones are there.
    d.rewind();
    let mut fresh = d.rest();
    fresh.sort();
    let mut want: Vec<OsString> = names_of("k", N)
        .into_iter()
        .filter(|n| !removed.contains(n))
        .chain(names_of("new", 400))
        .collect();
    want.sort();
    assert_eq!(fresh, want, "after rewinddir");
    drop(d);
    let mut now = list(&m.p("d"));
    now.sort();
    assert_eq!(now, want, "a fresh listing");
    m.unmount();
}
