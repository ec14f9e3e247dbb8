//! Linux integration: the argument forms mount(8) and mount.fuse3 use to run kekfs,
//! `kekfs install-helper`, fstab-style options, `umount` by the kernel's tools, lazy
//! unmount, `status` over several mounts, systemd readiness and the systemd unit examples.
//!
//! `mount -t fuse.kekfs` itself (mount(8) resets PATH to the system directories, so kekfs
//! must be installed there) is tested only with CI=true or KEKFS_TEST_SYSTEM_MOUNT=1,
//! because it installs /usr/local/sbin/kekfs and /sbin/mount.kekfs for the duration of the
//! test. Without that opt-in, the same path minus the PATH reset is covered by running
//! mount.fuse3 directly with kekfs on a private PATH.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({:?}):\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
}

/// Has process `pid` exited (gone, or a zombie nobody reaped yet)?
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|st| st == 'Z' || st == 'X'),
    }
}

/// The mount table's option string for `mnt`.
fn mount_options(mnt: &Path) -> String {
    let p = std::fs::canonicalize(mnt).unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 3 && Path::new(f[1]) == p).then(|| f[3].to_string())
        })
        .next_back()
        .unwrap_or_default()
}

/// The env's runtime dir for status files (so a test sees only its own).
fn runtime_dir(env: &Env) -> PathBuf {
    env.dir.path().join("run")
}

/// A command for the built binary with this env's runtime dir and no ambient key config.
fn plain(env: &Env, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("KEKFS_RUNTIME_DIR", runtime_dir(env))
        .env_remove("KEKFS_PASSPHRASE")
        .env_remove("KEKFS_PASSFILE")
        .env_remove("KEKFS_KEYSTORE");
    c
}

/// `-o` options that name this env's keystore, passphrase file and log, plus what an fstab
/// line and mount.fuse3 add.
fn fstab_opts(env: &Env, extra: &str) -> String {
    format!(
        "rw,noauto,user,_netdev,nofail,x-systemd.automount,x-systemd.idle-timeout=60,passfile={},keystore={},log={}{extra}",
        env.passfile.display(),
        env.keystore.display(),
        env.dir.path().join("daemon.log").display()
    )
}

fn status_file(env: &Env) -> PathBuf {
    let v = env.status_json(&env.backing);
    runtime_dir(env).join(format!("{}.json", v["volume_id"].as_str().unwrap()))
}

/// After a kernel-side unmount: not mounted, daemon gone, lock and status file released.
fn assert_daemon_finished(env: &Env, pid: i32, status: &Path) {
    assert!(wait_for(BOUND, || !is_mounted(&env.mnt)), "still mounted");
    assert!(
        wait_for(BOUND, || process_gone(pid)),
        "daemon {pid} still running after the unmount"
    );
    assert!(lock_is_free(&env.backing), "volume lock still held");
    assert!(
        !status.exists(),
        "status file {} left behind",
        status.display()
    );
    assert!(
        env.daemon_log().contains("unmounted"),
        "log: {}",
        env.daemon_log()
    );
}

#[test]
fn argv_form_mounts_and_umount_stops_the_daemon() {
    let Some(env) = Env::new("argv_form_mounts_and_umount_stops_the_daemon") else {
        return;
    };
    env.init_volume();
    // Exactly what mount.fuse3 runs: kekfs SRC MP -o OPTS,dev,suid.
    let o = plain(&env, bin())
        .arg(&env.backing)
        .arg(&env.mnt)
        .arg("-o")
        .arg(fstab_opts(&env, ",allow_other,dev,suid"))
        .output()
        .unwrap();
    assert_ok(&o, "kekfs SRC MP -o …");
    // The command returned only once the mount was up.
    assert!(
        is_mounted(&env.mnt),
        "kekfs exited 0 but nothing is mounted"
    );
    let m = env.guard();
    let opts = mount_options(&env.mnt);
    assert!(opts.contains("allow_other"), "{opts}");
    assert!(
        !opts.contains("nodev") && !opts.contains("nosuid"),
        "dev,suid not applied: {opts}"
    );
    std::fs::write(m.p("f"), b"through the helper form").unwrap();
    let pid = lock_pid(&env.backing);
    assert!(!process_gone(pid));
    let status = status_file(&env);
    assert!(status.exists(), "no status file {}", status.display());
    assert!(env.daemon_log().contains("mounted at"));

    // The kernel's own tool unmounts; the daemon notices, exits, frees lock and status.
    let o = Command::new("umount").arg(&env.mnt).output().unwrap();
    assert_ok(&o, "umount");
    assert_daemon_finished(&env, pid, &status);
    drop(m);

    let m = env.mount();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"through the helper form");
    m.unmount();
}

#[test]
fn argv_form_errors_are_clear() {
    let Some(env) = Env::new("argv_form_errors_are_clear") else {
        return;
    };
    env.init_volume();
    let run = |args: &[&str]| plain(&env, bin()).args(args).output().unwrap();
    let b = env.backing.to_str().unwrap();
    let mp = env.mnt.to_str().unwrap();
    let pass = format!("passfile={}", env.passfile.display());
    // An unknown option, remount, a wrong passphrase, a missing mountpoint.
    let o = run(&[b, mp, "-o", &format!("{pass},bogus")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("bogus"), "{}", stderr(&o));
    let o = run(&[b, mp, "-o", &format!("{pass},remount")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("remount"), "{}", stderr(&o));
    let wrong = env.dir.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase\n").unwrap();
    let ks = format!("keystore={}", env.keystore.display());
    let o = run(&[b, mp, "-o", &format!("passfile={},{ks}", wrong.display())]);
    assert_eq!(o.status.code(), Some(12), "{}", stderr(&o));
    let o = run(&[b, "/nonexistent/mp", "-o", &format!("{pass},{ks}")]);
    assert_eq!(o.status.code(), Some(17), "{}", stderr(&o));
    let o = run(&[b]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!is_mounted(&env.mnt));
    // A word that is a subcommand stays a subcommand.
    let o = run(&["status", mp]);
    assert_ne!(o.status.code(), Some(0), "status of an unmounted dir");
    assert!(
        !stderr(&o).contains("backing directory status"),
        "{}",
        stderr(&o)
    );
}

fn mount_fuse3_available(test: &str) -> Option<PathBuf> {
    for p in ["/usr/sbin/mount.fuse3", "/sbin/mount.fuse3"] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    skip(test, "mount.fuse3 (package fuse3) is not installed");
    None
}

#[test]
fn mount_fuse3_runs_kekfs_from_path() {
    let Some(env) = Env::new("mount_fuse3_runs_kekfs_from_path") else {
        return;
    };
    let Some(mount_fuse3) = mount_fuse3_available("mount_fuse3_runs_kekfs_from_path") else {
        return;
    };
    env.init_volume();
    // A private PATH directory holding `kekfs`, as install-helper makes one.
    let prefix = env.dir.path().join("prefix");
    let sbin = env.dir.path().join("sbin");
    let o = plain(&env, bin())
        .args(["install-helper", "--prefix"])
        .arg(&prefix)
        .arg("--sbin-dir")
        .arg(&sbin)
        .output()
        .unwrap();
    assert_ok(&o, "install-helper");
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        prefix.join("sbin").display()
    );
    // mount.fuse3 SRC MP -t kekfs -o OPTS is what `mount -t fuse.kekfs` runs.
    let o = plain(&env, &mount_fuse3)
        .env("PATH", &path)
        .arg(&env.backing)
        .arg(&env.mnt)
        .args(["-t", "kekfs", "-o"])
        .arg(fstab_opts(&env, ",nodev,nosuid"))
        .output()
        .unwrap();
    assert_ok(&o, "mount.fuse3");
    assert!(
        is_mounted(&env.mnt),
        "mount.fuse3 exited 0, nothing mounted"
    );
    let m = env.guard();
    let opts = mount_options(&env.mnt);
    assert!(
        opts.contains("nodev") && opts.contains("nosuid"),
        "fstab's nodev,nosuid lost: {opts}"
    );
    std::fs::write(m.p("g"), b"via mount.fuse3").unwrap();
    let pid = lock_pid(&env.backing);
    let status = status_file(&env);
    let o = Command::new("umount").arg(&env.mnt).output().unwrap();
    assert_ok(&o, "umount");
    assert_daemon_finished(&env, pid, &status);
    drop(m);

    // Read-only through the same path.
    let o = plain(&env, &mount_fuse3)
        .env("PATH", &path)
        .arg(&env.backing)
        .arg(&env.mnt)
        .args(["-t", "kekfs", "-o"])
        .arg(fstab_opts(&env, ",ro"))
        .output()
        .unwrap();
    assert_ok(&o, "mount.fuse3 ro");
    let m = env.guard();
    assert!(mount_options(&env.mnt).starts_with("ro"));
    assert_eq!(std::fs::read(m.p("g")).unwrap(), b"via mount.fuse3");
    let e = std::fs::write(m.p("h"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    m.unmount();
}

#[test]
fn install_helper_and_mount_kekfs_helper_form() {
    let Some(env) = Env::new("install_helper_and_mount_kekfs_helper_form") else {
        return;
    };
    env.init_volume();
    let prefix = env.dir.path().join("prefix");
    let sbin = env.dir.path().join("sbin");
    let install = |extra: &[&str]| {
        plain(&env, bin())
            .args(["install-helper", "--prefix"])
            .arg(&prefix)
            .arg("--sbin-dir")
            .arg(&sbin)
            .args(extra)
            .output()
            .unwrap()
    };
    assert_ok(&install(&[]), "install-helper");
    let exe = std::fs::canonicalize(bin()).unwrap();
    let kekfs = prefix.join("sbin/kekfs");
    let helper = sbin.join("mount.kekfs");
    assert_eq!(std::fs::canonicalize(&kekfs).unwrap(), exe);
    assert_eq!(std::fs::read_link(&helper).unwrap(), kekfs);
    // Idempotent.
    let o = install(&[]);
    assert_ok(&o, "install-helper again");
    assert!(String::from_utf8_lossy(&o.stdout).contains("already"));

    // mount(8)'s helper convention: mount.kekfs SRC MP [-sfnv] -o OPTS [-t TYPE].
    let helper_run = |flags: &[&str]| {
        plain(&env, &helper)
            .arg(&env.backing)
            .arg(&env.mnt)
            .args(flags)
            .arg("-o")
            .arg(fstab_opts(&env, ""))
            .args(["-t", "kekfs"])
            .output()
            .unwrap()
    };
    // -f (fake) checks and mounts nothing.
    let o = helper_run(&["-f"]);
    assert_ok(&o, "mount.kekfs -f");
    assert!(!is_mounted(&env.mnt));
    let o = helper_run(&["-n", "-s"]);
    assert_ok(&o, "mount.kekfs");
    assert!(is_mounted(&env.mnt));
    let m = env.guard();
    std::fs::write(m.p("x"), b"helper").unwrap();
    m.unmount();

    // Someone else's file is never replaced or removed without --force.
    std::fs::remove_file(&kekfs).unwrap();
    std::fs::write(&kekfs, b"#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&kekfs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = install(&[]);
    assert_eq!(o.status.code(), Some(18), "{}", stderr(&o));
    assert_eq!(std::fs::read(&kekfs).unwrap(), b"#!/bin/sh\nexit 0\n");
    let o = install(&["--uninstall"]);
    assert_eq!(o.status.code(), Some(21), "{}", stderr(&o));
    assert!(kekfs.exists());
    // --copy --force installs a copy; --uninstall removes exactly what is kekfs.
    assert_ok(&install(&["--copy", "--force"]), "install-helper --copy");
    assert!(!std::fs::symlink_metadata(&kekfs).unwrap().is_symlink());
    assert_eq!(std::fs::read(&kekfs).unwrap(), std::fs::read(&exe).unwrap());
    let o = plain(&env, &kekfs).arg("--version").output().unwrap();
    assert_ok(&o, "copied kekfs --version");
    assert_ok(&install(&["--uninstall"]), "install-helper --uninstall");
    assert!(std::fs::symlink_metadata(&kekfs).is_err());
    assert!(std::fs::symlink_metadata(&helper).is_err());
}

/// Removes what the system-wide install put in place, whatever happens.
struct SystemInstall;

impl Drop for SystemInstall {
    fn drop(&mut self) {
        let o = Command::new(bin())
            .args(["install-helper", "--uninstall"])
            .output();
        if !o.is_ok_and(|o| o.status.success()) {
            eprintln!(
                "warning: `kekfs install-helper --uninstall` failed; check /usr/local/sbin/kekfs and /sbin/mount.kekfs"
            );
        }
    }
}

#[test]
fn system_mount_command_and_fstab_line() {
    const TEST: &str = "system_mount_command_and_fstab_line";
    let opted_in =
        in_ci() || std::env::var("KEKFS_TEST_SYSTEM_MOUNT").is_ok_and(|v| v == "1" || v == "true");
    if !opted_in {
        eprintln!(
            "SKIPPED {TEST}: installs /usr/local/sbin/kekfs and /sbin/mount.kekfs; set KEKFS_TEST_SYSTEM_MOUNT=1 (or CI=true) to run it"
        );
        return;
    }
    let Some(env) = Env::new(TEST) else {
        return;
    };
    if mount_fuse3_available(TEST).is_none() {
        return;
    }
    let exe = std::fs::canonicalize(bin()).unwrap();
    for p in ["/usr/local/sbin/kekfs", "/sbin/mount.kekfs"] {
        if std::fs::symlink_metadata(p).is_ok()
            && std::fs::canonicalize(p).ok().as_deref() != Some(exe.as_path())
        {
            skip(
                TEST,
                &format!("{p} exists and is another kekfs; not replacing it"),
            );
            return;
        }
    }
    env.init_volume();
    let o = Command::new(bin()).arg("install-helper").output().unwrap();
    let _installed = SystemInstall;
    assert_ok(&o, "kekfs install-helper");

    let mounted = || env.guard();
    let umount = |what: &str| {
        let pid = lock_pid(&env.backing);
        let status = status_file(&env);
        let o = Command::new("umount").arg(&env.mnt).output().unwrap();
        assert_ok(&o, &format!("umount after {what}"));
        assert_daemon_finished(&env, pid, &status);
    };
    // mount -t fuse.kekfs: mount(8) -> mount.fuse3 -> sh -> kekfs on the system PATH.
    for (i, ty) in ["fuse.kekfs", "kekfs"].iter().enumerate() {
        let o = plain(&env, "mount")
            .args(["-t", ty])
            .arg(&env.backing)
            .arg(&env.mnt)
            .arg("-o")
            .arg(fstab_opts(&env, ",allow_other"))
            .output()
            .unwrap();
        assert_ok(&o, &format!("mount -t {ty}"));
        assert!(
            is_mounted(&env.mnt),
            "mount -t {ty} returned 0, nothing mounted"
        );
        let m = mounted();
        let name = format!("f{i}");
        std::fs::write(m.p(&name), ty.as_bytes()).unwrap();
        umount(ty);
        drop(m);
    }
    // An fstab line (a private fstab, via mount -T), mounted by its mountpoint alone.
    let fstab = env.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# kekfs test\n{} {} fuse.kekfs {} 0 0\n",
            env.backing.display(),
            env.mnt.display(),
            fstab_opts(&env, ",allow_other,nodev,nosuid")
        ),
    )
    .unwrap();
    let o = plain(&env, "mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&env.mnt)
        .output()
        .unwrap();
    assert_ok(&o, "mount -T fstab MOUNTPOINT");
    assert!(is_mounted(&env.mnt));
    let m = mounted();
    assert_eq!(std::fs::read(m.p("f0")).unwrap(), b"fuse.kekfs");
    assert_eq!(std::fs::read(m.p("f1")).unwrap(), b"kekfs");
    let opts = mount_options(&env.mnt);
    assert!(
        opts.contains("allow_other") && opts.contains("nodev"),
        "{opts}"
    );
    umount("fstab");
    drop(m);
}

#[test]
fn lazy_unmount_then_remount() {
    let Some(env) = Env::new("lazy_unmount_then_remount") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(m.p("before"), &data).unwrap();
    let mut held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("before"))
        .unwrap();
    let pid = m.pid();
    let o = Command::new("umount")
        .arg("-l")
        .arg(&env.mnt)
        .output()
        .unwrap();
    assert_ok(&o, "umount -l");
    assert!(!is_mounted(&env.mnt), "still listed after umount -l");
    // The detached mount keeps serving its open file, writes included.
    {
        use std::io::{Seek, SeekFrom, Write};
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; data.len()];
        held.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data);
        held.seek(SeekFrom::End(0)).unwrap();
        held.write_all(b"after detach").unwrap();
        held.sync_all().unwrap();
    }
    assert!(!process_gone(pid), "daemon exited while a file was open");
    assert!(!lock_is_free(&env.backing));
    // Meanwhile the volume cannot be mounted again: the detached daemon still owns it.
    let o = env.mount_refused(
        &env.mnt,
        "a second mount succeeded while the detached daemon still served",
    );
    assert_eq!(o.status.code(), Some(16), "{}", stderr(&o));
    drop(held);
    assert!(
        wait_for(BOUND, || process_gone(pid) && lock_is_free(&env.backing)),
        "daemon did not finish after the last user let go"
    );
    drop(m);
    let m = env.mount();
    let mut want = data.clone();
    want.extend_from_slice(b"after detach");
    assert_eq!(std::fs::read(m.p("before")).unwrap(), want);
    m.unmount();
}

#[test]
fn status_lists_every_mount() {
    let Some(a) = Env::new("status_lists_every_mount") else {
        return;
    };
    let b = Env::new_unchecked();
    a.init_volume();
    b.init_volume();
    let ma = a.mount();
    let mb = b.mount_with(&["ro"]);
    let ours = |list: &serde_json::Value| -> Vec<(String, String, bool)> {
        let mut v: Vec<(String, String, bool)> = list
            .as_array()
            .expect("status --json lists an array")
            .iter()
            .filter(|s| {
                let mp = s["mountpoint"].as_str().unwrap_or("");
                mp.starts_with(a.dir.path().to_str().unwrap())
                    || mp.starts_with(b.dir.path().to_str().unwrap())
            })
            .map(|s| {
                (
                    s["backing"].as_str().unwrap().to_string(),
                    s["mountpoint"].as_str().unwrap().to_string(),
                    s["pid"].as_u64().is_some(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
    let mut want = vec![
        (canon(&a.backing), canon(&a.mnt), true),
        (canon(&b.backing), canon(&b.mnt), true),
    ];
    want.sort();
    let out = a.ok(&["status", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ours(&list), want, "{out}");
    // The human form names both.
    let text = a.ok(&["status"]);
    for (bk, mp, _) in &want {
        assert!(
            text.contains(bk.as_str()) && text.contains(mp.as_str()),
            "{text}"
        );
    }
    ma.unmount();
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["status", "--json"])).unwrap();
    assert_eq!(ours(&list), vec![(canon(&b.backing), canon(&b.mnt), true)]);
    mb.unmount();
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["status", "--json"])).unwrap();
    assert!(ours(&list).is_empty());
}

#[test]
fn foreground_mount_notifies_systemd_and_stops_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let Some(env) = Env::new("foreground_mount_notifies_systemd_and_stops_on_sigterm") else {
        return;
    };
    env.init_volume();
    let sock_path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = env
        .kekfs()
        .env("NOTIFY_SOCKET", &sock_path)
        .env("KEKFS_RUNTIME_DIR", runtime_dir(&env))
        .args(["mount", "--foreground"])
        .arg(&env.backing)
        .arg(&env.mnt)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let m = env.guard();
    let mut buf = [0u8; 256];
    let n = match sock.recv(&mut buf) {
        Ok(n) => n,
        Err(e) => {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("no readiness notification: {e}; stderr: {}", stderr(&out));
        }
    };
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(
        msg.lines().any(|l| l == format!("MAINPID={}", child.id())),
        "{msg:?}"
    );
    // READY=1 comes only once the mount is usable.
    assert!(is_mounted(&env.mnt));
    std::fs::write(m.p("svc"), b"service").unwrap();
    // systemctl stop: SIGTERM, a clean unmount, exit 0.
    // SAFETY: sending a signal to our child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(!is_mounted(&env.mnt));
    assert!(lock_is_free(&env.backing));
    assert!(stderr(&out).contains("signal"), "{}", stderr(&out));
    drop(m);
    let m = env.mount();
    assert_eq!(std::fs::read(m.p("svc")).unwrap(), b"service");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// systemd unit examples (scripts/systemd)
// ---------------------------------------------------------------------------------------

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/systemd")
}

/// Minimal unit-file parse: sections and key=value lines, comments, no stray text.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = l
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {line}", i + 1));
        assert!(!section.is_empty(), "line {}: key outside a section", i + 1);
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn get<'a>(u: &'a [(String, String, String)], sec: &str, key: &str) -> Option<&'a str> {
    u.iter()
        .find(|(s, k, _)| s == sec && k == key)
        .map(|(_, _, v)| v.as_str())
}

#[test]
fn systemd_unit_examples_are_valid() {
    let dir = units_dir();
    let mount = std::fs::read_to_string(dir.join("mnt-vol.mount")).unwrap();
    let auto = std::fs::read_to_string(dir.join("mnt-vol.automount")).unwrap();
    let svc = std::fs::read_to_string(dir.join("kekfs-vol.service")).unwrap();
    let (mu, au, su) = (parse_unit(&mount), parse_unit(&auto), parse_unit(&svc));
    // The mount unit: named after its mountpoint, type fuse.kekfs, options kekfs accepts.
    assert_eq!(get(&mu, "Mount", "Where"), Some("/mnt/vol"));
    assert_eq!(get(&au, "Automount", "Where"), Some("/mnt/vol"));
    assert_eq!(get(&mu, "Mount", "Type"), Some("fuse.kekfs"));
    let opts = get(&mu, "Mount", "Options").unwrap();
    let o = kekfs::cli::mount::parse_options(&[opts.to_string()]).expect("mount unit options");
    assert!(o.passfile.is_some() && o.keystore.is_some());
    // The service: notify readiness, foreground, options kekfs accepts.
    assert_eq!(get(&su, "Service", "Type"), Some("notify"));
    let exec = get(&su, "Service", "ExecStart").unwrap();
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        words[0].ends_with("/kekfs") && words[1] == "mount",
        "{exec}"
    );
    assert!(words.contains(&"--foreground"), "{exec}");
    let i = words.iter().position(|w| *w == "-o").unwrap();
    kekfs::cli::mount::parse_options(&[words[i + 1].to_string()]).expect("service options");

    // systemd's own checker, with ExecStart pointing at the built binary (verify checks
    // that the executable exists).
    if !tool_ok("systemd-analyze") {
        skip("systemd-analyze verify", "systemd-analyze is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("mnt-vol.mount"), &mount).unwrap();
    std::fs::write(tmp.path().join("mnt-vol.automount"), &auto).unwrap();
    std::fs::write(
        tmp.path().join("kekfs-vol.service"),
        svc.replace("/usr/local/bin/kekfs", bin().to_str().unwrap()),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(
            ["mnt-vol.mount", "mnt-vol.automount", "kekfs-vol.service"]
                .iter()
                .map(|n| tmp.path().join(n)),
        )
        .output()
        .unwrap();
    assert_ok(&o, "systemd-analyze verify");
    let err = stderr(&o);
    let complaints: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("mnt-vol") || l.contains("kekfs-vol"))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze: {err}");
    // And it does catch mistakes (so the check above means something).
    std::fs::write(
        tmp.path().join("kekfs-vol.service"),
        svc.replace("Type=notify", "Type=notifyy"),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(tmp.path().join("kekfs-vol.service"))
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("notifyy"),
        "a bad Type= went unnoticed: {}",
        stderr(&o)
    );
}
