//! Who is connected (`postern who`): every SMTP, POP3 and IMAP session is registered from
//! accept to close, with the user once it has logged in. The registry is process-wide, like the
//! metrics, so the one session core and the three login points feed it without threading a
//! handle through every protocol.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};

use serde::{Deserialize, Serialize};

use super::metrics;

/// One open session as `postern who` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub protocol: String,
    pub listener: String,
    pub peer: SocketAddr,
    /// Unix seconds when the connection was accepted.
    pub since: i64,
    /// The user once logged in (SMTP AUTH, IMAP LOGIN/AUTHENTICATE, POP3 USER/PASS/APOP/AUTH).
    pub user: Option<String>,
}

static OPEN: LazyLock<Mutex<BTreeMap<u64, Entry>>> = LazyLock::new(Default::default);

fn open() -> std::sync::MutexGuard<'static, BTreeMap<u64, Entry>> {
    // A panic elsewhere while holding the lock leaves a map that is still whole.
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session in the registry (and in the `sessions` gauge) while it lives.
pub struct Registered {
    id: u64,
    protocol: &'static str,
}

impl Registered {
    pub fn open(id: u64, protocol: &'static str, listener: &str, peer: SocketAddr) -> Registered {
        let m = metrics::get();
        let labels = metrics::Protocol { protocol };
        m.connections.get_or_create(&labels).inc();
        m.sessions.get_or_create(&labels).inc();
        open().insert(
            id,
            Entry {
                id,
                protocol: protocol.to_string(),
                listener: listener.to_string(),
                peer,
                since: chrono::Utc::now().timestamp(),
                user: None,
            },
        );
        Registered { id, protocol }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        open().remove(&self.id);
        metrics::get()
            .sessions
            .get_or_create(&metrics::Protocol {
                protocol: self.protocol,
            })
            .dec();
    }
}

/// Notes the user a session logged in as.
pub fn logged_in(id: u64, user: &str) {
    if let Some(entry) = open().get_mut(&id) {
        entry.user = Some(user.to_string());
    }
}

/// The open sessions, oldest first.
pub fn list() -> Vec<Entry> {
    open().values().cloned().collect()
}
