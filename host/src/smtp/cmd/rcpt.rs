//! RCPT TO (RFC 5321 §4.1.1.3) and the relay policy.
//!
//! Mail for local domains is accepted from anyone, for known users only (550 5.1.1 otherwise).
//! Mail for any other domain is relayed only for authenticated users and trusted networks; everyone
//! else gets 550 5.7.1. The decision looks at the domain after the last '@' only, so percent hacks,
//! source routes (stripped by the parser, RFC 5321 §4.1.1.3) and quoted local parts cannot make a
//! remote address look local.

use std::borrow::Cow;

use smtp_proto::RcptTo;

use crate::address::Address;
use crate::queue::{Recipient, Route};
use crate::smtp::reply::{common, Reply};
use crate::smtp::session::{Phase, Session};

impl Session {
    pub fn cmd_rcpt(&mut self, to: RcptTo<Cow<'_, str>>, line: &[u8]) -> Reply {
        // Field borrows: the transaction is changed while the server's tables are read.
        let server = &self.server;
        let config = &server.config;
        let relay_allowed = self.auth.is_some() || config.is_trusted_network(self.peer.ip());
        let Phase::Transaction(tx) = &mut self.phase else {
            return common::bad_sequence("Need MAIL before RCPT");
        };
        tx.rcpt_attempts += 1;
        if tx.recipients.len() >= config.limits.max_recipients {
            return Reply::new(452, "4.5.3", "Too many recipients");
        }
        let raw = to.address.to_string();
        if !raw.is_ascii() && !tx.smtputf8 {
            return Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
        }
        // The parser maps <postmaster> (no domain, RFC 5321 §4.5.1) to an empty address.
        let address = if raw.is_empty() {
            if !String::from_utf8_lossy(line)
                .to_ascii_lowercase()
                .contains("postmaster")
            {
                return Reply::new(501, "5.1.3", "Invalid recipient address");
            }
            Address {
                local: "postmaster".into(),
                domain: config.relay.local_domains[0].clone(),
            }
        } else {
            match Address::parse(&raw) {
                Some(address) => address,
                None => return Reply::new(501, "5.1.3", "Invalid recipient address"),
            }
        };
        let domain = address.domain_lower();
        let is_local = config
            .relay
            .local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&domain));
        let route = if is_local {
            match server.users.resolve(&address) {
                Some(mailbox) => Route::Local { mailbox },
                None => return Reply::new(550, "5.1.1", "Mailbox unavailable: no such user"),
            }
        } else if relay_allowed {
            Route::Remote
        } else {
            return Reply::new(550, "5.7.1", "Relaying denied");
        };
        tx.recipients.push(Recipient {
            address: address.to_string(),
            route,
        });
        Reply::new(250, "2.1.5", "Recipient OK")
    }
}
