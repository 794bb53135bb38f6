//! The serve loop SMTP, POP3 and IMAP sessions share: implicit TLS on a TLS listener, the
//! greeting, then read an input, act on it, until the client leaves, the idle deadline passes,
//! the server shuts down, or the client made too many errors. A protocol says only what it
//! reads, how it answers, and how it says goodbye (`Protocol`).

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use crate::config::TlsMode;
use crate::stream::{Io, ReadError, TlsInfo};

/// Whether the session goes on after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close the connection (after sending what is queued).
    Close,
}

/// Why the loop ends on the server's side, for the protocol's last words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    ShuttingDown,
    IdleTimeout,
    TooManyErrors,
}

/// A protocol session as the serve loop drives it.
pub trait Protocol: Send {
    /// One complete input: a command line, an IMAP command with its literals, a wake-up.
    type Input: Send;

    /// How the listener wants TLS (`Implicit`: before the greeting).
    fn tls_mode(&self) -> TlsMode;
    fn tls_acceptor(&self) -> Option<TlsAcceptor>;
    /// After an implicit TLS handshake.
    fn tls_started(&mut self, info: TlsInfo);
    /// Turns true when the server shuts down.
    fn shutdown_signal(&self) -> watch::Receiver<bool>;
    /// Errors so far and the most allowed (`limits.max_errors`).
    fn errors(&self) -> (u32, u32);

    /// Queues the greeting; `Close` refuses the connection (what is queued is still sent).
    fn greet<S>(&mut self, io: &mut Io<S>) -> impl Future<Output = Flow> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send;

    /// The next input, by the protocol's own deadline (`ReadError::Timeout` when it passed).
    fn next_input<S>(
        &mut self,
        io: &mut Io<S>,
    ) -> impl Future<Output = Result<Self::Input, ReadError>> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send;

    fn handle<S>(
        &mut self,
        io: &mut Io<S>,
        input: Self::Input,
    ) -> impl Future<Output = Flow> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send;

    /// The last line before the server closes the connection.
    fn farewell(&self, why: Farewell) -> Vec<u8>;
}

/// What woke the loop.
enum Woken<T> {
    Input(Result<T, ReadError>),
    Shutdown,
}

/// Runs a session to its end over any byte stream (a TCP socket, or an in-memory pipe in
/// tests). `io_timeout` is the write (and TLS handshake) deadline `Io` keeps.
pub async fn serve<P, S>(mut session: P, stream: S, io_timeout: std::time::Duration)
where
    P: Protocol,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut io = Io::new(stream, io_timeout);
    debug!("connected");
    if session.tls_mode() == TlsMode::Implicit {
        match io.start_implicit_tls(session.tls_acceptor().as_ref()).await {
            Some(info) => session.tls_started(info),
            None => return,
        }
    }
    if session.greet(&mut io).await == Flow::Close {
        io.shutdown().await;
        return;
    }
    let mut shutdown = session.shutdown_signal();
    loop {
        let woken = tokio::select! {
            input = session.next_input(&mut io) => Woken::Input(input),
            _ = shutdown.wait_for(|down| *down) => Woken::Shutdown,
        };
        let flow = match woken {
            Woken::Input(Ok(input)) => session.handle(&mut io, input).await,
            Woken::Input(Err(ReadError::Timeout)) => {
                io.queue(&session.farewell(Farewell::IdleTimeout));
                break;
            }
            Woken::Input(Err(err)) => {
                debug!("connection ended: {err}");
                return;
            }
            Woken::Shutdown => {
                io.queue(&session.farewell(Farewell::ShuttingDown));
                break;
            }
        };
        if flow == Flow::Close {
            break;
        }
        let (errors, most) = session.errors();
        if errors >= most {
            info!(errors, "too many errors, disconnecting");
            io.queue(&session.farewell(Farewell::TooManyErrors));
            break;
        }
    }
    io.shutdown().await;
    debug!("closed");
}
