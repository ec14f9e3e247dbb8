//! RFC 7512 PKCS#11 URIs: `pkcs11:path-attributes?query-attributes`.
//!
//! Path attributes (separated by `;`) select the library, slot, token and object:
//! `library-manufacturer`, `library-description`, `library-version` (`M` or `M.m`),
//! `slot-manufacturer`, `slot-description`, `slot-id` (decimal), `token`, `manufacturer`,
//! `serial`, `model`, `object` (CKA_LABEL), `id` (CKA_ID, raw bytes, usually written
//! percent-encoded: `id=%01`) and `type` (`public`, `private`, `cert`, `secret-key`, `data`).
//! Query attributes (separated by `&`) say how to reach it: `module-path` (absolute path
//! of the PKCS#11 library), `module-name` (a library name looked up in the usual module
//! directories), `pin-source` and `pin-value`. Attributes starting with `x-` are vendor
//! extensions: kept and printed back, otherwise ignored. Any other attribute, a repeated
//! attribute, a character the RFC does not allow unencoded, or a bad `%XX` escape is an
//! error naming the problem.
//!
//! `pin-source` is `file:PATH` (also `file:///PATH`, or a bare absolute `PATH`): the PIN is
//! the file's contents minus one trailing newline; or `env:VAR`: the PIN is the value of
//! environment variable `VAR`. `pin-value` (the PIN itself) is parsed so that URIs from
//! other tools are understood, but never printed: [`Pkcs11Uri`]'s `Display` leaves it out,
//! and kekfs refuses to use it (see `kek::pkcs11`), because a PIN in a URI ends up in shell
//! history, process listings and volume headers.
//!
//! Values are percent-decoded; string attributes must decode to UTF-8. `Display` prints a
//! canonical form (fixed attribute order, `id` fully percent-encoded, everything outside
//! the RFC's unreserved set percent-encoded) that parses back to an equal value.

use std::fmt;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// Why a PKCS#11 URI was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriError(pub String);

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UriError {}

fn err<T>(msg: impl Into<String>) -> Result<T, UriError> {
    Err(UriError(msg.into()))
}

/// The object class named by `type=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// `type=public`: a public key.
    Public,
    /// `type=private`: a private key.
    Private,
    /// `type=cert`: a certificate.
    Cert,
    /// `type=secret-key`: a secret (symmetric) key.
    SecretKey,
    /// `type=data`: a data object.
    Data,
}

impl ObjectType {
    /// The URI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectType::Public => "public",
            ObjectType::Private => "private",
            ObjectType::Cert => "cert",
            ObjectType::SecretKey => "secret-key",
            ObjectType::Data => "data",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "public" => ObjectType::Public,
            "private" => ObjectType::Private,
            "cert" => ObjectType::Cert,
            "secret-key" => ObjectType::SecretKey,
            "data" => ObjectType::Data,
            _ => return None,
        })
    }
}

/// Where the token PIN comes from (`pin-source=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `file:/abs/path` (or `file:///abs/path`, or `/abs/path`): the file's contents minus
    /// one trailing newline.
    File(PathBuf),
    /// `env:VAR`: the value of environment variable `VAR`.
    Env(String),
}

impl PinSource {
    /// Parse a (percent-decoded) `pin-source` value.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        let path = if let Some(rest) = s.strip_prefix("file:") {
            match rest.strip_prefix("//") {
                // file://host/path: only an empty host or localhost names this machine.
                Some(auth_path) => {
                    let (host, path) = match auth_path.find('/') {
                        Some(i) => auth_path.split_at(i),
                        None => (auth_path, ""),
                    };
                    if !host.is_empty() && !host.eq_ignore_ascii_case("localhost") {
                        return err(format!(
                            "pin-source {s:?} names host {host:?}; only local files can hold \
                             the PIN (write file:/path or file:///path)"
                        ));
                    }
                    path
                }
                None => rest,
            }
        } else if let Some(var) = s.strip_prefix("env:") {
            let valid = !var.is_empty()
                && !var.starts_with(|c: char| c.is_ascii_digit())
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return err(format!(
                    "pin-source env:{var} is not a valid environment variable name (letters, \
                     digits and '_', not starting with a digit)"
                ));
            }
            return Ok(PinSource::Env(var.to_string()));
        } else if s.starts_with('/') {
            s
        } else if s.starts_with('|') {
            return err(format!(
                "pin-source {s:?}: running a program for the PIN is not supported; use \
                 pin-source=file:/path/to/pin or pin-source=env:VARIABLE"
            ));
        } else {
            return err(format!(
                "pin-source {s:?} is not understood; use pin-source=file:/path/to/pin or \
                 pin-source=env:VARIABLE"
            ));
        };
        if !path.starts_with('/') {
            return err(format!(
                "pin-source {s:?} must name an absolute path (the URI is stored in the volume \
                 header and used from other working directories)"
            ));
        }
        Ok(PinSource::File(PathBuf::from(path)))
    }
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // `file://…` would read as an authority: give a path starting with `//` an
            // empty one, so the printed form parses back to the same path.
            PinSource::File(p) if p.as_os_str().as_encoded_bytes().starts_with(b"//") => {
                write!(f, "file://{}", p.display())
            }
            PinSource::File(p) => write!(f, "file:{}", p.display()),
            PinSource::Env(v) => write!(f, "env:{v}"),
        }
    }
}

/// `library-version=M[.m]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibraryVersion {
    /// Major version.
    pub major: u8,
    /// Minor version (0 when the URI gives only `M`).
    pub minor: u8,
}

impl LibraryVersion {
    fn parse(s: &str) -> Result<Self, UriError> {
        let num = |p: &str| -> Result<u8, UriError> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return err(format!(
                    "library-version {s:?} must be MAJOR or MAJOR.MINOR in decimal digits"
                ));
            }
            p.parse().map_err(|_| {
                UriError(format!(
                    "library-version {s:?}: each part must be at most 255"
                ))
            })
        };
        let (major, minor) = match s.split_once('.') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, 0),
        };
        Ok(LibraryVersion { major, minor })
    }
}

impl fmt::Display for LibraryVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A parsed PKCS#11 URI. `None` means "attribute absent" (matches anything); `Some("")`
/// is an attribute present with an empty value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `library-manufacturer`: CK_INFO manufacturerID.
    pub library_manufacturer: Option<String>,
    /// `library-description`: CK_INFO libraryDescription.
    pub library_description: Option<String>,
    /// `library-version`: CK_INFO libraryVersion.
    pub library_version: Option<LibraryVersion>,
    /// `slot-manufacturer`: CK_SLOT_INFO manufacturerID.
    pub slot_manufacturer: Option<String>,
    /// `slot-description`: CK_SLOT_INFO slotDescription.
    pub slot_description: Option<String>,
    /// `slot-id`: the slot number.
    pub slot_id: Option<u64>,
    /// `token`: CK_TOKEN_INFO label.
    pub token: Option<String>,
    /// `manufacturer`: CK_TOKEN_INFO manufacturerID.
    pub manufacturer: Option<String>,
    /// `serial`: CK_TOKEN_INFO serialNumber.
    pub serial: Option<String>,
    /// `model`: CK_TOKEN_INFO model.
    pub model: Option<String>,
    /// `object`: CKA_LABEL.
    pub object: Option<String>,
    /// `id`: CKA_ID bytes.
    pub id: Option<Vec<u8>>,
    /// `type`: the object class.
    pub object_type: Option<ObjectType>,
    /// `module-name`: PKCS#11 library name (without directory or `.so`).
    pub module_name: Option<String>,
    /// `module-path`: absolute path of the PKCS#11 library.
    pub module_path: Option<String>,
    /// `pin-source`: where to read the PIN.
    pub pin_source: Option<PinSource>,
    /// `pin-value`: the PIN itself. Never printed; see [`Pkcs11Uri::pin_value`].
    pin_value: Option<Zeroizing<String>>,
    /// Vendor path attributes (`x-…`), in order.
    pub vendor_path: Vec<(String, String)>,
    /// Vendor query attributes (`x-…`), in order.
    pub vendor_query: Vec<(String, String)>,
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URI without pin-value, and only whether a pin-value was present.
        f.debug_struct("Pkcs11Uri")
            .field("uri", &self.to_string())
            .field("pin_value", &self.pin_value.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Characters RFC 3986 calls unreserved: never need encoding anywhere.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 7512 pk11-p-special: allowed unencoded in a path attribute value.
fn is_path_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b':' | b'['
                | b']'
                | b'@'
                | b'!'
                | b'$'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b'&'
        )
}

/// RFC 7512 pk11-q-special: allowed unencoded in a query attribute value.
fn is_query_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b':' | b'['
                | b']'
                | b'@'
                | b'!'
                | b'$'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b'/'
                | b'?'
                | b'|'
                | b';'
        )
}

/// RFC 7512 pk11-v-attr-nm-char (and the standard names, which are a subset).
fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Percent-decode `raw` (the value of attribute `name`), checking every unencoded byte
/// against `allowed`.
fn decode(name: &str, raw: &str, allowed: fn(u8) -> bool, part: &str) -> Result<Vec<u8>, UriError> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = |x: u8| (x as char).to_digit(16);
            match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => {
                    let shown: String = raw[i..].chars().take(3).collect();
                    return err(format!(
                        "{name}: bad percent-encoding {shown:?}; '%' must be followed by two \
                         hex digits (write a literal '%' as %25)"
                    ));
                }
            }
        }
        if !allowed(c) {
            let ch = raw[i..].chars().next().unwrap_or('?');
            let enc: String = ch
                .to_string()
                .bytes()
                .map(|x| format!("%{x:02X}"))
                .collect();
            return err(format!(
                "{name}: character {ch:?} is not allowed unencoded in a PKCS#11 URI {part} \
                 value; percent-encode it as {enc}"
            ));
        }
        out.push(c);
        i += 1;
    }
    Ok(out)
}

fn utf8(name: &str, v: Vec<u8>) -> Result<String, UriError> {
    String::from_utf8(v).map_err(|_| {
        UriError(format!(
            "{name}: the percent-decoded value is not valid UTF-8"
        ))
    })
}

fn twice(name: &str) -> String {
    format!("attribute {name} appears twice; give each attribute at most once")
}

fn set<T>(slot: &mut Option<T>, name: &str, v: T) -> Result<(), UriError> {
    if slot.is_some() {
        return err(twice(name));
    }
    *slot = Some(v);
    Ok(())
}

const PATH_ATTRS: &str = "token, manufacturer, serial, model, library-manufacturer, \
    library-description, library-version, slot-manufacturer, slot-description, slot-id, \
    object, id, type";
const QUERY_ATTRS: &str = "module-path, module-name, pin-source, pin-value";

fn check_name(name: &str, part: &str) -> Result<(), UriError> {
    if name.is_empty() {
        return err(format!(
            "an attribute in the {part} has no name (stray '=' or separator)"
        ));
    }
    if !name.bytes().all(is_name_char) {
        return err(format!(
            "{name:?} is not a valid attribute name (letters, digits, '-', '_')"
        ));
    }
    Ok(())
}

impl Pkcs11Uri {
    /// Parse an RFC 7512 PKCS#11 URI (scheme `pkcs11:`, case-insensitive).
    pub fn parse(s: &str) -> Result<Self, UriError> {
        let rest = match s.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("pkcs11:") => &s[7..],
            _ => {
                return err(format!(
                    "{s:?} is not a PKCS#11 URI: it must start with \"pkcs11:\""
                ));
            }
        };
        if rest.contains('#') {
            return err("a PKCS#11 URI has no fragment: percent-encode '#' as %23");
        }
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut u = Pkcs11Uri::default();
        if !path.is_empty() {
            for attr in path.split(';') {
                let Some((name, raw)) = attr.split_once('=') else {
                    return err(if attr.is_empty() {
                        "empty path attribute (a stray ';'); attributes are NAME=VALUE separated \
                         by ';'"
                            .to_string()
                    } else {
                        format!("path attribute {attr:?} has no '=VALUE'")
                    });
                };
                check_name(name, "path")?;
                if QUERY_ATTRS.split(", ").any(|q| q == name) {
                    return err(format!(
                        "{name} is a query attribute: write it after '?' (pkcs11:…?{name}=…)"
                    ));
                }
                let v = decode(name, raw, is_path_char, "path")?;
                match name {
                    "token" => set(&mut u.token, name, utf8(name, v)?)?,
                    "manufacturer" => set(&mut u.manufacturer, name, utf8(name, v)?)?,
                    "serial" => set(&mut u.serial, name, utf8(name, v)?)?,
                    "model" => set(&mut u.model, name, utf8(name, v)?)?,
                    "library-manufacturer" => {
                        set(&mut u.library_manufacturer, name, utf8(name, v)?)?
                    }
                    "library-description" => set(&mut u.library_description, name, utf8(name, v)?)?,
                    "library-version" => {
                        let lv = LibraryVersion::parse(&utf8(name, v)?)?;
                        set(&mut u.library_version, name, lv)?
                    }
                    "slot-manufacturer" => set(&mut u.slot_manufacturer, name, utf8(name, v)?)?,
                    "slot-description" => set(&mut u.slot_description, name, utf8(name, v)?)?,
                    "slot-id" => {
                        let t = utf8(name, v)?;
                        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                            return err(format!("slot-id {t:?} must be a decimal number"));
                        }
                        let n: u64 = t
                            .parse()
                            .map_err(|_| UriError(format!("slot-id {t:?} is too large")))?;
                        set(&mut u.slot_id, name, n)?
                    }
                    "object" => set(&mut u.object, name, utf8(name, v)?)?,
                    "id" => set(&mut u.id, name, v)?,
                    "type" => {
                        let t = utf8(name, v)?;
                        let ty = ObjectType::parse(&t).ok_or_else(|| {
                            UriError(format!(
                                "type={t:?} is not one of public, private, cert, secret-key, data"
                            ))
                        })?;
                        set(&mut u.object_type, name, ty)?
                    }
                    _ if name.starts_with("x-") => {
                        let v = utf8(name, v)?;
                        if u.vendor_path.iter().any(|(n, _)| n == name) {
                            return err(twice(name));
                        }
                        u.vendor_path.push((name.to_string(), v))
                    }
                    _ => {
                        return err(format!(
                            "unknown PKCS#11 URI path attribute {name:?}; known: {PATH_ATTRS} \
                             (vendor attributes start with x-)"
                        ));
                    }
                }
            }
        }
        if let Some(query) = query {
            if query.is_empty() {
                return err("empty query after '?'; remove the '?' or add attributes");
            }
            for attr in query.split('&') {
                let Some((name, raw)) = attr.split_once('=') else {
                    return err(if attr.is_empty() {
                        "empty query attribute (a stray '&'); query attributes are NAME=VALUE \
                         separated by '&'"
                            .to_string()
                    } else {
                        format!("query attribute {attr:?} has no '=VALUE'")
                    });
                };
                check_name(name, "query")?;
                if PATH_ATTRS.split(", ").any(|p| p == name) {
                    return err(format!(
                        "{name} is a path attribute: write it before '?', separated by ';'"
                    ));
                }
                let v = decode(name, raw, is_query_char, "query")?;
                match name {
                    "module-path" => {
                        let p = utf8(name, v)?;
                        if !p.starts_with('/') {
                            return err(format!(
                                "module-path {p:?} must be an absolute path to a PKCS#11 library"
                            ));
                        }
                        set(&mut u.module_path, name, p)?
                    }
                    "module-name" => {
                        let n = utf8(name, v)?;
                        if n.is_empty() || n.contains('/') {
                            return err(format!(
                                "module-name {n:?} must be a library name without directory \
                                 (use module-path for a path)"
                            ));
                        }
                        set(&mut u.module_name, name, n)?
                    }
                    "pin-source" => {
                        let ps = PinSource::parse(&utf8(name, v)?)?;
                        set(&mut u.pin_source, name, ps)?
                    }
                    "pin-value" => {
                        let v = Zeroizing::new(v);
                        let pin = std::str::from_utf8(&v).map_err(|_| {
                            UriError(
                                "pin-value: the percent-decoded value is not valid UTF-8".into(),
                            )
                        })?;
                        set(&mut u.pin_value, name, Zeroizing::new(pin.to_string()))?
                    }
                    _ if name.starts_with("x-") => {
                        let v = utf8(name, v)?;
                        if u.vendor_query.iter().any(|(n, _)| n == name) {
                            return err(twice(name));
                        }
                        u.vendor_query.push((name.to_string(), v))
                    }
                    _ => {
                        return err(format!(
                            "unknown PKCS#11 URI query attribute {name:?}; known: {QUERY_ATTRS} \
                             (vendor attributes start with x-)"
                        ));
                    }
                }
            }
        }
        Ok(u)
    }

    /// The `pin-value` attribute, if the URI carried one (never printed by `Display`).
    pub fn pin_value(&self) -> Option<&str> {
        self.pin_value.as_ref().map(|p| p.as_str())
    }

    /// Drop `pin-value`.
    pub fn clear_pin_value(&mut self) {
        self.pin_value = None;
    }
}

fn encode_into(out: &mut String, bytes: &[u8], keep: fn(u8) -> bool) {
    for &b in bytes {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Printed unencoded in path values: unreserved plus the harmless specials (not `=`, `&`).
fn keep_path(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b':' | b'[' | b']' | b'@' | b'!' | b'$' | b'\'' | b'(' | b')' | b'*' | b'+' | b','
        )
}

/// Printed unencoded in query values: as for paths, plus `/` (readable module paths).
fn keep_query(b: u8) -> bool {
    keep_path(b) || b == b'/'
}

impl fmt::Display for Pkcs11Uri {
    /// The canonical URI, without `pin-value`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut path: Vec<String> = Vec::new();
        let mut add = |name: &str, v: &[u8], keep: fn(u8) -> bool| {
            let mut s = format!("{name}=");
            encode_into(&mut s, v, keep);
            path.push(s);
        };
        let text = |v: &Option<String>| v.as_ref().map(|s| s.as_bytes().to_vec());
        let fields: [(&str, Option<Vec<u8>>); 12] = [
            ("token", text(&self.token)),
            ("manufacturer", text(&self.manufacturer)),
            ("serial", text(&self.serial)),
            ("model", text(&self.model)),
            ("library-manufacturer", text(&self.library_manufacturer)),
            ("library-description", text(&self.library_description)),
            (
                "library-version",
                self.library_version.map(|v| v.to_string().into_bytes()),
            ),
            ("slot-manufacturer", text(&self.slot_manufacturer)),
            ("slot-description", text(&self.slot_description)),
            ("slot-id", self.slot_id.map(|v| v.to_string().into_bytes())),
            ("object", text(&self.object)),
            (
                "type",
                self.object_type.map(|t| t.as_str().as_bytes().to_vec()),
            ),
        ];
        for (name, v) in &fields {
            if let Some(v) = v {
                add(name, v, keep_path);
            }
        }
        if let Some(id) = &self.id {
            // Every byte encoded: ids are binary.
            add("id", id, |_| false);
        }
        for (n, v) in &self.vendor_path {
            add(n, v.as_bytes(), keep_path);
        }
        let mut query: Vec<String> = Vec::new();
        let mut addq = |name: &str, v: &[u8]| {
            let mut s = format!("{name}=");
            encode_into(&mut s, v, keep_query);
            query.push(s);
        };
        if let Some(p) = &self.module_path {
            addq("module-path", p.as_bytes());
        }
        if let Some(n) = &self.module_name {
            addq("module-name", n.as_bytes());
        }
        if let Some(ps) = &self.pin_source {
            addq("pin-source", ps.to_string().as_bytes());
        }
        for (n, v) in &self.vendor_query {
            addq(n, v.as_bytes());
        }
        write!(f, "pkcs11:{}", path.join(";"))?;
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pkcs11Uri {
        Pkcs11Uri::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn bad(s: &str) -> String {
        match Pkcs11Uri::parse(s) {
            Ok(u) => panic!("{s} parsed as {u:?}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn issue_example() {
        let u = p(
            "pkcs11:token=kekfs;object=vol-kek;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kekfs/pin",
        );
        assert_eq!(u.token.as_deref(), Some("kekfs"));
        assert_eq!(u.object.as_deref(), Some("vol-kek"));
        assert_eq!(u.id.as_deref(), Some(&[1u8][..]));
        assert_eq!(
            u.module_path.as_deref(),
            Some("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(u.pin_source, Some(PinSource::File("/etc/kekfs/pin".into())));
        assert_eq!(
            u.to_string(),
            "pkcs11:token=kekfs;object=vol-kek;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kekfs/pin"
        );
    }

    #[test]
    fn all_path_attributes() {
        let u = p(
            "pkcs11:library-manufacturer=SoftHSM;library-description=Implementation%20of%20PKCS11;library-version=2.6;slot-manufacturer=SoftHSM%20project;slot-description=SoftHSM%20slot%20ID%200x1;slot-id=12345;token=My%20Token;manufacturer=SoftHSM%20project;serial=f2a1c0de;model=SoftHSM%20v2;object=vol%3Bkek;type=secret-key;id=%00%ff%10",
        );
        assert_eq!(u.library_manufacturer.as_deref(), Some("SoftHSM"));
        assert_eq!(
            u.library_description.as_deref(),
            Some("Implementation of PKCS11")
        );
        assert_eq!(
            u.library_version,
            Some(LibraryVersion { major: 2, minor: 6 })
        );
        assert_eq!(u.slot_manufacturer.as_deref(), Some("SoftHSM project"));
        assert_eq!(u.slot_description.as_deref(), Some("SoftHSM slot ID 0x1"));
        assert_eq!(u.slot_id, Some(12345));
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.manufacturer.as_deref(), Some("SoftHSM project"));
        assert_eq!(u.serial.as_deref(), Some("f2a1c0de"));
        assert_eq!(u.model.as_deref(), Some("SoftHSM v2"));
        assert_eq!(u.object.as_deref(), Some("vol;kek"));
        assert_eq!(u.object_type, Some(ObjectType::SecretKey));
        assert_eq!(u.id.as_deref(), Some(&[0u8, 0xff, 0x10][..]));
        // The canonical form parses back to the same value.
        let again = p(&u.to_string());
        assert_eq!(again, u);
        assert!(u.to_string().contains("object=vol%3Bkek"));
        assert!(u.to_string().contains("id=%00%FF%10"));
    }

    #[test]
    fn percent_decoding() {
        // Lower- and upper-case hex, UTF-8 sequences, reserved characters.
        let u = p("pkcs11:token=a%2fb%2Fc;object=k%C3%A9y%20%25%3d%26");
        assert_eq!(u.token.as_deref(), Some("a/b/c"));
        assert_eq!(u.object.as_deref(), Some("kéy %=&"));
        let s = u.to_string();
        assert_eq!(s, "pkcs11:token=a%2Fb%2Fc;object=k%C3%A9y%20%25%3D%26");
        assert_eq!(p(&s), u);
        // Unencoded specials the RFC allows in path values.
        let u = p("pkcs11:object=a:b@c!d$e'f(g)h*i+j,k=l&m[n]");
        assert_eq!(u.object.as_deref(), Some("a:b@c!d$e'f(g)h*i+j,k=l&m[n]"));
        assert_eq!(p(&u.to_string()), u);
        // id may be given unencoded too.
        assert_eq!(p("pkcs11:id=AB").id.as_deref(), Some(&b"AB"[..]));
        // Empty values are present-but-empty.
        assert_eq!(p("pkcs11:token=").token.as_deref(), Some(""));
        assert_eq!(p("pkcs11:id=").id.as_deref(), Some(&[][..]));
    }

    #[test]
    fn query_attributes() {
        let u = p("pkcs11:object=k?module-name=softhsm2&pin-source=env:KEKFS_PIN&x-foo=a/b;c");
        assert_eq!(u.module_name.as_deref(), Some("softhsm2"));
        assert_eq!(u.pin_source, Some(PinSource::Env("KEKFS_PIN".into())));
        assert_eq!(
            u.vendor_query,
            vec![("x-foo".to_string(), "a/b;c".to_string())]
        );
        assert_eq!(p(&u.to_string()), u);
        let u = p("pkcs11:?module-path=/opt/my%20hsm/lib.so");
        assert_eq!(u.module_path.as_deref(), Some("/opt/my hsm/lib.so"));
        assert_eq!(u.to_string(), "pkcs11:?module-path=/opt/my%20hsm/lib.so");
        // The empty URI names everything.
        assert_eq!(p("pkcs11:"), Pkcs11Uri::default());
        assert_eq!(Pkcs11Uri::default().to_string(), "pkcs11:");
        // Scheme is case-insensitive.
        assert_eq!(p("PKCS11:token=t").token.as_deref(), Some("t"));
        // Vendor path attributes are kept.
        let u = p("pkcs11:x-vendor=1;token=t");
        assert_eq!(
            u.vendor_path,
            vec![("x-vendor".to_string(), "1".to_string())]
        );
    }

    #[test]
    fn pin_sources() {
        let f = |s: &str| PinSource::parse(s);
        assert_eq!(f("file:/etc/pin"), Ok(PinSource::File("/etc/pin".into())));
        assert_eq!(f("file:///etc/pin"), Ok(PinSource::File("/etc/pin".into())));
        assert_eq!(
            f("file://localhost/etc/pin"),
            Ok(PinSource::File("/etc/pin".into()))
        );
        assert_eq!(f("/etc/pin"), Ok(PinSource::File("/etc/pin".into())));
        assert_eq!(f("env:PIN_1"), Ok(PinSource::Env("PIN_1".into())));
        for b in [
            "file:relative",
            "file://otherhost/etc/pin",
            "env:",
            "env:1X",
            "env:A-B",
            "|/bin/cat /etc/pin",
            "https://x/pin",
            "",
        ] {
            assert!(f(b).is_err(), "{b}");
        }
        // Percent-decoded before interpretation.
        let u = p("pkcs11:object=k?pin-source=file%3A%2Fetc%2Fmy%20pin");
        assert_eq!(u.pin_source, Some(PinSource::File("/etc/my pin".into())));
        assert_eq!(p(&u.to_string()), u);
        // A path starting with `//` prints with an empty authority (found by tests/fuzz.rs).
        for s in [
            "pkcs11:object=k?pin-source=//",
            "pkcs11:object=k?pin-source=//etc/pin",
        ] {
            let u = p(s);
            assert_eq!(p(&u.to_string()), u, "{s} printed as {u}");
        }
    }

    #[test]
    fn pin_value_is_parsed_but_never_printed() {
        let u = p("pkcs11:token=t;object=k?pin-value=12%2034&module-path=/x.so");
        assert_eq!(u.pin_value(), Some("12 34"));
        let s = u.to_string();
        assert!(!s.contains("pin-value") && !s.contains("12"), "{s}");
        assert_eq!(s, "pkcs11:token=t;object=k?module-path=/x.so");
        let dbg = format!("{u:?}");
        assert!(!dbg.contains("12 34") && dbg.contains("redacted"), "{dbg}");
        let mut u2 = u.clone();
        u2.clear_pin_value();
        assert_eq!(u2.pin_value(), None);
        assert_eq!(u2.to_string(), s);
    }

    #[test]
    fn bad_uris_have_clear_errors() {
        assert!(bad("soft:k").contains("must start with \"pkcs11:\""));
        assert!(bad("pkcs1:token=x").contains("pkcs11:"));
        assert!(bad("").contains("pkcs11:"));
        assert!(bad("pkcs11:token=a;token=b").contains("appears twice"));
        assert!(bad("pkcs11:object=a?pin-source=file:/a&pin-source=file:/b").contains("twice"));
        assert!(bad("pkcs11:x-a=1;x-a=2").contains("twice"));
        assert!(bad("pkcs11:tokn=x").contains("unknown PKCS#11 URI path attribute"));
        assert!(bad("pkcs11:object=x?foo=1").contains("unknown PKCS#11 URI query attribute"));
        assert!(bad("pkcs11:module-path=/x.so").contains("query attribute"));
        assert!(bad("pkcs11:?token=x").contains("path attribute"));
        assert!(bad("pkcs11:token").contains("no '=VALUE'"));
        assert!(bad("pkcs11:?module-path").contains("no '=VALUE'"));
        assert!(bad("pkcs11:token=a;;object=b").contains("stray ';'"));
        assert!(bad("pkcs11:token=a;").contains("stray ';'"));
        assert!(bad("pkcs11:object=a?").contains("empty query"));
        assert!(bad("pkcs11:object=a?module-name=x&&pin-source=env:X").contains("stray '&'"));
        assert!(bad("pkcs11:=x").contains("no name"));
        assert!(bad("pkcs11:to.ken=x").contains("not a valid attribute name"));
        // Percent-encoding errors.
        assert!(bad("pkcs11:object=a%").contains("bad percent-encoding"));
        assert!(bad("pkcs11:object=a%2").contains("bad percent-encoding"));
        assert!(bad("pkcs11:object=a%zz").contains("bad percent-encoding"));
        assert!(bad("pkcs11:id=%g1").contains("two hex digits"));
        // Characters that must be encoded.
        let e = bad("pkcs11:token=My Token");
        assert!(e.contains("%20") && e.contains("' '"), "{e}");
        assert!(bad("pkcs11:object=a/b").contains("%2F"));
        assert!(bad("pkcs11:object=a?b").contains("no '=VALUE'"));
        assert!(bad("pkcs11:object=k\u{e9}").contains("%C3%A9"));
        assert!(bad("pkcs11:object=a#frag").contains("fragment"));
        assert!(bad("pkcs11:object=a?module-path=/x&y").contains("no '=VALUE'"));
        // Value checks.
        assert!(bad("pkcs11:object=%ff").contains("UTF-8"));
        assert!(bad("pkcs11:type=key").contains("secret-key"));
        assert!(bad("pkcs11:slot-id=x").contains("decimal"));
        assert!(bad("pkcs11:slot-id=").contains("decimal"));
        assert!(bad("pkcs11:slot-id=99999999999999999999999").contains("too large"));
        assert!(bad("pkcs11:library-version=a.b").contains("MAJOR"));
        assert!(bad("pkcs11:library-version=1.").contains("MAJOR"));
        assert!(bad("pkcs11:library-version=300").contains("255"));
        assert!(bad("pkcs11:?module-path=lib.so").contains("absolute"));
        assert!(bad("pkcs11:?module-name=/usr/lib/x.so").contains("module-path"));
        assert!(bad("pkcs11:?pin-source=pin.txt").contains("pin-source"));
        assert!(bad("pkcs11:?pin-value=%ff").contains("UTF-8"));
    }

    #[test]
    fn library_version_forms() {
        assert_eq!(
            p("pkcs11:library-version=3").library_version,
            Some(LibraryVersion { major: 3, minor: 0 })
        );
        let u = p("pkcs11:library-version=2.40");
        assert_eq!(
            u.library_version,
            Some(LibraryVersion {
                major: 2,
                minor: 40
            })
        );
        assert_eq!(u.to_string(), "pkcs11:library-version=2.40");
    }

    #[test]
    fn roundtrip_of_arbitrary_bytes() {
        // Every byte value survives encode → parse in ids, and every char in labels.
        let id: Vec<u8> = (0..=255).collect();
        let label: String = (0x20u8..0x7f).map(char::from).collect::<String>() + "ü€";
        let u = Pkcs11Uri {
            id: Some(id),
            object: Some(label.clone()),
            token: Some(label.clone()),
            module_path: Some(format!("/{label}")),
            ..Default::default()
        };
        assert_eq!(p(&u.to_string()), u);
    }
}
