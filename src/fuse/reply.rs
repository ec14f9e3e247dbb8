//! Sending a handler's result to the kernel: the success reply for the value, or the
//! errno.

use super::nodes::Node;
use super::{FILE_OPEN_FLAGS, Res, TTL, names};
use fuser::{
    Errno, FileAttr, FileHandle, FopenFlags, Generation, ReplyAttr, ReplyCreate, ReplyData,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
};
use std::sync::Arc;
use std::time::Duration;

/// A reply that can be sent from a `Res<T>`: `Ok` sends the success reply for the value,
/// `Err(e)` sends `error(e)`.
pub(super) trait SendResult<T> {
    fn send(self, r: Res<T>);
}

/// A looked-up or created entry and how long the kernel may cache it (its attributes:
/// `TTL`). The node is dropped only after the reply is sent.
impl SendResult<(Arc<Node>, FileAttr, Duration)> for ReplyEntry {
    fn send(self, r: Res<(Arc<Node>, FileAttr, Duration)>) {
        match r {
            Ok((_, attr, entry_ttl)) => {
                self.entry_with_ttls(&TTL, &entry_ttl, &attr, Generation(0))
            }
            Err(e) => self.error(e),
        }
    }
}

impl SendResult<FileAttr> for ReplyAttr {
    fn send(self, r: Res<FileAttr>) {
        match r {
            Ok(a) => self.attr(&TTL, &a),
            Err(e) => self.error(e),
        }
    }
}

impl SendResult<()> for ReplyEmpty {
    fn send(self, r: Res<()>) {
        match r {
            Ok(()) => self.ok(),
            Err(e) => self.error(e),
        }
    }
}

impl SendResult<Vec<u8>> for ReplyData {
    fn send(self, r: Res<Vec<u8>>) {
        match r {
            Ok(d) => self.data(&d),
            Err(e) => self.error(e),
        }
    }
}

/// The number of bytes written.
impl SendResult<u32> for ReplyWrite {
    fn send(self, r: Res<u32>) {
        match r {
            Ok(n) => self.written(n),
            Err(e) => self.error(e),
        }
    }
}

/// The new handle and the flags to open it with.
impl SendResult<(u64, FopenFlags)> for ReplyOpen {
    fn send(self, r: Res<(u64, FopenFlags)>) {
        match r {
            Ok((fh, flags)) => self.opened(FileHandle(fh), flags),
            Err(e) => self.error(e),
        }
    }
}

/// The new file's handle and attributes; opened with `FILE_OPEN_FLAGS`.
impl SendResult<(u64, FileAttr)> for ReplyCreate {
    fn send(self, r: Res<(u64, FileAttr)>) {
        match r {
            Ok((fh, attr)) => {
                self.created(&TTL, &attr, Generation(0), FileHandle(fh), FILE_OPEN_FLAGS)
            }
            Err(e) => self.error(e),
        }
    }
}

/// The size the caller asked for (0: just the length) and the value: the value's length,
/// `ERANGE` if it does not fit, or the value.
impl SendResult<(u32, Vec<u8>)> for ReplyXattr {
    fn send(self, r: Res<(u32, Vec<u8>)>) {
        match r {
            Ok((0, v)) => self.size(v.len() as u32),
            Ok((size, v)) if v.len() > size as usize => self.error(Errno::ERANGE),
            Ok((_, v)) => self.data(&v),
            Err(e) => self.error(e),
        }
    }
}

/// The backing filesystem's figures, with kekfs's own name length limit.
impl SendResult<libc::statvfs> for ReplyStatfs {
    fn send(self, r: Res<libc::statvfs>) {
        match r {
            Ok(s) => self.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                names::MAX_PLAIN_NAME as u32,
                s.f_frsize as u32,
            ),
            Err(e) => self.error(e),
        }
    }
}
