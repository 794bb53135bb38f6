//! The server's two small HTTP endpoints (`/metrics`, the admin API over HTTPS) served one
//! way: hyper's HTTP/1.1 over a bounded number of connections at a time, with a deadline for
//! the request head and one for the whole connection, TLS when given an acceptor.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub type Answer = hyper::Response<Full<Bytes>>;

/// How an endpoint is served.
pub struct Limits {
    /// Connections at once; more wait in the kernel's backlog.
    pub connections: usize,
    /// For the TLS handshake and for each request head.
    pub head: Duration,
    /// For a whole connection.
    pub connection: Duration,
}

/// Serves `handler` on `listener` until shutdown.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(SocketAddr, hyper::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        let Ok((stream, peer)) = accepted else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tls, handler) = (tls.clone(), handler.clone());
        let (head, whole) = (limits.head, limits.connection);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let answer = handler(peer, request);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let builder = {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .header_read_timeout(head)
                    .timer(hyper_util::rt::TokioTimer::new());
                builder
            };
            match tls {
                Some(tls) => {
                    let Ok(Ok(stream)) = tokio::time::timeout(head, tls.accept(stream)).await
                    else {
                        return;
                    };
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ =
                        tokio::time::timeout(whole, builder.serve_connection(io, service)).await;
                }
                None => {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ =
                        tokio::time::timeout(whole, builder.serve_connection(io, service)).await;
                }
            }
        });
    }
}

/// A plain-text or JSON answer.
pub fn answer(status: hyper::StatusCode, content_type: &'static str, body: Vec<u8>) -> Answer {
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a well-formed response")
}
