//! STARTTLS (RFC 3207).

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use crate::config::TlsMode;
use crate::smtp::reply::Reply;
use crate::smtp::session::{Flow, Phase, Session};
use crate::stream::Io;

impl Session {
    pub fn starttls_available(&self) -> bool {
        self.tls.is_none() && self.listener.tls == TlsMode::Starttls && self.server.tls.is_some()
    }

    pub async fn cmd_starttls<S>(&mut self, io: &mut Io<S>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if self.tls.is_some() {
            return self.answer(io, Reply::new(503, "5.5.1", "TLS already active"));
        }
        if !self.starttls_available() {
            return self.answer(io, Reply::new(502, "5.5.1", "STARTTLS not available"));
        }
        if matches!(self.phase, Phase::Transaction(_)) {
            return self.answer(
                io,
                Reply::new(503, "5.5.1", "STARTTLS not allowed in a transaction"),
            );
        }
        let acceptor = self
            .server
            .tls
            .clone()
            .expect("checked by starttls_available");
        io.queue(&Reply::new(220, "2.0.0", "Ready to start TLS").to_bytes());
        if io.flush().await.is_err() {
            return Flow::Close;
        }
        if !io.input.is_empty() {
            info!(
                bytes = io.input.len(),
                "discarding input pipelined after STARTTLS"
            );
        }
        match io
            .start_tls(&acceptor, crate::stream::TLS_HANDSHAKE_TIMEOUT)
            .await
        {
            Ok(info) => {
                // RFC 3207 §4.2: forget everything learned before the handshake.
                self.tls = Some(info);
                self.helo = None;
                self.auth = None;
                self.phase = Phase::Greeting;
                Flow::Continue
            }
            Err(err) => {
                info!("TLS handshake failed: {err}");
                Flow::Close
            }
        }
    }
}
