//! Stress: several threads run random operations at once against an in-memory model of
//! the filesystem (each thread its own subtree: create, write at random offsets, truncate,
//! rename (across directories, over other files), unlink, mkdir, rmdir, readdir, symlinks,
//! xattrs, fsync, and reads that must match the model), while all of them also write
//! their own unaligned stripe of one shared file (adjacent stripes share blocks, so the
//! daemon's per-file serialisation of read-modify-write is exercised). Half the time with
//! the FUSE write-back cache (`cache=writeback`), half with `cache=writethrough`. At the end the volume is
//! remounted and the whole model checked. Plus fio verify with several jobs.
//!
//! CI runs about 20 seconds at small sizes; `scripts/stress.sh` runs large
//! (`KEKFS_STRESS_SECS`, `KEKFS_STRESS_THREADS`, `KEKFS_STRESS_MAX_SIZE`, `KEKFS_FIO_SIZE`).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Workload data from the shared generator (common::Rng).
impl Rng {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let s = self.next();
        (0..n)
            .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9).wrapping_add(s) >> 11) as u8)
            .collect()
    }
}

/// One thread's subtree: relative path → entry.
#[derive(Clone, Debug, PartialEq)]
enum Entry {
    File(Vec<u8>),
    Dir,
    Link(Vec<u8>),
}

struct Worker {
    root: String,
    mnt: std::path::PathBuf,
    rng: Rng,
    tree: BTreeMap<String, Entry>,
    max_size: usize,
    next: u64,
    ops: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
}

impl Worker {
    fn p(&self, rel: &str) -> std::path::PathBuf {
        self.mnt.join(&self.root).join(rel)
    }

    fn dirs(&self) -> Vec<String> {
        std::iter::once(String::new())
            .chain(
                self.tree
                    .iter()
                    .filter(|(_, e)| **e == Entry::Dir)
                    .map(|(k, _)| k.clone()),
            )
            .collect()
    }

    fn pick(&mut self, want: impl Fn(&Entry) -> bool) -> Option<String> {
        let v: Vec<&String> = self
            .tree
            .iter()
            .filter(|(_, e)| want(e))
            .map(|(k, _)| k)
            .collect();
        if v.is_empty() {
            return None;
        }
        Some(v[self.rng.below(v.len() as u64) as usize].clone())
    }

    fn new_name(&mut self) -> String {
        let dirs = self.dirs();
        let d = dirs[self.rng.below(dirs.len() as u64) as usize].clone();
        self.next += 1;
        // Some names long enough for the hashed long-name form.
        let base = if self.rng.below(8) == 0 {
            format!("long-{}-{}", self.next, "n".repeat(190))
        } else {
            format!("e{}", self.next)
        };
        if d.is_empty() {
            base
        } else {
            format!("{d}/{base}")
        }
    }

    fn step(&mut self) {
        self.ops += 1;
        match self.rng.below(100) {
            0..=9 => {
                let name = self.new_name();
                let n = self.rng.below(3 * 4096) as usize;
                let data = self.rng.bytes(n);
                std::fs::write(self.p(&name), &data).unwrap();
                self.tree.insert(name, Entry::File(data));
            }
            10..=34 => {
                let Some(name) = self.pick(|e| matches!(e, Entry::File(_))) else {
                    return;
                };
                let Some(Entry::File(cur)) = self.tree.get(&name) else {
                    unreachable!()
                };
                let len = cur.len();
                let off = self.rng.below(len as u64 + 4096) as usize;
                let n =
                    (1 + self.rng.below(20_000) as usize).min(self.max_size.saturating_sub(off));
                if n == 0 {
                    return;
                }
                let data = self.rng.bytes(n);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(self.p(&name))
                    .unwrap();
                f.write_all_at(&data, off as u64).unwrap();
                if self.rng.below(10) == 0 {
                    f.sync_data().unwrap();
                }
                let Some(Entry::File(cur)) = self.tree.get_mut(&name) else {
                    unreachable!()
                };
                if cur.len() < off + n {
                    cur.resize(off + n, 0);
                }
                cur[off..off + n].copy_from_slice(&data);
            }
            35..=41 => {
                let Some(name) = self.pick(|e| matches!(e, Entry::File(_))) else {
                    return;
                };
                let path = self.p(&name);
                let Some(Entry::File(cur)) = self.tree.get_mut(&name) else {
                    unreachable!()
                };
                let new = self.rng.below(cur.len() as u64 + 8192) as usize;
                let new = new.min(self.max_size);
                let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.set_len(new as u64).unwrap();
                cur.resize(new, 0);
            }
            42..=59 => {
                let Some(name) = self.pick(|e| matches!(e, Entry::File(_))) else {
                    return;
                };
                let Some(Entry::File(cur)) = self.tree.get(&name) else {
                    unreachable!()
                };
                let got = std::fs::read(self.p(&name)).unwrap();
                assert!(
                    got == *cur,
                    "{}/{name}: read {} bytes, model has {}; content differs",
                    self.root,
                    got.len(),
                    cur.len()
                );
            }
            60..=67 => {
                // Rename a file or a link, sometimes over another file.
                let Some(from) = self.pick(|e| !matches!(e, Entry::Dir)) else {
                    return;
                };
                let to = if self.rng.below(3) == 0 {
                    self.pick(|e| matches!(e, Entry::File(_)))
                        .filter(|t| *t != from)
                        .unwrap_or_else(|| self.new_name())
                } else {
                    self.new_name()
                };
                std::fs::rename(self.p(&from), self.p(&to)).unwrap();
                let e = self.tree.remove(&from).unwrap();
                self.tree.insert(to, e);
            }
            68..=72 => {
                let Some(name) = self.pick(|e| !matches!(e, Entry::Dir)) else {
                    return;
                };
                std::fs::remove_file(self.p(&name)).unwrap();
                self.tree.remove(&name);
            }
            73..=77 => {
                if self.dirs().len() < 8 {
                    let name = self.new_name();
                    std::fs::create_dir(self.p(&name)).unwrap();
                    self.tree.insert(name, Entry::Dir);
                } else if let Some(d) = self.pick(|e| *e == Entry::Dir) {
                    let prefix = format!("{d}/");
                    let empty = !self.tree.keys().any(|k| k.starts_with(&prefix));
                    let r = std::fs::remove_dir(self.p(&d));
                    if empty {
                        r.unwrap();
                        self.tree.remove(&d);
                    } else {
                        assert_eq!(errno(r), Some(libc::ENOTEMPTY), "rmdir {d}");
                    }
                }
            }
            78..=85 => {
                // readdir of one directory equals the model's children.
                let dirs = self.dirs();
                let d = dirs[self.rng.below(dirs.len() as u64) as usize].clone();
                let mut got: Vec<String> = std::fs::read_dir(self.p(&d))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                got.sort();
                let prefix = if d.is_empty() {
                    String::new()
                } else {
                    format!("{d}/")
                };
                let mut want: Vec<String> = self
                    .tree
                    .keys()
                    .filter_map(|k| k.strip_prefix(&prefix))
                    .filter(|k| !k.contains('/'))
                    .map(str::to_string)
                    .collect();
                want.sort();
                assert_eq!(
                    got, want,
                    "{}/{d}: listing differs from the model",
                    self.root
                );
            }
            86..=89 => {
                let name = self.new_name();
                let n = 1 + self.rng.below(300) as usize;
                let target = self.rng.bytes(n);
                let target: Vec<u8> = target.into_iter().map(|b| b'a' + b % 26).collect();
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), self.p(&name))
                    .unwrap();
                assert_eq!(
                    std::fs::read_link(self.p(&name))
                        .unwrap()
                        .as_os_str()
                        .as_bytes(),
                    &target[..]
                );
                self.tree.insert(name, Entry::Link(target));
            }
            90..=93 => {
                // A user xattr on the subtree's root directory.
                let key = format!("user.k{}", self.rng.below(4));
                let n = self.rng.below(200) as usize;
                let val = self.rng.bytes(n);
                setxattr(&self.mnt.join(&self.root), &key, &val, 0).unwrap();
                self.xattrs.insert(key.clone(), val.clone());
                assert_eq!(getxattr(&self.mnt.join(&self.root), &key).unwrap(), val);
            }
            _ => {
                let Some(name) = self.pick(|e| matches!(e, Entry::File(_))) else {
                    return;
                };
                File::open(self.p(&name)).unwrap().sync_all().unwrap();
            }
        }
    }

    /// Everything in the model is in the mount, and nothing else.
    fn verify_all(&self, mnt: &Path) {
        let base = mnt.join(&self.root);
        let mut seen = BTreeMap::new();
        let mut stack = vec![String::new()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(base.join(&d)).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                let rel = if d.is_empty() {
                    name
                } else {
                    format!("{d}/{name}")
                };
                let ft = e.file_type().unwrap();
                let entry = if ft.is_dir() {
                    stack.push(rel.clone());
                    Entry::Dir
                } else if ft.is_symlink() {
                    Entry::Link(
                        std::fs::read_link(base.join(&rel))
                            .unwrap()
                            .into_os_string()
                            .into_vec(),
                    )
                } else {
                    Entry::File(std::fs::read(base.join(&rel)).unwrap())
                };
                seen.insert(rel, entry);
            }
        }
        for (k, v) in &self.tree {
            assert_eq!(seen.get(k), Some(v), "{}/{k} after remount", self.root);
        }
        assert_eq!(
            seen.len(),
            self.tree.len(),
            "{}: extra entries after remount",
            self.root
        );
        for (k, v) in &self.xattrs {
            assert_eq!(&getxattr(&base, k).unwrap(), v, "{}: xattr {k}", self.root);
        }
    }
}

/// Each thread owns an unaligned stripe of `shared`; adjacent stripes share a block.
const STRIPE: usize = 3001;

fn stripe_write(rng: &mut Rng, f: &File, k: usize, model: &mut [u8]) {
    let off = rng.below(STRIPE as u64) as usize;
    let n = 1 + rng.below((STRIPE - off) as u64) as usize;
    let data = rng.bytes(n);
    f.write_all_at(&data, (k * STRIPE + off) as u64).unwrap();
    model[off..off + n].copy_from_slice(&data);
}

#[test]
fn multithreaded_random_operations_match_the_model() {
    let Some(env) = Env::new("multithreaded_random_operations_match_the_model") else {
        return;
    };
    env.init_volume();
    let secs = env_num("KEKFS_STRESS_SECS", 20);
    let threads = env_num("KEKFS_STRESS_THREADS", 4) as usize;
    let max_size = env_num("KEKFS_STRESS_MAX_SIZE", 256 << 10) as usize;
    let seed = env_num(
        "KEKFS_STRESS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("stress: seed {seed}, {threads} threads, {secs} s, files up to {max_size} bytes");
    let mut workers: Vec<Worker> = (0..threads)
        .map(|k| Worker {
            root: format!("t{k}"),
            mnt: env.mnt.clone(),
            rng: Rng((seed ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1),
            tree: BTreeMap::new(),
            max_size,
            next: 0,
            ops: 0,
            xattrs: BTreeMap::new(),
        })
        .collect();
    let mut stripes: Vec<Vec<u8>> = vec![vec![0u8; STRIPE]; threads];
    let mut total_ops = 0;
    for (phase, opts) in [
        ["cache=writeback"].as_slice(),
        ["cache=writethrough"].as_slice(),
    ]
    .iter()
    .enumerate()
    {
        let m = env.mount_with(opts);
        if phase == 0 {
            for w in &workers {
                std::fs::create_dir(m.p(&w.root)).unwrap();
            }
            File::create(m.p("shared"))
                .unwrap()
                .set_len((threads * STRIPE) as u64)
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(secs / 2);
        let shared = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(m.p("shared"))
                .unwrap(),
        );
        let handles: Vec<_> = workers
            .drain(..)
            .zip(stripes.drain(..))
            .enumerate()
            .map(|(k, (mut w, mut stripe))| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    while Instant::now() < deadline {
                        w.step();
                        if w.ops % 4 == 0 {
                            stripe_write(&mut w.rng, &shared, k, &mut stripe);
                            let mut back = vec![0u8; STRIPE];
                            shared
                                .read_exact_at(&mut back, (k * STRIPE) as u64)
                                .unwrap();
                            assert!(back == stripe, "shared file: stripe {k} lost a write");
                        }
                    }
                    (w, stripe)
                })
            })
            .collect();
        for h in handles {
            let (w, s) = match h.join() {
                Ok(r) => r,
                Err(p) => {
                    eprintln!("daemon log:\n{}", env.daemon_log());
                    std::panic::resume_unwind(p);
                }
            };
            total_ops += w.ops;
            workers.push(w);
            stripes.push(s);
        }
        drop(shared);
        m.unmount();
    }
    // Remounted: the whole model is there.
    let m = env.mount();
    for w in &workers {
        w.verify_all(&m.mnt);
    }
    let shared = std::fs::read(m.p("shared")).unwrap();
    assert_eq!(shared, stripes.concat(), "shared file after remount");
    m.unmount();
    eprintln!("stress: {total_ops} operations, all verified after a remount");
    assert!(total_ops > 100, "only {total_ops} operations in {secs} s");
}

#[test]
fn fio_verify_with_several_jobs() {
    if !fio_available("fio_verify_with_several_jobs") {
        return;
    }
    let Some(env) = Env::new("fio_verify_with_several_jobs") else {
        return;
    };
    env.init_volume();
    let size = std::env::var("KEKFS_FIO_SIZE").unwrap_or_else(|_| "24m".into());
    let m = env.mount();
    for job in [
        // Four jobs, random reads and writes of 4 KiB blocks, each block verified.
        vec!["--name=rw", "--rw=randrw", "--bs=4k", "--numjobs=4"],
        // Four jobs writing random unaligned sizes (read-modify-write of partial blocks).
        vec![
            "--name=odd",
            "--rw=randwrite",
            "--bsrange=512-64k",
            "--bs_unaligned",
            "--numjobs=4",
        ],
        // Direct I/O (no page cache), two jobs.
        vec![
            "--name=direct",
            "--rw=randrw",
            "--bs=16k",
            "--numjobs=2",
            "--direct=1",
        ],
    ] {
        let out = Command::new("fio")
            .args(&job)
            .arg(format!("--size={size}"))
            .args([
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--group_reporting",
            ])
            .arg(format!("--directory={}", m.mnt.display()))
            .output()
            .expect("run fio");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("err= 0"),
            "fio {job:?} failed ({:?}):\n{stdout}\n{}\ndaemon log:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            env.daemon_log()
        );
    }
    m.unmount();
}
