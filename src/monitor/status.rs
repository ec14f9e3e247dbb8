//! The status file a mount daemon publishes for `kekfs status`: state, KEK, last poll.

use super::{Gate, State};
use std::path::PathBuf;

/// Directory holding one `<volume-id>.json` per mounted volume.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KEKFS_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/kekfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("kekfs"),
        None => std::env::temp_dir().join(format!("kekfs-{}", unsafe_uid())),
    }
}

fn unsafe_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// The published status of a mounted volume.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// Daemon pid.
    pub pid: u32,
    /// Volume id (hex).
    pub volume_id: String,
    /// Backing directory.
    pub backing: PathBuf,
    /// Mountpoint.
    pub mountpoint: PathBuf,
    /// Key state, flattened: `state` plus fields.
    pub key_state: serde_json::Value,
    /// KEK version wrapping the AEK in slot 0 at the last poll.
    pub key_version: u32,
    /// Last successful poll (Unix seconds).
    pub last_ok_poll: Option<u64>,
    /// Poll interval (ms).
    pub poll_ms: u64,
    /// Grace period (ms).
    pub grace_ms: u64,
    /// How the kernel's requests reach the daemon: `io_uring` or `/dev/fuse`.
    #[serde(default)]
    pub transport: String,
}

/// Path of a volume's status file.
pub fn path_for(volume_id: &str) -> PathBuf {
    runtime_dir().join(format!("{volume_id}.json"))
}

/// Write `p` atomically.
pub fn publish(p: &Published) {
    let dir = runtime_dir();
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    if let Ok(s) = serde_json::to_vec_pretty(p) {
        let _ = crate::volume::write_atomic(&dir, &format!("{}.json", p.volume_id), &s, 0o644);
    }
}

/// Read a volume's status file (if its daemon is alive).
pub fn read(volume_id: &str) -> Option<Published> {
    let p: Published = serde_json::from_slice(&std::fs::read(path_for(volume_id)).ok()?).ok()?;
    // SAFETY: kill with signal 0 only checks the pid exists.
    let alive = unsafe { libc::kill(p.pid as i32, 0) } == 0;
    alive.then_some(p)
}

/// Remove a volume's status file.
pub fn remove(volume_id: &str) {
    let _ = std::fs::remove_file(path_for(volume_id));
}

/// A status snapshot of the gate.
pub fn state_json(gate: &Gate) -> serde_json::Value {
    serde_json::to_value(gate.state()).unwrap_or_else(|_| serde_json::json!({"state": "active"}))
}

/// True when the state serves plaintext.
pub fn serving(s: &State) -> bool {
    matches!(s, State::Active | State::Grace { .. })
}
