//! Named process exit codes: scripts can tell failure causes apart.

/// Success.
pub const OK: i32 = 0;
/// An error with no more specific code.
pub const FAILURE: i32 = 1;
/// Bad command line (clap's own code).
pub const USAGE: i32 = 2;
/// The directory is not a kekfs volume.
pub const NOT_A_VOLUME: i32 = 10;
/// The volume header (or a keystore file) is corrupted or of an unknown version.
pub const CORRUPT: i32 = 11;
/// Wrong keystore passphrase or token PIN.
pub const BAD_PASSPHRASE: i32 = 12;
/// The KEK refused: disabled, expired, not yet valid, deleted or access denied.
pub const KEK_REFUSED: i32 = 13;
/// The KEK (or a key version) does not exist.
pub const KEY_NOT_FOUND: i32 = 14;
/// The KEK provider could not be reached.
pub const PROVIDER_UNREACHABLE: i32 = 15;
/// The volume is already mounted.
pub const ALREADY_MOUNTED: i32 = 16;
/// Mounting failed (mountpoint missing, FUSE unavailable…).
pub const MOUNT_FAILED: i32 = 17;
/// The target already exists (volume, keystore, key).
pub const EXISTS: i32 = 18;
/// No keystore at the given location.
pub const NO_KEYSTORE: i32 = 19;
/// The path is not a mounted kekfs volume.
pub const NOT_MOUNTED: i32 = 20;
/// The keystore refused a key change: purge protection, retention period not over (or
/// over, for recover), key deleted (or not deleted), impossible dates.
pub const CHANGE_REFUSED: i32 = 21;
/// The audit log could not be written and the policy is fail-closed: the key operation
/// was refused.
pub const AUDIT_FAILED: i32 = 22;
/// `kekfs audit check` found an edited, deleted, reordered or torn line.
pub const AUDIT_TAMPERED: i32 = 23;
/// `kekfs audit follow --fail-on-alert` raised an alert.
pub const AUDIT_ALERT: i32 = 24;
/// `kekfs verify` found a problem (key, header, block, name).
pub const VERIFY_FAILED: i32 = 25;
/// `kekfs drill` could not complete its measurement (the key was restored).
pub const DRILL_FAILED: i32 = 26;
/// No PKCS#11 token matching the KEK URI is present (or it went away).
pub const TOKEN_ABSENT: i32 = 30;
/// The token's user PIN is locked or expired; its security officer must reset it.
pub const PIN_LOCKED: i32 = 31;
/// The token or the key cannot do what kekfs needs (mechanism, key type or size).
pub const UNSUPPORTED: i32 = 32;
/// The PKCS#11 module (library) cannot be found, loaded or initialised.
pub const MODULE_LOAD: i32 = 33;
