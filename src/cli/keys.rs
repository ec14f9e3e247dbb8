//! `kekfs key disable|enable|set|delete|recover|purge|protect|policy|show`: lifecycle of
//! keys in the `soft:` keystore. Every change is one atomic, locked keystore write, seen by
//! running mounts at their next wrap/unwrap (providers re-read the keystore every time).

use super::error::CliError;
use super::exit;
use super::timespec::{parse_duration, parse_time};
use crate::kek::ProviderOptions;
use crate::kek::keystore::{
    self, KeyInfo, KeyOp, KeyPolicy, Keystore, VersionInfo, format_duration, format_time,
};
use crate::kek::{KekError, KekProvider, Refusal};
use clap::{ArgGroup, Subcommand, ValueEnum};
use serde::Serialize;
use std::path::Path;

fn current_euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Key lifecycle subcommands, flattened into `kekfs key`.
#[derive(Debug, Subcommand)]
pub enum KeyLifecycleCmd {
    /// Disable a key (all versions) or one version (NAME@VERSION): wrap and unwrap are
    /// refused at once, including by running mounts. A token key: --kek 'pkcs11:…'
    /// [--version N] sets CKA_UNWRAP and CKA_WRAP false on its key objects.
    Disable {
        /// NAME or NAME@VERSION.
        #[arg(value_name = "NAME[@VERSION]", required_unless_present = "kek")]
        target: Option<String>,
        /// The key as a KEK URI instead of NAME (pkcs11:… or soft:NAME[?version=N]).
        #[arg(long, value_name = "URI", conflicts_with = "target")]
        kek: Option<String>,
        /// With --kek: only this version (pkcs11: the key object with CKA_ID = N).
        #[arg(long, value_name = "N", requires = "kek")]
        version: Option<u32>,
    },
    /// Enable a key (all versions) or one version (NAME@VERSION) again. A token key:
    /// --kek 'pkcs11:…' [--version N] sets CKA_UNWRAP and CKA_WRAP true again.
    Enable {
        /// NAME or NAME@VERSION.
        #[arg(value_name = "NAME[@VERSION]", required_unless_present = "kek")]
        target: Option<String>,
        /// The key as a KEK URI instead of NAME (pkcs11:… or soft:NAME[?version=N]).
        #[arg(long, value_name = "URI", conflicts_with = "target")]
        kek: Option<String>,
        /// With --kek: only this version (pkcs11: the key object with CKA_ID = N).
        #[arg(long, value_name = "N", requires = "kek")]
        version: Option<u32>,
    },
    /// Set validity dates of a key (all versions) or one version, or a key's retention.
    ///
    /// T is an RFC 3339 time (2027-01-01T00:00:00Z, or a date 2027-01-01 meaning midnight
    /// UTC), `now`, a time relative to now (+1h, +30d, -2d; units s m h d w), or `none` to
    /// clear the date. A version is usable when not-before <= now < expiry.
    #[command(group(ArgGroup::new("what").required(true).multiple(true)
        .args(["not_before", "expires", "retention"])))]
    Set {
        /// NAME or NAME@VERSION.
        #[arg(value_name = "NAME[@VERSION]")]
        target: String,
        /// Not usable before T.
        #[arg(long, value_name = "T", allow_hyphen_values = true)]
        not_before: Option<String>,
        /// Not usable from T on.
        #[arg(long, value_name = "T", allow_hyphen_values = true)]
        expires: Option<String>,
        /// How long a deleted key stays recoverable (e.g. 30d, 12h, 0), or `default` for the
        /// keystore's (7d unless changed). Whole key only.
        #[arg(long, value_name = "DURATION")]
        retention: Option<String>,
    },
    /// Soft-delete a key: refused for all use at once; recoverable during its retention
    /// period (7 days by default).
    Delete {
        /// Key name.
        name: String,
    },
    /// Undo the deletion of a key, within its retention period.
    Recover {
        /// Key name.
        name: String,
    },
    /// Remove a deleted key for good, once its retention period has passed (never while
    /// purge protection is on). Volumes under it become unreadable for ever.
    Purge {
        /// Key name.
        name: String,
    },
    /// Turn purge protection on: the key can then never be purged, and its retention
    /// period only lengthened. This cannot be undone.
    Protect {
        /// Key name.
        name: String,
    },
    /// Set (replace) or clear a key's access policy by effective uid.
    ///
    /// A uid in --deny-uid is refused; if --allow-uid is given, every other uid is refused.
    /// --ops limits the policy to some operations (default: wrap and unwrap).
    #[command(group(ArgGroup::new("what").required(true).multiple(true)
        .args(["allow_uid", "deny_uid", "clear"])))]
    Policy {
        /// Key name.
        name: String,
        /// Only these uids may use the key (repeatable).
        #[arg(long = "allow-uid", value_name = "UID")]
        allow_uid: Vec<u32>,
        /// These uids may not use the key (repeatable; wins over --allow-uid).
        #[arg(long = "deny-uid", value_name = "UID")]
        deny_uid: Vec<u32>,
        /// Operations the policy governs, comma-separated.
        #[arg(long, value_name = "OPS", value_delimiter = ',')]
        ops: Vec<OpArg>,
        /// Remove the policy: any uid may use the key.
        #[arg(long, conflicts_with_all = ["allow_uid", "deny_uid", "ops"])]
        clear: bool,
    },
    /// Show a key: versions and their states, dates, deletion, policy, volumes using it.
    Show {
        /// Key name.
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// An operation named on the command line (`--ops wrap,unwrap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OpArg {
    /// Wrapping an AEK (creating a volume, rewrapping).
    Wrap,
    /// Unwrapping an AEK (mounting, and every check of a mounted volume).
    Unwrap,
}

impl From<OpArg> for KeyOp {
    fn from(o: OpArg) -> KeyOp {
        match o {
            OpArg::Wrap => KeyOp::Wrap,
            OpArg::Unwrap => KeyOp::Unwrap,
        }
    }
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::new(exit::USAGE, msg)
}

/// Split `NAME[@VERSION]`; key names cannot contain '@'.
pub fn parse_target(s: &str) -> Result<(String, Option<u32>), CliError> {
    let (name, version) = match s.rsplit_once('@') {
        Some((n, v)) => {
            let parsed = v.parse::<u32>().ok().filter(|&x| x >= 1).ok_or_else(|| {
                usage(format!(
                    "bad key version in {s:?}: expected NAME@VERSION with VERSION a number \
                     from 1"
                ))
            })?;
            (n, Some(parsed))
        }
        None => (s, None),
    };
    keystore::validate_key_name(name).map_err(usage)?;
    Ok((name.to_string(), version))
}

fn check_name(name: &str) -> Result<(), CliError> {
    keystore::validate_key_name(name).map_err(usage)
}

fn open(popts: &ProviderOptions) -> Result<Keystore, CliError> {
    let pass = popts.passphrase.read("keystore passphrase", false)?;
    Ok(Keystore::open(&popts.keystore_dir, &pass)?)
}

fn what(name: &str, version: Option<u32>) -> String {
    match version {
        Some(v) => format!("key {name} version {v}"),
        None => format!("key {name} (all versions)"),
    }
}

/// Run a lifecycle subcommand.
pub fn run(cmd: KeyLifecycleCmd, popts: &ProviderOptions) -> Result<(), CliError> {
    let now = keystore::unix_now();
    match cmd {
        KeyLifecycleCmd::Disable {
            kek: Some(kek),
            version,
            ..
        } => super::token::set_enabled(&kek, version, false, popts),
        KeyLifecycleCmd::Enable {
            kek: Some(kek),
            version,
            ..
        } => super::token::set_enabled(&kek, version, true, popts),
        KeyLifecycleCmd::Disable {
            version: Some(_), ..
        }
        | KeyLifecycleCmd::Enable {
            version: Some(_), ..
        } => Err(usage(
            "--version goes with --kek URI; for a keystore key write NAME@VERSION",
        )),
        KeyLifecycleCmd::Disable { target, .. } => {
            // clap requires NAME when --kek is absent.
            let target = target.unwrap_or_default();
            let (name, version) = parse_target(&target)?;
            let changed = open(popts)?.disable_version(&name, version)?;
            let note = if changed { "" } else { " (it already was)" };
            println!(
                "disabled {}{note}: wrap and unwrap with it are refused now; enable it again \
                 with `kekfs key enable {target}`",
                what(&name, version)
            );
            Ok(())
        }
        KeyLifecycleCmd::Enable { target, .. } => {
            let target = target.unwrap_or_default();
            let (name, version) = parse_target(&target)?;
            let changed = open(popts)?.enable_version(&name, version)?;
            let note = if changed { "" } else { " (it already was)" };
            println!("enabled {}{note}", what(&name, version));
            Ok(())
        }
        KeyLifecycleCmd::Set {
            target,
            not_before,
            expires,
            retention,
        } => {
            let (name, version) = parse_target(&target)?;
            let time = |s: Option<String>, flag: &str| {
                s.map(|s| parse_time(&s, now).map_err(|e| usage(format!("{flag}: {e}"))))
                    .transpose()
            };
            let not_before = time(not_before, "--not-before")?;
            let expires = time(expires, "--expires")?;
            let retention = match retention.as_deref() {
                None => None,
                Some(_) if version.is_some() => {
                    return Err(usage(format!(
                        "--retention applies to the whole key: use `kekfs key set {name} \
                         --retention …` without @VERSION"
                    )));
                }
                Some("default") => Some(None),
                Some(d) => Some(Some(
                    parse_duration(d).map_err(|e| usage(format!("--retention: {e}")))?,
                )),
            };
            let mut ks = open(popts)?;
            if not_before.is_some() || expires.is_some() {
                ks.set_dates(&name, version, not_before, expires)?;
            }
            if let Some(r) = retention {
                ks.set_retention(&name, r)?;
            }
            let info = key_info(&ks, &name)?;
            for v in info
                .versions
                .iter()
                .filter(|v| version.is_none_or(|x| x == v.version))
            {
                println!(
                    "{name} version {}: not before {}, expires {} ({})",
                    v.version,
                    opt_time(v.not_before, "-"),
                    opt_time(v.expires, "never"),
                    version_state(v, now)
                );
            }
            if retention.is_some() {
                println!(
                    "{name}: retention {} (how long it stays recoverable once deleted)",
                    format_duration(info.retention_secs)
                );
            }
            Ok(())
        }
        KeyLifecycleCmd::Delete { name } => {
            check_name(&name)?;
            let mut ks = open(popts)?;
            let until = ks.delete_key(&name, now)?;
            let info = key_info(&ks, &name)?;
            println!(
                "deleted key {name}: it refuses all use now. Recover it with `kekfs key recover \
                 {name}` until {}{}",
                format_time(until),
                if info.purge_protection {
                    " (it is purge-protected: it can never be purged)"
                } else {
                    "; after that it can be purged with `kekfs key purge`"
                }
            );
            Ok(())
        }
        KeyLifecycleCmd::Recover { name } => {
            check_name(&name)?;
            open(popts)?.recover_key(&name, now)?;
            println!("recovered key {name}: it can be used again");
            Ok(())
        }
        KeyLifecycleCmd::Purge { name } => {
            check_name(&name)?;
            let volumes = open(popts)?.purge_key(&name, now)?;
            println!("purged key {name}: its key material is gone for good");
            for v in volumes {
                eprintln!(
                    "kekfs: warning: volume {} ({}) was created under {name} and can no longer \
                     be unlocked",
                    v.id, v.path
                );
            }
            Ok(())
        }
        KeyLifecycleCmd::Protect { name } => {
            check_name(&name)?;
            let mut ks = open(popts)?;
            let changed = ks.set_purge_protection(&name, true)?;
            let info = key_info(&ks, &name)?;
            let note = if changed { "" } else { " (it already was)" };
            println!(
                "purge protection is on for key {name}{note}: it can never be purged, its \
                 retention period ({}) can only be lengthened, and this cannot be undone",
                format_duration(info.retention_secs)
            );
            Ok(())
        }
        KeyLifecycleCmd::Policy {
            name,
            allow_uid,
            deny_uid,
            ops,
            clear,
        } => {
            check_name(&name)?;
            let mut ks = open(popts)?;
            if clear {
                let had = ks.clear_policy(&name)?;
                let note = if had { "" } else { " (it had none)" };
                println!("cleared the policy of key {name}{note}: any uid may use it");
                return Ok(());
            }
            let policy = KeyPolicy {
                allow_uids: allow_uid,
                deny_uids: deny_uid,
                ops: ops.into_iter().map(KeyOp::from).collect(),
            };
            ks.set_policy(&name, policy)?;
            let info = key_info(&ks, &name)?;
            println!(
                "policy of key {name}: {}",
                policy_text(info.policy.as_ref())
            );
            Ok(())
        }
        KeyLifecycleCmd::Show { name, json } => {
            check_name(&name)?;
            let ks = open(popts)?;
            let info = key_info(&ks, &name)?;
            let view = KeyView::new(&info, now);
            if json {
                let s = serde_json::to_string_pretty(&view)
                    .map_err(|e| CliError::failure(e.to_string()))?;
                println!("{s}");
            } else {
                print!("{}", view.text());
            }
            Ok(())
        }
    }
}

/// Record a newly created volume with its KEK's provider (`kekfs init`). A failure is only a
/// warning: the volume exists and works; `kekfs key show` just will not list it.
pub fn register_volume(provider: &dyn KekProvider, volume_id: &[u8; 16], backing: &Path) {
    let path = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_path_buf());
    if let Err(e) = provider.register_volume(volume_id, &path) {
        eprintln!(
            "kekfs: warning: the volume was created, but recording it with {} failed ({e}); \
             `kekfs key show` will not list it",
            provider.uri()
        );
    }
}

/// What to do about a `soft:` KEK refusal, as a suffix for the error message (`None` for
/// other errors and other providers).
pub fn refusal_hint(e: &KekError) -> Option<String> {
    let KekError::Refused { key, reason } = e else {
        return None;
    };
    let rest = key.strip_prefix("soft:")?;
    let (name, target) = match rest.split_once("?version=") {
        Some((n, v)) => (n, format!("{n}@{v}")),
        None => (rest, rest.to_string()),
    };
    keystore::validate_key_name(name).ok()?;
    Some(match reason {
        Refusal::Disabled => {
            format!("; enable it with `kekfs key enable {target}` (see `kekfs key show {name}`)")
        }
        Refusal::Expired | Refusal::NotYetValid => format!(
            "; see its dates with `kekfs key show {name}`, change them with `kekfs key set \
             {target} --not-before T --expires T`"
        ),
        Refusal::Deleted => format!(
            "; recover it with `kekfs key recover {name}` while its retention period lasts \
             (see `kekfs key show {name}`)"
        ),
        Refusal::Denied => format!(
            "; the key's policy does not allow uid {}: see `kekfs key show {name}`, change it \
             with `kekfs key policy {name}`",
            current_euid()
        ),
    })
}

fn key_info(ks: &Keystore, name: &str) -> Result<KeyInfo, CliError> {
    ks.key_info(name).ok_or_else(|| {
        CliError::new(
            exit::KEY_NOT_FOUND,
            format!(
                "key not found: no key {name:?} in keystore {} (existing keys: {}); check \
                 the name with `kekfs key list`",
                ks.dir().display(),
                match ks.key_names() {
                    n if n.is_empty() => "none".to_string(),
                    n => n.join(", "),
                }
            ),
        )
    })
}

fn opt_time(t: Option<u64>, none: &str) -> String {
    t.map_or_else(|| none.to_string(), format_time)
}

/// `enabled` (usable now), `disabled`, `expired` or `not-yet-valid`.
pub fn version_state(v: &VersionInfo, now: u64) -> &'static str {
    match v.refusal_at(now) {
        None => "enabled",
        Some(Refusal::Disabled) => "disabled",
        Some(Refusal::Expired) => "expired",
        Some(Refusal::NotYetValid) => "not-yet-valid",
        // Key-level causes; refusal_at never returns them.
        Some(Refusal::Deleted) => "deleted",
        Some(Refusal::Denied) => "denied",
    }
}

fn policy_text(p: Option<&KeyPolicy>) -> String {
    let Some(p) = p else {
        return "none (any uid may use the key)".into();
    };
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let mut parts = Vec::new();
    if !p.allow_uids.is_empty() {
        parts.push(format!("only uids {} allowed", list(&p.allow_uids)));
    }
    if !p.deny_uids.is_empty() {
        parts.push(format!("uids {} denied", list(&p.deny_uids)));
    }
    if parts.is_empty() {
        parts.push("nobody denied".into());
    }
    let ops = if p.ops.is_empty() || p.ops.len() == 2 {
        "wrap and unwrap".to_string()
    } else {
        p.ops
            .iter()
            .map(|o| match o {
                KeyOp::Wrap => "wrap only",
                KeyOp::Unwrap => "unwrap only",
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("{} ({ops})", parts.join("; "))
}

/// `kekfs key show` output, as JSON and text. Dates are RFC 3339 UTC.
#[derive(Debug, Serialize)]
struct KeyView {
    name: String,
    /// `active` or `deleted`.
    state: &'static str,
    created: String,
    /// The version `soft:NAME` would use now (ignoring the policy), if any.
    usable_version: Option<u32>,
    purge_protection: bool,
    retention_secs: u64,
    deleted_at: Option<String>,
    /// While deleted: recoverable before this time, purgeable (unless protected) after.
    recoverable_until: Option<String>,
    recoverable: bool,
    purgeable: bool,
    policy: Option<PolicyView>,
    versions: Vec<VersionView>,
    volumes: Vec<VolumeView>,
}

#[derive(Debug, Serialize)]
struct PolicyView {
    allow_uids: Vec<u32>,
    deny_uids: Vec<u32>,
    ops: Vec<KeyOp>,
}

#[derive(Debug, Serialize)]
struct VersionView {
    version: u32,
    /// `enabled`, `disabled`, `expired` or `not-yet-valid`.
    state: &'static str,
    enabled: bool,
    created: String,
    not_before: Option<String>,
    expires: Option<String>,
}

#[derive(Debug, Serialize)]
struct VolumeView {
    id: String,
    path: String,
    registered: String,
}

impl KeyView {
    fn new(k: &KeyInfo, now: u64) -> KeyView {
        let until = k.recoverable_until();
        KeyView {
            name: k.name.clone(),
            state: if k.deleted_at.is_some() {
                "deleted"
            } else {
                "active"
            },
            created: format_time(k.created),
            usable_version: k.usable_version_at(now),
            purge_protection: k.purge_protection,
            retention_secs: k.retention_secs,
            deleted_at: k.deleted_at.map(format_time),
            recoverable_until: until.map(format_time),
            recoverable: until.is_some_and(|u| now < u),
            purgeable: !k.purge_protection && until.is_some_and(|u| now >= u),
            policy: k.policy.as_ref().map(|p| PolicyView {
                allow_uids: p.allow_uids.clone(),
                deny_uids: p.deny_uids.clone(),
                ops: if p.ops.is_empty() {
                    vec![KeyOp::Wrap, KeyOp::Unwrap]
                } else {
                    p.ops.clone()
                },
            }),
            versions: k
                .versions
                .iter()
                .map(|v| VersionView {
                    version: v.version,
                    state: version_state(v, now),
                    enabled: v.enabled,
                    created: format_time(v.created),
                    not_before: v.not_before.map(format_time),
                    expires: v.expires.map(format_time),
                })
                .collect(),
            volumes: k
                .volumes
                .iter()
                .map(|v| VolumeView {
                    id: v.id.clone(),
                    path: v.path.clone(),
                    registered: format_time(v.registered),
                })
                .collect(),
        }
    }

    fn text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let state = match (&self.deleted_at, &self.recoverable_until) {
            (Some(at), Some(until)) if self.recoverable => {
                format!(
                    "deleted at {at}; recoverable until {until} (`kekfs key recover {}`)",
                    self.name
                )
            }
            (Some(at), Some(until)) if self.purgeable => format!(
                "deleted at {at}; retention ended {until}: no longer recoverable, purgeable"
            ),
            (Some(at), Some(until)) => format!(
                "deleted at {at}; retention ended {until}: no longer recoverable, \
                 purge-protected"
            ),
            _ => "active".into(),
        };
        let _ = writeln!(o, "key {}", self.name);
        let _ = writeln!(o, "  state:            {state}");
        let _ = writeln!(o, "  created:          {}", self.created);
        let _ = writeln!(
            o,
            "  in use now:       {}",
            self.usable_version
                .map_or_else(|| "no usable version".into(), |v| format!("version {v}"))
        );
        let _ = writeln!(
            o,
            "  purge protection: {}",
            if self.purge_protection { "on" } else { "off" }
        );
        let _ = writeln!(
            o,
            "  retention:        {} (how long a deleted key stays recoverable)",
            format_duration(self.retention_secs)
        );
        let policy = self.policy.as_ref().map(|p| KeyPolicy {
            allow_uids: p.allow_uids.clone(),
            deny_uids: p.deny_uids.clone(),
            ops: p.ops.clone(),
        });
        let _ = writeln!(o, "  policy:           {}", policy_text(policy.as_ref()));
        let _ = writeln!(o, "  versions:");
        for v in &self.versions {
            let _ = writeln!(
                o,
                "    {:>4}  {:<13}  created {}  not before {}  expires {}",
                v.version,
                v.state,
                v.created,
                v.not_before.as_deref().unwrap_or("-"),
                v.expires.as_deref().unwrap_or("never")
            );
        }
        if self.volumes.is_empty() {
            let _ = writeln!(o, "  volumes:          none recorded");
        } else {
            let _ = writeln!(o, "  volumes:");
            for v in &self.volumes {
                let _ = writeln!(o, "    {}  {}  (since {})", v.id, v.path, v.registered);
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("k").unwrap(), ("k".to_string(), None));
        assert_eq!(
            parse_target("vol-kek@3").unwrap(),
            ("vol-kek".into(), Some(3))
        );
        for bad in [
            "",
            "k@",
            "k@0",
            "k@-1",
            "k@x",
            "@1",
            "a/b@1",
            "k@1@2",
            "k@99999999999",
        ] {
            let e = parse_target(bad).unwrap_err();
            assert_eq!(e.code, exit::USAGE, "{bad}");
        }
    }

    #[test]
    fn hints_for_soft_refusals() {
        let h = |key: &str, reason| {
            refusal_hint(&KekError::Refused {
                key: key.into(),
                reason,
            })
        };
        assert!(
            h("soft:k?version=2", Refusal::Disabled)
                .unwrap()
                .contains("kekfs key enable k@2")
        );
        assert!(
            h("soft:k", Refusal::Deleted)
                .unwrap()
                .contains("kekfs key recover k")
        );
        assert!(
            h("soft:k", Refusal::Expired)
                .unwrap()
                .contains("kekfs key set k --not-before")
        );
        assert!(
            h("soft:k", Refusal::Denied)
                .unwrap()
                .contains("kekfs key policy k")
        );
        assert_eq!(h("pkcs11:object=k", Refusal::Disabled), None);
        assert_eq!(h("soft:../x", Refusal::Disabled), None);
        assert_eq!(refusal_hint(&KekError::Io("x".into())), None);
    }

    #[test]
    fn policy_texts() {
        assert!(policy_text(None).starts_with("none"));
        let p = KeyPolicy {
            allow_uids: vec![1000],
            deny_uids: vec![0, 5],
            ops: vec![KeyOp::Unwrap],
        };
        assert_eq!(
            policy_text(Some(&p)),
            "only uids 1000 allowed; uids 0, 5 denied (unwrap only)"
        );
    }
}
