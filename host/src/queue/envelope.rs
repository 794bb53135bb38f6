//! The envelope: who sent a message, to whom, and how it arrived.

use serde::{Deserialize, Serialize};

/// A queue id: upper-case hex, unique per server, usable as a file name.
pub type QueueId = String;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Unix seconds when DATA completed.
    pub received_at: i64,
    /// The reverse path; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub helo: String,
    pub peer: String,
    /// The authenticated user, if any.
    pub auth_user: Option<String>,
    pub smtputf8: bool,
    /// Length of the message bytes that follow the envelope in the spool file.
    pub message_len: u64,
    /// Set by a data-hook plugin: local copies go to the `Quarantine` folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    /// The after-queue filters (`queued` hook) changed the message and it was rewritten in the
    /// spool: it is not filtered again (after a restart, or when handed back by the relay).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub filtered: bool,
    /// What the sender asked of delivery status notifications in MAIL FROM (RFC 3461 §4.3,
    /// §4.4): kept so the reports honour it and relayed to servers that offer DSN.
    #[serde(default, skip_serializing_if = "Dsn::is_empty")]
    pub dsn: Dsn,
    /// MAIL FROM carried REQUIRETLS (RFC 8689 §4.1): relayed only over verified TLS to servers
    /// that offer REQUIRETLS too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_tls: bool,
}

/// RFC 3461 §4.3 RET and §4.4 ENVID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dsn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// The envelope id, xtext decoded (1 to 100 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
}

impl Dsn {
    pub fn is_empty(&self) -> bool {
        self.ret.is_none() && self.envid.is_none()
    }
}

/// What a failure report returns of the message (RFC 3461 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    Full,
    Hdrs,
}

/// RFC 3461 §4.1 NOTIFY: which reports a recipient's sender wants. `NEVER` is all false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    /// §4.1: without NOTIFY, failures and (at the MTA's choice, as Postfix does) delays are
    /// reported, successes not.
    pub const DEFAULT: Notify = Notify {
        success: false,
        failure: true,
        delay: true,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address as the client gave it in RCPT TO.
    pub address: String,
    pub route: Route,
    /// RCPT's NOTIFY (RFC 3461 §4.1); None when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// RCPT's ORCPT (RFC 3461 §4.2), an `rfc822` address, xtext decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

impl Recipient {
    pub fn new(address: String, route: Route) -> Recipient {
        Recipient {
            address,
            route,
            notify: None,
            orcpt: None,
        }
    }

    /// The reports this recipient's sender wants.
    pub fn notify(&self) -> Notify {
        self.notify.unwrap_or(Notify::DEFAULT)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Route {
    /// A local mailbox, by its user key (`alice@example.test`).
    Local { mailbox: String },
    /// A remote domain, relayed by the outbound queue.
    Remote,
}
