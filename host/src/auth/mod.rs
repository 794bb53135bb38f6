//! Authentication: the user directory, SASL PLAIN/LOGIN decoding, and the login gate (`gate`)
//! every protocol passes through.
//!
//! Shared by SMTP AUTH, POP3 and IMAP. Passwords are PHC strings (argon2id), checked on the
//! gate's own threads because a good hash is deliberately slow and large.

pub mod directory;
pub mod gate;

pub use gate::{Attempt, Credentials, LoginGate, LoginVerdict};

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock};
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

/// A user's open sessions are to end.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The user key (`alice@example.test`).
    pub user: String,
    pub why: Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Disabled or removed: no more logins.
    Disabled,
    /// Ended by the operator (`postern kick`); the user may log in again.
    Kicked,
}

impl Revoked {
    /// What the client is told.
    pub fn text(self) -> &'static str {
        match self {
            Revoked::Disabled => "Account disabled",
            Revoked::Kicked => "Session ended by the mail administrator",
        }
    }
}

/// Users and aliases: the configuration's (fixed) and the live directory's
/// (`directory`, replaced by [`UserDirectory::refresh`] whenever it changes).
pub struct UserDirectory {
    /// The configuration's part, replaced by `postern reload`.
    fixed: RwLock<Arc<Fixed>>,
    /// The live directory's entries as last read, for rebuilding on a reload.
    live: std::sync::Mutex<directory::Entries>,
    current: RwLock<Arc<Tables>>,
    /// User keys that could log in and no longer can (disabled or removed): their open IMAP
    /// and POP3 sessions end.
    revoked: tokio::sync::broadcast::Sender<Revocation>,
}

/// What the configuration says.
struct Fixed {
    tables: Tables,
    /// `limits.default_quota_mb` in bytes and `default_quota_messages`, for directory users
    /// without their own.
    default_quota: (u64, u64),
}

#[derive(Clone, Default)]
struct Tables {
    /// user key → PHC hash.
    users: HashMap<String, String>,
    /// canonical alias → user key.
    aliases: HashMap<String, String>,
    /// user key → APOP shared secret, for the users that have one.
    apop: HashMap<String, Secret<String>>,
    /// user key → quota, for the users that have one.
    quotas: HashMap<String, Quota>,
    /// Users who may not log in.
    disabled: HashSet<String>,
    /// Local domains, lower-cased: `relay.local_domains` and the directory's.
    domains: HashSet<String>,
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

impl Fixed {
    fn of(config: &Config) -> Fixed {
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
        let quotas = config
            .users
            .iter()
            .filter_map(|u| {
                let quota = quota_of(
                    u.quota_mb.unwrap_or(config.limits.default_quota_mb),
                    u.quota_messages
                        .unwrap_or(config.limits.default_quota_messages),
                );
                quota
                    .is_limited()
                    .then(|| Some((Address::parse(&u.address)?.mailbox_key(), quota)))?
            })
            .collect();
        let fixed = Tables {
            users,
            aliases,
            apop,
            quotas,
            disabled: HashSet::new(),
            domains: config
                .relay
                .local_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
        };
        Fixed {
            tables: fixed,
            default_quota: (
                config.limits.default_quota_mb,
                config.limits.default_quota_messages,
            ),
        }
    }
}

impl UserDirectory {
    pub fn from_config(config: &Config) -> UserDirectory {
        let fixed = Fixed::of(config);
        UserDirectory {
            revoked: tokio::sync::broadcast::channel(256).0,
            current: RwLock::new(Arc::new(fixed.tables.clone())),
            fixed: RwLock::new(Arc::new(fixed)),
            live: std::sync::Mutex::default(),
        }
    }

    /// Takes a new configuration's users, aliases, local domains and default quota
    /// (`postern reload`); the live directory's entries are laid over them again. Users the
    /// configuration no longer has lose their sessions, as removed directory users do.
    pub fn reconfigure(&self, config: &Config) -> usize {
        // The live entries' lock is held for the whole rebuild, so a refresh running at the
        // same time cannot lay them over the old configuration after this one.
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        *self.fixed.write().expect("directory lock") = Arc::new(Fixed::of(config));
        self.rebuild(&live)
    }

    fn fixed(&self) -> Arc<Fixed> {
        self.fixed.read().expect("directory lock").clone()
    }

    /// Takes the live directory's entries in place of the last ones; the configuration's stay
    /// and win over them. Returns how many users there are now.
    pub fn refresh(&self, live: &directory::Entries) -> usize {
        let mut kept = self.live.lock().unwrap_or_else(|e| e.into_inner());
        *kept = live.clone();
        self.rebuild(&kept)
    }

    /// The configuration's tables with the live entries laid over them, in service from now.
    fn rebuild(&self, live: &directory::Entries) -> usize {
        let fixed = self.fixed();
        let mut tables = fixed.tables.clone();
        for user in &live.users {
            let Some(key) = Address::parse(&user.address).map(|a| a.mailbox_key()) else {
                continue;
            };
            if fixed.tables.users.contains_key(&key) {
                continue;
            }
            let quota = quota_of(
                user.quota_mb.unwrap_or(fixed.default_quota.0),
                user.quota_messages.unwrap_or(fixed.default_quota.1),
            );
            if quota.is_limited() {
                tables.quotas.insert(key.clone(), quota);
            }
            if user.disabled {
                tables.disabled.insert(key.clone());
            }
            tables.users.insert(key, user.password.clone());
        }
        for (alias, target) in &live.aliases {
            let (Some(alias), Some(target)) = (Address::parse(alias), Address::parse(target))
            else {
                continue;
            };
            tables
                .aliases
                .entry(alias.canonical())
                .or_insert(target.mailbox_key());
        }
        tables
            .domains
            .extend(live.domains.iter().map(|d| d.to_ascii_lowercase()));
        let count = tables.users.len();
        let tables = Arc::new(tables);
        let old = std::mem::replace(
            &mut *self.current.write().expect("directory lock"),
            tables.clone(),
        );
        let could =
            |t: &Tables, key: &String| t.users.contains_key(key) && !t.disabled.contains(key);
        for key in old.users.keys() {
            if could(&old, key) && !could(&tables, key) {
                let _ = self.revoked.send(Revocation {
                    user: key.clone(),
                    why: Revoked::Disabled,
                });
            }
        }
        count
    }

    /// Ends a user's open IMAP and POP3 sessions (`postern kick`), as a revocation does; their
    /// client may log in again. False when no such user is known.
    pub fn end_sessions(&self, login: &str) -> bool {
        let Some(key) = Address::parse(login).map(|a| a.mailbox_key()) else {
            return false;
        };
        let known = self.tables().users.contains_key(&key);
        if known {
            let _ = self.revoked.send(Revocation {
                user: key,
                why: Revoked::Kicked,
            });
        }
        known
    }

    /// Users as they lose the right to log in (a session ends when its user is named).
    pub fn revocations(&self) -> tokio::sync::broadcast::Receiver<Revocation> {
        self.revoked.subscribe()
    }

    fn tables(&self) -> Arc<Tables> {
        self.current.read().expect("directory lock").clone()
    }

    /// Whether mail for `domain` is delivered here: one of `relay.local_domains` or of the
    /// directory's domains (`postern domain add`).
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.tables().domains.contains(&domain.to_ascii_lowercase())
    }

    /// Whether a domain is one of the configuration's `relay.local_domains`.
    pub fn is_fixed_domain(&self, domain: &str) -> bool {
        self.fixed()
            .tables
            .domains
            .contains(&domain.to_ascii_lowercase())
    }

    /// Whether an address (a user key or a login) is in the configuration's `[[user]]`s or
    /// `[aliases]`, which the live directory cannot change.
    pub fn is_fixed(&self, address: &Address) -> bool {
        let fixed = self.fixed();
        fixed.tables.users.contains_key(&address.mailbox_key())
            || fixed.tables.aliases.contains_key(&address.canonical())
    }

    /// A user's quota (none set: unlimited).
    pub fn quota(&self, user: &str) -> Quota {
        self.tables()
            .quotas
            .get(&user.to_ascii_lowercase())
            .copied()
            .unwrap_or_default()
    }

    /// Whether any user can log in with APOP (the POP3 greeting then carries a timestamp).
    pub fn apop_enabled(&self) -> bool {
        !self.tables().apop.is_empty()
    }

    /// Checks an APOP digest: hex MD5 of the greeting's timestamp followed by the shared secret.
    pub fn verify_apop(&self, login: &str, timestamp: &str, digest: &str) -> Option<AuthUser> {
        use md5::{Digest, Md5};
        let key = Address::parse(login).map(|a| a.mailbox_key())?;
        let tables = self.tables();
        if tables.disabled.contains(&key) {
            return None;
        }
        let secret = tables.apop.get(&key)?;
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
        let tables = self.tables();
        if let Some(target) = tables.aliases.get(&address.canonical()) {
            return Some(target.clone());
        }
        let key = address.mailbox_key();
        if let Some(target) = tables.aliases.get(&key) {
            return Some(target.clone());
        }
        tables.users.contains_key(&key).then_some(key)
    }

    pub fn user_count(&self) -> usize {
        self.tables().users.len()
    }

    /// The stored password hash (PHC string) of a login's user, if there is one and it may
    /// log in.
    pub fn password_hash(&self, login: &str) -> Option<String> {
        let key = Address::parse(login)?.mailbox_key();
        let tables = self.tables();
        if tables.disabled.contains(&key) {
            return None;
        }
        tables.users.get(&key).cloned()
    }

    /// Checks a login (blocking: call from a blocking thread). The login is an address; a bare
    /// local part is not accepted, since the same name may exist in several domains.
    pub fn verify_blocking(&self, login: &str, password: &Secret<String>) -> Option<AuthUser> {
        let key = Address::parse(login).map(|a| a.mailbox_key());
        let tables = self.tables();
        // A disabled user is checked against the dummy hash: the same time as anyone else.
        let stored = key
            .as_ref()
            .filter(|k| !tables.disabled.contains(*k))
            .and_then(|k| tables.users.get(k));
        let hash = stored.map(String::as_str).unwrap_or(DUMMY_HASH);
        let ok = verify_phc(password.0.as_bytes(), hash);
        (ok && stored.is_some()).then(|| AuthUser(key.expect("stored implies key")))
    }
}

fn quota_of(mb: u64, messages: u64) -> Quota {
    let nonzero = |n: u64| (n > 0).then_some(n);
    Quota {
        bytes: nonzero(mb.saturating_mul(1024 * 1024)),
        messages: nonzero(messages),
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
    fn the_live_directory_adds_users_but_never_overrides_the_configuration() {
        let config = crate::config::Config::parse(crate::config::EMBEDDED_DEFAULT, "t").unwrap();
        let users = UserDirectory::from_config(&config);
        let alice = config.users[0].address.clone();
        let alice_hash = users.password_hash(&alice).unwrap();
        let record = |address: &str, disabled| directory::UserRecord {
            address: address.into(),
            password: hash_password("pw").unwrap(),
            quota_mb: Some(1),
            quota_messages: None,
            disabled,
        };
        let mut live = directory::Entries {
            domains: vec!["Added.test".into()],
            users: vec![record("carol@example.test", false), record(&alice, true)],
            aliases: [(
                "c@example.test".to_string(),
                "carol@example.test".to_string(),
            )]
            .into(),
        };
        assert!(!users.is_local_domain("added.test"));
        assert_eq!(users.refresh(&live), 3);
        // The directory's domains join the configuration's; only those are fixed.
        assert!(users.is_local_domain("ADDED.test") && users.is_local_domain("example.test"));
        assert!(users.is_fixed_domain("example.test") && !users.is_fixed_domain("added.test"));
        let carol = Address::parse("carol@example.test").unwrap();
        assert!(users
            .verify_blocking("Carol@example.test", &Secret("pw".into()))
            .is_some());
        assert_eq!(users.quota("carol@example.test").bytes, Some(1024 * 1024));
        assert_eq!(
            users.resolve(&Address::parse("c@example.test").unwrap()),
            Some("carol@example.test".into())
        );
        // The configuration's alice is neither replaced nor disabled.
        assert_eq!(users.password_hash(&alice), Some(alice_hash));
        assert!(users.is_fixed(&Address::parse(&alice).unwrap()));
        assert!(!users.is_fixed(&carol));
        // Disabled: no login, same refusal as a wrong password, but mail still resolves.
        let mut revoked = users.revocations();
        live.users[0].disabled = true;
        users.refresh(&live);
        assert_eq!(revoked.try_recv().unwrap().user, "carol@example.test");
        assert!(
            revoked.try_recv().is_err(),
            "only who lost the right to log in"
        );
        assert!(users
            .verify_blocking("carol@example.test", &Secret("pw".into()))
            .is_none());
        assert!(users.password_hash("carol@example.test").is_none());
        assert_eq!(users.resolve(&carol), Some("carol@example.test".into()));
        // Gone from the directory: gone.
        users.refresh(&directory::Entries::default());
        assert_eq!(users.resolve(&carol), None);
        assert_eq!(users.user_count(), 2);
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
