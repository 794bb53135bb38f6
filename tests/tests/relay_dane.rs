//! DANE for SMTP (RFC 7672) end to end: the real binary, policy `dane` by default, resolves
//! through the test DNS server serving a zone signed in the test (its key the server's trust
//! anchor), and delivers to sinks on loopback whose certificates are made here. A matching
//! DANE-EE or DANE-TA record delivers over TLS; a mismatch, a server without STARTTLS and a
//! bogus signature each defer with nothing sent; a secure name without TLSA records falls back
//! to opportunistic delivery; the TLS report of a DANE domain names the `tlsa` policy.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use sha2::{Digest, Sha256};

use postern_e2e::dns::{Rr, TestDns};
use postern_e2e::relay::{relay_server, send, wait_until};
use postern_e2e::sink::{loopback_ip, tls_acceptor, Sink, SinkScript};
use postern_e2e::{set_key, TestServer};

const MESSAGE: &[u8] = b"From: Alice <alice@example.test>\r\n\
To: Someone <x@example.net>\r\n\
Subject: dane\r\n\
\r\n\
Hello.\r\n";

/// Writes `pem` parts to a file in `dir` and returns its path.
fn write(dir: &std::path::Path, name: &str, pem: &[String]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem.concat()).unwrap();
    path
}

/// The delivery lines the server logged about `rcpt`.
fn deferrals(server: &TestServer, rcpt: &str) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|l| l.contains(rcpt) && l.contains("deferred"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn tlsa_records_decide_where_and_how_mail_goes() {
    let dir = tempfile::tempdir().unwrap();
    // A private CA and, signed by it, one certificate for every MX host.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let hosts = [
        "mx.ee.test",
        "mx.ta.test",
        "mx.mismatch.test",
        "mx.bogus.test",
    ];
    let leaf = CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let key = write(dir.path(), "key.pem", &[leaf_key.serialize_pem()]);
    let alone = write(dir.path(), "leaf.pem", &[leaf.pem()]);
    // DANE-TA needs the anchor in the chain the server sends (RFC 7672 §3.1.2).
    let chain = write(dir.path(), "chain.pem", &[leaf.pem(), ca.pem()]);
    let spki = Sha256::digest(leaf_key.public_key_der()).to_vec();
    let ca_digest = Sha256::digest(ca.der()).to_vec();
    let mut wrong = spki.clone();
    wrong[0] ^= 1;

    let tls = |cert: &std::path::Path| SinkScript {
        tls: Some(tls_acceptor(cert, &key)),
        ..SinkScript::default()
    };
    let ips = [(); 9].map(|_| loopback_ip());
    let ee = Sink::start(ips[0], 0, tls(&alone)).await;
    let port = ee.addr.port();
    let ta = Sink::start(ips[1], port, tls(&chain)).await;
    let mismatch = Sink::start(ips[2], port, tls(&alone)).await;
    let stripped = Sink::start(ips[3], port, SinkScript::default()).await;
    let bogus = Sink::start(ips[4], port, tls(&alone)).await;
    let plain = Sink::start(ips[5], port, SinkScript::default()).await;
    let bogus_mx = Sink::start(ips[6], port, tls(&alone)).await;
    // Its certificate names none of the unusable.test hosts: unauthenticated TLS takes it.
    let unusable = Sink::start(ips[7], port, tls(&alone)).await;
    let unusable_plain = Sink::start(ips[8], port, SinkScript::default()).await;

    let tlsa = |host: &str| format!("_{port}._tcp.{host}");
    let mut records = Vec::new();
    let domains = [
        "ee",
        "ta",
        "mismatch",
        "stripped",
        "bogus",
        "plain",
        "bogusmx",
        "unusable",
        "unusableplain",
    ];
    for (i, domain) in domains.iter().enumerate() {
        let (domain, mx) = (format!("{domain}.test"), format!("mx.{domain}.test"));
        records.push((domain, Rr::Mx(10, mx.clone())));
        records.push((mx, Rr::A(ips[i])));
    }
    records.push((tlsa("mx.ee.test"), Rr::Tlsa(3, 1, 1, spki.clone())));
    // An unusable PKIX-EE record beside the usable one changes nothing.
    records.push((tlsa("mx.ee.test"), Rr::Tlsa(1, 1, 1, wrong.clone())));
    records.push((tlsa("mx.ta.test"), Rr::Tlsa(2, 0, 1, ca_digest)));
    records.push((tlsa("mx.mismatch.test"), Rr::Tlsa(3, 1, 1, wrong)));
    records.push((tlsa("mx.stripped.test"), Rr::Tlsa(3, 1, 1, spki.clone())));
    records.push((tlsa("mx.bogus.test"), Rr::Tlsa(3, 1, 1, spki.clone())));
    records.push((tlsa("mx.bogusmx.test"), Rr::Tlsa(3, 1, 1, spki.clone())));
    // Secure TLSA records, none usable for SMTP (PKIX usages, RFC 7672 §3.1.3; an unknown
    // matching type): TLS becomes mandatory, unauthenticated (§2.2).
    records.push((tlsa("mx.unusable.test"), Rr::Tlsa(1, 1, 1, spki.clone())));
    records.push((
        tlsa("mx.unusableplain.test"),
        Rr::Tlsa(0, 0, 1, spki.clone()),
    ));
    records.push((tlsa("mx.unusableplain.test"), Rr::Tlsa(3, 1, 9, spki)));
    records.push((
        "_smtp._tls.ee.test".to_string(),
        Rr::Txt("v=TLSRPTv1; rua=mailto:alice@example.test".into()),
    ));
    let bogus_name = tlsa("mx.bogus.test");
    let dns = TestDns::signed(
        records
            .iter()
            .map(|(n, r)| (n.as_str(), r.clone()))
            .collect(),
        &[bogus_name.as_str(), "bogusmx.test"],
    );
    let anchor = dir.path().join("anchor.keys");
    std::fs::write(&anchor, dns.anchor.as_ref().unwrap()).unwrap();

    let server = relay_server(&dns, port, |config| {
        let config = config.replacen(
            "[dns]\n",
            &format!("[dns]\ntrust_anchor = {:?}\n", anchor.display().to_string()),
            1,
        );
        let config = set_key(&config, "outbound", "tls", "\"dane\"");
        set_key(&config, "outbound", "tls_report_interval", "\"3s\"")
    });

    for domain in domains {
        let to = format!("x@{domain}.test");
        send(&server, "alice@example.test", &[&to], MESSAGE).await;
    }
    // DANE-EE 3 1 1 and DANE-TA 2 0 1: delivered over TLS.
    for (sink, what) in [(&ee, "DANE-EE"), (&ta, "DANE-TA")] {
        let got = sink.wait_for(1).await;
        assert_eq!(got.len(), 1, "{what}: {}", server.log());
        assert!(got[0].tls, "{what} over TLS");
    }
    // Only unusable records: over TLS, whatever the certificate.
    let got = unusable.wait_for(1).await;
    assert_eq!(got.len(), 1, "unusable: {}", server.log());
    assert!(got[0].tls, "unusable records still make TLS mandatory");
    // A secure name without TLSA records: the domain's other policy (may), here plaintext.
    let got = plain.wait_for(1).await;
    assert_eq!(got.len(), 1, "{}", server.log());
    assert!(!got[0].tls);
    // A certificate that matches nothing, a server that does not offer STARTTLS, a bogus TLSA
    // answer and a bogus MX answer: deferred, and nothing sent to any of them, in the clear or
    // otherwise.
    for rcpt in [
        "x@mismatch.test",
        "x@stripped.test",
        "x@bogus.test",
        "x@bogusmx.test",
        "x@unusableplain.test",
    ] {
        wait_until(&format!("{rcpt} to be deferred"), || {
            !deferrals(&server, rcpt).is_empty()
        })
        .await;
    }
    let mismatch_line = deferrals(&server, "x@mismatch.test").join("\n");
    assert!(
        mismatch_line.contains("no TLSA record matches"),
        "{mismatch_line}"
    );
    for rcpt in ["x@bogus.test", "x@bogusmx.test"] {
        let line = deferrals(&server, rcpt).join("\n");
        assert!(line.contains("DNSSEC validation failed"), "{line}");
    }
    // A retry (the schedule is one second) changes nothing.
    wait_until("a retry of the bogus domain", || {
        deferrals(&server, "x@bogus.test").len() >= 2
    })
    .await;
    for (sink, what) in [
        (&mismatch, "mismatch"),
        (&stripped, "no STARTTLS"),
        (&bogus, "bogus"),
        (&bogus_mx, "bogus MX"),
        (&unusable_plain, "unusable records, no STARTTLS"),
    ] {
        assert!(sink.messages().is_empty(), "{what}: {}", server.log());
        assert_eq!(sink.transactions(), 0, "{what}: no MAIL FROM was sent");
    }
    assert_eq!(ee.messages().len(), 1);

    // The TLS report of ee.test counts its session under its TLSA records.
    let mut report = None;
    wait_until("a TLS report about ee.test", || {
        report = server
            .maildir("alice", "example.test")
            .into_iter()
            .map(|(_, bytes)| bytes)
            .find(|bytes| String::from_utf8_lossy(bytes).contains("TLS-Report-Domain: ee.test\n"));
        report.is_some()
    })
    .await;
    let mail = mail_parser::MessageParser::default()
        .parse(report.as_ref().unwrap())
        .unwrap();
    let mut json = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(mail.attachment(0).unwrap().contents()),
        &mut json,
    )
    .unwrap();
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let policy = &report["policies"][0];
    assert_eq!(policy["policy"]["policy-type"], "tlsa", "{report}");
    assert!(policy["policy"]["policy-string"][0]
        .as_str()
        .unwrap()
        .starts_with("3 1 1 "));
    assert_eq!(policy["summary"]["total-successful-session-count"], 1);
    assert_eq!(policy["summary"]["total-failure-session-count"], 0);
}
