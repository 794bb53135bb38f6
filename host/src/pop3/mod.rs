//! POP3 (RFC 1939) with CAPA and response codes (RFC 2449), STLS (RFC 2595) and SASL AUTH
//! (RFC 5034), on the mailbox store: a sans-IO codec, the maildrop view, and a session state
//! machine.
//!
//! ```text
//!  connect ─► Authorization ──USER/PASS, APOP, AUTH──► Transaction ──QUIT──► Update ─► close
//!               ▲  STLS resets   (maildrop locked)         │ dropped connection: nothing changes
//! ```

pub mod codec;
pub mod maildrop;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::{LoginGate, UserDirectory};
use crate::config::Config;
use crate::store::MailStore;
use maildrop::MaildropLocks;

/// Everything POP3 sessions share.
pub struct Pop3Server {
    pub config: Arc<Config>,
    pub users: Arc<UserDirectory>,
    pub store: Arc<dyn MailStore>,
    pub tls: Option<TlsAcceptor>,
    /// Shared with the other protocols: guessing passwords over POP3 counts against SMTP too.
    pub login_gate: Arc<LoginGate>,
    pub shutdown: watch::Receiver<bool>,
    pub locks: Arc<MaildropLocks>,
    /// Last successful login per user, for LOGIN-DELAY.
    last_login: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Pop3Server {
    pub fn new(
        config: Arc<Config>,
        users: Arc<UserDirectory>,
        store: Arc<dyn MailStore>,
        tls: Option<TlsAcceptor>,
        login_gate: Arc<LoginGate>,
        shutdown: watch::Receiver<bool>,
    ) -> Pop3Server {
        Pop3Server {
            config,
            users,
            store,
            tls,
            login_gate,
            shutdown,
            locks: Arc::new(MaildropLocks::default()),
            last_login: Arc::default(),
        }
    }

    /// The same server on another configuration (`postern reload`), sharing the maildrop
    /// locks and the LOGIN-DELAY record with this one.
    pub fn reconfigured(&self, config: Arc<Config>, tls: Option<TlsAcceptor>) -> Pop3Server {
        Pop3Server {
            config,
            users: self.users.clone(),
            store: self.store.clone(),
            tls,
            login_gate: self.login_gate.clone(),
            shutdown: self.shutdown.clone(),
            locks: self.locks.clone(),
            last_login: self.last_login.clone(),
        }
    }

    /// Records a login unless the user logged in less than LOGIN-DELAY ago.
    pub fn login_allowed(&self, user: &str) -> bool {
        let delay = Duration::from_secs(self.config.pop3.login_delay_secs);
        if delay.is_zero() {
            return true;
        }
        let mut last = self.last_login.lock().expect("login times");
        if last.len() > 100_000 {
            last.retain(|_, at| at.elapsed() < delay);
        }
        match last.get(user) {
            Some(at) if at.elapsed() < delay => false,
            _ => {
                last.insert(user.to_string(), Instant::now());
                true
            }
        }
    }
}
