//! Encrypted file content on a backing file: read, write and truncate plaintext ranges as
//! sealed 4 KiB blocks. Callers serialise writers per file; readers may run concurrently.

use crate::crypto::aead::{Cipher, NonceBatch, OVERHEAD};
use crate::format::file_header::{FILE_HEADER_LEN, FileHeader, block_aad};
use crate::format::offsets::{
    BLOCK_SIZE, MAX_FILE_SIZE, block_ct_offset, block_plain_len, block_range, ciphertext_size,
    plaintext_size,
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

/// The per-file content cipher: DEK, volume id and file id (the block AAD).
pub struct FileCipher {
    volume_id: [u8; 16],
    file_id: [u8; 16],
    cipher: Cipher,
}

impl std::fmt::Debug for FileCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileCipher({})", super::hex(&self.file_id))
    }
}

impl FileCipher {
    pub(crate) fn new(volume_id: [u8; 16], file_id: [u8; 16], cipher: Cipher) -> Self {
        Self {
            volume_id,
            file_id,
            cipher,
        }
    }

    /// The file id this cipher serves.
    pub fn file_id(&self) -> &[u8; 16] {
        &self.file_id
    }

    fn seal_block(&self, block: u64, plain: &[u8], out: &mut [u8]) {
        self.seal_block_batch(&mut NonceBatch::new(1), block, plain, out);
    }

    fn seal_block_batch(&self, nonces: &mut NonceBatch, block: u64, plain: &[u8], out: &mut [u8]) {
        let aad = block_aad(&self.volume_id, &self.file_id, block);
        self.cipher.seal_into_batch(nonces, &aad, plain, out);
    }

    fn open_block(&self, block: u64, sealed: &[u8], out: &mut [u8]) -> Result<(), ContentError> {
        // An all-zero block is a hole left by truncate-extend or a sparse write.
        if sealed.iter().all(|&b| b == 0) {
            out.fill(0);
            return Ok(());
        }
        let aad = block_aad(&self.volume_id, &self.file_id, block);
        self.cipher
            .open_into(&aad, sealed, out)
            .map_err(|_| ContentError::BadBlock(block))
    }
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
const BUF_MAX: usize = 4 << 20;

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
    if off >= size || len == 0 {
        return Ok(Vec::new());
    }
    let end = off + len.min(size - off);
    let Some((first, last)) = block_range(off, end - off) else {
        return Ok(Vec::new());
    };
    let ct_start = block_ct_offset(first);
    let ct_len = (block_ct_offset(last) + block_plain_len(last, size) as u64 + OVERHEAD as u64
        - ct_start) as usize;
    let mut out = vec![0u8; (end - off) as usize];
    with_ct_buf(ct_len, |ct| {
        let n = read_full_at(file, ct, ct_start)?;
        if n < ct_len {
            // Shrunk under us or truncated mid-block: that block cannot authenticate.
            return Err(ContentError::BadBlock(
                first + n as u64 / crate::format::offsets::CT_BLOCK_SIZE,
            ));
        }
        let mut c = 0usize;
        let mut tmp = [0u8; BLOCK_SIZE as usize];
        for b in first..=last {
            let pl = block_plain_len(b, size);
            let sealed = &ct[c..c + pl + OVERHEAD];
            c += pl + OVERHEAD;
            let bstart = b * BLOCK_SIZE;
            let s = off.max(bstart);
            let e = end.min(bstart + pl as u64);
            let dst = &mut out[(s - off) as usize..(e - off) as usize];
            if s == bstart && e == bstart + pl as u64 {
                fc.open_block(b, sealed, dst)?;
            } else {
                fc.open_block(b, sealed, &mut tmp[..pl])?;
                dst.copy_from_slice(&tmp[(s - bstart) as usize..(e - bstart) as usize]);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Write `data` at plaintext offset `off`, extending the file as needed. Blocks the write
/// covers completely are sealed straight from `data`; partial first/last blocks are
/// merged with their old content; everything goes out in one `pwrite`.
pub fn write(file: &File, fc: &FileCipher, off: u64, data: &[u8]) -> Result<(), ContentError> {
    let end = off
        .checked_add(data.len() as u64)
        .filter(|&e| e <= MAX_FILE_SIZE)
        .ok_or(ContentError::TooLarge)?;
    let Some((first, last)) = block_range(off, data.len() as u64) else {
        return Ok(());
    };
    let mut size = size_of(file)?;
    if off > size {
        // Grow first so the gap is a run of holes that read as zeros.
        truncate(file, fc, off)?;
        size = off;
    }
    let new_size = size.max(end);
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
    let ct_len = (block_ct_offset(last) + block_plain_len(last, new_size) as u64 + OVERHEAD as u64
        - block_ct_offset(first)) as usize;
    let mut nonces = NonceBatch::new(nblocks);
    with_ct_buf(ct_len, |ct| {
        let mut c = 0usize;
        let mut tmp = [0u8; BLOCK_SIZE as usize];
        for b in first..=last {
            let pl = block_plain_len(b, new_size);
            let bstart = b * BLOCK_SIZE;
            let out = &mut ct[c..c + pl + OVERHEAD];
            c += pl + OVERHEAD;
            if off <= bstart && bstart + pl as u64 <= end {
                let at = (bstart - off) as usize;
                fc.seal_block_batch(&mut nonces, b, &data[at..at + pl], out);
                continue;
            }
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
            fc.seal_block_batch(&mut nonces, b, block, out);
        }
        file.write_all_at(ct, block_ct_offset(first))
    })?;
    Ok(())
}

/// When growing a file from `size` to at least `new_size`, reseal a partial last block
/// with zeros up to the new size (or the block end), so the old tail stays authentic.
fn pad_last_block(
    file: &File,
    fc: &FileCipher,
    size: u64,
    new_size: u64,
) -> Result<(), ContentError> {
    let rem = size % BLOCK_SIZE;
    if rem == 0 {
        return Ok(());
    }
    let b = size / BLOCK_SIZE;
    let mut plain = read_block(file, fc, size, b)?;
    let new_len = (new_size - b * BLOCK_SIZE).min(BLOCK_SIZE) as usize;
    plain.resize(new_len, 0);
    let mut ct = vec![0u8; new_len + OVERHEAD];
    fc.seal_block(b, &plain, &mut ct);
    file.write_all_at(&ct, block_ct_offset(b))?;
    Ok(())
}

/// Set the plaintext size to `new_size` (shrink or sparse-extend).
pub fn truncate(file: &File, fc: &FileCipher, new_size: u64) -> Result<(), ContentError> {
    if new_size > MAX_FILE_SIZE {
        return Err(ContentError::TooLarge);
    }
    let size = size_of(file)?;
    if new_size == size {
        return Ok(());
    }
    if new_size > size {
        pad_last_block(file, fc, size, new_size)?;
    } else if !new_size.is_multiple_of(BLOCK_SIZE) {
        // Reseal the new last block with its shortened plaintext.
        let b = new_size / BLOCK_SIZE;
        let mut plain = read_block(file, fc, size, b)?;
        let keep = (new_size % BLOCK_SIZE) as usize;
        plain.truncate(keep);
        let mut ct = vec![0u8; keep + OVERHEAD];
        fc.seal_block(b, &plain, &mut ct);
        file.write_all_at(&ct, block_ct_offset(b))?;
    }
    file.set_len(ciphertext_size(new_size))?;
    Ok(())
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
    let full_end = end / BLOCK_SIZE;
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
    // SAFETY: fallocate on a valid descriptor with in-range offsets.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(file),
            mode,
            cs as i64,
            (ce - cs) as i64,
        )
    };
    if r != 0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Key32;

    fn setup() -> (tempfile::NamedTempFile, FileCipher) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let h = FileHeader::new_random();
        write_file_header(f.as_file(), &h).unwrap();
        let fc = FileCipher::new([1; 16], h.file_id, Cipher::new(&Key32::from_bytes([2; 32])));
        (f, fc)
    }

    /// A model check: random writes/truncates against a Vec<u8>.
    #[test]
    fn random_ops_match_model() {
        let (f, fc) = setup();
        let file = f.as_file();
        let mut model: Vec<u8> = Vec::new();
        let mut seed = 42u64;
        let mut rnd = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for i in 0..400 {
            match rnd(4) {
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
                _ => {
                    let off = rnd(45_000);
                    let len = rnd(20_000) as u32;
                    let got = read(file, &fc, off, len).unwrap();
                    let s = (off as usize).min(model.len());
                    let e = (off as usize + len as usize).min(model.len());
                    assert_eq!(got, &model[s..e], "op {i}");
                }
            }
            assert_eq!(size_of(file).unwrap(), model.len() as u64);
        }
        let all = read(file, &fc, 0, u32::MAX).unwrap();
        assert_eq!(all, model);
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
