//! Postern: a WebAssembly-pluggable mail server (SMTP relay and submission; POP3 and IMAP to come).
//!
//! # Layout
//! - [`config`] — the TOML configuration, validated at load; the embedded default.
//! - [`server`] — listeners, connection limits, start-up and graceful shutdown.
//! - [`stream`] — plain/TLS connections and the buffered I/O sessions read and write through.
//! - [`tls`] — rustls configuration, self-signed certificate on first start.
//! - [`dns`] — the resolver (plugins' DNS capability, MX lookups).
//! - [`auth`] — user directory (argon2), SASL PLAIN/LOGIN, failed-login throttling.
//! - [`address`] — mail addresses as the server compares them.
//! - [`smtp`] — the SMTP codec (sans-IO), replies, the session state machine and its verbs.
//! - [`queue`] — the durable spool (group commit) and the scheduler that delivers from it.
//! - [`store`] — the `MailStore` trait and its Maildir implementation.
//! - [`plugin`] — the WebAssembly plugin platform (WIT hooks, sandbox, hot reload).
//! - [`message`] — header fields of a received message and the edits plugins ask for.
//! - [`durable`] — fsync policy shared by the spool and the store.
//! - [`telemetry`] — logging.
//! - [`cli`] — the `postern` command.

pub mod address;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dns;
pub mod durable;
pub mod framing;
pub mod imap;
pub mod message;
pub mod message_auth;
pub mod plugin;
pub mod pop3;
pub mod queue;
pub mod relay;
pub mod server;
pub mod smtp;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod tls;
