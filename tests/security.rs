//! Security properties seen from outside: nothing readable leaks into the backing
//! directory, tampering with ciphertext yields EIO (never wrong data) and a log line,
//! damaged volume headers are refused with the documented exit codes, the volume survives
//! a killed daemon, and a volume cannot be mounted twice.

mod common;
use common::tamper::*;
use common::*;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn flip_byte(path: &Path, off: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x41;
    f.write_all_at(&b, off).unwrap();
}

fn read_block(path: &Path, i: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; CT_BLOCK as usize];
    f.read_exact_at(&mut b, block_off(i)).unwrap();
    b
}

fn write_block(path: &Path, i: u64, b: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(b, block_off(i)).unwrap();
}

// ---------------------------------------------------------------------------------------
// Nothing readable in the backing directory
// ---------------------------------------------------------------------------------------

fn xattrs_of(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid C string and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // Backing filesystems without xattr support simply hold none.
        assert!(
            matches!(e.raw_os_error(), Some(libc::ENOTSUP)),
            "llistxattr {}: {e}",
            path.display()
        );
        return Vec::new();
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        // SAFETY: valid C strings and buffer of the given length.
        let n =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        assert!(n >= 0, "lgetxattr {} {:?}", path.display(), cn);
        val.truncate(n as usize);
        out.push((name.to_vec(), val));
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const MARKERS: [&[u8]; 4] = [b"TOPSECRET", b"PLAINTEXT-MARKER", b"MARKER", b"SECRET"];

#[track_caller]
fn assert_no_marker(what: &str, bytes: &[u8]) {
    for m in MARKERS {
        assert!(
            !contains(bytes, m),
            "{what} contains plaintext marker {:?}",
            String::from_utf8_lossy(m)
        );
    }
}

#[test]
fn backing_dir_holds_no_plaintext() {
    let Some(env) = Env::new("backing_dir_holds_no_plaintext") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let content: Vec<u8> = b"PLAINTEXT-MARKER "
        .iter()
        .copied()
        .cycle()
        .take(3 * BLOCK + 1000)
        .collect();
    std::fs::write(m.p("TOPSECRET-name-file"), &content).unwrap();
    std::fs::write(m.p("TOPSECRET-name-small"), b"PLAINTEXT-MARKER").unwrap();
    std::fs::create_dir(m.p("TOPSECRET-name-dir")).unwrap();
    std::fs::create_dir(m.p("TOPSECRET-name-dir/TOPSECRET-name-nested")).unwrap();
    std::fs::write(
        m.p("TOPSECRET-name-dir/TOPSECRET-name-nested/TOPSECRET-name-deep"),
        &content,
    )
    .unwrap();
    // A name long enough to need the hashed long-name form with a sidecar.
    let long = format!("TOPSECRET-name-long-{}", "L".repeat(200));
    std::fs::write(
        m.p(&format!("TOPSECRET-name-dir/{long}")),
        b"PLAINTEXT-MARKER long",
    )
    .unwrap();
    let target = "/TOPSECRET-target/PLAINTEXT-MARKER-symlink-target";
    std::os::unix::fs::symlink(target, m.p("TOPSECRET-name-link")).unwrap();
    for (f, val) in [
        ("TOPSECRET-name-file", "PLAINTEXT-MARKER-xattr-value"),
        ("TOPSECRET-name-dir", "PLAINTEXT-MARKER-dir-xattr-value"),
    ] {
        let p = CString::new(m.p(f).as_os_str().as_bytes()).unwrap();
        let n = CString::new("user.TOPSECRET-xattr-name").unwrap();
        // SAFETY: valid C strings and value buffer.
        let r =
            unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), val.as_ptr().cast(), val.len(), 0) };
        assert_eq!(r, 0, "setxattr on {f}: {}", io::Error::last_os_error());
    }
    // Everything reads back through the mount.
    assert_eq!(std::fs::read(m.p("TOPSECRET-name-file")).unwrap(), content);
    assert_eq!(
        std::fs::read_link(m.p("TOPSECRET-name-link")).unwrap(),
        Path::new(target)
    );
    let got = xattrs_of(&m.p("TOPSECRET-name-file"));
    assert!(
        got.iter()
            .any(|(n, v)| n == b"user.TOPSECRET-xattr-name" && v == b"PLAINTEXT-MARKER-xattr-value"),
        "{got:?}"
    );
    m.unmount();

    // Walk the whole backing tree: names, symlink targets, contents, xattrs.
    let mut seen = 0;
    let mut stack = vec![env.backing.clone()];
    while let Some(d) = stack.pop() {
        for (n, v) in xattrs_of(&d) {
            assert_no_marker(&format!("xattr name on {}", d.display()), &n);
            assert_no_marker(&format!("xattr value on {}", d.display()), &v);
        }
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            seen += 1;
            assert_no_marker(&format!("name {}", p.display()), e.file_name().as_bytes());
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                assert_no_marker(
                    &format!("symlink target of {}", p.display()),
                    t.as_os_str().as_bytes(),
                );
            } else if ft.is_dir() {
                stack.push(p.clone());
            } else if ft.is_file() {
                let data = std::fs::read(&p).unwrap();
                assert_no_marker(&format!("content of {}", p.display()), &data);
            }
            if !ft.is_symlink() {
                for (n, v) in xattrs_of(&p) {
                    assert_no_marker(&format!("xattr name on {}", p.display()), &n);
                    assert_no_marker(&format!("xattr value on {}", p.display()), &v);
                }
            }
        }
    }
    // root: volume header, dir id; plus file, small, dir, link, and the nested entries.
    assert!(seen >= 9, "only {seen} backing entries seen");
    // The encrypted xattrs really are stored in the backing tree (so the scan saw them).
    let with_xattrs = files_under(&env.backing)
        .iter()
        .filter(|p| !xattrs_of(p).is_empty())
        .count();
    assert!(
        with_xattrs >= 1,
        "no encrypted xattr found in the backing tree"
    );

    let ls = std::process::Command::new("ls")
        .arg("-laR")
        .arg(&env.backing)
        .output()
        .unwrap();
    assert!(ls.status.success());
    assert_no_marker("ls -laR output", &ls.stdout);
    if let Ok(o) = std::process::Command::new("getfattr")
        .args(["-R", "-h", "-d", "-m", "-", "-e", "text"])
        .arg(&env.backing)
        .output()
    {
        assert_no_marker("getfattr output", &o.stdout);
    }
}

// ---------------------------------------------------------------------------------------
// Tampered content
// ---------------------------------------------------------------------------------------

/// A volume holding `victim` (3 full blocks) and `bystander`; returns the victim's
/// backing file and both contents, unmounted.
fn tamper_setup(env: &Env) -> (PathBuf, Vec<u8>, Vec<u8>) {
    env.init_volume();
    let m = env.mount();
    let data = pattern(1, 3 * BLOCK);
    let victim = write_located(&m, "victim", &data);
    let other = pattern(2, 2 * BLOCK + 500);
    std::fs::write(m.p("bystander"), &other).unwrap();
    assert_eq!(
        std::fs::metadata(&victim).unwrap().len(),
        block_off(3),
        "3 full blocks"
    );
    m.unmount();
    (victim, data, other)
}

#[test]
fn tamper_flipped_byte_fails_that_block_only() {
    let Some(env) = Env::new("tamper_flipped_byte_fails_that_block_only") else {
        return;
    };
    let (victim, data, other) = tamper_setup(&env);
    flip_byte(&victim, block_off(1) + 12 + 100);
    let m = env.mount();
    let v = m.p("victim");
    assert_eq!(read_range(&v, 0, BLOCK).unwrap(), &data[..BLOCK]);
    assert_eio(read_range(&v, BLOCK as u64, BLOCK), "block 1");
    assert_eio(read_range(&v, BLOCK as u64 + 10, 20), "part of block 1");
    assert_eq!(
        read_range(&v, 2 * BLOCK as u64, BLOCK).unwrap(),
        &data[2 * BLOCK..]
    );
    assert_eio(std::fs::read(&v), "whole file");
    assert_logged(&env, &victim);
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

#[test]
fn tamper_flipped_nonce_or_tag_fails() {
    let Some(env) = Env::new("tamper_flipped_nonce_or_tag_fails") else {
        return;
    };
    let (victim, data, other) = tamper_setup(&env);
    flip_byte(&victim, block_off(0) + 3); // nonce of block 0
    flip_byte(&victim, block_off(3) - 1); // tag of block 2
    let m = env.mount();
    let v = m.p("victim");
    assert_eio(read_range(&v, 0, BLOCK), "block 0 (nonce)");
    assert_eq!(
        read_range(&v, BLOCK as u64, BLOCK).unwrap(),
        &data[BLOCK..2 * BLOCK]
    );
    assert_eio(read_range(&v, 2 * BLOCK as u64, BLOCK), "block 2 (tag)");
    assert_logged(&env, &victim);
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

#[test]
fn tamper_swapped_blocks_fail() {
    let Some(env) = Env::new("tamper_swapped_blocks_fail") else {
        return;
    };
    let (victim, data, other) = tamper_setup(&env);
    let b0 = read_block(&victim, 0);
    let b1 = read_block(&victim, 1);
    write_block(&victim, 0, &b1);
    write_block(&victim, 1, &b0);
    let m = env.mount();
    let v = m.p("victim");
    assert_eio(read_range(&v, 0, BLOCK), "block 0");
    assert_eio(read_range(&v, BLOCK as u64, BLOCK), "block 1");
    assert_eq!(
        read_range(&v, 2 * BLOCK as u64, BLOCK).unwrap(),
        &data[2 * BLOCK..]
    );
    assert_right_or_eio(std::fs::read(&v), &data, "whole file");
    assert_logged(&env, &victim);
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

#[test]
fn tamper_block_copied_from_other_file_fails() {
    let Some(env) = Env::new("tamper_block_copied_from_other_file_fails") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let a = pattern(10, 3 * BLOCK);
    let b = pattern(20, 3 * BLOCK);
    let fa = write_located(&m, "a", &a);
    let fb = write_located(&m, "b", &b);
    let other = pattern(2, 1000);
    std::fs::write(m.p("bystander"), &other).unwrap();
    m.unmount();
    write_block(&fb, 1, &read_block(&fa, 1));
    let m = env.mount();
    assert_eq!(
        std::fs::read(m.p("a")).unwrap(),
        a,
        "the source file is untouched"
    );
    let pb = m.p("b");
    assert_eq!(read_range(&pb, 0, BLOCK).unwrap(), &b[..BLOCK]);
    assert_eio(read_range(&pb, BLOCK as u64, BLOCK), "copied block");
    assert_eq!(
        read_range(&pb, 2 * BLOCK as u64, BLOCK).unwrap(),
        &b[2 * BLOCK..]
    );
    assert_right_or_eio(std::fs::read(&pb), &b, "whole file b");
    assert_logged(&env, &fb);
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

#[test]
fn tamper_truncated_mid_block_fails_last_block() {
    let Some(env) = Env::new("tamper_truncated_mid_block_fails_last_block") else {
        return;
    };
    let (victim, data, other) = tamper_setup(&env);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.set_len(block_off(2) + 2000).unwrap();
    drop(f);
    let m = env.mount();
    let v = m.p("victim");
    assert_eq!(read_range(&v, 0, BLOCK).unwrap(), &data[..BLOCK]);
    assert_eq!(
        read_range(&v, BLOCK as u64, BLOCK).unwrap(),
        &data[BLOCK..2 * BLOCK]
    );
    assert_eio(
        read_range(&v, 2 * BLOCK as u64, BLOCK),
        "truncated last block",
    );
    assert_eio(
        read_range(&v, 2 * BLOCK as u64 + 5, 5),
        "part of truncated block",
    );
    match std::fs::read(&v) {
        Ok(d) => panic!("whole-file read returned {} bytes instead of EIO", d.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    assert_logged(&env, &victim);
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

#[test]
fn tamper_file_header_fails() {
    let Some(env) = Env::new("tamper_file_header_fails") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let data = pattern(3, 3 * BLOCK);
    let magic = write_located(&m, "bad-magic", &data);
    let version = write_located(&m, "bad-version", &data);
    let id = write_located(&m, "bad-id", &data);
    let short = write_located(&m, "short-header", &data);
    let other = pattern(2, 777);
    std::fs::write(m.p("bystander"), &other).unwrap();
    m.unmount();
    flip_byte(&magic, 1);
    flip_byte(&version, 4);
    flip_byte(&id, 8 + 7);
    // A header cut short: only 10 of the 24 bytes left.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(10)
        .unwrap();
    let m = env.mount();
    for (name, file) in [
        ("bad-magic", &magic),
        ("bad-version", &version),
        ("bad-id", &id),
    ] {
        assert_eio(std::fs::read(m.p(name)), name);
        assert_eio(read_range(&m.p(name), 2 * BLOCK as u64, 100), name);
        assert_logged(&env, file);
    }
    // Shorter than a header: no content at all, never bytes that were not written.
    assert_right_or_eio(std::fs::read(m.p("short-header")), b"", "short header");
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

#[test]
fn tamper_zeroed_header_never_gives_wrong_data() {
    let Some(env) = Env::new("tamper_zeroed_header_never_gives_wrong_data") else {
        return;
    };
    let (victim, _, other) = tamper_setup(&env);
    write_block_raw(&victim, 0, &[0u8; HEADER as usize]);
    let m = env.mount();
    assert_eio(std::fs::read(m.p("victim")), "zeroed header");
    assert_logged(&env, &victim);
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

fn write_block_raw(path: &Path, off: u64, b: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(b, off).unwrap();
}

/// Two content files in one directory swapped under each other's names; returns the
/// contents written to `alpha` and `beta`, and the bystander's.
fn swap_setup(env: &Env) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    env.init_volume();
    let m = env.mount();
    let a = pattern(30, 2 * BLOCK + 10);
    let b = pattern(40, 2 * BLOCK + 10);
    let fa = write_located(&m, "alpha", &a);
    let fb = write_located(&m, "beta", &b);
    let other = pattern(2, 4000);
    std::fs::write(m.p("bystander"), &other).unwrap();
    m.unmount();
    let tmp = fa.with_file_name("kekfs.swap-tmp");
    std::fs::rename(&fa, &tmp).unwrap();
    std::fs::rename(&fb, &fa).unwrap();
    std::fs::rename(&tmp, &fb).unwrap();
    (a, b, other)
}

/// What is guaranteed today: a swapped file is served only as some file's authentic,
/// complete content (or refused), never as corrupted or mixed bytes.
#[test]
fn swapped_content_files_serve_only_authentic_content() {
    let Some(env) = Env::new("swapped_content_files_serve_only_authentic_content") else {
        return;
    };
    let (a, b, other) = swap_setup(&env);
    let m = env.mount();
    for name in ["alpha", "beta"] {
        match std::fs::read(m.p(name)) {
            Ok(d) => assert!(d == a || d == b, "{name}: bytes that were never written"),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOENT)),
                "{name}: {e}"
            ),
        }
    }
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

/// The stronger property: a file swapped under another name is refused. kekfs version 1
/// does not bind content to its name (docs/FORMAT.md, "Known limits"), so this fails
/// today: `alpha` serves beta's content. Run with `--ignored` once names are bound.
#[test]
#[ignore = "known limit of format v1 (docs/FORMAT.md): swapping whole content files within a directory is not detected"]
fn swapped_content_files_never_give_wrong_data() {
    let Some(env) = Env::new("swapped_content_files_never_give_wrong_data") else {
        return;
    };
    let (a, b, other) = swap_setup(&env);
    let m = env.mount();
    for (name, expected) in [("alpha", &a), ("beta", &b)] {
        match std::fs::read(m.p(name)) {
            Ok(d) => assert!(
                d == *expected,
                "{name}: WRONG DATA: the swapped file's content was served"
            ),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOENT)),
                "{name}: {e}"
            ),
        }
    }
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

#[test]
fn content_file_moved_to_other_directory_is_not_served() {
    let Some(env) = Env::new("content_file_moved_to_other_directory_is_not_served") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::create_dir(m.p("d1")).unwrap();
    std::fs::create_dir(m.p("d2")).unwrap();
    let a = pattern(5, 5000);
    let fa = write_located(&m, "d1/same", &a);
    let b = pattern(6, 5000);
    let fb = write_located(&m, "d2/other", &b);
    let other = pattern(2, 100);
    std::fs::write(m.p("bystander"), &other).unwrap();
    m.unmount();
    // Move d1's entry into d2 under its (d1-encrypted) name.
    let moved = fb.parent().unwrap().join(fa.file_name().unwrap());
    std::fs::rename(&fa, &moved).unwrap();
    let m = env.mount();
    assert_eq!(list(&m.p("d1")), Vec::<String>::new());
    assert_eq!(list(&m.p("d2")), ["other"]);
    assert_eq!(std::fs::read(m.p("d2/other")).unwrap(), b);
    assert_eq!(
        std::fs::read(m.p("d2/same")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

#[test]
fn edited_entry_name_disappears_from_listing() {
    let Some(env) = Env::new("edited_entry_name_disappears_from_listing") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let data = pattern(7, 3000);
    let victim = write_located(&m, "victim", &data);
    std::fs::write(m.p("keep1"), b"one").unwrap();
    std::fs::create_dir(m.p("keepdir")).unwrap();
    std::fs::write(m.p("keepdir/inner"), b"inner").unwrap();
    m.unmount();
    // Change one character of the encoded name, keeping it valid base64url of equal length.
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let mut chars: Vec<char> = name.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let edited: String = chars.into_iter().collect();
    assert_ne!(edited, name);
    std::fs::rename(&victim, victim.with_file_name(&edited)).unwrap();
    let m = env.mount();
    assert_eq!(list(&m.mnt), ["keep1", "keepdir"]);
    assert_eq!(
        std::fs::read(m.p("victim")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(std::fs::read(m.p("keep1")).unwrap(), b"one");
    assert_eq!(std::fs::read(m.p("keepdir/inner")).unwrap(), b"inner");
    assert!(
        env.daemon_log().lines().any(|l| l.contains(&edited)),
        "no log line names the undecryptable entry {edited}:\n{}",
        env.daemon_log()
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// Volume header
// ---------------------------------------------------------------------------------------

fn try_mount(env: &Env) -> Output {
    let a = env.mount_args(&[]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = env.run(&refs);
    if is_mounted(&env.mnt) {
        force_unmount(&env.mnt);
    }
    o
}

#[track_caller]
fn assert_mount_refused(env: &Env, codes: &[i32], what: &str) {
    let o = try_mount(env);
    let err = stderr(&o);
    assert!(
        o.status.code().is_some_and(|c| codes.contains(&c)),
        "{what}: exit {:?}, expected one of {codes:?}; stderr: {err}",
        o.status.code()
    );
    assert!(!err.trim().is_empty(), "{what}: no message");
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(!is_mounted(&env.mnt), "{what}: something got mounted");
}

const HEADER_FILE: &str = "kekfs.volume";

#[test]
fn volume_header_damage_is_refused() {
    let Some(env) = Env::new("volume_header_damage_is_refused") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::write(m.p("f"), b"still here").unwrap();
    m.unmount();
    let hp = env.backing.join(HEADER_FILE);
    let good = std::fs::read(&hp).unwrap();

    // A flipped byte anywhere (magic, ids, URI, wrapped keys, MAC, checksum) → CORRUPT.
    let positions = [
        0,
        9,
        12,
        20,
        40,
        good.len() / 2,
        good.len() - 40,
        good.len() - 1,
    ];
    for &pos in &positions {
        let mut bad = good.clone();
        bad[pos] ^= 0x10;
        std::fs::write(&hp, &bad).unwrap();
        assert_mount_refused(&env, &[11], &format!("byte {pos} flipped"));
    }
    // Truncated.
    for len in [0, 7, 8, 30, good.len() / 2, good.len() - 1] {
        std::fs::write(&hp, &good[..len]).unwrap();
        let codes: &[i32] = if len < 8 { &[11, 10] } else { &[11] };
        assert_mount_refused(&env, codes, &format!("truncated to {len}"));
    }
    // Garbage.
    let garbage: Vec<u8> = (0..good.len()).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&hp, &garbage).unwrap();
    assert_mount_refused(&env, &[11, 10], "garbage");
    std::fs::write(&hp, b"KEKFSVOL but then nonsense").unwrap();
    assert_mount_refused(&env, &[11, 10], "magic then garbage");
    // Appended bytes.
    let mut longer = good.clone();
    longer.extend_from_slice(b"xx");
    std::fs::write(&hp, &longer).unwrap();
    assert_mount_refused(&env, &[11], "appended bytes");
    // Deleted → not a volume.
    std::fs::remove_file(&hp).unwrap();
    assert_mount_refused(&env, &[10], "header deleted");

    // Restored, it mounts again and the data is intact.
    std::fs::write(&hp, &good).unwrap();
    let m = env.mount();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"still here");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// Daemon life cycle
// ---------------------------------------------------------------------------------------

#[test]
fn killed_daemon_keeps_fsynced_data() {
    let Some(env) = Env::new("killed_daemon_keeps_fsynced_data") else {
        return;
    };
    env.init_volume();
    let mut written: Vec<(String, Vec<u8>)> = Vec::new();
    for iter in 0..4u8 {
        let m = env.mount();
        // Everything written in earlier iterations survived the previous kill.
        for (name, data) in &written {
            assert_eq!(
                &std::fs::read(m.p(name)).unwrap(),
                data,
                "{name} after kill"
            );
        }
        let name = format!("crash-{iter}");
        let data = pattern(iter + 50, 5 * BLOCK + 123 * iter as usize);
        {
            use std::io::Write;
            let mut f = std::fs::File::create(m.p(&name)).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
            // Keep the file open across the kill: the data must not depend on a close.
            let pid = m.pid();
            assert!(pid > 1);
            // SAFETY: sending a signal to the daemon's pid.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            assert!(
                wait_for(Duration::from_secs(10), || lock_is_free(&env.backing)),
                "the volume lock is still held after kill -9 of {pid}"
            );
            drop(f);
        }
        // The dead mount is still listed, but no daemon is reported for it.
        let o = env.run(&["status", env.backing.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let st: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
        assert!(!st["mountpoint"].is_null(), "{st}");
        assert!(st["pid"].is_null(), "dead daemon reported as running: {st}");
        if iter % 2 == 0 {
            force_unmount(&env.mnt);
        } else {
            // `kekfs unmount` cleans up a dead mount too.
            let o = env.run(&["unmount", env.mnt.to_str().unwrap()]);
            assert!(
                o.status.success(),
                "unmount of a dead mount: {}",
                stderr(&o)
            );
        }
        assert!(
            wait_for(Duration::from_secs(10), || !is_mounted(&env.mnt)),
            "dead mount still listed"
        );
        drop(m);
        written.push((name, data));
    }
    let m = env.mount();
    for (name, data) in &written {
        assert_eq!(
            &std::fs::read(m.p(name)).unwrap(),
            data,
            "{name} at the end"
        );
    }
    m.unmount();
}

#[test]
fn second_mount_of_same_volume_is_refused() {
    let Some(env) = Env::new("second_mount_of_same_volume_is_refused") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::write(m.p("f"), b"data").unwrap();
    let mnt2 = env.dir.path().join("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    let o = env.mount_refused(&mnt2, "a second mount of the same volume succeeded");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(16), "stderr: {err}");
    let mp = std::fs::canonicalize(&env.mnt).unwrap();
    assert!(
        err.contains(mp.to_str().unwrap()),
        "message does not name the mountpoint {}: {err}",
        mp.display()
    );
    assert!(!err.contains("panicked"), "{err}");
    // The first mount is unaffected.
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"data");
    // Mounting onto the already used mountpoint is refused too.
    let o = env.run(&[
        "mount",
        env.backing.to_str().unwrap(),
        env.mnt.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(16), "stderr: {}", stderr(&o));
    assert!(is_mounted(&env.mnt));
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"data");
    m.unmount();
    // Once unmounted, the other mountpoint works.
    let o = env.run(&[
        "mount",
        env.backing.to_str().unwrap(),
        mnt2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m2 = Mounted {
        mnt: mnt2.clone(),
        backing: env.backing.clone(),
    };
    assert!(is_mounted(&mnt2));
    assert_eq!(std::fs::read(m2.p("f")).unwrap(), b"data");
    m2.unmount();
}

/// `umount` returns before the daemon has zeroized its keys and exited, so its volume lock
/// is still held for a moment: a mount right after it waits for that daemon instead of
/// calling the volume "already mounted".
#[test]
fn mount_right_after_umount_waits_for_the_old_daemon() {
    let Some(env) = Env::new("mount_right_after_umount_waits_for_the_old_daemon") else {
        return;
    };
    env.init_volume();
    let args = [
        "mount",
        env.backing.to_str().unwrap(),
        env.mnt.to_str().unwrap(),
    ];
    let m = env.mount();
    std::fs::write(m.p("f"), b"data").unwrap();
    for round in 0..5 {
        let u = std::process::Command::new("umount")
            .arg(&env.mnt)
            .output()
            .unwrap();
        assert!(u.status.success(), "umount: {}", stderr(&u));
        let o = env.run(&args);
        assert!(o.status.success(), "round {round}: {}", stderr(&o));
        assert_eq!(std::fs::read(m.p("f")).unwrap(), b"data", "round {round}");
    }
    m.unmount();

    // A lock holder that never mounts: waited for, then named in the refusal.
    let lock = std::fs::File::open(env.backing.join("kekfs.lock")).unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a valid descriptor; released when `lock` is closed.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    }
    let started = std::time::Instant::now();
    let o = env.mount_refused(&env.mnt, "mounted while another process held the lock");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(16), "{err}");
    assert!(err.contains("has not mounted it"), "{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "refused after {:?}, without waiting",
        started.elapsed()
    );
    // Released while a mount waits: that mount goes ahead.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(lock);
    });
    let o = env.run(&args);
    releaser.join().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Mounted {
        mnt: env.mnt.clone(),
        backing: env.backing.clone(),
    };
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"data");
    m.unmount();
}

#[test]
fn sigterm_unmounts_cleanly() {
    let Some(env) = Env::new("sigterm_unmounts_cleanly") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::write(m.p("f"), b"before sigterm").unwrap();
    let pid = m.pid();
    // SAFETY: sending a signal to the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(
        wait_for(Duration::from_secs(15), || !is_mounted(&env.mnt)),
        "still mounted after SIGTERM"
    );
    assert!(
        wait_for(Duration::from_secs(15), || lock_is_free(&env.backing)),
        "lock still held after SIGTERM"
    );
    drop(m);
    assert!(
        env.daemon_log().contains("signal"),
        "log: {}",
        env.daemon_log()
    );
    let m = env.mount();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"before sigterm");
    m.unmount();
}

#[test]
fn sigterm_while_busy_detaches() {
    let Some(env) = Env::new("sigterm_while_busy_detaches") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::write(m.p("f"), b"open during sigterm").unwrap();
    // A file held open keeps the mount busy: a plain unmount would fail with EBUSY.
    let held = std::fs::File::open(m.p("f")).unwrap();
    let pid = m.pid();
    // SAFETY: sending a signal to the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(
        wait_for(Duration::from_secs(15), || !is_mounted(&env.mnt)),
        "still mounted after SIGTERM while busy"
    );
    // The open file is still served until it is closed (lazy detach, as libfuse does).
    let mut buf = vec![0u8; 64];
    let n = held.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"open during sigterm");
    drop(held);
    assert!(
        wait_for(Duration::from_secs(15), || lock_is_free(&env.backing)),
        "daemon still holds the volume after the last user let go"
    );
    drop(m);
    let m = env.mount();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"open during sigterm");
    m.unmount();
}
