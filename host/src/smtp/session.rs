//! One SMTP session: an explicit state machine driven by one async loop (read a command with a
//! deadline, act, answer). Verb handlers live in `smtp::cmd`, one file per group.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{info, Instrument};

use super::body::BodyBuffer;
use super::codec::{LineEvent, LineFramer};
use super::reply::{common, Reply};
use super::SmtpServer;
use crate::auth::AuthUser;
use crate::config::{ListenerConfig, ListenerProtocol, TlsMode};
use crate::plugin::{Hook, Lookup, PluginSession, SessionInfo, Stage, Verdict};
use crate::queue::{QueueId, Recipient};
use crate::stream::{Io, ReadError, TlsInfo};

/// Where the session is in RFC 5321's command sequence.
pub enum Phase {
    /// Connected (or just upgraded to TLS); HELO/EHLO comes first.
    Greeting,
    /// Greeted; no mail transaction open.
    Idle,
    /// MAIL accepted; recipients (and BDAT chunks) are being collected.
    Transaction(Transaction),
}

/// An open mail transaction.
pub struct Transaction {
    pub id: QueueId,
    /// Reverse path; empty for `<>`.
    pub sender: String,
    pub smtputf8: bool,
    /// RET and ENVID of MAIL FROM (RFC 3461).
    pub dsn: crate::queue::Dsn,
    /// MAIL FROM carried REQUIRETLS (RFC 8689).
    pub require_tls: bool,
    pub recipients: Vec<Recipient>,
    /// RCPT commands tried, accepted or not (RFC 2920 §3.1: DATA answers 554 when all failed).
    pub rcpt_attempts: u32,
    /// RCPTs accepted but merged into an earlier recipient of the same mailbox. They still
    /// count against `max_recipients`, as in Postfix (which merges them only after accepting).
    pub merged_rcpts: usize,
    /// The body so far, once BDAT has started.
    pub chunks: Option<BodyBuffer>,
}

#[derive(Debug, Clone)]
pub struct Helo {
    pub name: String,
    pub extended: bool,
}

pub use crate::serve::Flow;

pub struct Session {
    /// Unique per server run (logs, plugins).
    pub id: u64,
    pub server: Arc<SmtpServer>,
    pub listener: Arc<ListenerConfig>,
    pub peer: SocketAddr,
    pub tls: Option<TlsInfo>,
    pub helo: Option<Helo>,
    pub auth: Option<AuthUser>,
    pub phase: Phase,
    pub errors: u32,
    pub auth_failures: u32,
    /// This session's plugin instances; None when no plugin is configured.
    pub plugins: Option<PluginSession>,
    /// A plugin asked to close the connection after the current reply.
    pub disconnect_after_reply: bool,
    /// The command being answered, for the reply counters (`connect` for the greeting).
    verb: &'static str,
    framer: LineFramer,
}

impl Session {
    pub fn new(
        server: Arc<SmtpServer>,
        listener: Arc<ListenerConfig>,
        peer: SocketAddr,
    ) -> Session {
        let max_line = server.config.limits.max_line_length;
        let plugins = server.plugins.clone().map(PluginSession::new);
        Session {
            id: crate::stream::next_session_id(),
            plugins,
            disconnect_after_reply: false,
            server,
            listener,
            peer,
            tls: None,
            helo: None,
            auth: None,
            phase: Phase::Greeting,
            errors: 0,
            auth_failures: 0,
            verb: "connect",
            framer: LineFramer::new(max_line),
        }
    }

    /// Runs the session to its end over any byte stream (a TCP socket, or an in-memory pipe in
    /// tests). Never panics on input; every way out sends a reply when one is owed.
    pub async fn run<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let span = tracing::info_span!("smtp", session = self.id, peer = %self.peer, listener = %self.listener.name);
        self.serve(stream).instrument(span).await
    }

    async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let timeout = self.server.config.limits.command_timeout();
        crate::serve::serve(self, stream, timeout).await
    }

    /// Reads the next command line; the whole line must arrive within the command timeout, so a
    /// client sending one byte at a time cannot hold the session open.
    pub async fn read_command<S>(&mut self, io: &mut Io<S>) -> Result<LineEvent, ReadError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let deadline = Instant::now() + self.server.config.limits.command_timeout();
        io.read_line(&mut self.framer, deadline).await
    }

    /// Queues a reply, counting client errors.
    pub fn answer<S>(&mut self, io: &mut Io<S>, reply: Reply) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if reply.code >= 500 || (reply.code == 452 && reply.status == "4.5.3") {
            self.errors += 1;
        }
        crate::telemetry::metrics::get().smtp_reply(self.verb, reply.code, &reply.status);
        io.queue(&reply.to_bytes());
        if reply.closes_connection() || std::mem::take(&mut self.disconnect_after_reply) {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    async fn dispatch<S>(&mut self, io: &mut Io<S>, line: &[u8]) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(err) => {
                self.verb = "unparsed";
                let reply = parse_error_reply(err);
                return self.answer(io, reply);
            }
        };
        self.verb = verb_name(&request);
        match request {
            Request::Ehlo { host } => {
                let reply = self.cmd_hello(&host, true).await;
                self.answer(io, reply)
            }
            Request::Helo { host } => {
                let reply = self.cmd_hello(&host, false).await;
                self.answer(io, reply)
            }
            Request::StartTls => self.cmd_starttls(io).await,
            Request::Auth {
                mechanism,
                initial_response,
            } => self.cmd_auth(io, mechanism, &initial_response).await,
            Request::Mail { from } => {
                let reply = self.cmd_mail(from).await;
                self.answer(io, reply)
            }
            Request::Rcpt { to } => {
                let reply = self.cmd_rcpt(to, line).await;
                self.answer(io, reply)
            }
            Request::Data => self.cmd_data(io).await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.cmd_bdat(io, chunk_size, is_last).await,
            Request::Rset => {
                if !matches!(self.phase, Phase::Greeting) {
                    self.phase = Phase::Idle;
                }
                self.answer(io, common::ok())
            }
            Request::Noop { .. } => self.answer(io, common::ok()),
            Request::Quit => {
                crate::telemetry::metrics::get().smtp_reply(self.verb, 221, "2.0.0");
                io.queue(&Reply::new(221, "2.0.0", "Bye").to_bytes());
                Flow::Close
            }
            Request::Help { .. } => self.answer(io, Self::cmd_help()),
            Request::Vrfy { value } => {
                let reply = self.cmd_vrfy(&value).await;
                self.answer(io, reply)
            }
            Request::Expn { value } => {
                let reply = self.cmd_expn(&value).await;
                self.answer(io, reply)
            }
            Request::Lhlo { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                self.answer(io, Reply::new(502, "5.5.1", "Command not implemented"))
            }
        }
    }

    pub fn plugins_have(&self, stage: Stage) -> bool {
        self.plugins.as_ref().is_some_and(|p| p.has(stage))
    }

    /// Runs a decision stage through the session's plugins: the reply it asks for, if any
    /// (a disconnect is remembered for the loop).
    pub async fn consult(&mut self, hook: Hook<'_>) -> Option<Reply> {
        if !self.plugins_have(hook.stage()) {
            return None;
        }
        let info = self.session_info();
        let plugins = self.plugins.as_mut()?;
        let verdict = plugins.decide(&info, hook).await;
        self.verdict_reply(verdict)
    }

    /// VRFY and EXPN through the plugins: their answer, or None for the server's default.
    pub async fn consult_lookup(&mut self, hook: Hook<'_>) -> Option<Reply> {
        if !self.plugins_have(hook.stage()) {
            return None;
        }
        let info = self.session_info();
        match self.plugins.as_mut()?.lookup(&info, hook).await {
            Lookup::Answer(reply) => Some(reply),
            Lookup::Default => None,
        }
    }

    /// The reply a plugin verdict asks for, if any; a disconnect is remembered for the loop.
    pub fn verdict_reply(&mut self, verdict: Verdict) -> Option<Reply> {
        match verdict {
            Verdict::Pass => None,
            Verdict::Refuse(reply) => Some(reply),
            Verdict::Disconnect(reply) => {
                self.disconnect_after_reply = true;
                Some(reply)
            }
        }
    }

    /// What plugins are told about this session.
    pub fn session_info(&self) -> SessionInfo {
        SessionInfo {
            id: self.id,
            listener: self.listener.name.clone(),
            peer_ip: self.peer.ip().to_string(),
            peer_port: self.peer.port(),
            tls: self.tls.is_some(),
            helo: self.helo.as_ref().map(|h| h.name.clone()),
            user: self.auth.as_ref().map(|u| u.0.clone()),
        }
    }

    /// Whether AUTH (and so plain passwords) may be used now.
    pub fn auth_allowed(&self) -> bool {
        self.tls.is_some() || self.listener.trusted
    }

    pub fn is_submission(&self) -> bool {
        self.listener.protocol == ListenerProtocol::Submission
    }

    pub fn data_timeout(&self) -> Duration {
        self.server.config.limits.data_timeout()
    }
}

fn parse_error_reply(err: smtp_proto::Error) -> Reply {
    use smtp_proto::Error;
    match err {
        Error::InvalidSenderAddress => Reply::new(501, "5.1.7", "Invalid sender address"),
        Error::InvalidRecipientAddress => Reply::new(501, "5.1.3", "Invalid recipient address"),
        Error::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("Syntax: {syntax}")),
        Error::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Invalid parameter {param:?}"))
        }
        Error::UnsupportedParameter { param } => Reply::new(
            555,
            "5.5.4",
            format!(
                "Unsupported parameter {:?}",
                param.chars().take(32).collect::<String>()
            ),
        ),
        Error::UnknownCommand | Error::NeedsMoreData { .. } => {
            Reply::new(500, "5.5.2", "Syntax error, command unrecognized")
        }
        Error::ResponseTooLong | Error::InvalidResponse { .. } => {
            Reply::new(500, "5.5.2", "Syntax error")
        }
    }
}

impl crate::serve::Protocol for Session {
    type Input = LineEvent;

    fn tls_mode(&self) -> TlsMode {
        self.listener.tls
    }

    fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.server.tls.clone()
    }

    fn tls_started(&mut self, info: TlsInfo) {
        self.tls = Some(info);
    }

    fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.server.shutdown.clone()
    }

    fn errors(&self) -> (u32, u32) {
        (self.errors, self.server.config.limits.max_errors)
    }

    async fn greet<S>(&mut self, io: &mut Io<S>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if let Some(reply) = self.consult(Hook::Connect).await {
            // RFC 5321 §3.1: a server may refuse a client with 554 (or 421) instead of 220.
            info!(code = reply.code, "connection refused by plugin");
            io.queue(&reply.to_bytes());
            return Flow::Close;
        }
        let banner = Reply::new(
            220,
            "",
            format!("{} ESMTP Postern", self.server.config.server.hostname),
        );
        io.queue(&banner.to_bytes());
        Flow::Continue
    }

    async fn next_input<S>(&mut self, io: &mut Io<S>) -> Result<LineEvent, ReadError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.read_command(io).await
    }

    async fn handle<S>(&mut self, io: &mut Io<S>, line: LineEvent) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        match line {
            LineEvent::Line(line) => self.dispatch(io, &line).await,
            LineEvent::TooLong => self.answer(io, common::line_too_long()),
            LineEvent::Incomplete => Flow::Continue,
        }
    }

    fn farewell(&self, why: crate::serve::Farewell) -> Vec<u8> {
        use crate::serve::Farewell;
        match why {
            Farewell::ShuttingDown => common::shutting_down(),
            Farewell::IdleTimeout => common::timeout(),
            Farewell::TooManyErrors => common::too_many_errors(),
        }
        .to_bytes()
    }
}

/// The command's name as a metric label: a closed set, whatever the client sent.
fn verb_name<T>(request: &Request<T>) -> &'static str {
    match request {
        Request::Ehlo { .. } => "ehlo",
        Request::Helo { .. } => "helo",
        Request::Lhlo { .. } => "lhlo",
        Request::StartTls => "starttls",
        Request::Auth { .. } => "auth",
        Request::Mail { .. } => "mail",
        Request::Rcpt { .. } => "rcpt",
        Request::Data => "data",
        Request::Bdat { .. } => "bdat",
        Request::Rset => "rset",
        Request::Noop { .. } => "noop",
        Request::Quit => "quit",
        Request::Help { .. } => "help",
        Request::Vrfy { .. } => "vrfy",
        Request::Expn { .. } => "expn",
        Request::Etrn { .. } => "etrn",
        Request::Atrn { .. } => "atrn",
        Request::Burl { .. } => "burl",
    }
}
