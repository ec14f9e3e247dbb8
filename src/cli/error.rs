//! The CLI's error: a message for the user and the exit code that names its cause.

use super::exit;
use crate::kek::KekError;
use crate::volume::VolumeError;
use std::fmt;

/// A failed command.
#[derive(Debug)]
pub struct CliError {
    /// Exit code (`exit::*`).
    pub code: i32,
    /// What happened and, where useful, what to do.
    pub message: String,
}

impl CliError {
    /// An error with a specific exit code.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A generic failure.
    pub fn failure(message: impl Into<String>) -> Self {
        Self::new(exit::FAILURE, message)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The exit code for a provider error.
pub fn kek_code(e: &KekError) -> i32 {
    match e {
        KekError::BadUri(_) => exit::USAGE,
        KekError::NotFound(_) => exit::KEY_NOT_FOUND,
        KekError::Refused { .. } => exit::KEK_REFUSED,
        KekError::Unreachable(_) => exit::PROVIDER_UNREACHABLE,
        KekError::BadPassphrase(_) => exit::BAD_PASSPHRASE,
        KekError::NoKeystore(_) => exit::NO_KEYSTORE,
        KekError::AlreadyExists(_) => exit::EXISTS,
        KekError::UnwrapFailed(_) | KekError::Corrupt(_) => exit::CORRUPT,
        KekError::ChangeRefused(_) => exit::CHANGE_REFUSED,
        KekError::TokenAbsent(_) => exit::TOKEN_ABSENT,
        KekError::PinLocked(_) => exit::PIN_LOCKED,
        KekError::Unsupported(_) => exit::UNSUPPORTED,
        KekError::ModuleLoad(_) => exit::MODULE_LOAD,
        KekError::AuditFailed(_) => exit::AUDIT_FAILED,
        _ => exit::FAILURE,
    }
}

impl From<KekError> for CliError {
    fn from(e: KekError) -> Self {
        let hint = super::keys::refusal_hint(&e).unwrap_or_default();
        CliError::new(kek_code(&e), format!("{e}{hint}"))
    }
}

impl From<VolumeError> for CliError {
    fn from(e: VolumeError) -> Self {
        let code = match &e {
            VolumeError::NotAVolume(_) => exit::NOT_A_VOLUME,
            VolumeError::Corrupt(_) => exit::CORRUPT,
            VolumeError::NotEmpty(_) => exit::EXISTS,
            VolumeError::Kek(k) => kek_code(k),
            _ => exit::FAILURE,
        };
        let hint = match &e {
            VolumeError::Kek(k) => super::keys::refusal_hint(k),
            _ => None,
        };
        CliError::new(code, format!("{e}{}", hint.unwrap_or_default()))
    }
}
