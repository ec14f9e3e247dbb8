//! The on-disk `keystore.json` format: its serde types, base64 fields, parsing, and validation of
//! every field a damaged or hostile file could get wrong.

use super::kdf::{CHECK_PLAINTEXT, KDF_ALG};
use super::lifecycle::{DEFAULT_RETENTION_SECS, MAX_RETENTION_SECS};
use super::material::SEALED_KEY_LEN;
use super::policy::KeyPolicy;
use super::volumes::{MAX_VOLUME_PATH_LEN, VolumeRef, validate_volume_id};
use crate::crypto::aead::OVERHEAD;
use crate::kek::KekError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Value of the `format` field.
pub const FORMAT_NAME: &str = "kekfs-keystore";
/// The only `version` this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Longest key name, in bytes.
pub const MAX_KEY_NAME_LEN: usize = 64;

// Bounds applied to parameters read from a file, so a damaged file cannot make us allocate
// terabytes or spin for hours.
const MIN_SALT_LEN: usize = 16;
const MAX_SALT_LEN: usize = 64;
const MAX_M_KIB: u32 = 4 * 1024 * 1024;
const MAX_T: u32 = 100;
const MAX_P: u32 = 64;

/// Check a key name: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_key_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_KEY_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with(['.', '-']);
    if ok {
        return Ok(());
    }
    let shown: String = name.chars().take(80).collect();
    let more = if shown.len() < name.len() { "…" } else { "" };
    Err(format!(
        "invalid key name {shown:?}{more}: a key name is 1-{MAX_KEY_NAME_LEN} characters of \
         A-Z a-z 0-9 . _ - and does not start with '.' or '-'"
    ))
}

/// Base64 (standard alphabet, padded) for byte fields in the JSON.
mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(|e| D::Error::custom(format!("invalid base64: {e}")))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KdfParams {
    pub(super) alg: String,
    pub(super) m_kib: u32,
    pub(super) t: u32,
    pub(super) p: u32,
    #[serde(with = "b64")]
    pub(super) salt: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VersionEntry {
    pub(super) version: u32,
    pub(super) created: u64,
    pub(super) enabled: bool,
    #[serde(default)]
    pub(super) not_before: Option<u64>,
    #[serde(default)]
    pub(super) expires: Option<u64>,
    #[serde(with = "b64")]
    pub(super) material: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyEntry {
    pub(super) created: u64,
    #[serde(default)]
    pub(super) purge_protection: bool,
    #[serde(default)]
    pub(super) deleted_at: Option<u64>,
    /// Soft-delete retention of this key; `None` = the keystore's `retention_secs`.
    #[serde(default)]
    pub(super) retention_secs: Option<u64>,
    #[serde(default)]
    pub(super) policy: Option<KeyPolicy>,
    pub(super) versions: Vec<VersionEntry>,
    #[serde(default)]
    pub(super) volumes: Vec<VolumeRef>,
}

fn default_retention() -> u64 {
    DEFAULT_RETENTION_SECS
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeystoreFile {
    pub(super) format: String,
    pub(super) version: u32,
    pub(super) kdf: KdfParams,
    #[serde(with = "b64")]
    pub(super) check: Vec<u8>,
    /// Default soft-delete retention of the keys, in seconds.
    #[serde(default = "default_retention")]
    pub(super) retention_secs: u64,
    pub(super) keys: BTreeMap<String, KeyEntry>,
}

impl KeystoreFile {
    /// Structural checks serde cannot express. Errors describe the problem only.
    fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT_NAME || self.version != FORMAT_VERSION {
            return Err(format!(
                "format {:?} version {} is not {FORMAT_NAME:?} version {FORMAT_VERSION}",
                self.format, self.version
            ));
        }
        let k = &self.kdf;
        if k.alg != KDF_ALG {
            return Err(format!(
                "unknown key derivation {:?} (this kekfs supports {KDF_ALG:?})",
                k.alg
            ));
        }
        if !(1..=MAX_P).contains(&k.p)
            || !(1..=MAX_T).contains(&k.t)
            || !(8 * k.p..=MAX_M_KIB).contains(&k.m_kib)
        {
            return Err(format!(
                "Argon2id parameters out of range (m_kib={}, t={}, p={}; allowed: p 1-{MAX_P}, \
                 t 1-{MAX_T}, m_kib 8*p-{MAX_M_KIB})",
                k.m_kib, k.t, k.p
            ));
        }
        if !(MIN_SALT_LEN..=MAX_SALT_LEN).contains(&k.salt.len()) {
            return Err(format!(
                "KDF salt is {} bytes (expected {MIN_SALT_LEN}-{MAX_SALT_LEN})",
                k.salt.len()
            ));
        }
        if self.check.len() != CHECK_PLAINTEXT.len() + OVERHEAD {
            return Err(format!(
                "\"check\" is {} bytes (expected {})",
                self.check.len(),
                CHECK_PLAINTEXT.len() + OVERHEAD
            ));
        }
        if self.retention_secs > MAX_RETENTION_SECS {
            return Err(format!(
                "\"retention_secs\" is {} (at most {MAX_RETENTION_SECS})",
                self.retention_secs
            ));
        }
        for (name, key) in &self.keys {
            validate_key_name(name)?;
            if let Some(r) = key.retention_secs
                && r > MAX_RETENTION_SECS
            {
                return Err(format!(
                    "key {name:?}: \"retention_secs\" is {r} (at most {MAX_RETENTION_SECS})"
                ));
            }
            let mut ids = std::collections::BTreeSet::new();
            for vol in &key.volumes {
                validate_volume_id(&vol.id).map_err(|e| format!("key {name:?}: {e}"))?;
                if vol.path.is_empty() || vol.path.len() > MAX_VOLUME_PATH_LEN {
                    return Err(format!(
                        "key {name:?}: volume {} has a path of {} bytes (expected 1-\
                         {MAX_VOLUME_PATH_LEN})",
                        vol.id,
                        vol.path.len()
                    ));
                }
                if !ids.insert(vol.id.as_str()) {
                    return Err(format!("key {name:?}: volume {} is listed twice", vol.id));
                }
            }
            if key.versions.is_empty() {
                return Err(format!("key {name:?} has no versions"));
            }
            let mut prev = 0u32;
            for v in &key.versions {
                if v.version <= prev {
                    return Err(format!(
                        "key {name:?}: versions must be listed in increasing order from 1 \
                         (found {} after {prev})",
                        v.version
                    ));
                }
                prev = v.version;
                if v.material.len() != SEALED_KEY_LEN {
                    return Err(format!(
                        "key {name:?} version {}: material is {} bytes (expected {SEALED_KEY_LEN})",
                        v.version,
                        v.material.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parse and validate keystore.json contents. Never panics, whatever `bytes` holds.
pub(super) fn parse_keystore(bytes: &[u8], path: &Path) -> Result<KeystoreFile, KekError> {
    let corrupt = |what: String| {
        KekError::Corrupt(format!(
            "{} is damaged: {what}; restore it from a backup (nothing was changed)",
            path.display()
        ))
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON ({e})")))?;
    let Some(obj) = value.as_object() else {
        return Err(corrupt("the top level is not a JSON object".into()));
    };
    match obj.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT_NAME) => {}
        other => {
            return Err(KekError::Corrupt(format!(
                "{} is not a kekfs keystore (its \"format\" is {}, expected {FORMAT_NAME:?}); \
                 check the --keystore path",
                path.display(),
                other.map_or_else(|| "missing".to_string(), |s| format!("{s:?}"))
            )));
        }
    }
    match obj.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(KekError::Corrupt(format!(
                "{} has keystore format version {v}, but this kekfs reads only version \
                 {FORMAT_VERSION}; use the kekfs release that wrote it, or upgrade kekfs",
                path.display()
            )));
        }
        None => return Err(corrupt("\"version\" is missing or not a number".into())),
    }
    // Parsed again from the bytes (not the Value) so errors carry a line and column.
    let file: KeystoreFile = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(format!("unexpected structure ({e})")))?;
    file.validate().map_err(corrupt)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::keystore::storage::KEYSTORE_FILE;
    use crate::kek::keystore::testutil::{PASS, edit_json, new_store, pass};
    use crate::kek::keystore::{Keystore, clock::unix_now};
    use serde_json::{Value, json};

    #[test]
    fn key_names() {
        for ok in ["a", "vol-kek", "A.b_c-9", "0", &"x".repeat(64)] {
            assert!(validate_key_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(65),
            "ключ",
        ] {
            let e = validate_key_name(bad).unwrap_err();
            assert!(e.contains("A-Z a-z 0-9"), "{e}");
        }
    }

    /// Expect a clear `Corrupt` (or for tampered KDF/check fields, `BadPassphrase`), never a panic.
    fn feed(ks: &mut Keystore, content: &[u8]) -> Result<(), KekError> {
        std::fs::write(ks.dir().join(KEYSTORE_FILE), content).unwrap();
        let r = ks.reload();
        if r.is_ok() {
            // Whatever was accepted must also be safe to use.
            for name in ks.key_names() {
                for v in [None, Some(1), Some(2), Some(u32::MAX)] {
                    let _ = ks.key_material(&name, v, unix_now());
                }
            }
            let _ = ks.list();
        }
        r
    }

    #[test]
    fn garbage_files_are_corrupt_not_panics() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        ks.rotate_key("k").unwrap();
        let good = std::fs::read(ks.dir().join(KEYSTORE_FILE)).unwrap();
        let good_v: Value = serde_json::from_slice(&good).unwrap();

        // Truncations: all corrupt.
        for n in 0..good.len() {
            if good[..n].trim_ascii_end() == good.trim_ascii_end() {
                continue;
            }
            let e = feed(&mut ks, &good[..n]).unwrap_err();
            assert!(matches!(e, KekError::Corrupt(_)), "truncated at {n}: {e}");
        }
        // Byte mutations anywhere: an error or a still-valid file, never a panic.
        for i in 0..good.len() {
            for x in [0x01u8, 0x20, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= x;
                if let Err(e) = feed(&mut ks, &bad) {
                    assert!(
                        matches!(e, KekError::Corrupt(_) | KekError::BadPassphrase(_)),
                        "flip {x:#x} at {i}: {e}"
                    );
                }
            }
        }
        // Random garbage and odd JSON.
        let mut rnd = [0u8; 512];
        crate::crypto::random_bytes(&mut rnd);
        for g in [
            &rnd[..],
            b"",
            b"null",
            b"[]",
            b"{}",
            b"\"kekfs-keystore\"",
            b"{\"format\":\"kekfs-keystore\"}",
            &[b'['; 10_000],
            b"\xef\xbb\xbf{}",
        ] {
            assert!(matches!(feed(&mut ks, g), Err(KekError::Corrupt(_))));
        }

        // Targeted structural damage, each with a helpful message.
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["format"] = json!("other")),
                "not a kekfs keystore",
            ),
            (Box::new(|v| v["version"] = json!(2)), "version 2"),
            (Box::new(|v| v["version"] = json!("1")), "version"),
            (Box::new(|v| v["kdf"]["alg"] = json!("scrypt")), "scrypt"),
            (
                Box::new(|v| v["kdf"]["m_kib"] = json!(u32::MAX)),
                "out of range",
            ),
            (Box::new(|v| v["kdf"]["m_kib"] = json!(-1)), "expected u32"),
            (Box::new(|v| v["kdf"]["p"] = json!(0)), "out of range"),
            (Box::new(|v| v["kdf"]["t"] = json!(0)), "out of range"),
            (Box::new(|v| v["kdf"]["salt"] = json!("!!")), "base64"),
            (Box::new(|v| v["kdf"]["salt"] = json!("AAAA")), "salt"),
            (Box::new(|v| v["check"] = json!("AAAA")), "check"),
            (Box::new(|v| v["check"] = json!(7)), "expected a string"),
            (Box::new(|v| v["extra"] = json!(1)), "extra"),
            (Box::new(|v| v["keys"] = json!([])), "expected a map"),
            (
                Box::new(|v| v["keys"]["k"]["versions"][0]["material"] = json!("AAAA")),
                "material",
            ),
            (
                Box::new(|v| v["keys"]["k"]["versions"] = json!([])),
                "no versions",
            ),
            (
                Box::new(|v| v["keys"]["k"]["versions"][1]["version"] = json!(1)),
                "increasing",
            ),
            (
                Box::new(|v| v["keys"]["k"]["versions"][0]["version"] = json!(0)),
                "increasing",
            ),
            (
                Box::new(|v| {
                    let k = v["keys"]["k"].clone();
                    v["keys"]["../evil"] = k;
                }),
                "invalid key name",
            ),
            (
                Box::new(|v| v["keys"]["k"]["policy"] = json!({"ops": ["sign"]})),
                "sign",
            ),
            (
                Box::new(|v| v["keys"]["k"]["created"] = json!(-5)),
                "expected u64",
            ),
        ];
        for (edit, needle) in cases {
            let mut v = good_v.clone();
            edit(&mut v);
            let e = feed(&mut ks, &serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(
                matches!(&e, KekError::Corrupt(m) if m.contains(needle) && m.contains(KEYSTORE_FILE)),
                "{needle}: {e}"
            );
        }
        // The original still works after all that, and open() also reports garbage as Corrupt.
        assert!(feed(&mut ks, &good).is_ok());
        std::fs::write(ks.dir().join(KEYSTORE_FILE), b"{oops").unwrap();
        assert!(matches!(
            Keystore::open(ks.dir(), &pass(PASS)),
            Err(KekError::Corrupt(_))
        ));
    }

    #[test]
    fn older_files_without_new_fields_still_open() {
        let (_tmp, mut ks) = new_store();
        ks.create_key("k").unwrap();
        edit_json(ks.dir(), |v| {
            v.as_object_mut().unwrap().remove("retention_secs");
            let k = v["keys"]["k"].as_object_mut().unwrap();
            k.remove("retention_secs");
            k.remove("volumes");
        });
        ks.reload().unwrap();
        assert_eq!(ks.default_retention(), DEFAULT_RETENTION_SECS);
        assert!(ks.key_info("k").unwrap().volumes.is_empty());
        // Damaged new fields are reported, not panicked on.
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["retention_secs"] = json!(MAX_RETENTION_SECS + 1)),
                "retention_secs",
            ),
            (
                Box::new(|v| v["keys"]["k"]["retention_secs"] = json!(u64::MAX)),
                "retention_secs",
            ),
            (
                Box::new(|v| {
                    v["keys"]["k"]["volumes"] = json!([{"id": "zz", "path": "/a", "registered": 1}])
                }),
                "invalid volume id",
            ),
            (
                Box::new(|v| {
                    v["keys"]["k"]["volumes"] =
                        json!([{"id": "00".repeat(16), "path": "", "registered": 1}])
                }),
                "path",
            ),
            (
                Box::new(|v| {
                    let e = json!({"id": "00".repeat(16), "path": "/a", "registered": 1});
                    v["keys"]["k"]["volumes"] = json!([e.clone(), e]);
                }),
                "listed twice",
            ),
            (
                Box::new(|v| {
                    v["keys"]["k"]["volumes"] =
                        json!([{"id": "00".repeat(16), "path": "/a", "registered": 1, "x": 1}])
                }),
                "unknown field",
            ),
        ];
        let good: Value =
            serde_json::from_slice(&std::fs::read(ks.dir().join(KEYSTORE_FILE)).unwrap()).unwrap();
        for (edit, needle) in cases {
            let mut v = good.clone();
            edit(&mut v);
            let e = feed(&mut ks, &serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(
                matches!(&e, KekError::Corrupt(m) if m.contains(needle)),
                "{needle}: {e}"
            );
        }
    }
}
