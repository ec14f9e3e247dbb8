//! The command line: help, exit codes for every failure class, JSON output, and that no
//! command ever panics.

mod common;
use common::*;

use std::path::Path;
use std::process::Output;

/// Exit codes (src/cli/exit.rs).
const USAGE: i32 = 2;
const NOT_A_VOLUME: i32 = 10;
const CORRUPT: i32 = 11;
const BAD_PASSPHRASE: i32 = 12;
const KEY_NOT_FOUND: i32 = 14;
const MOUNT_FAILED: i32 = 17;
const EXISTS: i32 = 18;
const NO_KEYSTORE: i32 = 19;
const NOT_MOUNTED: i32 = 20;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run `kekfs ARGS` with the env's keystore and passphrase; never a panic.
fn run(env: &Env, args: &[&str]) -> Output {
    let o = env.run(args);
    assert_no_panic(&o, args);
    o
}

/// Run `kekfs ARGS` without the env's keystore options; never a panic.
fn run_bare(args: &[&str]) -> Output {
    let o = std::process::Command::new(bin())
        .args(args)
        .env_remove("KEKFS_PASSPHRASE")
        .env_remove("KEKFS_PASSFILE")
        .env_remove("KEKFS_KEYSTORE")
        .output()
        .expect("run kekfs");
    assert_no_panic(&o, args);
    o
}

#[track_caller]
fn assert_no_panic(o: &Output, args: &[&str]) {
    let (out, err) = (stdout(o), stderr(o));
    assert!(
        !err.contains("panicked") && !out.contains("panicked"),
        "kekfs {args:?} panicked:\n{err}"
    );
    // A panic exits with 101; a signal leaves no code.
    assert!(
        o.status.code().is_some_and(|c| c != 101),
        "kekfs {args:?} died: {:?}\n{err}",
        o.status
    );
}

/// Assert `kekfs ARGS` fails with `code` and says something on stderr; returns stderr.
#[track_caller]
fn fails(env: &Env, args: &[&str], code: i32) -> String {
    let o = run(env, args);
    check_fail(&o, args, code)
}

#[track_caller]
fn check_fail(o: &Output, args: &[&str], code: i32) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "kekfs {args:?}: expected exit {code}\nstdout: {}\nstderr: {err}",
        stdout(o)
    );
    assert!(!err.trim().is_empty(), "kekfs {args:?}: no error message");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Subcommand names listed under "Commands:" in a help text (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for l in help.lines() {
        if l.trim_end() == "Commands:" {
            inside = true;
            continue;
        }
        if inside {
            if !l.starts_with("  ") || l.trim().is_empty() {
                break;
            }
            let name = l.split_whitespace().next().unwrap_or("");
            if !name.is_empty() && name != "help" {
                out.push(name.to_string());
            }
        }
    }
    out
}

#[test]
fn help_for_every_command() {
    let o = run_bare(&["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let top = stdout(&o);
    assert!(top.contains("Usage: kekfs"), "{top}");
    let cmds = subcommands(&top);
    for expected in ["keystore", "key", "init", "mount", "unmount", "status"] {
        assert!(
            cmds.iter().any(|c| c == expected),
            "{expected} missing: {cmds:?}"
        );
    }
    // Every (nested) subcommand's --help succeeds and prints its usage.
    let mut todo: Vec<Vec<String>> = cmds.into_iter().map(|c| vec![c]).collect();
    let mut checked = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = run_bare(&args);
        assert!(o.status.success(), "kekfs {args:?}: {}", stderr(&o));
        let h = stdout(&o);
        let usage = format!("Usage: kekfs {}", path.join(" "));
        assert!(
            h.contains(&usage),
            "kekfs {args:?} help lacks {usage:?}:\n{h}"
        );
        checked += 1;
        for sub in subcommands(&h) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    assert!(checked >= 9, "only {checked} help texts checked");
    let o = run_bare(&["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("kekfs "), "{}", stdout(&o));
    // No command at all, or an unknown one, is a usage error.
    let o = run_bare(&[]);
    assert_eq!(o.status.code(), Some(USAGE));
    let o = run_bare(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(USAGE));
}

#[test]
fn keystore_and_keys() {
    let env = Env::new_unchecked();
    let o = run(&env, &["keystore", "init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = fails(&env, &["keystore", "init"], EXISTS);
    assert!(err.contains("exist"), "{err}");

    // No keys yet.
    let o = run(&env, &["key", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(0), "{v}");

    let o = run(&env, &["key", "create", "k"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = fails(&env, &["key", "create", "k"], EXISTS);
    assert!(err.contains('k'), "{err}");
    fails(&env, &["key", "create", "bad/name"], USAGE);

    let o = run(&env, &["key", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.lines().any(|l| l.starts_with('k')), "{text}");
    assert!(text.contains("version 1"), "{text}");

    let o = run(&env, &["key", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    let keys = v.as_array().expect("a JSON array of keys");
    assert_eq!(keys.len(), 1, "{v}");
    assert_eq!(keys[0]["name"], "k", "{v}");
    let versions = keys[0]["versions"].as_array().expect("versions array");
    assert_eq!(versions.len(), 1, "{v}");
    assert_eq!(versions[0]["version"], 1, "{v}");
    assert_eq!(versions[0]["enabled"], true, "{v}");
}

#[test]
fn wrong_passphrase_and_missing_keystore() {
    let Some(env) = Env::new("wrong_passphrase_and_missing_keystore") else {
        return;
    };
    env.init_volume();
    std::fs::write(&env.passfile, "not the passphrase\n").unwrap();
    let err = fails(&env, &["key", "list"], BAD_PASSPHRASE);
    assert!(err.to_lowercase().contains("passphrase"), "{err}");
    fails(&env, &["key", "list", "--json"], BAD_PASSPHRASE);
    fails(&env, &["key", "create", "k2"], BAD_PASSPHRASE);
    let b2 = env.dir.path().join("b2");
    fails(&env, &["init", s(&b2), "--kek", "soft:k"], BAD_PASSPHRASE);
    assert!(!b2.join("kekfs.volume").exists());
    fails(
        &env,
        &["mount", s(&env.backing), s(&env.mnt)],
        BAD_PASSPHRASE,
    );
    assert!(!is_mounted(&env.mnt), "mounted with a wrong passphrase");
    // The passphrase file given as a mount option is honoured too.
    let wrong = env.dir.path().join("wrong-pass");
    std::fs::write(&wrong, "also wrong\n").unwrap();
    std::fs::write(&env.passfile, format!("{PASS}\n")).unwrap();
    let opt = format!("passfile={}", wrong.display());
    fails(
        &env,
        &["mount", s(&env.backing), s(&env.mnt), "-o", &opt],
        BAD_PASSPHRASE,
    );
    assert!(!is_mounted(&env.mnt), "mounted with a wrong passphrase");

    // The right passphrase still works afterwards.
    let m = env.mount();
    std::fs::write(m.p("f"), b"x").unwrap();
    m.unmount();

    // No keystore where --keystore points.
    let none = env.dir.path().join("no-keystore");
    let with_none = |args: &[&str]| {
        let mut full = vec!["--keystore", s(&none), "--passfile", s(&env.passfile)];
        full.extend_from_slice(args);
        let o = run_bare(&full);
        check_fail(&o, &full, NO_KEYSTORE)
    };
    let err = with_none(&["key", "list"]);
    assert!(err.contains("keystore init"), "says what to do: {err}");
    with_none(&["key", "create", "x"]);
    with_none(&["init", s(&env.dir.path().join("b3")), "--kek", "soft:k"]);
    with_none(&["mount", s(&env.backing), s(&env.mnt)]);
    assert!(!is_mounted(&env.mnt));
}

#[test]
fn init_errors() {
    let env = Env::new_unchecked();
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    let b = env.dir.path().join("vol");

    let err = fails(
        &env,
        &["init", s(&b), "--kek", "soft:nosuchkey"],
        KEY_NOT_FOUND,
    );
    assert!(err.contains("nosuchkey"), "{err}");
    assert!(!b.join("kekfs.volume").exists());
    let err = fails(
        &env,
        &["init", s(&b), "--kek", "soft:k?version=9"],
        KEY_NOT_FOUND,
    );
    assert!(err.contains('9'), "{err}");
    assert!(!b.join("kekfs.volume").exists());
    fails(&env, &["init", s(&b), "--kek", "bogus:x"], USAGE);
    fails(&env, &["init", s(&b), "--kek", "soft:k?version=0"], USAGE);
    fails(&env, &["init", s(&b), "--kek", "soft:k?colour=red"], USAGE);
    fails(&env, &["init", s(&b)], USAGE);
    assert!(!b.join("kekfs.volume").exists());

    // Non-empty directory.
    let full = env.dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("precious"), b"keep me").unwrap();
    let err = fails(&env, &["init", s(&full), "--kek", "soft:k"], EXISTS);
    assert!(err.contains("empty"), "{err}");
    assert_eq!(std::fs::read(full.join("precious")).unwrap(), b"keep me");
    assert!(!full.join("kekfs.volume").exists());

    // A real init succeeds, and a second one into the same volume is refused.
    env.ok(&["init", s(&b), "--kek", "soft:k"]);
    assert!(b.join("kekfs.volume").exists());
    let header = std::fs::read(b.join("kekfs.volume")).unwrap();
    fails(&env, &["init", s(&b), "--kek", "soft:k"], EXISTS);
    assert_eq!(std::fs::read(b.join("kekfs.volume")).unwrap(), header);
}

#[test]
fn mount_and_unmount_errors() {
    let Some(env) = Env::new("mount_and_unmount_errors") else {
        return;
    };
    env.init_volume();

    // A non-empty directory that is not a volume.
    let plain = env.dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    std::fs::write(plain.join("file"), b"x").unwrap();
    let err = fails(&env, &["mount", s(&plain), s(&env.mnt)], NOT_A_VOLUME);
    assert!(err.contains("kekfs init"), "says what to do: {err}");
    // An empty one, and a missing one.
    let empty = env.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(&env, &["mount", s(&empty), s(&env.mnt)], NOT_A_VOLUME);
    let missing = env.dir.path().join("missing");
    fails(&env, &["mount", s(&missing), s(&env.mnt)], NOT_A_VOLUME);
    // A regular file where the backing directory should be.
    let file = env.dir.path().join("a-file");
    std::fs::write(&file, b"not a dir").unwrap();
    fails(&env, &["mount", s(&file), s(&env.mnt)], NOT_A_VOLUME);
    fails(&env, &["status", s(&file)], NOT_A_VOLUME);
    assert!(!is_mounted(&env.mnt));

    // A missing mountpoint, and a file as mountpoint.
    let nomp = env.dir.path().join("no-mountpoint");
    let err = fails(&env, &["mount", s(&env.backing), s(&nomp)], MOUNT_FAILED);
    assert!(err.contains("no-mountpoint"), "{err}");
    let filemp = env.dir.path().join("file-mountpoint");
    std::fs::write(&filemp, b"").unwrap();
    fails(&env, &["mount", s(&env.backing), s(&filemp)], MOUNT_FAILED);

    // Unknown and malformed mount options.
    let err = fails(
        &env,
        &["mount", s(&env.backing), s(&env.mnt), "-o", "foo"],
        USAGE,
    );
    assert!(err.contains("foo"), "{err}");
    fails(
        &env,
        &["mount", s(&env.backing), s(&env.mnt), "-o", "ro,threads=0"],
        USAGE,
    );
    fails(
        &env,
        &["mount", s(&env.backing), s(&env.mnt), "-o", "kek="],
        USAGE,
    );
    assert!(!is_mounted(&env.mnt));

    // Unmounting something that is not mounted.
    let err = fails(&env, &["unmount", s(&env.mnt)], NOT_MOUNTED);
    assert!(err.contains("not a mounted"), "{err}");
    fails(&env, &["unmount", s(&missing)], NOT_MOUNTED);
    fails(&env, &["unmount", "/"], NOT_MOUNTED);

    // After all that, the volume mounts and unmounts normally.
    let m = env.mount();
    std::fs::write(m.p("f"), b"ok").unwrap();
    m.unmount();
    fails(&env, &["unmount", s(&env.mnt)], NOT_MOUNTED);
}

#[test]
fn status_json_and_listing() {
    let Some(env) = Env::new("status_json_and_listing") else {
        return;
    };
    env.init_volume();
    let backing = std::fs::canonicalize(&env.backing).unwrap();
    let mnt = std::fs::canonicalize(&env.mnt).unwrap();

    let o = run(&env, &["status", s(&env.backing), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(v["backing"], s(&backing), "{v}");
    assert!(v["mountpoint"].is_null(), "{v}");
    assert!(v["pid"].is_null(), "{v}");
    let vid = v["volume_id"]
        .as_str()
        .expect("volume_id string")
        .to_string();
    assert_eq!(vid.len(), 32, "{v}");
    assert!(vid.bytes().all(|c| c.is_ascii_hexdigit()), "{v}");
    assert_eq!(v["kek"], "soft:k", "{v}");
    assert_eq!(v["pinned_version"], 0, "{v}");

    // Human form when not mounted.
    let o = run(&env, &["status", s(&env.backing)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains(&vid), "{text}");
    assert!(text.contains("not mounted"), "{text}");

    let m = env.mount();
    let o = run(&env, &["status", s(&env.backing), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(v["mountpoint"], s(&mnt), "{v}");
    assert_eq!(v["pid"].as_i64(), Some(m.pid() as i64), "{v}");
    assert_eq!(v["volume_id"], vid.as_str(), "{v}");
    assert_eq!(v["kek"], "soft:k", "{v}");
    assert_eq!(v["backing"], s(&backing), "{v}");

    // The mountpoint works as the path too.
    let o = run(&env, &["status", s(&env.mnt), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v2: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(v2["volume_id"], vid.as_str(), "{v2}");
    assert_eq!(v2["backing"], s(&backing), "{v2}");

    // No path: every mount, ours among them.
    let o = run(&env, &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains(&vid), "{text}");
    assert!(text.contains(s(&mnt)), "{text}");
    assert!(text.contains(s(&backing)), "{text}");
    let o = run(&env, &["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    let ours: Vec<&serde_json::Value> = all
        .as_array()
        .expect("array of mounts")
        .iter()
        .filter(|e| e["volume_id"] == vid.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{all}");
    assert_eq!(ours[0]["mountpoint"], s(&mnt), "{all}");

    m.unmount();
    let o = run(&env, &["status", s(&env.backing), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert!(v["mountpoint"].is_null(), "{v}");
    assert!(v["pid"].is_null(), "{v}");

    // Status of things that are not volumes.
    let plain = env.dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    fails(&env, &["status", s(&plain)], NOT_A_VOLUME);
    fails(
        &env,
        &["status", s(&env.dir.path().join("missing"))],
        NOT_A_VOLUME,
    );
}

#[test]
fn pinned_volume_mounts() {
    let Some(env) = Env::new("pinned_volume_mounts") else {
        return;
    };
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    let out = env.ok(&["init", s(&env.backing), "--kek", "soft:k?version=1"]);
    assert!(out.contains("version 1"), "{out}");
    let o = run(&env, &["status", s(&env.backing), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(v["pinned_version"], 1, "{v}");
    assert!(
        v["kek"].as_str().is_some_and(|k| k.starts_with("soft:k")),
        "{v}"
    );
    assert_eq!(v["wrapped_by_versions"], serde_json::json!([1, 1]), "{v}");

    let m = env.mount();
    std::fs::write(m.p("pinned"), b"pinned data").unwrap();
    let o = run(&env, &["status", s(&env.mnt), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    assert_eq!(v["pinned_version"], 1, "{v}");
    assert!(!v["mountpoint"].is_null(), "{v}");
    let o = run(&env, &["status", s(&env.mnt)]);
    assert!(stdout(&o).contains("pinned to 1"), "{}", stdout(&o));
    m.unmount();
    let m = env.mount();
    assert_eq!(std::fs::read(m.p("pinned")).unwrap(), b"pinned data");
    m.unmount();

    // A kek= mount option naming a different KEK is refused; the matching one is accepted.
    let o = run(
        &env,
        &[
            "mount",
            s(&env.backing),
            s(&env.mnt),
            "-o",
            "kek=soft:other",
        ],
    );
    check_fail(&o, &["mount", "-o", "kek=soft:other"], USAGE);
    assert!(!is_mounted(&env.mnt));
    let m = env.mount_with(&["kek=soft:k?version=1"]);
    assert_eq!(std::fs::read(m.p("pinned")).unwrap(), b"pinned data");
    m.unmount();
}

#[test]
fn garbage_keystore_is_refused() {
    let Some(env) = Env::new("garbage_keystore_is_refused") else {
        return;
    };
    env.init_volume();
    let ks_file = env.keystore.join("keystore.json");
    let good = std::fs::read(&ks_file).unwrap();
    let good_json: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let mut variants: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("garbage".into(), b"\x00\xffnot json at all".to_vec()),
        ("cut in half".into(), good[..good.len() / 2].to_vec()),
        ("JSON null".into(), b"null".to_vec()),
        ("JSON array".into(), b"[]".to_vec()),
    ];
    // Structurally valid JSON with hostile values: huge Argon2 cost, wrong sizes, …
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 6] = [
        ("huge argon2 memory", |v| {
            v["kdf"]["m_kib"] = 4_294_967_295u64.into()
        }),
        ("zero argon2 time", |v| v["kdf"]["t"] = 0.into()),
        ("empty salt", |v| v["kdf"]["salt"] = "".into()),
        ("future version", |v| v["version"] = 99.into()),
        ("short key material", |v| {
            v["keys"]["k"]["versions"][0]["material"] = "AAAA".into()
        }),
        ("no versions", |v| {
            v["keys"]["k"]["versions"] = serde_json::json!([])
        }),
    ];
    for (what, edit) in edits {
        let mut v = good_json.clone();
        edit(&mut v);
        variants.push((what.into(), serde_json::to_vec(&v).unwrap()));
    }
    for (what, bytes) in &variants {
        std::fs::write(&ks_file, bytes).unwrap();
        let err = fails(&env, &["key", "list"], CORRUPT);
        assert!(err.contains("keystore"), "{what}: {err}");
        fails(&env, &["mount", s(&env.backing), s(&env.mnt)], CORRUPT);
        assert!(!is_mounted(&env.mnt), "{what}: mounted");
        // Nothing was changed: the damaged file is left as it was for recovery.
        assert_eq!(&std::fs::read(&ks_file).unwrap(), bytes, "{what}");
    }
    std::fs::write(&ks_file, &good).unwrap();
    let m = env.mount();
    std::fs::write(m.p("f"), b"ok").unwrap();
    m.unmount();
}
