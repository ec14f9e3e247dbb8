//! Content file layout (format version 1) and the checks of tampering tests: a tampered
//! read is EIO and a log line naming the backing file, never wrong data, and the rest of
//! the volume keeps working.

use super::{Env, Mounted, content_files};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Plaintext bytes per block.
pub const BLOCK: usize = 4096;
/// Content file header length.
pub const HEADER: u64 = 24;
/// Ciphertext bytes of a full block (nonce ‖ ciphertext ‖ tag).
pub const CT_BLOCK: u64 = 12 + 4096 + 16;

/// Offset of block `i` in a content file.
pub fn block_off(i: u64) -> u64 {
    HEADER + i * CT_BLOCK
}

/// Distinctive content: every block differs from every other block and from other seeds.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| {
            let blk = (j / BLOCK) as u8;
            (j as u8)
                .wrapping_mul(31)
                .wrapping_add(blk.wrapping_mul(101))
                .wrapping_add(seed.wrapping_mul(53))
                ^ 0x5a
        })
        .collect()
}

/// Read up to `len` bytes at `off` through the mount (a fresh open each time).
pub fn read_range(path: &Path, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Write `data` to `name` in the mount and return the backing content file it created.
pub fn write_located(m: &Mounted, name: &str, data: &[u8]) -> PathBuf {
    let before = content_files(&m.backing);
    std::fs::write(m.p(name), data).unwrap();
    let mut new: Vec<PathBuf> = content_files(&m.backing)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "writing {name} created {new:?}");
    new.pop().unwrap()
}

/// The result is EIO.
#[track_caller]
pub fn assert_eio<T>(r: io::Result<T>, what: &str) {
    match r {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "{what}: expected EIO, got {e}"
        ),
        Ok(_) => panic!("{what}: expected EIO, data was returned"),
    }
}

/// Either the expected bytes or EIO: never different bytes.
#[track_caller]
pub fn assert_right_or_eio(r: io::Result<Vec<u8>>, expected: &[u8], what: &str) {
    match r {
        Ok(d) => assert!(
            d == expected,
            "{what}: WRONG DATA returned ({} bytes)",
            d.len()
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
    }
}

/// The daemon log has a line naming `backing_file` (its encrypted name at least).
#[track_caller]
pub fn assert_logged(env: &Env, backing_file: &Path) {
    let name = backing_file.file_name().unwrap().to_str().unwrap();
    let log = env.daemon_log();
    assert!(
        log.lines().any(|l| l.contains(name)),
        "daemon log has no line naming {}:\n{log}",
        backing_file.display()
    );
}

/// Sorted names of a directory.
pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// The rest of the volume still works: a bystander file in the root reads back, and a new
/// file can be written, read and listed.
#[track_caller]
pub fn assert_volume_works(m: &Mounted, bystander: &str, expected: &[u8]) {
    assert_eq!(
        std::fs::read(m.p(bystander)).unwrap(),
        expected,
        "bystander {bystander}"
    );
    let fresh = pattern(99, 3 * BLOCK + 17);
    std::fs::write(m.p("fresh-after-tamper"), &fresh).unwrap();
    assert_eq!(std::fs::read(m.p("fresh-after-tamper")).unwrap(), fresh);
    let names = list(&m.mnt);
    assert!(names.contains(&bystander.to_string()), "{names:?}");
    assert!(
        names.contains(&"fresh-after-tamper".to_string()),
        "{names:?}"
    );
    std::fs::remove_file(m.p("fresh-after-tamper")).unwrap();
}
