//! End-to-end tests of the plugin platform: every hook stage over real SMTP, the sandbox, the
//! shipped plugins, and hot reload.

use std::time::{Duration, Instant};

use postern_e2e::dns::{Rr, TestDns};
use postern_e2e::{plugin_block, plugins_section, SmtpClient, TestServer};

const PLAIN_ALICE: &str = "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZXBhc3M=";

/// test-hooks imports config and kv; tests that are about grants set their own.
fn with_plugin(extra: &str, config: &[(&str, &str)]) -> TestServer {
    let extra = if extra.contains("capabilities") {
        extra.to_string()
    } else {
        format!("capabilities = [\"config\", \"kv\", \"dns\"]\n{extra}")
    };
    let block = plugins_section("") + &plugin_block("test", "test_hooks", &extra, config);
    TestServer::start(move |c| c + &block).unwrap()
}

fn message(subject: &str) -> Vec<u8> {
    format!("From: s@remote.test\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n").into_bytes()
}

async fn greeted(server: &TestServer) -> SmtpClient {
    let (mut c, banner) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    assert_eq!(banner.0, 220, "{banner:?}");
    c.expect("EHLO plugin.test", 250).await.unwrap();
    c
}

#[tokio::test]
async fn every_smtp_stage_can_reject_with_its_own_code() {
    // connect: the banner itself is the refusal.
    let server = with_plugin(
        "",
        &[("connect", "\"reject:554:5.7.1:no service for you\"")],
    );
    let (mut c, banner) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    assert_eq!(banner, (554, "554 5.7.1 no service for you\r\n".into()));
    assert!(c.closed().await);
    drop(server);

    let server = with_plugin("", &[("helo", "\"reject:550:5.7.1:bad helo\"")]);
    let (mut c, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    assert_eq!(
        c.cmd("EHLO x").await.unwrap(),
        (550, "550 5.7.1 bad helo\r\n".into())
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@remote.test>").await.unwrap().0,
        503,
        "HELO was not accepted"
    );
    drop(server);

    let server = with_plugin("", &[("mail-from", "\"tempfail:451:4.7.1:sender later\"")]);
    let mut c = greeted(&server).await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@remote.test>").await.unwrap(),
        (451, "451 4.7.1 sender later\r\n".into())
    );
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await.unwrap().0,
        503,
        "no transaction opened"
    );
    drop(server);

    let server = with_plugin("", &[("rcpt", "\"reject:550:5.7.1:not this one\"")]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<a@remote.test>", 250).await.unwrap();
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await.unwrap(),
        (550, "550 5.7.1 not this one\r\n".into())
    );
    // The server's own policy still runs first: an unknown user is 550 5.1.1, not the plugin's.
    assert!(c
        .cmd("RCPT TO:<ghost@example.test>")
        .await
        .unwrap()
        .1
        .starts_with("550 5.1.1"));
    drop(server);

    let server = with_plugin("", &[("data", "\"echo-subject\"")]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<a@remote.test>", 250).await.unwrap();
    c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
    let (code, text) = c.data(&message("Spam spam")).await.unwrap();
    assert_eq!(code, 550);
    assert!(
        text.starts_with("550 5.7.1 subject was Spam spam; size "),
        "{text}"
    );
    assert!(server.maildir("alice", "example.test").is_empty());
}

#[tokio::test]
async fn disconnect_tempfail_and_accept() {
    let server = with_plugin("", &[("rcpt", "\"disconnect:421:4.7.0:go away\"")]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<a@remote.test>", 250).await.unwrap();
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await.unwrap(),
        (421, "421 4.7.0 go away\r\n".into())
    );
    assert!(c.closed().await);
    drop(server);

    let server = with_plugin("", &[("rcpt", "\"accept\""), ("mail-from", "\"accept\"")]);
    let mut c = greeted(&server).await;
    c.send_mail(
        "a@remote.test",
        &["alice@example.test"],
        &message("accepted"),
    )
    .await
    .unwrap();
    // accept never overrides the relay policy.
    c.expect("MAIL FROM:<a@remote.test>", 250).await.unwrap();
    assert_eq!(c.cmd("RCPT TO:<victim@remote.test>").await.unwrap().0, 550);
    assert_eq!(server.wait_for_mail("alice", "example.test", 1).len(), 1);
}

#[tokio::test]
async fn auth_hook_can_refuse_a_valid_login() {
    let block = plugin_block(
        "test",
        "test_hooks",
        "capabilities = [\"config\", \"kv\", \"dns\"]",
        &[("auth", "\"reject:535:5.7.8:not from here\"")],
    );
    let server = TestServer::start(move |c| {
        c.replace(
            "address = \"127.0.0.1:0\"\ntls = \"starttls\"",
            "address = \"127.0.0.1:0\"\ntls = \"starttls\"\ntrusted = true",
        ) + &block
    })
    .unwrap();
    let (mut c, _) = SmtpClient::connect(server.port("submission"))
        .await
        .unwrap();
    c.expect("EHLO me", 250).await.unwrap();
    assert_eq!(
        c.cmd(PLAIN_ALICE).await.unwrap(),
        (535, "535 5.7.8 not from here\r\n".into())
    );
    assert_eq!(
        c.cmd("MAIL FROM:<alice@example.test>").await.unwrap().0,
        530,
        "not authenticated"
    );
}

#[tokio::test]
async fn data_modifications_are_applied_to_stored_bytes() {
    let server = with_plugin(
        "",
        &[(
            "data-modifications",
            r#"["add-header:X-Spam-Score:1.5", "insert-header:X-First:top", "change-header:Subject:1:rewritten", "remove-header:X-Remove-Me:0", "replace-body:new body\\nline two"]"#,
        )],
    );
    let mut c = greeted(&server).await;
    let msg = b"From: s@remote.test\r\nSubject: original\r\nX-Remove-Me: 1\r\nX-Remove-Me: 2\r\nTo: alice@example.test\r\n\r\nold body\r\n";
    c.send_mail("s@remote.test", &["alice@example.test"], msg)
        .await
        .unwrap();
    let mail = server.wait_for_mail("alice", "example.test", 1);
    let text = String::from_utf8(mail[0].1.clone()).unwrap();
    let after_received = text
        .split_once("\nX-First: top\n")
        .expect("inserted after Received")
        .1;
    assert_eq!(
        after_received,
        "From: s@remote.test\nSubject: rewritten\nTo: alice@example.test\nX-Spam-Score: 1.5\n\nnew body\nline two"
    );
    assert!(text.starts_with("Return-Path: <s@remote.test>\nDelivered-To: alice@example.test\nReceived: from plugin.test"));
}

#[tokio::test]
async fn envelope_modifications_and_discard() {
    let server = with_plugin(
        "",
        &[(
            "data-modifications",
            r#"["add-recipient:bob@example.test", "remove-recipient:alice@example.test", "change-sender:bounces@example.test"]"#,
        )],
    );
    let mut c = greeted(&server).await;
    c.send_mail("s@remote.test", &["alice@example.test"], &message("moved"))
        .await
        .unwrap();
    let bob = server.wait_for_mail("bob", "example.test", 1);
    assert!(String::from_utf8_lossy(&bob[0].1)
        .starts_with("Return-Path: <bounces@example.test>\nDelivered-To: bob@example.test\n"));
    assert!(server.maildir("alice", "example.test").is_empty());
    drop(server);

    // A plugin cannot add a recipient the relay policy refuses.
    let server = with_plugin(
        "",
        &[(
            "data-modifications",
            r#"["add-recipient:victim@remote.test"]"#,
        )],
    );
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
    assert_eq!(c.data(&message("relay")).await.unwrap().0, 451);
    drop(server);

    let server = with_plugin("", &[("data", "\"discard\"")]);
    let mut c = greeted(&server).await;
    c.send_mail(
        "s@remote.test",
        &["alice@example.test"],
        &message("dropped"),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.maildir("alice", "example.test").is_empty());
    assert!(server.spooled().is_empty());
}

#[tokio::test]
async fn quarantine_lands_in_the_quarantine_folder() {
    let server = with_plugin("", &[("data", "\"quarantine:spam score 12.0\"")]);
    let mut c = greeted(&server).await;
    c.send_mail(
        "s@remote.test",
        &["alice@example.test"],
        &message("suspicious"),
    )
    .await
    .unwrap();
    let quarantine = server.wait_for_folder("alice", "example.test", "Quarantine", 1);
    let text = String::from_utf8_lossy(&quarantine[0].1).into_owned();
    assert!(
        text.contains("\nX-Postern-Quarantine: spam score 12.0\n"),
        "{text}"
    );
    assert!(
        server.maildir("alice", "example.test").is_empty(),
        "nothing in the inbox"
    );
}

#[tokio::test]
async fn deliver_hook_routes_to_folders_and_forwards() {
    let server = with_plugin("", &[("deliver", "\"folder:Lists/Rust\"")]);
    let mut c = greeted(&server).await;
    c.send_mail(
        "s@remote.test",
        &["alice@example.test"],
        &message("to a folder"),
    )
    .await
    .unwrap();
    let routed = server.wait_for_folder("alice", "example.test", "Lists/Rust", 1);
    assert_eq!(routed.len(), 1);
    drop(server);

    let server = with_plugin("", &[("deliver", "\"forward:bob@example.test\"")]);
    let mut c = greeted(&server).await;
    c.send_mail(
        "s@remote.test",
        &["alice@example.test"],
        &message("forwarded"),
    )
    .await
    .unwrap();
    assert_eq!(server.wait_for_mail("bob", "example.test", 1).len(), 1);
    assert!(server.maildir("alice", "example.test").is_empty());
}

#[tokio::test]
async fn vrfy_and_expn_answers_from_a_plugin() {
    let server = with_plugin(
        "",
        &[
            ("vrfy", "\"found:alice@example.test\""),
            ("expn", "\"not-found\""),
        ],
    );
    let mut c = greeted(&server).await;
    assert_eq!(
        c.cmd("VRFY alice").await.unwrap(),
        (250, "250 2.1.5 <alice@example.test>\r\n".into())
    );
    assert_eq!(c.cmd("EXPN staff").await.unwrap().0, 550);
}

#[tokio::test]
async fn vrfy_policy_reveals_only_to_authenticated_users() {
    let block = plugin_block(
        "vrfy-policy",
        "vrfy_policy",
        "capabilities = [\"config\", \"directory\", \"log\"]",
        &[
            ("allowed_networks", "[]"),
            (
                "lists",
                "{ staff = [\"alice@example.test\", \"bob@example.test\"] }",
            ),
        ],
    );
    let server = TestServer::start(move |c| c + &block).unwrap();
    let mut c = greeted(&server).await;
    for query in [
        "VRFY alice@example.test",
        "VRFY ghost@example.test",
        "EXPN staff",
        "EXPN nolist",
    ] {
        assert_eq!(
            c.cmd(query).await.unwrap().0,
            252,
            "{query} from a stranger"
        );
    }
    c.starttls(&server.cert_path()).await.unwrap();
    c.expect("EHLO me", 250).await.unwrap();
    c.expect(PLAIN_ALICE, 235).await.unwrap();
    assert_eq!(
        c.cmd("VRFY Bob+x@Example.test").await.unwrap(),
        (250, "250 2.1.5 <bob@example.test>\r\n".into())
    );
    assert_eq!(c.cmd("VRFY ghost@example.test").await.unwrap().0, 550);
    assert_eq!(
        c.cmd("EXPN staff").await.unwrap(),
        (
            250,
            "250-2.1.5 <alice@example.test>\r\n250 2.1.5 <bob@example.test>\r\n".into()
        )
    );
    assert_eq!(c.cmd("EXPN nolist").await.unwrap().0, 550);
}

#[tokio::test]
async fn greylisting_delays_then_passes_and_remembers_across_restart() {
    let temp = tempfile::tempdir().unwrap();
    let block = plugin_block(
        "greylist",
        "greylist",
        "capabilities = [\"config\", \"kv\", \"clock\", \"log\"]",
        &[
            ("delay_secs", "1"),
            ("retry_window_secs", "3600"),
            ("whitelist_networks", "[]"),
        ],
    );
    let mut server = TestServer::start_in(temp.path(), move |c| c + &block).unwrap();
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    let (code, text) = c.cmd("RCPT TO:<alice@example.test>").await.unwrap();
    assert_eq!((code, &text[..10]), (451, "451 4.7.1 "), "{text}");
    let (code, text) = c.cmd("RCPT TO:<alice@example.test>").await.unwrap();
    assert!(
        code == 451 && text.contains("try again in"),
        "too early: {text}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
    // Another recipient is another triplet.
    assert_eq!(c.cmd("RCPT TO:<bob@example.test>").await.unwrap().0, 451);
    server.restart().unwrap();
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
}

#[tokio::test]
async fn greylist_rate_limit_per_ip() {
    let block = plugin_block(
        "greylist",
        "greylist",
        "capabilities = [\"config\", \"kv\", \"clock\", \"log\"]",
        &[
            ("whitelist_networks", "[\"127.0.0.0/8\"]"),
            ("ip_limit", "3"),
            ("rate_window_secs", "3600"),
        ],
    );
    let server = TestServer::start(move |c| c + &block).unwrap();
    let mut c = greeted(&server).await;
    for _ in 0..3 {
        c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
        c.expect("RSET", 250).await.unwrap();
    }
    let (code, text) = c.cmd("MAIL FROM:<s@remote.test>").await.unwrap();
    assert_eq!(code, 451, "{text}");
    assert!(text.contains("4.7.1"));
}

#[tokio::test]
async fn looping_plugin_gets_the_error_policy_within_its_deadline() {
    let server = with_plugin("timeout_ms = 200", &[("rcpt", "\"loop\"")]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    let start = Instant::now();
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await.unwrap(),
        (
            451,
            "451 4.3.0 Temporary local problem, try again later\r\n".into()
        )
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    // Other sessions are served meanwhile and afterwards.
    let mut other = greeted(&server).await;
    other.expect("NOOP", 250).await.unwrap();
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await.unwrap().0,
        451,
        "fresh instance, same plugin"
    );
    assert!(
        server.log().contains("ran past its deadline"),
        "logged with the plugin name"
    );
}

/// A guest waiting in a host call (WASI's poll: `std::thread::sleep`) runs no guest code, so
/// epoch interruption never sees it; the call's timer stops it at the same deadline.
#[tokio::test]
async fn a_sleeping_plugin_is_stopped_at_its_deadline_too() {
    let server = with_plugin("timeout_ms = 200", &[("rcpt", "\"sleep:600000\"")]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    let start = Instant::now();
    assert_eq!(c.cmd("RCPT TO:<alice@example.test>").await.unwrap().0, 451);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert!(server.log().contains("ran past its deadline"));
}

#[tokio::test]
async fn memory_bomb_and_panic_are_contained() {
    for (action, policy, expect) in [
        ("alloc", "", 451),
        ("panic", "", 451),
        ("panic", "on_error = \"reject\"", 550),
        ("panic", "on_error = \"continue\"", 250),
    ] {
        let extra = format!("memory_mb = 16\n{policy}");
        let server = with_plugin(&extra, &[("rcpt", &format!("{action:?}"))]);
        let mut c = greeted(&server).await;
        c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
        let (code, text) = c.cmd("RCPT TO:<alice@example.test>").await.unwrap();
        assert_eq!(code, expect, "{action} with {policy:?}: {text}");
        c.expect("NOOP", 250).await.unwrap();
        assert!(
            server.log().contains("plugin test failed"),
            "{action}: logged"
        );
    }
}

#[tokio::test]
async fn the_wall_clock_is_frozen_unless_clock_is_granted() {
    for (capabilities, real) in [
        ("capabilities = [\"config\", \"kv\", \"dns\"]", false),
        (
            "capabilities = [\"config\", \"kv\", \"dns\", \"clock\"]",
            true,
        ),
    ] {
        let server = with_plugin(capabilities, &[("rcpt", "\"wall-clock\"")]);
        let mut c = greeted(&server).await;
        c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
        let (code, text) = c.cmd("RCPT TO:<alice@example.test>").await.unwrap();
        assert_eq!(code, 550, "{text}");
        let secs: u64 = text
            .rsplit(' ')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        if real {
            assert!(secs > 1_700_000_000, "granted: the real time, got {secs}");
        } else {
            assert_eq!(secs, 0, "not granted: the Unix epoch");
        }
    }
}

#[tokio::test]
async fn a_plugin_past_its_memory_cap_is_contained_and_the_log_says_why() {
    // test-hooks' `alloc` grows one memory; the limiter counts every memory and table of the
    // instance together (host/src/plugin/limits.rs has the three-memory module). Here: a cap
    // small enough that the plugin's own start-up memory plus one more MiB passes it.
    let server = with_plugin("memory_mb = 2", &[("rcpt", "\"alloc\"")]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    let (code, text) = c.cmd("RCPT TO:<alice@example.test>").await.unwrap();
    assert_eq!(code, 451, "{text}");
    assert!(
        server.log().contains("memory limit"),
        "the limiter said why"
    );
}

#[tokio::test]
async fn invalid_reply_code_is_a_plugin_error() {
    let server = with_plugin("", &[("rcpt", "\"reject:250:2.0.0:looks like success\"")]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    assert_eq!(c.cmd("RCPT TO:<alice@example.test>").await.unwrap().0, 451);
    assert!(server.log().contains("returned an invalid answer"));
}

#[tokio::test]
async fn plugins_get_no_files_no_sockets_and_only_granted_capabilities() {
    let server = with_plugin("", &[("rcpt", "\"read-file:/etc/hostname\"")]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    let (_, text) = c.cmd("RCPT TO:<alice@example.test>").await.unwrap();
    assert!(text.starts_with("550 5.7.1 read failed"), "{text}");
    let port = server.port("smtp");
    drop(c);
    drop(server);
    let server = with_plugin("", &[("rcpt", &format!("\"connect:127.0.0.1:{port}\""))]);
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    let (_, text) = c.cmd("RCPT TO:<alice@example.test>").await.unwrap();
    assert!(text.starts_with("550 5.7.1 connect failed"), "{text}");
    // test-hooks imports kv; without the grant the server refuses to start and says why.
    let block = plugin_block("test", "test_hooks", "capabilities = []", &[]);
    let err = TestServer::start(move |c| c + &block)
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("does not grant"), "{err:#}");
}

#[tokio::test]
async fn kv_capability_counts_across_sessions() {
    let server = with_plugin(
        "capabilities = [\"kv\", \"config\", \"dns\"]",
        &[("rcpt", "\"kv-count\"")],
    );
    for n in 1..=3 {
        let mut c = greeted(&server).await;
        c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
        assert_eq!(
            c.cmd("RCPT TO:<alice@example.test>").await.unwrap().1,
            format!("550 5.7.1 call {n}\r\n")
        );
    }
}

#[tokio::test]
async fn kv_0_2_0_answers_a_full_quota_with_an_error_instead_of_a_trap() {
    // 1 MiB of quota holds fifteen 64 KiB values and their keys; the sixteenth is refused, and
    // the plugin goes on to answer (a 0.1.0 kv would have trapped into the on-error policy).
    let server = with_plugin(
        // Sixteen durable writes: more time than the default deadline under a loaded test run.
        "capabilities = [\"kv\", \"config\", \"dns\"]\nkv_quota_mb = 1\ntimeout_ms = 10000",
        &[("rcpt", "\"kv-fill\"")],
    );
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await.unwrap().1,
        "550 5.7.1 kv: KvError::QuotaExceeded after 15\r\n"
    );
    assert!(!server.log().contains("plugin failed"));
}

#[tokio::test]
async fn a_plugin_built_for_0_1_0_by_the_previous_release_runs_unchanged() {
    let old = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/plugins-0.1.0/test_hooks.wasm");
    let block = |config: &str| {
        format!(
            "{}\n[[plugin]]\nname = \"old\"\npath = {:?}\ncapabilities = [\"config\", \"kv\", \"dns\"]\n[plugin.config]\n{config}\n",
            plugins_section(""),
            old.display().to_string()
        )
    };
    let stages = block("mail-from = \"reject:550:5.7.1:the old plugin says no\"");
    let server = TestServer::start(move |c| c + &stages).unwrap();
    let mut c = greeted(&server).await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@remote.test>").await.unwrap(),
        (550, "550 5.7.1 the old plugin says no\r\n".into())
    );
    drop(server);

    // 0.1.0's kv, and a data hook reading the message through the 0.1.0 resource.
    let counting = block("rcpt = \"kv-count\"");
    let server = TestServer::start(move |c| c + &counting).unwrap();
    for n in 1..=2 {
        let mut c = greeted(&server).await;
        c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
        assert_eq!(
            c.cmd("RCPT TO:<alice@example.test>").await.unwrap().1,
            format!("550 5.7.1 call {n}\r\n")
        );
    }
    drop(server);
    let echo = block("data = \"echo-subject\"");
    let server = TestServer::start(move |c| c + &echo).unwrap();
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<a@remote.test>", 250).await.unwrap();
    c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
    let (code, text) = c.data(&message("Old times")).await.unwrap();
    assert_eq!(code, 550);
    assert!(
        text.starts_with("550 5.7.1 subject was Old times"),
        "{text}"
    );
}

#[tokio::test]
async fn hot_reload_swaps_plugins_without_failing_a_transaction() {
    let temp = tempfile::tempdir().unwrap();
    // The plugin file is replaced while mail flows: first its settings change (version 1 → 2),
    // then the component itself (test-hooks → spam-filter, which marks mail X-Spam-Score).
    let active = temp.path().join("active.wasm");
    std::fs::copy(postern_e2e::plugin_wasm("test_hooks"), &active).unwrap();
    let block = format!(
        "\n[[plugin]]\nname = \"swapped\"\npath = {:?}\ncapabilities = [\"config\", \"kv\", \"dns\", \"log\"]\n[plugin.config]\ndata-modifications = [\"add-header:X-Version:1\"]\nquarantine_at = 100.0\nreject_at = 200.0\n",
        active.display().to_string()
    );
    let server = TestServer::start_in(temp.path(), |c| {
        c + &plugins_section("watch = true") + &block
    })
    .unwrap();
    let port = server.port("smtp");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut sent, mut failed) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A new session per message: every session start sees the newest plugin set.
                let result = async {
                    let (mut c, _) = SmtpClient::connect(port).await?;
                    c.expect("EHLO reload", 250).await?;
                    c.send_mail(
                        "s@remote.test",
                        &["alice@example.test"],
                        &message(&format!("m{sent}")),
                    )
                    .await?;
                    c.expect("QUIT", 221).await
                }
                .await;
                match result {
                    Ok(_) => sent += 1,
                    Err(err) => failed.push(err.to_string()),
                }
            }
            (sent, failed)
        })
    };
    let wait_for = |marker: &'static str| {
        let server = &server;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let mail = server.maildir("alice", "example.test");
                if mail
                    .iter()
                    .any(|(_, b)| String::from_utf8_lossy(b).contains(marker))
                {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 1. New settings: rewrite the configuration (rename into place, as editors do).
    let text = std::fs::read_to_string(&server.config_path).unwrap();
    let tmp = server.config_path.with_extension("new");
    std::fs::write(&tmp, text.replace("X-Version:1", "X-Version:2")).unwrap();
    std::fs::rename(&tmp, &server.config_path).unwrap();
    let seen_v2 = wait_for("X-Version: 2").await;
    // 2. A new component in the same file.
    let tmp = active.with_extension("new");
    std::fs::copy(postern_e2e::plugin_wasm("spam_filter"), &tmp).unwrap();
    std::fs::rename(&tmp, &active).unwrap();
    let seen_v3 = wait_for("X-Spam-Score: ").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = sender.await.unwrap();
    assert!(
        seen_v2 && seen_v3,
        "both swaps visible; log: {}",
        server.log()
    );
    assert!(failed.is_empty(), "failed transactions: {failed:?}");
    let mail = server.wait_for_mail("alice", "example.test", sent);
    assert_eq!(mail.len(), sent, "every accepted message delivered");
    // Each message was handled by exactly one version, and versions only move forward.
    let mut versions: Vec<(usize, u32)> = mail
        .iter()
        .map(|(_, bytes)| {
            let text = String::from_utf8_lossy(bytes);
            let n: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: m"))
                .and_then(|n| n.parse().ok())
                .expect("subject");
            let marks = [
                text.contains("X-Version: 1"),
                text.contains("X-Version: 2"),
                text.contains("X-Spam-Score: "),
            ];
            assert_eq!(
                marks.iter().filter(|m| **m).count(),
                1,
                "one version per message: {text}"
            );
            (n, marks.iter().position(|m| *m).unwrap() as u32 + 1)
        })
        .collect();
    versions.sort();
    assert!(
        versions.windows(2).all(|w| w[0].1 <= w[1].1),
        "versions move forward: {versions:?}"
    );
    let per_version: Vec<usize> = (1..=3)
        .map(|v| versions.iter().filter(|(_, x)| *x == v).count())
        .collect();
    eprintln!(
        "{sent} transactions, 0 failed; per version (v1, v2, new component): {per_version:?}"
    );
    assert!(
        sent > 10,
        "the client kept sending during the swaps ({sent})"
    );
}

#[tokio::test]
async fn reload_command_and_a_broken_plugin_keeps_the_old_version() {
    let temp = tempfile::tempdir().unwrap();
    let wasm = temp.path().join("copy.wasm");
    std::fs::copy(postern_e2e::plugin_wasm("test_hooks"), &wasm).unwrap();
    let block = format!(
        "\n[[plugin]]\nname = \"test\"\npath = {:?}\ncapabilities = [\"config\", \"kv\", \"dns\"]\n[plugin.config]\nrcpt = \"reject:550:5.7.1:version one\"\n",
        wasm.display().to_string()
    );
    let server = TestServer::start_in(temp.path(), |c| {
        c + &plugins_section("watch = false") + &block
    })
    .unwrap();
    let probe = |server: &TestServer| {
        let port = server.port("smtp");
        async move {
            let (mut c, _) = SmtpClient::connect(port).await.unwrap();
            c.expect("EHLO x", 250).await.unwrap();
            c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
            c.cmd("RCPT TO:<alice@example.test>").await.unwrap().1
        }
    };
    assert_eq!(probe(&server).await, "550 5.7.1 version one\r\n");
    // The server answers with what came of each plugin; exit status 1 when one failed.
    let reload = |server: &TestServer, succeeds: bool| {
        let out = std::process::Command::new(postern_e2e::postern_bin())
            .args(["plugin", "reload", "--config"])
            .arg(&server.config_path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.success(),
            succeeds,
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    // A corrupt plugin file: the reload fails and version one keeps serving.
    std::fs::write(&wasm, b"not a component").unwrap();
    let said = reload(&server, false);
    assert!(said.contains("failed, previous version kept"), "{said}");
    assert_eq!(probe(&server).await, "550 5.7.1 version one\r\n");
    assert!(
        server.log().contains("keeping the previous version"),
        "{}",
        server.log()
    );
    // A good file and new settings: the reload takes.
    std::fs::copy(postern_e2e::plugin_wasm("test_hooks"), &wasm).unwrap();
    let text = std::fs::read_to_string(&server.config_path).unwrap();
    std::fs::write(
        &server.config_path,
        text.replace("version one", "version two"),
    )
    .unwrap();
    let said = reload(&server, true);
    assert!(said.contains(": loaded"), "{said}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = probe(&server).await;
        if reply == "550 5.7.1 version two\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "still {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Trains the classifier on tests/corpus with the shipped trainer and returns the model setting.
fn trained_model() -> String {
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let trainer = plugins.join("target/release/spam-train");
    assert!(
        trainer.exists(),
        "{} missing: scripts/test builds it",
        trainer.display()
    );
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let out = std::process::Command::new(trainer)
        .arg(corpus.join("spam"))
        .arg(corpus.join("ham"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_prefix("model = ").unwrap().trim().to_string()
}

#[tokio::test]
async fn spam_filter_rejects_gtube_quarantines_spam_and_passes_ham() {
    let block = plugin_block(
        "spam-filter",
        "spam_filter",
        "capabilities = [\"config\", \"log\", \"dns\", \"kv\"]",
        &[
            ("quarantine_at", "5.0"),
            ("reject_at", "10.0"),
            (
                "rules",
                "[\"header:subject:lottery:2.0\", \"body:wire transfer:1.5\"]",
            ),
            ("model", &trained_model()),
        ],
    );
    let server = TestServer::start(move |c| c + &block).unwrap();
    let mut c = greeted(&server).await;
    // GTUBE: refused outright.
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
    let gtube = "Subject: test\r\n\r\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n";
    let (code, text) = c.data(gtube.as_bytes()).await.unwrap();
    assert_eq!(code, 550, "{text}");
    assert!(
        text.starts_with("550 5.7.1 Message rejected as spam (score 10"),
        "{text}"
    );
    // Unseen spam, in words the classifier learned: quarantined.
    let spam = "From: winner@prizes.example.biz\r\nSubject: Claim your lottery prize today\r\n\r\nCongratulations, you won! To claim your prize send your bank account details and a small processing fee by wire transfer. Limited offer, reply now.\r\n";
    c.send_mail(
        "winner@prizes.example.biz",
        &["alice@example.test"],
        spam.as_bytes(),
    )
    .await
    .unwrap();
    // Ham: delivered to the inbox, marked as not spam.
    let ham = "From: colleague@partner.example\r\nSubject: Notes from the design review\r\n\r\nHi Alice, thanks for the review meeting today. I updated the draft with your comments on the storage design and the release schedule; could you take another look before Friday?\r\n";
    c.send_mail(
        "colleague@partner.example",
        &["alice@example.test"],
        ham.as_bytes(),
    )
    .await
    .unwrap();
    let inbox = server.wait_for_mail("alice", "example.test", 1);
    assert_eq!(inbox.len(), 1);
    let delivered = String::from_utf8_lossy(&inbox[0].1).into_owned();
    assert!(
        delivered.contains("Subject: Notes from the design review"),
        "{delivered}"
    );
    assert!(
        delivered.contains("\nX-Spam-Status: No, score=-"),
        "{delivered}"
    );
    let quarantine = server.wait_for_folder("alice", "example.test", "Quarantine", 1);
    let quarantined = String::from_utf8_lossy(&quarantine[0].1).into_owned();
    assert!(
        quarantined.contains("Subject: Claim your lottery prize today"),
        "{quarantined}"
    );
    assert!(
        quarantined.contains("\nX-Spam-Status: Yes, score="),
        "{quarantined}"
    );
    assert!(
        quarantined.contains("X-Postern-Quarantine: spam score"),
        "{quarantined}"
    );
}

/// A `[[plugin]]` block for an example plugin built by examples/plugins/build.
fn example_block(name: &str, wasm: &str, capabilities: &str, config: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/plugins")
        .join(wasm);
    assert!(
        path.exists(),
        "{} missing: examples/plugins/build makes it",
        path.display()
    );
    format!(
        "\n[[plugin]]\nname = {name:?}\npath = {:?}\ntimeout_ms = 2000\nmemory_mb = 128\ncapabilities = {capabilities}\n[plugin.config]\n{config}\n",
        path.display().to_string()
    )
}

#[tokio::test]
async fn python_plugin_runs_rcpt_and_data_hooks() {
    let block = plugins_section("")
        + &example_block(
            "python-filter",
            "python-filter/python_filter.wasm",
            "[\"config\", \"log\"]",
            "blocked_recipients = [\"bob@example.test\"]\nblocked_words = [\"casino\"]",
        );
    let server = TestServer::start(move |c| c + &block).unwrap();
    let mut c = greeted(&server).await;
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    assert_eq!(
        c.cmd("RCPT TO:<Bob@example.test>").await.unwrap(),
        (
            550,
            "550 5.7.1 Recipient blocked by the Python filter\r\n".into()
        )
    );
    c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
    let (code, text) = c.data(&message("Best CASINO offers")).await.unwrap();
    assert_eq!(
        (code, text.as_str()),
        (
            550,
            "550 5.7.1 Subject contains the blocked word 'casino'\r\n"
        )
    );
    c.send_mail(
        "s@remote.test",
        &["alice@example.test"],
        &message("hello from python"),
    )
    .await
    .unwrap();
    let mail = server.wait_for_mail("alice", "example.test", 1);
    let text = String::from_utf8_lossy(&mail[0].1).into_owned();
    assert!(
        text.contains("\nX-Python-Filter: passed; 1 text part(s) read\n"),
        "{text}"
    );
}

#[tokio::test]
async fn javascript_plugin_runs_helo_rcpt_and_data_hooks() {
    let block = plugins_section("")
        + &example_block(
            "js-filter",
            "js-filter/js_filter.wasm",
            "[\"config\"]",
            "blocked_helos = [\"spambot.example\"]\npaused_prefixes = [\"paused\"]",
        );
    let alias = "\"postmaster@localhost\" = \"alice@example.test\"";
    let server = TestServer::start(move |c| {
        c.replace(
            alias,
            &format!("{alias}\n\"paused-sales@example.test\" = \"alice@example.test\""),
        ) + &block
    })
    .unwrap();
    let (mut c, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    assert_eq!(
        c.cmd("EHLO spambot.example").await.unwrap(),
        (
            550,
            "550 5.7.1 HELO spambot.example refused by the JavaScript filter\r\n".into()
        )
    );
    c.expect("EHLO good.example", 250).await.unwrap();
    c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
    assert_eq!(
        c.cmd("RCPT TO:<paused.alice@example.test>")
            .await
            .unwrap()
            .0,
        550,
        "unknown user: the server's policy runs before plugins"
    );
    assert_eq!(
        c.cmd("RCPT TO:<paused-sales@example.test>").await.unwrap(),
        (450, "450 4.2.1 Mailbox paused, try again later\r\n".into())
    );
    c.expect("RCPT TO:<alice@example.test>", 250).await.unwrap();
    let (code, _) = c.data(&message("from js")).await.unwrap();
    assert_eq!(code, 250);
    let mail = server.wait_for_mail("alice", "example.test", 1);
    let text = String::from_utf8_lossy(&mail[0].1).into_owned();
    // The data hook read the size and the header fields through the message resource.
    let size_line = text
        .lines()
        .find(|l| l.starts_with("X-JS-Filter: size="))
        .expect("header added");
    assert!(
        size_line.ends_with(" fields=4"),
        "Received, From, To, Subject: {size_line}"
    );
    c.expect("QUIT", 221).await.unwrap();
}

/// Points the server's resolver at a test DNS server.
fn use_dns(config: String, dns: &TestDns) -> String {
    config.replace(
        "nameservers = [\"127.0.0.1:9\"]",
        &format!("nameservers = [\"{}\"]", dns.addr),
    )
}

#[tokio::test]
async fn dns_capability_looks_up_a_and_txt_records() {
    let dns = TestDns::start(vec![
        ("2.0.0.127.zen.test", Rr::A("127.0.0.2".parse().unwrap())),
        ("remote.test", Rr::Txt("v=spf1 -all".into())),
    ]);
    for (action, expect) in [
        (
            "dns-a:2.0.0.127.zen.test",
            "550 5.7.1 dns ok: 127.0.0.2\r\n",
        ),
        ("dns-txt:remote.test", "550 5.7.1 dns ok: v=spf1 -all\r\n"),
        ("dns-a:3.0.0.127.zen.test", "550 5.7.1 dns not found\r\n"),
        ("dns-a:remote.test", "550 5.7.1 dns not found\r\n"),
    ] {
        let block = plugins_section("")
            + &plugin_block(
                "test",
                "test_hooks",
                "capabilities = [\"config\", \"kv\", \"dns\"]",
                &[("rcpt", &format!("{action:?}"))],
            );
        let server = TestServer::start(|c| use_dns(c, &dns) + &block).unwrap();
        let mut c = greeted(&server).await;
        c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
        assert_eq!(
            c.cmd("RCPT TO:<alice@example.test>").await.unwrap().1,
            expect,
            "{action}"
        );
    }
}

#[tokio::test]
async fn spam_filter_scores_dnsbl_listings() {
    // The client connects from 127.0.0.1: listed in one zone, not in the other.
    let dns = TestDns::start(vec![(
        "1.0.0.127.black.test",
        Rr::A("127.0.0.2".parse().unwrap()),
    )]);
    let block = plugins_section("")
        + &plugin_block(
            "spam-filter",
            "spam_filter",
            "capabilities = [\"config\", \"log\", \"dns\", \"kv\"]\ntimeout_ms = 3000",
            &[
                ("quarantine_at", "5.0"),
                ("reject_at", "10.0"),
                ("dnsbls", "[\"black.test:6.0\", \"clean.test:6.0\"]"),
            ],
        );
    let server = TestServer::start(|c| use_dns(c, &dns) + &block).unwrap();
    let mut c = greeted(&server).await;
    c.send_mail(
        "s@remote.test",
        &["alice@example.test"],
        &message("plain words"),
    )
    .await
    .unwrap();
    let quarantine = server.wait_for_folder("alice", "example.test", "Quarantine", 1);
    let text = String::from_utf8_lossy(&quarantine[0].1).into_owned();
    assert!(
        text.contains("\nX-Spam-Status: Yes, score=6.0 required=5.0 tests=DNSBL_black.test\n"),
        "{text}"
    );
}

#[tokio::test]
async fn plugin_stdout_and_stderr_reach_the_log() {
    let server = with_plugin("", &[("helo", "\"print:hello from inside the sandbox\"")]);
    let _c = greeted(&server).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server
        .log()
        .contains("hello from inside the sandbox (stderr)")
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("hello from inside the sandbox") && !l.contains("(stderr)"))
        .expect("stdout line");
    assert!(
        line.contains("plugin=test") && line.contains("stdout"),
        "{line}"
    );
    assert!(log.contains("hello from inside the sandbox (stderr)"));
}

#[tokio::test]
async fn a_granted_directory_is_visible_as_data_and_nothing_else() {
    let temp = tempfile::tempdir().unwrap();
    let granted = temp.path().join("granted");
    std::fs::create_dir_all(&granted).unwrap();
    std::fs::write(granted.join("hello.txt"), "hi there").unwrap();
    std::fs::write(temp.path().join("secret.txt"), "not yours").unwrap();
    for (path, expect) in [
        ("/data/hello.txt", "550 5.7.1 read ok: 8 bytes\r\n"),
        ("/data/../secret.txt", "550 5.7.1 read failed"),
        ("/etc/hostname", "550 5.7.1 read failed"),
    ] {
        let extra = format!("directory = {:?}", granted.display().to_string());
        let server = with_plugin(&extra, &[("rcpt", &format!("\"read-file:{path}\""))]);
        let mut c = greeted(&server).await;
        c.expect("MAIL FROM:<s@remote.test>", 250).await.unwrap();
        let reply = c.cmd("RCPT TO:<alice@example.test>").await.unwrap().1;
        assert!(reply.starts_with(expect), "{path}: {reply}");
    }
}
