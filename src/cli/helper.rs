//! Linux mount integration: the argument forms `mount(8)` and `mount.fuse3` use to run
//! kekfs, and `kekfs install-helper`, which puts kekfs where they look for it.
//!
//! - `mount -t fuse.kekfs SRC MP -o OPTS` runs `mount.fuse3`, which runs
//!   `/bin/sh -c 'kekfs SRC MP -o OPTS,dev,suid'` with `PATH` reset to the standard system
//!   directories, and waits for it to exit. So `kekfs` must be on that `PATH`
//!   (`/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`), and `kekfs SRC MP`
//!   (a path where a subcommand would be) means `kekfs mount SRC MP`.
//! - `mount -t kekfs SRC MP -o OPTS` runs `/sbin/mount.kekfs SRC MP [-sfnv] -o OPTS`
//!   (mount(8)'s helper convention); the binary under that name takes the same form.

use super::error::CliError;
use super::exit;
use super::mount::{self, MountArgs};
use crate::kek::ProviderOptions;
use crate::kek::keystore;
use crate::kek::passphrase::PassphraseSource;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// How the process was invoked, decided from argv before clap sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Ordinary `kekfs SUBCOMMAND …`: clap parses it.
    Cli,
    /// `kekfs SRC MP [-o OPTS]` or `mount.kekfs SRC MP [-sfnv] [-o OPTS] [-t TYPE]`.
    MountHelper(HelperArgs),
    /// The helper form, but malformed.
    BadHelper(String),
}

/// A parsed helper-form command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HelperArgs {
    /// The backing directory (mount(8)'s "source").
    pub backing: PathBuf,
    /// The mountpoint.
    pub mountpoint: PathBuf,
    /// `-o` option lists, in order.
    pub options: Vec<String>,
    /// `-v`: verbose logging.
    pub verbose: bool,
    /// `-f`: "fake" — check everything but do not mount.
    pub fake: bool,
}

/// Is `argv0` a `mount.kekfs` helper name (the binary installed or linked under it)?
fn is_helper_name(argv0: &OsString) -> bool {
    Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("mount.") || n.starts_with("mount_"))
}

/// Decide how to run from the raw arguments. `subcommands` are the CLI's subcommand names
/// (and aliases); an `argv[1]` equal to one of them is always that subcommand, so a
/// backing directory with such a name must be given as `./NAME` in the helper form.
pub fn classify(argv: &[OsString], subcommands: &[String]) -> Invocation {
    let helper_name = argv.first().is_some_and(is_helper_name);
    let Some(first) = argv.get(1) else {
        return if helper_name {
            Invocation::BadHelper("usage: mount.kekfs BACKING MOUNTPOINT [-o OPTIONS]".into())
        } else {
            Invocation::Cli
        };
    };
    let s = first.to_string_lossy();
    if !helper_name {
        let is_path = s.contains('/') || Path::new(first).exists();
        if s.starts_with('-') || subcommands.iter().any(|c| *c == s) || !is_path {
            return Invocation::Cli;
        }
    }
    match parse_helper_args(&argv[1..]) {
        Ok(a) => Invocation::MountHelper(a),
        Err(m) => Invocation::BadHelper(m),
    }
}

/// Parse `SRC MP [-sfnv] [-o OPTS]… [-t TYPE]` (options may come before, between or after
/// the two paths, as mount(8) allows).
pub fn parse_helper_args(args: &[OsString]) -> Result<HelperArgs, String> {
    let mut out = HelperArgs::default();
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            paths.extend(it.by_ref().map(PathBuf::from));
            break;
        }
        let Some(flags) = s.strip_prefix('-').filter(|f| !f.is_empty()) else {
            paths.push(PathBuf::from(a));
            continue;
        };
        for (i, c) in flags.char_indices() {
            match c {
                'o' | 't' | 'N' => {
                    let rest = &flags[i + 1..];
                    let value = if rest.is_empty() {
                        it.next()
                            .map(|v| v.to_string_lossy().into_owned())
                            .ok_or_else(|| format!("-{c} needs a value"))?
                    } else {
                        rest.to_string()
                    };
                    match c {
                        'o' => out.options.push(value),
                        't' => {
                            if !matches!(value.as_str(), "kekfs" | "fuse.kekfs" | "fuseblk.kekfs") {
                                return Err(format!(
                                    "-t {value}: this helper mounts kekfs volumes only (use -t fuse.kekfs)"
                                ));
                            }
                        }
                        _ => {
                            return Err(
                                "-N (mount namespaces) is not supported by kekfs".to_string()
                            );
                        }
                    }
                    break;
                }
                // mount(8) helper flags: sloppy, no mtab, fake, verbose.
                's' | 'n' => {}
                'f' => out.fake = true,
                'v' => out.verbose = true,
                'h' => {
                    return Err("usage: kekfs BACKING MOUNTPOINT [-o OPTIONS]   (as run by mount -t fuse.kekfs; see `kekfs mount --help`)".into());
                }
                _ => return Err(format!("unknown flag -{c} (see `kekfs mount --help`)")),
            }
        }
    }
    match <[PathBuf; 2]>::try_from(paths) {
        Ok([backing, mountpoint]) => {
            out.backing = backing;
            out.mountpoint = mountpoint;
            Ok(out)
        }
        Err(p) => Err(format!(
            "expected BACKING MOUNTPOINT, got {} path argument(s){}",
            p.len(),
            if p.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    p.iter()
                        .map(|x| x.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
        )),
    }
}

/// Run the helper form: `kekfs mount BACKING MOUNTPOINT -o OPTS` (daemonizing once the
/// mount is up, as mount(8) waits for the helper to exit). Keystore and passphrase come
/// from `-o keystore=…,passfile=…` or the usual environment variables.
pub fn run_helper(a: HelperArgs) -> Result<(), CliError> {
    // Same audit settings as `kekfs mount` ($KEKFS_AUDIT_DIR, or -o audit_dir=…).
    super::audit::configure(None, "mount")?;
    let popts = ProviderOptions {
        keystore_dir: keystore::default_keystore_dir(),
        passphrase: PassphraseSource::Auto,
        volume_dir: None,
    };
    if a.fake {
        // mount -f: check the options and the volume, change nothing.
        mount::parse_options(&a.options)?;
        crate::volume::read_header(&a.backing)?;
        return Ok(());
    }
    mount::mount(
        MountArgs {
            backing: a.backing,
            mountpoint: a.mountpoint,
            options: a.options,
            foreground: false,
            log: None,
            verbose: a.verbose,
        },
        popts,
    )
}

/// What `kekfs install-helper` does.
#[derive(Debug)]
pub struct InstallArgs {
    /// `PREFIX/sbin/kekfs` is where mount.fuse3's reset PATH finds kekfs.
    pub prefix: PathBuf,
    /// Where mount(8) looks for `mount.TYPE` helpers (`/sbin`).
    pub sbin_dir: PathBuf,
    /// Copy the binary instead of symlinking it.
    pub copy: bool,
    /// Replace files that are not this kekfs.
    pub force: bool,
    /// Remove instead of installing.
    pub uninstall: bool,
}

fn same_contents(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Is `path` this kekfs binary (the file itself, a link to it, or a byte-identical copy)?
fn is_ours(path: &Path, exe: &Path) -> bool {
    std::fs::canonicalize(path).is_ok_and(|c| c == exe) || same_contents(path, exe)
}

fn place(target: &Path, make: impl Fn(&Path) -> std::io::Result<()>) -> Result<(), CliError> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::failure(format!("creating {}: {e}", dir.display())))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.kekfs-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let r = make(&tmp).and_then(|()| std::fs::rename(&tmp, target));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(CliError::failure(format!(
            "installing {}: {e}",
            target.display()
        )));
    }
    Ok(())
}

/// `kekfs install-helper`: make `mount -t fuse.kekfs`, `mount -t kekfs` and fstab lines
/// work by linking (or copying) this binary to `PREFIX/sbin/kekfs` and
/// `SBIN_DIR/mount.kekfs`. Idempotent; never replaces someone else's file without
/// `--force`; `--uninstall` removes only what is this kekfs.
pub fn install(a: &InstallArgs) -> Result<(), CliError> {
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| CliError::failure(format!("cannot locate the kekfs binary: {e}")))?;
    let bin = a.prefix.join("sbin").join("kekfs");
    let helper = a.sbin_dir.join("mount.kekfs");
    if a.uninstall {
        for p in [&helper, &bin] {
            if std::fs::symlink_metadata(p).is_err() {
                continue;
            }
            if !a.force && !is_ours(p, &exe) {
                return Err(CliError::new(
                    exit::CHANGE_REFUSED,
                    format!(
                        "{} is not this kekfs binary; left in place (use --force to remove it)",
                        p.display()
                    ),
                ));
            }
            std::fs::remove_file(p)
                .map_err(|e| CliError::failure(format!("removing {}: {e}", p.display())))?;
            println!("removed {}", p.display());
        }
        return Ok(());
    }
    // PREFIX/sbin/kekfs: the command mount.fuse3 runs.
    if bin == exe {
        println!("{} is this binary", bin.display());
    } else if std::fs::symlink_metadata(&bin).is_ok() && is_ours(&bin, &exe) && !a.copy {
        println!("{} already runs this kekfs", bin.display());
    } else {
        if std::fs::symlink_metadata(&bin).is_ok() && !a.force && !is_ours(&bin, &exe) {
            return Err(CliError::new(
                exit::EXISTS,
                format!(
                    "{} exists and is not this kekfs binary; use --force to replace it",
                    bin.display()
                ),
            ));
        }
        if a.copy {
            place(&bin, |tmp| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::copy(&exe, tmp)?;
                std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))
            })?;
            println!("copied {} to {}", exe.display(), bin.display());
        } else {
            place(&bin, |tmp| std::os::unix::fs::symlink(&exe, tmp))?;
            println!("linked {} -> {}", bin.display(), exe.display());
        }
    }
    // SBIN_DIR/mount.kekfs: the helper `mount -t kekfs` runs. It points at PREFIX/sbin/kekfs
    // so that one file decides which kekfs runs.
    let helper_ok = std::fs::read_link(&helper).is_ok_and(|l| l == bin);
    if helper_ok {
        println!("{} already runs {}", helper.display(), bin.display());
    } else {
        if std::fs::symlink_metadata(&helper).is_ok() && !a.force && !is_ours(&helper, &exe) {
            return Err(CliError::new(
                exit::EXISTS,
                format!(
                    "{} exists and is not this kekfs binary; use --force to replace it",
                    helper.display()
                ),
            ));
        }
        place(&helper, |tmp| std::os::unix::fs::symlink(&bin, tmp))?;
        println!("linked {} -> {}", helper.display(), bin.display());
    }
    let std_path = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ];
    if !std_path
        .iter()
        .any(|d| Path::new(d) == bin.parent().unwrap_or(Path::new("")))
    {
        println!(
            "note: {} is not on the PATH mount.fuse3 uses ({}); `mount -t fuse.kekfs` will not find it, `mount -t kekfs` will",
            bin.display(),
            std_path.join(":")
        );
    }
    println!(
        "now: mount -t fuse.kekfs BACKING MOUNTPOINT -o passfile=FILE[,keystore=DIR] (or an fstab line of type fuse.kekfs)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn subs() -> Vec<String> {
        ["mount", "status", "init", "help"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn subcommands_stay_subcommands() {
        for argv in [
            &["kekfs"][..],
            &["kekfs", "mount", "/a", "/b"],
            &["kekfs", "status"],
            &["kekfs", "--keystore", "/k", "status"],
            &["kekfs", "-V"],
            &["kekfs", "statsu", "/b"],
        ] {
            assert_eq!(classify(&os(argv), &subs()), Invocation::Cli, "{argv:?}");
        }
    }

    #[test]
    fn mount_fuse3_form() {
        let argv = os(&["kekfs", "/srv/v", "/mnt/v", "-o", "rw,passfile=/p,dev,suid"]);
        assert_eq!(
            classify(&argv, &subs()),
            Invocation::MountHelper(HelperArgs {
                backing: "/srv/v".into(),
                mountpoint: "/mnt/v".into(),
                options: vec!["rw,passfile=/p,dev,suid".into()],
                ..Default::default()
            })
        );
        // A relative path that exists (here: the crate's own src dir) also counts.
        match classify(&os(&["kekfs", "src", "/mnt/v"]), &subs()) {
            Invocation::MountHelper(a) => assert_eq!(a.backing, PathBuf::from("src")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fstab_and_mount_fuse3_options_parse() {
        use fuser::MountOption;
        // What an fstab line plus mount(8) plus mount.fuse3 hand to kekfs.
        let o = mount::parse_options(&[
            "rw,noauto,user,_netdev,nofail,defaults,x-systemd.automount,x-systemd.idle-timeout=60,comment=x".into(),
            "passfile=/etc/kekfs/pass,keystore=/etc/kekfs/ks,allow_other,ro,noexec,nosuid,nodev,dev,suid".into(),
        ])
        .unwrap();
        assert!(o.read_only && o.allow_other);
        assert_eq!(o.passfile, Some(PathBuf::from("/etc/kekfs/pass")));
        assert_eq!(o.keystore, Some(PathBuf::from("/etc/kekfs/ks")));
        // The later dev,suid override nodev,nosuid; fuser refuses contradictory lists.
        assert_eq!(
            o.flags,
            vec![MountOption::NoExec, MountOption::Dev, MountOption::Suid]
        );
        let o = mount::parse_options(&["dev,nodev,sync,async,sync".into()]).unwrap();
        assert_eq!(o.flags, vec![MountOption::NoDev, MountOption::Sync]);
        for bad in [
            "remount",
            "bogus",
            "passfile=",
            "threads=0",
            "uring=on",
            "spin=1h",
            "spin=fast",
        ] {
            assert!(mount::parse_options(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_helper_form() {
        let argv = os(&[
            "/sbin/mount.kekfs",
            "/srv/v",
            "/mnt/v",
            "-sn",
            "-v",
            "-o",
            "ro,kek=soft:k",
            "-tfuse.kekfs",
        ]);
        match classify(&argv, &subs()) {
            Invocation::MountHelper(a) => {
                assert!(a.verbose && !a.fake);
                assert_eq!(a.options, vec!["ro,kek=soft:k".to_string()]);
                assert_eq!(a.mountpoint, PathBuf::from("/mnt/v"));
            }
            other => panic!("{other:?}"),
        }
        // Under the helper name even a subcommand-like word is a path.
        assert!(matches!(
            classify(&os(&["mount.kekfs", "status", "/mnt/v", "-f"]), &subs()),
            Invocation::MountHelper(HelperArgs { fake: true, .. })
        ));
        for bad in [
            &["mount.kekfs"][..],
            &["mount.kekfs", "/a"],
            &["mount.kekfs", "/a", "/b", "/c"],
            &["mount.kekfs", "/a", "/b", "-o"],
            &["mount.kekfs", "/a", "/b", "-t", "ext4"],
            &["mount.kekfs", "/a", "/b", "-x"],
            &["kekfs", "/a", "/b", "-N", "/proc/1/ns/mnt"],
        ] {
            assert!(
                matches!(classify(&os(bad), &subs()), Invocation::BadHelper(_)),
                "{bad:?}"
            );
        }
    }
}
