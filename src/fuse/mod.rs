//! The FUSE frontend: translates kernel requests into operations on the backing tree,
//! calling the volume for names, symlinks, xattrs and content. No cryptography here.

mod dirs;
pub mod nodes;
mod reply;
pub mod sys;

use crate::format::names::{self, BackingName};
use crate::format::offsets::{MAX_FILE_SIZE, plaintext_size};
use crate::format::{DIRID_FILE, FormatError, parse_dirid};
use crate::monitor::Gate;
use crate::untrusted;
use crate::volume::content::{self, ContentError};
use crate::volume::split::SplitWriter;
use crate::volume::{FileCipher, Volume};
use dirs::{Lister, OpenDir, ReadAhead};
use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use log::{error, warn};
use nodes::{Node, NodeTable, kind_of};
use reply::SendResult;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes, and entries where `ENTRY_TTL` does not apply.
const TTL: Duration = Duration::from_secs(1);

/// How long the kernel may cache entries (name to inode) where a revocation can drop
/// them all at once (`FUSE_NOTIFY_INC_EPOCH`, FUSE 7.44, Linux 6.16; see `CachePurger`).
/// kekfs is the only writer of its backing tree and the kernel updates its cache on its
/// own creates, renames and unlinks, so a cached entry goes stale only when the backing
/// directory is changed behind the mount. Entries are not looked up again every second
/// then: a small-file run that outlasts the attribute TTL asked once more per file.
const ENTRY_TTL: Duration = Duration::from_secs(60);

/// The read-ahead window kekfs asks the kernel for (bytes). INIT can only lower the
/// kernel's default (128 KiB), so the mount raises it through /sys (`cli::mount`); reads
/// still arrive as requests of at most `max_pages` (1 MiB), two of them per window.
pub const MAX_READAHEAD: u32 = 2 << 20;

/// How long the write helper looks for the next large write after one, by default. A
/// stream of 1 MiB writes comes 0.3–0.8 ms apart here; waking the idle helper instead
/// costs about what its half of the work saves.
pub const SPLIT_SPIN: Duration = Duration::from_millis(1);

/// Flags for every created file, and every opened one when the kernel lacks no-open
/// support (see `open`; without a request the kernel keeps the cache by default):
/// - `FOPEN_NOFLUSH`: no FLUSH request on close, as kekfs buffers nothing (writes reach
///   the backing file before they are acknowledged; with the write-back cache the kernel
///   sends FLUSH anyway, to write dirty pages back). Saves one round trip per `close`.
/// - `FOPEN_KEEP_CACHE`: an open keeps the file's cached pages instead of dropping them,
///   so data read or written earlier is served from the page cache, as on a local
///   filesystem. Every change to a file's content goes through this mount (the volume
///   lock keeps other kekfs daemons out), so the cache cannot go stale; the purge after a
///   revocation drops it (`CachePurger`), and reads are refused from then on. Measured:
///   reading back a file just written costs no READ request (small-file cycle: 14 -> 13
///   requests).
const FILE_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH.union(FopenFlags::FOPEN_KEEP_CACHE);

type Res<T> = Result<T, Errno>;

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// An open regular file (cheap to clone: two `Arc`s).
#[derive(Clone)]
struct OpenFile {
    node: Arc<Node>,
    file: Arc<File>,
    writable: bool,
}

/// Purges what the frontend and the kernel cached once keys are revoked.
pub struct CachePurger {
    nodes: Arc<Mutex<NodeTable>>,
}

impl CachePurger {
    /// Forget every cached per-file key and tell the kernel to drop cached pages and
    /// attributes of every inode it knows, and every name it has cached, so no plaintext
    /// is served from a cache and every path is looked up (and refused) again.
    pub fn purge(&self, notifier: &fuser::Notifier) {
        let all = lock(&self.nodes).all();
        for n in &all {
            *lock(&n.cipher) = None;
        }
        for n in &all {
            if let Err(e) = notifier.inval_inode(INodeNo(n.ino), 0, 0) {
                log::debug!("inval_inode {}: {e}", n.ino);
            }
        }
        // Kernels before 6.16 refuse it; there entries are cached for `TTL` only.
        if let Err(e) = notifier.inc_epoch() {
            log::debug!("inc_epoch: {e}");
        }
    }
}

/// The kekfs filesystem served over FUSE.
pub struct KekFs {
    gate: Arc<Gate>,
    nodes: Arc<Mutex<NodeTable>>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    /// Shared with the directory read-ahead worker; every handler that changes the
    /// backing tree (setattr, mknod, mkdir, unlink, rmdir, symlink, rename, link, open,
    /// write, setxattr, removexattr, create, fallocate) calls its `changed` before
    /// replying, which voids attributes read ahead before the change.
    lister: Arc<Lister>,
    read_ahead: ReadAhead,
    /// Writes half of each large write on a second thread (see `volume::split`).
    splitter: SplitWriter,
    next_fh: AtomicU64,
    root_backing_ino: u64,
    root_dev: u64,
    read_only: bool,
    writeback: bool,
    /// The kernel opens files without an OPEN request (FUSE_NO_OPEN_SUPPORT negotiated):
    /// its reads and writes then carry file handle 0 and use the node's shared content
    /// descriptor.
    no_open: bool,
    /// How long the kernel may cache entries: `ENTRY_TTL` where the kernel can drop them
    /// on a revocation, else `TTL`.
    entry_ttl: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KekFs {
    /// Serve the volume whose backing root is `backing`.
    pub fn new(gate: Arc<Gate>, backing: &Path, read_only: bool) -> io::Result<KekFs> {
        Self::with_cache(gate, backing, read_only, false, SPLIT_SPIN)
    }

    /// Like `new` (write-through), choosing whether the kernel may cache writes
    /// (write-back) or must send each write to kekfs as it happens (write-through), and
    /// how long the write helper looks for the next large write after one before it
    /// sleeps (`split_spin`; zero: it sleeps at once).
    pub fn with_cache(
        gate: Arc<Gate>,
        backing: &Path,
        read_only: bool,
        writeback: bool,
        split_spin: Duration,
    ) -> io::Result<KekFs> {
        let root = sys::openat(
            libc::AT_FDCWD,
            &sys::cstr(backing.as_os_str().as_bytes())?,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let st = sys::fstat(root.as_raw_fd())?;
        let mut table = NodeTable::default();
        table.insert_root(Node::new(1, root, FileType::Directory));
        let lister = Arc::new(Lister::new(gate.clone(), st.st_ino));
        let (splitter, worker) = SplitWriter::new();
        // Made when the filesystem is, which may be before the daemon blocks signals.
        sys::spawn_without_signals("kekfs-writer", move || worker.run(split_spin))?;
        Ok(KekFs {
            read_ahead: ReadAhead::start(lister.clone())?,
            splitter,
            lister,
            gate,
            nodes: Arc::new(Mutex::new(table)),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            root_backing_ino: st.st_ino,
            root_dev: st.st_dev,
            read_only,
            writeback,
            no_open: false,
            entry_ttl: TTL,
        })
    }

    /// Size the inode table's descriptor budget for a process limit of `fd_limit`
    /// descriptors (see `nodes`).
    pub fn set_fd_limit(&self, fd_limit: u64) {
        lock(&self.nodes).set_fd_limit(fd_limit);
    }

    /// The unlocked volume, or the errno of the reason there is none (revoked keys).
    fn vol(&self) -> Res<Arc<Volume>> {
        self.lister.vol()
    }

    /// The handle the lifecycle monitor uses to purge caches after it drops the keys.
    pub fn cache_purger(&self) -> CachePurger {
        CachePurger {
            nodes: self.nodes.clone(),
        }
    }

    fn node(&self, ino: INodeNo) -> Res<Arc<Node>> {
        let mut t = lock(&self.nodes);
        t.trim_if_over();
        t.get(ino.0).ok_or(Errno::ESTALE)
    }

    fn fuse_ino(&self, st: &libc::stat) -> Res<u64> {
        if st.st_dev != self.root_dev {
            warn!("backing tree crosses into another filesystem; refusing that entry");
            return Err(Errno::EXDEV);
        }
        if st.st_ino == self.root_backing_ino {
            Ok(1)
        } else if st.st_ino == 1 {
            error!("backing inode number 1 collides with the FUSE root id");
            Err(Errno::EIO)
        } else {
            Ok(st.st_ino)
        }
    }

    fn attr(&self, ino: u64, st: &libc::stat, node: Option<&Node>) -> FileAttr {
        let kind = kind_of(st.st_mode);
        let size = match kind {
            FileType::RegularFile => plaintext_size(st.st_size as u64),
            FileType::Symlink => {
                // Stored target: base64url(nonce ‖ ct ‖ tag); report the plaintext length.
                let enc = st.st_size as u64;
                (enc * 3 / 4).saturating_sub(crate::crypto::aead::OVERHEAD as u64)
            }
            _ => st.st_size as u64,
        };
        let _ = node;
        let ts = |s: i64, ns: i64| {
            if s >= 0 {
                UNIX_EPOCH + Duration::new(s as u64, ns as u32)
            } else {
                UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + Duration::from_nanos(ns as u64)
            }
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: st.st_blocks as u64,
            atime: ts(st.st_atime, st.st_atime_nsec),
            mtime: ts(st.st_mtime, st.st_mtime_nsec),
            ctime: ts(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    fn stat_node(&self, node: &Node) -> Res<FileAttr> {
        let fd = node.fd().map_err(|e| errno(&e))?;
        let st = sys::fstat(fd.as_raw_fd()).map_err(|e| errno(&e))?;
        Ok(self.attr(node.ino, &st, Some(node)))
    }

    fn dir_id(&self, dir: &Node) -> Res<[u8; 16]> {
        if let Some(id) = dir.dir_id.get() {
            return Ok(*id);
        }
        let read = || -> Result<[u8; 16], String> {
            let name = sys::cstr(DIRID_FILE.as_bytes()).map_err(|e| e.to_string())?;
            // A valid id file has 16 bytes; reading a little more shows a longer one.
            let buf = untrusted::read_at(dir.raw(), &name, 64).map_err(|e| e.to_string())?;
            parse_dirid(&buf).map_err(|FormatError(m)| m)
        };
        match read() {
            Ok(id) => Ok(*dir.dir_id.get_or_init(|| id)),
            Err(m) => {
                error!("{}: cannot read directory id: {m}", dir.backing_path());
                Err(Errno::EIO)
            }
        }
    }

    fn backing_name(&self, parent: &Node, name: &OsStr) -> Res<BackingName> {
        let id = self.dir_id(parent)?;
        self.vol()?
            .encrypt_name(&id, name.as_bytes())
            .ok_or(Errno::ENAMETOOLONG)
    }

    /// Look up a backing entry and count a kernel reference to it.
    ///
    /// A single-name non-directory (`Node::may_close`) is only stat'ed: a new node for it
    /// starts without a descriptor and opens one on first use, checked against the inode
    /// number (as after the descriptor budget closed it). That saves an `openat` and a
    /// `close` per entry of a listing, most of which are never opened. Directories and
    /// inodes with several names are opened here, as their nodes keep a descriptor.
    fn lookup_entry(&self, parent: &Arc<Node>, entry: &str) -> Res<(Arc<Node>, FileAttr)> {
        self.lookup_entry_with(parent, entry, None)
    }

    /// `lookup_entry`, with the entry's attributes given if they were just read (`stat`).
    fn lookup_entry_with(
        &self,
        parent: &Arc<Node>,
        entry: &str,
        stat: Option<libc::stat>,
    ) -> Res<(Arc<Node>, FileAttr)> {
        let c = sys::cstr(entry.as_bytes()).map_err(|e| errno(&e))?;
        let mut st = match stat {
            Some(st) => st,
            None => {
                sys::fstatat(parent.raw(), &c, libc::AT_SYMLINK_NOFOLLOW).map_err(|e| errno(&e))?
            }
        };
        let mut fd = None;
        if !Node::may_close(kind_of(st.st_mode), &st) {
            let f = sys::openat(parent.raw(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)
                .map_err(|e| errno(&e))?;
            // The entry may have changed since the stat: what is open is what counts.
            st = sys::fstat(f.as_raw_fd()).map_err(|e| errno(&e))?;
            fd = Some(f);
        }
        let ino = self.fuse_ino(&st)?;
        let kind = kind_of(st.st_mode);
        let node = {
            let mut t = lock(&self.nodes);
            let budget = t.budget();
            let mut fresh = fd;
            let mut created = false;
            let node = t.reference(ino, || {
                created = true;
                match fresh.take() {
                    Some(fd) => Node::closable(ino, &st, fd, kind, parent, entry, &budget),
                    None => Node::unopened(ino, &st, kind, parent, &c, &budget),
                }
            });
            if !created {
                node.refresh(fresh, parent, entry);
            }
            node
        };
        let attr = self.attr(ino, &st, Some(&node));
        Ok((node, attr))
    }

    /// Entry `c` of `dir` may be about to lose its last name: if the kernel knows its
    /// inode, make that node keep a descriptor open on it, so the inode (and its number)
    /// lives until the kernel forgets the node and no new file can turn up under the
    /// old node's number.
    fn pin_victim(&self, dir: &Node, c: &std::ffi::CStr) {
        let Ok(st) = sys::fstatat(dir.raw(), c, libc::AT_SYMLINK_NOFOLLOW) else {
            return;
        };
        let Some(n) = self
            .fuse_ino(&st)
            .ok()
            .and_then(|i| lock(&self.nodes).get(i))
        else {
            return;
        };
        // Usually the node's descriptor is open and nothing needs opening (one syscall
        // per unlink instead of three); a closed one is reopened right here.
        let fresh = if n.has_fd() {
            None
        } else {
            sys::openat(dir.raw(), c, libc::O_PATH | libc::O_NOFOLLOW, 0)
                .ok()
                .filter(|f| sys::fstat(f.as_raw_fd()).is_ok_and(|s| s.st_ino == st.st_ino))
        };
        if let Err(e) = n.pin(fresh) {
            log::debug!("{}: keeping inode {} open: {e}", dir.backing_path(), n.ino);
        }
    }

    /// Write a long name's sidecar (synced, so that it is durable before its entry exists).
    /// A sidecar already holding the right name (its file name is the hash of it) is left
    /// alone: rewriting it in place could leave a live entry with an empty sidecar if the
    /// daemon died in between.
    fn write_sidecar(&self, parent: &Node, bn: &BackingName) -> Res<()> {
        if let (Some(side), BackingName::Long { full, .. }) = (bn.sidecar(), bn) {
            use std::io::Write;
            let c = sys::cstr(side.as_bytes()).map_err(|e| errno(&e))?;
            // Never through a symlink or into a FIFO someone put there (see `untrusted`).
            let bad = |e: io::Error| {
                error!("{}: long-name sidecar {side}: {e}", parent.backing_path());
                errno(&e)
            };
            let flags = match untrusted::read_at(parent.raw(), &c, 4096) {
                Ok(have) if have == full.as_bytes() => return Ok(()),
                Ok(_) => libc::O_WRONLY | libc::O_TRUNC,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC
                }
                Err(e) => return Err(bad(e)),
            };
            let f = untrusted::open_at(parent.raw(), &c, flags, 0o600).map_err(bad)?;
            (&f).write_all(full.as_bytes()).map_err(|e| errno(&e))?;
            f.sync_data().map_err(|e| errno(&e))?;
        }
        Ok(())
    }

    fn remove_sidecar(&self, parent: &Node, bn: &BackingName) {
        if let Some(side) = bn.sidecar()
            && let Ok(c) = sys::cstr(side.as_bytes())
        {
            let _ = sys::unlinkat(parent.raw(), &c, 0);
        }
    }

    /// Set owner of a new entry to the caller (group from a setgid parent).
    /// The group a new entry in `parent` gets: the parent's if it is setgid, else the
    /// caller's.
    fn new_entry_gid(&self, req: &Request, parent: &Node) -> Res<u32> {
        let pst = sys::fstat(parent.raw()).map_err(|e| errno(&e))?;
        Ok(if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            req.gid()
        })
    }

    /// Give a new entry to its creator.
    fn set_owner(&self, fd: i32, uid: u32, gid: u32, perm: u16, kind: FileType) -> Res<()> {
        sys::chown_fd(fd, Some(uid), Some(gid)).map_err(|e| errno(&e))?;
        // chown(2) clears the set-user/group-id bits; a new entry keeps the mode it was
        // created with (the caller owns it now, as if it had created it itself).
        let special = u32::from(perm) & (libc::S_ISUID | libc::S_ISGID);
        if special != 0 && kind != FileType::Symlink {
            sys::chmod_fd(fd, u32::from(perm)).map_err(|e| errno(&e))?;
        }
        Ok(())
    }

    fn content_err(&self, node: &Node, e: ContentError) -> Errno {
        match e {
            ContentError::Io(e) => errno(&e),
            ContentError::TooLarge => Errno::EFBIG,
            other => {
                error!("{}: {other}", node.backing_path());
                Errno::EIO
            }
        }
    }

    fn open_content(&self, node: &Node, writable: bool) -> Res<File> {
        let flags = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        let opath = node.fd().map_err(|e| errno(&e))?;
        let fd = sys::openat(libc::AT_FDCWD, &sys::proc_path(opath.as_raw_fd()), flags, 0)
            .map_err(|e| errno(&e))?;
        Ok(File::from(fd))
    }

    /// The node's content cipher; writes a header first when the file has none and
    /// `create` is set (an empty file gets its id on first write).
    fn cipher(&self, node: &Node, file: &File, create: bool) -> Res<Option<Arc<FileCipher>>> {
        // Checked first, so a revoked volume serves nothing even from a cached key.
        let vol = self.vol()?;
        let epoch = self.gate.epoch();
        let mut slot = lock(&node.cipher);
        if let Some((e, c)) = slot.as_ref()
            && *e == epoch
        {
            return Ok(Some(c.clone()));
        }
        let header = match content::read_file_header(file) {
            Ok(Some(h)) => h,
            Ok(None) if create => {
                let h = crate::format::file_header::FileHeader::new_random();
                content::write_file_header(file, &h).map_err(|e| self.content_err(node, e))?;
                h
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.content_err(node, e)),
        };
        let c = Arc::new(vol.file_cipher(&header));
        *slot = Some((epoch, c.clone()));
        Ok(Some(c))
    }

    /// An entry to reply with, and how long the kernel may cache it.
    fn entry(&self, r: Res<(Arc<Node>, FileAttr)>) -> Res<(Arc<Node>, FileAttr, Duration)> {
        r.map(|(node, attr)| (node, attr, self.entry_ttl))
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// The open file a request names: handle `fh`, or in no-open mode (handle 0) inode
    /// `ino` through its shared content descriptor. The kernel checks the access mode of
    /// the caller's descriptor before it sends a read or write.
    fn file(&self, fh: FileHandle, ino: INodeNo) -> Res<OpenFile> {
        if fh.0 == 0 && self.no_open {
            let node = self.node(ino)?;
            if node.kind != FileType::RegularFile {
                return Err(Errno::EBADF);
            }
            let file = node.shared_file(|| {
                // Read-write where the backing file allows it (writes need reads too, for
                // partial blocks); a read-only one serves reads.
                match self.open_content(&node, !self.read_only) {
                    Err(Errno::EACCES | Errno::EPERM | Errno::EROFS) if !self.read_only => {
                        self.open_content(&node, false)
                    }
                    r => r,
                }
            })?;
            return Ok(OpenFile {
                node,
                file,
                writable: !self.read_only,
            });
        }
        lock(&self.files)
            .get(&fh.0)
            .map(|h| OpenFile::clone(h))
            .ok_or(Errno::EBADF)
    }

    fn check_writable(&self) -> Res<()> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// Drop the setuid bit, and the setgid bit if the group may execute, from a file a
    /// user without CAP_FSETID has modified: what Linux does on its own filesystems
    /// (`file_remove_privs`), done here because kekfs takes that job from the kernel
    /// (FUSE_HANDLE_KILLPRIV_V2). kekfs stores no `security.capability`, so there is no
    /// capability to drop.
    fn kill_suidgid(&self, node: &Node) -> Res<()> {
        let fd = node.fd().map_err(|e| errno(&e))?;
        let mode = sys::fstat(fd.as_raw_fd()).map_err(|e| errno(&e))?.st_mode;
        let mut kept = mode & !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            kept &= !libc::S_ISGID;
        }
        if kept != mode {
            sys::chmod_fd(fd.as_raw_fd(), kept & 0o7777).map_err(|e| errno(&e))?;
        }
        Ok(())
    }

    /// Does this request modify a file on behalf of someone whose writes must clear
    /// setuid/setgid? The kernel says so in a write's flags; for truncate and fallocate
    /// fuser does not pass the kernel's flag on, so kekfs uses what it has: the caller is
    /// not root (root, with CAP_FSETID, keeps the bits, as on Linux).
    fn kills_privs(&self, req: &Request) -> bool {
        !self.writeback && req.uid() != 0
    }

    fn truncate_node(&self, node: &Node, file: &File, size: u64) -> Res<()> {
        if size > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        let _w = node.content.write().unwrap_or_else(PoisonError::into_inner);
        let Some(c) = self.cipher(node, file, size > 0)? else {
            return Ok(()); // empty file truncated to 0
        };
        content::truncate(file, &c, size).map_err(|e| self.content_err(node, e))
    }

    /// Is backing directory `fd` empty apart from kekfs's own files?
    fn dir_is_empty(&self, fd: i32) -> Res<bool> {
        let list = sys::list_dir(fd).map_err(|e| errno(&e))?;
        Ok(list.iter().all(|(n, _, _)| n == DIRID_FILE.as_bytes()))
    }

    fn create_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnOnce(&Node, &std::ffi::CStr) -> Res<()>,
    ) -> Res<(Arc<Node>, FileAttr)> {
        self.check_writable()?;
        let p = self.node(parent)?;
        let bn = self.backing_name(&p, name)?;
        let c = sys::cstr(bn.entry().as_bytes()).map_err(|e| errno(&e))?;
        self.write_sidecar(&p, &bn)?;
        if let Err(e) = make(&p, &c) {
            if e != Errno::EEXIST {
                self.remove_sidecar(&p, &bn);
            }
            return Err(e);
        }
        let (node, attr) = self.lookup_entry(&p, bn.entry())?;
        // What was just made has one name. More means the name was swapped for a hard
        // link to some other file of the backing filesystem between the creation and the
        // lookup (the backing directory is untrusted), whose owner is not to be changed.
        if attr.kind != FileType::Directory && attr.nlink != 1 {
            error!(
                "{}: new entry {} has {} links: replaced under kekfs; not taking it over",
                p.backing_path(),
                bn.entry(),
                attr.nlink
            );
            return Err(Errno::EIO);
        }
        let gid = self.new_entry_gid(req, &p)?;
        if attr.uid == req.uid() && attr.gid == gid {
            // Created by the daemon's own identity already (e.g. root): nothing to change.
            return Ok((node, attr));
        }
        let fd = node.fd().map_err(|e| errno(&e))?;
        self.set_owner(fd.as_raw_fd(), req.uid(), gid, attr.perm, attr.kind)?;
        let attr = self.stat_node(&node)?;
        Ok((node, attr))
    }

    /// The `/proc/self/fd` path for the node's xattrs, with the descriptor it names
    /// (keep it while the path is used).
    fn xattr_path(&self, node: &Node) -> Res<(std::ffi::CString, Arc<OwnedFd>)> {
        match node.kind {
            FileType::RegularFile | FileType::Directory => {
                let fd = node.fd().map_err(|e| errno(&e))?;
                Ok((sys::proc_path(fd.as_raw_fd()), fd))
            }
            _ => Err(Errno::EPERM),
        }
    }

    fn user_xattr<'a>(&self, name: &'a OsStr) -> Option<&'a [u8]> {
        name.as_bytes()
            .strip_prefix(b"user.")
            .filter(|n| !n.is_empty())
    }

    fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        self.check_writable()?;
        let p = self.node(parent)?;
        let np = self.node(newparent)?;
        let src = self.backing_name(&p, name)?;
        let dst = self.backing_name(&np, newname)?;
        let sc = sys::cstr(src.entry().as_bytes()).map_err(|e| errno(&e))?;
        let dc = sys::cstr(dst.entry().as_bytes()).map_err(|e| errno(&e))?;
        let src_st =
            sys::fstatat(p.raw(), &sc, libc::AT_SYMLINK_NOFOLLOW).map_err(|e| errno(&e))?;
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let mut restore_dirid: Option<(Arc<OwnedFd>, [u8; 16])> = None;
        if !exchange && !flags.contains(RenameFlags::RENAME_NOREPLACE) {
            // Replacing an empty directory: drop its id file so the backing rename succeeds.
            if let Ok(dst_st) = sys::fstatat(np.raw(), &dc, libc::AT_SYMLINK_NOFOLLOW)
                && dst_st.st_mode & libc::S_IFMT == libc::S_IFDIR
                && src_st.st_mode & libc::S_IFMT == libc::S_IFDIR
                && dst_st.st_ino != src_st.st_ino
            {
                let dfd = sys::openat(
                    np.raw(),
                    &dc,
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .map_err(|e| errno(&e))?;
                if !self.dir_is_empty(dfd.as_raw_fd())? {
                    return Err(Errno::ENOTEMPTY);
                }
                let tmp = Node::new(0, dfd, FileType::Directory);
                let id = self.dir_id(&tmp)?;
                let idc = sys::cstr(DIRID_FILE.as_bytes()).map_err(|e| errno(&e))?;
                sys::unlinkat(tmp.raw(), &idc, 0).map_err(|e| errno(&e))?;
                restore_dirid = Some((tmp.fd().map_err(|e| errno(&e))?, id));
            }
        }
        self.write_sidecar(&np, &dst)?;
        if !exchange {
            self.pin_victim(&np, &dc);
        }
        // Closable nodes reopen by name: hold the moved node's name still across the
        // rename (a concurrent reopen waits) and record the new one. The table lock is
        // not taken while the name is held.
        let moved = self
            .fuse_ino(&src_st)
            .ok()
            .and_then(|i| lock(&self.nodes).get(i));
        let renaming = moved.as_ref().map(|n| n.renaming());
        let r = sys::renameat2(p.raw(), &sc, np.raw(), &dc, flags.bits());
        if let Err(e) = r {
            drop(renaming);
            if let Some((fd, id)) = restore_dirid {
                let _ = write_dirid(fd.as_raw_fd(), &id);
            }
            return Err(errno(&e));
        }
        if let Some(g) = renaming {
            g.moved(&np, dst.entry());
        }
        if !exchange && src.entry() != dst.entry() {
            self.remove_sidecar(&p, &src);
        }
        if exchange
            && let Ok(st) = sys::fstatat(p.raw(), &sc, libc::AT_SYMLINK_NOFOLLOW)
            && let Some(n) = self
                .fuse_ino(&st)
                .ok()
                .and_then(|i| lock(&self.nodes).get(i))
        {
            // The other entry of an exchange. Recorded just after the rename: a reopen
            // of this node in between finds the other inode under the old name and
            // fails with ESTALE rather than using it.
            n.renaming().moved(&p, src.entry());
        }
        Ok(())
    }
}

/// Create regular file `name` in `dirfd` (read-write, failing if it exists) and write
/// a fresh file header into it; on failure nothing is left behind.
fn new_regular_file(dirfd: i32, name: &std::ffi::CStr, mode: u32) -> Res<File> {
    let fd = sys::openat(
        dirfd,
        name,
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
        mode & 0o7777,
    )
    .map_err(|e| errno(&e))?;
    let f = File::from(fd);
    let h = crate::format::file_header::FileHeader::new_random();
    content::write_file_header(&f, &h).map_err(|e| new_file_failed(dirfd, name, e))?;
    Ok(f)
}

/// A new backing file whose header could not be written (e.g. ENOSPC): remove it, so no
/// headerless file is left behind, and report the real errno.
fn new_file_failed(dirfd: i32, name: &std::ffi::CStr, e: ContentError) -> Errno {
    let _ = sys::unlinkat(dirfd, name, 0);
    match e {
        ContentError::Io(e) => errno(&e),
        _ => Errno::EIO,
    }
}

fn write_dirid(dirfd: i32, id: &[u8; 16]) -> io::Result<()> {
    let c = sys::cstr(DIRID_FILE.as_bytes())?;
    let fd = sys::openat(
        dirfd,
        &c,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        0o600,
    )?;
    let f = File::from(fd);
    use std::io::Write;
    (&f).write_all(id)?;
    f.sync_all()
}

fn to_timespec(t: Option<TimeOrNow>) -> sys::TimeSpec {
    match t {
        None => None,
        Some(TimeOrNow::Now) => Some(None),
        Some(TimeOrNow::SpecificTime(t)) => Some(Some(pre_epoch_fixup(t))),
    }
}

/// fuser 0.18 decodes a kernel time `(secs < 0, nsecs)` as `EPOCH - (|secs| + nsecs)`
/// instead of `EPOCH - |secs| + nsecs`, so utimens with (-1 s, 500 ns) would store
/// (-2 s, 999999500 ns). Undo that decoding (times at or after the epoch are exact).
fn pre_epoch_fixup(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(_) => t,
        Err(e) => {
            let d = e.duration();
            UNIX_EPOCH - Duration::from_secs(d.as_secs())
                + Duration::from_nanos(u64::from(d.subsec_nanos()))
        }
    }
}

impl fuser::Filesystem for KekFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(MAX_READAHEAD);
        let mut caps = vec![
            // Listings always carry attributes: no LOOKUP round trip per entry for
            // `ls -l`, `find`, `du`, `stat` after a listing. (READDIRPLUS_AUTO was
            // measured slower: the kernel uses plus only for the first 4 KiB of a
            // listing and then sends one LOOKUP per remaining entry.)
            InitFlags::FUSE_DO_READDIRPLUS,
            // Directory operations in different directories run in parallel.
            InitFlags::FUSE_PARALLEL_DIROPS,
        ];
        if !self.writeback {
            // kekfs clears setuid/setgid itself (see `kill_suidgid`): without this the
            // kernel asks for `security.capability` (a GETXATTR round trip) before every
            // write to decide whether there is a privilege to drop. Measured: 4 KiB random
            // writes 21-27k -> 35-46k IOPS. Not with the write-back cache, whose writes
            // reach kekfs later and without the caller's credentials.
            caps.push(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        }
        if self.writeback {
            // Kernel-side write-back caching: writes land in the page cache and reach
            // kekfs in large batches (on writeback, close or fsync). Safe with revocation:
            // the purge after a revocation (inval_inode) drops cached pages, and dirty
            // pages then fail to write back with the key errno, never in clear.
            caps.push(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        for cap in caps {
            if let Err(missing) = config.add_capabilities(cap) {
                log::info!("kernel lacks FUSE capability {missing:?}; continuing without it");
            }
        }
        // Opening a file then costs no round trip (nor does closing it): see `open`.
        self.no_open = config
            .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
            .is_ok();
        let abi = config.kernel_abi();
        if (abi.0, abi.1) >= (7, 44) {
            self.entry_ttl = ENTRY_TTL;
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = (|| {
            let p = self.node(parent)?;
            let bn = self.backing_name(&p, name)?;
            self.lookup_entry(&p, bn.entry())
        })();
        reply.send(self.entry(r));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.nodes).forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.send(self.node(ino).and_then(|n| self.stat_node(&n)));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let node = self.node(ino)?;
            if mode.is_some()
                || uid.is_some()
                || gid.is_some()
                || size.is_some()
                || atime.is_some()
                || mtime.is_some()
            {
                self.check_writable()?;
            }
            if let Some(size) = size {
                if node.kind != FileType::RegularFile {
                    return Err(Errno::EINVAL);
                }
                let handle = fh
                    .and_then(|fh| self.file(fh, ino).ok())
                    .filter(|h| h.writable);
                match handle {
                    Some(h) => self.truncate_node(&node, &h.file, size)?,
                    None => {
                        let f = self.open_content(&node, true)?;
                        self.truncate_node(&node, &f, size)?;
                    }
                }
                if mode.is_none() && self.kills_privs(req) {
                    self.kill_suidgid(&node)?;
                }
            }
            let fd = node.fd().map_err(|e| errno(&e))?;
            let fd = fd.as_raw_fd();
            if uid.is_some() || gid.is_some() {
                sys::chown_fd(fd, uid, gid).map_err(|e| errno(&e))?;
            }
            if let Some(mode) = mode
                && node.kind != FileType::Symlink
            {
                sys::chmod_fd(fd, mode & 0o7777).map_err(|e| errno(&e))?;
            }
            if atime.is_some() || mtime.is_some() {
                let (a, m) = (to_timespec(atime), to_timespec(mtime));
                // /proc/self/fd would follow a symlink to its (encrypted) target.
                let r = if node.kind == FileType::Symlink {
                    sys::utimens_nofollow_fd(fd, a, m)
                } else {
                    sys::utimens_fd(fd, a, m)
                };
                r.map_err(|e| errno(&e))?;
            }
            self.stat_node(&node)
        })();
        self.lister.changed();
        reply.send(r);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = (|| {
            let node = self.node(ino)?;
            let fd = node.fd().map_err(|e| errno(&e))?;
            let stored = sys::readlink_fd(fd.as_raw_fd()).map_err(|e| errno(&e))?;
            self.vol()?.decrypt_symlink(&stored).ok_or_else(|| {
                error!(
                    "{}: symlink target does not authenticate",
                    node.backing_path()
                );
                Errno::EIO
            })
        })();
        reply.send(r);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let mut opened: Option<File> = None;
            let made = self.create_entry(req, parent, name, |p, c| {
                if mode & libc::S_IFMT == libc::S_IFREG {
                    opened = Some(new_regular_file(p.raw(), c, mode)?);
                    Ok(())
                } else {
                    sys::mknodat(p.raw(), c, mode, rdev as u64).map_err(|e| errno(&e))
                }
            })?;
            if let Some(f) = opened
                && self.no_open
            {
                // In no-open mode files are created here (see `create`) and opened by
                // the kernel without a request: the descriptor just made becomes the
                // node's shared content one, which the first write would open otherwise.
                made.0.shared_file(|| Ok::<_, Errno>(f))?;
            }
            Ok(made)
        })();
        self.lister.changed();
        reply.send(self.entry(r));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.create_entry(req, parent, name, |p, c| {
            // Build the directory under a temporary name with its id inside, then rename it
            // into place, so a crash never leaves a directory without an id.
            let tmp = format!(
                "kekfs.tmp.{}",
                crate::volume::hex(&crate::crypto::random_array::<8>())
            );
            let tc = sys::cstr(tmp.as_bytes()).map_err(|e| errno(&e))?;
            sys::mkdirat(p.raw(), &tc, mode & 0o7777).map_err(|e| errno(&e))?;
            let cleanup = |e: io::Error| {
                let _ = sys::unlinkat(p.raw(), &tc, libc::AT_REMOVEDIR);
                errno(&e)
            };
            let dfd = sys::openat(
                p.raw(),
                &tc,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(cleanup)?;
            let id: [u8; 16] = crate::crypto::random_array();
            if let Err(e) = write_dirid(dfd.as_raw_fd(), &id) {
                let idc = sys::cstr(DIRID_FILE.as_bytes()).map_err(|e| errno(&e))?;
                let _ = sys::unlinkat(dfd.as_raw_fd(), &idc, 0);
                return Err(cleanup(e));
            }
            if let Err(e) = sys::renameat2(p.raw(), &tc, p.raw(), c, libc::RENAME_NOREPLACE) {
                let idc = sys::cstr(DIRID_FILE.as_bytes()).map_err(|e| errno(&e))?;
                let _ = sys::unlinkat(dfd.as_raw_fd(), &idc, 0);
                let _ = cleanup(io::Error::from_raw_os_error(0));
                return Err(errno(&e));
            }
            Ok(())
        });
        self.lister.changed();
        reply.send(self.entry(r));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            self.check_writable()?;
            let p = self.node(parent)?;
            let bn = self.backing_name(&p, name)?;
            let c = sys::cstr(bn.entry().as_bytes()).map_err(|e| errno(&e))?;
            self.pin_victim(&p, &c);
            sys::unlinkat(p.raw(), &c, 0).map_err(|e| errno(&e))?;
            self.remove_sidecar(&p, &bn);
            Ok(())
        })();
        self.lister.changed();
        reply.send(r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            self.check_writable()?;
            let p = self.node(parent)?;
            let bn = self.backing_name(&p, name)?;
            let c = sys::cstr(bn.entry().as_bytes()).map_err(|e| errno(&e))?;
            let dfd = sys::openat(
                p.raw(),
                &c,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| errno(&e))?;
            if !self.dir_is_empty(dfd.as_raw_fd())? {
                return Err(Errno::ENOTEMPTY);
            }
            let tmp = Node::new(0, dfd, FileType::Directory);
            let id = self.dir_id(&tmp).ok();
            let idc = sys::cstr(DIRID_FILE.as_bytes()).map_err(|e| errno(&e))?;
            let _ = sys::unlinkat(tmp.raw(), &idc, 0);
            if let Err(e) = sys::unlinkat(p.raw(), &c, libc::AT_REMOVEDIR) {
                if let Some(id) = id {
                    let _ = write_dirid(tmp.raw(), &id);
                }
                return Err(errno(&e));
            }
            self.remove_sidecar(&p, &bn);
            Ok(())
        })();
        self.lister.changed();
        reply.send(r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.create_entry(req, parent, link_name, |p, c| {
            let enc = self.vol()?.encrypt_symlink(target.as_os_str().as_bytes());
            if enc.len() >= libc::PATH_MAX as usize {
                return Err(Errno::ENAMETOOLONG);
            }
            let t = sys::cstr(enc.as_bytes()).map_err(|e| errno(&e))?;
            sys::symlinkat(&t, p.raw(), c).map_err(|e| errno(&e))
        });
        self.lister.changed();
        reply.send(self.entry(r));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.do_rename(parent, name, newparent, newname, flags);
        self.lister.changed();
        reply.send(r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            self.check_writable()?;
            let node = self.node(ino)?;
            if node.kind == FileType::Directory {
                return Err(Errno::EPERM);
            }
            let p = self.node(newparent)?;
            let bn = self.backing_name(&p, newname)?;
            let c = sys::cstr(bn.entry().as_bytes()).map_err(|e| errno(&e))?;
            self.write_sidecar(&p, &bn)?;
            // A second name: from now on the node keeps its descriptor.
            node.pin(None).map_err(|e| errno(&e))?;
            let fd = node.fd().map_err(|e| errno(&e))?;
            if let Err(e) = sys::link_fd(fd.as_raw_fd(), p.raw(), &c) {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    self.remove_sidecar(&p, &bn);
                }
                return Err(errno(&e));
            }
            self.lookup_entry(&p, bn.entry())
        })();
        self.lister.changed();
        reply.send(self.entry(r));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            // The kernel then opens files without asking (no OPEN, no RELEASE; reads and
            // writes carry handle 0 and use the node's shared content descriptor), and
            // the revocation check happens at the first read or write instead.
            reply.error(Errno::ENOSYS);
            return;
        }
        let r = (|| {
            self.vol()?;
            let node = self.node(ino)?;
            let acc = flags.0 & libc::O_ACCMODE;
            let writable = acc != libc::O_RDONLY;
            if writable {
                self.check_writable()?;
            }
            // Read-modify-write of partial blocks needs read access even for O_WRONLY.
            let file = self.open_content(&node, writable)?;
            if flags.0 & libc::O_TRUNC != 0 && writable {
                self.truncate_node(&node, &file, 0)?;
            }
            let fh = self.new_fh();
            lock(&self.files).insert(
                fh,
                Arc::new(OpenFile {
                    node,
                    file: Arc::new(file),
                    writable,
                }),
            );
            Ok(fh)
        })();
        self.lister.changed();
        reply.send(r.map(|fh| (fh, FILE_OPEN_FLAGS)));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let h = match self.file(fh, ino) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let _r = h
            .node
            .content
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let c = match self.cipher(&h.node, &h.file, false) {
            Ok(Some(c)) => c,
            Ok(None) => return reply.data(&[]),
            Err(e) => return reply.error(e),
        };
        // The ciphertext is read into the reply's own buffer (the ring entry's, over
        // io_uring) and decrypted there.
        let Some(room) = content::read_room(offset, u64::from(size)) else {
            return reply.error(Errno::EINVAL);
        };
        reply.fill(room, |buf| {
            content::read_into(&h.file, &c, offset, size, buf)
                .map_err(|e| self.content_err(&h.node, e))
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = (|| {
            let h = self.file(fh, ino)?;
            if !h.writable {
                return Err(Errno::EBADF);
            }
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                self.kill_suidgid(&h.node)?;
            }
            let _w = h
                .node
                .content
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let c = self.cipher(&h.node, &h.file, true)?.ok_or(Errno::EIO)?;
            content::write_shared(&h.file, &c, &self.splitter, offset, data)
                .map_err(|e| self.content_err(&h.node, e))
        })();
        self.lister.changed();
        reply.send(r.map(|()| data.len() as u32));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes go straight to the backing file; nothing is buffered here. Files the kernel
        // opens without asking (no-open mode) cannot carry FOPEN_NOFLUSH, so the first
        // FLUSH is answered ENOSYS, which tells the kernel to send no more (it still writes
        // back dirty pages itself before a close).
        if self.no_open {
            reply.error(Errno::ENOSYS);
        } else {
            reply.ok();
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.file(fh, ino).and_then(|h| {
            let res = if datasync {
                h.file.sync_data()
            } else {
                h.file.sync_all()
            };
            res.map_err(|e| errno(&e))
        });
        reply.send(r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            self.vol()?;
            let node = self.node(ino)?;
            let id = self.dir_id(&node)?;
            let d = Arc::new(OpenDir::open(node, ino.0, id)?);
            let fh = self.new_fh();
            lock(&self.dirs).insert(fh, d.clone());
            Ok((fh, d))
        })();
        match r {
            Ok((fh, d)) => {
                reply.opened(FileHandle(fh), FopenFlags::empty());
                self.read_ahead.kick(&d);
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(d) = lock(&self.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        // Names decrypted before a revocation are plaintext: serve none after.
        if let Err(e) = self.vol() {
            reply.error(e);
            return;
        }
        let mut cur = match d.lock(&self.lister, offset) {
            Ok(c) => c,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let mut i = offset as usize;
        loop {
            let e = match cur.get(i) {
                Ok(Some((e, _))) => e,
                Ok(None) => break,
                Err(err) if i == offset as usize => {
                    reply.error(err);
                    return;
                }
                // Send what there is; the kernel asks again from this entry.
                Err(_) => break,
            };
            if reply.add(
                INodeNo(e.ino),
                (i + 1) as u64,
                e.kind,
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
            i += 1;
        }
        cur.served(i);
        drop(cur);
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        log::debug!("readdirplus fh {} offset {offset}", fh.0);
        let Some(d) = lock(&self.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        let dir = match self.vol().and_then(|_| self.node(ino)) {
            Ok(n) => n,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let mut cur = match d.lock(&self.lister, offset) {
            Ok(c) => c,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        // The entry at index `at` goes out with cookie `at + 1`, where the kernel resumes.
        let mut at = offset as usize;
        loop {
            let (e, ahead) = match cur.get(at) {
                Ok(Some(got)) => got,
                Ok(None) => break,
                Err(err) if at == offset as usize => {
                    reply.error(err);
                    return;
                }
                Err(_) => break,
            };
            // Entries other than "." and ".." are looked up (the kernel counts a
            // reference for each one it receives), saving a LOOKUP round trip each.
            let found = if e.backing.is_empty() {
                self.stat_node(&dir).ok().map(|a| (a, false))
            } else {
                let looked = std::str::from_utf8(&e.backing)
                    .map_err(|_| Errno::EIO)
                    .and_then(|b| self.lookup_entry_with(&dir, b, ahead));
                match looked {
                    Ok((_, a)) => Some((a, true)),
                    // Out of descriptors: report it rather than silently leave entries
                    // out; after some entries, send those and the kernel asks again
                    // from this one.
                    Err(err @ (Errno::EMFILE | Errno::ENFILE)) => {
                        if at == offset as usize {
                            reply.error(err);
                            return;
                        }
                        break;
                    }
                    // Removed since the listing was read, or not servable (logged):
                    // skip it.
                    Err(_) => None,
                }
            };
            if let Some((attr, counted)) = found
                && reply.add_with_ttls(
                    attr.ino,
                    (at + 1) as u64,
                    OsStr::from_bytes(&e.name),
                    &TTL,
                    &self.entry_ttl,
                    &attr,
                    Generation(0),
                )
            {
                // The reply is full: this entry did not go out.
                if counted {
                    lock(&self.nodes).forget(attr.ino.0, 1);
                }
                break;
            }
            at += 1;
        }
        cur.served(at);
        drop(cur);
        reply.ok();
        self.read_ahead.kick(&d);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let node = self.node(ino)?;
            let fd = sys::openat(node.raw(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(|e| errno(&e))?;
            File::from(fd).sync_all().map_err(|e| errno(&e))
        })();
        reply.send(r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = self.node(INodeNo(1)).and_then(|root| {
            let fd = sys::openat(root.raw(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(|e| errno(&e))?;
            sys::statvfs_fd(fd.as_raw_fd()).map_err(|e| errno(&e))
        });
        reply.send(r);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            self.check_writable()?;
            let node = self.node(ino)?;
            let Some(user) = self.user_xattr(name) else {
                return Err(Errno::ENOTSUP);
            };
            let (path, _fd) = self.xattr_path(&node)?;
            let bname = self.vol()?.encrypt_xattr_name(user);
            if bname.len() > 255 {
                return Err(Errno::ERANGE);
            }
            let sealed = self.vol()?.seal_xattr_value(name.as_bytes(), value);
            let c = sys::cstr(bname.as_bytes()).map_err(|e| errno(&e))?;
            sys::setxattr(&path, &c, &sealed, flags).map_err(|e| errno(&e))
        })();
        self.lister.changed();
        reply.send(r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = (|| {
            let node = self.node(ino)?;
            let Some(user) = self.user_xattr(name) else {
                return Err(Errno::ENODATA);
            };
            let (path, _fd) = match self.xattr_path(&node) {
                Ok(p) => p,
                Err(_) => return Err(Errno::ENODATA),
            };
            let bname = self.vol()?.encrypt_xattr_name(user);
            let c = sys::cstr(bname.as_bytes()).map_err(|e| errno(&e))?;
            let sealed = sys::getxattr(&path, &c).map_err(|e| errno(&e))?;
            self.vol()?
                .open_xattr_value(name.as_bytes(), &sealed)
                .ok_or_else(|| {
                    error!("{}: xattr value does not authenticate", node.backing_path());
                    Errno::EIO
                })
        })();
        reply.send(r.map(|v| (size, v)));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = (|| {
            let node = self.node(ino)?;
            let Ok((path, _fd)) = self.xattr_path(&node) else {
                return Ok(Vec::new());
            };
            let vol = self.vol()?;
            let raw = sys::listxattr(&path).map_err(|e| errno(&e))?;
            let mut out = Vec::new();
            for n in raw.split(|&b| b == 0).filter(|n| !n.is_empty()) {
                if let Some(user) = vol.decrypt_xattr_name(n) {
                    out.extend_from_slice(b"user.");
                    out.extend_from_slice(&user);
                    out.push(0);
                }
            }
            Ok(out)
        })();
        reply.send(r.map(|v| (size, v)));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            self.check_writable()?;
            let node = self.node(ino)?;
            let Some(user) = self.user_xattr(name) else {
                return Err(Errno::ENODATA);
            };
            let (path, _fd) = self.xattr_path(&node)?;
            let c = sys::cstr(self.vol()?.encrypt_xattr_name(user).as_bytes())
                .map_err(|e| errno(&e))?;
            sys::removexattr(&path, &c).map_err(|e| errno(&e))
        })();
        self.lister.changed();
        reply.send(r);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only confirms
        // the inode still exists.
        match self.node(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if self.no_open {
            // Declined, so the kernel creates files with MKNOD and opens them itself from
            // then on. A CREATE's open carries a handle, and the kernel sends a RELEASE for
            // it on close until the mount's first OPEN has taught it no-open mode: on a
            // fresh mount, one more request for every file created before any is opened.
            reply.error(Errno::ENOSYS);
            return;
        }
        let r = (|| {
            let mut opened: Option<File> = None;
            let (node, attr) = self.create_entry(req, parent, name, |p, c| {
                opened = Some(new_regular_file(p.raw(), c, mode)?);
                Ok(())
            })?;
            let file = opened.ok_or(Errno::EIO)?;
            let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
            let fh = self.new_fh();
            lock(&self.files).insert(
                fh,
                Arc::new(OpenFile {
                    node,
                    file: Arc::new(file),
                    writable,
                }),
            );
            Ok((fh, attr))
        })();
        self.lister.changed();
        reply.send(r);
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            self.check_writable()?;
            let h = self.file(fh, ino)?;
            if !h.writable {
                return Err(Errno::EBADF);
            }
            let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
            let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
            let zero = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
            if mode
                & !(libc::FALLOC_FL_KEEP_SIZE
                    | libc::FALLOC_FL_PUNCH_HOLE
                    | libc::FALLOC_FL_ZERO_RANGE)
                != 0
            {
                return Err(Errno::ENOTSUP);
            }
            if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && !keep_size {
                return Err(Errno::EINVAL);
            }
            let _w = h
                .node
                .content
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let c = self.cipher(&h.node, &h.file, true)?.ok_or(Errno::EIO)?;
            let size = content::size_of(&h.file).map_err(|e| self.content_err(&h.node, e))?;
            if zero {
                content::zero_range(&h.file, &c, offset, length.min(size.saturating_sub(offset)))
                    .map_err(|e| self.content_err(&h.node, e))?;
            }
            // Every mode but PUNCH_HOLE promises that later writes in the range find space:
            // reserve the range's ciphertext in the backing file (after zeroing, which
            // punches backing holes; before growing, so ENOSPC leaves the size alone).
            // A backing fs that cannot reserve space fails mode 0 and KEEP_SIZE with
            // EOPNOTSUPP (glibc's posix_fallocate then writes the range instead); a zero
            // range has done its zeroing and succeeds without the reservation.
            if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 {
                match content::reserve(&h.file, offset, length) {
                    Err(ContentError::Io(e))
                        if zero && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    r => r.map_err(|e| self.content_err(&h.node, e))?,
                }
            }
            if !keep_size && end > size {
                content::truncate(&h.file, &c, end).map_err(|e| self.content_err(&h.node, e))?;
            }
            if self.kills_privs(req) {
                self.kill_suidgid(&h.node)?;
            }
            Ok(())
        })();
        self.lister.changed();
        reply.send(r);
    }
}
