//! The `kekfs` command line: argument parsing and dispatch to keystore, volume and mount
//! operations. `main.rs` only calls [`main`].

pub mod audit;
pub mod daemon;
pub mod drill;
pub mod error;
pub mod exit;
pub mod harden;
pub mod helper;
pub mod keys;
pub mod logger;
pub mod mount;
pub mod mounts;
pub mod rewrap;
pub mod timespec;
pub mod token;
pub mod verify;

use crate::kek::keystore::{self, Keystore};
use crate::kek::passphrase::PassphraseSource;
use crate::kek::{KekUri, ProviderOptions};
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
  mount -t fuse.kekfs /srv/vol.enc /mnt/vol -o passfile=FILE   # after `kekfs install-helper`

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
    /// Base directory of per-volume and per-token audit logs ($KEKFS_AUDIT_DIR, else
    /// /var/log/kekfs for root, ~/.local/state/kekfs/audit otherwise).
    #[arg(long, global = true, value_name = "DIR")]
    audit_dir: Option<PathBuf>,
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
        /// threads=N, poll=DURATION, grace=DURATION, audit=best-effort|fail-closed,
        /// audit_dir=DIR, audit_heartbeat=DURATION, cache=writethrough|writeback,
        /// uring=auto|off, spin=DURATION; fstab-only options (noauto, user, _netdev,
        /// x-systemd.*) are ignored.
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
    /// Query and check the audit logs (key operations and volume state changes).
    Audit {
        #[command(subcommand)]
        cmd: audit::AuditCmd,
    },
    /// Prove a volume is under its KEK and every block authenticates.
    ///
    /// Checks the header slots (KEK and version), the KEK's protection, and every name,
    /// file header, block, symlink and xattr. Exit 25 on any problem.
    Verify {
        /// Backing directory or mountpoint.
        path: PathBuf,
        /// The KEK the volume must be under (URI; with id= also the version).
        #[arg(long, value_name = "URI")]
        kek: Option<String>,
        /// The KEK version slot 0 must be wrapped by.
        #[arg(long, value_name = "N")]
        key_version: Option<u32>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Disable the volume's KEK briefly and time how fast reads fail and resume.
    ///
    /// The volume, and others under the same key version, stop serving meanwhile; the key
    /// is always put back as it was.
    Drill {
        /// Backing directory or mountpoint (mounted temporarily if not mounted).
        path: PathBuf,
        /// Go ahead: the volume goes offline briefly.
        #[arg(long)]
        yes: bool,
        /// Longest wait for reads to fail, and then to resume.
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        timeout: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show a volume (backing dir or mountpoint), or every active kekfs mount.
    Status {
        /// Backing directory or mountpoint; all mounts if omitted.
        path: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Install kekfs where mount(8) finds it (PREFIX/sbin/kekfs and SBIN_DIR/mount.kekfs), so
    /// that `mount -t fuse.kekfs BACKING MOUNTPOINT -o OPTIONS` and fstab lines work.
    InstallHelper {
        /// Link the binary as PREFIX/sbin/kekfs (on the PATH mount.fuse3 uses).
        #[arg(long, value_name = "DIR", default_value = "/usr/local")]
        prefix: PathBuf,
        /// Where mount(8) looks for mount.TYPE helpers (for `mount -t kekfs`).
        #[arg(long, value_name = "DIR", default_value = "/sbin")]
        sbin_dir: PathBuf,
        /// Copy the binary instead of linking it.
        #[arg(long)]
        copy: bool,
        /// Replace (or remove) files of the same name that are not this kekfs.
        #[arg(long)]
        force: bool,
        /// Remove what install-helper installed.
        #[arg(long)]
        uninstall: bool,
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

/// `s` with control characters shown escaped: names and files in the backing directory
/// are chosen by whoever can write it, and must not reach the terminal as escape
/// sequences.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
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
        volume_dir: None,
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let popts = provider_options(&cli);
    audit::configure(cli.audit_dir.as_deref(), &command_name(&cli.cmd))?;
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
        } => audit::create_or_rotate(&token::target(name, kek)?, false, &popts),
        Cmd::Key {
            cmd: KeyCmd::Rotate { name, kek },
        } => audit::create_or_rotate(&token::target(name, kek)?, true, &popts),
        Cmd::Key {
            cmd: KeyCmd::Lifecycle(c),
        } => audit::lifecycle(c, &popts),
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
                println!(
                    "{}{state}  created {}",
                    k.name,
                    crate::time::format_time(k.created)
                );
                for v in &k.versions {
                    let st = match v.refusal_at(now) {
                        None => "enabled".to_string(),
                        Some(r) => r.to_string(),
                    };
                    println!(
                        "  version {}  {st}  created {}",
                        v.version,
                        crate::time::format_time(v.created)
                    );
                }
            }
            Ok(())
        }
        Cmd::Init { backing, kek } => {
            let uri = KekUri::parse(&kek)?;
            let pinned = uri.version().unwrap_or(0);
            let provider = crate::audit::open_audited(&uri, &popts, None)?;
            let vol = Volume::create(&backing, &provider, pinned)?;
            keys::register_volume(&provider, vol.id(), &backing);
            audit::init_line(&provider, &vol, &backing)?;
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
        Cmd::Audit { cmd } => audit::run(cmd, &popts),
        Cmd::Verify {
            path,
            kek,
            key_version,
            json,
        } => verify::verify(
            &path,
            &verify::Expect {
                kek,
                version: key_version,
            },
            json,
            &popts,
        ),
        Cmd::Drill {
            path,
            yes,
            timeout,
            json,
        } => drill::drill(
            &drill::DrillArgs {
                path,
                yes,
                timeout: crate::audit::sink::parse_secs(&timeout).ok_or_else(|| {
                    CliError::new(exit::USAGE, "--timeout: expected a duration like 60s")
                })?,
                json,
                audit_dir: cli.audit_dir.clone(),
            },
            &popts,
        ),
        Cmd::InstallHelper {
            prefix,
            sbin_dir,
            copy,
            force,
            uninstall,
        } => helper::install(&helper::InstallArgs {
            prefix,
            sbin_dir,
            copy,
            force,
            uninstall,
        }),
    }
}

/// Every subcommand name and alias (and `help`): an `argv[1]` equal to one is never taken
/// for a backing directory.
fn subcommand_names() -> Vec<String> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut names = vec!["help".to_string()];
    for c in cmd.get_subcommands() {
        names.push(c.get_name().to_string());
        names.extend(c.get_all_aliases().map(str::to_string));
    }
    names
}

/// The command's name as recorded in audit lines (`mount`, `key disable`, …).
fn command_name(cmd: &Cmd) -> String {
    match cmd {
        Cmd::Keystore { .. } => "keystore init".into(),
        Cmd::Key { cmd } => match cmd {
            KeyCmd::Create { .. } => "key create".into(),
            KeyCmd::Rotate { .. } => "key rotate".into(),
            KeyCmd::List { .. } => "key list".into(),
            KeyCmd::Lifecycle(c) => format!("key {}", audit::lifecycle_name(c)),
        },
        Cmd::Init { .. } => "init".into(),
        Cmd::Mount { .. } => "mount".into(),
        Cmd::Unmount { .. } => "unmount".into(),
        Cmd::Rewrap { .. } => "rewrap".into(),
        Cmd::Status { .. } => "status".into(),
        Cmd::Audit { .. } => "audit".into(),
        Cmd::Verify { .. } => "verify".into(),
        Cmd::Drill { .. } => "drill".into(),
        #[allow(unreachable_patterns)]
        _ => String::new(),
    }
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    // `kekfs BACKING MOUNTPOINT -o …` (as mount.fuse3 runs it) or `mount.kekfs …`.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match helper::classify(&argv, &subcommand_names()) {
        helper::Invocation::Cli => {}
        helper::Invocation::BadHelper(m) => {
            eprintln!("kekfs: {m}");
            return exit::USAGE;
        }
        helper::Invocation::MountHelper(a) => {
            return match helper::run_helper(a) {
                Ok(()) => exit::OK,
                Err(e) => {
                    eprintln!("kekfs: {}", e.message);
                    e.code
                }
            };
        }
    }
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
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(
            printable("dir/\u{1b}]0;x\u{7}é\tb"),
            "dir/\\u{1b}]0;x\\u{7}é\\tb"
        );
    }
}
