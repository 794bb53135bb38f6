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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address as the client gave it in RCPT TO.
    pub address: String,
    pub route: Route,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Route {
    /// A local mailbox, by its user key (`alice@example.test`).
    Local { mailbox: String },
    /// A remote domain, relayed by the outbound queue.
    Remote,
}
