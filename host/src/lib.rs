//! Postern: a WebAssembly-pluggable mail server: SMTP relay and submission, POP3 and IMAP access.
//!
//! # Layout
//! - [`config`] — the TOML configuration, validated at load; the embedded default.
//! - [`serve`] — the serve loop every protocol session runs in (implicit TLS, greeting,
//!   deadlines, shutdown, the error cutoff).
//! - [`server`] — listeners, connection limits, start-up and graceful shutdown.
//! - [`signals`] — SIGTERM/SIGINT on a thread of their own, with a hard stop deadline.
//! - [`stream`] — plain/TLS connections and the buffered I/O sessions read and write through.
//! - [`tls`] — rustls configuration, self-signed certificate on first start.
//! - [`dns`] — the resolver (plugins' DNS capability, MX lookups).
//! - [`auth`] — user directory (argon2), SASL PLAIN/LOGIN, the login gate (bounded password
//!   checks, per-client throttle) every protocol logs in through.
//! - [`budget`] — the server-wide memory budget for message data in flight (SMTP bodies, IMAP
//!   literals and FETCH output).
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
pub mod admin;
pub mod auth;
pub mod budget;
pub mod cli;
pub mod config;
pub mod dns;
pub mod durable;
pub mod framing;
pub mod http;
pub mod imap;
pub mod message;
pub mod message_auth;
pub mod plugin;
pub mod pop3;
pub mod queue;
pub mod relay;
pub mod serve;
pub mod server;
pub mod signals;
pub mod smtp;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod tls;
