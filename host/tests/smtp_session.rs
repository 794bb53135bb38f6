//! SMTP session tests over an in-memory stream: the real session state machine, spool and
//! scheduler, with a client that speaks bytes and checks each reply.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern::auth::UserDirectory;
use postern::config::{Config, ListenerConfig, ListenerProtocol, TlsMode};
use postern::queue::{Queue, Queued, Spool};
use postern::smtp::session::Session;
use postern::smtp::SmtpServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::{mpsc, watch};

/// Small messages reach the scheduler in memory.
fn bytes(queued: &Queued) -> &[u8] {
    queued
        .message
        .as_deref()
        .expect("small messages travel in memory")
}

struct Harness {
    server: Arc<SmtpServer>,
    queued: mpsc::Receiver<Queued>,
    spool: Spool,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

fn harness(edit: impl FnOnce(&mut Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::embedded_default();
    config.server.data_dir = dir.path().to_path_buf();
    edit(&mut config);
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let (tx, rx) = mpsc::channel(64);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let users = Arc::new(UserDirectory::from_config(&config));
    let server = Arc::new(SmtpServer::new(
        Arc::new(config),
        users,
        Queue::new(spool.clone(), tx),
        None,
        shutdown_rx,
    ));
    Harness {
        server,
        queued: rx,
        spool,
        _dir: dir,
        _shutdown: shutdown_tx,
    }
}

fn listener(protocol: ListenerProtocol, trusted: bool) -> Arc<ListenerConfig> {
    Arc::new(ListenerConfig {
        name: "test".into(),
        protocol,
        address: "127.0.0.1:0".parse().unwrap(),
        tls: TlsMode::None,
        trusted,
    })
}

struct Client {
    reader: BufReader<tokio::io::ReadHalf<DuplexStream>>,
    writer: tokio::io::WriteHalf<DuplexStream>,
}

impl Client {
    fn start(h: &Harness, listener: Arc<ListenerConfig>, peer: &str) -> Client {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let peer: SocketAddr = peer.parse().unwrap();
        let session = Session::new(h.server.clone(), listener, peer);
        tokio::spawn(session.run(theirs));
        let (r, w) = tokio::io::split(ours);
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// Reads one whole (possibly multi-line) reply.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = Vec::new();
            loop {
                let byte = tokio::time::timeout(Duration::from_secs(10), self.reader.read_u8())
                    .await
                    .expect("reply within 10 s");
                match byte {
                    Ok(b) => {
                        line.push(b);
                        if b == b'\n' {
                            break;
                        }
                    }
                    Err(_) => return all + &String::from_utf8_lossy(&line),
                }
            }
            let line = String::from_utf8(line).unwrap();
            assert!(line.ends_with("\r\n"), "reply line ends in CRLF: {line:?}");
            let last = line.as_bytes().get(3) == Some(&b' ');
            all.push_str(&line);
            if last {
                return all;
            }
        }
    }

    /// Sends a command and asserts that the reply starts with `expect`.
    async fn cmd(&mut self, line: &str, expect: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        let reply = self.reply().await;
        assert!(
            reply.starts_with(expect),
            "{line:?} got {reply:?}, want {expect:?}"
        );
        reply
    }

    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.reader.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

async fn greeted(h: &Harness) -> Client {
    let mut c = Client::start(
        h,
        listener(ListenerProtocol::Smtp, false),
        "192.0.2.10:4000",
    );
    let banner = c.reply().await;
    assert!(banner.starts_with("220 "), "{banner}");
    c.cmd("EHLO client.test", "250-").await;
    c
}

#[tokio::test]
async fn ehlo_lists_extensions_without_auth_before_tls() {
    let h = harness(|_| {});
    let mut c = Client::start(
        &h,
        listener(ListenerProtocol::Smtp, false),
        "192.0.2.10:4000",
    );
    c.reply().await;
    let ehlo = c.cmd("EHLO client.test", "250-").await;
    for ext in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing from {ehlo}");
    }
    assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
    // RFC 8689 §2: REQUIRETLS only on a protected session.
    assert!(!ehlo.contains("REQUIRETLS"), "{ehlo}");
    c.cmd(
        "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZXBhc3M=",
        "538 5.7.11",
    )
    .await;
    c.cmd("HELO client.test", "250 ").await;
    c.cmd("QUIT", "221 2.0.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn dsn_parameters_are_checked() {
    let h = harness(|_| {});
    let mut c = Client::start(
        &h,
        listener(ListenerProtocol::Smtp, false),
        "192.0.2.10:4000",
    );
    c.reply().await;
    c.cmd("EHLO client.test", "250-").await;
    // RFC 3461 §4.3, §4.4: one RET, ENVID of at most 100 characters.
    c.cmd("MAIL FROM:<a@remote.test> RET=BODY", "501 ").await;
    let long = "x".repeat(101);
    c.cmd(&format!("MAIL FROM:<a@remote.test> ENVID={long}"), "501 ")
        .await;
    c.cmd("MAIL FROM:<a@remote.test> REQUIRETLS", "530 5.7.10")
        .await;
    c.cmd(
        "MAIL FROM:<a@remote.test> RET=HDRS ENVID=a+2Bb",
        "250 2.1.0",
    )
    .await;
    // §4.1: NEVER stands alone; §4.2: ORCPT of the rfc822 type only.
    c.cmd("RCPT TO:<alice@example.test> NOTIFY=NEVER,SUCCESS", "501 ")
        .await;
    c.cmd("RCPT TO:<alice@example.test> ORCPT=x400;a", "501 ")
        .await;
    c.cmd(
        "RCPT TO:<alice@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;al+2Bice@old.test",
        "250 2.1.5",
    )
    .await;
    c.cmd("QUIT", "221 2.0.0").await;
}

#[tokio::test]
async fn commands_out_of_order_get_503() {
    let h = harness(|_| {});
    let mut c = Client::start(
        &h,
        listener(ListenerProtocol::Smtp, false),
        "192.0.2.10:4000",
    );
    c.reply().await;
    c.cmd("MAIL FROM:<a@remote.test>", "503 5.5.1").await;
    c.cmd("EHLO x", "250-").await;
    c.cmd("RCPT TO:<alice@example.test>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250 2.1.0").await;
    c.cmd("MAIL FROM:<a@remote.test>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("RSET", "250").await;
    c.send(b"BDAT 3 LAST\r\nabc").await;
    assert!(c.reply().await.starts_with("503 5.5.1"));
    c.cmd("FOO bar", "500 5.5.2").await;
    c.cmd("VRFY alice", "252 2.5.0").await;
    c.cmd("EXPN staff", "502 5.5.1").await;
    c.cmd("NOOP", "250").await;
    c.cmd("HELP", "214").await;
}

#[tokio::test]
async fn pipelined_transaction_is_spooled_with_received_header() {
    let mut h = harness(|_| {});
    let mut c = greeted(&h).await;
    c.send(
        b"MAIL FROM:<sender@remote.test> SIZE=100\r\nRCPT TO:<alice@example.test>\r\n\
          RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob+lists@Example.TEST>\r\nDATA\r\n",
    )
    .await;
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("550 5.1.1"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("354"));
    c.send(b"Subject: pipelined\r\n\r\n..stuffed\r\nlast\r\n.\r\n")
        .await;
    let done = c.reply().await;
    assert!(done.starts_with("250 2.0.0 OK: queued as "), "{done}");
    let queued = h.queued.recv().await.unwrap();
    assert!(done.contains(&queued.envelope.id));
    assert_eq!(queued.envelope.sender, "sender@remote.test");
    let mailboxes: Vec<_> = queued
        .envelope
        .recipients
        .iter()
        .map(|r| format!("{:?}", r.route))
        .collect();
    assert_eq!(mailboxes.len(), 2);
    assert!(mailboxes[1].contains("bob@example.test"), "{mailboxes:?}");
    let text = String::from_utf8(bytes(&queued).to_vec()).unwrap();
    assert!(
        text.starts_with(
            "Received: from client.test ([192.0.2.10])\r\n\tby localhost (Postern) with ESMTP id "
        ),
        "{text}"
    );
    assert!(
        text.ends_with("\r\nSubject: pipelined\r\n\r\n.stuffed\r\nlast\r\n"),
        "{text}"
    );
    // It is in the spool, durable, byte for byte.
    let (envelope, spooled) = h.spool.read(&queued.envelope.id).unwrap();
    assert_eq!(envelope, queued.envelope);
    assert_eq!(spooled, bytes(&queued));
}

#[tokio::test]
async fn data_arriving_byte_by_byte_is_assembled() {
    let mut h = harness(|_| {});
    let mut c = greeted(&h).await;
    c.cmd("MAIL FROM:<>", "250").await;
    c.cmd("RCPT TO:<postmaster>", "250 2.1.5").await;
    c.cmd("DATA", "354").await;
    for b in b"Subject: slow\r\n\r\nx\r\n.\r\n" {
        c.send(&[*b]).await;
    }
    assert!(c.reply().await.starts_with("250 2.0.0"));
    let queued = h.queued.recv().await.unwrap();
    assert_eq!(queued.envelope.sender, "");
    assert!(bytes(&queued).ends_with(b"Subject: slow\r\n\r\nx\r\n"));
    assert!(format!("{:?}", queued.envelope.recipients[0].route).contains("alice@example.test"));
}

#[tokio::test]
async fn bdat_chunks_are_joined_and_refused_chunks_are_consumed() {
    let mut h = harness(|_| {});
    let mut c = greeted(&h).await;
    // No transaction: the chunk is read and dropped, the stream stays in step.
    c.send(b"BDAT 5\r\nHELLO").await;
    let reply = c.reply().await;
    assert!(reply.starts_with("503"), "{reply}");
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<alice@example.test>", "250").await;
    c.send(b"BDAT 14\r\nSubject: b\r\n\r\n").await;
    assert!(c.reply().await.starts_with("250 2.0.0 14 octets"));
    c.send(b"DATA\r\n").await;
    assert!(c.reply().await.starts_with("503"), "DATA after BDAT");
    c.send(b"BDAT 6 LAST\r\nbody\r\n").await;
    let done = c.reply().await;
    assert!(done.starts_with("250 2.0.0 OK: queued as"), "{done}");
    let queued = h.queued.recv().await.unwrap();
    assert!(bytes(&queued).ends_with(b"Subject: b\r\n\r\nbody\r\n"));
    // All recipients refused: the chunk is still consumed, then 554.
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<nobody@example.test>", "550").await;
    c.send(b"BDAT 4 LAST\r\nabcd").await;
    assert!(c.reply().await.starts_with("554 5.5.1"));
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn size_limits_are_enforced_at_mail_and_in_data() {
    let h = harness(|c| {
        c.limits.max_message_size = 1000;
        c.limits.body_memory_budget = 1 << 20;
    });
    let mut c = greeted(&h).await;
    c.cmd("MAIL FROM:<a@remote.test> SIZE=1001", "552 5.3.4")
        .await;
    c.cmd("MAIL FROM:<a@remote.test> SIZE=999", "250").await;
    c.cmd("RCPT TO:<alice@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(&[b'x'; 2000]).await;
    c.send(b"\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("552 5.3.4"));
    // The session goes on, with the transaction reset.
    c.cmd("RCPT TO:<alice@example.test>", "503").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<alice@example.test>", "250").await;
    c.send(b"BDAT 1001 LAST\r\n").await;
    c.send(&[b'y'; 1001]).await;
    assert!(c.reply().await.starts_with("552 5.3.4"));
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn overlong_line_is_refused_and_session_recovers() {
    let h = harness(|_| {});
    let mut c = greeted(&h).await;
    let mut long = b"MAIL FROM:<".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100_000));
    long.extend(b">\r\n");
    c.send(&long).await;
    assert!(c.reply().await.starts_with("500 5.5.2 Line too long"));
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn relay_policy_and_recipient_limits() {
    let h = harness(|c| c.limits.max_recipients = 2);
    let mut c = greeted(&h).await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    for probe in [
        "RCPT TO:<victim@remote.test>",
        "RCPT TO:<victim%remote.test@example.test>",
        "RCPT TO:<@example.test:victim@remote.test>",
        "RCPT TO:<\"victim@remote.test\"@example.test>",
        "RCPT TO:<victim@REMOTE.TEST>",
    ] {
        let reply = c.cmd(probe, "5").await;
        assert!(
            reply.starts_with("550 5.7.1")
                || reply.starts_with("550 5.1.1")
                || reply.starts_with("501"),
            "{probe}: {reply}"
        );
    }
    c.cmd("RCPT TO:<victim@[127.0.0.1]>", "501").await;
    c.cmd("RCPT TO:<alice@example.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("RCPT TO:<alice+x@example.test>", "452 4.5.3").await;
}

#[tokio::test]
async fn trusted_network_may_relay() {
    let h = harness(|c| c.relay.trusted_networks = vec!["192.0.2.0/24".parse().unwrap()]);
    let mut c = greeted(&h).await;
    c.cmd("MAIL FROM:<a@inside.test>", "250").await;
    c.cmd("RCPT TO:<someone@remote.test>", "250 2.1.5").await;
}

#[tokio::test]
async fn submission_requires_auth_and_owned_sender() {
    let h = harness(|_| {});
    let mut c = Client::start(
        &h,
        listener(ListenerProtocol::Submission, true),
        "127.0.0.1:4000",
    );
    c.reply().await;
    let ehlo = c.cmd("EHLO me", "250-").await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN"),
        "trusted listener offers AUTH: {ehlo}"
    );
    c.cmd("MAIL FROM:<alice@example.test>", "530 5.7.0").await;
    // "\0alice@example.test\0wrong"
    c.cmd(
        "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==",
        "535 5.7.8",
    )
    .await;
    // LOGIN exchange: Username:, Password:
    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd("YWxpY2VAZXhhbXBsZS50ZXN0", "334 UGFzc3dvcmQ6").await;
    c.cmd("YWxpY2VwYXNz", "235 2.7.0").await;
    c.cmd("AUTH PLAIN", "503 5.5.1").await;
    c.cmd("MAIL FROM:<bob@example.test>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<Alice+outgoing@example.test>", "250")
        .await;
    c.cmd("RCPT TO:<friend@remote.test>", "250 2.1.5").await;
}

#[tokio::test]
async fn repeated_auth_failures_disconnect() {
    let h = harness(|c| c.limits.max_auth_failures = 2);
    let mut c = Client::start(
        &h,
        listener(ListenerProtocol::Submission, true),
        "127.0.0.1:4000",
    );
    c.reply().await;
    c.cmd("EHLO me", "250-").await;
    c.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==", "535")
        .await;
    c.cmd(
        "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==",
        "421 4.7.0",
    )
    .await;
    assert!(c.closed().await);
    // The address is now throttled across connections once the per-IP limit is reached.
}

#[tokio::test]
async fn too_many_errors_disconnects() {
    let h = harness(|c| c.limits.max_errors = 3);
    let mut c = greeted(&h).await;
    c.send(b"GARBAGE\r\nGARBAGE\r\nGARBAGE\r\nNOOP\r\n").await;
    let mut replies = String::new();
    for _ in 0..4 {
        replies.push_str(&c.reply().await);
    }
    assert_eq!(replies.matches("500 5.5.2").count(), 3, "{replies}");
    assert!(replies.contains("421 4.7.0"), "{replies}");
    assert!(c.closed().await);
}

#[tokio::test]
async fn idle_client_times_out_with_421() {
    let h = harness(|c| c.limits.command_timeout_secs = 1);
    let mut c = greeted(&h).await;
    c.send(b"NO").await; // half a command, then silence
    let reply = c.reply().await;
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert!(c.closed().await);
}

#[tokio::test]
async fn smuggled_end_of_data_stays_in_the_body() {
    let mut h = harness(|_| {});
    let mut c = greeted(&h).await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<alice@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: one\r\n\r\nx\n.\nMAIL FROM:<evil@remote.test>\r\n.\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    let queued = h.queued.recv().await.unwrap();
    let text = String::from_utf8_lossy(bytes(&queued));
    assert!(
        text.contains("x\r\n.\r\nMAIL FROM:<evil@remote.test>\r\n"),
        "{text}"
    );
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn smtputf8_addresses_need_the_parameter() {
    let h = harness(|_| {});
    let mut c = greeted(&h).await;
    c.cmd("MAIL FROM:<pelé@remote.test>", "553 5.6.7").await;
    c.cmd("MAIL FROM:<pelé@remote.test> SMTPUTF8", "250").await;
    c.cmd("RCPT TO:<alice@example.test>", "250").await;
}

#[tokio::test]
async fn too_many_received_fields_is_a_loop() {
    let mut h = harness(|c| c.limits.max_hops = 5);
    let mut c = greeted(&h).await;
    // Four earlier hops plus ours make five: accepted.
    let four = "Received: from a by b; Sun, 22 Nov 2026 06:00:00 +0000\r\n".repeat(4);
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<alice@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(format!("{four}Subject: ok\r\n\r\nx\r\n.\r\n").as_bytes())
        .await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    assert!(h.queued.recv().await.is_some());
    let five = "Received: from a by b; Sun, 22 Nov 2026 06:00:00 +0000\r\n".repeat(5);
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<alice@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(format!("{five}Subject: loop\r\n\r\nx\r\n.\r\n").as_bytes())
        .await;
    let reply = c.reply().await;
    assert_eq!(reply, "554 5.4.6 Too many hops (6): mail loop?\r\n");
    assert!(h.queued.try_recv().is_err(), "nothing spooled");
    c.cmd("NOOP", "250").await;
}
