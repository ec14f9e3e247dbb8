//! Key versions ↔ CKA_ID (big-endian, no leading zero bytes), and the check that a
//! `pkcs11:` URI can name a kekfs KEK.

use crate::kek::pkcs11_uri::{ObjectType, Pkcs11Uri};

/// CKA_ID of key version `v`: big-endian, no leading zero bytes (`1` → `[1]`).
pub fn version_to_id(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|&&x| x == 0).count().min(3);
    b[skip..].to_vec()
}

/// The key version a CKA_ID encodes, if it is one (1–4 bytes, first byte non-zero).
pub fn id_to_version(id: &[u8]) -> Option<u32> {
    if id.is_empty() || id.len() > 4 || id[0] == 0 {
        return None;
    }
    Some(id.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
}

pub(super) fn id_hex(id: &[u8]) -> String {
    if id.is_empty() {
        return "(empty)".into();
    }
    id.iter().map(|b| format!("%{b:02X}")).collect()
}

/// Check that a parsed URI can name a kekfs KEK: an `object` label, an `id` (if any)
/// that is a version number, a key `type` (if any), and no `pin-value`.
pub fn check_kek_uri(u: &Pkcs11Uri) -> Result<(), String> {
    if u.pin_value().is_some() {
        return Err(
            "pin-value is not accepted: a PIN written into the URI ends up in shell \
                    history, process listings and the volume header; use \
                    pin-source=file:/path/to/pin or pin-source=env:VARIABLE, or let kekfs \
                    prompt for the PIN"
                .into(),
        );
    }
    match u.object.as_deref() {
        None => {
            return Err(
                "a pkcs11: KEK URI needs object=LABEL (the CKA_LABEL shared by the \
                        key's versions), e.g. pkcs11:token=kekfs;object=vol-kek"
                    .into(),
            );
        }
        Some("") => return Err("object= must not be empty".into()),
        Some(_) => {}
    }
    if let Some(id) = &u.id
        && id_to_version(id).is_none()
    {
        return Err(format!(
            "id={} is not a kekfs key version: a version N is CKA_ID = N in big-endian \
             bytes without leading zeros (id=%01 for version 1, %02 for 2, %01%00 for 256); \
             leave id out to follow the newest version",
            id_hex(id)
        ));
    }
    if let Some(t @ (ObjectType::Cert | ObjectType::Data)) = u.object_type {
        return Err(format!(
            "type={} cannot wrap keys; use type=secret-key (AES) or type=private (RSA), or \
             leave type out",
            t.as_str()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ids() {
        assert_eq!(version_to_id(1), vec![1]);
        assert_eq!(version_to_id(255), vec![255]);
        assert_eq!(version_to_id(256), vec![1, 0]);
        assert_eq!(version_to_id(0x0102_0304), vec![1, 2, 3, 4]);
        assert_eq!(version_to_id(u32::MAX), vec![255; 4]);
        for v in [1, 2, 255, 256, 65_535, 65_536, 0x00ff_ffff, u32::MAX] {
            assert_eq!(id_to_version(&version_to_id(v)), Some(v), "{v}");
        }
        assert_eq!(id_to_version(&[]), None);
        assert_eq!(id_to_version(&[0]), None);
        assert_eq!(id_to_version(&[0, 1]), None);
        assert_eq!(id_to_version(&[1, 2, 3, 4, 5]), None);
        assert_eq!(id_hex(&[1, 0xab]), "%01%AB");
    }

    fn uri(s: &str) -> Pkcs11Uri {
        Pkcs11Uri::parse(s).unwrap()
    }

    #[test]
    fn kek_uri_checks() {
        assert!(check_kek_uri(&uri("pkcs11:token=t;object=k")).is_ok());
        assert!(check_kek_uri(&uri("pkcs11:object=k;id=%01;type=secret-key")).is_ok());
        assert!(check_kek_uri(&uri("pkcs11:object=k;type=private")).is_ok());
        let e = check_kek_uri(&uri("pkcs11:token=t")).unwrap_err();
        assert!(e.contains("object=LABEL"), "{e}");
        assert!(check_kek_uri(&uri("pkcs11:object=")).is_err());
        let e = check_kek_uri(&uri("pkcs11:object=k;id=%00%01")).unwrap_err();
        assert!(e.contains("not a kekfs key version"), "{e}");
        assert!(check_kek_uri(&uri("pkcs11:object=k;id=")).is_err());
        assert!(check_kek_uri(&uri("pkcs11:object=k;id=%01%02%03%04%05")).is_err());
        assert!(check_kek_uri(&uri("pkcs11:object=k;type=cert")).is_err());
        assert!(check_kek_uri(&uri("pkcs11:object=k;type=data")).is_err());
        let e = check_kek_uri(&uri("pkcs11:object=k?pin-value=1234")).unwrap_err();
        assert!(e.contains("pin-source") && !e.contains("1234"), "{e}");
    }
}
