//! AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN, only over TLS or on trusted listeners.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::auth::{
    Attempt, Credentials, LoginVerdict, Mechanism, SaslError, SaslExchange, SaslStep, Secret,
    FAILURE_DELAY,
};
use crate::plugin::{Hook, LoginProtocol};
use crate::smtp::codec::LineEvent;
use crate::smtp::reply::{common, Reply};
use crate::smtp::session::{Flow, Phase, Session};
use crate::stream::{Io, ReadError};

enum Exchange<T> {
    Done(T),
    /// The exchange ended with this reply (cancelled, malformed, too long).
    Reply(Reply),
    /// The connection is gone or timed out.
    Lost(ReadError),
}

impl Session {
    pub async fn cmd_auth<S>(&mut self, io: &mut Io<S>, mechanism: u64, initial: &str) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if self.helo.is_none() {
            return self.answer(io, common::bad_sequence("Send EHLO first"));
        }
        if self.auth.is_some() {
            return self.answer(io, common::bad_sequence("Already authenticated"));
        }
        if matches!(self.phase, Phase::Transaction(_)) {
            return self.answer(
                io,
                common::bad_sequence("AUTH not allowed during a transaction"),
            );
        }
        if !self.auth_allowed() {
            return self.answer(io, common::tls_required());
        }
        let ip = self.peer.ip();
        if !self.server.login_gate.allows(ip) {
            return self.answer(io, throttled());
        }
        let mechanism = match mechanism {
            smtp_proto::AUTH_PLAIN => Mechanism::Plain,
            smtp_proto::AUTH_LOGIN => Mechanism::Login,
            _ => {
                return self.answer(
                    io,
                    Reply::new(504, "5.5.4", "Unrecognized authentication type"),
                )
            }
        };
        let mechanism_name = mechanism.name();
        let (login, password) = match self.sasl(io, mechanism, initial).await {
            Exchange::Done(pair) => pair,
            Exchange::Reply(reply) => return self.answer(io, reply),
            Exchange::Lost(ReadError::Timeout) => {
                io.queue(&common::timeout().to_bytes());
                return Flow::Close;
            }
            Exchange::Lost(_) => return Flow::Close,
        };
        let credentials = Credentials::Password {
            login: login.clone(),
            password,
        };
        let attempt = Attempt {
            protocol: LoginProtocol::Smtp,
            mechanism: mechanism_name,
            ip,
            session: self.session_info(),
        };
        match self.server.login_gate.check(&attempt, credentials).await {
            LoginVerdict::Throttled => self.answer(io, throttled()),
            LoginVerdict::Vetoed { reply, disconnect } => {
                self.disconnect_after_reply |= disconnect;
                self.answer(io, reply)
            }
            LoginVerdict::Accepted(user) => {
                let hook = Hook::Auth {
                    mechanism: mechanism_name,
                    user: &user.0,
                };
                if let Some(reply) = self.consult(hook).await {
                    info!(user = %user.0, code = reply.code, "login refused by plugin");
                    return self.answer(io, reply);
                }
                info!(user = %user.0, "authenticated");
                crate::telemetry::sessions::logged_in(self.id, &user.0);
                self.auth = Some(user);
                self.answer(io, Reply::new(235, "2.7.0", "Authentication successful"))
            }
            LoginVerdict::Refused => {
                self.auth_failures += 1;
                warn!(login = %login.chars().take(64).collect::<String>(), failures = self.auth_failures, "authentication failed");
                tokio::time::sleep(FAILURE_DELAY * self.auth_failures).await;
                if self.auth_failures >= self.server.config.limits.max_auth_failures {
                    io.queue(
                        &Reply::new(
                            421,
                            "4.7.0",
                            "Too many failed authentications, closing connection",
                        )
                        .to_bytes(),
                    );
                    return Flow::Close;
                }
                self.answer(
                    io,
                    Reply::new(535, "5.7.8", "Authentication credentials invalid"),
                )
            }
        }
    }

    /// Runs the SASL exchange: 334 challenges until the client has given its credentials.
    async fn sasl<S>(
        &mut self,
        io: &mut Io<S>,
        mechanism: Mechanism,
        initial: &str,
    ) -> Exchange<(String, Secret<String>)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut exchange, mut step) =
            SaslExchange::start(mechanism, (!initial.is_empty()).then_some(initial));
        loop {
            step = match step {
                SaslStep::Done(login, password) => return Exchange::Done((login, password)),
                SaslStep::Failed(err) => return Exchange::Reply(sasl_error_reply(err)),
                SaslStep::Challenge(challenge) => match self.challenge(io, &challenge).await {
                    Exchange::Done(line) => exchange.respond(&line),
                    Exchange::Reply(r) => return Exchange::Reply(r),
                    Exchange::Lost(e) => return Exchange::Lost(e),
                },
            };
        }
    }

    /// Sends a 334 challenge and reads the client's response line.
    async fn challenge<S>(&mut self, io: &mut Io<S>, challenge: &str) -> Exchange<String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        io.queue(format!("334 {challenge}\r\n").as_bytes());
        match self.read_command(io).await {
            Ok(LineEvent::Line(line)) => {
                Exchange::Done(String::from_utf8_lossy(&line).into_owned())
            }
            Ok(_) => Exchange::Reply(Reply::new(
                500,
                "5.5.6",
                "Authentication exchange line is too long",
            )),
            Err(err) => Exchange::Lost(err),
        }
    }
}

/// The client's address used up its failed logins for the window (counted over every protocol).
fn throttled() -> Reply {
    info!("AUTH refused: too many failures from this address");
    Reply::new(
        454,
        "4.7.0",
        "Too many failed authentications, try again later",
    )
}

fn sasl_error_reply(err: SaslError) -> Reply {
    match err {
        SaslError::Cancelled => Reply::new(501, "5.7.0", "Authentication cancelled"),
        SaslError::Malformed => Reply::new(501, "5.5.2", "Cannot decode response"),
    }
}
