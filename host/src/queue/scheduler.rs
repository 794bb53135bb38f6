//! The scheduler: takes spooled messages and delivers them.
//!
//! Local recipients go to the mail store in batches (one flush for many messages). A message with
//! only local recipients leaves the spool when they are all served; one with remote recipients (or
//! local ones that failed for good and need a bounce) is handed to the outbound relay, which takes
//! it from there. Temporary store failures are retried with a growing delay. On start, every
//! message left in the spool goes through here again; store delivery is idempotent, so a crash
//! between delivery and removal from the spool never duplicates a message.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::envelope::Route;
use super::{Queued, Spool};
use crate::address::Address;
use crate::auth::UserDirectory;
use crate::plugin::bindings::types;
use crate::plugin::{PluginRuntime, PluginSession, Routing, Stage};
use crate::relay::{Disposition, RelayJob};
use crate::store::{Delivery, MailStore};

/// Messages delivered in one store batch.
const BATCH: usize = 64;
/// Retry delays for temporary local delivery failures.
const RETRY_DELAYS: [u64; 5] = [5, 30, 120, 600, 1800];

pub struct Scheduler {
    spool: Spool,
    store: Arc<dyn MailStore>,
    inbox: mpsc::Receiver<Queued>,
    /// For re-queueing retries into our own inbox.
    requeue: mpsc::Sender<Queued>,
    plugins: Option<Arc<PluginRuntime>>,
    users: Arc<UserDirectory>,
    relay: Option<mpsc::Sender<RelayJob>>,
}

/// What happened to one message in a batch.
enum Outcome {
    Done,
    /// Some recipients are remote or failed: the outbound relay takes the message over.
    Relay(Vec<Disposition>),
    TemporaryFailure(String),
}

impl Scheduler {
    pub fn new(
        spool: Spool,
        store: Arc<dyn MailStore>,
        inbox: mpsc::Receiver<Queued>,
        requeue: mpsc::Sender<Queued>,
        users: Arc<UserDirectory>,
    ) -> Scheduler {
        Scheduler {
            spool,
            store,
            inbox,
            requeue,
            plugins: None,
            users,
            relay: None,
        }
    }

    /// Hands messages with remote recipients (and bounces owed) to the outbound relay.
    pub fn with_relay(mut self, relay: mpsc::Sender<RelayJob>) -> Scheduler {
        self.relay = Some(relay);
        self
    }

    /// Lets deliver-hook plugins route each recipient.
    pub fn with_plugins(mut self, plugins: Arc<PluginRuntime>) -> Scheduler {
        self.plugins = Some(plugins);
        self
    }

    /// Asks the deliver hook where each local recipient's copy goes (Default without plugins).
    async fn route(&self, batch: &[Queued]) -> Vec<Vec<Routing>> {
        let mut routes: Vec<Vec<Routing>> = batch
            .iter()
            .map(|q| vec![Routing::Default; q.envelope.recipients.len()])
            .collect();
        let Some(runtime) = self
            .plugins
            .as_ref()
            .filter(|r| r.current().has(Stage::Deliver))
        else {
            return routes;
        };
        let mut session = PluginSession::new(runtime.clone());
        for (m, queued) in batch.iter().enumerate() {
            let Some(message) = &queued.message else {
                continue;
            };
            let env = &queued.envelope;
            let wit_env = types::Envelope {
                queue_id: env.id.clone(),
                sender: env.sender.clone(),
                recipients: env.recipients.iter().map(|r| r.address.clone()).collect(),
            };
            for (r, rcpt) in env.recipients.iter().enumerate() {
                // Remote recipients are routed by the outbound relay.
                let Route::Local { mailbox } = &rcpt.route else {
                    continue;
                };
                let target = types::DeliveryTarget {
                    address: rcpt.address.clone(),
                    mailbox: Some(mailbox.clone()),
                };
                routes[m][r] = session.on_deliver(&wit_env, &target, message).await;
            }
        }
        routes
    }

    /// Delivers what an earlier run left in the spool, then serves new messages until every
    /// sender is gone.
    pub async fn run(mut self, recovered: Vec<super::QueueId>) {
        if !recovered.is_empty() {
            info!(count = recovered.len(), "recovering spooled messages");
        }
        for ids in recovered.chunks(BATCH) {
            let spool = self.spool.clone();
            let ids = ids.to_vec();
            let batch = tokio::task::spawn_blocking(move || {
                ids.iter()
                    .filter_map(|id| match spool.read(id) {
                        Ok((envelope, message)) => Some(Queued {
                            envelope,
                            message: Some(Arc::new(message)),
                            retry: true,
                            attempts: 0,
                        }),
                        Err(err) => {
                            error!(queue_id = %id, "cannot read spooled message: {err}");
                            None
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            self.deliver_batch(batch).await;
        }
        while let Some(first) = self.inbox.recv().await {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match self.inbox.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.deliver_batch(batch).await;
        }
    }

    async fn deliver_batch(&mut self, batch: Vec<Queued>) {
        if batch.is_empty() {
            return;
        }
        let mut batch = batch;
        if batch.iter().any(|q| q.message.is_none()) {
            let spool = self.spool.clone();
            batch = tokio::task::spawn_blocking(move || {
                load_from_spool(&spool, &mut batch);
                batch
            })
            .await
            .unwrap_or_default();
        }
        let routes = self.route(&batch).await;
        let store = self.store.clone();
        let spool = self.spool.clone();
        let users = self.users.clone();
        let result = tokio::task::spawn_blocking(move || {
            let outcomes = deliver_locally(store.as_ref(), &users, &batch, &routes);
            let done: Vec<String> = batch
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| matches!(o, Outcome::Done))
                .map(|(q, _)| q.envelope.id.clone())
                .collect();
            if let Err(err) = spool.remove(&done) {
                // Delivery is idempotent: they are delivered again (once) after a restart.
                warn!("cannot remove delivered messages from the spool: {err}");
            }
            (batch, outcomes)
        })
        .await;
        let Ok((batch, outcomes)) = result else {
            error!("local delivery task failed");
            return;
        };
        for (queued, outcome) in batch.into_iter().zip(outcomes) {
            let id = queued.envelope.id.clone();
            match outcome {
                Outcome::Done => debug!(queue_id = %id, "delivered"),
                Outcome::Relay(dispositions) => match &self.relay {
                    Some(relay) => {
                        let job = RelayJob {
                            envelope: queued.envelope,
                            dispositions,
                        };
                        if relay.send(job).await.is_err() {
                            warn!(queue_id = %id, "outbound relay stopped; the message stays spooled");
                        }
                    }
                    None => info!(queue_id = %id, "no outbound relay; the message stays spooled"),
                },
                Outcome::TemporaryFailure(reason) => {
                    warn!(queue_id = %id, "local delivery deferred: {reason}");
                    self.retry_later(queued);
                }
            }
        }
    }

    fn retry_later(&self, mut queued: Queued) {
        let delay = RETRY_DELAYS[(queued.attempts as usize).min(RETRY_DELAYS.len() - 1)];
        queued.attempts += 1;
        queued.retry = true;
        let requeue = self.requeue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(delay)).await;
            let _ = requeue.send(queued).await;
        });
    }
}

/// Reads the bytes of messages that were handed over without them.
fn load_from_spool(spool: &Spool, batch: &mut [Queued]) {
    for queued in batch.iter_mut().filter(|q| q.message.is_none()) {
        match spool.read(&queued.envelope.id) {
            Ok((_, message)) => queued.message = Some(Arc::new(message)),
            Err(err) => {
                error!(queue_id = %queued.envelope.id, "cannot read spooled message: {err}")
            }
        }
    }
}

fn deliver_locally(
    store: &dyn MailStore,
    users: &UserDirectory,
    batch: &[Queued],
    routes: &[Vec<Routing>],
) -> Vec<Outcome> {
    let mut prepends = Vec::new();
    let mut ids = Vec::new();
    // (message, recipient, mailbox, folder) of each store delivery.
    let mut owners: Vec<(usize, usize, String, String)> = Vec::new();
    let mut temporary: Vec<Option<String>> = vec![None; batch.len()];
    let mut dispositions: Vec<Vec<Disposition>> = batch
        .iter()
        .map(|q| vec![Disposition::Done; q.envelope.recipients.len()])
        .collect();
    for (m, queued) in batch.iter().enumerate() {
        let env = &queued.envelope;
        if queued.message.is_none() {
            temporary[m] = Some("message unreadable in the spool".into());
            continue;
        }
        for (r, rcpt) in env.recipients.iter().enumerate() {
            let Route::Local { mailbox } = &rcpt.route else {
                dispositions[m][r] = Disposition::Remote(rcpt.address.clone());
                continue;
            };
            let default_folder = if env.quarantine.is_some() {
                "Quarantine"
            } else {
                "INBOX"
            };
            let (mailbox, folder) = match &routes[m][r] {
                Routing::Default => (mailbox.clone(), default_folder.to_string()),
                // Quarantine wins over a plugin's folder choice.
                Routing::Folder(_) if env.quarantine.is_some() => {
                    (mailbox.clone(), default_folder.to_string())
                }
                Routing::Folder(folder) if crate::store::valid_folder_name(folder) => {
                    (mailbox.clone(), folder.clone())
                }
                Routing::Folder(folder) => {
                    warn!(queue_id = %env.id, "plugin chose an invalid folder {folder:?}; delivering to the inbox");
                    (mailbox.clone(), default_folder.to_string())
                }
                Routing::Forward(address) => {
                    match Address::parse(address).map(|a| (users.resolve(&a), a)) {
                        Some((Some(target), _)) => (target, default_folder.to_string()),
                        Some((None, parsed)) => {
                            info!(queue_id = %env.id, "{} forwarded to {address} by plugin", rcpt.address);
                            dispositions[m][r] = Disposition::Remote(parsed.to_string());
                            continue;
                        }
                        None => {
                            dispositions[m][r] = Disposition::Failed(format!(
                                "550 5.1.3 Plugin forwarded to an invalid address {address:?}"
                            ));
                            continue;
                        }
                    }
                }
                Routing::Discard => {
                    info!(queue_id = %env.id, "copy for {} discarded by plugin", rcpt.address);
                    continue;
                }
                Routing::Defer(reason) => {
                    temporary[m] = Some(format!("{}: deferred by plugin: {reason}", rcpt.address));
                    continue;
                }
                Routing::Fail(reason) => {
                    warn!(queue_id = %env.id, "copy for {} failed by plugin: {reason}", rcpt.address);
                    dispositions[m][r] = Disposition::Failed(format!("550 5.7.1 {reason}"));
                    continue;
                }
            };
            prepends.push(
                format!(
                    "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
                    env.sender, rcpt.address
                )
                .into_bytes(),
            );
            ids.push(format!("{}_{r}", env.id));
            owners.push((m, r, mailbox, folder));
        }
    }
    let deliveries: Vec<Delivery<'_>> = owners
        .iter()
        .enumerate()
        .map(|(i, (m, _, mailbox, folder))| Delivery {
            mailbox,
            folder,
            delivery_id: &ids[i],
            retry: batch[*m].retry,
            received_at: batch[*m].envelope.received_at,
            prepend: &prepends[i],
            message: batch[*m]
                .message
                .as_deref()
                .map(Vec::as_slice)
                .unwrap_or_default(),
        })
        .collect();
    let results = store.deliver(&deliveries);
    for ((m, r, mailbox, _), result) in owners.iter().zip(results) {
        if let Err(err) = result {
            if err.is_temporary() {
                temporary[*m] = Some(format!("{mailbox}: {err}"));
            } else {
                error!(queue_id = %batch[*m].envelope.id, "cannot deliver to {mailbox}: {err}");
                dispositions[*m][*r] = Disposition::Failed(format!("550 5.2.0 {err}"));
            }
        }
    }
    dispositions
        .into_iter()
        .zip(temporary)
        .map(|(dispositions, temporary)| match temporary {
            Some(reason) => Outcome::TemporaryFailure(reason),
            None if dispositions.iter().all(|d| *d == Disposition::Done) => Outcome::Done,
            None => Outcome::Relay(dispositions),
        })
        .collect()
}
