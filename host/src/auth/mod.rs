//! Authentication: the user directory, SASL PLAIN/LOGIN decoding, and the login gate (`gate`)
//! every protocol passes through.
//!
//! Shared by SMTP AUTH, POP3 and IMAP. Passwords are PHC strings (argon2id), checked on the
//! gate's own threads because a good hash is deliberately slow and large.

pub mod gate;

pub use gate::{Credentials, LoginGate, LoginVerdict};

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use argon2::password_hash::PasswordHash;
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::address::Address;
use crate::config::Config;

/// A value that must not appear in logs; `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(pub T);

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An authenticated user, by user key (`alice@example.test`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser(pub String);

/// Users and aliases from the configuration.
pub struct UserDirectory {
    /// user key → PHC hash.
    users: HashMap<String, String>,
    /// canonical alias → user key.
    aliases: HashMap<String, String>,
    /// user key → APOP shared secret, for the users that have one.
    apop: HashMap<String, Secret<String>>,
    /// user key → quota, for the users that have one.
    quotas: HashMap<String, Quota>,
}

/// A user's storage quota (RFC 9208 STORAGE and MESSAGE resources), all folders together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub bytes: Option<u64>,
    pub messages: Option<u64>,
}

impl Quota {
    /// Whether a mailbox using `bytes` and `messages` may take `more_bytes` in `more_messages`
    /// more messages.
    pub fn allows(&self, used: crate::store::Usage, more_bytes: u64, more_messages: u64) -> bool {
        self.bytes
            .is_none_or(|limit| used.bytes.saturating_add(more_bytes) <= limit)
            && self
                .messages
                .is_none_or(|limit| used.messages.saturating_add(more_messages) <= limit)
    }

    pub fn is_limited(&self) -> bool {
        self.bytes.is_some() || self.messages.is_some()
    }
}

/// Pause after a failed login, per failure in the session: guessing gets slow.
pub const FAILURE_DELAY: Duration = Duration::from_millis(500);

/// Verifying against this when the user is unknown keeps the timing the same as for a known user.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$MQRRGhCWt6crAF4WUdBtrg$AE0ybqLgCaDkhSgN2pVrA7wh+J2wHJXgHfMb6RTU9NM";

impl UserDirectory {
    pub fn from_config(config: &Config) -> UserDirectory {
        let users = config
            .users
            .iter()
            .filter_map(|u| {
                Some((
                    Address::parse(&u.address)?.mailbox_key(),
                    u.password.clone(),
                ))
            })
            .collect();
        let aliases = config
            .aliases
            .iter()
            .filter_map(|(alias, target)| {
                Some((
                    Address::parse(alias)?.canonical(),
                    Address::parse(target)?.mailbox_key(),
                ))
            })
            .collect();
        let apop = config
            .users
            .iter()
            .filter_map(|u| {
                Some((
                    Address::parse(&u.address)?.mailbox_key(),
                    Secret(u.apop_secret.clone()?),
                ))
            })
            .collect();
        let nonzero = |n: u64| (n > 0).then_some(n);
        let quotas = config
            .users
            .iter()
            .filter_map(|u| {
                let bytes = u
                    .quota_mb
                    .unwrap_or(config.limits.default_quota_mb)
                    .saturating_mul(1024 * 1024);
                let messages = u
                    .quota_messages
                    .unwrap_or(config.limits.default_quota_messages);
                let quota = Quota {
                    bytes: nonzero(bytes),
                    messages: nonzero(messages),
                };
                quota
                    .is_limited()
                    .then(|| Some((Address::parse(&u.address)?.mailbox_key(), quota)))?
            })
            .collect();
        UserDirectory {
            users,
            aliases,
            apop,
            quotas,
        }
    }

    /// A user's quota (none set: unlimited).
    pub fn quota(&self, user: &str) -> Quota {
        self.quotas
            .get(&user.to_ascii_lowercase())
            .copied()
            .unwrap_or_default()
    }

    /// Whether any user can log in with APOP (the POP3 greeting then carries a timestamp).
    pub fn apop_enabled(&self) -> bool {
        !self.apop.is_empty()
    }

    /// Checks an APOP digest: hex MD5 of the greeting's timestamp followed by the shared secret.
    pub fn verify_apop(&self, login: &str, timestamp: &str, digest: &str) -> Option<AuthUser> {
        use md5::{Digest, Md5};
        let key = Address::parse(login).map(|a| a.mailbox_key())?;
        let secret = self.apop.get(&key)?;
        let mut hasher = Md5::new();
        hasher.update(timestamp.as_bytes());
        hasher.update(secret.0.as_bytes());
        let expected: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        constant_time_eq(expected.as_bytes(), digest.as_bytes()).then_some(AuthUser(key))
    }

    /// The user key a local address delivers to, through an alias or a `+detail`, if any.
    pub fn resolve(&self, address: &Address) -> Option<String> {
        if let Some(target) = self.aliases.get(&address.canonical()) {
            return Some(target.clone());
        }
        let key = address.mailbox_key();
        if let Some(target) = self.aliases.get(&key) {
            return Some(target.clone());
        }
        self.users.contains_key(&key).then_some(key)
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The stored password hash (PHC string) of a login's user, if there is one.
    pub fn password_hash(&self, login: &str) -> Option<String> {
        let key = Address::parse(login)?.mailbox_key();
        self.users.get(&key).cloned()
    }

    /// Checks a login (blocking: call from a blocking thread). The login is an address; a bare
    /// local part is not accepted, since the same name may exist in several domains.
    pub fn verify_blocking(&self, login: &str, password: &Secret<String>) -> Option<AuthUser> {
        let key = Address::parse(login).map(|a| a.mailbox_key());
        let stored = key.as_ref().and_then(|k| self.users.get(k));
        let hash = stored.map(String::as_str).unwrap_or(DUMMY_HASH);
        let ok = verify_phc(password.0.as_bytes(), hash);
        (ok && stored.is_some()).then(|| AuthUser(key.expect("stored implies key")))
    }
}

/// The most memory one password check may use (argon2's m parameter), so a hash in the
/// configuration cannot make a check take gigabytes.
const MAX_HASH_MEMORY_KIB: u32 = 256 * 1024;

thread_local! {
    /// The argon2 working memory of this thread, kept between checks. Allocating 19 MiB per
    /// check and freeing it spread the blocks over every malloc arena (measured: 4 concurrent
    /// guessers took RSS to 450 MB that was never given back); kept per thread, what checks
    /// hold is `threads × m` and nothing more. Checks run on the login gate's fixed threads.
    static ARGON2_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Checks a password against a PHC argon2 hash in this thread's working memory.
fn verify_phc(password: &[u8], phc: &str) -> bool {
    let check = || -> Option<bool> {
        let parsed = PasswordHash::new(phc).ok()?;
        let algorithm = argon2::Algorithm::try_from(parsed.algorithm).ok()?;
        let version = match parsed.version {
            Some(v) => argon2::Version::try_from(v).ok()?,
            None => argon2::Version::default(),
        };
        let params = argon2::Params::try_from(&parsed).ok()?;
        if params.m_cost() > MAX_HASH_MEMORY_KIB {
            return None;
        }
        let expected = parsed.hash?;
        let mut salt = [0u8; 64];
        let salt = parsed.salt?.decode_b64(&mut salt).ok()?;
        let blocks = params.block_count();
        let argon = Argon2::new(algorithm, version, params);
        let mut out = vec![0u8; expected.len()];
        ARGON2_MEMORY.with(|memory| {
            let mut memory = memory.borrow_mut();
            if memory.len() < blocks {
                memory.resize(blocks, argon2::Block::default());
            }
            argon
                .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
                .ok()
        })?;
        Some(constant_time_eq(&out, expected.as_bytes()))
    };
    check().unwrap_or(false)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Makes a PHC hash for a password (for `postern user hash-password`).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

#[derive(Debug, PartialEq, Eq)]
pub enum SaslError {
    /// Not valid base64 or not the mechanism's format.
    Malformed,
    /// The client sent `*` (RFC 4954 §4).
    Cancelled,
}

/// Decodes one SASL response line (base64, or `*` to cancel).
pub fn decode_response(line: &str) -> Result<Vec<u8>, SaslError> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line == "*" {
        return Err(SaslError::Cancelled);
    }
    if line == "=" {
        return Ok(Vec::new());
    }
    BASE64.decode(line).map_err(|_| SaslError::Malformed)
}

/// Decodes a PLAIN message (RFC 4616): `authzid NUL authcid NUL passwd`. An authzid other than
/// empty or the authcid itself (acting as another user) is refused.
pub fn decode_plain(message: &[u8]) -> Result<(String, Secret<String>), SaslError> {
    let mut parts = message.split(|b| *b == 0);
    let (Some(authz), Some(authc), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let authc = String::from_utf8(authc.to_vec()).map_err(|_| SaslError::Malformed)?;
    let pass = String::from_utf8(pass.to_vec()).map_err(|_| SaslError::Malformed)?;
    if authc.is_empty() || (!authz.is_empty() && authz != authc.as_bytes()) {
        return Err(SaslError::Malformed);
    }
    Ok((authc, Secret(pass)))
}

pub fn encode_challenge(text: &str) -> String {
    BASE64.encode(text)
}

/// The SASL mechanisms offered (RFC 4616 PLAIN, and LOGIN for older clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    pub fn parse(name: &str) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// What a SASL exchange needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslStep {
    /// Send this challenge (already base64) and pass the client's answer to
    /// [`SaslExchange::respond`]. Each protocol frames it its own way (`334`, `+ `).
    Challenge(String),
    /// Credentials to verify.
    Done(String, Secret<String>),
    Failed(SaslError),
}

#[derive(Debug)]
enum SaslState {
    AwaitPlain,
    AwaitUser,
    AwaitPassword(String),
    Finished,
}

/// A sans-IO PLAIN/LOGIN exchange, shared by SMTP AUTH, POP3 AUTH and IMAP AUTHENTICATE.
#[derive(Debug)]
pub struct SaslExchange {
    state: SaslState,
}

impl SaslExchange {
    /// Starts an exchange; `initial` is the initial response when the client sent one.
    pub fn start(mechanism: Mechanism, initial: Option<&str>) -> (SaslExchange, SaslStep) {
        let mut exchange = SaslExchange {
            state: match mechanism {
                Mechanism::Plain => SaslState::AwaitPlain,
                Mechanism::Login => SaslState::AwaitUser,
            },
        };
        let step = match initial {
            Some(initial) => exchange.respond(initial),
            None => exchange.challenge(),
        };
        (exchange, step)
    }

    fn challenge(&self) -> SaslStep {
        SaslStep::Challenge(encode_challenge(match self.state {
            SaslState::AwaitUser => "Username:",
            SaslState::AwaitPassword(_) => "Password:",
            _ => "",
        }))
    }

    /// Takes the client's answer to the last challenge (one line, base64 or `*`).
    pub fn respond(&mut self, line: &str) -> SaslStep {
        let decoded = match decode_response(line) {
            Ok(decoded) => decoded,
            Err(err) => {
                self.state = SaslState::Finished;
                return SaslStep::Failed(err);
            }
        };
        match std::mem::replace(&mut self.state, SaslState::Finished) {
            SaslState::AwaitPlain => match decode_plain(&decoded) {
                Ok((login, password)) => SaslStep::Done(login, password),
                Err(err) => SaslStep::Failed(err),
            },
            SaslState::AwaitUser => match String::from_utf8(decoded) {
                Ok(user) if !user.is_empty() => {
                    self.state = SaslState::AwaitPassword(user);
                    self.challenge()
                }
                _ => SaslStep::Failed(SaslError::Malformed),
            },
            SaslState::AwaitPassword(user) => match String::from_utf8(decoded) {
                Ok(password) => SaslStep::Done(user, Secret(password)),
                Err(_) => SaslStep::Failed(SaslError::Malformed),
            },
            SaslState::Finished => SaslStep::Failed(SaslError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_decoding() {
        assert_eq!(
            decode_plain(b"\0alice@example.test\0pw").unwrap(),
            ("alice@example.test".into(), Secret("pw".into()))
        );
        assert!(
            decode_plain(b"bob@x\0alice@x\0pw").is_err(),
            "no acting as another user"
        );
        assert!(decode_plain(b"alice\0pw").is_err());
        assert_eq!(decode_response("*\r\n"), Err(SaslError::Cancelled));
        assert_eq!(decode_response("!!!"), Err(SaslError::Malformed));
    }

    #[test]
    fn sasl_exchanges() {
        let (_, step) = SaslExchange::start(Mechanism::Plain, Some("AGFAYgBwdw=="));
        assert_eq!(step, SaslStep::Done("a@b".into(), Secret("pw".into())));
        let (mut login, step) = SaslExchange::start(Mechanism::Login, None);
        assert_eq!(step, SaslStep::Challenge("VXNlcm5hbWU6".into()));
        assert_eq!(
            login.respond("YUBi"),
            SaslStep::Challenge("UGFzc3dvcmQ6".into())
        );
        assert_eq!(
            login.respond("cHc=\r\n"),
            SaslStep::Done("a@b".into(), Secret("pw".into()))
        );
        let (mut plain, step) = SaslExchange::start(Mechanism::Plain, None);
        assert_eq!(step, SaslStep::Challenge(String::new()));
        assert_eq!(plain.respond("*"), SaslStep::Failed(SaslError::Cancelled));
        assert_eq!(
            plain.respond("AGFAYgBwdw=="),
            SaslStep::Failed(SaslError::Malformed)
        );
    }

    #[test]
    fn hash_and_verify() {
        let hash = hash_password("s3cret").unwrap();
        let text = crate::config::EMBEDDED_DEFAULT.to_string();
        let mut config = crate::config::Config::parse(&text, "t").unwrap();
        config.users[0].password = hash;
        let users = UserDirectory::from_config(&config);
        let login = config.users[0].address.to_uppercase();
        assert!(users
            .verify_blocking(&login, &Secret("s3cret".into()))
            .is_some());
        assert!(users
            .verify_blocking(&login, &Secret("wrong".into()))
            .is_none());
        assert!(users
            .verify_blocking("nobody@example.test", &Secret("s3cret".into()))
            .is_none());
    }

    #[test]
    fn apop_digest() {
        let text = crate::config::EMBEDDED_DEFAULT.to_string();
        let mut config = crate::config::Config::parse(&text, "t").unwrap();
        // RFC 1939 §7's example secret and timestamp.
        config.users[0].apop_secret = Some("tanstaaf".into());
        let users = UserDirectory::from_config(&config);
        assert!(users.apop_enabled());
        let login = &config.users[0].address;
        let stamp = "<1896.697170952@dbc.mtview.ca.us>";
        assert!(users
            .verify_apop(login, stamp, "c4c9334bac560ecc979e58001b3e22fb")
            .is_some());
        assert!(users
            .verify_apop(login, stamp, "c4c9334bac560ecc979e58001b3e22fa")
            .is_none());
        assert!(users
            .verify_apop(
                &config.users[1].address,
                stamp,
                "c4c9334bac560ecc979e58001b3e22fb"
            )
            .is_none());
    }
}
