//! One POP3 session: AUTHORIZATION → TRANSACTION → UPDATE (RFC 1939 §3), driven by one async loop
//! (read a command by the idle deadline, act, answer). Replies are flushed only when no complete
//! command is waiting, which is all PIPELINING (RFC 2449 §6.6) asks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::codec::{self, Command, DotStuffer};
use super::maildrop::Maildrop;
use super::Pop3Server;
use crate::auth::{
    Attempt, AuthUser, Credentials, LoginVerdict, Mechanism, SaslError, SaslExchange, SaslStep,
};
use crate::config::{ListenerConfig, TlsMode};
use crate::framing::{LineEvent, LineFramer};
use crate::plugin::LoginProtocol;
use crate::store::{Flags, MessageInfo, StoreError};
use crate::stream::{Io, ReadError};

/// Bytes of a message queued before the session writes them out (keeps RETR of a large message
/// from doubling its size in memory).
const SEND_CHUNK: usize = 256 * 1024;

enum State {
    Authorization {
        /// The name given by USER, waiting for PASS.
        user: Option<String>,
    },
    Transaction(Maildrop),
}

use crate::serve::Flow;

/// What wakes a POP3 session: a command line, or a user losing the right to log in.
pub enum Input {
    Line(LineEvent),
    Revoked(crate::auth::Revocation),
}

pub struct Session {
    pub(crate) id: u64,
    server: Arc<Pop3Server>,
    listener: Arc<ListenerConfig>,
    peer: SocketAddr,
    tls: bool,
    state: State,
    errors: u32,
    auth_failures: u32,
    framer: LineFramer,
    /// Users who may no longer log in: the session ends when its user is one.
    revoked: tokio::sync::broadcast::Receiver<crate::auth::Revocation>,
    /// The APOP timestamp from the greeting (RFC 1939 §7), when APOP is offered.
    timestamp: Option<String>,
}

impl Session {
    pub fn new(
        server: Arc<Pop3Server>,
        listener: Arc<ListenerConfig>,
        peer: SocketAddr,
    ) -> Session {
        let id = crate::stream::next_session_id();
        let timestamp = server.users.apop_enabled().then(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!(
                "<{}.{id}.{nanos}@{}>",
                std::process::id(),
                server.config.server.hostname
            )
        });
        Session {
            id,
            revoked: server.users.revocations(),
            server,
            listener,
            peer,
            tls: false,
            state: State::Authorization { user: None },
            errors: 0,
            auth_failures: 0,
            framer: LineFramer::new(codec::MAX_LINE),
            timestamp,
        }
    }

    /// Runs the session over any byte stream. Never panics on input; a dropped connection
    /// changes nothing in the maildrop.
    pub async fn run<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let span = tracing::info_span!("pop3", session = self.id, peer = %self.peer, listener = %self.listener.name);
        self.serve(stream).instrument(span).await
    }

    async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let timeout = self.idle_timeout();
        crate::serve::serve(self, stream, timeout).await
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.server.config.pop3.idle_timeout_secs)
    }

    /// The next command line, by the idle deadline (RFC 1939 §3: at least 10 minutes).
    async fn read_line<S>(&mut self, io: &mut Io<S>) -> Result<LineEvent, ReadError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let deadline = Instant::now() + self.idle_timeout();
        io.read_line(&mut self.framer, deadline).await
    }

    /// Queues `-ERR`, counting it against the session's error allowance.
    fn error<S>(&mut self, io: &mut Io<S>, code: Option<&str>, text: &str) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.errors += 1;
        io.queue(&codec::err(code, text));
        Flow::Continue
    }

    fn plaintext_allowed(&self) -> bool {
        self.tls || self.listener.trusted
    }

    async fn dispatch<S>(&mut self, io: &mut Io<S>, line: &[u8]) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let command = match codec::parse(line) {
            Ok(command) => command,
            Err(err) => return self.error(io, None, &err.to_string()),
        };
        match command {
            Command::Capa => {
                io.queue(&self.capabilities());
                Flow::Continue
            }
            Command::Quit => self.quit(io).await,
            command if matches!(self.state, State::Transaction(_)) => {
                self.transaction(io, command).await
            }
            Command::Stls => self.stls(io).await,
            Command::User(name) => {
                if !self.plaintext_allowed() {
                    return self.error(
                        io,
                        Some("AUTH"),
                        "Plaintext authentication disallowed on non-secure connections",
                    );
                }
                self.state = State::Authorization { user: Some(name) };
                io.queue(&codec::ok("Send your password"));
                Flow::Continue
            }
            Command::Pass(password) => {
                let State::Authorization { user: Some(user) } =
                    std::mem::replace(&mut self.state, State::Authorization { user: None })
                else {
                    return self.error(io, None, "USER first");
                };
                if !self.throttle_allows(io) {
                    return Flow::Continue;
                }
                let credentials = Credentials::Password {
                    login: user.clone(),
                    password,
                };
                self.login(io, credentials, &user, "USER").await
            }
            Command::Apop { name, digest } => {
                let Some(stamp) = self.timestamp.clone() else {
                    return self.error(io, None, "APOP is not available");
                };
                if !self.throttle_allows(io) {
                    return Flow::Continue;
                }
                let credentials = Credentials::Apop {
                    login: name.clone(),
                    timestamp: stamp,
                    digest,
                };
                self.login(io, credentials, &name, "APOP").await
            }
            Command::Auth { mechanism, initial } => self.auth(io, mechanism, initial).await,
            _ => self.error(io, None, "Log in first"),
        }
    }

    fn capabilities(&self) -> Vec<u8> {
        let pop3 = &self.server.config.pop3;
        let mut lines = vec![
            "TOP".to_string(),
            "UIDL".into(),
            "RESP-CODES".into(),
            "AUTH-RESP-CODE".into(),
            "PIPELINING".into(),
        ];
        let authorizing = matches!(self.state, State::Authorization { .. });
        if authorizing && self.plaintext_allowed() {
            lines.push("USER".into());
            lines.push("SASL PLAIN LOGIN".into());
        }
        if authorizing && !self.tls && self.listener.tls == TlsMode::Starttls {
            lines.push("STLS".into());
        }
        lines.push(match pop3.expire_days {
            Some(days) => format!("EXPIRE {days}"),
            None => "EXPIRE NEVER".into(),
        });
        if pop3.login_delay_secs > 0 {
            lines.push(format!("LOGIN-DELAY {}", pop3.login_delay_secs));
        }
        lines.push("IMPLEMENTATION Postern".into());
        let mut out = codec::ok("Capability list follows");
        for line in lines {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    async fn stls<S>(&mut self, io: &mut Io<S>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let acceptor = match (&self.server.tls, self.listener.tls, self.tls) {
            (_, _, true) => return self.error(io, None, "TLS is already active"),
            (Some(acceptor), TlsMode::Starttls, false) => acceptor.clone(),
            _ => return self.error(io, None, "STLS is not available here"),
        };
        io.queue(&codec::ok("Begin TLS negotiation"));
        if io.flush().await.is_err() {
            return Flow::Close;
        }
        match io
            .start_tls(&acceptor, crate::stream::TLS_HANDSHAKE_TIMEOUT)
            .await
        {
            Ok(_) => {
                // RFC 2595 §4: forget everything learned before the handshake.
                self.tls = true;
                self.state = State::Authorization { user: None };
                self.framer = LineFramer::new(codec::MAX_LINE);
                Flow::Continue
            }
            Err(err) => {
                info!("STLS handshake failed: {err}");
                Flow::Close
            }
        }
    }

    fn throttle_allows<S>(&mut self, io: &mut Io<S>) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if self.server.login_gate.allows(self.peer.ip()) {
            return true;
        }
        info!("login refused: too many failures from this address");
        self.error(
            io,
            Some("SYS/TEMP"),
            "Too many failed logins from your address, try again later",
        );
        false
    }

    async fn auth<S>(
        &mut self,
        io: &mut Io<S>,
        mechanism: Option<String>,
        initial: Option<String>,
    ) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if !self.plaintext_allowed() {
            return self.error(
                io,
                Some("AUTH"),
                "Plaintext authentication disallowed on non-secure connections",
            );
        }
        let Some(name) = mechanism else {
            io.queue(&codec::ok("Mechanisms follow"));
            io.queue(b"PLAIN\r\nLOGIN\r\n.\r\n");
            return Flow::Continue;
        };
        let Some(mechanism) = Mechanism::parse(&name) else {
            return self.error(io, None, "Unsupported authentication mechanism");
        };
        if !self.throttle_allows(io) {
            return Flow::Continue;
        }
        let (mut exchange, mut step) = SaslExchange::start(mechanism, initial.as_deref());
        let (login, password) = loop {
            step = match step {
                SaslStep::Done(login, password) => break (login, password),
                SaslStep::Failed(SaslError::Cancelled) => {
                    return self.error(io, None, "Authentication cancelled")
                }
                SaslStep::Failed(SaslError::Malformed) => {
                    return self.error(io, None, "Cannot decode the response")
                }
                SaslStep::Challenge(challenge) => {
                    io.queue(format!("+ {challenge}\r\n").as_bytes());
                    match self.read_line(io).await {
                        Ok(LineEvent::Line(line)) => {
                            exchange.respond(&String::from_utf8_lossy(&line))
                        }
                        Ok(_) => return self.error(io, None, "Line too long"),
                        Err(_) => return Flow::Close,
                    }
                }
            };
        };
        let credentials = Credentials::Password {
            login: login.clone(),
            password,
        };
        self.login(io, credentials, &login, mechanism.name()).await
    }

    /// Finishes a login attempt: on success locks and opens the maildrop (TRANSACTION state).
    async fn login<S>(
        &mut self,
        io: &mut Io<S>,
        credentials: Credentials,
        login: &str,
        method: &str,
    ) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let attempt = Attempt::new(
            LoginProtocol::Pop3,
            method,
            self.id,
            &self.listener.name,
            self.peer,
            self.tls,
        );
        let user = match self.server.login_gate.check(&attempt, credentials).await {
            LoginVerdict::Accepted(AuthUser(user)) => Some(user),
            LoginVerdict::Refused => None,
            LoginVerdict::Vetoed { reply, disconnect } => {
                // RFC 3206: AUTH for a permanent refusal, SYS/TEMP for a passing one.
                let code = if reply.code >= 500 {
                    "AUTH"
                } else {
                    "SYS/TEMP"
                };
                let text = reply.lines.join(" ");
                if disconnect {
                    io.queue(&codec::err(Some(code), &text));
                    return Flow::Close;
                }
                return self.error(io, Some(code), &text);
            }
            LoginVerdict::Throttled => {
                self.throttle_allows(io);
                return Flow::Continue;
            }
        };
        let Some(user) = user else {
            self.auth_failures += 1;
            warn!(login = %login.chars().take(64).collect::<String>(), method, failures = self.auth_failures, "authentication failed");
            tokio::time::sleep(crate::auth::FAILURE_DELAY * self.auth_failures).await;
            if self.auth_failures >= self.server.config.limits.max_auth_failures {
                io.queue(&codec::err(
                    Some("AUTH"),
                    "Too many failed logins, closing connection",
                ));
                return Flow::Close;
            }
            return self.error(io, Some("AUTH"), "Authentication failed");
        };
        let Some(lock) = self.server.locks.try_lock(&user) else {
            info!(%user, "maildrop in use");
            return self.error(
                io,
                Some("IN-USE"),
                "Mailbox is locked by another POP3 session",
            );
        };
        // Checked (and recorded) once the maildrop is ours: an IN-USE refusal is no login.
        if !self.server.login_allowed(&user) {
            return self.error(io, Some("LOGIN-DELAY"), "Logged in too recently");
        }
        let store = self.server.store.clone();
        let key = user.clone();
        let snapshot = tokio::task::spawn_blocking(move || store.snapshot(&key, "INBOX")).await;
        let snapshot = match snapshot {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(err)) => {
                warn!(%user, "cannot open maildrop: {err}");
                return self.error(io, Some("SYS/TEMP"), "Cannot open the mailbox now");
            }
            Err(_) => return self.error(io, Some("SYS/TEMP"), "Cannot open the mailbox now"),
        };
        let maildrop = Maildrop::new(user.clone(), snapshot, lock);
        let (count, octets) = maildrop.stat();
        info!(%user, method, messages = count, "logged in");
        crate::telemetry::sessions::logged_in(self.id, &user);
        self.state = State::Transaction(maildrop);
        io.queue(&codec::ok(&format!(
            "Logged in, {count} messages ({octets} octets)"
        )));
        Flow::Continue
    }

    async fn transaction<S>(&mut self, io: &mut Io<S>, command: Command) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let State::Transaction(maildrop) = &mut self.state else {
            return Flow::Continue;
        };
        let reply = match command {
            Command::Stat => {
                let (count, octets) = maildrop.stat();
                codec::ok(&format!("{count} {octets}"))
            }
            Command::List(Some(n)) => match maildrop.get(n) {
                Ok(message) => codec::ok(&format!("{n} {}", message.size)),
                Err(err) => return self.error(io, None, &err.to_string()),
            },
            Command::List(None) => {
                let (count, octets) = maildrop.stat();
                let mut out = codec::ok(&format!("{count} messages ({octets} octets)"));
                for (n, message) in maildrop.live() {
                    out.extend_from_slice(format!("{n} {}\r\n", message.size).as_bytes());
                }
                out.extend_from_slice(b".\r\n");
                out
            }
            Command::Uidl(Some(n)) => match maildrop.get(n) {
                Ok(message) => codec::ok(&format!("{n} {}", maildrop.uidl(message))),
                Err(err) => return self.error(io, None, &err.to_string()),
            },
            Command::Uidl(None) => {
                let mut out = codec::ok("Unique-ID listing follows");
                for (n, message) in maildrop.live() {
                    out.extend_from_slice(format!("{n} {}\r\n", maildrop.uidl(message)).as_bytes());
                }
                out.extend_from_slice(b".\r\n");
                out
            }
            Command::Dele(n) => match maildrop.delete(n) {
                Ok(()) => codec::ok(&format!("Message {n} deleted")),
                Err(err) => return self.error(io, None, &err.to_string()),
            },
            Command::Rset => {
                maildrop.reset();
                let (count, octets) = maildrop.stat();
                codec::ok(&format!("{count} messages ({octets} octets)"))
            }
            Command::Noop => codec::ok(""),
            Command::Retr(n) => return self.send_message(io, n, None).await,
            Command::Top { message, lines } => {
                return self.send_message(io, message, Some(lines)).await
            }
            _ => return self.error(io, None, "Already logged in"),
        };
        io.queue(&reply);
        Flow::Continue
    }

    /// RETR (whole message) or TOP (header and `lines` body lines), dot-stuffed.
    async fn send_message<S>(&mut self, io: &mut Io<S>, number: u32, lines: Option<u32>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let State::Transaction(maildrop) = &mut self.state else {
            return Flow::Continue;
        };
        let message = match maildrop.get(number) {
            Ok(message) => message.clone(),
            Err(err) => return self.error(io, None, &err.to_string()),
        };
        let user = maildrop.user.clone();
        let store = self.server.store.clone();
        let info = message.clone();
        let read = tokio::task::spawn_blocking(move || store.read(&user, "INBOX", &info)).await;
        let content = match read {
            Ok(Ok(content)) => content,
            Ok(Err(StoreError::Gone(_))) => {
                return self.error(io, None, "Message was removed by another client")
            }
            Ok(Err(err)) => {
                warn!(uid = message.uid, "cannot read message: {err}");
                return self.error(io, Some("SYS/TEMP"), "Cannot read the message now");
            }
            Err(_) => return self.error(io, Some("SYS/TEMP"), "Cannot read the message now"),
        };
        let body = match lines {
            Some(lines) => {
                io.queue(&codec::ok("Top of message follows"));
                codec::top(&content, lines)
            }
            None => {
                maildrop.mark_retrieved(number);
                io.queue(&codec::ok(&format!("{} octets", content.len())));
                &content[..]
            }
        };
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::with_capacity(SEND_CHUNK.min(body.len()) + 64);
        for chunk in body.chunks(SEND_CHUNK) {
            stuffer.feed(chunk, &mut out);
            io.queue(&out);
            out.clear();
            if chunk.len() == SEND_CHUNK && io.flush().await.is_err() {
                return Flow::Close;
            }
        }
        stuffer.finish(&mut out);
        io.queue(&out);
        Flow::Continue
    }

    /// QUIT: in TRANSACTION, the UPDATE state removes what was deleted (RFC 1939 §6).
    async fn quit<S>(&mut self, io: &mut Io<S>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let State::Transaction(maildrop) =
            std::mem::replace(&mut self.state, State::Authorization { user: None })
        else {
            io.queue(&codec::ok("Bye"));
            return Flow::Close;
        };
        let expire_days = self.server.config.pop3.expire_days;
        let now = chrono::Utc::now().timestamp();
        let update = maildrop.update(|message, retrieved| match expire_days {
            Some(days) => {
                (retrieved || message.flags.contains(Flags::SEEN))
                    && now - message.received_at >= i64::from(days) * 86_400
            }
            None => false,
        });
        let remove: Vec<MessageInfo> = update.remove.into_iter().cloned().collect();
        let seen: Vec<MessageInfo> = update.mark_seen.into_iter().cloned().collect();
        let store = self.server.store.clone();
        let user = maildrop.user.clone();
        let removed = remove.len();
        let result = tokio::task::spawn_blocking(move || {
            store.remove(&user, "INBOX", &remove.iter().collect::<Vec<_>>())?;
            store.add_flags(
                &user,
                "INBOX",
                &seen.iter().collect::<Vec<_>>(),
                Flags::SEEN,
            )
        })
        .await;
        // The maildrop (and its lock) is released only now that UPDATE is done.
        drop(maildrop);
        match result {
            Ok(Ok(())) => {
                info!(removed, "logged out");
                io.queue(&codec::ok(&format!(
                    "Logging out ({removed} messages removed)"
                )));
            }
            Ok(Err(err)) => {
                warn!("UPDATE failed: {err}");
                io.queue(&codec::err(
                    Some("SYS/TEMP"),
                    "Some deleted messages were not removed",
                ));
            }
            Err(_) => io.queue(&codec::err(
                Some("SYS/TEMP"),
                "Some deleted messages were not removed",
            )),
        }
        Flow::Close
    }
}

impl crate::serve::Protocol for Session {
    type Input = Input;

    fn tls_mode(&self) -> TlsMode {
        self.listener.tls
    }

    fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.server.tls.clone()
    }

    fn tls_started(&mut self, _info: crate::stream::TlsInfo) {
        self.tls = true;
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
        let greeting = match &self.timestamp {
            Some(stamp) => format!("Postern POP3 ready {stamp}"),
            None => "Postern POP3 ready".to_string(),
        };
        io.queue(&codec::ok(&greeting));
        Flow::Continue
    }

    async fn next_input<S>(&mut self, io: &mut Io<S>) -> Result<Input, ReadError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let deadline = Instant::now() + self.idle_timeout();
        tokio::select! {
            line = io.read_line(&mut self.framer, deadline) => line.map(Input::Line),
            Ok(user) = self.revoked.recv() => Ok(Input::Revoked(user)),
        }
    }

    async fn handle<S>(&mut self, io: &mut Io<S>, input: Input) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        match input {
            Input::Line(LineEvent::Line(line)) => self.dispatch(io, &line).await,
            Input::Line(LineEvent::TooLong) => self.error(io, None, "Line too long"),
            Input::Line(LineEvent::Incomplete) => Flow::Continue,
            Input::Revoked(revoked) => match &self.state {
                State::Transaction(maildrop)
                    if maildrop.user.eq_ignore_ascii_case(&revoked.user) =>
                {
                    tracing::info!(user = %revoked.user, why = ?revoked.why, "login revoked; closing the session");
                    // Nothing is expunged: the session did not end with QUIT (RFC 1939 §6).
                    // RFC 3206: [AUTH] for a login no longer allowed, [SYS/TEMP] otherwise.
                    let code = match revoked.why {
                        crate::auth::Revoked::Disabled => "AUTH",
                        crate::auth::Revoked::Kicked => "SYS/TEMP",
                    };
                    io.queue(&codec::err(Some(code), revoked.why.text()));
                    Flow::Close
                }
                _ => Flow::Continue,
            },
        }
    }

    fn farewell(&self, why: crate::serve::Farewell) -> Vec<u8> {
        use crate::serve::Farewell;
        match why {
            Farewell::ShuttingDown => codec::err(Some("SYS/TEMP"), "Server shutting down"),
            Farewell::IdleTimeout => codec::err(None, "Idle for too long, closing"),
            Farewell::TooManyErrors => codec::err(None, "Too many errors, closing"),
        }
    }
}
