//! A scripted SMTP server standing in for remote MX hosts and smarthosts: it records every
//! transaction and answers RCPT (and the final dot) as the test says, so relay behaviour (retries,
//! bounces, TLS) can be checked against real TCP.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct SinkMessage {
    pub helo: String,
    pub from: String,
    /// What followed the address in MAIL FROM (`SIZE=… BODY=8BITMIME`).
    pub mail_params: String,
    pub to: Vec<String>,
    /// What followed each accepted RCPT TO address (`NOTIFY=SUCCESS ORCPT=rfc822;…`).
    pub rcpt_params: Vec<String>,
    /// The message, dot-stuffing removed, CRLF line ends.
    pub data: Vec<u8>,
    pub tls: bool,
    pub auth: Option<String>,
    /// When the sink said 250 to it.
    pub received: std::time::Instant,
}

/// Decides the reply to RCPT: (recipient, transaction number from 0) → reply line.
pub type RcptScript = Arc<dyn Fn(&str, usize) -> String + Send + Sync>;

#[derive(Clone)]
pub struct SinkScript {
    pub rcpt: RcptScript,
    /// Offer STARTTLS with this acceptor.
    pub tls: Option<TlsAcceptor>,
    pub pipelining: bool,
    /// Answer EHLO (false: refuse it as unknown, like a pre-ESMTP server).
    pub ehlo: bool,
    /// The SIZE limit advertised.
    pub size: usize,
    /// Agree to STARTTLS, then answer the handshake with garbage.
    pub broken_tls: bool,
    /// How long to sit on the final dot before accepting.
    pub data_delay: Duration,
    /// How long to sit on DATA before the 354.
    pub data_command_delay: Duration,
    /// Offer DSN (RFC 3461).
    pub dsn: bool,
    /// Offer REQUIRETLS (RFC 8689) once TLS is on.
    pub requiretls: bool,
}

impl Default for SinkScript {
    fn default() -> Self {
        SinkScript {
            rcpt: Arc::new(|_, _| "250 2.1.5 OK".into()),
            tls: None,
            pipelining: true,
            ehlo: true,
            size: 50_000_000,
            broken_tls: false,
            data_delay: Duration::ZERO,
            data_command_delay: Duration::ZERO,
            dsn: false,
            requiretls: false,
        }
    }
}

/// Counts open sessions and remembers the most at once.
#[derive(Default)]
struct Sessions {
    open: AtomicUsize,
    most: AtomicUsize,
}

pub struct Sink {
    pub addr: SocketAddr,
    messages: Arc<Mutex<Vec<SinkMessage>>>,
    transactions: Arc<AtomicUsize>,
    sessions: Arc<Sessions>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A random address in 127.0.0.0/8 (not 127.0.0.1), so parallel tests get their own hosts.
pub fn loopback_ip() -> Ipv4Addr {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    let n = h.finish();
    Ipv4Addr::new(
        127,
        1 + (n % 250) as u8,
        1 + ((n >> 8) % 250) as u8,
        1 + ((n >> 16) % 250) as u8,
    )
}

impl Sink {
    /// Listens on `ip` at `port` (0: any free port).
    pub async fn start(ip: Ipv4Addr, port: u16, script: SinkScript) -> Sink {
        let listener = TcpListener::bind((ip, port)).await.expect("bind sink");
        let addr = listener.local_addr().unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let transactions = Arc::new(AtomicUsize::new(0));
        let sessions = Arc::new(Sessions::default());
        let (m, t, c) = (messages.clone(), transactions.clone(), sessions.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (m, t, c, script) = (m.clone(), t.clone(), c.clone(), script.clone());
                tokio::spawn(async move {
                    let open = c.open.fetch_add(1, Ordering::SeqCst) + 1;
                    c.most.fetch_max(open, Ordering::SeqCst);
                    let _ = serve(stream, script, m, t).await;
                    c.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Sink {
            addr,
            messages,
            transactions,
            sessions,
            task,
        }
    }

    pub fn messages(&self) -> Vec<SinkMessage> {
        self.messages.lock().unwrap().clone()
    }

    /// MAIL commands seen (every transaction, accepted or not).
    pub fn transactions(&self) -> usize {
        self.transactions.load(Ordering::SeqCst)
    }

    /// The most sessions that were open at the same time.
    pub fn most_sessions(&self) -> usize {
        self.sessions.most.load(Ordering::SeqCst)
    }

    /// Waits until at least `count` messages arrived (or 20 s passed).
    pub async fn wait_for(&self, count: usize) -> Vec<SinkMessage> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.messages.lock().unwrap().len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.messages()
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn serve(
    stream: tokio::net::TcpStream,
    script: SinkScript,
    messages: Arc<Mutex<Vec<SinkMessage>>>,
    transactions: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    // Replies go out one write each: without this, Nagle and delayed ACKs add 40 ms per
    // pipelined group, which is the sink's delay, not the relay's.
    stream.set_nodelay(true)?;
    let mut conn: BufReader<Box<dyn Stream>> = BufReader::new(Box::new(stream));
    let mut tls = false;
    conn.get_mut().write_all(b"220 sink.test ESMTP\r\n").await?;
    let mut helo = String::new();
    let mut from = String::new();
    let mut mail_params = String::new();
    let mut to: Vec<String> = Vec::new();
    let mut rcpt_params: Vec<String> = Vec::new();
    let mut auth = None;
    let mut transaction = 0;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        let arg = |prefix: &str| {
            line[prefix.len()..]
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let reply: String = if upper.starts_with("EHLO") && !script.ehlo {
            "500 5.5.1 command unrecognized\r\n".into()
        } else if upper.starts_with("EHLO") {
            helo = line[4..].trim().to_string();
            let size = format!("SIZE {}", script.size);
            let mut caps = vec!["sink.test", &size, "8BITMIME", "SMTPUTF8", "AUTH PLAIN"];
            if script.pipelining {
                caps.push("PIPELINING");
            }
            if (script.tls.is_some() || script.broken_tls) && !tls {
                caps.push("STARTTLS");
            }
            if script.dsn {
                caps.push("DSN");
            }
            if script.requiretls && tls {
                caps.push("REQUIRETLS");
            }
            let mut out = String::new();
            for (i, cap) in caps.iter().enumerate() {
                let sep = if i + 1 == caps.len() { ' ' } else { '-' };
                out.push_str(&format!("250{sep}{cap}\r\n"));
            }
            out
        } else if upper.starts_with("HELO") {
            helo = line[4..].trim().to_string();
            "250 sink.test\r\n".into()
        } else if upper.starts_with("STARTTLS") && script.broken_tls {
            conn.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await?;
            conn.get_mut()
                .write_all(b"this is not a TLS record\r\n")
                .await?;
            return Ok(());
        } else if upper.starts_with("STARTTLS") {
            let Some(acceptor) = script.tls.clone().filter(|_| !tls) else {
                conn.get_mut().write_all(b"454 4.7.0 no TLS\r\n").await?;
                continue;
            };
            conn.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await?;
            let inner = conn.into_inner();
            let upgraded = acceptor.accept(inner).await?;
            conn = BufReader::new(Box::new(upgraded));
            tls = true;
            helo.clear();
            continue;
        } else if upper.starts_with("AUTH PLAIN ") {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(line[11..].trim())
                .unwrap_or_default();
            let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
            auth = parts
                .get(1)
                .map(|u| String::from_utf8_lossy(u).into_owned());
            "235 2.7.0 OK\r\n".into()
        } else if upper.starts_with("MAIL FROM:") {
            transaction = transactions.fetch_add(1, Ordering::SeqCst);
            from = arg("MAIL FROM:");
            mail_params = line
                .split_once('>')
                .map(|(_, rest)| rest.trim().to_string())
                .unwrap_or_default();
            to.clear();
            rcpt_params.clear();
            "250 2.1.0 OK\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = arg("RCPT TO:");
            let reply = (script.rcpt)(&rcpt, transaction);
            if reply.starts_with('2') {
                to.push(rcpt);
                rcpt_params.push(
                    line.split_once('>')
                        .map(|(_, rest)| rest.trim().to_string())
                        .unwrap_or_default(),
                );
            }
            format!("{reply}\r\n")
        } else if upper.starts_with("DATA") {
            if to.is_empty() {
                "554 5.5.1 no valid recipients\r\n".into()
            } else {
                tokio::time::sleep(script.data_command_delay).await;
                conn.get_mut().write_all(b"354 go on\r\n").await?;
                let mut data = Vec::new();
                loop {
                    let mut raw = Vec::new();
                    if conn.read_until(b'\n', &mut raw).await? == 0 {
                        return Ok(());
                    }
                    if raw == b".\r\n" {
                        break;
                    }
                    let unstuffed = if raw.starts_with(b"..") {
                        &raw[1..]
                    } else {
                        &raw[..]
                    };
                    data.extend_from_slice(unstuffed);
                }
                tokio::time::sleep(script.data_delay).await;
                messages.lock().unwrap().push(SinkMessage {
                    helo: helo.clone(),
                    from: from.clone(),
                    mail_params: mail_params.clone(),
                    to: std::mem::take(&mut to),
                    rcpt_params: std::mem::take(&mut rcpt_params),
                    data,
                    tls,
                    auth: auth.clone(),
                    received: std::time::Instant::now(),
                });
                "250 2.0.0 queued at sink\r\n".into()
            }
        } else if upper.starts_with("RSET") || upper.starts_with("NOOP") {
            "250 2.0.0 OK\r\n".into()
        } else if upper.starts_with("QUIT") {
            conn.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            "500 5.5.2 what\r\n".into()
        };
        conn.get_mut().write_all(reply.as_bytes()).await?;
        let _ = conn.get_mut().flush().await;
    }
}

/// A TLS acceptor from PEM files (for a sink that offers STARTTLS).
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}
