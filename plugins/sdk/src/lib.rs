//! Guest SDK for Postern plugins in Rust.
//!
//! The SDK binds the host's capabilities (`log`, `config`, `kv`, `clock`, `directory`, `dns`) and
//! the shared types once, for both WIT versions; a plugin crate binds only the hooks it exports,
//! with one line and a `wit/world.wit` (`postern plugin new` writes both):
//!
//! ```ignore
//! // wit/world.wit:
//! //   package my:filter;
//! //   world filter {
//! //       include postern:plugin/host-api@0.2.0;
//! //       export postern:plugin/rcpt@0.1.0;
//! //   }
//! struct Filter;
//! postern_plugin_sdk::plugin!(Filter);
//!
//! impl exports::postern::plugin0_1_0::rcpt::Guest for Filter {
//!     fn on_rcpt(session: Session, sender: String, rcpt: String, local: bool) -> Decision {
//!         Decision::Continue
//!     }
//! }
//! ```
//!
//! Helpers here build decisions and replies, read typed config values and log.

wit_bindgen::generate!({
    // Both versions' capabilities: 0.2.0's host-api, and 0.1.0's kv for plugins built on 0.1.0.
    inline: "package postern:sdk;
        world sdk {
            include postern:plugin/host-api@0.2.0;
            import postern:plugin/kv@0.1.0;
        }",
    path: "../../wit",
    pub_export_macro: true,
    generate_all,
});

pub use postern::plugin0_1_0::{clock, config, directory, dns, kv, log, types};

/// The bindings generator the [`plugin!`] macro runs (a plugin crate need not depend on it).
pub use wit_bindgen;

/// Binds a plugin's world and exports the type that implements its hooks:
///
/// ```ignore
/// struct MyFilter;
/// postern_plugin_sdk::plugin!(MyFilter);
///
/// impl exports::postern::plugin0_1_0::rcpt::Guest for MyFilter { ... }
/// ```
///
/// The world is the crate's `wit/` folder (or `wit = "folder"`, relative to the crate): one `world.wit` that includes `postern:plugin/host-api@0.2.0` (or `@0.1.0`) and
/// exports the hooks the plugin implements, and `wit/deps/` holding the Postern packages.
/// `postern plugin new` writes all of it. A world of 0.1.0 says so:
/// `plugin!(MyFilter, version = "0.1.0")`. The shared types and the capabilities are this SDK's,
/// so every plugin speaks the same types and the SDK's helpers work on them.
#[macro_export]
macro_rules! plugin {
    ($plugin:ident) => {
        $crate::plugin!($plugin, wit = "wit");
    };
    ($plugin:ident, wit = $wit:literal) => {
        $crate::plugin!(@bind $plugin, $wit, "postern:plugin/kv@0.2.0": postern_plugin_sdk::v2::kv);
    };
    // A world of the first version (`host-api@0.1.0`, whose kv traps on errors).
    ($plugin:ident, version = "0.1.0") => {
        $crate::plugin!($plugin, version = "0.1.0", wit = "wit");
    };
    ($plugin:ident, version = "0.1.0", wit = $wit:literal) => {
        $crate::plugin!(@bind $plugin, $wit, "postern:plugin/kv@0.1.0": postern_plugin_sdk::kv);
    };
    // wit-bindgen refuses a mapping its world does not use, so the one kv differs by version.
    (@bind $plugin:ident, $wit:literal, $kv:literal: $kv_module:path) => {
        $crate::wit_bindgen::generate!({
            path: $wit,
            runtime_path: "postern_plugin_sdk::wit_bindgen::rt",
            with: {
                "postern:plugin/types@0.1.0": postern_plugin_sdk::types,
                "postern:plugin/log@0.1.0": postern_plugin_sdk::log,
                "postern:plugin/config@0.1.0": postern_plugin_sdk::config,
                "postern:plugin/clock@0.1.0": postern_plugin_sdk::clock,
                "postern:plugin/directory@0.1.0": postern_plugin_sdk::directory,
                "postern:plugin/dns@0.1.0": postern_plugin_sdk::dns,
                $kv: $kv_module,
            },
        });
        self::export!($plugin);
    };
}

/// What WIT 0.2.0 adds to the capabilities.
pub mod v2 {
    /// `kv` with errors as results (`postern:plugin/kv@0.2.0`).
    pub use crate::postern::plugin0_2_0::kv;
}
use types::{Decision, Reply};

/// Builds a reply.
pub fn reply(code: u16, enhanced: &str, text: &str) -> Reply {
    Reply {
        code,
        enhanced: enhanced.to_string(),
        text: text.to_string(),
    }
}

/// `reject` with a 5xx reply.
pub fn reject(code: u16, enhanced: &str, text: &str) -> Decision {
    Decision::Reject(reply(code, enhanced, text))
}

/// `tempfail` with a 4xx reply.
pub fn tempfail(code: u16, enhanced: &str, text: &str) -> Decision {
    Decision::Tempfail(reply(code, enhanced, text))
}

/// A config value parsed as `T` (numbers, booleans), or `default`.
pub fn config_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    config::get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A config value that is a TOML array of strings (`["a", 'b\c']`), or empty. Basic strings
/// have their escapes decoded; literal strings are taken as they are.
pub fn config_list(key: &str) -> Vec<String> {
    config::get(key)
        .map(|text| parse_string_array(&text))
        .unwrap_or_default()
}

/// A config value that is an array of numbers or booleans (`[1.5, 2]`), each parsed as `T`;
/// items that do not parse are skipped.
pub fn config_values<T: std::str::FromStr>(key: &str) -> Vec<T> {
    config::get(key)
        .map(|text| {
            items(text.trim().trim_start_matches('[').trim_end_matches(']'))
                .iter()
                .filter_map(|item| item.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A config value that is a table (`[plugin.config.weights]`, or `weights = { a = 1.5 }`), as
/// (key, value) pairs in key order: each value as `config::get` gives a value, a string without
/// its quotes and anything else as TOML text, to be parsed with `str::parse`,
/// [`parse_string_array`] or [`parse_table`] again. Empty when the key is absent.
pub fn config_table(key: &str) -> Vec<(String, String)> {
    config::get(key)
        .map(|text| parse_table(&text))
        .unwrap_or_default()
}

/// Parses a TOML inline table as the host renders one (`{ a = 1, "b.c" = "x", d = [1, 2] }`).
pub fn parse_table(text: &str) -> Vec<(String, String)> {
    let inner = text.trim();
    let inner = inner.strip_prefix('{').unwrap_or(inner);
    let inner = inner.strip_suffix('}').unwrap_or(inner);
    items(inner)
        .into_iter()
        .filter_map(|entry| {
            let (key, value) = split_top(entry, '=')?;
            Some((unquote(key.trim()), unquote(value.trim())))
        })
        .collect()
}

/// A TOML string token without its quotes (escapes decoded), or the text as it is.
fn unquote(token: &str) -> String {
    let quoted = (token.starts_with('"') && token.ends_with('"') && token.len() >= 2)
        || (token.starts_with('\'') && token.ends_with('\'') && token.len() >= 2);
    if quoted {
        parse_string_array(token).pop().unwrap_or_default()
    } else {
        token.to_string()
    }
}

/// The comma-separated items of an array's or inline table's inside, at the top level only
/// (commas inside strings, arrays and tables stay in their item).
fn items(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((item, after)) = split_top(rest, ',') {
        if !item.trim().is_empty() {
            out.push(item);
        }
        rest = after;
    }
    if !rest.trim().is_empty() {
        out.push(rest);
    }
    out
}

/// Splits at the first `sep` outside strings and brackets.
fn split_top(text: &str, sep: char) -> Option<(&str, &str)> {
    let (mut depth, mut quote, mut escaped) = (0usize, None::<char>, false);
    for (i, c) in text.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => quote = Some(c),
                '[' | '{' => depth += 1,
                ']' | '}' => depth = depth.saturating_sub(1),
                c if c == sep && depth == 0 => return Some((&text[..i], &text[i + 1..])),
                _ => {}
            },
        }
    }
    None
}

/// Parses a TOML array of strings as the host renders it; other values are skipped.
pub fn parse_string_array(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.trim().trim_start_matches('[').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some('r') => value.push('\r'),
                            Some('u') => {
                                let hex: String = chars.by_ref().take(4).collect();
                                if let Some(ch) =
                                    u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)
                                {
                                    value.push(ch);
                                }
                            }
                            Some(other) => value.push(other),
                            None => break,
                        },
                        other => value.push(other),
                    }
                }
                out.push(value);
            }
            '\'' => out.push(chars.by_ref().take_while(|c| *c != '\'').collect()),
            _ => {}
        }
    }
    out
}

pub fn info(message: &str) {
    log::log(log::Level::Info, message);
}

pub fn debug(message: &str) {
    log::log(log::Level::Debug, message);
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    clock::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_arrays() {
        assert_eq!(
            parse_string_array(r#"["a", "b, c", 'd\e', "q\"x\n"]"#),
            vec!["a", "b, c", "d\\e", "q\"x\n"]
        );
        assert!(parse_string_array("[]").is_empty());
    }

    #[test]
    fn tables_and_arrays_of_values() {
        assert_eq!(
            parse_table(r#"{ a = 1.5, "b.c" = "x, y", d = [1, 2], e = { f = true }, 'g' = 'h' }"#),
            vec![
                ("a".to_string(), "1.5".to_string()),
                ("b.c".to_string(), "x, y".to_string()),
                ("d".to_string(), "[1, 2]".to_string()),
                ("e".to_string(), "{ f = true }".to_string()),
                ("g".to_string(), "h".to_string()),
            ]
        );
        assert_eq!(
            parse_table(r#"{ q = "say \"hi\", ok" }"#)[0].1,
            "say \"hi\", ok"
        );
        assert!(parse_table("{}").is_empty());
        let inner = "1, 2.5 , x, 3";
        let numbers: Vec<f64> = items(inner)
            .iter()
            .filter_map(|i| i.trim().parse().ok())
            .collect();
        assert_eq!(numbers, vec![1.0, 2.5, 3.0]);
    }

    #[test]
    fn dnsbl_names() {
        assert_eq!(
            dnsbl_name("192.0.2.1", "zen.test.").as_deref(),
            Some("1.2.0.192.zen.test")
        );
        assert_eq!(dnsbl_name("2001:db8::1", "zen.test"), None);
    }

    #[test]
    fn cidr_matching() {
        assert!(ip_in("192.0.2.77", "192.0.2.0/24"));
        assert!(!ip_in("192.0.3.1", "192.0.2.0/24"));
        assert!(ip_in("2001:db8::1", "2001:db8::/32"));
        assert!(ip_in("127.0.0.1", "127.0.0.1"));
        assert!(!ip_in("127.0.0.1", "::1"));
    }
}

/// The DNSBL query name for an IPv4 address in a zone (`192.0.2.1` in `zen.test` →
/// `1.2.0.192.zen.test`); None for IPv6 or non-addresses.
pub fn dnsbl_name(ip: &str, zone: &str) -> Option<String> {
    let v4: std::net::Ipv4Addr = ip.parse().ok()?;
    let o = v4.octets();
    Some(format!(
        "{}.{}.{}.{}.{}",
        o[3],
        o[2],
        o[1],
        o[0],
        zone.trim_end_matches('.')
    ))
}

/// Whether `ip` (text) is inside `cidr` (`192.0.2.0/24`, `2001:db8::/32`, or a bare address).
pub fn ip_in(ip: &str, cidr: &str) -> bool {
    let (net, bits) = match cidr.split_once('/') {
        Some((net, bits)) => (net, bits.parse::<u32>().ok()),
        None => (cidr, None),
    };
    match (
        ip.parse::<std::net::IpAddr>(),
        net.parse::<std::net::IpAddr>(),
    ) {
        (Ok(std::net::IpAddr::V4(a)), Ok(std::net::IpAddr::V4(n))) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (Ok(std::net::IpAddr::V6(a)), Ok(std::net::IpAddr::V6(n))) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}
