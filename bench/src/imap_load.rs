//! IMAP stress load: C clients, each logged in as its own user, loop over a mail client's work
//! for a fixed time (SELECT, FETCH of headers and of a whole message, STORE, SEARCH, APPEND,
//! EXPUNGE) and the tool prints commands per second and errors. Works against any IMAP4rev1
//! server on a loopback port (Postern, Dovecot): plaintext LOGIN, synchronizing literals.
//!
//! `imap-load --port 2143 --clients 10 --seconds 20 --users user%d@example.test --password pw`
//!
//! `--populate N` first appends N messages to each user's INBOX (not timed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    /// Concurrent clients (C), each its own user.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Seconds of load after login.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// User name pattern; `%d` becomes the client number (1-based).
    #[arg(long, default_value = "user%d@example.test")]
    users: String,
    #[arg(long, default_value = "benchpass")]
    password: String,
    /// Append this many messages to each INBOX before the timed loop.
    #[arg(long, default_value_t = 0)]
    populate: usize,
    /// Print one machine-readable line: `commands_per_sec loops errors p50_ms p99_ms`.
    #[arg(long)]
    raw: bool,
    /// Also print the mean latency of each command of the loop.
    #[arg(long)]
    breakdown: bool,
}

/// One tagged command's outcome.
struct Answer {
    /// Untagged lines (literals appended to the line they belong to).
    untagged: Vec<Vec<u8>>,
    ok: bool,
}

struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    tag: u64,
}

impl Client {
    async fn connect(args: &Args) -> Result<Client> {
        let stream = TcpStream::connect((args.host.as_str(), args.port)).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut client = Client {
            reader: BufReader::new(r),
            writer: w,
            tag: 0,
        };
        let greeting = client.line().await?;
        if !greeting.starts_with(b"* OK") {
            bail!("greeting: {}", String::from_utf8_lossy(&greeting));
        }
        Ok(client)
    }

    /// One response line, with any literals it announces read into it.
    async fn line(&mut self) -> Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let start = line.len();
            if self.reader.read_until(b'\n', &mut line).await? == 0 {
                bail!("connection closed");
            }
            let piece = &line[start..];
            let Some(len) = literal_length(piece) else {
                return Ok(line);
            };
            let at = line.len();
            line.resize(at + len, 0);
            self.reader.read_exact(&mut line[at..]).await?;
        }
    }

    async fn command(&mut self, text: &str) -> Result<Answer> {
        self.tag += 1;
        let tag = format!("a{}", self.tag);
        self.writer
            .write_all(format!("{tag} {text}\r\n").as_bytes())
            .await?;
        self.finish(&tag).await
    }

    /// APPEND with a synchronizing literal: waits for the server's `+` before the bytes.
    async fn append(&mut self, mailbox: &str, flags: &str, message: &[u8]) -> Result<Answer> {
        self.tag += 1;
        let tag = format!("a{}", self.tag);
        self.writer
            .write_all(
                format!("{tag} APPEND {mailbox} ({flags}) {{{}}}\r\n", message.len()).as_bytes(),
            )
            .await?;
        let go = self.line().await?;
        if !go.starts_with(b"+") {
            return Ok(Answer {
                untagged: vec![go],
                ok: false,
            });
        }
        self.writer.write_all(message).await?;
        self.writer.write_all(b"\r\n").await?;
        self.finish(&tag).await
    }

    async fn finish(&mut self, tag: &str) -> Result<Answer> {
        let mut untagged = Vec::new();
        loop {
            let line = self.line().await?;
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                let ok = line[tag.len() + 1..].starts_with(b"OK");
                return Ok(Answer { untagged, ok });
            }
            untagged.push(line);
        }
    }
}

/// `{123}\r\n` (or `{123+}`) at the end of a line: the length of the literal that follows.
fn literal_length(line: &[u8]) -> Option<usize> {
    let line = line
        .strip_suffix(b"\r\n")
        .or_else(|| line.strip_suffix(b"\n"))?;
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|b| *b == b'{')?;
    let digits = line[open + 1..]
        .strip_suffix(b"+")
        .unwrap_or(&line[open + 1..]);
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `* N EXISTS` in a SELECT answer.
fn exists(answer: &Answer) -> usize {
    answer
        .untagged
        .iter()
        .filter_map(|line| {
            let text = std::str::from_utf8(line).ok()?;
            let rest = text.strip_prefix("* ")?;
            let (n, word) = rest.trim_end().split_once(' ')?;
            (word == "EXISTS").then(|| n.parse().ok())?
        })
        .next_back()
        .unwrap_or(0)
}

fn message(user: &str, n: u64, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Load <load@remote.test>\r\nTo: {user}\r\nSubject: load message {n} lottery\r\n\
         Message-ID: <{n}.{user}>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m
}

/// The commands of one loop, in the order `one_loop` times them.
const LOOP: [&str; 9] = [
    "SELECT",
    "FETCH headers",
    "FETCH body",
    "STORE \\Seen",
    "SEARCH UNSEEN",
    "SEARCH SUBJECT",
    "APPEND",
    "STORE \\Deleted",
    "EXPUNGE",
];

struct Stats {
    commands: AtomicU64,
    errors: AtomicU64,
    loops: AtomicU64,
}

/// A mail client's round: open the folder, list the newest headers, read one message, flag it,
/// search, file a new message, delete the oldest and expunge (the folder size stays level).
async fn one_loop(
    c: &mut Client,
    user: &str,
    round: u64,
    stats: &Stats,
    latencies: &mut Vec<f64>,
) -> Result<()> {
    let mut timed = |answer: Result<Answer>, started: Instant| -> Result<Answer> {
        let answer = answer?;
        stats.commands.fetch_add(1, Ordering::Relaxed);
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
        if !answer.ok {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        Ok(answer)
    };
    let t = Instant::now();
    let selected = c.command("SELECT INBOX").await;
    let selected = timed(selected, t)?;
    let n = exists(&selected).max(1);
    let first = n.saturating_sub(19).max(1);
    let commands = [
        format!("FETCH {first}:{n} (UID FLAGS RFC822.SIZE ENVELOPE)"),
        format!("FETCH {} BODY.PEEK[]", 1 + (round as usize % n)),
        format!("STORE {} +FLAGS (\\Seen)", 1 + (round as usize * 7 % n)),
        "SEARCH UNSEEN".to_string(),
        "SEARCH SUBJECT \"message 1\"".to_string(),
    ];
    for command in &commands {
        let t = Instant::now();
        let answer = c.command(command).await;
        timed(answer, t)?;
    }
    let t = Instant::now();
    let appended = c.append("INBOX", "", &message(user, round, 2048)).await;
    timed(appended, t)?;
    let t = Instant::now();
    let stored = c.command("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    timed(stored, t)?;
    let t = Instant::now();
    let expunged = c.command("EXPUNGE").await;
    timed(expunged, t)?;
    stats.loops.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn run_client(
    args: Arc<Args>,
    number: usize,
    stats: Arc<Stats>,
    start: Instant,
    end: Instant,
) -> Result<Vec<f64>> {
    let user = args.users.replace("%d", &number.to_string());
    let mut c = Client::connect(&args).await?;
    let login = c
        .command(&format!("LOGIN \"{user}\" \"{}\"", args.password))
        .await?;
    if !login.ok {
        bail!("LOGIN {user} refused");
    }
    for n in 0..args.populate {
        let answer = c
            .append("INBOX", "", &message(&user, n as u64, 2048))
            .await?;
        if !answer.ok {
            bail!("APPEND for {user} refused");
        }
    }
    let mut latencies = Vec::new();
    tokio::time::sleep_until(start.into()).await;
    let mut round = number as u64 * 1000;
    while Instant::now() < end {
        one_loop(&mut c, &user, round, &stats, &mut latencies)
            .await
            .with_context(|| format!("client {number} ({user})"))?;
        round += 1;
    }
    c.command("LOGOUT").await?;
    Ok(latencies)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let stats = Arc::new(Stats {
        commands: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        loops: AtomicU64::new(0),
    });
    // Logins and populating happen before the clock starts: a generous head start.
    let start = Instant::now()
        + Duration::from_secs(2 + (args.populate as u64 * args.clients as u64) / 500);
    let end = start + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for number in 1..=args.clients {
        tasks.push(tokio::spawn(run_client(
            args.clone(),
            number,
            stats.clone(),
            start,
            end,
        )));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = Instant::now()
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(args.seconds as f64);
    if args.breakdown {
        // Every loop records its commands in the same order.
        for (i, name) in LOOP.iter().enumerate() {
            let mine: Vec<f64> = latencies
                .iter()
                .skip(i)
                .step_by(LOOP.len())
                .copied()
                .collect();
            let mean = mine.iter().sum::<f64>() / mine.len().max(1) as f64;
            eprintln!("{name:<16} {mean:8.2} ms mean");
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let commands = stats.commands.load(Ordering::Relaxed);
    let rate = commands as f64 / elapsed;
    let errors = stats.errors.load(Ordering::Relaxed);
    let loops = stats.loops.load(Ordering::Relaxed);
    if args.raw {
        println!(
            "{rate:.0} {loops} {errors} {:.2} {:.2}",
            pick(0.5),
            pick(0.99)
        );
    } else {
        println!(
            "{commands} commands in {elapsed:.1} s over {} clients: {rate:.0} commands/s, {loops} loops, {errors} errors, p50 {:.2} ms, p99 {:.2} ms",
            args.clients,
            pick(0.5),
            pick(0.99)
        );
    }
    Ok(())
}
