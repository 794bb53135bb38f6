//! HTTP, both ways, through hyper's HTTP/1.1. Served: the server's two small endpoints
//! (`/metrics`, the admin API over HTTPS) over a bounded number of connections at a time, with
//! a deadline for the request head and one for the whole connection, TLS when given an
//! acceptor. Fetched: one HTTPS GET with a deadline and a size bound (MTA-STS policies).

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

/// Why an HTTPS GET brought nothing back.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The TLS handshake failed: a certificate that does not verify, or no TLS at all.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Other(String),
}

/// What an HTTPS GET brought back.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// One HTTPS GET of `path` from `host` at `address`, its certificate checked by `connector` for
/// `host`; no redirect is followed. The whole exchange must end within `deadline`, and a body
/// over `max_body` bytes is an error.
pub async fn get_https(
    connector: &tokio_rustls::TlsConnector,
    address: SocketAddr,
    host: &str,
    path: &str,
    deadline: Duration,
    max_body: usize,
) -> Result<Fetched, FetchError> {
    use http_body_util::BodyExt;
    use FetchError::Other;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| Other(format!("connect to {address}: {e}")))?;
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| Other(format!("{host:?} is not a TLS server name")))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| FetchError::Tls(format!("{host}: {e}")))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| Other(format!("HTTP with {host}: {e}")))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "Postern")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| Other(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Other(format!("HTTP with {host}: {e}")))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = http_body_util::Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| Other(format!("body from {host}: {e}")))?
            .to_bytes();
        driver.abort();
        Ok(Fetched {
            status,
            content_type,
            body,
        })
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| Other(format!("no answer from {host} within {deadline:?}")))?
}
