//! Mail addresses as the server compares them.
//!
//! Domains compare case-insensitively (RFC 5321 §2.4). Local parts are case-sensitive in theory,
//! but every mainstream server (Postfix, Dovecot, Stalwart) folds them for local users, and so do we:
//! `Alice@Example.TEST` reaches alice. Relay decisions use the domain only, so a case or Unicode trick
//! in the local part cannot turn a remote address into a local one.

use std::fmt;

/// A parsed `local@domain` address, both parts kept as given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Address {
    pub local: String,
    pub domain: String,
}

/// The separator between a user and a detail (`alice+lists@`), as in Postfix's recipient_delimiter.
pub const DETAIL_SEPARATOR: char = '+';

impl Address {
    /// Splits at the last `@`. Refuses empty parts, address literals (`user@[1.2.3.4]`: never a
    /// local domain here, so they can only ever be a relay attempt) and control characters.
    pub fn parse(text: &str) -> Option<Address> {
        let (local, domain) = text.rsplit_once('@')?;
        if local.is_empty() || domain.is_empty() || domain.starts_with('[') {
            return None;
        }
        if text.chars().any(|c| c.is_control() || c == ' ') && !local.starts_with('"') {
            return None;
        }
        if domain.contains(['@', '"', '%', '!', ':', ' ']) {
            return None;
        }
        Some(Address {
            local: local.to_string(),
            domain: domain.trim_end_matches('.').to_string(),
        })
    }

    pub fn domain_lower(&self) -> String {
        self.domain.to_lowercase()
    }

    /// The key a local user is looked up by: lower-cased, without a `+detail`.
    pub fn mailbox_key(&self) -> String {
        let base = self
            .local
            .split_once(DETAIL_SEPARATOR)
            .map(|(user, _)| user)
            .unwrap_or(&self.local);
        format!("{}@{}", base.to_lowercase(), self.domain_lower())
    }

    /// The whole address lower-cased (aliases match on this, with the detail kept).
    pub fn canonical(&self) -> String {
        format!("{}@{}", self.local.to_lowercase(), self.domain_lower())
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_detail_is_removed_for_lookup() {
        let a = Address::parse("Alice+News@Example.TEST").unwrap();
        assert_eq!(a.mailbox_key(), "alice@example.test");
        assert_eq!(a.canonical(), "alice+news@example.test");
    }

    #[test]
    fn relay_tricks_do_not_parse_as_local() {
        // An address literal never names a local domain.
        assert!(Address::parse("user@[127.0.0.1]").is_none());
        // The percent hack keeps the domain after the last '@'; the local part stays literal.
        let a = Address::parse("victim%remote.test@example.test").unwrap();
        assert_eq!(a.local, "victim%remote.test");
        assert_eq!(a.domain, "example.test");
        assert!(Address::parse("a@b@remote.test").is_some_and(|a| a.domain == "remote.test"));
        assert!(Address::parse("@example.test").is_none());
        assert!(Address::parse("user@").is_none());
    }

    #[test]
    fn trailing_dot_is_ignored() {
        assert_eq!(
            Address::parse("bob@example.test.").unwrap().domain,
            "example.test"
        );
    }
}
