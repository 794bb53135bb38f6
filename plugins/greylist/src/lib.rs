//! Greylisting (triplet: client network, sender, recipient) and rate limits.
//!
//! The first attempt of an unknown triplet gets 451 4.7.1; a retry after `delay_secs` (and within
//! `retry_window_secs` of the first attempt) passes, and the triplet is then remembered for
//! `pass_ttl_secs` so later mail from the same source is not delayed again. Real MTAs retry;
//! most spamware does not. Authenticated sessions and `whitelist_networks` are never greylisted.
//! IPv4 clients are grouped by /24 and IPv6 by /64, because big senders retry from another host
//! of the same pool.
//!
//! Rate limits count MAIL commands per client IP and per sender in fixed windows
//! (`ip_limit` / `sender_limit` per `rate_window_secs`; 0 = no limit) and answer 451 4.7.1
//! past them. State lives in the host's `kv` store, which survives restarts.
//!
//! ```toml
//! [[plugin]]
//! name = "greylist"
//! path = "plugins/greylist.wasm"
//! capabilities = ["config", "kv", "clock", "log"]
//! [plugin.config]
//! delay_secs = 300
//! retry_window_secs = 14400
//! pass_ttl_secs = 3024000
//! whitelist_networks = ["127.0.0.0/8"]
//! ip_limit = 100
//! sender_limit = 50
//! rate_window_secs = 60
//! ```

use postern_plugin_sdk::types::{Decision, Session};
use postern_plugin_sdk::{config_list, config_or, debug, ip_in, kv, now_ms, tempfail};

postern_plugin_sdk::plugin!(Greylist, version = "0.1.0");

struct Greylist;

fn exempt(session: &Session) -> bool {
    session.user.is_some()
        || config_list("whitelist_networks")
            .iter()
            .any(|net| ip_in(&session.peer_ip, net))
}

/// The client's network: /24 for IPv4, /64 for IPv6.
fn network(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => ip.to_string(),
    }
}

fn over_limit(key: &str, limit: i64, window: u64) -> bool {
    limit > 0 && kv::increment(key, 1, Some(window)) > limit
}

impl exports::postern::plugin0_1_0::mail_from::Guest for Greylist {
    fn on_mail_from(session: Session, sender: String, _size: u64) -> Decision {
        if session.user.is_some() {
            return Decision::Continue;
        }
        let window = config_or("rate_window_secs", 60u64).max(1);
        let slot = now_ms() / 1000 / window;
        if over_limit(
            &format!("rate-ip:{}:{slot}", session.peer_ip),
            config_or("ip_limit", 0i64),
            window,
        ) {
            return tempfail(
                451,
                "4.7.1",
                "Too many messages from your address, slow down",
            );
        }
        let sender = sender.to_lowercase();
        if !sender.is_empty()
            && over_limit(
                &format!("rate-sender:{sender}:{slot}"),
                config_or("sender_limit", 0i64),
                window,
            )
        {
            return tempfail(
                451,
                "4.7.1",
                "Too many messages from this sender, slow down",
            );
        }
        Decision::Continue
    }
}

impl exports::postern::plugin0_1_0::rcpt::Guest for Greylist {
    fn on_rcpt(session: Session, sender: String, recipient: String, _local: bool) -> Decision {
        if exempt(&session) {
            return Decision::Continue;
        }
        let triplet = format!(
            "{}|{}|{}",
            network(&session.peer_ip),
            sender.to_lowercase(),
            recipient.to_lowercase()
        );
        let passed_key = format!("pass:{triplet}");
        if kv::get(&passed_key).is_some() {
            return Decision::Continue;
        }
        let delay_ms = config_or("delay_secs", 300u64) * 1000;
        let window = config_or("retry_window_secs", 4 * 3600u64);
        let seen_key = format!("seen:{triplet}");
        let now = now_ms();
        let first = kv::get(&seen_key)
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok());
        match first {
            Some(first) if now.saturating_sub(first) >= delay_ms => {
                kv::set(
                    &passed_key,
                    b"1",
                    Some(config_or("pass_ttl_secs", 35 * 86400u64)),
                );
                let _ = kv::delete(&seen_key);
                debug(&format!("greylist passed {triplet}"));
                Decision::Continue
            }
            Some(first) => {
                let wait = (delay_ms - now.saturating_sub(first)).div_ceil(1000);
                tempfail(
                    451,
                    "4.7.1",
                    &format!("Greylisted, please try again in {wait} seconds"),
                )
            }
            None => {
                kv::set(&seen_key, now.to_string().as_bytes(), Some(window));
                debug(&format!("greylisted {triplet}"));
                tempfail(451, "4.7.1", "Greylisted, please try again later")
            }
        }
    }
}
