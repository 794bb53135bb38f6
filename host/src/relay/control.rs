//! The relay's queue as the operator sees it (`postern queue …` through the admin API): what
//! waits, and the actions on it (retry, hold, release, delete, bounce). The relay's own loop
//! applies them, so an action never races an attempt: a message under attempt gets its action
//! when the attempt ends, and an action that must be saved takes the message out of the
//! schedule until its state is durable, as an attempt does.
//!
//! With the shared queue, a node sees and acts on the messages it holds.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::state::{Attempt, DeliveryState, RcptState};
use crate::queue::{Envelope, QueueId};

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for its next attempt.
    Deferred,
    /// Held by the operator: no attempt until released.
    Held,
    /// Under attempt now.
    Active,
}

/// Which messages an action or a listing covers: all given conditions hold. `ids` empty means
/// any id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub ids: Vec<QueueId>,
    /// Part of the sender's address (case-insensitive).
    #[serde(default)]
    pub sender: Option<String>,
    /// Part of a recipient's address (case-insensitive).
    #[serde(default)]
    pub recipient: Option<String>,
    /// A recipient's domain (exact, case-insensitive).
    #[serde(default)]
    pub domain: Option<String>,
    /// Queued longer than this many seconds.
    #[serde(default)]
    pub older_than_secs: Option<i64>,
    #[serde(default)]
    pub status: Option<Status>,
}

impl Filter {
    pub fn matches(&self, entry: &Entry, now_s: i64) -> bool {
        let lower = |s: &str| s.to_ascii_lowercase();
        (self.ids.is_empty() || self.ids.contains(&entry.id))
            && self
                .sender
                .as_ref()
                .is_none_or(|s| lower(&entry.sender).contains(&lower(s)))
            && self.recipient.as_ref().is_none_or(|r| {
                entry
                    .recipients
                    .iter()
                    .any(|x| lower(&x.address).contains(&lower(r)))
            })
            && self.domain.as_ref().is_none_or(|d| {
                entry.recipients.iter().any(|x| {
                    x.address
                        .rsplit_once('@')
                        .is_some_and(|(_, domain)| domain.eq_ignore_ascii_case(d))
                })
            })
            && self
                .older_than_secs
                .is_none_or(|age| now_s - entry.received_at > age)
            && self.status.is_none_or(|s| s == entry.status)
    }
}

/// What the operator may do to queued messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Attempt now (held messages stay held).
    Retry,
    /// No attempts until released; kept across restarts.
    Hold,
    /// Undo a hold, and attempt now.
    Release,
    /// Remove from the queue without a notice to the sender (`postsuper -d`).
    Delete,
    /// Give up on every recipient still owed and send the sender the bounce.
    Bounce,
}

/// One recipient as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipientView {
    pub address: String,
    /// `pending` (remote, still owed), `local` (local, retried), `failed` (bounce owed), `done`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Attempt>,
}

/// One message as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub id: QueueId,
    pub sender: String,
    /// Unix seconds.
    pub received_at: i64,
    pub size: u64,
    pub status: Status,
    pub attempts: u32,
    /// Unix seconds of the next attempt (none while held or under attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<i64>,
    pub recipients: Vec<RecipientView>,
}

impl Entry {
    pub fn of(envelope: &Envelope, state: &DeliveryState, status: Status) -> Entry {
        let recipients = state
            .recipients
            .iter()
            .zip(&envelope.recipients)
            .map(|(r, original)| {
                let (address, name, last) = match r {
                    RcptState::Pending { address, last } => (address, "pending", last.clone()),
                    RcptState::Local { last } => (&original.address, "local", last.clone()),
                    RcptState::Failed { address, attempt } => {
                        (address, "failed", Some(attempt.clone()))
                    }
                    RcptState::Succeeded { address, .. } => (address, "delivered", None),
                    RcptState::Done => (&original.address, "done", None),
                };
                RecipientView {
                    address: address.clone(),
                    state: name.into(),
                    last,
                }
            })
            .collect();
        Entry {
            id: envelope.id.clone(),
            sender: envelope.sender.clone(),
            received_at: envelope.received_at,
            size: envelope.message_len,
            status,
            attempts: state.attempts,
            next_attempt: (status == Status::Deferred).then_some(state.next_attempt_ms / 1000),
            recipients,
        }
    }
}

/// What an action came to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Acted on now.
    pub done: Vec<QueueId>,
    /// Under attempt: acted on when the attempt ends (if work is left by then).
    pub after_attempt: Vec<QueueId>,
}

/// The queue in two numbers, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub messages: usize,
    /// Unix seconds when the oldest message arrived.
    pub oldest: Option<i64>,
}

/// A request to the relay's loop.
pub enum Control {
    Stats {
        reply: oneshot::Sender<Stats>,
    },
    List {
        filter: Filter,
        reply: oneshot::Sender<Vec<Entry>>,
    },
    Act {
        action: Action,
        filter: Filter,
        reply: oneshot::Sender<Report>,
    },
}

/// Applies `action` to a state in memory; true when the change must be saved before the
/// message is scheduled again.
pub fn apply(action: Action, envelope: &Envelope, state: &mut DeliveryState, now_ms: i64) -> bool {
    match action {
        Action::Retry => {
            if !state.held {
                state.next_attempt_ms = now_ms;
            }
            false
        }
        Action::Hold => {
            state.held = true;
            true
        }
        Action::Release => {
            state.held = false;
            state.next_attempt_ms = now_ms;
            true
        }
        Action::Bounce => {
            let cancelled = Attempt {
                status: "5.0.0".into(),
                remote_mta: None,
                diagnostic: "Delivery cancelled by the mail administrator".into(),
            };
            for (rcpt, original) in state.recipients.iter_mut().zip(&envelope.recipients) {
                let address = match rcpt {
                    RcptState::Pending { address, .. } => address.clone(),
                    RcptState::Local { .. } => original.address.clone(),
                    _ => continue,
                };
                *rcpt = RcptState::Failed {
                    address,
                    attempt: cancelled.clone(),
                };
            }
            // The next attempt sends the bounce and removes the message.
            state.held = false;
            state.next_attempt_ms = now_ms;
            true
        }
        // Removal is the relay's to do (spool and state).
        Action::Delete => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Recipient, Route};

    fn envelope() -> Envelope {
        Envelope {
            id: "Q1".into(),
            received_at: 1_000,
            sender: "Alice@Example.test".into(),
            recipients: vec![
                Recipient::new("bob@example.net".into(), Route::Remote),
                Recipient::new(
                    "carol@example.test".into(),
                    Route::Local {
                        mailbox: "carol@example.test".into(),
                    },
                ),
            ],
            helo: "h".into(),
            peer: "127.0.0.1".into(),
            auth_user: None,
            smtputf8: false,
            message_len: 10,
            quarantine: None,
            filtered: false,
            dsn: Default::default(),
            require_tls: false,
        }
    }

    fn state() -> DeliveryState {
        DeliveryState {
            attempts: 3,
            next_attempt_ms: 99_999,
            delay_notified: false,
            held: true,
            recipients: vec![
                RcptState::Pending {
                    address: "bob@example.net".into(),
                    last: None,
                },
                RcptState::Done,
            ],
        }
    }

    #[test]
    fn filters_combine() {
        let e = Entry::of(&envelope(), &state(), Status::Deferred);
        assert!(Filter::default().matches(&e, 2_000));
        let f = |f: Filter| f.matches(&e, 2_000);
        assert!(f(Filter {
            sender: Some("alice@".into()),
            domain: Some("EXAMPLE.NET".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            domain: Some("net".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            older_than_secs: Some(999),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            older_than_secs: Some(1_000),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            status: Some(Status::Held),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            ids: vec!["Q2".into()],
            ..Filter::default()
        }));
    }

    #[test]
    fn bounce_fails_what_is_owed_and_keeps_what_is_done() {
        let e = envelope();
        let mut state = state();
        assert!(apply(Action::Bounce, &e, &mut state, 5));
        assert!(!state.held);
        assert_eq!(state.next_attempt_ms, 5);
        assert!(
            matches!(&state.recipients[0], RcptState::Failed { address, .. } if address == "bob@example.net")
        );
        assert_eq!(state.recipients[1], RcptState::Done);
        // A held message is not retried, only released.
        state.held = true;
        state.next_attempt_ms = 100;
        assert!(!apply(Action::Retry, &e, &mut state, 7));
        assert_eq!(state.next_attempt_ms, 100);
        assert!(apply(Action::Release, &e, &mut state, 7));
        assert_eq!((state.held, state.next_attempt_ms), (false, 7));
    }
}
