//! A client connection that starts plain and may become TLS (STARTTLS, STLS) or is TLS from the
//! start; plus the buffered line I/O every protocol session uses.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::framing::{LineEvent, LineFramer};

/// A TLS handshake must finish within this time, whatever the command timeout: a stalled
/// handshake should not hold a connection slot for minutes.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

pub enum Conn<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why no more input came.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("timed out")]
    Timeout,
    #[error("connection closed by peer")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The negotiated TLS parameters, for logs and Received headers.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// Buffered I/O over a connection: an input buffer the protocol codecs frame from, and an output
/// buffer flushed when the session has nothing more to answer right away (which is what makes
/// pipelining cheap: one write per batch of replies).
pub struct Io<S> {
    conn: Option<Conn<S>>,
    pub input: Vec<u8>,
    output: Vec<u8>,
    write_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Io<S> {
    pub fn new(stream: S, write_timeout: Duration) -> Io<S> {
        Io {
            conn: Some(Conn::Plain(stream)),
            input: Vec::with_capacity(READ_CHUNK),
            output: Vec::with_capacity(1024),
            write_timeout,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Some(Conn::Tls(_)))
    }

    fn conn(&mut self) -> io::Result<&mut Conn<S>> {
        live(&mut self.conn)
    }

    /// Reads once more into the input buffer, by the deadline.
    pub async fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        self.input.reserve(READ_CHUNK);
        let conn = live(&mut self.conn)?;
        match tokio::time::timeout_at(deadline, conn.read_buf(&mut self.input)).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(Ok(0)) => Err(ReadError::Closed),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(ReadError::Io(err)),
        }
    }

    /// The next command line by the deadline. Before waiting for more input it sends whatever is
    /// queued: a reply is held back only while another complete command is already buffered,
    /// which is all pipelining (SMTP RFC 2920, POP3 RFC 2449) needs to be cheap.
    pub async fn read_line(
        &mut self,
        framer: &mut LineFramer,
        deadline: Instant,
    ) -> Result<LineEvent, ReadError> {
        loop {
            match framer.next_line(&mut self.input) {
                LineEvent::Incomplete => {
                    self.flush().await?;
                    self.fill(deadline).await?;
                }
                event => return Ok(event),
            }
        }
    }

    pub fn queue(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Writes out everything queued. A peer that does not read its replies cannot hold the
    /// session forever: the write has a deadline.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let output = std::mem::take(&mut self.output);
        let timeout = self.write_timeout;
        let conn = self.conn()?;
        let write = async {
            conn.write_all(&output).await?;
            conn.flush().await
        };
        let result = tokio::time::timeout(timeout, write)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")));
        self.output = output;
        self.output.clear();
        result
    }

    /// Performs the TLS handshake. Whatever the client sent before the handshake is dropped, so
    /// that no plaintext command can be injected into the encrypted session (CVE-2011-0411).
    pub async fn start_tls(
        &mut self,
        acceptor: &TlsAcceptor,
        timeout: Duration,
    ) -> Result<TlsInfo, ReadError> {
        self.input.clear();
        let plain = match self.conn.take() {
            Some(Conn::Plain(s)) => s,
            Some(tls) => {
                self.conn = Some(tls);
                return Err(ReadError::Io(io::Error::other("TLS is already active")));
            }
            None => return Err(ReadError::Closed),
        };
        let tls = tokio::time::timeout(timeout, acceptor.accept(plain))
            .await
            .map_err(|_| ReadError::Timeout)??;
        let (_, session) = tls.get_ref();
        let info = TlsInfo {
            version: session
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            cipher: session
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default(),
        };
        self.conn = Some(Conn::Tls(Box::new(tls)));
        Ok(info)
    }

    /// The handshake a listener with implicit TLS (RFC 8314) starts every connection with. None
    /// when the connection must close: no certificate is configured, or the handshake failed
    /// (logged here, since there is no protocol yet to report it in).
    pub async fn start_implicit_tls(&mut self, acceptor: Option<&TlsAcceptor>) -> Option<TlsInfo> {
        let acceptor = acceptor?;
        match self.start_tls(acceptor, TLS_HANDSHAKE_TIMEOUT).await {
            Ok(info) => Some(info),
            Err(err) => {
                tracing::info!("TLS handshake failed: {err}");
                None
            }
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        if let Ok(conn) = self.conn() {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        }
    }
}

/// The connection, unless a failed TLS upgrade consumed it.
fn live<S>(conn: &mut Option<Conn<S>>) -> io::Result<&mut Conn<S>> {
    conn.as_mut().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotConnected,
            "connection lost in TLS upgrade",
        )
    })
}

/// Builds an acceptor from a shared rustls configuration.
pub fn acceptor(config: &Arc<rustls::ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(config.clone())
}
