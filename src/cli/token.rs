//! `kekfs key create|rotate|disable|enable --kek URI`: key versions addressed by a KEK URI,
//! for keys in a PKCS#11 token (`pkcs11:`) as well as in the software keystore
//! (`soft:NAME`).

use super::error::CliError;
use super::exit;
use crate::kek::keystore::{self, Keystore};
use crate::kek::{KekUri, ProviderOptions, pkcs11};

/// Which key a `key create` / `key rotate` names: a positional soft: NAME or `--kek URI`.
pub fn target(name: Option<String>, kek: Option<String>) -> Result<KekUri, CliError> {
    match (name, kek) {
        (Some(_), Some(_)) => Err(CliError::new(
            exit::USAGE,
            "give either a key NAME (software keystore) or --kek URI, not both",
        )),
        (None, None) => Err(CliError::new(
            exit::USAGE,
            "name the key: NAME (software keystore) or --kek 'pkcs11:token=…;object=…'",
        )),
        (Some(n), None) => {
            keystore::validate_key_name(&n)
                .map_err(|m| CliError::new(exit::USAGE, format!("bad key name {n:?}: {m}")))?;
            Ok(KekUri::Soft {
                name: n,
                version: None,
            })
        }
        (None, Some(k)) => Ok(KekUri::parse(&k)?),
    }
}

/// Create the key (`rotate` false: version 1) or add its next version (`rotate` true).
pub fn create_or_rotate(
    uri: &KekUri,
    rotate: bool,
    popts: &ProviderOptions,
) -> Result<(), CliError> {
    match uri {
        KekUri::Soft { name, version } => {
            if version.is_some() {
                return Err(CliError::new(
                    exit::USAGE,
                    "soft: keys get version numbers in order; leave ?version= out",
                ));
            }
            let pass = popts.passphrase.read("keystore passphrase", false)?;
            let mut ks = Keystore::open(&popts.keystore_dir, &pass)?;
            if rotate {
                let v = ks.rotate_key(name)?;
                crate::audit::note_version(v);
                println!(
                    "key {name} now has version {v}; volumes following soft:{name} use it from \
                     their next rewrap"
                );
            } else {
                let v = ks.create_key(name)?;
                crate::audit::note_version(v);
                println!("created key {name} version {v}; use it with --kek soft:{name}");
            }
            Ok(())
        }
        KekUri::Pkcs11(u) => {
            let k = pkcs11::create_key(u, popts, rotate)?;
            crate::audit::note_version(k.version);
            let id = pkcs11::version_to_id(k.version)
                .iter()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>();
            println!(
                "created {} key {:?} version {} (CKA_ID {id}) on {}: sensitive, not \
                 extractable",
                k.kind,
                u.object.as_deref().unwrap_or_default(),
                k.version,
                k.token
            );
            println!("follow the newest version: --kek '{}'", k.uri);
            println!(
                "pin this version:          --kek '{}'",
                KekUri::Pkcs11(u.clone()).with_version(Some(k.version))
            );
            Ok(())
        }
    }
}

/// `kekfs key disable|enable --kek URI [--version N]` (`enable` false / true): for
/// `pkcs11:`, CKA_UNWRAP and CKA_WRAP of the token key objects of every version of the
/// label, or of version N (`--version`, or the URI's `id=`); for `soft:NAME[?version=N]`,
/// the same as `kekfs key disable|enable NAME[@N]`.
pub fn set_enabled(
    kek: &str,
    version: Option<u32>,
    enable: bool,
    popts: &ProviderOptions,
) -> Result<(), CliError> {
    let uri = KekUri::parse(kek)?;
    let version = match (version, uri.version()) {
        (Some(a), Some(b)) if a != b => {
            return Err(CliError::new(
                exit::USAGE,
                format!("--version {a} contradicts the version {b} the KEK URI names"),
            ));
        }
        (Some(0), _) => {
            return Err(CliError::new(exit::USAGE, "versions start at 1"));
        }
        (a, b) => a.or(b),
    };
    let verb = if enable { "enable" } else { "disable" };
    match &uri {
        KekUri::Soft { name, .. } => {
            let pass = popts.passphrase.read("keystore passphrase", false)?;
            let mut ks = Keystore::open(&popts.keystore_dir, &pass)?;
            let changed = if enable {
                ks.enable_version(name, version)?
            } else {
                ks.disable_version(name, version)?
            };
            let what = match version {
                Some(v) => format!("key {name} version {v}"),
                None => format!("key {name} (all versions)"),
            };
            let note = if changed { "" } else { " (it already was)" };
            println!("{verb}d {what}{note}");
            Ok(())
        }
        KekUri::Pkcs11(u) => {
            let (token, changes) = pkcs11::set_key_usable(u, popts, version, enable)?;
            let label = u.object.as_deref().unwrap_or_default();
            for c in &changes {
                let note = if c.changed { "" } else { " (it already was)" };
                println!(
                    "{verb}d {label:?} version {} (CKA_ID {}) on {token}{note}",
                    c.version,
                    pkcs11::version_to_id(c.version)
                        .iter()
                        .map(|b| format!("%{b:02X}"))
                        .collect::<String>()
                );
            }
            let mut all = (**u).clone();
            all.id = None;
            if enable {
                println!(
                    "CKA_UNWRAP and CKA_WRAP are true: volumes under it mount again, and \
                     mounted ones resume at their next poll"
                );
            } else {
                println!(
                    "CKA_UNWRAP and CKA_WRAP are false: the token refuses to wrap and unwrap \
                     with it, and mounted volumes under it stop serving at their next poll \
                     (EKEYREVOKED); enable it again with `kekfs key enable --kek '{all}'{}`",
                    match version {
                        Some(v) => format!(" --version {v}"),
                        None => String::new(),
                    }
                );
            }
            Ok(())
        }
    }
}
