//! Key lifecycle while mounted (soft: keystore): revoke for each cause, restore without a
//! remount, grace on transient failures, rotation (pinned vs latest), online rewrap.
//! Timing bounds are generous: these check correctness, not speed.

mod common;
use common::*;
use std::time::Duration;

fn key_state(env: &Env) -> String {
    env.status_json(&env.mnt)["key_state"]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Revoke with `revoke`, check every path to plaintext fails with `errno`, restore with
/// `restore` and check reads work again without a remount.
/// Entries of the directory being listed across a revocation.
const BIG: usize = 1000;

fn revoke_and_restore(test: &str, revoke: &[&str], errno: i32, restore: &[&str]) {
    let Some(env) = Env::new(test) else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&[POLL]);
    std::fs::create_dir(m.p("dir")).unwrap();
    std::fs::write(m.p("dir/secret.txt"), b"top secret payload").unwrap();
    // Pull it into the page cache and keep a handle open across the revocation.
    assert_eq!(
        std::fs::read(m.p("dir/secret.txt")).unwrap(),
        b"top secret payload"
    );
    let mut held = std::fs::File::open(m.p("dir/secret.txt")).unwrap();
    assert_eq!(handle_errno(&mut held), None);
    // And a listing of a big directory under way: kekfs decrypts its names ahead of the
    // kernel's requests, and none of those may come out after the revocation.
    std::fs::create_dir(m.p("big")).unwrap();
    for i in 0..BIG {
        std::fs::write(m.p(&format!("big/n{i:04}")), b"").unwrap();
    }
    let mut listing = DirStream::open(&m.p("big"));
    assert!(listing.next_name().is_some());
    std::thread::sleep(Duration::from_millis(100));

    env.ok(revoke);
    assert!(
        wait_for(BOUND, || read_errno(&m.p("dir/secret.txt")) == Some(errno)),
        "{test}: a fresh read did not fail with errno {errno}; got {:?}",
        read_errno(&m.p("dir/secret.txt"))
    );
    assert_eq!(
        handle_errno(&mut held),
        Some(errno),
        "{test}: an open handle kept working"
    );
    // The names the kernel has cached go too (where it can drop them all, it caches them
    // for a minute, elsewhere for a second): a stat of a path looked up just before the
    // revocation is refused, not answered from the cache.
    let stat_errno = || {
        std::fs::metadata(m.p("dir/secret.txt"))
            .err()
            .and_then(|e| e.raw_os_error())
    };
    assert!(
        wait_for(Duration::from_secs(5), || stat_errno() == Some(errno)),
        "{test}: a cached name still resolves after revocation: {:?}",
        stat_errno()
    );
    let fresh = std::fs::read_dir(m.p("dir")).map(|it| it.count());
    assert!(
        fresh.is_err(),
        "{test}: readdir still lists names after revocation"
    );
    // The listing under way ends in an error; what it still gives is only what the C
    // library fetched before the revocation (one 32 KiB buffer: well under BIG names).
    let mut after = 0;
    let end = loop {
        match listing.try_next() {
            Ok(Some(_)) => after += 1,
            Ok(None) => break None,
            Err(e) => break e.raw_os_error(),
        }
    };
    drop(listing);
    assert_eq!(
        end,
        Some(errno),
        "{test}: the listing under way did not fail"
    );
    assert!(
        after < BIG / 2,
        "{test}: {after} names listed after revocation"
    );
    assert!(
        std::fs::write(m.p("dir/new.txt"), b"x").is_err(),
        "{test}: create still works after revocation"
    );
    // The status file is published right after the gate changes: poll for it.
    assert!(
        wait_for(BOUND, || key_state(&env) != "active"),
        "{test}: status still says active"
    );

    env.ok(restore);
    assert!(
        wait_for(BOUND, || read_errno(&m.p("dir/secret.txt")).is_none()),
        "{test}: reads did not resume after restore"
    );
    assert_eq!(
        std::fs::read(m.p("dir/secret.txt")).unwrap(),
        b"top secret payload"
    );
    assert_eq!(
        handle_errno(&mut held),
        None,
        "{test}: held handle after restore"
    );
    assert!(wait_for(BOUND, || key_state(&env) == "active"));
    drop(held);
    m.unmount();
}

#[test]
fn disabled_key_revokes_and_enable_restores() {
    revoke_and_restore(
        "disabled_key_revokes_and_enable_restores",
        &["key", "disable", "k"],
        libc::EKEYREVOKED,
        &["key", "enable", "k"],
    );
}

#[test]
fn disabled_version_revokes() {
    revoke_and_restore(
        "disabled_version_revokes",
        &["key", "disable", "k@1"],
        libc::EKEYREVOKED,
        &["key", "enable", "k@1"],
    );
}

#[test]
fn deleted_key_revokes_and_recover_restores() {
    revoke_and_restore(
        "deleted_key_revokes_and_recover_restores",
        &["key", "delete", "k"],
        libc::ENOKEY,
        &["key", "recover", "k"],
    );
}

#[test]
fn expired_key_revokes() {
    revoke_and_restore(
        "expired_key_revokes",
        &["key", "set", "k", "--expires", "2001-01-01T00:00:00Z"],
        libc::EKEYEXPIRED,
        &["key", "set", "k", "--expires", "none"],
    );
}

#[test]
fn not_yet_valid_key_revokes() {
    revoke_and_restore(
        "not_yet_valid_key_revokes",
        &["key", "set", "k", "--not-before", "2099-01-01T00:00:00Z"],
        libc::EKEYREJECTED,
        &["key", "set", "k", "--not-before", "none"],
    );
}

#[test]
fn policy_denial_revokes() {
    revoke_and_restore(
        "policy_denial_revokes",
        &["key", "policy", "k", "--deny-uid", "0"],
        libc::EACCES,
        &["key", "policy", "k", "--clear"],
    );
}

#[test]
fn keystore_gone_revokes_and_returning_restores() {
    let Some(env) = Env::new("keystore_gone_revokes_and_returning_restores") else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&[POLL]);
    std::fs::write(m.p("f"), b"data").unwrap();
    let moved = env.dir.path().join("keystore.away");
    std::fs::rename(&env.keystore, &moved).unwrap();
    assert!(
        wait_for(BOUND, || read_errno(&m.p("f")) == Some(libc::ENOKEY)),
        "keystore gone: got {:?}",
        read_errno(&m.p("f"))
    );
    std::fs::rename(&moved, &env.keystore).unwrap();
    assert!(wait_for(BOUND, || read_errno(&m.p("f")).is_none()));
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"data");
    m.unmount();
}

#[test]
fn mount_refused_while_key_refused() {
    let Some(env) = Env::new("mount_refused_while_key_refused") else {
        return;
    };
    env.init_volume();
    let b = env.backing.to_str().unwrap().to_string();
    let mp = env.mnt.to_str().unwrap().to_string();
    for (revoke, restore) in [
        (vec!["key", "disable", "k"], vec!["key", "enable", "k"]),
        (vec!["key", "delete", "k"], vec!["key", "recover", "k"]),
        (
            vec!["key", "set", "k", "--expires", "2001-01-01T00:00:00Z"],
            vec!["key", "set", "k", "--expires", "none"],
        ),
        (
            vec!["key", "set", "k", "--not-before", "2099-01-01T00:00:00Z"],
            vec!["key", "set", "k", "--not-before", "none"],
        ),
        (
            vec!["key", "policy", "k", "--deny-uid", "0"],
            vec!["key", "policy", "k", "--clear"],
        ),
    ] {
        env.ok(&revoke);
        let o = env.run(&["mount", &b, &mp]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(13), "{revoke:?}: {err}");
        assert!(err.contains("soft:k"), "message names the key: {err}");
        assert!(!is_mounted(&env.mnt));
        env.ok(&restore);
    }
    env.mount().unmount();
}

/// Make the keystore unreadable as a keystore (a transient failure, not a refusal).
fn break_keystore(env: &Env) -> Vec<u8> {
    let p = env.keystore.join("keystore.json");
    let good = std::fs::read(&p).unwrap();
    std::fs::write(&p, b"{ not json").unwrap();
    good
}

#[test]
fn transient_failure_serves_during_grace() {
    let Some(env) = Env::new("transient_failure_serves_during_grace") else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&[POLL, "grace=1h"]);
    std::fs::write(m.p("f"), b"still here").unwrap();
    let good = break_keystore(&env);
    assert!(
        wait_for(BOUND, || key_state(&env) == "grace"),
        "never entered grace"
    );
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"still here");
    std::fs::write(env.keystore.join("keystore.json"), good).unwrap();
    assert!(wait_for(BOUND, || key_state(&env) == "active"));
    m.unmount();
}

#[test]
fn transient_failure_past_grace_makes_volume_unavailable() {
    let Some(env) = Env::new("transient_failure_past_grace_makes_volume_unavailable") else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&[POLL, "grace=1s"]);
    std::fs::write(m.p("f"), b"payload").unwrap();
    let good = break_keystore(&env);
    assert!(
        wait_for(BOUND, || read_errno(&m.p("f")) == Some(libc::EHOSTDOWN)),
        "got {:?}",
        read_errno(&m.p("f"))
    );
    assert!(wait_for(BOUND, || key_state(&env) == "unavailable"));
    std::fs::write(env.keystore.join("keystore.json"), good).unwrap();
    assert!(wait_for(BOUND, || read_errno(&m.p("f")).is_none()));
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"payload");
    m.unmount();
}

#[test]
fn latest_follows_rotation_online_pinned_stays() {
    let Some(env) = Env::new("latest_follows_rotation_online_pinned_stays") else {
        return;
    };
    env.init_volume();
    let pinned = env.dir.path().join("pinned");
    env.ok(&[
        "init",
        pinned.to_str().unwrap(),
        "--kek",
        "soft:k?version=1",
    ]);
    let m = env.mount_with(&[POLL]);
    std::fs::write(m.p("f"), b"latest").unwrap();
    env.ok(&["key", "rotate", "k"]);
    assert!(
        wait_for(BOUND, || env.wrapped_by(&env.mnt) == [2, 1]),
        "mounted volume following latest did not rewrap: {:?}",
        env.wrapped_by(&env.mnt)
    );
    assert_eq!(
        env.wrapped_by(&pinned),
        [1, 1],
        "a pinned volume must keep its version"
    );
    // The old version can now be disabled without affecting the volume.
    env.ok(&["key", "disable", "k@1"]);
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"latest");
    assert_eq!(key_state(&env), "active");
    m.unmount();
}

#[test]
fn rewrap_online_under_a_writer_then_disable_old_version() {
    let Some(env) = Env::new("rewrap_online_under_a_writer_then_disable_old_version") else {
        return;
    };
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "k"]);
    env.ok(&[
        "init",
        env.backing.to_str().unwrap(),
        "--kek",
        "soft:k?version=1",
    ]);
    let m = env.mount_with(&[POLL]);
    env.ok(&["key", "rotate", "k"]);
    let path = m.p("log");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let path = path.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&path).unwrap();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(format!("line {n}\n").as_bytes()).unwrap();
                n += 1;
            }
            f.sync_all().unwrap();
            n
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    env.ok(&["rewrap", env.mnt.to_str().unwrap(), "--to", "2"]);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = writer.join().expect("writer never failed");
    assert_eq!(env.wrapped_by(&env.mnt), [2, 1]);
    env.ok(&["key", "disable", "k@1"]);
    std::thread::sleep(Duration::from_millis(900));
    let text = std::fs::read_to_string(&path).unwrap();
    let expect: String = (0..n).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text, expect);
    assert_eq!(key_state(&env), "active");
    m.unmount();
    env.mount().unmount();
}

#[test]
fn killed_rewrap_never_bricks_the_volume() {
    let Some(env) = Env::new("killed_rewrap_never_bricks_the_volume") else {
        return;
    };
    env.init_volume();
    {
        let m = env.mount();
        std::fs::write(m.p("f"), b"survives").unwrap();
        m.unmount();
    }
    for i in 0..12u64 {
        env.ok(&["key", "rotate", "k"]);
        let mut child = env
            .kekfs()
            .args(["rewrap", env.backing.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill it at a different point each round (Argon2 and the wrap take tens of ms).
        std::thread::sleep(Duration::from_millis(5 + i * 15));
        let _ = child.kill();
        let _ = child.wait();
        let m = env.mount();
        assert_eq!(std::fs::read(m.p("f")).unwrap(), b"survives", "round {i}");
        m.unmount();
    }
}

#[test]
fn rewrap_to_another_kek_online_keeps_serving() {
    let Some(env) = Env::new("rewrap_to_another_kek_online_keeps_serving") else {
        return;
    };
    env.init_volume();
    env.ok(&["key", "create", "k2"]);
    let m = env.mount_with(&[POLL]);
    std::fs::write(m.p("f"), b"moves keys").unwrap();
    env.ok(&["rewrap", env.mnt.to_str().unwrap(), "--to-kek", "soft:k2"]);
    let st = env.status_json(&env.mnt);
    assert_eq!(st["kek"], "soft:k2");
    // The old KEK can go; the mounted volume now answers to k2 only.
    env.ok(&["key", "disable", "k"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"moves keys");
    assert_eq!(key_state(&env), "active");
    env.ok(&["key", "disable", "k2"]);
    assert!(
        wait_for(BOUND, || read_errno(&m.p("f")) == Some(libc::EKEYREVOKED)),
        "disabling the new KEK must revoke the volume"
    );
    env.ok(&["key", "enable", "k2"]);
    assert!(wait_for(BOUND, || read_errno(&m.p("f")).is_none()));
    m.unmount();
}
