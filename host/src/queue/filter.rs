//! The after-queue content filter: plugins exporting `queued` (WIT 0.2.0) get each spooled
//! message after the client had its 250 and before any copy is delivered, as Postfix's
//! after-queue `content_filter` does, so a slow filter holds the scheduler's slot, never an SMTP
//! session.
//!
//! The scheduler hands a message here when a loaded plugin exports the hook and the message was
//! not filtered already; [`AfterQueue`] runs at most `queued_concurrency` of them at once (the
//! rest wait with their bytes dropped, read again from the spool when their turn comes) and
//! gives back what the filters decided. A message whose filters changed it is rewritten in the
//! spool ([`Spool::replace`]) with `filtered` set before it is given back, so no copy of the
//! unfiltered version is ever delivered and a restart does not filter it twice. An unchanged one
//! is not rewritten: after a crash it is filtered again, which the WIT tells plugin authors.
//!
//! A deferred message (the plugin said `defer`, or failed under `on_error = "tempfail"`) waits
//! in memory for its next try; it is in the spool all along, so a restart only tries it sooner.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{QueueId, Queued, Spool, SpoolError};
use crate::message::{apply_edits, Edit, Field};
use crate::plugin::bindings::types;
use crate::plugin::{Filtering, PluginRuntime, PluginSession, Stage};

/// How the filter stage runs (from `[plugins]` and the relay's `max_age`).
#[derive(Debug, Clone)]
pub struct FilterSettings {
    pub concurrency: usize,
    /// The first wait of a deferred message; later ones double, up to 16 times it.
    pub retry: Duration,
    /// A message still not filtered this long after it arrived is bounced.
    pub max_age: Duration,
    /// This server's name: its own trace fields (Received, Authentication-Results) stay first
    /// through the filters' edits.
    pub hostname: String,
}

/// What became of one message.
#[derive(Debug)]
pub enum Filtered {
    /// Deliver it now (changed and rewritten in the spool, or unchanged).
    Deliver(Queued),
    /// Nobody gets it: remove it from the spool.
    Discard(QueueId),
    /// Return it to the sender with this reason for every recipient (`550 5.7.1 ...`).
    Bounce(Queued, String),
    /// It stays in the spool and is not this node's to deliver now (unreadable, or the shared
    /// queue's database is down, or another node holds it).
    Left(QueueId),
}

impl Filtered {
    pub fn id(&self) -> &QueueId {
        match self {
            Filtered::Deliver(q) | Filtered::Bounce(q, _) => &q.envelope.id,
            Filtered::Discard(id) | Filtered::Left(id) => id,
        }
    }
}

pub struct AfterQueue {
    runtime: Arc<PluginRuntime>,
    spool: Spool,
    settings: FilterSettings,
    running: JoinSet<Attempt>,
    waiting: VecDeque<Queued>,
    /// Deferred messages, each asleep until its next try.
    later: JoinSet<Queued>,
    /// Tries so far of each deferred message.
    tries: HashMap<QueueId, u32>,
}

/// One filtering of one message.
enum Attempt {
    Done(Filtered),
    Defer(Queued, String),
}

impl AfterQueue {
    pub fn new(runtime: Arc<PluginRuntime>, spool: Spool, settings: FilterSettings) -> AfterQueue {
        AfterQueue {
            runtime,
            spool,
            settings,
            running: JoinSet::new(),
            waiting: VecDeque::new(),
            later: JoinSet::new(),
            tries: HashMap::new(),
        }
    }

    /// Whether the message goes through the filters before delivery: a loaded plugin exports
    /// `queued`, and they have not changed it already.
    pub fn wants(&self, queued: &Queued) -> bool {
        !queued.envelope.filtered && self.runtime.current().has(Stage::Queued)
    }

    /// Whether the stage has work under way or waiting.
    pub fn busy(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty() || !self.later.is_empty()
    }

    /// Whether the stage takes no new messages from the sessions for now: the scheduler stops
    /// reading its inbox, which slows acceptance down to the filters' pace instead of growing
    /// memory.
    pub fn full(&self) -> bool {
        self.running.len() + self.waiting.len() >= 2 * self.settings.concurrency
    }

    pub fn push(&mut self, mut queued: Queued) {
        if self.running.len() < self.settings.concurrency {
            self.start(queued);
        } else {
            // Read again from the spool when its turn comes.
            queued.message = None;
            self.waiting.push_back(queued);
        }
    }

    fn start(&mut self, queued: Queued) {
        let runtime = self.runtime.clone();
        let spool = self.spool.clone();
        let hostname = self.settings.hostname.clone();
        self.running
            .spawn(async move { filter(runtime, spool, &hostname, queued).await });
    }

    /// The next message the filters are done with. Cancel-safe: every step after an await
    /// point is synchronous.
    pub async fn next(&mut self) -> Filtered {
        loop {
            tokio::select! {
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    if let Some(filtered) = self.settle(done) {
                        return filtered;
                    }
                }
                Some(woke) = self.later.join_next(), if !self.later.is_empty() => {
                    if let Ok(queued) = woke {
                        self.push(queued);
                    }
                }
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// A message the filters are done with, if one is ready now (to batch deliveries).
    pub fn ready(&mut self) -> Option<Filtered> {
        while let Some(done) = self.running.try_join_next() {
            if let Some(filtered) = self.settle(done) {
                return Some(filtered);
            }
        }
        None
    }

    /// Frees a filter's slot for the next waiting message, and says what to do with the one
    /// it filtered (None: deferred, or its task failed).
    fn settle(&mut self, done: Result<Attempt, tokio::task::JoinError>) -> Option<Filtered> {
        if let Some(next) = self.waiting.pop_front() {
            self.start(next);
        }
        match done {
            Ok(Attempt::Done(filtered)) => {
                self.tries.remove(filtered.id());
                Some(filtered)
            }
            Ok(Attempt::Defer(queued, why)) => self.defer(queued, &why),
            // A filter task that panicked: its message stays in the spool, for the next start.
            Err(err) => {
                warn!("after-queue filter task failed: {err}");
                None
            }
        }
    }

    /// Puts a deferred message to sleep until its next try, or gives up on it past `max_age`.
    fn defer(&mut self, mut queued: Queued, why: &str) -> Option<Filtered> {
        let id = queued.envelope.id.clone();
        let age = chrono::Utc::now().timestamp() - queued.envelope.received_at;
        if age >= self.settings.max_age.as_secs() as i64 {
            self.tries.remove(&id);
            warn!(queue_id = %id, "after-queue filter still deferring after max_age; bouncing: {why}");
            let reason =
                format!("554 5.4.7 Content filter did not accept the message in time: {why}");
            return Some(Filtered::Bounce(queued, reason));
        }
        let tries = self.tries.entry(id.clone()).or_insert(0);
        *tries += 1;
        let wait = self.settings.retry * (1u32 << (*tries - 1).min(4));
        info!(queue_id = %id, tries = *tries, wait_secs = wait.as_secs(), "after-queue filter deferred the message: {why}");
        queued.message = None;
        self.later.spawn(async move {
            tokio::time::sleep(wait).await;
            queued
        });
        None
    }
}

/// Runs the chain on one message and makes what it decided durable.
async fn filter(
    runtime: Arc<PluginRuntime>,
    spool: Spool,
    hostname: &str,
    mut queued: Queued,
) -> Attempt {
    let id = queued.envelope.id.clone();
    let message = match queued.message.take() {
        Some(message) => message,
        None => {
            let reader = spool.clone();
            let read_id = id.clone();
            match tokio::task::spawn_blocking(move || reader.read(&read_id)).await {
                Ok(Ok((envelope, message))) => {
                    queued.envelope = envelope;
                    Arc::new(message)
                }
                Ok(Err(SpoolError::Gone(_))) => return Attempt::Done(Filtered::Left(id)),
                Ok(Err(err)) => {
                    warn!(queue_id = %id, "cannot read the spooled message to filter it: {err}");
                    return Attempt::Done(Filtered::Left(id));
                }
                Err(_) => return Attempt::Done(Filtered::Left(id)),
            }
        }
    };
    let env = &queued.envelope;
    let wit_envelope = types::Envelope {
        queue_id: env.id.clone(),
        sender: env.sender.clone(),
        recipients: env.recipients.iter().map(|r| r.address.clone()).collect(),
    };
    let started = std::time::Instant::now();
    let outcome = PluginSession::new(runtime)
        .on_queued(&wit_envelope, &message)
        .await;
    let took_ms = started.elapsed().as_millis() as u64;
    let mut changes = outcome.changes;
    match outcome.filtering {
        Filtering::Discard(why) => {
            info!(queue_id = %id, took_ms, "message discarded by the after-queue filter: {why}");
            return Attempt::Done(Filtered::Discard(id));
        }
        Filtering::Bounce(why) => {
            info!(queue_id = %id, took_ms, "message bounced by the after-queue filter: {why}");
            queued.message = Some(message);
            return Attempt::Done(Filtered::Bounce(queued, format!("550 5.7.1 {why}")));
        }
        Filtering::Defer(why) => return Attempt::Defer(queued, why),
        Filtering::Quarantine(why) => {
            changes
                .edits
                .push(Edit::Insert(Field::new("X-Postern-Quarantine", &why)));
            queued.envelope.quarantine = Some(why);
        }
        Filtering::Deliver => {}
    }
    if changes.is_empty() {
        info!(queue_id = %id, took_ms, "message passed the after-queue filter");
        queued.message = Some(message);
        return Attempt::Done(Filtered::Deliver(queued));
    }
    let envelope = &mut queued.envelope;
    if let Some(sender) = changes.new_sender.take() {
        if sender.is_empty() || crate::address::Address::parse(&sender).is_some() {
            envelope.sender = sender;
        } else {
            warn!(queue_id = %id, "after-queue filter set an invalid sender {sender:?}; kept the old one");
        }
    }
    envelope.recipients.retain(|r| {
        !changes
            .remove_recipients
            .iter()
            .any(|x| x.eq_ignore_ascii_case(&r.address))
    });
    if envelope.recipients.is_empty() {
        info!(queue_id = %id, took_ms, "after-queue filter removed every recipient; discarded");
        return Attempt::Done(Filtered::Discard(id));
    }
    let bytes = apply_edits(&message, &changes.edits, trace_fields(&message, hostname));
    envelope.message_len = bytes.len() as u64;
    envelope.filtered = true;
    let (writer, changed, bytes) = (spool.clone(), envelope.clone(), Arc::new(bytes));
    let written = bytes.clone();
    match tokio::task::spawn_blocking(move || writer.replace(&changed, &written)).await {
        Ok(Ok(())) => {
            info!(queue_id = %id, took_ms, "message changed by the after-queue filter");
            queued.message = Some(bytes);
            Attempt::Done(Filtered::Deliver(queued))
        }
        Ok(Err(SpoolError::Gone(_))) => Attempt::Done(Filtered::Left(id)),
        // Not durable, so not delivered: filtered again later.
        Ok(Err(err)) => {
            queued.envelope.filtered = false;
            Attempt::Defer(queued, format!("cannot rewrite the spooled message: {err}"))
        }
        Err(_) => Attempt::Done(Filtered::Left(id)),
    }
}

/// How many leading fields are this server's own trace fields: its Received field, and the
/// Authentication-Results it added (RFC 8601 §5), which the filters' edits may not move or
/// change.
fn trace_fields(message: &[u8], hostname: &str) -> usize {
    let fields = crate::message::parse_fields(message);
    1 + fields
        .iter()
        .skip(1)
        .take_while(|f| {
            f.name.eq_ignore_ascii_case("Authentication-Results")
                && String::from_utf8_lossy(&f.raw)
                    .split_once(':')
                    .map(|(_, v)| v.trim_start())
                    .is_some_and(|v| {
                        v.split([';', ' ', '\r', '\n'])
                            .next()
                            .is_some_and(|id| id.eq_ignore_ascii_case(hostname))
                    })
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_trace_fields_are_counted() {
        let message = b"Received: from x by mx.example.test\r\nAuthentication-Results: mx.example.test; spf=pass\r\nAuthentication-Results: other.test; dkim=pass\r\nSubject: hi\r\n\r\nbody\r\n";
        assert_eq!(trace_fields(message, "mx.example.test"), 2);
        assert_eq!(trace_fields(message, "elsewhere.test"), 1);
        assert_eq!(trace_fields(b"Received: x\r\n\r\n", "mx.example.test"), 1);
    }
}
