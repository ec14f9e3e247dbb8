//! Opening kekfs's own files (lock, header, directory ids, long-name sidecars) in the
//! backing directory, which is untrusted: only regular files, never through a symbolic
//! link, never opening a FIFO or device, and never writing to a file with other names.
//!
//! Someone who can modify the backing directory could otherwise make kekfs, often running
//! as root, truncate or overwrite any file on the machine (a `kekfs.lock` symlinked to
//! `/etc/shadow`), or hang a mount or a listing for good (a FIFO in place of a sidecar).

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Open `name` in the directory `dir` (a descriptor, or `libc::AT_FDCWD` with a path) with
/// `flags` (`O_CREAT` creates it with `mode`; `O_TRUNC` truncates it). Fails if it is a
/// symbolic link or anything but a regular file, and, when opened for writing, if it has
/// other hard links (it could be any file of the same filesystem).
///
/// The entry is first opened as an `O_PATH` handle (which opens nothing: no device or
/// FIFO side effect, no blocking) and checked through it; only that same inode is then
/// opened for real, through `/proc/self/fd`. A missing file is created with `O_EXCL`,
/// which never follows a link. Truncation happens only after the checks.
pub fn open_at(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<File> {
    let truncate = flags & libc::O_TRUNC != 0;
    let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
    let create = flags & libc::O_CREAT != 0;
    let flags = (flags & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL))
        | libc::O_NOFOLLOW
        | libc::O_NONBLOCK
        | libc::O_NOCTTY
        | libc::O_CLOEXEC;
    let file = match openat(
        dir,
        name,
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    ) {
        Ok(handle) => {
            let st = fstat(&handle)?;
            regular(&st)?;
            if writable && st.st_nlink != 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "has {} hard links (kekfs writes only files with one name here)",
                        st.st_nlink
                    ),
                ));
            }
            let proc = std::ffi::CString::new(format!("/proc/self/fd/{}", handle.as_raw_fd()))
                .expect("no NUL in a formatted number");
            // /proc/self/fd/N of an O_PATH handle opens the inode it holds, not the name.
            openat(libc::AT_FDCWD, &proc, flags & !libc::O_NOFOLLOW, 0)?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            // Not there: create it afresh. O_EXCL fails on anything that appeared
            // meanwhile, a symbolic link included.
            openat(dir, name, flags | libc::O_CREAT | libc::O_EXCL, mode)?
        }
        Err(e) => return Err(e),
    };
    // Checked again on the open descriptor (a regular file reopened is the same file, but
    // this costs one fstat and holds whatever happened).
    regular(&fstat(&file)?)?;
    if truncate {
        file.set_len(0)?;
    }
    Ok(file)
}

/// openat(2), the descriptor as a `File`.
fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the descriptor returned is owned
    // by the File made from it and by nothing else.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `open_at` for a path.
pub fn open(path: &Path, flags: i32, mode: u32) -> io::Result<File> {
    open_at(libc::AT_FDCWD, &cpath(path)?, flags, mode)
}

/// Read at most `limit` bytes of the regular file `name` in `dir` (see `open_at`).
pub fn read_at(dir: RawFd, name: &CStr, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    open_at(dir, name, libc::O_RDONLY, 0)?
        .take(limit)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// `read_at` for a path.
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    read_at(libc::AT_FDCWD, &cpath(path)?, limit)
}

fn cpath(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn fstat(file: &File) -> io::Result<libc::stat> {
    // SAFETY: zeroed is a valid bit pattern for the plain-data `stat` struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out-pointer to `st`.
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn regular(st: &libc::stat) -> io::Result<()> {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => Ok(()),
        libc::S_IFLNK => Err(not_regular("a symbolic link")),
        libc::S_IFIFO => Err(not_regular("a FIFO")),
        libc::S_IFDIR => Err(not_regular("a directory")),
        libc::S_IFCHR | libc::S_IFBLK => Err(not_regular("a device")),
        libc::S_IFSOCK => Err(not_regular("a socket")),
        _ => Err(not_regular("not a file")),
    }
}

fn not_regular(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what}, not a regular file (kekfs uses only regular files here)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &Path) -> std::ffi::CString {
        cpath(p).unwrap()
    }

    #[test]
    fn regular_files_open_and_read_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read(&p, 4).unwrap(), b"0123");
        assert_eq!(read(&p, 100).unwrap(), b"0123456789");
        let q = d.path().join("new");
        open(&q, libc::O_RDWR | libc::O_CREAT, 0o600).unwrap();
        assert!(q.is_file());
        assert_eq!(
            read(&d.path().join("missing"), 10).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn symlinks_fifos_and_directories_are_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"victim\n").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let fifo = d.path().join("fifo");
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(c(&fifo).as_ptr(), 0o600) }, 0);
        for (p, what) in [
            (&link, "symbolic link"),
            (&fifo, "FIFO"),
            (&d.path().to_path_buf(), "directory"),
        ] {
            for flags in [
                libc::O_RDONLY,
                libc::O_RDWR | libc::O_CREAT,
                libc::O_WRONLY | libc::O_TRUNC,
            ] {
                let e = open(p, flags, 0o600).unwrap_err();
                assert_eq!(
                    e.kind(),
                    io::ErrorKind::InvalidData,
                    "{p:?} {flags:#o}: {e}"
                );
                assert!(e.to_string().contains(what), "{e}");
            }
            assert!(read(p, 10).is_err());
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim\n");
        // A dangling link is refused too (not created through).
        let dangling = d.path().join("dangling");
        std::os::unix::fs::symlink(d.path().join("nowhere"), &dangling).unwrap();
        assert!(open(&dangling, libc::O_WRONLY | libc::O_CREAT, 0o600).is_err());
        assert!(!d.path().join("nowhere").exists());
    }

    #[test]
    fn hard_linked_files_are_read_but_never_written() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"victim\n").unwrap();
        let link = d.path().join("lock");
        std::fs::hard_link(&victim, &link).unwrap();
        assert_eq!(read(&link, 100).unwrap(), b"victim\n");
        for flags in [
            libc::O_RDWR | libc::O_CREAT,
            libc::O_WRONLY | libc::O_TRUNC,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        ] {
            let e = open(&link, flags, 0o600).unwrap_err();
            assert!(e.to_string().contains("hard links"), "{flags:#o}: {e}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim\n");
        // With one name, O_TRUNC truncates (after the checks).
        std::fs::remove_file(&victim).unwrap();
        let f = open(&link, libc::O_WRONLY | libc::O_TRUNC, 0).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
    }
}
