//! Resource exhaustion: a full backing store (a small tmpfs), space reserved with
//! fallocate (and a backing fs that cannot reserve it, a loop-mounted ext2), a huge
//! sparse file, many open files, a deep directory tree, names and symlink targets at
//! their length limits.
//! Each either works or fails with the right errno; the daemon never dies, data written
//! before stays intact, and no half-written block is ever returned as data.

mod common;
use common::*;

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const BLOCK: usize = 4096;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) as u8)
        .collect()
}

/// Run `cmd`; it must succeed (its stderr is shown when it does not).
fn run_ok(cmd: &mut Command, what: &str) {
    let o = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A filesystem mounted at `dir` in the test's directory; unmounted on drop (lazily if
/// busy).
struct TestMount {
    path: PathBuf,
}

impl TestMount {
    /// `mount -t fstype -o options source <test dir>/dir`.
    fn new(env: &Env, dir: &str, fstype: &str, options: &str, source: &Path) -> TestMount {
        let path = env.dir.path().join(dir);
        std::fs::create_dir_all(&path).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", fstype, "-o", options])
                .arg(source)
                .arg(&path),
            &format!("mount -t {fstype} -o {options}"),
        );
        TestMount { path }
    }

    /// A tmpfs of `size`.
    fn tmpfs(env: &Env, size: &str) -> TestMount {
        let opts = format!("size={size},mode=0700");
        TestMount::new(env, "tmpfs", "tmpfs", &opts, Path::new("tmpfs"))
    }

    /// A loop-mounted ext2 filesystem of `size_mib` MiB (ext2 cannot reserve space:
    /// fallocate without PUNCH_HOLE fails with EOPNOTSUPP).
    fn ext2(env: &Env, size_mib: u64) -> TestMount {
        let image = env.dir.path().join("ext2.img");
        File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .unwrap();
        run_ok(
            Command::new("mkfs.ext2").args(["-q", "-F"]).arg(&image),
            "mkfs.ext2 (e2fsprogs)",
        );
        TestMount::new(env, "ext2", "ext2", "loop", &image)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// An env whose backing directory lives on a fresh tmpfs of `size` (keystore, logs and
/// mountpoint stay outside it). Declare the returned TestMount before any mount guard, so the
/// FUSE mount goes first.
fn env_on_tmpfs(test: &str, size: &str) -> Option<(Env, TestMount)> {
    let mut env = Env::new(test)?;
    let t = TestMount::tmpfs(&env, size);
    env.backing = t.path.join("backing");
    env.init_volume();
    Some((env, t))
}

/// Free bytes of the mounted volume (what its backing filesystem reports).
fn free_bytes(m: &Mounted) -> u64 {
    let st = statvfs(&m.mnt).unwrap_or_else(|e| panic!("statvfs: {e}"));
    st.f_bavail * st.f_frsize
}

/// Wait until at least `want` bytes are free. A deleted file's space comes back when
/// the kernel forgets its inode (kekfs keeps the inode open until then, so that its
/// number cannot be reused); the kernel sends that forget on its own, after the unlink.
#[track_caller]
fn wait_for_free(m: &Mounted, want: u64) {
    assert!(
        wait_for(std::time::Duration::from_secs(10), || free_bytes(m) >= want),
        "the space of deleted files did not come back: {} bytes free, {want} wanted",
        free_bytes(m)
    );
}

fn daemon_alive(m: &Mounted) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(m.pid(), 0) == 0 }
}

/// Read `path` block by block: each block is either `expected` at that offset or EIO
/// (or, when `holes_ok`, all zeros: unsynced write-back data that never landed).
#[track_caller]
fn assert_blocks_authentic(path: &Path, expected: &[u8], holes_ok: bool) -> (usize, usize) {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as usize;
    assert!(
        size <= expected.len(),
        "file grew past what was written: {size}"
    );
    let (mut good, mut bad) = (0, 0);
    for off in (0..size).step_by(BLOCK) {
        let n = BLOCK.min(size - off);
        let mut buf = vec![0u8; n];
        match f.read_exact_at(&mut buf, off as u64) {
            Ok(()) => {
                let want = &expected[off..off + n];
                let zero = holes_ok && buf.iter().all(|&b| b == 0);
                assert!(
                    buf == want || zero,
                    "block at {off}: bytes that were never written (a torn block served as data)"
                );
                good += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "block at {off}: {e}");
                bad += 1;
            }
        }
    }
    (good, bad)
}

/// Fill the volume: write `file` in chunks until ENOSPC, from `write` or from `fsync`.
/// Returns what was attempted (the expected content of every byte that reads back).
fn fill(path: &Path, limit: usize) -> Vec<u8> {
    let data = pattern(99, limit);
    let mut f = File::create(path).unwrap();
    let mut off = 0;
    let chunk = 256 << 10;
    loop {
        assert!(
            off < limit,
            "no ENOSPC after {limit} bytes on a small tmpfs"
        );
        let r = f.write_all(&data[off..off + chunk]).and_then(|()| {
            if (off / chunk) % 4 == 3 {
                f.sync_data()
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => off += chunk,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                break;
            }
        }
    }
    // Closing may report the same error again; it must not be anything else.
    let r = f.sync_all();
    assert!(
        r.is_ok() || errno(r) == Some(libc::ENOSPC),
        "fsync after ENOSPC"
    );
    data
}

#[test]
fn full_backing_store_enospc_then_recovers() {
    let Some((env, _tmpfs)) = env_on_tmpfs("full_backing_store_enospc_then_recovers", "8m") else {
        return;
    };
    for (round, opts) in [["cache=writethrough"], ["cache=writeback"]]
        .iter()
        .enumerate()
    {
        let m = env.mount_with(opts);
        let writethrough = round == 0;
        // Files written (and synced) before the volume fills up.
        let mut before = Vec::new();
        for i in 0..3 {
            let name = format!("before-{round}-{i}");
            let data = pattern(i + 10 * round as u64, 100_000 + i as usize * 777);
            let mut f = File::create(m.p(&name)).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
            before.push((name, data));
        }
        let big = m.p("big");
        let attempted = fill(&big, 32 << 20);
        assert!(daemon_alive(&m), "the daemon died on ENOSPC");

        // Full: creating and writing fail with ENOSPC, and leave nothing half-made: a
        // create that fails leaves no file; one that went through (its header fitted)
        // serves only what was written, or zeros where it did not land.
        let want = pattern(5, 64 << 10);
        match File::create(m.p("new-when-full")) {
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOSPC),
                    "create when full: {e}"
                );
                assert_eq!(
                    errno(std::fs::metadata(m.p("new-when-full"))),
                    Some(libc::ENOENT),
                    "a create that failed left a file behind"
                );
            }
            Ok(mut f) => {
                let r = f.write_all(&want).and_then(|()| f.sync_all());
                assert_eq!(errno(r), Some(libc::ENOSPC), "write when full");
                drop(f);
                assert_blocks_authentic(&m.p("new-when-full"), &want, true);
            }
        }
        let r = std::fs::create_dir(m.p("dir-when-full")).and_then(|()| {
            // A directory's id fitted: it must then be usable.
            std::fs::read_dir(m.p("dir-when-full")).map(|_| ())
        });
        assert!(
            r.is_ok() || errno(r) == Some(libc::ENOSPC),
            "mkdir when full"
        );
        // Every block of the big file reads back as written, or fails with EIO.
        let (good, _) = assert_blocks_authentic(&big, &attempted, !writethrough);
        assert!(good > 0, "nothing of the big file reads back");
        for (name, data) in &before {
            assert_eq!(
                &std::fs::read(m.p(name)).unwrap(),
                data,
                "{name} after ENOSPC"
            );
        }

        // Space freed: writing works again.
        std::fs::remove_file(&big).unwrap();
        let _ = std::fs::remove_file(m.p("new-when-full"));
        let _ = std::fs::remove_dir(m.p("dir-when-full"));
        let after = pattern(77, 1 << 20);
        wait_for_free(&m, 2 * after.len() as u64);
        let mut f = File::create(m.p("after")).unwrap();
        f.write_all(&after).unwrap();
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(std::fs::read(m.p("after")).unwrap(), after);
        std::fs::remove_file(m.p("after")).unwrap();
        assert!(daemon_alive(&m));
        m.unmount();
        // After a remount too.
        let m = env.mount();
        for (name, data) in &before {
            assert_eq!(
                &std::fs::read(m.p(name)).unwrap(),
                data,
                "{name} after remount"
            );
            std::fs::remove_file(m.p(name)).unwrap();
        }
        m.unmount();
    }
    assert!(
        !env.daemon_log().contains("panicked"),
        "{}",
        env.daemon_log()
    );
}

/// fallocate reserves real backing space: a request larger than the free space fails with
/// ENOSPC (and leaves the size alone), and writes into a reserved range succeed after the
/// volume has filled up, for mode 0 (which grows the file), KEEP_SIZE (past the end) and
/// ZERO_RANGE (inside the file).
#[test]
fn fallocate_reserves_backing_space() {
    let Some((env, _tmpfs)) = env_on_tmpfs("fallocate_reserves_backing_space", "16m") else {
        return;
    };
    let m = env.mount();
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(m.p(name))
            .unwrap()
    };
    let too_big = open("too-big");
    assert_eq!(
        errno(fallocate(&too_big, 0, 0, 64 << 20)),
        Some(libc::ENOSPC),
        "reserving more than the free space"
    );
    assert_eq!(
        too_big.metadata().unwrap().len(),
        0,
        "a failed reservation grew the file"
    );
    drop(too_big);
    std::fs::remove_file(m.p("too-big")).unwrap();

    // Mode 0: 3 MiB + a partial block, reserved and grown.
    let grown = open("grown");
    let grown_len = (3 << 20) + 1000;
    fallocate(&grown, 0, 0, grown_len as u64).unwrap();
    assert_eq!(grown.metadata().unwrap().len(), grown_len as u64);
    // KEEP_SIZE past the end: 2 MiB reserved, size unchanged.
    let kept = open("kept");
    let kept_len = 2 << 20;
    fallocate(&kept, libc::FALLOC_FL_KEEP_SIZE, 0, kept_len as u64).unwrap();
    assert_eq!(kept.metadata().unwrap().len(), 0);
    // ZERO_RANGE inside a file that already has data: reads as zeros, stays reserved.
    let zeroed = open("zeroed");
    let zeroed_len = 1 << 20;
    zeroed.write_all_at(&pattern(3, zeroed_len), 0).unwrap();
    zeroed.sync_all().unwrap();
    fallocate(&zeroed, libc::FALLOC_FL_ZERO_RANGE, 0, zeroed_len as u64).unwrap();
    assert_eq!(std::fs::read(m.p("zeroed")).unwrap(), vec![0u8; zeroed_len]);

    // Fill the rest of the volume.
    let big = m.p("big");
    fill(&big, 32 << 20);
    assert!(daemon_alive(&m), "the daemon died on ENOSPC");

    // The reserved ranges still take their data.
    for (f, name, len, seed) in [
        (&grown, "grown", grown_len, 1),
        (&kept, "kept", kept_len, 2),
        (&zeroed, "zeroed", zeroed_len, 4),
    ] {
        let data = pattern(seed, len);
        f.write_all_at(&data, 0)
            .and_then(|()| f.sync_all())
            .unwrap_or_else(|e| panic!("{name}: writing its reserved range on a full volume: {e}"));
        assert_eq!(std::fs::read(m.p(name)).unwrap(), data, "{name}");
    }
    drop((grown, kept, zeroed));
    m.unmount();
    let m = env.mount();
    assert_eq!(
        std::fs::read(m.p("kept")).unwrap(),
        pattern(2, kept_len),
        "kept, remounted"
    );
    m.unmount();
}

/// On a backing filesystem that cannot reserve space (ext2), fallocate mode 0 and
/// KEEP_SIZE fail with EOPNOTSUPP and change nothing; posix_fallocate then falls back to
/// writing the range (glibc), which works; a zero range still zeroes.
#[test]
fn fallocate_on_a_backing_fs_without_reservations() {
    let Some(mut env) = Env::new("fallocate_on_a_backing_fs_without_reservations") else {
        return;
    };
    let ext2 = TestMount::ext2(&env, 32);
    env.backing = ext2.path.join("backing");
    env.init_volume();
    let m = env.mount();
    let path = m.p("f");
    let data = pattern(7, 3 * BLOCK + 100);
    std::fs::write(&path, &data).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    for (mode, what) in [(0, "mode 0"), (libc::FALLOC_FL_KEEP_SIZE, "KEEP_SIZE")] {
        assert_eq!(
            errno(fallocate(&f, mode, 0, 1 << 20)),
            Some(libc::EOPNOTSUPP),
            "{what} on ext2"
        );
        assert_eq!(
            f.metadata().unwrap().len(),
            data.len() as u64,
            "{what} changed the size"
        );
    }
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // glibc's posix_fallocate writes the range when the filesystem cannot reserve it.
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fallocate takes no pointers; the descriptor is open.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 64 << 10) };
    assert_eq!(r, 0, "posix_fallocate: {}", io::Error::from_raw_os_error(r));
    assert_eq!(f.metadata().unwrap().len(), 64 << 10);
    let mut model = data.clone();
    model.resize(64 << 10, 0);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        model,
        "after posix_fallocate"
    );
    // A zero range zeroes, reserved or not.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 100, 2 * BLOCK as u64).unwrap();
    model[100..100 + 2 * BLOCK].fill(0);
    assert_eq!(std::fs::read(&path).unwrap(), model, "after a zero range");
    drop(f);
    m.unmount();
    let m = env.mount();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), model, "remounted");
    m.unmount();
    drop(ext2);
}

#[test]
fn huge_sparse_file_costs_no_space() {
    let Some((env, tmpfs)) = env_on_tmpfs("huge_sparse_file_costs_no_space", "8m") else {
        return;
    };
    let m = env.mount();
    const HUGE: u64 = 1_000_000_000_000_000;
    let p = m.p("huge");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.set_len(HUGE).unwrap();
    assert_eq!(f.metadata().unwrap().len(), HUGE);
    f.write_all_at(b"the tail", HUGE - 8).unwrap();
    f.sync_all().unwrap();
    let mut buf = [0u8; 16];
    f.read_exact_at(&mut buf, HUGE - 16).unwrap();
    assert_eq!(&buf, b"\0\0\0\0\0\0\0\0the tail");
    f.read_exact_at(&mut buf, HUGE / 2).unwrap();
    assert_eq!(buf, [0u8; 16]);
    f.read_exact_at(&mut buf[..4], 0).unwrap();
    assert_eq!(&buf[..4], b"head");
    drop(f);
    // The backing file is as sparse: a few blocks allocated on an 8 MiB tmpfs.
    let backing = content_files(&env.backing);
    assert_eq!(backing.len(), 1);
    let meta = std::fs::metadata(&backing[0]).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.len() > HUGE, "backing size {}", meta.len());
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    // Shrinking it again works, and everything still runs.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4)
        .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"head");
    assert!(daemon_alive(&m));
    m.unmount();
    drop(tmpfs);
}

fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    let cur = want.min(r.rlim_max).max(r.rlim_cur);
    let n = libc::rlimit {
        rlim_cur: cur,
        rlim_max: r.rlim_max,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &n) }, 0);
    cur
}

#[test]
fn many_open_files() {
    let Some(env) = Env::new("many_open_files") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    // The test process needs the descriptors too.
    let limit = raise_nofile(6000);
    let want = 5000.min(limit as usize - 200);
    let files = 500;
    for i in 0..files {
        std::fs::write(m.p(&format!("f{i}")), format!("content of file {i}")).unwrap();
    }
    let mut open = Vec::with_capacity(want);
    for k in 0..want {
        let i = k % files;
        match File::open(m.p(&format!("f{i}"))) {
            Ok(f) => open.push((i, f)),
            Err(e) => {
                // Only a descriptor limit may stop it, never anything else.
                assert!(
                    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)),
                    "open #{k}: {e}"
                );
                break;
            }
        }
    }
    assert_eq!(
        open.len(),
        want,
        "the daemon should serve {want} open files (it raises its own descriptor limit)"
    );
    for (i, f) in &open {
        let mut buf = vec![0u8; 64];
        let n = f.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], format!("content of file {i}").as_bytes());
    }
    drop(open);
    assert!(daemon_alive(&m));
    assert_eq!(std::fs::read(m.p("f7")).unwrap(), b"content of file 7");
    m.unmount();
}

#[test]
fn deep_directory_tree() {
    let Some(env) = Env::new("deep_directory_tree") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    // 200 levels of 10-byte names: 2200 bytes in the mount, but each encrypted level
    // takes 36 bytes, so the backing path (about 7200 bytes) is longer than PATH_MAX.
    let depth = 200;
    let mut rel = PathBuf::new();
    for i in 0..depth {
        rel.push(format!("level{i:05}"));
        std::fs::create_dir(m.mnt.join(&rel)).unwrap();
    }
    let leaf = m.mnt.join(&rel).join("leaf");
    let data = pattern(3, 3 * BLOCK + 11);
    std::fs::write(&leaf, &data).unwrap();
    assert_eq!(std::fs::read(&leaf).unwrap(), data);
    m.unmount();
    let m = env.mount();
    let leaf = m.mnt.join(&rel).join("leaf");
    assert_eq!(std::fs::read(&leaf).unwrap(), data, "after a remount");
    // Every level lists exactly its child.
    let mut p = m.mnt.clone();
    for i in 0..depth {
        let names: Vec<String> = std::fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("level{i:05}")], "at level {i}");
        p.push(format!("level{i:05}"));
    }
    std::fs::rename(&leaf, m.p("leaf-moved-up")).unwrap();
    assert_eq!(std::fs::read(m.p("leaf-moved-up")).unwrap(), data);
    std::fs::remove_dir_all(m.p("level00000")).unwrap();
    assert_eq!(std::fs::read_dir(&m.mnt).unwrap().count(), 1);
    assert!(daemon_alive(&m));
    m.unmount();
}

fn symlink(target: &[u8], link: &Path) -> io::Result<()> {
    let t = CString::new(target).unwrap();
    let l = CString::new(link.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings.
    if unsafe { libc::symlink(t.as_ptr(), l.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[test]
fn names_targets_and_xattrs_at_their_limits() {
    let Some(env) = Env::new("names_targets_and_xattrs_at_their_limits") else {
        return;
    };
    env.init_volume();
    let m = env.mount();
    // Names: 255 bytes work for every kind of entry, 256 are ENAMETOOLONG.
    let n255 = "n".repeat(255);
    let n256 = "n".repeat(256);
    std::fs::write(m.p(&n255), b"255").unwrap();
    std::fs::create_dir(m.p(&format!("d{}", &n255[1..]))).unwrap();
    symlink(b"target", &m.p(&format!("s{}", &n255[1..]))).unwrap();
    std::fs::hard_link(m.p(&n255), m.p(&format!("h{}", &n255[1..]))).unwrap();
    let too_long = [
        errno(File::create(m.p(&n256))),
        errno(std::fs::create_dir(m.p(&n256))),
        errno(symlink(b"t", &m.p(&n256))),
        errno(std::fs::hard_link(m.p(&n255), m.p(&n256))),
        errno(std::fs::rename(m.p(&n255), m.p(&n256))),
        errno(std::fs::metadata(m.p(&n256))),
    ];
    assert_eq!(too_long, [Some(libc::ENAMETOOLONG); 6]);
    assert_eq!(std::fs::read(m.p(&n255)).unwrap(), b"255");

    // Symlink targets: stored encrypted and base64-encoded (⌈4·(n + 28)/3⌉ bytes), which
    // must stay below PATH_MAX (4096): up to 3043 bytes work; longer ones are ENAMETOOLONG
    // (the kernel itself refuses 4096 and more), and leave no entry behind.
    let t_max = vec![b'a'; 3043];
    symlink(&t_max, &m.p("link3043")).unwrap();
    assert_eq!(
        std::fs::read_link(m.p("link3043"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        &t_max[..]
    );
    assert_eq!(
        std::fs::symlink_metadata(m.p("link3043")).unwrap().len(),
        3043
    );
    for n in [3044, 4095, 4096, 5000] {
        let name = format!("link{n}");
        let e = errno(symlink(&vec![b'b'; n], &m.p(&name)));
        assert_eq!(e, Some(libc::ENAMETOOLONG), "target of {n} bytes");
        assert_eq!(
            errno(std::fs::symlink_metadata(m.p(&name))),
            Some(libc::ENOENT),
            "a failed symlink left an entry"
        );
    }

    // Extended attributes: the encrypted name (`user.kekfs.` and the base64 of 16 + n
    // bytes) must fit the backing fs's 255 bytes, so names of up to 167 bytes after
    // `user.` work, longer ones fail with ERANGE (as a name too long for the fs does);
    // values up to the backing fs's limit less 28 bytes of nonce and tag (E2BIG or ENOSPC
    // beyond).
    let f = m.p(&n255);
    setxattr(&f, "user.short", b"v", 0).unwrap();
    let name_ok = format!("user.{}", "x".repeat(167));
    setxattr(&f, &name_ok, b"v", 0).unwrap();
    let name_long = format!("user.{}", "x".repeat(168));
    assert_eq!(errno(setxattr(&f, &name_long, b"v", 0)), Some(libc::ERANGE));
    let name_kernel = format!("user.{}", "x".repeat(251));
    assert_eq!(
        errno(setxattr(&f, &name_kernel, b"v", 0)),
        Some(libc::ERANGE)
    );
    let r = setxattr(&f, "user.big", &vec![7u8; 65536], 0);
    assert!(
        matches!(
            errno(r),
            Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ERANGE)
        ),
        "a 64 KiB xattr value"
    );
    assert!(daemon_alive(&m));
    m.unmount();
}
