//! Key-encryption-key providers behind one trait. A volume names its KEK by a URI;
//! `open_provider` turns the URI into a provider that can wrap and unwrap the volume's AEK.

pub mod keystore;
pub mod passphrase;
pub mod soft;

use crate::crypto::Key32;
use std::fmt;
use std::path::PathBuf;

/// Wrapping mechanism identifiers recorded next to each wrapped AEK (see docs/FORMAT.md).
pub mod mechanism {
    /// `soft:` keystore: AES-256-GCM under the key version's material,
    /// AAD = "kekfs wrap v1" ‖ key name ‖ version (u32 LE).
    pub const SOFT_AES256_GCM: u16 = 1;
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
}

impl fmt::Display for KekError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KekError::BadUri(m) => write!(f, "bad KEK URI: {m}"),
            KekError::NotFound(m) => write!(f, "key not found: {m}"),
            KekError::Refused { key, reason } => write!(f, "KEK {key} refused: {reason}"),
            KekError::Unreachable(m) => write!(f, "KEK provider unreachable: {m}"),
            KekError::BadPassphrase(m) => write!(f, "wrong passphrase: {m}"),
            KekError::NoKeystore(m) => write!(f, "no keystore: {m}"),
            KekError::AlreadyExists(m) => write!(f, "key already exists: {m}"),
            KekError::UnwrapFailed(m) => write!(f, "unwrap failed: {m}"),
            KekError::Corrupt(m) => write!(f, "keystore corrupted: {m}"),
            KekError::Io(m) => write!(f, "keystore I/O error: {m}"),
        }
    }
}

impl std::error::Error for KekError {}

/// A parsed KEK reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekUri {
    /// `soft:NAME` (follow the latest version) or `soft:NAME?version=N` (pinned).
    Soft { name: String, version: Option<u32> },
}

impl KekUri {
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
        } else if s.starts_with("pkcs11:") {
            Err(KekError::BadUri(
                "pkcs11: KEKs are not supported by this build yet".into(),
            ))
        } else {
            Err(KekError::BadUri(format!(
                "{s:?}: expected soft:NAME[?version=N]"
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
}

/// Where providers find their secrets and state.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    /// The `soft:` keystore directory.
    pub keystore_dir: PathBuf,
    /// Where the keystore passphrase comes from.
    pub passphrase: passphrase::PassphraseSource,
}

/// Open the provider a URI names.
pub fn open_provider(
    uri: &KekUri,
    opts: &ProviderOptions,
) -> Result<Box<dyn KekProvider>, KekError> {
    match uri {
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
}
