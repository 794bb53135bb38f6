//! Idle connection cost: opens N SMTP connections to a server, reads each greeting (and
//! optionally says EHLO), then holds them all open and reports the server's resident memory
//! before and after, read from /proc/<pid>/status.
//!
//! `idle-conns --port 2525 --pid 1234 --connections 10000 [--ehlo]`
//!
//! The caller raises the open-file limit of both processes (`ulimit -n`). Connections come from
//! 127.0.0.1 up to 127.0.0.8 so the ephemeral ports of one source address are not exhausted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2525)]
    port: u16,
    /// The server's process id, for its RSS.
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Send EHLO on each connection and read the reply before idling.
    #[arg(long)]
    ehlo: bool,
    /// Print one machine-readable line: `rss_before_kib rss_after_kib connections`.
    #[arg(long)]
    raw: bool,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

async fn open(n: usize, port: u16, ehlo: bool) -> Result<BufReader<TcpStream>> {
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (n % 8) as u8));
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    if !line.starts_with("220 ") {
        bail!("connection {n}: greeting {line:?}");
    }
    if ehlo {
        stream.get_mut().write_all(b"EHLO idle.test\r\n").await?;
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            if line.starts_with("250 ") {
                break;
            }
            if !line.starts_with("250-") {
                bail!("connection {n}: EHLO answered {line:?}");
            }
        }
    }
    Ok(stream)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let before = rss_kib(args.pid)?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(args.connections);
    // Open in waves of 100: a burst past the listen backlog (often 128) drops SYNs, which
    // then wait seconds for their retransmission.
    for wave in (0..args.connections).collect::<Vec<_>>().chunks(100) {
        let opened = futures_join(wave.iter().map(|&n| open(n, args.port, args.ehlo))).await;
        for stream in opened {
            held.push(stream?);
        }
    }
    let opened_in = started.elapsed();
    // Let the server settle (sessions reach their read and allocator caches their pages).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(args.pid)?;
    if args.raw {
        println!("{before} {after} {}", held.len());
    } else {
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / held.len() as f64;
        println!(
            "{} idle connections (opened in {:.1} s): server RSS {:.1} MB before, {:.1} MB after, {:.1} KB per connection",
            held.len(),
            opened_in.as_secs_f64(),
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            per / 1024.0
        );
    }
    Ok(())
}

/// Runs the futures concurrently on this task and returns their results in order.
async fn futures_join<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("connect task panicked"));
    }
    out
}
