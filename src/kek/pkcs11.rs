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

use super::passphrase::{Passphrase, PassphraseSource};
use super::pkcs11_uri::{ObjectType, PinSource, Pkcs11Uri};
use super::{KekError, KekProvider, ProviderOptions, Refusal, WrappedKey, mechanism};
use crate::crypto::Key32;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{Date, RawAuthPin};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use zeroize::{Zeroize, Zeroizing};

/// Environment variable forcing the wrapping mechanism: `aes-key-wrap-pad`,
/// `aes-key-wrap`, `aes-gcm`, `rsa-oaep-sha256` or `rsa-oaep-sha1`.
pub const ENV_MECHANISM: &str = "KEKFS_PKCS11_MECHANISM";

/// Smallest RSA modulus accepted as a KEK, in bits.
pub const MIN_RSA_BITS: u64 = 3072;

/// AAD prefix of an AES-GCM wrapping (followed by label ‖ 0x00 ‖ version u32 LE).
pub const GCM_AAD_LABEL: &[u8] = b"kekfs pkcs11 wrap v1";
/// AES-GCM IV length (generated by kekfs, stored first in the blob).
pub const GCM_IV_LEN: usize = 12;
/// AES-GCM tag length (stored last in the blob).
pub const GCM_TAG_LEN: usize = 16;
/// Length of an AES key-wrap (RFC 3394 / RFC 5649) blob for a 32-byte AEK.
pub const KEY_WRAP_LEN: usize = 40;

/// Modules tried, in order, when the URI names none: the p11-kit proxy (every module
/// p11-kit is configured with), then SoftHSM2 at the Debian/Ubuntu, multiarch and
/// Fedora/Arch locations.
pub const DEFAULT_MODULES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib64/p11-kit-proxy.so",
    "/usr/lib/p11-kit-proxy.so",
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// Directories searched for `module-name=NAME` (as `NAME.so`, `libNAME.so` or `NAME`).
pub const MODULE_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
    "/usr/local/lib/pkcs11",
    "/usr/lib/softhsm",
    "/usr/lib/x86_64-linux-gnu/softhsm",
    "/usr/lib/aarch64-linux-gnu/softhsm",
    "/usr/lib64/softhsm",
    "/usr/local/lib/softhsm",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
];

// ---------------------------------------------------------------------------------------
// Versions ↔ CKA_ID

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

fn id_hex(id: &[u8]) -> String {
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

// ---------------------------------------------------------------------------------------
// Modules and the per-process context

/// Which PKCS#11 library a URI uses: `module-path`, else `module-name` looked up in
/// [`MODULE_DIRS`], else the first of [`DEFAULT_MODULES`] that exists.
pub fn resolve_module(u: &Pkcs11Uri) -> Result<PathBuf, KekError> {
    if let Some(p) = &u.module_path {
        let p = PathBuf::from(p);
        if !p.exists() {
            return Err(KekError::ModuleLoad(format!(
                "module-path {} does not exist; install the token's PKCS#11 library (for \
                 SoftHSM2: apt-get install softhsm2) or fix module-path in the KEK URI",
                p.display()
            )));
        }
        return Ok(p);
    }
    if let Some(name) = &u.module_name {
        let candidates = [
            format!("{name}.so"),
            format!("lib{name}.so"),
            name.to_string(),
        ];
        for dir in MODULE_DIRS {
            for c in &candidates {
                let p = Path::new(dir).join(c);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        return Err(KekError::ModuleLoad(format!(
            "no PKCS#11 module named {name:?} ({}) in {}; give its full path with \
             module-path=/path/to/lib.so",
            candidates.join(", "),
            MODULE_DIRS.join(", ")
        )));
    }
    DEFAULT_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            KekError::ModuleLoad(format!(
                "the KEK URI names no PKCS#11 module and none of the default ones exists ({}); \
                 install softhsm2 (or p11-kit-modules), or add \
                 ?module-path=/path/to/pkcs11-module.so to the URI",
                DEFAULT_MODULES.join(", ")
            ))
        })
}

struct Loaded {
    ctx: Pkcs11,
    pid: u32,
    /// Changes every time kekfs (re)initialises the library; sessions opened under another
    /// generation are void.
    generation: u64,
    /// kekfs's C_Initialize succeeded (rather than finding the library initialised by
    /// someone else in the process), so kekfs may finalise it to start over.
    owned: bool,
    /// Token calls hold it shared; re-initialising the library holds it exclusively, so no
    /// call of another provider is in flight while C_Finalize runs.
    calls: Arc<RwLock<()>>,
}

static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Loaded>>> = OnceLock::new();
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// An initialised library, as [`context`] hands it out.
#[derive(Clone, Debug)]
struct Module {
    ctx: Pkcs11,
    generation: u64,
    calls: Arc<RwLock<()>>,
}

fn contexts() -> MutexGuard<'static, HashMap<PathBuf, Loaded>> {
    // Only complete entries are ever inserted, so a poisoned map is still consistent.
    CONTEXTS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// C_Initialize `ctx`: `Ok(true)` if this call initialised it, `Ok(false)` if it already
/// was (by someone else in this process, or state inherited over a fork by a library that
/// survives it: usable either way).
fn initialize(module: &Path, ctx: &Pkcs11) -> Result<bool, KekError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(true),
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(false),
        Err(e) => Err(KekError::ModuleLoad(format!(
            "PKCS#11 module {} failed to initialise: {}; check the module's own \
             configuration (for SoftHSM2: $SOFTHSM2_CONF and the tokendir it names; for \
             the p11-kit client: $P11_KIT_SERVER_ADDRESS)",
            module.display(),
            ck_text(&e)
        ))),
    }
}

/// The initialised library for `module`: loaded and C_Initialize'd once per process. After
/// a fork the child initialises again (PKCS#11 state does not survive fork; SoftHSM2
/// resets itself in the child).
fn context(module: &Path) -> Result<Module, KekError> {
    let mut map = contexts();
    let pid = std::process::id();
    if let Some(l) = map.get(module)
        && l.pid == pid
    {
        return Ok(Module {
            ctx: l.ctx.clone(),
            generation: l.generation,
            calls: l.calls.clone(),
        });
    }
    let ctx = Pkcs11::new(module).map_err(|e| module_error(module, &e))?;
    let owned = initialize(module, &ctx)?;
    let loaded = Loaded {
        ctx: ctx.clone(),
        pid,
        generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        owned,
        calls: Arc::new(RwLock::new(())),
    };
    let m = Module {
        ctx,
        generation: loaded.generation,
        calls: loaded.calls.clone(),
    };
    map.insert(module.to_path_buf(), loaded);
    Ok(m)
}

/// Start the library over (C_Finalize, C_Initialize) if it is still at `generation`: the
/// way back after its connection to the token broke. A remoting module such as
/// p11-kit-client.so reaches its server only in C_Initialize: once the server went away,
/// every call fails (CKR_DEVICE_ERROR) or sees no token until the library is initialised
/// again. Every session of the old generation is void afterwards. Returns whether it did.
/// A library kekfs did not initialise itself is left alone.
fn reinitialize(module: &Path, generation: u64) -> bool {
    let (ctx, calls) = {
        let map = contexts();
        match map.get(module) {
            Some(l) if l.pid == std::process::id() && l.generation == generation && l.owned => {
                (l.ctx.clone(), l.calls.clone())
            }
            _ => return false,
        }
    };
    // No other provider's call is in flight while the library starts over.
    let _exclusive = calls.write().unwrap_or_else(PoisonError::into_inner);
    let mut map = contexts();
    let Some(l) = map.get_mut(module) else {
        return false;
    };
    if l.generation != generation {
        // Someone else started it over meanwhile.
        return true;
    }
    if let Err(e) = ctx.clone().finalize() {
        log::debug!("C_Finalize of {}: {}", module.display(), ck_text(&e));
    }
    l.generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
    match initialize(module, &ctx) {
        Ok(owned) => {
            l.owned = owned;
            log::debug!(
                "PKCS#11 module {} initialised again after a token error",
                module.display()
            );
            true
        }
        Err(e) => {
            // Not initialised now: the next call loads and initialises it from scratch.
            log::warn!("{e}");
            map.remove(module);
            true
        }
    }
}

fn module_error(module: &Path, e: &CkError) -> KekError {
    KekError::ModuleLoad(format!(
        "cannot load PKCS#11 module {}: {}; check that it is a PKCS#11 library for this \
         machine's architecture, or fix module-path in the KEK URI",
        module.display(),
        ck_text(e)
    ))
}

// ---------------------------------------------------------------------------------------
// Error mapping

/// `KeyFunctionNotPermitted` → `CKR_KEY_FUNCTION_NOT_PERMITTED`.
fn ckr_name(rv: RvError) -> String {
    let dbg = format!("{rv:?}");
    let mut out = String::from("CKR");
    for c in dbg.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn ck_text(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f} returned {}", ckr_name(*rv)),
        CkError::LibraryLoading(l) => l.to_string(),
        other => other.to_string(),
    }
}

fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Errors after which the session (or the library's state) is likely gone: reopen and
/// retry once.
fn is_session_error(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError
        )
    )
}

/// Errors after which the session handle is void (the link to the token broke, the token
/// went away, or the library lost its state): such a session is let go of without
/// C_CloseSession.
fn is_link_error(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::CryptokiNotInitialized
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError
        )
    )
}

/// Let go of a session: close it (`close`), or forget it without C_CloseSession when its
/// handle is void (see [`is_link_error`]) or belongs to an earlier library generation.
fn release(conn: Conn, close: bool) {
    if close {
        drop(conn);
    } else {
        std::mem::forget(conn.session);
    }
}

/// The generation of `module`'s library in this process, if it is initialised.
fn current_generation(module: &Path) -> Option<u64> {
    contexts()
        .get(module)
        .filter(|l| l.pid == std::process::id())
        .map(|l| l.generation)
}

/// Errors meaning "this token cannot do this mechanism (with this key)": try the next.
fn is_mechanism_error(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(
            RvError::MechanismInvalid
                | RvError::MechanismParamInvalid
                | RvError::FunctionNotSupported
                | RvError::ArgumentsBad
                | RvError::KeyTypeInconsistent
                | RvError::WrappingKeyTypeInconsistent
                | RvError::WrappingKeySizeRange
                | RvError::KeySizeRange
                | RvError::KeyFunctionNotPermitted
                | RvError::TemplateInconsistent
        )
    )
}

/// Map a token error to the kekfs error that names its cause. `what` says which operation
/// on what (e.g. `unwrapping with "vol-kek" version 1 on token 'kekfs'`); `refused_key`
/// is the key description used if the token refused the key.
fn map_error(e: &CkError, what: &str, refused_key: &str) -> KekError {
    let text = ck_text(e);
    let Some(rv) = rv_of(e) else {
        return match e {
            CkError::LibraryLoading(_)
            | CkError::NullFunctionPointer
            | CkError::MissingSymbol(_) => KekError::ModuleLoad(format!(
                "{what}: {text}; the module is not a complete PKCS#11 library"
            )),
            _ => KekError::Unreachable(format!("{what}: {text}")),
        };
    };
    use RvError as R;
    match rv {
        R::TokenNotPresent | R::DeviceRemoved | R::TokenNotRecognized | R::SlotIdInvalid => {
            KekError::TokenAbsent(format!(
                "{what}: {text}: the token is gone; insert or attach it (for SoftHSM2: check \
                 that $SOFTHSM2_CONF names the config whose tokendir holds the token) and retry"
            ))
        }
        R::PinIncorrect | R::PinInvalid | R::PinLenRange => KekError::BadPassphrase(format!(
            "{what}: {text}: wrong token PIN; check pin-source in the KEK URI (or --passfile)"
        )),
        R::PinLocked | R::PinExpired => KekError::PinLocked(format!(
            "{what}: {text}: the user PIN is locked or expired; the token's security officer \
             must unlock or reset it (pkcs11-tool --login --login-type so --init-pin, or \
             softhsm2-util for SoftHSM2)"
        )),
        R::UserPinNotInitialized => KekError::BadPassphrase(format!(
            "{what}: {text}: the token has no user PIN yet; initialise it (softhsm2-util \
             --init-token, or pkcs11-tool --init-pin) first"
        )),
        R::KeyFunctionNotPermitted => KekError::Refused {
            key: format!("{refused_key} (the token does not permit this use of the key: {text})"),
            reason: Refusal::Disabled,
        },
        R::KeyHandleInvalid
        | R::ObjectHandleInvalid
        | R::UnwrappingKeyHandleInvalid
        | R::WrappingKeyHandleInvalid => KekError::NotFound(format!(
            "{what}: {text}: the key object is gone from the token (destroyed); restore it \
             from a backup of the token"
        )),
        R::MechanismInvalid
        | R::MechanismParamInvalid
        | R::FunctionNotSupported
        | R::ArgumentsBad
        | R::KeyTypeInconsistent
        | R::WrappingKeyTypeInconsistent
        | R::UnwrappingKeyTypeInconsistent
        | R::WrappingKeySizeRange
        | R::UnwrappingKeySizeRange
        | R::KeySizeRange
        | R::KeyNotWrappable
        | R::KeyUnextractable
        | R::TemplateInconsistent
        | R::TemplateIncomplete
        | R::AttributeValueInvalid
        | R::AttributeTypeInvalid => KekError::Unsupported(format!(
            "{what}: {text}: the token does not support what kekfs needs here (AES key wrap \
             or AES-GCM for AES keys, RSA-OAEP for RSA keys, session objects)"
        )),
        R::EncryptedDataInvalid
        | R::EncryptedDataLenRange
        | R::WrappedKeyInvalid
        | R::WrappedKeyLenRange
        | R::DataInvalid
        | R::DataLenRange => KekError::UnwrapFailed(format!(
            "{what}: {text}: the wrapped key does not unwrap under this key; it was wrapped by \
             another key (same label on another token, or a re-created key) or it was altered"
        )),
        R::TokenWriteProtected => {
            KekError::Unsupported(format!("{what}: {text}: the token is write-protected"))
        }
        R::AttributeReadOnly | R::ActionProhibited | R::SessionReadOnly => {
            KekError::ChangeRefused(format!(
                "{what}: {text}: the token does not let this key be changed (CKA_MODIFIABLE \
                 false, or the token's policy); use the token's own tools"
            ))
        }
        _ => KekError::Unreachable(format!("{what}: {text}")),
    }
}

// ---------------------------------------------------------------------------------------
// Dates

/// A UTC calendar day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Ymd(u32, u32, u32);

impl fmt::Display for Ymd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.0, self.1, self.2)
    }
}

/// Parse a CK_DATE; `Ok(None)` for an empty (or all-zero / all-blank) date.
fn parse_date(d: &Date) -> Result<Option<Ymd>, String> {
    if d.is_empty() {
        return Ok(None);
    }
    let mut all = Vec::with_capacity(8);
    all.extend_from_slice(&d.year);
    all.extend_from_slice(&d.month);
    all.extend_from_slice(&d.day);
    if all.iter().all(|&b| b == b'0' || b == b' ' || b == 0) {
        return Ok(None);
    }
    let num = |s: &[u8]| -> Option<u32> {
        s.iter().try_fold(0u32, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
        })
    };
    let bad = || format!("invalid CK_DATE {:?}", String::from_utf8_lossy(&all));
    let (Some(y), Some(m), Some(day)) = (num(&d.year), num(&d.month), num(&d.day)) else {
        return Err(bad());
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    Ok(Some(Ymd(y, m, day)))
}

/// Today (UTC) from the system clock.
fn today() -> Ymd {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_from_days((secs / 86_400) as i64)
}

/// Days since 1970-01-01 → civil date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> Ymd {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    Ymd(y.max(0) as u32, m as u32, d as u32)
}

// ---------------------------------------------------------------------------------------
// Key objects on the token

/// One key object with a kekfs version id.
#[derive(Debug, Clone)]
struct Obj {
    handle: ObjectHandle,
    class: ObjectClass,
    key_type: Option<KeyType>,
    unwrap: Option<bool>,
    bits: Option<u64>,
    start: DateVal,
    end: DateVal,
}

/// A validity date as read from the token.
#[derive(Debug, Clone)]
enum DateVal {
    /// Not set (empty).
    Unset,
    /// A calendar day.
    Day(Ymd),
    /// Set, but the token does not return a usable value (why).
    Unreadable(String),
}

/// The objects of one key version.
#[derive(Debug, Default)]
struct Version {
    secret: Vec<Obj>,
    private: Vec<Obj>,
    public: Vec<Obj>,
}

impl Version {
    fn kind(&self) -> String {
        if let Some(s) = self.secret.first() {
            match (s.key_type, s.bits) {
                (Some(KeyType::AES), Some(b)) => format!("AES-{b}"),
                (Some(KeyType::AES), None) => "AES".into(),
                _ => "secret key of an unsupported type".into(),
            }
        } else {
            let bits = self.public.iter().chain(&self.private).find_map(|o| o.bits);
            match bits {
                Some(b) => format!("RSA-{b}"),
                None => "RSA".into(),
            }
        }
    }

    fn objects(&self) -> impl Iterator<Item = &Obj> {
        self.secret.iter().chain(&self.private).chain(&self.public)
    }
}

/// What a search by label found.
struct Found {
    versions: BTreeMap<u32, Version>,
    /// Objects with the label whose CKA_ID is not a version number.
    ignored: Vec<String>,
}

impl Found {
    fn summary(&self) -> String {
        if self.versions.is_empty() {
            return "none".into();
        }
        self.versions
            .iter()
            .map(|(v, ver)| format!("{v} ({})", ver.kind()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The wrapping mechanisms kekfs knows, in preference order within each key kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mech {
    AesKwp,
    AesKw,
    AesGcm,
    OaepSha256,
    OaepSha1,
}

impl Mech {
    const AES: [Mech; 3] = [Mech::AesKwp, Mech::AesKw, Mech::AesGcm];
    const RSA: [Mech; 2] = [Mech::OaepSha256, Mech::OaepSha1];

    fn id(self) -> u16 {
        match self {
            Mech::AesKwp => mechanism::PKCS11_AES_KEY_WRAP_PAD,
            Mech::AesKw => mechanism::PKCS11_AES_KEY_WRAP,
            Mech::AesGcm => mechanism::PKCS11_AES_GCM,
            Mech::OaepSha256 => mechanism::PKCS11_RSA_OAEP_SHA256,
            Mech::OaepSha1 => mechanism::PKCS11_RSA_OAEP_SHA1,
        }
    }

    fn from_id(id: u16) -> Option<Mech> {
        [
            Mech::AesKwp,
            Mech::AesKw,
            Mech::AesGcm,
            Mech::OaepSha256,
            Mech::OaepSha1,
        ]
        .into_iter()
        .find(|m| m.id() == id)
    }

    fn name(self) -> &'static str {
        match self {
            Mech::AesKwp => "aes-key-wrap-pad",
            Mech::AesKw => "aes-key-wrap",
            Mech::AesGcm => "aes-gcm",
            Mech::OaepSha256 => "rsa-oaep-sha256",
            Mech::OaepSha1 => "rsa-oaep-sha1",
        }
    }

    fn ckm(self) -> &'static str {
        match self {
            Mech::AesKwp => "CKM_AES_KEY_WRAP_PAD",
            Mech::AesKw => "CKM_AES_KEY_WRAP",
            Mech::AesGcm => "CKM_AES_GCM",
            Mech::OaepSha256 => "CKM_RSA_PKCS_OAEP (SHA-256)",
            Mech::OaepSha1 => "CKM_RSA_PKCS_OAEP (SHA-1)",
        }
    }

    fn is_aes(self) -> bool {
        matches!(self, Mech::AesKwp | Mech::AesKw | Mech::AesGcm)
    }

    fn mechanism_type(self) -> MechanismType {
        match self {
            Mech::AesKwp => MechanismType::AES_KEY_WRAP_PAD,
            Mech::AesKw => MechanismType::AES_KEY_WRAP,
            Mech::AesGcm => MechanismType::AES_GCM,
            Mech::OaepSha256 | Mech::OaepSha1 => MechanismType::RSA_PKCS_OAEP,
        }
    }

    fn oaep(self) -> Option<PkcsOaepParams<'static>> {
        match self {
            Mech::OaepSha256 => Some(PkcsOaepParams::new(
                MechanismType::SHA256,
                PkcsMgfType::MGF1_SHA256,
                PkcsOaepSource::empty(),
            )),
            Mech::OaepSha1 => Some(PkcsOaepParams::new(
                MechanismType::SHA1,
                PkcsMgfType::MGF1_SHA1,
                PkcsOaepSource::empty(),
            )),
            _ => None,
        }
    }
}

/// The mechanism forced by `KEKFS_PKCS11_MECHANISM`, if set.
fn forced_mechanism() -> Result<Option<Mech>, KekError> {
    let Some(v) = std::env::var_os(ENV_MECHANISM) else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    if v.is_empty() {
        return Ok(None);
    }
    [
        Mech::AesKwp,
        Mech::AesKw,
        Mech::AesGcm,
        Mech::OaepSha256,
        Mech::OaepSha1,
    ]
    .into_iter()
    .find(|m| m.name() == v)
    .map(Some)
    .ok_or_else(|| {
        KekError::Unsupported(format!(
            "{ENV_MECHANISM}={v} is not a mechanism kekfs knows; use aes-key-wrap-pad, \
             aes-key-wrap, aes-gcm, rsa-oaep-sha256 or rsa-oaep-sha1, or unset it"
        ))
    })
}

fn gcm_aad(label: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(GCM_AAD_LABEL.len() + label.len() + 5);
    aad.extend_from_slice(GCM_AAD_LABEL);
    aad.extend_from_slice(label.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_le_bytes());
    aad
}

/// Template of the session object an AEK lives in while the token wraps it or after it
/// unwraps it: never on the token, readable by kekfs, usable for nothing else.
fn session_aek_template(value: Option<Vec<u8>>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ];
    if let Some(v) = value {
        t.push(Attribute::Value(v));
    }
    t
}

fn zeroize_template(t: &mut [Attribute]) {
    for a in t {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The provider

/// A failure inside a session operation: a kekfs error already, or a token error to
/// classify (and maybe retry on a fresh session).
enum Fail {
    Kek(KekError),
    Ck(CkError, String),
}

impl From<KekError> for Fail {
    fn from(e: KekError) -> Self {
        Fail::Kek(e)
    }
}

trait CkContext<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, Fail>;
}

impl<T> CkContext<T> for Result<T, CkError> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, Fail> {
        self.map_err(|e| Fail::Ck(e, what()))
    }
}

/// An open session on the token the URI selects.
struct Conn {
    pid: u32,
    /// The library generation the session was opened under (see [`reinitialize`]).
    generation: u64,
    session: Session,
    ctx: Pkcs11,
    slot: Slot,
    /// e.g. `token 'kekfs' (serial 1a2b…, slot 123)`.
    token: String,
    login_required: bool,
    protected_path: bool,
    logged_in: bool,
    mechanisms: Vec<MechanismType>,
}

#[derive(Default)]
struct State {
    conn: Option<Conn>,
    /// The PIN that last logged in successfully (kept to log in again after a token error).
    pin: Option<Passphrase>,
}

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

/// What `kekfs key create/rotate --kek pkcs11:…` made.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The new version number (= its CKA_ID).
    pub version: u32,
    /// `AES-256` or `RSA-3072`.
    pub kind: String,
    /// The token it lives on.
    pub token: String,
    /// The KEK URI without `id` (follows the newest version).
    pub uri: String,
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // State is replaced as a whole (a session, a PIN); a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn token_filter(&self) -> String {
        let u = &self.uri;
        let mut parts = Vec::new();
        let fields: [(&str, &Option<String>); 6] = [
            ("token", &u.token),
            ("manufacturer", &u.manufacturer),
            ("serial", &u.serial),
            ("model", &u.model),
            ("slot-description", &u.slot_description),
            ("slot-manufacturer", &u.slot_manufacturer),
        ];
        for (n, v) in fields {
            if let Some(v) = v {
                parts.push(format!("{n}={v:?}"));
            }
        }
        if let Some(id) = u.slot_id {
            parts.push(format!("slot-id={id}"));
        }
        if parts.is_empty() {
            "any token".into()
        } else {
            parts.join(", ")
        }
    }

    /// Is the module p11-kit's RPC client (the token lives in a `p11-kit server` process)?
    fn is_remote(&self) -> bool {
        self.module
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("p11-kit-client"))
    }

    fn softhsm_hint(&self) -> String {
        let m = self.module.to_string_lossy();
        if self.is_remote() {
            // The client module reaches a `p11-kit server` in another process.
            let addr = match std::env::var_os("P11_KIT_SERVER_ADDRESS") {
                Some(a) => format!("$P11_KIT_SERVER_ADDRESS is {}", a.to_string_lossy()),
                None => "$P11_KIT_SERVER_ADDRESS is not set, so it tries \
                         $XDG_RUNTIME_DIR/p11-kit/pkcs11"
                    .into(),
            };
            format!(
                "; the p11-kit client module shows the tokens of a `p11-kit server` ({addr}): \
                 check that the server runs and exports this token, and that this process may \
                 connect to its socket"
            )
        } else if m.contains("softhsm") || m.contains("p11-kit") {
            match std::env::var_os("SOFTHSM2_CONF") {
                Some(c) => format!(
                    "; SoftHSM2 reads its tokens from the tokendir in $SOFTHSM2_CONF ({})",
                    c.to_string_lossy()
                ),
                None => "; SOFTHSM2_CONF is not set, so SoftHSM2 uses its system-wide config \
                         (create a private token with scripts/softhsm-setup.sh DIR and export \
                         the SOFTHSM2_CONF it prints)"
                    .into(),
            }
        } else {
            String::new()
        }
    }

    /// Find the one token the URI selects, and open a session on it.
    fn connect(&self) -> Result<Conn, KekError> {
        let Module {
            ctx, generation, ..
        } = context(&self.module)?;
        let module = self.module.display();
        let whole = |e: CkError, what: &str| {
            map_error(&e, &format!("{what} (module {module})"), &self.label)
        };
        let u = &self.uri;
        if u.library_manufacturer.is_some()
            || u.library_description.is_some()
            || u.library_version.is_some()
        {
            let info = ctx
                .get_library_info()
                .map_err(|e| whole(e, "reading library info"))?;
            let v = info.library_version();
            let ok = u
                .library_manufacturer
                .as_deref()
                .is_none_or(|m| m == info.manufacturer_id())
                && u.library_description
                    .as_deref()
                    .is_none_or(|d| d == info.library_description())
                && u.library_version
                    .is_none_or(|lv| lv.major == v.major() && lv.minor == v.minor());
            if !ok {
                return Err(KekError::TokenAbsent(format!(
                    "module {module} is {:?} by {:?}, version {}.{}, which does not match the \
                     library-* attributes of the KEK URI; fix them or module-path",
                    info.library_description(),
                    info.manufacturer_id(),
                    v.major(),
                    v.minor()
                )));
            }
        }
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| whole(e, "listing slots"))?;
        let mut seen = Vec::new();
        let mut matching = Vec::new();
        for slot in slots {
            // A token removed between listing and asking is simply not there.
            let Ok(ti) = ctx.get_token_info(slot) else {
                continue;
            };
            let si = ctx.get_slot_info(slot).ok();
            let desc = format!(
                "token '{}' (serial {}, {} {}, slot {})",
                ti.label(),
                ti.serial_number(),
                ti.manufacturer_id(),
                ti.model(),
                slot.id()
            );
            if !ti.token_initialized() {
                seen.push(format!("slot {} (token not initialised)", slot.id()));
                continue;
            }
            seen.push(desc.clone());
            let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
            let ok = eq(&u.token, ti.label())
                && eq(&u.manufacturer, ti.manufacturer_id())
                && eq(&u.serial, ti.serial_number())
                && eq(&u.model, ti.model())
                && u.slot_id.is_none_or(|id| id == slot.id())
                && si.as_ref().is_none_or(|si| {
                    eq(&u.slot_description, si.slot_description())
                        && eq(&u.slot_manufacturer, si.manufacturer_id())
                });
            if ok {
                matching.push((slot, ti, desc));
            }
        }
        let listed = if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join("; ")
        };
        if matching.len() > 1 {
            return Err(KekError::BadUri(format!(
                "the KEK URI matches {} tokens in module {module} ({}); add token=LABEL or \
                 serial=SERIAL to select one",
                matching.len(),
                matching
                    .iter()
                    .map(|m| m.2.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        if seen.is_empty() && self.is_remote() {
            // The p11-kit client shows no slot at all when it cannot reach its server.
            return Err(KekError::Unreachable(format!(
                "no token at all in PKCS#11 module {module}{}",
                self.softhsm_hint()
            )));
        }
        let Some((slot, ti, desc)) = matching.pop() else {
            return Err(KekError::TokenAbsent(format!(
                "no token matching {} in PKCS#11 module {module}; tokens present: {listed}{}",
                self.token_filter(),
                self.softhsm_hint()
            )));
        };
        let session = match ctx.open_rw_session(slot) {
            Ok(s) => s,
            Err(CkError::Pkcs11(RvError::TokenWriteProtected, _)) => ctx
                .open_ro_session(slot)
                .map_err(|e| whole(e, &format!("opening a session on {desc}")))?,
            Err(e) => return Err(whole(e, &format!("opening a session on {desc}"))),
        };
        let mechanisms = ctx.get_mechanism_list(slot).unwrap_or_default();
        Ok(Conn {
            pid: std::process::id(),
            generation,
            session,
            ctx,
            slot,
            token: desc,
            login_required: ti.login_required(),
            protected_path: ti.protected_authentication_path(),
            logged_in: false,
            mechanisms,
        })
    }

    /// An open (and, if `login`, logged-in) session.
    fn ensure<'a>(&self, st: &'a mut State, login: bool) -> Result<&'a Conn, KekError> {
        let State { conn, pin } = st;
        if conn.as_ref().is_some_and(|c| {
            c.pid != std::process::id() || current_generation(&self.module) != Some(c.generation)
        }) && let Some(old) = conn.take()
        {
            // Opened before a fork (the handle belongs to the parent's library state) or
            // before the library was initialised again: closing it would act on a void
            // handle, or on another session that now has the same number. Let go of it.
            release(old, false);
        }
        // A kept session may have died (token error, C_CloseAllSessions) or been logged
        // out by someone else in this process (private objects would then silently
        // vanish from searches): ask the token before trusting it.
        if login
            && let Some(c) = conn.as_mut()
            && c.logged_in
            && c.login_required
        {
            match c.session.get_session_info().map(|i| i.session_state()) {
                Ok(SessionState::RoUser | SessionState::RwUser) => {}
                Ok(_) => c.logged_in = false,
                Err(e) => {
                    log::debug!(
                        "session on {} is gone ({}); reopening",
                        c.token,
                        ck_text(&e)
                    );
                    if let Some(old) = conn.take() {
                        release(old, !is_link_error(&e));
                    }
                }
            }
        }
        if conn.is_none() {
            *conn = Some(self.connect()?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(KekError::Unreachable("no session".into()));
        };
        if login && !c.logged_in {
            self.login(c, pin)?;
            c.logged_in = true;
        }
        Ok(c)
    }

    fn login(&self, c: &Conn, pin: &mut Option<Passphrase>) -> Result<(), KekError> {
        if !c.login_required {
            return Ok(());
        }
        if let Ok(ti) = c.ctx.get_token_info(c.slot)
            && ti.user_pin_locked()
        {
            return Err(KekError::PinLocked(format!(
                "the user PIN of {} is locked (too many wrong PINs); the token's security \
                 officer must unlock or reset it (pkcs11-tool --login --login-type so \
                 --init-pin, or softhsm2-util for SoftHSM2)",
                c.token
            )));
        }
        let r = if c.protected_path {
            // PIN pad or biometric reader: the token asks for the PIN itself.
            c.session.login(UserType::User, None)
        } else {
            if pin.is_none() {
                let read = self.pin_source.read(&format!("PIN for {}", c.token), false);
                *pin = Some(read.map_err(|e| match e {
                    // No PIN to be had is a PIN problem, not a keystore one.
                    KekError::Io(m) => KekError::BadPassphrase(format!(
                        "{m}; or add pin-source=file:/path/to/pin or pin-source=env:VARIABLE \
                         to the KEK URI"
                    )),
                    other => other,
                })?);
            }
            let Some(p) = pin.as_ref() else {
                return Err(KekError::BadPassphrase("no PIN".into()));
            };
            // RawAuthPin (secrecy::SecretBox) zeroizes this copy when dropped.
            let raw = RawAuthPin::new(Box::new(p.as_bytes().to_vec()));
            c.session.login_with_raw(UserType::User, &raw)
        };
        match r {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => {
                // Never keep a PIN the token refused.
                *pin = None;
                let what = format!("logging in to {}", c.token);
                let mut err = map_error(&e, &what, &self.label);
                if let KekError::BadPassphrase(m) = &mut err
                    && rv_of(&e) == Some(RvError::PinIncorrect)
                {
                    *m = format!(
                        "wrong PIN for {} (read from {}); fix the PIN there",
                        c.token, self.pin_desc
                    );
                    if let Ok(ti) = c.ctx.get_token_info(c.slot) {
                        if ti.user_pin_final_try() {
                            m.push_str("; WARNING: one more wrong PIN locks the token");
                        } else if ti.user_pin_count_low() {
                            m.push_str("; the token reports that few tries are left");
                        }
                    }
                }
                Err(err)
            }
        }
    }

    /// Run `f` on a logged-in session; a failure that looks like a lost session drops the
    /// session and retries once on a new one. If no session can be had because the link
    /// to the token is down (a remoting module whose server went away, a token removed),
    /// the library is initialised again and the connection retried once: that is how a
    /// provider comes back when the server or token does, without restarting the process.
    fn with_session<R>(&self, mut f: impl FnMut(&Conn) -> Result<R, Fail>) -> Result<R, KekError> {
        let mut st = self.lock();
        let mut retried = false;
        let mut restarted = false;
        loop {
            let module = context(&self.module)?;
            let calls = module.calls.read().unwrap_or_else(PoisonError::into_inner);
            let conn = match self.ensure(&mut st, true) {
                Ok(c) => c,
                Err(e @ (KekError::Unreachable(_) | KekError::TokenAbsent(_))) if !restarted => {
                    restarted = true;
                    drop(calls);
                    if let Some(old) = st.conn.take() {
                        release(old, false);
                    }
                    if reinitialize(&self.module, module.generation) {
                        log::debug!("{e}; trying again after initialising the module again");
                        continue;
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            match f(conn) {
                Ok(r) => return Ok(r),
                Err(Fail::Kek(e)) => return Err(e),
                Err(Fail::Ck(e, what)) => {
                    if is_session_error(&e) {
                        if let Some(old) = st.conn.take() {
                            release(old, !is_link_error(&e));
                        }
                        if !retried {
                            retried = true;
                            log::debug!("{what}: {}; reopening the session", ck_text(&e));
                            continue;
                        }
                    }
                    let key = format!("{:?} on {}", self.label, self.describe_token(&st));
                    return Err(map_error(&e, &what, &key));
                }
            }
        }
    }

    fn describe_token(&self, st: &State) -> String {
        st.conn
            .as_ref()
            .map(|c| c.token.clone())
            .unwrap_or_else(|| self.token_filter())
    }

    /// Every key object labelled `object`, grouped by version.
    fn find(&self, c: &Conn) -> Result<Found, Fail> {
        let label = self.label.as_bytes().to_vec();
        let handles = c
            .session
            .find_objects(&[Attribute::Label(label)])
            .during(|| format!("searching {} for key {:?}", c.token, self.label))?;
        let mut found = Found {
            versions: BTreeMap::new(),
            ignored: Vec::new(),
        };
        for h in handles {
            let attrs = match c.session.get_attributes(
                h,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::Id,
                    AttributeType::Unwrap,
                    AttributeType::ValueLen,
                    AttributeType::ModulusBits,
                    AttributeType::Modulus,
                ],
            ) {
                Ok(a) => a,
                // Destroyed between search and read: not there.
                Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
                Err(e) => {
                    return Err(Fail::Ck(
                        e,
                        format!("reading key {:?} on {}", self.label, c.token),
                    ));
                }
            };
            let mut class = None;
            let mut key_type = None;
            let mut id = None;
            let mut unwrap = None;
            let mut bits = None;
            for a in attrs {
                match a {
                    Attribute::Class(x) => class = Some(x),
                    Attribute::KeyType(x) => key_type = Some(x),
                    Attribute::Id(x) => id = Some(x),
                    Attribute::Unwrap(x) => unwrap = Some(x),
                    Attribute::ValueLen(n) => bits = Some(u64::from(n) * 8),
                    Attribute::ModulusBits(n) => bits = Some(u64::from(n)),
                    Attribute::Modulus(m) if bits.is_none() => {
                        let lead = m.iter().take_while(|&&b| b == 0).count();
                        bits = Some(((m.len() - lead) * 8) as u64);
                    }
                    _ => {}
                }
            }
            let Some(class) = class else { continue };
            let wanted = match class {
                ObjectClass::SECRET_KEY => !matches!(
                    self.uri.object_type,
                    Some(ObjectType::Private | ObjectType::Public)
                ),
                ObjectClass::PRIVATE_KEY | ObjectClass::PUBLIC_KEY => {
                    !matches!(self.uri.object_type, Some(ObjectType::SecretKey))
                }
                _ => false,
            };
            if !wanted {
                continue;
            }
            let id = id.unwrap_or_default();
            let Some(v) = id_to_version(&id) else {
                found.ignored.push(id_hex(&id));
                continue;
            };
            // Dates separately: a malformed date must not hide the rest of the key.
            let (start, end) = self.dates(c, h)?;
            let obj = Obj {
                handle: h,
                class,
                key_type,
                unwrap,
                bits,
                start,
                end,
            };
            let ver = found.versions.entry(v).or_default();
            match class {
                ObjectClass::SECRET_KEY => ver.secret.push(obj),
                ObjectClass::PRIVATE_KEY => ver.private.push(obj),
                _ => ver.public.push(obj),
            }
        }
        Ok(found)
    }

    /// CKA_START_DATE and CKA_END_DATE, each read on its own. A date the token holds but
    /// cannot return is `Unreadable`: SoftHSM 2.6 stores dates of private objects without
    /// the encryption it applies to their other attributes and then fails to read them back
    /// (CKR_GENERAL_ERROR), and a malformed value is no better. kekfs cannot check such a
    /// date, so the key is refused (fail closed) until the date is cleared or fixed.
    fn dates(&self, c: &Conn, h: ObjectHandle) -> Result<(DateVal, DateVal), Fail> {
        let mut out = [DateVal::Unset, DateVal::Unset];
        for (i, ty) in [AttributeType::StartDate, AttributeType::EndDate]
            .into_iter()
            .enumerate()
        {
            let val = match c.session.get_attributes(h, &[ty]) {
                Ok(attrs) => match attrs.first() {
                    Some(Attribute::StartDate(d) | Attribute::EndDate(d)) => match parse_date(d) {
                        Ok(Some(day)) => DateVal::Day(day),
                        Ok(None) => DateVal::Unset,
                        Err(m) => DateVal::Unreadable(m),
                    },
                    _ => DateVal::Unset,
                },
                Err(CkError::Pkcs11(
                    rv @ (RvError::GeneralError | RvError::AttributeSensitive),
                    _,
                )) => DateVal::Unreadable(format!("the token answers {}", ckr_name(rv))),
                Err(e @ CkError::Pkcs11(..)) => {
                    return Err(Fail::Ck(
                        e,
                        format!(
                            "reading the validity dates of key {:?} on {}",
                            self.label, c.token
                        ),
                    ));
                }
                Err(e) => DateVal::Unreadable(e.to_string()),
            };
            out[i] = val;
        }
        let [start, end] = out;
        Ok((start, end))
    }

    fn key_desc(&self, c: &Conn, v: u32) -> String {
        format!(
            "{:?} version {v} (CKA_ID {}) on {}",
            self.label,
            id_hex(&version_to_id(v)),
            c.token
        )
    }

    /// Check the version's objects are coherent and usable today: refusals kekfs enforces
    /// itself (CKA_UNWRAP false, CKA_START_DATE/CKA_END_DATE).
    fn check_usable(&self, c: &Conn, v: u32, ver: &Version) -> Result<(), KekError> {
        let desc = self.key_desc(c, v);
        let ambiguous = |what: &str, n: usize| {
            KekError::BadUri(format!(
                "{desc} is ambiguous: {n} {what} objects share that label and CKA_ID; kekfs \
                 cannot tell which one holds the volume's key: destroy or relabel the extra ones"
            ))
        };
        if ver.secret.len() > 1 {
            return Err(ambiguous("secret key", ver.secret.len()));
        }
        if ver.private.len() > 1 {
            return Err(ambiguous("private key", ver.private.len()));
        }
        if ver.public.len() > 1 {
            return Err(ambiguous("public key", ver.public.len()));
        }
        let has_rsa = !ver.private.is_empty() || !ver.public.is_empty();
        if !ver.secret.is_empty() && has_rsa {
            return Err(ambiguous("secret and RSA key", 2));
        }
        let unwrapper = ver.secret.first().or(ver.private.first());
        if let Some(o) = unwrapper
            && o.unwrap == Some(false)
        {
            return Err(KekError::Refused {
                key: format!("{desc} (CKA_UNWRAP is false on the token object)"),
                reason: Refusal::Disabled,
            });
        }
        let now = today();
        let unreadable = |attr: &str, why: &str| {
            format!(
                "{desc} ({attr} is set but cannot be read: {why}; kekfs cannot check it and \
                 refuses the key until the date is cleared; SoftHSM 2.6 cannot read back dates \
                 set on private keys)"
            )
        };
        for o in ver.objects() {
            match &o.start {
                DateVal::Day(s) if now < *s => {
                    return Err(KekError::Refused {
                        key: format!("{desc} (CKA_START_DATE is {s}, today is {now} UTC)"),
                        reason: Refusal::NotYetValid,
                    });
                }
                DateVal::Unreadable(why) => {
                    return Err(KekError::Refused {
                        key: unreadable("CKA_START_DATE", why),
                        reason: Refusal::NotYetValid,
                    });
                }
                _ => {}
            }
            match &o.end {
                DateVal::Day(e) if now > *e => {
                    return Err(KekError::Refused {
                        key: format!("{desc} (CKA_END_DATE was {e}, today is {now} UTC)"),
                        reason: Refusal::Expired,
                    });
                }
                DateVal::Unreadable(why) => {
                    return Err(KekError::Refused {
                        key: unreadable("CKA_END_DATE", why),
                        reason: Refusal::Expired,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn not_found(&self, c: &Conn, found: &Found, v: Option<u32>) -> KekError {
        let ignored = if found.ignored.is_empty() {
            String::new()
        } else {
            format!(
                "; objects with this label whose CKA_ID is not a kekfs version number: {}",
                found.ignored.join(", ")
            )
        };
        let what = match v {
            Some(v) => format!("key {:?} has no version {v} on {}", self.label, c.token),
            None => format!("no key {:?} on {}", self.label, c.token),
        };
        let hint = if found.versions.is_empty() {
            format!(
                "; create it with `kekfs key create --kek '{}'`, or fix object= in the KEK URI",
                self.uri
            )
        } else {
            "; the key object was destroyed, or this is not the token that wrapped the volume"
                .into()
        };
        KekError::NotFound(format!(
            "{what} (versions present: {}){ignored}{hint}",
            found.summary()
        ))
    }

    /// The version `wrap` uses now: the pinned one, else the newest usable one.
    fn choose(&self, c: &Conn, found: &Found) -> Result<u32, KekError> {
        if let Some(v) = self.pinned {
            let Some(ver) = found.versions.get(&v) else {
                return Err(self.not_found(c, found, Some(v)));
            };
            self.check_usable(c, v, ver)?;
            return Ok(v);
        }
        let mut first_err = None;
        for (&v, ver) in found.versions.iter().rev() {
            match self.check_usable(c, v, ver) {
                Ok(()) => return Ok(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| self.not_found(c, found, None)))
    }

    fn has_mechanism(c: &Conn, m: Mech) -> bool {
        // A token that cannot list its mechanisms gets the benefit of the doubt.
        c.mechanisms.is_empty() || c.mechanisms.contains(&m.mechanism_type())
    }

    fn wrap_version(
        &self,
        c: &Conn,
        v: u32,
        ver: &Version,
        aek: &Key32,
    ) -> Result<WrappedKey, Fail> {
        let desc = self.key_desc(c, v);
        let forced = forced_mechanism()?;
        let (candidates, key): (Vec<Mech>, &Obj) = if let Some(s) = ver.secret.first() {
            if s.key_type != Some(KeyType::AES) {
                return Err(KekError::Unsupported(format!(
                    "{desc} is a secret key but not an AES key; kekfs wraps with AES or RSA keys"
                ))
                .into());
            }
            if let Some(bits) = s.bits
                && bits != 256
            {
                return Err(KekError::Unsupported(format!(
                    "{desc} is AES-{bits}; kekfs needs AES-256 to wrap a 256-bit volume key \
                     (create one with `kekfs key create --kek`)"
                ))
                .into());
            }
            (Mech::AES.to_vec(), s)
        } else {
            let Some(public) = ver.public.first() else {
                return Err(KekError::Unsupported(format!(
                    "{desc} has a private key but no public key object to wrap with; import the \
                     public key with the same label and CKA_ID"
                ))
                .into());
            };
            if public.key_type != Some(KeyType::RSA) {
                return Err(KekError::Unsupported(format!(
                    "{desc} is not an RSA key pair; kekfs wraps with AES or RSA keys"
                ))
                .into());
            }
            let bits = ver.objects().find_map(|o| o.bits).unwrap_or(0);
            if bits < MIN_RSA_BITS {
                return Err(KekError::Unsupported(format!(
                    "{desc} is RSA-{bits}; kekfs needs RSA keys of at least {MIN_RSA_BITS} bits"
                ))
                .into());
            }
            (Mech::RSA.to_vec(), public)
        };
        let candidates: Vec<Mech> = match forced {
            Some(m) if candidates.contains(&m) => vec![m],
            Some(m) => {
                return Err(KekError::Unsupported(format!(
                    "{ENV_MECHANISM}={} does not apply to {desc} ({})",
                    m.name(),
                    ver.kind()
                ))
                .into());
            }
            None => candidates
                .into_iter()
                .filter(|&m| Self::has_mechanism(c, m))
                .collect(),
        };
        let mut last = None;
        for m in candidates {
            match self.wrap_with(c, m, key.handle, v, aek) {
                Ok(blob) => {
                    return Ok(WrappedKey {
                        mechanism: m.id(),
                        key_version: v,
                        blob,
                    });
                }
                Err(Fail::Ck(e, what)) if is_mechanism_error(&e) => {
                    log::debug!("{what}: {}; trying the next mechanism", ck_text(&e));
                    last = Some((e, what));
                }
                Err(e) => return Err(e),
            }
        }
        Err(match last {
            Some((e, what)) => match map_error(&e, &what, &desc) {
                KekError::Unsupported(m) => {
                    KekError::Unsupported(format!("{m}; no wrapping mechanism worked with {desc}"))
                }
                other => other,
            },
            None => KekError::Unsupported(format!(
                "{} supports none of the mechanisms kekfs wraps with for {} keys ({})",
                c.token,
                ver.kind(),
                if key.class == ObjectClass::SECRET_KEY {
                    "CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP, CKM_AES_GCM"
                } else {
                    "CKM_RSA_PKCS_OAEP"
                }
            )),
        }
        .into())
    }

    fn wrap_with(
        &self,
        c: &Conn,
        m: Mech,
        key: ObjectHandle,
        v: u32,
        aek: &Key32,
    ) -> Result<Vec<u8>, Fail> {
        let s = &c.session;
        let what = || format!("wrapping with {} under {}", m.ckm(), self.key_desc(c, v));
        if m == Mech::AesGcm {
            let mut iv: [u8; GCM_IV_LEN] = crate::crypto::random_array();
            let aad = gcm_aad(&self.label, v);
            let ct = {
                let params = GcmParams::new(&mut iv, &aad, ((GCM_TAG_LEN * 8) as u64).into())
                    .during(what)?;
                s.encrypt(&Mechanism::AesGcm(params), key, aek.expose())
                    .during(what)?
            };
            if ct.len() != Key32::LEN + GCM_TAG_LEN {
                return Err(KekError::Unsupported(format!(
                    "{}: the token returned {} bytes, expected {}",
                    what(),
                    ct.len(),
                    Key32::LEN + GCM_TAG_LEN
                ))
                .into());
            }
            let mut blob = iv.to_vec();
            blob.extend_from_slice(&ct);
            return Ok(blob);
        }
        // The key-wrap and OAEP mechanisms wrap key objects: put the AEK into a session
        // object just long enough for C_WrapKey.
        let mut template = session_aek_template(Some(aek.expose().to_vec()));
        let created = s.create_object(&template);
        zeroize_template(&mut template);
        let tmp =
            created.during(|| format!("creating a session object for wrapping on {}", c.token))?;
        let mech = match m {
            Mech::AesKwp => Mechanism::AesKeyWrapPad,
            Mech::AesKw => Mechanism::AesKeyWrap,
            _ => match m.oaep() {
                Some(p) => Mechanism::RsaPkcsOaep(p),
                None => return Err(KekError::Unsupported(what()).into()),
            },
        };
        let r = s.wrap_key(&mech, key, tmp);
        if let Err(e) = s.destroy_object(tmp) {
            log::warn!(
                "destroying the temporary session object on {}: {}",
                c.token,
                ck_text(&e)
            );
        }
        let blob = r.during(what)?;
        if m.is_aes() && blob.len() != KEY_WRAP_LEN {
            return Err(KekError::Unsupported(format!(
                "{}: the token returned {} bytes, expected {KEY_WRAP_LEN}",
                what(),
                blob.len()
            ))
            .into());
        }
        Ok(blob)
    }

    fn unwrap_version(&self, c: &Conn, ver: &Version, w: &WrappedKey) -> Result<Key32, Fail> {
        let v = w.key_version;
        let desc = self.key_desc(c, v);
        let Some(m) = Mech::from_id(w.mechanism) else {
            return Err(KekError::UnwrapFailed(format!(
                "the wrapped key uses mechanism {}, which the pkcs11: provider does not know; \
                 use the KEK provider that wrapped it",
                w.mechanism
            ))
            .into());
        };
        let key = if m.is_aes() {
            ver.secret.first()
        } else {
            ver.private.first()
        };
        let Some(key) = key else {
            return Err(KekError::UnwrapFailed(format!(
                "the volume key was wrapped with {} but {desc} is a {} key; this is another key \
                 with the same label and CKA_ID",
                m.ckm(),
                ver.kind()
            ))
            .into());
        };
        let what = || format!("unwrapping with {} under {desc}", m.ckm());
        let tampered = |detail: String| {
            Fail::Kek(KekError::UnwrapFailed(format!(
                "{}: {detail}; the wrapped key was altered or wrapped by another key",
                what()
            )))
        };
        let s = &c.session;
        if m == Mech::AesGcm {
            // No common token unwraps with AES-GCM, so this route decrypts: the result is
            // the AEK itself, in a buffer kekfs owns and zeroizes. kekfs checked CKA_UNWRAP
            // already; the token checks CKA_DECRYPT.
            let need = GCM_IV_LEN + Key32::LEN + GCM_TAG_LEN;
            if w.blob.len() != need {
                return Err(tampered(format!("{} bytes, expected {need}", w.blob.len())));
            }
            let (iv, ct) = w.blob.split_at(GCM_IV_LEN);
            let mut iv = iv.to_vec();
            let aad = gcm_aad(&self.label, v);
            let pt = {
                let params = GcmParams::new(&mut iv, &aad, ((GCM_TAG_LEN * 8) as u64).into())
                    .during(what)?;
                match s.decrypt(&Mechanism::AesGcm(params), key.handle, ct) {
                    Ok(p) => Zeroizing::new(p),
                    // SoftHSM reports a bad tag as CKR_GENERAL_ERROR.
                    Err(CkError::Pkcs11(RvError::GeneralError, _)) => {
                        return Err(tampered("the token rejected it (CKR_GENERAL_ERROR)".into()));
                    }
                    Err(e) => return Err(Fail::Ck(e, what())),
                }
            };
            return Key32::from_slice(&pt)
                .ok_or_else(|| tampered(format!("{} bytes came out, expected 32", pt.len())));
        }
        if m.is_aes() && w.blob.len() != KEY_WRAP_LEN {
            return Err(tampered(format!(
                "{} bytes, expected {KEY_WRAP_LEN}",
                w.blob.len()
            )));
        }
        let mech = match m {
            Mech::AesKwp => Mechanism::AesKeyWrapPad,
            Mech::AesKw => Mechanism::AesKeyWrap,
            _ => match m.oaep() {
                Some(p) => Mechanism::RsaPkcsOaep(p),
                None => return Err(KekError::Unsupported(what()).into()),
            },
        };
        // C_UnwrapKey into a session object that kekfs may read (CKA_SENSITIVE false,
        // CKA_EXTRACTABLE true, CKA_TOKEN false), read CKA_VALUE, destroy the object.
        let h = match s.unwrap_key(&mech, key.handle, &w.blob, &session_aek_template(None)) {
            Ok(h) => h,
            // SoftHSM 2.6 reports a key-wrap integrity failure as CKR_GENERAL_ERROR.
            Err(CkError::Pkcs11(RvError::GeneralError, _)) => {
                return Err(tampered("the token rejected it (CKR_GENERAL_ERROR)".into()));
            }
            Err(e) => return Err(Fail::Ck(e, what())),
        };
        // cryptoki copies the value through an internal buffer it frees without zeroizing;
        // the copy handed to us is zeroized below.
        let read = s.get_attributes(h, &[AttributeType::Value]);
        if let Err(e) = s.destroy_object(h) {
            log::warn!(
                "destroying the unwrapped session object on {}: {}",
                c.token,
                ck_text(&e)
            );
        }
        let mut aek = None;
        let mut got = 0;
        for mut a in read.during(|| format!("reading the unwrapped key on {}", c.token))? {
            if let Attribute::Value(v) = &mut a {
                got = v.len();
                aek = Key32::from_slice(v);
                v.zeroize();
            }
        }
        aek.ok_or_else(|| tampered(format!("{got} bytes came out, expected 32")))
    }

    /// Which kind of key a new version is: what the URI's `type` or a forced mechanism asks
    /// for; else, when rotating, the kind of the newest version; else AES-256 if the token
    /// wraps with AES, RSA if it can only do RSA-OAEP (p11-kit 0.24 remoting passes no AES
    /// wrapping mechanism through).
    fn new_key_kind(&self, c: &Conn, found: &Found, rotate: bool) -> Result<NewKind, KekError> {
        let aes = || Mech::AES.iter().any(|&m| Self::has_mechanism(c, m));
        let rsa = || {
            Self::has_mechanism(c, Mech::OaepSha1)
                && (c.mechanisms.is_empty()
                    || c.mechanisms.contains(&MechanismType::RSA_PKCS_KEY_PAIR_GEN))
        };
        let wanted = match (self.uri.object_type, forced_mechanism()?) {
            (Some(ObjectType::Private | ObjectType::Public), _) => Some(NewKind::Rsa),
            (Some(ObjectType::SecretKey), _) => Some(NewKind::Aes),
            (_, Some(m)) if m.is_aes() => Some(NewKind::Aes),
            (_, Some(_)) => Some(NewKind::Rsa),
            _ if rotate => found.versions.values().next_back().map(|v| {
                if v.secret.is_empty() {
                    NewKind::Rsa
                } else {
                    NewKind::Aes
                }
            }),
            _ => None,
        };
        let kind = match wanted {
            Some(k) => k,
            None if aes() => NewKind::Aes,
            None if rsa() => NewKind::Rsa,
            None => NewKind::Aes,
        };
        let ok = match kind {
            NewKind::Aes => aes(),
            NewKind::Rsa => rsa(),
        };
        if !ok {
            return Err(KekError::Unsupported(match kind {
                NewKind::Aes => format!(
                    "{} offers no AES wrapping mechanism (CKM_AES_KEY_WRAP_PAD, \
                     CKM_AES_KEY_WRAP, CKM_AES_GCM){}",
                    c.token,
                    if rsa() {
                        "; it can wrap with RSA-OAEP: add type=private to the URI for an \
                         RSA key"
                    } else {
                        ""
                    }
                ),
                NewKind::Rsa => format!(
                    "{} cannot generate RSA key pairs for RSA-OAEP \
                     (CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS_OAEP)",
                    c.token
                ),
            }));
        }
        Ok(kind)
    }

    /// Create a new key version on the token, labelled `object`, with CKA_ID = the version:
    /// an AES-256 secret key, or an RSA-3072 key pair where the token (or the remoting in
    /// between) cannot wrap with AES (see [`Self::new_key_kind`]). The secret and the
    /// private key are sensitive and never extractable. `rotate` false: the label must have
    /// no versions yet (version 1, or the URI's `id`); true: the next version.
    pub fn generate_version(&self, rotate: bool) -> Result<CreatedKey, KekError> {
        let (version, kind) = self.with_session(|c| {
            let found = self.find(c)?;
            let existing = found.summary();
            let v = if let Some(v) = self.pinned {
                if found.versions.contains_key(&v) {
                    return Err(KekError::AlreadyExists(format!(
                        "key {:?} already has version {v} on {}; remove id= from the URI to \
                         create the next version with `kekfs key rotate`",
                        self.label, c.token
                    ))
                    .into());
                }
                v
            } else if !rotate && !found.versions.is_empty() {
                return Err(KekError::AlreadyExists(format!(
                    "key {:?} already exists on {} (versions {existing}); add a version with \
                     `kekfs key rotate --kek '{}'`, or choose another object= label",
                    self.label, c.token, self.uri
                ))
                .into());
            } else if rotate && found.versions.is_empty() {
                return Err(self.not_found(c, &found, None).into());
            } else {
                let last = found.versions.keys().next_back().copied().unwrap_or(0);
                last.checked_add(1).ok_or_else(|| {
                    KekError::AlreadyExists(format!(
                        "key {:?} has used up all version numbers",
                        self.label
                    ))
                })?
            };
            let kind = self.new_key_kind(c, &found, rotate)?;
            let label = Attribute::Label(self.label.as_bytes().to_vec());
            let id = Attribute::Id(version_to_id(v));
            let what = || {
                format!(
                    "generating {} key {:?} version {v} on {}",
                    kind.name(),
                    self.label,
                    c.token
                )
            };
            match kind {
                NewKind::Aes => {
                    let template = [
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32u64.into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Modifiable(true),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                        label,
                        id,
                    ];
                    c.session
                        .generate_key(&Mechanism::AesKeyGen, &template)
                        .during(what)?;
                }
                NewKind::Rsa => {
                    // Only C_WrapKey / C_UnwrapKey with RSA-OAEP: no encrypt, decrypt, sign.
                    let public = [
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Modifiable(true),
                        Attribute::ModulusBits(MIN_RSA_BITS.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                        Attribute::Wrap(true),
                        Attribute::Encrypt(false),
                        Attribute::Verify(false),
                        label.clone(),
                        id.clone(),
                    ];
                    let private = [
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Modifiable(true),
                        Attribute::Unwrap(true),
                        Attribute::Decrypt(false),
                        Attribute::Sign(false),
                        Attribute::Derive(false),
                        label,
                        id,
                    ];
                    c.session
                        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
                        .during(what)?;
                }
            }
            Ok((v, kind))
        })?;
        let token = self.describe_token(&self.lock());
        let mut follow = self.uri.clone();
        follow.id = None;
        Ok(CreatedKey {
            version,
            kind: kind.name().into(),
            token,
            uri: follow.to_string(),
        })
    }

    /// Disable (`usable` false) or enable (true) key versions on the token: CKA_UNWRAP and
    /// CKA_WRAP of every version of the label, or of `version` only (C_SetAttributeValue;
    /// the secret key gets both, an RSA private key CKA_UNWRAP, its public key CKA_WRAP).
    /// Every process using the key sees the change at its next operation: kekfs refuses a
    /// version whose CKA_UNWRAP is false as disabled, and the token refuses C_WrapKey and
    /// C_UnwrapKey with it.
    pub fn set_usable(
        &self,
        version: Option<u32>,
        usable: bool,
    ) -> Result<Vec<UsageChange>, KekError> {
        self.with_session(|c| {
            let found = self.find(c)?;
            let targets: Vec<u32> = match version {
                Some(v) if found.versions.contains_key(&v) => vec![v],
                Some(v) => return Err(self.not_found(c, &found, Some(v)).into()),
                None if found.versions.is_empty() => {
                    return Err(self.not_found(c, &found, None).into());
                }
                None => found.versions.keys().copied().collect(),
            };
            let mut out = Vec::new();
            for v in targets {
                let Some(ver) = found.versions.get(&v) else {
                    continue;
                };
                let desc = self.key_desc(c, v);
                let mut changed = false;
                // The unwrapping side first: that is the one that stops mounted volumes.
                let objects = ver
                    .secret
                    .iter()
                    .map(|o| (o, &[AttributeType::Unwrap, AttributeType::Wrap][..]))
                    .chain(
                        ver.private
                            .iter()
                            .map(|o| (o, &[AttributeType::Unwrap][..])),
                    )
                    .chain(ver.public.iter().map(|o| (o, &[AttributeType::Wrap][..])));
                for (o, types) in objects {
                    let now = c
                        .session
                        .get_attributes(o.handle, types)
                        .during(|| format!("reading CKA_UNWRAP/CKA_WRAP of {desc}"))?;
                    let set: Vec<Attribute> = now
                        .iter()
                        .filter_map(|a| match a {
                            Attribute::Unwrap(b) if *b != usable => Some(Attribute::Unwrap(usable)),
                            Attribute::Wrap(b) if *b != usable => Some(Attribute::Wrap(usable)),
                            _ => None,
                        })
                        .collect();
                    // An attribute the token did not return is set too (fail closed).
                    let missing = types.len() != now.len();
                    let set = if missing {
                        types
                            .iter()
                            .map(|t| match t {
                                AttributeType::Unwrap => Attribute::Unwrap(usable),
                                _ => Attribute::Wrap(usable),
                            })
                            .collect()
                    } else {
                        set
                    };
                    if set.is_empty() {
                        continue;
                    }
                    c.session.update_attributes(o.handle, &set).during(|| {
                        format!(
                            "setting {} on {desc}",
                            set.iter()
                                .map(|a| match a {
                                    Attribute::Unwrap(b) => format!("CKA_UNWRAP={b}"),
                                    Attribute::Wrap(b) => format!("CKA_WRAP={b}"),
                                    _ => String::new(),
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
                    changed = true;
                }
                out.push(UsageChange {
                    version: v,
                    changed,
                });
            }
            Ok(out)
        })
    }

    /// The token the provider is connected to (or the URI's token filter), for messages.
    pub fn token_description(&self) -> String {
        self.describe_token(&self.lock())
    }
}

/// The kind of key a new version gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewKind {
    /// An AES-256 secret key.
    Aes,
    /// An RSA key pair of [`MIN_RSA_BITS`] bits.
    Rsa,
}

impl NewKind {
    fn name(self) -> &'static str {
        match self {
            NewKind::Aes => "AES-256",
            NewKind::Rsa => "RSA-3072",
        }
    }
}

/// What `kekfs key disable/enable --kek pkcs11:…` did to one key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageChange {
    /// The version (= CKA_ID).
    pub version: u32,
    /// False if it already was in the requested state.
    pub changed: bool,
}

/// The protection attributes of one key object that unwraps for a version, as the token
/// reports them (`None`: the token did not return the attribute). For `kekfs verify`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyProtection {
    /// The key version (CKA_ID).
    pub version: u32,
    /// `secret-key` (AES) or `private-key` (RSA).
    pub class: &'static str,
    /// CKA_SENSITIVE.
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE.
    pub extractable: Option<bool>,
    /// CKA_ALWAYS_SENSITIVE.
    pub always_sensitive: Option<bool>,
    /// CKA_NEVER_EXTRACTABLE.
    pub never_extractable: Option<bool>,
}

impl Pkcs11Provider {
    /// Read back CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE and
    /// CKA_NEVER_EXTRACTABLE of the objects that unwrap for `version` (the AES secret key,
    /// or the RSA private key), each attribute on its own so one refusal hides no other.
    pub fn key_protection(&self, version: u32) -> Result<Vec<KeyProtection>, KekError> {
        self.with_session(|c| {
            let found = self.find(c)?;
            let Some(ver) = found.versions.get(&version) else {
                return Err(self.not_found(c, &found, Some(version)).into());
            };
            let objects = ver
                .secret
                .iter()
                .map(|o| (o, "secret-key"))
                .chain(ver.private.iter().map(|o| (o, "private-key")));
            let mut out = Vec::new();
            for (o, class) in objects {
                let mut p = KeyProtection {
                    version,
                    class,
                    sensitive: None,
                    extractable: None,
                    always_sensitive: None,
                    never_extractable: None,
                };
                for t in [
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ] {
                    for a in c.session.get_attributes(o.handle, &[t]).unwrap_or_default() {
                        match a {
                            Attribute::Sensitive(b) => p.sensitive = Some(b),
                            Attribute::Extractable(b) => p.extractable = Some(b),
                            Attribute::AlwaysSensitive(b) => p.always_sensitive = Some(b),
                            Attribute::NeverExtractable(b) => p.never_extractable = Some(b),
                            _ => {}
                        }
                    }
                }
                out.push(p);
            }
            Ok(out)
        })
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

/// `kekfs key create --kek pkcs11:…` (`rotate` false) or `kekfs key rotate --kek …` (true).
pub fn create_key(
    uri: &Pkcs11Uri,
    opts: &ProviderOptions,
    rotate: bool,
) -> Result<CreatedKey, KekError> {
    Pkcs11Provider::open(uri, opts)?.generate_version(rotate)
}

/// `kekfs key disable|enable --kek pkcs11:…`: set CKA_UNWRAP and CKA_WRAP of every version
/// of the URI's label, or of `version` only, to `usable`. Returns the token and what changed.
pub fn set_key_usable(
    uri: &Pkcs11Uri,
    opts: &ProviderOptions,
    version: Option<u32>,
    usable: bool,
) -> Result<(String, Vec<UsageChange>), KekError> {
    let p = Pkcs11Provider::open(uri, opts)?;
    let changes = p.set_usable(version, usable)?;
    Ok((p.token_description(), changes))
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

    #[test]
    fn error_mapping_names_causes() {
        let ck = |rv| CkError::Pkcs11(rv, cryptoki::context::Function::UnwrapKey);
        let m = |rv| map_error(&ck(rv), "unwrapping", "\"k\" version 1");
        assert!(matches!(
            m(RvError::TokenNotPresent),
            KekError::TokenAbsent(_)
        ));
        assert!(matches!(
            m(RvError::DeviceRemoved),
            KekError::TokenAbsent(_)
        ));
        assert!(matches!(
            m(RvError::PinIncorrect),
            KekError::BadPassphrase(_)
        ));
        assert!(matches!(m(RvError::PinLocked), KekError::PinLocked(_)));
        assert!(matches!(m(RvError::PinExpired), KekError::PinLocked(_)));
        assert!(matches!(
            m(RvError::KeyFunctionNotPermitted),
            KekError::Refused {
                reason: Refusal::Disabled,
                ..
            }
        ));
        assert!(matches!(
            m(RvError::UnwrappingKeyHandleInvalid),
            KekError::NotFound(_)
        ));
        assert!(matches!(
            m(RvError::KeyHandleInvalid),
            KekError::NotFound(_)
        ));
        assert!(matches!(
            m(RvError::MechanismInvalid),
            KekError::Unsupported(_)
        ));
        assert!(matches!(
            m(RvError::MechanismParamInvalid),
            KekError::Unsupported(_)
        ));
        assert!(matches!(
            m(RvError::WrappedKeyInvalid),
            KekError::UnwrapFailed(_)
        ));
        assert!(matches!(
            m(RvError::EncryptedDataInvalid),
            KekError::UnwrapFailed(_)
        ));
        assert!(matches!(m(RvError::DeviceMemory), KekError::Unreachable(_)));
        assert!(matches!(m(RvError::GeneralError), KekError::Unreachable(_)));
        let e = m(RvError::KeyFunctionNotPermitted).to_string();
        assert!(e.contains("CKR_KEY_FUNCTION_NOT_PERMITTED"), "{e}");
        assert!(matches!(
            map_error(&CkError::NullFunctionPointer, "x", "k"),
            KekError::ModuleLoad(_)
        ));
        assert_eq!(
            ckr_name(RvError::UnwrappingKeyHandleInvalid),
            "CKR_UNWRAPPING_KEY_HANDLE_INVALID"
        );
        assert!(is_session_error(&ck(RvError::SessionHandleInvalid)));
        assert!(is_session_error(&ck(RvError::CryptokiNotInitialized)));
        assert!(!is_session_error(&ck(RvError::PinIncorrect)));
        assert!(is_mechanism_error(&ck(RvError::ArgumentsBad)));
        assert!(!is_mechanism_error(&ck(RvError::DeviceError)));
        // A token that will not let the key change: a refused change, not an outage.
        assert!(matches!(
            m(RvError::AttributeReadOnly),
            KekError::ChangeRefused(_)
        ));
        assert!(matches!(
            m(RvError::ActionProhibited),
            KekError::ChangeRefused(_)
        ));
        // A broken link to the token (p11-kit server gone): transient, never a refusal,
        // and the session handle is void (forgotten, not closed).
        assert!(matches!(m(RvError::DeviceError), KekError::Unreachable(_)));
        assert!(is_session_error(&ck(RvError::DeviceError)));
        assert!(is_link_error(&ck(RvError::DeviceError)));
        assert!(is_link_error(&ck(RvError::SessionHandleInvalid)));
        assert!(!is_link_error(&ck(RvError::UserNotLoggedIn)));
        assert!(!is_link_error(&ck(RvError::KeyFunctionNotPermitted)));
    }

    #[test]
    fn dates() {
        let d = |s: &str| {
            let b = s.as_bytes();
            Date::new([b[0], b[1], b[2], b[3]], [b[4], b[5]], [b[6], b[7]])
        };
        assert_eq!(parse_date(&Date::new_empty()), Ok(None));
        assert_eq!(parse_date(&d("00000000")), Ok(None));
        assert_eq!(parse_date(&d("        ")), Ok(None));
        assert_eq!(parse_date(&d("20250131")), Ok(Some(Ymd(2025, 1, 31))));
        assert!(parse_date(&d("2025013x")).is_err());
        assert!(parse_date(&d("20251301")).is_err());
        assert!(parse_date(&d("20250100")).is_err());
        assert_eq!(civil_from_days(0), Ymd(1970, 1, 1));
        assert_eq!(civil_from_days(19_675), Ymd(2023, 11, 14));
        assert_eq!(civil_from_days(11_016), Ymd(2000, 2, 29));
        assert!(today() > Ymd(2024, 1, 1));
        assert_eq!(Ymd(2025, 3, 4).to_string(), "2025-03-04");
    }

    #[test]
    fn mechanism_ids_roundtrip() {
        for m in [
            Mech::AesKwp,
            Mech::AesKw,
            Mech::AesGcm,
            Mech::OaepSha256,
            Mech::OaepSha1,
        ] {
            assert_eq!(Mech::from_id(m.id()), Some(m));
        }
        assert_eq!(Mech::from_id(mechanism::SOFT_AES256_GCM), None);
        let aad = gcm_aad("k", 2);
        assert!(aad.starts_with(GCM_AAD_LABEL));
        assert!(aad.ends_with(&[b'k', 0, 2, 0, 0, 0]));
    }

    #[test]
    fn module_resolution() {
        let e =
            resolve_module(&uri("pkcs11:object=k?module-path=/nonexistent/lib.so")).unwrap_err();
        assert!(matches!(&e, KekError::ModuleLoad(m) if m.contains("/nonexistent/lib.so")));
        let e =
            resolve_module(&uri("pkcs11:object=k?module-name=no-such-module-kekfs")).unwrap_err();
        assert!(matches!(&e, KekError::ModuleLoad(m) if m.contains("no-such-module-kekfs")));
        // A file that is not a PKCS#11 library fails to load with ModuleLoad, not a panic.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake.so");
        std::fs::write(&fake, b"not a library").unwrap();
        let e = context(&fake).unwrap_err();
        assert!(
            matches!(&e, KekError::ModuleLoad(m) if m.contains("fake.so")),
            "{e}"
        );
    }

    #[test]
    fn provider_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pkcs11Provider>();
    }
}
