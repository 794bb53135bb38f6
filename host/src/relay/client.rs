//! The outbound SMTP client: one transaction to one host (RFC 5321 §4, §3.3), with EHLO (HELO
//! fallback), STARTTLS (RFC 3207) as the TLS policy asks, AUTH PLAIN for a smarthost, PIPELINING
//! (RFC 2920) when offered, SIZE (RFC 1870), 8BITMIME and SMTPUTF8, DSN parameters (RFC 3461)
//! and REQUIRETLS (RFC 8689) when offered, and one outcome per recipient.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::ServerName;
use smtp_proto::{
    EhloResponse, EXT_8BIT_MIME, EXT_DSN, EXT_PIPELINING, EXT_REQUIRE_TLS, EXT_SIZE, EXT_SMTP_UTF8,
    EXT_START_TLS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::framing::DotStuffer;
use crate::queue::Ticket;

/// Longest reply accepted from a server (all lines of a multi-line reply together).
const MAX_REPLY: usize = 64 * 1024;
/// RFC 5321 §4.5.3.2.6: the reply to the final dot may take up to 10 minutes.
const FINAL_REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// A server's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of every line, joined with a space.
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
    /// The enhanced status code (RFC 3463) at the start of the text, if any.
    pub fn status(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let parts: Vec<&str> = first.split('.').collect();
        (parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit())))
        .then_some(first)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Collects one (possibly multi-line) reply from buffered bytes (sans-IO). Returns the reply and
/// the number of bytes it took, or None when more input is needed.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    while let Some(end) = memchr::memchr(b'\n', &buf[pos..]) {
        let line = &buf[pos..pos + end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += end + 1;
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(format!(
                "malformed reply line {:?}",
                String::from_utf8_lossy(line)
            ));
        }
        let this: u16 = std::str::from_utf8(&line[..3])
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or("bad reply code")?;
        if *code.get_or_insert(this) != this {
            return Err("reply lines disagree on the code".into());
        }
        let last = line.len() == 3 || line[3] == b' ';
        if line.len() > 3 && !matches!(line[3], b' ' | b'-') {
            return Err("malformed reply separator".into());
        }
        lines.push(String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned());
        if last {
            return Ok(Some((
                Reply {
                    code: this,
                    text: lines.join(" "),
                },
                pos,
            )));
        }
    }
    if buf.len() > MAX_REPLY {
        return Err("reply too long".into());
    }
    Ok(None)
}

/// A client connection, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How the connection to this host must be protected.
#[derive(Clone)]
pub enum TlsPlan {
    None,
    /// STARTTLS if offered.
    Opportunistic(TlsConnector),
    /// STARTTLS required.
    Required(TlsConnector),
    /// TLS from the first byte (a smarthost on port 465).
    Implicit(TlsConnector),
}

/// What one transaction is asked to do.
pub struct Job<'a> {
    /// The name we give in EHLO.
    pub helo: &'a str,
    /// The host name (for TLS server name checks and logs).
    pub host: &'a str,
    pub tls: TlsPlan,
    pub auth: Option<(&'a str, &'a str)>,
    pub sender: &'a str,
    pub recipients: &'a [String],
    /// The message with CRLF line endings.
    pub message: &'a [u8],
    pub smtputf8: bool,
    /// ESMTP parameters given only to servers that offer DSN (RFC 3461 §4): MAIL's
    /// (` RET=HDRS ENVID=…`) and each recipient's (` NOTIFY=… ORCPT=…`), in recipient order.
    pub dsn_mail: &'a str,
    pub dsn_rcpts: &'a [String],
    /// RFC 8689 §4.2.1: the message was sent with REQUIRETLS, so the server must offer it (over
    /// the TLS the plan already requires) or the message is not sent.
    pub require_tls: bool,
    /// Checked before the final dot: a node that may have lost the message to another sends
    /// no dot, so the remote discards the transaction (RFC 5321 §3.8) instead of taking a
    /// copy the other node sends too.
    pub ticket: &'a Ticket,
    pub command_timeout: Duration,
}

/// What became of one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// `dsn`: the server offers DSN and was given the parameters, so it reports from now on.
    Delivered {
        reply: Reply,
        dsn: bool,
    },
    Temporary(Reply),
    Permanent(Reply),
}

/// How a transaction with a host ended.
#[derive(Debug)]
pub enum HostOutcome {
    /// The transaction reached the recipients: one outcome each, in order.
    Done(Vec<RcptOutcome>),
    /// The host could not take the message now (connection, greeting, EHLO, TLS, or a
    /// transaction-level 4xx): the next host may be tried. `permanent` when it said 5xx.
    Failed { reason: Reply, permanent: bool },
    /// The TLS handshake failed after the server agreed to STARTTLS, so the connection is
    /// unusable. Under opportunistic TLS the same host is worth a plaintext connection.
    HandshakeFailed(Reply),
}

#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for the server")]
    Timeout,
    #[error("connection closed by the server")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Local errors reported like a server's temporary reply, for logs and DSNs.
    fn as_reply(&self) -> Reply {
        Reply {
            code: 451,
            text: format!("4.4.2 {self}"),
        }
    }
}

struct Client {
    stream: Stream,
    input: Vec<u8>,
    timeout: Duration,
}

impl Client {
    /// The next reply and its raw bytes, by the timeout.
    async fn reply_raw(&mut self, timeout: Duration) -> Result<(Reply, Vec<u8>), ClientError> {
        loop {
            match parse_reply(&self.input).map_err(ClientError::Protocol)? {
                Some((reply, used)) => {
                    let raw: Vec<u8> = self.input.drain(..used).collect();
                    return Ok((reply, raw));
                }
                None => {
                    self.input.reserve(4096);
                    let read = tokio::time::timeout(timeout, self.stream.read_buf(&mut self.input))
                        .await
                        .map_err(|_| ClientError::Timeout)??;
                    if read == 0 {
                        return Err(ClientError::Closed);
                    }
                }
            }
        }
    }

    async fn reply(&mut self) -> Result<Reply, ClientError> {
        Ok(self.reply_raw(self.timeout).await?.0)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        tokio::time::timeout(self.timeout, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout)??;
        Ok(())
    }

    async fn command(&mut self, line: &str) -> Result<Reply, ClientError> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// EHLO, or HELO when EHLO is refused. Returns the extensions (none after HELO).
    async fn greet(
        &mut self,
        helo: &str,
    ) -> Result<Result<EhloResponse<String>, Reply>, ClientError> {
        self.send(format!("EHLO {helo}\r\n").as_bytes()).await?;
        let (reply, raw) = self.reply_raw(self.timeout).await?;
        if reply.code == 250 {
            return match EhloResponse::parse(&mut raw.iter()) {
                Ok(ehlo) => Ok(Ok(ehlo)),
                Err(err) => Err(ClientError::Protocol(format!("EHLO reply: {err:?}"))),
            };
        }
        // RFC 5321 §3.2: a server that does not know EHLO answers 5xx (not 554); try HELO.
        if reply.code >= 500 && reply.code != 554 {
            let helo_reply = self.command(&format!("HELO {helo}")).await?;
            if helo_reply.code == 250 {
                return Ok(Ok(EhloResponse::default()));
            }
            return Ok(Err(helo_reply));
        }
        Ok(Err(reply))
    }

    async fn start_tls(self, connector: &TlsConnector, host: &str) -> Result<Client, ClientError> {
        let Stream::Plain(tcp) = self.stream else {
            return Err(ClientError::Protocol("TLS is already active".into()));
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| ClientError::Protocol(format!("{host:?} is not a TLS server name")))?;
        let tls = tokio::time::timeout(self.timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| ClientError::Timeout)??;
        Ok(Client {
            stream: Stream::Tls(Box::new(tls)),
            input: Vec::new(),
            timeout: self.timeout,
        })
    }
}

fn failed(reason: Reply) -> HostOutcome {
    let permanent = reason.is_permanent();
    HostOutcome::Failed { reason, permanent }
}

fn local_failure(text: &str) -> Reply {
    Reply {
        code: 451,
        text: format!("4.7.0 {text}"),
    }
}

/// RFC 8689 §5: the server cannot carry a REQUIRETLS message (5.7.30), a permanent failure.
fn requiretls_failure(text: &str) -> Reply {
    Reply {
        code: 550,
        text: format!("5.7.30 {text}"),
    }
}

/// How TLS went in one session, as TLS reports (RFC 8460) count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionTls {
    Plain,
    Secured,
    /// The RFC 8460 §4.3 result type of what went wrong.
    Failed(&'static str),
}

/// The rustls error under a failed handshake, if that is what it was.
fn rustls_error(err: &ClientError) -> Option<&rustls::Error> {
    let ClientError::Io(io) = err else {
        return None;
    };
    io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
}

/// The RFC 8460 result type of a failed TLS handshake.
fn handshake_result(err: &ClientError) -> &'static str {
    rustls_error(err).map_or("validation-failure", certificate_result)
}

/// The RFC 8460 result type of a certificate check's error.
fn certificate_result(err: &rustls::Error) -> &'static str {
    match err {
        rustls::Error::InvalidCertificate(cert) => {
            // Debug names cover the variants with and without context.
            let name = format!("{cert:?}");
            if name.starts_with("NotValidForName") {
                "certificate-host-mismatch"
            } else if name.starts_with("Expired") {
                "certificate-expired"
            } else {
                "certificate-not-trusted"
            }
        }
        _ => "validation-failure",
    }
}

/// A failed handshake in words. rustls shows a certificate check's own error (DANE's) by its
/// Debug form; its message says more.
fn handshake_text(err: &ClientError) -> String {
    match rustls_error(err) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        _ => err.to_string(),
    }
}

/// Runs one transaction over a connected socket; says how TLS went too.
pub async fn deliver(tcp: TcpStream, job: &Job<'_>) -> (HostOutcome, SessionTls) {
    let mut tls = SessionTls::Plain;
    let outcome = match run(tcp, job, &mut tls).await {
        Ok(outcome) => outcome,
        Err(err) => failed(err.as_reply()),
    };
    (outcome, tls)
}

async fn run(
    tcp: TcpStream,
    job: &Job<'_>,
    session_tls: &mut SessionTls,
) -> Result<HostOutcome, ClientError> {
    let mut client = Client {
        stream: Stream::Plain(tcp),
        input: Vec::new(),
        timeout: job.command_timeout,
    };
    if let TlsPlan::Implicit(connector) = &job.tls {
        client = match client.start_tls(connector, job.host).await {
            Ok(client) => client,
            Err(err) => {
                *session_tls = SessionTls::Failed(handshake_result(&err));
                return Err(err);
            }
        };
        *session_tls = SessionTls::Secured;
    }
    let banner = client.reply().await?;
    if banner.code != 220 {
        return Ok(failed(banner));
    }
    let mut ehlo = match client.greet(job.helo).await? {
        Ok(ehlo) => ehlo,
        Err(reply) => return Ok(failed(reply)),
    };
    let offers_tls = ehlo.capabilities & EXT_START_TLS != 0;
    let connector = match &job.tls {
        TlsPlan::Opportunistic(c) if offers_tls => Some(c.clone()),
        TlsPlan::Required(c) if offers_tls => Some(c.clone()),
        // RFC 8689 §4.2.1: a REQUIRETLS message is returned, not kept, when the server lacks
        // what it needs; another MX host may still have it.
        TlsPlan::Required(_) if job.require_tls => {
            *session_tls = SessionTls::Failed("starttls-not-supported");
            return Ok(failed(requiretls_failure(
                "REQUIRETLS: the server does not offer STARTTLS",
            )));
        }
        TlsPlan::Required(_) => {
            *session_tls = SessionTls::Failed("starttls-not-supported");
            return Ok(failed(local_failure(
                "TLS is required but the server does not offer STARTTLS",
            )));
        }
        _ => None,
    };
    if let Some(connector) = connector {
        let reply = client.command("STARTTLS").await?;
        let opportunistic = matches!(job.tls, TlsPlan::Opportunistic(_));
        if reply.code == 220 {
            client = match client.start_tls(&connector, job.host).await {
                Ok(client) => client,
                Err(err) => {
                    *session_tls = SessionTls::Failed(handshake_result(&err));
                    return Ok(HostOutcome::HandshakeFailed(local_failure(&format!(
                        "TLS handshake failed: {}",
                        handshake_text(&err)
                    ))));
                }
            };
            *session_tls = SessionTls::Secured;
            ehlo = match client.greet(job.helo).await? {
                Ok(ehlo) => ehlo,
                Err(reply) => return Ok(failed(reply)),
            };
        } else if !opportunistic {
            *session_tls = SessionTls::Failed("starttls-not-supported");
            return Ok(failed(reply));
        }
        // RFC 3207 §4: after a refused STARTTLS the session goes on in plaintext, which
        // opportunistic TLS accepts.
    }
    if let Some((user, password)) = job.auth {
        let token = BASE64.encode(format!("\0{user}\0{password}"));
        let reply = client.command(&format!("AUTH PLAIN {token}")).await?;
        if reply.code != 235 {
            // A refused login is a configuration problem here, not the message's: keep it queued.
            return Ok(HostOutcome::Failed {
                reason: reply,
                permanent: false,
            });
        }
    }
    if job.require_tls && ehlo.capabilities & EXT_REQUIRE_TLS == 0 {
        return Ok(failed(requiretls_failure(
            "REQUIRETLS: the server does not offer REQUIRETLS",
        )));
    }
    let all = |outcome: RcptOutcome| HostOutcome::Done(vec![outcome; job.recipients.len()]);
    let size = job.message.len();
    if ehlo.capabilities & EXT_SIZE != 0 && ehlo.size > 0 && size > ehlo.size {
        return Ok(all(RcptOutcome::Permanent(Reply {
            code: 552,
            text: format!(
                "5.3.4 Message size {size} exceeds the server's limit {}",
                ehlo.size
            ),
        })));
    }
    if job.smtputf8 && ehlo.capabilities & EXT_SMTP_UTF8 == 0 {
        return Ok(all(RcptOutcome::Permanent(Reply {
            code: 553,
            text: "5.6.7 The server does not support SMTPUTF8 addresses".into(),
        })));
    }
    let mut mail = format!("MAIL FROM:<{}>", job.sender);
    if ehlo.capabilities & EXT_SIZE != 0 {
        mail.push_str(&format!(" SIZE={size}"));
    }
    if ehlo.capabilities & EXT_8BIT_MIME != 0 && !job.message.is_ascii() {
        mail.push_str(" BODY=8BITMIME");
    }
    if job.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    let dsn = ehlo.capabilities & EXT_DSN != 0;
    if dsn {
        mail.push_str(job.dsn_mail);
    }
    if job.require_tls {
        mail.push_str(" REQUIRETLS");
    }
    let rcpt_line = |i: usize, rcpt: &str| match job.dsn_rcpts.get(i).filter(|_| dsn) {
        Some(params) => format!("RCPT TO:<{rcpt}>{params}"),
        None => format!("RCPT TO:<{rcpt}>"),
    };
    let pipelining = ehlo.capabilities & EXT_PIPELINING != 0;
    let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; job.recipients.len()];
    let (mail_reply, data_reply) = if pipelining {
        let mut batch = format!("{mail}\r\n");
        for (i, rcpt) in job.recipients.iter().enumerate() {
            batch.push_str(&rcpt_line(i, rcpt));
            batch.push_str("\r\n");
        }
        batch.push_str("DATA\r\n");
        client.send(batch.as_bytes()).await?;
        let mail_reply = client.reply().await?;
        for outcome in outcomes.iter_mut() {
            *outcome = rcpt_outcome(client.reply().await?);
        }
        let data_reply = client.reply().await?;
        (mail_reply, Some(data_reply))
    } else {
        let mail_reply = client.command(&mail).await?;
        if mail_reply.code == 250 {
            for (i, (outcome, rcpt)) in outcomes.iter_mut().zip(job.recipients).enumerate() {
                *outcome = rcpt_outcome(client.command(&rcpt_line(i, rcpt)).await?);
            }
        }
        (mail_reply, None)
    };
    if mail_reply.code != 250 {
        if data_reply.as_ref().is_some_and(|r| r.code == 354) {
            client.send(b".\r\n").await?;
        }
        let _ = client.command("QUIT").await;
        return Ok(if mail_reply.is_permanent() {
            all(RcptOutcome::Permanent(mail_reply))
        } else {
            failed(mail_reply)
        });
    }
    let accepted = outcomes.iter().filter(|o| o.is_none()).count();
    let data_reply = match data_reply {
        Some(reply) => reply,
        None if accepted > 0 => client.command("DATA").await?,
        None => Reply {
            code: 554,
            text: "5.5.1 No valid recipients".into(),
        },
    };
    if accepted == 0 {
        if data_reply.code == 354 {
            // RFC 2920 §3.1: a server that answered DATA with 354 anyway gets an empty message.
            client.send(b".\r\n").await?;
            let _ = client.reply().await;
        }
        let _ = client.command("QUIT").await;
        // No recipient was accepted, so every one has its refusal.
        return Ok(HostOutcome::Done(outcomes.into_iter().flatten().collect()));
    }
    if data_reply.code != 354 {
        let _ = client.command("QUIT").await;
        return Ok(HostOutcome::Done(for_accepted(
            outcomes,
            failure(data_reply),
        )));
    }
    let mut body = Vec::with_capacity(job.message.len() + job.message.len() / 50 + 8);
    let mut stuffer = DotStuffer::default();
    stuffer.feed(&crate::framing::crlf_line_ends(job.message), &mut body);
    stuffer.finish(&mut body);
    let dot = body.split_off(body.len() - 3); // ".\r\n"
    client.send(&body).await?;
    if !job.ticket.valid() {
        return Ok(failed(local_failure(
            "This node's hold on the message lapsed before the final dot",
        )));
    }
    client.send(&dot).await?;
    let (final_reply, _) = client.reply_raw(FINAL_REPLY_TIMEOUT).await?;
    let outcome = if final_reply.code == 250 {
        RcptOutcome::Delivered {
            reply: final_reply,
            dsn,
        }
    } else {
        failure(final_reply)
    };
    let _ = client.command("QUIT").await;
    Ok(HostOutcome::Done(for_accepted(outcomes, outcome)))
}

/// A refusal: permanent for 5xx, temporary otherwise.
fn failure(reply: Reply) -> RcptOutcome {
    if reply.is_permanent() {
        RcptOutcome::Permanent(reply)
    } else {
        RcptOutcome::Temporary(reply)
    }
}

/// A refused RCPT's outcome; None for an accepted one (its fate is the transaction's).
fn rcpt_outcome(reply: Reply) -> Option<RcptOutcome> {
    match reply.code {
        250 | 251 => None,
        _ => Some(failure(reply)),
    }
}

/// Every recipient's outcome: its own refusal, or the transaction's `outcome` if it was accepted.
fn for_accepted(outcomes: Vec<Option<RcptOutcome>>, outcome: RcptOutcome) -> Vec<RcptOutcome> {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| outcome.clone()))
        .collect()
}

/// A connector that encrypts without checking the certificate (opportunistic TLS, RFC 7435:
/// better than plaintext against passive eavesdroppers, and what every MTA does by default).
pub fn unverified_connector() -> TlsConnector {
    connector_with(AnyCertificate)
}

/// What a connector checks of the server's certificate chain in place of WebPKI's checks; the
/// handshake's signatures are verified with the certificate's key by rustls either way.
pub trait CertificateCheck: std::fmt::Debug + Send + Sync {
    fn check(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        name: &ServerName<'_>,
        now: rustls_pki_types::UnixTime,
    ) -> Result<(), rustls::Error>;
}

/// A connector whose certificates are judged by `check`.
pub fn connector_with(check: impl CertificateCheck + 'static) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Checked {
        provider: provider.clone(),
        check,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate;

impl CertificateCheck for AnyCertificate {
    fn check(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _name: &ServerName<'_>,
        _now: rustls_pki_types::UnixTime,
    ) -> Result<(), rustls::Error> {
        Ok(())
    }
}

/// The WebPKI verifier of the certificates in the PEM bundle at `ca_file`.
pub fn ca_verifier(ca_file: &std::path::Path) -> Result<Arc<WebPkiServerVerifier>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("cannot read {}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("{}: {e}", ca_file.display()))
}

/// A connector whose certificates must pass `verifier`.
pub fn verifying_connector(verifier: Arc<WebPkiServerVerifier>) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// What the last handshake of an [`observing_connector`] would have come to under
/// verification: None when the certificate verified, else its RFC 8460 result type.
pub type Observation = Arc<std::sync::Mutex<Option<&'static str>>>;

/// A connector that verifies each certificate with `verifier` and notes the outcome in
/// `seen`, but lets the handshake go on whatever it is: MTA-STS `testing` (RFC 8461 §5)
/// delivers as without a policy and reports what `enforce` would have refused.
pub fn observing_connector(verifier: Arc<WebPkiServerVerifier>, seen: Observation) -> TlsConnector {
    connector_with(Observing { verifier, seen })
}

#[derive(Debug)]
struct Observing {
    verifier: Arc<WebPkiServerVerifier>,
    seen: Observation,
}

impl CertificateCheck for Observing {
    fn check(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        name: &ServerName<'_>,
        now: rustls_pki_types::UnixTime,
    ) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier;
        let verified = self
            .verifier
            .verify_server_cert(end_entity, intermediates, name, &[], now);
        *self.seen.lock().expect("observation") = verified.err().as_ref().map(certificate_result);
        Ok(())
    }
}

#[derive(Debug)]
struct Checked<C> {
    provider: Arc<rustls::crypto::CryptoProvider>,
    check: C,
}

impl<C: CertificateCheck> rustls::client::danger::ServerCertVerifier for Checked<C> {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.check
            .check(end_entity, intermediates, server_name, now)
            .map(|()| rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_multi_line_replies() {
        let (reply, used) = parse_reply(b"250 2.0.0 OK\r\nrest").unwrap().unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(reply.status(), Some("2.0.0"));
        assert_eq!(used, 14);
        let (reply, _) = parse_reply(b"250-mx.test\r\n250-SIZE 10\r\n250 PIPELINING\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(reply.text, "mx.test SIZE 10 PIPELINING");
        assert_eq!(parse_reply(b"250-partial\r\n250 ").unwrap(), None);
        assert!(parse_reply(b"hello\r\n").is_err());
        assert!(parse_reply(b"250-a\r\n251 b\r\n").is_err());
        let (reply, _) = parse_reply(b"354\r\n").unwrap().unwrap();
        assert_eq!((reply.code, reply.status()), (354, None));
    }
}
