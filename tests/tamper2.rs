//! Tampering by someone who controls the backing directory, beyond single blocks (those
//! are in tests/security.rs): whole files swapped across directories, file headers
//! swapped, files and single blocks rolled back, the volume header rolled back, content
//! files cut or extended at a block boundary, directory entries reordered, names
//! replaced. Each is either detected (EIO and a log line naming the backing file) or a
//! documented limit of format version 1 (docs/FORMAT.md, "Known limits"), asserted
//! precisely: what is served then is authentic data the volume once held, never garbage.

mod common;
use common::tamper::*;
use common::*;

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A detected tampering: EIO, logged. A known limit: exactly `authentic` (content the
/// volume held at some point, under some name). Never anything else.
#[track_caller]
fn assert_eio_or_exactly(
    env: &Env,
    r: io::Result<Vec<u8>>,
    authentic: &[u8],
    file: &Path,
    what: &str,
) {
    match r {
        Ok(d) => assert!(
            d == authentic,
            "{what}: {} bytes served that are not the expected authentic content",
            d.len()
        ),
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
            assert_logged(env, file);
        }
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

// ---------------------------------------------------------------------------------------

/// Limit: the content of two files in different directories swapped (names kept). Names
/// are bound to their directory, but content is bound to neither name nor directory: each
/// name then serves the other file's complete authentic content.
#[test]
fn swap_content_across_directories_serves_only_whole_authentic_files() {
    let Some(env) = Env::new("swap_content_across_directories") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::create_dir(m.p("d1")).unwrap();
    std::fs::create_dir(m.p("d2")).unwrap();
    let a = pattern(1, 3 * BLOCK + 100);
    let b = pattern(2, 2 * BLOCK + 7);
    let fa = write_located(&m, "d1/a", &a);
    let fb = write_located(&m, "d2/b", &b);
    let other = pattern(3, 999);
    std::fs::write(m.p("bystander"), &other).unwrap();
    m.unmount();
    assert_ne!(fa.parent(), fb.parent());
    let tmp = env.dir.path().join("swap");
    copy(&fa, &tmp);
    copy(&fb, &fa);
    copy(&tmp, &fb);
    let m = env.mount();
    assert_eio_or_exactly(&env, std::fs::read(m.p("d1/a")), &b, &fa, "d1/a");
    assert_eio_or_exactly(&env, std::fs::read(m.p("d2/b")), &a, &fb, "d2/b");
    // Sizes follow the content: the listing shows b's size under d1/a.
    let sa = std::fs::metadata(m.p("d1/a")).unwrap().len();
    assert!(sa == b.len() as u64, "size {sa}");
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

/// Detected: a file header (file id) swapped with another file's. The blocks are sealed
/// under the first file's id (key and AAD), so none of them opens under the other id.
#[test]
fn swapped_file_headers_fail_every_block() {
    let Some(env) = Env::new("swapped_file_headers_fail_every_block") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let a = pattern(4, 2 * BLOCK + 300);
    let b = pattern(5, 3 * BLOCK);
    let fa = write_located(&m, "a", &a);
    let fb = write_located(&m, "b", &b);
    let other = pattern(6, 100);
    std::fs::write(m.p("bystander"), &other).unwrap();
    m.unmount();
    let mut ha = vec![0u8; HEADER as usize];
    let mut hb = ha.clone();
    std::fs::File::open(&fa)
        .unwrap()
        .read_exact_at(&mut ha, 0)
        .unwrap();
    std::fs::File::open(&fb)
        .unwrap()
        .read_exact_at(&mut hb, 0)
        .unwrap();
    assert_ne!(ha, hb);
    let w = |p: &Path, h: &[u8]| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .write_all_at(h, 0)
            .unwrap()
    };
    w(&fa, &hb);
    w(&fb, &ha);
    let m = env.mount();
    for (name, file, len) in [("a", &fa, a.len()), ("b", &fb, b.len())] {
        assert_eio(std::fs::read(m.p(name)), name);
        for blk in 0..len.div_ceil(BLOCK) {
            assert_eio(read_range(&m.p(name), (blk * BLOCK) as u64, 10), name);
        }
        assert_logged(&env, file);
    }
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

/// Limit: a whole file rolled back to an older copy of itself serves that older content
/// (complete and authentic); a single rolled-back block serves the old block inside the
/// new file (each block authentic, the file a mix of versions). No per-file version is
/// authenticated in format version 1.
#[test]
fn rolled_back_file_or_block_serves_old_authentic_content() {
    let Some(env) = Env::new("rolled_back_file_or_block") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let v1 = pattern(10, 3 * BLOCK + 50);
    let f = write_located(&m, "f", &v1);
    let g1 = pattern(20, 3 * BLOCK);
    let g = write_located(&m, "g", &g1);
    m.unmount();
    let old_f = env.dir.path().join("f.v1");
    let old_g = env.dir.path().join("g.v1");
    copy(&f, &old_f);
    copy(&g, &old_g);
    let m = env.mount();
    let v2 = pattern(11, 4 * BLOCK + 9);
    std::fs::write(m.p("f"), &v2).unwrap();
    let g2 = pattern(21, 3 * BLOCK);
    std::fs::write(m.p("g"), &g2).unwrap();
    m.unmount();
    // Whole file back to v1.
    copy(&old_f, &f);
    // Block 1 of g back to its v1 ciphertext.
    let mut blk = vec![0u8; CT_BLOCK as usize];
    std::fs::File::open(&old_g)
        .unwrap()
        .read_exact_at(&mut blk, block_off(1))
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&g)
        .unwrap()
        .write_all_at(&blk, block_off(1))
        .unwrap();
    let m = env.mount();
    assert_eio_or_exactly(&env, std::fs::read(m.p("f")), &v1, &f, "f rolled back");
    let mut mixed = g2.clone();
    mixed[BLOCK..2 * BLOCK].copy_from_slice(&g1[BLOCK..2 * BLOCK]);
    assert_eio_or_exactly(
        &env,
        std::fs::read(m.p("g")),
        &mixed,
        &g,
        "g block 1 rolled back",
    );
    m.unmount();
}

/// Content files cut or extended at a block boundary. Cut: detected (format version 2
/// files mark their last block; the block the file now ends at was not written as the
/// last one), the blocks before the cut still read. Extended with zero blocks: detected
/// (a version 2 file never ends in a hole). Extended with random bytes, or with a copy of
/// one of its own blocks: detected (the block index is in the AAD). Extended with the
/// block an earlier, longer version had at that index: limit, the old block is served (a
/// rollback of a truncation: blocks inside a file may carry the last-block mark, which a
/// crash between an append and the reseal of the old last block leaves behind). Limits
/// too: a block inside the file overwritten with zeros reads as a hole; a file cut to its
/// header reads as empty.
#[test]
fn cut_or_extended_at_a_block_boundary() {
    let Some(env) = Env::new("cut_or_extended_at_a_block_boundary") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let long = pattern(30, 4 * BLOCK);
    let f = write_located(&m, "shrunk", &long);
    let data = pattern(31, 3 * BLOCK);
    let cut = write_located(&m, "cut", &data);
    let zeros = write_located(&m, "zeros", &data);
    let random = write_located(&m, "random", &data);
    let dup = write_located(&m, "dup", &data);
    let inner = write_located(&m, "inner", &data);
    let emptied = write_located(&m, "emptied", &data);
    let other = pattern(32, 10);
    std::fs::write(m.p("bystander"), &other).unwrap();
    m.unmount();
    let mut old_block3 = vec![0u8; CT_BLOCK as usize];
    std::fs::File::open(&f)
        .unwrap()
        .read_exact_at(&mut old_block3, block_off(3))
        .unwrap();
    let m = env.mount();
    // Truncated through kekfs to 3 blocks: block 3 is gone for good.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(m.p("shrunk"))
        .unwrap();
    file.set_len(3 * BLOCK as u64).unwrap();
    drop(file);
    m.unmount();
    let open_w = |p: &Path| std::fs::OpenOptions::new().write(true).open(p).unwrap();
    open_w(&cut).set_len(block_off(2)).unwrap();
    open_w(&zeros).set_len(block_off(5)).unwrap();
    let noise: Vec<u8> = (0..CT_BLOCK).map(|i| (i * 7 + 1) as u8).collect();
    open_w(&random).write_all_at(&noise, block_off(3)).unwrap();
    let mut own = vec![0u8; CT_BLOCK as usize];
    std::fs::File::open(&dup)
        .unwrap()
        .read_exact_at(&mut own, block_off(0))
        .unwrap();
    open_w(&dup).write_all_at(&own, block_off(3)).unwrap();
    open_w(&f).write_all_at(&old_block3, block_off(3)).unwrap();
    open_w(&inner)
        .write_all_at(&vec![0u8; CT_BLOCK as usize], block_off(1))
        .unwrap();
    open_w(&emptied).set_len(block_off(0)).unwrap();

    let m = env.mount();
    assert_eio(std::fs::read(m.p("cut")), "cut at a block boundary");
    assert_logged(&env, &cut);
    assert!(
        env.daemon_log().contains("file cut short"),
        "the log says why"
    );
    assert_eq!(read_range(&m.p("cut"), 0, BLOCK).unwrap(), data[..BLOCK]);
    assert_eio(std::fs::read(m.p("zeros")), "extended with zero blocks");
    assert_logged(&env, &zeros);
    assert_eq!(read_range(&m.p("zeros"), 0, 3 * BLOCK).unwrap(), data);
    assert_eq!(read_range(&m.p("random"), 0, 3 * BLOCK).unwrap(), data);
    assert_eio(
        read_range(&m.p("random"), 3 * BLOCK as u64, 10),
        "random block",
    );
    assert_logged(&env, &random);
    assert_eq!(read_range(&m.p("dup"), 0, 3 * BLOCK).unwrap(), data);
    assert_eio(
        read_range(&m.p("dup"), 3 * BLOCK as u64, 10),
        "own block 0 as block 3",
    );
    assert_logged(&env, &dup);
    assert_eio_or_exactly(&env, std::fs::read(m.p("shrunk")), &long, &f, "old block 3");
    // Limits: an inner block of zeros is a hole; a file cut to its header is empty.
    let mut holed = data.clone();
    holed[BLOCK..2 * BLOCK].fill(0);
    assert_eq!(
        std::fs::read(m.p("inner")).unwrap(),
        holed,
        "inner zero block"
    );
    assert_eq!(
        std::fs::read(m.p("emptied")).unwrap(),
        b"",
        "cut to the header"
    );
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

/// Directory entries reordered (the backing directory rebuilt with its entries created
/// in reverse order): kekfs does not depend on entry order; listing and contents are
/// unchanged. Nothing to detect.
#[test]
fn reordered_directory_entries_change_nothing() {
    let Some(env) = Env::new("reordered_directory_entries_change_nothing") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::fs::create_dir(m.p("d")).unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("entry-{i:02}")).collect();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(m.p(&format!("d/{n}")), pattern(i as u8, 100 + i)).unwrap();
    }
    std::fs::write(m.p(&format!("d/{}", "L".repeat(200))), b"long").unwrap();
    m.unmount();
    let d = std::fs::read_dir(&env.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let hold = env.dir.path().join("hold");
    std::fs::create_dir(&hold).unwrap();
    let mut entries: Vec<String> = list(&d);
    for e in &entries {
        std::fs::rename(d.join(e), hold.join(e)).unwrap();
    }
    entries.reverse();
    for e in &entries {
        std::fs::rename(hold.join(e), d.join(e)).unwrap();
    }
    let m = env.mount();
    let mut want = names.clone();
    want.push("L".repeat(200));
    want.sort();
    assert_eq!(list(&m.p("d")), want);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(
            std::fs::read(m.p(&format!("d/{n}"))).unwrap(),
            pattern(i as u8, 100 + i)
        );
    }
    m.unmount();
}

/// A directory entry renamed over another entry's encrypted name in the same directory.
/// Limit: names are bound to their directory, not to their content, so `b` serves a's
/// authentic content and `a` is gone (ENOENT). A sidecar swapped between two long-name
/// entries is detected (it must hash to its entry's name): both are left out of the
/// listing with a log line; lookups by name, which never read sidecars, still work.
#[test]
fn replaced_names() {
    let Some(env) = Env::new("replaced_names") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    let a = pattern(40, 5000);
    let b = pattern(41, 6000);
    let fa = write_located(&m, "a", &a);
    let fb = write_located(&m, "b", &b);
    let l1 = format!("first-{}", "x".repeat(200));
    let l2 = format!("second-{}", "y".repeat(200));
    std::fs::write(m.p(&l1), b"one").unwrap();
    std::fs::write(m.p(&l2), b"two").unwrap();
    let other = pattern(42, 77);
    std::fs::write(m.p("bystander"), &other).unwrap();
    m.unmount();
    std::fs::rename(&fa, &fb).unwrap();
    let sidecars: Vec<PathBuf> = files_under(&env.backing)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".n"))
        .collect();
    assert_eq!(sidecars.len(), 2, "{sidecars:?}");
    let s0 = std::fs::read(&sidecars[0]).unwrap();
    let s1 = std::fs::read(&sidecars[1]).unwrap();
    std::fs::write(&sidecars[0], &s1).unwrap();
    std::fs::write(&sidecars[1], &s0).unwrap();
    let m = env.mount();
    assert_eio_or_exactly(&env, std::fs::read(m.p("b")), &a, &fb, "b replaced by a");
    assert_eq!(
        std::fs::read(m.p("a")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(list(&m.mnt), ["b", "bystander"]);
    let log = env.daemon_log();
    assert!(
        log.matches("bad sidecar").count() >= 2,
        "no log line for the swapped sidecars:\n{log}"
    );
    assert_eq!(std::fs::read(m.p(&l1)).unwrap(), b"one");
    assert_eq!(std::fs::read(m.p(&l2)).unwrap(), b"two");
    assert_volume_works(&m, "bystander", &other);
    m.unmount();
}

/// The volume header rolled back to a copy from before a rotation and rewrap. Limit: the
/// old header is authentic (same AEK, its MAC verifies), so it mounts as long as the old
/// key version may unwrap, and serves the current data; a volume that follows the latest
/// version rewraps itself to the newest version again at the next poll. Once the old
/// version is disabled, the rolled-back header is refused (KEK refused, exit 13). A
/// rewrap does not change the AEK: whoever kept an old header and the old key version can
/// still unlock the volume (see docs/FORMAT.md, "Known limits").
#[test]
fn rolled_back_volume_header() {
    let Some(env) = Env::new("rolled_back_volume_header") else {
        return;
    };
    env.init_volume();
    let m = env.mount_with(&["poll=200ms"]);
    let data = pattern(50, 2 * BLOCK + 1);
    std::fs::write(m.p("f"), &data).unwrap();
    m.unmount();
    let hp = env.backing.join("kekfs.volume");
    let old = std::fs::read(&hp).unwrap();
    env.ok(&["key", "rotate", "k"]);
    env.ok(&["rewrap", env.backing.to_str().unwrap()]);
    let new = std::fs::read(&hp).unwrap();
    assert_ne!(old, new);
    let versions = |env: &Env| env.wrapped_by(&env.backing);
    assert_eq!(versions(&env), [2, 1]);

    // Rolled back while version 1 is usable: mounts, serves the data, heals itself.
    std::fs::write(&hp, &old).unwrap();
    assert_eq!(versions(&env), [1, 1]);
    let m = env.mount_with(&["poll=200ms"]);
    assert_eq!(std::fs::read(m.p("f")).unwrap(), data);
    assert!(
        wait_for(Duration::from_secs(20), || versions(&env).first()
            == Some(&2)),
        "the mounted volume did not rewrap itself to version 2: {:?}",
        versions(&env)
    );
    m.unmount();

    // Rolled back once version 1 is disabled: refused.
    env.ok(&["key", "disable", "k@1"]);
    std::fs::write(&hp, &old).unwrap();
    let o = env.mount_refused(
        &env.mnt,
        "a header wrapped only by a disabled version mounted",
    );
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    // The current header still works.
    std::fs::write(&hp, &new).unwrap();
    let m = env.mount();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), data);
    m.unmount();
}

/// Limit: the stored targets of two symlinks swapped. Targets are sealed with a constant
/// AAD (bound to the volume, not to the link), so each link reads the other's target.
/// An edited target is detected (EIO and a log line).
#[test]
fn swapped_and_edited_symlink_targets() {
    let Some(env) = Env::new("swapped_and_edited_symlink_targets") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    std::os::unix::fs::symlink("/target/one", m.p("l1")).unwrap();
    std::os::unix::fs::symlink("/target/two", m.p("l2")).unwrap();
    std::os::unix::fs::symlink("/target/three", m.p("l3")).unwrap();
    // The mount reports the backing inode numbers: find each link's backing entry.
    use std::os::unix::fs::MetadataExt;
    let inos: Vec<u64> = ["l1", "l2", "l3"]
        .iter()
        .map(|l| std::fs::symlink_metadata(m.p(l)).unwrap().ino())
        .collect();
    m.unmount();
    let backing: Vec<PathBuf> = std::fs::read_dir(&env.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let links: Vec<PathBuf> = inos
        .iter()
        .map(|&ino| {
            backing
                .iter()
                .find(|p| p.symlink_metadata().unwrap().ino() == ino)
                .unwrap()
                .clone()
        })
        .collect();
    let t: Vec<PathBuf> = links
        .iter()
        .map(|l| std::fs::read_link(l).unwrap())
        .collect();
    let relink = |l: &Path, target: &Path| {
        std::fs::remove_file(l).unwrap();
        std::os::unix::fs::symlink(target, l).unwrap();
    };
    relink(&links[0], &t[1]);
    relink(&links[1], &t[0]);
    // The third: one character of its stored target changed.
    let mut edited = t[2].to_str().unwrap().to_string().into_bytes();
    let i = edited.len() / 2;
    edited[i] = if edited[i] == b'A' { b'B' } else { b'A' };
    relink(&links[2], Path::new(std::str::from_utf8(&edited).unwrap()));
    let m = env.mount();
    // The swap is a documented limit: each link reads the other's (authentic) target.
    assert_eq!(
        std::fs::read_link(m.p("l1")).unwrap(),
        Path::new("/target/two")
    );
    assert_eq!(
        std::fs::read_link(m.p("l2")).unwrap(),
        Path::new("/target/one")
    );
    let e = std::fs::read_link(m.p("l3")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_logged(&env, &links[2]);
    m.unmount();
}
