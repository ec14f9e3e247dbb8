//! The `pkcs11:` KEK provider: the KEK is a key object in a PKCS#11 token (SoftHSM2, an
//! HSM, a smart card) and never leaves it; kekfs asks the token to wrap and unwrap the AEK.
//!
//! **Key versions.** A KEK is named by the URI's `object` (CKA_LABEL). Each version is a
//! key object with that label and CKA_ID = the version number as big-endian bytes without
//! leading zeros (version 1 = `%01`, 258 = `%01%02`; 1–4 bytes, never starting with 0).
//! An AES version is one CKO_SECRET_KEY; an RSA version is a CKO_PRIVATE_KEY (unwraps)
//! plus its CKO_PUBLIC_KEY (wraps). Objects with the label and another kind of CKA_ID are
//! not kekfs versions and are ignored (and named in "not found" errors). `id=` in the URI
//! pins the volume to that version; without it the volume follows the newest usable one.
//!
//! **Mechanisms.** AES keys wrap with CKM_AES_KEY_WRAP_PAD (RFC 5649), else
//! CKM_AES_KEY_WRAP (RFC 3394), else CKM_AES_GCM through C_Encrypt with a 96-bit IV that
//! kekfs generates and stores in the blob. RSA keys (at least 3072 bits) wrap with
//! RSA-OAEP, SHA-256/MGF1-SHA-256 where the token takes it, else SHA-1/MGF1-SHA-1 (all
//! SoftHSM 2.6 offers); never PKCS#1 v1.5. The mechanism is recorded in the wrapped key
//! ([`super::mechanism`]), so unwrapping uses what wrapping used. `KEKFS_PKCS11_MECHANISM`
//! forces one wrapping mechanism (to test fallbacks or work around a token's bug).
//!
//! **Unwrapping** with the key-wrap and OAEP mechanisms is C_UnwrapKey into a session
//! object (CKA_TOKEN false, CKA_SENSITIVE false, CKA_EXTRACTABLE true), whose CKA_VALUE
//! kekfs reads and then destroys: the AEK has to be in kekfs's memory to derive file keys,
//! and C_UnwrapKey is the operation the token gates with CKA_UNWRAP. AES-GCM has no
//! unwrap form on common tokens, so that route uses C_Decrypt (gated by CKA_DECRYPT);
//! kekfs checks CKA_UNWRAP itself first, so "CKA_UNWRAP false" means disabled for every
//! mechanism.
//!
//! **Lifecycle, enforced by kekfs where the token does not:** CKA_UNWRAP false → refused
//! (disabled); object destroyed → key not found; CKA_START_DATE in the future → not yet
//! valid; CKA_END_DATE in the past → expired (dates are UTC days, both inclusive; SoftHSM
//! does not enforce them itself). A date that is set but cannot be read back (SoftHSM 2.6
//! on private keys) refuses the key: kekfs fails closed rather than ignore a validity window.
//!
//! **Sessions.** The library is loaded and C_Initialize'd once per process and module path
//! (again in a forked child, where the parent's state is void). A provider keeps one
//! session behind a mutex (cryptoki's `Session` is `Send` but not `Sync`), logs in with the
//! PIN once and keeps the PIN (zeroized on drop) to log in again after a token error: a
//! failed operation that looks like a lost session is retried once on a fresh session.
//! Objects are searched again for every operation, because handles die at logout.
//!
//! **Outages.** When no session can be had because the link to the token is down (the
//! `p11-kit server` behind `p11-kit-client.so` stopped: CKR_DEVICE_ERROR on every call of
//! a broken connection, no slot at all once initialised without a server; a removed
//! token), the library is finalised and initialised again and the connection retried, at
//! most once per operation: that is how a mounted volume comes back when the server does.
//! Such failures are [`KekError::Unreachable`] or [`KekError::TokenAbsent`], which the
//! lifecycle monitor treats as transient (grace period), never as a refusal. Sessions of
//! an earlier library generation (or of the parent, after a fork) are forgotten, never
//! closed: their handles are void, or now name another session.
//!
//! **Lifecycle from the CLI:** `kekfs key create|rotate --kek` ([`create_key`]) and
//! `kekfs key disable|enable --kek` ([`set_key_usable`]: CKA_UNWRAP and CKA_WRAP).

// One concern per file; each file's `//!` line says which.
mod dates;
mod error;
mod keys;
mod library;
mod objects;
mod session;
mod versions;
mod wrap;

pub use keys::{CreatedKey, KeyProtection, UsageChange, create_key, set_key_usable};
pub use library::{DEFAULT_MODULES, MODULE_DIRS, check_module_trust, resolve_module};
pub use versions::{check_kek_uri, id_to_version, version_to_id};
pub use wrap::{ENV_MECHANISM, GCM_AAD_LABEL, GCM_IV_LEN, GCM_TAG_LEN, KEY_WRAP_LEN, MIN_RSA_BITS};

use super::passphrase::PassphraseSource;
use super::pkcs11_uri::{PinSource, Pkcs11Uri};
use super::{KekError, KekProvider, ProviderOptions, WrappedKey};
use crate::crypto::Key32;
use session::State;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A `pkcs11:` KEK.
pub struct Pkcs11Provider {
    uri: Pkcs11Uri,
    module: PathBuf,
    label: String,
    pinned: Option<u32>,
    pin_source: PassphraseSource,
    /// Where the PIN comes from, for messages.
    pin_desc: String,
    state: Mutex<State>,
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Provider")
            .field("uri", &self.uri.to_string())
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Provider {
    /// Check the URI, find the module and the token (no login yet: the PIN is read at the
    /// first operation that needs it, from `pin-source`, else from `opts.passphrase`).
    pub fn open(uri: &Pkcs11Uri, opts: &ProviderOptions) -> Result<Self, KekError> {
        check_kek_uri(uri).map_err(KekError::BadUri)?;
        let label = uri.object.clone().unwrap_or_default();
        let pinned = uri.id.as_deref().and_then(id_to_version);
        let pin_source = match &uri.pin_source {
            Some(PinSource::File(p)) => PassphraseSource::File(p.clone()),
            Some(PinSource::Env(v)) => PassphraseSource::Env(v.clone()),
            None => opts.passphrase.clone(),
        };
        let pin_desc = match &uri.pin_source {
            Some(ps) => format!("pin-source={ps}"),
            None => pin_source.to_string(),
        };
        let module = resolve_module(uri)?;
        if let Some(backing) = &opts.volume_dir {
            library::check_module_apart(&module, backing)?;
        }
        let p = Pkcs11Provider {
            uri: uri.clone(),
            module,
            label,
            pinned,
            pin_source,
            pin_desc,
            state: Mutex::new(State::default()),
        };
        // Find the token now, so a missing module or token is reported before any PIN
        // prompt.
        {
            let mut st = p.lock();
            p.ensure(&mut st, false)?;
        }
        Ok(p)
    }

    /// The PKCS#11 library in use.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The key label (URI `object`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The pinned version (URI `id`), or `None` to follow the newest usable one.
    pub fn pinned_version(&self) -> Option<u32> {
        self.pinned
    }

    /// The token the provider is connected to (or the URI's token filter), for messages.
    pub fn token_description(&self) -> String {
        self.describe_token(&self.lock())
    }
}

impl KekProvider for Pkcs11Provider {
    fn uri(&self) -> String {
        self.uri.to_string()
    }

    fn wrap(&self, aek: &Key32) -> Result<WrappedKey, KekError> {
        self.with_session(|c| {
            let found = self.find(c)?;
            let v = self.choose(c, &found)?;
            let Some(ver) = found.versions.get(&v) else {
                return Err(self.not_found(c, &found, Some(v)).into());
            };
            self.wrap_version(c, v, ver, aek)
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Key32, KekError> {
        self.with_session(|c| {
            let found = self.find(c)?;
            let v = wrapped.key_version;
            let Some(ver) = found.versions.get(&v) else {
                return Err(self.not_found(c, &found, Some(v)).into());
            };
            self.check_usable(c, v, ver)?;
            self.unwrap_version(c, ver, wrapped)
        })
    }

    fn current_version(&self) -> Result<Option<u32>, KekError> {
        self.with_session(|c| {
            let found = self.find(c)?;
            Ok(Some(self.choose(c, &found)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pkcs11Provider>();
    }
}
