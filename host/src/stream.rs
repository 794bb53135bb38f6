//! A client connection that starts plain and may become TLS (STARTTLS, STLS) or is TLS from the
//! start; plus the buffered line I/O every protocol session uses.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::framing::{LineEvent, LineFramer};

/// A new session id, unique across SMTP, POP3 and IMAP for the life of the process, so log lines
/// (`session=N`) and store change announcements (the writing session) never mix two sessions.
pub fn next_session_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SESSION_IDS: AtomicU64 = AtomicU64::new(1);
    SESSION_IDS.fetch_add(1, Ordering::Relaxed)
}

/// A TLS handshake must finish within this time, whatever the command timeout: a stalled
/// handshake should not hold a connection slot for minutes.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes asked of the socket per read (a bulk transfer ramps up to it).
const READ_CHUNK: usize = 16 * 1024;

/// Fewest bytes asked per read: what an idle connection keeps as its input buffer.
const MIN_READ: usize = 2048;

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

/// Raw deflate in both directions (IMAP COMPRESS=DEFLATE, RFC 4978), applied at the buffers:
/// the sessions keep reading and writing plain bytes.
struct Deflate {
    inflate: Decompress,
    deflate: Compress,
    /// Compressed bytes read but not yet inflated.
    pending: Vec<u8>,
}

/// Most plain bytes one read may inflate to: what a peer can make the server hold with one
/// small compressed burst is bounded like an uncompressed read.
const MAX_INFLATE: usize = 4 * READ_CHUNK;

/// Buffered I/O over a connection: an input buffer the protocol codecs frame from, and an output
/// buffer flushed when the session has nothing more to answer right away (which is what makes
/// pipelining cheap: one write per batch of replies).
pub struct Io<S> {
    conn: Option<Conn<S>>,
    pub input: Vec<u8>,
    output: Vec<u8>,
    write_timeout: Duration,
    deflate: Option<Box<Deflate>>,
    /// Bytes the next read asks for: doubled when a read fills it, halved when one uses less
    /// than a quarter, so a bulk transfer gets large reads and an idle connection holds ~2 KB
    /// (10,000 idle connections are the case this is for).
    read_size: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Io<S> {
    pub fn new(stream: S, write_timeout: Duration) -> Io<S> {
        Io {
            conn: Some(Conn::Plain(stream)),
            input: Vec::new(),
            output: Vec::with_capacity(1024),
            write_timeout,
            deflate: None,
            read_size: MIN_READ,
        }
    }

    pub fn is_compressed(&self) -> bool {
        self.deflate.is_some()
    }

    /// Compresses everything after this point in both directions. Unread input is dropped: it
    /// was sent before the peer could know compression would start.
    pub fn start_deflate(&mut self) {
        self.input.clear();
        self.deflate = Some(Box::new(Deflate {
            inflate: Decompress::new(false),
            deflate: Compress::new(Compression::fast(), false),
            pending: Vec::new(),
        }));
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Some(Conn::Tls(_)))
    }

    fn conn(&mut self) -> io::Result<&mut Conn<S>> {
        live(&mut self.conn)
    }

    /// Reads once more into the input buffer, by the deadline.
    pub async fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        if self.deflate.is_some() {
            return self.fill_inflated(deadline).await;
        }
        if self.input.is_empty() && self.input.capacity() > 2 * self.read_size {
            // Between bursts: give back a buffer a bulk transfer grew.
            self.input = Vec::new();
        }
        self.input.reserve(self.read_size);
        let spare = self.input.capacity() - self.input.len();
        let conn = live(&mut self.conn)?;
        let read = read_by(deadline, conn, &mut self.input).await?;
        if read >= spare {
            self.read_size = (self.read_size * 2).min(READ_CHUNK);
        } else if read < self.read_size / 4 {
            self.read_size = (self.read_size / 2).max(MIN_READ);
        }
        Ok(())
    }

    /// [`Io::fill`] under compression: inflates what is pending, reading more only when that
    /// gives nothing yet.
    async fn fill_inflated(&mut self, deadline: Instant) -> Result<(), ReadError> {
        loop {
            let deflate = self.deflate.as_mut().expect("compression is on");
            if !deflate.pending.is_empty() {
                let before_in = deflate.inflate.total_in();
                let mut plain = Vec::with_capacity(MAX_INFLATE);
                let status = deflate
                    .inflate
                    .decompress_vec(&deflate.pending, &mut plain, FlushDecompress::Sync)
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
                let consumed = (deflate.inflate.total_in() - before_in) as usize;
                deflate.pending.drain(..consumed);
                self.input.extend_from_slice(&plain);
                if status == Status::StreamEnd {
                    return Err(ReadError::Closed);
                }
                if !plain.is_empty() {
                    return Ok(());
                }
            }
            let deflate = self.deflate.as_mut().expect("compression is on");
            deflate.pending.reserve(READ_CHUNK);
            let conn = live(&mut self.conn)?;
            read_by(deadline, conn, &mut deflate.pending).await?;
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
        let mut output = std::mem::take(&mut self.output);
        if let Some(deflate) = self.deflate.as_mut() {
            output = deflated(&mut deflate.deflate, &output)?;
        }
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
        let handshake = tokio::time::timeout(timeout, acceptor.accept(plain)).await;
        crate::telemetry::metrics::get()
            .tls_handshakes
            .get_or_create(&crate::telemetry::metrics::Outcome {
                result: if matches!(handshake, Ok(Ok(_))) {
                    "ok"
                } else {
                    "failed"
                },
            })
            .inc();
        let tls = handshake.map_err(|_| ReadError::Timeout)??;
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

/// One read into `into`'s spare capacity by the deadline; the bytes read.
async fn read_by<S: AsyncRead + AsyncWrite + Unpin>(
    deadline: Instant,
    conn: &mut Conn<S>,
    into: &mut Vec<u8>,
) -> Result<usize, ReadError> {
    match tokio::time::timeout_at(deadline, conn.read_buf(into)).await {
        Err(_) => Err(ReadError::Timeout),
        Ok(Ok(0)) => Err(ReadError::Closed),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(err)) => Err(ReadError::Io(err)),
    }
}

/// `plain` compressed and sync-flushed, so the peer can inflate all of it now.
fn deflated(deflate: &mut Compress, plain: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(plain.len() / 2 + 64);
    let mut rest = plain;
    loop {
        out.reserve(rest.len() / 2 + 64);
        let before = deflate.total_in();
        deflate
            .compress_vec(rest, &mut out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        rest = &rest[(deflate.total_in() - before) as usize..];
        // Done when all input is taken and the sync flush had room to finish.
        if rest.is_empty() && out.len() < out.capacity() {
            return Ok(out);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn compress(c: &mut Compress, plain: &[u8]) -> Vec<u8> {
        deflated(c, plain).unwrap()
    }

    fn inflate(d: &mut Decompress, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(bytes, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn deflate_both_ways_and_bounded_inflation() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut io = Io::new(server, Duration::from_secs(5));
        io.input.extend_from_slice(b"sent before compression\r\n");
        io.start_deflate();
        assert!(io.input.is_empty());
        let mut to_server = Compress::new(Compression::default(), false);
        let mut from_server = Decompress::new(false);
        let deadline = Instant::now() + Duration::from_secs(5);

        // Commands split across writes at arbitrary points still come out whole.
        let wire = compress(&mut to_server, b"a1 NOOP\r\na2 CAPABILITY\r\n");
        client.write_all(&wire[..3]).await.unwrap();
        client.write_all(&wire[3..]).await.unwrap();
        while io.input.len() < 24 {
            io.fill(deadline).await.unwrap();
        }
        assert_eq!(io.input, b"a1 NOOP\r\na2 CAPABILITY\r\n");

        io.queue(b"* OK compressed\r\n");
        io.flush().await.unwrap();
        let mut got = vec![0; 4096];
        let n = client.read(&mut got).await.unwrap();
        assert_eq!(inflate(&mut from_server, &got[..n]), b"* OK compressed\r\n");

        // A small burst that inflates to 8 MiB is handed over MAX_INFLATE bytes at a time.
        io.input.clear();
        let bomb = compress(&mut to_server, &vec![b'a'; 8 << 20]);
        assert!(bomb.len() < 64 * 1024);
        client.write_all(&bomb).await.unwrap();
        io.fill(deadline).await.unwrap();
        assert!(io.input.len() <= MAX_INFLATE && !io.input.is_empty());
        let mut total = io.input.len();
        while total < 8 << 20 {
            io.input.clear();
            io.fill(deadline).await.unwrap();
            assert!(io.input.len() <= MAX_INFLATE);
            total += io.input.len();
        }
        assert_eq!(total, 8 << 20);

        // Garbage is an error, not a panic.
        client.write_all(b"\xff\xff\xff\xff garbage").await.unwrap();
        assert!(io.fill(deadline).await.is_err());
    }
}
