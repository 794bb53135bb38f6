//! Per-message delivery state, kept beside the spool (`spool/relay/<queue id>`): which recipients
//! are done, which wait, when the next attempt is due. The spooled message itself never changes;
//! this small file is replaced whole (write, flush, rename, flush the directory) after an attempt
//! that leaves work to do, so a restart resumes where the last attempt ended instead of
//! delivering again to recipients that already have the message.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// Unix milliseconds of the next attempt.
    pub next_attempt_ms: i64,
    /// The one delay notice was sent.
    pub delay_notified: bool,
    /// Held by the operator (`postern queue hold`): no attempt until released.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// One per envelope recipient, in envelope order.
    pub recipients: Vec<RcptState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RcptState {
    /// Still to be delivered to `address` (the envelope recipient, or where a plugin sent it).
    Pending {
        address: String,
        /// The last temporary failure, for the delay notice and the final bounce.
        last: Option<Attempt>,
    },
    /// A local recipient whose delivery failed for now (the store refused, a deliver hook
    /// deferred): retried through local delivery on the relay's schedule, under the same
    /// `max_age` and delay notice as remote ones.
    Local { last: Option<Attempt> },
    /// Failed for good; the bounce is owed.
    Failed { address: String, attempt: Attempt },
    /// Delivered (or relayed to a server that cannot report further) to a recipient whose
    /// sender asked `NOTIFY=SUCCESS` (RFC 3461 §4.1): the success report is owed.
    Succeeded {
        address: String,
        attempt: Attempt,
        /// Relayed, not delivered: the next server does not offer DSN (§6.2.1 `relayed`).
        relayed: bool,
    },
    /// Delivered, discarded, or failed with the bounce sent: nothing more to do.
    Done,
}

/// What one attempt for one recipient came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub status: String,
    pub remote_mta: Option<String>,
    pub diagnostic: String,
}

impl RcptState {
    /// A recipient delivered to its local mailbox: done, or owed a success report when its
    /// sender asked for one (`NOTIFY=SUCCESS`).
    pub fn delivered_locally(rcpt: &crate::queue::Recipient) -> RcptState {
        if !rcpt.notify().success {
            return RcptState::Done;
        }
        RcptState::Succeeded {
            address: rcpt.address.clone(),
            attempt: Attempt {
                status: "2.0.0".into(),
                remote_mta: None,
                diagnostic: "delivered to the mailbox".into(),
            },
            relayed: false,
        }
    }
}

impl DeliveryState {
    /// The first state of a message after local delivery decided each recipient.
    pub fn from_dispositions(
        envelope: &crate::queue::Envelope,
        dispositions: &[crate::relay::Disposition],
    ) -> DeliveryState {
        use crate::relay::Disposition;
        DeliveryState {
            attempts: 0,
            next_attempt_ms: chrono::Utc::now().timestamp_millis(),
            delay_notified: false,
            held: false,
            recipients: dispositions
                .iter()
                .zip(&envelope.recipients)
                .map(|(d, rcpt)| match d {
                    Disposition::Done => RcptState::delivered_locally(rcpt),
                    Disposition::Remote(address) => RcptState::Pending {
                        address: address.clone(),
                        last: None,
                    },
                    Disposition::Deferred(reason) => RcptState::Local {
                        last: Some(Attempt {
                            status: "4.3.0".into(),
                            remote_mta: None,
                            diagnostic: reason.clone(),
                        }),
                    },
                    // Failed local recipients report under their envelope address.
                    Disposition::Failed(reason) => RcptState::Failed {
                        address: rcpt.address.clone(),
                        attempt: Attempt {
                            status: failure_status(reason),
                            remote_mta: None,
                            diagnostic: reason.clone(),
                        },
                    },
                })
                .collect(),
        }
    }

    /// Indexes of the local recipients waiting for another try.
    pub fn local(&self) -> Vec<usize> {
        self.recipients
            .iter()
            .enumerate()
            .filter_map(|(i, r)| matches!(r, RcptState::Local { .. }).then_some(i))
            .collect()
    }

    /// A failure or success report is still owed for some recipient.
    pub fn owes_notice(&self) -> bool {
        self.recipients
            .iter()
            .any(|r| matches!(r, RcptState::Failed { .. } | RcptState::Succeeded { .. }))
    }

    pub fn is_finished(&self) -> bool {
        self.recipients.iter().all(|r| matches!(r, RcptState::Done))
    }

    /// (index, address) of the recipients still to deliver.
    pub fn pending(&self) -> Vec<(usize, String)> {
        self.recipients
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                RcptState::Pending { address, .. } => Some((i, address.clone())),
                _ => None,
            })
            .collect()
    }
}

/// Where delivery states are kept: files beside the spool, or the shared queue's rows.
#[derive(Clone)]
pub enum StateDir {
    Dir(PathBuf),
    /// `queue.state` of the rows this node holds (`store::postgres::queue`).
    Database(std::sync::Arc<crate::store::postgres::PgStore>),
}

impl StateDir {
    pub fn open(dir: &Path) -> io::Result<StateDir> {
        crate::durable::create_dir_all(dir)?;
        Ok(StateDir::Dir(dir.to_path_buf()))
    }

    pub fn load(&self, id: &str) -> io::Result<Option<DeliveryState>> {
        let bytes = match self {
            StateDir::Dir(dir) => match fs::read(dir.join(id)) {
                Ok(bytes) => bytes,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(err),
            },
            StateDir::Database(store) => match store.queue_state(id).map_err(io::Error::other)? {
                Some(json) => json.into_bytes(),
                None => return Ok(None),
            },
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Replaces the state durably (committed, in the database).
    pub fn save(&self, id: &str, state: &DeliveryState) -> io::Result<()> {
        let bytes = serde_json::to_vec(state).map_err(io::Error::other)?;
        match self {
            StateDir::Dir(dir) => {
                let tmp = dir.join(format!(".{id}.tmp"));
                durable::write_and_rename(&tmp, &dir.join(id), &bytes)?;
                durable::sync_dir(dir)
            }
            StateDir::Database(store) => {
                let json = String::from_utf8(bytes).map_err(io::Error::other)?;
                match store.queue_save_state(id, &json) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "no longer this node's (another node took it over)",
                    )),
                    Err(err) => Err(io::Error::other(err)),
                }
            }
        }
    }

    pub fn remove(&self, id: &str) -> io::Result<()> {
        match self {
            StateDir::Dir(dir) => match fs::remove_file(dir.join(id)) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(err),
            },
            // The state goes with its row, which the spool removes.
            StateDir::Database(_) => Ok(()),
        }
    }
}

/// The RFC 3463 status of a local failure, from its reply (`550 5.7.1 ...`); 5.0.0 when the
/// text carries none.
fn failure_status(reason: &str) -> String {
    let mut words = reason.split_whitespace();
    let code = words.next().unwrap_or_default();
    let status = words.next().unwrap_or_default();
    let parts: Vec<&str> = status.split('.').collect();
    let well_formed = parts.len() == 3
        && parts[0] == "5"
        && code.starts_with('5')
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    if well_formed {
        status.to_string()
    } else {
        "5.0.0".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_durably() {
        let dir = tempfile::tempdir().unwrap();
        let states = StateDir::open(dir.path()).unwrap();
        assert_eq!(states.load("Q").unwrap(), None);
        let state = DeliveryState {
            attempts: 2,
            next_attempt_ms: 5,
            delay_notified: false,
            held: false,
            recipients: vec![
                RcptState::Done,
                RcptState::Pending {
                    address: "b@y.test".into(),
                    last: Some(Attempt {
                        status: "4.2.0".into(),
                        remote_mta: Some("mx.y.test".into()),
                        diagnostic: "451 4.2.0 later".into(),
                    }),
                },
            ],
        };
        states.save("Q", &state).unwrap();
        assert_eq!(states.load("Q").unwrap(), Some(state.clone()));
        assert_eq!(state.pending(), vec![(1, "b@y.test".to_string())]);
        assert!(!state.is_finished());
        states.remove("Q").unwrap();
        states.remove("Q").unwrap();
        assert_eq!(states.load("Q").unwrap(), None);
    }

    #[test]
    fn a_failure_reports_the_status_of_its_reply() {
        assert_eq!(failure_status("550 5.7.1 refused"), "5.7.1");
        assert_eq!(failure_status("554 5.4.7 too late"), "5.4.7");
        assert_eq!(failure_status("550 refused"), "5.0.0");
        assert_eq!(failure_status("550 4.7.1 mismatch"), "5.0.0");
        assert_eq!(failure_status(""), "5.0.0");
    }
}
