//! Sender authentication end to end: one Postern signs with a key made by `postern dkim
//! generate` and relays to a second Postern, which checks SPF, DKIM and DMARC against a test DNS
//! server, records them in Authentication-Results, and lets a data-hook plugin reject DMARC
//! failures under p=reject.

use std::process::Command;

use postern_e2e::dns::{Rr, TestDns};
use postern_e2e::{plugin_block, plugins_section, postern_bin, set_key, SmtpClient, TestServer};

const PLAIN_ALICE: &str = "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZXBhc3M=";

/// Runs `postern dkim generate` and returns (key file, TXT record value).
fn generate_key(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    generate_key_for(dir, "example.test", "postern")
}

fn generate_key_for(
    dir: &std::path::Path,
    domain: &str,
    selector: &str,
) -> (std::path::PathBuf, String) {
    let key = dir.join(format!("{selector}.{domain}.pem"));
    let out = Command::new(postern_bin())
        .args(["dkim", "generate", domain, selector, "--key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{selector}._domainkey.{domain}. IN TXT")))
        .expect("a TXT record line");
    let value: String = line
        .split('"')
        .skip(1)
        .step_by(2)
        .collect::<Vec<_>>()
        .concat();
    assert!(value.starts_with("v=DKIM1; k=rsa; p="), "{value}");
    (key, value)
}

fn verifying(config: String, dns: &TestDns) -> String {
    let config = config.replace(
        "nameservers = [\"127.0.0.1:9\"]",
        &format!("nameservers = [\"{}\"]", dns.addr),
    );
    set_key(&config, "mail_auth", "verify_inbound", "true")
}

#[tokio::test]
async fn dkim_signature_from_one_server_verifies_at_another_with_spf_and_dmarc() {
    let keys = tempfile::tempdir().unwrap();
    let (key, record) = generate_key(keys.path());
    let dns = TestDns::start(vec![
        ("example.test", Rr::Mx(10, "mx.example.test".into())),
        ("mx.example.test", Rr::A("127.0.0.1".parse().unwrap())),
        ("example.test", Rr::Txt("v=spf1 ip4:127.0.0.1 -all".into())),
        ("postern._domainkey.example.test", Rr::Txt(record)),
        ("_dmarc.example.test", Rr::Txt("v=DMARC1; p=reject".into())),
    ]);
    // The receiving server: example.test is local there, origin checks on.
    let receiver = TestServer::start(|c| verifying(c, &dns)).unwrap();
    // The sending server: example.test is remote for it, and it holds the signing key.
    let sender = TestServer::start(|c| {
        let c = verifying(c, &dns);
        let c = set_key(&c, "relay", "local_domains", "[\"localhost\"]");
        let c = set_key(
            &c,
            "outbound",
            "mx_port",
            &receiver.port("smtp").to_string(),
        );
        format!(
            "{c}\n[[dkim]]\ndomain = \"example.test\"\nselector = \"postern\"\nkey = {:?}\n",
            key.display().to_string()
        )
    })
    .unwrap();
    let (mut client, _) = SmtpClient::connect(sender.port("submission"))
        .await
        .unwrap();
    client.expect("EHLO client.test", 250).await.unwrap();
    client.starttls(&sender.cert_path()).await.unwrap();
    client.expect("EHLO client.test", 250).await.unwrap();
    client.expect(PLAIN_ALICE, 235).await.unwrap();
    let message = b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\n\
Subject: signed\r\nMessage-ID: <signed-1@example.test>\r\nDate: Sun, 22 Nov 2026 07:00:00 +0000\r\n\
\r\nThis body is covered by the signature.\r\n";
    client
        .send_mail("alice@example.test", &["bob@example.test"], message)
        .await
        .unwrap();
    let mail = receiver.wait_for_mail("bob", "example.test", 1);
    assert_eq!(mail.len(), 1, "sender log:\n{}", sender.log());
    let text = String::from_utf8_lossy(&mail[0].1).into_owned();
    assert!(
        text.contains("DKIM-Signature: v=1; a=rsa-sha256;"),
        "{text}"
    );
    assert!(text.contains("d=example.test"), "{text}");
    let results = text
        .split("Authentication-Results: ")
        .nth(1)
        .expect("an Authentication-Results field")
        .split("\nReceived:")
        .next()
        .unwrap()
        .to_string();
    assert!(results.starts_with("localhost;"), "{results}");
    assert!(results.contains("dkim=pass"), "{results}");
    assert!(results.contains("header.d=example.test"), "{results}");
    assert!(results.contains("spf=pass"), "{results}");
    assert!(results.contains("dmarc=pass"), "{results}");
    assert!(text.ends_with("This body is covered by the signature.\n"));
}

#[tokio::test]
async fn spf_and_dmarc_failures_are_recorded_and_a_plugin_can_reject_them() {
    let dns = TestDns::start(vec![
        ("reject.test", Rr::Txt("v=spf1 -all".into())),
        ("_dmarc.reject.test", Rr::Txt("v=DMARC1; p=reject".into())),
        ("lenient.test", Rr::Txt("v=spf1 -all".into())),
        ("_dmarc.lenient.test", Rr::Txt("v=DMARC1; p=none".into())),
    ]);
    let block = plugins_section("")
        + &plugin_block(
            "dmarc",
            "test_hooks",
            "capabilities = [\"config\", \"kv\", \"dns\"]",
            &[("data", "\"dmarc-reject\"")],
        );
    let server = TestServer::start(|c| verifying(c, &dns) + &block).unwrap();
    let (mut client, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    client.expect("EHLO spoofer.test", 250).await.unwrap();

    client
        .expect("MAIL FROM:<ceo@reject.test>", 250)
        .await
        .unwrap();
    client
        .expect("RCPT TO:<alice@example.test>", 250)
        .await
        .unwrap();
    let (code, text) = client
        .data(b"From: ceo@reject.test\r\nSubject: wire money\r\n\r\nnow\r\n")
        .await
        .unwrap();
    assert_eq!(code, 550, "{text}\n{}", server.log());
    assert_eq!(
        text,
        "550 5.7.1 DMARC policy of reject.test rejects this message (spf=fail, dkim=none)\r\n"
    );

    // p=none: the plugin lets it through; the results are recorded, and a forged
    // Authentication-Results claiming to be ours is removed.
    client
        .expect("MAIL FROM:<news@lenient.test>", 250)
        .await
        .unwrap();
    client
        .expect("RCPT TO:<alice@example.test>", 250)
        .await
        .unwrap();
    let (code, text) = client
        .data(b"Authentication-Results: mx.upstream.test; spf=pass\r\nAuthentication-Results: localhost; dkim=pass; dmarc=pass\r\nFrom: news@lenient.test\r\nSubject: hi\r\n\r\nbody\r\n")
        .await
        .unwrap();
    assert_eq!(code, 250, "{text}");
    let mail = server.wait_for_mail("alice", "example.test", 1);
    let stored = String::from_utf8_lossy(&mail[0].1).into_owned();
    let results: Vec<&str> = stored
        .lines()
        .filter(|l| l.starts_with("Authentication-Results:"))
        .collect();
    assert_eq!(results.len(), 2, "the forged one is gone: {stored}");
    assert!(
        stored.contains("Authentication-Results: localhost;\n\tspf=fail"),
        "ours, folded: {stored}"
    );
    assert_eq!(
        results[1], "Authentication-Results: mx.upstream.test; spf=pass",
        "another host's results stay"
    );
    let ours = stored
        .split("Authentication-Results: ")
        .nth(1)
        .unwrap()
        .split("\nFrom:")
        .next()
        .unwrap();
    assert!(ours.contains("spf=fail"), "{ours}");
    assert!(ours.contains("dmarc=fail"), "{ours}");
    assert!(ours.contains("dkim=none"), "{ours}");
    assert!(
        stored.find("Received:").unwrap() < stored.find("Authentication-Results:").unwrap(),
        "our Received field stays first"
    );
}

/// Seals `message` as the first ARC hop of `domain` (RFC 8617), with mail-auth's sealer.
fn arc_seal(message: &[u8], key: &std::path::Path, domain: &str, selector: &str) -> Vec<u8> {
    use mail_auth::arc::ArcSealer;
    use mail_auth::common::crypto::{RsaKey, Sha256};
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults};
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let key = RsaKey::<Sha256>::from_key_der(der).unwrap();
    let parsed = AuthenticatedMessage::parse(message).unwrap();
    let results = AuthenticationResults::new(domain);
    let set = ArcSealer::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(["From", "To", "Subject", "Message-ID"])
        .seal(&parsed, &results, &ArcOutput::default())
        .unwrap();
    let mut sealed = set.to_header().into_bytes();
    sealed.extend_from_slice(message);
    sealed
}

#[tokio::test]
async fn an_arc_chain_is_verified_and_reported() {
    let keys = tempfile::tempdir().unwrap();
    let (key, record) = generate_key_for(keys.path(), "lists.test", "arc");
    let dns = TestDns::start(vec![("arc._domainkey.lists.test", Rr::Txt(record))]);
    let server = TestServer::start(|c| verifying(c, &dns)).unwrap();
    let message = b"From: Carol <carol@origin.test>\r\nTo: bob@example.test\r\n\
Subject: forwarded by a list\r\nMessage-ID: <arc-1@origin.test>\r\n\r\nSealed on the way.\r\n";
    let sealed = arc_seal(message, &key, "lists.test", "arc");
    let tampered = {
        let mut t = sealed.clone();
        let at = t.len() - 3;
        t[at] = b'?'; // the body changes after sealing: the chain no longer holds
        t
    };
    for bytes in [&sealed, &tampered] {
        let (mut client, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
        client.expect("EHLO lists.test", 250).await.unwrap();
        client
            .send_mail("owner@lists.test", &["bob@example.test"], bytes)
            .await
            .unwrap();
        client.expect("QUIT", 221).await.unwrap();
    }
    let mail = server.wait_for_mail("bob", "example.test", 2);
    assert_eq!(mail.len(), 2, "{}", server.log());
    for (_, bytes) in &mail {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let results = text
            .split("Authentication-Results: ")
            .nth(1)
            .expect("an Authentication-Results field")
            .split("\nARC-Seal:")
            .next()
            .unwrap()
            .to_string();
        let want = if text.ends_with("Sealed on the way.\n") {
            "arc=pass smtp.remote-ip=127.0.0.1"
        } else {
            "arc=fail smtp.remote-ip=127.0.0.1"
        };
        assert!(results.contains(want), "{want}: {results}");
        assert!(
            text.contains("ARC-Seal: i=1; a=rsa-sha256; s=arc; d=lists.test; cv=none;"),
            "{text}"
        );
        assert!(
            results.lines().all(|l| l.len() < 200),
            "the field stays folded: {results}"
        );
    }
}
