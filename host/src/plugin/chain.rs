//! Running a hook stage through the plugin chain for one session.
//!
//! Each session gets its own instance of each plugin (created on first use, reused for the
//! session's later calls). Calls have a deadline enforced with epoch interruption: the guest
//! yields at every epoch tick and a timer drops the call when the deadline passes. An instance
//! that trapped, ran out of time or memory is dropped (it cannot be entered again) and the next
//! call gets a fresh one. Every failure becomes the plugin's on-error policy, never a crash.

use std::sync::Arc;

use wasmtime::component::Resource;
use wasmtime::Store;

use super::bindings::types;
use super::hooks::Guests;
use super::host::{MessageView, PluginState};
use super::registry::{LoadedPlugin, PluginRuntime, PluginSet, Stage};
use super::{PluginError, DEADLINE_PASSED};
use crate::config::OnError;
use crate::message::{Edit, Field};
use crate::smtp::reply::Reply;

/// A validated decision from a chain of SMTP-stage hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No plugin objected (continue or accept).
    Pass,
    /// Answer with this reply (4xx or 5xx) and refuse.
    Refuse(Reply),
    /// Answer with this reply and close the connection.
    Disconnect(Reply),
}

/// What a chain's modifications (WIT `modification`) ask of a message and its envelope, in
/// order, from every plugin that answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub edits: Vec<Edit>,
    pub new_sender: Option<String>,
    pub add_recipients: Vec<String>,
    pub remove_recipients: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// The data hook's combined outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOutcome {
    pub verdict: Verdict,
    pub discard: bool,
    pub quarantine: Option<String>,
    pub changes: Changes,
}

/// What the after-queue filters (`queued`, WIT 0.2.0) decided about a spooled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filtering {
    /// Deliver it (with the changes, if any).
    Deliver,
    /// Deliver local copies to `Quarantine`, with the reason.
    Quarantine(String),
    /// Drop it; the reason is logged.
    Discard(String),
    /// Return it to the sender with this text; nobody gets a copy.
    Bounce(String),
    /// Filter it again later; the reason is logged.
    Defer(String),
}

/// Where the `outbound` chain sends one remote recipient's copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OutboundRoute {
    /// The server's own choice: the smarthost, or MX.
    Default,
    Mx,
    /// `host` or `host:port`.
    Host(String),
    /// `[outbound.transports.NAME]`.
    Transport(String),
}

/// The `outbound` chain's answer for one remote recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Send {
        route: OutboundRoute,
        /// Only over verified TLS.
        require_tls: bool,
        /// The envelope sender for this copy.
        sender: Option<String>,
    },
    Defer(String),
    Fail(String),
}

/// The `queued` chain's combined outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedOutcome {
    pub filtering: Filtering,
    /// Applied when delivering (Deliver, Quarantine).
    pub changes: Changes,
}

/// The deliver hook's decision for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    Default,
    Folder(String),
    Forward(String),
    Discard,
    Defer(String),
    Fail(String),
}

/// A VRFY/EXPN answer, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Default,
    Answer(Reply),
}

/// Context a hook sees about the session: the WIT record itself, so building it once per call
/// is the only copy made.
pub type SessionInfo = types::Session;

/// What a session of any protocol tells plugins before HELO and login.
pub fn session_info(id: u64, listener: &str, peer: std::net::SocketAddr, tls: bool) -> SessionInfo {
    SessionInfo {
        id,
        listener: listener.to_string(),
        peer_ip: peer.ip().to_string(),
        peer_port: peer.port(),
        tls,
        helo: None,
        user: None,
    }
}

struct Live {
    store: Store<PluginState>,
    /// The hooks' exported functions, looked up once per instance.
    guests: Guests,
}

/// One session's view of the plugins: a snapshot and the live instances made from it.
pub struct PluginSession {
    runtime: Arc<PluginRuntime>,
    set: Arc<PluginSet>,
    live: Vec<Option<Live>>,
}

/// The arguments of a hook that answers with a decision (or, VRFY and EXPN, a lookup answer):
/// every hook of a session but data and deliver, which are given the message.
#[derive(Debug, Clone, Copy)]
pub enum Hook<'a> {
    Connect,
    Helo {
        name: &'a str,
        extended: bool,
    },
    Auth {
        mechanism: &'a str,
        user: &'a str,
    },
    Login {
        protocol: LoginProtocol,
        mechanism: &'a str,
        user: &'a str,
    },
    MailFrom {
        sender: &'a str,
        size: u64,
    },
    Rcpt {
        sender: &'a str,
        recipient: &'a str,
        local: bool,
    },
    Vrfy(&'a str),
    Expn(&'a str),
}

pub use super::bindings::hooks::login::Protocol as LoginProtocol;

impl Hook<'_> {
    pub fn stage(&self) -> Stage {
        match self {
            Hook::Connect => Stage::Connect,
            Hook::Helo { .. } => Stage::Helo,
            Hook::Auth { .. } => Stage::Auth,
            Hook::Login { .. } => Stage::Login,
            Hook::MailFrom { .. } => Stage::MailFrom,
            Hook::Rcpt { .. } => Stage::Rcpt,
            Hook::Vrfy(_) => Stage::Vrfy,
            Hook::Expn(_) => Stage::Expn,
        }
    }
}

enum Call<'a> {
    Session(&'a SessionInfo, Hook<'a>),
    Data(
        &'a SessionInfo,
        &'a types::Envelope,
        &'a Arc<Vec<u8>>,
        &'a Arc<crate::message_auth::Verification>,
    ),
    Deliver(
        &'a types::Envelope,
        &'a types::DeliveryTarget,
        &'a Arc<Vec<u8>>,
    ),
    MailboxEvent(&'a MailboxEvent, &'a Arc<Vec<u8>>),
    Queued(&'a types::Envelope, &'a Arc<Vec<u8>>),
    Outbound(&'a types::Envelope, &'a str, &'a Arc<Vec<u8>>),
}

/// What `mailbox-event` plugins are told (WIT 0.2.0).
pub use super::bindings::hooks::mailbox_event::{
    Action as MailboxAction, Event as MailboxEvent, FolderRef,
};

impl Call<'_> {
    fn stage(&self) -> Stage {
        match self {
            Call::Session(_, hook) => hook.stage(),
            Call::Data(..) => Stage::Data,
            Call::Deliver(..) => Stage::Deliver,
            Call::MailboxEvent(..) => Stage::MailboxEvent,
            Call::Queued(..) => Stage::Queued,
            Call::Outbound(..) => Stage::Outbound,
        }
    }
}

enum Answer {
    /// A hook that only observes (mailbox-event).
    Observed,
    Decision(types::Decision),
    Data(types::DataVerdict),
    Delivery(types::Delivery),
    Lookup(types::LookupAnswer),
    Queued(QueuedVerdict),
    Outbound(OutboundVerdict),
}

use super::bindings::hooks::outbound::{OutboundDecision, OutboundVerdict, Route as WitRoute};
use super::bindings::hooks::queued::{QueuedDecision, QueuedVerdict};

impl PluginSession {
    pub fn new(runtime: Arc<PluginRuntime>) -> PluginSession {
        let set = runtime.current();
        let live = set.plugins.iter().map(|_| None).collect();
        PluginSession { runtime, set, live }
    }

    /// Picks up a reloaded plugin set. Called between transactions only, so a transaction
    /// finishes on the version it started with.
    pub fn refresh(&mut self) {
        if self.runtime.generation() != self.set.generation {
            *self = PluginSession::new(self.runtime.clone());
        }
    }

    pub fn has(&self, stage: Stage) -> bool {
        self.set.has(stage)
    }

    async fn instance(&mut self, index: usize) -> Result<&mut Live, PluginError> {
        if self.live[index].is_none() {
            let plugin = &self.set.plugins[index];
            let state = PluginState::new(plugin.meta.clone())
                .map_err(|e| PluginError::trap(&plugin.meta.name, &e))?;
            let mut store = Store::new(&self.runtime.engine, state);
            store.limiter(|state| &mut state.limits);
            // At every epoch tick the guest yields to the runtime (other sessions run), and is
            // stopped once its call's deadline has passed.
            store.epoch_deadline_callback(|store| {
                if std::time::Instant::now() >= store.data().deadline {
                    Err(wasmtime::Error::msg(DEADLINE_PASSED))
                } else {
                    Ok(wasmtime::UpdateDeadline::Yield(1))
                }
            });
            // Instantiation runs the guest's start code: it gets the same deadline as a call.
            store.data_mut().deadline = std::time::Instant::now() + plugin.timeout;
            store.set_epoch_deadline(1);
            let instance = plugin
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| PluginError::from_wasm(&plugin.meta.name, &e))?;
            let guests = Guests::load(&plugin.hooks, &mut store, &instance)
                .map_err(|e| PluginError::from_wasm(&plugin.meta.name, &e))?;
            self.live[index] = Some(Live { store, guests });
        }
        Ok(self.live[index].as_mut().expect("just created"))
    }

    /// Runs one plugin's hook with its deadline; a failed instance is dropped.
    async fn call(&mut self, index: usize, call: &Call<'_>) -> Result<Answer, PluginError> {
        let plugin = self.set.plugins[index].clone();
        // The after-queue filter holds no session: its deadline is its own, in seconds.
        let timeout = match call.stage() {
            Stage::Queued => plugin.queued_timeout,
            _ => plugin.timeout,
        };
        let run = async {
            let _running = super::engine::GuestRunning::start();
            let live = self.instance(index).await?;
            live.store.data_mut().deadline = std::time::Instant::now() + timeout;
            live.store.set_epoch_deadline(1);
            invoke(live, call)
                .await
                .map_err(|e| PluginError::from_wasm(&plugin.meta.name, &e))
        };
        // The epoch callback stops guest code at the deadline. Host calls that wait are outside
        // guest code (dns lookups, and WASI's poll, which every plugin has: a guest's
        // `sleep`), so every call also gets a timer.
        let result = tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| {
                Err(PluginError::Timeout {
                    name: plugin.meta.name.clone(),
                })
            });
        if result.is_err() {
            // A trapped or interrupted instance cannot be entered again.
            self.live[index] = None;
        }
        result
    }

    /// Runs a stage through the chain: the first answer other than continue wins.
    async fn run(&mut self, call: Call<'_>) -> Vec<(usize, Result<Answer, PluginError>)> {
        let stage = call.stage();
        let mut answers = Vec::new();
        for index in 0..self.set.plugins.len() {
            if !self.set.plugins[index].hooks.has(stage) {
                continue;
            }
            let started = std::time::Instant::now();
            let answer = self.call(index, &call).await;
            crate::telemetry::metrics::get().plugin_call(
                &self.set.plugins[index].meta.name,
                stage.name(),
                started.elapsed(),
                answer.is_err(),
            );
            let stop = match &answer {
                Ok(Answer::Observed) => false,
                Ok(Answer::Decision(types::Decision::Continue)) => false,
                Ok(Answer::Data(v)) => !matches!(v.decision, types::DataDecision::Continue),
                Ok(Answer::Delivery(types::Delivery::Continue)) => false,
                Ok(Answer::Lookup(types::LookupAnswer::Continue)) => false,
                Ok(Answer::Queued(v)) => !matches!(v.decision, QueuedDecision::Continue),
                Ok(Answer::Outbound(v)) => !matches!(v.decision, OutboundDecision::Continue),
                Ok(_) => true,
                Err(err) => {
                    tracing::warn!(plugin = %self.set.plugins[index].meta.name, "plugin failed: {err}");
                    self.set.plugins[index].on_error != OnError::Continue
                }
            };
            // Data and queued hooks: every plugin's modifications count, so all continue-ing plugins are kept.
            answers.push((index, answer));
            // Observers all hear an event, whatever another one did with it.
            if stop && stage != Stage::MailboxEvent {
                break;
            }
        }
        answers
    }

    fn plugin(&self, index: usize) -> &LoadedPlugin {
        &self.set.plugins[index]
    }

    /// The verdict of a decision stage (every hook but data, deliver, VRFY and EXPN).
    pub async fn decide(&mut self, session: &SessionInfo, hook: Hook<'_>) -> Verdict {
        let answers = self.run(Call::Session(session, hook)).await;
        let Some((index, last)) = answers.into_iter().last() else {
            return Verdict::Pass;
        };
        match last {
            Ok(Answer::Decision(decision)) => match decision_verdict(decision) {
                Ok(verdict) => verdict,
                Err(reason) => {
                    let err = PluginError::InvalidReply {
                        name: self.plugin(index).meta.name.clone(),
                        reason,
                    };
                    tracing::warn!("{err}");
                    on_error_verdict(self.plugin(index).on_error)
                }
            },
            Ok(_) => Verdict::Pass,
            Err(_) => on_error_verdict(self.plugin(index).on_error),
        }
    }

    pub async fn on_data(
        &mut self,
        s: &SessionInfo,
        envelope: &types::Envelope,
        message: &Arc<Vec<u8>>,
        authentication: &Arc<crate::message_auth::Verification>,
    ) -> DataOutcome {
        let mut outcome = DataOutcome {
            verdict: Verdict::Pass,
            discard: false,
            quarantine: None,
            changes: Changes::default(),
        };
        for (index, answer) in self
            .run(Call::Data(s, envelope, message, authentication))
            .await
        {
            let on_error = self.plugin(index).on_error;
            let name = self.plugin(index).meta.name.clone();
            let verdict = match answer {
                Ok(Answer::Data(verdict)) => verdict,
                Ok(_) => continue,
                Err(_) => {
                    outcome.verdict = on_error_verdict(on_error);
                    continue;
                }
            };
            if let Err(reason) = apply_data_verdict(&mut outcome, verdict) {
                tracing::warn!("{}", PluginError::InvalidReply { name, reason });
                outcome.verdict = on_error_verdict(on_error);
            }
        }
        outcome
    }

    pub async fn on_deliver(
        &mut self,
        envelope: &types::Envelope,
        target: &types::DeliveryTarget,
        message: &Arc<Vec<u8>>,
    ) -> Routing {
        let answers = self.run(Call::Deliver(envelope, target, message)).await;
        match answers.into_iter().last() {
            Some((_, Ok(Answer::Delivery(d)))) => match d {
                types::Delivery::Continue => Routing::Default,
                types::Delivery::Folder(f) => Routing::Folder(f),
                types::Delivery::Forward(a) => Routing::Forward(a),
                types::Delivery::Discard => Routing::Discard,
                types::Delivery::Defer(t) => Routing::Defer(t),
                types::Delivery::Fail(t) => Routing::Fail(t),
            },
            Some((index, Err(err))) => match self.plugin(index).on_error {
                OnError::Continue => Routing::Default,
                OnError::Tempfail => Routing::Defer(err.to_string()),
                OnError::Reject => Routing::Fail(err.to_string()),
            },
            _ => Routing::Default,
        }
    }

    /// The after-queue filters' outcome for a spooled message. A failing plugin gets its
    /// on-error policy: continue skips it, tempfail filters the message again later, reject
    /// bounces it.
    pub async fn on_queued(
        &mut self,
        envelope: &types::Envelope,
        message: &Arc<Vec<u8>>,
    ) -> QueuedOutcome {
        let mut outcome = QueuedOutcome {
            filtering: Filtering::Deliver,
            changes: Changes::default(),
        };
        let failed = |policy: OnError, why: String| match policy {
            OnError::Continue => None,
            OnError::Tempfail => Some(Filtering::Defer(why)),
            OnError::Reject => Some(Filtering::Bounce("Rejected by local policy".into())),
        };
        for (index, answer) in self.run(Call::Queued(envelope, message)).await {
            let on_error = self.plugin(index).on_error;
            let name = self.plugin(index).meta.name.clone();
            let verdict = match answer {
                Ok(Answer::Queued(verdict)) => verdict,
                Ok(_) => continue,
                Err(err) => {
                    if let Some(filtering) = failed(on_error, err.to_string()) {
                        outcome.filtering = filtering;
                    }
                    continue;
                }
            };
            let checked = apply_queued_verdict(&mut outcome, verdict);
            if let Err(reason) = checked {
                let err = PluginError::InvalidReply { name, reason };
                tracing::warn!("{err}");
                if let Some(filtering) = failed(on_error, err.to_string()) {
                    outcome.filtering = filtering;
                }
            }
        }
        outcome
    }

    /// Where one remote recipient's copy goes. A failing plugin gets its on-error policy:
    /// continue ignores it, tempfail defers the recipient, reject fails it.
    pub async fn on_outbound(
        &mut self,
        envelope: &types::Envelope,
        recipient: &str,
        message: &Arc<Vec<u8>>,
    ) -> Outbound {
        let mut route = OutboundRoute::Default;
        let mut require_tls = false;
        let mut sender: Option<String> = None;
        for (index, answer) in self.run(Call::Outbound(envelope, recipient, message)).await {
            let verdict = match answer {
                Ok(Answer::Outbound(verdict)) => verdict,
                Ok(_) => continue,
                Err(err) => match self.plugin(index).on_error {
                    OnError::Continue => continue,
                    OnError::Tempfail => return Outbound::Defer(err.to_string()),
                    OnError::Reject => return Outbound::Fail("Rejected by local policy".into()),
                },
            };
            require_tls |= verdict.require_tls;
            if let Some(new) = verdict.sender.filter(|_| sender.is_none()) {
                if new.is_empty() || crate::address::Address::parse(&new).is_some() {
                    sender = Some(new);
                } else {
                    let name = self.plugin(index).meta.name.clone();
                    let reason = format!("invalid sender {new:?}");
                    tracing::warn!("{}", PluginError::InvalidReply { name, reason });
                }
            }
            match verdict.decision {
                OutboundDecision::Continue => {}
                OutboundDecision::Route(WitRoute::Mx) => route = OutboundRoute::Mx,
                OutboundDecision::Route(WitRoute::Host(host)) => route = OutboundRoute::Host(host),
                OutboundDecision::Route(WitRoute::Transport(name)) => {
                    route = OutboundRoute::Transport(name)
                }
                OutboundDecision::Defer(why) => return Outbound::Defer(clean_reason(&why)),
                OutboundDecision::Fail(why) => return Outbound::Fail(clean_reason(&why)),
            }
        }
        Outbound::Send {
            route,
            require_tls,
            sender,
        }
    }

    /// Tells every plugin exporting `mailbox-event`; failures are logged (there is no one to
    /// answer: the client had its OK).
    pub async fn on_mailbox_event(&mut self, event: &MailboxEvent, message: &Arc<Vec<u8>>) {
        self.run(Call::MailboxEvent(event, message)).await;
    }

    /// The answer of VRFY or EXPN ([`Hook::Vrfy`], [`Hook::Expn`]).
    pub async fn lookup(&mut self, session: &SessionInfo, hook: Hook<'_>) -> Lookup {
        match self
            .run(Call::Session(session, hook))
            .await
            .into_iter()
            .last()
        {
            Some((index, Ok(Answer::Lookup(answer)))) => match lookup_reply(answer) {
                Ok(Some(reply)) => Lookup::Answer(reply),
                Ok(None) => Lookup::Default,
                Err(reason) => {
                    let name = self.plugin(index).meta.name.clone();
                    tracing::warn!("{}", PluginError::InvalidReply { name, reason });
                    lookup_error(self.plugin(index).on_error)
                }
            },
            Some((index, Err(_))) => lookup_error(self.plugin(index).on_error),
            _ => Lookup::Default,
        }
    }
}

/// Lends the message to one hook call as a `message` resource, taken back when the call
/// returns; evaluates to the call's result (or returns its error).
macro_rules! lending {
    ($store:ident, $message:expr, $authentication:expr, |$borrow:ident| $call:expr) => {{
        let handle = $store.data_mut().table.push(MessageView {
            bytes: Arc::clone($message),
            authentication: $authentication,
        })?;
        let $borrow = Resource::new_borrow(handle.rep());
        let result = $call.await;
        let _ = $store.data_mut().table.delete(handle);
        result?
    }};
}

async fn invoke(live: &mut Live, call: &Call<'_>) -> wasmtime::Result<Answer> {
    let store = &mut live.store;
    let g = &live.guests;
    let missing = || wasmtime::format_err!("hook not exported");
    Ok(match call {
        Call::Session(s, hook) => session_hook(store, g, s, *hook).await?,
        Call::Data(s, envelope, message, authentication) => {
            let hook = g.data.as_ref().ok_or_else(missing)?;
            let checks = Some(Arc::clone(authentication));
            Answer::Data(lending!(store, message, checks, |m| hook.call_on_data(
                &mut *store,
                s,
                envelope,
                m
            )))
        }
        Call::Deliver(envelope, target, message) => {
            let hook = g.deliver.as_ref().ok_or_else(missing)?;
            Answer::Delivery(lending!(store, message, None, |m| hook.call_on_deliver(
                &mut *store,
                envelope,
                target,
                m
            )))
        }
        Call::MailboxEvent(event, message) => {
            let hook = g.mailbox_event.as_ref().ok_or_else(missing)?;
            lending!(store, message, None, |m| hook.call_on_mailbox_event(
                &mut *store,
                event,
                m
            ));
            Answer::Observed
        }
        Call::Queued(envelope, message) => {
            let hook = g.queued.as_ref().ok_or_else(missing)?;
            Answer::Queued(lending!(store, message, None, |m| hook.call_on_queued(
                &mut *store,
                envelope,
                m
            )))
        }
        Call::Outbound(envelope, recipient, message) => {
            let hook = g.outbound.as_ref().ok_or_else(missing)?;
            Answer::Outbound(lending!(store, message, None, |m| hook.call_on_outbound(
                &mut *store,
                envelope,
                recipient,
                m
            )))
        }
    })
}

async fn session_hook(
    store: &mut Store<PluginState>,
    g: &Guests,
    s: &SessionInfo,
    hook: Hook<'_>,
) -> wasmtime::Result<Answer> {
    let missing = || wasmtime::format_err!("hook not exported");
    Ok(match hook {
        Hook::Connect => {
            let hook = g.connect.as_ref().ok_or_else(missing)?;
            Answer::Decision(hook.call_on_connect(&mut *store, s).await?)
        }
        Hook::Helo { name, extended } => {
            let hook = g.helo.as_ref().ok_or_else(missing)?;
            Answer::Decision(hook.call_on_helo(&mut *store, s, name, extended).await?)
        }
        Hook::Auth { mechanism, user } => {
            let hook = g.auth.as_ref().ok_or_else(missing)?;
            Answer::Decision(hook.call_on_auth(&mut *store, s, mechanism, user).await?)
        }
        Hook::Login {
            protocol,
            mechanism,
            user,
        } => {
            let hook = g.login.as_ref().ok_or_else(missing)?;
            Answer::Decision(
                hook.call_on_login(&mut *store, s, protocol, mechanism, user)
                    .await?,
            )
        }
        Hook::MailFrom { sender, size } => {
            let hook = g.mail_from.as_ref().ok_or_else(missing)?;
            Answer::Decision(hook.call_on_mail_from(&mut *store, s, sender, size).await?)
        }
        Hook::Rcpt {
            sender,
            recipient,
            local,
        } => {
            let hook = g.rcpt.as_ref().ok_or_else(missing)?;
            Answer::Decision(
                hook.call_on_rcpt(&mut *store, s, sender, recipient, local)
                    .await?,
            )
        }
        Hook::Vrfy(query) => {
            let hook = g.vrfy.as_ref().ok_or_else(missing)?;
            Answer::Lookup(hook.call_on_vrfy(&mut *store, s, query).await?)
        }
        Hook::Expn(list) => {
            let hook = g.expn.as_ref().ok_or_else(missing)?;
            Answer::Lookup(hook.call_on_expn(&mut *store, s, list).await?)
        }
    })
}

/// What a failing plugin's session gets.
pub fn on_error_verdict(policy: OnError) -> Verdict {
    match policy {
        OnError::Continue => Verdict::Pass,
        OnError::Tempfail => Verdict::Refuse(Reply::new(
            451,
            "4.3.0",
            "Temporary local problem, try again later",
        )),
        OnError::Reject => Verdict::Refuse(Reply::new(550, "5.7.0", "Rejected by local policy")),
    }
}

fn lookup_error(policy: OnError) -> Lookup {
    match on_error_verdict(policy) {
        Verdict::Refuse(reply) | Verdict::Disconnect(reply) => Lookup::Answer(reply),
        Verdict::Pass => Lookup::Default,
    }
}

/// Checks a plugin's reply against the class its decision needs.
pub fn validate_reply(
    reply: &types::Reply,
    allowed: std::ops::RangeInclusive<u16>,
) -> Result<Reply, String> {
    if !allowed.contains(&reply.code) {
        return Err(format!(
            "reply code {} not allowed here (expected {}-{})",
            reply.code,
            allowed.start(),
            allowed.end()
        ));
    }
    if !reply.enhanced.is_empty() {
        let parts: Vec<&str> = reply.enhanced.split('.').collect();
        let well_formed = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && parts[0] == (reply.code / 100).to_string();
        if !well_formed {
            return Err(format!(
                "enhanced status {:?} does not fit code {}",
                reply.enhanced, reply.code
            ));
        }
    }
    let text: String = reply
        .text
        .chars()
        .filter(|c| !c.is_control())
        .take(400)
        .collect();
    let text = if text.trim().is_empty() {
        "Refused by policy".to_string()
    } else {
        text
    };
    Ok(Reply::new(reply.code, reply.enhanced.clone(), text))
}

fn decision_verdict(decision: types::Decision) -> Result<Verdict, String> {
    Ok(match decision {
        types::Decision::Continue | types::Decision::Accept => Verdict::Pass,
        types::Decision::Reject(r) => Verdict::Refuse(validate_reply(&r, 500..=599)?),
        types::Decision::Tempfail(r) => Verdict::Refuse(validate_reply(&r, 400..=499)?),
        types::Decision::Disconnect(r) => {
            let reply = if r.code == 421 {
                validate_reply(&r, 421..=421)?
            } else {
                validate_reply(&r, 500..=599)?
            };
            Verdict::Disconnect(reply)
        }
    })
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 76
        && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

fn apply_data_verdict(
    outcome: &mut DataOutcome,
    verdict: types::DataVerdict,
) -> Result<(), String> {
    match verdict.decision {
        types::DataDecision::Continue | types::DataDecision::Accept => {}
        types::DataDecision::Reject(r) => {
            outcome.verdict = Verdict::Refuse(validate_reply(&r, 500..=599)?)
        }
        types::DataDecision::Tempfail(r) => {
            outcome.verdict = Verdict::Refuse(validate_reply(&r, 400..=499)?)
        }
        types::DataDecision::Disconnect(r) => {
            outcome.verdict = decision_verdict(types::Decision::Disconnect(r))?
        }
        types::DataDecision::Discard => outcome.discard = true,
        types::DataDecision::Quarantine(reason) => outcome.quarantine = Some(clean_reason(&reason)),
    }
    apply_modifications(&mut outcome.changes, verdict.modifications)
}

/// Checks a plugin's modifications and adds them to the chain's.
fn apply_modifications(
    changes: &mut Changes,
    modifications: Vec<types::Modification>,
) -> Result<(), String> {
    for modification in modifications {
        match modification {
            types::Modification::AddHeader(f) | types::Modification::InsertHeader(f)
                if !valid_header_name(&f.name) =>
            {
                return Err(format!("invalid header name {:?}", f.name));
            }
            types::Modification::AddHeader(f) => {
                changes.edits.push(Edit::Add(Field::new(&f.name, &f.value)))
            }
            types::Modification::InsertHeader(f) => changes
                .edits
                .push(Edit::Insert(Field::new(&f.name, &f.value))),
            types::Modification::ChangeHeader(c) => {
                if !valid_header_name(&c.name) {
                    return Err(format!("invalid header name {:?}", c.name));
                }
                changes.edits.push(Edit::Change {
                    name: c.name,
                    index: c.index,
                    value: c.value,
                })
            }
            // The host's own Received field is protected when the edits are applied.
            types::Modification::RemoveHeader(r) => changes.edits.push(Edit::Remove {
                name: r.name,
                index: r.index,
            }),
            types::Modification::ChangeSender(s) => changes.new_sender = Some(s),
            types::Modification::AddRecipient(r) => changes.add_recipients.push(r),
            types::Modification::RemoveRecipient(r) => changes.remove_recipients.push(r),
            types::Modification::ReplaceBody(b) => changes.edits.push(Edit::ReplaceBody(b)),
        }
    }
    Ok(())
}

fn clean_reason(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

fn apply_queued_verdict(outcome: &mut QueuedOutcome, verdict: QueuedVerdict) -> Result<(), String> {
    if verdict
        .modifications
        .iter()
        .any(|m| matches!(m, types::Modification::AddRecipient(_)))
    {
        return Err("add-recipient is not allowed after the queue".into());
    }
    let filtering = match verdict.decision {
        QueuedDecision::Continue => None,
        QueuedDecision::Quarantine(reason) => Some(Filtering::Quarantine(clean_reason(&reason))),
        QueuedDecision::Discard(reason) => Some(Filtering::Discard(clean_reason(&reason))),
        QueuedDecision::Bounce(reason) => Some(Filtering::Bounce(clean_reason(&reason))),
        QueuedDecision::Defer(reason) => Some(Filtering::Defer(clean_reason(&reason))),
    };
    let mut changes = outcome.changes.clone();
    apply_modifications(&mut changes, verdict.modifications)?;
    outcome.changes = changes;
    if let Some(filtering) = filtering {
        outcome.filtering = filtering;
    }
    Ok(())
}

fn mailbox_text(m: &types::Mailbox) -> String {
    match &m.display_name {
        Some(name) => format!("{} <{}>", name.replace(['"', '\r', '\n'], ""), m.address),
        None => format!("<{}>", m.address),
    }
}

fn lookup_reply(answer: types::LookupAnswer) -> Result<Option<Reply>, String> {
    Ok(Some(match answer {
        types::LookupAnswer::Continue => return Ok(None),
        types::LookupAnswer::Found(list) if list.is_empty() => {
            return Err("found with no mailbox".into())
        }
        types::LookupAnswer::Found(list) => Reply {
            code: 250,
            status: "2.1.5".into(),
            lines: list.iter().map(mailbox_text).collect(),
        },
        types::LookupAnswer::Forwarded(m) => Reply::new(
            251,
            "2.1.5",
            format!("User not local; will forward to {}", mailbox_text(&m)),
        ),
        types::LookupAnswer::CannotVerify => Reply::new(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        ),
        types::LookupAnswer::NotFound => Reply::new(550, "5.1.1", "No such user here"),
        types::LookupAnswer::Ambiguous(list) => Reply {
            code: 553,
            status: "5.1.4".into(),
            lines: std::iter::once("User ambiguous; possibilities are".to_string())
                .chain(list.iter().map(mailbox_text))
                .collect(),
        },
        types::LookupAnswer::Custom(r) => validate_reply(&r, 200..=599)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, enhanced: &str) -> types::Reply {
        types::Reply {
            code,
            enhanced: enhanced.into(),
            text: "no\r\n250 sneaky".into(),
        }
    }

    #[test]
    fn reply_classes_are_checked() {
        assert!(
            decision_verdict(types::Decision::Reject(reply(250, "2.0.0"))).is_err(),
            "2xx reject"
        );
        assert!(
            decision_verdict(types::Decision::Reject(reply(450, "4.7.1"))).is_err(),
            "4xx reject"
        );
        assert!(decision_verdict(types::Decision::Tempfail(reply(550, ""))).is_err());
        assert!(
            decision_verdict(types::Decision::Reject(reply(550, "4.7.1"))).is_err(),
            "class mismatch"
        );
        assert!(decision_verdict(types::Decision::Reject(reply(550, "5.7"))).is_err());
        let Ok(Verdict::Refuse(r)) = decision_verdict(types::Decision::Reject(reply(554, "5.7.1")))
        else {
            panic!()
        };
        assert_eq!(r.to_bytes(), b"554 5.7.1 no250 sneaky\r\n");
        assert!(matches!(
            decision_verdict(types::Decision::Disconnect(reply(421, "4.7.0"))),
            Ok(Verdict::Disconnect(_))
        ));
        assert!(decision_verdict(types::Decision::Disconnect(reply(451, ""))).is_err());
    }

    #[test]
    fn header_names_are_checked() {
        let mut outcome = DataOutcome {
            verdict: Verdict::Pass,
            discard: false,
            quarantine: None,
            changes: Changes::default(),
        };
        let bad = types::DataVerdict {
            decision: types::DataDecision::Continue,
            modifications: vec![types::Modification::AddHeader(types::HeaderField {
                name: "X-A: b".into(),
                value: "v".into(),
            })],
        };
        assert!(apply_data_verdict(&mut outcome, bad).is_err());
    }
}
