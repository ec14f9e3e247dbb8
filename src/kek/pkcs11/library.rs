//! Finding, loading and (re)initialising the PKCS#11 library: one C_Initialize'd context
//! per module path and process, started over when the link to the token breaks.

use super::error::ck_text;
use crate::kek::KekError;
use crate::kek::pkcs11_uri::Pkcs11Uri;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

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

/// Which PKCS#11 library a URI uses: `module-path`, else `module-name` looked up in
/// [`MODULE_DIRS`], else the first of [`DEFAULT_MODULES`] that exists.
///
/// The module is then checked with [`check_module_trust`]: the URI usually comes from a
/// volume header, which is not authenticated until the key it wraps is unwrapped, so a
/// module it names must not be one that whoever can write the backing directory put there.
pub fn resolve_module(u: &Pkcs11Uri) -> Result<PathBuf, KekError> {
    check_module_trust(&find_module(u)?)
}

fn find_module(u: &Pkcs11Uri) -> Result<PathBuf, KekError> {
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
        if name.contains('/') || name.starts_with('.') || name.is_empty() {
            return Err(KekError::ModuleLoad(format!(
                "module-name {name:?} is not a plain library name (no '/', not starting with \
                 '.'); give a full path with module-path= instead"
            )));
        }
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

/// Filesystems whose files' owners and modes the machine cannot vouch for (the server or
/// the FUSE daemon says what they are): no module is loaded from them.
const REMOTE_FS: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x6573_5546, "FUSE"),
    (0x0102_1997, "9p"),
    (0x00C3_6400, "Ceph"),
    (0x6B41_4653, "AFS"),
    (0x7375_7245, "Coda"),
];

/// The module at `p` (its canonical path), if only root or the user running kekfs can
/// have put it there or changed it: a regular file owned by root or that user and not
/// writable by group or others, in directories that are all the same up to `/`, on a
/// local filesystem. Loading a module runs its code with kekfs's privileges, so a module
/// named by a tampered volume header (say, a library planted in the backing directory,
/// or anywhere a local user or a file server controls) must not be loaded.
pub fn check_module_trust(p: &Path) -> Result<PathBuf, KekError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| {
        KekError::ModuleLoad(format!(
            "{}: {why}; kekfs loads a PKCS#11 module only from a file that only root (or \
             the user running kekfs) can change, on a local filesystem",
            p.display()
        ))
    };
    let canon = std::fs::canonicalize(p).map_err(|e| refuse(e.to_string()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut at = Some(canon.as_path());
    while let Some(cur) = at {
        let md = std::fs::metadata(cur).map_err(|e| refuse(format!("{}: {e}", cur.display())))?;
        if md.uid() != 0 && md.uid() != me {
            return Err(refuse(format!(
                "{} is owned by uid {}",
                cur.display(),
                md.uid()
            )));
        }
        if md.mode() & 0o022 != 0 {
            return Err(refuse(format!(
                "{} is writable by {} (mode {:o})",
                cur.display(),
                if md.mode() & 0o002 != 0 {
                    "everyone"
                } else {
                    "its group"
                },
                md.mode() & 0o7777
            )));
        }
        if cur == canon && !md.is_file() {
            return Err(refuse("not a regular file".into()));
        }
        at = cur.parent();
    }
    let c = std::ffi::CString::new(canon.as_os_str().as_encoded_bytes())
        .map_err(|_| refuse("path contains a NUL byte".into()))?;
    // SAFETY: zeroed is a valid bit pattern for the plain-data `statfs` struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut fs) } != 0 {
        return Err(refuse(std::io::Error::last_os_error().to_string()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between targets
    let kind = fs.f_type as i64;
    if let Some((_, name)) = REMOTE_FS.iter().find(|(m, _)| *m == kind) {
        return Err(refuse(format!("it is on a {name} filesystem")));
    }
    Ok(canon)
}

/// Refuse a module on the filesystem of the volume's backing directory, unless that is
/// the system's own (the one holding `/` or `/usr`): whoever could change the volume's
/// files offline (a removable disk, a restored backup) could set any owner and mode on a
/// library stored beside them. (Someone who can do that to the system's filesystem owns
/// the machine anyway.)
pub fn check_module_apart(module: &Path, backing: &Path) -> Result<(), KekError> {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let (Some(m), Some(b)) = (dev(module), dev(backing)) else {
        return Ok(()); // the checks that need them report missing files
    };
    let system = [dev(Path::new("/")), dev(Path::new("/usr"))];
    if m == b && !system.contains(&Some(m)) {
        return Err(KekError::ModuleLoad(format!(
            "{} is on the same filesystem as the volume's backing directory {}; kekfs does \
             not load a PKCS#11 module from there (whoever can change the volume's files \
             could have put it there)",
            module.display(),
            backing.display()
        )));
    }
    Ok(())
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
pub(super) struct Module {
    pub(super) ctx: Pkcs11,
    pub(super) generation: u64,
    pub(super) calls: Arc<RwLock<()>>,
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
pub(super) fn context(module: &Path) -> Result<Module, KekError> {
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
pub(super) fn reinitialize(module: &Path, generation: u64) -> bool {
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

/// The generation of `module`'s library in this process, if it is initialised.
pub(super) fn current_generation(module: &Path) -> Option<u64> {
    contexts()
        .get(module)
        .filter(|l| l.pid == std::process::id())
        .map(|l| l.generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Pkcs11Uri {
        Pkcs11Uri::parse(s).unwrap()
    }

    #[test]
    fn module_resolution() {
        let e =
            resolve_module(&uri("pkcs11:object=k?module-path=/nonexistent/lib.so")).unwrap_err();
        assert!(matches!(&e, KekError::ModuleLoad(m) if m.contains("/nonexistent/lib.so")));
        let e =
            resolve_module(&uri("pkcs11:object=k?module-name=no-such-module-kekfs")).unwrap_err();
        assert!(matches!(&e, KekError::ModuleLoad(m) if m.contains("no-such-module-kekfs")));
        for bad in ["../../tmp/x", "/tmp/x", ".hidden", "..", "a/b"] {
            // The URI parser refuses a '/' already; resolving refuses the rest.
            let Ok(u) = Pkcs11Uri::parse(&format!("pkcs11:object=k?module-name={bad}")) else {
                assert!(bad.contains('/'), "{bad} refused by the parser");
                continue;
            };
            let e = resolve_module(&u).unwrap_err();
            assert!(
                matches!(&e, KekError::ModuleLoad(m) if m.contains("not a plain library name")),
                "{bad}: {e}"
            );
        }
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
    fn only_modules_no_one_else_can_change_are_trusted() {
        // Owned by root, not group/other writable, all the way up (not loaded here).
        let sh = check_module_trust(Path::new("/bin/sh")).unwrap();
        assert!(sh.is_absolute());
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib.so");
        std::fs::write(&lib, b"x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = check_module_trust(&lib).unwrap_err();
        assert!(
            matches!(&e, KekError::ModuleLoad(m) if m.contains("writable by its group")),
            "{e}"
        );
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The temp dir's parent (/tmp, or wherever TMPDIR points) is world-writable here
        // unless TMPDIR says otherwise; either way some ancestor must be checked.
        if std::fs::metadata(std::env::temp_dir())
            .map(|m| std::os::unix::fs::MetadataExt::mode(&m) & 0o002 != 0)
            .unwrap_or(false)
        {
            let e = check_module_trust(&lib).unwrap_err();
            assert!(
                matches!(&e, KekError::ModuleLoad(m) if m.contains("writable by everyone")),
                "{e}"
            );
        }
        let e = check_module_trust(dir.path()).unwrap_err();
        assert!(matches!(&e, KekError::ModuleLoad(_)), "{e}");
        // A symlink is judged by its target.
        let link = dir.path().join("link.so");
        std::os::unix::fs::symlink("/bin/sh", &link).unwrap();
        assert_eq!(check_module_trust(&link).unwrap(), sh);
    }
}
