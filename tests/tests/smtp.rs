//! End-to-end SMTP tests against the real binary with a Rust client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use postern_e2e::{set_key, SmtpClient, TestServer};

fn message(subject: &str, body: &str) -> Vec<u8> {
    format!("From: sender@remote.test\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\r\n{body}\r\n").into_bytes()
}

/// The Received header's date changes; everything else in the stored file is exact.
fn without_received(stored: &[u8]) -> (String, String) {
    let text = String::from_utf8(stored.to_vec()).unwrap();
    let start = text.find("Received: ").expect("Received header");
    let rest = &text[start..];
    // The header ends at the first line that does not start with a tab.
    let mut end = start;
    for (i, line) in rest.split_inclusive('\n').enumerate() {
        if i > 0 && !line.starts_with('\t') {
            break;
        }
        end += line.len();
    }
    (
        text[start..end].to_string(),
        format!("{}{}", &text[..start], &text[end..]),
    )
}

#[tokio::test]
async fn delivers_exact_bytes_to_maildir() {
    let server = TestServer::start(|c| c).unwrap();
    let (mut c, banner) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    assert_eq!(banner.0, 220);
    assert!(banner.1.contains("ESMTP Postern"));
    c.expect("EHLO rust.client.test", 250).await.unwrap();
    let body = "line one\r\n.leading dot\r\n\r\n8bit: caf\u{e9}";
    let id = c
        .send_mail(
            "sender@remote.test",
            &["Alice+news@Example.TEST"],
            &message("exact", body),
        )
        .await
        .unwrap();
    c.expect("QUIT", 221).await.unwrap();
    let mail = server.wait_for_mail("alice", "example.test", 1);
    assert_eq!(mail.len(), 1, "log: {}", server.log());
    let (name, bytes) = &mail[0];
    assert!(name.contains(&format!(".Q{id}_0.")), "{name}");
    let (received, rest) = without_received(bytes);
    assert!(
        received.starts_with(&format!(
            "Received: from rust.client.test ([127.0.0.1])\n\tby localhost (Postern) with ESMTP id {id}\n\tfor <Alice+news@Example.TEST>;\n\t"
        )),
        "{received}"
    );
    assert_eq!(
        rest,
        "Return-Path: <sender@remote.test>\nDelivered-To: Alice+news@Example.TEST\n\
         From: sender@remote.test\nTo: alice@example.test\nSubject: exact\n\n\
         line one\n.leading dot\n\n8bit: caf\u{e9}\n"
    );
    // Maildir name carries the exact sizes: S= stored (LF), W= as CRLF.
    let crlf_size = bytes.len() + bytes.iter().filter(|b| **b == b'\n').count();
    assert!(
        name.ends_with(&format!(",S={},W={crlf_size}", bytes.len())),
        "{name}"
    );
    assert!(
        server.spooled().is_empty(),
        "delivered messages leave the spool"
    );
}

#[tokio::test]
async fn starttls_auth_and_relay_over_submission() {
    let server = TestServer::start(|c| c).unwrap();
    let cert = server.cert_path();
    let (mut c, _) = SmtpClient::connect(server.port("submission"))
        .await
        .unwrap();
    let ehlo = c.expect("EHLO me", 250).await.unwrap();
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<alice@example.test>").await.unwrap().0,
        530
    );
    c.starttls(&cert).await.unwrap();
    // Everything from before the handshake is forgotten: EHLO again.
    assert_eq!(
        c.cmd("MAIL FROM:<alice@example.test>").await.unwrap().0,
        503
    );
    let ehlo = c.expect("EHLO me", 250).await.unwrap();
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    c.expect("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZXBhc3M=", 235)
        .await
        .unwrap();
    let id = c
        .send_mail(
            "alice@example.test",
            &["friend@remote.test", "bob@example.test"],
            &message("tls", "x"),
        )
        .await
        .unwrap();
    let bob = server.wait_for_mail("bob", "example.test", 1);
    assert_eq!(bob.len(), 1);
    let text = String::from_utf8_lossy(&bob[0].1).into_owned();
    assert!(text.contains("with ESMTPSA id"), "{text}");
    assert!(text.contains("(using TLSv1_3 with cipher"), "{text}");
    // The remote recipient waits in the spool for the outbound relay.
    assert_eq!(server.spooled(), vec![id]);
}

#[tokio::test]
async fn implicit_tls_listener() {
    let server = TestServer::start(|c| c).unwrap();
    let (mut c, banner) = SmtpClient::connect_tls(server.port("submissions"), &server.cert_path())
        .await
        .unwrap();
    assert_eq!(banner.0, 220);
    let ehlo = c.expect("EHLO me", 250).await.unwrap();
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
}

#[tokio::test]
async fn kill9_after_250_loses_nothing_and_duplicates_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(temp.path(), |c| c).unwrap();
    let port = server.port("smtp");
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    // Four concurrent senders; the server is killed while they are still sending.
    let mut senders = Vec::new();
    for s in 0..4 {
        let acked = acked.clone();
        senders.push(tokio::spawn(async move {
            let Ok((mut c, _)) = SmtpClient::connect(port).await else {
                return;
            };
            if c.expect("EHLO crash", 250).await.is_err() {
                return;
            }
            for n in 0..1000 {
                let token = format!("crash-{s}-{n}");
                match c
                    .send_mail(
                        "s@remote.test",
                        &["alice@example.test", "bob@example.test"],
                        &message(&token, &token),
                    )
                    .await
                {
                    Ok(id) => {
                        acked.lock().unwrap().insert(token, id);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < 40 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.kill9();
    for s in senders {
        let _ = s.await;
    }
    let acked = acked.lock().unwrap().clone();
    let left_in_spool = server.spooled().len();
    eprintln!(
        "acked {} messages; {left_in_spool} still spooled at kill -9",
        acked.len()
    );
    server.restart().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.spooled().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        server.spooled().is_empty(),
        "spool drained after restart: {:?}",
        server.spooled()
    );
    for user in ["alice", "bob"] {
        let mail = server.maildir(user, "example.test");
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (_, bytes) in &mail {
            let text = String::from_utf8_lossy(bytes);
            let subject = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .expect("subject")
                .to_string();
            assert!(
                text.ends_with(&format!("\n\n{subject}\n")),
                "complete message: {text}"
            );
            *seen.entry(subject).or_default() += 1;
        }
        for token in acked.keys() {
            assert_eq!(
                seen.get(token),
                Some(&1),
                "{user}: {token} delivered exactly once"
            );
        }
        assert!(
            seen.values().all(|n| *n == 1),
            "{user}: a message was delivered twice"
        );
    }
}

#[tokio::test]
async fn connection_limit_per_ip_answers_421() {
    let server =
        TestServer::start(|c| set_key(&c, "limits", "max_connections_per_ip", "2")).unwrap();
    let port = server.port("smtp");
    let (_a, _) = SmtpClient::connect(port).await.unwrap();
    let (_b, _) = SmtpClient::connect(port).await.unwrap();
    let (mut third, banner) = SmtpClient::connect(port).await.unwrap();
    assert_eq!(banner.0, 421, "{banner:?}");
    assert!(banner.1.contains("4.7.0"));
    assert!(third.closed().await);
    drop(_a);
    // A slot frees up once a connection ends.
    let mut ok = false;
    for _ in 0..50 {
        let (_c, banner) = SmtpClient::connect(port).await.unwrap();
        if banner.0 == 220 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok);
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut server = TestServer::start(|c| c).unwrap();
    let (mut c, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    c.expect("EHLO me", 250).await.unwrap();
    let status = tokio::task::spawn_blocking(move || server.stop().map(|s| (s, server)))
        .await
        .unwrap()
        .unwrap();
    assert!(status.0.success(), "{:?}", status.0);
    let (code, text) = c.reply().await.unwrap();
    assert_eq!(code, 421, "{text}");
}

/// Unmounts the test filesystem even when the test fails.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn full_disk_gives_452_and_never_a_half_message() {
    // Needs root to mount a small filesystem; CI runs as root. Opting out must be explicit.
    if std::env::var("POSTERN_SKIP_ROOT_TESTS").is_ok() {
        eprintln!("skipped: POSTERN_SKIP_ROOT_TESTS is set");
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let mount_point = temp.path().join("fs");
    std::fs::create_dir_all(&mount_point).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mount_point)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "mounting a tmpfs needs root (set POSTERN_SKIP_ROOT_TESTS=1 to skip)"
    );
    let _mount = Mount(mount_point.clone());
    let mut server = TestServer::start_in(&mount_point, |c| c).unwrap();
    let (mut c, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    c.expect("EHLO filler", 250).await.unwrap();
    let filler = "x".repeat(998) + "\r\n";
    let mut acked = Vec::new();
    let mut refusal = None;
    for n in 0..60 {
        let token = format!("fill-{n}");
        let body = format!("{}{token}", filler.repeat(200));
        c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
        c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
        let (code, text) = c.data(&message(&token, &body)).await.unwrap();
        match code {
            250 => acked.push(token),
            _ => {
                refusal = Some((code, text));
                break;
            }
        }
    }
    let (code, text) = refusal.expect("the disk filled up");
    assert_eq!(code, 452, "{text}");
    assert!(text.contains("4.3.1"), "{text}");
    assert!(!acked.is_empty());
    // The session goes on after the refusal.
    c.expect("NOOP", 250).await.unwrap();
    // Nothing half-written is left where it could be taken for a message.
    let spool_tmp: Vec<_> = std::fs::read_dir(server.dir.join("spool/tmp"))
        .unwrap()
        .collect();
    assert!(spool_tmp.is_empty(), "spool/tmp is cleaned: {spool_tmp:?}");
    // Make room and restart: every acknowledged message is delivered whole, exactly once.
    server.kill9();
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mount_point)
        .status()
        .unwrap();
    assert!(status.success());
    server.restart().unwrap();
    let mail = server.wait_for_mail("alice", "example.test", acked.len());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.spooled().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut seen = HashMap::new();
    for (name, bytes) in &mail {
        let text = String::from_utf8_lossy(bytes);
        let token = text.lines().last().unwrap().to_string();
        assert!(
            name.contains(&format!(",S={},", bytes.len())),
            "complete file {name}"
        );
        *seen.entry(token).or_insert(0) += 1;
    }
    for token in &acked {
        assert_eq!(
            seen.get(token),
            Some(&1),
            "{token} delivered exactly once; log: {}",
            server.log()
        );
    }
    server.kill9();
}
