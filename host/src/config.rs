//! Configuration: one TOML file, validated at load.
//!
//! Every key is documented in `examples/postern.toml`, which is also the embedded default used when
//! `postern serve` runs without `--config`. Unknown keys are rejected so a typo never silently turns a
//! security setting off; errors name the file, the line and the key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// The embedded default configuration (the same bytes as `examples/postern.toml`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../examples/postern.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}, line {line}, column {column}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tls: TlsConfig,
    pub relay: RelayConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    /// `"alias@local.domain" = "target@local.domain"`.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub pop3: Pop3Config,
    #[serde(default)]
    pub imap: ImapConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub mail_auth: MailAuthConfig,
    /// DKIM signing keys, one per domain our users send from.
    #[serde(default)]
    pub dkim: Vec<DkimConfig>,
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Plugins, called in this order at every hook they export.
    #[serde(default, rename = "plugin")]
    pub plugin_list: Vec<PluginConfig>,
    /// Mailbox backends (Wasm components) and the local domains whose mail each stores; every
    /// other local domain keeps the embedded Maildir.
    #[serde(default, rename = "mailbox_backend")]
    pub mailbox_backends: Vec<MailboxBackendConfig>,
    /// PostgreSQL, for the local domains whose mailboxes several nodes share.
    pub database: Option<DatabaseConfig>,
    /// The Prometheus endpoint; none unless configured.
    pub metrics: Option<MetricsConfig>,
    /// The admin API over HTTPS; only the Unix socket unless configured.
    pub admin: Option<AdminConfig>,
}

/// `[admin]`: the admin API over HTTPS, beside the Unix socket, with a bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// A file whose first line is the token (at least 32 characters).
    pub token_file: PathBuf,
}

/// `[metrics]`: where `GET /metrics` is served (plain HTTP; bind it to loopback or a
/// management network, as Postfix exporters and Dovecot's `service stats` are).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub address: SocketAddr,
}

/// `[database]`: a PostgreSQL server (`store::postgres`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// Connections at most (default 16).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Local domains whose mailboxes live in the database.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Create or update the schema at start (else `postern db migrate` does it).
    #[serde(default)]
    pub migrate: bool,
    /// Keep the live user directory (`postern user`, `postern alias`) in the database, shared
    /// by every node, instead of `data_dir/directory.toml`.
    #[serde(default)]
    pub users: bool,
    /// Keep the plugins' `kv` namespaces in the database, shared by every node (greylisting
    /// and rate limits then hold across nodes), instead of `data_dir/plugin-kv`.
    #[serde(default)]
    pub kv: bool,
    /// Keep the queue in the database, shared by every node, instead of `data_dir/spool`: any
    /// node delivers what any node accepted, and takes over what a dead node held.
    #[serde(default)]
    pub queue: bool,
    /// How long a node holds a queued message without renewing its lease (renewed every third
    /// of it); a dead node's messages are taken over this long after it stopped.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
    /// How long a call waits for a connection (and to open one) before it fails as temporary:
    /// SMTP then answers 451, IMAP `NO [UNAVAILABLE]`.
    #[serde(default = "default_database_timeout")]
    pub timeout_seconds: u64,
}

fn default_database_timeout() -> u64 {
    10
}

fn default_pool_size() -> usize {
    16
}

fn default_lease_seconds() -> u64 {
    30
}

/// A mailbox backend: a component exporting `postern:plugin/mailbox` (`wit/deps/postern-plugin-0.1.0/mailbox.wit`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxBackendConfig {
    pub name: String,
    /// The component (`.wasm`), relative to the configuration file's directory. A changed file
    /// is loaded between calls; sessions stay open.
    pub path: PathBuf,
    /// The local domains whose mailboxes it stores.
    pub domains: Vec<String>,
    /// Its own directory, seen inside the sandbox as `/data` (default
    /// `<data_dir>/mailbox-backends/<name>`, made at start). Nothing else of the filesystem is
    /// visible to it.
    pub directory: Option<PathBuf>,
    /// Deadline for one call (default 5000 ms: a call may flush the disk several times).
    #[serde(default = "default_backend_timeout_ms")]
    pub timeout_ms: u64,
    /// Memory of one instance, all its memories and tables together (default: plugins.default_memory_mb).
    pub memory_mb: Option<u64>,
    /// Instances at most (calls for different mailboxes run in parallel on them; calls for one
    /// mailbox never do). Default 16.
    #[serde(default = "default_backend_instances")]
    pub instances: usize,
    /// Capabilities granted: `log`, `config`, `kv` and `clock` only.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// The backend's own settings, read through the `config` capability.
    #[serde(default)]
    pub config: toml::Table,
}

fn default_backend_timeout_ms() -> u64 {
    5000
}

fn default_backend_instances() -> usize {
    16
}

/// The resolver used for DNSBL checks (plugins' `dns` capability) and MX lookups.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers as `ip:port`; empty means the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    pub timeout_ms: u64,
    /// DNSKEY records (zone-file lines) trusted by the DNSSEC validation behind DANE; unset:
    /// the IANA root keys. Tests and private roots sign their own zones.
    pub trust_anchor: Option<PathBuf>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout_ms: 2000,
            trust_anchor: None,
        }
    }
}

/// Checks on mail from outside (SPF, DKIM, DMARC, ARC).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailAuthConfig {
    /// Check mail from unauthenticated clients outside `trusted_networks` and add an
    /// Authentication-Results header; plugins read the results in the data hook.
    pub verify_inbound: bool,
}

impl Default for MailAuthConfig {
    fn default() -> Self {
        MailAuthConfig {
            verify_inbound: true,
        }
    }
}

/// A DKIM signing key: mail from authenticated users whose From domain is `domain` is signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    pub domain: String,
    pub selector: String,
    /// RSA private key, PEM (PKCS#1 or PKCS#8), relative to the configuration file.
    pub key: PathBuf,
    /// Users of other domains who may send signed mail with a From address in this domain
    /// (users whose own address is in `domain` always may).
    #[serde(default)]
    pub users: Vec<String>,
}

/// How strongly outbound connections insist on TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTls {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, certificate not checked (opportunistic, RFC 7435); plaintext
    /// otherwise.
    #[default]
    May,
    /// STARTTLS required (temporary failure without it), certificate not checked.
    Encrypt,
    /// STARTTLS required and the certificate must verify for the host name against `ca_file`.
    Verify,
    /// DANE (RFC 7672): MX hosts with usable DNSSEC-validated TLSA records get STARTTLS
    /// required and the certificate matched against them; other hosts get `may` (and the
    /// domain's MTA-STS policy, if it has one). A bogus answer defers. Postfix's `dane`.
    Dane,
}

/// The outbound relay: MX delivery, retries, bounces (RFC 5321 §4.5.4, §5; RFC 3464).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Delays between delivery attempts after temporary failures; the last one repeats.
    #[serde(deserialize_with = "durations")]
    pub retry_schedule: Vec<Duration>,
    /// Give up (and bounce) when a message is older than this.
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    /// Tell the sender once that delivery is delayed, after this long (0s: never).
    #[serde(deserialize_with = "duration")]
    pub delay_notice_after: Duration,
    /// Outbound connections at once, in total and per destination domain.
    pub max_connections: usize,
    pub max_connections_per_domain: usize,
    /// The port MX hosts are contacted on (25; tests point it elsewhere).
    pub mx_port: u16,
    pub connect_timeout_secs: u64,
    /// Time allowed for each reply (RFC 5321 §4.5.3.2 asks for minutes; 10 for the final one).
    pub command_timeout_secs: u64,
    /// TLS policy for every destination, unless `tls_policy` names the domain.
    pub tls: OutboundTls,
    /// Per-domain TLS policy: `"bank.example" = "verify"`.
    pub tls_policy: BTreeMap<String, OutboundTls>,
    /// Trusted CA certificates (PEM) for `verify` and the smarthost.
    pub ca_file: PathBuf,
    /// Send everything remote through this host (`host:port`) instead of MX lookups.
    pub smarthost: Option<String>,
    /// How to reach the smarthost: "starttls" or "implicit" (TLS is always required and verified).
    pub smarthost_tls: TlsMode,
    /// AUTH PLAIN credentials for the smarthost (the password is needed in the clear to send it).
    pub smarthost_user: Option<String>,
    pub smarthost_password: Option<String>,
    /// Named ways out, for plugins' `outbound` hook to route recipients through
    /// (`[outbound.transports.backup]`).
    pub transports: BTreeMap<String, TransportConfig>,
    /// Honour recipient domains' MTA-STS policies (RFC 8461) on MX delivery.
    pub mta_sts: bool,
    /// The HTTPS port policies are fetched from (443; tests point it elsewhere).
    pub mta_sts_port: u16,
    /// Send recipient domains that ask for them (`_smtp._tls` TXT) aggregate TLS reports
    /// (RFC 8460), one per period.
    pub tls_reports: bool,
    #[serde(deserialize_with = "duration")]
    pub tls_report_interval: Duration,
}

/// A named transport: one next hop, how to secure it, and its credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// `host` or `host:port` (port 25 when not given).
    pub host: String,
    /// TLS towards it, as a domain's policy (`none`, `may`, `encrypt`, `verify`).
    #[serde(default)]
    pub tls: OutboundTls,
    /// TLS from the first byte (port 465), certificate verified, instead of STARTTLS.
    #[serde(default)]
    pub implicit_tls: bool,
    /// AUTH PLAIN credentials; only over verified TLS (`verify` or `implicit_tls`).
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            retry_schedule: [60, 300, 900, 3600, 14400]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            max_age: Duration::from_secs(5 * 86400),
            delay_notice_after: Duration::from_secs(4 * 3600),
            max_connections: 100,
            max_connections_per_domain: 5,
            mx_port: 25,
            connect_timeout_secs: 30,
            command_timeout_secs: 300,
            tls: OutboundTls::May,
            tls_policy: BTreeMap::new(),
            ca_file: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            smarthost: None,
            smarthost_tls: TlsMode::Starttls,
            smarthost_user: None,
            smarthost_password: None,
            transports: BTreeMap::new(),
            mta_sts: true,
            mta_sts_port: 443,
            tls_reports: true,
            tls_report_interval: Duration::from_secs(86400),
        }
    }
}

impl OutboundConfig {
    pub fn tls_for(&self, domain: &str) -> OutboundTls {
        self.tls_policy
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .map(|(_, policy)| *policy)
            .unwrap_or(self.tls)
    }

    /// The delay before attempt number `attempt + 1` (after `attempt` failed ones).
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let last = self.retry_schedule.len().saturating_sub(1);
        self.retry_schedule
            .get((attempt as usize).saturating_sub(1).min(last))
            .copied()
            .unwrap_or(Duration::from_secs(300))
    }
}

/// Parses `90s`, `5m`, `4h`, `5d` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(pos) => text.split_at(pos),
        None => (text, "s"),
    };
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    number.checked_mul(seconds).map(Duration::from_secs)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a duration like 5m")))
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            parse_duration(text).ok_or_else(|| {
                serde::de::Error::custom(format!("{text:?} is not a duration like 5m"))
            })
        })
        .collect()
}

/// POP3 access (RFC 1939, 2449).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Config {
    /// Inactivity before the session is closed without UPDATE (RFC 1939 §3: at least 10 minutes).
    pub idle_timeout_secs: u64,
    /// Minimum seconds between two logins of one user, announced as LOGIN-DELAY (0: none).
    pub login_delay_secs: u64,
    /// Retention announced as EXPIRE (RFC 2449 §6.7): messages retrieved and older than this many
    /// days are removed at the end of a session; 0 removes retrieved messages at once. Unset:
    /// `EXPIRE NEVER`.
    pub expire_days: Option<u32>,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            idle_timeout_secs: 600,
            login_delay_secs: 0,
            expire_days: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImapConfig {
    /// Inactivity before the session is closed (RFC 9051 §5.4: at least 30 minutes), IDLE included.
    pub idle_timeout_secs: u64,
    /// The largest message APPEND takes, announced as APPENDLIMIT (RFC 7889).
    pub append_limit: u32,
    /// Folders made for every user on first login, with their RFC 6154 special use.
    pub special_folders: BTreeMap<String, String>,
}

impl Default for ImapConfig {
    fn default() -> Self {
        ImapConfig {
            idle_timeout_secs: 1800,
            append_limit: 50 * 1024 * 1024,
            special_folders: [
                ("Sent", "\\Sent"),
                ("Drafts", "\\Drafts"),
                ("Trash", "\\Trash"),
                ("Junk", "\\Junk"),
                ("Archive", "\\Archive"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        }
    }
}

/// Settings shared by all plugins (the sandbox's outer bounds).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Deadline for one hook call, unless a plugin sets its own.
    pub default_timeout_ms: u64,
    /// Deadline of the after-queue filter (`queued` hook) for one message, unless a plugin sets
    /// its own: in seconds, since no session waits for it.
    pub queued_timeout_secs: u64,
    /// Messages the after-queue filters work on at once; more wait their turn in the spool.
    pub queued_concurrency: usize,
    /// A message a filter deferred is filtered again after this long, then at doubling
    /// intervals up to 16 times it, until the relay's `max_age` bounces it.
    pub queued_retry_secs: u64,
    /// Linear memory one plugin instance may use, unless a plugin sets its own.
    pub default_memory_mb: u64,
    /// The largest memory any plugin may be given (size of a pooled memory slot).
    pub max_memory_mb: u64,
    /// Plugin instances alive at once across all sessions (pooling allocator size); a session
    /// that finds the pool exhausted gets the plugin's on-error policy.
    pub max_instances: u32,
    /// Watch plugin files and the configuration file, and reload on change.
    pub watch: bool,
    /// Where compiled plugins are cached (default `<data_dir>/plugin-cache`). Entries are keyed
    /// by the wasm's SHA-256 and the engine's compatibility hash, so servers may share one.
    pub cache_dir: Option<PathBuf>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            default_timeout_ms: 100,
            queued_timeout_secs: 60,
            queued_concurrency: 4,
            queued_retry_secs: 60,
            default_memory_mb: 64,
            max_memory_mb: 256,
            max_instances: 1000,
            watch: true,
            cache_dir: None,
        }
    }
}

/// What a session gets when a plugin fails (traps, times out, runs out of memory, or returns an
/// invalid reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// 451 4.3.0: the client retries later; nothing is lost.
    #[default]
    Tempfail,
    /// Ignore the plugin for this call.
    Continue,
    /// 550 5.7.0.
    Reject,
}

/// Host capabilities a plugin may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Log,
    Config,
    Kv,
    Clock,
    Directory,
    Dns,
}

fn default_kv_quota_mb() -> u64 {
    16
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    /// The component (`.wasm`), relative to the configuration file's directory.
    pub path: PathBuf,
    #[serde(default)]
    pub on_error: OnError,
    pub timeout_ms: Option<u64>,
    /// Its `queued` hook's deadline, instead of `[plugins] queued_timeout_secs`.
    pub queued_timeout_secs: Option<u64>,
    pub memory_mb: Option<u64>,
    /// What the plugin's kv store may hold (keys and values together, in host memory and on
    /// disk); past it `set` and `increment` answer an error. Default 16.
    #[serde(default = "default_kv_quota_mb")]
    pub kv_quota_mb: u64,
    /// Capabilities granted; a plugin importing anything else is refused at load.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// A host directory the plugin may read and write, seen inside the sandbox as `/data` (for
    /// mailbox backends and the like). Nothing else of the filesystem is ever visible.
    pub directory: Option<PathBuf>,
    /// The plugin's own settings, read through the `config` capability.
    #[serde(default)]
    pub config: toml::Table,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The name this server gives in its banner, EHLO reply and Received headers.
    pub hostname: String,
    /// Where the spool, mailboxes and generated certificates live.
    pub data_dir: PathBuf,
    /// tracing filter directive when RUST_LOG is not set.
    #[serde(default = "default_log")]
    pub log: String,
    /// How long a graceful shutdown waits for sessions to finish.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
}

fn default_log() -> String {
    "info".into()
}
fn default_shutdown_grace() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Longest SMTP command line accepted, CRLF included (RFC 5321 §4.5.3.1.4 sets 512 as the
    /// minimum a server must accept; extensions make longer lines legitimate).
    pub max_line_length: usize,
    pub max_message_size: usize,
    pub max_recipients: usize,
    /// Protocol errors a client may make before it is disconnected with 421.
    pub max_errors: u32,
    /// Failed AUTH attempts in one session before it is disconnected.
    pub max_auth_failures: u32,
    /// Failed AUTH attempts from one IP within `auth_failure_window_secs` before AUTH is refused.
    pub max_auth_failures_per_ip: u32,
    pub auth_failure_window_secs: u64,
    /// Time allowed for a whole command line to arrive (RFC 5321 §4.5.3.2.7 suggests 5 minutes).
    pub command_timeout_secs: u64,
    /// Time allowed between two reads during DATA/BDAT (RFC 5321 §4.5.3.2.5: 3 minutes).
    pub data_timeout_secs: u64,
    /// Bytes of message bodies held in memory by all sessions together; past it, 452 4.3.1.
    pub body_memory_budget: usize,
    /// Received fields a message may carry (ours included) before it is refused as a mail loop
    /// (554 5.4.6; Postfix's hopcount_limit).
    pub max_hops: usize,
    /// Per-user quota for users without their own `quota_mb` (MiB of stored mail; 0: none).
    pub default_quota_mb: u64,
    /// Per-user quota of messages for users without their own `quota_messages` (0: none).
    pub default_quota_messages: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1000,
            max_connections_per_ip: 50,
            max_line_length: 4096,
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 10,
            max_auth_failures: 3,
            max_auth_failures_per_ip: 10,
            auth_failure_window_secs: 600,
            command_timeout_secs: 300,
            data_timeout_secs: 180,
            body_memory_budget: 1024 * 1024 * 1024,
            max_hops: 50,
            default_quota_mb: 0,
            default_quota_messages: 0,
        }
    }
}

impl Limits {
    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_secs)
    }
    pub fn data_timeout(&self) -> Duration {
        Duration::from_secs(self.data_timeout_secs)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. Without `cert` and `key`, a self-signed certificate for `hostname`,
    /// localhost and 127.0.0.1 is generated in `<data_dir>/tls/` on first start.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Domains whose mail is delivered to local mailboxes.
    pub local_domains: Vec<String>,
    /// Networks allowed to relay to any domain without authenticating.
    #[serde(default)]
    pub trusted_networks: Vec<IpNet>,
    /// In every authenticated session, on every listener, MAIL FROM must be an address of the
    /// authenticated user (or a +tag of it, or an alias of it). The old name
    /// `submission_sender_must_match` is still read.
    #[serde(default = "default_true", alias = "submission_sender_must_match")]
    pub authenticated_sender_must_match: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// Inbound SMTP (port 25 style): mail for local domains from anyone, relay only when allowed.
    Smtp,
    /// Message submission (RFC 6409): AUTH is required before MAIL.
    Submission,
    /// POP3 mailbox access (RFC 1939); `starttls` offers STLS.
    Pop3,
    /// IMAP mailbox access (RFC 9051 and RFC 3501).
    Imap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    /// Plain connection, TLS offered through STARTTLS.
    #[default]
    Starttls,
    /// TLS from the first byte (RFC 8314).
    Implicit,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: ListenerProtocol,
    /// `ip:port`; port 0 picks a free port (printed on stdout at start).
    pub address: SocketAddr,
    pub tls: TlsMode,
    /// Allows AUTH and plain passwords without TLS (only for loopback or protected networks).
    #[serde(default)]
    pub trusted: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub address: String,
    /// A PHC string (`$argon2id$...`), made with `postern user hash-password`.
    pub password: String,
    /// A shared secret for POP3 APOP (RFC 1939 §7), which needs it in the clear; leave it out
    /// unless a client can only do APOP.
    #[serde(default)]
    pub apop_secret: Option<String>,
    /// This user's quota in MiB of stored mail, all folders together (0: none); overrides
    /// `limits.default_quota_mb`.
    #[serde(default)]
    pub quota_mb: Option<u64>,
    /// This user's quota of messages, all folders together (0: none).
    #[serde(default)]
    pub quota_messages: Option<u64>,
}

impl Config {
    /// Gives `domains` to one mailbox store (`who`): each must be local, and no domain may go
    /// to two stores (`served` holds those given so far).
    fn claim_domains(
        &self,
        served: &mut std::collections::HashSet<String>,
        who: &str,
        domains: &[String],
    ) -> Result<(), String> {
        for domain in domains {
            if !self
                .relay
                .local_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
            {
                return Err(format!("{who}: {domain:?} is not in relay.local_domains"));
            }
            if !served.insert(domain.to_ascii_lowercase()) {
                return Err(format!("domain {domain:?} is given to two mailbox stores"));
            }
        }
        Ok(())
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|err| {
            let (line, column) = err
                .span()
                .map(|span| line_and_column(text, span.start))
                .unwrap_or((0, 0));
            ConfigError::Syntax {
                origin: origin.to_string(),
                line,
                column,
                message: err.message().to_string(),
            }
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        })?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        if let Some(base) = path.parent() {
            config.resolve_relative_paths(base);
        }
        Ok(config)
    }

    pub fn embedded_default() -> Config {
        Config::parse(EMBEDDED_DEFAULT, "embedded default").expect("embedded default is valid")
    }

    fn validate(&self) -> Result<(), String> {
        if self.server.hostname.trim().is_empty() {
            return Err("server.hostname must not be empty".into());
        }
        if self.relay.local_domains.is_empty() {
            return Err("relay.local_domains must name at least one domain".into());
        }
        let mut served = std::collections::HashSet::new();
        for backend in &self.mailbox_backends {
            if backend.instances < 1 || backend.timeout_ms < 1 {
                return Err(format!(
                    "mailbox_backend {:?}: instances and timeout_ms must be at least 1",
                    backend.name
                ));
            }
            if let Some(capability) = backend
                .capabilities
                .iter()
                .find(|c| matches!(c, Capability::Directory | Capability::Dns))
            {
                return Err(format!(
                    "mailbox_backend {:?}: {capability:?} cannot be granted to a mailbox backend (only log, config, kv and clock)",
                    backend.name
                ));
            }
            self.claim_domains(
                &mut served,
                &format!("mailbox_backend {:?}", backend.name),
                &backend.domains,
            )?;
        }
        if let Some(database) = &self.database {
            self.claim_domains(&mut served, "database", &database.domains)?;
            if database.timeout_seconds < 1 {
                return Err("database.timeout_seconds must be at least 1".into());
            }
            if database.queue {
                if database.lease_seconds < 3 {
                    return Err("database.lease_seconds must be at least 3".into());
                }
                // A node that takes over a message must know the users, aliases and domains
                // the storing node knew, the ones `postern user|alias|domain` added included.
                if !database.users {
                    return Err("database.queue: the live directory must be shared as well, or a node taking over a message would not know the users and domains added on the node that stored it (set database.users = true)".into());
                }
                // A node that takes over a message delivers it into its own stores: only the
                // database's mailboxes are the same on every node.
                if let Some(domain) = self.relay.local_domains.iter().find(|domain| {
                    !database
                        .domains
                        .iter()
                        .any(|d| d.eq_ignore_ascii_case(domain))
                }) {
                    return Err(format!(
                        "database.queue: local domain {domain:?} keeps its mailboxes on this node; a node taking over its mail could not deliver there (list it in database.domains)"
                    ));
                }
            }
        }
        if self.limits.max_line_length < 512 {
            return Err("limits.max_line_length must be at least 512 (RFC 5321 §4.5.3.1.4)".into());
        }
        if self.limits.max_recipients < 1 || self.limits.max_connections < 1 {
            return Err(
                "limits.max_recipients and limits.max_connections must be at least 1".into(),
            );
        }
        if self.limits.body_memory_budget < self.limits.max_message_size {
            return Err("limits.body_memory_budget must hold at least one max_message_size".into());
        }
        if self.outbound.retry_schedule.is_empty()
            || self.outbound.retry_schedule.iter().any(Duration::is_zero)
        {
            return Err("outbound.retry_schedule needs at least one non-zero delay".into());
        }
        if self.outbound.max_connections < 1 || self.outbound.max_connections_per_domain < 1 {
            return Err("outbound connection limits must be at least 1".into());
        }
        if self.outbound.smarthost_tls == TlsMode::None {
            return Err("outbound.smarthost_tls must be \"starttls\" or \"implicit\"".into());
        }
        for (name, t) in &self.outbound.transports {
            if t.user.is_some() != t.password.is_some() {
                return Err(format!(
                    "outbound.transports.{name}: user and password go together"
                ));
            }
            if t.user.is_some() && !(t.implicit_tls || t.tls == OutboundTls::Verify) {
                return Err(format!(
                    "outbound.transports.{name}: credentials are sent only over verified TLS (tls = \"verify\" or implicit_tls = true)"
                ));
            }
        }
        if self.outbound.smarthost_user.is_some() != self.outbound.smarthost_password.is_some() {
            return Err("outbound.smarthost_user and smarthost_password go together".into());
        }
        if self.imap.idle_timeout_secs < 1800 {
            return Err("imap.idle_timeout_secs must be at least 1800 (RFC 9051 §5.4)".into());
        }
        for (folder, special) in &self.imap.special_folders {
            const USES: [&str; 7] = [
                "\\All",
                "\\Archive",
                "\\Drafts",
                "\\Flagged",
                "\\Junk",
                "\\Sent",
                "\\Trash",
            ];
            if !crate::store::valid_folder_name(folder) || !USES.contains(&special.as_str()) {
                return Err(format!(
                    "imap.special_folders: {folder:?} = {special:?} needs a valid folder name and one of {USES:?}"
                ));
            }
        }
        if self.pop3.idle_timeout_secs < 600 {
            return Err("pop3.idle_timeout_secs must be at least 600 (RFC 1939 §3)".into());
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("tls.cert and tls.key go together".into());
        }
        let mut names = std::collections::HashSet::new();
        for listener in &self.listeners {
            if !names.insert(&listener.name) {
                return Err(format!("listener name {:?} is used twice", listener.name));
            }
        }
        for user in &self.users {
            if crate::address::Address::parse(&user.address).is_none() {
                return Err(format!("user address {:?} is not an address", user.address));
            }
            if !user.password.starts_with('$') {
                return Err(format!(
                    "user {:?}: password must be a PHC hash (see `postern user hash-password`)",
                    user.address
                ));
            }
        }
        let mut plugin_names = std::collections::HashSet::new();
        if self.plugins.queued_concurrency < 1
            || self.plugins.queued_timeout_secs < 1
            || self.plugins.queued_retry_secs < 1
        {
            return Err(
                "plugins.queued_concurrency, queued_timeout_secs and queued_retry_secs must be at least 1"
                    .into(),
            );
        }
        for plugin in &self.plugin_list {
            if !plugin_names.insert(&plugin.name) {
                return Err(format!("plugin name {:?} is used twice", plugin.name));
            }
            if plugin.name.is_empty()
                || !plugin
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "plugin name {:?}: use letters, digits, '-' and '_'",
                    plugin.name
                ));
            }
            let memory = plugin.memory_mb.unwrap_or(self.plugins.default_memory_mb);
            if memory > self.plugins.max_memory_mb {
                return Err(format!(
                    "plugin {:?}: memory_mb {memory} exceeds plugins.max_memory_mb {}",
                    plugin.name, self.plugins.max_memory_mb
                ));
            }
        }
        for (alias, target) in &self.aliases {
            for address in [alias, target] {
                if crate::address::Address::parse(address).is_none() {
                    return Err(format!("alias {address:?} is not an address"));
                }
            }
        }
        Ok(())
    }

    /// Resolves plugin and key paths relative to the directory of the configuration file they
    /// came from.
    pub fn resolve_relative_paths(&mut self, base: &Path) {
        for key in &mut self.dkim {
            if key.key.is_relative() {
                key.key = base.join(&key.key);
            }
        }
        for backend in &mut self.mailbox_backends {
            if backend.path.is_relative() {
                backend.path = base.join(&backend.path);
            }
            if let Some(dir) = backend.directory.as_mut().filter(|d| d.is_relative()) {
                *dir = base.join(&*dir);
            }
        }
        for plugin in &mut self.plugin_list {
            if plugin.path.is_relative() {
                plugin.path = base.join(&plugin.path);
            }
            if let Some(dir) = plugin.directory.as_mut().filter(|d| d.is_relative()) {
                *dir = base.join(&*dir);
            }
        }
    }

    pub fn is_trusted_network(&self, ip: IpAddr) -> bool {
        self.relay
            .trusted_networks
            .iter()
            .any(|net| net.contains(&ip))
    }
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_locked_down() {
        let config = Config::embedded_default();
        assert!(config.relay.trusted_networks.is_empty());
        assert!(config
            .listeners
            .iter()
            .all(|l| l.address.ip().is_loopback()));
        assert_eq!(config.users.len(), 2);
    }

    #[test]
    fn database_domains_must_be_local_and_stored_once() {
        let with = |domains: &str| {
            format!(
                "{EMBEDDED_DEFAULT}\n[database]\nurl = \"postgres://postern@127.0.0.1/db\"\ndomains = {domains}\n"
            )
        };
        let config = Config::parse(&with("[\"example.test\"]"), "t").unwrap();
        let database = config.database.unwrap();
        assert_eq!(database.pool_size, 16);
        assert!(!database.migrate);
        let err = Config::parse(&with("[\"elsewhere.test\"]"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not in relay.local_domains"), "{err}");
        let err = Config::parse(&with("[\"example.test\", \"EXAMPLE.test\"]"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("two mailbox stores"), "{err}");
        // A shared queue needs every local domain's mailboxes shared too.
        let queued = |domains: &str| format!("{}queue = true\nusers = true\n", with(domains));
        assert!(Config::parse(&queued("[\"example.test\", \"localhost\"]"), "t").is_ok());
        let err = Config::parse(&queued("[\"example.test\"]"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"localhost\" keeps its mailboxes"), "{err}");
        let unshared = format!(
            "{}queue = true\n",
            with("[\"example.test\", \"localhost\"]")
        );
        let err = Config::parse(&unshared, "t").unwrap_err().to_string();
        assert!(err.contains("set database.users = true"), "{err}");
    }

    #[test]
    fn unknown_key_is_reported_with_line() {
        let text = EMBEDDED_DEFAULT.replace("[limits]", "[limits]\nmax_conections = 3");
        let err = Config::parse(&text, "test.toml").unwrap_err().to_string();
        assert!(err.contains("test.toml, line"), "{err}");
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn plugin_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plugins.toml");
        let config = Config::load(&path).unwrap();
        // greylist, spam-filter, vrfy-policy: every shipped plugin.
        assert_eq!(config.plugin_list.len(), 3);
        assert!(
            config.plugin_list[0].path.is_absolute()
                || config.plugin_list[0].path.starts_with("..")
        );
        assert!(config.plugin_list[0]
            .path
            .to_string_lossy()
            .contains("examples/../plugins/"));
        assert_eq!(
            config.plugin_list[2].capabilities,
            vec![Capability::Config, Capability::Directory, Capability::Log]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("4h"), Some(Duration::from_secs(14400)));
        assert_eq!(parse_duration("5d"), Some(Duration::from_secs(432000)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("5 weeks"), None);
        assert_eq!(parse_duration("m"), None);
        let outbound = Config::embedded_default().outbound;
        assert_eq!(outbound.retry_delay(1), Duration::from_secs(60));
        assert_eq!(outbound.retry_delay(5), Duration::from_secs(14400));
        assert_eq!(outbound.retry_delay(50), Duration::from_secs(14400));
    }

    #[test]
    fn plain_password_is_refused() {
        let text = EMBEDDED_DEFAULT.replacen("password = \"$argon2id", "password = \"argon2id", 1);
        let err = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(err.contains("PHC hash"), "{err}");
    }
}
