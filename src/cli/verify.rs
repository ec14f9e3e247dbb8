//! `kekfs verify BACKING|MOUNTPOINT`: proof that a volume is really under its KEK (seed
//! 004): which KEK and version wrap the AEK in each header slot, that both unwrap and the
//! header authenticates, how the KEK is protected (token attributes read back, or the
//! software keystore's passphrase), and that every name, file header, block, symlink and
//! xattr of the backing tree authenticates. Lists every failure; exits 25 on any.

use super::audit::outln;
use super::error::CliError;
use super::exit;
use super::printable;
use crate::audit::record::{Event, TASK_VOLUME_STATE, op};
use crate::audit::{self, To};
use crate::format::names::{self as fnames, Found};
use crate::format::offsets::BLOCK_SIZE;
use crate::format::{DIRID_FILE, parse_dirid};
use crate::kek::{KekError, KekProvider, KekUri, ProviderOptions, mechanism, pkcs11};
use crate::volume::content::{self, ContentError};
use crate::volume::{self, Volume};
use serde::Serialize;
use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `verify` checks against, beyond the volume's own header.
#[derive(Debug, Default)]
pub struct Expect {
    /// `--kek URI`: the KEK the volume must be under.
    pub kek: Option<String>,
    /// `--key-version N`: the version slot 0 must be wrapped by.
    pub version: Option<u32>,
}

/// One header slot.
#[derive(Debug, Serialize)]
struct Slot {
    slot: usize,
    key_version: u32,
    mechanism: &'static str,
    unwraps: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// How the KEK is protected.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum Protection {
    /// `soft:` keystore.
    Software { keystore: PathBuf, summary: String },
    /// `pkcs11:` token attributes.
    Token { objects: Vec<pkcs11::KeyProtection> },
    /// Could not be determined.
    Unknown { error: String },
}

/// Content counters.
#[derive(Debug, Default, Serialize)]
struct Stats {
    directories: u64,
    files: u64,
    blocks: u64,
    bytes: u64,
    symlinks: u64,
    xattrs: u64,
}

/// One problem.
#[derive(Debug, Serialize)]
struct Finding {
    /// `kek`, `header`, `directory`, `name`, `file-header`, `block`, `cut-short`, `symlink`,
    /// `xattr`, `io`.
    kind: &'static str,
    /// Plaintext path (as far as known).
    path: String,
    /// Backing path.
    backing: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    block: Option<u64>,
    detail: String,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    ok: bool,
    backing: PathBuf,
    volume_id: String,
    kek: String,
    /// 0 = follows the latest version.
    pinned_version: u32,
    current_version: Option<u32>,
    slots: Vec<Slot>,
    header_authenticated: bool,
    key_protection: Protection,
    content: Stats,
    findings: Vec<Finding>,
    notes: Vec<String>,
}

impl Report {
    fn find(&mut self, kind: &'static str, path: &str, backing: &Path, detail: String) {
        self.findings.push(Finding {
            kind,
            path: path.to_string(),
            backing: backing.to_path_buf(),
            block: None,
            detail,
        });
    }
}

fn mechanism_name(m: u16) -> &'static str {
    match m {
        mechanism::SOFT_AES256_GCM => "soft AES-256-GCM",
        mechanism::PKCS11_AES_KEY_WRAP_PAD => "CKM_AES_KEY_WRAP_PAD",
        mechanism::PKCS11_AES_KEY_WRAP => "CKM_AES_KEY_WRAP",
        mechanism::PKCS11_AES_GCM => "CKM_AES_GCM",
        mechanism::PKCS11_RSA_OAEP_SHA256 => "CKM_RSA_PKCS_OAEP (SHA-256)",
        mechanism::PKCS11_RSA_OAEP_SHA1 => "CKM_RSA_PKCS_OAEP (SHA-1)",
        _ => "unknown mechanism",
    }
}

/// Run `kekfs verify`.
pub fn verify(
    path: &Path,
    expect: &Expect,
    json: bool,
    popts: &ProviderOptions,
) -> Result<(), CliError> {
    let backing = super::rewrap::backing_of(path)?;
    let (h, _) = volume::read_header(&backing)?;
    let uri = KekUri::parse(&h.kek_uri)?;
    let mut r = Report {
        ok: false,
        backing: backing.clone(),
        volume_id: volume::hex(&h.volume_id),
        kek: h.kek_uri.clone(),
        pinned_version: h.pinned_version,
        current_version: None,
        slots: Vec::new(),
        header_authenticated: false,
        key_protection: Protection::Unknown {
            error: "not checked".into(),
        },
        content: Stats::default(),
        findings: Vec::new(),
        notes: Vec::new(),
    };
    let slot0 = h.slots[0].key_version;
    if let Some(k) = &expect.kek {
        let want = KekUri::parse(k)?;
        if want.with_version(None) != uri.with_version(None) {
            r.find(
                "kek",
                "/",
                &backing,
                format!("the volume is under {} but {k} was expected", h.kek_uri),
            );
        } else if let Some(v) = want.version()
            && v != slot0
        {
            r.find(
                "kek",
                "/",
                &backing,
                format!("slot 0 is wrapped by version {slot0}, the expected URI pins {v}"),
            );
        }
    }
    if let Some(v) = expect.version
        && v != slot0
    {
        r.find(
            "kek",
            "/",
            &backing,
            format!("slot 0 is wrapped by KEK version {slot0}, version {v} was expected"),
        );
    }
    if h.pinned_version != 0 && h.pinned_version != slot0 {
        r.find(
            "kek",
            "/",
            &backing,
            format!(
                "the volume is pinned to version {} but slot 0 is wrapped by version {slot0}",
                h.pinned_version
            ),
        );
    }
    let provider = audit::open_audited(&uri, popts, Some((&h.volume_id, &backing)))?;
    // Each slot on its own: both must unwrap, to the same key.
    let mut keys = Vec::new();
    for (i, s) in h.slots.iter().enumerate() {
        let res = provider.unwrap(s);
        let mut slot = Slot {
            slot: i,
            key_version: s.key_version,
            mechanism: mechanism_name(s.mechanism),
            unwraps: res.is_ok(),
            error: res.as_ref().err().map(ToString::to_string),
        };
        match res {
            Ok(k) => keys.push(k),
            Err(e) if i == 1 && slot_one_tolerable(&e, s.key_version, slot0) => {
                r.notes.push(format!(
                    "slot 1 holds the previous wrapping (version {}), which no longer unwraps \
                     ({e}); harmless while slot 0 works, and replaced at the next rewrap",
                    s.key_version
                ));
                slot.error = Some(e.to_string());
            }
            Err(e) => r.find(
                "kek",
                "/",
                &backing,
                format!(
                    "slot {i} (KEK version {}) does not unwrap: {e}",
                    s.key_version
                ),
            ),
        }
        r.slots.push(slot);
    }
    if keys.len() == 2 && keys[0].expose() != keys[1].expose() {
        r.find(
            "header",
            "/",
            &backing,
            "the two header slots unwrap to different keys".into(),
        );
    }
    drop(keys);
    match provider.current_version() {
        Ok(Some(c)) => {
            r.current_version = Some(c);
            if h.pinned_version == 0 && c != slot0 {
                r.notes.push(format!(
                    "the KEK's current version is {c} but the volume is wrapped by version \
                     {slot0}: a mount rewraps it at its next poll, or run `kekfs rewrap`"
                ));
            }
        }
        Ok(None) => {}
        Err(e) => r
            .notes
            .push(format!("the KEK's current version is unknown: {e}")),
    }
    r.key_protection = protection(&uri, slot0, popts, &mut r);
    let vol = match Volume::open(&backing, &provider) {
        Ok(v) => {
            r.header_authenticated = true;
            Some(v)
        }
        Err(e) => {
            r.find(
                "header",
                "/",
                &backing,
                format!("the volume does not open: {e}"),
            );
            None
        }
    };
    if let Some(vol) = &vol {
        Walker::new(vol, &mut r).run(&backing);
    }
    r.ok = r.findings.is_empty();
    // The verification itself is audited (its unwraps were, line by line).
    let mut ev = Event::new(TASK_VOLUME_STATE, op::VERIFY, if r.ok { 200 } else { 422 });
    ev.version = Some(slot0);
    ev.message = format!(
        "{} problem(s); {} files, {} blocks checked",
        r.findings.len(),
        r.content.files,
        r.content.blocks
    );
    provider.audit().emit(&ev, To::Both)?;
    if json {
        let s = serde_json::to_string_pretty(&r).map_err(|e| CliError::failure(e.to_string()))?;
        outln!("{s}");
    } else {
        print_text(&r);
    }
    if r.ok {
        Ok(())
    } else {
        Err(CliError::new(
            exit::VERIFY_FAILED,
            format!(
                "verification of {} failed: {} problem(s)",
                backing.display(),
                r.findings.len()
            ),
        ))
    }
}

/// Slot 1 may hold an older wrapping whose version is now refused or gone.
fn slot_one_tolerable(e: &KekError, v1: u32, v0: u32) -> bool {
    v1 != v0 && matches!(e, KekError::Refused { .. } | KekError::NotFound(_))
}

fn protection(uri: &KekUri, version: u32, popts: &ProviderOptions, r: &mut Report) -> Protection {
    match uri {
        KekUri::Soft { .. } => {
            r.notes.push(
                "soft: KEK: software-protected. Its material is stored encrypted in the \
                 keystore under a key derived from the keystore passphrase (Argon2id); anyone \
                 with the passphrase and keystore.json (or root on this machine while it is \
                 in use) can extract it. Use a pkcs11: token for a non-extractable KEK."
                    .into(),
            );
            Protection::Software {
                keystore: popts.keystore_dir.clone(),
                summary: "software keystore, passphrase-protected; extractable by whoever \
                          holds the passphrase"
                    .into(),
            }
        }
        KekUri::Pkcs11(u) => {
            let read =
                pkcs11::Pkcs11Provider::open(u, popts).and_then(|p| p.key_protection(version));
            match read {
                Ok(objects) => {
                    for o in &objects {
                        if o.sensitive != Some(true) || o.extractable != Some(false) {
                            r.find(
                                "kek",
                                "/",
                                &r.backing.clone(),
                                format!(
                                    "the token's {} (version {}) is not protected: \
                                     CKA_SENSITIVE={:?}, CKA_EXTRACTABLE={:?} (need true, \
                                     false)",
                                    o.class, o.version, o.sensitive, o.extractable
                                ),
                            );
                        } else if o.always_sensitive != Some(true)
                            || o.never_extractable != Some(true)
                        {
                            r.notes.push(format!(
                                "the token's {} (version {}) is sensitive and not extractable \
                                 now, but CKA_ALWAYS_SENSITIVE={:?}, CKA_NEVER_EXTRACTABLE={:?}: \
                                 it may have been exported before",
                                o.class, o.version, o.always_sensitive, o.never_extractable
                            ));
                        }
                    }
                    if objects.is_empty() {
                        r.find(
                            "kek",
                            "/",
                            &r.backing.clone(),
                            format!("no key object unwraps for version {version}"),
                        );
                    }
                    Protection::Token { objects }
                }
                Err(e) => {
                    r.find(
                        "kek",
                        "/",
                        &r.backing.clone(),
                        format!("reading the token key's attributes failed: {e}"),
                    );
                    Protection::Unknown {
                        error: e.to_string(),
                    }
                }
            }
        }
    }
}

/// Walks the backing tree with the unlocked volume.
struct Walker<'a> {
    vol: &'a Volume,
    r: &'a mut Report,
    seen: HashSet<(u64, u64)>,
    progress: Option<Instant>,
    started: Instant,
}

impl<'a> Walker<'a> {
    fn new(vol: &'a Volume, r: &'a mut Report) -> Self {
        Walker {
            vol,
            r,
            seen: HashSet::new(),
            progress: std::io::stderr().is_terminal().then(Instant::now),
            started: Instant::now(),
        }
    }

    fn tick(&mut self, force: bool) {
        let Some(last) = self.progress else { return };
        if !force && last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.progress = Some(Instant::now());
        let c = &self.r.content;
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\rverifying: {} dirs, {} files, {} blocks ({:.1} MiB, {:.0} MiB/s)\x1b[K",
            c.directories,
            c.files,
            c.blocks,
            c.bytes as f64 / 1048576.0,
            c.bytes as f64 / 1048576.0 / secs
        );
        let _ = std::io::stderr().flush();
    }

    fn run(mut self, root: &Path) {
        let mut stack = vec![(root.to_path_buf(), String::new())];
        while let Some((dir, plain)) = stack.pop() {
            self.dir(&dir, &plain, &mut stack);
            self.tick(false);
        }
        if self.progress.is_some() {
            self.tick(true);
            eprintln!();
        }
    }

    fn dir(&mut self, dir: &Path, plain: &str, stack: &mut Vec<(PathBuf, String)>) {
        self.r.content.directories += 1;
        let shown = if plain.is_empty() { "/" } else { plain };
        // Bounded read: the backing tree is untrusted (a valid id file has 16 bytes).
        let id = match crate::untrusted::read(&dir.join(DIRID_FILE), 64)
            .map_err(|e| e.to_string())
            .and_then(|b| parse_dirid(&b).map_err(|e| e.0))
        {
            Ok(id) => id,
            Err(e) => {
                self.r.find(
                    "directory",
                    shown,
                    dir,
                    format!("directory id {DIRID_FILE} missing or damaged ({e}): its names cannot be decrypted"),
                );
                return;
            }
        };
        self.xattrs(dir, shown);
        let mut entries: Vec<_> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.flatten().collect(),
            Err(e) => {
                self.r.find("io", shown, dir, format!("cannot list: {e}"));
                return;
            }
        };
        entries.sort_by_key(|e| e.file_name());
        let mut dec = self.vol.name_decryptor();
        for e in entries {
            let name = e.file_name();
            let bname = name.as_bytes();
            let path = e.path();
            let ct = match fnames::classify(bname) {
                Found::Short(ct) => ct,
                Found::Long => {
                    let side = dir.join(format!(
                        "{}{}",
                        name.to_string_lossy(),
                        fnames::LONG_SIDECAR_SUFFIX
                    ));
                    match crate::untrusted::read(&side, 4096)
                        .ok()
                        .and_then(|buf| fnames::decode_long(&name.to_string_lossy(), &buf))
                    {
                        Some(ct) => ct,
                        None => {
                            self.r.find(
                                "name",
                                &format!("{plain}/?"),
                                &path,
                                "long-name entry whose sidecar is missing or does not match".into(),
                            );
                            continue;
                        }
                    }
                }
                Found::Internal => {
                    if !bname.starts_with(crate::format::RESERVED_PREFIX.as_bytes()) {
                        self.r.notes.push(format!(
                            "{}: not a kekfs entry (ignored by kekfs)",
                            path.display()
                        ));
                    }
                    continue;
                }
            };
            let Some(pname) = dec.decrypt(&id, &ct) else {
                self.r.find(
                    "name",
                    &format!("{plain}/?"),
                    &path,
                    "the name does not decrypt in this directory (tampered, or moved from \
                     another directory)"
                        .into(),
                );
                continue;
            };
            let child = format!("{plain}/{}", String::from_utf8_lossy(&pname));
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push((path, child));
            } else if ft.is_file() {
                if self.seen.insert((md.dev(), md.ino())) {
                    self.file(&path, &child);
                    self.xattrs(&path, &child);
                }
            } else if ft.is_symlink() {
                self.r.content.symlinks += 1;
                let ok = std::fs::read_link(&path)
                    .ok()
                    .and_then(|t| self.vol.decrypt_symlink(t.as_os_str().as_bytes()))
                    .is_some();
                if !ok {
                    self.r.find(
                        "symlink",
                        &child,
                        &path,
                        "the symlink target does not decrypt".into(),
                    );
                }
            }
            self.tick(false);
        }
    }

    fn file(&mut self, path: &Path, plain: &str) {
        self.r.content.files += 1;
        let f = match crate::untrusted::open(path, libc::O_RDONLY, 0) {
            Ok(f) => f,
            Err(e) => {
                self.r.find("io", plain, path, format!("cannot open: {e}"));
                return;
            }
        };
        let header = match content::read_file_header(&f) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(ContentError::BadHeader(m)) => {
                self.r.find(
                    "file-header",
                    plain,
                    path,
                    format!("file header missing or damaged ({m}): the whole file is unreadable"),
                );
                return;
            }
            Err(e) => {
                self.r.find("io", plain, path, e.to_string());
                return;
            }
        };
        let fc = self.vol.file_cipher(&header);
        let size = match content::size_of(&f) {
            Ok(s) => s,
            Err(e) => {
                self.r.find("io", plain, path, e.to_string());
                return;
            }
        };
        // 256 KiB at a time; a chunk that fails is re-read block by block to name each bad
        // block.
        const CHUNK: u64 = 64 * BLOCK_SIZE;
        let mut off = 0;
        while off < size {
            let len = CHUNK.min(size - off);
            match content::read(&f, &fc, off, len as u32) {
                Ok(_) => {}
                Err(ContentError::BadBlock(_) | ContentError::CutShort(_)) => {
                    let mut b = off;
                    while b < off + len {
                        let blen = BLOCK_SIZE.min(size - b);
                        if let Err(e) = content::read(&f, &fc, b, blen as u32) {
                            let (kind, block) = match &e {
                                ContentError::BadBlock(n) => ("block", Some(*n)),
                                ContentError::CutShort(n) => ("cut-short", Some(*n)),
                                _ => ("io", None),
                            };
                            self.r.findings.push(Finding {
                                kind,
                                path: plain.to_string(),
                                backing: path.to_path_buf(),
                                block,
                                detail: e.to_string(),
                            });
                        }
                        b += blen;
                    }
                }
                Err(e) => {
                    self.r.find("io", plain, path, e.to_string());
                    return;
                }
            }
            self.r.content.blocks += len.div_ceil(BLOCK_SIZE);
            self.r.content.bytes += len;
            off += len;
            self.tick(false);
        }
    }

    fn xattrs(&mut self, path: &Path, plain: &str) {
        // Through an O_PATH handle of the entry itself: if it was swapped for a symlink
        // since it was listed, the link's own attributes are read, not its target's.
        let Ok(handle) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        else {
            return;
        };
        let c = crate::fuse::sys::proc_path(std::os::fd::AsRawFd::as_raw_fd(&handle));
        let Ok(list) = crate::fuse::sys::listxattr(&c) else {
            return;
        };
        for raw in list
            .split(|&b| b == 0)
            .filter(|n| n.starts_with(b"user.kekfs."))
        {
            self.r.content.xattrs += 1;
            let Some(name) = self.vol.decrypt_xattr_name(raw) else {
                self.r.find(
                    "xattr",
                    plain,
                    path,
                    format!(
                        "extended attribute {} has a name that does not decrypt",
                        String::from_utf8_lossy(raw)
                    ),
                );
                continue;
            };
            let full = [b"user.".as_slice(), &name].concat();
            let ok = crate::fuse::sys::cstr(raw)
                .and_then(|n| crate::fuse::sys::getxattr(&c, &n))
                .ok()
                .and_then(|v| self.vol.open_xattr_value(&full, &v))
                .is_some();
            if !ok {
                self.r.find(
                    "xattr",
                    plain,
                    path,
                    format!(
                        "the value of extended attribute user.{} does not authenticate",
                        String::from_utf8_lossy(&name)
                    ),
                );
            }
        }
    }
}

fn print_text(r: &Report) {
    outln!("volume {} in {}", r.volume_id, r.backing.display());
    let follow = if r.pinned_version == 0 {
        "follows the latest version".to_string()
    } else {
        format!("pinned to version {}", r.pinned_version)
    };
    let cur = r
        .current_version
        .map(|c| format!("; current version {c}"))
        .unwrap_or_default();
    outln!("  KEK:      {} ({follow}{cur})", r.kek);
    for s in &r.slots {
        let st = match (&s.error, s.unwraps) {
            (_, true) => "unwraps".to_string(),
            (Some(e), false) => format!("does not unwrap: {e}"),
            (None, false) => "does not unwrap".to_string(),
        };
        outln!(
            "  slot {}:   wrapped by KEK version {} ({}); {st}",
            s.slot,
            s.key_version,
            s.mechanism
        );
    }
    outln!(
        "  header:   {}",
        if r.header_authenticated {
            "authenticated with the unwrapped volume key"
        } else {
            "NOT authenticated"
        }
    );
    match &r.key_protection {
        Protection::Software { summary, .. } => outln!("  KEK protection: {summary}"),
        Protection::Token { objects } => {
            for o in objects {
                outln!(
                    "  KEK protection: token {} version {}: CKA_SENSITIVE={} CKA_EXTRACTABLE={} \
                     CKA_ALWAYS_SENSITIVE={} CKA_NEVER_EXTRACTABLE={}",
                    o.class,
                    o.version,
                    show(o.sensitive),
                    show(o.extractable),
                    show(o.always_sensitive),
                    show(o.never_extractable)
                );
            }
        }
        Protection::Unknown { error } => outln!("  KEK protection: unknown ({error})"),
    }
    let c = &r.content;
    outln!(
        "  content:  {} directories, {} files, {} blocks ({:.1} MiB), {} symlinks, {} xattrs \
         checked",
        c.directories,
        c.files,
        c.blocks,
        c.bytes as f64 / 1048576.0,
        c.symlinks,
        c.xattrs
    );
    for n in &r.notes {
        outln!("  note: {}", printable(n));
    }
    if r.ok {
        outln!("OK: the volume is under its KEK and every block authenticates");
    } else {
        outln!("FAILED: {} problem(s)", r.findings.len());
        for f in &r.findings {
            let block = f.block.map(|b| format!(" block #{b}")).unwrap_or_default();
            outln!(
                "  {:<11} {}{block} ({}): {}",
                f.kind,
                printable(&f.path),
                printable(&f.backing.display().to_string()),
                printable(&f.detail)
            );
        }
    }
}

fn show(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "true",
        Some(false) => "false",
        None => "unreadable",
    }
}
