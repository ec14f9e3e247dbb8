//! The daemon's inode table stays under its descriptor limit: with far more entries
//! looked up than it may hold descriptors, listings stay complete and every file stays
//! reachable (idle files' descriptors are closed and reopened by name), never EMFILE.

mod common;

use common::*;
use std::process::Command;

/// Descriptor limit (soft and hard) the daemon gets in these tests.
const LIMIT: usize = 512;

fn mount_with_fd_limit(env: &Env) -> Mounted {
    env.mount_by(&[], |args| {
        let k = env.kekfs();
        let mut c = Command::new("prlimit");
        c.arg(format!("--nofile={LIMIT}:{LIMIT}"))
            .arg(k.get_program())
            .args(k.get_args())
            .args(args);
        for (key, v) in k.get_envs() {
            match v {
                Some(v) => c.env(key, v),
                None => c.env_remove(key),
            };
        }
        let o = c.output().expect("run prlimit kekfs mount");
        check_ok(args, o);
    })
}

fn daemon_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("daemon fd dir")
        .count()
}

fn daemon_fd_limit(pid: i32) -> usize {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .expect("soft limit")
}

#[test]
fn many_more_entries_than_descriptors() {
    let Some(env) = Env::new("many_more_entries_than_descriptors") else {
        return;
    };
    if !tool_ok("prlimit") {
        if in_ci() {
            panic!("prlimit (util-linux) is missing");
        }
        skip("many_more_entries_than_descriptors", "prlimit is missing");
        return;
    }
    env.init_volume();
    let m = mount_with_fd_limit(&env);
    let pid = m.pid();
    assert_eq!(
        daemon_fd_limit(pid),
        LIMIT,
        "the daemon runs under the test's limit"
    );
    let n = LIMIT * 8;
    let dir = m.p("many");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:05}")), format!("file {i}")).unwrap();
    }
    // A file with two names keeps its descriptor; it must stay reachable by both.
    std::fs::hard_link(dir.join("f00003"), dir.join("sub").join("link3")).unwrap();
    // Complete listings, repeatedly (each one looks every entry up again).
    for round in 0..3 {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), n + 1, "listing round {round} is complete");
        for nm in names.iter().filter(|nm| nm.starts_with('f')) {
            let md = std::fs::metadata(dir.join(nm)).unwrap();
            assert!(md.is_file());
        }
        assert!(
            daemon_fds(pid) < LIMIT,
            "daemon holds {} descriptors, limit {LIMIT}",
            daemon_fds(pid)
        );
    }
    // Every file still reads back, including after renames of evicted entries.
    for i in (0..n).step_by(7) {
        let from = dir.join(format!("f{i:05}"));
        let to = dir.join("sub").join(format!("moved{i:05}"));
        std::fs::rename(&from, &to).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("sub").join("link3")).unwrap(),
        "file 3"
    );
    for i in 0..n {
        let p = if i % 7 == 0 {
            dir.join("sub").join(format!("moved{i:05}"))
        } else {
            dir.join(format!("f{i:05}"))
        };
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("file {i}"));
    }
    // Keeping many files open at once still works up to what the limit leaves.
    let open: Vec<std::fs::File> = (1..LIMIT / 4)
        .filter(|i| i % 7 != 0)
        .map(|i| std::fs::File::open(dir.join(format!("f{i:05}"))).unwrap())
        .collect();
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        n - n.div_ceil(7) + 1
    );
    drop(open);
    m.unmount();
}

/// Files opened without a request to kekfs (no-open mode) and created files share one
/// content descriptor per inode. None may outlive the inode: after files are created,
/// read, rewritten and deleted, the daemon's descriptors go back to where they were.
#[test]
fn content_descriptors_go_with_their_files() {
    let Some(env) = Env::new("content_descriptors_go_with_their_files") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let pid = m.pid();
    let dir = m.p("d");
    std::fs::create_dir(&dir).unwrap();
    // Settle: the first requests open what the daemon keeps for the mount's lifetime.
    std::fs::write(dir.join("warm"), b"w").unwrap();
    assert_eq!(std::fs::read(dir.join("warm")).unwrap(), b"w");
    std::fs::remove_file(dir.join("warm")).unwrap();
    let base = daemon_fds(pid);
    for i in 0..300 {
        std::fs::write(dir.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    for i in 0..300 {
        let p = dir.join(format!("f{i}"));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("file {i}"));
        std::fs::write(&p, format!("again {i}")).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("again {i}"));
    }
    assert!(
        daemon_fds(pid) > base,
        "no descriptor held for 300 cached files: the check below would prove nothing"
    );
    for i in 0..300 {
        std::fs::remove_file(dir.join(format!("f{i}"))).unwrap();
    }
    // The kernel forgets unlinked inodes on its own schedule; drop its caches to hurry it.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
    assert!(
        wait_for(BOUND, || daemon_fds(pid) <= base + 2),
        "daemon descriptors: {} before, {} after every file was deleted",
        base,
        daemon_fds(pid)
    );
    m.unmount();
}
