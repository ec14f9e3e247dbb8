//! Managing the label's key versions on the token (`kekfs key create|rotate|disable|enable`,
//! `kekfs verify`): generating AES-256 or RSA-3072 versions, setting CKA_UNWRAP/CKA_WRAP,
//! and reading back the protection attributes of a version.

use super::Pkcs11Provider;
use super::error::CkContext;
use super::objects::Found;
use super::session::Conn;
use super::versions::version_to_id;
use super::wrap::{MIN_RSA_BITS, Mech, forced_mechanism};
use crate::kek::pkcs11_uri::{ObjectType, Pkcs11Uri};
use crate::kek::{KekError, ProviderOptions};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};

/// What `kekfs key create/rotate --kek pkcs11:…` made.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The new version number (= its CKA_ID).
    pub version: u32,
    /// `AES-256` or `RSA-3072`.
    pub kind: String,
    /// The token it lives on.
    pub token: String,
    /// The KEK URI without `id` (follows the newest version).
    pub uri: String,
}

impl Pkcs11Provider {
    /// Which kind of key a new version is: what the URI's `type` or a forced mechanism asks
    /// for; else, when rotating, the kind of the newest version; else AES-256 if the token
    /// wraps with AES, RSA if it can only do RSA-OAEP (p11-kit 0.24 remoting passes no AES
    /// wrapping mechanism through).
    fn new_key_kind(&self, c: &Conn, found: &Found, rotate: bool) -> Result<NewKind, KekError> {
        let aes = || Mech::AES.iter().any(|&m| Self::has_mechanism(c, m));
        let rsa = || {
            Self::has_mechanism(c, Mech::OaepSha1)
                && (c.mechanisms.is_empty()
                    || c.mechanisms.contains(&MechanismType::RSA_PKCS_KEY_PAIR_GEN))
        };
        let wanted = match (self.uri.object_type, forced_mechanism()?) {
            (Some(ObjectType::Private | ObjectType::Public), _) => Some(NewKind::Rsa),
            (Some(ObjectType::SecretKey), _) => Some(NewKind::Aes),
            (_, Some(m)) if m.is_aes() => Some(NewKind::Aes),
            (_, Some(_)) => Some(NewKind::Rsa),
            _ if rotate => found.versions.values().next_back().map(|v| {
                if v.secret.is_empty() {
                    NewKind::Rsa
                } else {
                    NewKind::Aes
                }
            }),
            _ => None,
        };
        let kind = match wanted {
            Some(k) => k,
            None if aes() => NewKind::Aes,
            None if rsa() => NewKind::Rsa,
            None => NewKind::Aes,
        };
        let ok = match kind {
            NewKind::Aes => aes(),
            NewKind::Rsa => rsa(),
        };
        if !ok {
            return Err(KekError::Unsupported(match kind {
                NewKind::Aes => format!(
                    "{} offers no AES wrapping mechanism (CKM_AES_KEY_WRAP_PAD, \
                     CKM_AES_KEY_WRAP, CKM_AES_GCM){}",
                    c.token,
                    if rsa() {
                        "; it can wrap with RSA-OAEP: add type=private to the URI for an \
                         RSA key"
                    } else {
                        ""
                    }
                ),
                NewKind::Rsa => format!(
                    "{} cannot generate RSA key pairs for RSA-OAEP \
                     (CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS_OAEP)",
                    c.token
                ),
            }));
        }
        Ok(kind)
    }

    /// Create a new key version on the token, labelled `object`, with CKA_ID = the version:
    /// an AES-256 secret key, or an RSA-3072 key pair where the token (or the remoting in
    /// between) cannot wrap with AES (see [`Self::new_key_kind`]). The secret and the
    /// private key are sensitive and never extractable. `rotate` false: the label must have
    /// no versions yet (version 1, or the URI's `id`); true: the next version.
    pub fn generate_version(&self, rotate: bool) -> Result<CreatedKey, KekError> {
        let (version, kind) = self.with_session(|c| {
            let found = self.find(c)?;
            let existing = found.summary();
            let v = if let Some(v) = self.pinned {
                if found.versions.contains_key(&v) {
                    return Err(KekError::AlreadyExists(format!(
                        "key {:?} already has version {v} on {}; remove id= from the URI to \
                         create the next version with `kekfs key rotate`",
                        self.label, c.token
                    ))
                    .into());
                }
                v
            } else if !rotate && !found.versions.is_empty() {
                return Err(KekError::AlreadyExists(format!(
                    "key {:?} already exists on {} (versions {existing}); add a version with \
                     `kekfs key rotate --kek '{}'`, or choose another object= label",
                    self.label, c.token, self.uri
                ))
                .into());
            } else if rotate && found.versions.is_empty() {
                return Err(self.not_found(c, &found, None).into());
            } else {
                let last = found.versions.keys().next_back().copied().unwrap_or(0);
                last.checked_add(1).ok_or_else(|| {
                    KekError::AlreadyExists(format!(
                        "key {:?} has used up all version numbers",
                        self.label
                    ))
                })?
            };
            let kind = self.new_key_kind(c, &found, rotate)?;
            let label = Attribute::Label(self.label.as_bytes().to_vec());
            let id = Attribute::Id(version_to_id(v));
            let what = || {
                format!(
                    "generating {} key {:?} version {v} on {}",
                    kind.name(),
                    self.label,
                    c.token
                )
            };
            match kind {
                NewKind::Aes => {
                    let template = [
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32u64.into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Modifiable(true),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                        label,
                        id,
                    ];
                    c.session
                        .generate_key(&Mechanism::AesKeyGen, &template)
                        .during(what)?;
                }
                NewKind::Rsa => {
                    // Only C_WrapKey / C_UnwrapKey with RSA-OAEP: no encrypt, decrypt, sign.
                    let public = [
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Modifiable(true),
                        Attribute::ModulusBits(MIN_RSA_BITS.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                        Attribute::Wrap(true),
                        Attribute::Encrypt(false),
                        Attribute::Verify(false),
                        label.clone(),
                        id.clone(),
                    ];
                    let private = [
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Modifiable(true),
                        Attribute::Unwrap(true),
                        Attribute::Decrypt(false),
                        Attribute::Sign(false),
                        Attribute::Derive(false),
                        label,
                        id,
                    ];
                    c.session
                        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
                        .during(what)?;
                }
            }
            Ok((v, kind))
        })?;
        let token = self.describe_token(&self.lock());
        let mut follow = self.uri.clone();
        follow.id = None;
        Ok(CreatedKey {
            version,
            kind: kind.name().into(),
            token,
            uri: follow.to_string(),
        })
    }

    /// Disable (`usable` false) or enable (true) key versions on the token: CKA_UNWRAP and
    /// CKA_WRAP of every version of the label, or of `version` only (C_SetAttributeValue;
    /// the secret key gets both, an RSA private key CKA_UNWRAP, its public key CKA_WRAP).
    /// Every process using the key sees the change at its next operation: kekfs refuses a
    /// version whose CKA_UNWRAP is false as disabled, and the token refuses C_WrapKey and
    /// C_UnwrapKey with it.
    pub fn set_usable(
        &self,
        version: Option<u32>,
        usable: bool,
    ) -> Result<Vec<UsageChange>, KekError> {
        self.with_session(|c| {
            let found = self.find(c)?;
            let targets: Vec<u32> = match version {
                Some(v) if found.versions.contains_key(&v) => vec![v],
                Some(v) => return Err(self.not_found(c, &found, Some(v)).into()),
                None if found.versions.is_empty() => {
                    return Err(self.not_found(c, &found, None).into());
                }
                None => found.versions.keys().copied().collect(),
            };
            let mut out = Vec::new();
            for v in targets {
                let Some(ver) = found.versions.get(&v) else {
                    continue;
                };
                let desc = self.key_desc(c, v);
                let mut changed = false;
                // The unwrapping side first: that is the one that stops mounted volumes.
                let objects = ver
                    .secret
                    .iter()
                    .map(|o| (o, &[AttributeType::Unwrap, AttributeType::Wrap][..]))
                    .chain(
                        ver.private
                            .iter()
                            .map(|o| (o, &[AttributeType::Unwrap][..])),
                    )
                    .chain(ver.public.iter().map(|o| (o, &[AttributeType::Wrap][..])));
                for (o, types) in objects {
                    let now = c
                        .session
                        .get_attributes(o.handle, types)
                        .during(|| format!("reading CKA_UNWRAP/CKA_WRAP of {desc}"))?;
                    let set: Vec<Attribute> = now
                        .iter()
                        .filter_map(|a| match a {
                            Attribute::Unwrap(b) if *b != usable => Some(Attribute::Unwrap(usable)),
                            Attribute::Wrap(b) if *b != usable => Some(Attribute::Wrap(usable)),
                            _ => None,
                        })
                        .collect();
                    // An attribute the token did not return is set too (fail closed).
                    let missing = types.len() != now.len();
                    let set = if missing {
                        types
                            .iter()
                            .map(|t| match t {
                                AttributeType::Unwrap => Attribute::Unwrap(usable),
                                _ => Attribute::Wrap(usable),
                            })
                            .collect()
                    } else {
                        set
                    };
                    if set.is_empty() {
                        continue;
                    }
                    c.session.update_attributes(o.handle, &set).during(|| {
                        format!(
                            "setting {} on {desc}",
                            set.iter()
                                .map(|a| match a {
                                    Attribute::Unwrap(b) => format!("CKA_UNWRAP={b}"),
                                    Attribute::Wrap(b) => format!("CKA_WRAP={b}"),
                                    _ => String::new(),
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
                    changed = true;
                }
                out.push(UsageChange {
                    version: v,
                    changed,
                });
            }
            Ok(out)
        })
    }

    /// Read back CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE and
    /// CKA_NEVER_EXTRACTABLE of the objects that unwrap for `version` (the AES secret key,
    /// or the RSA private key), each attribute on its own so one refusal hides no other.
    pub fn key_protection(&self, version: u32) -> Result<Vec<KeyProtection>, KekError> {
        self.with_session(|c| {
            let found = self.find(c)?;
            let Some(ver) = found.versions.get(&version) else {
                return Err(self.not_found(c, &found, Some(version)).into());
            };
            let objects = ver
                .secret
                .iter()
                .map(|o| (o, "secret-key"))
                .chain(ver.private.iter().map(|o| (o, "private-key")));
            let mut out = Vec::new();
            for (o, class) in objects {
                let mut p = KeyProtection {
                    version,
                    class,
                    sensitive: None,
                    extractable: None,
                    always_sensitive: None,
                    never_extractable: None,
                };
                for t in [
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ] {
                    for a in c.session.get_attributes(o.handle, &[t]).unwrap_or_default() {
                        match a {
                            Attribute::Sensitive(b) => p.sensitive = Some(b),
                            Attribute::Extractable(b) => p.extractable = Some(b),
                            Attribute::AlwaysSensitive(b) => p.always_sensitive = Some(b),
                            Attribute::NeverExtractable(b) => p.never_extractable = Some(b),
                            _ => {}
                        }
                    }
                }
                out.push(p);
            }
            Ok(out)
        })
    }
}

/// The kind of key a new version gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewKind {
    /// An AES-256 secret key.
    Aes,
    /// An RSA key pair of [`MIN_RSA_BITS`] bits.
    Rsa,
}

impl NewKind {
    fn name(self) -> &'static str {
        match self {
            NewKind::Aes => "AES-256",
            NewKind::Rsa => "RSA-3072",
        }
    }
}

/// What `kekfs key disable/enable --kek pkcs11:…` did to one key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageChange {
    /// The version (= CKA_ID).
    pub version: u32,
    /// False if it already was in the requested state.
    pub changed: bool,
}

/// The protection attributes of one key object that unwraps for a version, as the token
/// reports them (`None`: the token did not return the attribute). For `kekfs verify`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyProtection {
    /// The key version (CKA_ID).
    pub version: u32,
    /// `secret-key` (AES) or `private-key` (RSA).
    pub class: &'static str,
    /// CKA_SENSITIVE.
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE.
    pub extractable: Option<bool>,
    /// CKA_ALWAYS_SENSITIVE.
    pub always_sensitive: Option<bool>,
    /// CKA_NEVER_EXTRACTABLE.
    pub never_extractable: Option<bool>,
}

/// `kekfs key create --kek pkcs11:…` (`rotate` false) or `kekfs key rotate --kek …` (true).
pub fn create_key(
    uri: &Pkcs11Uri,
    opts: &ProviderOptions,
    rotate: bool,
) -> Result<CreatedKey, KekError> {
    Pkcs11Provider::open(uri, opts)?.generate_version(rotate)
}

/// `kekfs key disable|enable --kek pkcs11:…`: set CKA_UNWRAP and CKA_WRAP of every version
/// of the URI's label, or of `version` only, to `usable`. Returns the token and what changed.
pub fn set_key_usable(
    uri: &Pkcs11Uri,
    opts: &ProviderOptions,
    version: Option<u32>,
    usable: bool,
) -> Result<(String, Vec<UsageChange>), KekError> {
    let p = Pkcs11Provider::open(uri, opts)?;
    let changes = p.set_usable(version, usable)?;
    Ok((p.token_description(), changes))
}
