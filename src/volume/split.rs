//! A second thread that writes the lower half of a large write's ciphertext while the
//! writing thread seals the upper half.
//!
//! A 1 MiB write is a serial chain (the kernel's copy into the daemon, sealing, the
//! `pwrite`) while the writer waits, so one core sits idle through most of it. Here the
//! writing thread seals the lower half of the blocks into a buffer of the helper's and
//! hands it over; the helper `pwrite`s it while the writing thread seals the upper half,
//! which it writes itself once the lower half is in place. Only ciphertext, in owned
//! buffers, and a duplicated descriptor cross threads. Waking an idle CPU on this kind
//! of VM takes about as long as the work saved, so after a job the helper keeps looking
//! for the next one for a while (`spin`) before it sleeps.

use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, channel, sync_channel};
use std::time::{Duration, Instant};

/// Writes of fewer blocks (256 KiB) than this are sealed and written on the writing
/// thread alone, since small ones cannot repay the hand-over. (Measured from this size
/// up: direct 256 KiB writes, completion latency p50 128–164 → 122–142 µs; 512 KiB,
/// 252–362 → 232–272; smaller writes were not tried.)
pub const MIN_BLOCKS: usize = 64;

struct Job {
    file: File,
    buf: Vec<u8>,
    off: u64,
    done: SyncSender<(Vec<u8>, io::Result<()>)>,
}

/// The writers' side: hands a half to the helper when it is free.
pub struct SplitWriter {
    tx: Sender<Job>,
    /// The helper's buffer while it is free; taken for the duration of a job, so at most
    /// one job is in flight and a writer that finds the helper busy works alone.
    idle: Mutex<Option<Vec<u8>>>,
    /// Halves the helper wrote.
    done: AtomicU64,
}

/// The helper's side: `run` it on a thread of its own.
pub struct SplitWorker {
    rx: Receiver<Job>,
}

/// A half handed to the helper; `wait` for its `pwrite`. Dropped without `wait` (a panic
/// unwinding past it), it still waits, so that a half never lands after the write it
/// belongs to has ended and a later write to the same range has begun.
pub(super) struct Pending<'a> {
    owner: &'a SplitWriter,
    /// `None` once the outcome has been taken.
    done: Option<Receiver<(Vec<u8>, io::Result<()>)>>,
}

impl SplitWriter {
    /// A writer and the worker loop that serves it.
    pub fn new() -> (SplitWriter, SplitWorker) {
        let (tx, rx) = channel();
        let w = SplitWriter {
            tx,
            idle: Mutex::new(Some(Vec::new())),
            done: AtomicU64::new(0),
        };
        (w, SplitWorker { rx })
    }

    /// The helper's buffer, if the helper is free (hand it back with `start` or
    /// `release`).
    pub(super) fn claim(&self) -> Option<Vec<u8>> {
        self.idle.try_lock()?.take()
    }

    /// Give back a claimed buffer without a job.
    pub(super) fn release(&self, buf: Vec<u8>) {
        // A buffer that grew past the ciphertext buffers' bound (a write far larger than
        // FUSE sends) is not kept.
        let buf = if buf.capacity() > super::content::BUF_MAX {
            Vec::new()
        } else {
            buf
        };
        *self.idle.lock() = Some(buf);
    }

    /// Have the helper `pwrite` `buf` at `off` of `file`. On failure to hand it over (no
    /// descriptor left to duplicate, or the helper is gone), the buffer comes back.
    pub(super) fn start(
        &self,
        file: &File,
        buf: Vec<u8>,
        off: u64,
    ) -> Result<Pending<'_>, Vec<u8>> {
        let Ok(file) = file.try_clone() else {
            return Err(buf);
        };
        let (done, rx) = sync_channel(1);
        match self.tx.send(Job {
            file,
            buf,
            off,
            done,
        }) {
            Ok(()) => Ok(Pending {
                owner: self,
                done: Some(rx),
            }),
            Err(e) => Err(e.0.buf),
        }
    }

    /// How many halves the helper has written.
    pub fn jobs(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

impl Pending<'_> {
    /// The outcome of the helper's `pwrite`. The buffer goes back to the writer; if the
    /// helper died instead, the helper stays busy for good (later writes work alone) and
    /// this is an error.
    pub fn wait(mut self) -> io::Result<()> {
        self.finish()
            .unwrap_or_else(|| Err(io::Error::other("the write helper thread died")))
    }

    /// Wait for the helper's outcome (once) and take its buffer back; `None` if the helper
    /// died, or the outcome was already taken.
    fn finish(&mut self) -> Option<io::Result<()>> {
        let done = self.done.take()?;
        // The helper started while this thread had as much sealing left to do: look for
        // the result briefly before sleeping on it.
        let until = Instant::now() + Duration::from_micros(200);
        let (buf, r) = loop {
            match done.try_recv() {
                Ok(r) => break r,
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if Instant::now() < until => std::hint::spin_loop(),
                Err(TryRecvError::Empty) => break done.recv().ok()?,
            }
        };
        self.owner.release(buf);
        self.owner.done.fetch_add(1, Ordering::Relaxed);
        Some(r)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl SplitWorker {
    /// Serve jobs until the `SplitWriter` is dropped. After each job, look for the next one
    /// for `spin` (yielding the CPU to anything else runnable) before sleeping.
    pub fn run(self, spin: Duration) {
        let mut last: Option<Instant> = None;
        loop {
            let job = match self.rx.try_recv() {
                Ok(j) => j,
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {
                    if last.is_some_and(|t| t.elapsed() < spin) {
                        std::thread::yield_now();
                        continue;
                    }
                    match self.rx.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                }
            };
            let r = job.file.write_all_at(&job.buf, job.off);
            drop(job.file);
            // A writer that stopped waiting is gone; nothing to do then.
            let _ = job.done.send((job.buf, r));
            last = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Pending` dropped without `wait` returns only once the helper's `pwrite` is done
    /// and its buffer is back. The helper starts 50 ms after the hand-over, so a drop
    /// that did not wait would see the range still unwritten.
    #[test]
    fn a_dropped_pending_still_waits_for_its_write() {
        let f = tempfile::tempfile().unwrap();
        let (w, worker) = SplitWriter::new();
        let mut buf = w.claim().unwrap();
        buf.extend_from_slice(&[7u8; 8192]);
        let p = w
            .start(&f, buf, 4096)
            .map_err(|_| "not handed over")
            .unwrap();
        assert!(w.claim().is_none(), "the helper is busy with the job");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            worker.run(Duration::ZERO);
        });
        drop(p);
        let mut back = vec![0u8; 8192];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&b| b == 7), "the half was not written yet");
        assert!(w.claim().is_some(), "the helper's buffer came back");
        assert_eq!(w.jobs(), 1);
        drop(w);
        t.join().unwrap();
    }
}
