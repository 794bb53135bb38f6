//! The admin API over HTTPS (`[admin] address` and `token_file`), for operators who manage a
//! node from elsewhere: `POST /v1` with the same JSON request the Unix socket takes and
//! `Authorization: Bearer TOKEN`; the answer is the same JSON (HTTP 200 when done, 422 when
//! refused). TLS uses the server's own certificate (reloaded with it); the token is compared
//! in constant time and every refusal is logged with the client's address. Mailbox import and
//! export, which name files on the server, are only taken over the Unix socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request as HttpRequest, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::{Admin, Request, Response, MAX_REQUEST, REQUEST_TIMEOUT};
use crate::http::Answer;

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

fn reply(status: StatusCode, body: &Response) -> Answer {
    let mut bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.push(b'\n');
    crate::http::answer(status, "application/json", bytes)
}

fn refusal(status: StatusCode, message: &str) -> Answer {
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
) -> Answer {
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
    // Paths name the server's own files: reading and writing them is for whoever can reach
    // the Unix socket (the server's user), not for any holder of the token.
    if matches!(
        request,
        Request::MailboxImport { .. } | Request::MailboxExport { .. }
    ) {
        return refusal(
            StatusCode::FORBIDDEN,
            "mailbox import and export read and write the server's files: use the Unix socket",
        );
    }
    info!(%peer, ?request, "admin request over HTTPS");
    // Progress lines have no place in one HTTP answer: only the result is sent.
    let (progress, _) = mpsc::unbounded_channel();
    match admin.handle(request, progress).await {
        response @ Response::Ok { .. } => reply(StatusCode::OK, &response),
        response => reply(StatusCode::UNPROCESSABLE_ENTITY, &response),
    }
}

/// Serves the API over HTTPS until shutdown.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    admin: Arc<Admin>,
    token: String,
    shutdown: watch::Receiver<bool>,
) {
    let token = Arc::new(token);
    let handler = move |peer, request| answer(admin.clone(), token.clone(), peer, request);
    let limits = crate::http::Limits {
        connections: 16,
        head: REQUEST_TIMEOUT,
        // Requests are short, but a mailbox import may take minutes.
        connection: Duration::from_secs(3600),
    };
    crate::http::serve(listener, Some(tls), limits, handler, shutdown).await
}
