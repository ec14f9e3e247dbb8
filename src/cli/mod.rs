//! The `kekfs` command line: argument parsing and dispatch to keystore, volume and mount
//! operations. `main.rs` only calls [`main`].

pub mod daemon;
pub mod error;
pub mod exit;
pub mod keys;
pub mod logger;
pub mod mount;
pub mod mounts;
pub mod rewrap;
pub mod timespec;
pub mod token;

use crate::kek::keystore::{self, Keystore};
use crate::kek::passphrase::PassphraseSource;
use crate::kek::{KekUri, ProviderOptions, open_provider};
use crate::volume::{self, Volume};
use clap::{Parser, Subcommand};
use error::CliError;
use std::path::PathBuf;

/// kekfs: an encrypted FUSE filesystem whose keys are held hostage by a
/// key-encryption key (KEK) in a PKCS#11 token or kekfs's own software keystore.
#[derive(Debug, Parser)]
#[command(name = "kekfs", version, about, long_about = None)]
#[command(after_help = "Quick start:
  kekfs keystore init                     # once: creates the software keystore
  kekfs key create vol-kek                # a KEK in that keystore
  kekfs init /srv/vol.enc --kek soft:vol-kek
  kekfs mount /srv/vol.enc /mnt/vol
  kekfs unmount /mnt/vol

The keystore passphrase comes from --passfile FILE, $KEKFS_PASSPHRASE,
$KEKFS_PASSFILE, or a prompt. The keystore lives in --keystore DIR,
$KEKFS_KEYSTORE, or /var/lib/kekfs (root) / ~/.local/share/kekfs.")]
pub struct Cli {
    /// Software keystore directory.
    #[arg(long, global = true, value_name = "DIR")]
    keystore: Option<PathBuf>,
    /// Read the keystore passphrase (or a token PIN the KEK URI has no pin-source for)
    /// from FILE (one trailing newline is ignored).
    #[arg(long, global = true, value_name = "FILE")]
    passfile: Option<PathBuf>,
    /// More detailed logs.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Manage the software keystore.
    Keystore {
        #[command(subcommand)]
        cmd: KeystoreCmd,
    },
    /// Manage KEKs in the software keystore (create and rotate also in PKCS#11 tokens).
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Create a new encrypted volume in an empty (or new) backing directory.
    Init {
        /// The backing directory that will hold the ciphertext.
        backing: PathBuf,
        /// The KEK: soft:NAME (follow the latest version) or soft:NAME?version=N (pinned), or
        /// 'pkcs11:token=T;object=LABEL[;id=%0N]?pin-source=file:PATH' (a token key).
        #[arg(long, value_name = "URI")]
        kek: String,
    },
    /// Mount a volume (returns once the mount is ready; a daemon serves it).
    Mount {
        /// The volume's backing directory.
        backing: PathBuf,
        /// An existing empty directory to mount on.
        mountpoint: PathBuf,
        /// Mount options, comma-separated: ro, allow_other, allow_root, nodev, nosuid,
        /// noexec, noatime, sync, kek=URI, passfile=FILE, keystore=DIR, log=FILE,
        /// threads=N; fstab-only options (noauto, user, _netdev, x-systemd.*) are ignored.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Stay in the foreground (logs to stderr).
        #[arg(short, long)]
        foreground: bool,
        /// Daemon log file (default: syslog once detached).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
    },
    /// Unmount a kekfs mount and wait for its daemon to finish.
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Detach now even if busy (lazy unmount).
        #[arg(short, long)]
        lazy: bool,
    },
    /// Wrap the volume key under another KEK version or KEK (online or offline; the data
    /// is not re-encrypted). Without options: rewrap with the KEK's current version.
    Rewrap {
        /// Backing directory or mountpoint.
        path: PathBuf,
        /// Pin the volume to this version of its KEK.
        #[arg(long, value_name = "VERSION")]
        to: Option<u32>,
        /// Move the volume to another KEK (URI).
        #[arg(long, value_name = "URI")]
        to_kek: Option<String>,
    },
    /// Show a volume (backing dir or mountpoint), or every active kekfs mount.
    Status {
        /// Backing directory or mountpoint; all mounts if omitted.
        path: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeystoreCmd {
    /// Create the keystore, protected by a passphrase (asked twice on a terminal).
    Init,
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Create a new KEK (AES-256, version 1): NAME in the software keystore, or
    /// --kek 'pkcs11:token=…;object=LABEL' in a PKCS#11 token (sensitive, not extractable).
    Create {
        /// Key name: letters, digits, '.', '_', '-'.
        #[arg(required_unless_present = "kek")]
        name: Option<String>,
        /// The key as a KEK URI instead of a NAME (pkcs11:… or soft:NAME).
        #[arg(long, value_name = "URI", conflicts_with = "name")]
        kek: Option<String>,
    },
    /// Add a new version to a KEK: NAME in the software keystore, or --kek 'pkcs11:…'
    /// (a new token key with the same label and the next CKA_ID).
    Rotate {
        /// Key name.
        #[arg(required_unless_present = "kek")]
        name: Option<String>,
        /// The key as a KEK URI instead of a NAME (pkcs11:… or soft:NAME).
        #[arg(long, value_name = "URI", conflicts_with = "name")]
        kek: Option<String>,
    },
    /// List keys and their versions.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Lifecycle(keys::KeyLifecycleCmd),
}

fn provider_options(cli: &Cli) -> ProviderOptions {
    ProviderOptions {
        keystore_dir: cli
            .keystore
            .clone()
            .unwrap_or_else(keystore::default_keystore_dir),
        passphrase: match &cli.passfile {
            Some(p) => PassphraseSource::File(p.clone()),
            None => PassphraseSource::Auto,
        },
    }
}

pub(crate) fn fmt_time(t: u64) -> String {
    // Days since the epoch to a civil date (UTC), without pulling in a time crate.
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

fn run(cli: Cli) -> Result<(), CliError> {
    let popts = provider_options(&cli);
    match cli.cmd {
        Cmd::Keystore {
            cmd: KeystoreCmd::Init,
        } => {
            let pass = popts.passphrase.read("new keystore passphrase", true)?;
            Keystore::init(&popts.keystore_dir, &pass)?;
            println!("keystore created in {}", popts.keystore_dir.display());
            Ok(())
        }
        Cmd::Key {
            cmd: KeyCmd::Create { name, kek },
        } => token::create_or_rotate(&token::target(name, kek)?, false, &popts),
        Cmd::Key {
            cmd: KeyCmd::Rotate { name, kek },
        } => token::create_or_rotate(&token::target(name, kek)?, true, &popts),
        Cmd::Key {
            cmd: KeyCmd::Lifecycle(c),
        } => keys::run(c, &popts),
        Cmd::Key {
            cmd: KeyCmd::List { json },
        } => {
            let pass = popts.passphrase.read("keystore passphrase", false)?;
            let ks = Keystore::open(&popts.keystore_dir, &pass)?;
            let keys = ks.list();
            if json {
                let s = serde_json::to_string_pretty(&keys)
                    .map_err(|e| CliError::failure(e.to_string()))?;
                println!("{s}");
                return Ok(());
            }
            if keys.is_empty() {
                println!("no keys; create one with `kekfs key create NAME`");
            }
            let now = keystore::unix_now();
            for k in keys {
                let state = if k.deleted_at.is_some() {
                    " (deleted)"
                } else {
                    ""
                };
                println!("{}{state}  created {}", k.name, fmt_time(k.created));
                for v in &k.versions {
                    let st = match v.refusal_at(now) {
                        None => "enabled".to_string(),
                        Some(r) => r.to_string(),
                    };
                    println!(
                        "  version {}  {st}  created {}",
                        v.version,
                        fmt_time(v.created)
                    );
                }
            }
            Ok(())
        }
        Cmd::Init { backing, kek } => {
            let uri = KekUri::parse(&kek)?;
            let pinned = uri.version().unwrap_or(0);
            let provider = open_provider(&uri, &popts)?;
            let vol = Volume::create(&backing, provider.as_ref(), pinned)?;
            keys::register_volume(provider.as_ref(), vol.id(), &backing);
            println!(
                "created volume {} in {} under {} (key version {})",
                volume::hex(vol.id()),
                backing.display(),
                vol.header().kek_uri,
                vol.header().slots[0].key_version
            );
            Ok(())
        }
        Cmd::Mount {
            backing,
            mountpoint,
            options,
            foreground,
            log,
        } => mount::mount(
            mount::MountArgs {
                backing,
                mountpoint,
                options,
                foreground,
                log,
                verbose: cli.verbose,
            },
            popts,
        ),
        Cmd::Unmount { mountpoint, lazy } => mount::unmount(&mountpoint, lazy),
        Cmd::Rewrap { path, to, to_kek } => rewrap::rewrap(
            &path,
            &rewrap::Target {
                version: to,
                kek: to_kek,
            },
            &popts,
        ),
        Cmd::Status { path, json } => mount::status(path.as_deref(), json),
    }
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    match run(cli) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("kekfs: {}", e.message);
            e.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(fmt_time(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
