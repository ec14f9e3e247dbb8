//! Classifying token errors (CKR_*): which ones mean a lost session, a broken link or an
//! unusable mechanism, and which kekfs error (naming cause and fix) each one becomes.

use crate::kek::{KekError, Refusal};
use cryptoki::error::{Error as CkError, RvError};

/// `KeyFunctionNotPermitted` → `CKR_KEY_FUNCTION_NOT_PERMITTED`.
pub(super) fn ckr_name(rv: RvError) -> String {
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

pub(super) fn ck_text(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{f} returned {}", ckr_name(*rv)),
        CkError::LibraryLoading(l) => l.to_string(),
        other => other.to_string(),
    }
}

pub(super) fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Errors after which the session (or the library's state) is likely gone: reopen and
/// retry once.
pub(super) fn is_session_error(e: &CkError) -> bool {
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
pub(super) fn is_link_error(e: &CkError) -> bool {
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

/// Errors meaning "this token cannot do this mechanism (with this key)": try the next.
pub(super) fn is_mechanism_error(e: &CkError) -> bool {
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
pub(super) fn map_error(e: &CkError, what: &str, refused_key: &str) -> KekError {
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

/// A failure inside a session operation: a kekfs error already, or a token error to
/// classify (and maybe retry on a fresh session).
pub(super) enum Fail {
    Kek(KekError),
    Ck(CkError, String),
}

impl From<KekError> for Fail {
    fn from(e: KekError) -> Self {
        Fail::Kek(e)
    }
}

pub(super) trait CkContext<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, Fail>;
}

impl<T> CkContext<T> for Result<T, CkError> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, Fail> {
        self.map_err(|e| Fail::Ck(e, what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
