//! FUSE over io_uring (Linux 6.14 and later, with the `fuse.enable_uring` parameter set).
//!
//! Once INIT has negotiated `FUSE_OVER_IO_URING`, every possible CPU gets a queue of ring
//! entries. An entry is a header buffer and a payload buffer registered with the kernel by
//! an `IORING_OP_URING_CMD`; the kernel puts a request into them and completes the command,
//! the thread owning the ring dispatches the request to the filesystem, writes the reply
//! into the same buffers and sends `COMMIT_AND_FETCH`, which hands the reply over and arms
//! the entry for the next request in one system call. A request goes to the queue of the
//! CPU its caller runs on, and the queue's first thread is pinned to that CPU, so a
//! request and its reply need not cross CPUs. Forgets, interrupts and notifications keep
//! travelling through /dev/fuse, whose reader threads run as before.
//!
//! Layout of the buffers (`include/uapi/linux/fuse.h`, `struct fuse_uring_req_header`):
//! the header buffer holds the in header (or, for the reply, the out header) in its first
//! 128 bytes, the opcode's own argument struct in the next 128, then
//! `struct fuse_uring_ent_in_out` (flags, commit id, payload size). Everything else of a
//! request (names, write data) and all of a reply after the out header are in the payload
//! buffer.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;
use std::time::Instant;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::info;
use log::warn;
use parking_lot::Mutex;

use crate::Errno;
use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::ll::fuse_abi::fuse_in_header;
use crate::ll::fuse_abi::fuse_out_header;
use crate::ll::fuse_abi::fuse_read_in;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `FUSE_IO_URING_CMD_REGISTER`: register an entry's buffers and wait for a request.
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: hand a reply back and wait for the next request.
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Size of the in/out header area and of the per-opcode argument area.
const HEADER_AREA: usize = 128;
const IN_HEADER: usize = size_of::<fuse_in_header>();
const OUT_HEADER: usize = size_of::<fuse_out_header>();
/// Room kept in front of the payload, so the in header and the opcode's argument struct
/// can be placed right before the payload and the parser gets one slice without the
/// payload (up to `max_write` bytes) being moved.
const PREFIX: usize = 4096;
/// `user_data` of the poll on the stop eventfd.
const STOP: u64 = u64::MAX;
/// Offset of `len` in `struct io_uring_sqe`: the number of iovecs for REGISTER.
const SQE_LEN_OFFSET: usize = 24;

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct ReqHeader {
    in_out: [u8; HEADER_AREA],
    op_in: [u8; HEADER_AREA],
    ring_ent_in_out: EntInOut,
}

// The kernel's sizes: 128 + 128 bytes of headers, then 32 bytes of entry data.
const _: () = assert!(size_of::<EntInOut>() == 32);
const _: () = assert!(size_of::<ReqHeader>() == 2 * HEADER_AREA + 32);
const _: () = assert!(size_of::<squeue::Entry128>() == 128);

/// How the io_uring transport is set up for one session.
#[derive(Debug, Clone)]
pub(crate) struct UringParams {
    /// Bytes the kernel may put into (or expect in) a payload buffer.
    pub(crate) payload: usize,
    /// Threads per CPU queue, each with its own ring and one entry.
    pub(crate) threads_per_queue: usize,
    /// How long a thread keeps looking for the next request before it sleeps.
    pub(crate) spin: Duration,
    /// Set once every ring thread's entry is registered: from then on the kernel sends
    /// requests through the rings (it waits for every CPU queue to have an entry).
    pub(crate) active: Arc<AtomicBool>,
}

/// Counts the ring threads whose entry the kernel has accepted; the last of `expected`
/// switches `active` on.
#[derive(Debug)]
struct Registrations {
    active: Arc<AtomicBool>,
    done: AtomicUsize,
    expected: usize,
}

impl Registrations {
    /// Counts one more registered entry.
    fn count(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.expected {
            self.active.store(true, Ordering::Release);
            info!("FUSE over io_uring: every queue is registered; requests use the rings");
        }
    }
}

/// Where the reply to a request that came through a ring entry goes. While the request is
/// being dispatched the reply object is armed: a reply with no payload of the request to
/// overwrite (`direct`) is written straight into the entry's buffers, any other into
/// `buffered` and copied once the request's bytes are no longer borrowed. After the
/// dispatch it is disarmed, and a reply arriving later (from another thread) is dropped
/// with an error instead of writing into buffers the kernel owns again. Notifications and
/// backing files go through /dev/fuse (`dev`).
#[derive(Debug)]
pub(crate) struct UringReply {
    pub(crate) dev: ChannelSender,
    state: Mutex<ReplyState>,
}

#[derive(Debug)]
struct ReplyState {
    armed: bool,
    /// The entry's header and payload buffers, when the reply may go straight there.
    direct: Option<(*mut ReqHeader, *mut u8)>,
    /// Capacity of the payload buffer as registered: the most a reply may carry (a
    /// filesystem may work in `reply_room(payload)` bytes, see `ReplyData::fill`).
    payload: usize,
    buffered: Vec<u8>,
    sent: Sent,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sent {
    Nothing,
    /// Out header and payload size are in the entry already.
    Direct,
    /// The whole reply (out header first) is in `buffered`.
    Buffered,
    /// The reply was larger than the payload buffer.
    TooLarge(usize),
}

// SAFETY: the raw pointers in `ReplyState` are only dereferenced under the mutex and only
// while `armed`, i.e. while the entry's thread is inside the dispatch and the buffers
// belong to user space; the thread disarms (under the same mutex) before it hands the
// buffers back to the kernel.
unsafe impl Send for UringReply {}
// SAFETY: as above; all access goes through the mutex.
unsafe impl Sync for UringReply {}

impl UringReply {
    fn new(dev: ChannelSender, payload: usize) -> Self {
        UringReply {
            dev,
            state: Mutex::new(ReplyState {
                armed: false,
                direct: None,
                payload,
                buffered: Vec::new(),
                sent: Sent::Nothing,
            }),
        }
    }

    pub(crate) fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut st = self.state.lock();
        if !st.armed || st.sent != Sent::Nothing {
            error!("io_uring: a reply came after its request was answered; dropped");
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total < OUT_HEADER || total - OUT_HEADER > st.payload {
            st.sent = Sent::TooLarge(total);
            return Ok(());
        }
        match st.direct {
            Some((header, payload)) => {
                let mut head = [0u8; OUT_HEADER];
                let mut pos = 0;
                for buf in bufs {
                    let mut part: &[u8] = buf;
                    if pos < OUT_HEADER {
                        let n = part.len().min(OUT_HEADER - pos);
                        head[pos..pos + n].copy_from_slice(&part[..n]);
                        part = &part[n..];
                        pos += n;
                    }
                    if !part.is_empty() {
                        // SAFETY: pos - OUT_HEADER + part.len() <= total - OUT_HEADER, which
                        // is at most the payload buffer's size (checked above); the buffer
                        // is ours while armed (see the Send impl) and is not borrowed: a
                        // request whose payload the parser reads gets no `direct`.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                part.as_ptr(),
                                payload.add(pos - OUT_HEADER),
                                part.len(),
                            );
                        }
                        pos += part.len();
                    }
                }
                // SAFETY: as above, the header buffer is ours while armed.
                unsafe { set_out_header(header, &head, (total - OUT_HEADER) as u32) };
                st.sent = Sent::Direct;
            }
            None => {
                st.buffered.clear();
                for buf in bufs {
                    st.buffered.extend_from_slice(buf);
                }
                st.sent = Sent::Buffered;
            }
        }
        Ok(())
    }

    /// Lets `fill` write a reply's payload straight into the entry's payload buffer, if
    /// the reply may go there (armed, nothing sent yet, no request payload in the buffer)
    /// and `room` bytes fit; otherwise hands `fill` back untouched. `fill` gets at least
    /// `room` bytes (their old contents unspecified) and returns how many of the first
    /// bytes to send, or an errno, which is sent instead.
    pub(crate) fn fill_direct<F>(&self, unique: u64, room: usize, fill: F) -> Result<(), F>
    where
        F: FnOnce(&mut [u8]) -> Result<usize, Errno>,
    {
        let mut st = self.state.lock();
        let Some((header, payload)) = st.direct else {
            return Err(fill);
        };
        let mapped = reply_room(st.payload);
        if !st.armed || st.sent != Sent::Nothing || room > mapped {
            return Err(fill);
        }
        // SAFETY: the payload buffer has `reply_room(payload)` bytes (mapped in
        // `Entry::new`), all initialised (zero-filled mapping); it is ours while armed and
        // not borrowed (a direct entry's request has no payload), and the lock keeps every
        // other writer out until `fill` returns.
        let buf = unsafe { std::slice::from_raw_parts_mut(payload, mapped) };
        let (errno, len) = match fill(buf) {
            Ok(n) if n <= st.payload => (0, n),
            Ok(n) => {
                st.sent = Sent::TooLarge(OUT_HEADER + n);
                return Ok(());
            }
            Err(e) => (e.code(), 0),
        };
        // SAFETY: the header buffer is ours while armed (see the Send impl).
        unsafe { set_out_header(header, &out_header(unique, errno, len), len as u32) };
        st.sent = Sent::Direct;
        Ok(())
    }
}

/// Bytes mapped for an entry's payload buffer whose registered size is `payload`: an
/// eighth more, so a filesystem can build a reply in place from a larger input (kekfs
/// reads a range's ciphertext into it and decrypts it there).
fn reply_room(payload: usize) -> usize {
    (payload + payload / 8).next_multiple_of(4096)
}

/// Stops the ring threads: each ring polls the eventfd, and writing to it completes the
/// polls. Dropping the rings then cancels the commands still registered.
#[derive(Debug)]
pub(crate) struct UringThreads {
    stop: OwnedFd,
    threads: Vec<thread::JoinHandle<()>>,
}

impl UringThreads {
    pub(crate) fn stop_and_join(self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to an eventfd this struct owns.
        let n = unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n != 8 {
            warn!(
                "io_uring: could not signal the ring threads to stop: {}",
                io::Error::last_os_error()
            );
        }
        for thread in self.threads {
            if thread.join().is_err() {
                error!("io_uring: a ring thread panicked");
            }
        }
    }
}

/// The CPUs the kernel may run a request's caller on: it makes one queue per possible
/// CPU and waits for all of them to have an entry before it uses the rings.
fn possible_cpus() -> Vec<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    parse_cpu_list(&text)
}

/// A kernel CPU list (`0-3,8,10-11`) as CPU numbers; empty if it does not parse.
fn parse_cpu_list(text: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        match (lo.parse::<usize>(), hi.parse::<usize>()) {
            (Ok(lo), Ok(hi)) if lo <= hi && hi < 4096 => cpus.extend(lo..=hi),
            _ => return Vec::new(),
        }
    }
    cpus
}

/// Starts the ring threads. Registration happens on the threads; if the kernel refuses it
/// (io_uring disabled, an old kernel) they log why and exit, and /dev/fuse keeps serving.
pub(crate) fn start<FS: Filesystem>(
    template: &SessionEventLoop<FS>,
    params: UringParams,
) -> io::Result<UringThreads> {
    let mut cpus = possible_cpus();
    cpus.retain(|&cpu| u16::try_from(cpu).is_ok());
    if cpus.is_empty() {
        return Err(io::Error::other(
            "cannot read the possible CPUs from /sys/devices/system/cpu/possible",
        ));
    }
    let registrations = Arc::new(Registrations {
        active: params.active.clone(),
        done: AtomicUsize::new(0),
        expected: cpus.len() * params.threads_per_queue.max(1),
    });
    // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd(2) and is owned by nobody else.
    let stop = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut threads = Vec::new();
    for &cpu in &cpus {
        // The kernel picks a request's queue by the number of the CPU its caller runs on.
        let Ok(qid) = u16::try_from(cpu) else { break };
        for t in 0..params.threads_per_queue.max(1) {
            let name = format!("fuse-uring-{cpu}-{t}");
            let se = SessionEventLoop {
                thread_name: name.clone(),
                ch: template.ch.clone(),
                filesystem: template.filesystem.clone(),
                allowed: template.allowed,
                session_owner: template.session_owner,
            };
            let stop_fd = stop.as_raw_fd();
            let params = params.clone();
            let registrations = registrations.clone();
            let spawned = thread::Builder::new().name(name).spawn(move || {
                // The first thread of a queue stays on the queue's CPU, so a caller and the
                // thread serving it share a CPU; the others float, so that a burst of
                // requests from one CPU (read-ahead of a sequential read) is served on
                // several. Measured: all pinned, seq read 826-955 MiB/s; first pinned,
                // 1506; 4 KiB jobs the same within the noise. The first thread floats too
                // while it serves large READs (`FLOAT_READ`; see `run_queue`).
                let pin = (t == 0).then_some(cpu);
                if let Err(err) = run_queue(&se, qid, pin, stop_fd, &params, &registrations) {
                    warn!("io_uring queue {qid}: {err}; requests go through /dev/fuse");
                }
            });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(err) => {
                    // The threads already started stop with the eventfd.
                    UringThreads { stop, threads }.stop_and_join();
                    return Err(err);
                }
            }
        }
    }
    info!(
        "FUSE over io_uring: {} queues x {} threads",
        cpus.len(),
        params.threads_per_queue.max(1)
    );
    Ok(UringThreads { stop, threads })
}

/// One ring entry: the header and payload buffers the kernel reads and writes, and the
/// iovecs that describe them (read by the kernel when REGISTER is submitted). The buffers
/// are raw allocations reached only through raw pointers and short-lived slices, since
/// the kernel and the reply object write into them too.
struct Entry {
    header: *mut ReqHeader,
    /// `PREFIX` bytes of room, then the payload buffer (`payload` bytes registered with the
    /// kernel, `reply_room(payload)` mapped); 8-aligned, so every offset that is
    /// a multiple of 8 is aligned for the request parser.
    buf: *mut u8,
    payload: usize,
    iov: Box<[libc::iovec; 2]>,
    reply: Arc<UringReply>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // SAFETY: both were allocated in `Entry::new` (Box, mmap of PREFIX +
        // reply_room(payload) bytes) and are freed only here; the caller keeps an entry
        // the kernel may still write to alive.
        unsafe {
            drop(Box::from_raw(self.header));
            libc::munmap(self.buf.cast(), PREFIX + reply_room(self.payload));
        }
    }
}

impl Entry {
    fn new(payload: usize, dev: ChannelSender) -> io::Result<Entry> {
        let header = Box::into_raw(Box::new(ReqHeader {
            in_out: [0; HEADER_AREA],
            op_in: [0; HEADER_AREA],
            ring_ent_in_out: EntInOut::default(),
        }));
        // An anonymous mapping: page-aligned, zero-filled, and taking memory only for the
        // pages requests and replies actually reach (most are far smaller than max_write).
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let buf = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PREFIX + reply_room(payload),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if buf == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: `header` came from Box::into_raw just above.
            drop(unsafe { Box::from_raw(header) });
            return Err(err);
        }
        let buf = buf.cast::<u8>();
        let iov = Box::new([
            libc::iovec {
                iov_base: header.cast(),
                iov_len: size_of::<ReqHeader>(),
            },
            libc::iovec {
                // SAFETY: PREFIX is inside the allocation of PREFIX + payload bytes.
                iov_base: unsafe { buf.add(PREFIX) }.cast(),
                iov_len: payload,
            },
        ]);
        Ok(Entry {
            header,
            buf,
            payload,
            iov,
            reply: Arc::new(UringReply::new(dev, payload)),
        })
    }

    /// Whether the request the kernel put into this entry is a READ of at least
    /// `FLOAT_READ` bytes.
    fn is_large_read(&self) -> bool {
        // SAFETY: the kernel has completed the command, so the header buffer is ours
        // until the commit; no other reference to it exists now.
        let h = unsafe { &*self.header };
        // fuse_in_header: len u32, opcode u32; fuse_read_in: fh u64, offset u64, size u32.
        let opcode = u32::from_ne_bytes([h.in_out[4], h.in_out[5], h.in_out[6], h.in_out[7]]);
        let size = u32::from_ne_bytes([h.op_in[16], h.op_in[17], h.op_in[18], h.op_in[19]]);
        const _: () = assert!(std::mem::offset_of!(fuse_read_in, size) == 16);
        opcode == FUSE_READ && size >= FLOAT_READ
    }

    /// Dispatches the request the kernel put into this entry and leaves the reply in its
    /// buffers. Returns the request's unique id, which is the commit id.
    fn serve<FS: Filesystem>(&mut self, se: &SessionEventLoop<FS>) -> u64 {
        // SAFETY: the kernel has completed the command, so the buffers are ours until
        // the commit; no other reference to them exists now.
        let (ent, in_out, op_in) = unsafe {
            let h = &*self.header;
            (h.ring_ent_in_out, h.in_out, h.op_in)
        };
        let commit_id = ent.commit_id;
        let payload_sz = ent.payload_sz as usize;
        let in_len = u32::from_ne_bytes([in_out[0], in_out[1], in_out[2], in_out[3]]) as usize;
        // The in header's length covers the in header, the opcode's argument struct (in
        // op_in) and the payload; what is left over is the argument struct's size.
        let op_len = in_len
            .checked_sub(IN_HEADER + payload_sz)
            .filter(|&n| n <= HEADER_AREA && n % 8 == 0 && payload_sz <= self.payload);
        let Some(op_len) = op_len else {
            error!("io_uring: malformed request (length {in_len}, payload {payload_sz})");
            self.put_error(commit_id, libc::EIO);
            return commit_id;
        };
        let start = PREFIX - IN_HEADER - op_len;
        // SAFETY: start..PREFIX lies inside the allocation; the buffer is ours (above).
        unsafe {
            let at = self.buf.add(start);
            std::ptr::copy_nonoverlapping(in_out.as_ptr(), at, IN_HEADER);
            std::ptr::copy_nonoverlapping(op_in.as_ptr(), at.add(IN_HEADER), op_len);
        }

        // A reply object still held from an earlier request (replied to late, from
        // another thread) is left to that holder; this entry takes a fresh one.
        if Arc::strong_count(&self.reply) > 1 {
            self.reply = Arc::new(UringReply::new(self.reply.dev.clone(), self.payload));
        }
        {
            let mut st = self.reply.state.lock();
            st.armed = true;
            st.sent = Sent::Nothing;
            // Replies go straight into the entry unless the parser reads request bytes
            // from the payload buffer (write data, names), which the reply would overwrite.
            // SAFETY: PREFIX is inside the allocation.
            st.direct = (payload_sz == 0).then(|| (self.header, unsafe { self.buf.add(PREFIX) }));
        }
        let dispatched = {
            // SAFETY: start..PREFIX + payload_sz is inside the allocation and initialised
            // (zeroed at allocation, then written by us or the kernel). Nothing writes to
            // this range during the dispatch: a direct reply writes from PREFIX on, and
            // only when payload_sz is 0.
            let data = unsafe {
                std::slice::from_raw_parts(self.buf.add(start), PREFIX + payload_sz - start)
            };
            match RequestWithSender::new_uring(se.ch.sender(), data, self.reply.clone()) {
                Some(req) => {
                    std::panic::catch_unwind(AssertUnwindSafe(|| req.dispatch(se))).is_ok()
                }
                None => false,
            }
        };
        let mut st = self.reply.state.lock();
        st.armed = false;
        st.direct = None;
        match (dispatched, st.sent) {
            (true, Sent::Direct) => {}
            (true, Sent::Buffered) => {
                let body = &st.buffered[OUT_HEADER..];
                // SAFETY: the buffers are ours (disarmed, before the commit); the body fits
                // the payload buffer (checked when the reply was sent).
                unsafe {
                    set_out_header(self.header, &st.buffered[..OUT_HEADER], body.len() as u32);
                    std::ptr::copy_nonoverlapping(body.as_ptr(), self.buf.add(PREFIX), body.len());
                }
            }
            (true, Sent::TooLarge(n)) => {
                drop(st);
                error!("io_uring: a reply of {n} bytes does not fit the ring entry");
                self.put_error(commit_id, libc::EIO);
            }
            (true, Sent::Nothing) => {
                drop(st);
                error!("io_uring: request {commit_id} was not answered during its dispatch");
                self.put_error(commit_id, libc::EIO);
            }
            (false, _) => {
                drop(st);
                error!("io_uring: request {commit_id} could not be parsed or its handler panicked");
                self.put_error(commit_id, libc::EIO);
            }
        }
        commit_id
    }

    /// Leaves an error reply (no payload) for request `unique` in the entry.
    fn put_error(&mut self, unique: u64, errno: i32) {
        // SAFETY: the buffers are ours until the commit (see `serve`).
        unsafe { set_out_header(self.header, &out_header(unique, errno, 0), 0) };
    }
}

/// `struct fuse_out_header` for request `unique`: `errno` (positive, 0 for success) and
/// `payload` bytes after the header.
fn out_header(unique: u64, errno: i32, payload: usize) -> [u8; OUT_HEADER] {
    let mut out = [0u8; OUT_HEADER];
    out[..4].copy_from_slice(&((OUT_HEADER + payload) as u32).to_ne_bytes());
    out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    out[8..16].copy_from_slice(&unique.to_ne_bytes());
    out
}

/// Puts a reply's out header (`out`, 16 bytes) and its payload size into a header buffer.
///
/// # Safety
/// `header` must point to a live `ReqHeader` nobody else accesses meanwhile.
unsafe fn set_out_header(header: *mut ReqHeader, out: &[u8], payload_sz: u32) {
    debug_assert_eq!(out.len(), OUT_HEADER);
    // SAFETY: guaranteed by the caller; raw places, no references to the header.
    unsafe {
        let in_out = std::ptr::addr_of_mut!((*header).in_out).cast::<u8>();
        std::ptr::copy_nonoverlapping(out.as_ptr(), in_out, OUT_HEADER.min(out.len()));
        std::ptr::addr_of_mut!((*header).ring_ent_in_out.payload_sz).write(payload_sz);
    }
}

/// The 80-byte command area: `struct fuse_uring_cmd_req` (flags, commit id, queue id).
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

fn register_sqe(dev: RawFd, entry: &Entry, qid: u16) -> squeue::Entry128 {
    let sqe = opcode::UringCmd80::new(types::Fd(dev), CMD_REGISTER)
        .cmd(cmd_req(0, qid))
        .addr(Some(entry.iov.as_ptr() as u64))
        .build();
    // The io-uring crate has no setter for `len`, which REGISTER uses for the number of
    // iovecs (2: header and payload).
    // SAFETY: Entry128 is repr(C): a 64-byte io_uring_sqe followed by 64 command bytes,
    // so it has the size of [u8; 128] and every byte pattern is a valid value of either.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above, the bytes come from a valid Entry128 with only `len` changed.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

fn commit_sqe(dev: RawFd, commit_id: u64, qid: u16) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(dev), CMD_COMMIT_AND_FETCH)
        .cmd(cmd_req(commit_id, qid))
        .build()
}

const FUSE_READ: u32 = crate::ll::fuse_abi::fuse_opcode::FUSE_READ as u32;
/// READs of this size and more are served with the queue's pinned thread free to run on
/// any CPU (see `run_queue`).
const FLOAT_READ: u32 = 256 << 10;

fn set_affinity(set: &nix::sched::CpuSet) {
    if let Err(err) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set) {
        debug!("io_uring: cannot set CPU affinity: {err}");
    }
}

fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        set_affinity(&set);
    }
}

/// Registers one entry on queue `qid` and serves requests until the connection ends or
/// the stop eventfd fires.
fn run_queue<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    qid: u16,
    cpu: Option<usize>,
    stop: RawFd,
    params: &UringParams,
    registrations: &Registrations,
) -> io::Result<()> {
    // The CPUs this thread may use before pinning, for floating during large reads.
    let all = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu);
    }
    let mut pinned = cpu.is_some();
    let dev = se.ch.as_fd().as_raw_fd();
    // One issuer (this thread); completions are delivered at this thread's next system
    // call rather than by interrupting it (the spin below makes one at every turn).
    let mut ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(4)?;
    let entry = Entry::new(params.payload, se.ch.sender())?;
    let mut entry = std::mem::ManuallyDrop::new(entry);
    let poll = squeue::Entry128::from(
        opcode::PollAdd::new(types::Fd(stop), libc::POLLIN as u32)
            .build()
            .user_data(STOP),
    );
    let register = register_sqe(dev, &entry, qid);
    // SAFETY: the buffers the SQEs point to (the entry's iovecs, header and payload) stay
    // allocated until the kernel has given the entry up (see the end).
    unsafe {
        let mut sq = ring.submission();
        sq.push(&poll)
            .map_err(|_| io::Error::other("submission queue full"))?;
        sq.push(&register)
            .map_err(|_| io::Error::other("submission queue full"))?;
    }
    // A REGISTER the kernel refuses completes at once, with an error; an accepted one
    // stays pending until a request arrives. So an empty completion queue right after the
    // submission means the entry is registered.
    ring.submit()?;
    let mut registered = ring.completion().is_empty();
    if registered {
        registrations.count();
        debug!("io_uring: queue {qid} registered (pinned to {cpu:?})");
    }
    // Whether the kernel may still write into the entry's buffers.
    let mut held = true;
    let result = loop {
        if registered && !params.spin.is_zero() {
            // Hand the reply over, then look for the next request for a while before
            // sleeping: a caller doing one request after another (a database, fio at
            // queue depth 1) finds this thread awake and its CPU busy, instead of paying
            // for an idle CPU's wake-up on every request.
            if let Err(err) = ring.submit() {
                break Err(err);
            }
            let since = Instant::now();
            while ring.completion().is_empty() && since.elapsed() < params.spin {
                // Lets a caller waiting on this CPU run; its return delivers completions.
                thread::yield_now();
            }
        }
        let want = usize::from(ring.completion().is_empty());
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
            Err(err) => break Err(err),
        }
        let Some(cqe) = ring.completion().next() else {
            continue;
        };
        if cqe.user_data() == STOP {
            break Ok(());
        }
        let res = cqe.result();
        if res < 0 {
            held = false;
            let err = io::Error::from_raw_os_error(-res);
            match -res {
                // The connection ended (unmount, abort).
                libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV | libc::ECANCELED
                    if registered =>
                {
                    break Ok(());
                }
                // INIT not processed yet: try again shortly.
                libc::EAGAIN if !registered => {
                    thread::sleep(Duration::from_millis(1));
                    held = true;
                    let sqe = register_sqe(dev, &entry, qid);
                    // SAFETY: as for the first REGISTER.
                    unsafe { ring.submission().push(&sqe) }
                        .map_err(|_| io::Error::other("submission queue full"))?;
                    continue;
                }
                _ if !registered => {
                    break Err(io::Error::other(format!("registration refused: {err}")));
                }
                _ => break Err(io::Error::other(format!("commit refused: {err}"))),
            }
        }
        if !registered {
            registered = true;
            registrations.count();
            debug!("io_uring: queue {qid} registered (pinned to {cpu:?})");
        }
        // Large READs (sequential read-ahead) come in pairs on the caller's queue while
        // the caller goes on copying out of the page cache on its CPU: the pinned thread
        // floats while they last, so it can take the other CPU. Small requests pin it
        // again, next to its caller.
        if let (Some(cpu), Some(all)) = (cpu, all.as_ref()) {
            let float = entry.is_large_read();
            if float == pinned {
                if float {
                    set_affinity(all);
                } else {
                    pin_to_cpu(cpu);
                }
                pinned = !float;
            }
        }
        let commit_id = entry.serve(se);
        let sqe = commit_sqe(dev, commit_id, qid);
        // SAFETY: as for the first REGISTER.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("submission queue full"))?;
    };
    drop(ring);
    if !held {
        // SAFETY: the kernel has given the entry up (an error completion), so nothing
        // writes into its buffers any more; it is dropped exactly once, here.
        unsafe { std::mem::ManuallyDrop::drop(&mut entry) };
    }
    // Otherwise closing the ring cancels the command asynchronously and the kernel may
    // still write into the buffers until then: they are left to the process's exit.
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), vec![0, 1]);
        assert_eq!(parse_cpu_list("0-2,5,7-8"), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(parse_cpu_list("3"), vec![3]);
        for bad in ["", "x", "2-1", "0-99999", "1,,a"] {
            assert!(parse_cpu_list(bad).is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn command_area_is_fuse_uring_cmd_req() {
        let cmd = cmd_req(0x1122_3344_5566_7788, 0x0102);
        assert_eq!(cmd[..8], [0; 8], "flags");
        assert_eq!(
            cmd[8..16],
            0x1122_3344_5566_7788u64.to_ne_bytes(),
            "commit_id"
        );
        assert_eq!(cmd[16..18], 0x0102u16.to_ne_bytes(), "qid");
        assert!(cmd[18..].iter().all(|&b| b == 0));
    }

    #[test]
    fn register_sqe_points_at_two_iovecs() {
        let dev = ChannelSender::for_tests();
        let entry = Entry::new(8192, dev).unwrap();
        let sqe = register_sqe(7, &entry, 1);
        // SAFETY: as in `register_sqe`: a 128-byte repr(C) value read as bytes.
        let raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(raw[0], io_uring::opcode::UringCmd80::CODE);
        assert_eq!(raw[4..8], 7i32.to_ne_bytes(), "fd");
        assert_eq!(
            raw[16..24],
            (entry.iov.as_ptr() as u64).to_ne_bytes(),
            "addr"
        );
        assert_eq!(raw[24..28], 2u32.to_ne_bytes(), "len: two iovecs");
        assert_eq!(entry.iov[0].iov_len, 2 * HEADER_AREA + 32);
        assert_eq!(entry.iov[1].iov_len, 8192);
        // The command area (after the first 48 bytes of the SQE) carries the queue id.
        assert_eq!(raw[48 + 16..48 + 18], 1u16.to_ne_bytes());
    }

    #[test]
    fn error_reply_is_an_out_header_without_payload() {
        let mut entry = Entry::new(8192, ChannelSender::for_tests()).unwrap();
        entry.put_error(42, libc::EIO);
        // SAFETY: the entry is not registered with any kernel ring.
        let h = unsafe { &*entry.header };
        assert_eq!(h.in_out[..4], 16u32.to_ne_bytes());
        assert_eq!(h.in_out[4..8], (-libc::EIO).to_ne_bytes());
        assert_eq!(h.in_out[8..16], 42u64.to_ne_bytes());
        assert_eq!(h.ring_ent_in_out.payload_sz, 0);
    }

    #[test]
    fn large_reads_are_told_from_the_header() {
        let entry = Entry::new(8192, ChannelSender::for_tests()).unwrap();
        let set = |opcode: u32, size: u32| {
            // SAFETY: the entry is not registered with any kernel ring.
            let h = unsafe { &mut *entry.header };
            h.in_out[4..8].copy_from_slice(&opcode.to_ne_bytes());
            h.op_in[16..20].copy_from_slice(&size.to_ne_bytes());
        };
        set(FUSE_READ, 1 << 20);
        assert!(entry.is_large_read());
        set(FUSE_READ, FLOAT_READ);
        assert!(entry.is_large_read());
        set(FUSE_READ, FLOAT_READ - 1);
        assert!(!entry.is_large_read());
        set(FUSE_READ, 4096);
        assert!(!entry.is_large_read());
        // A WRITE of 1 MiB (its size field sits elsewhere, but the opcode decides).
        set(crate::ll::fuse_abi::fuse_opcode::FUSE_WRITE as u32, 1 << 20);
        assert!(!entry.is_large_read());
    }

    /// Arms an entry's reply object as `serve` does for a request without payload.
    fn arm_direct(entry: &Entry) {
        let mut st = entry.reply.state.lock();
        st.armed = true;
        st.sent = Sent::Nothing;
        // SAFETY: PREFIX is inside the allocation.
        st.direct = Some((entry.header, unsafe { entry.buf.add(PREFIX) }));
    }

    #[test]
    fn fill_writes_in_place_and_checks_sizes() {
        let entry = Entry::new(8192, ChannelSender::for_tests()).unwrap();
        // Not armed: the closure is handed back.
        assert!(entry.reply.fill_direct(7, 100, |_| Ok(0)).is_err());
        arm_direct(&entry);
        // More room than the entry has: handed back.
        assert!(
            entry
                .reply
                .fill_direct(7, reply_room(8192) + 1, |_| Ok(0))
                .is_err()
        );
        let r = entry.reply.fill_direct(7, reply_room(8192), |buf| {
            assert!(buf.len() >= reply_room(8192));
            buf[..5].copy_from_slice(b"hello");
            Ok(5)
        });
        assert!(r.is_ok());
        // SAFETY: the entry is not registered with any kernel ring.
        let (h, payload) = unsafe {
            (
                &*entry.header,
                std::slice::from_raw_parts(entry.buf.add(PREFIX), 5),
            )
        };
        assert_eq!(h.in_out[..4], 21u32.to_ne_bytes());
        assert_eq!(h.in_out[4..8], 0i32.to_ne_bytes());
        assert_eq!(h.in_out[8..16], 7u64.to_ne_bytes());
        assert_eq!(h.ring_ent_in_out.payload_sz, 5);
        assert_eq!(payload, b"hello");
        // Answered already: a second fill is handed back.
        assert!(entry.reply.fill_direct(7, 10, |_| Ok(0)).is_err());

        // An errno becomes an error reply without payload.
        arm_direct(&entry);
        assert!(
            entry
                .reply
                .fill_direct(8, 10, |_| Err(Errno::ENOENT))
                .is_ok()
        );
        // SAFETY: as above.
        let h = unsafe { &*entry.header };
        assert_eq!(h.in_out[..4], 16u32.to_ne_bytes());
        assert_eq!(h.in_out[4..8], (-libc::ENOENT).to_ne_bytes());
        assert_eq!(h.ring_ent_in_out.payload_sz, 0);

        // A length beyond the registered payload size is refused (sent as too large).
        arm_direct(&entry);
        assert!(entry.reply.fill_direct(9, 10, |_| Ok(8193)).is_ok());
        assert_eq!(
            entry.reply.state.lock().sent,
            Sent::TooLarge(OUT_HEADER + 8193)
        );
    }
}
