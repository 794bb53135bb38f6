//! Helpers of the relay tests: a server that relays through a test DNS server to sinks, a
//! one-message client, and waits for what the relay does.

use std::time::{Duration, Instant};

use crate::dns::TestDns;
use crate::{set_key, SmtpClient, TestServer};

/// A server that relays for loopback clients, resolves through `dns`, reaches MX hosts on
/// `port`, and retries after one second.
pub fn relay_server(dns: &TestDns, port: u16, extra: impl FnOnce(String) -> String) -> TestServer {
    TestServer::start(|config| {
        let config = config.replace(
            "nameservers = [\"127.0.0.1:9\"]",
            &format!("nameservers = [\"{}\"]", dns.addr),
        );
        let config = set_key(&config, "relay", "trusted_networks", "[\"127.0.0.0/8\"]");
        let config = set_key(&config, "outbound", "mx_port", &port.to_string());
        let config = set_key(&config, "outbound", "retry_schedule", "[\"1s\"]");
        extra(config)
    })
    .expect("server starts")
}

pub async fn send(server: &TestServer, from: &str, to: &[&str], message: &[u8]) -> String {
    let (mut client, _) = SmtpClient::connect(server.port("smtp")).await.unwrap();
    client.expect("EHLO client.test", 250).await.unwrap();
    let id = client.send_mail(from, to, message).await.unwrap();
    client.expect("QUIT", 221).await.unwrap();
    id
}

pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for a notice in alice@example.test's INBOX that contains `needle`, and returns it.
pub async fn wait_for_notice(server: &TestServer, needle: &str) -> String {
    let mut found = None;
    wait_until("a delivery status notification", || {
        found = server
            .maildir("alice", "example.test")
            .into_iter()
            .map(|(_, bytes)| String::from_utf8_lossy(&bytes).into_owned())
            .find(|text| text.contains(needle));
        found.is_some()
    })
    .await;
    found.unwrap()
}
