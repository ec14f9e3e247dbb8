//! Encoding of encrypted names for the backing filesystem: unpadded base64url, and a
//! hashed "long name" form with a sidecar file when the encoding exceeds `NAME_MAX`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Longest plaintext name (bytes), as on Linux filesystems.
pub const MAX_PLAIN_NAME: usize = 255;
/// Longest backing name kekfs creates directly; longer encodings use the long form.
pub const MAX_BACKING_NAME: usize = 255;
/// Prefix of long-name entries: `kekfs.L.<base64url(sha256(encoded name))>`.
pub const LONG_PREFIX: &str = "kekfs.L.";
/// Suffix of the sidecar file holding a long entry's full encoded name.
pub const LONG_SIDECAR_SUFFIX: &str = ".n";

/// Where an encrypted name lives in the backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingName {
    /// The encoded name is the backing name.
    Short(String),
    /// The entry is `hashed`; the sidecar `hashed + ".n"` holds `full`.
    Long {
        /// The backing entry name.
        hashed: String,
        /// The full encoded name (sidecar content).
        full: String,
    },
}

impl BackingName {
    /// The name of the entry itself in the backing directory.
    pub fn entry(&self) -> &str {
        match self {
            BackingName::Short(s) => s,
            BackingName::Long { hashed, .. } => hashed,
        }
    }

    /// The sidecar file name, for long names.
    pub fn sidecar(&self) -> Option<String> {
        match self {
            BackingName::Short(_) => None,
            BackingName::Long { hashed, .. } => Some(format!("{hashed}{LONG_SIDECAR_SUFFIX}")),
        }
    }
}

/// Encode a name ciphertext for the backing directory.
pub fn encode(ciphertext: &[u8]) -> BackingName {
    let full = URL_SAFE_NO_PAD.encode(ciphertext);
    if full.len() <= MAX_BACKING_NAME {
        BackingName::Short(full)
    } else {
        let hash = URL_SAFE_NO_PAD.encode(Sha256::digest(full.as_bytes()));
        BackingName::Long {
            hashed: format!("{LONG_PREFIX}{hash}"),
            full,
        }
    }
}

/// What a name found in a backing directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A short entry: the decoded ciphertext.
    Short(Vec<u8>),
    /// A long entry: read its sidecar to get the encoded name.
    Long,
    /// A kekfs-internal file (volume header, dir id, sidecar, temp) or foreign junk.
    Internal,
}

/// Classify a backing directory entry name.
pub fn classify(name: &[u8]) -> Found {
    let Ok(s) = std::str::from_utf8(name) else {
        return Found::Internal;
    };
    if let Some(rest) = s.strip_prefix(LONG_PREFIX) {
        if rest.len() == 43 && !rest.contains('.') {
            return Found::Long;
        }
        return Found::Internal;
    }
    if s.starts_with(super::RESERVED_PREFIX) {
        return Found::Internal;
    }
    match URL_SAFE_NO_PAD.decode(s) {
        Ok(ct) => Found::Short(ct),
        Err(_) => Found::Internal,
    }
}

/// Decode a long entry's sidecar content, checking that it hashes to the entry's name.
pub fn decode_long(entry: &str, sidecar: &[u8]) -> Option<Vec<u8>> {
    let full = std::str::from_utf8(sidecar).ok()?.trim_end_matches('\n');
    match encode(&URL_SAFE_NO_PAD.decode(full).ok()?) {
        BackingName::Long { hashed, .. } if hashed == entry => URL_SAFE_NO_PAD.decode(full).ok(),
        _ => None,
    }
}

/// Base64url helpers for other on-disk strings (symlink targets, xattr names).
pub fn b64_encode(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// Decode unpadded base64url.
pub fn b64_decode(s: &[u8]) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long() {
        let ct = vec![7u8; 16 + 10];
        let n = encode(&ct);
        assert!(matches!(n, BackingName::Short(_)));
        assert_eq!(classify(n.entry().as_bytes()), Found::Short(ct));
        let long = vec![9u8; 16 + 255];
        let n = encode(&long);
        let BackingName::Long { hashed, full } = &n else {
            panic!("expected long")
        };
        assert!(hashed.len() <= MAX_BACKING_NAME);
        assert_eq!(classify(hashed.as_bytes()), Found::Long);
        assert_eq!(decode_long(hashed, full.as_bytes()).unwrap(), long);
        // A sidecar that does not match its entry is refused.
        let other = encode(&vec![8u8; 16 + 255]);
        assert!(decode_long(hashed, other.sidecar().unwrap().as_bytes()).is_none());
        if let BackingName::Long { full, .. } = other {
            assert!(decode_long(hashed, full.as_bytes()).is_none());
        }
        assert_eq!(n.sidecar().unwrap(), format!("{hashed}.n"));
        assert_eq!(classify(format!("{hashed}.n").as_bytes()), Found::Internal);
    }

    #[test]
    fn internal_names() {
        for n in [
            "kekfs.volume",
            "kekfs.dirid",
            "kekfs.lock",
            "kekfs.tmp.x",
            "a.b",
            "x y",
        ] {
            assert_eq!(classify(n.as_bytes()), Found::Internal, "{n}");
        }
        assert_eq!(classify(b"\xff\xfe"), Found::Internal);
    }
}
