//! The 24-byte header at the start of every content file (magic, version, file id), and
//! the associated data each block of the file is sealed with.

use super::FormatError;

/// Magic bytes of a content file header.
pub const FILE_MAGIC: &[u8; 4] = b"kekF";
/// The version new files are written with: 2, whose blocks carry a last-block mark in
/// their associated data (see `block_aad`). Version 1 files (without the mark) are still
/// read and written as version 1.
pub const FILE_VERSION: u16 = 2;
/// The first version whose blocks carry the last-block mark.
pub const FILE_VERSION_LAST_MARK: u16 = 2;
/// Length of the file id.
pub const FILE_ID_LEN: usize = 16;
/// Length of the file header.
pub const FILE_HEADER_LEN: usize = 4 + 2 + 2 + FILE_ID_LEN;

/// A parsed file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Format version of this file (1 or 2).
    pub version: u16,
    /// Random id binding every block of the file (block AAD) and deriving its DEK.
    pub file_id: [u8; FILE_ID_LEN],
}

impl FileHeader {
    /// A header of the current version with a fresh random file id.
    pub fn new_random() -> Self {
        Self {
            version: FILE_VERSION,
            file_id: crate::crypto::random_array(),
        }
    }

    /// Serialize.
    pub fn to_bytes(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..4].copy_from_slice(FILE_MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        // b[6..8]: reserved flags, zero.
        b[8..].copy_from_slice(&self.file_id);
        b
    }

    /// Parse; refuses wrong magic, unknown version or non-zero reserved flags.
    pub fn parse(b: &[u8]) -> Result<Self, FormatError> {
        let mut r = super::Reader::new(b);
        let magic = r.array::<4>("file header magic")?;
        if &magic != FILE_MAGIC {
            return Err(FormatError("bad file header magic".into()));
        }
        let version = r.u16("file header version")?;
        if !(1..=FILE_VERSION).contains(&version) {
            return Err(FormatError(format!(
                "unknown file header version {version}"
            )));
        }
        let flags = r.u16("file header flags")?;
        if flags != 0 {
            return Err(FormatError(format!("unknown file header flags {flags:#x}")));
        }
        let file_id = r.array::<FILE_ID_LEN>("file id")?;
        Ok(Self { version, file_id })
    }
}

/// Associated data of one block: volume id ‖ file id ‖ block index (u64 LE), 40 bytes; in
/// version 2 files one more byte, 1 if the block was sealed as the file's last block and 0
/// if not (`last = Some(..)`; `None` for version 1).
#[derive(Debug, Clone, Copy)]
pub struct BlockAad {
    bytes: [u8; 41],
    len: usize,
}

impl AsRef<[u8]> for BlockAad {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The associated data of block `block` (see `BlockAad`).
pub fn block_aad(
    volume_id: &[u8; 16],
    file_id: &[u8; FILE_ID_LEN],
    block: u64,
    last: Option<bool>,
) -> BlockAad {
    let mut bytes = [0u8; 41];
    bytes[..16].copy_from_slice(volume_id);
    bytes[16..32].copy_from_slice(file_id);
    bytes[32..40].copy_from_slice(&block.to_le_bytes());
    let len = match last {
        None => 40,
        Some(l) => {
            bytes[40] = u8::from(l);
            41
        }
    };
    BlockAad { bytes, len }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let h = FileHeader::new_random();
        assert_eq!(h.version, 2);
        let b = h.to_bytes();
        assert_eq!(&b[4..6], &[2, 0]);
        assert_eq!(FileHeader::parse(&b).unwrap(), h);
        let v1 = FileHeader { version: 1, ..h };
        assert_eq!(FileHeader::parse(&v1.to_bytes()).unwrap(), v1);
        for n in 0..FILE_HEADER_LEN {
            assert!(FileHeader::parse(&b[..n]).is_err());
        }
        let mut bad = b;
        bad[0] ^= 1;
        assert!(FileHeader::parse(&bad).is_err());
        for v in [0u8, 3, 9] {
            let mut bad = b;
            bad[4] = v;
            assert!(FileHeader::parse(&bad).is_err(), "version {v}");
        }
        let mut bad = b;
        bad[6] = 1;
        assert!(FileHeader::parse(&bad).is_err());
    }

    #[test]
    fn aad_layout() {
        let a = block_aad(&[1; 16], &[2; 16], 0x0102, None);
        let a = a.as_ref();
        assert_eq!(a.len(), 40);
        assert_eq!(&a[..16], &[1; 16]);
        assert_eq!(&a[16..32], &[2; 16]);
        assert_eq!(&a[32..], &0x0102u64.to_le_bytes());
        let inner = block_aad(&[1; 16], &[2; 16], 0x0102, Some(false));
        let last = block_aad(&[1; 16], &[2; 16], 0x0102, Some(true));
        assert_eq!(&inner.as_ref()[..40], a);
        assert_eq!(inner.as_ref()[40..], [0]);
        assert_eq!(last.as_ref()[40..], [1]);
    }
}
