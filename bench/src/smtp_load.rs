//! SMTP load generator: sends N messages over C concurrent connections and prints msg/s and
//! latency. Works against any SMTP server (Postern, Postfix) on a loopback port.
//!
//! `smtp-load --port 2525 --connections 10 --messages 5000 --size 1024 [--new-connection]`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    /// Concurrent connections (C).
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Messages in total (N).
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Approximate message size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Open a new connection for every message instead of reusing one per worker.
    #[arg(long)]
    new_connection: bool,
    #[arg(long, default_value = "alice@example.test")]
    rcpt: String,
    #[arg(long, default_value = "load@remote.test")]
    from: String,
    /// Print one machine-readable line: `msgs_per_sec p50_ms p99_ms errors`.
    #[arg(long)]
    raw: bool,
    /// Speak LMTP (RFC 2033: LHLO, one reply per recipient after the data), for Dovecot's
    /// delivery service, which answers only once the message is in the mailbox.
    #[arg(long)]
    lmtp: bool,
}

struct Conn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Conn {
    async fn open(args: &Args) -> Result<Conn> {
        let stream = TcpStream::connect((args.host.as_str(), args.port)).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            writer: w,
            line: String::new(),
        };
        conn.expect(220).await?;
        let greeting: &[u8] = if args.lmtp {
            b"LHLO load.test\r\n"
        } else {
            b"EHLO load.test\r\n"
        };
        conn.writer.write_all(greeting).await?;
        conn.expect(250).await?;
        Ok(conn)
    }

    async fn expect(&mut self, code: u16) -> Result<()> {
        loop {
            self.line.clear();
            if self.reader.read_line(&mut self.line).await? == 0 {
                bail!("connection closed");
            }
            let got: u16 = self.line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            if got != code {
                bail!("expected {code}, got {:?}", self.line.trim_end());
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    }

    /// One transaction, pipelined as a PIPELINING client does: MAIL+RCPT+DATA in one write.
    async fn send(&mut self, args: &Args, body: &[u8]) -> Result<()> {
        let head = format!(
            "MAIL FROM:<{}>\r\nRCPT TO:<{}>\r\nDATA\r\n",
            args.from, args.rcpt
        );
        self.writer.write_all(head.as_bytes()).await?;
        self.expect(250).await?;
        self.expect(250).await?;
        self.expect(354).await?;
        self.writer.write_all(body).await?;
        self.expect(250).await
    }

    async fn quit(mut self) {
        let _ = self.writer.write_all(b"QUIT\r\n").await;
        let _ = self.expect(221).await;
    }
}

fn make_body(size: usize) -> Vec<u8> {
    let mut body =
        b"From: load@remote.test\r\nTo: alice@example.test\r\nSubject: load test\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while body.len() < size {
        body.extend_from_slice(line);
    }
    body.extend_from_slice(b".\r\n");
    body
}

async fn worker(
    args: Arc<Args>,
    body: Arc<Vec<u8>>,
    next: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut conn: Option<Conn> = None;
    while next.fetch_add(1, Ordering::Relaxed) < args.messages {
        let start = Instant::now();
        let result = async {
            if conn.is_none() {
                conn = Some(Conn::open(&args).await?);
            }
            conn.as_mut().expect("connection").send(&args, &body).await
        }
        .await;
        match result {
            Ok(()) => latencies.push(start.elapsed()),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
        if args.new_connection {
            if let Some(c) = conn.take() {
                c.quit().await;
            }
        }
    }
    if let Some(c) = conn {
        c.quit().await;
    }
    latencies
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let body = Arc::new(make_body(args.size));
    // Fail fast if nothing listens.
    Conn::open(&args)
        .await
        .context("cannot reach the server")?
        .quit()
        .await;
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(worker(
                args.clone(),
                body.clone(),
                next.clone(),
                errors.clone(),
            ))
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await?);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    if args.raw {
        println!("{rate:.0} {:.2} {:.2} {errors}", pct(0.5), pct(0.99));
    } else {
        println!(
            "{} messages of {} bytes over {} connections ({}): {rate:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms, {errors} errors, {:.2} s",
            latencies.len(),
            body.len() - 3,
            args.connections,
            if args.new_connection { "new connection per message" } else { "connections reused" },
            pct(0.5),
            pct(0.99),
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
