//! `kekfs key create|rotate --kek URI`: key versions addressed by a KEK URI, for keys in a
//! PKCS#11 token (`pkcs11:`) as well as in the software keystore (`soft:NAME`).

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
                println!(
                    "key {name} now has version {v}; volumes following soft:{name} use it from \
                     their next rewrap"
                );
            } else {
                let v = ks.create_key(name)?;
                println!("created key {name} version {v}; use it with --kek soft:{name}");
            }
            Ok(())
        }
        KekUri::Pkcs11(u) => {
            let k = pkcs11::create_key(u, popts, rotate)?;
            let id = pkcs11::version_to_id(k.version)
                .iter()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>();
            println!(
                "created AES-256 key {:?} version {} (CKA_ID {id}) on {}: sensitive, not \
                 extractable",
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
