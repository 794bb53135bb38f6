//! Delivery status notifications (RFC 3461) and REQUIRETLS (RFC 8689) end to end: the real
//! binary takes the parameters from a real SMTP client, reports as they ask, passes them on to
//! servers that offer them (scripted sinks, and a second Postern), and keeps a REQUIRETLS
//! message off any hop that is not verified TLS with REQUIRETLS.

use std::sync::Arc;

use postern_e2e::dns::{Rr, TestDns};
use postern_e2e::relay::{relay_server, wait_for_notice, wait_until};
use postern_e2e::sink::{loopback_ip, tls_acceptor, Sink, SinkScript};
use postern_e2e::{set_key, SmtpClient, TestServer};

const MESSAGE: &[u8] = b"From: Alice <alice@example.test>\r\n\
To: Someone <someone@example.net>\r\n\
Subject: status wanted\r\n\
Message-ID: <dsn-1@example.test>\r\n\
\r\n\
The body stays private.\r\n";

/// MAIL with `mail`, each RCPT line, then the message; every step must be accepted.
async fn transaction(client: &mut SmtpClient, mail: &str, rcpts: &[&str], message: &[u8]) {
    client.expect(mail, 250).await.unwrap();
    for rcpt in rcpts {
        client.expect(rcpt, 250).await.unwrap();
    }
    let (code, text) = client.data(message).await.unwrap();
    assert_eq!(code, 250, "{text}");
}

/// Whether `text` has `needle`, whatever its line ends (Maildir files end lines with LF).
fn has(text: &str, needle: &str) -> bool {
    text.replace("\r\n", "\n")
        .contains(&needle.replace("\r\n", "\n"))
}

/// The messages in a user's INBOX, as text.
fn inbox(server: &TestServer, user: &str) -> Vec<String> {
    server
        .maildir(user, "example.test")
        .into_iter()
        .map(|(_, bytes)| String::from_utf8_lossy(&bytes).into_owned())
        .collect()
}

/// Refuses every recipient whose local part starts with "nobody".
fn refusing_nobody() -> SinkScript {
    SinkScript {
        rcpt: Arc::new(|rcpt, _| {
            if rcpt.starts_with("nobody") {
                "550 5.1.1 no such user".into()
            } else {
                "250 2.1.5 OK".into()
            }
        }),
        ..SinkScript::default()
    }
}

#[tokio::test]
async fn reports_honour_notify_ret_envid_and_orcpt() {
    let (plain_ip, dsn_ip) = (loopback_ip(), loopback_ip());
    let plain = Sink::start(plain_ip, 0, refusing_nobody()).await;
    let port = plain.addr.port();
    let dsn = Sink::start(
        dsn_ip,
        port,
        SinkScript {
            dsn: true,
            ..SinkScript::default()
        },
    )
    .await;
    let dns = TestDns::start(vec![
        ("plain.test", Rr::A(plain_ip)),
        ("dsn.test", Rr::A(dsn_ip)),
    ]);
    let server = relay_server(&dns, port, |c| c);
    let (mut client, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    let ehlo = client.expect("EHLO client.test", 250).await.unwrap();
    assert!(ehlo.contains("DSN"), "{ehlo}");
    assert!(
        !ehlo.contains("REQUIRETLS"),
        "not offered without TLS: {ehlo}"
    );

    // Local delivery with NOTIFY=SUCCESS: a success report naming the original recipient and
    // envelope id (xtext decoded: "+2B" is "+"), with the headers only (RET=HDRS).
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test> RET=HDRS ENVID=QQ+2Bid",
        &["RCPT TO:<bob@example.test> NOTIFY=SUCCESS ORCPT=rfc822;robert@old.test"],
        MESSAGE,
    )
    .await;
    assert_eq!(server.wait_for_mail("bob", "example.test", 1).len(), 1);
    let report = wait_for_notice(&server, "Successful Mail Delivery Report").await;
    for needle in [
        "Content-Type: multipart/report; report-type=delivery-status",
        "\r\nOriginal-Envelope-Id: QQ+id\r\nReporting-MTA: dns; localhost\r\n",
        "\r\nOriginal-Recipient: rfc822;robert@old.test\r\nFinal-Recipient: rfc822; bob@example.test\r\nAction: delivered\r\nStatus: 2.0.0\r\n",
        "Content-Type: text/rfc822-headers\r\n\r\nReceived: ",
        "Subject: status wanted\r\n",
    ] {
        assert!(has(&report, needle), "{needle:?} in {report}");
    }
    assert!(!has(&report, "The body stays private"), "{report}");

    // Relayed to a server without DSN: we say it was relayed, as nobody else will.
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test>",
        &["RCPT TO:<carol@plain.test> NOTIFY=SUCCESS,FAILURE"],
        MESSAGE,
    )
    .await;
    let relayed = wait_for_notice(&server, "Action: relayed").await;
    assert!(has(&relayed, "Final-Recipient: rfc822; carol@plain.test\r\nAction: relayed\r\nStatus: 2.0.0\r\nRemote-MTA: dns; plain.test\r\n"),
        "{relayed}"
    );
    let got = plain.wait_for(1).await;
    assert_eq!(got[0].to, vec!["carol@plain.test"]);
    assert_eq!(got[0].rcpt_params, vec![String::new()], "no DSN offered");
    assert!(
        !got[0].mail_params.contains("RET"),
        "{}",
        got[0].mail_params
    );

    // Relayed to a server that offers DSN: the parameters go on (ORCPT added where the client
    // gave none), and the reporting is that server's from then on.
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test> RET=FULL ENVID=E2",
        &[
            "RCPT TO:<dave@dsn.test> NOTIFY=SUCCESS ORCPT=rfc822;d+2Bx@old.test",
            "RCPT TO:<erin@dsn.test>",
            "RCPT TO:<frank@dsn.test> NOTIFY=NEVER",
        ],
        MESSAGE,
    )
    .await;
    let got = dsn.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert!(
        got[0].mail_params.ends_with(" RET=FULL ENVID=E2"),
        "{}",
        got[0].mail_params
    );
    assert_eq!(
        got[0].rcpt_params,
        vec![
            "NOTIFY=SUCCESS ORCPT=rfc822;d+2Bx@old.test",
            "ORCPT=rfc822;erin@dsn.test",
            "NOTIFY=NEVER ORCPT=rfc822;frank@dsn.test",
        ]
    );

    // Failures: NOTIFY=NEVER brings no bounce; RET=FULL returns the message, RET=HDRS its
    // headers.
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test> RET=FULL",
        &["RCPT TO:<nobody1@plain.test> NOTIFY=NEVER"],
        MESSAGE,
    )
    .await;
    wait_until("the silent failure", || {
        server.log().contains("nobody1@plain.test") && server.spooled().is_empty()
    })
    .await;
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test> RET=FULL ENVID=E3",
        &["RCPT TO:<nobody2@plain.test> NOTIFY=FAILURE"],
        MESSAGE,
    )
    .await;
    let full = wait_for_notice(&server, "nobody2@plain.test").await;
    assert!(has(&full, "Original-Envelope-Id: E3\r\n"), "{full}");
    assert!(has(&full, "Action: failed\r\nStatus: 5.1.1\r\n"), "{full}");
    assert!(has(&full, "Content-Type: message/rfc822\r\n"), "{full}");
    assert!(has(&full, "The body stays private."), "{full}");
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test> RET=HDRS",
        &["RCPT TO:<nobody3@plain.test>"],
        MESSAGE,
    )
    .await;
    let headers = wait_for_notice(&server, "nobody3@plain.test").await;
    assert!(
        has(&headers, "Content-Type: text/rfc822-headers\r\n"),
        "{headers}"
    );
    assert!(!has(&headers, "The body stays private"), "{headers}");
    client.expect("QUIT", 221).await.unwrap();

    wait_until("the spool to empty", || server.spooled().is_empty()).await;
    let notices = inbox(&server, "alice");
    assert!(
        !notices.iter().any(|n| n.contains("nobody1")),
        "NOTIFY=NEVER: no report"
    );
    assert!(
        !notices.iter().any(|n| n.contains("dave@dsn.test")),
        "the DSN server reports on dave, not us"
    );
    assert_eq!(notices.len(), 4, "delivered, relayed, two bounces");
}

#[tokio::test]
async fn orcpt_and_envid_survive_relaying_to_a_second_postern() {
    // First → second Postern (which offers DSN) → the second's success report to a sink
    // standing in for the sender's domain.
    let sink_ip = loopback_ip();
    let sink = Sink::start(sink_ip, 0, SinkScript::default()).await;
    let dns = TestDns::start(vec![
        ("b.test", Rr::A("127.0.0.1".parse().unwrap())),
        ("example.test", Rr::A(sink_ip)),
    ]);
    let second = relay_server(&dns, sink.addr.port(), |config| {
        let config = set_key(&config, "server", "hostname", "\"mx.b.test\"");
        let config = set_key(
            &config,
            "relay",
            "local_domains",
            "[\"localhost\", \"b.test\"]",
        );
        config.replace("address = \"bob@example.test\"", "address = \"bob@b.test\"")
    });
    let first = relay_server(&dns, second.port("smtp"), |c| c);
    let (mut client, _) = SmtpClient::connect(first.port("smtp")).await.unwrap();
    client.expect("EHLO client.test", 250).await.unwrap();
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test> RET=HDRS ENVID=trip-1",
        &["RCPT TO:<bob@b.test> NOTIFY=SUCCESS ORCPT=rfc822;robert@old.test"],
        MESSAGE,
    )
    .await;
    client.expect("QUIT", 221).await.unwrap();
    let mail = second.wait_for_mail("bob", "b.test", 1);
    assert_eq!(mail.len(), 1, "{}\n{}", first.log(), second.log());
    let got = sink.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", second.log());
    let report = String::from_utf8_lossy(&got[0].data).into_owned();
    assert_eq!(got[0].from, "", "reports come from the null sender");
    assert_eq!(got[0].to, vec!["alice@example.test"]);
    for needle in [
        "\r\nOriginal-Envelope-Id: trip-1\r\nReporting-MTA: dns; mx.b.test\r\n",
        "\r\nOriginal-Recipient: rfc822;robert@old.test\r\nFinal-Recipient: rfc822; bob@b.test\r\nAction: delivered\r\nStatus: 2.0.0\r\n",
    ] {
        assert!(has(&report, needle), "{needle:?} in {report}");
    }
    // The first server passed the reporting on and sent none of its own.
    wait_until("the first spool to empty", || first.spooled().is_empty()).await;
    assert!(inbox(&first, "alice").is_empty());
}

/// A certificate for `names` and its key, as PEM files in `dir`.
fn certificate(dir: &std::path::Path, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let generated = rcgen::generate_simple_self_signed(names).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test]
async fn requiretls_goes_only_over_verified_tls_to_servers_that_offer_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), &["mx.ok.test", "mx.no.test"]);
    let ips: Vec<_> = (0..4).map(|_| loopback_ip()).collect();
    let with_tls = |requiretls| SinkScript {
        tls: Some(tls_acceptor(&cert, &key)),
        requiretls,
        ..SinkScript::default()
    };
    let ok = Sink::start(ips[0], 0, with_tls(true)).await;
    let port = ok.addr.port();
    let no = Sink::start(ips[1], port, with_tls(false)).await;
    let plain = Sink::start(ips[2], port, SinkScript::default()).await;
    let strict = Sink::start(ips[3], port, SinkScript::default()).await;
    let dns = TestDns::start(vec![
        ("ok.test", Rr::Mx(10, "mx.ok.test".into())),
        ("mx.ok.test", Rr::A(ips[0])),
        ("no.test", Rr::Mx(10, "mx.no.test".into())),
        ("mx.no.test", Rr::A(ips[1])),
        ("plain.test", Rr::A(ips[2])),
        ("strict.test", Rr::A(ips[3])),
    ]);
    let server = relay_server(&dns, port, |config| {
        let config = set_key(
            &config,
            "outbound",
            "ca_file",
            &format!("{:?}", cert.display().to_string()),
        );
        config.replace(
            "# \"bank.example\" = \"verify\"",
            "\"strict.test\" = \"verify\"",
        )
    });
    let server_cert = server.cert_path();

    // Not on a plaintext session.
    let (mut client, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    client.expect("EHLO client.test", 250).await.unwrap();
    let (code, text) = client
        .cmd("MAIL FROM:<alice@example.test> REQUIRETLS")
        .await
        .unwrap();
    assert_eq!((code, text.contains(" 5.7.10 ")), (530, true), "{text}");
    client.starttls(&server_cert).await.unwrap();
    let ehlo = client.expect("EHLO client.test", 250).await.unwrap();
    assert!(ehlo.contains("REQUIRETLS"), "offered under TLS: {ehlo}");
    for to in ["x@ok.test", "x@no.test", "x@plain.test"] {
        transaction(
            &mut client,
            "MAIL FROM:<alice@example.test> REQUIRETLS",
            &[&format!("RCPT TO:<{to}>")],
            MESSAGE,
        )
        .await;
    }
    // `TLS-Required: No` lets the message past strict.test's verify policy (in the clear,
    // since that host has no TLS); without it, it waits for TLS.
    let relaxed = [b"TLS-Required: No\r\n".as_slice(), MESSAGE].concat();
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test>",
        &["RCPT TO:<relaxed@strict.test>"],
        &relaxed,
    )
    .await;
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test>",
        &["RCPT TO:<held@strict.test>"],
        MESSAGE,
    )
    .await;
    client.expect("QUIT", 221).await.unwrap();

    let got = ok.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert!(got[0].tls, "over TLS");
    assert!(
        got[0].mail_params.ends_with(" REQUIRETLS"),
        "{}",
        got[0].mail_params
    );
    for (domain, why) in [
        ("no.test", "the server does not offer REQUIRETLS"),
        ("plain.test", "the server does not offer STARTTLS"),
    ] {
        let bounce = wait_for_notice(&server, &format!("x@{domain}")).await;
        assert!(
            has(&bounce, "Action: failed\r\nStatus: 5.7.30\r\n"),
            "{bounce}"
        );
        assert!(has(&bounce, why), "{bounce}");
        assert!(!has(&bounce, "The body stays private"), "{bounce}");
    }
    assert!(no.messages().is_empty(), "never sent without REQUIRETLS");
    assert!(plain.messages().is_empty(), "never sent in the clear");

    let got = strict.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert_eq!(got[0].to, vec!["relaxed@strict.test"]);
    assert!(!got[0].tls);
    wait_until("the held message to be refused a plaintext hop", || {
        server
            .log()
            .contains("TLS is required but the server does not offer STARTTLS")
    })
    .await;
    assert_eq!(strict.messages().len(), 1, "held@ still waits for TLS");
}

#[tokio::test]
async fn a_recipient_without_notify_delay_gets_no_delay_notice() {
    let ip = loopback_ip();
    let sink = Sink::start(
        ip,
        0,
        SinkScript {
            rcpt: Arc::new(|_, _| "451 4.3.0 Mailbox busy".into()),
            ..SinkScript::default()
        },
    )
    .await;
    let dns = TestDns::start(vec![("slow.test", Rr::A(ip))]);
    let server = relay_server(&dns, sink.addr.port(), |config| {
        let config = set_key(&config, "outbound", "max_age", "\"4s\"");
        set_key(&config, "outbound", "delay_notice_after", "\"1s\"")
    });
    let (mut client, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    client.expect("EHLO client.test", 250).await.unwrap();
    transaction(
        &mut client,
        "MAIL FROM:<alice@example.test>",
        &["RCPT TO:<bob@slow.test> NOTIFY=FAILURE"],
        MESSAGE,
    )
    .await;
    client.expect("QUIT", 221).await.unwrap();
    // Past delay_notice_after and then max_age: only the final bounce comes.
    let bounce = wait_for_notice(&server, "Undelivered Mail Returned to Sender").await;
    assert!(
        has(&bounce, "Action: failed\r\nStatus: 4.4.7\r\n"),
        "{bounce}"
    );
    let notices = inbox(&server, "alice");
    assert_eq!(notices.len(), 1, "no delay notice: {notices:?}");
    assert!(sink.transactions() >= 2, "it was retried meanwhile");
}
