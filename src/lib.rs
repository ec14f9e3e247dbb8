//! kekfs: an encrypted FUSE filesystem whose keys are held by an external key-encryption key.
//!
//! Layers, arrows pointing down only:
//! - `cli`: command-line front end (thin `main.rs` calls into it).
//! - `fuse`: translates kernel requests into volume operations.
//! - `audit`: the tamper-evident audit log of KEK operations and volume state changes.
//! - `monitor`: polls the KEK of a mounted volume; revokes and restores its keys.
//! - `volume`: an unlocked volume: AEK, derived keys, encrypted content and name I/O.
//! - `format`, `crypto`, `kek`: on-disk layout, primitives, KEK providers.
//! - `time`: UTC calendar arithmetic, used by every layer above.

pub mod audit;
pub mod cli;
pub mod crypto;
pub mod format;
pub mod fuse;
pub mod kek;
pub mod monitor;
pub mod time;
pub mod untrusted;
pub mod volume;
