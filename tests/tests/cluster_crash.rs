//! Three nodes sharing mailboxes and the queue through one PostgreSQL cluster
//! (`[database] queue = true`), under load spread over them, while a random node is killed
//! with SIGKILL at random moments and started again. Every message sent to a local and a remote
//! recipient that was acknowledged with 250 must end up once in the mailbox and once at the
//! remote sink; mailboxes read the same (count, UIDs) from every node; a node's messages are
//! taken over by the others once its lease runs out. Then the database is stopped: SMTP answers
//! 451 4.3.0, never 250; started again, mail flows with no restart of the nodes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern::store::postgres::PgStore;
use postern::store::MailStore;
use postern_e2e::dns::{Rr, TestDns};
use postern_e2e::postgres::Cluster;
use postern_e2e::sink::{loopback_ip, Sink, SinkScript};
use postern_e2e::{set_key, SmtpClient, TestServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const NODES: usize = 3;
const KILLS: usize = 4;
/// Long enough that a live node's renewal (every third of it) is never late on a loaded CI
/// machine: a lease that runs out under a live node lets another node send what it is sending.
const LEASE_SECONDS: u64 = 10;
/// Message numbers of the load around the database outage start here.
const OUTAGE_LOAD: usize = 1_000_000;

/// Each message's outcome at its client, by number.
type Outcomes = Arc<Mutex<BTreeMap<usize, Option<bool>>>>;

/// Four senders numbering their messages from `first`, each to a node chosen in turn, while
/// `running`.
fn start_load(
    first: usize,
    ports: &Arc<Mutex<Vec<u16>>>,
    outcomes: &Outcomes,
    running: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|s| {
            let (outcomes, running, ports) = (outcomes.clone(), running.clone(), ports.clone());
            tokio::spawn(async move {
                let mut n = first + s;
                while running.load(Ordering::Relaxed) {
                    let port = ports.lock().unwrap()[(n / 4 + s) % NODES];
                    let outcome = send(port, n).await;
                    outcomes.lock().unwrap().insert(n, outcome);
                    n += 4;
                }
            })
        })
        .collect()
}

/// Node `index`'s configuration: its own host name (which the sink records from EHLO, so a
/// copy can be traced to the node that sent it), the shared database, leases of `lease` s.
fn node_config(
    config: String,
    index: usize,
    lease: u64,
    url: &str,
    dns: &TestDns,
    mx_port: u16,
) -> String {
    let config = set_key(
        &config,
        "server",
        "hostname",
        &format!("\"{}\"", node_name(index)),
    );
    let config = config.replace(
        "nameservers = [\"127.0.0.1:9\"]",
        &format!("nameservers = [\"{}\"]", dns.addr),
    );
    let config = set_key(&config, "relay", "trusted_networks", "[\"127.0.0.0/8\"]");
    let config = set_key(&config, "outbound", "mx_port", &mx_port.to_string());
    let config = set_key(&config, "outbound", "retry_schedule", "[\"1s\"]");
    // A plaintext IMAP listener the test may log in on (loopback only).
    let config = config.replace("name = \"imap\"\n", "name = \"imap\"\ntrusted = true\n");
    format!(
        "{config}\n[database]\nurl = {url:?}\ndomains = [\"example.test\", \"localhost\"]\n\
         migrate = true\nqueue = true\nusers = true\nlease_seconds = {lease}\ntimeout_seconds = 1\n"
    )
}

/// The lines of every node's log that `keep` wants, node after node.
fn log_lines(nodes: &[Arc<Mutex<TestServer>>], keep: impl Fn(&str) -> bool) -> Vec<String> {
    nodes
        .iter()
        .flat_map(|n| {
            let log = n.lock().unwrap().log();
            log.lines()
                .filter(|l| keep(l))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn node_name(index: usize) -> String {
    format!("node{index}.example.test")
}

fn message(n: usize) -> Vec<u8> {
    format!(
        "From: Load <load@example.test>\r\nTo: alice@example.test, bob@example.net\r\n\
         Subject: cluster crash {n}\r\nMessage-ID: <crash-{n}@example.test>\r\n\r\n\
         Message {n}, sent to a node that may die.\r\n"
    )
    .into_bytes()
}

/// The `crash-N` of a message's Message-ID.
fn number(bytes: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(bytes);
    let at = text.find("Message-ID: <crash-")? + "Message-ID: <crash-".len();
    text[at..].split('@').next()?.parse().ok()
}

/// One message through one node: Some(true) on 250, Some(false) on a refusal, None when the
/// connection broke (the outcome is unknown to the client: it may or may not have been stored).
async fn send(port: u16, n: usize) -> Option<bool> {
    let (mut client, _) = SmtpClient::connect(port).await.ok()?;
    client.expect("EHLO load.test", 250).await.ok()?;
    client
        .expect("MAIL FROM:<load@example.test>", 250)
        .await
        .ok()?;
    for rcpt in ["alice@example.test", "bob@example.net"] {
        client
            .expect(&format!("RCPT TO:<{rcpt}>"), 250)
            .await
            .ok()?;
    }
    let (code, _) = client.data(&message(n)).await.ok()?;
    let _ = client.cmd("QUIT").await;
    Some(code == 250)
}

/// One tagged IMAP command's untagged lines (the tagged reply must be OK).
async fn answer(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    command: &str,
) -> Vec<String> {
    w.write_all(format!("t {command}\r\n").as_bytes())
        .await
        .unwrap();
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(!line.is_empty(), "connection closed");
        if line.starts_with("t ") {
            assert!(line.starts_with("t OK"), "{command}: {line}");
            return lines;
        }
        lines.push(line);
    }
}

/// (message count, UIDs) of alice's INBOX as one node's IMAP server reads it.
async fn imap_view(port: u16) -> (usize, Vec<u32>) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut greeting = String::new();
    r.read_line(&mut greeting).await.unwrap();
    answer(&mut r, &mut w, "LOGIN alice@example.test alicepass").await;
    let selected = answer(&mut r, &mut w, "SELECT INBOX").await;
    let exists = selected
        .iter()
        .find_map(|l| {
            l.strip_prefix("* ")?
                .strip_suffix(" EXISTS\r\n")?
                .parse()
                .ok()
        })
        .unwrap();
    let searched = answer(&mut r, &mut w, "UID SEARCH ALL").await;
    let uids = searched
        .iter()
        .find_map(|l| l.strip_prefix("* SEARCH"))
        .unwrap_or("")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    answer(&mut r, &mut w, "LOGOUT").await;
    (exists, uids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_nodes_lose_nothing_and_send_nothing_twice() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let url = cluster.url();
    let sink_ip = loopback_ip();
    let sink = Sink::start(sink_ip, 0, SinkScript::default()).await;
    let dns = TestDns::start(vec![
        ("example.net", Rr::Mx(10, "mx.example.net".into())),
        ("mx.example.net", Rr::A(sink_ip)),
    ]);
    let nodes: Vec<Arc<Mutex<TestServer>>> = (0..NODES)
        .map(|i| {
            let server = TestServer::start(|c| {
                node_config(c, i, LEASE_SECONDS, &url, &dns, sink.addr.port())
            })
            .unwrap();
            Arc::new(Mutex::new(server))
        })
        .collect();
    let smtp_ports = Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|n| n.lock().unwrap().port("smtp"))
            .collect::<Vec<u16>>(),
    ));

    let began = Instant::now();
    // Load: four senders, each to a node chosen in turn, until the kills are over.
    let outcomes: Outcomes = Default::default();
    let running = Arc::new(AtomicBool::new(true));
    let senders = start_load(0, &smtp_ports, &outcomes, &running);
    // Kills at random moments (0.3 to 1.5 s apart), each node started again at once; each kill
    // noted (once the process is dead) with its victim.
    let mut kills: Vec<(Instant, usize)> = Vec::new();
    let mut seed = std::process::id() as u64;
    let mut random = move |below: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % below
    };
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(300 + random(1200))).await;
        let victim = random(NODES as u64) as usize;
        let node = nodes[victim].clone();
        let (killed, port) = tokio::task::spawn_blocking(move || {
            let mut node = node.lock().unwrap();
            node.kill9();
            let killed = Instant::now();
            std::thread::sleep(Duration::from_millis(200));
            node.restart().unwrap();
            (killed, node.port("smtp"))
        })
        .await
        .unwrap();
        kills.push((killed, victim));
        smtp_ports.lock().unwrap()[victim] = port;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    // The database goes away under load, and comes back: no 250 without a commit (what was
    // acknowledged is checked below with the rest), 451 4.3.0 meanwhile, and everything
    // resumes by itself.
    running.store(true, Ordering::Relaxed);
    let senders = start_load(OUTAGE_LOAD, &smtp_ports, &outcomes, &running);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let cluster = Arc::new(cluster);
    let down = cluster.clone();
    tokio::task::spawn_blocking(move || down.stop(true))
        .await
        .unwrap();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let up = cluster.clone();
    tokio::task::spawn_blocking(move || up.restart())
        .await
        .unwrap();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.store(false, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let refused_in_outage = outcomes
        .range(OUTAGE_LOAD..)
        .filter(|(_, o)| **o == Some(false))
        .count();
    let after_outage = outcomes
        .range(OUTAGE_LOAD..)
        .filter(|(_, o)| **o == Some(true))
        .count();
    assert!(refused_in_outage > 0, "no 451 while the database was down");
    assert!(after_outage > 0, "nothing accepted around the outage");
    let acknowledged: Vec<usize> = outcomes
        .iter()
        .filter(|(_, o)| **o == Some(true))
        .map(|(n, _)| *n)
        .collect();
    let unknown: Vec<usize> = outcomes
        .iter()
        .filter(|(_, o)| o.is_none())
        .map(|(n, _)| *n)
        .collect();
    assert!(acknowledged.len() > 20, "too little load: {outcomes:?}");

    // Everything acknowledged arrives: in alice's mailbox (read from the database) and at the
    // sink, within a few leases (a killed node's messages wait for its lease to run out).
    let store = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || Arc::new(PgStore::connect(&url, 2).unwrap()))
            .await
            .unwrap()
    };
    let stored_counts = || {
        let store = store.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let snapshot = store.snapshot("alice@example.test", "INBOX").unwrap();
                let mut counts: HashMap<usize, usize> = HashMap::new();
                for m in &snapshot.messages {
                    let bytes = store.read("alice@example.test", "INBOX", m).unwrap();
                    *counts
                        .entry(number(&bytes).expect("a load message"))
                        .or_default() += 1;
                }
                counts
            })
            .await
            .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(6 * LEASE_SECONDS + 60);
    let (stored, relayed) = loop {
        let stored = stored_counts().await;
        let relayed = sink.messages();
        let relayed_numbers: Vec<usize> = relayed.iter().filter_map(|m| number(&m.data)).collect();
        if acknowledged
            .iter()
            .all(|n| stored.contains_key(n) && relayed_numbers.contains(n))
        {
            break (stored, relayed);
        }
        if Instant::now() >= deadline {
            let missing: Vec<(usize, bool, bool)> = acknowledged
                .iter()
                .filter(|n| !stored.contains_key(n) || !relayed_numbers.contains(n))
                .map(|n| (*n, stored.contains_key(n), relayed_numbers.contains(n)))
                .collect();
            let logs = log_lines(&nodes, |l| l.contains("WARN") || l.contains("ERROR")).join("\n");
            panic!(
                "acknowledged but not delivered after {} s (number, stored, relayed): {missing:?}; warnings:\n{logs}",
                6 * LEASE_SECONDS + 60
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Local copies: each exactly once (deliveries are recorded by id in the transaction that
    // stores them, so a retry by another node finds the first copy).
    for (n, count) in &stored {
        assert_eq!(*count, 1, "message {n} stored {count} times");
        assert!(
            outcomes.get(n) != Some(&Some(false)),
            "message {n} was refused yet stored"
        );
    }
    // Remote copies: once, unless a node died between the sink's 250 and the commit of that
    // outcome (SMTP cannot close that window, RFC 5321 §6.1: the only alternative is to lose
    // mail); such a second copy must follow a kill of the node that sent the first, right
    // after it (the kill is noted once the process is dead, and the sink may note the copy a
    // moment after the node wrote its last byte), or come from the outage, which holds that
    // window open.
    let mut at_sink: BTreeMap<usize, Vec<(Instant, String)>> = BTreeMap::new();
    for m in &relayed {
        at_sink
            .entry(number(&m.data).expect("a load message"))
            .or_default()
            .push((m.received, m.helo.clone()));
    }
    let mut excused = 0;
    for (n, times) in &at_sink {
        assert!(
            outcomes.get(n) != Some(&Some(false)),
            "message {n} was refused yet relayed"
        );
        if times.len() > 1 {
            let (first, ref sender) = times[0];
            // The same window, held open by the outage: an outcome that could not be committed.
            let in_outage = first + Duration::from_millis(500) >= outage
                && first <= back + Duration::from_secs(1);
            assert!(
                times.len() == 2
                    && (in_outage
                        || kills.iter().any(|(k, victim)| {
                            node_name(*victim) == *sender
                                && *k + Duration::from_millis(250) >= first
                                && *k < first + Duration::from_millis(500)
                        })),
                "message {n} relayed {} times with no kill of its first sender right after the first: by {sender} at {:?}, by {} at {:?} after the start; kills (after, node) at {:?}; outage {:?} to {:?}",
                times.len(),
                first - began,
                times[1].1,
                times[1].0 - began,
                kills
                    .iter()
                    .map(|(k, v)| (*k - began, *v))
                    .collect::<Vec<_>>(),
                outage - began,
                back - began
            );
            excused += 1;
        }
    }
    // Each node reads the same mailbox.
    let expected: Vec<u32> = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            store
                .snapshot("alice@example.test", "INBOX")
                .unwrap()
                .messages
                .iter()
                .map(|m| m.uid)
                .collect()
        })
        .await
        .unwrap()
    };
    assert!(expected.windows(2).all(|w| w[0] < w[1]));
    for node in &nodes {
        let port = node.lock().unwrap().port("imap");
        assert_eq!(imap_view(port).await, (expected.len(), expected.clone()));
    }
    // Nothing is left in the queue.
    let left = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let c = PgStore::connect(&url, 1).unwrap();
            c.queue_claim(Duration::from_secs(1), 1000).unwrap()
        })
        .await
        .unwrap()
    };
    assert!(left.is_empty(), "still queued: {left:?}");
    // The killed nodes' messages were delivered by lease takeover, not only by restarts.
    let taken_over: usize = log_lines(&nodes, |l| l.contains("queue: took over messages"))
        .iter()
        .filter_map(|l| {
            l.split("count=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(
        taken_over > 0,
        "no kill left a message for the others to take over"
    );
    eprintln!(
        "cluster crash: {} acknowledged, {} unknown to the client, {} kills, {} messages taken over by lease; stored {} (each once), relayed {} ({} second copies right after a kill or in the outage); around the outage {} acknowledged, {} refused",
        acknowledged.len(),
        unknown.len(),
        kills.len(),
        taken_over,
        stored.len(),
        at_sink.len(),
        excused,
        after_outage,
        refused_in_outage
    );

    // The store's own runtime may not be dropped on this one.
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
}

/// A node that is alive but gets no CPU for longer than its lease (SIGSTOP: a long pause, a
/// starved VM) while its deliveries wait on the remote's 354: the other node takes its messages
/// over and sends them; the paused node, resumed, finds its hold lapsed and sends no final dot,
/// so every message reaches the sink once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_sends_no_second_copy() {
    const LEASE: u64 = 4;
    const MESSAGES: usize = 6;
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let url = cluster.url();
    let sink_ip = loopback_ip();
    let script = SinkScript {
        data_command_delay: Duration::from_millis(1500),
        ..SinkScript::default()
    };
    let sink = Sink::start(sink_ip, 0, script).await;
    let dns = TestDns::start(vec![
        ("example.net", Rr::Mx(10, "mx.example.net".into())),
        ("mx.example.net", Rr::A(sink_ip)),
    ]);
    let nodes: Vec<TestServer> = (0..2)
        .map(|i| {
            TestServer::start(|c| node_config(c, i, LEASE, &url, &dns, sink.addr.port())).unwrap()
        })
        .collect();
    let port = nodes[0].port("smtp");
    for n in 0..MESSAGES {
        let (mut client, _) = SmtpClient::connect(port).await.unwrap();
        client.expect("EHLO load.test", 250).await.unwrap();
        client
            .expect("MAIL FROM:<load@example.test>", 250)
            .await
            .unwrap();
        client
            .expect("RCPT TO:<bob@example.net>", 250)
            .await
            .unwrap();
        let (code, _) = client.data(&message(n)).await.unwrap();
        assert_eq!(code, 250);
        let _ = client.cmd("QUIT").await;
    }
    // Node 0's deliveries are now waiting on the sink's 354.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(sink.messages().is_empty(), "delivered before the pause");
    nodes[0].freeze(true);
    // Its lease runs out; node 1 takes the messages over and delivers them.
    let relayed =
        tokio::time::timeout(Duration::from_secs(4 * LEASE + 20), sink.wait_for(MESSAGES))
            .await
            .expect("node 1 took over and delivered");
    nodes[0].freeze(false);
    // Give the resumed node time to do whatever it would do.
    tokio::time::sleep(Duration::from_secs(LEASE)).await;
    let mut copies: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for m in sink.messages() {
        copies
            .entry(number(&m.data).expect("a test message"))
            .or_default()
            .push(m.helo.clone());
    }
    assert_eq!(copies.len(), MESSAGES, "{copies:?}");
    for (n, senders) in &copies {
        assert_eq!(senders, &vec![node_name(1)], "message {n}");
    }
    assert_eq!(relayed.len(), MESSAGES);
    let log = nodes[0].log();
    assert!(
        log.contains("hold on the message lapsed before the final dot"),
        "node 0 never reached the final dot after its pause:\n{log}"
    );
    drop(nodes);
    drop(cluster);
}
