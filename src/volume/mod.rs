//! An unlocked volume: the AEK unwrapped from the header and the keys derived from it,
//! plus creating and opening volumes in a backing directory.

pub mod content;
pub mod split;

use crate::crypto::aead::Cipher;
use crate::crypto::names::{SivBatch, SivCipher};
use crate::crypto::{Key32, kdf};
use crate::format::file_header::FileHeader;
use crate::format::names::{self, BackingName, MAX_PLAIN_NAME};
use crate::format::volume_header::VolumeHeader;
use crate::format::{DIRID_FILE, DIRID_LEN, FormatError, HEADER_LOCK_FILE, VOLUME_HEADER_FILE};
use crate::kek::{KekError, KekProvider};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use content::FileCipher;

/// Errors opening or creating a volume.
#[derive(Debug)]
#[non_exhaustive]
pub enum VolumeError {
    /// The directory holds no volume header.
    NotAVolume(PathBuf),
    /// The header exists but is damaged, tampered with or of an unknown version.
    Corrupt(String),
    /// `init` on a directory that is not empty or already a volume.
    NotEmpty(PathBuf),
    /// The KEK provider failed (refused, not found, wrong passphrase, unreachable…).
    Kek(KekError),
    /// I/O on the backing directory failed.
    Io(String, std::io::Error),
}

impl fmt::Display for VolumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolumeError::NotAVolume(p) => write!(
                f,
                "{} is not a kekfs volume (no {VOLUME_HEADER_FILE}); create one with `kekfs init`",
                p.display()
            ),
            VolumeError::Corrupt(m) => write!(f, "volume header is corrupted: {m}"),
            VolumeError::NotEmpty(p) => write!(
                f,
                "{} is not empty or already a volume; init needs an empty directory",
                p.display()
            ),
            VolumeError::Kek(e) => write!(f, "{e}"),
            VolumeError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for VolumeError {}

impl From<KekError> for VolumeError {
    fn from(e: KekError) -> Self {
        VolumeError::Kek(e)
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VolumeError {
    let what = what.into();
    move |e| VolumeError::Io(what, e)
}

/// Write `data` to `dir/name` atomically: temp file, fsync, rename, fsync directory.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut tmp = tempfile::Builder::new()
        .prefix("kekfs.tmp.")
        .tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// How long `header_lock` waits for another holder: a rewrap holds the lock for the
/// time of one wrap and one atomic write. The file is in the untrusted backing directory,
/// so anyone who can open it could hold the lock for good; waiting forever would stall
/// the key monitor of a mounted volume (which rewraps when the KEK rotates), and with it
/// the revocation checks.
const HEADER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Hold the header lock of `backing` (exclusive flock) until dropped; fails if someone
/// else holds it for longer than `HEADER_LOCK_WAIT`.
pub fn header_lock(backing: &Path) -> Result<std::fs::File, VolumeError> {
    use std::os::fd::AsRawFd;
    let f = crate::untrusted::open(
        &backing.join(HEADER_LOCK_FILE),
        libc::O_RDWR | libc::O_CREAT,
        0o600,
    )
    .map_err(io_err(format!(
        "opening the header lock {HEADER_LOCK_FILE} (if it is not a regular file with one \
         name and no rewrap is running, remove it and try again)"
    )))?;
    let deadline = std::time::Instant::now() + HEADER_LOCK_WAIT;
    loop {
        // SAFETY: flock on a valid descriptor; does not block.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(VolumeError::Io("locking the volume header".into(), e));
        }
        if std::time::Instant::now() >= deadline {
            return Err(VolumeError::Io(
                format!(
                    "locking the volume header: {HEADER_LOCK_FILE} has been held by another \
                     process for {} s (another rewrap still running, or someone holding it)",
                    HEADER_LOCK_WAIT.as_secs()
                ),
                e,
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// An unlocked volume. Holds the AEK and the keys derived from it; all are zeroized on drop.
pub struct Volume {
    header: VolumeHeader,
    aek: Key32,
    names: SivCipher,
    xattr_names: SivCipher,
    symlinks: Cipher,
    xattr_values: Cipher,
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("volume_id", &hex(&self.header.volume_id))
            .field("kek_uri", &self.header.kek_uri)
            .finish_non_exhaustive()
    }
}

/// Lower-case hex of bytes (ids in logs and status).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Read and parse the header without any key: what `status` may show of a locked volume.
pub fn read_header(backing: &Path) -> Result<(VolumeHeader, [u8; 32]), VolumeError> {
    let path = backing.join(VOLUME_HEADER_FILE);
    // Never trust the file's size: the largest valid header is about 12 KiB (a 4096-byte
    // URI and two 4096-byte blobs). Reading at most 64 KiB, an oversized file fails its
    // checksum instead of being loaded whole.
    let bytes = match crate::untrusted::read(&path, 64 << 10) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !backing.is_dir() {
                return Err(VolumeError::Io(
                    format!("backing directory {}", backing.display()),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ));
            }
            return Err(VolumeError::NotAVolume(backing.to_path_buf()));
        }
        // The "backing directory" is a regular file: not a volume either.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(VolumeError::NotAVolume(backing.to_path_buf()));
        }
        Err(e) => return Err(VolumeError::Io(format!("reading {}", path.display()), e)),
    };
    VolumeHeader::parse(&bytes).map_err(|FormatError(m)| VolumeError::Corrupt(m))
}

impl Volume {
    fn from_aek(header: VolumeHeader, aek: Key32) -> Self {
        let vid = header.volume_id;
        Self {
            names: SivCipher::new(kdf::derive64(&aek, &vid, kdf::NAME_LABEL)),
            xattr_names: SivCipher::new(kdf::derive64(&aek, &vid, kdf::XATTR_NAME_LABEL)),
            symlinks: Cipher::new(&kdf::derive32(&aek, &vid, kdf::SYMLINK_LABEL, b"")),
            xattr_values: Cipher::new(&kdf::derive32(&aek, &vid, kdf::XATTR_VALUE_LABEL, b"")),
            header,
            aek,
        }
    }

    fn mac_key(aek: &Key32, vid: &[u8; 16]) -> Key32 {
        kdf::derive32(aek, vid, kdf::HEADER_MAC_LABEL, b"")
    }

    /// Create a new volume in an empty (or missing) directory, wrapping a fresh AEK with
    /// `provider`. `kek_uri` is recorded as given; `pinned_version` 0 follows the latest.
    pub fn create(
        backing: &Path,
        provider: &dyn KekProvider,
        pinned_version: u32,
    ) -> Result<Volume, VolumeError> {
        match std::fs::read_dir(backing) {
            Ok(mut it) => {
                if it.next().is_some() {
                    return Err(VolumeError::NotEmpty(backing.to_path_buf()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Created private (0700): others need not even see the ciphertext's sizes,
                // names and tree shape. An existing directory keeps the mode it has.
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(backing)
                    .map_err(io_err(format!("creating {}", backing.display())))?;
            }
            Err(e) => return Err(VolumeError::Io(format!("reading {}", backing.display()), e)),
        }
        let aek = Key32::generate();
        // Two independent wrappings: either slot alone unlocks the volume.
        let w0 = provider.wrap(&aek)?;
        let w1 = provider.wrap(&aek)?;
        let header = VolumeHeader {
            volume_id: crate::crypto::random_array(),
            kek_uri: provider.uri(),
            pinned_version,
            slots: [w0, w1],
        };
        let bytes = header
            .to_bytes(&Self::mac_key(&aek, &header.volume_id))
            .map_err(|FormatError(m)| VolumeError::Corrupt(m))?;
        let dirid: [u8; DIRID_LEN] = crate::crypto::random_array();
        write_atomic(backing, DIRID_FILE, &dirid, 0o600)
            .map_err(io_err("writing root directory id"))?;
        write_atomic(backing, VOLUME_HEADER_FILE, &bytes, 0o600)
            .map_err(io_err("writing volume header"))?;
        Ok(Self::from_aek(header, aek))
    }

    /// Open a volume: parse its header, unwrap the AEK (slot 0, else slot 1) and
    /// authenticate the header with it.
    pub fn open(backing: &Path, provider: &dyn KekProvider) -> Result<Volume, VolumeError> {
        let (header, mac) = read_header(backing)?;
        Self::open_header(header, &mac, provider)
    }

    /// Like `open`, for a header already read with `read_header` (and its MAC).
    pub fn open_header(
        header: VolumeHeader,
        mac: &[u8; 32],
        provider: &dyn KekProvider,
    ) -> Result<Volume, VolumeError> {
        let mut first_err = None;
        for slot in &header.slots {
            match provider.unwrap(slot) {
                Ok(aek) => {
                    let mk = Self::mac_key(&aek, &header.volume_id);
                    header
                        .verify_mac(&mk, mac)
                        .map_err(|FormatError(m)| VolumeError::Corrupt(m))?;
                    return Ok(Self::from_aek(header, aek));
                }
                Err(e) => {
                    // An explicit refusal is final: never fall back to another slot.
                    if matches!(e, KekError::Refused { .. } | KekError::BadPassphrase(_)) {
                        return Err(e.into());
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err
            .map(VolumeError::Kek)
            .unwrap_or_else(|| VolumeError::Corrupt("no wrapped key slots".into())))
    }

    /// Rewrap the AEK with `provider` (at the KEK version it wraps with now) and record
    /// `provider.uri()` and `pinned_version`; the previous slot 0 moves to slot 1, so the
    /// volume opens with either. The new wrapping is checked to unwrap before the header
    /// is replaced atomically. Data is never re-encrypted. Returns the new header.
    pub fn rewrap(
        &self,
        backing: &Path,
        provider: &dyn KekProvider,
        pinned_version: u32,
    ) -> Result<VolumeHeader, VolumeError> {
        let _lock = header_lock(backing)?;
        let (current, _) = read_header(backing)?;
        if current.volume_id != self.header.volume_id {
            return Err(VolumeError::Corrupt(
                "volume id in the header changed under a mounted volume".into(),
            ));
        }
        let w = provider.wrap(&self.aek)?;
        let back = provider.unwrap(&w)?;
        if back.expose() != self.aek.expose() {
            return Err(VolumeError::Kek(KekError::UnwrapFailed(
                "the new wrapping does not unwrap to the volume key; header left unchanged".into(),
            )));
        }
        let [old0, _] = current.slots;
        let header = VolumeHeader {
            volume_id: current.volume_id,
            kek_uri: provider.uri(),
            pinned_version,
            slots: [w, old0],
        };
        let bytes = header
            .to_bytes(&Self::mac_key(&self.aek, &header.volume_id))
            .map_err(|FormatError(m)| VolumeError::Corrupt(m))?;
        write_atomic(backing, VOLUME_HEADER_FILE, &bytes, 0o600)
            .map_err(io_err("writing volume header"))?;
        Ok(header)
    }

    /// The header (volume id, KEK reference, slots).
    pub fn header(&self) -> &VolumeHeader {
        &self.header
    }

    /// The volume id.
    pub fn id(&self) -> &[u8; 16] {
        &self.header.volume_id
    }

    /// The content cipher of one file (its DEK derived from the AEK and the file id; the
    /// header's version decides the block format).
    pub fn file_cipher(&self, header: &FileHeader) -> FileCipher {
        let id = &header.file_id;
        let dek = kdf::derive32(&self.aek, &self.header.volume_id, kdf::FILE_LABEL, id);
        FileCipher::new(self.header.volume_id, header, Cipher::new(&dek))
    }

    /// Encrypt a plaintext name for directory `dir_id`. `None` if the name is too long.
    pub fn encrypt_name(&self, dir_id: &[u8; DIRID_LEN], name: &[u8]) -> Option<BackingName> {
        if name.is_empty() || name.len() > MAX_PLAIN_NAME {
            return None;
        }
        Some(names::encode(&self.names.encrypt(dir_id, name)))
    }

    /// Decrypt a name ciphertext found in directory `dir_id`; `None` if it does not
    /// authenticate there (foreign, tampered or moved from another directory).
    pub fn decrypt_name(&self, dir_id: &[u8; DIRID_LEN], ct: &[u8]) -> Option<Vec<u8>> {
        self.name_decryptor().decrypt(dir_id, ct)
    }

    /// A decryptor for many names in a row (a directory listing), with the name
    /// cipher expanded once.
    pub fn name_decryptor(&self) -> NameDecryptor {
        NameDecryptor(self.names.batch())
    }

    /// Encrypt a symlink target into the string stored as the backing symlink's target.
    pub fn encrypt_symlink(&self, target: &[u8]) -> String {
        names::b64_encode(&self.symlinks.seal(b"kekfs symlink", target))
    }

    /// Decrypt a backing symlink target.
    pub fn decrypt_symlink(&self, stored: &[u8]) -> Option<Vec<u8>> {
        let ct = names::b64_decode(stored)?;
        self.symlinks.open(b"kekfs symlink", &ct).ok()
    }

    /// Encrypt a user xattr name (without the `user.` prefix) into a backing xattr name.
    pub fn encrypt_xattr_name(&self, name: &[u8]) -> String {
        format!(
            "user.kekfs.{}",
            names::b64_encode(&self.xattr_names.encrypt(b"kekfs xattr", name))
        )
    }

    /// Decrypt a backing xattr name back into the user's name (without `user.`).
    pub fn decrypt_xattr_name(&self, backing: &[u8]) -> Option<Vec<u8>> {
        let enc = backing.strip_prefix(b"user.kekfs.")?;
        self.xattr_names
            .decrypt(b"kekfs xattr", &names::b64_decode(enc)?)
    }

    /// Seal an xattr value, bound to its (plaintext) name.
    pub fn seal_xattr_value(&self, name: &[u8], value: &[u8]) -> Vec<u8> {
        self.xattr_values.seal(name, value)
    }

    /// Open an xattr value.
    pub fn open_xattr_value(&self, name: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        self.xattr_values.open(name, sealed).ok()
    }
}

/// Decrypts the names of one listing (see `Volume::name_decryptor`).
#[derive(Debug)]
pub struct NameDecryptor(SivBatch);

impl NameDecryptor {
    /// As `Volume::decrypt_name`.
    pub fn decrypt(&mut self, dir_id: &[u8; DIRID_LEN], ct: &[u8]) -> Option<Vec<u8>> {
        let n = self.0.decrypt(dir_id, ct)?;
        let valid = !n.is_empty()
            && n.len() <= MAX_PLAIN_NAME
            && !n.contains(&b'/')
            && !n.contains(&0)
            && n != b"."
            && n != b"..";
        valid.then_some(n)
    }
}
