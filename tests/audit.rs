//! The audit log: the lines a volume's life writes (fields and codes), the hash chain
//! against each kind of tampering, rotation, `summary` and `last-use` numbers, `follow` with
//! a checkpoint across restarts and rotation with caller alerts, and fail-closed.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn keystore_log(env: &Env) -> PathBuf {
    env.keystore.join("audit")
}

fn volume_id(env: &Env, path: &Path) -> String {
    env.status_json(path)["volume_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn volume_log(env: &Env) -> PathBuf {
    env.audit_dir()
        .join("volumes")
        .join(volume_id(env, &env.backing))
}

/// An RFC 3339 UTC time with milliseconds.
fn is_time(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && s.ends_with('Z')
        && s[..4].parse::<u32>().is_ok()
}

/// The fields every line carries.
fn check_schema(l: &Value) {
    for k in [
        "time",
        "TaskName",
        "ActivityId",
        "eventId",
        "category",
        "resourceId",
        "keyVault",
        "key",
        "version",
        "operation",
        "code",
        "message",
        "prev",
        "mac",
    ] {
        assert!(l[k].is_string(), "field {k} missing in {l}");
    }
    assert!(is_time(l["time"].as_str().unwrap()), "{l}");
    assert!(l["seq"].as_u64().unwrap() >= 1);
    assert_eq!(l["ActivityId"].as_str().unwrap().len(), 36);
    assert!(["info", "warning", "error"].contains(&l["category"].as_str().unwrap()));
    assert!(l["code"].as_str().unwrap().parse::<u16>().is_ok());
    assert!(l["durationMs"].as_f64().unwrap() >= 0.0);
    let c = &l["caller"];
    assert_eq!(c["uid"].as_u64(), Some(0));
    assert!(c["pid"].as_u64().unwrap() > 0);
    assert_eq!(c["program"].as_str(), Some("kekfs"));
    assert_eq!(l["mac"].as_str().unwrap().len(), 64);
}

#[test]
fn volume_life_writes_lines_with_the_right_fields() {
    let Some(env) = Env::new("volume_life_writes_lines_with_the_right_fields") else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&["poll=200ms", "audit_heartbeat=1h"]);
    std::fs::write(m.p("f"), b"payload").unwrap();
    // Idle polls write nothing (no change, heartbeat far away).
    std::thread::sleep(Duration::from_millis(1000));
    env.ok(&["key", "disable", "k"]);
    assert!(wait_for(BOUND, || read_errno(&m.p("f")) == Some(libc::EKEYREVOKED)));
    env.ok(&["key", "enable", "k"]);
    assert!(wait_for(BOUND, || read_errno(&m.p("f")).is_none()));
    let vlog = volume_log(&env);
    m.unmount();

    let vid = volume_id(&env, &env.backing);
    let vol = log_lines(&vlog);
    assert_eq!(
        ops(&vol),
        [
            "init 200",
            "unwrapKey 200",
            "mount 200",
            "poll 403",
            "revoked 403",
            "poll 200",
            "resumed 200",
            "unmount 200"
        ],
        "{vol:#?}"
    );
    let backing = std::fs::canonicalize(&env.backing).unwrap();
    for (i, l) in vol.iter().enumerate() {
        check_schema(l);
        assert_eq!(l["seq"].as_u64(), Some(i as u64 + 1));
        let rid = l["resourceId"].as_str().unwrap();
        assert!(
            rid.contains(&vid) && rid.contains(backing.to_str().unwrap()),
            "{rid}"
        );
        assert_eq!(
            l["keyVault"].as_str().unwrap(),
            format!("soft:{}", env.keystore.display())
        );
        assert_eq!(l["key"].as_str(), Some("k"));
    }
    let by_op = |op: &str| vol.iter().find(|l| l["operation"] == op).unwrap();
    assert_eq!(by_op("unwrapKey")["version"], "1");
    assert_eq!(by_op("unwrapKey")["TaskName"], "KekfsKeyOperation");
    assert_eq!(by_op("mount")["TaskName"], "KekfsVolumeState");
    assert_eq!(by_op("mount")["caller"]["command"], "mount");
    // The mount's unwrap and its mount line are one activity; each poll is its own.
    assert_eq!(
        by_op("unwrapKey")["ActivityId"],
        by_op("mount")["ActivityId"]
    );
    let poll = &vol[3];
    assert_eq!(poll["category"], "error");
    assert!(poll["message"].as_str().unwrap().contains("disabled"));
    assert_eq!(vol[3]["ActivityId"], vol[4]["ActivityId"]);
    assert_ne!(vol[3]["ActivityId"], vol[5]["ActivityId"]);
    assert_eq!(vol[4]["category"], "error");
    // The first ok poll after the refusal stands for the idle polls before it too.
    assert!(vol[5]["count"].as_u64().unwrap_or(1) >= 1);

    // The keystore's log has the provider side, with the lifecycle commands.
    let ks = log_lines(&keystore_log(&env));
    for l in &ks {
        check_schema(l);
    }
    // A command's line and a daemon's poll race; compare in order of content.
    let mut got = ops(&ks);
    got.sort();
    let mut want: Vec<String> = [
        "create 200",
        "wrapKey 200",
        "wrapKey 200",
        "init 200",
        "unwrapKey 200",
        "mount 200",
        "disable 200",
        "poll 403",
        "enable 200",
        "poll 200",
        "unmount 200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    assert_eq!(got, want);
    let disable = ks.iter().find(|l| l["operation"] == "disable").unwrap();
    assert_eq!(disable["TaskName"], "KekfsKeyLifecycle");
    assert_eq!(disable["caller"]["command"], "key disable");
    // The copies of one event share its eventId.
    let refused = ks
        .iter()
        .find(|l| l["operation"] == "poll" && l["code"] == "403");
    assert_eq!(refused.unwrap()["eventId"], vol[3]["eventId"]);
    let out = env.ok(&["audit", "check"]);
    assert_eq!(out.matches("chain intact").count(), 2, "{out}");
}

#[test]
fn heartbeat_summarises_idle_polls() {
    let Some(env) = Env::new("heartbeat_summarises_idle_polls") else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&["poll=100ms", "audit_heartbeat=1s"]);
    std::thread::sleep(Duration::from_millis(2600));
    let vlog = volume_log(&env);
    m.unmount();
    let polls: Vec<Value> = log_lines(&vlog)
        .into_iter()
        .filter(|l| l["operation"] == "poll")
        .collect();
    assert!(
        (1..=4).contains(&polls.len()),
        "one line per heartbeat, not per poll: {polls:#?}"
    );
    let counted: u64 = polls.iter().map(|l| l["count"].as_u64().unwrap_or(1)).sum();
    assert!(counted >= 8, "heartbeats count the polls: {counted}");
}

/// A keystore log with a dozen lines, made without mounting.
fn busy_keystore(env: &Env) {
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    env.ok(&["init", env.backing.to_str().unwrap(), "--kek", "soft:k"]);
    for _ in 0..3 {
        env.ok(&["key", "rotate", "k"]);
    }
    env.ok(&["key", "disable", "k@1"]);
    env.ok(&["key", "enable", "k@1"]);
    env.ok(&["key", "set", "k", "--expires", "+30d"]);
    env.ok(&["key", "policy", "k", "--allow-uid", "0"]);
    env.ok(&["rewrap", env.backing.to_str().unwrap()]);
}

fn copy_log(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

fn the_file(dir: &Path) -> PathBuf {
    dir.join("audit.000000000001.log")
}

fn rewrite(dir: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let p = the_file(dir);
    let mut lines: Vec<String> = std::fs::read_to_string(&p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    f(&mut lines);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
}

#[test]
fn check_detects_each_kind_of_tampering_and_says_where() {
    let env = Env::new_unchecked();
    busy_keystore(&env);
    let log = keystore_log(&env);
    let n = log_lines(&log).len();
    assert!(n >= 14, "{n}");
    let out = env.ok(&["audit", "check", log.to_str().unwrap()]);
    assert!(out.contains("chain intact"), "{out}");

    type Tamper = Box<dyn FnOnce(&mut Vec<String>)>;
    // (name, how, where the report must point, what it must say)
    let cases: Vec<(&str, Tamper, &str, &str)> = vec![
        (
            "edited",
            Box::new(|l: &mut Vec<String>| {
                l[4] = l[4].replace("\"code\":\"200\"", "\"code\":\"403\"")
            }),
            ":5 ",
            "edited",
        ),
        (
            "deleted",
            Box::new(|l: &mut Vec<String>| {
                l.remove(6);
            }),
            ":7 (seq 8)",
            "missing",
        ),
        (
            "reordered",
            Box::new(|l: &mut Vec<String>| l.swap(8, 9)),
            ":9 (seq 10)",
            "reordered",
        ),
        (
            "truncated",
            Box::new(|l: &mut Vec<String>| {
                let cut = l[10].len() / 2;
                l[10].truncate(cut);
            }),
            ":11",
            "torn, cut",
        ),
    ];
    for (name, tamper, place, what) in cases {
        let dir = copy_log(&log, &env.dir.path().join(format!("tampered-{name}")));
        rewrite(&dir, tamper);
        let o = env.fails(&["audit", "check", dir.to_str().unwrap()], 23);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("TAMPERED"), "{name}: {out}");
        assert!(out.contains(place), "{name}: expected {place:?} in {out}");
        assert!(out.contains(what), "{name}: expected {what:?} in {out}");
        // JSON names the same line.
        let o = env.fails(&["audit", "check", dir.to_str().unwrap(), "--json"], 23);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v[0]["ok"], false, "{name}");
        assert!(!v[0]["findings"].as_array().unwrap().is_empty());
    }
    // A cut head of a file (its first lines removed) is caught by the file name.
    let dir = copy_log(&log, &env.dir.path().join("tampered-head"));
    rewrite(&dir, |l| {
        l.drain(..2);
    });
    let o = env.fails(&["audit", "check", dir.to_str().unwrap()], 23);
    assert!(String::from_utf8_lossy(&o.stdout).contains("first lines were removed"));
    // Garbage never makes it panic.
    let dir = copy_log(&log, &env.dir.path().join("garbage"));
    std::fs::write(the_file(&dir), b"\x00\xff{\"seq\":\n}}}\"mac\"\n").unwrap();
    let o = env.fails(&["audit", "check", dir.to_str().unwrap()], 23);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    // Another key does not verify it.
    std::fs::write(env.dir.path().join("other.key"), [7u8; 32]).unwrap();
    let other = env.dir.path().join("other.key");
    env.fails(
        &[
            "audit",
            "check",
            log.to_str().unwrap(),
            "--key",
            other.to_str().unwrap(),
        ],
        23,
    );
}

/// Run `kekfs ARGS` (which must succeed) with audit files rotated at `max_bytes`.
fn ok_rotating_at(env: &Env, max_bytes: u64, args: &[&str]) {
    let o = env
        .kekfs()
        .env("KEKFS_AUDIT_MAX_BYTES", max_bytes.to_string())
        .args(args)
        .output()
        .unwrap();
    check_ok(args, o);
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let env = Env::new_unchecked();
    let run = |args: &[&str]| ok_rotating_at(&env, 2000, args);
    run(&["keystore", "init"]);
    run(&["key", "create", "k"]);
    for _ in 0..12 {
        run(&["key", "rotate", "k"]);
    }
    let log = keystore_log(&env);
    let mut files: Vec<String> = std::fs::read_dir(&log)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 13);
    for (i, w) in lines.windows(2).enumerate() {
        assert_eq!(w[1]["prev"], w[0]["mac"], "line {i}");
        assert_eq!(
            w[1]["seq"].as_u64().unwrap(),
            w[0]["seq"].as_u64().unwrap() + 1
        );
    }
    // Each file is named after its first line.
    for f in &files {
        let first = std::fs::read_to_string(log.join(f)).unwrap();
        let first: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        assert_eq!(
            f,
            &format!("audit.{:012}.log", first["seq"].as_u64().unwrap())
        );
    }
    let out = env.ok(&["audit", "check", log.to_str().unwrap()]);
    assert!(out.contains("13 line(s), seq 1..13, chain intact"), "{out}");
    // Removing a middle file is a gap; removing the oldest is only a note.
    let dir = copy_log(&log, &env.dir.path().join("gap"));
    std::fs::remove_file(dir.join(&files[1])).unwrap();
    let o = env.fails(&["audit", "check", dir.to_str().unwrap()], 23);
    assert!(String::from_utf8_lossy(&o.stdout).contains("missing"));
    let dir = copy_log(&log, &env.dir.path().join("archived"));
    std::fs::remove_file(dir.join(&files[0])).unwrap();
    let out = env.ok(&["audit", "check", dir.to_str().unwrap()]);
    assert!(out.contains("older lines are not present"), "{out}");
}

fn json_of(env: &Env, args: &[&str]) -> Value {
    serde_json::from_str(&env.ok(args)).unwrap()
}

#[test]
fn summary_and_last_use_count_what_happened() {
    let env = Env::new_unchecked();
    let b = env.backing.to_str().unwrap().to_string();
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    env.ok(&["init", &b, "--kek", "soft:k"]); // wrap v1 ×2
    env.ok(&["key", "rotate", "k"]);
    env.ok(&["rewrap", &b, "--to", "2"]); // unwrap v1, wrap v2, unwrap v2
    env.ok(&["key", "disable", "k@1"]);
    env.fails(&["rewrap", &b, "--to", "1"], 13); // unwrap v2, wrap v1 refused (403)
    let rows = json_of(
        &env,
        &[
            "audit",
            "summary",
            "--by",
            "version,operation,result",
            "--json",
        ],
    );
    let count = |v: &str, op: &str, code: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["version"] == v && r["operation"] == op && r["result"] == code)
            .map_or(0, |r| r["count"].as_u64().unwrap())
    };
    assert_eq!(count("1", "wrapKey", "200"), 2, "{rows:#}");
    assert_eq!(count("1", "unwrapKey", "200"), 1, "{rows:#}");
    assert_eq!(count("2", "wrapKey", "200"), 1, "{rows:#}");
    assert_eq!(count("2", "unwrapKey", "200"), 2, "{rows:#}");
    assert_eq!(count("1", "wrapKey", "403"), 1, "{rows:#}");
    assert_eq!(count("1", "disable", "200"), 1, "{rows:#}");
    assert_eq!(count("", "rewrap", "200"), 0);
    // Grouping by caller only.
    let rows = json_of(&env, &["audit", "summary", "--by", "caller", "--json"]);
    let init = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["caller"] == "0:kekfs init")
        .unwrap();
    assert_eq!(init["count"], 3, "two wraps and the init line");
    assert!(init.get("operation").is_none());
    // A window before everything is empty; the table has a header.
    let rows = json_of(&env, &["audit", "summary", "--until", "-1h", "--json"]);
    assert_eq!(rows.as_array().unwrap().len(), 0);
    let rows = json_of(&env, &["audit", "summary", "--since", "-1h", "--json"]);
    assert!(!rows.as_array().unwrap().is_empty());
    let table = env.ok(&["audit", "summary"]);
    assert!(table.starts_with("KEYSTORE"), "{table}");
    env.fails(&["audit", "summary", "--by", "colour"], 2);

    let lu = json_of(&env, &["audit", "last-use", "--key", "k", "--json"]);
    let row = |v: &str, caller: &str| {
        lu.as_array()
            .unwrap()
            .iter()
            .find(|r| r["version"] == v && r["caller"] == caller)
            .unwrap_or_else(|| panic!("no row {v} {caller} in {lu:#}"))
            .clone()
    };
    let v1 = row("1", "0:kekfs rewrap");
    assert_eq!(v1["last_success"]["operation"], "unwrapKey");
    assert_eq!(v1["last_failure"]["operation"], "wrapKey");
    assert_eq!(v1["last_failure"]["code"], "403");
    let v2 = row("2", "0:kekfs rewrap");
    assert_eq!(v2["last_success"]["operation"], "unwrapKey");
    assert!(v2["last_failure"].is_null());
    let init = row("1", "0:kekfs init");
    assert_eq!(init["last_success"]["operation"], "wrapKey");
    // Lifecycle lines are not uses.
    assert!(
        lu.as_array()
            .unwrap()
            .iter()
            .all(|r| r["caller"] != "0:kekfs key disable")
    );
    let text = env.ok(&["audit", "last-use"]);
    assert!(text.contains("version 1, caller 0:kekfs rewrap"), "{text}");
    assert!(text.contains("last failure: never"), "{text}");
    assert!(
        json_of(&env, &["audit", "last-use", "--key", "nope", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// `audit follow --once` output: (seqs of log lines, alert objects).
fn follow_once(env: &Env, cp: &Path, extra: &[&str]) -> (Vec<u64>, Vec<Value>, Option<i32>) {
    let log = keystore_log(env);
    let mut args = vec![
        "audit",
        "follow",
        "--once",
        "--log",
        log.to_str().unwrap(),
        "--checkpoint",
        cp.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = env.run(&args);
    parse_follow(&o.stdout, o.status.code())
}

fn parse_follow(out: &[u8], code: Option<i32>) -> (Vec<u64>, Vec<Value>, Option<i32>) {
    let mut seqs = Vec::new();
    let mut alerts = Vec::new();
    for l in String::from_utf8_lossy(out).lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        if v.get("kekfsAlert").is_some() {
            alerts.push(v);
        } else {
            seqs.push(v["seq"].as_u64().unwrap());
        }
    }
    (seqs, alerts, code)
}

#[test]
fn follow_resumes_without_duplicates_or_gaps_and_alerts_on_strangers() {
    let env = Env::new_unchecked();
    let small = |args: &[&str]| ok_rotating_at(&env, 1500, args);
    small(&["keystore", "init"]);
    small(&["key", "create", "k"]);
    small(&["key", "rotate", "k"]);
    let cp = env.dir.path().join("follow.checkpoint");
    let mut all = Vec::new();

    let (s, a, code) = follow_once(&env, &cp, &["--allow-caller", "0"]);
    assert_eq!((s.clone(), a.len(), code), (vec![1, 2], 0, Some(0)));
    all.extend(s);
    // Nothing new: nothing printed.
    let (s, _, _) = follow_once(&env, &cp, &["--allow-caller", "0"]);
    assert!(s.is_empty());
    // New lines across several new files.
    for _ in 0..6 {
        small(&["key", "rotate", "k"]);
    }
    let (s, a, _) = follow_once(&env, &cp, &["--allow-caller", "0"]);
    assert_eq!(s, (3..=8).collect::<Vec<_>>());
    assert!(a.is_empty(), "{a:?}");
    all.extend(s);

    // A long-running follower, stopped with SIGTERM while lines keep coming.
    let log = keystore_log(&env);
    let child = env
        .kekfs()
        .args(["audit", "follow", "--interval", "100ms", "--log"])
        .arg(&log)
        .arg("--checkpoint")
        .arg(&cp)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..4 {
        small(&["key", "rotate", "k"]);
    }
    std::thread::sleep(Duration::from_millis(600));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "a stopped follower exits cleanly");
    let (s, _, _) = parse_follow(&o.stdout, None);
    all.extend(s);
    small(&["key", "rotate", "k"]);
    let (s, _, _) = follow_once(&env, &cp, &[]);
    all.extend(s);
    let n = log_lines(&log).len() as u64;
    assert_eq!(all, (1..=n).collect::<Vec<_>>(), "no duplicates, no gaps");

    // A caller outside the allow-list: a lifecycle command run as uid 65534.
    Command::new("chmod")
        .arg("755")
        .arg(env.dir.path())
        .status()
        .unwrap();
    Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&env.keystore)
        .arg(&env.passfile)
        .status()
        .unwrap();
    let o = env
        .kekfs()
        .args(["key", "rotate", "k"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (s, a, code) = follow_once(&env, &cp, &["--allow-caller", "0", "--fail-on-alert"]);
    assert_eq!(s, vec![n + 1]);
    assert_eq!(code, Some(24), "--fail-on-alert exits 24");
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0]["kekfsAlert"], "unexpected-caller");
    assert_eq!(a[0]["caller"]["uid"], 65534);
    assert_eq!(a[0]["seq"], n + 1);
    // The checkpoint moved past it: no second alert.
    let (s, a, code) = follow_once(&env, &cp, &["--allow-caller", "0", "--fail-on-alert"]);
    assert!(s.is_empty() && a.is_empty() && code == Some(0));
    // Allow-lists by command, and by uid and command together.
    let fresh = |name: &str| env.dir.path().join(name);
    let (s, a, _) = follow_once(
        &env,
        &fresh("by-command"),
        &[
            "--allow-caller",
            "key rotate",
            "--allow-caller",
            "key create",
        ],
    );
    assert_eq!(s.len() as u64, n + 1);
    assert!(a.is_empty(), "{a:?}");
    let (_, a, _) = follow_once(
        &env,
        &fresh("by-uid-and-command"),
        &[
            "--allow-caller",
            "0:key rotate",
            "--allow-caller",
            "0:key create",
        ],
    );
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0]["caller"]["uid"], 65534);
}

#[test]
fn follow_notices_history_rewritten_behind_its_checkpoint() {
    let env = Env::new_unchecked();
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    for _ in 0..3 {
        env.ok(&["key", "rotate", "k"]);
    }
    let cp = env.dir.path().join("cp");
    let (s, _, _) = follow_once(&env, &cp, &[]);
    assert_eq!(s.len(), 4);
    // Cut the last two lines off (undetectable by `check` alone).
    rewrite(&keystore_log(&env), |l| l.truncate(2));
    env.ok(&["audit", "check", keystore_log(&env).to_str().unwrap()]);
    let (_, a, _) = follow_once(&env, &cp, &[]);
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0]["kekfsAlert"], "integrity");
    assert!(a[0]["message"].as_str().unwrap().contains("cut off"));
}

#[test]
fn fail_closed_refuses_key_operations_when_the_log_is_unwritable() {
    let env = Env::new_unchecked();
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    // The keystore's log directory cannot be created: a file is in its place.
    std::fs::remove_dir_all(keystore_log(&env)).unwrap();
    std::fs::write(keystore_log(&env), b"not a directory").unwrap();
    let o = env
        .kekfs()
        .env("KEKFS_AUDIT", "fail-closed")
        .args(["key", "rotate", "k"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(22),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("audit") && err.contains("fail-closed"),
        "{err}"
    );
    let show: Value = serde_json::from_str(&env.ok(&["key", "show", "k", "--json"])).unwrap();
    assert_eq!(
        show["versions"].as_array().unwrap().len(),
        1,
        "no rotation happened"
    );
    let o = env
        .kekfs()
        .env("KEKFS_AUDIT", "fail-closed")
        .args(["init", env.backing.to_str().unwrap(), "--kek", "soft:k"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(22),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Best effort (the default): it works, with a warning.
    let o = env.run(&["key", "rotate", "k"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning"));
}

#[test]
fn fail_closed_mount_refuses_with_an_unwritable_volume_log() {
    let Some(env) = Env::new("fail_closed_mount_refuses_with_an_unwritable_volume_log") else {
        return;
    };
    env.init_volume();
    let vlog = volume_log(&env);
    std::fs::remove_dir_all(&vlog).unwrap();
    std::fs::write(&vlog, b"in the way").unwrap();
    let b = env.backing.to_str().unwrap();
    let mp = env.mnt.to_str().unwrap();
    let o = env.run(&["mount", b, mp, "-o", "audit=fail-closed"]);
    assert_eq!(
        o.status.code(),
        Some(22),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("audit log"));
    assert!(!is_mounted(&env.mnt));
    env.fails(&["mount", b, mp, "-o", "audit=sometimes"], 2);
    // best-effort mounts, and the keystore log still has its lines.
    let m = env.mount();
    m.unmount();
    assert!(
        ops(&log_lines(&keystore_log(&env)))
            .iter()
            .any(|o| o == "mount 200")
    );
}

#[test]
fn grace_unavailable_resumed_and_online_rewrap_are_logged() {
    let Some(env) = Env::new("grace_unavailable_resumed_and_online_rewrap_are_logged") else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&["poll=200ms", "grace=1s"]);
    std::fs::write(m.p("f"), b"payload").unwrap();
    // A keystore that no longer parses: a transient failure (grace), then unavailable.
    let ks = env.keystore.join("keystore.json");
    let good = std::fs::read(&ks).unwrap();
    std::fs::write(&ks, b"{ not json").unwrap();
    assert!(wait_for(BOUND, || read_errno(&m.p("f")) == Some(libc::EHOSTDOWN)));
    std::fs::write(&ks, good).unwrap();
    assert!(wait_for(BOUND, || read_errno(&m.p("f")).is_none()));
    env.ok(&["key", "rotate", "k"]);
    let vlog = volume_log(&env);
    assert!(wait_for(BOUND, || ops(&log_lines(&vlog))
        .contains(&"rewrap 200".to_string())));
    m.unmount();
    let vol = log_lines(&vlog);
    let o = ops(&vol);
    let pos = |s: &str| {
        o.iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("{s} missing in {o:?}"))
    };
    assert!(pos("grace 503") < pos("unavailable 503"), "{o:?}");
    assert!(pos("unavailable 503") < pos("resumed 200"), "{o:?}");
    assert!(pos("resumed 200") < pos("rewrap 200"), "{o:?}");
    let grace = &vol[pos("grace 503")];
    assert_eq!(grace["category"], "warning");
    assert_eq!(vol[pos("unavailable 503")]["category"], "error");
    assert_eq!(vol[pos("rewrap 200")]["version"], "2");
    // One grace line, not one per failed poll; the failed polls are one poll line.
    assert_eq!(o.iter().filter(|x| *x == "grace 503").count(), 1, "{o:?}");
    let failed_polls = o
        .iter()
        .filter(|x| x.starts_with("poll ") && *x != "poll 200")
        .count();
    assert_eq!(failed_polls, 1, "{o:?}");
    // The online rewrap's own wrap and unwrap are there, under version 2.
    assert!(
        vol.iter()
            .any(|l| l["operation"] == "wrapKey" && l["version"] == "2")
    );
    env.ok(&["audit", "check", vlog.to_str().unwrap()]);
}
