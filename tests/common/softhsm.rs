//! SoftHSM2 tokens for `pkcs11:` KEK tests: finding the module, and a private token
//! directory per test made by scripts/softhsm-setup.sh.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The user PIN of test tokens.
pub const PIN: &str = "4321";
/// The security officer PIN of test tokens.
pub const SO_PIN: &str = "87654321";

/// Where distributions put the SoftHSM2 module.
pub const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
];

/// The first of `paths` that is a file.
pub fn first_file(paths: &[&'static str]) -> Option<&'static str> {
    paths.iter().copied().find(|p| Path::new(p).is_file())
}

/// The SoftHSM2 module, if SoftHSM2 (module and `softhsm2-util`) is installed.
pub fn softhsm_installed() -> Option<&'static str> {
    let module = first_file(SOFTHSM_MODULES)?;
    super::tool_ok("softhsm2-util").then_some(module)
}

/// The SoftHSM2 module, or `None` (test skipped; a failure under CI=true).
pub fn softhsm(test: &str) -> Option<&'static str> {
    let module = softhsm_installed();
    if module.is_none() {
        super::skip(test, "SoftHSM2 is not installed (apt-get install softhsm2)");
    }
    module
}

pub fn setup_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/softhsm-setup.sh")
}

/// A token directory made by scripts/softhsm-setup.sh.
pub struct TokenDir {
    /// Its `softhsm2.conf` (for SOFTHSM2_CONF).
    pub conf: PathBuf,
    /// The file holding the user PIN.
    pub pinfile: PathBuf,
    /// What the script printed.
    pub stdout: String,
}

/// A new token directory `dir` with one token labelled `token`; asserts the script worked.
pub fn softhsm_setup(dir: &Path, token: &str, so_pin: &str, pin: &str) -> TokenDir {
    let o = Command::new("bash")
        .arg(setup_script())
        .arg(dir)
        .args([token, so_pin, pin])
        .output()
        .expect("run softhsm-setup.sh");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "softhsm-setup.sh failed ({:?}): {}{}",
        o.status.code(),
        stdout,
        String::from_utf8_lossy(&o.stderr)
    );
    TokenDir {
        conf: dir.join("softhsm2.conf"),
        pinfile: dir.join("pin"),
        stdout,
    }
}
