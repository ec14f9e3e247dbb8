//! `kekfs verify` (the volume is under its KEK and every block authenticates; each kind of
//! damage is named) and `kekfs drill` (disable the KEK, time the revocation and the
//! recovery, and always put the key back: on success, on failure and on SIGINT).

mod common;
use common::softhsm::*;
use common::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIG: usize = 100_000;
const CT_BLOCK: u64 = 4096 + 28;
const FILE_HEADER: u64 = 24;

/// Assert `kekfs ARGS` exits with `code`; returns stdout and stderr.
fn fails(env: &Env, args: &[&str], code: i32) -> String {
    let o = env.fails(args, code);
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn verify_json(env: &Env, path: &Path, code: i32) -> Value {
    let o = env.run(&["verify", path.to_str().unwrap(), "--json"]);
    assert_eq!(
        o.status.code(),
        Some(code),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("verify --json")
}

/// A volume with a multi-block file, a small file, an empty file, a symlink, an xattr and
/// a long name; unmounted.
fn populated(env: &Env) {
    env.init_volume();
    let m = env.mount();
    std::fs::create_dir(m.p("dir")).unwrap();
    let big: Vec<u8> = (0..BIG).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(m.p("dir/big"), &big).unwrap();
    std::fs::write(m.p("small"), b"small file").unwrap();
    std::fs::write(m.p("empty"), b"").unwrap();
    std::os::unix::fs::symlink("dir/big", m.p("link")).unwrap();
    std::fs::write(m.p(&"n".repeat(200)), b"long name").unwrap();
    let set = Command::new("setfattr")
        .args(["-n", "user.colour", "-v", "blue"])
        .arg(m.p("small"))
        .status();
    assert!(
        set.is_ok_and(|s| s.success()),
        "setfattr (package attr) needed"
    );
    m.unmount();
}

/// The backing file of a plaintext file, found by its ciphertext size.
fn backing_file(env: &Env, plain_len: u64) -> PathBuf {
    let ct = |p: u64| {
        FILE_HEADER
            + CT_BLOCK * (p / 4096)
            + if p.is_multiple_of(4096) {
                0
            } else {
                p % 4096 + 28
            }
    };
    let want = ct(plain_len);
    let found: Vec<PathBuf> = content_files(&env.backing)
        .into_iter()
        .filter(|p| std::fs::metadata(p).unwrap().len() == want)
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

fn findings(v: &Value) -> Vec<(String, String, Option<u64>)> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["path"].as_str().unwrap().to_string(),
                f["block"].as_u64(),
            )
        })
        .collect()
}

#[test]
fn verify_passes_on_a_healthy_volume_and_names_each_damage() {
    let Some(env) = Env::new("verify_passes_on_a_healthy_volume_and_names_each_damage") else {
        return;
    };
    populated(&env);
    let out = env.ok(&["verify", env.backing.to_str().unwrap()]);
    assert!(out.contains("OK: the volume is under its KEK"), "{out}");
    assert!(out.contains("slot 0:   wrapped by KEK version 1"), "{out}");
    assert!(out.contains("software keystore"), "{out}");
    let v = verify_json(&env, &env.backing, 0);
    assert_eq!(v["ok"], true);
    assert_eq!(v["header_authenticated"], true);
    assert_eq!(v["slots"][0]["key_version"], 1);
    assert_eq!(v["slots"][1]["unwraps"], true);
    assert_eq!(v["key_protection"]["kind"], "software");
    assert_eq!(v["content"]["files"], 4);
    assert_eq!(v["content"]["blocks"], 25 + 1 + 1);
    assert_eq!(v["content"]["symlinks"], 1);
    assert_eq!(v["content"]["xattrs"], 1);
    // Expectations about the KEK.
    let b = env.backing.to_str().unwrap();
    env.ok(&["verify", b, "--kek", "soft:k", "--key-version", "1"]);
    let out = fails(&env, &["verify", b, "--key-version", "2"], 25);
    assert!(out.contains("version 2 was expected"), "{out}");
    fails(&env, &["verify", b, "--kek", "soft:other"], 25);

    let big = backing_file(&env, BIG as u64);
    let original = std::fs::read(&big).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();

    // A flipped byte in block 3.
    let at = FILE_HEADER + CT_BLOCK * 3 + 100;
    f.write_all_at(&[original[at as usize] ^ 0x01], at).unwrap();
    let v = verify_json(&env, &env.backing, 25);
    assert_eq!(
        findings(&v),
        [("block".into(), "/dir/big".into(), Some(3))],
        "{v:#}"
    );
    let out = fails(&env, &["verify", b], 25);
    assert!(out.contains("/dir/big block #3"), "{out}");
    std::fs::write(&big, &original).unwrap();

    // Blocks 1 and 2 swapped.
    let (b1, b2) = (FILE_HEADER + CT_BLOCK, FILE_HEADER + 2 * CT_BLOCK);
    let blk = |o: u64| original[o as usize..(o + CT_BLOCK) as usize].to_vec();
    f.write_all_at(&blk(b2), b1).unwrap();
    f.write_all_at(&blk(b1), b2).unwrap();
    let v = verify_json(&env, &env.backing, 25);
    assert_eq!(
        findings(&v),
        [
            ("block".into(), "/dir/big".into(), Some(1)),
            ("block".into(), "/dir/big".into(), Some(2))
        ],
        "{v:#}"
    );
    std::fs::write(&big, &original).unwrap();
    env.ok(&["verify", b]);

    // Cut at a block boundary (after block 20): named as cut short at its new end.
    f.set_len(FILE_HEADER + CT_BLOCK * 21).unwrap();
    let v = verify_json(&env, &env.backing, 25);
    assert_eq!(
        findings(&v),
        [("cut-short".into(), "/dir/big".into(), Some(20))],
        "{v:#}"
    );
    let out = fails(&env, &["verify", b], 25);
    assert!(out.contains("file cut short"), "{out}");
    std::fs::write(&big, &original).unwrap();
    env.ok(&["verify", b]);

    // A file whose header is gone (its first 24 bytes cut off).
    let small = backing_file(&env, 10);
    let small_orig = std::fs::read(&small).unwrap();
    std::fs::write(&small, &small_orig[24..]).unwrap();
    let v = verify_json(&env, &env.backing, 25);
    assert_eq!(
        findings(&v),
        [("file-header".into(), "/small".into(), None)],
        "{v:#}"
    );
    std::fs::write(&small, &small_orig).unwrap();

    // A name that does not decrypt in its directory.
    let renamed = small.with_file_name("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    std::fs::rename(&small, &renamed).unwrap();
    let v = verify_json(&env, &env.backing, 25);
    let f = findings(&v);
    assert_eq!(f.len(), 1, "{v:#}");
    assert_eq!(f[0].0, "name");
    std::fs::rename(&renamed, &small).unwrap();
    env.ok(&["verify", b]);

    // The verification is in the audit log.
    let vid = v["volume_id"].as_str().unwrap();
    let log = std::fs::read_dir(env.audit_dir().join("volumes").join(vid))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(
        log.contains("\"operation\":\"verify\",\"code\":\"422\""),
        "{log}"
    );
    assert!(log.contains("\"operation\":\"verify\",\"code\":\"200\""));
}

#[test]
fn verify_works_on_a_mountpoint_and_fails_when_the_key_is_refused() {
    let Some(env) = Env::new("verify_works_on_a_mountpoint_and_fails_when_the_key_is_refused")
    else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::write(m.p("f"), vec![1u8; 9000]).unwrap();
    let v = verify_json(&env, &env.mnt, 0);
    assert_eq!(v["content"]["blocks"], 3);
    // After a rotation, slot 1 holds the old version; disabling it is only a note.
    env.ok(&["key", "rotate", "k"]);
    env.ok(&["rewrap", env.mnt.to_str().unwrap()]);
    env.ok(&["key", "disable", "k@1"]);
    let v = verify_json(&env, &env.mnt, 0);
    assert_eq!(v["slots"][0]["key_version"], 2);
    assert_eq!(v["slots"][1]["unwraps"], false);
    assert!(v["notes"].to_string().contains("slot 1"), "{v:#}");
    env.ok(&["key", "disable", "k@2"]);
    let v = verify_json(&env, &env.mnt, 25);
    assert_eq!(v["findings"][0]["kind"], "kek", "{v:#}");
    env.ok(&["key", "enable", "k"]);
    m.unmount();
}

fn key_versions_enabled(env: &Env) -> Vec<bool> {
    let v: Value = serde_json::from_str(&env.ok(&["key", "show", "k", "--json"])).unwrap();
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["enabled"].as_bool().unwrap())
        .collect()
}

fn keystore_ops(env: &Env) -> Vec<String> {
    ops(&log_lines(&env.keystore.join("audit")))
}

#[test]
fn drill_measures_and_restores() {
    let Some(env) = Env::new("drill_measures_and_restores") else {
        return;
    };
    env.init_volume();
    env.ok(&["key", "rotate", "k"]);
    env.ok(&["key", "disable", "k@2"]); // an unrelated disabled version stays disabled
    let m = env.mount_with(&["poll=300ms"]);
    std::fs::write(m.p("f"), b"data").unwrap();
    let mp = env.mnt.to_str().unwrap();
    let out = fails(&env, &["drill", mp], 2);
    assert!(out.contains("--yes"), "{out}");
    assert_eq!(key_versions_enabled(&env), [true, false]);
    let v: Value = serde_json::from_str(&env.ok(&["drill", mp, "--yes", "--json"])).unwrap();
    assert_eq!(v["errno_name"], "EKEYREVOKED", "{v:#}");
    assert_eq!(v["versions"], serde_json::json!([1]));
    let revoked = v["revoked_after_ms"].as_u64().unwrap();
    assert!(revoked < 10_000, "{revoked} ms");
    assert!(v["resumed_after_ms"].as_u64().unwrap() < 10_000);
    assert_eq!(v["key_restored"], true);
    assert_eq!(
        key_versions_enabled(&env),
        [true, false],
        "exactly as before"
    );
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"data");
    let ops = keystore_ops(&env);
    let tail: Vec<&str> = ops
        .iter()
        .map(String::as_str)
        .filter(|o| o.starts_with("disable") || o.starts_with("enable") || o.starts_with("drill"))
        .collect();
    assert_eq!(
        tail,
        ["disable 200", "disable 200", "enable 200", "drill 200"]
    );
    let text = env.ok(&["drill", mp, "--yes"]);
    assert!(
        text.contains("reads failed after") && text.contains("resumed after"),
        "{text}"
    );
    m.unmount();

    // Not mounted: the drill mounts it on a temporary directory and unmounts it again.
    let v: Value =
        serde_json::from_str(&env.ok(&["drill", env.backing.to_str().unwrap(), "--yes", "--json"]))
            .unwrap();
    assert_eq!(v["temporary_mount"], true);
    assert!(!is_mounted(Path::new(v["mountpoint"].as_str().unwrap())));
    assert!(!Path::new(v["mountpoint"].as_str().unwrap()).exists());
    let after = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !after.contains(v["mountpoint"].as_str().unwrap()),
        "{after}"
    );
    assert_eq!(key_versions_enabled(&env), [true, false]);
}

#[test]
fn drill_restores_the_key_on_failure() {
    let Some(env) = Env::new("drill_restores_the_key_on_failure") else {
        return;
    };
    env.init_volume();
    // A poll interval far longer than the drill waits: reads never fail in time.
    let m = env.mount_with(&["poll=60s"]);
    std::fs::write(m.p("f"), b"data").unwrap();
    let out = fails(
        &env,
        &[
            "drill",
            env.mnt.to_str().unwrap(),
            "--yes",
            "--timeout",
            "1s",
        ],
        26,
    );
    assert!(out.contains("did not fail within"), "{out}");
    assert_eq!(key_versions_enabled(&env), [true]);
    m.unmount();
}

#[test]
fn drill_restores_the_key_on_sigint() {
    let Some(env) = Env::new("drill_restores_the_key_on_sigint") else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&["poll=60s"]);
    std::fs::write(m.p("f"), b"data").unwrap();
    let child = env
        .kekfs()
        .args([
            "drill",
            env.mnt.to_str().unwrap(),
            "--yes",
            "--timeout",
            "50s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || key_versions_enabled(&env)
            == [false]),
        "the drill never disabled the key"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(26),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("interrupted"));
    assert_eq!(key_versions_enabled(&env), [true], "the key is back");
    m.unmount();
}

// ---- PKCS#11 (SoftHSM2): key attributes read back, and the drill through CKA_UNWRAP ----

/// A private SoftHSM2 token: (SOFTHSM2_CONF, KEK URI). `None` without SoftHSM2 (outside CI).
fn token(env: &Env, test: &str) -> Option<(PathBuf, String)> {
    let module = softhsm(test)?;
    let t = softhsm_setup(&env.dir.path().join("hsm"), "vtok", SO_PIN, PIN);
    let uri = format!(
        "pkcs11:token=vtok;object=vk?module-path={module}&pin-source=file:{}",
        t.pinfile.display()
    );
    Some((t.conf, uri))
}

#[test]
fn pkcs11_verify_reads_key_attributes_and_drill_toggles_unwrap() {
    let test = "pkcs11_verify_reads_key_attributes_and_drill_toggles_unwrap";
    let Some(env) = Env::new(test) else {
        return;
    };
    let Some((conf, uri)) = token(&env, test) else {
        return;
    };
    let run = |args: &[&str]| {
        let o = env
            .kekfs()
            .env("SOFTHSM2_CONF", &conf)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let ok = |args: &[&str]| {
        let (code, out, err) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
        out
    };
    ok(&["key", "create", "--kek", &uri]);
    let b = env.backing.to_str().unwrap().to_string();
    ok(&["init", &b, "--kek", &uri]);
    let v: Value = serde_json::from_str(&ok(&["verify", &b, "--json"])).unwrap();
    assert_eq!(v["key_protection"]["kind"], "token", "{v:#}");
    let obj = &v["key_protection"]["objects"][0];
    assert_eq!(obj["class"], "secret-key");
    assert_eq!(obj["sensitive"], true);
    assert_eq!(obj["extractable"], false);
    assert_eq!(obj["never_extractable"], true);
    // The token's log has the key operations.
    let tokens = env.audit_dir().join("tokens").join("vtok");
    assert!(tokens.join("audit.000000000001.log").is_file());
    let (code, out, _) = run(&[
        "audit",
        "summary",
        "--log",
        tokens.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("wrapKey") && out.contains("create"), "{out}");

    let mp = env.mnt.to_str().unwrap().to_string();
    ok(&["mount", &b, &mp, "-o", "poll=300ms"]);
    let guard = env.guard();
    std::fs::write(guard.p("f"), b"token data").unwrap();
    let d: Value = serde_json::from_str(&ok(&["drill", &mp, "--yes", "--json"])).unwrap();
    assert_eq!(d["errno_name"], "EKEYREVOKED", "{d:#}");
    assert_eq!(std::fs::read(guard.p("f")).unwrap(), b"token data");
    // CKA_UNWRAP is true again: a fresh verify unwraps.
    ok(&["verify", &mp]);
    guard.unmount();
}
