//! The admin API over HTTPS (`[admin] address` and `token_file`), for operators who manage a
//! node from elsewhere: `POST /v1` with the same JSON request the Unix socket takes and
//! `Authorization: Bearer TOKEN`; the answer is the same JSON (HTTP 200 when done, 422 when
//! refused). TLS uses the server's own certificate (reloaded with it); the token is compared
//! in constant time and every refusal is logged with the client's address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request as HttpRequest, Response as HttpResponse, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::{Admin, Request, Response, MAX_REQUEST, REQUEST_TIMEOUT};

/// The shortest token accepted: 32 characters of a random string are past guessing.
pub const MIN_TOKEN: usize = 32;

/// Reads the token (its first line, trimmed); too short a token refuses the start.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("[admin] token_file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < MIN_TOKEN {
        return Err(format!(
            "[admin] token_file {}: the token must be at least {MIN_TOKEN} characters (try `openssl rand -hex 32`)",
            path.display()
        ));
    }
    Ok(token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn reply(status: StatusCode, body: &Response) -> HttpResponse<Full<Bytes>> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    HttpResponse::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("a well-formed response")
}

fn refusal(status: StatusCode, message: &str) -> HttpResponse<Full<Bytes>> {
    let mut response = reply(
        status,
        &Response::Error {
            message: message.to_string(),
        },
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

async fn answer(
    admin: Arc<Admin>,
    token: Arc<String>,
    peer: SocketAddr,
    request: HttpRequest<Incoming>,
) -> HttpResponse<Full<Bytes>> {
    if request.uri().path() != "/v1" {
        return refusal(StatusCode::NOT_FOUND, "the API is at POST /v1");
    }
    if request.method() != Method::POST {
        return refusal(StatusCode::METHOD_NOT_ALLOWED, "POST a JSON request");
    }
    let offered = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(offered.as_bytes(), token.as_bytes()) {
        warn!(%peer, "admin API over HTTPS: refused a request without the right token");
        return refusal(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    }
    let body = match Limited::new(request.into_body(), MAX_REQUEST as usize)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("a request is at most {MAX_REQUEST} bytes"),
            )
        }
    };
    let request: Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => return refusal(StatusCode::BAD_REQUEST, &format!("not a request: {err}")),
    };
    info!(%peer, ?request, "admin request over HTTPS");
    // Progress lines have no place in one HTTP answer: only the result is sent.
    let (progress, _) = mpsc::unbounded_channel();
    match admin.handle(request, progress).await {
        response @ Response::Ok { .. } => reply(StatusCode::OK, &response),
        response => reply(StatusCode::UNPROCESSABLE_ENTITY, &response),
    }
}

/// Serves the API over HTTPS until shutdown, a few connections at a time.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    admin: Arc<Admin>,
    token: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let token = Arc::new(token);
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tls, admin, token) = (tls.clone(), admin.clone(), token.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(stream)) = tokio::time::timeout(REQUEST_TIMEOUT, tls.accept(stream)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                let (admin, token) = (admin.clone(), token.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(answer(admin, token, peer, request).await)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(REQUEST_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // Requests are short; a mailbox import may take minutes.
            let _ = tokio::time::timeout(Duration::from_secs(3600), connection).await;
        });
    }
}
