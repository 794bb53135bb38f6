//! STARTTLS (RFC 9051 §6.2.1), AUTHENTICATE (§6.2.2, SASL-IR) and LOGIN (§6.2.3) through the
//! login gate, the special-use folders made at first login (RFC 6154), and COMPRESS (RFC 4978).

use std::borrow::Cow;

use crate::auth::{
    Attempt, AuthUser, Credentials, LoginVerdict, Mechanism, SaslError, SaslExchange, SaslStep,
};
use crate::config::TlsMode;
use crate::imap::codec::{self, Event, Mode};
use crate::plugin::LoginProtocol;
use crate::store::StoreError;
use crate::stream::Io;
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::secret::Secret;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::imap::code::Code;
use crate::imap::session::*;

impl Conn {
    pub(in crate::imap) async fn starttls<S>(&mut self, io: &mut Io<S>, tag: &str) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let acceptor = match (&self.server.tls, self.listener.tls, self.tls) {
            (_, _, true) => return Done::Bad("TLS is already active".into()),
            (Some(acceptor), TlsMode::Starttls, false) => acceptor.clone(),
            _ => return Done::Bad("STARTTLS is not available here".into()),
        };
        io.queue(&codec::status(
            Some(tag),
            "OK",
            None,
            "Begin TLS negotiation now",
        ));
        if io.flush().await.is_err() {
            return Done::Close;
        }
        match io
            .start_tls(&acceptor, crate::stream::TLS_HANDSHAKE_TIMEOUT)
            .await
        {
            Ok(_) => {
                self.tls = true;
                // Nothing sent before the handshake may be obeyed after it.
                self.reader.reset();
                Done::Sent
            }
            Err(err) => {
                info!("STARTTLS handshake failed: {err}");
                Done::Close
            }
        }
    }

    pub(in crate::imap) fn throttle_allows(&self) -> bool {
        if self.server.login_gate.allows(self.peer.ip()) {
            return true;
        }
        info!("login refused: too many failures from this address");
        false
    }

    /// RFC 4978 §3: DEFLATE is the only algorithm imap-codec parses.
    pub(in crate::imap) async fn compress<S>(&mut self, io: &mut Io<S>, tag: &str) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if io.is_compressed() {
            return no(Some(Code::CompressionActive), "DEFLATE is already active");
        }
        // The OK goes out uncompressed; everything after it in both directions is not.
        io.queue(&codec::status(Some(tag), "OK", None, "DEFLATE active"));
        if io.flush().await.is_err() {
            return Done::Close;
        }
        io.start_deflate();
        self.reader.reset();
        Done::Sent
    }

    pub(in crate::imap) async fn login_command<S>(
        &mut self,
        io: &mut Io<S>,
        state: &mut State,
        username: AString<'static>,
        password: Secret<AString<'static>>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if !self.plaintext_allowed() {
            return no(Some(Code::PrivacyRequired), "Use STARTTLS first");
        }
        let login = String::from_utf8_lossy(username.as_ref()).into_owned();
        let password = String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
        self.login(io, state, login, password, "LOGIN").await
    }

    pub(in crate::imap) async fn authenticate<S>(
        &mut self,
        io: &mut Io<S>,
        state: &mut State,
        mechanism: AuthMechanism<'static>,
        initial_response: Option<Secret<Cow<'static, [u8]>>>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // SASL-IR (RFC 4959 §3): an empty initial response is sent as `=`.
        let initial = initial_response.map(|r| {
            use base64::Engine as _;
            let bytes = r.declassify();
            if bytes.is_empty() {
                "=".to_string()
            } else {
                base64::engine::general_purpose::STANDARD.encode(bytes.as_ref())
            }
        });
        let mechanism = mechanism.as_ref();
        if !self.plaintext_allowed() {
            return no(Some(Code::PrivacyRequired), "Use STARTTLS first");
        }
        let Some(mechanism) = Mechanism::parse(mechanism) else {
            return no(Some(Code::Cannot), "Unsupported authentication mechanism");
        };
        let (mut exchange, mut step) = SaslExchange::start(mechanism, initial.as_deref());
        let (login, password) = loop {
            step = match step {
                SaslStep::Done(login, password) => break (login, password),
                SaslStep::Failed(SaslError::Cancelled) => {
                    return Done::Bad("Authentication cancelled".into())
                }
                SaslStep::Failed(SaslError::Malformed) => {
                    return Done::Bad("Cannot decode the response".into())
                }
                SaslStep::Challenge(challenge) => {
                    io.queue(format!("+ {challenge}\r\n").as_bytes());
                    let deadline = Instant::now() + self.idle_timeout();
                    match read_event(&mut self.reader, io, Mode::Line, deadline).await {
                        Ok(Event::Line(line)) => exchange.respond(&String::from_utf8_lossy(&line)),
                        Ok(_) => return Done::Bad("Malformed response".into()),
                        Err(_) => return Done::Close,
                    }
                }
            };
        };
        self.login(io, state, login, password.0, mechanism.name())
            .await
    }

    pub(in crate::imap) async fn login<S>(
        &mut self,
        io: &mut Io<S>,
        state: &mut State,
        login: String,
        password: String,
        method: &str,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if !self.throttle_allows() {
            return no(
                Some(Code::Unavailable),
                "Too many failed logins from your address, try again later",
            );
        }
        let credentials = Credentials::Password {
            login: login.clone(),
            password: crate::auth::Secret(password),
        };
        let attempt = Attempt::new(
            LoginProtocol::Imap,
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
                // A 5xx refusal is final for these credentials; a 4xx one may pass later.
                let code = if reply.code >= 500 {
                    Code::AuthenticationFailed
                } else {
                    Code::Unavailable
                };
                let text = reply.lines.join(" ");
                if disconnect {
                    io.queue(format!("* BYE {text}\r\n").as_bytes());
                    return Done::Close;
                }
                return no(Some(code), &text);
            }
            LoginVerdict::Throttled => {
                return no(
                    Some(Code::Unavailable),
                    "Too many failed logins from your address, try again later",
                )
            }
        };
        let Some(user) = user else {
            self.auth_failures += 1;
            warn!(login = %login.chars().take(64).collect::<String>(), method, failures = self.auth_failures, "authentication failed");
            tokio::time::sleep(crate::auth::FAILURE_DELAY * self.auth_failures).await;
            if self.auth_failures >= self.server.config.limits.max_auth_failures {
                io.queue(b"* BYE Too many failed logins, closing connection\r\n");
                return Done::Close;
            }
            return no(Some(Code::AuthenticationFailed), "Authentication failed");
        };
        info!(%user, method, "logged in");
        crate::telemetry::sessions::logged_in(self.id, &user);
        self.make_special_folders(&user).await;
        self.drain_changes(&user, None);
        *state = State::LoggedIn {
            user,
            selected: None,
        };
        self.reader.set_literal_limit(
            self.server.config.imap.append_limit,
            Some(self.server.budget.clone()),
        );
        Done::Ok(
            Some(Code::Capability(self.capabilities(state))),
            "Logged in".into(),
        )
    }

    /// Creates (and subscribes) the configured special-use folders a user does not have yet.
    pub(in crate::imap) async fn make_special_folders(&self, user: &str) {
        let wanted: Vec<String> = self
            .server
            .config
            .imap
            .special_folders
            .keys()
            .cloned()
            .collect();
        let store = self.store.clone();
        let user = user.to_string();
        let made = blocking(move || {
            let existing = store.folders(&user)?;
            let mut made = Vec::new();
            for folder in wanted {
                if existing.contains(&folder) {
                    continue;
                }
                match store.create_folder(&user, &folder) {
                    Ok(()) | Err(StoreError::Exists(_)) => {}
                    Err(err) => return Err(err),
                }
                store.set_subscribed(&user, &folder, true)?;
                made.push(folder);
            }
            Ok(made)
        })
        .await;
        match made {
            Ok(made) if !made.is_empty() => info!(folders = ?made, "special-use folders created"),
            Ok(_) => {}
            Err(err) => warn!("cannot create special-use folders: {err}"),
        }
    }
}
