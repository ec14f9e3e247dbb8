//! Fuzzing on the stable toolchain: property tests with arbitrary and mutated inputs for
//! everything kekfs parses from disk, a token or the command line (cargo-fuzz and
//! libFuzzer need nightly). Each target checks "no panic" (proptest reports and shrinks
//! any), "no hang" (a watchdog aborts a case that runs for over a minute, and each case
//! must finish within a few seconds), "no unbounded allocation" (a counting allocator
//! fails any single allocation over 64 MiB made while a target runs), plus a property of
//! the target (round trips, authenticated data only, tampering detected).
//!
//! CI runs a quick pass (`PROPTEST_CASES` overrides the case count). For long runs,
//! `KEKFS_FUZZ_SECS=N` runs each target for about N seconds: `scripts/fuzz.sh`.

use kekfs::crypto::Key32;
use kekfs::crypto::aead::Cipher;
use kekfs::format::file_header::{FILE_HEADER_LEN, FileHeader};
use kekfs::format::names::{self, BackingName, Found};
use kekfs::format::volume_header::VolumeHeader;
use kekfs::kek::keystore::{self, Keystore};
use kekfs::kek::passphrase::Passphrase;
use kekfs::kek::pkcs11_uri::Pkcs11Uri;
use kekfs::kek::soft::SoftProvider;
use kekfs::kek::{KekProvider, KekUri, WrappedKey};
use kekfs::volume::{Volume, content};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Harness: allocation cap, watchdog, time-bounded runs
// ---------------------------------------------------------------------------------------

/// Largest single allocation a target may make (its inputs are at most a few KiB; the
/// biggest legitimate buffer is the keystore's 16 MiB read limit).
const ALLOC_LIMIT: usize = 64 << 20;

thread_local! {
    /// Largest allocation request on this thread since the last reset.
    static MAX_ALLOC: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: forwards to the system allocator; only records request sizes in a thread-local
// `Cell` (const-initialised, no destructor, so it never allocates itself).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = MAX_ALLOC.try_with(|m| m.set(m.get().max(l.size())));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let _ = MAX_ALLOC.try_with(|m| m.set(m.get().max(l.size())));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let _ = MAX_ALLOC.try_with(|m| m.set(m.get().max(new)));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Milliseconds since the start of the run at which some case last finished.
static PROGRESS: AtomicU64 = AtomicU64::new(0);
static CURRENT: Mutex<String> = Mutex::new(String::new());

fn start() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(|| {
        // A watchdog: a case that never returns (a hang) aborts the run, saying where.
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = start().elapsed().as_millis() as u64;
                if now.saturating_sub(PROGRESS.load(Ordering::Relaxed)) > 60_000 {
                    let cur = CURRENT.lock().map(|c| c.clone()).unwrap_or_default();
                    eprintln!("fuzz: no case finished for 60 s (in {cur}): a hang");
                    std::process::abort();
                }
            }
        });
        Instant::now()
    })
}

fn progress() {
    PROGRESS.store(start().elapsed().as_millis() as u64, Ordering::Relaxed);
}

/// Longest a single case may take.
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// Run `check` on inputs from `strategy`: `ci_cases` cases by default (`PROPTEST_CASES`
/// overrides), or batches until `KEKFS_FUZZ_SECS` seconds have passed.
/// `check` returns whether the input was accepted (parsed, opened, authenticated): the
/// run must accept some inputs, proving it reaches past the first checks.
fn fuzz<S>(
    name: &str,
    ci_cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    start();
    progress();
    *CURRENT.lock().unwrap() = name.to_string();
    let secs: Option<u64> = std::env::var("KEKFS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));
    let env_cases: Option<u32> = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok());
    let cases = if deadline.is_some() {
        500
    } else {
        env_cases.unwrap_or(ci_cases)
    };
    let t0 = Instant::now();
    let mut total = 0u64;
    let accepted = AtomicU64::new(0);
    loop {
        let config = Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 2000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let r = runner.run(&strategy, |v| {
            MAX_ALLOC.with(|m| m.set(0));
            let t = Instant::now();
            let r = check(v);
            let took = t.elapsed();
            progress();
            if r? {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            let biggest = MAX_ALLOC.with(Cell::get);
            prop_assert!(
                biggest <= ALLOC_LIMIT,
                "{name}: one allocation of {biggest} bytes"
            );
            prop_assert!(took <= CASE_LIMIT, "{name}: one case took {took:?}");
            Ok(())
        });
        if let Err(e) = r {
            panic!("fuzz target {name} failed: {e}");
        }
        total += u64::from(cases);
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    let accepted = accepted.into_inner();
    eprintln!(
        "fuzz {name}: {total} cases ({accepted} accepted) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        accepted > 0,
        "fuzz {name}: no input was accepted: the target never gets past its first checks"
    );
}

/// Arbitrary bytes, biased towards the interesting: zeros, 0xff, and short inputs.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..max),
        1 => prop::collection::vec(prop_oneof![Just(0u8), Just(0xff), any::<u8>()], 0..max),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ]
}

/// One byte-level edit of a seed input.
#[derive(Debug, Clone)]
enum Edit {
    Flip {
        at: usize,
        mask: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        data: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    /// Overwrite 2 or 4 bytes at `at` with an extreme little-endian value (length fields).
    Word {
        at: usize,
        wide: bool,
        value: u32,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = any::<usize>();
    prop_oneof![
        3 => (at, 1u8..).prop_map(|(at, mask)| Edit::Flip { at, mask }),
        2 => (at, any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
        1 => at.prop_map(|at| Edit::Truncate { at }),
        1 => (at, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, data)| Edit::Insert { at, data }),
        1 => (at, 1usize..64).prop_map(|(at, len)| Edit::Remove { at, len }),
        2 => (
            at,
            any::<bool>(),
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(0xffff),
                Just(0x1_0000),
                Just(4096),
                Just(4097),
                Just(u32::MAX),
                any::<u32>()
            ]
        )
            .prop_map(|(at, wide, value)| Edit::Word { at, wide, value }),
    ]
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for e in edits {
        let n = v.len();
        match e {
            Edit::Flip { at, mask } if n > 0 => v[at % n] ^= mask,
            Edit::Set { at, byte } if n > 0 => v[at % n] = *byte,
            Edit::Truncate { at } => v.truncate(at % (n + 1)),
            Edit::Insert { at, data } => {
                let at = at % (n + 1);
                v.splice(at..at, data.iter().copied());
            }
            Edit::Remove { at, len } if n > 0 => {
                let at = at % n;
                v.drain(at..(at + len).min(n));
            }
            Edit::Word { at, wide, value } => {
                let w = if *wide { 4 } else { 2 };
                if n >= w {
                    let at = at % (n - w + 1);
                    v[at..at + w].copy_from_slice(&value.to_le_bytes()[..w]);
                }
            }
            _ => {}
        }
    }
    v
}

/// A seed, arbitrary bytes, or the seed with 1–4 edits.
fn mutated(seed: Vec<u8>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    let s2 = seed.clone();
    prop_oneof![
        1 => Just(seed),
        2 => bytes(max),
        6 => prop::collection::vec(edit(), 1..5).prop_map(move |e| apply(&s2, &e)),
    ]
}

// ---------------------------------------------------------------------------------------
// Shared fixtures: a soft keystore with a cheap KDF, a volume
// ---------------------------------------------------------------------------------------

const PASS: &[u8] = b"fuzz passphrase";

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A valid keystore.json with cheap Argon2 parameters (m 8 KiB, t 1), so that opening it
/// costs microseconds and the fuzzer reaches everything behind the KDF.
fn cheap_keystore_json() -> serde_json::Value {
    use argon2::{Algorithm, Argon2, Params, Version};
    let salt = [7u8; 16];
    let mut master = [0u8; 32];
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(8, 1, 1, Some(32)).unwrap(),
    )
    .hash_password_into(PASS, &salt, &mut master)
    .unwrap();
    let master = Key32::from_bytes(master);
    let c = Cipher::new(&master);
    let material = |name: &str, v: u32| {
        let mut aad = keystore::MATERIAL_AAD_LABEL.to_vec();
        aad.extend_from_slice(name.as_bytes());
        aad.push(0);
        aad.extend_from_slice(&v.to_le_bytes());
        b64(&c.seal(&aad, &[v as u8; 32]))
    };
    serde_json::json!({
        "format": "kekfs-keystore",
        "version": 1,
        "kdf": {"alg": "argon2id", "m_kib": 8, "t": 1, "p": 1, "salt": b64(&salt)},
        "check": b64(&c.seal(keystore::CHECK_AAD, keystore::CHECK_PLAINTEXT)),
        "retention_secs": 604800,
        "keys": {
            "k": {
                "created": 1767225600u64, "purge_protection": false, "deleted_at": null,
                "retention_secs": null, "policy": null,
                "versions": [
                    {"version": 1, "created": 1767225600u64, "enabled": true,
                     "not_before": null, "expires": null, "material": material("k", 1)},
                    {"version": 2, "created": 1767225700u64, "enabled": true,
                     "not_before": null, "expires": 4102444800u64, "material": material("k", 2)}
                ],
                "volumes": [{"id": "a753a41dece015dc74dc47f1f48dc78a", "path": "/srv/vol.enc",
                             "registered": 1767225700u64}]
            },
            "other.key-2": {
                "created": 1767225600u64, "purge_protection": true, "deleted_at": 1767225800u64,
                "retention_secs": 86400, "policy": {"allow_uids": [0, 1000], "deny_uids": [7],
                "ops": ["unwrap"]},
                "versions": [{"version": 1, "created": 1767225600u64, "enabled": false,
                    "not_before": 1767225600u64, "expires": null,
                    "material": material("other.key-2", 1)}],
                "volumes": []
            }
        }
    })
}

fn passphrase() -> Passphrase {
    Passphrase::new(PASS.to_vec()).unwrap()
}

/// Write a file with mode 0600 (a keystore must not be readable by others).
fn write_private(path: &Path, data: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
}

/// A keystore (cheap KDF) and a volume in a temp dir (removed when dropped).
struct World {
    backing: std::path::PathBuf,
    provider: SoftProvider,
    volume: Volume,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks");
    std::fs::create_dir(&ks).unwrap();
    write_private(
        &ks.join(keystore::KEYSTORE_FILE),
        &serde_json::to_vec_pretty(&cheap_keystore_json()).unwrap(),
    );
    let provider =
        SoftProvider::from_keystore(Keystore::open(&ks, &passphrase()).unwrap(), "k", None)
            .unwrap();
    let backing = dir.path().join("backing");
    let volume = Volume::create(&backing, &provider, 0).unwrap();
    World {
        backing,
        provider,
        volume,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------------------
// Volume header
// ---------------------------------------------------------------------------------------

/// Header bytes with a correct trailing SHA-256, so the parser gets past the checksum.
fn with_checksum(mut body: Vec<u8>) -> Vec<u8> {
    use sha2::Digest as _;
    let sum = sha2::Sha256::digest(&body);
    body.extend_from_slice(&sum);
    body
}

#[test]
fn fuzz_volume_header_parse() {
    let w = world();
    let seed = std::fs::read(w.backing.join("kekfs.volume")).unwrap();
    let body = seed[..seed.len() - 32].to_vec();
    let strategy = prop_oneof![
        mutated(seed.clone(), 600),
        mutated(body.clone(), 600).prop_map(with_checksum),
    ];
    fuzz("volume header parse", 50_000, strategy, |b| {
        let parsed = VolumeHeader::parse(&b);
        let ok = parsed.is_ok();
        if let Ok((h, mac)) = parsed {
            prop_assert!(h.kek_uri.len() <= 4096);
            prop_assert!(h.slots.iter().all(|s| s.blob.len() <= 4096));
            let _ = h.verify_mac(&Key32::from_bytes([1; 32]), &mac);
            // What parsed is exactly what was read: serializing it again gives the same
            // body (everything before the MAC).
            let again = h.to_bytes(&Key32::from_bytes([1; 32])).unwrap();
            prop_assert_eq!(&again[..again.len() - 64], &b[..b.len() - 64]);
        }
        Ok(ok)
    });
}

/// A tampered header (checksum recomputed) never opens: the AEK-keyed MAC covers it all.
#[test]
fn fuzz_volume_open_with_tampered_header() {
    let w = world();
    let seed = std::fs::read(w.backing.join("kekfs.volume")).unwrap();
    let body = seed[..seed.len() - 32].to_vec();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kekfs.dirid"), [0u8; 16]).unwrap();
    fuzz(
        "volume open",
        5000,
        mutated(body.clone(), 600).prop_map(with_checksum),
        |b| {
            std::fs::write(dir.path().join("kekfs.volume"), &b).unwrap();
            if let Ok(v) = Volume::open(dir.path(), &w.provider) {
                prop_assert_eq!(&b[..b.len() - 32], &body[..], "a modified header opened");
                prop_assert_eq!(v.id(), w.volume.id());
                return Ok(true);
            }
            Ok(false)
        },
    );
}

/// Wrapped keys with any mechanism, version and blob never unwrap to anything but the
/// AEK, and never panic.
#[test]
fn fuzz_soft_unwrap_arbitrary_blobs() {
    let w = world();
    let (h, _) = kekfs::volume::read_header(&w.backing).unwrap();
    let good = h.slots[0].clone();
    let aek = w.provider.unwrap(&good).unwrap();
    let strategy = (
        prop_oneof![Just(good.mechanism), any::<u16>()],
        prop_oneof![Just(good.key_version), 0u32..4, any::<u32>()],
        mutated(good.blob.clone(), 200),
    );
    fuzz(
        "soft unwrap",
        5000,
        strategy,
        |(mechanism, key_version, blob)| {
            let wk = WrappedKey {
                mechanism,
                key_version,
                blob,
            };
            if let Ok(k) = w.provider.unwrap(&wk) {
                prop_assert_eq!(k.expose(), aek.expose());
                prop_assert!(wk == good, "a different wrapped key unwrapped");
                return Ok(true);
            }
            Ok(false)
        },
    );
}

// ---------------------------------------------------------------------------------------
// File header and content
// ---------------------------------------------------------------------------------------

#[test]
fn fuzz_file_header_parse() {
    let seed = FileHeader::new_random().to_bytes().to_vec();
    fuzz("file header parse", 50_000, mutated(seed, 64), |b| {
        if let Ok(h) = FileHeader::parse(&b) {
            prop_assert!(b.len() >= FILE_HEADER_LEN);
            prop_assert_eq!(&h.to_bytes()[..], &b[..FILE_HEADER_LEN]);
            return Ok(true);
        }
        Ok(false)
    });
}

/// What a content file turns into before it is read.
#[derive(Debug, Clone)]
enum ContentCase {
    /// Arbitrary bytes after a valid header.
    Random(Vec<u8>),
    /// A valid file of `len` plaintext bytes, then byte edits of its ciphertext.
    Edited { len: usize, edits: Vec<Edit> },
    /// A valid file with whole blocks zeroed (holes), then cut or extended.
    Holes {
        len: usize,
        zero: Vec<usize>,
        new_len: Option<usize>,
    },
}

fn content_case() -> impl Strategy<Value = ContentCase> {
    prop_oneof![
        bytes(20_000).prop_map(ContentCase::Random),
        (0usize..20_000, prop::collection::vec(edit(), 1..4))
            .prop_map(|(len, edits)| ContentCase::Edited { len, edits }),
        (
            0usize..20_000,
            prop::collection::vec(0usize..6, 0..3),
            prop::option::of(0usize..30_000)
        )
            .prop_map(|(len, zero, new_len)| ContentCase::Holes { len, zero, new_len }),
    ]
}

fn plain(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

/// Reading a content file of arbitrary or tampered bytes returns EIO or authentic bytes:
/// each byte is the original one at that offset, or zero where the block is a hole (all-zero
/// ciphertext: the documented hole semantics). Writing to such a file either fails or
/// makes the written range read back exactly.
#[test]
fn fuzz_content_read_tampered_or_arbitrary() {
    let w = world();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let file = tmp.as_file();
    let header = FileHeader::new_random();
    let fc = w.volume.file_cipher(&header);
    let reads = prop::collection::vec((0u64..32_768, 0u32..20_000), 1..4);
    let write = prop::option::of((0u64..24_000, 0usize..9000));
    fuzz(
        "content read",
        300,
        (content_case(), reads, write),
        |(case, reads, write)| {
            file.set_len(0).unwrap();
            content::write_file_header(file, &header).unwrap();
            let (original, bytes): (Vec<u8>, Vec<u8>) = match &case {
                ContentCase::Random(b) => (Vec::new(), b.clone()),
                ContentCase::Edited { len, edits } => {
                    let p = plain(*len);
                    content::write(file, &fc, 0, &p).unwrap();
                    let ct = std::fs::read(tmp.path()).unwrap();
                    let edited = apply(&ct[FILE_HEADER_LEN..], edits);
                    (p, edited)
                }
                ContentCase::Holes { len, zero, new_len } => {
                    let p = plain(*len);
                    content::write(file, &fc, 0, &p).unwrap();
                    let mut ct = std::fs::read(tmp.path()).unwrap()[FILE_HEADER_LEN..].to_vec();
                    for &b in zero {
                        let s = b * 4124;
                        let e = (s + 4124).min(ct.len());
                        if s < e {
                            ct[s..e].fill(0);
                        }
                    }
                    if let Some(n) = new_len {
                        ct.resize(*n, 0);
                    }
                    (p, ct)
                }
            };
            file.set_len(FILE_HEADER_LEN as u64).unwrap();
            use std::os::unix::fs::FileExt as _;
            file.write_all_at(&bytes, FILE_HEADER_LEN as u64).unwrap();
            let hole = |blk: usize| {
                let s = blk * 4124;
                s >= bytes.len()
                    || bytes[s..(s + 4124).min(bytes.len())]
                        .iter()
                        .all(|&x| x == 0)
            };
            let size = content::size_of(file).unwrap();
            let mut served = false;
            for (off, len) in reads.iter().copied().chain([(0, u32::MAX)]) {
                if let Ok(d) = content::read(file, &fc, off, len) {
                    served |= d.iter().any(|&x| x != 0);
                    prop_assert!(d.len() as u64 <= len as u64);
                    prop_assert!(d.is_empty() || off + d.len() as u64 <= size);
                    for (i, &x) in d.iter().enumerate() {
                        let p = off as usize + i;
                        let want = if hole(p / 4096) {
                            0
                        } else {
                            original.get(p).copied().unwrap_or(0)
                        };
                        prop_assert!(
                            x == want && (hole(p / 4096) || p < original.len()),
                            "read({off}, {len}) returned an unauthentic byte at {p}"
                        );
                    }
                }
            }
            if let Some((off, n)) = write {
                let data: Vec<u8> = (0..n).map(|i| (i % 13) as u8 + 100).collect();
                if content::write(file, &fc, off, &data).is_ok() && n > 0 {
                    let back = content::read(file, &fc, off, n as u32);
                    prop_assert!(
                        back.as_ref().is_ok_and(|b| *b == data),
                        "a successful write did not read back: {:?}",
                        back.map(|b| b.len())
                    );
                }
            }
            let _ = content::truncate(file, &fc, 3000);
            Ok(served)
        },
    );
}

// ---------------------------------------------------------------------------------------
// Names, symlinks, xattrs
// ---------------------------------------------------------------------------------------

/// A name the kernel may pass to kekfs: 1–255 bytes, no `/` or NUL, not `.` or `..`.
fn name_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
        1..=255,
    )
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

#[test]
fn fuzz_name_decode() {
    let w = world();
    let dir_id = [9u8; 16];
    let strategy = prop_oneof![
        // Backing names as found in a directory listing.
        bytes(300).prop_map(|b| (b, Vec::new(), false)),
        "[A-Za-z0-9_.-]{0,300}".prop_map(|s| (s.into_bytes(), Vec::new(), false)),
        // Real encrypted names, then edited.
        (name_bytes(), prop::collection::vec(edit(), 0..3)).prop_map(|(n, e)| (n, e, true)),
    ];
    fuzz("name decode", 10_000, strategy, |(input, edits, real)| {
        if !real {
            match names::classify(&input) {
                Found::Short(ct) => {
                    // Canonical: the ciphertext encodes back to the same backing name.
                    if input.len() <= names::MAX_BACKING_NAME {
                        let again = names::encode(&ct);
                        prop_assert_eq!(again.entry().as_bytes(), &input[..]);
                    }
                    let _ = w.volume.decrypt_name(&dir_id, &ct);
                }
                Found::Long => {
                    let entry = String::from_utf8(input.clone()).unwrap();
                    for side in [&input[..], b"", b"AAAA"] {
                        if let Some(ct) = names::decode_long(&entry, side) {
                            let same = matches!(
                                names::encode(&ct),
                                BackingName::Long { hashed, .. } if hashed == entry
                            );
                            prop_assert!(same, "a sidecar decoded to another entry's name");
                        }
                    }
                }
                Found::Internal => {}
            }
            let _ = w.volume.decrypt_symlink(&input);
            let _ = w.volume.decrypt_xattr_name(&input);
            let _ = w.volume.open_xattr_value(b"user.x", &input);
            return Ok(false);
        }
        let enc = w.volume.encrypt_name(&dir_id, &input).unwrap();
        let (entry, ct) = match &enc {
            BackingName::Short(s) => (s.clone(), names::b64_decode(s.as_bytes()).unwrap()),
            BackingName::Long { hashed, full } => {
                let ct = names::decode_long(hashed, full.as_bytes()).unwrap();
                prop_assert_eq!(names::classify(hashed.as_bytes()), Found::Long);
                (hashed.clone(), ct)
            }
        };
        prop_assert!(entry.len() <= names::MAX_BACKING_NAME);
        prop_assert_eq!(w.volume.decrypt_name(&dir_id, &ct), Some(input.clone()));
        prop_assert_eq!(
            w.volume.decrypt_name(&[8u8; 16], &ct),
            None,
            "moved to another dir"
        );
        let edited = apply(&ct, &edits);
        if edited != ct {
            prop_assert_eq!(w.volume.decrypt_name(&dir_id, &edited), None, "edited name");
        }
        // Symlink targets and xattrs of the same bytes: round trip, edits refused.
        let link = w.volume.encrypt_symlink(&input);
        prop_assert_eq!(
            w.volume.decrypt_symlink(link.as_bytes()),
            Some(input.clone())
        );
        let sealed = w.volume.seal_xattr_value(b"user.n", &input);
        let edited = apply(&sealed, &edits);
        if edited != sealed {
            prop_assert_eq!(w.volume.open_xattr_value(b"user.n", &edited), None);
        }
        Ok(true)
    });
}

// ---------------------------------------------------------------------------------------
// Keystore file
// ---------------------------------------------------------------------------------------

/// One structural edit of a JSON document.
#[derive(Debug, Clone)]
struct JsonEdit {
    path: usize,
    op: u8,
    pick: usize,
}

fn json_paths(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        serde_json::Value::Object(m) => {
            for (k, c) in m {
                json_paths(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        serde_json::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                json_paths(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn json_edit(v: &mut serde_json::Value, e: &JsonEdit) {
    use serde_json::{Value, json};
    let mut paths = Vec::new();
    json_paths(v, String::new(), &mut paths);
    let path = &paths[e.path % paths.len()];
    let numbers = [
        json!(0),
        json!(1),
        json!(-1),
        json!(7),
        json!(u32::MAX),
        json!(u64::from(u32::MAX) + 1),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e300),
        json!(0.5),
        json!(4102444800u64),
    ];
    let strings = [
        json!(""),
        json!("x"),
        json!("k"),
        json!("AAAA"),
        json!("%%%"),
        json!("a".repeat(5000)),
        json!("kekfs-keystore"),
        json!("argon2id"),
        json!("unwrap"),
        json!(b64(&[0u8; 60])),
        json!(b64(&[1u8; 51])),
        json!("\u{0}\u{ffff}é"),
    ];
    let new = match e.op % 9 {
        0 => None,
        1 => Some(Value::Null),
        2 => Some(json!(e.pick.is_multiple_of(2))),
        3 => Some(numbers[e.pick % numbers.len()].clone()),
        4 => Some(strings[e.pick % strings.len()].clone()),
        5 => Some(json!([])),
        6 => Some(json!({})),
        7 => {
            // Duplicate a sibling value (versions, keys, volumes).
            v.pointer(path).cloned()
        }
        _ => Some(json!([1, "x", null, {"a": []}])),
    };
    let (parent, last) = match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => {
            if let Some(n) = new {
                *v = n;
            }
            return;
        }
    };
    let Some(p) = v.pointer_mut(parent) else {
        return;
    };
    match (p, new) {
        (Value::Object(m), None) => {
            m.remove(&last.replace("~1", "/").replace("~0", "~"));
        }
        (Value::Object(m), Some(n)) if e.op % 9 == 7 => {
            m.insert(format!("{last}{}", e.pick % 10), n);
        }
        (Value::Object(m), Some(n)) => {
            m.insert(last.replace("~1", "/").replace("~0", "~"), n);
        }
        (Value::Array(a), None) => {
            if let Ok(i) = last.parse::<usize>()
                && i < a.len()
            {
                a.remove(i);
            }
        }
        (Value::Array(a), Some(n)) if e.op % 9 == 7 => a.push(n),
        (Value::Array(a), Some(n)) => {
            if let Ok(i) = last.parse::<usize>()
                && i < a.len()
            {
                a[i] = n;
            }
        }
        _ => {}
    }
}

/// Keep Argon2 cheap: parameters the format allows but that cost seconds (up to 4 GiB
/// and 100 passes, by design) are turned into cheap valid ones; invalid ones stay.
fn cheap_kdf(v: &mut serde_json::Value) {
    let Some(k) = v.get_mut("kdf").and_then(|k| k.as_object_mut()) else {
        return;
    };
    let p = k.get("p").and_then(|x| x.as_u64()).unwrap_or(0);
    if let Some(m) = k.get("m_kib").and_then(|x| x.as_u64())
        && (1..=64).contains(&p)
        && m > 256
        && m <= 4 * 1024 * 1024
    {
        k.insert("m_kib".into(), serde_json::json!(8 * p.min(4)));
        if p > 4 {
            k.insert("p".into(), serde_json::json!(4));
        }
    }
    if let Some(t) = k.get("t").and_then(|x| x.as_u64())
        && (3..=100).contains(&t)
    {
        k.insert("t".into(), serde_json::json!(2));
    }
    if p > 4 && p <= 64 {
        k.insert("p".into(), serde_json::json!(4));
    }
}

#[test]
fn fuzz_keystore_file_parse() {
    let seed = cheap_keystore_json();
    let text = serde_json::to_vec_pretty(&seed).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join(keystore::KEYSTORE_FILE);
    // The seed opens: the fuzzer reaches past the KDF and the check value.
    write_private(&json_path, &text);
    let ks = Keystore::open(dir.path(), &passphrase()).unwrap();
    assert_eq!(ks.key_names(), ["k", "other.key-2"]);
    let structural = prop::collection::vec(
        (any::<usize>(), any::<u8>(), any::<usize>()).prop_map(|(path, op, pick)| JsonEdit {
            path,
            op,
            pick,
        }),
        1..4,
    )
    .prop_map(move |edits| {
        let mut v = seed.clone();
        for e in &edits {
            json_edit(&mut v, e);
        }
        cheap_kdf(&mut v);
        serde_json::to_vec(&v).unwrap()
    });
    let textual = mutated(text.clone(), 3000).prop_map(|b| {
        // Byte edits can also produce expensive KDF parameters.
        match serde_json::from_slice::<serde_json::Value>(&b) {
            Ok(mut v) => {
                cheap_kdf(&mut v);
                serde_json::to_vec(&v).unwrap()
            }
            Err(_) => b,
        }
    });
    fuzz(
        "keystore file",
        3000,
        prop_oneof![3 => structural, 2 => textual],
        |b| {
            write_private(&json_path, &b);
            let Ok(ks) = Keystore::open(dir.path(), &passphrase()) else {
                return Ok(false);
            };
            let now = keystore::unix_now();
            for name in ks.key_names() {
                let _ = ks.key_info(&name);
                let _ = ks.key_material(&name, None, now);
                let _ = ks.key_material(&name, Some(1), now);
            }
            let _ = ks.list();
            if let Ok(p) = SoftProvider::from_keystore(ks, "k", None) {
                let aek = Key32::from_bytes([3; 32]);
                if let Ok(wk) = p.wrap(&aek)
                    && let Ok(back) = p.unwrap(&wk)
                {
                    prop_assert_eq!(back.expose(), aek.expose());
                }
                let _ = p.current_version();
            }
            Ok(true)
        },
    );
}

// ---------------------------------------------------------------------------------------
// PKCS#11 URIs
// ---------------------------------------------------------------------------------------

fn uri_value() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[A-Za-z0-9._~:@!$'()*+,-]{0,12}",
        3 => "(%[0-9A-Fa-f]{2}){0,6}",
        1 => "[a-z]{0,4}(%[0-9a-zA-Z]{0,2}|%)[a-z/ ;?&=]{0,4}",
        3 => "(file:|env:|/|file:///|file://host/|\\|)[A-Za-z0-9_/.]{0,16}",
        2 => "[0-9]{0,3}(\\.[0-9]{0,3})?",
        1 => any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

fn pkcs11_uri() -> impl Strategy<Value = String> {
    let path_keys = prop::sample::select(vec![
        "token",
        "manufacturer",
        "serial",
        "model",
        "library-manufacturer",
        "library-description",
        "library-version",
        "slot-manufacturer",
        "slot-description",
        "slot-id",
        "object",
        "object",
        "object",
        "type",
        "id",
        "x-vendor",
    ]);
    let path_keys = prop_oneof![
        9 => path_keys,
        1 => prop::sample::select(vec!["bogus", "", "Object", "id;"]),
    ];
    let query_keys = prop::sample::select(vec![
        "module-path",
        "module-name",
        "pin-source",
        "pin-value",
        "x-q",
    ]);
    let query_keys = prop_oneof![
        9 => query_keys,
        1 => prop::sample::select(vec!["nope", "", "Module-Path"]),
    ];
    let eq = prop::bool::weighted(0.95);
    let path = prop::collection::vec((path_keys, uri_value(), eq), 0..5);
    let query = prop::collection::vec((query_keys, uri_value(), eq), 0..3);
    (
        prop_oneof![
            8 => Just("pkcs11:"),
            1 => prop::sample::select(vec!["PKCS11:", "pkcs11", "pkcs11:;", ""]),
        ],
        path,
        query,
        any::<bool>(),
    )
        .prop_map(|(scheme, path, query, q)| {
            let attr = |(k, v, eq): &(&str, String, bool)| {
                if *eq {
                    format!("{k}={v}")
                } else {
                    format!("{k}{v}")
                }
            };
            let mut s = scheme.to_string();
            s += &path.iter().map(attr).collect::<Vec<_>>().join(";");
            if q || !query.is_empty() {
                s += "?";
                s += &query.iter().map(attr).collect::<Vec<_>>().join("&");
            }
            s
        })
}

#[test]
fn fuzz_pkcs11_uri_parse() {
    let strategy = prop_oneof![
        4 => pkcs11_uri(),
        1 => any::<String>(),
        1 => "soft:[A-Za-z0-9._?=&-]{0,20}",
    ];
    fuzz("pkcs11 uri", 30_000, strategy, |s| {
        let parsed = Pkcs11Uri::parse(&s);
        let ok = parsed.is_ok();
        if let Ok(mut u) = parsed {
            // The canonical form parses back to the same URI (pin-value is never printed).
            u.clear_pin_value();
            let printed = u.to_string();
            let back = Pkcs11Uri::parse(&printed);
            prop_assert_eq!(back.as_ref(), Ok(&u), "{} printed as {}", s, printed);
            prop_assert_eq!(u.pin_value(), None);
            let _ = kekfs::kek::pkcs11::check_kek_uri(&u);
        }
        if let Ok(k) = KekUri::parse(&s) {
            let printed = k.to_string();
            prop_assert_eq!(KekUri::parse(&printed).ok(), Some(k.clone()), "{}", printed);
            prop_assert!(!printed.contains("pin-value"));
            let _ = k.version();
            let _ = k.with_version(Some(258)).to_string();
        }
        Ok(ok)
    });
}

// ---------------------------------------------------------------------------------------
// Audit log lines
// ---------------------------------------------------------------------------------------

/// A valid audit log of a few lines, written by the real writer.
fn audit_seed(dir: &Path) -> Vec<u8> {
    use kekfs::audit::record::{Caller, Line};
    let w = kekfs::audit::writer::LogWriter::new(dir, 1 << 20);
    for i in 0..4u64 {
        let mut line = Line {
            time: format!("2027-01-01T00:00:0{i}.000Z"),
            seq: 0,
            task_name: "KekfsKeyOperation".into(),
            activity_id: "00000000-0000-4000-8000-000000000001".into(),
            event_id: format!("00000000-0000-4000-8000-00000000000{i}"),
            category: "info".into(),
            resource_id: "volume/00:/srv/v".into(),
            key_vault: "soft:/ks".into(),
            key: "k".into(),
            version: "1".into(),
            operation: "unwrapKey".into(),
            code: if i == 2 { "403".into() } else { "200".into() },
            message: format!("line {i} \"quoted\" é"),
            caller: Caller {
                uid: 0,
                pid: 1,
                program: "kekfs".into(),
                command: "mount".into(),
            },
            duration_ms: 1.5,
            count: 1 + i % 2,
            prev: String::new(),
        };
        w.append(&mut line).unwrap();
    }
    let files = kekfs::audit::reader::log_files(dir).unwrap();
    assert_eq!(files.len(), 1);
    std::fs::read(&files[0].path).unwrap()
}

/// Any edit of a log is found by `check`, except cutting whole lines off its end (not
/// detectable from the log alone; documented). Arbitrary bytes never panic the reader.
#[test]
fn fuzz_audit_line_parse_and_check() {
    use kekfs::audit::{chain, reader};
    let dir = tempfile::tempdir().unwrap();
    let seed = audit_seed(dir.path());
    let key = chain::load_key(&dir.path().join(chain::KEY_FILE)).unwrap();
    let files = reader::log_files(dir.path()).unwrap();
    let report = reader::check(&files, &key);
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.lines, 4);
    let log_path = files[0].path.clone();
    fuzz("audit log", 5000, mutated(seed.clone(), 2000), |b| {
        // Line by line, as `follow` and `summary` read.
        let mut lr = reader::LineReader::new(&b[..], 0, 1, true);
        let mut n = 0;
        let mut sealed = false;
        while let Ok(Some((_, raw))) = lr.next_line() {
            n += 1;
            prop_assert!(n <= b.len() + 1, "the line reader does not advance");
            if let reader::RawLine::Text(t) = raw {
                let _ = reader::seq_of(&t);
                if let Some((body, mac)) = chain::split(&t) {
                    sealed |= key.verify(body.as_bytes(), mac);
                }
                let _ = serde_json::from_str::<kekfs::audit::record::Line>(&t);
            }
        }
        // The whole file, as `audit check` reads it.
        std::fs::write(&log_path, &b).unwrap();
        let report = reader::check(&files, &key);
        // Whole lines cut off the end (with or without the last newline) are undetectable.
        let cut_at_line_end = seed.starts_with(&b)
            && (b.is_empty() || b.ends_with(b"\n") || seed.get(b.len()) == Some(&b'\n'));
        if b != seed && !cut_at_line_end {
            prop_assert!(
                !report.findings.is_empty(),
                "an edited log passed the check"
            );
        }
        if b == seed {
            prop_assert!(report.findings.is_empty());
        }
        Ok(sealed)
    });
}
