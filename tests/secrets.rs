//! Secret hygiene: no passphrase, token PIN, AEK or KEK material in anything kekfs writes
//! or prints (command output, daemon log, status, runtime status files, audit logs, the
//! backing directory); the daemon disables core dumps, locks its memory and raises its
//! descriptor limit; the keystore's file permissions are checked when it is opened.

mod common;
use common::softhsm::{softhsm, softhsm_setup};
use common::*;

use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Distinctive canaries: none can appear by accident in anything kekfs writes.
const PASSPHRASE: &str = "Quokka-7q!canary-passphrase-K3xW9";
const WRONG_PASSPHRASE: &str = "Wombat-2z!canary-wrongpass-P8vN4";
const PIN: &str = "pin-canary-5829317";
const WRONG_PIN: &str = "pin-canary-0461985";

/// Every output kekfs produced in a test, by command.
#[derive(Default)]
struct Transcript {
    outputs: Vec<(String, Vec<u8>)>,
}

impl Transcript {
    fn record(&mut self, what: &str, o: &Output) {
        self.outputs
            .push((format!("{what} (stdout)"), o.stdout.clone()));
        self.outputs
            .push((format!("{what} (stderr)"), o.stderr.clone()));
    }

    fn run(&mut self, mut c: Command, what: &str) -> Output {
        let o = c.output().expect("run kekfs");
        self.record(what, &o);
        o
    }

    #[track_caller]
    fn ok(&mut self, c: Command, what: &str) -> String {
        let o = self.run(c, what);
        assert!(
            o.status.success(),
            "{what} failed ({:?}): {}{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Add every regular file under `dir` (recursively) as something to scan.
    fn add_tree(&mut self, dir: &Path) {
        for f in files_under(dir) {
            if let Ok(b) = std::fs::read(&f) {
                self.outputs.push((f.display().to_string(), b));
            }
        }
    }
}

/// The forms a secret could take in text: raw, hex (both cases), base64 (standard and
/// URL-safe, padded or not: the first 40 characters cover all of them).
fn needles(name: &str, secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    let b64u = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let cut = |s: &str| s.as_bytes()[..s.len().min(40)].to_vec();
    vec![
        (format!("{name} (raw)"), secret.to_vec()),
        (format!("{name} (hex)"), hex.clone().into_bytes()),
        (format!("{name} (HEX)"), hex.to_uppercase().into_bytes()),
        (format!("{name} (base64)"), cut(&b64)),
        (format!("{name} (base64url)"), cut(&b64u)),
    ]
}

/// The first secret found in the transcript: "NAME found in WHERE".
fn find_secret(t: &Transcript, secrets: &[(String, Vec<u8>)]) -> Option<String> {
    for (what, hay) in &t.outputs {
        for (name, needle) in secrets {
            if hay.windows(needle.len()).any(|w| w == needle.as_slice()) {
                return Some(format!("{name} found in {what}"));
            }
        }
    }
    None
}

#[track_caller]
fn assert_no_secret(t: &Transcript, secrets: &[(String, Vec<u8>)]) {
    let scanned: usize = t.outputs.iter().map(|(_, h)| h.len()).sum();
    assert!(scanned > 0, "nothing was scanned");
    if let Some(hit) = find_secret(t, secrets) {
        panic!("{hit}");
    }
    // The scan itself finds each form of each secret (in some surrounding text).
    for (name, needle) in secrets {
        let mut probe = Transcript::default();
        let mut text = b"log line: key=".to_vec();
        text.extend_from_slice(needle);
        text.extend_from_slice(b" end");
        probe.outputs.push(("probe".into(), text));
        assert!(find_secret(&probe, secrets).is_some(), "probe of {name}");
    }
}

fn runtime_dir(env: &Env) -> PathBuf {
    let d = env.dir.path().join("run");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `kekfs` with this env's keystore and passphrase file, and a private runtime dir.
fn kekfs(env: &Env) -> Command {
    let mut c = env.kekfs();
    c.env("KEKFS_RUNTIME_DIR", runtime_dir(env));
    c
}

/// `kekfs` with this env's keystore and runtime dir but no passphrase source.
fn bare(env: &Env) -> Command {
    let mut c = env.kekfs_no_passphrase();
    c.env("KEKFS_RUNTIME_DIR", runtime_dir(env));
    c
}

fn with_args(mut c: Command, args: &[&str]) -> Command {
    c.args(args);
    c
}

fn mount_cmd(env: &Env, extra: &[&str]) -> Command {
    let mut c = kekfs(env);
    c.args(env.mount_args(extra));
    c
}

fn status_json(t: &mut Transcript, env: &Env) -> serde_json::Value {
    let out = t.ok(
        with_args(kekfs(env), &["status", env.mnt.to_str().unwrap(), "--json"]),
        "status --json",
    );
    serde_json::from_str(&out).expect("status JSON")
}

/// A full soft: run with a known passphrase: keystore and key lifecycle, init, mount, I/O,
/// status, online rewrap after a rotation, explicit rewrap, revocation and restore,
/// verify, audit queries, unmount and a wrong passphrase. Then grep everything.
#[test]
fn no_passphrase_or_key_in_any_output_log_or_status() {
    let Some(env) = Env::new("no_passphrase_or_key_in_any_output_log_or_status") else {
        return;
    };
    std::fs::write(&env.passfile, format!("{PASSPHRASE}\n")).unwrap();
    let wrong = env.dir.path().join("wrong-pass");
    std::fs::write(&wrong, format!("{WRONG_PASSPHRASE}\n")).unwrap();
    let b = env.backing.to_str().unwrap().to_string();
    let mnt = env.mnt.to_str().unwrap().to_string();
    let mut t = Transcript::default();

    t.ok(
        with_args(kekfs(&env), &["keystore", "init"]),
        "keystore init",
    );
    t.ok(
        with_args(kekfs(&env), &["key", "create", "k"]),
        "key create",
    );
    t.ok(
        with_args(kekfs(&env), &["key", "list", "--json"]),
        "key list",
    );
    t.ok(
        with_args(kekfs(&env), &["init", &b, "--kek", "soft:k"]),
        "init",
    );
    t.ok(mount_cmd(&env, &["poll=200ms"]), "mount");
    let m = env.guard();
    std::fs::write(m.p("file"), b"some plaintext").unwrap();
    std::fs::create_dir(m.p("dir")).unwrap();
    std::fs::write(m.p("dir/other"), vec![7u8; 10000]).unwrap();
    let st = status_json(&mut t, &env);
    assert!(st["pid"].as_u64().is_some(), "{st}");
    t.ok(with_args(kekfs(&env), &["status"]), "status (all)");
    t.ok(
        with_args(kekfs(&env), &["status", "--json"]),
        "status --json (all)",
    );

    // A rotation: the mounted volume (following the latest version) rewraps online.
    t.ok(
        with_args(kekfs(&env), &["key", "rotate", "k"]),
        "key rotate",
    );
    let rewrapped = wait_for(Duration::from_secs(20), || {
        status_json(&mut t, &env)["wrapped_by_versions"][0].as_u64() == Some(2)
    });
    assert!(rewrapped, "no online rewrap to version 2");
    t.ok(with_args(kekfs(&env), &["rewrap", &mnt]), "rewrap");

    // Revocation and restore while mounted.
    t.ok(
        with_args(kekfs(&env), &["key", "disable", "k"]),
        "key disable",
    );
    assert!(
        wait_for(Duration::from_secs(20), || read_errno(&m.p("file"))
            == Some(libc::EKEYREVOKED)),
        "reads did not fail after the key was disabled"
    );
    let _ = status_json(&mut t, &env);
    t.ok(
        with_args(kekfs(&env), &["key", "enable", "k"]),
        "key enable",
    );
    assert!(
        wait_for(Duration::from_secs(20), || std::fs::read(m.p("file"))
            .is_ok_and(|d| d == b"some plaintext")),
        "reads did not resume after the key was enabled"
    );
    t.ok(with_args(kekfs(&env), &["verify", &mnt]), "verify");
    t.ok(with_args(kekfs(&env), &["audit", "check"]), "audit check");
    t.ok(
        with_args(kekfs(&env), &["audit", "summary"]),
        "audit summary",
    );
    t.ok(
        with_args(kekfs(&env), &["audit", "summary", "--volume", &b, "--json"]),
        "audit summary --volume",
    );
    t.ok(
        with_args(kekfs(&env), &["audit", "last-use"]),
        "audit last-use",
    );
    // The runtime status file of the live daemon.
    t.add_tree(&runtime_dir(&env));
    assert!(
        t.outputs.iter().any(|(w, _)| w.ends_with(".json")),
        "no runtime status file was published in {}",
        runtime_dir(&env).display()
    );
    m.unmount();

    // Wrong passphrases (from a file, from the environment): refused with the passphrase
    // exit code, and never echoed.
    let o = t.run(
        with_args(
            bare(&env),
            &["--passfile", wrong.to_str().unwrap(), "key", "list"],
        ),
        "key list (wrong passphrase)",
    );
    assert_eq!(o.status.code(), Some(12), "{o:?}");
    let mut c = bare(&env);
    c.env("KEKFS_PASSPHRASE", WRONG_PASSPHRASE)
        .args(["key", "show", "k"]);
    let o = t.run(c, "key show (wrong passphrase from $KEKFS_PASSPHRASE)");
    assert_eq!(o.status.code(), Some(12), "{o:?}");
    let mut c = bare(&env);
    c.args(["--passfile", wrong.to_str().unwrap(), "mount", &b, &mnt])
        .arg("--log")
        .arg(env.dir.path().join("daemon.log"));
    let o = t.run(c, "mount (wrong passphrase)");
    if is_mounted(&env.mnt) {
        force_unmount(&env.mnt);
    }
    assert_eq!(o.status.code(), Some(12), "{o:?}");
    t.ok(with_args(kekfs(&env), &["rewrap", &b]), "rewrap (offline)");

    // What the daemon and the audit log wrote, the keystore and the backing dir.
    t.outputs
        .push(("daemon log".into(), env.daemon_log().into_bytes()));
    assert!(
        env.daemon_log().contains("mounted"),
        "daemon log:\n{}",
        env.daemon_log()
    );
    t.add_tree(&env.audit_dir());
    t.add_tree(&env.keystore);
    t.add_tree(&env.backing);
    t.add_tree(&runtime_dir(&env));
    assert!(
        t.outputs
            .iter()
            .any(|(w, _)| w.contains("audit.") && w.ends_with(".log")),
        "no audit log was scanned"
    );

    // The secrets themselves, through the library: the AEK (unwrapped with the keystore)
    // and every KEK version's material.
    let pass = kekfs::kek::passphrase::Passphrase::new(PASSPHRASE.as_bytes().to_vec()).unwrap();
    let ks = kekfs::kek::keystore::Keystore::open(&env.keystore, &pass).unwrap();
    let now = kekfs::kek::keystore::unix_now();
    let mut secrets = Vec::new();
    for v in 1..=2 {
        let (_, kek) = ks.key_material("k", Some(v), now).unwrap();
        secrets.extend(needles(&format!("KEK k version {v}"), kek.expose()));
    }
    let provider = kekfs::kek::soft::SoftProvider::from_keystore(ks, "k", None).unwrap();
    let (header, _) = kekfs::volume::read_header(&env.backing).unwrap();
    use kekfs::kek::KekProvider as _;
    let aek = provider.unwrap(&header.slots[0]).unwrap();
    assert_eq!(
        provider.unwrap(&header.slots[1]).unwrap().expose(),
        aek.expose()
    );
    secrets.extend(needles("AEK", aek.expose()));
    secrets.extend(needles("passphrase", PASSPHRASE.as_bytes()));
    secrets.extend(needles("wrong passphrase", WRONG_PASSPHRASE.as_bytes()));
    assert_no_secret(&t, &secrets);
}

// ---------------------------------------------------------------------------------------
// PKCS#11: the token PIN
// ---------------------------------------------------------------------------------------

#[test]
fn no_token_pin_in_any_output_log_or_status() {
    let Some(module) = softhsm("no_token_pin_in_any_output_log_or_status") else {
        return;
    };
    let Some(env) = Env::new("no_token_pin_in_any_output_log_or_status") else {
        return;
    };
    let token = softhsm_setup(
        &env.dir.path().join("hsm"),
        "kekfs",
        "so-pin-canary-771",
        PIN,
    );
    let (conf, pinfile) = (token.conf, token.pinfile);
    let uri = format!(
        "pkcs11:token=kekfs;object=vol-kek?module-path={module}&pin-source=file:{}",
        pinfile.display()
    );
    let p11 = |args: &[&str]| {
        let mut c = kekfs(&env);
        c.env("SOFTHSM2_CONF", &conf)
            .env_remove("KEKFS_PKCS11_MECHANISM")
            .args(args);
        c
    };
    let b = env.backing.to_str().unwrap().to_string();
    let mut t = Transcript::default();
    t.ok(p11(&["key", "create", "--kek", &uri]), "key create --kek");
    t.ok(p11(&["init", &b, "--kek", &uri]), "init");
    let mut c = mount_cmd(&env, &["poll=200ms"]);
    c.env("SOFTHSM2_CONF", &conf);
    t.ok(c, "mount");
    let m = env.guard();
    std::fs::write(m.p("f"), b"token-protected").unwrap();
    let mut c = p11(&["status", env.mnt.to_str().unwrap(), "--json"]);
    c.env("SOFTHSM2_CONF", &conf);
    t.ok(c, "status --json");
    t.ok(p11(&["rewrap", env.mnt.to_str().unwrap()]), "rewrap");
    t.ok(p11(&["verify", env.mnt.to_str().unwrap()]), "verify");
    t.add_tree(&runtime_dir(&env));
    m.unmount();
    t.ok(p11(&["audit", "check"]), "audit check");
    t.ok(p11(&["audit", "summary"]), "audit summary");

    // A wrong PIN: refused with the PIN exit code and never echoed.
    std::fs::write(&pinfile, format!("{WRONG_PIN}\n")).unwrap();
    let mut c = mount_cmd(&env, &[]);
    c.env("SOFTHSM2_CONF", &conf);
    let o = t.run(c, "mount (wrong PIN)");
    if is_mounted(&env.mnt) {
        force_unmount(&env.mnt);
    }
    assert_eq!(o.status.code(), Some(12), "{o:?}");
    std::fs::write(&pinfile, format!("{PIN}\n")).unwrap();

    t.outputs
        .push(("daemon log".into(), env.daemon_log().into_bytes()));
    t.add_tree(&env.audit_dir());
    t.add_tree(&env.backing);
    let mut secrets = needles("PIN", PIN.as_bytes());
    secrets.extend(needles("wrong PIN", WRONG_PIN.as_bytes()));
    assert_no_secret(&t, &secrets);
}

// ---------------------------------------------------------------------------------------
// The daemon process
// ---------------------------------------------------------------------------------------

fn proc_field(pid: i32, file: &str, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/{file}:\n{text}"))
        .to_string()
}

/// `Max core file size  0  0  bytes` → ("0", "0").
fn limits(line: &str) -> (String, String) {
    let f: Vec<&str> = line.split_whitespace().rev().collect();
    // The line ends with soft, hard, units (units may be missing for some limits).
    if f[0].parse::<u64>().is_ok() || f[0] == "unlimited" {
        (f[1].to_string(), f[0].to_string())
    } else {
        (f[2].to_string(), f[1].to_string())
    }
}

#[test]
fn daemon_has_no_core_dumps_locked_memory_and_enough_descriptors() {
    let Some(env) = Env::new("daemon_has_no_core_dumps_locked_memory_and_enough_descriptors")
    else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::write(m.p("f"), vec![1u8; 1 << 20]).unwrap();
    let pid = m.pid();
    let core = limits(&proc_field(pid, "limits", "Max core file size"));
    assert_eq!(core, ("0".to_string(), "0".to_string()), "core limit");
    let (soft, hard) = limits(&proc_field(pid, "limits", "Max open files"));
    assert_eq!(
        soft, hard,
        "descriptor soft limit not raised to the hard limit"
    );
    // With CAP_IPC_LOCK (root, normally) the daemon's memory is locked; without it, and
    // with a finite locked-memory limit, the daemon says so in its log.
    let caps = proc_field(std::process::id() as i32, "status", "CapEff:");
    let caps = u64::from_str_radix(caps.split_whitespace().nth(1).unwrap(), 16).unwrap();
    let lck = proc_field(pid, "status", "VmLck:");
    let kib: u64 = lck.split_whitespace().nth(1).unwrap().parse().unwrap();
    if caps & (1 << 14) != 0 {
        assert!(kib > 0, "daemon memory is not locked: {lck}");
        assert!(
            !env.daemon_log().contains("not locked"),
            "{}",
            env.daemon_log()
        );
    } else if kib == 0 {
        assert!(
            env.daemon_log().contains("key memory is not locked"),
            "{}",
            env.daemon_log()
        );
    }
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// Keystore permissions
// ---------------------------------------------------------------------------------------

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn keystore_permissions_are_checked_when_opened() {
    let env = Env::new_unchecked();
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    let json = env.keystore.join("keystore.json");
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Safe modes: no warning.
    let o = env.run(&["key", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));

    // Readable by others: works, with a warning naming the file and the fix.
    chmod(&json, 0o644);
    let o = env.run(&["key", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("warning") && e.contains(json.to_str().unwrap()) && e.contains("chmod 600"),
        "{e}"
    );

    // Writable by everyone: refused (states and policies are not sealed), exit 11.
    chmod(&json, 0o666);
    let o = env.run(&["key", "list"]);
    assert_eq!(o.status.code(), Some(11), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("writable by every user") && e.contains("chmod 600"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");

    // A directory others can write to: works, with a warning.
    chmod(&json, 0o600);
    chmod(&env.keystore, 0o777);
    let o = env.run(&["key", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("keystore directory") && e.contains("chmod 700"),
        "{e}"
    );
    // Sticky and world-writable (like /tmp): others cannot replace the file; no warning.
    chmod(&env.keystore, 0o1777);
    let o = env.run(&["key", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    chmod(&env.keystore, 0o700);
}

/// The backing directory `kekfs init` creates is private (0700), and kekfs's own files in
/// it (volume header, directory ids, locks, long-name sidecars) are 0600. Content files,
/// directories and symlinks keep the modes the user gave them (the kernel checks
/// permissions against them).
#[test]
fn backing_dir_and_kekfs_files_are_private() {
    let Some(env) = Env::new("backing_dir_and_kekfs_files_are_private") else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    env.init_volume();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&env.backing), 0o700, "backing root");
    let m = env.mount();
    std::fs::create_dir(m.p("d")).unwrap();
    std::fs::write(m.p(&format!("d/{}", "L".repeat(200))), b"x").unwrap();
    std::fs::write(m.p("f"), b"y").unwrap();
    // Through the mount, modes are the user's.
    assert_eq!(mode(&m.p("d")), 0o755);
    assert_eq!(mode(&m.p("f")), 0o644);
    let mut internal = 0;
    for f in files_under(&env.backing) {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        // (`kekfs.L.<hash>` is a long-named user file; its sidecar `….n` is kekfs's.)
        let long_entry = name.starts_with("kekfs.L.") && !name.ends_with(".n");
        if name.starts_with("kekfs.") && !long_entry {
            internal += 1;
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }
    // Volume header, volume lock, two directory ids, one sidecar (and the header lock,
    // once a rewrap made it).
    assert!(internal >= 5, "only {internal} kekfs files found");
    m.unmount();
}
