//! Reading the kernel's mount table (/proc/self/mounts) for kekfs mounts.

use std::path::{Path, PathBuf};

/// One kekfs mount.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MountEntry {
    /// The backing directory (the mount's source).
    pub backing: PathBuf,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Mount options as the kernel reports them.
    pub options: String,
}

/// The filesystem type kekfs mounts show in the mount table.
pub const FSTYPE: &str = "fuse.kekfs";

fn unescape(s: &str) -> String {
    // The kernel escapes space, tab, newline and backslash as \ooo octal.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let oct = &s[i + 1..(i + 4).min(s.len())];
            if oct.len() == 3
                && let Ok(v) = u8::from_str_radix(oct, 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every kekfs mount on this machine (in this mount namespace).
pub fn kekfs_mounts() -> Vec<MountEntry> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() < 4 || f[2] != FSTYPE {
                return None;
            }
            Some(MountEntry {
                backing: PathBuf::from(unescape(f[0])),
                mountpoint: PathBuf::from(unescape(f[1])),
                options: f[3].to_string(),
            })
        })
        .collect()
}

/// The device number (`major:minor`) of the newest mount at `mountpoint`, from
/// /proc/self/mountinfo. It names the mount's entry in /sys/class/bdi. Unlike a `stat` of
/// the mountpoint, this does not call into the filesystem (whose daemon may not be
/// serving yet).
pub fn device_of(mountpoint: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dev = *f.get(2)?;
            let at = f.get(4)?;
            let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            let (major, minor) = dev.split_once(':')?;
            (Path::new(&unescape(at)) == mountpoint && numeric(major) && numeric(minor))
                .then(|| dev.to_string())
        })
        .next_back()
}

/// The kekfs mount at `mountpoint`, if any.
pub fn find_by_mountpoint(mountpoint: &Path) -> Option<MountEntry> {
    kekfs_mounts()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == mountpoint)
}

/// The kekfs mount of backing directory `backing`, if any.
pub fn find_by_backing(backing: &Path) -> Option<MountEntry> {
    kekfs_mounts()
        .into_iter()
        .rev()
        .find(|m| m.backing == backing)
}

/// Is anything (of any type) mounted at `path`?
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    text.lines().any(|l| {
        l.split(' ')
            .nth(1)
            .is_some_and(|m| Path::new(&unescape(m)) == path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}
