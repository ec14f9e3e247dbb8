//! The on-disk format (docs/FORMAT.md): byte layouts of the volume header, file headers,
//! content blocks and encoded names. Pure functions over bytes; no keys are held here.

pub mod file_header;
pub mod names;
pub mod offsets;
pub mod volume_header;

/// Name of the volume header file in the backing root.
pub const VOLUME_HEADER_FILE: &str = "kekfs.volume";
/// Name of the per-directory id file in every backing directory.
pub const DIRID_FILE: &str = "kekfs.dirid";
/// Lock file serialising volume header rewrites (rewrap by the CLI or a mount daemon).
pub const HEADER_LOCK_FILE: &str = "kekfs.hdrlock";
/// Name of the lock file the mount daemon holds in the backing root.
pub const LOCK_FILE: &str = "kekfs.lock";
/// Prefix of every name kekfs reserves in the backing tree (never a valid encoded name).
pub const RESERVED_PREFIX: &str = "kekfs.";
/// Length of a directory id.
pub const DIRID_LEN: usize = 16;

/// A format-level parse error: the bytes are not what the format allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for FormatError {}

/// Parse a directory id file's contents.
pub fn parse_dirid(bytes: &[u8]) -> Result<[u8; DIRID_LEN], FormatError> {
    bytes.try_into().map_err(|_| {
        FormatError(format!(
            "directory id file has {} bytes, expected {DIRID_LEN}",
            bytes.len()
        ))
    })
}

/// Little-endian cursor over untrusted bytes: every read is bounds-checked.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }
    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| FormatError(format!("truncated: {what} runs past the end")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FormatError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
}
