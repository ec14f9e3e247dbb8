//! `kekfs key disable|enable|set|delete|recover|purge|protect|policy|show` against the
//! `soft:` keystore, through the built binary. No mounts: a key's effect is observed through
//! `kekfs init` (which wraps) and through a provider held open by this process (as a running
//! mount holds one), which must see every change at its next operation.

mod common;
use common::*;
use serde_json::Value;
use std::path::PathBuf;

/// Exit code of a refused KEK (src/cli/exit.rs).
const KEK_REFUSED: i32 = 13;
const KEY_NOT_FOUND: i32 = 14;
const USAGE: i32 = 2;
const CHANGE_REFUSED: i32 = 21;

fn setup() -> Env {
    let env = Env::new_unchecked();
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    env
}

/// Run `kekfs ARGS`, assert it exits with `code`, return stderr.
#[track_caller]
fn fails(env: &Env, args: &[&str], code: i32) -> String {
    let err = stderr(&env.fails(args, code));
    assert!(err.starts_with("kekfs: ") || code == USAGE, "{err}");
    err
}

fn show(env: &Env, name: &str) -> Value {
    serde_json::from_str(&env.ok(&["key", "show", name, "--json"])).expect("key show --json")
}

fn states(v: &Value) -> Vec<String> {
    v["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|x| x["state"].as_str().expect("state").to_string())
        .collect()
}

/// A fresh backing directory path for `kekfs init`.
fn backing(env: &Env, n: &str) -> PathBuf {
    env.dir.path().join(format!("vol-{n}"))
}

/// `kekfs init` of a new volume under `kek`: the volume id on success, the exit code else.
fn init(env: &Env, n: &str, kek: &str) -> Result<(String, u32), (i32, String)> {
    let b = backing(env, n);
    let o = env.run(&["init", b.to_str().unwrap(), "--kek", kek]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success() {
        return Err((
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ));
    }
    // "created volume ID in PATH under URI (key version N)"
    let id = out
        .split_whitespace()
        .nth(2)
        .expect("volume id")
        .to_string();
    let version = out
        .trim_end()
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("key version");
    Ok((id, version))
}

fn init_refused(env: &Env, n: &str, kek: &str, needle: &str) {
    match init(env, n, kek) {
        Err((code, err)) => {
            assert_eq!(code, KEK_REFUSED, "{err}");
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        }
        Ok(v) => panic!("init under {kek} should be refused, made {v:?}"),
    }
}

fn open_keystore(env: &Env) -> kekfs::kek::keystore::Keystore {
    let pass = kekfs::kek::passphrase::Passphrase::new(PASS.as_bytes().to_vec()).unwrap();
    kekfs::kek::keystore::Keystore::open(&env.keystore, &pass).unwrap()
}

fn provider(env: &Env, uri: &str) -> Box<dyn kekfs::kek::KekProvider> {
    let opts = kekfs::kek::ProviderOptions {
        keystore_dir: env.keystore.clone(),
        passphrase: kekfs::kek::passphrase::PassphraseSource::File(env.passfile.clone()),
        volume_dir: None,
    };
    kekfs::kek::open_provider(&kekfs::kek::KekUri::parse(uri).unwrap(), &opts).unwrap()
}

#[test]
fn disable_then_enable_whole_key() {
    let env = setup();
    // A provider opened before the change, like a running mount's.
    let live = provider(&env, "soft:k");
    let aek = kekfs::crypto::Key32::generate();
    let wrapped = live.wrap(&aek).unwrap();

    let out = env.ok(&["key", "disable", "k"]);
    assert!(out.contains("disabled key k (all versions)"), "{out}");
    let v = show(&env, "k");
    assert_eq!(v["state"], "active");
    assert_eq!(states(&v), ["disabled"]);
    assert_eq!(v["versions"][0]["enabled"], false);
    assert_eq!(v["usable_version"], Value::Null);
    let text = env.ok(&["key", "show", "k"]);
    assert!(text.contains("disabled"), "{text}");

    init_refused(&env, "a", "soft:k", "disabled");
    init_refused(&env, "a", "soft:k", "kekfs key enable");
    assert!(live.wrap(&aek).is_err());
    assert!(live.unwrap(&wrapped).is_err());
    assert!(!backing(&env, "a").join("kekfs.volume").exists());

    // Disabling again is fine and says so.
    assert!(env.ok(&["key", "disable", "k"]).contains("already"));

    env.ok(&["key", "enable", "k"]);
    assert_eq!(states(&show(&env, "k")), ["enabled"]);
    assert_eq!(
        live.unwrap(&wrapped).unwrap().expose(),
        aek.expose(),
        "the held provider resumes without reopening"
    );
    let (id, version) = init(&env, "a", "soft:k").unwrap();
    assert_eq!(version, 1);

    // `init` recorded the volume with its key.
    let v = show(&env, "k");
    let vols = v["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1, "{v}");
    assert_eq!(vols[0]["id"], id.as_str());
    let canon = std::fs::canonicalize(backing(&env, "a")).unwrap();
    assert_eq!(vols[0]["path"], canon.to_str().unwrap());
    assert!(vols[0]["registered"].as_str().unwrap().ends_with('Z'));
    assert!(env.ok(&["key", "show", "k"]).contains(&id));

    // Unknown keys.
    let e = fails(&env, &["key", "disable", "nope"], KEY_NOT_FOUND);
    assert!(e.contains("existing keys: k"), "{e}");
    fails(&env, &["key", "show", "nope"], KEY_NOT_FOUND);
    fails(&env, &["key", "enable", "../x"], USAGE);
}

#[test]
fn name_at_version_targets_one_version() {
    let env = setup();
    {
        let mut ks = open_keystore(&env);
        assert_eq!(ks.rotate_key("k").unwrap(), 2);
        assert_eq!(ks.rotate_key("k").unwrap(), 3);
    }
    env.ok(&["key", "disable", "k@2"]);
    let v = show(&env, "k");
    assert_eq!(states(&v), ["enabled", "disabled", "enabled"]);
    assert_eq!(v["usable_version"], 3);

    init_refused(&env, "pinned2", "soft:k?version=2", "disabled");
    init_refused(&env, "pinned2", "soft:k?version=2", "kekfs key enable k@2");
    assert_eq!(init(&env, "latest", "soft:k").unwrap().1, 3);
    assert_eq!(init(&env, "pinned1", "soft:k?version=1").unwrap().1, 1);

    // With the newest disabled too, "latest" falls back to version 1.
    env.ok(&["key", "disable", "k@3"]);
    assert_eq!(
        states(&show(&env, "k")),
        ["enabled", "disabled", "disabled"]
    );
    assert_eq!(init(&env, "fallback", "soft:k").unwrap().1, 1);

    env.ok(&["key", "enable", "k@2"]);
    assert_eq!(states(&show(&env, "k")), ["enabled", "enabled", "disabled"]);
    assert_eq!(init(&env, "v2", "soft:k").unwrap().1, 2);

    // Whole-key enable re-enables every version.
    env.ok(&["key", "enable", "k"]);
    assert_eq!(states(&show(&env, "k")), ["enabled", "enabled", "enabled"]);

    let e = fails(&env, &["key", "disable", "k@4"], KEY_NOT_FOUND);
    assert!(e.contains("no version 4"), "{e}");
    for bad in ["k@0", "k@x", "k@", "@1", "k@-1"] {
        fails(&env, &["key", "disable", bad], USAGE);
    }
}

#[test]
fn delete_recover_purge() {
    let env = setup();
    let out = env.ok(&["key", "delete", "k"]);
    assert!(out.contains("kekfs key recover k"), "{out}");
    let v = show(&env, "k");
    assert_eq!(v["state"], "deleted");
    assert_eq!(v["recoverable"], true);
    assert_eq!(v["purgeable"], false);
    assert_eq!(v["retention_secs"], 7 * 86_400);
    assert!(v["deleted_at"].as_str().unwrap().ends_with('Z'));
    assert!(v["recoverable_until"].as_str().unwrap().ends_with('Z'));
    init_refused(&env, "a", "soft:k", "deleted");
    init_refused(&env, "a", "soft:k", "kekfs key recover k");

    let e = fails(&env, &["key", "delete", "k"], CHANGE_REFUSED);
    assert!(e.contains("already deleted"), "{e}");
    // Purge before the end of the retention period is refused, pointing at recover.
    let e = fails(&env, &["key", "purge", "k"], CHANGE_REFUSED);
    assert!(e.contains("retention period"), "{e}");
    assert!(e.contains("ends at"), "{e}");
    assert!(e.contains("kekfs key recover"), "{e}");
    // Other changes wait for recovery.
    let e = fails(&env, &["key", "disable", "k"], CHANGE_REFUSED);
    assert!(e.contains("recover it first"), "{e}");

    env.ok(&["key", "recover", "k"]);
    assert_eq!(show(&env, "k")["state"], "active");
    init(&env, "a", "soft:k").unwrap();
    let e = fails(&env, &["key", "recover", "k"], CHANGE_REFUSED);
    assert!(e.contains("not deleted"), "{e}");
    let e = fails(&env, &["key", "purge", "k"], CHANGE_REFUSED);
    assert!(e.contains("delete it first"), "{e}");

    // With a zero retention the deletion is final at once: no recovery, purge allowed.
    env.ok(&["key", "set", "k", "--retention", "0"]);
    assert_eq!(show(&env, "k")["retention_secs"], 0);
    env.ok(&["key", "delete", "k"]);
    let v = show(&env, "k");
    assert_eq!(
        (v["recoverable"].clone(), v["purgeable"].clone()),
        (false.into(), true.into())
    );
    let e = fails(&env, &["key", "recover", "k"], CHANGE_REFUSED);
    assert!(e.contains("can no longer be recovered"), "{e}");
    let o = env.run(&["key", "purge", "k"]);
    assert!(o.status.success());
    let warn = String::from_utf8_lossy(&o.stderr);
    assert!(warn.contains("can no longer be unlocked"), "{warn}");
    fails(&env, &["key", "show", "k"], KEY_NOT_FOUND);
    fails(&env, &["key", "purge", "k"], KEY_NOT_FOUND);
    // The volume made under it is lost; the name is free again.
    init_refused_not_found(&env);
    env.ok(&["key", "create", "k"]);
}

fn init_refused_not_found(env: &Env) {
    let (code, err) = init(env, "after-purge", "soft:k").unwrap_err();
    assert_eq!(code, KEY_NOT_FOUND, "{err}");
}

#[test]
fn purge_protection() {
    let env = setup();
    let out = env.ok(&["key", "protect", "k"]);
    assert!(out.contains("cannot be undone"), "{out}");
    assert_eq!(show(&env, "k")["purge_protection"], true);
    let e = fails(
        &env,
        &["key", "set", "k", "--retention", "0"],
        CHANGE_REFUSED,
    );
    assert!(e.contains("only be lengthened"), "{e}");
    env.ok(&["key", "set", "k", "--retention", "30d"]);
    assert_eq!(show(&env, "k")["retention_secs"], 30 * 86_400);

    env.ok(&["key", "delete", "k"]);
    let e = fails(&env, &["key", "purge", "k"], CHANGE_REFUSED);
    assert!(e.contains("purge protection is on"), "{e}");
    assert_eq!(show(&env, "k")["purgeable"], false);
    env.ok(&["key", "recover", "k"]);
    init(&env, "a", "soft:k").unwrap();
    assert!(env.ok(&["key", "protect", "k"]).contains("already"));
}

#[test]
fn policy_deny_allow_and_clear() {
    let env = setup();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let me_s = me.to_string();
    let other = me.wrapping_add(1).to_string();

    let out = env.ok(&["key", "policy", "k", "--deny-uid", &me_s]);
    assert!(out.contains(&format!("uids {me} denied")), "{out}");
    let v = show(&env, "k");
    assert_eq!(v["policy"]["deny_uids"], serde_json::json!([me]));
    assert_eq!(v["policy"]["ops"], serde_json::json!(["wrap", "unwrap"]));
    init_refused(&env, "a", "soft:k", "access denied");
    init_refused(&env, "a", "soft:k", "kekfs key policy k");

    env.ok(&["key", "policy", "k", "--clear"]);
    assert_eq!(show(&env, "k")["policy"], Value::Null);
    init(&env, "a", "soft:k").unwrap();

    // An allow-list without us refuses; with us it works.
    env.ok(&["key", "policy", "k", "--allow-uid", &other]);
    init_refused(&env, "b", "soft:k", "access denied");
    env.ok(&[
        "key",
        "policy",
        "k",
        "--allow-uid",
        &other,
        "--allow-uid",
        &me_s,
    ]);
    init(&env, "b", "soft:k").unwrap();

    // A policy limited to unwrap does not stop wrapping (init), and vice versa.
    env.ok(&["key", "policy", "k", "--deny-uid", &me_s, "--ops", "unwrap"]);
    init(&env, "c", "soft:k").unwrap();
    env.ok(&[
        "key",
        "policy",
        "k",
        "--deny-uid",
        &me_s,
        "--ops",
        "wrap,unwrap",
    ]);
    init_refused(&env, "d", "soft:k", "access denied");

    fails(&env, &["key", "policy", "k"], USAGE);
    fails(
        &env,
        &["key", "policy", "k", "--clear", "--deny-uid", "1"],
        USAGE,
    );
    fails(&env, &["key", "policy", "k", "--deny-uid", "x"], USAGE);
    fails(
        &env,
        &["key", "policy", "k", "--deny-uid", "1", "--ops", "sign"],
        USAGE,
    );
}

#[test]
fn validity_dates() {
    let env = setup();
    env.ok(&["key", "set", "k", "--not-before", "+1h"]);
    let v = show(&env, "k");
    assert_eq!(states(&v), ["not-yet-valid"]);
    assert!(
        v["versions"][0]["not_before"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    init_refused(&env, "a", "soft:k", "not yet valid");
    init_refused(&env, "a", "soft:k", "kekfs key set k");

    env.ok(&["key", "set", "k", "--not-before", "none"]);
    assert_eq!(show(&env, "k")["versions"][0]["not_before"], Value::Null);
    init(&env, "a", "soft:k").unwrap();

    env.ok(&["key", "set", "k@1", "--expires", "2020-01-01T00:00:00Z"]);
    let v = show(&env, "k");
    assert_eq!(states(&v), ["expired"]);
    assert_eq!(v["versions"][0]["expires"], "2020-01-01T00:00:00Z");
    init_refused(&env, "b", "soft:k", "expired");

    env.ok(&[
        "key",
        "set",
        "k",
        "--expires",
        "+30d",
        "--not-before",
        "-1h",
    ]);
    assert_eq!(states(&show(&env, "k")), ["enabled"]);
    init(&env, "b", "soft:k").unwrap();
    env.ok(&["key", "set", "k", "--expires", "now"]);
    init_refused(&env, "c", "soft:k", "expired");
    env.ok(&["key", "set", "k", "--expires", "2999-12-31T23:00:00+01:00"]);
    assert_eq!(
        show(&env, "k")["versions"][0]["expires"],
        "2999-12-31T22:00:00Z"
    );
    init(&env, "c", "soft:k").unwrap();

    // Impossible or malformed dates.
    let e = fails(
        &env,
        &[
            "key",
            "set",
            "k",
            "--not-before",
            "2021-01-01T00:00:00Z",
            "--expires",
            "2020-01-01T00:00:00Z",
        ],
        CHANGE_REFUSED,
    );
    assert!(e.contains("could never be used"), "{e}");
    let e = fails(&env, &["key", "set", "k", "--expires", "soon"], USAGE);
    assert!(e.contains("RFC 3339"), "{e}");
    fails(&env, &["key", "set", "k", "--expires", "2027-02-30"], USAGE);
    fails(&env, &["key", "set", "k"], USAGE);
    fails(&env, &["key", "set", "k@1", "--retention", "1d"], USAGE);
    fails(&env, &["key", "set", "k", "--retention", "7"], USAGE);
    fails(
        &env,
        &["key", "set", "k@9", "--expires", "none"],
        KEY_NOT_FOUND,
    );
    // Nothing above changed the key.
    assert_eq!(
        show(&env, "k")["versions"][0]["expires"],
        "2999-12-31T22:00:00Z"
    );
}

#[test]
fn disable_enable_with_kek_uri_like_name_at_version() {
    let env = setup();
    env.ok(&["key", "rotate", "k"]);
    // --kek soft:NAME is NAME; ?version=N or --version N is NAME@N.
    let out = env.ok(&["key", "disable", "--kek", "soft:k?version=1"]);
    assert!(out.contains("disabled key k version 1"), "{out}");
    assert_eq!(states(&show(&env, "k")), ["disabled", "enabled"]);
    env.ok(&["key", "disable", "--kek", "soft:k", "--version", "2"]);
    assert_eq!(states(&show(&env, "k")), ["disabled", "disabled"]);
    init_refused(&env, "a", "soft:k", "disabled");
    let out = env.ok(&["key", "enable", "--kek", "soft:k"]);
    assert!(out.contains("enabled key k (all versions)"), "{out}");
    assert_eq!(states(&show(&env, "k")), ["enabled", "enabled"]);
    assert!(init(&env, "b", "soft:k").is_ok());
    // Contradictions and misuse are usage errors; unknown keys are not found.
    fails(
        &env,
        &[
            "key",
            "disable",
            "--kek",
            "soft:k?version=1",
            "--version",
            "2",
        ],
        USAGE,
    );
    fails(&env, &["key", "disable", "k", "--kek", "soft:k"], USAGE);
    fails(&env, &["key", "disable", "k", "--version", "1"], USAGE);
    fails(
        &env,
        &["key", "disable", "--kek", "soft:nope"],
        KEY_NOT_FOUND,
    );
    assert_eq!(states(&show(&env, "k")), ["enabled", "enabled"]);
}
