//! kekfs as a VM disk backend: raw and qcow2 images on a mount, used by qemu-img, qemu-io
//! (with O_DIRECT, `-t none`, and through the page cache, `-t writeback`) and qemu-nbd;
//! discard and write-zeroes (fallocate punch hole / zero range); revocation reaching a
//! process that holds an image open; fio with direct=1. Skipped (with a message) when the
//! qemu tools are missing, unless CI=true.
//!
//! The test binary is a debug build of kekfs, so images stay small (a few MiB written).

mod common;
use common::*;
use sha2::Digest;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// An env with a volume, or `None` when FUSE or the qemu tools are unavailable.
fn setup(test: &str) -> Option<Env> {
    let missing: Vec<&str> = ["qemu-img", "qemu-io", "qemu-nbd"]
        .into_iter()
        .filter(|t| !tool_ok(t))
        .collect();
    if !missing.is_empty() {
        skip(
            test,
            &format!("{missing:?} not installed (package qemu-utils)"),
        );
        return None;
    }
    let env = Env::new(test)?;
    env.init_volume();
    Some(env)
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run a tool, asserting success; returns stdout+stderr.
fn run(env: &Env, program: &str, args: &[&str]) -> String {
    let o = Command::new(program).args(args).output().expect(program);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({:?}):\n{}\ndaemon log:\n{}",
        o.status.code(),
        out_text(&o),
        env.daemon_log()
    );
    out_text(&o)
}

/// `qemu-io` with `-c` commands; asserts success and that no command reported a failure
/// (qemu-io can exit 0 after a failed command).
fn qemu_io(env: &Env, opts: &[&str], image: &Path, cmds: &[&str]) -> String {
    let mut args: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(image.display().to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(env, "qemu-io", &refs);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {refs:?}:\n{out}"
    );
    out
}

fn sha256(path: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_vec()
}

fn img_info(env: &Env, image: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    let _ = env;
    serde_json::from_slice(&out.stdout).expect("qemu-img info json")
}

/// `qemu-img check`: exit 0 and "No errors".
fn img_check(env: &Env, image: &Path) {
    let out = run(env, "qemu-img", &["check", image.to_str().unwrap()]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// No run of 256 bytes of `byte` anywhere in the backing dir (the plaintext pattern).
fn assert_no_plaintext_run(backing: &Path, byte: u8) {
    let needle = vec![byte; 256];
    for f in content_files(backing) {
        let data = std::fs::read(&f).unwrap();
        assert!(
            !data.windows(needle.len()).any(|w| w == needle.as_slice()),
            "{} holds a run of {byte:#x}: plaintext in the backing dir",
            f.display()
        );
    }
}

#[test]
fn qemu_img_and_qemu_io_on_raw_and_qcow2() {
    let Some(env) = setup("qemu_img_and_qemu_io_on_raw_and_qcow2") else {
        return;
    };
    let m = env.mount();
    let qcow = m.p("disk.qcow2");
    let raw = m.p("disk.raw");
    let q = qcow.to_str().unwrap();
    let r = raw.to_str().unwrap();
    run(&env, "qemu-img", &["create", "-f", "qcow2", q, "16M"]);
    run(&env, "qemu-img", &["create", "-f", "raw", r, "8M"]);
    let info = img_info(&env, &qcow);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 16 * MIB);
    assert_eq!(img_info(&env, &raw)["virtual-size"], 8 * MIB);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 * MIB);

    for (image, fmt) in [(&qcow, "qcow2"), (&raw, "raw")] {
        // O_DIRECT writes, read back both ways; page-cache writes, read back both ways.
        qemu_io(
            &env,
            &["-f", fmt, "-t", "none"],
            image,
            &[
                "write -P 0xab 0 1M",
                "write -P 0x5c 1M 64k",
                "read -P 0xab 0 1M",
                "read -P 0x5c 1M 64k",
            ],
        );
        qemu_io(
            &env,
            &["-f", fmt, "-t", "writeback"],
            image,
            &[
                "read -P 0xab 0 1M",
                "read -P 0x5c 1M 64k",
                "write -P 0x3e 2M 512k",
                "write -P 0x71 2052k 1k",
                "flush",
            ],
        );
        qemu_io(
            &env,
            &["-f", fmt, "-t", "none"],
            image,
            &[
                "read -P 0x3e 2M 4k",
                "read -P 0x71 2052k 1k",
                "read -P 0x3e 2053k 507k",
                "read -P 0 3M 1M",
            ],
        );
    }
    img_check(&env, &qcow);
    // A raw image's bytes are the disk's bytes: check them with plain reads too.
    let f = std::fs::File::open(&raw).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 1024 * 1024 - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    f.read_exact_at(&mut buf, 2052 * 1024).unwrap();
    assert!(buf[..1024].iter().all(|&b| b == 0x71) && buf[1024..].iter().all(|&b| b == 0x3e));
    drop(f);
    assert_no_plaintext_run(&env.backing, 0xab);

    // After a remount the images are bit for bit the same.
    let before = (sha256(&qcow), sha256(&raw));
    m.unmount();
    let m = env.mount();
    assert_eq!((sha256(&qcow), sha256(&raw)), before);
    img_check(&env, &qcow);
    qemu_io(
        &env,
        &["-f", "qcow2", "-t", "none"],
        &qcow,
        &["read -P 0xab 0 1M"],
    );
    m.unmount();
}

#[test]
fn qemu_img_convert_to_and_from_the_mount() {
    let Some(env) = setup("qemu_img_convert_to_and_from_the_mount") else {
        return;
    };
    let plain_dir = env.dir.path().join("plain");
    std::fs::create_dir(&plain_dir).unwrap();
    let src = plain_dir.join("src.raw");
    let s = src.to_str().unwrap();
    run(&env, "qemu-img", &["create", "-f", "raw", s, "8M"]);
    qemu_io(
        &env,
        &["-f", "raw"],
        &src,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 5M 256k",
            "write -P 0x33 8188k 4k",
        ],
    );
    let m = env.mount();
    let on_mount = m.p("vm.qcow2");
    let o = on_mount.to_str().unwrap();
    // Into the mount, writing with O_DIRECT (cache=none).
    run(
        &env,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", "-t", "none", s, o],
    );
    img_check(&env, &on_mount);
    let cmp = run(
        &env,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s, o],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // Out of the mount, reading with O_DIRECT, back to raw.
    let back = plain_dir.join("back.raw");
    run(
        &env,
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-T",
            "none",
            o,
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(sha256(&back), sha256(&src));
    // raw -> raw on the mount too, then identical after a remount.
    let raw_on_mount = m.p("vm.raw");
    run(
        &env,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "-t",
            "none",
            o,
            raw_on_mount.to_str().unwrap(),
        ],
    );
    assert_eq!(sha256(&raw_on_mount), sha256(&src));
    m.unmount();
    let m = env.mount();
    assert_eq!(sha256(&raw_on_mount), sha256(&src));
    let cmp = run(
        &env,
        "qemu-img",
        &["compare", s, on_mount.to_str().unwrap()],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    m.unmount();
}

/// A qemu-nbd server we started; killed (and reaped) on drop.
struct Nbd {
    child: Child,
    socket: PathBuf,
}

impl Nbd {
    fn start(env: &Env, image: &Path, fmt: &str) -> Nbd {
        let socket = env.dir.path().join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("qemu-nbd")
            .args([
                "--persistent",
                "--shared=4",
                "--cache=none",
                "-f",
                fmt,
                "-k",
            ])
            .arg(&socket)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-nbd");
        let mut nbd = Nbd { child, socket };
        let up = wait_for(BOUND, || {
            nbd.socket.exists() || nbd.child.try_wait().ok().flatten().is_some()
        });
        if !up || !nbd.socket.exists() {
            let _ = nbd.child.kill();
            let mut err = String::new();
            if let Some(mut e) = nbd.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("qemu-nbd did not come up: {err}");
        }
        nbd
    }

    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// One qemu-io client over NBD; the raw output and whether every command succeeded.
    fn io(&self, cmds: &[&str]) -> (bool, String) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.arg("-c").arg(x);
        }
        let o = c.arg(self.url()).output().expect("qemu-io");
        let text = out_text(&o);
        let ok = o.status.success() && !text.contains("failed") && !text.contains("Pattern");
        (ok, text)
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn qemu_nbd_serves_an_image_on_the_mount() {
    let Some(env) = setup("qemu_nbd_serves_an_image_on_the_mount") else {
        return;
    };
    let m = env.mount();
    let image = m.p("served.qcow2");
    run(
        &env,
        "qemu-img",
        &["create", "-f", "qcow2", image.to_str().unwrap(), "16M"],
    );
    qemu_io(&env, &["-t", "none"], &image, &["write -P 0x42 0 512k"]);
    let nbd = Nbd::start(&env, &image, "qcow2");
    let (ok, out) = nbd.io(&[
        "read -P 0x42 0 512k",
        "write -P 0x5a 1M 512k",
        "read -P 0x5a 1M 512k",
        "flush",
    ]);
    assert!(ok, "over NBD: {out}");
    // A second client sees the first one's writes.
    let (ok, out) = nbd.io(&["read -P 0x5a 1M 512k", "read -P 0 2M 64k"]);
    assert!(ok, "second NBD client: {out}");
    let info = run(&env, "qemu-img", &["info", &nbd.url()]);
    assert!(info.contains("16 MiB"), "{info}");
    // qemu's image lock (an OFD lock, kept by the kernel on the mount) holds: no second
    // writer while the server has the image open.
    let o = Command::new("qemu-io")
        .args(["-t", "none", "-c", "read 0 4k"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && out_text(&o).contains("lock"),
        "a second writer opened the served image: {}",
        out_text(&o)
    );
    drop(nbd);
    // The writes landed in the image file on kekfs.
    img_check(&env, &image);
    qemu_io(
        &env,
        &["-t", "none"],
        &image,
        &["read -P 0x42 0 512k", "read -P 0x5a 1M 512k"],
    );
    let sum = sha256(&image);
    m.unmount();
    let m = env.mount();
    assert_eq!(sha256(&image), sum, "image changed across a remount");
    m.unmount();
}

#[test]
fn revocation_reaches_qemu_nbd_clients() {
    let Some(env) = setup("revocation_reaches_qemu_nbd_clients") else {
        return;
    };
    let m = env.mount_with(&[POLL]);
    let image = m.p("vm.raw");
    run(
        &env,
        "qemu-img",
        &["create", "-f", "raw", image.to_str().unwrap(), "4M"],
    );
    qemu_io(
        &env,
        &["-f", "raw", "-t", "none"],
        &image,
        &["write -P 0x99 0 1M"],
    );
    let nbd = Nbd::start(&env, &image, "raw");
    let (ok, out) = nbd.io(&["read -P 0x99 0 1M"]);
    assert!(ok, "{out}");

    env.ok(&["key", "disable", "k"]);
    let t0 = Instant::now();
    let mut last = String::new();
    assert!(
        wait_for(BOUND, || {
            let (ok, out) = nbd.io(&["read -P 0x99 0 64k"]);
            last = out;
            !ok
        }),
        "NBD reads kept working after the key was disabled: {last}"
    );
    eprintln!("NBD read failed {:?} after disable: {last}", t0.elapsed());
    let (ok, out) = nbd.io(&["write -P 0x66 0 4k"]);
    assert!(!ok, "an NBD write succeeded under a disabled key: {out}");

    env.ok(&["key", "enable", "k"]);
    // The same server (its image still open) serves again, without a remount…
    assert!(
        wait_for(BOUND, || nbd.io(&["read -P 0x99 0 1M"]).0),
        "NBD reads did not resume after enable"
    );
    drop(nbd);
    // …and a fresh open works; the refused write never reached the disk.
    qemu_io(
        &env,
        &["-f", "raw", "-t", "none"],
        &image,
        &["read -P 0x99 0 1M"],
    );
    m.unmount();
}

/// An interactive qemu-io (commands on its stdin) holding an image open; killed on drop.
struct QemuIo {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<Vec<u8>>,
}

const PROMPT: &str = "qemu-io> ";

impl QemuIo {
    fn open(args: &[&str], image: &Path) -> (QemuIo, String) {
        let mut child = Command::new("qemu-io")
            .args(args)
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-io");
        let (tx, rx) = channel();
        for mut r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        let mut q = QemuIo { child, stdin, rx };
        let banner = q.until_prompt();
        (q, banner)
    }

    /// Output up to the next prompt (bounded).
    fn until_prompt(&mut self) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        while !String::from_utf8_lossy(&out).ends_with(PROMPT) {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => out.extend(chunk),
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "qemu-io: no prompt in time; output: {}",
                        String::from_utf8_lossy(&out)
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("qemu-io exited; output: {}", String::from_utf8_lossy(&out))
                }
            }
        }
        // Give stderr (error messages) a moment to arrive after the prompt.
        while let Ok(chunk) = self.rx.recv_timeout(Duration::from_millis(30)) {
            out.extend(chunk);
        }
        String::from_utf8_lossy(&out).replace(PROMPT, "")
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").expect("write to qemu-io");
        self.stdin.flush().unwrap();
        self.until_prompt()
    }
}

impl QemuIo {
    /// `quit`, and wait (bounded) for it to exit.
    fn quit(mut self) {
        writeln!(self.stdin, "quit").expect("write to qemu-io");
        self.stdin.flush().unwrap();
        let mut status = None;
        assert!(
            wait_for(BOUND, || {
                status = self.child.try_wait().unwrap();
                status.is_some()
            }),
            "qemu-io did not exit on quit"
        );
        // qemu-io's exit status counts the commands that failed (here on purpose); it must
        // exit, not crash.
        assert!(status.unwrap().code().is_some(), "qemu-io died: {status:?}");
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn io_ok(out: &str) -> bool {
    !out.contains("failed") && !out.contains("Pattern") && !out.trim().is_empty()
}

#[test]
fn revocation_reaches_a_qemu_io_holding_the_image() {
    let Some(env) = setup("revocation_reaches_a_qemu_io_holding_the_image") else {
        return;
    };
    let m = env.mount_with(&[POLL]);
    let image = m.p("vm.qcow2");
    run(
        &env,
        "qemu-img",
        &["create", "-f", "qcow2", image.to_str().unwrap(), "8M"],
    );
    qemu_io(&env, &["-t", "none"], &image, &["write -P 0xab 0 1M"]);
    // A VM-like user: the image open with O_DIRECT for the whole test.
    let (mut vm, banner) = QemuIo::open(&["-t", "none"], &image);
    assert!(!banner.contains("Could not"), "{banner}");
    let out = vm.cmd("read -P 0xab 0 64k");
    assert!(io_ok(&out), "{out}");

    env.ok(&["key", "disable", "k"]);
    let t0 = Instant::now();
    let mut last = String::new();
    assert!(
        wait_for(BOUND, || {
            last = vm.cmd("read -P 0xab 0 64k");
            !io_ok(&last)
        }),
        "the open image kept reading after the key was disabled: {last}"
    );
    eprintln!(
        "qemu-io read failed {:?} after disable: {last}",
        t0.elapsed()
    );
    assert!(last.contains("read failed"), "{last}");
    // Writes into an allocated cluster fail too.
    let out = vm.cmd("write -P 0xee 0 4k");
    assert!(
        out.contains("write failed"),
        "write under a disabled key: {out}"
    );
    // A fresh open fails while the key is disabled.
    let o = Command::new("qemu-io")
        .args(["-r", "-U", "-t", "none", "-c", "read -P 0xab 0 64k"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        !o.status.success() || !io_ok(&out_text(&o)),
        "a fresh open read the image under a disabled key: {}",
        out_text(&o)
    );

    env.ok(&["key", "enable", "k"]);
    // The held image reads again, without a remount, and the refused write never landed.
    assert!(
        wait_for(BOUND, || io_ok(&vm.cmd("read -P 0xab 0 1M"))),
        "the held image did not resume after enable"
    );
    vm.quit();
    // A fresh open works.
    qemu_io(&env, &["-t", "none"], &image, &["read -P 0xab 0 1M"]);
    img_check(&env, &image);
    m.unmount();
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let Some(env) = setup("discard_and_write_zeroes_read_back_zeros") else {
        return;
    };
    let m = env.mount();
    let raw = m.p("d.raw");
    let qcow = m.p("d.qcow2");
    run(
        &env,
        "qemu-img",
        &["create", "-f", "raw", raw.to_str().unwrap(), "4M"],
    );
    run(
        &env,
        "qemu-img",
        &["create", "-f", "qcow2", qcow.to_str().unwrap(), "8M"],
    );
    // raw with discard=unmap: discard punches a hole (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE),
    // write -z uses FALLOC_FL_ZERO_RANGE, write -z -u punches a hole.
    qemu_io(
        &env,
        &["-f", "raw", "-t", "none", "-d", "unmap"],
        &raw,
        &[
            "write -P 0xcd 0 3M",
            "discard 0 1M",
            "write -z 1M 64k",
            "write -z -u 1088k 64k",
            "write -z 2M 1536",
            "read -P 0 0 1M",
            "read -P 0 1M 128k",
            "read -P 0xcd 1152k 896k",
            "read -P 0 2M 1536",
            "read -P 0xcd 2098688 1047040",
        ],
    );
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 4 * MIB, "KEEP_SIZE");
    // Buffered readers see the zeros too.
    let f = std::fs::File::open(&raw).unwrap();
    let mut buf = vec![0xffu8; 8192];
    f.read_exact_at(&mut buf, 1000).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(f);
    // qcow2 with discard=unmap: the clusters are freed and read as zeros.
    qemu_io(
        &env,
        &["-f", "qcow2", "-t", "none", "-d", "unmap"],
        &qcow,
        &[
            "write -P 0xab 0 2M",
            "discard 0 1M",
            "read -P 0 0 1M",
            "read -P 0xab 1M 1M",
        ],
    );
    img_check(&env, &qcow);
    let map = run(
        &env,
        "qemu-img",
        &["map", "--output=json", qcow.to_str().unwrap()],
    );
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let first = &map.as_array().unwrap()[0];
    assert_eq!(first["start"], 0);
    assert_eq!(
        first["data"], false,
        "discarded range still allocated: {map}"
    );
    m.unmount();
    // Still zeros (and data) after a remount.
    let m = env.mount();
    qemu_io(
        &env,
        &["-f", "raw", "-t", "none"],
        &raw,
        &[
            "read -P 0 0 1M",
            "read -P 0xcd 1152k 896k",
            "read -P 0 2M 1536",
        ],
    );
    qemu_io(
        &env,
        &["-t", "none"],
        &qcow,
        &["read -P 0 0 1M", "read -P 0xab 1M 1M"],
    );
    m.unmount();
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Aligned {
        let buf = vec![fill; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        Aligned { buf, off, len }
    }
    fn get(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

#[test]
fn o_direct_is_coherent_with_the_page_cache() {
    let Some(env) = setup("o_direct_is_coherent_with_the_page_cache") else {
        return;
    };
    let m = env.mount();
    let p = m.p("disk.img");
    std::fs::write(&p, vec![0x11u8; 256 * 1024]).unwrap();
    let buffered = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    // Fill the page cache through the buffered handle.
    let mut b = vec![0u8; 64 * 1024];
    buffered.read_exact_at(&mut b, 64 * 1024).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    // An O_DIRECT write replaces what the cache held: buffered readers see it at once.
    let w = Aligned::new(64 * 1024, 0x22);
    assert_eq!(direct.write_at(w.get(), 64 * 1024).unwrap(), 64 * 1024);
    buffered.read_exact_at(&mut b, 64 * 1024).unwrap();
    assert!(
        b.iter().all(|&x| x == 0x22),
        "stale page cache after O_DIRECT write"
    );
    // A buffered write is visible to O_DIRECT readers (kekfs caches no writes).
    buffered.write_all_at(&[0x33u8; 5000], 70_000).unwrap();
    let mut r = Aligned::new(64 * 1024, 0);
    direct.read_exact_at(r.get_mut(), 64 * 1024).unwrap();
    let got = r.get();
    let rel = 70_000 - 64 * 1024;
    assert!(got[..rel].iter().all(|&x| x == 0x22));
    assert!(got[rel..rel + 5000].iter().all(|&x| x == 0x33));
    assert!(got[rel + 5000..].iter().all(|&x| x == 0x22));
    // Unaligned O_DIRECT I/O is passed through too (FUSE imposes no alignment).
    let mut odd = vec![0u8; 777];
    direct.read_exact_at(&mut odd, 69_999).unwrap();
    assert_eq!(odd[0], 0x22);
    assert!(odd[1..].iter().all(|&x| x == 0x33));
    drop((buffered, direct));
    m.unmount();
    let m = env.mount();
    let all = std::fs::read(&p).unwrap();
    assert_eq!(all.len(), 256 * 1024);
    assert!(all[70_000..75_000].iter().all(|&x| x == 0x33));
    assert!(all[..64 * 1024].iter().all(|&x| x == 0x11));
    m.unmount();
}

#[test]
fn o_direct_writes_survive_a_killed_daemon() {
    let Some(env) = setup("o_direct_writes_survive_a_killed_daemon") else {
        return;
    };
    let m = env.mount();
    let p = m.p("vm.raw");
    run(
        &env,
        "qemu-img",
        &["create", "-f", "raw", p.to_str().unwrap(), "1M"],
    );
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    // As a VM with cache=none writes: O_DIRECT, no flush, then the daemon dies.
    let w = Aligned::new(256 * 1024, 0x7e);
    assert_eq!(direct.write_at(w.get(), 128 * 1024).unwrap(), 256 * 1024);
    let pid = m.pid();
    // SAFETY: sending a signal to the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    drop(direct);
    force_unmount(&env.mnt);
    assert!(wait_for(BOUND, || !is_mounted(&env.mnt)));
    assert!(
        wait_for(BOUND, || lock_is_free(&env.backing)),
        "the volume lock outlived the killed daemon"
    );
    drop(m);
    let m = env.mount();
    qemu_io(
        &env,
        &["-f", "raw", "-t", "none"],
        &p,
        &[
            "read -P 0 0 128k",
            "read -P 0x7e 128k 256k",
            "read -P 0 384k 640k",
        ],
    );
    m.unmount();
}

#[test]
fn fio_direct_io_verify() {
    if !fio_available("fio_direct_io_verify") {
        return;
    }
    let Some(env) = Env::new("fio_direct_io_verify") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    for (name, extra) in [
        (
            "rand4k",
            &["--rw=randrw", "--bs=4k", "--ioengine=psync"][..],
        ),
        (
            "seq128k",
            &[
                "--rw=write",
                "--bs=128k",
                "--ioengine=libaio",
                "--iodepth=4",
            ][..],
        ),
        // 1 MiB writes go out in two halves, the lower one from the write helper; two
        // jobs at once make one of them find the helper busy now and then.
        (
            "rand1m",
            &[
                "--rw=randwrite",
                "--bs=1m",
                "--ioengine=libaio",
                "--iodepth=4",
                "--numjobs=2",
            ][..],
        ),
    ] {
        let o = Command::new("fio")
            .arg(format!("--name={name}"))
            .arg(format!("--directory={}", m.mnt.display()))
            .args([
                "--direct=1",
                "--size=8m",
                "--verify=crc32c",
                "--do_verify=1",
            ])
            .args(extra)
            .output()
            .unwrap();
        let text = out_text(&o);
        assert!(
            o.status.success() && text.contains("err= 0"),
            "fio {name} direct=1 failed:\n{text}\ndaemon log:\n{}",
            env.daemon_log()
        );
        assert!(!text.contains("verify: bad"), "{text}");
    }
    m.unmount();
}
