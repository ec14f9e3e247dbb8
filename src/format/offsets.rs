//! All plaintext ↔ ciphertext offset arithmetic for file content.
//!
//! A content file is a `FILE_HEADER_LEN`-byte header followed by blocks; block `i` holds
//! plaintext bytes `[i*BLOCK_SIZE, (i+1)*BLOCK_SIZE)` sealed as nonce ‖ ciphertext ‖ tag.
//! Only the last block may be shorter.

use super::file_header::FILE_HEADER_LEN;
use crate::crypto::aead::OVERHEAD;

/// Plaintext bytes per block.
pub const BLOCK_SIZE: u64 = 4096;
/// Ciphertext bytes of a full block.
pub const CT_BLOCK_SIZE: u64 = BLOCK_SIZE + OVERHEAD as u64;
/// Largest plaintext size kekfs serves (keeps every offset below i64::MAX).
pub const MAX_FILE_SIZE: u64 = (i64::MAX as u64 / CT_BLOCK_SIZE) * BLOCK_SIZE;

/// Byte offset in the content file where block `block` starts.
pub fn block_ct_offset(block: u64) -> u64 {
    FILE_HEADER_LEN as u64 + block * CT_BLOCK_SIZE
}

/// Block index holding plaintext offset `off`.
pub fn block_of(off: u64) -> u64 {
    off / BLOCK_SIZE
}

/// Plaintext size of a content file of `ct_len` bytes. A file shorter than a header has
/// no content yet; a trailing fragment too short to be a sealed block carries no
/// plaintext (it can only come from a torn or tampered write) and is ignored.
pub fn plaintext_size(ct_len: u64) -> u64 {
    if ct_len <= FILE_HEADER_LEN as u64 {
        return 0;
    }
    let body = ct_len - FILE_HEADER_LEN as u64;
    let full = body / CT_BLOCK_SIZE;
    let rem = body % CT_BLOCK_SIZE;
    full * BLOCK_SIZE + rem.saturating_sub(OVERHEAD as u64)
}

/// Content file size for a plaintext of `size` bytes (header included, even when empty).
pub fn ciphertext_size(size: u64) -> u64 {
    let full = size / BLOCK_SIZE;
    let rem = size % BLOCK_SIZE;
    let tail = if rem > 0 { rem + OVERHEAD as u64 } else { 0 };
    FILE_HEADER_LEN as u64 + full * CT_BLOCK_SIZE + tail
}

/// Plaintext length of block `block` in a file of plaintext size `size` (0 if past EOF).
pub fn block_plain_len(block: u64, size: u64) -> usize {
    let start = block * BLOCK_SIZE;
    if start >= size {
        0
    } else {
        (size - start).min(BLOCK_SIZE) as usize
    }
}

/// The blocks covering plaintext range `[off, off+len)`, as `(first, last_inclusive)`;
/// `None` for an empty range.
pub fn block_range(off: u64, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    Some((block_of(off), block_of(off + len - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_roundtrip_for_every_size_up_to_10000_and_around_block_edges() {
        let mut sizes: Vec<u64> = (0..10_000).collect();
        for b in [1u64, 1000, 1 << 20, (5u64 << 30) / BLOCK_SIZE] {
            for d in 0..3 {
                sizes.push(b * BLOCK_SIZE - d);
                sizes.push(b * BLOCK_SIZE + d);
            }
        }
        for s in sizes {
            let ct = ciphertext_size(s);
            assert_eq!(plaintext_size(ct), s, "size {s}");
            // Blocks sum up to the size.
            let blocks = s.div_ceil(BLOCK_SIZE);
            let sum: u64 = (0..blocks).map(|b| block_plain_len(b, s) as u64).sum();
            assert_eq!(sum, s);
            if blocks > 0 {
                let last = blocks - 1;
                assert_eq!(
                    block_ct_offset(last) + block_plain_len(last, s) as u64 + OVERHEAD as u64,
                    ct
                );
            }
        }
    }

    #[test]
    fn torn_tail_carries_no_plaintext() {
        let h = FILE_HEADER_LEN as u64;
        assert_eq!(plaintext_size(0), 0);
        assert_eq!(plaintext_size(h - 1), 0);
        assert_eq!(plaintext_size(h + 5), 0);
        assert_eq!(plaintext_size(h + OVERHEAD as u64 + 1), 1);
        assert_eq!(plaintext_size(h + CT_BLOCK_SIZE + 3), BLOCK_SIZE);
    }

    #[test]
    fn block_ranges() {
        assert_eq!(block_range(0, 0), None);
        assert_eq!(block_range(0, 1), Some((0, 0)));
        assert_eq!(block_range(4095, 2), Some((0, 1)));
        assert_eq!(block_range(4096, 4096), Some((1, 1)));
        assert_eq!(
            block_range(5 << 30, 1),
            Some(((5 << 30) / 4096, (5 << 30) / 4096))
        );
        const { assert!(MAX_FILE_SIZE > 1 << 50) };
        assert!(ciphertext_size(MAX_FILE_SIZE) <= i64::MAX as u64);
    }
}
