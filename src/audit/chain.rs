//! The keyed hash chain: every line ends in `"mac":"<hex>"`, an HMAC-SHA256 under the log
//! key of everything before it (which includes the previous line's mac as `prev`), and the
//! log key file `audit.key` that holds that key.

use crate::crypto::Key32;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Domain separation prefix of the MAC input (followed by the line up to the mac field).
pub const MAC_LABEL: &[u8] = b"kekfs audit v1\n";
/// The `prev` of the first line of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The key file's name, beside the log.
pub const KEY_FILE: &str = "audit.key";
/// Text between the line's body and the mac hex.
const MAC_OPEN: &str = ",\"mac\":\"";
/// Text after the mac hex.
const MAC_CLOSE: &str = "\"}";
/// Length of a mac in hex.
pub const MAC_HEX_LEN: usize = 64;

/// The key lines are chained with (32 random bytes, zeroized on drop).
#[derive(Debug)]
pub struct LogKey(Key32);

impl LogKey {
    /// A key from 32 bytes.
    pub fn from_slice(b: &[u8]) -> Option<LogKey> {
        Key32::from_slice(b).map(LogKey)
    }

    /// The mac (lower-case hex) of a line body: the serialized line without its closing `}`.
    pub fn mac_hex(&self, body: &[u8]) -> String {
        crate::volume::hex(&self.mac(body))
    }

    fn mac(&self, body: &[u8]) -> [u8; 32] {
        let Ok(mut m) = Hmac::<Sha256>::new_from_slice(self.0.expose()) else {
            // HMAC accepts keys of any length; this branch cannot be taken.
            return [0; 32];
        };
        m.update(MAC_LABEL);
        m.update(body);
        m.finalize().into_bytes().into()
    }

    /// Does `mac_hex` authenticate `body`? (constant-time comparison)
    pub fn verify(&self, body: &[u8], mac_hex: &str) -> bool {
        let Some(want) = unhex32(mac_hex) else {
            return false;
        };
        let Ok(mut m) = Hmac::<Sha256>::new_from_slice(self.0.expose()) else {
            return false;
        };
        m.update(MAC_LABEL);
        m.update(body);
        m.verify_slice(&want).is_ok()
    }
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Is `s` a well-formed mac (64 lower-case hex digits)?
pub fn is_mac(s: &str) -> bool {
    s.len() == MAC_HEX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Finish a line: `body` is the serialized line without its closing `}`.
pub fn seal(key: &LogKey, body: &str) -> (String, String) {
    let mac = key.mac_hex(body.as_bytes());
    (format!("{body}{MAC_OPEN}{mac}{MAC_CLOSE}"), mac)
}

/// Split a line (without its newline) into the MAC'd body and the mac hex, if it has the
/// shape `…,"mac":"<64 hex>"}`.
pub fn split(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_suffix(MAC_CLOSE)?;
    let cut = rest.len().checked_sub(MAC_HEX_LEN)?;
    let mac = rest.get(cut..)?;
    let body = rest.get(..cut)?.strip_suffix(MAC_OPEN)?;
    is_mac(mac).then_some((body, mac))
}

/// Read the log key in `dir`, creating a random one (mode 0600) if there is none. The
/// caller holds the log's lock, so two writers never create two keys.
pub fn load_or_create_key(dir: &Path) -> std::io::Result<LogKey> {
    let path = dir.join(KEY_FILE);
    match load_key(&path) {
        Ok(k) => Ok(k),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key32::generate();
            let mut tmp = tempfile::Builder::new()
                .prefix("audit.key.tmp.")
                .tempfile_in(dir)?;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o600))?;
            tmp.write_all(key.expose())?;
            tmp.as_file().sync_all()?;
            // Never replace a key another writer made (it would orphan its lines).
            tmp.persist_noclobber(&path).map_err(|e| e.error)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(LogKey(key))
        }
        Err(e) => Err(e),
    }
}

/// Read a log key file (exactly 32 bytes).
pub fn load_key(path: &Path) -> std::io::Result<LogKey> {
    use std::io::Read;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut b = zeroize::Zeroizing::new(Vec::with_capacity(33));
    f.take(33).read_to_end(&mut b)?;
    LogKey::from_slice(&b).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} holds {} bytes, expected a 32-byte audit log key",
                path.display(),
                b.len()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_split_verify() {
        let k = LogKey::from_slice(&[7u8; 32]).unwrap();
        let (line, mac) = seal(&k, "{\"seq\":1,\"prev\":\"00\"");
        let (body, m) = split(&line).unwrap();
        assert_eq!(m, mac);
        assert_eq!(body, "{\"seq\":1,\"prev\":\"00\"");
        assert!(k.verify(body.as_bytes(), m));
        assert!(!k.verify(b"{\"seq\":2,\"prev\":\"00\"", m));
        let other = LogKey::from_slice(&[8u8; 32]).unwrap();
        assert!(!other.verify(body.as_bytes(), m));
        serde_json::from_str::<serde_json::Value>(&line).unwrap();
    }

    #[test]
    fn split_rejects_garbage() {
        for bad in [
            "",
            "}",
            "\"}",
            "{\"mac\":\"zz\"}",
            &format!("{{\"a\":1,\"mac\":\"{}\"}}", "G".repeat(64)),
            &format!("{{\"a\":1,\"mac\":\"{}\"}}", "a".repeat(63)),
            &format!("{{\"a\":1,\"mac\":\"{}\"", "a".repeat(64)),
            "é\"}",
            &format!("{}\"}}", "é".repeat(40)),
        ] {
            assert!(split(bad).is_none(), "{bad}");
        }
        assert!(!LogKey::from_slice(&[1; 32]).unwrap().verify(b"x", "nothex"));
    }

    #[test]
    fn key_file() {
        let d = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(d.path()).unwrap();
        let k2 = load_or_create_key(d.path()).unwrap();
        assert_eq!(k1.mac_hex(b"x"), k2.mac_hex(b"x"));
        let mode = std::fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(d.path().join(KEY_FILE), b"short").unwrap();
        assert!(load_or_create_key(d.path()).is_err());
    }
}
