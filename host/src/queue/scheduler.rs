//! The scheduler: takes spooled messages and delivers them.
//!
//! Local recipients go to the mail store in batches (one flush for many messages), through
//! [`LocalDelivery`]. A message whose local recipients are all served, and that has no other,
//! leaves the spool at once. Any other message gets a per-recipient delivery state beside the
//! spool (`spool/relay/<id>`, see `relay::state`) written durably *before* anything else happens
//! to it, recording which local recipients already have their copy; the outbound relay then owns
//! it: remote recipients, bounces, and local recipients whose delivery failed for now (retried on
//! the relay's schedule through the same [`LocalDelivery`], with the same `max_age`, delay notice
//! and bounce as remote ones, never holding the other recipients back).
//!
//! On start, a spooled message that has a delivery state goes to the relay as it is (no
//! recipient recorded as served is served again, whatever its mailbox did meanwhile: a user may
//! have deleted the copy, and the store's own duplicate check would not know it); one without
//! goes through local delivery again, where the store's duplicate check covers the moment
//! between storing a copy and recording it.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::envelope::Route;
use super::filter::{AfterQueue, Filtered};
use super::{Queued, Spool};
use crate::address::Address;
use crate::auth::UserDirectory;
use crate::plugin::bindings::types;
use crate::plugin::{PluginRuntime, PluginSession, Routing, Stage};
use crate::relay::state::{DeliveryState, StateDir};
use crate::relay::{Disposition, RelayJob};
use crate::store::{Delivery, MailStore};

/// Messages delivered in one store batch.
const BATCH: usize = 64;

/// Local delivery: the deliver hook, then the store. Shared by the scheduler (first attempts)
/// and the relay (retries of local recipients that failed for now).
pub struct LocalDelivery {
    store: Arc<dyn MailStore>,
    users: Arc<UserDirectory>,
    plugins: Option<Arc<PluginRuntime>>,
}

impl LocalDelivery {
    pub fn new(
        store: Arc<dyn MailStore>,
        users: Arc<UserDirectory>,
        plugins: Option<Arc<PluginRuntime>>,
    ) -> LocalDelivery {
        LocalDelivery {
            store,
            users,
            plugins,
        }
    }

    /// The plugins, when configured (the relay's `outbound` hook runs them too).
    pub fn plugins(&self) -> Option<&Arc<PluginRuntime>> {
        self.plugins.as_ref()
    }

    /// The user directory local addresses resolve through.
    pub fn users(&self) -> &Arc<UserDirectory> {
        &self.users
    }

    /// Delivers the local recipients of each message (those `only` marks, when given) and says
    /// what became of every recipient. Messages must have their bytes.
    pub async fn deliver(
        &self,
        batch: Vec<Queued>,
        only: Option<Vec<Vec<bool>>>,
    ) -> (Vec<Queued>, Vec<Vec<Disposition>>) {
        let routes = self.route(&batch, only.as_deref()).await;
        let store = self.store.clone();
        let users = self.users.clone();
        let result = tokio::task::spawn_blocking(move || {
            let dispositions = deliver_locally(store.as_ref(), &users, &batch, &routes);
            (batch, dispositions)
        })
        .await;
        match result {
            Ok(done) => done,
            Err(_) => {
                error!("local delivery task failed");
                (Vec::new(), Vec::new())
            }
        }
    }

    /// Asks the deliver hook where each local recipient's copy goes (Default without plugins);
    /// None for recipients not to deliver now.
    async fn route(
        &self,
        batch: &[Queued],
        only: Option<&[Vec<bool>]>,
    ) -> Vec<Vec<Option<Routing>>> {
        let wanted = |m: usize, r: usize| only.is_none_or(|only| only[m][r]);
        let mut routes: Vec<Vec<Option<Routing>>> = batch
            .iter()
            .enumerate()
            .map(|(m, q)| {
                (0..q.envelope.recipients.len())
                    .map(|r| wanted(m, r).then_some(Routing::Default))
                    .collect()
            })
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
                if !wanted(m, r) {
                    continue;
                }
                let target = types::DeliveryTarget {
                    address: rcpt.address.clone(),
                    mailbox: Some(mailbox.clone()),
                };
                routes[m][r] = Some(session.on_deliver(&wit_env, &target, message).await);
            }
        }
        routes
    }
}

pub struct Scheduler {
    spool: Spool,
    /// The after-queue filters, when plugins are configured (whether any exports `queued` is
    /// asked per message, since plugins reload).
    filter: Option<AfterQueue>,
    local: Arc<LocalDelivery>,
    states: StateDir,
    inbox: mpsc::Receiver<Queued>,
    relay: Option<mpsc::Sender<RelayJob>>,
    /// Turns true when the server stops: what has arrived is delivered, then the loop ends.
    drain: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Scheduler {
    pub fn new(
        spool: Spool,
        local: Arc<LocalDelivery>,
        states: StateDir,
        inbox: mpsc::Receiver<Queued>,
    ) -> Scheduler {
        Scheduler {
            spool,
            filter: None,
            local,
            states,
            inbox,
            relay: None,
            drain: None,
        }
    }

    /// Hands messages with remote recipients (and bounces owed) to the outbound relay.
    pub fn with_relay(mut self, relay: mpsc::Sender<RelayJob>) -> Scheduler {
        self.relay = Some(relay);
        self
    }

    /// Runs plugins' after-queue filters before delivery.
    pub fn with_filter(mut self, filter: AfterQueue) -> Scheduler {
        self.filter = Some(filter);
        self
    }

    pub fn with_drain(mut self, drain: tokio::sync::watch::Receiver<bool>) -> Scheduler {
        self.drain = Some(drain);
        self
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
            let batch = tokio::task::spawn_blocking(move || super::recovered(&spool, &ids))
                .await
                .unwrap_or_default();
            self.deliver_batch(batch).await;
        }
        let mut drain = self.drain.take();
        loop {
            let filter_full = self.filter.as_ref().is_some_and(AfterQueue::full);
            let filter_busy = self.filter.as_ref().is_some_and(AfterQueue::busy);
            let first = tokio::select! {
                // A full filter stage stops the intake: sessions wait for room in the inbox.
                first = self.inbox.recv(), if !filter_full => first,
                filtered = async { self.filter.as_mut().expect("busy").next().await }, if filter_busy => {
                    self.after_filter(filtered).await;
                    continue;
                }
                _ = async { drain.as_mut()?.wait_for(|d| *d).await.ok().map(|_| ()) }, if drain.is_some() => {
                    // The sessions are over: deliver what they queued, then stop.
                    drain = None;
                    self.inbox.close();
                    continue;
                }
            };
            let Some(first) = first else {
                // Messages still being filtered stay in the spool for the next start.
                return;
            };
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
        let spool = self.spool.clone();
        let states = self.states.clone();
        // Recovered messages that have a delivery state belong to the relay as they are.
        let (batch, owned) = tokio::task::spawn_blocking(move || {
            let mut batch = batch;
            let mut owned = Vec::new();
            let mut fresh = Vec::new();
            for queued in batch.drain(..) {
                if queued.retry {
                    match states.load(&queued.envelope.id) {
                        Ok(Some(mut state))
                            if state.recipients.len() == queued.envelope.recipients.len() =>
                        {
                            // After a restart, what is owed is tried again at once.
                            state.next_attempt_ms = chrono::Utc::now().timestamp_millis();
                            owned.push(RelayJob {
                                envelope: queued.envelope,
                                state,
                                locals_just_tried: false,
                            });
                            continue;
                        }
                        Ok(_) => {}
                        Err(err) if spool.database().is_some() => {
                            // The database is down: what was delivered is not known yet. Read
                            // again later, rather than send anyone a second copy.
                            warn!(queue_id = %queued.envelope.id, "delivery state unreadable; trying again later: {err}");
                            spool.defer(&queued.envelope.id);
                            continue;
                        }
                        Err(err) => {
                            warn!(queue_id = %queued.envelope.id, "delivery state unreadable, delivering again: {err}")
                        }
                    }
                }
                fresh.push(queued);
            }
            load_from_spool(&spool, &mut fresh);
            (fresh, owned)
        })
        .await
        .unwrap_or_default();
        for job in owned {
            self.hand_to_relay(job).await;
        }
        let (unreadable, batch): (Vec<Queued>, Vec<Queued>) =
            batch.into_iter().partition(|q| q.message.is_none());
        for queued in unreadable {
            // Left in the spool: the shared queue's lease keeper reads it again soon, a file
            // spool at the next start.
            self.spool.defer(&queued.envelope.id);
            error!(queue_id = %queued.envelope.id, "message unreadable in the spool; left for later");
        }
        let batch = match self.filter.as_mut() {
            Some(filter) => {
                let (to_filter, now): (Vec<Queued>, Vec<Queued>) =
                    batch.into_iter().partition(|q| filter.wants(q));
                for queued in to_filter {
                    filter.push(queued);
                }
                now
            }
            None => batch,
        };
        self.deliver_now(batch).await;
    }

    /// Acts on what the after-queue filters decided: this message, and the others that are
    /// ready (those to deliver in one batch).
    async fn after_filter(&mut self, first: Filtered) {
        let mut deliver = Vec::new();
        let mut next = Some(first);
        while let Some(filtered) = next.take() {
            match filtered {
                Filtered::Deliver(queued) => deliver.push(queued),
                Filtered::Discard(id) => {
                    let spool = self.spool.clone();
                    let ids = vec![id.clone()];
                    let removed = tokio::task::spawn_blocking(move || spool.remove(&ids)).await;
                    if !matches!(removed, Ok(Ok(()))) {
                        warn!(queue_id = %id, "cannot remove a discarded message from the spool; it is filtered again at the next start");
                    }
                }
                Filtered::Bounce(queued, reason) => {
                    // Every recipient failed: the relay sends the sender one RFC 3464 report
                    // (none to the null sender) and removes the message, as for any final
                    // failure.
                    let failed =
                        vec![Disposition::Failed(reason); queued.envelope.recipients.len()];
                    let state = DeliveryState::from_dispositions(&queued.envelope, &failed);
                    self.hand_to_relay(RelayJob {
                        envelope: queued.envelope,
                        state,
                        locals_just_tried: true,
                    })
                    .await;
                }
                Filtered::Left(id) => self.spool.defer(&id),
            }
            if deliver.len() < BATCH {
                next = self.filter.as_mut().and_then(AfterQueue::ready);
            }
        }
        self.deliver_now(deliver).await;
    }

    /// Delivers messages that need no (more) filtering: local copies now, the rest to the relay.
    async fn deliver_now(&mut self, batch: Vec<Queued>) {
        if batch.is_empty() {
            return;
        }
        let (batch, dispositions) = self.local.deliver(batch, None).await;
        let spool = self.spool.clone();
        let states = self.states.clone();
        let jobs = tokio::task::spawn_blocking(move || {
            let mut done = Vec::new();
            let mut jobs = Vec::new();
            for (queued, dispositions) in batch.into_iter().zip(dispositions) {
                let state = DeliveryState::from_dispositions(&queued.envelope, &dispositions);
                // Done, unless a success report is owed (the relay sends it, as any notice).
                if state.is_finished() {
                    done.push(queued.envelope.id);
                    continue;
                }
                // Recorded before anything else when a local copy was made (or discarded): it is
                // never made again. With none, there is nothing a restart could repeat, and the
                // relay's first save is the first record (no extra flushes on the relay path).
                let local_done = queued
                    .envelope
                    .recipients
                    .iter()
                    .zip(&dispositions)
                    .any(|(r, d)| matches!(r.route, Route::Local { .. }) && *d == Disposition::Done);
                if local_done {
                    if let Err(err) = states.save(&queued.envelope.id, &state) {
                        error!(queue_id = %queued.envelope.id, "cannot record local deliveries: {err}");
                    }
                }
                jobs.push(RelayJob {
                    envelope: queued.envelope,
                    state,
                    locals_just_tried: true,
                });
            }
            for id in &done {
                debug!(queue_id = %id, "delivered");
            }
            let unremoved = match spool.remove(&done) {
                Ok(()) => Vec::new(),
                Err(err) => {
                    warn!("cannot remove delivered messages from the spool: {err}; trying again");
                    done
                }
            };
            (jobs, unremoved)
        })
        .await
        .unwrap_or_default();
        let (jobs, unremoved) = jobs;
        if !unremoved.is_empty() {
            // The spool may be a database that is down: removal is tried until it works (were
            // the process to stop first, delivery is idempotent: they are delivered again,
            // once, after a restart, and then removed).
            let spool = self.spool.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    let (spool, ids) = (spool.clone(), unremoved.clone());
                    if let Ok(Ok(())) =
                        tokio::task::spawn_blocking(move || spool.remove(&ids)).await
                    {
                        return;
                    }
                }
            });
        }
        for job in jobs {
            self.hand_to_relay(job).await;
        }
    }

    async fn hand_to_relay(&self, job: RelayJob) {
        let id = job.envelope.id.clone();
        match &self.relay {
            Some(relay) => {
                if relay.send(job).await.is_err() {
                    warn!(queue_id = %id, "outbound relay stopped; the message stays spooled");
                }
            }
            None => info!(queue_id = %id, "no outbound relay; the message stays spooled"),
        }
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

/// What became of each recipient: `Done` (stored, discarded, or not asked for), `Remote`,
/// `Failed` or `Deferred`.
/// Quota checks for one batch: each mailbox's usage is read once, and what the batch adds is
/// counted on top, so a batch cannot take a mailbox past its quota either.
#[derive(Default)]
struct QuotaCheck {
    used: std::collections::HashMap<String, crate::store::Usage>,
}

impl QuotaCheck {
    fn allows(
        &mut self,
        store: &dyn MailStore,
        users: &UserDirectory,
        mailbox: &str,
        size: u64,
    ) -> bool {
        let quota = users.quota(mailbox);
        if !quota.is_limited() {
            return true;
        }
        let used = match self.used.get(mailbox) {
            Some(used) => *used,
            None => match store.usage(mailbox) {
                Ok(used) => used,
                // An unreadable mailbox is the delivery's problem, not the quota's.
                Err(_) => return true,
            },
        };
        let allowed = quota.allows(used, size, 1);
        if allowed {
            self.used.insert(
                mailbox.to_string(),
                crate::store::Usage {
                    bytes: used.bytes + size,
                    messages: used.messages + 1,
                },
            );
        }
        allowed
    }
}

fn deliver_locally(
    store: &dyn MailStore,
    users: &UserDirectory,
    batch: &[Queued],
    routes: &[Vec<Option<Routing>>],
) -> Vec<Vec<Disposition>> {
    let mut prepends = Vec::new();
    let mut ids = Vec::new();
    // (message, recipient, mailbox, folder) of each store delivery.
    let mut owners: Vec<(usize, usize, String, String)> = Vec::new();
    let mut dispositions: Vec<Vec<Disposition>> = batch
        .iter()
        .map(|q| vec![Disposition::Done; q.envelope.recipients.len()])
        .collect();
    let mut quotas = QuotaCheck::default();
    for (m, queued) in batch.iter().enumerate() {
        let env = &queued.envelope;
        for (r, rcpt) in env.recipients.iter().enumerate() {
            let Some(routing) = &routes[m][r] else {
                continue;
            };
            if queued.message.is_none() {
                dispositions[m][r] =
                    Disposition::Deferred("message unreadable in the spool".into());
                continue;
            }
            let Route::Local { mailbox } = &rcpt.route else {
                dispositions[m][r] = Disposition::Remote(rcpt.address.clone());
                continue;
            };
            let default_folder = if env.quarantine.is_some() {
                "Quarantine"
            } else {
                "INBOX"
            };
            let (mailbox, folder) = match routing {
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
                    info!(queue_id = %env.id, "copy for {} deferred by plugin: {reason}", rcpt.address);
                    dispositions[m][r] =
                        Disposition::Deferred(format!("deferred by plugin: {reason}"));
                    continue;
                }
                Routing::Fail(reason) => {
                    warn!(queue_id = %env.id, "copy for {} failed by plugin: {reason}", rcpt.address);
                    dispositions[m][r] = Disposition::Failed(format!("550 5.7.1 {reason}"));
                    continue;
                }
            };
            let prepend = format!(
                "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
                env.sender, rcpt.address
            )
            .into_bytes();
            // A mailbox over its quota takes the message later, or bounces it after max_age
            // like any deferred delivery (RFC 3463 X.2.2). A retry is not checked: it may
            // find its own earlier copy, which the quota already counts.
            let size = prepend.len() + queued.message.as_ref().map_or(0, |m| m.len());
            if !queued.retry && !quotas.allows(store, users, &mailbox, size as u64) {
                crate::telemetry::outcome::delivery(
                    &env.id,
                    &rcpt.address,
                    "local",
                    env.received_at,
                    "4.2.2",
                    crate::telemetry::outcome::Status::Deferred,
                    &format!("{mailbox}: mailbox full"),
                );
                dispositions[m][r] =
                    Disposition::Deferred(format!("4.2.2 {mailbox}: mailbox full"));
                continue;
            }
            prepends.push(prepend);
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
    for ((m, r, mailbox, folder), result) in owners.iter().zip(results) {
        use crate::telemetry::outcome::{delivery, Status};
        let env = &batch[*m].envelope;
        let to = &env.recipients[*r].address;
        match result {
            Ok(()) => delivery(
                &env.id,
                to,
                "local",
                env.received_at,
                "2.0.0",
                Status::Sent,
                &format!("delivered to {mailbox}/{folder}"),
            ),
            Err(err) if err.is_temporary() => {
                delivery(
                    &env.id,
                    to,
                    "local",
                    env.received_at,
                    "4.3.0",
                    Status::Deferred,
                    &err.to_string(),
                );
                dispositions[*m][*r] = Disposition::Deferred(format!("4.3.0 {mailbox}: {err}"));
            }
            Err(err) => {
                delivery(
                    &env.id,
                    to,
                    "local",
                    env.received_at,
                    "5.2.0",
                    Status::Bounced,
                    &err.to_string(),
                );
                dispositions[*m][*r] = Disposition::Failed(format!("550 5.2.0 {err}"));
            }
        }
    }
    dispositions
}
