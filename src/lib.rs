//! kekfs: an encrypted FUSE filesystem whose keys are held by an external key-encryption key.
//!
//! Layers, arrows pointing down only:
//! - `cli`: command-line front end (thin `main.rs` calls into it).
//! - `fuse`: translates kernel requests into volume operations.
//! - `volume`: an unlocked volume: AEK, derived keys, encrypted content and name I/O.
//! - `format`, `crypto`, `kek`: on-disk layout, primitives, KEK providers.

pub mod cli;
pub mod crypto;
pub mod format;
pub mod fuse;
pub mod kek;
pub mod monitor;
pub mod volume;
