//! The key objects labelled `object` on the token, grouped by version, and the checks kekfs
//! enforces on them itself (coherence, CKA_UNWRAP, validity dates) to pick a usable version.

use super::Pkcs11Provider;
use super::dates::{Ymd, parse_date, today};
use super::error::{CkContext, Fail, ckr_name};
use super::session::Conn;
use super::versions::{id_hex, id_to_version, version_to_id};
use crate::kek::pkcs11_uri::ObjectType;
use crate::kek::{KekError, Refusal};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use std::collections::BTreeMap;

/// One key object with a kekfs version id.
#[derive(Debug, Clone)]
pub(super) struct Obj {
    pub(super) handle: ObjectHandle,
    pub(super) class: ObjectClass,
    pub(super) key_type: Option<KeyType>,
    unwrap: Option<bool>,
    pub(super) bits: Option<u64>,
    start: DateVal,
    end: DateVal,
}

/// A validity date as read from the token.
#[derive(Debug, Clone)]
enum DateVal {
    /// Not set (empty).
    Unset,
    /// A calendar day.
    Day(Ymd),
    /// Set, but the token does not return a usable value (why).
    Unreadable(String),
}

/// The objects of one key version.
#[derive(Debug, Default)]
pub(super) struct Version {
    pub(super) secret: Vec<Obj>,
    pub(super) private: Vec<Obj>,
    pub(super) public: Vec<Obj>,
}

impl Version {
    pub(super) fn kind(&self) -> String {
        if let Some(s) = self.secret.first() {
            match (s.key_type, s.bits) {
                (Some(KeyType::AES), Some(b)) => format!("AES-{b}"),
                (Some(KeyType::AES), None) => "AES".into(),
                _ => "secret key of an unsupported type".into(),
            }
        } else {
            let bits = self.public.iter().chain(&self.private).find_map(|o| o.bits);
            match bits {
                Some(b) => format!("RSA-{b}"),
                None => "RSA".into(),
            }
        }
    }

    pub(super) fn objects(&self) -> impl Iterator<Item = &Obj> {
        self.secret.iter().chain(&self.private).chain(&self.public)
    }
}

/// What a search by label found.
pub(super) struct Found {
    pub(super) versions: BTreeMap<u32, Version>,
    /// Objects with the label whose CKA_ID is not a version number.
    ignored: Vec<String>,
}

impl Found {
    pub(super) fn summary(&self) -> String {
        if self.versions.is_empty() {
            return "none".into();
        }
        self.versions
            .iter()
            .map(|(v, ver)| format!("{v} ({})", ver.kind()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Pkcs11Provider {
    /// Every key object labelled `object`, grouped by version.
    pub(super) fn find(&self, c: &Conn) -> Result<Found, Fail> {
        let label = self.label.as_bytes().to_vec();
        let handles = c
            .session
            .find_objects(&[Attribute::Label(label)])
            .during(|| format!("searching {} for key {:?}", c.token, self.label))?;
        let mut found = Found {
            versions: BTreeMap::new(),
            ignored: Vec::new(),
        };
        for h in handles {
            let attrs = match c.session.get_attributes(
                h,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::Id,
                    AttributeType::Unwrap,
                    AttributeType::ValueLen,
                    AttributeType::ModulusBits,
                    AttributeType::Modulus,
                ],
            ) {
                Ok(a) => a,
                // Destroyed between search and read: not there.
                Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
                Err(e) => {
                    return Err(Fail::Ck(
                        e,
                        format!("reading key {:?} on {}", self.label, c.token),
                    ));
                }
            };
            let mut class = None;
            let mut key_type = None;
            let mut id = None;
            let mut unwrap = None;
            let mut bits = None;
            for a in attrs {
                match a {
                    Attribute::Class(x) => class = Some(x),
                    Attribute::KeyType(x) => key_type = Some(x),
                    Attribute::Id(x) => id = Some(x),
                    Attribute::Unwrap(x) => unwrap = Some(x),
                    Attribute::ValueLen(n) => bits = Some(u64::from(n) * 8),
                    Attribute::ModulusBits(n) => bits = Some(u64::from(n)),
                    Attribute::Modulus(m) if bits.is_none() => {
                        let lead = m.iter().take_while(|&&b| b == 0).count();
                        bits = Some(((m.len() - lead) * 8) as u64);
                    }
                    _ => {}
                }
            }
            let Some(class) = class else { continue };
            let wanted = match class {
                ObjectClass::SECRET_KEY => !matches!(
                    self.uri.object_type,
                    Some(ObjectType::Private | ObjectType::Public)
                ),
                ObjectClass::PRIVATE_KEY | ObjectClass::PUBLIC_KEY => {
                    !matches!(self.uri.object_type, Some(ObjectType::SecretKey))
                }
                _ => false,
            };
            if !wanted {
                continue;
            }
            let id = id.unwrap_or_default();
            let Some(v) = id_to_version(&id) else {
                found.ignored.push(id_hex(&id));
                continue;
            };
            // Dates separately: a malformed date must not hide the rest of the key.
            let (start, end) = self.dates(c, h)?;
            let obj = Obj {
                handle: h,
                class,
                key_type,
                unwrap,
                bits,
                start,
                end,
            };
            let ver = found.versions.entry(v).or_default();
            match class {
                ObjectClass::SECRET_KEY => ver.secret.push(obj),
                ObjectClass::PRIVATE_KEY => ver.private.push(obj),
                _ => ver.public.push(obj),
            }
        }
        Ok(found)
    }

    /// CKA_START_DATE and CKA_END_DATE, each read on its own. A date the token holds but
    /// cannot return is `Unreadable`: SoftHSM 2.6 stores dates of private objects without
    /// the encryption it applies to their other attributes and then fails to read them back
    /// (CKR_GENERAL_ERROR), and a malformed value is no better. kekfs cannot check such a
    /// date, so the key is refused (fail closed) until the date is cleared or fixed.
    fn dates(&self, c: &Conn, h: ObjectHandle) -> Result<(DateVal, DateVal), Fail> {
        let mut out = [DateVal::Unset, DateVal::Unset];
        for (i, ty) in [AttributeType::StartDate, AttributeType::EndDate]
            .into_iter()
            .enumerate()
        {
            let val = match c.session.get_attributes(h, &[ty]) {
                Ok(attrs) => match attrs.first() {
                    Some(Attribute::StartDate(d) | Attribute::EndDate(d)) => match parse_date(d) {
                        Ok(Some(day)) => DateVal::Day(day),
                        Ok(None) => DateVal::Unset,
                        Err(m) => DateVal::Unreadable(m),
                    },
                    _ => DateVal::Unset,
                },
                Err(CkError::Pkcs11(
                    rv @ (RvError::GeneralError | RvError::AttributeSensitive),
                    _,
                )) => DateVal::Unreadable(format!("the token answers {}", ckr_name(rv))),
                Err(e @ CkError::Pkcs11(..)) => {
                    return Err(Fail::Ck(
                        e,
                        format!(
                            "reading the validity dates of key {:?} on {}",
                            self.label, c.token
                        ),
                    ));
                }
                Err(e) => DateVal::Unreadable(e.to_string()),
            };
            out[i] = val;
        }
        let [start, end] = out;
        Ok((start, end))
    }

    pub(super) fn key_desc(&self, c: &Conn, v: u32) -> String {
        format!(
            "{:?} version {v} (CKA_ID {}) on {}",
            self.label,
            id_hex(&version_to_id(v)),
            c.token
        )
    }

    /// Check the version's objects are coherent and usable today: refusals kekfs enforces
    /// itself (CKA_UNWRAP false, CKA_START_DATE/CKA_END_DATE).
    pub(super) fn check_usable(&self, c: &Conn, v: u32, ver: &Version) -> Result<(), KekError> {
        let desc = self.key_desc(c, v);
        let ambiguous = |what: &str, n: usize| {
            KekError::BadUri(format!(
                "{desc} is ambiguous: {n} {what} objects share that label and CKA_ID; kekfs \
                 cannot tell which one holds the volume's key: destroy or relabel the extra ones"
            ))
        };
        if ver.secret.len() > 1 {
            return Err(ambiguous("secret key", ver.secret.len()));
        }
        if ver.private.len() > 1 {
            return Err(ambiguous("private key", ver.private.len()));
        }
        if ver.public.len() > 1 {
            return Err(ambiguous("public key", ver.public.len()));
        }
        let has_rsa = !ver.private.is_empty() || !ver.public.is_empty();
        if !ver.secret.is_empty() && has_rsa {
            return Err(ambiguous("secret and RSA key", 2));
        }
        let unwrapper = ver.secret.first().or(ver.private.first());
        if let Some(o) = unwrapper
            && o.unwrap == Some(false)
        {
            return Err(KekError::Refused {
                key: format!("{desc} (CKA_UNWRAP is false on the token object)"),
                reason: Refusal::Disabled,
            });
        }
        let now = today();
        let unreadable = |attr: &str, why: &str| {
            format!(
                "{desc} ({attr} is set but cannot be read: {why}; kekfs cannot check it and \
                 refuses the key until the date is cleared; SoftHSM 2.6 cannot read back dates \
                 set on private keys)"
            )
        };
        for o in ver.objects() {
            match &o.start {
                DateVal::Day(s) if now < *s => {
                    return Err(KekError::Refused {
                        key: format!("{desc} (CKA_START_DATE is {s}, today is {now} UTC)"),
                        reason: Refusal::NotYetValid,
                    });
                }
                DateVal::Unreadable(why) => {
                    return Err(KekError::Refused {
                        key: unreadable("CKA_START_DATE", why),
                        reason: Refusal::NotYetValid,
                    });
                }
                _ => {}
            }
            match &o.end {
                DateVal::Day(e) if now > *e => {
                    return Err(KekError::Refused {
                        key: format!("{desc} (CKA_END_DATE was {e}, today is {now} UTC)"),
                        reason: Refusal::Expired,
                    });
                }
                DateVal::Unreadable(why) => {
                    return Err(KekError::Refused {
                        key: unreadable("CKA_END_DATE", why),
                        reason: Refusal::Expired,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) fn not_found(&self, c: &Conn, found: &Found, v: Option<u32>) -> KekError {
        let ignored = if found.ignored.is_empty() {
            String::new()
        } else {
            format!(
                "; objects with this label whose CKA_ID is not a kekfs version number: {}",
                found.ignored.join(", ")
            )
        };
        let what = match v {
            Some(v) => format!("key {:?} has no version {v} on {}", self.label, c.token),
            None => format!("no key {:?} on {}", self.label, c.token),
        };
        let hint = if found.versions.is_empty() {
            format!(
                "; create it with `kekfs key create --kek '{}'`, or fix object= in the KEK URI",
                self.uri
            )
        } else {
            "; the key object was destroyed, or this is not the token that wrapped the volume"
                .into()
        };
        KekError::NotFound(format!(
            "{what} (versions present: {}){ignored}{hint}",
            found.summary()
        ))
    }

    /// The version `wrap` uses now: the pinned one, else the newest usable one.
    pub(super) fn choose(&self, c: &Conn, found: &Found) -> Result<u32, KekError> {
        if let Some(v) = self.pinned {
            let Some(ver) = found.versions.get(&v) else {
                return Err(self.not_found(c, found, Some(v)));
            };
            self.check_usable(c, v, ver)?;
            return Ok(v);
        }
        let mut first_err = None;
        for (&v, ver) in found.versions.iter().rev() {
            match self.check_usable(c, v, ver) {
                Ok(()) => return Ok(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| self.not_found(c, found, None)))
    }
}
