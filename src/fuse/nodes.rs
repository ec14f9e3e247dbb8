//! The inode table: FUSE inode numbers ↔ O_PATH descriptors of backing inodes, with the
//! kernel's lookup counts, per-file locks and cached per-file state.

use crate::volume::FileCipher;
use fuser::FileType;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// One backing inode the kernel knows about.
pub struct Node {
    /// The FUSE inode number (the backing inode number; 1 for the root).
    pub ino: u64,
    /// An O_PATH descriptor keeping the backing inode alive and reachable.
    pub fd: OwnedFd,
    /// File type (never changes for an inode).
    pub kind: FileType,
    /// Content lock: readers share, writers and truncation are exclusive.
    pub content: RwLock<()>,
    /// Directory id, read on first use (directories only).
    pub dir_id: OnceLock<[u8; 16]>,
    /// Content cipher and the key epoch it was derived in, set once the file header is
    /// known (regular files only); cleared when keys are revoked.
    pub cipher: Mutex<Option<(u64, Arc<FileCipher>)>>,
}

impl Node {
    /// A new node.
    pub fn new(ino: u64, fd: OwnedFd, kind: FileType) -> Self {
        Self {
            ino,
            fd,
            kind,
            content: RwLock::new(()),
            dir_id: OnceLock::new(),
            cipher: Mutex::new(None),
        }
    }

    /// The raw O_PATH descriptor.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Nodes by inode number, with lookup counts.
#[derive(Default)]
pub struct NodeTable {
    map: HashMap<u64, (Arc<Node>, u64)>,
}

impl NodeTable {
    /// The node for `ino`, if the kernel holds it.
    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.map.get(&ino).map(|(n, _)| n.clone())
    }

    /// Count one more kernel reference to `ino`, creating the node with `make` if new.
    /// An existing node keeps its descriptor (it pins the same inode).
    pub fn reference(&mut self, ino: u64, make: impl FnOnce() -> Node) -> Arc<Node> {
        let e = self.map.entry(ino).or_insert_with(|| (Arc::new(make()), 0));
        e.1 += 1;
        e.0.clone()
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
