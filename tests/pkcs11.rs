//! `pkcs11:` KEKs against a real SoftHSM2 token: every test creates its own token directory
//! with scripts/softhsm-setup.sh and sets SOFTHSM2_CONF on the kekfs commands it runs (and
//! so on their mount daemons). Token-side changes (reading attributes, CKA_UNWRAP, dates,
//! destroying objects, RSA key generation) are made by this test binary re-run as a helper
//! process with cryptoki, so that each helper initialises SoftHSM2 with its own config.
//!
//! Without SoftHSM2 the tests are skipped with a message, unless CI=true: then they fail.

mod common;
use common::softhsm::*;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The helper's command, in the environment of the re-run test binary.
const HELPER_ENV: &str = "KEKFS_P11_TEST_HELPER";
const HELPER_PIN_ENV: &str = "KEKFS_P11_TEST_HELPER_PIN";
const HELPER_MODULE_ENV: &str = "KEKFS_P11_TEST_HELPER_MODULE";

/// A private SoftHSM2 token directory (one or more tokens).
struct Hsm {
    conf: PathBuf,
    pinfile: PathBuf,
    module: &'static str,
    token: String,
}

impl Hsm {
    /// A new token directory `env.dir/NAME` with one token labelled `token`.
    fn new(env: &Env, module: &'static str, name: &str, token: &str) -> Hsm {
        let t = softhsm_setup(&env.dir.path().join(name), token, SO_PIN, PIN);
        assert_eq!(
            t.stdout.trim(),
            format!("export SOFTHSM2_CONF={}", t.conf.display()),
            "setup prints the export line"
        );
        assert!(t.conf.is_file());
        assert_eq!(std::fs::read_to_string(&t.pinfile).unwrap().trim(), PIN);
        Hsm {
            conf: t.conf,
            pinfile: t.pinfile,
            module,
            token: token.to_string(),
        }
    }

    /// `pkcs11:token=T;object=LABEL[;extra]?module-path=…&pin-source=file:…`.
    fn uri(&self, object: &str, extra: &str) -> String {
        format!(
            "pkcs11:token={};object={object}{extra}?module-path={}&pin-source=file:{}",
            self.token,
            self.module,
            self.pinfile.display()
        )
    }

    /// The same without module-path: kekfs finds the module itself.
    fn uri_default_module(&self, object: &str) -> String {
        format!(
            "pkcs11:token={};object={object}?pin-source=file:{}",
            self.token,
            self.pinfile.display()
        )
    }

    fn cmd(&self, env: &Env) -> Command {
        let mut c = env.kekfs();
        c.env("SOFTHSM2_CONF", &self.conf)
            .env_remove("KEKFS_PKCS11_MECHANISM");
        c
    }

    fn run(&self, env: &Env, args: &[&str]) -> Output {
        self.cmd(env).args(args).output().expect("run kekfs")
    }

    fn ok(&self, env: &Env, args: &[&str]) -> String {
        check_ok(args, self.run(env, args))
    }

    /// Create the token key `vol-kek` and a volume on `env.backing` wrapped by it; the
    /// key's URI.
    fn volume(&self, env: &Env) -> String {
        let uri = self.uri("vol-kek", "");
        self.ok(env, &["key", "create", "--kek", &uri]);
        self.ok(env, &["init", env.backing.to_str().unwrap(), "--kek", &uri]);
        uri
    }

    /// Run a token operation in a helper process (this test binary, re-run).
    fn helper(&self, args: &[&str]) -> String {
        let mut cmd = vec![self.token.as_str()];
        cmd.extend_from_slice(args);
        let o = Command::new(std::env::current_exe().expect("test binary"))
            .args(["p11_helper", "--exact", "--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, cmd.join(" "))
            .env(HELPER_PIN_ENV, PIN)
            .env(HELPER_MODULE_ENV, self.module)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .expect("run helper");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "helper {args:?} failed:\n{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        // libtest may print "test p11_helper ... " on the same line as the output.
        out.lines()
            .filter_map(|l| l.split_once("@@HELPER@@ ").map(|(_, r)| r))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `kekfs mount` (with SOFTHSM2_CONF, so the daemon has it too); unmounted on drop.
    fn mount(&self, env: &Env, opts: &[&str]) -> Mounted {
        env.mount_by(opts, |args| {
            self.ok(env, args);
        })
    }

    fn mount_fails(&self, env: &Env) -> Output {
        let o = self.run(
            env,
            &[
                "mount",
                env.backing.to_str().unwrap(),
                env.mnt.to_str().unwrap(),
            ],
        );
        if o.status.success() {
            force_unmount(&env.mnt);
            panic!("mount succeeded but should have been refused");
        }
        assert!(!is_mounted(&env.mnt));
        o
    }
}

/// Assert the command failed with `code` and its message contains every `needle`.
fn assert_fails(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

fn status_json(hsm: &Hsm, env: &Env, path: &Path) -> serde_json::Value {
    let out = hsm.ok(env, &["status", path.to_str().unwrap(), "--json"]);
    serde_json::from_str(&out).expect("status --json")
}

fn wrapped_by(hsm: &Hsm, env: &Env, path: &Path) -> Vec<u64> {
    wrapped_by_versions(&status_json(hsm, env, path))
}

/// The mechanism ids recorded in the volume header's slots.
fn slot_mechanisms(backing: &Path) -> Vec<u16> {
    let (h, _) = kekfs::volume::read_header(backing).expect("header");
    h.slots.iter().map(|s| s.mechanism).collect()
}

fn write_read(m: &Mounted) {
    std::fs::write(m.p("hello.txt"), b"hello from a token").unwrap();
    std::fs::create_dir(m.p("dir")).unwrap();
    std::fs::write(m.p("dir/inner"), vec![7u8; 10_000]).unwrap();
    assert_eq!(
        std::fs::read(m.p("hello.txt")).unwrap(),
        b"hello from a token"
    );
}

fn read_back(m: &Mounted) {
    assert_eq!(
        std::fs::read(m.p("hello.txt")).unwrap(),
        b"hello from a token"
    );
    assert_eq!(std::fs::read(m.p("dir/inner")).unwrap(), vec![7u8; 10_000]);
}

fn env_and_hsm(test: &str, fuse: bool) -> Option<(Env, Hsm)> {
    let module = softhsm(test)?;
    let env = if fuse {
        Env::new(test)?
    } else {
        Env::new_unchecked()
    };
    let hsm = Hsm::new(&env, module, "hsm", "kekfs");
    Some((env, hsm))
}

// ----------------------------------------------------------------------------------------

#[test]
fn aes_kek_init_mount_read_write() {
    let Some((env, hsm)) = env_and_hsm("aes_kek_init_mount_read_write", true) else {
        return;
    };
    // The README path: no module-path, kekfs finds the module (p11-kit proxy or SoftHSM2).
    let uri = hsm.uri_default_module("vol-kek");
    let out = hsm.ok(&env, &["key", "create", "--kek", &uri]);
    assert!(
        out.contains("version 1") && out.contains("CKA_ID %01"),
        "{out}"
    );
    let b = env.backing.to_str().unwrap();
    let out = hsm.ok(&env, &["init", b, "--kek", &uri]);
    assert!(out.contains("key version 1"), "{out}");
    let st = status_json(&hsm, &env, &env.backing);
    assert_eq!(st["kek"].as_str(), Some(uri.as_str()));
    assert_eq!(st["pinned_version"].as_u64(), Some(0));
    assert_eq!(wrapped_by(&hsm, &env, &env.backing), [1, 1]);
    // CKM_AES_KEY_WRAP_PAD is SoftHSM2's first choice.
    assert_eq!(
        slot_mechanisms(&env.backing),
        [kekfs::kek::mechanism::PKCS11_AES_KEY_WRAP_PAD; 2]
    );
    let m = hsm.mount(&env, &[]);
    write_read(&m);
    m.unmount();
    // The backing dir holds no plaintext.
    for f in content_files(&env.backing) {
        let data = std::fs::read(&f).unwrap();
        assert!(!data.windows(10).any(|w| w == b"hello from"), "{f:?}");
    }
    // -o kek=URI must match the volume's KEK (it does).
    let opt = format!("kek={uri}");
    let m = hsm.mount(&env, &[opt.as_str()]);
    read_back(&m);
    m.unmount();
}

#[test]
fn key_create_makes_a_sensitive_non_extractable_token_key() {
    let Some((env, hsm)) = env_and_hsm("key_create_attributes", false) else {
        return;
    };
    let uri = hsm.uri("vol-kek", "");
    hsm.ok(&env, &["key", "create", "--kek", &uri]);
    let attrs = hsm.helper(&["attrs", "vol-kek", "01"]);
    for want in [
        "count=1",
        "class=secret",
        "key_type=AES",
        "value_len=32",
        "token=true",
        "private=true",
        "sensitive=true",
        "always_sensitive=true",
        "extractable=false",
        "never_extractable=true",
        "wrap=true",
        "unwrap=true",
        "encrypt=true",
        "decrypt=true",
        "value=unreadable",
    ] {
        assert!(
            attrs.split_whitespace().any(|a| a == want),
            "{want} not in {attrs}"
        );
    }
    // A second create of the same label is refused; rotate adds version 2.
    let o = hsm.run(&env, &["key", "create", "--kek", &uri]);
    assert_fails(&o, 18, &["already exists", "key rotate"]);
    let out = hsm.ok(&env, &["key", "rotate", "--kek", &uri]);
    assert!(
        out.contains("version 2") && out.contains("CKA_ID %02"),
        "{out}"
    );
    assert!(
        hsm.helper(&["attrs", "vol-kek", "02"])
            .contains("extractable=false")
    );
    // Rotating a label with no key is "not found"; creating with an explicit free id works.
    let o = hsm.run(&env, &["key", "rotate", "--kek", &hsm.uri("nope", "")]);
    assert_fails(&o, 14, &["no key \"nope\""]);
    hsm.ok(
        &env,
        &["key", "create", "--kek", &hsm.uri("other", ";id=%05")],
    );
    assert!(hsm.helper(&["attrs", "other", "05"]).contains("count=1"));
    // The soft: path still works the old way.
    env.ok(&["keystore", "init"]);
    env.ok(&["key", "create", "soft-k"]);
    let out = env.ok(&["key", "rotate", "soft-k"]);
    assert!(out.contains("version 2"), "{out}");
    assert_eq!(
        env.run(&["key", "create"]).status.code(),
        Some(2),
        "NAME or --kek is required"
    );
}

#[test]
fn rsa_3072_kek_init_mount_read_write() {
    let Some((env, hsm)) = env_and_hsm("rsa_3072_kek_init_mount_read_write", true) else {
        return;
    };
    hsm.helper(&["rsa", "rsa-kek", "01", "3072"]);
    let uri = hsm.uri("rsa-kek", "");
    let b = env.backing.to_str().unwrap();
    hsm.ok(&env, &["init", b, "--kek", &uri]);
    assert_eq!(wrapped_by(&hsm, &env, &env.backing), [1, 1]);
    // SoftHSM 2.6 takes only SHA-1 OAEP; a token with SHA-256 OAEP gets that.
    let mechs = slot_mechanisms(&env.backing);
    assert!(
        mechs
            .iter()
            .all(|&m| m == kekfs::kek::mechanism::PKCS11_RSA_OAEP_SHA1
                || m == kekfs::kek::mechanism::PKCS11_RSA_OAEP_SHA256),
        "{mechs:?}"
    );
    let m = hsm.mount(&env, &[]);
    write_read(&m);
    m.unmount();
    let m = hsm.mount(&env, &[]);
    read_back(&m);
    m.unmount();

    // RSA below 3072 bits is refused as unsupported.
    hsm.helper(&["rsa", "small", "01", "2048"]);
    let b2 = env.dir.path().join("small").display().to_string();
    let o = hsm.run(&env, &["init", &b2, "--kek", &hsm.uri("small", "")]);
    assert_fails(&o, 32, &["RSA-2048", "3072"]);
}

#[test]
fn fallback_mechanisms_aes_key_wrap_and_gcm() {
    let Some((env, hsm)) = env_and_hsm("fallback_mechanisms", true) else {
        return;
    };
    let uri = hsm.uri("vol-kek", "");
    hsm.ok(&env, &["key", "create", "--kek", &uri]);
    for (name, id) in [
        ("aes-key-wrap", kekfs::kek::mechanism::PKCS11_AES_KEY_WRAP),
        ("aes-gcm", kekfs::kek::mechanism::PKCS11_AES_GCM),
    ] {
        let backing = env.dir.path().join(format!("vol-{name}"));
        let b = backing.to_str().unwrap();
        let o = hsm
            .cmd(&env)
            .env("KEKFS_PKCS11_MECHANISM", name)
            .args(["init", b, "--kek", &uri])
            .output()
            .unwrap();
        check_ok(&["init"], o);
        assert_eq!(slot_mechanisms(&backing), [id; 2], "{name}");
        // Unwrapping uses the recorded mechanism, whatever the environment says.
        let mnt = env.dir.path().join(format!("mnt-{name}"));
        std::fs::create_dir(&mnt).unwrap();
        let log = env.dir.path().join(format!("{name}.log"));
        let args = [
            "mount",
            b,
            mnt.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ];
        hsm.ok(&env, &args);
        let m = Mounted {
            mnt: mnt.clone(),
            backing: backing.clone(),
        };
        std::fs::write(m.p("f"), name).unwrap();
        m.unmount();
        let m = {
            hsm.ok(&env, &args);
            Mounted { mnt, backing }
        };
        assert_eq!(std::fs::read_to_string(m.p("f")).unwrap(), name);
        m.unmount();
    }
    // A forced mechanism that does not fit the key is a clear error.
    let o = hsm
        .cmd(&env)
        .env("KEKFS_PKCS11_MECHANISM", "rsa-oaep-sha1")
        .args([
            "init",
            env.dir.path().join("x").to_str().unwrap(),
            "--kek",
            &uri,
        ])
        .output()
        .unwrap();
    assert_fails(&o, 32, &["rsa-oaep-sha1"]);
}

#[test]
fn volume_cannot_be_opened_with_another_key_of_the_same_label() {
    let Some((env, hsm)) = env_and_hsm("another_key_same_label", true) else {
        return;
    };
    let uri = hsm.uri("vol-kek", "");
    hsm.ok(&env, &["key", "create", "--kek", &uri]);
    let b = env.backing.to_str().unwrap();
    hsm.ok(&env, &["init", b, "--kek", &uri]);

    // Another token directory with a token of the same label and a key of the same
    // label and CKA_ID: same URI, different key material.
    let module = hsm.module;
    let other = Hsm::new(&env, module, "hsm-other", "kekfs");
    other.ok(&env, &["key", "create", "--kek", &other.uri("vol-kek", "")]);
    // The volume's URI names the first token's pin file; the other token has the same PIN.
    let o = other.mount_fails(&env);
    assert_fails(&o, 11, &["unwrap failed", "another key"]);

    // Same token, same label, different CKA_ID: version 1 destroyed, version 2 relabelled
    // as CKA_ID 01. The volume (wrapped by the old version 1) must not open.
    let pinned = env.dir.path().join("pinned");
    hsm.ok(&env, &["key", "rotate", "--kek", &uri]);
    hsm.ok(
        &env,
        &[
            "init",
            pinned.to_str().unwrap(),
            "--kek",
            &hsm.uri("vol-kek", ";id=%01"),
        ],
    );
    assert_eq!(wrapped_by(&hsm, &env, &pinned), [1, 1]);
    hsm.helper(&["destroy", "vol-kek", "01"]);
    hsm.helper(&["set-id", "vol-kek", "02", "01"]);
    let o = hsm.run(
        &env,
        &["mount", pinned.to_str().unwrap(), env.mnt.to_str().unwrap()],
    );
    if o.status.success() {
        force_unmount(&env.mnt);
    }
    assert_fails(&o, 11, &["unwrap failed"]);
    // The original volume (same key version 1 by number) is refused too.
    let o = hsm.mount_fails(&env);
    assert_fails(&o, 11, &["unwrap failed"]);
}

#[test]
fn wrong_pin_refuses_mount_with_the_pin_exit_code() {
    let Some((env, hsm)) = env_and_hsm("wrong_pin", true) else {
        return;
    };
    let uri = hsm.volume(&env);
    std::fs::write(&hsm.pinfile, "9999\n").unwrap();
    let o = hsm.mount_fails(&env);
    assert_fails(&o, 12, &["wrong PIN", "token 'kekfs'"]);
    assert!(!stderr(&o).contains("9999"), "the PIN is never printed");
    let o = hsm.run(
        &env,
        &[
            "init",
            env.dir.path().join("v2").to_str().unwrap(),
            "--kek",
            &uri,
        ],
    );
    assert_fails(&o, 12, &["wrong PIN"]);
    // Back to the right PIN: mounts.
    std::fs::write(&hsm.pinfile, format!("{PIN}\n")).unwrap();
    hsm.mount(&env, &[]).unmount();
    // A PIN from an environment variable named by the URI.
    let env_uri = format!(
        "pkcs11:token=kekfs;object=vol-kek?module-path={}&pin-source=env:KEKFS_TEST_PIN",
        hsm.module
    );
    let v3 = env.dir.path().join("v3");
    let o = hsm
        .cmd(&env)
        .env("KEKFS_TEST_PIN", PIN)
        .args(["init", v3.to_str().unwrap(), "--kek", &env_uri])
        .output()
        .unwrap();
    check_ok(&["init with pin-source=env:"], o);
}

#[test]
fn destroyed_key_refuses_mount_with_key_not_found() {
    let Some((env, hsm)) = env_and_hsm("destroyed_key", true) else {
        return;
    };
    hsm.volume(&env);
    hsm.helper(&["destroy", "vol-kek", "01"]);
    let o = hsm.mount_fails(&env);
    assert_fails(&o, 14, &["key not found", "no version 1"]);
}

#[test]
fn unwrap_disabled_and_dates_refuse_mount_until_restored() {
    let Some((env, hsm)) = env_and_hsm("unwrap_disabled", true) else {
        return;
    };
    hsm.volume(&env);

    hsm.helper(&["set-unwrap", "vol-kek", "01", "false"]);
    let o = hsm.mount_fails(&env);
    assert_fails(&o, 13, &["refused: disabled", "CKA_UNWRAP is false"]);
    hsm.helper(&["set-unwrap", "vol-kek", "01", "true"]);
    hsm.mount(&env, &[]).unmount();

    // A date on the (private) AES key: SoftHSM 2.6 cannot read it back, so kekfs cannot
    // check it and fails closed; clearing the date restores the key.
    hsm.helper(&["set-date", "vol-kek", "01", "end", "29991231"]);
    let o = hsm.mount_fails(&env);
    assert_fails(
        &o,
        13,
        &["refused: expired", "CKA_END_DATE is set but cannot be read"],
    );
    hsm.helper(&["set-date", "vol-kek", "01", "end", "none"]);
    hsm.mount(&env, &[]).unmount();

    // Readable dates (on an RSA key's public object): kekfs enforces them, the token does
    // not.
    hsm.helper(&["rsa", "rsa-kek", "01", "3072"]);
    let rsa = env.dir.path().join("rsa");
    let rsa_uri = hsm.uri("rsa-kek", "");
    hsm.ok(&env, &["init", rsa.to_str().unwrap(), "--kek", &rsa_uri]);
    let mount_rsa = || {
        hsm.run(
            &env,
            &["mount", rsa.to_str().unwrap(), env.mnt.to_str().unwrap()],
        )
    };
    hsm.helper(&["set-date", "rsa-kek", "01", "end", "20000101", "public"]);
    let o = mount_rsa();
    assert_fails(&o, 13, &["refused: expired", "CKA_END_DATE was 2000-01-01"]);
    hsm.helper(&["set-date", "rsa-kek", "01", "end", "29991231", "public"]);
    hsm.helper(&["set-date", "rsa-kek", "01", "start", "29990101", "public"]);
    let o = mount_rsa();
    assert_fails(
        &o,
        13,
        &["refused: not yet valid", "CKA_START_DATE is 2999-01-01"],
    );
    // A new volume cannot be wrapped under a refused key either.
    let o = hsm.run(
        &env,
        &[
            "init",
            env.dir.path().join("rsa2").to_str().unwrap(),
            "--kek",
            &rsa_uri,
        ],
    );
    assert_fails(&o, 13, &["not yet valid"]);
    hsm.helper(&["set-date", "rsa-kek", "01", "start", "20000101", "public"]);
    check_ok(&["mount rsa"], mount_rsa());
    let m = Mounted {
        mnt: env.mnt.clone(),
        backing: rsa.clone(),
    };
    std::fs::write(m.p("f"), b"x").unwrap();
    m.unmount();
}

#[test]
fn mounted_volume_stops_and_resumes_with_cka_unwrap() {
    let Some((env, hsm)) = env_and_hsm("mounted_revocation", true) else {
        return;
    };
    hsm.volume(&env);
    // The daemon polls through the token after the fork: this exercises the per-process
    // re-initialisation and the re-login with the kept PIN.
    let m = hsm.mount(&env, &["poll=200ms"]);
    std::fs::write(m.p("f"), b"secret").unwrap();
    hsm.helper(&["set-unwrap", "vol-kek", "01", "false"]);
    let revoked = wait_for(Duration::from_secs(10), || {
        std::fs::read(m.p("f")).is_err_and(|e| e.raw_os_error() == Some(libc::EKEYREVOKED))
    });
    assert!(
        revoked,
        "reads still work with CKA_UNWRAP false; log:\n{}",
        env.daemon_log()
    );
    hsm.helper(&["set-unwrap", "vol-kek", "01", "true"]);
    let resumed = wait_for(Duration::from_secs(10), || {
        std::fs::read(m.p("f")).is_ok_and(|d| d == b"secret")
    });
    assert!(resumed, "no resume; log:\n{}", env.daemon_log());
    m.unmount();
}

#[test]
fn rotate_then_init_wraps_with_version_2() {
    let Some((env, hsm)) = env_and_hsm("rotate_then_init", false) else {
        return;
    };
    let uri = hsm.uri("vol-kek", "");
    hsm.ok(&env, &["key", "create", "--kek", &uri]);
    let v1 = env.dir.path().join("v1");
    hsm.ok(&env, &["init", v1.to_str().unwrap(), "--kek", &uri]);
    assert_eq!(wrapped_by(&hsm, &env, &v1), [1, 1]);
    let out = hsm.ok(&env, &["key", "rotate", "--kek", &uri]);
    assert!(out.contains("version 2"), "{out}");
    let v2 = env.dir.path().join("v2");
    hsm.ok(&env, &["init", v2.to_str().unwrap(), "--kek", &uri]);
    assert_eq!(wrapped_by(&hsm, &env, &v2), [2, 2]);
    assert_eq!(
        status_json(&hsm, &env, &v2)["pinned_version"].as_u64(),
        Some(0)
    );
    // id= pins a version.
    let p1 = env.dir.path().join("p1");
    let pinned = hsm.uri("vol-kek", ";id=%01");
    hsm.ok(&env, &["init", p1.to_str().unwrap(), "--kek", &pinned]);
    assert_eq!(wrapped_by(&hsm, &env, &p1), [1, 1]);
    let st = status_json(&hsm, &env, &p1);
    assert_eq!(st["pinned_version"].as_u64(), Some(1));
    assert_eq!(st["kek"].as_str(), Some(pinned.as_str()));
    // A disabled newest version is skipped by "follow latest".
    hsm.helper(&["set-unwrap", "vol-kek", "02", "false"]);
    let v3 = env.dir.path().join("v3");
    hsm.ok(&env, &["init", v3.to_str().unwrap(), "--kek", &uri]);
    assert_eq!(wrapped_by(&hsm, &env, &v3), [1, 1]);
    // A pinned version that does not exist is "not found".
    let o = hsm.run(
        &env,
        &[
            "init",
            env.dir.path().join("v9").to_str().unwrap(),
            "--kek",
            &hsm.uri("vol-kek", ";id=%09"),
        ],
    );
    assert_fails(
        &o,
        14,
        &["no version 9", "versions present: 1 (AES-256), 2 (AES-256)"],
    );
}

#[test]
fn provider_survives_logout_and_serves_threads() {
    let Some((env, hsm)) = env_and_hsm("provider_in_process", false) else {
        return;
    };
    let uri = hsm.uri("vol-kek", "");
    hsm.ok(&env, &["key", "create", "--kek", &uri]);
    let out = hsm.helper(&["lib-check", "vol-kek", "01", &uri]);
    assert!(out.contains("lib-check ok"), "{out}");
}

#[test]
fn token_module_and_uri_errors_are_distinct() {
    let Some((env, hsm)) = env_and_hsm("token_module_uri_errors", false) else {
        return;
    };
    let b = env.backing.to_str().unwrap();
    let init = |uri: &str| hsm.run(&env, &["init", b, "--kek", uri]);
    // Token absent: lists what is there.
    let o = init(&hsm.uri("vol-kek", "").replace("token=kekfs", "token=nope"));
    assert_fails(&o, 30, &["not present", "token=\"nope\"", "token 'kekfs'"]);
    // Module not loadable.
    let o = init(&format!(
        "pkcs11:token=kekfs;object=k?module-path=/nonexistent/libfoo.so&pin-source=file:{}",
        hsm.pinfile.display()
    ));
    assert_fails(&o, 33, &["/nonexistent/libfoo.so"]);
    // A file that is not a library, where only root can change it (a file in a
    // directory others can write to is refused before any load is tried).
    let o = init(&format!(
        "pkcs11:token=kekfs;object=k?module-path=/etc/passwd&pin-source=file:{}",
        hsm.pinfile.display()
    ));
    assert_fails(&o, 33, &["cannot load PKCS#11 module", "/etc/passwd"]);
    // Key not found: names the token and how to create it.
    let o = init(&hsm.uri("vol-kek", ""));
    assert_fails(&o, 14, &["no key \"vol-kek\"", "kekfs key create --kek"]);
    // Bad URIs are usage errors.
    for (uri, needle) in [
        ("pkcs11:token=kekfs", "object=LABEL"),
        (
            "pkcs11:token=kekfs;object=k?pin-value=1234",
            "pin-value is not accepted",
        ),
        (
            "pkcs11:token=kekfs;object=k;id=%00%01",
            "not a kekfs key version",
        ),
        ("pkcs11:token=my token;object=k", "%20"),
        (
            "pkcs11:token=kekfs;object=k;bogus=1",
            "unknown PKCS#11 URI path attribute",
        ),
    ] {
        let o = init(uri);
        assert_fails(&o, 2, &[needle]);
        assert!(!stderr(&o).contains("1234") || !uri.contains("pin-value"));
    }
    // Nothing was created by the failed inits.
    assert!(!env.backing.join("kekfs.volume").exists());
}

// ----------------------------------------------------------------------------------------
// Token key lifecycle from the CLI, and what a mounted volume does about it.

/// `key_state` of the mounted volume (`state`, and `cause` when revoked).
fn key_state(hsm: &Hsm, env: &Env) -> (String, String) {
    let st = status_json(hsm, env, &env.mnt);
    let s = |k: &str| st["key_state"][k].as_str().unwrap_or("").to_string();
    (s("state"), s("cause"))
}

/// The CKA_WRAP / CKA_UNWRAP pair the helper reads from the version's first object.
fn wrap_unwrap(hsm: &Hsm, label: &str, id: &str) -> (bool, bool) {
    let out = hsm.helper(&["attrs", label, id]);
    (out.contains(" wrap=true"), out.contains(" unwrap=true"))
}

#[test]
fn key_disable_enable_kek_revokes_and_restores_a_mounted_volume() {
    let Some((env, hsm)) = env_and_hsm("token_cli_disable_enable_mounted", true) else {
        return;
    };
    let uri = hsm.volume(&env);
    let m = hsm.mount(&env, &["poll=300ms"]);
    std::fs::create_dir(m.p("dir")).unwrap();
    std::fs::write(m.p("dir/secret.txt"), b"token-guarded payload").unwrap();
    // In the page cache, and a handle held open across the revocation.
    assert_eq!(
        std::fs::read(m.p("dir/secret.txt")).unwrap(),
        b"token-guarded payload"
    );
    let mut held = std::fs::File::open(m.p("dir/secret.txt")).unwrap();
    assert_eq!(handle_errno(&mut held), None);

    let out = hsm.ok(&env, &["key", "disable", "--kek", &uri]);
    assert!(
        out.contains("disabled \"vol-kek\" version 1 (CKA_ID %01)") && out.contains("EKEYREVOKED"),
        "{out}"
    );
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "01"), (false, false));
    assert!(
        wait_for(BOUND, || read_errno(&m.p("dir/secret.txt"))
            == Some(libc::EKEYREVOKED)),
        "a fresh read did not fail with EKEYREVOKED: {:?}; log:\n{}",
        read_errno(&m.p("dir/secret.txt")),
        env.daemon_log()
    );
    assert_eq!(
        handle_errno(&mut held),
        Some(libc::EKEYREVOKED),
        "the handle opened before kept working"
    );
    assert!(
        std::fs::read_dir(m.p("dir")).is_err(),
        "readdir lists names"
    );
    // The status file is published at the end of each poll, just after the gate changed.
    assert!(
        wait_for(BOUND, || key_state(&hsm, &env)
            == ("revoked".to_string(), "disabled".to_string())),
        "status: {:?}",
        key_state(&hsm, &env)
    );
    // Disabling again changes nothing and says so.
    let out = hsm.ok(&env, &["key", "disable", "--kek", &uri, "--version", "1"]);
    assert!(out.contains("(it already was)"), "{out}");

    let out = hsm.ok(&env, &["key", "enable", "--kek", &uri]);
    assert!(out.contains("enabled \"vol-kek\" version 1"), "{out}");
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "01"), (true, true));
    assert!(
        wait_for(BOUND, || read_errno(&m.p("dir/secret.txt")).is_none()),
        "reads did not resume after enable; log:\n{}",
        env.daemon_log()
    );
    assert_eq!(
        std::fs::read(m.p("dir/secret.txt")).unwrap(),
        b"token-guarded payload"
    );
    assert_eq!(handle_errno(&mut held), None, "held handle after enable");
    assert!(wait_for(BOUND, || key_state(&hsm, &env).0 == "active"));

    // The key object destroyed on the token: key not found, ENOKEY.
    hsm.helper(&["destroy", "vol-kek", "01"]);
    assert!(
        wait_for(BOUND, || read_errno(&m.p("dir/secret.txt"))
            == Some(libc::ENOKEY)),
        "a destroyed key did not give ENOKEY: {:?}",
        read_errno(&m.p("dir/secret.txt"))
    );
    assert_eq!(handle_errno(&mut held), Some(libc::ENOKEY));
    assert!(
        wait_for(BOUND, || key_state(&hsm, &env)
            == ("revoked".to_string(), "deleted".to_string())),
        "status: {:?}",
        key_state(&hsm, &env)
    );
    drop(held);
    m.unmount();
    let o = hsm.mount_fails(&env);
    assert_fails(&o, 14, &["key not found"]);
}

#[test]
fn key_rotate_kek_rewraps_a_following_mounted_volume_online() {
    let Some((env, hsm)) = env_and_hsm("token_rotation_online", true) else {
        return;
    };
    let uri = hsm.volume(&env);
    let m = hsm.mount(&env, &["poll=300ms"]);
    std::fs::write(m.p("f"), b"follows the newest version").unwrap();
    assert_eq!(wrapped_by(&hsm, &env, &env.mnt), [1, 1]);
    let out = hsm.ok(&env, &["key", "rotate", "--kek", &uri]);
    assert!(out.contains("version 2"), "{out}");
    assert!(
        wait_for(BOUND, || wrapped_by(&hsm, &env, &env.mnt) == [2, 1]),
        "the mounted volume did not rewrap to version 2: {:?}; log:\n{}",
        wrapped_by(&hsm, &env, &env.mnt),
        env.daemon_log()
    );
    // The old version can go now without affecting the volume.
    let out = hsm.ok(&env, &["key", "disable", "--kek", &uri, "--version", "1"]);
    assert!(out.contains("disabled \"vol-kek\" version 1"), "{out}");
    assert!(!out.contains("version 2"), "only version 1: {out}");
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "01"), (false, false));
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "02"), (true, true));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        std::fs::read(m.p("f")).unwrap(),
        b"follows the newest version"
    );
    assert_eq!(key_state(&hsm, &env).0, "active");
    m.unmount();
    let m = hsm.mount(&env, &[]);
    assert_eq!(
        std::fs::read(m.p("f")).unwrap(),
        b"follows the newest version"
    );
    m.unmount();
}

#[test]
fn key_disable_enable_kek_cli_cases() {
    let Some((env, hsm)) = env_and_hsm("token_cli_disable_cases", false) else {
        return;
    };
    let uri = hsm.uri("vol-kek", "");
    let b = env.backing.to_str().unwrap();
    // No such key: not found.
    let o = hsm.run(&env, &["key", "disable", "--kek", &uri]);
    assert_fails(&o, 14, &["no key \"vol-kek\""]);
    hsm.ok(&env, &["key", "create", "--kek", &uri]);
    hsm.ok(&env, &["key", "rotate", "--kek", &uri]);
    // All versions at once; init is refused while no version is usable.
    let out = hsm.ok(&env, &["key", "disable", "--kek", &uri]);
    assert!(
        out.contains("version 1") && out.contains("version 2"),
        "{out}"
    );
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "01"), (false, false));
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "02"), (false, false));
    let o = hsm.run(&env, &["init", b, "--kek", &uri]);
    assert_fails(&o, 13, &["refused: disabled", "CKA_UNWRAP is false"]);
    // One version, named by --version or by the URI's id=.
    hsm.ok(&env, &["key", "enable", "--kek", &uri, "--version", "1"]);
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "01"), (true, true));
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "02"), (false, false));
    hsm.ok(&env, &["init", b, "--kek", &uri]);
    assert_eq!(wrapped_by(&hsm, &env, &env.backing), [1, 1]);
    hsm.ok(
        &env,
        &["key", "enable", "--kek", &hsm.uri("vol-kek", ";id=%02")],
    );
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "02"), (true, true));
    // Contradictions and unknown versions.
    let o = hsm.run(
        &env,
        &[
            "key",
            "disable",
            "--kek",
            &hsm.uri("vol-kek", ";id=%02"),
            "--version",
            "1",
        ],
    );
    assert_fails(&o, 2, &["contradicts"]);
    let o = hsm.run(&env, &["key", "disable", "--kek", &uri, "--version", "7"]);
    assert_fails(&o, 14, &["no version 7"]);
    assert_eq!(wrap_unwrap(&hsm, "vol-kek", "01"), (true, true));
    // NAME and --kek together, or --version without --kek: usage errors.
    assert_eq!(
        hsm.run(&env, &["key", "disable", "k", "--kek", &uri])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        hsm.run(&env, &["key", "enable", "k", "--version", "1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(hsm.run(&env, &["key", "disable"]).status.code(), Some(2));
}

#[test]
fn rsa_key_create_and_disable_through_the_cli() {
    let Some((env, hsm)) = env_and_hsm("token_cli_rsa", false) else {
        return;
    };
    // type=private asks for an RSA key pair (what a token that cannot wrap with AES gets).
    let uri = hsm.uri("rsa-kek", ";type=private");
    let out = hsm.ok(&env, &["key", "create", "--kek", &uri]);
    assert!(
        out.contains("created RSA-3072 key \"rsa-kek\" version 1"),
        "{out}"
    );
    let b = env.backing.to_str().unwrap();
    hsm.ok(&env, &["init", b, "--kek", &uri]);
    assert!(
        slot_mechanisms(&env.backing)
            .iter()
            .all(|&m| m == kekfs::kek::mechanism::PKCS11_RSA_OAEP_SHA256
                || m == kekfs::kek::mechanism::PKCS11_RSA_OAEP_SHA1),
        "{:?}",
        slot_mechanisms(&env.backing)
    );
    // Rotation keeps the kind.
    let out = hsm.ok(&env, &["key", "rotate", "--kek", &uri]);
    assert!(
        out.contains("created RSA-3072 key \"rsa-kek\" version 2"),
        "{out}"
    );
    // Disable sets CKA_UNWRAP false on the private key and CKA_WRAP false on the public key:
    // neither wrapping (init) nor unwrapping (rewrap needs both) works.
    hsm.ok(&env, &["key", "disable", "--kek", &uri]);
    let other = env.dir.path().join("other");
    let o = hsm.run(&env, &["init", other.to_str().unwrap(), "--kek", &uri]);
    assert_fails(&o, 13, &["refused: disabled"]);
    let o = hsm.run(&env, &["rewrap", b]);
    assert_fails(&o, 13, &["refused: disabled"]);
    hsm.ok(&env, &["key", "enable", "--kek", &uri]);
    hsm.ok(&env, &["init", other.to_str().unwrap(), "--kek", &uri]);
    assert_eq!(wrapped_by(&hsm, &env, &other), [2, 2]);
    hsm.ok(&env, &["rewrap", b]);
    assert_eq!(wrapped_by(&hsm, &env, &env.backing), [2, 1]);
}

// ----------------------------------------------------------------------------------------
// The helper: token operations with cryptoki in a process of their own.

/// Not a test: the entry point of the helper process (does nothing in a normal run).
#[test]
fn p11_helper() {
    let Ok(cmd) = std::env::var(HELPER_ENV) else {
        return;
    };
    helper::run(&cmd);
}

mod helper {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
    use cryptoki::session::{Session, UserType};
    use cryptoki::types::{Date, RawAuthPin};

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn find(s: &Session, label: &str, id: &str) -> Vec<ObjectHandle> {
        s.find_objects(&[
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(unhex(id)),
        ])
        .expect("find")
    }

    fn date(ymd: &str) -> Date {
        Date::new_from_str_slice(&ymd[..4], &ymd[4..6], &ymd[6..8]).expect("date")
    }

    pub fn run(cmd: &str) {
        let args: Vec<&str> = cmd.split(' ').collect();
        let (token, op, label, id) = (args[0], args[1], args[2], args[3]);
        let module = std::env::var(super::HELPER_MODULE_ENV).expect("module");
        let pin = std::env::var(super::HELPER_PIN_ENV).expect("pin");
        let ctx = Pkcs11::new(module).expect("load module");
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("initialize");
        let slot = ctx
            .get_slots_with_token()
            .expect("slots")
            .into_iter()
            .find(|s| ctx.get_token_info(*s).is_ok_and(|t| t.label() == token))
            .expect("token");
        let s = ctx.open_rw_session(slot).expect("session");
        s.login_with_raw(UserType::User, &RawAuthPin::new(Box::new(pin.into_bytes())))
            .expect("login");
        match op {
            "attrs" => {
                let objs = find(&s, label, id);
                let mut out = vec![format!("count={}", objs.len())];
                let h = objs[0];
                let want = [
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::AlwaysSensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ];
                for a in s.get_attributes(h, &want).expect("attributes") {
                    out.push(match a {
                        Attribute::Class(c) if c == ObjectClass::SECRET_KEY => {
                            "class=secret".into()
                        }
                        Attribute::Class(c) => format!("class={c}"),
                        Attribute::KeyType(k) if k == KeyType::AES => "key_type=AES".into(),
                        Attribute::KeyType(k) => format!("key_type={k}"),
                        Attribute::ValueLen(n) => format!("value_len={}", u64::from(n)),
                        Attribute::Token(b) => format!("token={b}"),
                        Attribute::Private(b) => format!("private={b}"),
                        Attribute::Sensitive(b) => format!("sensitive={b}"),
                        Attribute::AlwaysSensitive(b) => format!("always_sensitive={b}"),
                        Attribute::Extractable(b) => format!("extractable={b}"),
                        Attribute::NeverExtractable(b) => format!("never_extractable={b}"),
                        Attribute::Wrap(b) => format!("wrap={b}"),
                        Attribute::Unwrap(b) => format!("unwrap={b}"),
                        Attribute::Encrypt(b) => format!("encrypt={b}"),
                        Attribute::Decrypt(b) => format!("decrypt={b}"),
                        other => format!("{other:?}"),
                    });
                }
                // The key value itself must not be readable.
                let value = s.get_attributes(h, &[AttributeType::Value]);
                out.push(match value {
                    Ok(v) if v.is_empty() => "value=unreadable".into(),
                    Ok(_) => "value=READABLE".into(),
                    Err(_) => "value=unreadable".into(),
                });
                println!("@@HELPER@@ {}", out.join(" "));
            }
            "set-unwrap" => {
                let on = args[4] == "true";
                for h in find(&s, label, id) {
                    let class = s.get_attributes(h, &[AttributeType::Class]).expect("class");
                    if class.contains(&Attribute::Class(ObjectClass::PUBLIC_KEY)) {
                        continue;
                    }
                    s.update_attributes(h, &[Attribute::Unwrap(on)])
                        .expect("set CKA_UNWRAP");
                }
            }
            "destroy" => {
                for h in find(&s, label, id) {
                    s.destroy_object(h).expect("destroy");
                }
            }
            "set-id" => {
                for h in find(&s, label, id) {
                    s.update_attributes(h, &[Attribute::Id(unhex(args[4]))])
                        .expect("set CKA_ID");
                }
            }
            // set-date LABEL ID start|end YYYYMMDD|none [public]: on every object of the
            // version, or only on its public key; `none` clears the date (zero length).
            "set-date" => {
                let ty = if args[4] == "start" {
                    AttributeType::StartDate
                } else {
                    AttributeType::EndDate
                };
                let attr = match (args[5], ty) {
                    ("none", _) => Attribute::VendorDefined((ty, Vec::new())),
                    (d, AttributeType::StartDate) => Attribute::StartDate(date(d)),
                    (d, _) => Attribute::EndDate(date(d)),
                };
                let public_only = args.get(6) == Some(&"public");
                for h in find(&s, label, id) {
                    let class = s.get_attributes(h, &[AttributeType::Class]).expect("class");
                    if public_only && !class.contains(&Attribute::Class(ObjectClass::PUBLIC_KEY)) {
                        continue;
                    }
                    s.update_attributes(h, std::slice::from_ref(&attr))
                        .expect("set date");
                }
            }
            "rsa" => {
                let bits: u64 = args[4].parse().expect("bits");
                let common = [
                    Attribute::Token(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(unhex(id)),
                ];
                let mut public = common.to_vec();
                public.extend([
                    Attribute::ModulusBits(bits.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                    Attribute::Encrypt(true),
                    Attribute::Wrap(true),
                    Attribute::Verify(false),
                ]);
                let mut private = common.to_vec();
                private.extend([
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Decrypt(true),
                    Attribute::Unwrap(true),
                    Attribute::Sign(false),
                ]);
                s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
                    .expect("generate RSA key pair");
            }
            // lib-check LABEL ID URI: the provider in-process, with a logout behind its back
            // and several threads at once.
            "lib-check" => {
                use kekfs::crypto::Key32;
                use kekfs::kek::{KekUri, ProviderOptions, open_provider, passphrase};
                let uri = KekUri::parse(args[4]).expect("uri");
                let opts = ProviderOptions {
                    keystore_dir: "/nonexistent".into(),
                    passphrase: passphrase::PassphraseSource::File("/nonexistent".into()),
                    volume_dir: None,
                };
                let p = open_provider(&uri, &opts).expect("open provider");
                let aek = Key32::generate();
                let w = p.wrap(&aek).expect("wrap");
                assert_eq!(p.unwrap(&w).expect("unwrap").expose(), aek.expose());
                assert_eq!(p.current_version().expect("current version"), Some(1));
                // Someone else in the process logs the application out: private objects
                // vanish from searches until the provider logs in again.
                s.logout().expect("logout");
                assert!(find(&s, label, id).is_empty(), "logged out");
                assert_eq!(
                    p.unwrap(&w).expect("unwrap after logout").expose(),
                    aek.expose()
                );
                // One provider, several threads.
                std::thread::scope(|sc| {
                    for _ in 0..4 {
                        sc.spawn(|| {
                            for _ in 0..5 {
                                assert_eq!(p.unwrap(&w).expect("unwrap").expose(), aek.expose());
                            }
                        });
                    }
                });
                // A tampered blob is "unwrap failed", not a panic or a token error.
                let mut bad = w.clone();
                bad.blob[5] ^= 1;
                let e = p.unwrap(&bad).expect_err("tampered");
                assert!(matches!(e, kekfs::kek::KekError::UnwrapFailed(_)), "{e}");
                println!("@@HELPER@@ lib-check ok");
            }
            other => panic!("unknown helper op {other}"),
        }
        drop(s);
        let _ = ctx.finalize();
    }
}
