//! SMTP (RFC 5321) for relay and submission: a sans-IO codec, typed replies, and a session state
//! machine whose verbs live one group per file under `cmd/`.
//!
//! ```text
//!  connect ─► Greeting ──EHLO/HELO──► Idle ──MAIL──► Transaction ──RCPT*──► DATA/BDAT ─► Idle
//!               ▲  STARTTLS resets      ▲   RSET, EHLO, end of message     │
//!               └───────────────────────┴──────────────────────────────────┘
//! ```

pub mod body;
pub mod cmd;
pub mod codec;
pub mod reply;
pub mod session;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::{LoginGate, UserDirectory};
use crate::budget::MemoryBudget;
use crate::config::Config;
use crate::plugin::PluginRuntime;
use crate::queue::Queue;

/// Everything SMTP sessions share.
pub struct SmtpServer {
    pub config: Arc<Config>,
    pub users: Arc<UserDirectory>,
    pub queue: Queue,
    pub tls: Option<TlsAcceptor>,
    /// Shared with POP3 and IMAP: failures over any protocol count for the client.
    pub login_gate: Arc<LoginGate>,
    /// Memory for message data in flight, shared with IMAP (see `budget`).
    pub body_budget: MemoryBudget,
    /// Becomes true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// The plugin runtime, when plugins are configured.
    pub plugins: Option<Arc<PluginRuntime>>,
    /// DKIM signing and origin checks (none in session tests).
    pub message_auth: Option<Arc<crate::message_auth::MessageAuth>>,
    /// The mailbox store, for quota checks at RCPT (none in session tests: no quota check).
    pub store: Option<Arc<dyn crate::store::MailStore>>,
}

impl SmtpServer {
    pub fn new(
        config: Arc<Config>,
        users: Arc<UserDirectory>,
        queue: Queue,
        tls: Option<TlsAcceptor>,
        shutdown: watch::Receiver<bool>,
    ) -> SmtpServer {
        let limits = &config.limits;
        SmtpServer {
            login_gate: Arc::new(LoginGate::new(
                users.clone(),
                limits.max_auth_failures_per_ip,
                std::time::Duration::from_secs(limits.auth_failure_window_secs),
            )),
            body_budget: MemoryBudget::new(limits.body_memory_budget),
            config,
            users,
            queue,
            tls,
            shutdown,
            plugins: None,
            message_auth: None,
            store: None,
        }
    }

    /// The same server on another configuration (`postern reload`): the queue, the login
    /// gate, the memory budget, the plugins and the store are shared with this one.
    pub fn reconfigured(
        &self,
        config: Arc<Config>,
        tls: Option<TlsAcceptor>,
        message_auth: Option<Arc<crate::message_auth::MessageAuth>>,
    ) -> SmtpServer {
        SmtpServer {
            config,
            users: self.users.clone(),
            queue: self.queue.clone(),
            tls,
            login_gate: self.login_gate.clone(),
            body_budget: self.body_budget.clone(),
            shutdown: self.shutdown.clone(),
            plugins: self.plugins.clone(),
            message_auth,
            store: self.store.clone(),
        }
    }
}
