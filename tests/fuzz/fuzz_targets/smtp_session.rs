//! The SMTP session state machine, whole: the real `Session` with its spool on tmpfs, fed an
//! arbitrary byte stream from a client over an in-memory pipe. The first input byte picks the
//! listener and client (below); the rest is mapped onto SMTP's alphabet so
//! that transactions, AUTH exchanges, DATA and BDAT bodies are reached. Time is paused, so
//! timeouts and failed-login delays elapse at once. Checks: no panic, the session ends, every
//! reply line is well formed, nothing is answered after 221/421, and each accepted message is
//! in the spool. First byte: bits 0-1 pick the listener (inbound, submission, each untrusted or
//! trusted for plaintext AUTH), bit 2 a client inside or outside `trusted_networks`.
#![no_main]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHasher, SaltString};
use libfuzzer_sys::fuzz_target;
use postern::auth::UserDirectory;
use postern::config::{Config, ListenerConfig, ListenerProtocol, TlsMode, UserConfig};
use postern::queue::{Queue, Spool};
use postern::smtp::session::Session;
use postern::smtp::SmtpServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"EHLO client.example\r\n",
    b"HELO client\r\n",
    b"MAIL FROM:<alice@example.test>",
    b"MAIL FROM:<>",
    b"RCPT TO:<bob@example.test>",
    b"RCPT TO:<",
    b"@remote.example>",
    b">\r\n",
    b"DATA\r\n",
    b"Subject: fuzz\r\n\r\nbody\r\n.\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r\n..",
    b"BDAT ",
    b" LAST\r\n",
    b"RSET\r\n",
    b"AUTH PLAIN ",
    b"AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n",
    b"AUTH LOGIN\r\n",
    b"YWxpY2VAZXhhbXBsZS50ZXN0\r\n",
    b"c2VjcmV0\r\n",
    b"*\r\n",
    b"STARTTLS\r\n",
    b"QUIT\r\n",
    b"NOOP\r\n",
    b"VRFY bob\r\n",
    b"EXPN list\r\n",
    b"HELP\r\n",
    b" SIZE=",
    b" BODY=8BITMIME",
    b" BODY=BINARYMIME",
    b" SMTPUTF8",
    b" RET=HDRS ENVID=x",
    b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y",
    b"@[127.0.0.1]",
    b"\"quoted local\"",
    b"%remote.example@example.test",
    b"@a.example,@b.example:",
    b"POSTMASTER",
    b"b\xc3\xb6b@example.test",
    b"\0",
    b"\r",
    b"\n",
    b"10",
    b"999999999999",
];

struct Harness {
    runtime: tokio::runtime::Runtime,
    /// Queue ids the scheduler's stand-in took off the spool.
    spooled: Arc<std::sync::Mutex<Vec<String>>>,
    servers: Vec<(Arc<SmtpServer>, Arc<ListenerConfig>)>,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

fn listener(protocol: ListenerProtocol, trusted: bool) -> Arc<ListenerConfig> {
    Arc::new(ListenerConfig {
        name: "fuzz".into(),
        protocol,
        address: "127.0.0.1:0".parse().unwrap(),
        tls: TlsMode::None,
        trusted,
    })
}

fn harness() -> Harness {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    // tmpfs: the spool fsyncs every message, which would be the whole cost on a disk.
    let dir = tempfile::Builder::new()
        .prefix("postern-fuzz")
        .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    let mut config = Config::embedded_default();
    config.server.data_dir = dir.path().to_path_buf();
    config.limits.max_message_size = 64 * 1024;
    config.relay.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()];
    // A cheap hash: argon2 at its real cost would be the whole run.
    let params = argon2::Params::new(8, 1, 1, None).unwrap();
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"postern-fuzzing").unwrap();
    let hash = hasher.hash_password(b"secret", &salt).unwrap().to_string();
    config.users = vec![
        UserConfig {
            address: "alice@example.test".into(),
            password: hash.clone(),
            apop_secret: None,
            quota_mb: None,
            quota_messages: None,
        },
        UserConfig {
            address: "bob@example.test".into(),
            password: hash,
            apop_secret: None,
            quota_mb: None,
            quota_messages: None,
        },
    ];
    let config = Arc::new(config);
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let spooled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let users = Arc::new(UserDirectory::from_config(&config));
    let server = {
        let _guard = runtime.enter();
        // The scheduler's stand-in: takes each accepted message off the spool.
        let scheduler_spool = spool.clone();
        let spooled = spooled.clone();
        runtime.spawn(async move {
            let spool = scheduler_spool;
            while let Some(queued) = rx.recv().await {
                let queued: postern::queue::Queued = queued;
                let (_, bytes) = spool
                    .read(&queued.envelope.id.to_string())
                    .expect("acknowledged message is in the spool");
                assert!(!bytes.is_empty());
                spooled.lock().unwrap().push(queued.envelope.id.to_string());
                spool.remove(&[queued.envelope.id]).unwrap();
            }
        });
        Arc::new(SmtpServer::new(
            config,
            users,
            Queue::new(spool, tx),
            None,
            shutdown_rx,
        ))
    };
    let servers = vec![
        (server.clone(), listener(ListenerProtocol::Smtp, false)),
        (
            server.clone(),
            listener(ListenerProtocol::Submission, false),
        ),
        (server.clone(), listener(ListenerProtocol::Smtp, true)),
        (server, listener(ListenerProtocol::Submission, true)),
    ];
    Harness {
        runtime,
        spooled,
        servers,
        _dir: dir,
        _shutdown: shutdown_tx,
    }
}

static HARNESS: OnceLock<std::sync::Mutex<Harness>> = OnceLock::new();

/// Each reply line is `NNN-text` or `NNN text` with a 2xx-5xx code, CRLF-terminated. Returns
/// the queue ids of the messages acknowledged with 250.
fn check_replies(output: &[u8]) -> Vec<String> {
    let mut acknowledged = Vec::new();
    let mut closed = false;
    for line in output.split_inclusive(|b| *b == b'\n') {
        assert!(
            !closed,
            "a reply after the connection was closed: {:?}",
            String::from_utf8_lossy(output)
        );
        assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {line:?}");
        assert!(
            line.len() >= 5 && line.len() <= 512,
            "reply line length: {line:?}"
        );
        assert!(
            (b'2'..=b'5').contains(&line[0])
                && line[1].is_ascii_digit()
                && line[2].is_ascii_digit()
        );
        assert!(
            line[3] == b' ' || line[3] == b'-',
            "reply separator: {line:?}"
        );
        if line[3] == b' ' && (line.starts_with(b"221 ") || line.starts_with(b"421 ")) {
            closed = true;
        }
        if let Some(id) = line.strip_prefix(b"250 2.0.0 OK: queued as ".as_slice()) {
            acknowledged.push(String::from_utf8_lossy(id.trim_ascii_end()).into_owned());
        }
    }
    acknowledged
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let harness = HARNESS
        .get_or_init(|| std::sync::Mutex::new(harness()))
        .lock()
        .unwrap();
    let (server, listener) = harness.servers[pick as usize % 4].clone();
    let reads = common::chunks(rest, TOKENS);
    // A different client address per run, so the per-IP AUTH throttle does not end every run.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Bit 2 of the first byte: a client in trusted_networks (127/8, may relay) or not (10/8).
    let net = if pick & 4 != 0 { 127 } else { 10 };
    let peer = SocketAddr::from(([net, (run >> 16) as u8, (run >> 8) as u8, run as u8], 40000));
    let spooled = harness.spooled.clone();
    spooled.lock().unwrap().clear();
    let output = harness.runtime.block_on(async move {
        let (client, theirs) = tokio::io::duplex(1 << 16);
        let session = tokio::spawn(Session::new(server, listener, peer).run(theirs));
        let (mut reader, mut writer) = tokio::io::split(client);
        let writing = tokio::spawn(async move {
            for read in reads {
                if writer.write_all(&read).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = writer.shutdown().await;
        });
        let mut output = Vec::new();
        // No timeout of our own: with time paused, a wait on the spool's committer thread would
        // fire it. A session that never ends is caught by libFuzzer's -timeout.
        reader.read_to_end(&mut output).await.expect("read");
        session.await.expect("the session panicked");
        writing.await.unwrap();
        // Let the scheduler's stand-in take what the session queued last.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        output
    });
    // FUZZ_SHOW=1 prints the dialogue, for reading a crash input.
    if std::env::var_os("FUZZ_SHOW").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&output));
    }
    let acknowledged = check_replies(&output);
    let spooled = spooled.lock().unwrap();
    for id in &acknowledged {
        assert!(
            spooled.contains(id),
            "message {id} acknowledged but never queued"
        );
    }
});
