//! The inode table: FUSE inode numbers ↔ O_PATH descriptors of backing inodes, with the
//! kernel's lookup counts, per-file locks and cached per-file state.
//!
//! Directories keep their descriptor for as long as the kernel knows them. Other inodes
//! with a single name keep theirs only as a cache: past a budget (a share of the
//! process's descriptor limit) the least recently looked-up idle ones are closed and
//! reopened on demand from their parent directory and backing name, checked against
//! the inode number. A node made by a lookup starts without one and opens it on first
//! use. The content descriptor a file shares among all its opens in FUSE's no-open mode
//! counts against the same budget and is closed the same way when idle. So the kernel
//! may cache any number of entries without the daemon running out of descriptors
//! (EMFILE).

use crate::volume::FileCipher;
use fuser::FileType;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How many descriptors of closable nodes are open, and the marks that trigger closing.
#[derive(Debug)]
pub struct FdBudget {
    open: AtomicUsize,
    high: usize,
    low: usize,
}

impl FdBudget {
    /// A budget for a process limit of `fd_limit` descriptors: closable nodes may hold
    /// half of them; trimming goes down to two fifths. The rest is left for directories,
    /// open files and the daemon's own files.
    pub fn for_limit(fd_limit: u64) -> FdBudget {
        let limit = usize::try_from(fd_limit).unwrap_or(usize::MAX).max(64);
        FdBudget {
            open: AtomicUsize::new(0),
            high: limit / 2,
            low: limit * 2 / 5,
        }
    }

    /// Descriptors of closable nodes open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Default for FdBudget {
    fn default() -> Self {
        Self::for_limit(1024)
    }
}

/// Where a closable node's descriptor can be reopened from.
struct Origin {
    parent: Arc<Node>,
    entry: CString,
}

/// One backing inode the kernel knows about.
pub struct Node {
    /// The FUSE inode number (the backing inode number; 1 for the root).
    pub ino: u64,
    /// The backing inode number (what a reopened descriptor must lead to).
    backing_ino: u64,
    /// An O_PATH descriptor of the backing inode; `None` once closed to save descriptors
    /// (closable nodes only).
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// For a closable node: its parent directory and backing name.
    origin: Mutex<Option<Origin>>,
    /// The budget its descriptor counts against while it is a closable node.
    budget: Option<Arc<FdBudget>>,
    /// When the kernel last looked it up (a table-wide tick), for least-recently-used
    /// closing.
    used: AtomicU64,
    /// File type (never changes for an inode).
    pub kind: FileType,
    /// Content lock: readers share, writers and truncation are exclusive.
    pub content: RwLock<()>,
    /// Directory id, read on first use (directories only).
    pub dir_id: OnceLock<[u8; 16]>,
    /// Content cipher and the key epoch it was derived in, set once the file header is
    /// known (regular files only); cleared when keys are revoked.
    pub cipher: Mutex<Option<(u64, Arc<FileCipher>)>>,
    /// The content descriptor that reads and writes use when the kernel opened the file
    /// without telling kekfs (FUSE no-open mode): opened on first use, closed with the
    /// node or, when idle, by the descriptor budget (closable nodes).
    shared: Mutex<Option<Arc<File>>>,
}

impl Node {
    /// A new node whose descriptor stays open as long as the node lives.
    pub fn new(ino: u64, fd: OwnedFd, kind: FileType) -> Self {
        Self::with(ino, ino, Some(fd), None, None, kind)
    }

    /// A node with nothing cached yet.
    fn with(
        ino: u64,
        backing_ino: u64,
        fd: Option<OwnedFd>,
        origin: Option<Origin>,
        budget: Option<Arc<FdBudget>>,
        kind: FileType,
    ) -> Self {
        Self {
            ino,
            backing_ino,
            fd: Mutex::new(fd.map(Arc::new)),
            origin: Mutex::new(origin),
            budget,
            used: AtomicU64::new(0),
            kind,
            content: RwLock::new(()),
            dir_id: OnceLock::new(),
            cipher: Mutex::new(None),
            shared: Mutex::new(None),
        }
    }

    /// A new node for backing entry `entry` of directory `parent`, whose descriptor may be
    /// closed when idle and reopened from there. Directories and inodes with several
    /// names always keep theirs (a closable node must be findable by one name).
    pub fn closable(
        ino: u64,
        st: &libc::stat,
        fd: OwnedFd,
        kind: FileType,
        parent: &Arc<Node>,
        entry: &str,
        budget: &Arc<FdBudget>,
    ) -> Self {
        let mut n = Self::new(ino, fd, kind);
        n.backing_ino = st.st_ino;
        if Self::may_close(kind, st)
            && let Ok(entry) = CString::new(entry)
        {
            *lock(&n.origin) = Some(Origin {
                parent: parent.clone(),
                entry,
            });
            budget.open.fetch_add(1, Ordering::Relaxed);
            n.budget = Some(budget.clone());
        }
        n
    }

    /// Whether a node for an inode of this kind and stat may go without its descriptor:
    /// anything but a directory, with a single name.
    pub fn may_close(kind: FileType, st: &libc::stat) -> bool {
        kind != FileType::Directory && st.st_nlink == 1
    }

    /// A closable node (see `closable`) created without a descriptor, as if the budget had
    /// closed it: the first use opens it from `parent` and `entry` and checks it still leads
    /// to `st`'s inode. Only for inodes that `may_close`.
    pub fn unopened(
        ino: u64,
        st: &libc::stat,
        kind: FileType,
        parent: &Arc<Node>,
        entry: &std::ffi::CStr,
        budget: &Arc<FdBudget>,
    ) -> Self {
        debug_assert!(Self::may_close(kind, st));
        let origin = Origin {
            parent: parent.clone(),
            entry: entry.to_owned(),
        };
        Self::with(
            ino,
            st.st_ino,
            None,
            Some(origin),
            Some(budget.clone()),
            kind,
        )
    }

    /// The node's O_PATH descriptor, reopened from its parent if it was closed. Fails
    /// with ESTALE if the backing name no longer leads to this inode.
    pub fn fd(&self) -> io::Result<Arc<OwnedFd>> {
        let mut fd = lock(&self.fd);
        if let Some(f) = fd.as_ref() {
            return Ok(f.clone());
        }
        let origin = lock(&self.origin);
        let f = Arc::new(self.reopen(origin.as_ref())?);
        *fd = Some(f.clone());
        if let Some(b) = &self.budget {
            b.open.fetch_add(1, Ordering::Relaxed);
        }
        Ok(f)
    }

    fn reopen(&self, origin: Option<&Origin>) -> io::Result<OwnedFd> {
        let Some(o) = origin else {
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        };
        let parent = o.parent.fd()?;
        let f = super::sys::openat(
            parent.as_raw_fd(),
            &o.entry,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => io::Error::from_raw_os_error(libc::ESTALE),
            _ => e,
        })?;
        // Another inode under the name (or the number reused by another kind of file,
        // say a FIFO whose open would block): not this node any more.
        let st = super::sys::fstat(f.as_raw_fd())?;
        if st.st_ino != self.backing_ino || kind_of(st.st_mode) != self.kind {
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        Ok(f)
    }

    /// A lookup found this node again as `entry` in `parent` (with `fresh` open on it, if
    /// the lookup opened one): remember the name, and take the descriptor if the node's
    /// was closed.
    pub fn refresh(&self, fresh: Option<OwnedFd>, parent: &Arc<Node>, entry: &str) {
        let mut fd = lock(&self.fd);
        let mut origin = lock(&self.origin);
        let Some(o) = origin.as_mut() else {
            return;
        };
        if let Ok(entry) = CString::new(entry) {
            o.parent = parent.clone();
            o.entry = entry;
        }
        if fd.is_none()
            && let Some(fresh) = fresh
        {
            *fd = Some(Arc::new(fresh));
            if let Some(b) = &self.budget {
                b.open.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The node's backing path, for messages (read from /proc; the inode number if that
    /// fails).
    pub fn backing_path(&self) -> String {
        self.fd()
            .and_then(|fd| std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| format!("inode {}", self.ino))
    }

    /// The raw descriptor of a directory node (directories never close theirs). For any
    /// other node use `fd()`, which keeps the descriptor alive while it is used; here a
    /// non-directory yields -1, so a mistaken use fails with EBADF.
    pub fn raw(&self) -> RawFd {
        if self.kind != FileType::Directory {
            return -1;
        }
        lock(&self.fd).as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Hold while renaming the node's entry, and report the new name through it: a
    /// concurrent reopen waits for the rename instead of looking up the old name.
    pub fn renaming(&self) -> Renaming<'_> {
        Renaming(lock(&self.origin))
    }

    /// From now on the node keeps its descriptor: it is about to gain a name (a closable
    /// node must be findable by one name) or lose its last one (the open descriptor keeps
    /// the inode, and so its number, from being reused while the kernel knows the node).
    /// `fresh`, if given, is a descriptor just opened on the same inode.
    pub fn pin(&self, fresh: Option<OwnedFd>) -> io::Result<()> {
        let mut fd = lock(&self.fd);
        let mut origin = lock(&self.origin);
        if origin.is_none() {
            return Ok(());
        }
        match fd.as_ref() {
            Some(_) => {
                // It leaves the budget with its descriptor.
                if let Some(b) = &self.budget {
                    b.open.fetch_sub(1, Ordering::Relaxed);
                }
            }
            None => {
                let f = match fresh {
                    Some(f) => f,
                    None => self.reopen(origin.as_ref())?,
                };
                *fd = Some(Arc::new(f));
            }
        }
        *origin = None;
        Ok(())
    }

    /// Is the node's descriptor open now?
    pub fn has_fd(&self) -> bool {
        lock(&self.fd).is_some()
    }

    /// The shared content descriptor (see `shared`), opened with `open` if there is none.
    pub fn shared_file<E>(&self, open: impl FnOnce() -> Result<File, E>) -> Result<Arc<File>, E> {
        if let Some(f) = lock(&self.shared).as_ref() {
            return Ok(f.clone());
        }
        // Opened without holding `shared`: `open` takes the node's other locks, and
        // `close_if_idle` never holds `shared` together with them.
        let f = Arc::new(open()?);
        let mut s = lock(&self.shared);
        if let Some(other) = s.as_ref() {
            // Another thread opened it meanwhile; ours is closed on return.
            return Ok(other.clone());
        }
        *s = Some(f.clone());
        if let Some(b) = &self.budget {
            b.open.fetch_add(1, Ordering::Relaxed);
        }
        Ok(f)
    }

    /// Is this a closable node with a descriptor open now (its own or the shared content
    /// one)?
    fn holds_closable_fd(&self) -> bool {
        if self.budget.is_some() && lock(&self.shared).is_some() {
            return true;
        }
        let fd = lock(&self.fd);
        fd.is_some() && lock(&self.origin).is_some()
    }

    /// Close the descriptors nothing uses. True if one was closed.
    fn close_if_idle(&self) -> bool {
        let mut closed = false;
        if let Some(b) = &self.budget {
            let mut s = lock(&self.shared);
            if s.as_ref().is_some_and(|f| Arc::strong_count(f) == 1) {
                *s = None;
                b.open.fetch_sub(1, Ordering::Relaxed);
                closed = true;
            }
        }
        closed | self.close_fd_if_idle()
    }

    /// Close the node's own descriptor if it is closable and nothing uses it.
    fn close_fd_if_idle(&self) -> bool {
        // Lock order everywhere: fd, then origin (then the parent's).
        let mut fd = lock(&self.fd);
        if lock(&self.origin).is_none() {
            return false;
        }
        match fd.as_ref() {
            Some(f) if Arc::strong_count(f) == 1 => {
                *fd = None;
                if let Some(b) = &self.budget {
                    b.open.fetch_sub(1, Ordering::Relaxed);
                }
                true
            }
            _ => false,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let has_fd = lock(&self.fd).is_some();
        let closable = lock(&self.origin).is_some();
        let shared = lock(&self.shared).is_some();
        if let Some(b) = &self.budget {
            let n = usize::from(has_fd && closable) + usize::from(shared);
            b.open.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// A node's name held still during a rename (see `Node::renaming`).
pub struct Renaming<'a>(std::sync::MutexGuard<'a, Option<Origin>>);

impl Renaming<'_> {
    /// The rename happened: the entry is now `entry` in `parent`.
    pub fn moved(mut self, parent: &Arc<Node>, entry: &str) {
        if let Some(o) = self.0.as_mut()
            && let Ok(entry) = CString::new(entry)
        {
            o.parent = parent.clone();
            o.entry = entry;
        }
    }
}

/// Nodes by inode number, with lookup counts.
#[derive(Default)]
pub struct NodeTable {
    map: HashMap<u64, (Arc<Node>, u64)>,
    tick: u64,
    budget: Arc<FdBudget>,
}

impl NodeTable {
    /// The node for `ino`, if the kernel holds it.
    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.map.get(&ino).map(|(n, _)| n.clone())
    }

    /// Count one more kernel reference to `ino`, creating the node with `make` if new.
    /// An existing node is returned as it is (see `Node::refresh`).
    pub fn reference(&mut self, ino: u64, make: impl FnOnce() -> Node) -> Arc<Node> {
        let e = self.map.entry(ino).or_insert_with(|| (Arc::new(make()), 0));
        e.1 += 1;
        self.tick += 1;
        e.0.used.store(self.tick, Ordering::Relaxed);
        let node = e.0.clone();
        self.trim_if_over();
        node
    }

    /// Close idle descriptors if closable nodes hold more than the budget allows (nodes
    /// reopen theirs on use, so call this often: on every lookup and node fetch).
    pub fn trim_if_over(&mut self) {
        if self.budget.open() > self.budget.high {
            self.trim();
        }
    }

    /// The descriptor budget closable nodes count against.
    pub fn budget(&self) -> Arc<FdBudget> {
        self.budget.clone()
    }

    /// Size the descriptor budget for a process limit of `fd_limit`.
    pub fn set_fd_limit(&mut self, fd_limit: u64) {
        let b = FdBudget::for_limit(fd_limit);
        b.open.store(self.budget.open(), Ordering::Relaxed);
        // Nodes already made keep counting against the old budget object; only the root
        // exists when this is called, and it is not closable.
        self.budget = Arc::new(b);
    }

    /// Close the descriptors of the least recently looked-up idle closable nodes until
    /// the budget is back at its low mark.
    fn trim(&mut self) {
        let excess = self.budget.open().saturating_sub(self.budget.low);
        let mut idle: Vec<(u64, &Arc<Node>)> = self
            .map
            .values()
            .filter(|(n, _)| Arc::strong_count(n) == 1 && n.holds_closable_fd())
            .map(|(n, _)| (n.used.load(Ordering::Relaxed), n))
            .collect();
        // The `excess` least recently used, without sorting them all (linear time).
        if idle.len() > excess {
            idle.select_nth_unstable_by_key(excess, |(used, _)| *used);
            idle.truncate(excess);
        }
        let closed = idle.iter().filter(|(_, n)| n.close_if_idle()).count();
        log::debug!(
            "closed {closed} idle node descriptors ({} open, budget {})",
            self.budget.open(),
            self.budget.high
        );
    }

    /// Insert the root with a reference count that never drops to zero.
    pub fn insert_root(&mut self, node: Node) {
        self.map.insert(node.ino, (Arc::new(node), u64::MAX / 2));
    }

    /// Drop `n` kernel references; the node goes when none remain.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(e) = self.map.get_mut(&ino) {
            e.1 = e.1.saturating_sub(n);
            if e.1 == 0 {
                self.map.remove(&ino);
            }
        }
    }

    /// Every node held.
    pub fn all(&self) -> Vec<Arc<Node>> {
        self.map.values().map(|(n, _)| n.clone()).collect()
    }

    /// Number of nodes held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if no nodes are held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// File type from `st_mode`.
pub fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// File type from a dirent `d_type` (None if unknown).
pub fn kind_of_dtype(t: u8) -> Option<FileType> {
    Some(match t {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_REG => FileType::RegularFile,
        _ => return None,
    })
}
