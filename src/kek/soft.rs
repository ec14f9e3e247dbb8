//! The `soft:` KEK provider: wraps AEKs with AES-256-GCM under a key version held in the built-in keystore.

use super::keystore::{self, KeyOp, Keystore};
use super::passphrase::PassphraseSource;
use super::{KekError, KekProvider, KekUri, WrappedKey, mechanism};
use crate::crypto::Key32;
use crate::crypto::aead::{Cipher, OVERHEAD};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use zeroize::Zeroizing;

/// AAD prefix of a wrapped AEK (followed by key name ‖ 0x00 ‖ key version u32 LE).
pub const WRAP_AAD_LABEL: &[u8] = b"kekfs wrap v1";

/// Length of a `SOFT_AES256_GCM` wrapped blob: nonce ‖ encrypted 32-byte AEK ‖ tag.
pub const WRAPPED_LEN: usize = Key32::LEN + OVERHEAD;

/// AAD binding a wrapped AEK to the key name and version that wrapped it.
fn wrap_aad(name: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD_LABEL.len() + name.len() + 5);
    aad.extend_from_slice(WRAP_AAD_LABEL);
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_le_bytes());
    aad
}

/// A `soft:NAME[?version=N]` KEK: the open keystore (with its master key) and the key it uses.
/// Every wrap and unwrap re-reads the keystore, so a key disabled, deleted or restored by
/// another process takes effect at the next operation.
pub struct SoftProvider {
    name: String,
    version: Option<u32>,
    dir: PathBuf,
    keystore: Mutex<Keystore>,
}

impl std::fmt::Debug for SoftProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftProvider")
            .field("uri", &self.uri())
            .field("keystore", &self.dir)
            .finish_non_exhaustive()
    }
}

impl SoftProvider {
    /// Read the passphrase from `source`, open the keystore in `dir` and check that key
    /// `name` (and the pinned `version`, if any) exists.
    pub fn open(
        dir: &Path,
        source: &PassphraseSource,
        name: &str,
        version: Option<u32>,
    ) -> Result<SoftProvider, KekError> {
        keystore::validate_key_name(name).map_err(KekError::BadUri)?;
        // Do not ask for a passphrase when there is nothing to unlock.
        let json = dir.join(keystore::KEYSTORE_FILE);
        if matches!(json.try_exists(), Ok(false)) {
            return Err(KekError::NoKeystore(format!(
                "{} does not exist; run `kekfs keystore init` to create a keystore there, or \
                 point --keystore (or ${}) at an existing keystore directory",
                json.display(),
                keystore::ENV_KEYSTORE
            )));
        }
        let pass = source.read(&format!("passphrase for keystore {}", dir.display()), false)?;
        let ks = Keystore::open(dir, &pass)?;
        Self::from_keystore(ks, name, version)
    }

    /// Serve key `name` from an already open keystore (e.g. one the CLI just created a key in).
    pub fn from_keystore(
        ks: Keystore,
        name: &str,
        version: Option<u32>,
    ) -> Result<SoftProvider, KekError> {
        keystore::validate_key_name(name).map_err(KekError::BadUri)?;
        let Some(info) = ks.key_info(name) else {
            let names = ks.key_names();
            let names = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            return Err(KekError::NotFound(format!(
                "no key {name:?} in keystore {} (existing keys: {names}); create it with \
                 `kekfs key create {name}` or fix the KEK URI",
                ks.dir().display()
            )));
        };
        if let Some(v) = version
            && !info.versions.iter().any(|x| x.version == v)
        {
            let last = info.versions.last().map_or(0, |x| x.version);
            return Err(KekError::NotFound(format!(
                "key {name:?} in keystore {} has no version {v} (latest is {last}); fix the \
                 version in the KEK URI",
                ks.dir().display()
            )));
        }
        Ok(SoftProvider {
            name: name.to_string(),
            version,
            dir: ks.dir().to_path_buf(),
            keystore: Mutex::new(ks),
        })
    }

    /// The keystore directory this provider reads.
    pub fn keystore_dir(&self) -> &Path {
        &self.dir
    }

    /// The key name.
    pub fn key_name(&self) -> &str {
        &self.name
    }

    /// The pinned key version, or `None` when following the latest usable version.
    pub fn pinned_version(&self) -> Option<u32> {
        self.version
    }

    /// Run `f` with the keystore as last read (for listing versions or states).
    pub fn with_keystore<R>(&self, f: impl FnOnce(&Keystore) -> R) -> R {
        f(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Keystore> {
        // The keystore state is replaced whole on reload, so a panic elsewhere cannot leave it
        // half-updated; recovering from poisoning is safe.
        self.keystore.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fresh state from disk, then the material for `version` (or the latest usable one).
    fn material(&self, version: Option<u32>, op: KeyOp) -> Result<(u32, Key32), KekError> {
        let mut ks = self.lock();
        ks.reload()?;
        ks.key_material_for(&self.name, version, keystore::unix_now(), op)
    }
}

impl KekProvider for SoftProvider {
    fn uri(&self) -> String {
        match self.version {
            Some(v) => format!("soft:{}?version={v}", self.name),
            None => format!("soft:{}", self.name),
        }
    }

    fn reopen(&self, uri: &KekUri) -> Option<Box<dyn KekProvider>> {
        let KekUri::Soft { name, version } = uri else {
            return None;
        };
        let ks = self.with_keystore(|ks| ks.reopen()).ok()?;
        let p = SoftProvider::from_keystore(ks, name, *version).ok()?;
        Some(Box::new(p))
    }

    fn current_version(&self) -> Result<Option<u32>, KekError> {
        let (version, _material) = self.material(self.version, KeyOp::Wrap)?;
        Ok(Some(version))
    }

    fn register_volume(&self, volume_id: &[u8; 16], backing: &Path) -> Result<(), KekError> {
        let hex: String = volume_id.iter().map(|b| format!("{b:02x}")).collect();
        self.lock()
            .register_volume(&self.name, &hex, backing, keystore::unix_now())
    }

    fn wrap(&self, aek: &Key32) -> Result<WrappedKey, KekError> {
        let (version, kek) = self.material(self.version, KeyOp::Wrap)?;
        let blob = Cipher::new(&kek).seal(&wrap_aad(&self.name, version), aek.expose());
        Ok(WrappedKey {
            mechanism: mechanism::SOFT_AES256_GCM,
            key_version: version,
            blob,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Key32, KekError> {
        if wrapped.mechanism != mechanism::SOFT_AES256_GCM {
            return Err(KekError::UnwrapFailed(format!(
                "the wrapped AEK uses mechanism {}, but soft:{} only unwraps mechanism {} \
                 (AES-256-GCM); use the KEK provider that wrapped it",
                wrapped.mechanism,
                self.name,
                mechanism::SOFT_AES256_GCM
            )));
        }
        let (version, kek) = self.material(Some(wrapped.key_version), KeyOp::Unwrap)?;
        let failed = || {
            KekError::UnwrapFailed(format!(
                "wrapped AEK does not authenticate under soft:{} version {version}; it was \
                 wrapped by a different key (another keystore?) or has been modified",
                self.name
            ))
        };
        if wrapped.blob.len() != WRAPPED_LEN {
            return Err(failed());
        }
        let aek = Cipher::new(&kek)
            .open(&wrap_aad(&self.name, version), &wrapped.blob)
            .map(Zeroizing::new)
            .map_err(|_| failed())?;
        Key32::from_slice(&aek).ok_or_else(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::passphrase::Passphrase;
    use crate::kek::{KekUri, ProviderOptions, Refusal, open_provider};

    const PASS: &[u8] = b"soft provider test passphrase";

    fn store_with_key(name: &str) -> (tempfile::TempDir, Keystore) {
        let tmp = tempfile::tempdir().unwrap();
        let pass = Passphrase::new(PASS.to_vec()).unwrap();
        let mut ks = Keystore::init(&tmp.path().join("ks"), &pass).unwrap();
        ks.create_key(name).unwrap();
        (tmp, ks)
    }

    /// Another handle on the same keystore (no Argon2 run).
    fn handle(ks: &Keystore) -> Keystore {
        Keystore::open_with_master(ks.dir(), ks.master_for_tests()).unwrap()
    }

    fn provider(ks: &Keystore, name: &str, version: Option<u32>) -> SoftProvider {
        SoftProvider::from_keystore(handle(ks), name, version).unwrap()
    }

    fn edit_json(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let p = dir.join(keystore::KEYSTORE_FILE);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    }

    #[test]
    fn provider_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SoftProvider>();
    }

    #[test]
    fn open_via_passfile_and_open_provider() {
        let (tmp, ks) = store_with_key("vol");
        let passfile = tmp.path().join("pass");
        std::fs::write(&passfile, [PASS, b"\n"].concat()).unwrap();
        let opts = ProviderOptions {
            keystore_dir: ks.dir().to_path_buf(),
            passphrase: PassphraseSource::File(passfile.clone()),
            volume_dir: None,
        };
        let p = open_provider(&KekUri::parse("soft:vol?version=1").unwrap(), &opts).unwrap();
        assert_eq!(p.uri(), "soft:vol?version=1");
        let aek = Key32::generate();
        assert_eq!(
            p.unwrap(&p.wrap(&aek).unwrap()).unwrap().expose(),
            aek.expose()
        );

        let e = SoftProvider::open(ks.dir(), &opts.passphrase, "other", None).unwrap_err();
        assert!(
            matches!(&e, KekError::NotFound(m) if m.contains("existing keys: vol")),
            "{e}"
        );

        // A missing keystore is reported before any passphrase is read.
        let e = SoftProvider::open(
            &tmp.path().join("nothing"),
            &PassphraseSource::File(tmp.path().join("no-passfile")),
            "vol",
            None,
        )
        .unwrap_err();
        assert!(matches!(e, KekError::NoKeystore(_)), "{e}");
    }

    #[test]
    fn from_keystore_checks_key_and_version() {
        let (_tmp, ks) = store_with_key("vol");
        let e = SoftProvider::from_keystore(handle(&ks), "nope", None).unwrap_err();
        assert!(matches!(e, KekError::NotFound(_)));
        let e = SoftProvider::from_keystore(handle(&ks), "vol", Some(2)).unwrap_err();
        assert!(
            matches!(&e, KekError::NotFound(m) if m.contains("no version 2")),
            "{e}"
        );
        let e = SoftProvider::from_keystore(handle(&ks), "a/b", None).unwrap_err();
        assert!(matches!(e, KekError::BadUri(_)));
        let p = provider(&ks, "vol", None);
        assert_eq!(p.uri(), "soft:vol");
        assert_eq!(p.keystore_dir(), ks.dir());
        assert_eq!(p.key_name(), "vol");
        assert_eq!(p.pinned_version(), None);
        assert_eq!(p.with_keystore(|k| k.key_names()), ["vol"]);
        assert!(format!("{p:?}").contains("soft:vol"));
    }

    #[test]
    fn wrap_unwrap_roundtrip() {
        let (_tmp, ks) = store_with_key("vol");
        let p = provider(&ks, "vol", None);
        let aek = Key32::generate();
        let w = p.wrap(&aek).unwrap();
        assert_eq!(w.mechanism, mechanism::SOFT_AES256_GCM);
        assert_eq!(w.key_version, 1);
        assert_eq!(w.blob.len(), WRAPPED_LEN);
        assert_eq!(p.unwrap(&w).unwrap().expose(), aek.expose());
        // Fresh nonce per wrap.
        assert_ne!(p.wrap(&aek).unwrap().blob, w.blob);
    }

    #[test]
    fn rotation_follow_latest_and_pinned() {
        let (_tmp, mut ks) = store_with_key("vol");
        let latest = provider(&ks, "vol", None);
        let pinned = provider(&ks, "vol", Some(1));
        let aek = Key32::generate();
        let w1 = latest.wrap(&aek).unwrap();
        // Rotated by someone else: seen at the next wrap without reopening.
        assert_eq!(ks.rotate_key("vol").unwrap(), 2);
        let w2 = latest.wrap(&aek).unwrap();
        assert_eq!(w2.key_version, 2);
        assert_eq!(pinned.wrap(&aek).unwrap().key_version, 1);
        for w in [&w1, &w2] {
            assert_eq!(latest.unwrap(w).unwrap().expose(), aek.expose());
            assert_eq!(pinned.unwrap(w).unwrap().expose(), aek.expose());
        }
        // The version is bound: relabelling a v1 blob as v2 fails.
        let mut relabelled = w1.clone();
        relabelled.key_version = 2;
        assert!(matches!(
            latest.unwrap(&relabelled),
            Err(KekError::UnwrapFailed(_))
        ));
        let mut missing = w1.clone();
        missing.key_version = 9;
        assert!(matches!(
            latest.unwrap(&missing),
            Err(KekError::NotFound(_))
        ));
    }

    #[test]
    fn other_keystore_or_key_cannot_unwrap() {
        let (_t1, ks1) = store_with_key("vol");
        let (_t2, mut ks2) = store_with_key("vol");
        ks2.create_key("other").unwrap();
        let aek = Key32::generate();
        let w = provider(&ks1, "vol", None).wrap(&aek).unwrap();
        let e = provider(&ks2, "vol", None).unwrap(&w).unwrap_err();
        assert!(
            matches!(&e, KekError::UnwrapFailed(m)
                if m.contains("does not authenticate under soft:vol version 1")),
            "{e}"
        );
        // Same material, different name in the AAD: refuse.
        let w_other = provider(&ks2, "other", None).wrap(&aek).unwrap();
        assert!(matches!(
            provider(&ks2, "vol", None).unwrap(&w_other),
            Err(KekError::UnwrapFailed(_))
        ));
    }

    #[test]
    fn tampered_blob_fails() {
        let (_tmp, ks) = store_with_key("vol");
        let p = provider(&ks, "vol", None);
        let w = p.wrap(&Key32::generate()).unwrap();
        for i in 0..w.blob.len() {
            let mut bad = w.clone();
            bad.blob[i] ^= 0x01;
            assert!(
                matches!(p.unwrap(&bad), Err(KekError::UnwrapFailed(_))),
                "byte {i}"
            );
        }
        for len in [0, 1, WRAPPED_LEN - 1, WRAPPED_LEN + 1] {
            let mut bad = w.clone();
            bad.blob.resize(len, 0);
            assert!(
                matches!(p.unwrap(&bad), Err(KekError::UnwrapFailed(_))),
                "len {len}"
            );
        }
        let mut bad = w.clone();
        bad.mechanism = 99;
        let e = p.unwrap(&bad).unwrap_err();
        assert!(
            matches!(&e, KekError::UnwrapFailed(m) if m.contains("mechanism 99")),
            "{e}"
        );
    }

    #[test]
    fn state_changes_apply_at_once() {
        let (_tmp, ks) = store_with_key("vol");
        let p = provider(&ks, "vol", None);
        let aek = Key32::generate();
        let w = p.wrap(&aek).unwrap();
        let refusal = |r: Result<Key32, KekError>| match r {
            Err(KekError::Refused { reason, .. }) => Some(reason),
            Err(e) => panic!("{e}"),
            Ok(_) => None,
        };
        let set = |field: &str, value: serde_json::Value| {
            edit_json(ks.dir(), |v| {
                v["keys"]["vol"]["versions"][0][field] = value;
            })
        };
        set("enabled", false.into());
        assert_eq!(refusal(p.unwrap(&w)), Some(Refusal::Disabled));
        assert!(matches!(
            p.wrap(&aek),
            Err(KekError::Refused {
                reason: Refusal::Disabled,
                ..
            })
        ));
        set("enabled", true.into());
        assert_eq!(refusal(p.unwrap(&w)), None);
        set("expires", 1.into());
        assert_eq!(refusal(p.unwrap(&w)), Some(Refusal::Expired));
        set("expires", serde_json::Value::Null);
        set("not_before", (keystore::unix_now() + 3600).into());
        assert_eq!(refusal(p.unwrap(&w)), Some(Refusal::NotYetValid));
        set("not_before", serde_json::Value::Null);
        edit_json(ks.dir(), |v| v["keys"]["vol"]["deleted_at"] = 1.into());
        assert_eq!(refusal(p.unwrap(&w)), Some(Refusal::Deleted));
        edit_json(ks.dir(), |v| {
            v["keys"]["vol"]["deleted_at"] = serde_json::Value::Null
        });
        assert_eq!(p.unwrap(&w).unwrap().expose(), aek.expose());
        // A damaged keystore surfaces as Corrupt, not as a refusal or a panic.
        std::fs::write(ks.dir().join(keystore::KEYSTORE_FILE), b"garbage").unwrap();
        assert!(matches!(p.unwrap(&w), Err(KekError::Corrupt(_))));
        assert!(matches!(p.wrap(&aek), Err(KekError::Corrupt(_))));
    }
}
