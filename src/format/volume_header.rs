//! The volume header file (`kekfs.volume`): a fixed little-endian layout holding the
//! volume id, the KEK reference and two wrapped copies of the AEK, closed by an HMAC
//! (keyed from the AEK) and a SHA-256 checksum (checkable without any key).

use super::{FormatError, Reader};
use crate::crypto::Key32;
use crate::kek::WrappedKey;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Magic bytes.
pub const VOLUME_MAGIC: &[u8; 8] = b"KEKFSVOL";
/// Current format version.
pub const VOLUME_VERSION: u16 = 1;
/// Content block size recorded in the header (the only one this version supports).
pub const HEADER_BLOCK_SIZE: u32 = 4096;
/// Number of wrapped-AEK slots.
pub const SLOTS: usize = 2;
/// Longest KEK URI stored.
pub const MAX_URI_LEN: usize = 4096;
/// Longest wrapped blob stored.
pub const MAX_BLOB_LEN: usize = 4096;
const MAC_LEN: usize = 32;
const SUM_LEN: usize = 32;

/// A volume header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHeader {
    /// Random volume id (HKDF salt, block AAD).
    pub volume_id: [u8; 16],
    /// KEK URI as given at init (no secrets).
    pub kek_uri: String,
    /// Pinned KEK version, or 0 to follow the latest.
    pub pinned_version: u32,
    /// Slot 0: current wrapping; slot 1: the previous one (or a second copy).
    pub slots: [WrappedKey; SLOTS],
}

impl VolumeHeader {
    /// Body bytes (everything the MAC covers).
    fn body(&self) -> Result<Vec<u8>, FormatError> {
        if self.kek_uri.len() > MAX_URI_LEN {
            return Err(FormatError("KEK URI too long".into()));
        }
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(VOLUME_MAGIC);
        b.extend_from_slice(&VOLUME_VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes()); // flags
        b.extend_from_slice(&self.volume_id);
        b.extend_from_slice(&HEADER_BLOCK_SIZE.to_le_bytes());
        b.extend_from_slice(&self.pinned_version.to_le_bytes());
        b.extend_from_slice(&(self.kek_uri.len() as u16).to_le_bytes());
        b.extend_from_slice(self.kek_uri.as_bytes());
        b.push(SLOTS as u8);
        for s in &self.slots {
            if s.blob.len() > MAX_BLOB_LEN {
                return Err(FormatError("wrapped key too long".into()));
            }
            b.extend_from_slice(&s.mechanism.to_le_bytes());
            b.extend_from_slice(&s.key_version.to_le_bytes());
            b.extend_from_slice(&(s.blob.len() as u16).to_le_bytes());
            b.extend_from_slice(&s.blob);
        }
        Ok(b)
    }

    /// Serialize, authenticating with `mac_key` (derived from the AEK).
    pub fn to_bytes(&self, mac_key: &Key32) -> Result<Vec<u8>, FormatError> {
        let mut b = self.body()?;
        let mac = hmac(mac_key, &b);
        b.extend_from_slice(&mac);
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum);
        Ok(b)
    }

    /// Parse and check the checksum. The MAC is checked later with `verify_mac`, once the
    /// AEK has been unwrapped; until then the header must be treated as unauthenticated.
    pub fn parse(bytes: &[u8]) -> Result<(VolumeHeader, [u8; MAC_LEN]), FormatError> {
        if bytes.len() < 8 || &bytes[..8] != VOLUME_MAGIC {
            return Err(FormatError("not a kekfs volume header (bad magic)".into()));
        }
        if bytes.len() < SUM_LEN + MAC_LEN {
            return Err(FormatError("volume header truncated".into()));
        }
        let (content, sum) = bytes.split_at(bytes.len() - SUM_LEN);
        if Sha256::digest(content).as_slice() != sum {
            return Err(FormatError(
                "volume header checksum mismatch (corrupted or truncated)".into(),
            ));
        }
        let mut r = Reader::new(content);
        r.take(8, "magic")?;
        let version = r.u16("version")?;
        if version != VOLUME_VERSION {
            return Err(FormatError(format!(
                "volume format version {version} is not supported (this kekfs reads version {VOLUME_VERSION})"
            )));
        }
        let flags = r.u16("flags")?;
        if flags != 0 {
            return Err(FormatError(format!(
                "unknown volume feature flags {flags:#x}"
            )));
        }
        let volume_id = r.array::<16>("volume id")?;
        let bs = r.u32("block size")?;
        if bs != HEADER_BLOCK_SIZE {
            return Err(FormatError(format!("unsupported block size {bs}")));
        }
        let pinned_version = r.u32("pinned version")?;
        let uri_len = r.u16("KEK URI length")? as usize;
        if uri_len > MAX_URI_LEN {
            return Err(FormatError("KEK URI length out of range".into()));
        }
        let uri = r.take(uri_len, "KEK URI")?;
        let kek_uri = String::from_utf8(uri.to_vec())
            .map_err(|_| FormatError("KEK URI is not UTF-8".into()))?;
        // Shown by `status` and in messages: no escape sequences for the terminal (a URI
        // kekfs writes has none).
        if kek_uri.chars().any(char::is_control) {
            return Err(FormatError("KEK URI holds control characters".into()));
        }
        let n = r.u8("slot count")? as usize;
        if n != SLOTS {
            return Err(FormatError(format!("slot count {n}, expected {SLOTS}")));
        }
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let mechanism = r.u16("slot mechanism")?;
            let key_version = r.u32("slot key version")?;
            let len = r.u16("slot length")? as usize;
            if len > MAX_BLOB_LEN {
                return Err(FormatError(format!("slot {i} length out of range")));
            }
            let blob = r.take(len, "slot blob")?.to_vec();
            slots.push(WrappedKey {
                mechanism,
                key_version,
                blob,
            });
        }
        let mac = r.array::<MAC_LEN>("header MAC")?;
        if r.pos() != content.len() {
            return Err(FormatError("trailing bytes in volume header".into()));
        }
        let slots: [WrappedKey; SLOTS] = slots
            .try_into()
            .map_err(|_| FormatError("slot count".into()))?;
        Ok((
            VolumeHeader {
                volume_id,
                kek_uri,
                pinned_version,
                slots,
            },
            mac,
        ))
    }

    /// Check the header MAC with the key derived from the unwrapped AEK.
    pub fn verify_mac(&self, mac_key: &Key32, mac: &[u8; MAC_LEN]) -> Result<(), FormatError> {
        let body = self.body()?;
        let mut m = Hmac::<Sha256>::new_from_slice(mac_key.expose())
            .map_err(|_| FormatError("HMAC key".into()))?;
        m.update(&body);
        m.verify_slice(mac).map_err(|_| {
            FormatError("volume header authentication failed (tampered header)".into())
        })
    }
}

fn hmac(key: &Key32, data: &[u8]) -> [u8; MAC_LEN] {
    let mut m = Hmac::<Sha256>::new_from_slice(key.expose()).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VolumeHeader {
        let w = |v: u32, b: u8| WrappedKey {
            mechanism: 1,
            key_version: v,
            blob: vec![b; 60],
        };
        VolumeHeader {
            volume_id: [3u8; 16],
            kek_uri: "soft:vol".into(),
            pinned_version: 0,
            slots: [w(2, 1), w(1, 2)],
        }
    }

    #[test]
    fn roundtrip_and_mac() {
        let k = Key32::from_bytes([4u8; 32]);
        let h = sample();
        let b = h.to_bytes(&k).unwrap();
        let (p, mac) = VolumeHeader::parse(&b).unwrap();
        assert_eq!(p, h);
        p.verify_mac(&k, &mac).unwrap();
        assert!(p.verify_mac(&Key32::from_bytes([5u8; 32]), &mac).is_err());
    }

    #[test]
    fn every_truncation_and_flip_is_rejected() {
        let k = Key32::from_bytes([4u8; 32]);
        let b = sample().to_bytes(&k).unwrap();
        for n in 0..b.len() {
            assert!(VolumeHeader::parse(&b[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x01;
            assert!(VolumeHeader::parse(&bad).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn control_characters_in_the_uri_are_refused() {
        let k = Key32::from_bytes([4u8; 32]);
        let mut h = sample();
        h.kek_uri = "soft:vol\u{1b}]0;owned\u{7}".into();
        let b = h.to_bytes(&k).unwrap();
        let e = VolumeHeader::parse(&b).unwrap_err();
        assert!(e.0.contains("control characters"), "{}", e.0);
    }

    #[test]
    fn forged_checksum_still_fails_mac() {
        let k = Key32::from_bytes([4u8; 32]);
        let mut b = sample().to_bytes(&k).unwrap();
        // Attacker changes the URI and recomputes the checksum.
        let pos = b.windows(8).position(|w| w == b"soft:vol").unwrap();
        b[pos + 5] = b'x';
        let l = b.len();
        let sum = Sha256::digest(&b[..l - 32]);
        b[l - 32..].copy_from_slice(&sum);
        let (p, mac) = VolumeHeader::parse(&b).unwrap();
        assert!(p.verify_mac(&k, &mac).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x1234_5678u64;
        for len in 0..600 {
            let mut v = vec![0u8; len];
            for x in v.iter_mut() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                *x = (seed >> 33) as u8;
            }
            if len > 8 {
                v[..8].copy_from_slice(VOLUME_MAGIC);
            }
            let _ = VolumeHeader::parse(&v);
        }
    }
}
