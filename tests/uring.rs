//! The two ways requests reach the daemon: FUSE over io_uring (the default where the
//! kernel offers it: Linux 6.14+ with `fuse.enable_uring`) and /dev/fuse (`uring=off`,
//! and every kernel without it). The same workload, which sends every kind of request
//! with data in and out, runs over each; `kekfs status` reports the transport in use, and
//! what one transport wrote the other reads back.

mod common;
use common::tamper::pattern;
use common::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Does this kernel carry FUSE requests over io_uring? Skips (or, in CI, fails) if not.
fn uring_enabled(test: &str) -> bool {
    match std::fs::read_to_string(ENABLE_URING) {
        Ok(v) if v.trim() == "Y" => true,
        Ok(_) => {
            skip(
                test,
                "FUSE over io_uring is off (fuse.enable_uring=N; scripts/test.sh turns it on as root)",
            );
            false
        }
        Err(_) => {
            skip(
                test,
                "this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)",
            );
            false
        }
    }
}

/// The transport the mount daemon reports, once it reports `want` (or after 10 s).
fn transport_becomes(env: &Env, want: &str) -> String {
    let mut last = String::new();
    wait_for(Duration::from_secs(10), || {
        last = env.status_json(&env.mnt)["transport"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        last == want
    });
    last
}

/// Requests of every shape: payload in (write data, names, xattr values), payload out
/// (read data, listings, xattr values, link targets), and none (getattr, fsync, unlink).
/// Leaves `keep/` behind for `check_kept`.
fn workload(root: &Path) {
    let big = pattern(7, 3 * 1024 * 1024 + 12345);
    let dir = root.join("keep");
    std::fs::create_dir(&dir).unwrap();
    {
        let mut f = std::fs::File::create(dir.join("big")).unwrap();
        // 1 MiB writes (one request each), then a tail that ends inside a block.
        for chunk in big.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    assert_eq!(std::fs::read(dir.join("big")).unwrap(), big);
    let f = std::fs::File::open(dir.join("big")).unwrap();
    for &(off, len) in &[
        (0usize, 1usize),
        (4095, 2),
        (1 << 20, 4096),
        (3 << 20, 12345),
    ] {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert_eq!(buf, big[off..off + len], "pread at {off}");
    }
    // A read past the end returns what there is.
    let mut buf = vec![0u8; 8192];
    let n = f.read_at(&mut buf, big.len() as u64 - 100).unwrap();
    assert_eq!(n, 100);

    // Long names travel in the request payload, listings in the reply payload.
    let long = "n".repeat(200);
    for i in 0..50 {
        std::fs::write(dir.join(format!("{long}{i:02}")), format!("file {i}")).unwrap();
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 51);
    assert_eq!(names[0], "big");
    std::fs::rename(dir.join(format!("{long}00")), dir.join("renamed")).unwrap();
    std::fs::hard_link(dir.join("renamed"), dir.join("linked")).unwrap();
    std::os::unix::fs::symlink("renamed", dir.join("sym")).unwrap();
    assert_eq!(
        std::fs::read_link(dir.join("sym")).unwrap(),
        Path::new("renamed")
    );
    assert_eq!(std::fs::read_to_string(dir.join("sym")).unwrap(), "file 0");
    for i in 1..50 {
        std::fs::remove_file(dir.join(format!("{long}{i:02}"))).unwrap();
    }

    // Extended attributes: value in, value out.
    let value = pattern(3, 3000);
    setxattr(&dir.join("renamed"), "user.blob", &value, 0).unwrap();
    assert_eq!(getxattr(&dir.join("renamed"), "user.blob").unwrap(), value);

    // Truncate down and up, overwrite in the middle, append.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("big"))
        .unwrap();
    f.set_len(5000).unwrap();
    f.set_len(70000).unwrap();
    f.seek(SeekFrom::Start(4000)).unwrap();
    f.write_all(&[0xAB; 3000]).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"tail").unwrap();
    f.sync_data().unwrap();
    let mut got = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, expected_big());

    // Scratch work that leaves nothing behind.
    std::fs::create_dir_all(root.join("scratch/a/b")).unwrap();
    std::fs::write(root.join("scratch/a/b/f"), b"x").unwrap();
    std::fs::remove_dir_all(root.join("scratch")).unwrap();
    assert!(!root.join("scratch").exists());
}

/// `keep/big` after the workload.
fn expected_big() -> Vec<u8> {
    let mut want = pattern(7, 5000);
    want.resize(70000, 0);
    want[4000..7000].fill(0xAB);
    want.extend_from_slice(b"tail");
    want
}

/// What the workload left, read back (over whichever transport is mounted now).
fn check_kept(root: &Path) {
    let dir = root.join("keep");
    assert_eq!(std::fs::read(dir.join("big")).unwrap(), expected_big());
    assert_eq!(
        std::fs::read_to_string(dir.join("linked")).unwrap(),
        "file 0"
    );
    assert_eq!(std::fs::read_to_string(dir.join("sym")).unwrap(), "file 0");
    assert_eq!(
        getxattr(&dir.join("renamed"), "user.blob").unwrap(),
        pattern(3, 3000)
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["big", "linked", "renamed", "sym"]);
}

#[test]
fn io_uring_carries_the_requests_where_the_kernel_offers_it() {
    let test = "io_uring_carries_the_requests_where_the_kernel_offers_it";
    if !uring_enabled(test) {
        return;
    }
    let Some(env) = Env::new(test) else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&[POLL]);
    workload(&m.mnt);
    assert_eq!(transport_becomes(&env, "io_uring"), "io_uring");
    // The ring threads exist, one set per CPU queue.
    let threads = std::fs::read_dir(format!("/proc/{}/task", m.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|c| c.starts_with("fuse-uring-"))
        .count();
    assert!(threads > 0, "no fuse-uring threads in the daemon");
    m.unmount();
    // Read back over /dev/fuse what was written over io_uring.
    let m = env.mount_with(&["uring=off", POLL]);
    check_kept(&m.mnt);
    m.unmount();
}

#[test]
fn dev_fuse_carries_them_with_uring_off() {
    let test = "dev_fuse_carries_them_with_uring_off";
    let Some(env) = Env::new(test) else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&["uring=off", "spin=0", POLL]);
    workload(&m.mnt);
    // It stays on /dev/fuse: give a poll time to publish, then check.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        env.status_json(&env.mnt)["transport"].as_str(),
        Some("/dev/fuse")
    );
    m.unmount();
    // And the default transport reads it back.
    let m = env.mount_with(&[POLL]);
    check_kept(&m.mnt);
    m.unmount();
}

#[test]
fn fio_verify_over_io_uring_without_spinning_and_with_it() {
    let test = "fio_verify_over_io_uring_without_spinning_and_with_it";
    if !fio_available(test) || !uring_enabled(test) {
        return;
    }
    let Some(env) = Env::new(test) else {
        return;
    };
    env.init_volume();
    for spin in ["spin=0", "spin=1ms"] {
        let m = env.mount_with(&[spin]);
        // Two jobs per CPU queue's worth of callers, buffered and direct, mixed sizes:
        // requests queue up behind busy ring entries and replies of every size come back.
        for direct in ["0", "1"] {
            let out = std::process::Command::new("fio")
                .args([
                    "--name=v",
                    &format!("--directory={}", m.mnt.display()),
                    "--size=8M",
                    "--numjobs=4",
                    "--rw=randrw",
                    "--bsrange=512-256k",
                    "--verify=crc32c",
                    "--verify_fatal=1",
                    "--do_verify=1",
                    &format!("--direct={direct}"),
                    "--group_reporting",
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "fio verify ({spin}, direct={direct}) failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        m.unmount();
    }
}
