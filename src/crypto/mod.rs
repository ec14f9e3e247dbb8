//! Cryptographic primitives: secret key types, randomness, key derivation, the block AEAD
//! and deterministic name encryption. No file I/O and no FUSE here.

pub mod aead;
pub mod kdf;
pub mod names;
pub mod secret;

pub use secret::{Key32, Key64};

/// Fill `buf` with bytes from the operating system's CSPRNG.
///
/// Panics only if the kernel's random source is unavailable, which kekfs
/// treats as an unrecoverable environment failure (no safe way to continue
/// without fresh nonces).
pub fn random_bytes(buf: &mut [u8]) {
    // The OS RNG (getrandom(2)) does not fail on Linux once the pool is initialised.
    getrandom::fill(buf).expect("getrandom(2) failed: no secure randomness available");
}

/// Return an array of random bytes.
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut a = [0u8; N];
    random_bytes(&mut a);
    a
}
