//! Where the keystore lives when no directory is given: `$KEKFS_KEYSTORE`, else a system or
//! per-user default.

use super::policy::current_euid;
use std::path::PathBuf;

/// Environment variable overriding [`default_keystore_dir`].
pub const ENV_KEYSTORE: &str = "KEKFS_KEYSTORE";

/// The keystore directory used when none is given: `$KEKFS_KEYSTORE` if set; else
/// `/var/lib/kekfs` for root; else `$XDG_DATA_HOME/kekfs` or `$HOME/.local/share/kekfs`
/// (falling back to `/var/lib/kekfs` when neither is set to an absolute path).
pub fn default_keystore_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(ENV_KEYSTORE).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if current_euid() == 0 {
        return PathBuf::from("/var/lib/kekfs");
    }
    let abs = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(x) = abs("XDG_DATA_HOME") {
        return x.join("kekfs");
    }
    if let Some(h) = abs("HOME") {
        return h.join(".local/share/kekfs");
    }
    PathBuf::from("/var/lib/kekfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dir_is_absolute_or_overridden() {
        let d = default_keystore_dir();
        match std::env::var_os(ENV_KEYSTORE).filter(|d| !d.is_empty()) {
            Some(v) => assert_eq!(d, PathBuf::from(v)),
            None => {
                assert!(d.is_absolute());
                assert!(d.ends_with("kekfs"));
            }
        }
    }
}
