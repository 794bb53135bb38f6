//! The outbound relay: delivers remote recipients to their domains' MX hosts (or a smarthost),
//! retries temporary failures on a schedule, and bounces what fails for good.
//!
//! The local scheduler hands over every message that has remote recipients (or local ones that
//! failed and need a bounce) as a [`RelayJob`]. Each message then has a [`state::DeliveryState`]
//! beside the spool; an attempt task takes the message, tries each destination domain
//! concurrently (within the global and per-domain connection limits), sends the notices owed,
//! and either removes the message from the spool (every recipient done) or saves its state with
//! the next attempt time. A restart reloads the state, so recipients already served are not
//! served twice.

pub mod client;
pub mod control;
pub mod dane;
pub mod dsn;
pub mod mta_sts;
pub mod mx;
pub mod state;
pub mod tls_report;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsConnector;
use tracing::{debug, error, info, warn, Instrument};

use crate::address::Address;
use crate::auth::UserDirectory;
use crate::config::{Config, OutboundTls, TlsMode};
use crate::dns::Dns;
use crate::plugin::bindings::types;
use crate::plugin::{Outbound, OutboundRoute, PluginSession, Stage};
use crate::queue::scheduler::LocalDelivery;
use crate::queue::Queued;
use crate::queue::{Envelope, Queue, QueueId, Recipient, Ret, Route, Spool, Ticket};
use client::{HostOutcome, RcptOutcome, Reply, SessionTls, TlsPlan};
use control::{Action, Control, Status};
use state::{Attempt, DeliveryState, RcptState, StateDir};

/// What local delivery decided for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Delivered to a local mailbox (or discarded by a plugin): nothing left to do.
    Done,
    /// To be relayed to this address.
    Remote(String),
    /// Cannot be delivered: bounce with this reason.
    Failed(String),
    /// A local recipient not delivered for now (temporary store failure, deliver-hook defer).
    Deferred(String),
}

/// A message the relay takes over, with its delivery state (already saved by the scheduler).
#[derive(Debug)]
pub struct RelayJob {
    pub envelope: Envelope,
    pub state: DeliveryState,
    /// Its local recipients were tried a moment ago (not again in the first attempt).
    pub locals_just_tried: bool,
}

/// What every attempt needs, shared.
struct Context {
    config: Arc<Config>,
    dns: Option<Arc<Dns>>,
    spool: Spool,
    states: StateDir,
    queue: Queue,
    /// Retries of local recipients go through the same local delivery as first attempts.
    local: Arc<LocalDelivery>,
    opportunistic: TlsConnector,
    verifying: Result<TlsConnector, String>,
    /// The verifier behind `verifying` (MTA-STS `testing` checks certificates with it).
    verifier: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    connections: Arc<Semaphore>,
    per_domain: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Recipient domains' MTA-STS policies (`outbound.mta_sts`, with DNS).
    sts: Option<mta_sts::MtaSts>,
    /// TLS session counts for reports (`outbound.tls_reports`, with DNS).
    tls_reports: Option<Arc<tls_report::TlsReports>>,
}

/// A message between attempts.
struct Pending {
    envelope: Envelope,
    state: DeliveryState,
    /// Skip local retries in the next attempt (they were just tried).
    skip_locals: bool,
}

impl Pending {
    fn entry(&self) -> control::Entry {
        let status = if self.state.held {
            Status::Held
        } else {
            Status::Deferred
        };
        control::Entry::of(&self.envelope, &self.state, status)
    }
}

pub struct Relay {
    context: Arc<Context>,
    inbox: mpsc::Receiver<RelayJob>,
    /// The operator's requests (`admin`); None when nobody can send any.
    control: Option<mpsc::Receiver<Control>>,
    /// Turns true when the server stops: no attempt starts after it, and the loop ends once
    /// those under way have finished (what is owed stays in the queue for the next start).
    drain: Option<watch::Receiver<bool>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Relay {
    pub fn new(
        config: Arc<Config>,
        dns: Option<Arc<Dns>>,
        spool: Spool,
        queue: Queue,
        local: Arc<LocalDelivery>,
        states: StateDir,
        inbox: mpsc::Receiver<RelayJob>,
    ) -> std::io::Result<Relay> {
        let outbound = &config.outbound;
        let verifier = client::ca_verifier(&outbound.ca_file);
        let verifying = verifier.clone().map(client::verifying_connector);
        if let Err(err) = &verifying {
            warn!("no verified outbound TLS (needed by `verify` domains and the smarthost): {err}");
        }
        let sts = match (&dns, outbound.mta_sts) {
            (Some(dns), true) => Some(mta_sts::MtaSts::new(
                dns.clone(),
                verifying.clone(),
                outbound.mta_sts_port,
                Duration::from_secs(outbound.connect_timeout_secs),
                config.server.data_dir.join("mta-sts"),
            )),
            _ => None,
        };
        let tls_reports = (dns.is_some() && outbound.tls_reports)
            .then(|| Arc::new(tls_report::TlsReports::default()));
        Ok(Relay {
            context: Arc::new(Context {
                sts,
                tls_reports,
                connections: Arc::new(Semaphore::new(outbound.max_connections)),
                per_domain: Mutex::new(HashMap::new()),
                opportunistic: client::unverified_connector(),
                verifying,
                verifier: verifier.ok(),
                config,
                dns,
                spool,
                states,
                queue,
                local,
            }),
            inbox,
            control: None,
            drain: None,
        })
    }

    /// Takes the operator's requests from this channel (`postern queue …`).
    pub fn with_control(mut self, control: mpsc::Receiver<Control>) -> Relay {
        self.control = Some(control);
        self
    }

    pub fn with_drain(mut self, drain: watch::Receiver<bool>) -> Relay {
        self.drain = Some(drain);
        self
    }

    /// Serves jobs until the scheduler is gone.
    pub async fn run(mut self) {
        if let (Some(reports), Some(dns)) = (&self.context.tls_reports, &self.context.dns) {
            let config = &self.context.config;
            tokio::spawn(tls_report::run(
                reports.clone(),
                dns.clone(),
                self.context.queue.clone(),
                self.context.local.users().clone(),
                config.server.hostname.clone(),
                config.outbound.tls_report_interval,
            ));
        }
        let mut waiting: HashMap<QueueId, Pending> = HashMap::new();
        // Under attempt, or being saved after an operator's action: as it was when it left.
        let mut in_flight: HashMap<QueueId, control::Entry> = HashMap::new();
        // Operators' actions on messages under attempt, applied when they come back.
        let mut after: HashMap<QueueId, Action> = HashMap::new();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(QueueId, Option<Pending>)>();
        let mut control = self.control.take();
        let mut drain = self.drain.take();
        let mut draining = false;
        let mut inbox_open = true;
        loop {
            let next_due = waiting
                .values()
                .filter(|p| !p.state.held)
                .map(|p| p.state.next_attempt_ms)
                .min();
            let sleep = match next_due {
                Some(due) => Duration::from_millis((due - now_ms()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                job = self.inbox.recv(), if inbox_open => {
                    match job {
                        // The scheduler is gone: finish what is under way, then end.
                        None => inbox_open = false,
                        // Already ours when a local retry handed it over again.
                        Some(job) if in_flight.contains_key(&job.envelope.id)
                            || waiting.contains_key(&job.envelope.id) => {}
                        Some(job) => {
                            waiting.insert(job.envelope.id.clone(), Pending {
                                envelope: job.envelope,
                                state: job.state,
                                skip_locals: job.locals_just_tried,
                            });
                        }
                    }
                }
                finished = done_rx.recv() => {
                    if let Some((id, pending)) = finished {
                        in_flight.remove(&id);
                        if let Some(pending) = pending {
                            match after.remove(&id) {
                                Some(action) => self.act(action, pending, &mut waiting, &mut in_flight, &done_tx),
                                None => {
                                    waiting.insert(id, pending);
                                }
                            }
                        } else {
                            after.remove(&id);
                        }
                    }
                }
                request = async { control.as_mut()?.recv().await }, if control.is_some() => {
                    let Some(request) = request else {
                        control = None;
                        continue;
                    };
                    let now_s = now_ms() / 1000;
                    match request {
                        Control::Stats { reply } => {
                            let arrivals = waiting
                                .values()
                                .map(|p| p.envelope.received_at)
                                .chain(in_flight.values().map(|e| e.received_at));
                            let _ = reply.send(control::Stats {
                                messages: waiting.len() + in_flight.len(),
                                oldest: arrivals.min(),
                            });
                        }
                        Control::List { filter, reply } => {
                            let mut entries: Vec<control::Entry> = waiting
                                .values()
                                .map(Pending::entry)
                                .chain(in_flight.values().cloned())
                                .filter(|e| filter.matches(e, now_s))
                                .collect();
                            entries.sort_by(|a, b| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
                            let _ = reply.send(entries);
                        }
                        Control::Act { action, filter, reply } => {
                            let mut report = control::Report::default();
                            let chosen: Vec<QueueId> = waiting
                                .values()
                                .map(Pending::entry)
                                .filter(|e| filter.matches(e, now_s))
                                .map(|e| e.id)
                                .collect();
                            for id in chosen {
                                if let Some(pending) = waiting.remove(&id) {
                                    self.act(action, pending, &mut waiting, &mut in_flight, &done_tx);
                                    report.done.push(id);
                                }
                            }
                            for entry in in_flight.values().filter(|e| filter.matches(e, now_s)) {
                                after.insert(entry.id.clone(), action);
                                report.after_attempt.push(entry.id.clone());
                            }
                            report.done.sort();
                            report.after_attempt.sort();
                            let _ = reply.send(report);
                        }
                    }
                }
                _ = async { drain.as_mut()?.wait_for(|d| *d).await.ok().map(|_| ()) }, if drain.is_some() && !draining => {
                    draining = true;
                    info!(under_way = in_flight.len(), "relay stopping: no new attempts");
                }
                _ = tokio::time::sleep(sleep) => {}
            }
            if draining || !inbox_open {
                if in_flight.is_empty() {
                    info!(queued = waiting.len(), "relay stopped");
                    return;
                }
                continue;
            }
            let now = now_ms();
            let due: Vec<QueueId> = waiting
                .iter()
                .filter(|(_, p)| !p.state.held && p.state.next_attempt_ms <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                let Some(pending) = waiting.remove(&id) else {
                    continue;
                };
                in_flight.insert(
                    id.clone(),
                    control::Entry::of(&pending.envelope, &pending.state, Status::Active),
                );
                let context = self.context.clone();
                let done = done_tx.clone();
                let span = tracing::info_span!("relay", queue_id = %id);
                tokio::spawn(
                    async move {
                        let after = attempt(&context, pending).await;
                        let _ = done.send((id, after));
                    }
                    .instrument(span),
                );
            }
        }
    }
}

impl Relay {
    /// Applies an operator's action to a message out of the schedule. What must be durable
    /// first (a hold, a release, a bounce, a removal) is done off the loop, with the message
    /// counted as under attempt until it is.
    fn act(
        &self,
        action: Action,
        mut pending: Pending,
        waiting: &mut HashMap<QueueId, Pending>,
        in_flight: &mut HashMap<QueueId, control::Entry>,
        done: &mpsc::UnboundedSender<(QueueId, Option<Pending>)>,
    ) {
        let id = pending.envelope.id.clone();
        if !control::apply(action, &pending.envelope, &mut pending.state, now_ms()) {
            waiting.insert(id, pending);
            return;
        }
        in_flight.insert(
            id.clone(),
            control::Entry::of(&pending.envelope, &pending.state, Status::Active),
        );
        let context = self.context.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let after = match action {
                Action::Delete => {
                    let (spool, states, remove) =
                        (context.spool.clone(), context.states.clone(), id.clone());
                    let removed = tokio::task::spawn_blocking(move || {
                        spool.remove(std::slice::from_ref(&remove))?;
                        states.remove(&remove)
                    })
                    .await;
                    if matches!(removed, Ok(Ok(()))) {
                        crate::telemetry::outcome::administered(&id, "removed");
                        None
                    } else {
                        error!(queue_id = %id, "could not remove the message from the queue; it stays");
                        Some(pending)
                    }
                }
                _ => {
                    save_state(&context, &id, &pending.state).await;
                    let what = match action {
                        Action::Hold => "placed on hold",
                        Action::Release => "released from hold",
                        _ => "to be returned to the sender",
                    };
                    crate::telemetry::outcome::administered(&id, what);
                    Some(pending)
                }
            };
            let _ = done.send((id, after));
        });
    }
}

/// One delivery attempt for a message, then the bookkeeping. Returns the message when work
/// remains (with its next attempt time), None when it left the queue.
async fn attempt(context: &Arc<Context>, mut pending: Pending) -> Option<Pending> {
    let id = pending.envelope.id.clone();
    let targets = pending.state.pending();
    // Taken before the message is read (the read checks this node still holds it): the
    // shared queue's lease may be running out, and another node that takes the message over
    // must then be the only one that sends it (queue::lease).
    let Some(ticket) = context.spool.hold().ticket() else {
        debug!("this node's lease is not fresh; attempt postponed");
        pending.state.next_attempt_ms = now_ms() + 1_000;
        return Some(pending);
    };
    let locals = if std::mem::take(&mut pending.skip_locals) {
        Vec::new()
    } else {
        pending.state.local()
    };
    let message = if targets.is_empty() && locals.is_empty() && !pending.state.owes_notice() {
        None
    } else {
        let spool = context.spool.clone();
        let read_id = id.clone();
        match tokio::task::spawn_blocking(move || spool.read(&read_id)).await {
            Ok(Ok((_, message))) => Some(Arc::new(message)),
            Ok(Err(crate::queue::SpoolError::Gone(_))) => {
                // The shared queue gave it to another node while this one was cut off: that
                // node delivers it, this one must not as well.
                warn!("no longer this node's to deliver; dropped here");
                return None;
            }
            Ok(Err(err)) => {
                error!("cannot read the spooled message: {err}");
                // The shared queue's database may be back in seconds; a damaged file is not.
                let wait = if matches!(err, crate::queue::SpoolError::Unavailable(_)) {
                    5_000
                } else {
                    60_000
                };
                pending.state.next_attempt_ms = now_ms() + wait;
                return Some(pending);
            }
            Err(_) => return Some(pending),
        }
    };
    if let (Some(message), false) = (&message, locals.is_empty()) {
        retry_local(context, &mut pending, message, &locals).await;
    }
    // Local retries may have made remote recipients (a deliver hook forwarding).
    let targets = pending.state.pending();
    let attempted = message.is_some() && !(locals.is_empty() && targets.is_empty());
    if let (Some(message), false) = (&message, targets.is_empty()) {
        // One transaction per domain and plan: recipients a plugin routes, secures or
        // re-addresses alike still share one.
        let mut by_domain: HashMap<(String, Plan), Vec<(usize, String)>> = HashMap::new();
        for (index, address, plan) in plan(context, &mut pending, targets, message).await {
            let domain = Address::parse(&address)
                .map(|a| a.domain_lower())
                .unwrap_or_default();
            by_domain
                .entry((domain, plan))
                .or_default()
                .push((index, address));
        }
        let mut tasks = tokio::task::JoinSet::new();
        let asked = MessageTls::of(&pending.envelope, message);
        for ((domain, plan), rcpts) in by_domain {
            let context = context.clone();
            let message = message.clone();
            let envelope = pending.envelope.clone();
            let ticket = ticket.clone();
            tasks.spawn(async move {
                let way = Way {
                    domain: &domain,
                    plan: &plan,
                    asked,
                };
                deliver_domain(&context, way, &rcpts, &envelope, &message, &ticket).await
            });
        }
        while let Some(result) = tasks.join_next().await {
            let Ok(results) = result else {
                continue; // a panicked task leaves its recipients pending
            };
            for (index, outcome, remote_mta) in results {
                let address = match &pending.state.recipients[index] {
                    RcptState::Pending { address, .. } => address.clone(),
                    _ => continue,
                };
                let attempt_of = |reply: &Reply| Attempt {
                    status: dsn::status_of(reply.code, reply.status()),
                    remote_mta: remote_mta.clone(),
                    diagnostic: reply.to_string(),
                };
                let logged = |reply: &Reply, status| {
                    crate::telemetry::outcome::delivery(
                        &pending.envelope.id,
                        &address,
                        remote_mta.as_deref().unwrap_or("none"),
                        pending.envelope.received_at,
                        &dsn::status_of(reply.code, reply.status()),
                        status,
                        &reply.to_string(),
                    )
                };
                use crate::telemetry::outcome::Status;
                let wants_success = pending.envelope.recipients[index].notify().success;
                pending.state.recipients[index] = match outcome {
                    // RFC 3461 §6.2.1: a server that took the DSN parameters reports from
                    // here on; one that could not, leaves us to say it was relayed.
                    RcptOutcome::Delivered { reply, dsn } if wants_success && !dsn => {
                        logged(&reply, Status::Sent);
                        RcptState::Succeeded {
                            address,
                            attempt: attempt_of(&reply),
                            relayed: true,
                        }
                    }
                    RcptOutcome::Delivered { reply, .. } => {
                        logged(&reply, Status::Sent);
                        RcptState::Done
                    }
                    RcptOutcome::Temporary(reply) => {
                        logged(&reply, Status::Deferred);
                        RcptState::Pending {
                            address,
                            last: Some(attempt_of(&reply)),
                        }
                    }
                    RcptOutcome::Permanent(reply) => {
                        logged(&reply, Status::Bounced);
                        RcptState::Failed {
                            address,
                            attempt: attempt_of(&reply),
                        }
                    }
                };
            }
            if !tasks.is_empty() {
                // Another domain is still being tried (perhaps for minutes): record what this
                // one took now, so a crash meanwhile does not send it a second copy.
                save_state(context, &id, &pending.state).await;
            }
        }
    }
    if attempted {
        pending.state.attempts += 1;
    }
    settle(context, &mut pending, message.as_deref().map(Vec::as_slice)).await;
    if pending.state.is_finished() {
        let spool = context.spool.clone();
        let states = context.states.clone();
        let result = tokio::task::spawn_blocking(move || {
            spool.remove(std::slice::from_ref(&id))?;
            states.remove(&id)
        })
        .await;
        if !matches!(result, Ok(Ok(()))) {
            // Kept, and removed at the next attempt (which has nothing left to send): a
            // message left in the spool would be delivered again after a restart.
            warn!("could not remove the finished message from the spool; trying again");
            pending.state.next_attempt_ms = now_ms() + 5_000;
            return Some(pending);
        }
        debug!("finished");
        return None;
    }
    save_state(context, &id, &pending.state).await;
    Some(pending)
}

async fn save_state(context: &Context, id: &str, state: &DeliveryState) {
    let states = context.states.clone();
    let (id, state) = (id.to_string(), state.clone());
    if !matches!(
        tokio::task::spawn_blocking(move || states.save(&id, &state)).await,
        Ok(Ok(()))
    ) {
        error!("cannot save the delivery state; a restart may repeat this attempt");
    }
}

/// Tries the local recipients that failed for now again, and records what came of them before
/// anything else is tried.
async fn retry_local(
    context: &Context,
    pending: &mut Pending,
    message: &Arc<Vec<u8>>,
    locals: &[usize],
) {
    let mut only = vec![false; pending.envelope.recipients.len()];
    for &i in locals {
        only[i] = true;
    }
    let queued = Queued {
        envelope: pending.envelope.clone(),
        message: Some(message.clone()),
        retry: true,
    };
    let (_, mut dispositions) = context.local.deliver(vec![queued], Some(vec![only])).await;
    let Some(dispositions) = dispositions.pop() else {
        return; // the delivery task failed: all stay as they were
    };
    for &i in locals {
        let address = pending.envelope.recipients[i].address.clone();
        pending.state.recipients[i] = match &dispositions[i] {
            Disposition::Done => {
                info!(to = %address, "delivered locally on retry");
                RcptState::delivered_locally(&pending.envelope.recipients[i])
            }
            Disposition::Remote(to) => RcptState::Pending {
                address: to.clone(),
                last: None,
            },
            Disposition::Failed(reason) => RcptState::Failed {
                address,
                attempt: Attempt {
                    status: "5.0.0".into(),
                    remote_mta: None,
                    diagnostic: reason.clone(),
                },
            },
            Disposition::Deferred(reason) => RcptState::Local {
                last: Some(Attempt {
                    status: "4.3.0".into(),
                    remote_mta: None,
                    diagnostic: reason.clone(),
                }),
            },
        };
    }
    save_state(context, &pending.envelope.id, &pending.state).await;
}

/// After an attempt: gives up on recipients past the maximum age, sends the bounce and the delay
/// notice owed, and sets the next attempt time.
async fn settle(context: &Context, pending: &mut Pending, message: Option<&[u8]>) {
    let outbound = &context.config.outbound;
    let now = now_ms();
    let age_ms = now - pending.envelope.received_at * 1000;
    if age_ms >= outbound.max_age.as_millis() as i64 {
        for (i, rcpt) in pending.state.recipients.iter_mut().enumerate() {
            let (address, last) = match rcpt {
                RcptState::Pending { address, last } => (address.clone(), last.clone()),
                RcptState::Local { last } => {
                    (pending.envelope.recipients[i].address.clone(), last.clone())
                }
                _ => continue,
            };
            let diagnostic = match &last {
                Some(last) => format!(
                    "gave up after {}: {}",
                    humane(outbound.max_age),
                    last.diagnostic
                ),
                None => format!("gave up after {}", humane(outbound.max_age)),
            };
            *rcpt = RcptState::Failed {
                address,
                attempt: Attempt {
                    status: "4.4.7".into(),
                    remote_mta: last.as_ref().and_then(|l| l.remote_mta.clone()),
                    diagnostic,
                },
            };
        }
    }
    // What each recipient's sender asked to be told (RFC 3461 §4.1): reports nobody wants are
    // settled without one.
    let envelope = &pending.envelope;
    let wants = |i: usize| envelope.recipients[i].notify();
    let mut failures = Vec::new();
    let mut successes = Vec::new();
    for (i, rcpt) in pending.state.recipients.iter().enumerate() {
        match rcpt {
            RcptState::Failed { address, attempt } if wants(i).failure => {
                failures.push(entry(envelope, i, address, attempt, dsn::Action::Failed))
            }
            RcptState::Succeeded {
                address,
                attempt,
                relayed,
            } => {
                let action = if *relayed {
                    dsn::Action::Relayed
                } else {
                    dsn::Action::Delivered
                };
                successes.push(entry(envelope, i, address, attempt, action));
            }
            _ => {}
        }
    }
    for (notice, entries) in [
        (dsn::Notice::Failed, failures),
        (dsn::Notice::Succeeded, successes),
    ] {
        let settled = match (message, entries.is_empty()) {
            (_, true) => true,
            (Some(message), false) => notify(context, envelope, notice, &entries, message).await,
            (None, false) => false,
        };
        if settled || envelope.sender.is_empty() {
            let owed = |r: &RcptState| match notice {
                dsn::Notice::Succeeded => matches!(r, RcptState::Succeeded { .. }),
                _ => matches!(r, RcptState::Failed { .. }),
            };
            for rcpt in pending.state.recipients.iter_mut().filter(|r| owed(r)) {
                *rcpt = RcptState::Done;
            }
        }
    }
    if pending.state.is_finished() {
        return;
    }
    pending.state.next_attempt_ms =
        now + outbound.retry_delay(pending.state.attempts).as_millis() as i64;
    let notice_after = outbound.delay_notice_after.as_millis() as i64;
    if notice_after > 0 && !pending.state.delay_notified && age_ms >= notice_after {
        let envelope = &pending.envelope;
        let not_yet = Attempt {
            status: "4.0.0".into(),
            remote_mta: None,
            diagnostic: "not yet delivered".into(),
        };
        let delayed: Vec<dsn::Entry> = pending
            .state
            .recipients
            .iter()
            .enumerate()
            .filter(|(i, _)| envelope.recipients[*i].notify().delay)
            .filter_map(|(i, r)| {
                let (address, last) = match r {
                    RcptState::Pending { address, last } => (address, last.as_ref()),
                    RcptState::Local { last: Some(last) } => {
                        (&envelope.recipients[i].address, Some(last))
                    }
                    _ => return None,
                };
                let last = last.unwrap_or(&not_yet);
                Some(entry(envelope, i, address, last, dsn::Action::Delayed))
            })
            .collect();
        let until = pending.envelope.received_at + outbound.max_age.as_secs() as i64;
        if let (Some(message), false) = (message, delayed.is_empty()) {
            notify(
                context,
                &pending.envelope,
                dsn::Notice::Delayed { until },
                &delayed,
                message,
            )
            .await;
        }
        pending.state.delay_notified = true;
    }
}

/// The report line of recipient `i` of `envelope` (delivered or tried at `address`).
fn entry(
    envelope: &Envelope,
    i: usize,
    address: &str,
    attempt: &Attempt,
    action: dsn::Action,
) -> dsn::Entry {
    dsn::Entry {
        recipient: address.to_string(),
        original: envelope.recipients[i].orcpt.clone(),
        action,
        status: attempt.status.clone(),
        remote_mta: attempt.remote_mta.clone(),
        diagnostic: attempt.diagnostic.clone(),
    }
}

fn humane(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        s if s % 86400 == 0 && s > 0 => format!("{} days", s / 86400),
        s if s % 3600 == 0 && s > 0 => format!("{} hours", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

/// Queues a notice to the sender. Never for a null sender (never bounce a bounce). Returns
/// whether the notice is safely queued (or was not owed).
async fn notify(
    context: &Context,
    envelope: &Envelope,
    notice: dsn::Notice,
    entries: &[dsn::Entry],
    message: &[u8],
) -> bool {
    if envelope.sender.is_empty() {
        info!("not notifying the null sender");
        return true;
    }
    let config = &context.config;
    let Some(route) = notice_route(context.local.users(), &envelope.sender) else {
        warn!(sender = %envelope.sender, "the sender is an unknown local address: no notice");
        return true;
    };
    let now = chrono::Utc::now().timestamp();
    let original = dsn::Original {
        queue_id: &envelope.id,
        sender: &envelope.sender,
        received_at: envelope.received_at,
        envid: envelope.dsn.envid.as_deref(),
        // RFC 8689 §5: the report on a REQUIRETLS message never returns its body.
        full: envelope.dsn.ret == Some(Ret::Full) && !envelope.require_tls,
        message,
    };
    let bytes = dsn::build(&config.server.hostname, notice, &original, entries, now);
    let notice_envelope = Envelope {
        id: context.queue.new_id(),
        received_at: now,
        sender: String::new(),
        recipients: vec![Recipient::new(envelope.sender.clone(), route)],
        helo: config.server.hostname.clone(),
        peer: "local".into(),
        auth_user: None,
        smtputf8: !envelope.sender.is_ascii(),
        message_len: bytes.len() as u64,
        quarantine: None,
        filtered: false,
        dsn: Default::default(),
        // RFC 8689 §5: the report on a REQUIRETLS message goes back under REQUIRETLS.
        require_tls: envelope.require_tls,
    };
    let notice_id = notice_envelope.id.clone();
    match context.queue.submit(notice_envelope, Arc::new(bytes)).await {
        Ok(()) => {
            info!(notice = %notice_id, kind = ?notice, to = %envelope.sender, "delivery status notification queued");
            true
        }
        Err(err) => {
            error!("cannot queue the delivery status notification: {err}");
            false
        }
    }
}

/// Where a notice to `address` goes: a local mailbox or the relay.
fn notice_route(users: &UserDirectory, address: &str) -> Option<Route> {
    let parsed = Address::parse(address)?;
    let domain = parsed.domain_lower();
    if users.is_local_domain(&domain) {
        users
            .resolve(&parsed)
            .map(|mailbox| Route::Local { mailbox })
    } else {
        Some(Route::Remote)
    }
}

/// How one remote recipient's copy goes out: the `outbound` hook's answer, or the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Plan {
    route: Option<OutboundRoute>,
    require_tls: bool,
    sender: Option<String>,
}

/// The destination of one transaction: a domain and its plan, and what the message asks.
#[derive(Clone, Copy)]
struct Way<'a> {
    domain: &'a str,
    plan: &'a Plan,
    asked: MessageTls,
}

/// What a message itself asks of transport security (RFC 8689).
#[derive(Debug, Clone, Copy, Default)]
struct MessageTls {
    /// REQUIRETLS in MAIL FROM: verified TLS to a server that offers REQUIRETLS.
    require: bool,
    /// `TLS-Required: No` (§3), without REQUIRETLS: the recipient domain's TLS policy is
    /// not enforced; STARTTLS is still used when offered.
    optional: bool,
}

impl MessageTls {
    fn of(envelope: &Envelope, message: &[u8]) -> MessageTls {
        MessageTls {
            require: envelope.require_tls,
            // §4.1: with REQUIRETLS the header field is ignored.
            optional: !envelope.require_tls && tls_required_no(message),
        }
    }
}

/// Whether the header section has `TLS-Required: No` (RFC 8689 §3, case-insensitive).
fn tls_required_no(message: &[u8]) -> bool {
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(message) else {
        return false;
    };
    let no = parsed.header_values("TLS-Required").any(|v| {
        v.as_text()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("no"))
    });
    no
}

/// Asks the `outbound` hook about each recipient to send now (every recipient the default plan
/// without one). Recipients it defers or fails are settled here and not returned.
async fn plan(
    context: &Context,
    pending: &mut Pending,
    targets: Vec<(usize, String)>,
    message: &Arc<Vec<u8>>,
) -> Vec<(usize, String, Plan)> {
    let Some(runtime) = context
        .local
        .plugins()
        .filter(|r| r.current().has(Stage::Outbound))
    else {
        return targets
            .into_iter()
            .map(|(i, a)| (i, a, Plan::default()))
            .collect();
    };
    let env = &pending.envelope;
    let wit_envelope = types::Envelope {
        queue_id: env.id.clone(),
        sender: env.sender.clone(),
        recipients: env.recipients.iter().map(|r| r.address.clone()).collect(),
    };
    let mut session = PluginSession::new(runtime.clone());
    let mut planned = Vec::with_capacity(targets.len());
    for (index, address) in targets {
        use crate::telemetry::outcome::{delivery, Status};
        let decided = session.on_outbound(&wit_envelope, &address, message).await;
        let (code, status, why) = match decided {
            Outbound::Send {
                route,
                require_tls,
                sender,
            } => {
                let route = (route != OutboundRoute::Default).then_some(route);
                planned.push((
                    index,
                    address,
                    Plan {
                        route,
                        require_tls,
                        sender,
                    },
                ));
                continue;
            }
            Outbound::Defer(why) => (451, "4.7.0", why),
            Outbound::Fail(why) => (550, "5.7.1", why),
        };
        let attempt = Attempt {
            status: status.into(),
            remote_mta: None,
            diagnostic: format!("{code} {status} {why}"),
        };
        let kind = if code >= 500 {
            Status::Bounced
        } else {
            Status::Deferred
        };
        delivery(
            &env.id,
            &address,
            "none",
            env.received_at,
            status,
            kind,
            &format!("by plugin: {why}"),
        );
        pending.state.recipients[index] = if code >= 500 {
            RcptState::Failed { address, attempt }
        } else {
            RcptState::Pending {
                address,
                last: Some(attempt),
            }
        };
    }
    planned
}

/// TLS that verifies the host's certificate, for a plan that requires it: the plan's own when
/// it verifies already, else STARTTLS required with the verifying connector.
fn verified(context: &Context, tls: TlsPlan, verifies: bool) -> Result<TlsPlan, RcptOutcome> {
    if verifies {
        return Ok(tls);
    }
    match context.verifying.clone() {
        Ok(connector) => Ok(match tls {
            TlsPlan::Implicit(_) => TlsPlan::Implicit(connector),
            _ => TlsPlan::Required(connector),
        }),
        Err(_) => Err(RcptOutcome::Temporary(Reply {
            code: 451,
            text: "4.7.5 TLS required, but no CA certificates to verify with".into(),
        })),
    }
}

/// The TLS a domain's policy asks for, and whether it verifies certificates.
fn domain_tls(context: &Context, policy: OutboundTls) -> Result<(TlsPlan, bool), RcptOutcome> {
    Ok(match policy {
        OutboundTls::None => (TlsPlan::None, false),
        // DANE's hosts are decided one by one (`host_tls`); the others are opportunistic.
        OutboundTls::May | OutboundTls::Dane => {
            (TlsPlan::Opportunistic(context.opportunistic.clone()), false)
        }
        OutboundTls::Encrypt => (TlsPlan::Required(context.opportunistic.clone()), false),
        OutboundTls::Verify => match context.verifying.clone() {
            Ok(connector) => (TlsPlan::Required(connector), true),
            Err(_) => {
                return Err(RcptOutcome::Temporary(Reply {
                    code: 451,
                    text: "4.7.5 No CA certificates to verify with".into(),
                }))
            }
        },
    })
}

/// The recipient domain's TLS policy, unless the message says `TLS-Required: No` (RFC 8689
/// §4.2.2): then STARTTLS when offered, and delivery even without it.
fn policy_for(outbound: &crate::config::OutboundConfig, way: Way<'_>) -> OutboundTls {
    let policy = outbound.tls_for(way.domain);
    if way.asked.optional && policy != OutboundTls::None {
        info!(domain = %way.domain, "TLS-Required: No; the domain's TLS policy is not enforced");
        OutboundTls::May
    } else {
        policy
    }
}

/// Next hops, port, TLS and credentials of one transaction. A plan's named transport or host
/// replaces the smarthost and MX; `mx` skips the smarthost.
struct Hops {
    hosts: Vec<String>,
    port: u16,
    tls: TlsPlan,
    auth: Option<(String, String)>,
    /// MX delivery with TLS reports on: how its sessions are counted.
    report: Option<Reporting>,
    /// DANE applies: policy `dane` and a DNSSEC-secure MX RRset (RFC 7672 §2.2.1).
    dane: bool,
}

/// How the sessions of one MX transaction are counted for TLS reports.
#[derive(Clone)]
struct Reporting {
    /// The policy they count under.
    policy: tls_report::ReportPolicy,
    /// The MTA-STS policy whose MX patterns each host is checked against (in testing mode
    /// an unnamed host is still used, and its session counts as failed).
    sts: Option<Arc<mta_sts::Policy>>,
    /// Testing mode: how each TLS session's certificate would have fared under verification.
    observed: Option<client::Observation>,
}

impl Reporting {
    fn none() -> Reporting {
        Reporting {
            policy: tls_report::ReportPolicy::none(),
            sts: None,
            observed: None,
        }
    }

    /// What one session (or its TLS) came to.
    fn result(&self, host: &str, tls: SessionTls) -> tls_report::Result {
        use tls_report::Result::{Failure, Success};
        if self.sts.as_ref().is_some_and(|p| !p.allows(host)) {
            return Failure("validation-failure");
        }
        let observed = || {
            let seen = self.observed.as_ref()?;
            let failure = seen.lock().expect("observation").take();
            failure
        };
        match tls {
            SessionTls::Secured => observed().map_or(Success, Failure),
            SessionTls::Plain => Failure("starttls-not-supported"),
            SessionTls::Failed(result_type) => Failure(result_type),
        }
    }
}

async fn hops(context: &Context, way: Way<'_>) -> Result<Hops, RcptOutcome> {
    let outbound = &context.config.outbound;
    let domain = way.domain;
    let temporary = |text: String| RcptOutcome::Temporary(Reply { code: 451, text });
    let smarthost = outbound
        .smarthost
        .as_ref()
        .filter(|_| way.plan.route.is_none());
    let (hosts, port, tls, auth, verifies) = match (&way.plan.route, smarthost) {
        (Some(OutboundRoute::Transport(name)), _) => {
            let Some(t) = outbound.transports.get(name) else {
                warn!(transport = %name, "a plugin routed to an unknown transport");
                return Err(temporary(format!("4.3.5 No transport named {name:?}")));
            };
            let (host, port) = split_host_port(&t.host, 25);
            let (tls, verifies) = if t.implicit_tls {
                match context.verifying.clone() {
                    Ok(connector) => (TlsPlan::Implicit(connector), true),
                    Err(_) => {
                        return Err(temporary("4.7.5 No CA certificates to verify with".into()))
                    }
                }
            } else {
                domain_tls(context, t.tls)?
            };
            let auth = t.user.clone().zip(t.password.clone());
            (vec![host], port, tls, auth, verifies)
        }
        (Some(OutboundRoute::Host(host)), _) => {
            let (host, port) = split_host_port(host, outbound.mx_port);
            let (tls, verifies) = domain_tls(context, policy_for(outbound, way))?;
            (vec![host], port, tls, None, verifies)
        }
        (_, Some(smarthost)) => {
            let (host, port) = split_host_port(smarthost, 25);
            let Ok(connector) = context.verifying.clone() else {
                return Err(temporary(
                    "4.7.5 No CA certificates to verify the smarthost".into(),
                ));
            };
            let tls = match outbound.smarthost_tls {
                TlsMode::Implicit => TlsPlan::Implicit(connector),
                _ => TlsPlan::Required(connector),
            };
            let auth = outbound
                .smarthost_user
                .clone()
                .zip(outbound.smarthost_password.clone());
            (vec![host], port, tls, auth, true)
        }
        _ => {
            let Some(dns) = &context.dns else {
                return Err(temporary("4.4.3 No DNS resolver".into()));
            };
            let seed = now_ms() as u64;
            let policy = policy_for(outbound, way);
            let validate = policy == OutboundTls::Dane;
            let (hosts, secure) = match mx::resolve(dns, domain, seed, validate).await {
                Ok((mx::Destination::Hosts(hosts), secure)) => (hosts, secure),
                Ok((mx::Destination::NullMx, _)) => {
                    return Err(RcptOutcome::Permanent(Reply {
                        code: 556,
                        text: format!("5.1.10 Domain {domain} does not accept mail (null MX)"),
                    }))
                }
                Ok((mx::Destination::NoSuchDomain, _)) => {
                    return Err(RcptOutcome::Permanent(Reply {
                        code: 550,
                        text: format!("5.1.2 Domain {domain} does not exist"),
                    }))
                }
                Err(err) => {
                    return Err(temporary(format!(
                        "4.4.3 MX lookup for {domain} failed: {err}"
                    )))
                }
            };
            let (tls, verifies) = domain_tls(context, policy)?;
            let (hosts, tls, verifies, report) =
                sts_applied(context, way, hosts, tls, verifies).await?;
            return Ok(Hops {
                hosts,
                port: outbound.mx_port,
                tls: secured(context, way, tls, verifies)?,
                auth: None,
                report,
                dane: secure,
            });
        }
    };
    Ok(Hops {
        hosts,
        port,
        tls: secured(context, way, tls, verifies)?,
        auth,
        report: None,
        dane: false,
    })
}

/// The TLS of one MX host under DANE (RFC 7672 §2.2): its usable TLSA records make STARTTLS
/// mandatory with the certificate matched against them (and the sessions count under the
/// `tlsa` policy in TLS reports); secure but unusable records make TLS mandatory
/// unauthenticated; no secure records leave the domain's plan. Err: the host must not be
/// used now (bogus or failed lookup), with the reply to keep.
async fn host_tls(
    context: &Context,
    domain: &str,
    host: &str,
    port: u16,
    tls: &TlsPlan,
    report: &Option<Reporting>,
) -> Result<(TlsPlan, Option<Reporting>), Reply> {
    let Some(dns) = &context.dns else {
        return Ok((tls.clone(), None));
    };
    match dane::lookup(dns, host, port).await {
        Ok(dane::Dane::None) => Ok((tls.clone(), None)),
        Ok(dane::Dane::Unusable) => {
            info!(%domain, %host, "DANE: TLSA records, none usable; TLS required, unauthenticated");
            let tls = match tls {
                TlsPlan::Opportunistic(connector) => TlsPlan::Required(connector.clone()),
                other => other.clone(),
            };
            Ok((tls, None))
        }
        Ok(dane::Dane::Records(records)) => {
            debug!(%domain, %host, records = records.len(), "DANE: TLSA records apply");
            let reporting = report.as_ref().map(|_| Reporting {
                policy: tls_report::ReportPolicy::tlsa(host, &records),
                sts: None,
                observed: None,
            });
            Ok((TlsPlan::Required(dane::connector(records)), reporting))
        }
        Err(err) => {
            warn!(%domain, %host, "DANE: TLSA lookup failed: {err}; host skipped");
            if let Some(reports) = context.tls_reports.as_deref() {
                let policy = tls_report::ReportPolicy {
                    kind: "tlsa",
                    mx: vec![host.to_string()],
                    ..tls_report::ReportPolicy::none()
                };
                let failure = tls_report::Result::Failure("dnssec-invalid");
                reports.record(domain, &policy, Some(host), None, failure);
            }
            Err(Reply {
                code: 451,
                text: format!("4.7.5 DANE: TLSA lookup for {host} failed: {err}"),
            })
        }
    }
}

/// The TLS of a plan, verified when the plugin's plan or the message (REQUIRETLS) asks.
fn secured(
    context: &Context,
    way: Way<'_>,
    tls: TlsPlan,
    verifies: bool,
) -> Result<TlsPlan, RcptOutcome> {
    if way.plan.require_tls || way.asked.require {
        verified(context, tls, verifies)
    } else {
        Ok(tls)
    }
}

/// The recipient domain's MTA-STS policy applied to its MX hosts (RFC 8461 §5): `enforce`
/// keeps the hosts it names and requires verified TLS with them, deferring when none is left;
/// `testing` changes nothing. What TLS reports count is settled here too. A message with
/// `TLS-Required: No` is delivered as if there were no policy (RFC 8689 §4.2.2).
async fn sts_applied(
    context: &Context,
    way: Way<'_>,
    hosts: Vec<String>,
    tls: TlsPlan,
    verifies: bool,
) -> Result<(Vec<String>, TlsPlan, bool, Option<Reporting>), RcptOutcome> {
    let reports = context.tls_reports.as_deref();
    let policy = match context.sts.as_ref().filter(|_| !way.asked.optional) {
        Some(sts) => sts.policy(way.domain).await,
        None => mta_sts::Sts::None,
    };
    let policy = match policy {
        mta_sts::Sts::None => {
            return Ok((hosts, tls, verifies, reports.map(|_| Reporting::none())))
        }
        mta_sts::Sts::Unavailable { result_type, .. } => {
            if let Some(reports) = reports {
                let sts = tls_report::ReportPolicy {
                    kind: "sts",
                    ..tls_report::ReportPolicy::none()
                };
                let failure = tls_report::Result::Failure(result_type);
                reports.record(way.domain, &sts, None, None, failure);
            }
            return Ok((hosts, tls, verifies, reports.map(|_| Reporting::none())));
        }
        mta_sts::Sts::Policy(policy) => policy,
    };
    let mut reporting = reports.map(|_| Reporting {
        policy: tls_report::ReportPolicy::sts(&policy),
        sts: Some(policy.clone()),
        observed: None,
    });
    if policy.mode != mta_sts::Mode::Enforce {
        // Testing (§5): delivered as usual; a certificate that would not verify is reported.
        let (tls, observed) = match (tls, &context.verifier, &reporting) {
            (TlsPlan::Opportunistic(_), Some(verifier), Some(_)) if !verifies => {
                let seen = client::Observation::default();
                let observing = client::observing_connector(verifier.clone(), seen.clone());
                (TlsPlan::Opportunistic(observing), Some(seen))
            }
            (tls, ..) => (tls, None),
        };
        if let Some(reporting) = &mut reporting {
            reporting.observed = observed;
        }
        return Ok((hosts, tls, verifies, reporting));
    }
    let (allowed, refused): (Vec<String>, Vec<String>) =
        hosts.into_iter().partition(|h| policy.allows(h));
    for host in &refused {
        info!(domain = %way.domain, %host, "MTA-STS: the policy does not name this MX host; skipped");
        if let (Some(reports), Some(reporting)) = (reports, &reporting) {
            let failure = reporting.result(host, SessionTls::Plain);
            reports.record(way.domain, &reporting.policy, Some(host), None, failure);
        }
    }
    if allowed.is_empty() {
        return Err(RcptOutcome::Temporary(Reply {
            code: 451,
            text: format!(
                "4.7.5 MTA-STS: the policy of {} names none of its MX hosts",
                way.domain
            ),
        }));
    }
    let tls = verified(context, tls, verifies)?;
    Ok((allowed, tls, true, reporting))
}

/// Delivers to one domain's recipients of one plan: its next hops (smarthost, MX hosts in
/// order, or the plan's host or transport), each address of a host in turn, until one host
/// takes the transaction. Returns (index, outcome, remote host) each.
async fn deliver_domain(
    context: &Context,
    way: Way<'_>,
    rcpts: &[(usize, String)],
    envelope: &Envelope,
    message: &[u8],
    ticket: &Ticket,
) -> Vec<(usize, RcptOutcome, Option<String>)> {
    let outbound = &context.config.outbound;
    let domain = way.domain;
    let Hops {
        hosts,
        port,
        tls,
        auth,
        report,
        dane,
    } = match hops(context, way).await {
        Ok(hops) => hops,
        Err(outcome) => {
            return rcpts
                .iter()
                .map(|(i, _)| (*i, outcome.clone(), None))
                .collect()
        }
    };
    let sender = way.plan.sender.as_deref().unwrap_or(&envelope.sender);
    let dsn_mail = dsn_mail_params(envelope);
    let _global = context.connections.clone().acquire_owned().await;
    let domain_limit = {
        let mut map = context.per_domain.lock().expect("per-domain limits");
        if map.len() > 10_000 {
            let full = outbound.max_connections_per_domain;
            map.retain(|_, s| s.available_permits() < full);
        }
        map.entry(domain.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(outbound.max_connections_per_domain)))
            .clone()
    };
    let _per_domain = domain_limit.acquire_owned().await;
    let mut last = Reply {
        code: 451,
        text: format!("4.4.1 No host for {domain} could be reached"),
    };
    let mut last_permanent = false;
    let mut last_host = None;
    let mut results = Vec::with_capacity(rcpts.len());
    // Recipients still to place, with the 4xx a host gave each (if one did).
    let mut remaining: Vec<(usize, String, Option<RcptOutcome>)> =
        rcpts.iter().map(|(i, a)| (*i, a.clone(), None)).collect();
    'hosts: for host in &hosts {
        if !ticket.valid() {
            last = Reply {
                code: 451,
                text: "4.4.0 This node's hold on the message lapsed; another node may deliver it"
                    .into(),
            };
            last_permanent = false;
            break;
        }
        let (tls, report) = if dane {
            match host_tls(context, domain, host, port, &tls, &report).await {
                Ok((tls, Some(dane_report))) => (tls, Some(dane_report)),
                Ok((tls, None)) => (tls, report.clone()),
                Err(reply) => {
                    last = reply;
                    last_permanent = false;
                    last_host = Some(host.clone());
                    continue;
                }
            }
        } else {
            (tls.clone(), report.clone())
        };
        let ips: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match &context.dns {
                Some(dns) => match dns.ips(host).await {
                    Ok(ips) if !ips.is_empty() => ips,
                    Ok(_) | Err(_) => {
                        last = Reply {
                            code: 451,
                            text: format!("4.4.3 Host {host} has no address"),
                        };
                        continue;
                    }
                },
                None => continue,
            },
        };
        let addresses: Vec<String> = remaining.iter().map(|(_, a, _)| a.clone()).collect();
        let dsn_rcpts: Vec<String> = remaining
            .iter()
            .map(|(i, _, _)| dsn_rcpt_params(&envelope.recipients[*i]))
            .collect();
        for ip in ips {
            let address = SocketAddr::new(ip, port);
            let job = client::Job {
                helo: &context.config.server.hostname,
                host,
                tls: tls.clone(),
                auth: auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
                sender,
                recipients: &addresses,
                message,
                smtputf8: envelope.smtputf8,
                dsn_mail: &dsn_mail,
                dsn_rcpts: &dsn_rcpts,
                require_tls: way.asked.require,
                ticket,
                command_timeout: Duration::from_secs(outbound.command_timeout_secs),
            };
            let outcome = match transact(context, address, job).await {
                Ok((outcome, tls)) => {
                    if let (Some(reports), Some(reporting)) =
                        (context.tls_reports.as_deref(), &report)
                    {
                        let result = reporting.result(host, tls);
                        reports.record(domain, &reporting.policy, Some(host), Some(ip), result);
                    }
                    outcome
                }
                Err(reason) => {
                    last = reason;
                    last_permanent = false;
                    continue; // this host's next address
                }
            };
            match outcome {
                HostOutcome::Done(outcomes) => {
                    let mut deferred = Vec::new();
                    for ((i, address, _), outcome) in remaining.drain(..).zip(outcomes) {
                        match outcome {
                            RcptOutcome::Temporary(_) => deferred.push((i, address, Some(outcome))),
                            _ => results.push((i, outcome, Some(host.clone()))),
                        }
                    }
                    if deferred.is_empty() {
                        return results;
                    }
                    // RFC 5321 §5.1: what this host deferred, the next MX may take now.
                    info!(%host, deferred = deferred.len(), "recipients deferred; trying the next host");
                    remaining = deferred;
                    last_host = Some(host.clone());
                }
                HostOutcome::Failed { reason, permanent } => {
                    info!(%host, %address, reply = %reason, "host did not take the message; trying the next");
                    for entry in remaining.iter_mut() {
                        entry.2 = None; // this host's refusal is now the latest word
                    }
                    last = reason;
                    last_permanent = permanent;
                    last_host = Some(host.clone());
                }
                HostOutcome::HandshakeFailed(reason) => {
                    last = reason;
                    last_permanent = false;
                    last_host = Some(host.clone());
                }
            }
            continue 'hosts; // the next MX host, not this host's next address
        }
    }
    let fallback = if last_permanent {
        RcptOutcome::Permanent(last)
    } else {
        RcptOutcome::Temporary(last)
    };
    results.extend(remaining.into_iter().map(|(i, _, outcome)| {
        (
            i,
            outcome.unwrap_or_else(|| fallback.clone()),
            last_host.clone(),
        )
    }));
    results
}

/// One connection to one address and the transaction over it. Under opportunistic TLS a
/// failed handshake is followed by a plaintext connection to the same address (as Postfix's
/// `may` level does): the message is better delivered unencrypted than not at all. Err is a
/// connection that could not be made.
async fn transact(
    context: &Context,
    address: SocketAddr,
    mut job: client::Job<'_>,
) -> Result<(HostOutcome, SessionTls), Reply> {
    let outbound = &context.config.outbound;
    let mut failed_tls = None;
    loop {
        let host = job.host;
        let connect = tokio::time::timeout(
            Duration::from_secs(outbound.connect_timeout_secs),
            TcpStream::connect(address),
        )
        .await;
        let tcp = match connect {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(err)) => {
                debug!(%host, %address, "connect failed: {err}");
                return Err(Reply {
                    code: 451,
                    text: format!("4.4.1 Connection to {host}[{}] failed: {err}", address.ip()),
                });
            }
            Err(_) => {
                return Err(Reply {
                    code: 451,
                    text: format!("4.4.1 Connection to {host}[{}] timed out", address.ip()),
                })
            }
        };
        let _ = tcp.set_nodelay(true);
        match client::deliver(tcp, &job).await {
            (HostOutcome::HandshakeFailed(reason), tls)
                if matches!(job.tls, TlsPlan::Opportunistic(_)) =>
            {
                warn!(%host, %address, reply = %reason, "TLS handshake failed; retrying in plaintext");
                job.tls = TlsPlan::None;
                failed_tls.get_or_insert(tls);
            }
            // A plaintext retry after a failed handshake is a TLS failure to reports.
            (outcome, tls) => return Ok((outcome, failed_tls.unwrap_or(tls))),
        }
    }
}

/// MAIL FROM's DSN parameters as received (RFC 3461 §4.3, §4.4), for a server that offers DSN.
fn dsn_mail_params(envelope: &Envelope) -> String {
    let mut params = String::new();
    match envelope.dsn.ret {
        Some(Ret::Full) => params.push_str(" RET=FULL"),
        Some(Ret::Hdrs) => params.push_str(" RET=HDRS"),
        None => {}
    }
    if let Some(envid) = &envelope.dsn.envid {
        params.push_str(&format!(" ENVID={}", xtext(envid)));
    }
    params
}

/// A recipient's DSN parameters (§4.1, §4.2). NOTIFY goes on as given; ORCPT as given, or the
/// address the client gave (§4.2 lets the first relay add it, as Postfix does), so the final
/// report names the address the sender used even after aliasing and forwarding.
fn dsn_rcpt_params(recipient: &Recipient) -> String {
    let mut params = String::new();
    if let Some(notify) = recipient.notify {
        let mut kinds = Vec::new();
        for (on, name) in [
            (notify.success, "SUCCESS"),
            (notify.failure, "FAILURE"),
            (notify.delay, "DELAY"),
        ] {
            if on {
                kinds.push(name);
            }
        }
        let kinds = if kinds.is_empty() {
            "NEVER".to_string()
        } else {
            kinds.join(",")
        };
        params.push_str(&format!(" NOTIFY={kinds}"));
    }
    let original = recipient.orcpt.as_deref().unwrap_or(&recipient.address);
    // An rfc822 ORCPT is ASCII (RFC 6533 adds utf-8 addresses, not offered here).
    if original.is_ascii() && !original.is_empty() {
        params.push_str(&format!(" ORCPT=rfc822;{}", xtext(original)));
    }
    params
}

/// RFC 3461 §4: xtext, with `+`, `=` and bytes outside `!`..`~` as `+XX`.
fn xtext(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// `host:port`, `[v6]:port` or a bare host (then `default_port`).
fn split_host_port(text: &str, default_port: u16) -> (String, u16) {
    match text.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => (
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port.parse().unwrap_or(default_port),
        ),
        _ => (text.to_string(), default_port),
    }
}
