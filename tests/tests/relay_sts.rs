//! MTA-STS (RFC 8461) and SMTP TLS reporting (RFC 8460) end to end: the real binary fetches
//! policies over HTTPS from a policy host on loopback (certificates made in the test), enforces
//! them against MX hosts found through the test DNS server, keeps them across a restart, and
//! mails the aggregate reports to the address a domain publishes.

use std::collections::HashMap;
use std::io::Read;

use mail_parser::MimeHeaders;

use postern_e2e::dns::{Rr, TestDns};
use postern_e2e::https::PolicyServer;
use postern_e2e::relay::{relay_server, send, wait_until};
use postern_e2e::sink::{loopback_ip, tls_acceptor, Sink, SinkScript};
use postern_e2e::{set_key, TestServer};

const MESSAGE: &[u8] = b"From: Alice <alice@example.test>\r\n\
To: Someone <x@example.net>\r\n\
Subject: policy\r\n\
\r\n\
Hello.\r\n";

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

/// The JSON of the TLS report about `domain` in alice's INBOX, once one has arrived.
async fn report_about(server: &TestServer, domain: &str) -> serde_json::Value {
    let mut found = None;
    wait_until(&format!("a TLS report about {domain}"), || {
        found = server
            .maildir("alice", "example.test")
            .into_iter()
            .map(|(_, bytes)| bytes)
            .find(|bytes| {
                String::from_utf8_lossy(bytes).contains(&format!("TLS-Report-Domain: {domain}\n"))
            });
        found.is_some()
    })
    .await;
    let bytes = found.unwrap();
    let mail = mail_parser::MessageParser::default().parse(&bytes).unwrap();
    assert!(
        mail.subject()
            .unwrap()
            .starts_with(&format!("Report Domain: {domain} Submitter: localhost")),
        "{:?}",
        mail.subject()
    );
    let attachment = mail.attachment(0).expect("the report attachment");
    assert!(attachment.is_content_type("application", "tlsrpt+gzip"));
    let mut json = String::new();
    flate2::read::GzDecoder::new(attachment.contents())
        .read_to_string(&mut json)
        .unwrap();
    serde_json::from_str(&json).unwrap()
}

#[tokio::test]
async fn policies_are_enforced_tested_kept_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "mta-sts.enforced.test",
        "mta-sts.wrongmx.test",
        "mta-sts.testing.test",
        "mta-sts.testcert.test",
        "mx1.enforced.test",
    ];
    let generated =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();

    let [policy_ip, enforced_ip, wrong_ip, testing_ip, testcert_ip] =
        [(); 5].map(|_| loopback_ip());
    let enforced = Sink::start(
        enforced_ip,
        0,
        SinkScript {
            tls: Some(tls_acceptor(&cert, &key)),
            ..SinkScript::default()
        },
    )
    .await;
    let port = enforced.addr.port();
    let wrong = Sink::start(wrong_ip, port, SinkScript::default()).await;
    let testing = Sink::start(testing_ip, port, SinkScript::default()).await;
    // Offers STARTTLS with a certificate that does not name it (testing mode reports that).
    let testcert = Sink::start(
        testcert_ip,
        port,
        SinkScript {
            tls: Some(tls_acceptor(&cert, &key)),
            ..SinkScript::default()
        },
    )
    .await;
    let policies = PolicyServer::start(
        policy_ip,
        tls_acceptor(&cert, &key),
        HashMap::from([
            (
                "mta-sts.enforced.test".to_string(),
                policy("enforce", "*.enforced.test"),
            ),
            (
                "mta-sts.wrongmx.test".to_string(),
                policy("enforce", "mx.elsewhere.test"),
            ),
            (
                "mta-sts.testing.test".to_string(),
                policy("testing", "mx.elsewhere.test"),
            ),
            (
                "mta-sts.testcert.test".to_string(),
                policy("testing", "mx.testcert.test"),
            ),
        ]),
    )
    .await;
    let mut records = Vec::new();
    for (domain, mx, ip) in [
        ("enforced.test", "mx1.enforced.test", enforced_ip),
        ("wrongmx.test", "mx.wrongmx.test", wrong_ip),
        ("testing.test", "mx.testing.test", testing_ip),
        ("testcert.test", "mx.testcert.test", testcert_ip),
    ] {
        records.push((domain.to_string(), Rr::Mx(10, mx.into())));
        records.push((mx.to_string(), Rr::A(ip)));
        records.push((
            format!("_mta-sts.{domain}"),
            Rr::Txt("v=STSv1; id=20261203;".into()),
        ));
        records.push((format!("mta-sts.{domain}"), Rr::A(policy_ip)));
    }
    for domain in ["enforced.test", "testing.test", "testcert.test"] {
        records.push((
            format!("_smtp._tls.{domain}"),
            Rr::Txt("v=TLSRPTv1; rua=mailto:alice@example.test".into()),
        ));
    }
    let dns = TestDns::start(
        records
            .iter()
            .map(|(n, r)| (n.as_str(), r.clone()))
            .collect(),
    );
    let policy_port = policies.addr.port();
    let mut server = relay_server(&dns, port, |config| {
        let config = set_key(
            &config,
            "outbound",
            "ca_file",
            &format!("{:?}", cert.display().to_string()),
        );
        let config = set_key(
            &config,
            "outbound",
            "mta_sts_port",
            &policy_port.to_string(),
        );
        set_key(&config, "outbound", "tls_report_interval", "\"3s\"")
    });

    for to in [
        "x@enforced.test",
        "x@wrongmx.test",
        "x@testing.test",
        "x@testcert.test",
    ] {
        send(&server, "alice@example.test", &[to], MESSAGE).await;
    }
    // enforce, its MX named: delivered over verified TLS.
    let got = enforced.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert!(got[0].tls);
    // testing: delivered as without a policy, though the MX is not the one named, and though
    // the certificate of the one named does not name it.
    let got = testing.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    let got = testcert.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert!(got[0].tls);
    // enforce, its MX not named: kept, never sent.
    wait_until("the unnamed MX to be refused", || {
        server
            .log()
            .contains("MTA-STS: the policy of wrongmx.test names none of its MX hosts")
    })
    .await;
    assert!(wrong.messages().is_empty());
    assert_eq!(policies.served(), 4, "each policy fetched once");

    let report = report_about(&server, "testing.test").await;
    assert_eq!(report["organization-name"], "localhost");
    let policy = &report["policies"][0];
    assert_eq!(policy["policy"]["policy-type"], "sts");
    assert_eq!(policy["policy"]["policy-domain"], "testing.test");
    assert_eq!(policy["policy"]["mx-host"][0], "mx.elsewhere.test");
    assert_eq!(policy["summary"]["total-successful-session-count"], 0);
    assert_eq!(policy["summary"]["total-failure-session-count"], 1);
    let detail = &policy["failure-details"][0];
    assert_eq!(detail["result-type"], "validation-failure");
    assert_eq!(detail["receiving-mx-hostname"], "mx.testing.test");
    assert_eq!(detail["receiving-ip"], testing_ip.to_string());
    // The certificate checked in testing mode too, and its failure reported (RFC 8461 §5).
    let report = report_about(&server, "testcert.test").await;
    let policy = &report["policies"][0];
    assert_eq!(policy["policy"]["policy-type"], "sts");
    assert_eq!(policy["summary"]["total-successful-session-count"], 0);
    assert_eq!(policy["summary"]["total-failure-session-count"], 1);
    let detail = &policy["failure-details"][0];
    assert_eq!(detail["result-type"], "certificate-host-mismatch");
    assert_eq!(detail["receiving-mx-hostname"], "mx.testcert.test");
    let report = report_about(&server, "enforced.test").await;
    let policy = &report["policies"][0];
    assert_eq!(policy["policy"]["policy-string"][1], "mode: enforce");
    assert_eq!(policy["summary"]["total-successful-session-count"], 1);
    assert_eq!(policy["summary"]["total-failure-session-count"], 0);

    // Cached: more mail fetches nothing; after a restart with the policy host gone, the
    // policy on disk still holds (RFC 8461 §5.1).
    send(&server, "alice@example.test", &["y@enforced.test"], MESSAGE).await;
    assert_eq!(enforced.wait_for(2).await.len(), 2);
    assert_eq!(policies.served(), 4);
    drop(policies);
    server.stop().unwrap();
    server.restart().unwrap();
    send(&server, "alice@example.test", &["z@wrongmx.test"], MESSAGE).await;
    wait_until("the cached policy to refuse the unnamed MX again", || {
        server
            .log()
            .matches("MTA-STS: the policy of wrongmx.test names none of its MX hosts")
            .count()
            >= 3
    })
    .await;
    assert!(
        wrong.messages().is_empty(),
        "never sent to an MX the policy does not name"
    );
}
