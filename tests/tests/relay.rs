//! Outbound relay end to end: the real binary relays to scripted sinks found through a test DNS
//! server (MX, A records on random 127.x.y.z addresses), retries, bounces, survives restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_e2e::dns::{Rr, TestDns};
use postern_e2e::relay::{relay_server, send, wait_for_notice, wait_until};
use postern_e2e::sink::{loopback_ip, Sink, SinkScript};
use postern_e2e::{set_key, SmtpClient, TestServer};

const MESSAGE: &[u8] = b"From: Alice <alice@example.test>\r\n\
To: Bob <bob@example.net>\r\n\
Subject: relayed\r\n\
Message-ID: <relay-1@example.test>\r\n\
\r\n\
Hello over there.\r\n\
.a line with a leading dot\r\n";

#[tokio::test]
async fn mx_preference_fallback_and_exact_bytes() {
    let (dead, live) = (loopback_ip(), loopback_ip());
    let sink = Sink::start(live, 0, SinkScript::default()).await;
    let port = sink.addr.port();
    let dns = TestDns::start(vec![
        ("example.net", Rr::Mx(20, "mx2.example.net".into())),
        ("example.net", Rr::Mx(10, "mx1.example.net".into())),
        ("mx1.example.net", Rr::A(dead)), // nothing listens there: connection refused
        ("mx2.example.net", Rr::A(live)),
        ("implicit.test", Rr::A(live)), // no MX: the domain's own address (RFC 5321 §5.1)
    ]);
    let server = relay_server(&dns, port, |c| c);
    send(&server, "alice@example.test", &["bob@example.net"], MESSAGE).await;
    let got = sink.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert_eq!(got[0].from, "alice@example.test");
    assert_eq!(got[0].to, vec!["bob@example.net"]);
    assert_eq!(got[0].helo, "localhost");
    assert!(
        got[0].data.starts_with(b"Received: from client.test"),
        "trace header first"
    );
    assert!(
        got[0].data.ends_with(MESSAGE),
        "the message arrives byte for byte"
    );
    let log = server.log();
    assert!(
        log.contains("mx1.example.net") || log.contains(&dead.to_string()),
        "{log}"
    );

    send(
        &server,
        "alice@example.test",
        &["carol@implicit.test"],
        MESSAGE,
    )
    .await;
    let got = sink.wait_for(2).await;
    assert_eq!(got[1].to, vec!["carol@implicit.test"]);
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
}

#[tokio::test]
async fn lower_preference_wins_when_both_answer() {
    let (first, second) = (loopback_ip(), loopback_ip());
    let a = Sink::start(first, 0, SinkScript::default()).await;
    let port = a.addr.port();
    let b = Sink::start(second, port, SinkScript::default()).await;
    let dns = TestDns::start(vec![
        ("pref.test", Rr::Mx(5, "low.pref.test".into())),
        ("pref.test", Rr::Mx(50, "high.pref.test".into())),
        ("low.pref.test", Rr::A(first)),
        ("high.pref.test", Rr::A(second)),
    ]);
    let server = relay_server(&dns, port, |c| c);
    send(&server, "alice@example.test", &["x@pref.test"], MESSAGE).await;
    assert_eq!(a.wait_for(1).await.len(), 1, "{}", server.log());
    assert!(b.messages().is_empty());
}

#[tokio::test]
async fn temporary_failure_is_retried_until_accepted() {
    let ip = loopback_ip();
    let script = SinkScript {
        rcpt: Arc::new(|_, transaction| {
            if transaction < 2 {
                "451 4.7.1 Greylisted, try again".into()
            } else {
                "250 2.1.5 OK".into()
            }
        }),
        ..SinkScript::default()
    };
    let sink = Sink::start(ip, 0, script).await;
    let dns = TestDns::start(vec![("retry.test", Rr::A(ip))]);
    let server = relay_server(&dns, sink.addr.port(), |c| c);
    send(&server, "alice@example.test", &["bob@retry.test"], MESSAGE).await;
    let got = sink.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert_eq!(sink.transactions(), 3, "two deferrals, then the delivery");
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.messages().len(), 1, "delivered exactly once");
    assert!(
        server.maildir("alice", "example.test").is_empty(),
        "no notice for a success"
    );
}

/// Reads alice's mailbox until a message containing `needle` arrives.
#[tokio::test]
async fn permanent_failure_bounces_to_the_local_sender() {
    let ip = loopback_ip();
    let script = SinkScript {
        rcpt: Arc::new(|rcpt, _| {
            if rcpt.starts_with("nobody") {
                "550 5.1.1 <nobody@far.test>: no such user".into()
            } else {
                "250 2.1.5 OK".into()
            }
        }),
        ..SinkScript::default()
    };
    let sink = Sink::start(ip, 0, script).await;
    let dns = TestDns::start(vec![
        ("far.test", Rr::Mx(10, "mx.far.test".into())),
        ("mx.far.test", Rr::A(ip)),
    ]);
    let server = relay_server(&dns, sink.addr.port(), |c| c);
    send(
        &server,
        "alice@example.test",
        &["nobody@far.test", "somebody@far.test"],
        MESSAGE,
    )
    .await;
    let notice = wait_for_notice(&server, "Undelivered Mail Returned to Sender").await;
    assert!(notice.starts_with("Return-Path: <>\n"), "{notice}");
    assert!(notice.contains("Content-Type: multipart/report; report-type=delivery-status;"));
    assert!(notice.contains(
        "Final-Recipient: rfc822; nobody@far.test\nAction: failed\nStatus: 5.1.1\nRemote-MTA: dns; mx.far.test\nDiagnostic-Code: smtp; 550 5.1.1 <nobody@far.test>: no such user\n"
    ), "{notice}");
    assert!(!notice.contains("Final-Recipient: rfc822; somebody@far.test"));
    assert!(notice.contains("Content-Type: text/rfc822-headers\n\nReceived: from client.test"));
    assert!(
        notice.contains("Subject: relayed\n"),
        "original headers come back"
    );
    assert!(!notice.contains("Hello over there."), "the body does not");
    // The accepted recipient got the message once.
    let got = sink.wait_for(1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to, vec!["somebody@far.test"]);
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
}

#[tokio::test]
async fn bounces_are_never_bounced_and_null_mx_fails_at_once() {
    let dns = TestDns::start(vec![("nullmx.test", Rr::Mx(0, ".".into()))]);
    let server = relay_server(&dns, 9, |c| c);
    let started = Instant::now();
    send(
        &server,
        "alice@example.test",
        &["someone@nullmx.test"],
        MESSAGE,
    )
    .await;
    let notice = wait_for_notice(&server, "Final-Recipient: rfc822; someone@nullmx.test").await;
    assert!(notice.contains("Status: 5.1.10"), "{notice}");
    assert!(notice.contains("556 5.1.10"), "{notice}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no retries for a null MX"
    );
    // A bounce (null sender) that fails is dropped, not bounced.
    send(&server, "", &["other@nullmx.test"], MESSAGE).await;
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
    assert_eq!(server.maildir("alice", "example.test").len(), 1);
    assert!(server.log().contains("not notifying the null sender"));
}

#[tokio::test]
async fn restart_mid_queue_delivers_each_recipient_exactly_once() {
    let (ip_ok, ip_later) = (loopback_ip(), loopback_ip());
    let open = Arc::new(AtomicBool::new(false));
    let gate = open.clone();
    let accepting = Sink::start(ip_ok, 0, SinkScript::default()).await;
    let port = accepting.addr.port();
    let later = Sink::start(
        ip_later,
        port,
        SinkScript {
            rcpt: Arc::new(move |_, _| {
                if gate.load(Ordering::SeqCst) {
                    "250 2.1.5 OK".into()
                } else {
                    "421 4.3.2 Not now".into()
                }
            }),
            ..SinkScript::default()
        },
    )
    .await;
    let dns = TestDns::start(vec![
        ("ok.test", Rr::A(ip_ok)),
        ("later.test", Rr::A(ip_later)),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let edit = |config: String| {
        let config = config.replace(
            "nameservers = [\"127.0.0.1:9\"]",
            &format!("nameservers = [\"{}\"]", dns.addr),
        );
        let config = set_key(&config, "relay", "trusted_networks", "[\"127.0.0.0/8\"]");
        let config = set_key(&config, "outbound", "mx_port", &port.to_string());
        set_key(&config, "outbound", "retry_schedule", "[\"1s\"]")
    };
    let mut server = TestServer::start_in(dir.path(), edit).unwrap();
    for n in 0..5 {
        let message = format!("Subject: m{n}\r\n\r\nbody {n}\r\n");
        send(
            &server,
            "alice@example.test",
            &["a@ok.test", "b@later.test"],
            message.as_bytes(),
        )
        .await;
    }
    assert_eq!(accepting.wait_for(5).await.len(), 5);
    // Kill once every message waits for its retry: its saved state has the accepting domain done
    // and the deferring one answered. (A kill between a remote 250 and that write could repeat a
    // delivery: RFC 5321 §6.1 prefers a duplicate to a loss, and the window is one file write.)
    let states = server.dir.join("spool/relay");
    wait_until("five settled delivery states", || {
        std::fs::read_dir(&states)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter(|s| s.contains("{\"state\":\"done\"}") && s.contains("\"last\":{"))
                    .count()
                    >= 5
            })
            .unwrap_or(false)
    })
    .await;
    server.kill9();
    open.store(true, Ordering::SeqCst);
    server.restart().unwrap();
    let got = later.wait_for(5).await;
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut subjects: Vec<String> = later
        .messages()
        .iter()
        .map(|m| {
            String::from_utf8_lossy(&m.data)
                .lines()
                .find(|l| l.starts_with("Subject:"))
                .unwrap()
                .to_string()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects.len(), 5, "{got:?}");
    subjects.dedup();
    assert_eq!(subjects.len(), 5, "each message once at the deferring host");
    assert_eq!(
        accepting.messages().len(),
        5,
        "no second copy where it was already delivered"
    );
}

#[tokio::test]
async fn starttls_is_used_when_offered_and_required_when_configured() {
    let ip = loopback_ip();
    let plain_ip = loopback_ip();
    // The server's own generated certificate stands in for the remote host's.
    let dns = TestDns::start(vec![
        ("tls.test", Rr::A(ip)),
        ("plain.test", Rr::A(plain_ip)),
    ]);
    let probe = TestServer::start(|c| c).unwrap();
    let acceptor = postern_e2e::sink::tls_acceptor(
        &probe.cert_path(),
        &probe.cert_path().with_file_name("key.pem"),
    );
    let tls_sink = Sink::start(
        ip,
        0,
        SinkScript {
            tls: Some(acceptor),
            ..SinkScript::default()
        },
    )
    .await;
    let port = tls_sink.addr.port();
    let plain_sink = Sink::start(plain_ip, port, SinkScript::default()).await;
    let server = relay_server(&dns, port, |config| {
        config.replace(
            "# \"bank.example\" = \"verify\"",
            "\"plain.test\" = \"encrypt\"",
        )
    });
    send(&server, "alice@example.test", &["x@tls.test"], MESSAGE).await;
    let got = tls_sink.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert!(got[0].tls, "opportunistic STARTTLS was used");
    assert_eq!(got[0].helo, "localhost", "EHLO again after STARTTLS");

    send(&server, "alice@example.test", &["y@plain.test"], MESSAGE).await;
    wait_until("a refused plaintext attempt", || {
        server
            .log()
            .contains("TLS is required but the server does not offer STARTTLS")
    })
    .await;
    assert!(plain_sink.messages().is_empty(), "never sent in the clear");
    assert_eq!(server.spooled().len(), 1, "kept for later");
}

#[tokio::test]
async fn smarthost_gets_everything_over_verified_tls_with_auth() {
    // A second Postern is the smarthost: its submission listener wants STARTTLS and AUTH.
    let smarthost = TestServer::start(|config| {
        set_key(&config, "relay", "authenticated_sender_must_match", "false")
    })
    .unwrap();
    let ca = smarthost.cert_path();
    let server = TestServer::start(|config| {
        let config = set_key(&config, "relay", "trusted_networks", "[\"127.0.0.0/8\"]");
        let config = set_key(&config, "relay", "local_domains", "[\"localhost\"]");
        let config = set_key(&config, "outbound", "ca_file", &format!("{:?}", ca.display().to_string()));
        config.replace(
            "# smarthost = \"relay.example.net:587\"",
            &format!(
                "smarthost = \"localhost:{}\"\nsmarthost_user = \"bob@example.test\"\nsmarthost_password = \"bobpass\"",
                smarthost.port("submission")
            ),
        )
    })
    .unwrap();
    // No DNS at all: the smarthost is reached by name through the system's hosts file.
    send(&server, "carol@localhost", &["alice@example.test"], MESSAGE).await;
    let mail = smarthost.wait_for_mail("alice", "example.test", 1);
    assert_eq!(mail.len(), 1, "{}", server.log());
    let text = String::from_utf8_lossy(&mail[0].1).into_owned();
    assert!(
        text.contains("by localhost (Postern) with ESMTPSA"),
        "TLS and AUTH used: {text}"
    );
    assert!(text.contains("Subject: relayed"));
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
}

#[tokio::test]
async fn a_delay_notice_then_a_final_bounce_when_the_message_expires() {
    let ip = loopback_ip();
    let script = SinkScript {
        rcpt: Arc::new(|_, _| "451 4.3.0 Mailbox busy".into()),
        ..SinkScript::default()
    };
    let sink = Sink::start(ip, 0, script).await;
    let dns = TestDns::start(vec![("slow.test", Rr::A(ip))]);
    let server = relay_server(&dns, sink.addr.port(), |config| {
        let config = set_key(&config, "outbound", "max_age", "\"4s\"");
        set_key(&config, "outbound", "delay_notice_after", "\"1s\"")
    });
    send(&server, "alice@example.test", &["bob@slow.test"], MESSAGE).await;
    let delayed = wait_for_notice(&server, "Delayed Mail (still being retried)").await;
    assert!(
        delayed.contains("Action: delayed\nStatus: 4.3.0\n"),
        "{delayed}"
    );
    assert!(delayed.contains("Diagnostic-Code: smtp; 451 4.3.0 Mailbox busy\n"));
    assert!(delayed.contains("Will-Retry-Until: "), "{delayed}");
    let failed = wait_for_notice(&server, "Undelivered Mail Returned to Sender").await;
    assert!(
        failed.contains("Final-Recipient: rfc822; bob@slow.test\nAction: failed\nStatus: 4.4.7\n"),
        "{failed}"
    );
    assert!(
        failed.contains("gave up after 4 seconds: 451 4.3.0 Mailbox busy"),
        "{failed}"
    );
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
    let notices = server.maildir("alice", "example.test");
    assert_eq!(notices.len(), 2, "one delay notice, one bounce");
    assert!(
        sink.transactions() >= 3,
        "retried until it expired ({} attempts)",
        sink.transactions()
    );
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn connections_per_domain_are_limited() {
    let ip = loopback_ip();
    let script = SinkScript {
        data_delay: Duration::from_millis(300),
        ..SinkScript::default()
    };
    let sink = Sink::start(ip, 0, script).await;
    let dns = TestDns::start(vec![("busy.test", Rr::A(ip))]);
    let server = relay_server(&dns, sink.addr.port(), |config| {
        set_key(&config, "outbound", "max_connections_per_domain", "2")
    });
    // One session, six messages: all are queued before the first has left.
    let (mut client, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    client.expect("EHLO client.test", 250).await.unwrap();
    for n in 0..6 {
        let to = format!("user{n}@busy.test");
        client
            .send_mail("alice@example.test", &[&to], MESSAGE)
            .await
            .unwrap();
    }
    client.expect("QUIT", 221).await.unwrap();
    let got = sink.wait_for(6).await;
    assert_eq!(got.len(), 6, "{}", server.log());
    assert_eq!(
        sink.most_sessions(),
        2,
        "never more than two connections to busy.test at once, and the two are used"
    );
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
}

#[tokio::test]
async fn helo_fallback_and_size_refusal() {
    let (old_ip, small_ip) = (loopback_ip(), loopback_ip());
    let old = Sink::start(
        old_ip,
        0,
        SinkScript {
            ehlo: false,
            ..SinkScript::default()
        },
    )
    .await;
    let port = old.addr.port();
    let small = Sink::start(
        small_ip,
        port,
        SinkScript {
            size: 200,
            ..SinkScript::default()
        },
    )
    .await;
    let dns = TestDns::start(vec![
        ("old.test", Rr::A(old_ip)),
        ("small.test", Rr::A(small_ip)),
    ]);
    let server = relay_server(&dns, port, |c| c);
    send(&server, "alice@example.test", &["x@old.test"], MESSAGE).await;
    let got = old.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert_eq!(got[0].helo, "localhost", "HELO after the refused EHLO");
    assert!(got[0].data.ends_with(MESSAGE));

    send(&server, "alice@example.test", &["y@small.test"], MESSAGE).await;
    let notice = wait_for_notice(&server, "Final-Recipient: rfc822; y@small.test").await;
    assert!(notice.contains("Status: 5.3.4\n"), "{notice}");
    assert!(
        notice.contains("exceeds the server's limit 200"),
        "{notice}"
    );
    assert_eq!(small.transactions(), 0, "refused before MAIL FROM");
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
}

#[tokio::test]
async fn opportunistic_tls_falls_back_to_plaintext_after_a_failed_handshake() {
    let ip = loopback_ip();
    let sink = Sink::start(
        ip,
        0,
        SinkScript {
            broken_tls: true,
            ..SinkScript::default()
        },
    )
    .await;
    let dns = TestDns::start(vec![("badtls.test", Rr::A(ip))]);
    let server = relay_server(&dns, sink.addr.port(), |c| c);
    send(&server, "alice@example.test", &["x@badtls.test"], MESSAGE).await;
    let got = sink.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert!(!got[0].tls);
    assert!(server
        .log()
        .contains("TLS handshake failed; retrying in plaintext"));
    assert_eq!(sink.transactions(), 1, "one transaction, in the clear");
}

#[tokio::test]
async fn recipients_deferred_by_one_mx_are_offered_to_the_next() {
    let (first, second) = (loopback_ip(), loopback_ip());
    let primary = Sink::start(
        first,
        0,
        SinkScript {
            rcpt: Arc::new(|rcpt, _| {
                if rcpt.starts_with("busy") {
                    "452 4.2.2 Mailbox full for now".into()
                } else {
                    "250 2.1.5 OK".into()
                }
            }),
            ..SinkScript::default()
        },
    )
    .await;
    let port = primary.addr.port();
    let backup = Sink::start(second, port, SinkScript::default()).await;
    let dns = TestDns::start(vec![
        ("two.test", Rr::Mx(10, "mx1.two.test".into())),
        ("two.test", Rr::Mx(20, "mx2.two.test".into())),
        ("mx1.two.test", Rr::A(first)),
        ("mx2.two.test", Rr::A(second)),
    ]);
    let server = relay_server(&dns, port, |c| c);
    send(
        &server,
        "alice@example.test",
        &["busy@two.test", "free@two.test"],
        MESSAGE,
    )
    .await;
    let at_primary = primary.wait_for(1).await;
    let at_backup = backup.wait_for(1).await;
    assert_eq!(at_primary.len(), 1, "{}", server.log());
    assert_eq!(at_primary[0].to, vec!["free@two.test"]);
    assert_eq!(at_backup.len(), 1, "{}", server.log());
    assert_eq!(
        at_backup[0].to,
        vec!["busy@two.test"],
        "only the deferred one"
    );
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
    assert_eq!(primary.transactions(), 1, "no retry needed");
    assert!(server.maildir("alice", "example.test").is_empty());
}

#[tokio::test]
async fn without_pipelining_and_with_8bit_content() {
    let ip = loopback_ip();
    let sink = Sink::start(
        ip,
        0,
        SinkScript {
            pipelining: false,
            rcpt: Arc::new(|rcpt, _| {
                if rcpt.starts_with("gone") {
                    "550 5.1.1 no such user".into()
                } else {
                    "250 2.1.5 OK".into()
                }
            }),
            ..SinkScript::default()
        },
    )
    .await;
    let dns = TestDns::start(vec![("lockstep.test", Rr::A(ip))]);
    let server = relay_server(&dns, sink.addr.port(), |c| c);
    let eight_bit = "From: alice@example.test\r\nSubject: caf\u{e9}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln.\r\n";
    send(
        &server,
        "alice@example.test",
        &["x@lockstep.test", "gone@lockstep.test"],
        eight_bit.as_bytes(),
    )
    .await;
    let got = sink.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert_eq!(got[0].to, vec!["x@lockstep.test"]);
    assert!(
        got[0].mail_params.contains("BODY=8BITMIME"),
        "{}",
        got[0].mail_params
    );
    assert!(
        got[0].mail_params.contains("SIZE="),
        "{}",
        got[0].mail_params
    );
    assert!(
        got[0].data.ends_with(eight_bit.as_bytes()),
        "8-bit bytes intact"
    );
    let notice = wait_for_notice(&server, "Final-Recipient: rfc822; gone@lockstep.test").await;
    assert!(notice.contains("Status: 5.1.1"), "{notice}");
}

#[tokio::test]
async fn a_local_recipient_that_keeps_failing_bounces_at_max_age_and_holds_nobody_back() {
    // One sink answers for the sender's domain (the bounce) and the remote recipient's.
    let ip = loopback_ip();
    let sink = Sink::start(ip, 0, SinkScript::default()).await;
    let dns = TestDns::start(vec![("back.test", Rr::A(ip)), ("fast.test", Rr::A(ip))]);
    let plugin = postern_e2e::plugins_section("")
        + &postern_e2e::plugin_block(
            "defer",
            "test_hooks",
            "capabilities = [\"config\", \"kv\", \"dns\"]",
            &[("deliver", "\"defer:mailbox busy\"")],
        );
    let server = relay_server(&dns, sink.addr.port(), |config| {
        let config = set_key(&config, "outbound", "max_age", "\"3s\"");
        config + &plugin
    });
    send(
        &server,
        "carol@back.test",
        &["bob@example.test", "dave@fast.test"],
        MESSAGE,
    )
    .await;
    // The remote recipient does not wait for the local one.
    wait_until("the remote copy", || {
        sink.messages()
            .iter()
            .any(|m| m.to == vec!["dave@fast.test"])
    })
    .await;
    // The local one is retried, then bounced when the message is older than max_age.
    wait_until("the bounce", || {
        sink.messages()
            .iter()
            .any(|m| m.to == vec!["carol@back.test"])
    })
    .await;
    let bounce = sink
        .messages()
        .into_iter()
        .find(|m| m.to == vec!["carol@back.test"])
        .unwrap();
    let text = String::from_utf8_lossy(&bounce.data).into_owned();
    assert!(
        text.contains(
            "Final-Recipient: rfc822; bob@example.test\r\nAction: failed\r\nStatus: 4.4.7\r\n"
        ),
        "{text}"
    );
    assert!(text.contains("deferred by plugin: mailbox busy"), "{text}");
    assert_eq!(bounce.from, "", "bounces have the null sender");
    wait_until("the spool to empty", || server.spooled().is_empty()).await;
    assert!(server.maildir("bob", "example.test").is_empty());
    assert_eq!(
        sink.messages()
            .iter()
            .filter(|m| m.to == vec!["dave@fast.test"])
            .count(),
        1,
        "the remote recipient got one copy"
    );
}

#[tokio::test]
async fn sigterm_lets_a_delivery_under_way_finish() {
    // The sink waits 2 s before answering DATA: SIGTERM arrives with the attempt under way.
    // The server stops accepting, then waits for the attempt (within shutdown_grace_secs)
    // instead of cutting it off: the message arrives once and leaves the queue.
    let ip = loopback_ip();
    let sink = Sink::start(
        ip,
        0,
        SinkScript {
            data_command_delay: Duration::from_secs(2),
            ..SinkScript::default()
        },
    )
    .await;
    let dns = TestDns::start(vec![("slow.test", Rr::A(ip))]);
    let mut server = relay_server(&dns, sink.addr.port(), |c| c);
    send(&server, "alice@example.test", &["bob@slow.test"], MESSAGE).await;
    wait_until("the attempt to start", || sink.transactions() == 1).await;
    let started = Instant::now();
    let (status, server) = tokio::task::spawn_blocking(move || {
        let status = server.stop().unwrap();
        (status, server)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "stopped without waiting for the delivery"
    );
    assert_eq!(sink.messages().len(), 1, "{}", server.log());
    assert!(server.spooled().is_empty(), "{:?}", server.spooled());
    let log = server.log();
    assert!(log.contains("relay stopping: no new attempts"), "{log}");
    assert!(log.contains("status=sent"), "{log}");
}

/// The `outbound` hook (WIT 0.2.0) decides per remote recipient, each attempt: one is routed to
/// a named transport (a second sink) with another envelope sender, one is failed and bounced,
/// one demands verified TLS from an MX that offers none and is deferred (never sent in the
/// clear), and the rest take the default MX route, in one transaction per plan.
#[tokio::test]
async fn a_plugin_routes_fails_and_secures_each_remote_recipient() {
    let (mx_ip, backup_ip) = (loopback_ip(), loopback_ip());
    let mx = Sink::start(mx_ip, 0, SinkScript::default()).await;
    let backup = Sink::start(backup_ip, 0, SinkScript::default()).await;
    let dns = TestDns::start(vec![
        ("example.net", Rr::Mx(10, "mx.example.net".into())),
        ("mx.example.net", Rr::A(mx_ip)),
    ]);
    let grants = "capabilities = [\"config\", \"kv\", \"dns\"]";
    let plugins = postern_e2e::plugins_section("")
        + &postern_e2e::plugin_block(
            "router",
            "test_hooks",
            grants,
            &[
                ("outbound", "\"transport:backup\""),
                ("outbound-only-rcpt", "\"routed\""),
                ("outbound-sender", "\"bounces+alice@example.test\""),
            ],
        )
        + &postern_e2e::plugin_block(
            "refuser",
            "test_hooks",
            grants,
            &[
                ("outbound", "\"fail:no way out for this one\""),
                ("outbound-only-rcpt", "\"refused\""),
            ],
        )
        + &postern_e2e::plugin_block(
            "securer",
            "test_hooks",
            grants,
            &[
                ("outbound", "\"mx\""),
                ("outbound-only-rcpt", "\"secure\""),
                ("outbound-require-tls", "\"yes\""),
            ],
        )
        + &format!(
            "\n[outbound.transports.backup]\nhost = \"{}:{}\"\ntls = \"none\"\n",
            backup_ip,
            backup.addr.port()
        );
    let server = relay_server(&dns, mx.addr.port(), |c| c + &plugins);
    let rcpts = [
        "routed@example.net",
        "refused@example.net",
        "secure@example.net",
        "plain@example.net",
        "plain2@example.net",
    ];
    send(&server, "alice@example.test", &rcpts, MESSAGE).await;
    let routed = backup.wait_for(1).await;
    assert_eq!(routed.len(), 1, "{}", server.log());
    assert_eq!(routed[0].to, vec!["routed@example.net"]);
    assert_eq!(routed[0].from, "bounces+alice@example.test");
    assert!(routed[0].data.ends_with(MESSAGE));
    let plain = mx.wait_for(1).await;
    assert_eq!(plain[0].to, vec!["plain@example.net", "plain2@example.net"]);
    assert_eq!(plain[0].from, "alice@example.test");
    let notice = wait_for_notice(&server, "Undelivered Mail Returned to Sender").await;
    assert!(
        notice.contains(
            "Final-Recipient: rfc822; refused@example.net\nAction: failed\nStatus: 5.7.1\n"
        ),
        "{notice}"
    );
    assert!(notice.contains("no way out for this one"), "{notice}");
    assert!(!notice.contains("secure@example.net"), "{notice}");
    // The secured copy is retried (every second here) and never sent without TLS.
    let refused = "to=<secure@example.net>, relay=mx.example.net";
    wait_until("a retry of the secured copy", || {
        let log = server.log();
        log.lines()
            .filter(|l| l.contains(refused))
            .filter(|l| l.contains("TLS is required but the server does not offer STARTTLS"))
            .count()
            >= 2
    })
    .await;
    assert_eq!(mx.transactions(), 1, "{}", server.log());
    assert!(mx
        .messages()
        .iter()
        .all(|m| !m.to.iter().any(|t| t.starts_with("secure"))));
    assert_eq!(backup.transactions(), 1);
    assert_eq!(server.spooled().len(), 1, "still owed to secure@");
}
