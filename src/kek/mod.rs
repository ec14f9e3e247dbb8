//! Key-encryption-key providers behind one trait. A volume names its KEK by a URI;
//! `open_provider` turns the URI into a provider that can wrap and unwrap the volume's AEK.

pub mod keystore;
pub mod passphrase;
pub mod pkcs11;
pub mod pkcs11_uri;
pub mod soft;

use crate::crypto::Key32;
use std::fmt;
use std::path::PathBuf;

/// Wrapping mechanism identifiers recorded next to each wrapped AEK (see docs/FORMAT.md).
pub mod mechanism {
    /// `soft:` keystore: AES-256-GCM under the key version's material,
    /// AAD = "kekfs wrap v1" ‖ key name ‖ version (u32 LE).
    pub const SOFT_AES256_GCM: u16 = 1;
    /// `pkcs11:` AES key: CKM_AES_KEY_WRAP_PAD (RFC 5649) via C_WrapKey; 40-byte blob.
    pub const PKCS11_AES_KEY_WRAP_PAD: u16 = 0x0101;
    /// `pkcs11:` AES key: CKM_AES_KEY_WRAP (RFC 3394) via C_WrapKey; 40-byte blob.
    pub const PKCS11_AES_KEY_WRAP: u16 = 0x0102;
    /// `pkcs11:` AES key: CKM_AES_GCM via C_Encrypt, 96-bit IV chosen by kekfs, 128-bit tag,
    /// AAD = "kekfs pkcs11 wrap v1" ‖ label ‖ 0x00 ‖ version (u32 LE);
    /// blob = IV ‖ ciphertext ‖ tag (60 bytes).
    pub const PKCS11_AES_GCM: u16 = 0x0103;
    /// `pkcs11:` RSA key pair: CKM_RSA_PKCS_OAEP, SHA-256 and MGF1-SHA-256, no label;
    /// blob = one RSA block (modulus size).
    pub const PKCS11_RSA_OAEP_SHA256: u16 = 0x0111;
    /// `pkcs11:` RSA key pair: CKM_RSA_PKCS_OAEP, SHA-1 and MGF1-SHA-1, no label.
    pub const PKCS11_RSA_OAEP_SHA1: u16 = 0x0112;
}

/// An AEK wrapped by a provider, as stored in the volume header.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// How the blob was produced (`mechanism::*`).
    pub mechanism: u16,
    /// The KEK version that wrapped it.
    pub key_version: u32,
    /// The opaque wrapped bytes.
    pub blob: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WrappedKey {{ mechanism: {}, key_version: {}, blob: {} bytes }}",
            self.mechanism,
            self.key_version,
            self.blob.len()
        )
    }
}

/// Why a KEK refused to serve (explicit refusal: never cached, never given grace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key or key version is disabled.
    Disabled,
    /// Past its expiry date.
    Expired,
    /// Before its not-before date.
    NotYetValid,
    /// Soft-deleted.
    Deleted,
    /// The caller is not allowed by the key's access policy.
    Denied,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Disabled => "disabled",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not yet valid",
            Refusal::Deleted => "deleted",
            Refusal::Denied => "access denied by key policy",
        })
    }
}

/// Errors from a KEK provider.
#[derive(Debug)]
#[non_exhaustive]
pub enum KekError {
    /// The URI could not be parsed or names an unknown scheme.
    BadUri(String),
    /// No such key (or key version).
    NotFound(String),
    /// The key exists but refuses to be used.
    Refused { key: String, reason: Refusal },
    /// The provider could not be reached (transient).
    Unreachable(String),
    /// Wrong keystore passphrase or token PIN.
    BadPassphrase(String),
    /// The keystore does not exist or is not initialised.
    NoKeystore(String),
    /// A key with this name already exists.
    AlreadyExists(String),
    /// The wrapped blob did not unwrap (tampered, or wrapped by another key).
    UnwrapFailed(String),
    /// Keystore file is corrupted or has an unknown format.
    Corrupt(String),
    /// Any other I/O failure.
    Io(String),
    /// A keystore change refused by the key's state or the keystore's rules (purge
    /// protection, retention period, key deleted or not deleted, impossible dates).
    ChangeRefused(String),
    /// No PKCS#11 token matching the URI is present (or it went away).
    TokenAbsent(String),
    /// The token's user PIN is locked (or expired): only its security officer can help.
    PinLocked(String),
    /// The token or key cannot do what kekfs needs (mechanism, key type or size).
    Unsupported(String),
    /// The PKCS#11 module (library) cannot be found, loaded or initialised.
    ModuleLoad(String),
    /// The audit log could not be written and the policy is fail-closed: the operation was
    /// refused (its result, if any, discarded).
    AuditFailed(String),
}

impl fmt::Display for KekError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KekError::BadUri(m) => write!(f, "bad KEK URI: {m}"),
            KekError::NotFound(m) => write!(f, "key not found: {m}"),
            KekError::Refused { key, reason } => write!(f, "KEK {key} refused: {reason}"),
            KekError::Unreachable(m) => write!(f, "KEK provider unreachable: {m}"),
            KekError::BadPassphrase(m) => write!(f, "wrong passphrase or PIN: {m}"),
            KekError::NoKeystore(m) => write!(f, "no keystore: {m}"),
            KekError::AlreadyExists(m) => write!(f, "key already exists: {m}"),
            KekError::UnwrapFailed(m) => write!(f, "unwrap failed: {m}"),
            KekError::Corrupt(m) => write!(f, "keystore corrupted: {m}"),
            KekError::Io(m) => write!(f, "keystore I/O error: {m}"),
            KekError::ChangeRefused(m) => write!(f, "keystore change refused: {m}"),
            KekError::TokenAbsent(m) => write!(f, "PKCS#11 token not present: {m}"),
            KekError::PinLocked(m) => write!(f, "token PIN locked: {m}"),
            KekError::Unsupported(m) => write!(f, "not supported by the token: {m}"),
            KekError::ModuleLoad(m) => write!(f, "PKCS#11 module not usable: {m}"),
            KekError::AuditFailed(m) => write!(f, "audit log not writable: {m}"),
        }
    }
}

impl std::error::Error for KekError {}

/// A parsed KEK reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekUri {
    /// `soft:NAME` (follow the latest version) or `soft:NAME?version=N` (pinned).
    Soft { name: String, version: Option<u32> },
    /// An RFC 7512 `pkcs11:` URI naming a key label (`object=`) on a token; `id=` pins a
    /// version (see `kek::pkcs11`). Never holds a `pin-value`.
    Pkcs11(Box<pkcs11_uri::Pkcs11Uri>),
}

impl KekUri {
    /// The pinned KEK version, if the URI pins one (`None` = follow the latest).
    pub fn version(&self) -> Option<u32> {
        match self {
            KekUri::Soft { version, .. } => *version,
            KekUri::Pkcs11(u) => u.id.as_deref().and_then(pkcs11::id_to_version),
        }
    }

    /// The same KEK pinned to `version` (`None` = follow the latest).
    pub fn with_version(&self, version: Option<u32>) -> KekUri {
        match self {
            KekUri::Soft { name, .. } => KekUri::Soft {
                name: name.clone(),
                version,
            },
            KekUri::Pkcs11(u) => {
                let mut u = u.clone();
                u.id = version.map(pkcs11::version_to_id);
                KekUri::Pkcs11(u)
            }
        }
    }

    /// Parse a KEK URI.
    pub fn parse(s: &str) -> Result<Self, KekError> {
        if let Some(rest) = s.strip_prefix("soft:") {
            let (name, query) = match rest.split_once('?') {
                Some((n, q)) => (n, Some(q)),
                None => (rest, None),
            };
            keystore::validate_key_name(name).map_err(KekError::BadUri)?;
            let mut version = None;
            if let Some(q) = query {
                for part in q.split('&').filter(|p| !p.is_empty()) {
                    match part.split_once('=') {
                        Some(("version", v)) => {
                            let n: u32 = v.parse().map_err(|_| {
                                KekError::BadUri(format!(
                                    "version must be a positive integer, got {v:?}"
                                ))
                            })?;
                            if n == 0 {
                                return Err(KekError::BadUri("versions start at 1".into()));
                            }
                            version = Some(n);
                        }
                        _ => {
                            return Err(KekError::BadUri(format!(
                                "unknown soft: URI attribute {part:?} (only version=N)"
                            )));
                        }
                    }
                }
            }
            Ok(KekUri::Soft {
                name: name.to_string(),
                version,
            })
        } else if s
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("pkcs11:"))
        {
            let u = pkcs11_uri::Pkcs11Uri::parse(s).map_err(|e| KekError::BadUri(e.0))?;
            pkcs11::check_kek_uri(&u).map_err(KekError::BadUri)?;
            Ok(KekUri::Pkcs11(Box::new(u)))
        } else {
            Err(KekError::BadUri(format!(
                "{s:?}: expected soft:NAME[?version=N] or pkcs11:token=…;object=…[;id=%NN]"
            )))
        }
    }
}

impl fmt::Display for KekUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KekUri::Soft {
                name,
                version: None,
            } => write!(f, "soft:{name}"),
            KekUri::Soft {
                name,
                version: Some(v),
            } => write!(f, "soft:{name}?version={v}"),
            KekUri::Pkcs11(u) => write!(f, "{u}"),
        }
    }
}

/// A KEK provider: wraps and unwraps AEKs without ever handing out the KEK.
pub trait KekProvider: Send + Sync {
    /// The URI this provider serves (no secrets in it).
    fn uri(&self) -> String;
    /// Wrap `aek` under the KEK version this provider is configured for
    /// (the pinned one, or the latest enabled one).
    fn wrap(&self, aek: &Key32) -> Result<WrappedKey, KekError>;
    /// Unwrap an AEK. Fails with `Refused` when the key version may not be used now.
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Key32, KekError>;
    /// Record, where the provider keeps such bookkeeping (the `soft:` keystore does), that
    /// the volume `volume_id` in `backing` uses this KEK. Grants nothing; the default does
    /// nothing.
    fn register_volume(
        &self,
        volume_id: &[u8; 16],
        backing: &std::path::Path,
    ) -> Result<(), KekError> {
        let _ = (volume_id, backing);
        Ok(())
    }
    /// The version `wrap` would use now (the pinned one, or the newest usable one), if
    /// the provider can tell without wrapping. Used to notice rotations.
    fn current_version(&self) -> Result<Option<u32>, KekError> {
        Ok(None)
    }
    /// A provider for another KEK `uri` reusing this provider's unlocked state (the
    /// keystore master key, a token session's PIN), so a running mount can follow
    /// `kekfs rewrap --to-kek` without asking for a secret again. `None` when this
    /// provider cannot serve that URI.
    fn reopen(&self, uri: &KekUri) -> Option<Box<dyn KekProvider>> {
        let _ = uri;
        None
    }
}

/// Where providers find their secrets and state.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    /// The `soft:` keystore directory.
    pub keystore_dir: PathBuf,
    /// Where the keystore passphrase comes from.
    pub passphrase: passphrase::PassphraseSource,
    /// The backing directory of the volume the provider is opened for, if any: a
    /// PKCS#11 module on its filesystem is refused (see `pkcs11::check_module_apart`).
    pub volume_dir: Option<PathBuf>,
}

/// Open the provider a URI names.
pub fn open_provider(
    uri: &KekUri,
    opts: &ProviderOptions,
) -> Result<Box<dyn KekProvider>, KekError> {
    match uri {
        KekUri::Pkcs11(u) => Ok(Box::new(pkcs11::Pkcs11Provider::open(u, opts)?)),
        KekUri::Soft { name, version } => {
            let p = soft::SoftProvider::open(&opts.keystore_dir, &opts.passphrase, name, *version)?;
            Ok(Box::new(p))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_soft_uris() {
        assert_eq!(
            KekUri::parse("soft:vol-kek").unwrap(),
            KekUri::Soft {
                name: "vol-kek".into(),
                version: None
            }
        );
        assert_eq!(
            KekUri::parse("soft:k?version=3").unwrap(),
            KekUri::Soft {
                name: "k".into(),
                version: Some(3)
            }
        );
        assert_eq!(
            KekUri::parse("soft:k?version=3").unwrap().to_string(),
            "soft:k?version=3"
        );
        for bad in [
            "soft:",
            "soft:k?version=0",
            "soft:k?version=x",
            "soft:k?foo=1",
            "file:x",
            "soft:a/b",
        ] {
            assert!(KekUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_pkcs11_uris() {
        let s = "pkcs11:token=kekfs;object=vol-kek;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kekfs/pin";
        let u = KekUri::parse(s).unwrap();
        assert!(matches!(&u, KekUri::Pkcs11(p) if p.object.as_deref() == Some("vol-kek")));
        assert_eq!(u.to_string(), s);
        assert_eq!(u.version(), Some(1));
        assert_eq!(KekUri::parse(&u.to_string()).unwrap(), u);
        let latest = u.with_version(None);
        assert_eq!(latest.version(), None);
        assert!(!latest.to_string().contains("id="));
        let v258 = u.with_version(Some(258));
        assert_eq!(v258.version(), Some(258));
        assert!(v258.to_string().contains("id=%01%02"), "{v258}");
        assert_eq!(
            KekUri::parse("PKCS11:object=k").unwrap().to_string(),
            "pkcs11:object=k"
        );
        for bad in [
            "pkcs11:token=kekfs",
            "pkcs11:object=k;id=%00%01",
            "pkcs11:object=k?pin-value=1234",
            "pkcs11:object=k;type=cert",
            "pkcs11:object=a b",
            "pkcs11:object=k?module-path=relative.so",
        ] {
            let e = KekUri::parse(bad).unwrap_err();
            assert!(matches!(e, KekError::BadUri(_)), "{bad}: {e}");
        }
    }
}
