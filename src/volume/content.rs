//! Encrypted file content on a backing file: read, write and truncate plaintext ranges as
//! sealed 4 KiB blocks. Callers serialise writers per file; readers may run concurrently.

use super::split::{self, SplitWriter};
use crate::crypto::aead::{Cipher, NonceBatch, OVERHEAD};
use crate::format::file_header::{FILE_HEADER_LEN, FILE_VERSION_LAST_MARK, FileHeader, block_aad};
use crate::format::offsets::{
    BLOCK_SIZE, CT_BLOCK_SIZE, MAX_FILE_SIZE, block_ct_offset, block_plain_len, block_range,
    ciphertext_size, plaintext_size,
};
use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Content errors.
#[derive(Debug)]
pub enum ContentError {
    /// Backing I/O failed.
    Io(std::io::Error),
    /// Block `n` failed authentication (tampered, swapped, or torn).
    BadBlock(u64),
    /// The file ends at block `n`, which was not sealed as a last block: the file was cut
    /// short (or a block from inside it put at its end).
    CutShort(u64),
    /// The file header is damaged.
    BadHeader(String),
    /// The requested size is beyond what kekfs can address.
    TooLarge,
}

impl std::fmt::Display for ContentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentError::Io(e) => write!(f, "I/O error: {e}"),
            ContentError::BadBlock(n) => write!(f, "corrupt block #{n} (authentication failed)"),
            ContentError::CutShort(n) => write!(
                f,
                "file cut short: it ends at block #{n}, which was not written as its last block"
            ),
            ContentError::BadHeader(m) => write!(f, "corrupt file header: {m}"),
            ContentError::TooLarge => f.write_str("file size out of range"),
        }
    }
}

impl From<std::io::Error> for ContentError {
    fn from(e: std::io::Error) -> Self {
        ContentError::Io(e)
    }
}

/// The per-file content cipher: DEK, volume id, file id and format version (the block AAD).
pub struct FileCipher {
    volume_id: [u8; 16],
    file_id: [u8; 16],
    /// Version 2 files mark their last block in its AAD (see `FileHeader`).
    marks_last: bool,
    cipher: Cipher,
}

impl std::fmt::Debug for FileCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileCipher({})", super::hex(&self.file_id))
    }
}

impl FileCipher {
    pub(crate) fn new(volume_id: [u8; 16], header: &FileHeader, cipher: Cipher) -> Self {
        Self {
            volume_id,
            file_id: header.file_id,
            marks_last: header.version >= FILE_VERSION_LAST_MARK,
            cipher,
        }
    }

    /// The file id this cipher serves.
    pub fn file_id(&self) -> &[u8; 16] {
        &self.file_id
    }

    fn aad(&self, block: u64, last: bool) -> crate::format::file_header::BlockAad {
        let mark = self.marks_last.then_some(last);
        block_aad(&self.volume_id, &self.file_id, block, mark)
    }

    /// Seal block `block`; `last`: it is the file's last block (marked in version 2 files).
    fn seal_block(&self, block: u64, last: bool, plain: &[u8], out: &mut [u8]) {
        self.seal_block_batch(&mut NonceBatch::new(1), block, last, plain, out);
    }

    fn seal_block_batch(
        &self,
        nonces: &mut NonceBatch,
        block: u64,
        last: bool,
        plain: &[u8],
        out: &mut [u8],
    ) {
        let aad = self.aad(block, last);
        self.cipher
            .seal_into_batch(nonces, aad.as_ref(), plain, out);
    }

    /// Open block `block`, which is the file's last block if `last`. In version 2 files the
    /// last block must carry the last-block mark and must not be a hole; any other block
    /// may carry the mark too (it had it while it was the last block, and a crash can come
    /// between an append and the reseal that clears it; see `write`).
    fn open_block(
        &self,
        block: u64,
        last: bool,
        sealed: &[u8],
        out: &mut [u8],
    ) -> Result<(), ContentError> {
        // An all-zero block is a hole left by truncate-extend or a sparse write.
        if sealed.iter().all(|&b| b == 0) {
            if last && self.marks_last {
                return Err(ContentError::CutShort(block));
            }
            out.fill(0);
            return Ok(());
        }
        if self
            .cipher
            .open_into(self.aad(block, last).as_ref(), sealed, out)
            .is_ok()
        {
            return Ok(());
        }
        if self.marks_last
            && self
                .cipher
                .open_into(self.aad(block, !last).as_ref(), sealed, out)
                .is_ok()
        {
            if !last {
                return Ok(());
            }
            out.fill(0);
            return Err(ContentError::CutShort(block));
        }
        Err(ContentError::BadBlock(block))
    }
}

/// Index of the last block of a file of plaintext size `size` (`None` when it is empty).
fn last_block(size: u64) -> Option<u64> {
    size.checked_sub(1).map(|s| s / BLOCK_SIZE)
}

/// Read the file header of a backing file; `None` for an empty file (no header yet).
pub fn read_file_header(file: &File) -> Result<Option<FileHeader>, ContentError> {
    let mut b = [0u8; FILE_HEADER_LEN];
    let n = read_full_at(file, &mut b, 0)?;
    if n == 0 {
        return Ok(None);
    }
    if n < FILE_HEADER_LEN {
        return Err(ContentError::BadHeader(format!("only {n} bytes")));
    }
    FileHeader::parse(&b)
        .map(Some)
        .map_err(|e| ContentError::BadHeader(e.0))
}

/// Write a fresh file header to an empty backing file.
pub fn write_file_header(file: &File, header: &FileHeader) -> Result<(), ContentError> {
    file.write_all_at(&header.to_bytes(), 0)?;
    Ok(())
}

/// Plaintext size of an open backing file.
pub fn size_of(file: &File) -> Result<u64, ContentError> {
    Ok(plaintext_size(file.metadata()?.len()))
}

fn read_full_at(file: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Largest request served from the per-thread ciphertext buffer; bigger ones allocate.
/// Also the largest buffer the write helper keeps (`split`).
pub(super) const BUF_MAX: usize = 4 << 20;

thread_local! {
    /// Per-thread ciphertext buffer, reused across requests (no allocation or zeroing on
    /// the hot path). It only ever holds ciphertext.
    static CT_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on a ciphertext buffer of exactly `n` bytes (contents unspecified).
fn with_ct_buf<R>(n: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    if n > BUF_MAX {
        return f(&mut vec![0u8; n]);
    }
    CT_BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => {
            if b.len() < n {
                b.resize(n, 0);
            }
            f(&mut b[..n])
        }
        // Re-entered on this thread: use a private buffer.
        Err(_) => f(&mut vec![0u8; n]),
    })
}

/// Read up to `len` plaintext bytes at `off`.
pub fn read(file: &File, fc: &FileCipher, off: u64, len: u32) -> Result<Vec<u8>, ContentError> {
    read_sized(file, fc, size_of(file)?, off, len as u64)
}

/// The whole plaintext of block `b` of a file of plaintext size `size`.
fn read_block(file: &File, fc: &FileCipher, size: u64, b: u64) -> Result<Vec<u8>, ContentError> {
    read_sized(
        file,
        fc,
        size,
        b * BLOCK_SIZE,
        block_plain_len(b, size) as u64,
    )
}

/// Read up to `len` plaintext bytes at `off` of a file whose plaintext size is `size`.
fn read_sized(
    file: &File,
    fc: &FileCipher,
    size: u64,
    off: u64,
    len: u64,
) -> Result<Vec<u8>, ContentError> {
    // Only what the file holds: callers may ask for more (`verify` reads whole files).
    let len = len.min(size.saturating_sub(off));
    let mut buf = vec![0u8; read_room(off, len).ok_or(ContentError::TooLarge)?];
    let n = read_sized_into(file, fc, size, off, len, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Bytes of buffer `read_into` needs for `len` bytes at `off`: the ciphertext of every
/// block the range touches plus one block of slack (see `read_sized_into`). `None` when
/// the range is beyond what kekfs addresses.
pub fn read_room(off: u64, len: u64) -> Option<usize> {
    let Some((first, last)) = block_range(off, len) else {
        return Some(0);
    };
    let blocks = last.checked_sub(first)?.checked_add(1)?;
    let room = blocks.checked_mul(CT_BLOCK_SIZE)?.checked_add(BLOCK_SIZE)?;
    usize::try_from(room).ok()
}

/// Read up to `len` plaintext bytes at `off` into the start of `buf`, which must have at
/// least `read_room(off, len)` bytes (its contents do not matter); returns how many.
/// The ciphertext is read into the same buffer, so the plaintext is not copied again.
pub fn read_into(
    file: &File,
    fc: &FileCipher,
    off: u64,
    len: u32,
    buf: &mut [u8],
) -> Result<usize, ContentError> {
    read_sized_into(file, fc, size_of(file)?, off, len as u64, buf)
}

/// `read_into` for a file whose plaintext size is `size`.
///
/// The ciphertext goes to the end of `buf` and each block is opened from there into its
/// place at the front. Block i of the range (counted from 0) starts at `s + i*CT_BLOCK_SIZE`
/// (`s` = `buf.len()` minus the ciphertext length, at least `BLOCK_SIZE`) and its
/// plaintext ends by `(i+1)*BLOCK_SIZE`, so a block's plaintext never reaches its own or a
/// later block's ciphertext.
fn read_sized_into(
    file: &File,
    fc: &FileCipher,
    size: u64,
    off: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<usize, ContentError> {
    if off >= size || len == 0 {
        return Ok(0);
    }
    let end = off + len.min(size - off);
    let Some((first, last)) = block_range(off, end - off) else {
        return Ok(0);
    };
    let room = read_room(off, end - off).ok_or(ContentError::TooLarge)?;
    if buf.len() < room {
        return Err(ContentError::Io(std::io::Error::other(format!(
            "read buffer of {} bytes, {room} needed",
            buf.len()
        ))));
    }
    let ct_start = block_ct_offset(first);
    let ct_len = (block_ct_offset(last) + block_plain_len(last, size) as u64 + OVERHEAD as u64
        - ct_start) as usize;
    let s = buf.len() - ct_len;
    let n = read_full_at(file, &mut buf[s..], ct_start)?;
    if n < ct_len {
        // Shrunk under us or truncated mid-block: that block cannot authenticate.
        return Err(ContentError::BadBlock(first + n as u64 / CT_BLOCK_SIZE));
    }
    let mut c = s;
    let mut tmp = [0u8; BLOCK_SIZE as usize];
    let file_last = last_block(size);
    for b in first..=last {
        let pl = block_plain_len(b, size);
        let bstart = b * BLOCK_SIZE;
        let from = off.max(bstart);
        let to = end.min(bstart + pl as u64);
        let (front, back) = buf.split_at_mut(c);
        let sealed = &back[..pl + OVERHEAD];
        c += pl + OVERHEAD;
        let dst = &mut front[(from - off) as usize..(to - off) as usize];
        let is_last = Some(b) == file_last;
        if from == bstart && to == bstart + pl as u64 {
            fc.open_block(b, is_last, sealed, dst)?;
        } else {
            fc.open_block(b, is_last, sealed, &mut tmp[..pl])?;
            dst.copy_from_slice(&tmp[(from - bstart) as usize..(to - bstart) as usize]);
        }
    }
    Ok((end - off) as usize)
}

/// Write `data` at plaintext offset `off`, extending the file as needed. Blocks the write
/// covers completely are sealed straight from `data`; partial first/last blocks are
/// merged with their old content; they all go out in one `pwrite`.
///
/// Version 2 files mark their last block. When a write extends the file past its old last
/// block, that block keeps its mark through the main `pwrite` (sealed with it again if the
/// write covers it), so that a crash inside the `pwrite` leaves a readable file; a second
/// `pwrite` then reseals it without the mark.
pub fn write(file: &File, fc: &FileCipher, off: u64, data: &[u8]) -> Result<(), ContentError> {
    write_inner(file, fc, None, off, data)
}

/// `write`, with a large write (`split::MIN_BLOCKS` blocks or more) in two halves when
/// `helper` is free: this thread seals the lower half, `helper`'s thread writes it while
/// this one seals the upper half, and this one writes the upper half once the lower one
/// is in place. The same ciphertext goes to the same offsets as with `write`, in that
/// order, so a failure or crash between the halves leaves what one `pwrite` cut short at
/// the middle would.
pub fn write_shared(
    file: &File,
    fc: &FileCipher,
    helper: &SplitWriter,
    off: u64,
    data: &[u8],
) -> Result<(), ContentError> {
    write_inner(file, fc, Some(helper), off, data)
}

fn write_inner(
    file: &File,
    fc: &FileCipher,
    helper: Option<&SplitWriter>,
    off: u64,
    data: &[u8],
) -> Result<(), ContentError> {
    let end = off
        .checked_add(data.len() as u64)
        .filter(|&e| e <= MAX_FILE_SIZE)
        .ok_or(ContentError::TooLarge)?;
    let Some((first, last)) = block_range(off, data.len() as u64) else {
        return Ok(());
    };
    let mut size = size_of(file)?;
    // The new plaintext of the old last block when this write un-marks it and already has
    // it in hand (padded below, or covered by the write); otherwise it is read back.
    let mut demoted: Option<Vec<u8>> = None;
    if off > size {
        if fc.marks_last {
            // The gap becomes holes; a partial last block before it is filled up to its
            // block end first (still marked as the last block).
            if let Some(l) = last_block(size)
                && (l + 1) * BLOCK_SIZE <= off
            {
                let full = (l + 1) * BLOCK_SIZE;
                demoted = pad_last_block(file, fc, size, full)?;
                size = full;
            }
        } else {
            // Grow first so the gap is a run of holes that read as zeros.
            truncate(file, fc, off)?;
            size = off;
        }
    }
    let new_size = size.max(end);
    let new_last = new_size.div_ceil(BLOCK_SIZE) - 1;
    // The old last block, when this write makes another block the last one.
    let demote = last_block(size).filter(|&l| fc.marks_last && l < new_last);
    let old_blocks = size.div_ceil(BLOCK_SIZE);
    // Old content of a partially written first/last block (None: covered or new).
    let partial_old = |b: u64| -> Result<Option<Vec<u8>>, ContentError> {
        let bstart = b * BLOCK_SIZE;
        let covered = off <= bstart && bstart + block_plain_len(b, new_size) as u64 <= end;
        if covered || b >= old_blocks {
            Ok(None)
        } else {
            read_block(file, fc, size, b).map(Some)
        }
    };
    let old_first = partial_old(first)?;
    let old_last = if last != first {
        partial_old(last)?
    } else {
        None
    };
    let nblocks = (last - first + 1) as usize;
    let base = block_ct_offset(first);
    let ct_end = block_ct_offset(last) + block_plain_len(last, new_size) as u64 + OVERHEAD as u64;
    // Seal blocks `lo..=hi` into `out` (exactly their ciphertext).
    let mut tmp = [0u8; BLOCK_SIZE as usize];
    let mut seal = |lo: u64, hi: u64, out: &mut [u8]| {
        let mut nonces = NonceBatch::new((hi - lo + 1) as usize);
        let mut c = 0usize;
        for b in lo..=hi {
            let pl = block_plain_len(b, new_size);
            let bstart = b * BLOCK_SIZE;
            let sealed = &mut out[c..c + pl + OVERHEAD];
            c += pl + OVERHEAD;
            let mark = b == new_last || Some(b) == demote;
            let block: &[u8] = if off <= bstart && bstart + pl as u64 <= end {
                let at = (bstart - off) as usize;
                &data[at..at + pl]
            } else {
                // Partial block: old content (or zeros), then this write's bytes over it.
                let block = &mut tmp[..pl];
                block.fill(0);
                let old = if b == first { &old_first } else { &old_last };
                if let Some(old) = old {
                    block[..old.len()].copy_from_slice(old);
                }
                let s = off.max(bstart);
                let e = end.min(bstart + pl as u64);
                block[(s - bstart) as usize..(e - bstart) as usize]
                    .copy_from_slice(&data[(s - off) as usize..(e - off) as usize]);
                block
            };
            fc.seal_block_batch(&mut nonces, b, mark, block, sealed);
            if Some(b) == demote {
                demoted = Some(block.to_vec());
            }
        }
    };
    let mid = first + nblocks as u64 / 2;
    if let Some(helper) = helper.filter(|_| nblocks >= split::MIN_BLOCKS)
        && let Some(mut buf) = helper.claim()
    {
        let up = block_ct_offset(mid);
        buf.resize((up - base) as usize, 0);
        seal(first, mid - 1, &mut buf);
        let pending = match helper.start(file, buf, base) {
            Ok(p) => Some(p),
            Err(buf) => {
                let r = file.write_all_at(&buf, base);
                helper.release(buf);
                r?;
                None
            }
        };
        with_ct_buf((ct_end - up) as usize, |ct| {
            seal(mid, last, ct);
            // The upper half goes out only after the lower one is in place.
            if let Some(p) = pending {
                p.wait()?;
            }
            file.write_all_at(ct, up)
        })?;
    } else {
        with_ct_buf((ct_end - base) as usize, |ct| {
            seal(first, last, ct);
            file.write_all_at(ct, base)
        })?;
    }
    if let Some(l) = demote {
        let plain = match demoted {
            Some(p) => p,
            None => read_block(file, fc, new_size, l)?,
        };
        put_block(file, fc, l, false, &plain)?;
    }
    Ok(())
}

/// Reseal a partial last block (of a file of size `size`) zero-padded to `new_size` (or to
/// its block end), still as the last block, so the old tail stays authentic when the file
/// grows. Returns the padded plaintext (`None`: the last block was whole, nothing done).
fn pad_last_block(
    file: &File,
    fc: &FileCipher,
    size: u64,
    new_size: u64,
) -> Result<Option<Vec<u8>>, ContentError> {
    let rem = size % BLOCK_SIZE;
    if rem == 0 {
        return Ok(None);
    }
    let b = size / BLOCK_SIZE;
    let mut plain = read_block(file, fc, size, b)?;
    let new_len = (new_size - b * BLOCK_SIZE).min(BLOCK_SIZE) as usize;
    plain.resize(new_len, 0);
    put_block(file, fc, b, true, &plain)?;
    Ok(Some(plain))
}

/// Seal `plain` as block `b` (marked as the last block if `last`) and write it.
fn put_block(
    file: &File,
    fc: &FileCipher,
    b: u64,
    last: bool,
    plain: &[u8],
) -> Result<(), ContentError> {
    let mut ct = vec![0u8; plain.len() + OVERHEAD];
    fc.seal_block(b, last, plain, &mut ct);
    file.write_all_at(&ct, block_ct_offset(b))?;
    Ok(())
}

/// Set the plaintext size to `new_size` (shrink or sparse-extend).
///
/// Version 2 files keep a real, marked last block: growing writes the new last block as
/// sealed zeros (everything between stays holes) before it reseals the old last block
/// without the mark; shrinking reseals the new last block with the mark before it cuts.
pub fn truncate(file: &File, fc: &FileCipher, new_size: u64) -> Result<(), ContentError> {
    if new_size > MAX_FILE_SIZE {
        return Err(ContentError::TooLarge);
    }
    let size = size_of(file)?;
    if new_size == size {
        return Ok(());
    }
    if new_size < size {
        // Reseal the new last block with its shortened plaintext (and the mark); version 1
        // files only need it when the new size ends inside a block.
        if let Some(nl) = last_block(new_size)
            && (fc.marks_last || !new_size.is_multiple_of(BLOCK_SIZE))
        {
            let mut plain = read_block(file, fc, size, nl)?;
            plain.truncate((new_size - nl * BLOCK_SIZE) as usize);
            put_block(file, fc, nl, true, &plain)?;
        }
        file.set_len(ciphertext_size(new_size))?;
        return Ok(());
    }
    if !fc.marks_last {
        pad_last_block(file, fc, size, new_size)?;
        file.set_len(ciphertext_size(new_size))?;
        return Ok(());
    }
    let nl = new_size.div_ceil(BLOCK_SIZE) - 1;
    let zeros = vec![0u8; (new_size - nl * BLOCK_SIZE) as usize];
    match last_block(size) {
        Some(l) if l == nl => pad_last_block(file, fc, size, new_size).map(drop),
        Some(l) => {
            let full = (l + 1) * BLOCK_SIZE;
            let padded = pad_last_block(file, fc, size, full)?;
            put_block(file, fc, nl, true, &zeros)?;
            let plain = match padded {
                Some(p) => p,
                None => read_block(file, fc, full, l)?,
            };
            put_block(file, fc, l, false, &plain)
        }
        None => put_block(file, fc, nl, true, &zeros),
    }
}

/// Make plaintext range `[off, off+len)` (clipped to the file size) read as zeros, punching
/// holes in the backing file for whole blocks (all-zero ciphertext reads as a hole).
pub fn zero_range(file: &File, fc: &FileCipher, off: u64, len: u64) -> Result<(), ContentError> {
    let size = size_of(file)?;
    let end = off.saturating_add(len).min(size);
    if off >= end {
        return Ok(());
    }
    let first_full = off.div_ceil(BLOCK_SIZE);
    let mut full_end = end / BLOCK_SIZE;
    if fc.marks_last
        && let Some(l) = last_block(size)
    {
        // The last block stays a real block (written as sealed zeros below), never a hole.
        full_end = full_end.min(l);
    }
    if first_full >= full_end {
        return write(file, fc, off, &vec![0u8; (end - off) as usize]);
    }
    if off < first_full * BLOCK_SIZE {
        write(
            file,
            fc,
            off,
            &vec![0u8; (first_full * BLOCK_SIZE - off) as usize],
        )?;
    }
    if full_end * BLOCK_SIZE < end {
        write(
            file,
            fc,
            full_end * BLOCK_SIZE,
            &vec![0u8; (end - full_end * BLOCK_SIZE) as usize],
        )?;
    }
    let (cs, ce) = (block_ct_offset(first_full), block_ct_offset(full_end));
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    if fallocate(file, mode, cs, ce - cs).is_err() {
        // No hole punching on this backing fs: write zero ciphertext, which reads as a hole.
        let zeros = vec![0u8; 1 << 20];
        let mut pos = cs;
        while pos < ce {
            let n = (ce - pos).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Reserve backing space for plaintext range `[off, off+len)`: the whole ciphertext of
/// every block the range touches, so that writes inside it do not fail for lack of space.
/// The backing file's size (which encodes the plaintext size) does not change; callers
/// extend the file separately. Fails as the backing filesystem does (`ENOSPC`, or
/// `EOPNOTSUPP` where it cannot reserve space).
pub fn reserve(file: &File, off: u64, len: u64) -> Result<(), ContentError> {
    off.checked_add(len)
        .filter(|&e| e <= MAX_FILE_SIZE)
        .ok_or(ContentError::TooLarge)?;
    let Some((first, last)) = block_range(off, len) else {
        return Ok(());
    };
    let (start, end) = (
        block_ct_offset(first),
        block_ct_offset(last) + CT_BLOCK_SIZE,
    );
    fallocate(file, libc::FALLOC_FL_KEEP_SIZE, start, end - start)?;
    Ok(())
}

/// fallocate(2) on a backing content file (offsets below `i64::MAX`: see `MAX_FILE_SIZE`).
fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate takes no pointers; the descriptor is valid for the call.
    match unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(file), mode, off, len) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Key32;

    fn setup() -> (tempfile::NamedTempFile, FileCipher) {
        setup_version(crate::format::file_header::FILE_VERSION)
    }

    fn setup_version(version: u16) -> (tempfile::NamedTempFile, FileCipher) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let h = FileHeader {
            version,
            ..FileHeader::new_random()
        };
        write_file_header(f.as_file(), &h).unwrap();
        let fc = FileCipher::new([1; 16], &h, Cipher::new(&Key32::from_bytes([2; 32])));
        (f, fc)
    }

    /// A reproducible stream of numbers below `m` (a 64-bit LCG) for the model checks.
    fn lcg(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |m| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        }
    }

    /// A model check: random writes/truncates/zeroed ranges against a Vec<u8>, for both
    /// file versions.
    #[test]
    fn random_ops_match_model() {
        for version in [1, 2] {
            random_ops_match_model_for(version);
        }
    }

    fn random_ops_match_model_for(version: u16) {
        let (f, fc) = setup_version(version);
        let file = f.as_file();
        let mut model: Vec<u8> = Vec::new();
        let mut rnd = lcg(42);
        for i in 0..600 {
            match rnd(5) {
                0 | 1 => {
                    let off = rnd(40_000);
                    let len = rnd(10_000) as usize;
                    let data: Vec<u8> = (0..len).map(|j| (i + j) as u8 | 1).collect();
                    write(file, &fc, off, &data).unwrap();
                    let end = off as usize + len;
                    if len > 0 && model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                2 => {
                    let ns = rnd(45_000);
                    truncate(file, &fc, ns).unwrap();
                    model.resize(ns as usize, 0);
                }
                3 => {
                    let off = rnd(45_000);
                    let len = rnd(20_000);
                    zero_range(file, &fc, off, len).unwrap();
                    let s = (off as usize).min(model.len());
                    let e = ((off + len) as usize).min(model.len());
                    model[s..e].fill(0);
                }
                _ => {
                    let off = rnd(45_000);
                    let len = rnd(20_000) as u32;
                    let got = read(file, &fc, off, len).unwrap();
                    let s = (off as usize).min(model.len());
                    let e = (off as usize + len as usize).min(model.len());
                    assert_eq!(got, &model[s..e], "op {i}, version {version}");
                }
            }
            assert_eq!(size_of(file).unwrap(), model.len() as u64);
            if version >= 2 && !model.is_empty() {
                // The whole file reads (its last block is marked and real).
                assert_eq!(read(file, &fc, 0, u32::MAX).unwrap(), model, "op {i}");
            }
        }
        let all = read(file, &fc, 0, u32::MAX).unwrap();
        assert_eq!(all, model);
    }

    /// A split writer with its helper thread running (no spinning).
    fn helper() -> SplitWriter {
        let (w, worker) = SplitWriter::new();
        std::thread::spawn(move || worker.run(std::time::Duration::ZERO));
        w
    }

    /// Large writes in two halves: random offsets and lengths (partial first and last
    /// blocks, writes past the end and over the old last block, truncates between)
    /// against a model, for both file versions; the helper did take part.
    #[test]
    fn split_writes_match_model() {
        for version in [1, 2] {
            let (f, fc) = setup_version(version);
            let file = f.as_file();
            let h = helper();
            let mut model: Vec<u8> = Vec::new();
            let mut rnd = lcg(7);
            for i in 0..80u64 {
                let off = if i % 4 == 0 {
                    rnd(64) * BLOCK_SIZE
                } else {
                    rnd(3 << 20)
                };
                let len = (split::MIN_BLOCKS as u64 - 2) * BLOCK_SIZE + rnd(1 << 20);
                let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8 | 1).collect();
                write_shared(file, &fc, &h, off, &data).unwrap();
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
                assert_eq!(size_of(file).unwrap(), model.len() as u64);
                assert_eq!(read(file, &fc, 0, u32::MAX).unwrap(), model, "op {i}");
                if i % 10 == 9 {
                    let ns = rnd(model.len() as u64);
                    truncate(file, &fc, ns).unwrap();
                    model.truncate(ns as usize);
                }
            }
            assert!(h.jobs() > 40, "the helper wrote {} halves", h.jobs());
        }
    }

    /// An extending write whose upper half holds the old last block: that block is
    /// resealed without the mark afterwards, and the whole file reads.
    #[test]
    fn split_write_over_the_old_last_block() {
        let (f, fc) = setup();
        let file = f.as_file();
        let h = helper();
        let old: Vec<u8> = (0..150 * BLOCK_SIZE as usize).map(|i| i as u8).collect();
        write(file, &fc, 0, &old).unwrap();
        let data = vec![0x5au8; 200 * BLOCK_SIZE as usize];
        write_shared(file, &fc, &h, 10 * BLOCK_SIZE, &data).unwrap();
        assert_eq!(h.jobs(), 1);
        let mut model = old[..10 * BLOCK_SIZE as usize].to_vec();
        model.extend_from_slice(&data);
        assert_eq!(read(file, &fc, 0, u32::MAX).unwrap(), model);
        // Block 149, the old last block, no longer carries the mark: cut there, the file
        // is refused as cut short.
        file.set_len(block_ct_offset(150)).unwrap();
        assert!(matches!(
            read(file, &fc, 0, u32::MAX),
            Err(ContentError::CutShort(149))
        ));
    }

    /// A failure or crash between the halves (the lower half written, the upper not)
    /// leaves what a single `pwrite` cut short there would: below the middle the new data,
    /// above it the old, and at most the new end block refused as cut short (version 2,
    /// when the write extends the file) — never bytes that were not written.
    #[test]
    fn split_write_lower_half_alone_reads() {
        let bs = BLOCK_SIZE as usize;
        // (old size, write offset, write length)
        let cases = [
            (100 * bs, 100 * bs, 256 * bs),      // append at a block boundary
            (100 * bs, 40 * bs + 7, 256 * bs),   // over old data and past the end
            (150 * bs + 100, 10 * bs, 200 * bs), // short old last block in the upper half
            (10 * bs + 5, 4 * bs, 200 * bs),     // short old last block in the lower half
            (300 * bs, 20 * bs, 128 * bs),       // inside the file
        ];
        for version in [1, 2] {
            for (k, &(old_size, off, len)) in cases.iter().enumerate() {
                let (f, fc) = setup_version(version);
                let file = f.as_file();
                let h = helper();
                let old: Vec<u8> = (0..old_size).map(|i| (i % 253) as u8 + 1).collect();
                write(file, &fc, 0, &old).unwrap();
                let before = all_bytes(file);
                let data: Vec<u8> = (0..len).map(|i| (i % 241) as u8 + 2).collect();
                write_shared(file, &fc, &h, off as u64, &data).unwrap();
                assert_eq!(h.jobs(), 1, "case {k}");
                let (first, last) = block_range(off as u64, len as u64).unwrap();
                let nblocks = last - first + 1;
                let mid = first + nblocks / 2;
                // The state right after the lower half: the old file plus that half.
                let lower = block_ct_offset(first) as usize..block_ct_offset(mid) as usize;
                let after = all_bytes(file);
                file.set_len(0).unwrap();
                file.write_all_at(&before, 0).unwrap();
                file.write_all_at(&after[lower.clone()], lower.start as u64)
                    .unwrap();
                let split_at = (mid * BLOCK_SIZE) as usize;
                let size = size_of(file).unwrap() as usize;
                assert_eq!(size, old_size.max(split_at), "case {k}, version {version}");
                let end_block = (size - 1) / bs;
                for b in 0..=end_block {
                    let want: Vec<u8> = (b * bs..((b + 1) * bs).min(size))
                        .map(|p| {
                            if p >= off && p < split_at {
                                data[p - off]
                            } else {
                                old[p]
                            }
                        })
                        .collect();
                    match read(file, &fc, (b * bs) as u64, bs as u32) {
                        Ok(got) => assert_eq!(got, want, "case {k}, version {version}, block {b}"),
                        Err(ContentError::CutShort(n)) => assert!(
                            version == 2 && n == b as u64 && b == end_block && size > old_size,
                            "case {k}: block {b} cut short"
                        ),
                        Err(e) => panic!("case {k}, version {version}, block {b}: {e}"),
                    }
                }
            }
        }
    }

    fn all_bytes(file: &File) -> Vec<u8> {
        let mut v = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut v, 0).unwrap();
        v
    }

    /// Every block of writes in two halves has its own nonce.
    #[test]
    fn split_writes_never_reuse_a_nonce() {
        let (f, fc) = setup();
        let file = f.as_file();
        let h = helper();
        let data = vec![1u8; 256 * BLOCK_SIZE as usize];
        let mut seen = std::collections::HashSet::new();
        for round in 0..6 {
            write_shared(file, &fc, &h, 0, &data).unwrap();
            write_shared(file, &fc, &h, 256 * BLOCK_SIZE, &data).unwrap();
            for b in 0..512 {
                let n = ct_block(file, b)[..crate::crypto::aead::NONCE_LEN].to_vec();
                assert!(seen.insert(n), "nonce of block {b} reused (round {round})");
            }
        }
        assert_eq!(h.jobs(), 12);
    }

    /// With the helper gone, or busy with another writer's half, writes go alone.
    #[test]
    fn split_writes_without_the_helper() {
        let (gone, worker) = SplitWriter::new();
        drop(worker);
        let (f, fc) = setup();
        let data: Vec<u8> = (0..300 * BLOCK_SIZE as usize)
            .map(|i| (i / 7) as u8)
            .collect();
        write_shared(f.as_file(), &fc, &gone, 100, &data).unwrap();
        write_shared(f.as_file(), &fc, &gone, 100, &data).unwrap();
        assert_eq!(gone.jobs(), 0);
        let mut model = vec![0u8; 100];
        model.extend_from_slice(&data);
        assert_eq!(read(f.as_file(), &fc, 0, u32::MAX).unwrap(), model);

        // Four writers sharing one helper: whoever finds it busy works alone.
        let h = std::sync::Arc::new(helper());
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let h = std::sync::Arc::clone(&h);
                std::thread::spawn(move || {
                    let (f, fc) = setup();
                    let data = vec![t + 1; 256 * BLOCK_SIZE as usize];
                    for k in 0..20u64 {
                        write_shared(f.as_file(), &fc, &h, k * 4096 * 7, &data).unwrap();
                    }
                    let got = read(f.as_file(), &fc, 19 * 4096 * 7, u32::MAX).unwrap();
                    assert_eq!(got, data);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(h.jobs() > 0);
    }

    #[test]
    fn tampering_is_detected() {
        let (f, fc) = setup();
        let file = f.as_file();
        write(file, &fc, 0, &vec![7u8; 3 * BLOCK_SIZE as usize]).unwrap();
        // Swap blocks 0 and 1.
        let mut b0 = vec![0u8; (BLOCK_SIZE as usize) + OVERHEAD];
        let mut b1 = b0.clone();
        file.read_exact_at(&mut b0, block_ct_offset(0)).unwrap();
        file.read_exact_at(&mut b1, block_ct_offset(1)).unwrap();
        file.write_all_at(&b1, block_ct_offset(0)).unwrap();
        file.write_all_at(&b0, block_ct_offset(1)).unwrap();
        assert!(matches!(
            read(file, &fc, 0, 10),
            Err(ContentError::BadBlock(0))
        ));
        assert!(matches!(
            read(file, &fc, 4096, 10),
            Err(ContentError::BadBlock(1))
        ));
        assert_eq!(read(file, &fc, 8192, 10).unwrap(), vec![7u8; 10]);
    }

    fn ct_block(file: &File, b: u64) -> Vec<u8> {
        let mut v = vec![0u8; CT_BLOCK as usize];
        file.read_exact_at(&mut v, block_ct_offset(b)).unwrap();
        v
    }

    const CT_BLOCK: u64 = crate::format::offsets::CT_BLOCK_SIZE;

    /// Version 2: a file cut at a block boundary, or ending in a hole, is refused at its
    /// end; a version 1 file is not (the limit version 2 lifts).
    #[test]
    fn cut_at_a_block_boundary_is_detected() {
        for version in [1u16, 2] {
            let (f, fc) = setup_version(version);
            let file = f.as_file();
            let data: Vec<u8> = (0..3 * BLOCK_SIZE as usize).map(|i| i as u8).collect();
            // Written as 3 separate appends: every block was the last one when written.
            for k in 0..3 {
                let r = k * BLOCK_SIZE as usize..(k + 1) * BLOCK_SIZE as usize;
                write(file, &fc, r.start as u64, &data[r]).unwrap();
            }
            assert_eq!(read(file, &fc, 0, u32::MAX).unwrap(), data);
            let full_len = file.metadata().unwrap().len();
            // Cut after block 1 (an attacker's truncate of the backing file).
            file.set_len(block_ct_offset(2)).unwrap();
            let r = read(file, &fc, 0, u32::MAX);
            if version == 1 {
                assert_eq!(r.unwrap(), &data[..2 * BLOCK_SIZE as usize]);
            } else {
                assert!(matches!(r, Err(ContentError::CutShort(1))), "{r:?}");
                // Blocks before the end still read.
                assert_eq!(read(file, &fc, 0, 100).unwrap(), &data[..100]);
            }
            // Extended with an all-zero block (a hole) instead.
            file.set_len(full_len).unwrap();
            let r = read(file, &fc, 2 * BLOCK_SIZE, 10);
            if version == 1 {
                assert_eq!(r.unwrap(), vec![0u8; 10]);
            } else {
                assert!(matches!(r, Err(ContentError::CutShort(2))), "{r:?}");
            }
        }
    }

    /// Version 2: the window between an append's data and the reseal of the old last block
    /// (a crash there) leaves a readable file; so does a shrink cut short before its cut.
    #[test]
    fn crash_windows_leave_readable_files() {
        let (f, fc) = setup();
        let file = f.as_file();
        let data: Vec<u8> = (0..3 * BLOCK_SIZE as usize)
            .map(|i| (i * 7) as u8)
            .collect();
        write(file, &fc, 0, &data[..2 * BLOCK_SIZE as usize]).unwrap();
        let marked = ct_block(file, 1);
        write(file, &fc, 2 * BLOCK_SIZE, &data[2 * BLOCK_SIZE as usize..]).unwrap();
        assert_ne!(ct_block(file, 1), marked, "the old last block was resealed");
        // Before the reseal: block 1 still carries the mark.
        file.write_all_at(&marked, block_ct_offset(1)).unwrap();
        assert_eq!(read(file, &fc, 0, u32::MAX).unwrap(), data);
        // A shrink to 2 blocks that stopped after resealing block 1 as the last block.
        let third = ct_block(file, 2);
        truncate(file, &fc, 2 * BLOCK_SIZE).unwrap();
        file.write_all_at(&third, block_ct_offset(2)).unwrap();
        assert_eq!(read(file, &fc, 0, u32::MAX).unwrap(), data);
    }

    #[test]
    fn zero_range_reads_zeros() {
        let (f, fc) = setup();
        let file = f.as_file();
        let data: Vec<u8> = (0..5 * BLOCK_SIZE as usize + 100)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        write(file, &fc, 0, &data).unwrap();
        let mut model = data.clone();
        for (o, l) in [
            (10u64, 20u64),
            (4000, 9000),
            (3 * 4096, 4096),
            (5 * 4096, 1000),
        ] {
            zero_range(file, &fc, o, l).unwrap();
            let e = ((o + l) as usize).min(model.len());
            model[o as usize..e].fill(0);
            assert_eq!(read(file, &fc, 0, u32::MAX).unwrap(), model);
        }
        assert_eq!(size_of(file).unwrap(), data.len() as u64);
    }

    #[test]
    fn sparse_past_4gib() {
        let (f, fc) = setup();
        let file = f.as_file();
        let off = 5u64 << 30;
        write(file, &fc, off, b"tail").unwrap();
        assert_eq!(size_of(file).unwrap(), off + 4);
        assert_eq!(read(file, &fc, off, 100).unwrap(), b"tail");
        assert_eq!(read(file, &fc, 1 << 30, 8).unwrap(), vec![0u8; 8]);
        assert!(file.metadata().unwrap().len() > off);
        assert!(truncate(file, &fc, MAX_FILE_SIZE + 1).is_err());
    }
}
