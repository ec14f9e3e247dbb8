//! `kekfs drill BACKING|MOUNTPOINT --yes`: seed 004's disable-the-key test, timed. With the
//! volume mounted (or mounted for the drill), disable the KEK version(s) wrapping its key,
//! measure how long until a read fails, enable them again, measure how long until reads
//! resume. The key is put back exactly as it was on every path out: success, failure,
//! Ctrl-C (SIGINT/SIGTERM are caught and turned into a clean stop).

use super::audit::outln;
use super::audit::{catch_stop_signals, stop_requested};
use super::error::CliError;
use super::{exit, mounts};
use crate::audit::record::{Event, TASK_VOLUME_STATE, op};
use crate::audit::{Audit, Lifecycle, To};
use crate::kek::keystore::Keystore;
use crate::kek::passphrase::PassphraseSource;
use crate::kek::pkcs11_uri::Pkcs11Uri;
use crate::kek::{KekUri, ProviderOptions, pkcs11};
use crate::monitor::status;
use crate::volume;
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Options of `kekfs drill`.
#[derive(Debug)]
pub struct DrillArgs {
    /// Backing directory or mountpoint.
    pub path: PathBuf,
    /// The user agreed to take the volume offline briefly.
    pub yes: bool,
    /// Longest wait for reads to fail, and again for them to resume.
    pub timeout: Duration,
    /// Machine-readable output.
    pub json: bool,
    /// The global `--audit-dir`, passed on to a temporary mount.
    pub audit_dir: Option<PathBuf>,
}

/// What the drill measured.
#[derive(Debug, Serialize)]
struct Outcome {
    backing: PathBuf,
    mountpoint: PathBuf,
    temporary_mount: bool,
    kek: String,
    versions: Vec<u32>,
    poll_ms: Option<u64>,
    /// From "disabled" to the first failing read.
    revoked_after_ms: u64,
    /// The errno reads failed with.
    errno: i32,
    errno_name: &'static str,
    /// From "enabled again" to the first successful read.
    resumed_after_ms: u64,
    key_restored: bool,
}

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EKEYREVOKED => "EKEYREVOKED",
        libc::EKEYEXPIRED => "EKEYEXPIRED",
        libc::EKEYREJECTED => "EKEYREJECTED",
        libc::ENOKEY => "ENOKEY",
        libc::EACCES => "EACCES",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EIO => "EIO",
        _ => "other",
    }
}

/// The key versions disabled for the drill, and how to enable them again.
enum Disabled {
    Soft {
        ks: Keystore,
        name: String,
        versions: Vec<u32>,
    },
    Token {
        uri: Box<Pkcs11Uri>,
        popts: ProviderOptions,
        versions: Vec<u32>,
    },
}

/// Enables what the drill disabled, at the latest when dropped.
struct Restore {
    disabled: Option<Disabled>,
    keystore_dir: PathBuf,
}

impl Restore {
    /// Enable the versions again; `Ok` once they are (or there was nothing to do).
    fn restore(&mut self) -> Result<(), CliError> {
        let Some(d) = self.disabled.take() else {
            return Ok(());
        };
        let ks_dir = self.keystore_dir.clone();
        let enable_all =
            |versions: &[u32],
             uri: &KekUri,
             mut enable: Box<dyn FnMut(u32) -> Result<(), crate::kek::KekError> + '_>|
             -> Result<(), CliError> {
                let mut err = None;
                for v in versions {
                    let lc = Lifecycle::begin(uri, &ks_dir, "enable", Some(*v));
                    let res = enable(*v);
                    if let Ok(lc) = lc {
                        let _ = match &res {
                            Ok(()) => lc.end(200, "kekfs drill: restored".into()),
                            Err(e) => lc.end(crate::audit::record::code_of(e), e.to_string()),
                        };
                    }
                    if let Err(e) = res {
                        err.get_or_insert(e);
                    }
                }
                match err {
                    None => Ok(()),
                    Some(e) => Err(CliError::from(e)),
                }
            };
        let r = match d {
            Disabled::Soft {
                mut ks,
                name,
                versions,
            } => {
                let uri = KekUri::Soft {
                    name: name.clone(),
                    version: None,
                };
                enable_all(
                    &versions,
                    &uri,
                    Box::new(move |v| ks.enable_version(&name, Some(v)).map(drop)),
                )
            }
            Disabled::Token {
                uri,
                popts,
                versions,
            } => {
                let kek = KekUri::Pkcs11(uri.clone());
                enable_all(
                    &versions,
                    &kek,
                    Box::new(move |v| {
                        pkcs11::set_key_usable(&uri, &popts, Some(v), true).map(drop)
                    }),
                )
            }
        };
        if let Err(e) = &r {
            eprintln!(
                "kekfs: CRITICAL: the drill could not enable the KEK again ({}); enable it by \
                 hand now (`kekfs key enable …`)",
                e.message
            );
        }
        r
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// A mount made for the drill; unmounted when dropped.
struct TempMount {
    dir: Option<tempfile::TempDir>,
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            if super::mount::unmount(d.path(), false).is_err() {
                let _ = super::mount::unmount(d.path(), true);
            }
            drop(d);
        }
    }
}

/// Run `kekfs drill`.
pub fn drill(args: &DrillArgs, popts: &ProviderOptions) -> Result<(), CliError> {
    let backing = super::rewrap::backing_of(&args.path)?;
    let (h, _) = volume::read_header(&backing)?;
    if !args.yes {
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "drill disables the KEK of {} ({}) for a moment: this volume, and every other \
                 volume under the same key version, stops serving until the drill enables it \
                 again (a few poll intervals). Run it again with --yes to go ahead",
                backing.display(),
                h.kek_uri
            ),
        ));
    }
    let uri = KekUri::parse(&h.kek_uri)?;
    let mut versions = vec![h.slots[0].key_version];
    if h.slots[1].key_version != h.slots[0].key_version {
        versions.push(h.slots[1].key_version);
    }
    catch_stop_signals();
    let (mountpoint, temp_guard) = match mounts::find_by_backing(&backing) {
        Some(m) => (m.mountpoint, TempMount { dir: None }),
        None => temp_mount(&backing, args, popts)?,
    };
    let temporary = temp_guard.dir.is_some();
    let probe_file = find_file(&mountpoint);
    let probe = || probe(&mountpoint, probe_file.as_deref());
    if let Err(e) = probe() {
        return Err(CliError::new(
            exit::DRILL_FAILED,
            format!(
                "{} does not serve reads now (errno {e}, {}); the drill needs a working volume",
                mountpoint.display(),
                errno_name(e)
            ),
        ));
    }
    let poll_ms = status::read(&volume::hex(&h.volume_id)).map(|p| p.poll_ms);

    // Disable, remembering exactly what changed.
    let mut restore = Restore {
        disabled: None,
        keystore_dir: popts.keystore_dir.clone(),
    };
    let disabled_versions = disable(&uri, &versions, popts, &mut restore)?;
    if disabled_versions.is_empty() {
        return Err(CliError::new(
            exit::DRILL_FAILED,
            format!(
                "the KEK versions wrapping this volume ({versions:?}) are already disabled; \
                 nothing to drill"
            ),
        ));
    }
    let t0 = Instant::now();
    let failed = wait(args.timeout, || probe().err());
    let revoked_after = t0.elapsed();
    let restored = restore.restore();
    let t1 = Instant::now();
    let errno = match failed {
        Waited::Got(e) => e,
        Waited::Stopped => {
            restored?;
            return Err(CliError::new(
                exit::DRILL_FAILED,
                "interrupted; the KEK was enabled again",
            ));
        }
        Waited::TimedOut => {
            restored?;
            return Err(CliError::new(
                exit::DRILL_FAILED,
                format!(
                    "reads from {} did not fail within {:?} of disabling the KEK: the volume \
                     does not depend on this key as it should (or its poll interval is longer); \
                     the KEK was enabled again",
                    mountpoint.display(),
                    args.timeout
                ),
            ));
        }
    };
    restored?;
    let resumed = wait(args.timeout, || probe().is_ok().then_some(()));
    let resumed_after = t1.elapsed();
    match resumed {
        Waited::Got(()) => {}
        Waited::Stopped => {
            return Err(CliError::new(
                exit::DRILL_FAILED,
                "interrupted while waiting for reads to resume; the KEK is enabled again",
            ));
        }
        Waited::TimedOut => {
            return Err(CliError::new(
                exit::DRILL_FAILED,
                format!(
                    "the KEK is enabled again, but reads from {} did not resume within {:?}",
                    mountpoint.display(),
                    args.timeout
                ),
            ));
        }
    }
    let out = Outcome {
        backing: backing.clone(),
        mountpoint: mountpoint.clone(),
        temporary_mount: temporary,
        kek: h.kek_uri.clone(),
        versions: disabled_versions,
        poll_ms,
        revoked_after_ms: revoked_after.as_millis() as u64,
        errno,
        errno_name: errno_name(errno),
        resumed_after_ms: resumed_after.as_millis() as u64,
        key_restored: true,
    };
    let audit = Audit::for_kek(&uri, &popts.keystore_dir).with_volume(&h.volume_id, &backing);
    let mut ev = Event::new(TASK_VOLUME_STATE, op::DRILL, 200);
    ev.version = Some(h.slots[0].key_version);
    ev.message = format!(
        "reads failed {} ms after disabling (errno {}), resumed {} ms after enabling",
        out.revoked_after_ms, out.errno_name, out.resumed_after_ms
    );
    ev.duration = t0.elapsed();
    audit.emit(&ev, To::Both)?;
    if args.json {
        let s = serde_json::to_string_pretty(&out).map_err(|e| CliError::failure(e.to_string()))?;
        outln!("{s}");
    } else {
        outln!(
            "drill on {} (mounted at {}{}), KEK {} version(s) {:?}:",
            backing.display(),
            mountpoint.display(),
            if temporary { ", temporarily" } else { "" },
            h.kek_uri,
            out.versions
        );
        outln!(
            "  disabled -> reads failed after {:.3} s (errno {} {})",
            revoked_after.as_secs_f64(),
            errno,
            out.errno_name
        );
        outln!(
            "  enabled  -> reads resumed after {:.3} s",
            resumed_after.as_secs_f64()
        );
        if let Some(p) = poll_ms {
            outln!("  poll interval {:.3} s", p as f64 / 1000.0);
        }
        outln!("  the KEK is enabled again, exactly as before");
    }
    Ok(())
}

/// Disable the enabled ones among `versions`; returns those (and arms `restore`).
fn disable(
    uri: &KekUri,
    versions: &[u32],
    popts: &ProviderOptions,
    restore: &mut Restore,
) -> Result<Vec<u32>, CliError> {
    match uri {
        KekUri::Soft { name, .. } => {
            let pass = popts.passphrase.read("keystore passphrase", false)?;
            let mut ks = Keystore::open(&popts.keystore_dir, &pass)?;
            let info = ks.key_info(name).ok_or_else(|| {
                CliError::new(
                    exit::KEY_NOT_FOUND,
                    format!("no key {name} in the keystore"),
                )
            })?;
            let enabled: Vec<u32> = versions
                .iter()
                .copied()
                .filter(|v| info.versions.iter().any(|x| x.version == *v && x.enabled))
                .collect();
            let mut done = Vec::new();
            let mut first_err = None;
            for v in &enabled {
                let lc = Lifecycle::begin(uri, &popts.keystore_dir, "disable", Some(*v))?;
                match ks.disable_version(name, Some(*v)) {
                    Ok(_) => {
                        done.push(*v);
                        let _ = lc.end(200, "kekfs drill".into());
                    }
                    Err(e) => {
                        let _ = lc.end(crate::audit::record::code_of(&e), e.to_string());
                        first_err = Some(e);
                        break;
                    }
                }
            }
            restore.disabled = Some(Disabled::Soft {
                ks,
                name: name.clone(),
                versions: done.clone(),
            });
            match first_err {
                Some(e) => Err(e.into()),
                None => Ok(done),
            }
        }
        KekUri::Pkcs11(u) => {
            let mut done = Vec::new();
            let mut first_err = None;
            for v in versions {
                let lc = Lifecycle::begin(uri, &popts.keystore_dir, "disable", Some(*v))?;
                match pkcs11::set_key_usable(u, popts, Some(*v), false) {
                    Ok((_, changes)) => {
                        let _ = lc.end(200, "kekfs drill".into());
                        if changes.iter().any(|c| c.changed) {
                            done.push(*v);
                        }
                    }
                    // Slot 1's older version may be gone from the token: nothing to disable.
                    Err(e @ crate::kek::KekError::NotFound(_)) if Some(v) != versions.first() => {
                        let _ = lc.end(404, e.to_string());
                    }
                    Err(e) => {
                        let _ = lc.end(crate::audit::record::code_of(&e), e.to_string());
                        first_err = Some(e);
                        break;
                    }
                }
            }
            restore.disabled = Some(Disabled::Token {
                uri: u.clone(),
                popts: popts.clone(),
                versions: done.clone(),
            });
            match first_err {
                Some(e) => Err(e.into()),
                None => Ok(done),
            }
        }
    }
}

enum Waited<T> {
    Got(T),
    TimedOut,
    Stopped,
}

fn wait<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Waited<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(x) = f() {
            return Waited::Got(x);
        }
        if stop_requested() {
            return Waited::Stopped;
        }
        if Instant::now() >= end {
            return Waited::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A read through the mount: list the root directory and read the start of one file.
/// `Err(errno)` if it fails.
fn probe(mnt: &Path, file: Option<&Path>) -> Result<(), i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    for e in std::fs::read_dir(mnt).map_err(errno)? {
        e.map_err(errno)?;
    }
    if let Some(f) = file {
        let mut buf = [0u8; 4096];
        std::fs::File::open(f)
            .and_then(|mut h| h.read(&mut buf))
            .map_err(errno)?;
    }
    Ok(())
}

/// A non-empty regular file near the top of the mount, to read from.
fn find_file(mnt: &Path) -> Option<PathBuf> {
    let mut dirs = vec![(mnt.to_path_buf(), 0)];
    let mut seen = 0;
    while let Some((d, depth)) = dirs.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            seen += 1;
            if seen > 1000 {
                return None;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_file() && e.metadata().is_ok_and(|m| m.len() > 0) {
                return Some(e.path());
            }
            if ft.is_dir() && depth < 3 {
                dirs.push((e.path(), depth + 1));
            }
        }
    }
    None
}

/// Mount the volume on a temporary directory for the drill (a short poll interval, so the
/// measurement is quick), by running `kekfs mount` with the same keystore and passphrase.
fn temp_mount(
    backing: &Path,
    args: &DrillArgs,
    popts: &ProviderOptions,
) -> Result<(PathBuf, TempMount), CliError> {
    let dir = tempfile::Builder::new()
        .prefix("kekfs-drill.")
        .tempdir()
        .map_err(|e| CliError::failure(format!("creating a temporary mountpoint: {e}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| CliError::failure(format!("finding the kekfs binary: {e}")))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--keystore").arg(&popts.keystore_dir);
    if let PassphraseSource::File(p) = &popts.passphrase {
        cmd.arg("--passfile").arg(p);
    }
    if let Some(d) = &args.audit_dir {
        cmd.arg("--audit-dir").arg(d);
    }
    cmd.arg("mount")
        .arg(backing)
        .arg(dir.path())
        .args(["-o", "poll=500ms"]);
    let o = cmd
        .output()
        .map_err(|e| CliError::failure(format!("running kekfs mount: {e}")))?;
    if !o.status.success() {
        return Err(CliError::new(
            o.status.code().unwrap_or(exit::MOUNT_FAILED),
            format!(
                "mounting {} for the drill failed: {}",
                backing.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ));
    }
    let mp = dir.path().to_path_buf();
    Ok((mp, TempMount { dir: Some(dir) }))
}
