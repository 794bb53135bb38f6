//! The one login gate SMTP AUTH, POP3 and IMAP pass through: the per-client throttle, bounded
//! password checking, and the outcome recorded against the client.
//!
//! Why each part is here:
//! - Password checks are argon2id, ~19 MiB and tens of milliseconds each by design. They run on a
//!   fixed pool of threads, one per core, never on tokio's blocking pool: an AUTH flood then costs
//!   at most `cores × 19 MiB` and cannot take the threads the spool and Maildir need (a thread's
//!   malloc arena keeps what it once held, so a bounded number of threads is also what bounds RSS).
//! - The throttle reserves a check before it starts: a client with 30 parallel connections gets no
//!   more checks than `max_failures`, however they interleave.
//! - A success does not wipe failures an address earned with other accounts, and the table, when
//!   full, sheds its oldest entries instead of every counter. IPv6 clients count by /64, the
//!   smallest network a single customer is usually given (RFC 6177).
//! - Verified passwords are kept a few minutes (Dovecot's `auth_cache`): clients open several
//!   connections and log in again and again, and a LOGIN that was right a minute ago need not
//!   pay argon2 again. Only successes are kept, by a keyed hash of login and password, and only
//!   while the user's stored hash is the one they were verified against; failures always pay
//!   the full check and count against the client.
//! - Plugins exporting `login` (WIT 0.2.0) see every login that passed, whatever the protocol,
//!   and may still refuse it: one place, so no protocol can forget to ask them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{AuthUser, Secret, UserDirectory};
use crate::plugin::{Hook, LoginProtocol, PluginRuntime, PluginSession, SessionInfo, Verdict};
use crate::smtp::reply::Reply;

/// Who is logging in: what the login hook is told.
pub struct Attempt<'a> {
    pub protocol: LoginProtocol,
    /// The SASL mechanism, or the command (`LOGIN`, `USER`, `APOP`).
    pub mechanism: &'a str,
    pub ip: IpAddr,
    pub session: SessionInfo,
}

impl<'a> Attempt<'a> {
    /// A login on an IMAP or POP3 session (no HELO, no user yet).
    pub fn new(
        protocol: LoginProtocol,
        mechanism: &'a str,
        id: u64,
        listener: &str,
        peer: std::net::SocketAddr,
        tls: bool,
    ) -> Attempt<'a> {
        Attempt {
            protocol,
            mechanism,
            ip: peer.ip(),
            session: crate::plugin::session_info(id, listener, peer, tls),
        }
    }

    fn protocol_name(&self) -> &'static str {
        match self.protocol {
            LoginProtocol::Smtp => "smtp",
            LoginProtocol::Imap => "imap",
            LoginProtocol::Pop3 => "pop3",
        }
    }
}

/// What a client offers to prove who it is.
pub enum Credentials {
    /// A login and its password (SMTP AUTH, POP3 USER/PASS and AUTH, IMAP LOGIN/AUTHENTICATE).
    Password {
        login: String,
        password: Secret<String>,
    },
    /// RFC 1939 §7 APOP: the digest of the greeting's timestamp and the shared secret.
    Apop {
        login: String,
        timestamp: String,
        digest: String,
    },
}

/// The gate's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginVerdict {
    Accepted(AuthUser),
    /// Wrong credentials (counted against the client).
    Refused,
    /// The client's address used up its failures for the window: nothing was checked.
    Throttled,
    /// The credentials were right, but a login plugin refused: this reply (4xx or 5xx, in SMTP
    /// terms), and the connection closes when `disconnect`.
    Vetoed {
        reply: Reply,
        disconnect: bool,
    },
}

pub struct LoginGate {
    users: Arc<UserDirectory>,
    throttle: AuthThrottle,
    checkers: PasswordPool,
    verified: CredentialCache,
    /// Set once at start when plugins are configured.
    plugins: std::sync::OnceLock<Arc<PluginRuntime>>,
}

impl LoginGate {
    pub fn new(users: Arc<UserDirectory>, max_failures: u32, window: Duration) -> LoginGate {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        LoginGate {
            users,
            throttle: AuthThrottle::new(max_failures, window),
            checkers: PasswordPool::new(threads),
            verified: CredentialCache::new(CACHE_TTL, CACHE_CAPACITY),
            plugins: std::sync::OnceLock::new(),
        }
    }

    /// Lets plugins exporting `login` see (and refuse) the logins that pass.
    pub fn consult_plugins(&self, plugins: Arc<PluginRuntime>) {
        let _ = self.plugins.set(plugins);
    }

    /// True when the client may try now (protocols that must say so before the exchange).
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.throttle.allows(ip)
    }

    /// Checks credentials for a client, counting the outcome against its address, and lets the
    /// login plugins have their say on a success.
    pub async fn check(&self, attempt: &Attempt<'_>, credentials: Credentials) -> LoginVerdict {
        let protocol = attempt.protocol_name();
        let ip = attempt.ip;
        let count = |result| {
            crate::telemetry::metrics::get()
                .logins
                .get_or_create(&crate::telemetry::metrics::Login { protocol, result })
                .inc()
        };
        let Some(ticket) = self.throttle.reserve(ip) else {
            count("throttled");
            return LoginVerdict::Throttled;
        };
        let user = match credentials {
            Credentials::Apop {
                login,
                timestamp,
                digest,
            } => self.users.verify_apop(&login, &timestamp, &digest),
            Credentials::Password { login, password } => {
                let stored = self.users.password_hash(&login);
                let key = self.verified.key(&login, &password);
                match self.verified.get(&key, stored.as_deref()) {
                    Some(user) => Some(user),
                    None => {
                        let users = self.users.clone();
                        let user = self
                            .checkers
                            .run(move || users.verify_blocking(&login, &password))
                            .await
                            .flatten();
                        if let (Some(user), Some(stored)) = (&user, stored) {
                            self.verified.put(key, user.clone(), stored);
                        }
                        user
                    }
                }
            }
        };
        match user {
            Some(user) => {
                // The password was right: a plugin's refusal is not a failure to count.
                ticket.finish(false);
                if let Some(verdict) = self.ask_plugins(attempt, &user).await {
                    count("vetoed");
                    return verdict;
                }
                count("accepted");
                LoginVerdict::Accepted(user)
            }
            None => {
                ticket.finish(true);
                count("refused");
                LoginVerdict::Refused
            }
        }
    }
}

impl LoginGate {
    /// The login hook's refusal, if a plugin refuses. The hook runs in an instance of its own
    /// (a login is one call; POP3 and IMAP sessions have no plugin session).
    async fn ask_plugins(&self, attempt: &Attempt<'_>, user: &AuthUser) -> Option<LoginVerdict> {
        let runtime = self.plugins.get()?;
        if !runtime.current().has(crate::plugin::Stage::Login) {
            return None;
        }
        let mut plugins = PluginSession::new(runtime.clone());
        let hook = Hook::Login {
            protocol: attempt.protocol,
            mechanism: attempt.mechanism,
            user: &user.0,
        };
        match plugins.decide(&attempt.session, hook).await {
            Verdict::Pass => None,
            Verdict::Refuse(reply) => {
                tracing::info!(user = %user.0, code = reply.code, "login refused by plugin");
                Some(LoginVerdict::Vetoed {
                    reply,
                    disconnect: false,
                })
            }
            Verdict::Disconnect(reply) => {
                tracing::info!(user = %user.0, code = reply.code, "login refused by plugin, disconnecting");
                Some(LoginVerdict::Vetoed {
                    reply,
                    disconnect: true,
                })
            }
        }
    }
}

/// How long a verified password is kept, and how many are.
const CACHE_TTL: Duration = Duration::from_secs(300);
const CACHE_CAPACITY: usize = 10_000;

/// Verified (login, password) pairs, by a keyed hash, with the stored hash they matched.
struct CredentialCache {
    /// Per process, random: a memory dump shows no hash anyone can test guesses against
    /// without it.
    secret: [u8; 32],
    entries: Mutex<HashMap<[u8; 32], Verified>>,
    ttl: Duration,
    capacity: usize,
}

struct Verified {
    user: AuthUser,
    /// The user's stored password hash when the password was checked against it.
    stored: String,
    until: Instant,
}

impl CredentialCache {
    fn new(ttl: Duration, capacity: usize) -> CredentialCache {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the operating system's randomness.
        let mut secret = [0u8; 32];
        for chunk in secret.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
            chunk.copy_from_slice(&hasher.finish().to_le_bytes());
        }
        CredentialCache {
            secret,
            entries: Mutex::new(HashMap::new()),
            ttl,
            capacity,
        }
    }

    fn key(&self, login: &str, password: &Secret<String>) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let inner = Sha256::new()
            .chain_update(login.to_ascii_lowercase().as_bytes())
            .chain_update([0u8])
            .chain_update(password.0.as_bytes())
            .finalize();
        Sha256::new()
            .chain_update(self.secret)
            .chain_update(inner)
            .finalize()
            .into()
    }

    /// The user a pair was verified as, while it is fresh and the stored hash unchanged.
    fn get(&self, key: &[u8; 32], stored: Option<&str>) -> Option<AuthUser> {
        let stored = stored?;
        let mut entries = self.entries.lock().expect("credential cache");
        let entry = entries.get(key)?;
        if entry.until > Instant::now() && entry.stored == stored {
            return Some(entry.user.clone());
        }
        entries.remove(key);
        None
    }

    fn put(&self, key: [u8; 32], user: AuthUser, stored: String) {
        let mut entries = self.entries.lock().expect("credential cache");
        if entries.len() >= self.capacity {
            let now = Instant::now();
            entries.retain(|_, e| e.until > now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(
            key,
            Verified {
                user,
                stored,
                until: Instant::now() + self.ttl,
            },
        );
    }
}

/// A fixed set of threads for password checks.
struct PasswordPool {
    jobs: mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl PasswordPool {
    fn new(threads: usize) -> PasswordPool {
        let (sender, receiver) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("password-{n}"))
                .spawn(move || loop {
                    let job = match receiver.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawn password check thread");
        }
        PasswordPool { jobs: sender }
    }

    /// Runs `work` on the pool; `None` if the pool is gone.
    async fn run<T, F>(&self, work: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = tx.send(work());
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}

/// The key a client is counted under: its IPv4 address, or its IPv6 /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

#[derive(Clone, Copy)]
struct Entry {
    failures: u32,
    /// Checks under way (each may turn into a failure).
    pending: u32,
    /// When the window of the counted failures began.
    since: Instant,
}

/// Counts failed logins per client so that password guessing across many connections is
/// refused, not just slowed down per connection.
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    entries: Mutex<HashMap<IpAddr, Entry>>,
    capacity: usize,
}

/// Clients tracked at most; past it, expired entries go, then the oldest tenth.
const THROTTLE_CAPACITY: usize = 100_000;

/// A reserved check; [`Ticket::finish`] records its outcome. A ticket dropped unfinished (the
/// session went away during the check) counts as a failure, so a reservation never leaks.
pub struct Ticket<'a> {
    throttle: &'a AuthThrottle,
    key: IpAddr,
    finished: bool,
}

impl Ticket<'_> {
    fn finish(mut self, failed: bool) {
        self.finished = true;
        self.throttle.finish(self.key, failed);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.throttle.finish(self.key, true);
        }
    }
}

impl AuthThrottle {
    pub fn new(max_failures: u32, window: Duration) -> AuthThrottle {
        AuthThrottle::with_capacity(max_failures, window, THROTTLE_CAPACITY)
    }

    fn with_capacity(max_failures: u32, window: Duration, capacity: usize) -> AuthThrottle {
        AuthThrottle {
            max_failures,
            window,
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(10),
        }
    }

    fn live(&self, entry: &mut Entry) {
        if entry.since.elapsed() > self.window {
            entry.failures = 0;
            entry.since = Instant::now();
        }
    }

    /// True when this client may try again now.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let mut map = self.entries.lock().expect("throttle lock");
        match map.get_mut(&client_key(ip)) {
            Some(entry) => {
                self.live(entry);
                entry.failures + entry.pending < self.max_failures
            }
            None => true,
        }
    }

    /// Reserves one check for the client, or `None` when its failures and checks under way
    /// already reach the limit.
    pub fn reserve(&self, ip: IpAddr) -> Option<Ticket<'_>> {
        let key = client_key(ip);
        let mut map = self.entries.lock().expect("throttle lock");
        if !map.contains_key(&key) && map.len() >= self.capacity {
            self.shed(&mut map);
        }
        let entry = map.entry(key).or_insert(Entry {
            failures: 0,
            pending: 0,
            since: Instant::now(),
        });
        self.live(entry);
        if entry.failures + entry.pending >= self.max_failures {
            return None;
        }
        entry.pending += 1;
        Some(Ticket {
            throttle: self,
            key,
            finished: false,
        })
    }

    fn finish(&self, key: IpAddr, failed: bool) {
        let mut map = self.entries.lock().expect("throttle lock");
        let Some(entry) = map.get_mut(&key) else {
            return;
        };
        entry.pending = entry.pending.saturating_sub(1);
        if failed {
            if entry.failures == 0 {
                entry.since = Instant::now();
            }
            entry.failures += 1;
        } else if entry.failures == 0 && entry.pending == 0 {
            // Nothing to remember about a client that only succeeded.
            map.remove(&key);
        }
    }

    /// Makes room: expired entries go first, then the oldest tenth of the rest. Entries with
    /// checks under way stay (their tickets will come back).
    fn shed(&self, map: &mut HashMap<IpAddr, Entry>) {
        let window = self.window;
        map.retain(|_, e| e.pending > 0 || e.since.elapsed() <= window);
        if map.len() < self.capacity {
            return;
        }
        let mut ages: Vec<Instant> = map
            .values()
            .filter(|e| e.pending == 0)
            .map(|e| e.since)
            .collect();
        let drop = (self.capacity / 10).max(1).min(ages.len());
        if drop == 0 {
            return;
        }
        let (_, cutoff, _) = ages.select_nth_unstable(drop - 1);
        let cutoff = *cutoff;
        let mut left = drop;
        map.retain(|_, e| {
            if left > 0 && e.pending == 0 && e.since <= cutoff {
                left -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fail(t: &AuthThrottle, addr: IpAddr) {
        t.reserve(addr).expect("allowed").finish(true);
    }

    #[test]
    fn blocks_after_failures() {
        let t = AuthThrottle::new(2, Duration::from_secs(60));
        let a = ip("192.0.2.1");
        assert!(t.allows(a));
        fail(&t, a);
        fail(&t, a);
        assert!(!t.allows(a));
        assert!(t.reserve(a).is_none());
        assert!(t.allows(ip("192.0.2.2")));
    }

    #[test]
    fn verified_passwords_are_kept_while_fresh_and_the_hash_unchanged() {
        let cache = CredentialCache::new(Duration::from_millis(200), 2);
        let secret = |p: &str| Secret(p.to_string());
        let key = cache.key("Alice@example.test", &secret("right"));
        assert_eq!(key, cache.key("alice@example.test", &secret("right")));
        assert_ne!(key, cache.key("alice@example.test", &secret("wrong")));
        cache.put(key, AuthUser("alice@example.test".into()), "$hash1".into());
        assert!(cache.get(&key, Some("$hash1")).is_some());
        assert!(
            cache.get(&key, Some("$hash2")).is_none(),
            "a changed password drops it"
        );
        assert!(
            cache.get(&key, Some("$hash1")).is_none(),
            "and it stays dropped"
        );
        cache.put(key, AuthUser("alice@example.test".into()), "$hash1".into());
        assert!(
            cache.get(&key, None).is_none(),
            "a deleted user is not let in"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert!(cache.get(&key, Some("$hash1")).is_none(), "expired");
        let other = CredentialCache::new(Duration::from_secs(60), 2);
        assert_ne!(
            other.key("alice@example.test", &secret("right")),
            key,
            "keys differ per process"
        );
    }

    #[test]
    fn parallel_checks_cannot_exceed_the_limit() {
        let t = AuthThrottle::new(10, Duration::from_secs(60));
        let a = ip("192.0.2.7");
        let tickets: Vec<Ticket> = (0..30).filter_map(|_| t.reserve(a)).collect();
        assert_eq!(tickets.len(), 10, "30 parallel attempts, 10 checks");
        for ticket in tickets {
            ticket.finish(true);
        }
        assert!(t.reserve(a).is_none());
    }

    #[test]
    fn an_abandoned_check_counts_as_a_failure_and_frees_its_reservation() {
        let t = AuthThrottle::new(2, Duration::from_secs(60));
        let a = ip("192.0.2.8");
        drop(t.reserve(a).unwrap());
        let map = t.entries.lock().unwrap();
        let entry = map.get(&a).unwrap();
        assert_eq!((entry.pending, entry.failures), (0, 1));
    }

    #[test]
    fn success_does_not_forgive_other_failures() {
        let t = AuthThrottle::new(3, Duration::from_secs(60));
        let a = ip("192.0.2.9");
        fail(&t, a);
        fail(&t, a);
        t.reserve(a).unwrap().finish(false);
        fail(&t, a);
        assert!(!t.allows(a), "the success did not reset the two failures");
    }

    #[test]
    fn ipv6_counts_by_64() {
        let t = AuthThrottle::new(2, Duration::from_secs(60));
        fail(&t, ip("2001:db8:1:2::1"));
        fail(&t, ip("2001:db8:1:2:ffff::9"));
        assert!(!t.allows(ip("2001:db8:1:2::77")), "same /64");
        assert!(t.allows(ip("2001:db8:1:3::1")), "another /64");
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn a_full_table_sheds_the_oldest_not_everything() {
        let t = AuthThrottle::with_capacity(2, Duration::from_secs(600), 100);
        let attacker = ip("198.51.100.1");
        fail(&t, attacker);
        fail(&t, attacker);
        // Fresh addresses fill the table; the attacker is among the oldest, but a flood of new
        // addresses must not wipe the counters of the newer ones.
        for n in 0..100u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            fail(&t, addr);
        }
        let map = t.entries.lock().unwrap();
        assert!(map.len() <= 100);
        assert!(map.len() >= 90, "only the oldest tenth went: {}", map.len());
        let newest = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + 99));
        assert_eq!(map.get(&newest).map(|e| e.failures), Some(1));
    }
}
