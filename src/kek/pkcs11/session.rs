//! The session on the token the URI selects: finding the one matching token, opening a
//! session, logging in with the PIN, and running operations with one retry on a fresh
//! session (or a re-initialised library) after a lost session or a broken link.

use super::Pkcs11Provider;
use super::error::{Fail, ck_text, is_link_error, is_session_error, map_error, rv_of};
use super::library::{Module, context, current_generation, reinitialize};
use crate::kek::KekError;
use crate::kek::passphrase::Passphrase;
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use std::sync::{MutexGuard, PoisonError};

/// An open session on the token the URI selects.
pub(super) struct Conn {
    pid: u32,
    /// The library generation the session was opened under (see [`reinitialize`]).
    generation: u64,
    pub(super) session: Session,
    ctx: Pkcs11,
    slot: Slot,
    /// e.g. `token 'kekfs' (serial 1a2b…, slot 123)`.
    pub(super) token: String,
    login_required: bool,
    protected_path: bool,
    logged_in: bool,
    pub(super) mechanisms: Vec<MechanismType>,
}

#[derive(Default)]
pub(super) struct State {
    conn: Option<Conn>,
    /// The PIN that last logged in successfully (kept to log in again after a token error).
    pin: Option<Passphrase>,
}

/// Let go of a session: close it (`close`), or forget it without C_CloseSession when its
/// handle is void (see [`is_link_error`]) or belongs to an earlier library generation.
fn release(conn: Conn, close: bool) {
    if close {
        drop(conn);
    } else {
        std::mem::forget(conn.session);
    }
}

impl Pkcs11Provider {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // State is replaced as a whole (a session, a PIN); a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn token_filter(&self) -> String {
        let u = &self.uri;
        let mut parts = Vec::new();
        let fields: [(&str, &Option<String>); 6] = [
            ("token", &u.token),
            ("manufacturer", &u.manufacturer),
            ("serial", &u.serial),
            ("model", &u.model),
            ("slot-description", &u.slot_description),
            ("slot-manufacturer", &u.slot_manufacturer),
        ];
        for (n, v) in fields {
            if let Some(v) = v {
                parts.push(format!("{n}={v:?}"));
            }
        }
        if let Some(id) = u.slot_id {
            parts.push(format!("slot-id={id}"));
        }
        if parts.is_empty() {
            "any token".into()
        } else {
            parts.join(", ")
        }
    }

    /// Is the module p11-kit's RPC client (the token lives in a `p11-kit server` process)?
    fn is_remote(&self) -> bool {
        self.module
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("p11-kit-client"))
    }

    fn softhsm_hint(&self) -> String {
        let m = self.module.to_string_lossy();
        if self.is_remote() {
            // The client module reaches a `p11-kit server` in another process.
            let addr = match std::env::var_os("P11_KIT_SERVER_ADDRESS") {
                Some(a) => format!("$P11_KIT_SERVER_ADDRESS is {}", a.to_string_lossy()),
                None => "$P11_KIT_SERVER_ADDRESS is not set, so it tries \
                         $XDG_RUNTIME_DIR/p11-kit/pkcs11"
                    .into(),
            };
            format!(
                "; the p11-kit client module shows the tokens of a `p11-kit server` ({addr}): \
                 check that the server runs and exports this token, and that this process may \
                 connect to its socket"
            )
        } else if m.contains("softhsm") || m.contains("p11-kit") {
            match std::env::var_os("SOFTHSM2_CONF") {
                Some(c) => format!(
                    "; SoftHSM2 reads its tokens from the tokendir in $SOFTHSM2_CONF ({})",
                    c.to_string_lossy()
                ),
                None => "; SOFTHSM2_CONF is not set, so SoftHSM2 uses its system-wide config \
                         (create a private token with scripts/softhsm-setup.sh DIR and export \
                         the SOFTHSM2_CONF it prints)"
                    .into(),
            }
        } else {
            String::new()
        }
    }

    /// Find the one token the URI selects, and open a session on it.
    fn connect(&self) -> Result<Conn, KekError> {
        let Module {
            ctx, generation, ..
        } = context(&self.module)?;
        let module = self.module.display();
        let whole = |e: CkError, what: &str| {
            map_error(&e, &format!("{what} (module {module})"), &self.label)
        };
        let u = &self.uri;
        if u.library_manufacturer.is_some()
            || u.library_description.is_some()
            || u.library_version.is_some()
        {
            let info = ctx
                .get_library_info()
                .map_err(|e| whole(e, "reading library info"))?;
            let v = info.library_version();
            let ok = u
                .library_manufacturer
                .as_deref()
                .is_none_or(|m| m == info.manufacturer_id())
                && u.library_description
                    .as_deref()
                    .is_none_or(|d| d == info.library_description())
                && u.library_version
                    .is_none_or(|lv| lv.major == v.major() && lv.minor == v.minor());
            if !ok {
                return Err(KekError::TokenAbsent(format!(
                    "module {module} is {:?} by {:?}, version {}.{}, which does not match the \
                     library-* attributes of the KEK URI; fix them or module-path",
                    info.library_description(),
                    info.manufacturer_id(),
                    v.major(),
                    v.minor()
                )));
            }
        }
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| whole(e, "listing slots"))?;
        let mut seen = Vec::new();
        let mut matching = Vec::new();
        for slot in slots {
            // A token removed between listing and asking is simply not there.
            let Ok(ti) = ctx.get_token_info(slot) else {
                continue;
            };
            let si = ctx.get_slot_info(slot).ok();
            let desc = format!(
                "token '{}' (serial {}, {} {}, slot {})",
                ti.label(),
                ti.serial_number(),
                ti.manufacturer_id(),
                ti.model(),
                slot.id()
            );
            if !ti.token_initialized() {
                seen.push(format!("slot {} (token not initialised)", slot.id()));
                continue;
            }
            seen.push(desc.clone());
            let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
            let ok = eq(&u.token, ti.label())
                && eq(&u.manufacturer, ti.manufacturer_id())
                && eq(&u.serial, ti.serial_number())
                && eq(&u.model, ti.model())
                && u.slot_id.is_none_or(|id| id == slot.id())
                && si.as_ref().is_none_or(|si| {
                    eq(&u.slot_description, si.slot_description())
                        && eq(&u.slot_manufacturer, si.manufacturer_id())
                });
            if ok {
                matching.push((slot, ti, desc));
            }
        }
        let listed = if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join("; ")
        };
        if matching.len() > 1 {
            return Err(KekError::BadUri(format!(
                "the KEK URI matches {} tokens in module {module} ({}); add token=LABEL or \
                 serial=SERIAL to select one",
                matching.len(),
                matching
                    .iter()
                    .map(|m| m.2.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        if seen.is_empty() && self.is_remote() {
            // The p11-kit client shows no slot at all when it cannot reach its server.
            return Err(KekError::Unreachable(format!(
                "no token at all in PKCS#11 module {module}{}",
                self.softhsm_hint()
            )));
        }
        let Some((slot, ti, desc)) = matching.pop() else {
            return Err(KekError::TokenAbsent(format!(
                "no token matching {} in PKCS#11 module {module}; tokens present: {listed}{}",
                self.token_filter(),
                self.softhsm_hint()
            )));
        };
        let session = match ctx.open_rw_session(slot) {
            Ok(s) => s,
            Err(CkError::Pkcs11(RvError::TokenWriteProtected, _)) => ctx
                .open_ro_session(slot)
                .map_err(|e| whole(e, &format!("opening a session on {desc}")))?,
            Err(e) => return Err(whole(e, &format!("opening a session on {desc}"))),
        };
        let mechanisms = ctx.get_mechanism_list(slot).unwrap_or_default();
        Ok(Conn {
            pid: std::process::id(),
            generation,
            session,
            ctx,
            slot,
            token: desc,
            login_required: ti.login_required(),
            protected_path: ti.protected_authentication_path(),
            logged_in: false,
            mechanisms,
        })
    }

    /// An open (and, if `login`, logged-in) session.
    pub(super) fn ensure<'a>(&self, st: &'a mut State, login: bool) -> Result<&'a Conn, KekError> {
        let State { conn, pin } = st;
        if conn.as_ref().is_some_and(|c| {
            c.pid != std::process::id() || current_generation(&self.module) != Some(c.generation)
        }) && let Some(old) = conn.take()
        {
            // Opened before a fork (the handle belongs to the parent's library state) or
            // before the library was initialised again: closing it would act on a void
            // handle, or on another session that now has the same number. Let go of it.
            release(old, false);
        }
        // A kept session may have died (token error, C_CloseAllSessions) or been logged
        // out by someone else in this process (private objects would then silently
        // vanish from searches): ask the token before trusting it.
        if login
            && let Some(c) = conn.as_mut()
            && c.logged_in
            && c.login_required
        {
            match c.session.get_session_info().map(|i| i.session_state()) {
                Ok(SessionState::RoUser | SessionState::RwUser) => {}
                Ok(_) => c.logged_in = false,
                Err(e) => {
                    log::debug!(
                        "session on {} is gone ({}); reopening",
                        c.token,
                        ck_text(&e)
                    );
                    if let Some(old) = conn.take() {
                        release(old, !is_link_error(&e));
                    }
                }
            }
        }
        if conn.is_none() {
            *conn = Some(self.connect()?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(KekError::Unreachable("no session".into()));
        };
        if login && !c.logged_in {
            self.login(c, pin)?;
            c.logged_in = true;
        }
        Ok(c)
    }

    fn login(&self, c: &Conn, pin: &mut Option<Passphrase>) -> Result<(), KekError> {
        if !c.login_required {
            return Ok(());
        }
        if let Ok(ti) = c.ctx.get_token_info(c.slot)
            && ti.user_pin_locked()
        {
            return Err(KekError::PinLocked(format!(
                "the user PIN of {} is locked (too many wrong PINs); the token's security \
                 officer must unlock or reset it (pkcs11-tool --login --login-type so \
                 --init-pin, or softhsm2-util for SoftHSM2)",
                c.token
            )));
        }
        let r = if c.protected_path {
            // PIN pad or biometric reader: the token asks for the PIN itself.
            c.session.login(UserType::User, None)
        } else {
            if pin.is_none() {
                let read = self.pin_source.read(&format!("PIN for {}", c.token), false);
                *pin = Some(read.map_err(|e| match e {
                    // No PIN to be had is a PIN problem, not a keystore one.
                    KekError::Io(m) => KekError::BadPassphrase(format!(
                        "{m}; or add pin-source=file:/path/to/pin or pin-source=env:VARIABLE \
                         to the KEK URI"
                    )),
                    other => other,
                })?);
            }
            let Some(p) = pin.as_ref() else {
                return Err(KekError::BadPassphrase("no PIN".into()));
            };
            // RawAuthPin (secrecy::SecretBox) zeroizes this copy when dropped.
            let raw = RawAuthPin::new(Box::new(p.as_bytes().to_vec()));
            c.session.login_with_raw(UserType::User, &raw)
        };
        match r {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => {
                // Never keep a PIN the token refused.
                *pin = None;
                let what = format!("logging in to {}", c.token);
                let mut err = map_error(&e, &what, &self.label);
                if let KekError::BadPassphrase(m) = &mut err
                    && rv_of(&e) == Some(RvError::PinIncorrect)
                {
                    *m = format!(
                        "wrong PIN for {} (read from {}); fix the PIN there",
                        c.token, self.pin_desc
                    );
                    if let Ok(ti) = c.ctx.get_token_info(c.slot) {
                        if ti.user_pin_final_try() {
                            m.push_str("; WARNING: one more wrong PIN locks the token");
                        } else if ti.user_pin_count_low() {
                            m.push_str("; the token reports that few tries are left");
                        }
                    }
                }
                Err(err)
            }
        }
    }

    /// Run `f` on a logged-in session; a failure that looks like a lost session drops the
    /// session and retries once on a new one. If no session can be had because the link
    /// to the token is down (a remoting module whose server went away, a token removed),
    /// the library is initialised again and the connection retried once: that is how a
    /// provider comes back when the server or token does, without restarting the process.
    pub(super) fn with_session<R>(
        &self,
        mut f: impl FnMut(&Conn) -> Result<R, Fail>,
    ) -> Result<R, KekError> {
        let mut st = self.lock();
        let mut retried = false;
        let mut restarted = false;
        loop {
            let module = context(&self.module)?;
            let calls = module.calls.read().unwrap_or_else(PoisonError::into_inner);
            let conn = match self.ensure(&mut st, true) {
                Ok(c) => c,
                Err(e @ (KekError::Unreachable(_) | KekError::TokenAbsent(_))) if !restarted => {
                    restarted = true;
                    drop(calls);
                    if let Some(old) = st.conn.take() {
                        release(old, false);
                    }
                    if reinitialize(&self.module, module.generation) {
                        log::debug!("{e}; trying again after initialising the module again");
                        continue;
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            match f(conn) {
                Ok(r) => return Ok(r),
                Err(Fail::Kek(e)) => return Err(e),
                Err(Fail::Ck(e, what)) => {
                    if is_session_error(&e) {
                        if let Some(old) = st.conn.take() {
                            release(old, !is_link_error(&e));
                        }
                        if !retried {
                            retried = true;
                            log::debug!("{what}: {}; reopening the session", ck_text(&e));
                            continue;
                        }
                    }
                    let key = format!("{:?} on {}", self.label, self.describe_token(&st));
                    return Err(map_error(&e, &what, &key));
                }
            }
        }
    }

    pub(super) fn describe_token(&self, st: &State) -> String {
        st.conn
            .as_ref()
            .map(|c| c.token.clone())
            .unwrap_or_else(|| self.token_filter())
    }
}
