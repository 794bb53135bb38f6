//! IMAP (RFC 9051 IMAP4rev2, with RFC 3501 IMAP4rev1 compatibility) on the mailbox store.
//!
//! ```text
//!  connect ─► NotAuthenticated ──LOGIN/AUTHENTICATE──► Authenticated ──SELECT/EXAMINE──► Selected
//!               ▲ STARTTLS resets                         ▲        CLOSE/UNSELECT/failed SELECT │
//!                                                         └─────────────────────────────────────┘
//!  any state ──LOGOUT──► Logout ─► close
//! ```
//!
//! `code` spells the response codes a handler names; `codec` frames and decodes commands (imap-codec) and encodes the few response shapes;
//! `selected` is a session's view of its selected folder; `fetch` renders message data;
//! `search` evaluates criteria; `sort` and `thread` order and thread what a search found (RFC
//! 5256); `session` holds a session's state (`State`: not authenticated, or logged in with a
//! selected folder or none) and its read-answer loop, the only place with I/O; `cmd` holds the
//! table of which command each state allows and the verbs, one file per group.

mod cmd;
pub mod code;
pub mod codec;
pub mod context;
pub mod fetch;
pub mod search;
pub mod selected;
pub mod session;
pub mod sort;
pub mod thread;
pub mod url;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::{LoginGate, UserDirectory};
use crate::budget::MemoryBudget;
use crate::config::Config;
use crate::store::watched::Watched;

/// Everything IMAP sessions share.
pub struct ImapServer {
    pub config: Arc<Config>,
    pub users: Arc<UserDirectory>,
    /// The store: each session writes through its own handle (`Watched::as_writer`) and hears
    /// the others' changes (IDLE, updates, NOTIFY).
    pub watched: Arc<Watched>,
    pub tls: Option<TlsAcceptor>,
    pub login_gate: Arc<LoginGate>,
    pub shutdown: watch::Receiver<bool>,
    /// Shared with SMTP: literals and FETCH output take their memory from it.
    pub budget: MemoryBudget,
    /// Where APPEND, COPY, MOVE and STORE tell `mailbox-event` plugins (none without plugins).
    pub events: Option<Arc<crate::plugin::events::MailboxEvents>>,
}

impl ImapServer {
    /// The event queue when a loaded plugin listens to mailbox events.
    pub fn events(&self) -> Option<Arc<crate::plugin::events::MailboxEvents>> {
        self.events.clone().filter(|events| events.wanted())
    }

    pub fn new(
        config: Arc<Config>,
        users: Arc<UserDirectory>,
        watched: Arc<Watched>,
        tls: Option<TlsAcceptor>,
        login_gate: Arc<LoginGate>,
        shutdown: watch::Receiver<bool>,
        budget: MemoryBudget,
    ) -> ImapServer {
        ImapServer {
            config,
            users,
            watched,
            tls,
            login_gate,
            shutdown,
            budget,
            events: None,
        }
    }

    /// The same server on another configuration (`postern reload`).
    pub fn reconfigured(&self, config: Arc<Config>, tls: Option<TlsAcceptor>) -> ImapServer {
        ImapServer {
            config,
            users: self.users.clone(),
            watched: self.watched.clone(),
            tls,
            login_gate: self.login_gate.clone(),
            shutdown: self.shutdown.clone(),
            budget: self.budget.clone(),
            events: self.events.clone(),
        }
    }
}
