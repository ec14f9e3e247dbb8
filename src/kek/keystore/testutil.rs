//! Shared fixtures of the keystore unit tests: a fresh store, second handles, hand edits of
//! `keystore.json`, and refusal assertions.

use super::Keystore;
use super::storage::KEYSTORE_FILE;
use crate::kek::passphrase::Passphrase;
use crate::kek::{KekError, Refusal};
use serde_json::Value;
use std::fmt;
use std::path::Path;

pub(super) const PASS: &[u8] = b"correct horse battery staple";

pub(super) fn pass(p: &[u8]) -> Passphrase {
    Passphrase::new(p.to_vec()).unwrap()
}

/// A fresh keystore in a not-yet-existing subdirectory of a temp dir.
pub(super) fn new_store() -> (tempfile::TempDir, Keystore) {
    let tmp = tempfile::tempdir().unwrap();
    let ks = Keystore::init(&tmp.path().join("ks"), &pass(PASS)).unwrap();
    (tmp, ks)
}

pub(super) fn second_handle(ks: &Keystore) -> Keystore {
    Keystore::open_with_master(ks.dir(), ks.master.duplicate()).unwrap()
}

pub(super) fn edit_json(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join(KEYSTORE_FILE);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

pub(super) fn refusal(ks: &Keystore, name: &str, v: Option<u32>, now: u64) -> Option<Refusal> {
    match ks.key_material(name, v, now) {
        Ok(_) => None,
        Err(KekError::Refused { reason, .. }) => Some(reason),
        Err(e) => panic!("{e}"),
    }
}

pub(super) fn change_refused(r: Result<impl fmt::Debug, KekError>, needle: &str) {
    match r {
        Err(KekError::ChangeRefused(m)) => assert!(m.contains(needle), "{needle:?} in {m}"),
        other => panic!("expected ChangeRefused({needle:?}), got {other:?}"),
    }
}
