//! `pkcs11:` KEK held by another process: a SoftHSM2 token exported by `p11-kit server` on
//! a unix socket, and kekfs using p11-kit's RPC client module (`p11-kit-client.so`). Only
//! the server sees SOFTHSM2_CONF; kekfs and its mount daemon see P11_KIT_SERVER_ADDRESS.
//! Stopping the server is a transient provider outage (grace, then EHOSTDOWN); starting it
//! again resumes the volume without a remount.
//!
//! Without SoftHSM2, `p11-kit server` or the client module the tests are skipped with a
//! message, unless CI=true: then they fail.

mod common;
use common::softhsm::*;
use common::*;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const CLIENT: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib64/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
];

/// SoftHSM2 and the client module, if everything the tests need is installed.
fn tools(test: &str) -> Option<(&'static str, &'static str)> {
    let server = Command::new("p11-kit")
        .args(["server", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--provider"));
    let why = match (softhsm_installed(), first_file(CLIENT)) {
        (None, _) => "SoftHSM2 is not installed (apt-get install softhsm2)",
        _ if !server => "`p11-kit server` is missing (apt-get install p11-kit)",
        (_, None) => "p11-kit-client.so is missing (apt-get install p11-kit-modules)",
        (Some(s), Some(c)) => return Some((s, c)),
    };
    skip(test, why);
    None
}

/// A SoftHSM2 token and the `p11-kit server` that exports it.
struct Remote {
    conf: PathBuf,
    pinfile: PathBuf,
    socket: PathBuf,
    softhsm: &'static str,
    client: &'static str,
    server: Option<Child>,
    log: PathBuf,
}

impl Remote {
    /// A token `kekfs` in `env.dir/hsm`, served on `env.dir/p11.sock`.
    fn new(env: &Env, softhsm: &'static str, client: &'static str) -> Remote {
        let t = softhsm_setup(&env.dir.path().join("hsm"), "kekfs", SO_PIN, PIN);
        let mut r = Remote {
            conf: t.conf,
            pinfile: t.pinfile,
            socket: env.dir.path().join("p11.sock"),
            softhsm,
            client,
            server: None,
            log: env.dir.path().join("p11-kit-server.log"),
        };
        r.start();
        r
    }

    /// Start `p11-kit server` in the foreground, in a process group of its own (it forks
    /// one child per connection; stopping the server stops them too), and wait for its
    /// socket.
    fn start(&mut self) {
        assert!(self.server.is_none(), "server already running");
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let child = Command::new("p11-kit")
            .arg("server")
            .args(["--provider", self.softhsm, "-f", "-n"])
            .arg(&self.socket)
            .arg("pkcs11:token=kekfs")
            .env("SOFTHSM2_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn p11-kit server");
        self.server = Some(child);
        assert!(
            wait_for(Duration::from_secs(10), || self.socket.exists()),
            "p11-kit server did not create {}; its log:\n{}",
            self.socket.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Stop the server and every connection it serves (SIGKILL to its process group).
    fn stop(&mut self) {
        if let Some(mut c) = self.server.take() {
            // SAFETY: kill(2) on the process group this test created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Kill only the per-connection processes of the running server: every session dies
    /// mid-way, the server stays up.
    fn drop_connections(&self) -> usize {
        let Some(server) = &self.server else {
            return 0;
        };
        let mut n = 0;
        for pid in children_of(server.id()) {
            // SAFETY: kill(2) on a child of the server this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            n += 1;
        }
        n
    }

    /// The KEK URI: the client module, the PIN from a file.
    fn uri(&self, object: &str) -> String {
        format!(
            "pkcs11:token=kekfs;object={object}?module-path={}&pin-source=file:{}",
            self.client,
            self.pinfile.display()
        )
    }

    /// `kekfs` reaching the token through the server only (no SOFTHSM2_CONF).
    fn cmd(&self, env: &Env) -> Command {
        let mut c = env.kekfs();
        c.env(
            "P11_KIT_SERVER_ADDRESS",
            format!("unix:path={}", self.socket.display()),
        )
        .env_remove("SOFTHSM2_CONF")
        .env_remove("KEKFS_PKCS11_MECHANISM");
        c
    }

    fn run(&self, env: &Env, args: &[&str]) -> Output {
        self.cmd(env).args(args).output().expect("run kekfs")
    }

    fn ok(&self, env: &Env, args: &[&str]) -> String {
        check_ok(args, self.run(env, args))
    }

    /// Key, volume and mount with `opts`; the guard unmounts on drop.
    fn mounted_volume(&self, env: &Env, opts: &[&str]) -> Mounted {
        let uri = self.uri("vol-kek");
        let out = self.ok(env, &["key", "create", "--kek", &uri]);
        // p11-kit 0.24 passes no AES key-wrap mechanism through: kekfs makes an RSA key.
        assert!(out.contains("created RSA-3072 key"), "{out}");
        self.ok(env, &["init", env.backing.to_str().unwrap(), "--kek", &uri]);
        env.mount_by(opts, |args| {
            self.ok(env, args);
        })
    }

    fn key_state(&self, env: &Env) -> String {
        let out = self.ok(env, &["status", env.mnt.to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
        v["key_state"]["state"].as_str().unwrap_or("").to_string()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pids whose parent is `ppid` (from /proc).
fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

fn setup(test: &str) -> Option<(Env, Remote)> {
    let (softhsm, client) = tools(test)?;
    let env = Env::new(test)?;
    let remote = Remote::new(&env, softhsm, client);
    Some((env, remote))
}

#[test]
fn p11kit_init_mount_read_write_and_lifecycle() {
    let Some((env, remote)) = setup("p11kit_init_mount_read_write_and_lifecycle") else {
        return;
    };
    let m = remote.mounted_volume(&env, &["poll=300ms"]);
    std::fs::create_dir(m.p("dir")).unwrap();
    std::fs::write(m.p("dir/f"), b"kept by another process").unwrap();
    std::fs::write(m.p("big"), vec![0x5au8; 200_000]).unwrap();
    assert_eq!(
        std::fs::read(m.p("dir/f")).unwrap(),
        b"kept by another process"
    );
    let st = remote.ok(&env, &["status", env.mnt.to_str().unwrap(), "--json"]);
    assert!(st.contains("p11-kit-client.so"), "{st}");
    // Nothing but ciphertext in the backing directory.
    for f in content_files(&env.backing) {
        let data = std::fs::read(&f).unwrap();
        assert!(
            !data
                .windows(b"kept by another".len())
                .any(|w| w == b"kept by another"),
            "plaintext in {}",
            f.display()
        );
    }
    // Lifecycle through the server: disable revokes, enable restores.
    let uri = remote.uri("vol-kek");
    remote.ok(&env, &["key", "disable", "--kek", &uri]);
    assert!(
        wait_for(BOUND, || read_errno(&m.p("dir/f"))
            == Some(libc::EKEYREVOKED)),
        "disable through the server: {:?}; log:\n{}",
        read_errno(&m.p("dir/f")),
        env.daemon_log()
    );
    // The status file is published at the end of each poll, just after the gate changed.
    assert!(wait_for(BOUND, || remote.key_state(&env) == "revoked"));
    remote.ok(&env, &["key", "enable", "--kek", &uri]);
    assert!(
        wait_for(BOUND, || read_errno(&m.p("dir/f")).is_none()),
        "enable through the server; log:\n{}",
        env.daemon_log()
    );
    m.unmount();
    // Remount and read back.
    let o = remote.run(
        &env,
        &[
            "mount",
            env.backing.to_str().unwrap(),
            env.mnt.to_str().unwrap(),
        ],
    );
    assert!(
        o.status.success(),
        "remount: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m = env.guard();
    assert_eq!(std::fs::read(m.p("big")).unwrap(), vec![0x5au8; 200_000]);
    m.unmount();
}

#[test]
fn p11kit_server_down_is_transient_grace_serves_then_resumes() {
    let Some((env, mut remote)) = setup("p11kit_server_down_is_transient_grace_serves") else {
        return;
    };
    let m = remote.mounted_volume(&env, &["poll=300ms", "grace=1h"]);
    std::fs::write(m.p("f"), b"served from the cached key").unwrap();
    remote.stop();
    assert!(
        wait_for(BOUND, || remote.key_state(&env) == "grace"),
        "stopping the server did not start the grace period: {}; log:\n{}",
        remote.key_state(&env),
        env.daemon_log()
    );
    // Still serving, for fresh opens and new files alike, while the server is down.
    for _ in 0..5 {
        assert_eq!(
            std::fs::read(m.p("f")).unwrap(),
            b"served from the cached key"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(m.p("g"), b"written during grace").unwrap();
    assert_eq!(remote.key_state(&env), "grace");
    let log = env.daemon_log();
    assert!(
        log.contains("poll failed (grace period"),
        "failed polls are logged:\n{log}"
    );
    // A new volume cannot be made meanwhile: "provider unreachable", exit 15.
    let o = remote.run(
        &env,
        &[
            "init",
            env.dir.path().join("b2").to_str().unwrap(),
            "--kek",
            &remote.uri("vol-kek"),
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(15),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("p11-kit server"));
    remote.start();
    assert!(
        wait_for(BOUND, || remote.key_state(&env) == "active"),
        "the volume did not leave grace after the server came back; log:\n{}",
        env.daemon_log()
    );
    assert_eq!(std::fs::read(m.p("g")).unwrap(), b"written during grace");
    // A second outage and restart: the daemon keeps working across server restarts.
    remote.stop();
    assert!(wait_for(BOUND, || remote.key_state(&env) == "grace"));
    remote.start();
    assert!(wait_for(BOUND, || remote.key_state(&env) == "active"));
    assert_eq!(
        std::fs::read(m.p("f")).unwrap(),
        b"served from the cached key"
    );
    m.unmount();
}

#[test]
fn p11kit_server_down_past_grace_is_unavailable_then_resumes() {
    let Some((env, mut remote)) = setup("p11kit_server_down_past_grace_is_unavailable") else {
        return;
    };
    let m = remote.mounted_volume(&env, &["poll=300ms", "grace=1s"]);
    std::fs::write(m.p("f"), b"payload").unwrap();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"payload");
    let mut held = std::fs::File::open(m.p("f")).unwrap();
    remote.stop();
    assert!(
        wait_for(BOUND, || read_errno(&m.p("f")) == Some(libc::EHOSTDOWN)),
        "reads did not fail with EHOSTDOWN after the grace period: {:?}; log:\n{}",
        read_errno(&m.p("f")),
        env.daemon_log()
    );
    assert!(
        wait_for(BOUND, || remote.key_state(&env) == "unavailable"),
        "{}",
        remote.key_state(&env)
    );
    {
        use std::io::Read;
        let mut buf = Vec::new();
        let e = held
            .read_to_end(&mut buf)
            .expect_err("held handle still reads");
        assert_eq!(e.raw_os_error(), Some(libc::EHOSTDOWN));
    }
    // Never a refusal: the server being gone is not "disabled" or "not found".
    let log = env.daemon_log();
    assert!(
        log.contains("unreachable for longer than the grace period")
            && !log.contains("keys wiped, I/O now fails with errno"),
        "{log}"
    );
    remote.start();
    assert!(
        wait_for(BOUND, || read_errno(&m.p("f")).is_none()),
        "reads did not resume after the server came back; log:\n{}",
        env.daemon_log()
    );
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"payload");
    assert!(wait_for(BOUND, || remote.key_state(&env) == "active"));
    drop(held);
    m.unmount();
}

#[test]
fn p11kit_connections_dropped_midway_reconnect() {
    let Some((env, remote)) = setup("p11kit_connections_dropped_midway_reconnect") else {
        return;
    };
    // grace=2s: if reconnecting did not work, the volume would become unavailable.
    let m = remote.mounted_volume(&env, &["poll=300ms", "grace=2s"]);
    std::fs::write(m.p("f"), b"still here").unwrap();
    for round in 0..3 {
        assert!(
            wait_for(BOUND, || remote.drop_connections() > 0),
            "round {round}: the server serves no connection"
        );
        // Well past the grace period: every poll after the first reconnects.
        std::thread::sleep(Duration::from_millis(3000));
        assert_eq!(
            std::fs::read(m.p("f")).unwrap(),
            b"still here",
            "round {round}; log:\n{}",
            env.daemon_log()
        );
        assert_eq!(remote.key_state(&env), "active", "round {round}");
    }
    m.unmount();
}
