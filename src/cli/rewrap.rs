//! `kekfs rewrap`: wrap a volume's AEK under another KEK version (or another KEK),
//! offline or while it is mounted. Data is never re-encrypted.

use super::error::CliError;
use super::{exit, mounts};
use crate::audit::{open_audited, record};
use crate::kek::{KekUri, ProviderOptions};
use crate::volume::{self, Volume};
use std::path::Path;

/// Where the rewrap goes.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `--to VERSION`: pin the same key at this version.
    pub version: Option<u32>,
    /// `--to-kek URI`: another KEK altogether (its own version rules).
    pub kek: Option<String>,
}

/// Resolve a backing directory from a backing dir or a mountpoint.
pub fn backing_of(path: &Path) -> Result<std::path::PathBuf, CliError> {
    let c = std::fs::canonicalize(path)
        .map_err(|e| CliError::new(exit::NOT_A_VOLUME, format!("{}: {e}", path.display())))?;
    Ok(match mounts::find_by_mountpoint(&c) {
        Some(m) => m.backing,
        None => c,
    })
}

/// Run a rewrap.
pub fn rewrap(path: &Path, target: &Target, popts: &ProviderOptions) -> Result<(), CliError> {
    let backing = backing_of(path)?;
    let (header, _) = volume::read_header(&backing)?;
    let current = KekUri::parse(&header.kek_uri)?;
    let for_volume = Some((&header.volume_id, backing.as_path()));
    let old_provider = open_audited(&current, popts, for_volume)?;
    let vol = Volume::open(&backing, &old_provider)?;
    let new_uri = match (&target.kek, target.version) {
        (Some(_), Some(_)) => {
            return Err(CliError::new(
                exit::USAGE,
                "give either --to VERSION or --to-kek URI, not both",
            ));
        }
        (Some(k), None) => KekUri::parse(k)?,
        (None, Some(v)) => current.with_version(Some(v)),
        (None, None) => current.clone(),
    };
    let pinned = new_uri.version().unwrap_or(0);
    let new_provider = if new_uri == current {
        old_provider
    } else {
        open_audited(&new_uri, popts, for_volume)?
    };
    let before = header.slots[0].key_version;
    let nh = vol.rewrap(&backing, &new_provider, pinned)?;
    crate::audit::volume::state_line(
        new_provider.audit(),
        record::op::REWRAP,
        200,
        Some(nh.slots[0].key_version),
        format!(
            "rewrapped from {} version {before} to {} version {}",
            header.kek_uri, nh.kek_uri, nh.slots[0].key_version
        ),
        true,
    )?;
    println!(
        "rewrapped volume {}: {} version {} -> {} version {}{}",
        volume::hex(&nh.volume_id),
        header.kek_uri,
        before,
        nh.kek_uri,
        nh.slots[0].key_version,
        if pinned == 0 {
            " (follows latest)"
        } else {
            " (pinned)"
        }
    );
    if mounts::find_by_backing(&backing).is_some() {
        println!("the mounted volume picks up the new header at its next poll");
    }
    Ok(())
}
