//! Thin, checked wrappers over the *at(2) and xattr syscalls the FUSE frontend needs on
//! the backing tree. All `unsafe` of the frontend lives here.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A C string from a backing name (names never contain NUL; refuse if one does).
pub fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: a path that reaches the inode behind an O_PATH descriptor.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a formatted number")
}

/// openat(2).
pub fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is owned by us.
    let fd = cvt(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// fstatat(2); `name` empty with AT_EMPTY_PATH stats `dir` itself.
pub fn fstatat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<libc::stat> {
    // SAFETY: zeroed is a valid bit pattern for the plain-data `stat` struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a valid out-pointer to `st`.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// Stat the inode behind a descriptor (works for O_PATH descriptors).
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    fstatat(fd, c"", libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
}

/// mkdirat(2).
pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// mknodat(2).
pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode as libc::mode_t, rdev) }).map(drop)
}

/// unlinkat(2).
pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

/// renameat2(2).
pub fn renameat2(
    olddir: RawFd,
    old: &CStr,
    newdir: RawFd,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::renameat2(olddir, old.as_ptr(), newdir, new.as_ptr(), flags) }).map(drop)
}

/// symlinkat(2).
pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

/// readlinkat(2) of the symlink an O_PATH descriptor refers to.
pub fn readlink_fd(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer pointer and length describe `buf`.
    let n = cvt_size(unsafe {
        libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// linkat(2) with AT_EMPTY_PATH: a new name for the inode behind `fd`.
pub fn link_fd(fd: RawFd, newdir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings; AT_EMPTY_PATH links the inode `fd` refers to.
    cvt(unsafe { libc::linkat(fd, c"".as_ptr(), newdir, name.as_ptr(), libc::AT_EMPTY_PATH) })
        .map(drop)
}

/// fchownat(2) on the inode behind `fd` (no symlink following).
pub fn chown_fd(fd: RawFd, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let u = uid.unwrap_or(u32::MAX);
    let g = gid.unwrap_or(u32::MAX);
    // SAFETY: valid (empty) C string; -1 ids mean "leave unchanged".
    cvt(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            u,
            g,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod through /proc/self/fd (O_PATH descriptors cannot fchmod).
pub fn chmod_fd(fd: RawFd, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: valid C string.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// A timestamp for utimensat: `None` = leave, `Some(None)` = now, `Some(Some(t))` = t.
pub type TimeSpec = Option<Option<std::time::SystemTime>>;

fn timespec(t: TimeSpec) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(None) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(Some(t)) => {
            let (s, n) = match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut s = -(d.as_secs() as i64);
                    let mut n = d.subsec_nanos() as i64;
                    if n > 0 {
                        s -= 1;
                        n = 1_000_000_000 - n;
                    }
                    (s, n)
                }
            };
            libc::timespec {
                tv_sec: s,
                tv_nsec: n,
            }
        }
    }
}

/// utimensat(2) through /proc/self/fd.
pub fn utimens_fd(fd: RawFd, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let p = proc_path(fd);
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: valid C string and a two-element timespec array.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) }).map(drop)
}

/// utimensat(2) on the inode behind an O_PATH descriptor itself, without following it
/// (for symlinks, which /proc/self/fd would follow).
pub fn utimens_nofollow_fd(fd: RawFd, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: valid (empty) C string and a two-element timespec array.
    cvt(unsafe {
        libc::utimensat(
            fd,
            c"".as_ptr(),
            ts.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// statvfs(3) of the filesystem holding `fd`.
pub fn statvfs_fd(fd: RawFd) -> io::Result<libc::statvfs> {
    // SAFETY: zeroed is valid for the plain-data statvfs struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer.
    cvt(unsafe { libc::fstatvfs(fd, &mut st) })?;
    Ok(st)
}

/// fallocate(2).
pub fn fallocate(fd: &impl AsRawFd, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) }).map(drop)
}

/// getxattr(2) on a path; returns the value.
pub fn getxattr(path: &CStr, name: &CStr) -> io::Result<Vec<u8>> {
    loop {
        // SAFETY: size query with a null buffer.
        let n = cvt_size(unsafe {
            libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0)
        })?;
        let mut buf = vec![0u8; n];
        // SAFETY: buffer pointer/length describe `buf`.
        match cvt_size(unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }) {
            Ok(m) => {
                buf.truncate(m);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// setxattr(2) on a path.
pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: value pointer/length describe `value`.
    cvt(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// listxattr(2) on a path: the NUL-separated names.
pub fn listxattr(path: &CStr) -> io::Result<Vec<u8>> {
    loop {
        // SAFETY: size query with a null buffer.
        let n = cvt_size(unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; n];
        // SAFETY: buffer pointer/length describe `buf`.
        match cvt_size(unsafe {
            libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        }) {
            Ok(m) => {
                buf.truncate(m);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// removexattr(2) on a path.
pub fn removexattr(path: &CStr, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// The entries of a directory (names only, without "." and ".."), via its descriptor.
pub fn list_dir(dir: RawFd) -> io::Result<Vec<(Vec<u8>, u64, u8)>> {
    let mut r = DirReader::open(dir)?;
    let mut out = Vec::new();
    while let Some(e) = r.next_entry()? {
        out.push(e);
    }
    Ok(out)
}

/// Reads a directory's entries a buffer at a time (`getdents64`), so a caller can stop
/// part-way and go on later; "." and ".." are left out.
pub struct DirReader {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// Next record in `buf`, and the end of the records the last `getdents64` returned.
    pos: usize,
    len: usize,
    done: bool,
}

/// Layout of `struct linux_dirent64`: d_ino (u64), d_off (i64), d_reclen (u16),
/// d_type (u8), then the NUL-terminated name.
const DIRENT_RECLEN: usize = 16;
const DIRENT_TYPE: usize = 18;
const DIRENT_NAME: usize = 19;

impl DirReader {
    /// Open directory `dir` (any descriptor of it, O_PATH included) for reading.
    pub fn open(dir: RawFd) -> io::Result<DirReader> {
        let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        Ok(DirReader {
            fd,
            buf: vec![0; 32 * 1024],
            pos: 0,
            len: 0,
            done: false,
        })
    }

    /// The next entry as (name, inode number, d_type), or `None` at the end.
    pub fn next_entry(&mut self) -> io::Result<Option<(Vec<u8>, u64, u8)>> {
        loop {
            if self.pos >= self.len {
                if self.done {
                    return Ok(None);
                }
                // SAFETY: the buffer is valid for writes of its full length, and the
                // descriptor is an open directory owned by self.
                let n = unsafe {
                    libc::syscall(
                        libc::SYS_getdents64,
                        self.fd.as_raw_fd(),
                        self.buf.as_mut_ptr(),
                        self.buf.len(),
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                self.pos = 0;
                self.len = (n as usize).min(self.buf.len());
                if self.len == 0 {
                    self.done = true;
                    return Ok(None);
                }
            }
            let rec = &self.buf[self.pos..self.len];
            // The kernel writes whole records; check anyway rather than trust the lengths.
            let reclen = match rec.get(DIRENT_RECLEN..DIRENT_RECLEN + 2) {
                Some(b) => u16::from_ne_bytes([b[0], b[1]]) as usize,
                None => 0,
            };
            if reclen <= DIRENT_NAME || reclen > rec.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed getdents64 record",
                ));
            }
            self.pos += reclen;
            let rec = &rec[..reclen];
            let ino = u64::from_ne_bytes(rec[..8].try_into().expect("8 bytes"));
            let ty = rec[DIRENT_TYPE];
            let name = &rec[DIRENT_NAME..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if name == b"." || name == b".." {
                continue;
            }
            return Ok(Some((name.to_vec(), ino, ty)));
        }
    }
}

/// Spawn a thread that starts with every signal blocked, so that signals (SIGTERM above
/// all) go to the threads meant to handle them whenever this one is made, even before the
/// daemon blocks them for the whole process.
pub fn spawn_without_signals(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    // SAFETY: all-zero is a valid sigset_t, and sigfillset initialises it fully.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pthread_sigmask fills it in.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a sigset_t.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: valid pointers; this changes only the calling thread's mask, restored below.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // The new thread inherits the full mask.
    let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
    // SAFETY: `old` is the mask read above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
}

/// The CPU the calling thread runs on (a vDSO call), if the kernel tells.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and only returns a number.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// The CPUs the calling thread may run on.
pub fn affinity() -> io::Result<libc::cpu_set_t> {
    // SAFETY: all-zero is a valid (empty) cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid out-pointer of the size passed.
    cvt(unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) })?;
    Ok(set)
}

/// Let the calling thread run on the CPUs of `set` except `cpu`; does nothing (and says
/// so) if that would leave none.
pub fn avoid_cpu(set: &libc::cpu_set_t, cpu: usize) -> io::Result<bool> {
    let mut s = *set;
    if cpu >= libc::CPU_SETSIZE as usize {
        return Ok(false);
    }
    // SAFETY: cpu < CPU_SETSIZE (checked), so CPU_CLR stays inside the set.
    unsafe { libc::CPU_CLR(cpu, &mut s) };
    // SAFETY: CPU_COUNT only reads the set.
    if unsafe { libc::CPU_COUNT(&s) } == 0 {
        return Ok(false);
    }
    // SAFETY: `s` is a valid cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&s), &s) })?;
    Ok(true)
}

/// Set the process umask (the daemon runs with 0 so requested modes land exactly).
pub fn set_umask(mask: u32) {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) };
}

/// Bytes of an OsStr.
pub fn os_bytes(s: &OsStr) -> &[u8] {
    s.as_bytes()
}
