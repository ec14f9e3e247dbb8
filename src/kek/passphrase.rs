//! Where the `soft:` keystore passphrase comes from: a file, an environment variable or a prompt.

use super::KekError;
use std::ffi::OsString;
use std::fmt;
use std::io::{IsTerminal, Read};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Environment variable holding the passphrase itself (checked first by [`PassphraseSource::Auto`]).
pub const ENV_PASSPHRASE: &str = "KEKFS_PASSPHRASE";
/// Environment variable holding the path of a passphrase file (checked second by `Auto`).
pub const ENV_PASSFILE: &str = "KEKFS_PASSFILE";
/// Largest passphrase file accepted, in bytes; anything bigger is not a passphrase file.
pub const MAX_PASSPHRASE_LEN: usize = 64 * 1024;

/// Where to read the keystore passphrase from.
#[derive(Debug, Clone)]
pub enum PassphraseSource {
    /// A file whose contents (minus one trailing newline) are the passphrase.
    File(PathBuf),
    /// An environment variable, named here, holding the passphrase.
    Env(String),
    /// An interactive no-echo prompt on the controlling terminal.
    Prompt,
    /// The default: `KEKFS_PASSPHRASE`, else the file named by `KEKFS_PASSFILE`,
    /// else a prompt if stdin is a terminal, else an error.
    Auto,
}

impl fmt::Display for PassphraseSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PassphraseSource::File(p) => write!(f, "passphrase file {}", p.display()),
            PassphraseSource::Env(v) => write!(f, "environment variable {v}"),
            PassphraseSource::Prompt => f.write_str("terminal prompt"),
            PassphraseSource::Auto => {
                write!(f, "${ENV_PASSPHRASE}, ${ENV_PASSFILE} or a terminal prompt")
            }
        }
    }
}

/// A keystore passphrase: raw bytes, zeroized on drop, redacted `Debug`, no `Clone`.
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// Wrap passphrase bytes; refuses an empty passphrase.
    pub fn new(bytes: Vec<u8>) -> Result<Self, KekError> {
        let bytes = Zeroizing::new(bytes);
        if bytes.is_empty() {
            return Err(KekError::BadPassphrase(
                "the passphrase is empty; use a non-empty passphrase".into(),
            ));
        }
        Ok(Self(bytes))
    }

    /// The passphrase bytes. Callers must not copy them into non-zeroizing storage.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// What `Auto` resolves to, given the environment.
#[derive(Debug, PartialEq, Eq)]
enum Resolved {
    Value(&'static str, OsString),
    File(PathBuf),
    Prompt,
    Unavailable,
}

fn resolve_auto(get: impl Fn(&str) -> Option<OsString>, stdin_is_tty: bool) -> Resolved {
    if let Some(v) = get(ENV_PASSPHRASE) {
        Resolved::Value(ENV_PASSPHRASE, v)
    } else if let Some(p) = get(ENV_PASSFILE) {
        Resolved::File(PathBuf::from(p))
    } else if stdin_is_tty {
        Resolved::Prompt
    } else {
        Resolved::Unavailable
    }
}

impl PassphraseSource {
    /// Read the passphrase. `purpose` names what it unlocks (used in the prompt and in
    /// errors, e.g. "passphrase for keystore /var/lib/kekfs"); `confirm` asks twice when
    /// prompting (for creating a keystore) and is ignored for files and variables.
    pub fn read(&self, purpose: &str, confirm: bool) -> Result<Passphrase, KekError> {
        match self {
            PassphraseSource::File(path) => read_file(path, purpose),
            PassphraseSource::Env(var) => match std::env::var_os(var) {
                Some(v) => from_env_value(var, v, purpose),
                None => Err(KekError::Io(format!(
                    "environment variable {var} is not set, so there is no {purpose}; \
                     set it, or pass --passfile FILE"
                ))),
            },
            PassphraseSource::Prompt => prompt(purpose, confirm),
            PassphraseSource::Auto => {
                match resolve_auto(|k| std::env::var_os(k), std::io::stdin().is_terminal()) {
                    Resolved::Value(var, v) => from_env_value(var, v, purpose),
                    Resolved::File(p) => read_file(&p, purpose),
                    Resolved::Prompt => prompt(purpose, confirm),
                    Resolved::Unavailable => Err(KekError::Io(format!(
                        "no {purpose} available: {ENV_PASSPHRASE} and {ENV_PASSFILE} are \
                         not set and stdin is not a terminal to prompt on; pass \
                         --passfile FILE or set {ENV_PASSPHRASE}"
                    ))),
                }
            }
        }
    }
}

fn from_env_value(var: &str, v: OsString, purpose: &str) -> Result<Passphrase, KekError> {
    let mut bytes = Zeroizing::new(v.into_vec());
    if bytes.is_empty() {
        return Err(KekError::BadPassphrase(format!(
            "environment variable {var} is set but empty; put the {purpose} in it, \
             or unset it and use --passfile FILE"
        )));
    }
    Passphrase::new(std::mem::take(&mut *bytes))
}

fn read_file(path: &Path, purpose: &str) -> Result<Passphrase, KekError> {
    let file = std::fs::File::open(path).map_err(|e| {
        KekError::Io(format!(
            "cannot open passphrase file {}: {e}; check the path given with --passfile \
             or {ENV_PASSFILE}",
            path.display()
        ))
    })?;
    // Capacity chosen so read_to_end never reallocates (which would leave copies behind).
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_PASSPHRASE_LEN + 2));
    file.take(MAX_PASSPHRASE_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            KekError::Io(format!(
                "cannot read passphrase file {}: {e}; check that it is a readable file",
                path.display()
            ))
        })?;
    if buf.len() > MAX_PASSPHRASE_LEN {
        return Err(KekError::BadPassphrase(format!(
            "passphrase file {} is larger than {MAX_PASSPHRASE_LEN} bytes; it must hold \
             only the {purpose}",
            path.display()
        )));
    }
    let strip = if buf.ends_with(b"\r\n") {
        2
    } else {
        usize::from(buf.ends_with(b"\n"))
    };
    let keep = buf.len() - strip;
    buf.truncate(keep);
    if buf.is_empty() {
        return Err(KekError::BadPassphrase(format!(
            "passphrase file {} is empty; write the {purpose} into it",
            path.display()
        )));
    }
    Passphrase::new(std::mem::take(&mut *buf))
}

fn prompt_once(text: &str) -> Result<Zeroizing<String>, KekError> {
    rpassword::prompt_password(text)
        .map(Zeroizing::new)
        .map_err(|e| {
            KekError::Io(format!(
                "cannot read the passphrase from the terminal: {e}; pass --passfile FILE \
                 or set {ENV_PASSPHRASE}"
            ))
        })
}

fn prompt(purpose: &str, confirm: bool) -> Result<Passphrase, KekError> {
    let mut first = prompt_once(&format!("Enter {purpose}: "))?;
    if first.is_empty() {
        return Err(KekError::BadPassphrase(format!(
            "an empty {purpose} was entered; type a non-empty passphrase"
        )));
    }
    if confirm {
        let second = prompt_once(&format!("Repeat {purpose}: "))?;
        if first.as_bytes() != second.as_bytes() {
            return Err(KekError::BadPassphrase(
                "the two passphrases typed differ; run the command again and type the \
                 same passphrase twice"
                    .into(),
            ));
        }
    }
    Passphrase::new(std::mem::take(&mut *first).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn read_file_source(content: &[u8]) -> Result<Passphrase, KekError> {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "pass", content);
        PassphraseSource::File(p).read("test passphrase", false)
    }

    #[test]
    fn file_strips_exactly_one_trailing_newline() {
        assert_eq!(read_file_source(b"secret").unwrap().as_bytes(), b"secret");
        assert_eq!(read_file_source(b"secret\n").unwrap().as_bytes(), b"secret");
        assert_eq!(
            read_file_source(b"secret\r\n").unwrap().as_bytes(),
            b"secret"
        );
        assert_eq!(
            read_file_source(b"secret\n\n").unwrap().as_bytes(),
            b"secret\n"
        );
        assert_eq!(
            read_file_source(b" sp ace \n").unwrap().as_bytes(),
            b" sp ace "
        );
        assert_eq!(
            read_file_source(b"\xff\x00bin").unwrap().as_bytes(),
            b"\xff\x00bin"
        );
    }

    #[test]
    fn file_refuses_empty_and_oversized() {
        for empty in [&b""[..], b"\n", b"\r\n"] {
            assert!(matches!(
                read_file_source(empty),
                Err(KekError::BadPassphrase(m)) if m.contains("empty")
            ));
        }
        let big = vec![b'a'; MAX_PASSPHRASE_LEN + 1];
        assert!(matches!(
            read_file_source(&big),
            Err(KekError::BadPassphrase(_))
        ));
        let max = vec![b'a'; MAX_PASSPHRASE_LEN];
        assert_eq!(
            read_file_source(&max).unwrap().as_bytes().len(),
            MAX_PASSPHRASE_LEN
        );
    }

    #[test]
    fn missing_file_is_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope");
        let e = PassphraseSource::File(p.clone())
            .read("x", false)
            .unwrap_err();
        assert!(
            matches!(&e, KekError::Io(m) if m.contains(&*p.to_string_lossy())),
            "{e}"
        );
    }

    #[test]
    fn env_source() {
        let e = PassphraseSource::Env("KEKFS_TEST_VARIABLE_THAT_IS_NOT_SET_0b6f".into())
            .read("x", false)
            .unwrap_err();
        assert!(
            matches!(&e, KekError::Io(m) if m.contains("not set")),
            "{e}"
        );
        // PATH is set in any test environment; reading it proves the Env path works.
        if let Some(path) = std::env::var_os("PATH").filter(|p| !p.is_empty()) {
            let p = PassphraseSource::Env("PATH".into())
                .read("x", false)
                .unwrap();
            assert_eq!(p.as_bytes(), path.into_vec().as_slice());
        }
        assert!(matches!(
            from_env_value("V", OsString::new(), "x"),
            Err(KekError::BadPassphrase(_))
        ));
    }

    #[test]
    fn auto_resolution_order() {
        let env = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, OsString> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), OsString::from(v)))
                .collect();
            move |k: &str| m.get(k).cloned()
        };
        let both = env(&[(ENV_PASSPHRASE, "pw"), (ENV_PASSFILE, "/f")]);
        assert_eq!(
            resolve_auto(&both, true),
            Resolved::Value(ENV_PASSPHRASE, "pw".into())
        );
        let file = env(&[(ENV_PASSFILE, "/f")]);
        assert_eq!(resolve_auto(&file, true), Resolved::File("/f".into()));
        let none = env(&[]);
        assert_eq!(resolve_auto(&none, true), Resolved::Prompt);
        assert_eq!(resolve_auto(&none, false), Resolved::Unavailable);
    }

    #[test]
    fn passphrase_debug_is_redacted_and_empty_refused() {
        let p = Passphrase::new(b"hunter2".to_vec()).unwrap();
        assert_eq!(format!("{p:?}"), "Passphrase(<redacted>)");
        assert!(matches!(
            Passphrase::new(Vec::new()),
            Err(KekError::BadPassphrase(_))
        ));
    }

    #[test]
    fn source_display_names_the_source() {
        assert!(
            PassphraseSource::File("/x/y".into())
                .to_string()
                .contains("/x/y")
        );
        assert!(PassphraseSource::Env("V".into()).to_string().contains('V'));
        assert!(PassphraseSource::Auto.to_string().contains(ENV_PASSPHRASE));
    }
}
