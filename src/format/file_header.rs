//! The 24-byte header at the start of every content file: magic, version, file id.

use super::FormatError;

/// Magic bytes of a content file header.
pub const FILE_MAGIC: &[u8; 4] = b"kekF";
/// Current file header version.
pub const FILE_VERSION: u16 = 1;
/// Length of the file id.
pub const FILE_ID_LEN: usize = 16;
/// Length of the file header.
pub const FILE_HEADER_LEN: usize = 4 + 2 + 2 + FILE_ID_LEN;

/// A parsed file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Random id binding every block of the file (block AAD) and deriving its DEK.
    pub file_id: [u8; FILE_ID_LEN],
}

impl FileHeader {
    /// A header with a fresh random file id.
    pub fn new_random() -> Self {
        Self {
            file_id: crate::crypto::random_array(),
        }
    }

    /// Serialize.
    pub fn to_bytes(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..4].copy_from_slice(FILE_MAGIC);
        b[4..6].copy_from_slice(&FILE_VERSION.to_le_bytes());
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
        if version != FILE_VERSION {
            return Err(FormatError(format!(
                "unknown file header version {version}"
            )));
        }
        let flags = r.u16("file header flags")?;
        if flags != 0 {
            return Err(FormatError(format!("unknown file header flags {flags:#x}")));
        }
        let file_id = r.array::<FILE_ID_LEN>("file id")?;
        Ok(Self { file_id })
    }
}

/// Associated data of block `block` of a file: volume id ‖ file id ‖ block index (u64 LE).
pub fn block_aad(volume_id: &[u8; 16], file_id: &[u8; FILE_ID_LEN], block: u64) -> [u8; 40] {
    let mut a = [0u8; 40];
    a[..16].copy_from_slice(volume_id);
    a[16..32].copy_from_slice(file_id);
    a[32..].copy_from_slice(&block.to_le_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let h = FileHeader::new_random();
        let b = h.to_bytes();
        assert_eq!(FileHeader::parse(&b).unwrap(), h);
        for n in 0..FILE_HEADER_LEN {
            assert!(FileHeader::parse(&b[..n]).is_err());
        }
        let mut bad = b;
        bad[0] ^= 1;
        assert!(FileHeader::parse(&bad).is_err());
        let mut bad = b;
        bad[4] = 9;
        assert!(FileHeader::parse(&bad).is_err());
        let mut bad = b;
        bad[6] = 1;
        assert!(FileHeader::parse(&bad).is_err());
    }

    #[test]
    fn aad_layout() {
        let a = block_aad(&[1; 16], &[2; 16], 0x0102);
        assert_eq!(&a[..16], &[1; 16]);
        assert_eq!(&a[16..32], &[2; 16]);
        assert_eq!(&a[32..], &0x0102u64.to_le_bytes());
    }
}
