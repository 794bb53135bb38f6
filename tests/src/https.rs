//! A small HTTPS server standing in for domains' MTA-STS policy hosts: it answers GET requests
//! by their Host header from a fixed table, and counts what it served.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub struct PolicyServer {
    pub addr: SocketAddr,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PolicyServer {
    /// Serves `bodies` (host → text/plain body; other hosts get 404) over TLS at `ip`.
    pub async fn start(
        ip: Ipv4Addr,
        tls: TlsAcceptor,
        bodies: HashMap<String, String>,
    ) -> PolicyServer {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind policy server");
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let (bodies, count) = (Arc::new(bodies), served.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tls, bodies, count) = (tls.clone(), bodies.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut stream) = tls.accept(stream).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16_384 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let host = head
                        .lines()
                        .find_map(|l| l.strip_prefix("host:"))
                        .map(|h| h.trim().to_string())
                        .unwrap_or_default();
                    let wanted = head.starts_with("get /.well-known/mta-sts.txt ");
                    let answer = match bodies.get(&host).filter(|_| wanted) {
                        Some(body) => {
                            count.fetch_add(1, Ordering::SeqCst);
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                        }
                        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
                    };
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        PolicyServer { addr, served, task }
    }

    /// Policies served so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}
