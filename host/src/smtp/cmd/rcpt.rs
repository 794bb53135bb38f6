//! RCPT TO (RFC 5321 §4.1.1.3) and the relay policy.
//!
//! Mail for local domains is accepted from anyone, for known users only (550 5.1.1 otherwise).
//! Mail for any other domain is relayed only for authenticated users and trusted networks; everyone
//! else gets 550 5.7.1. The decision looks at the domain after the last '@' only, so percent hacks,
//! source routes (stripped by the parser, RFC 5321 §4.1.1.3) and quoted local parts cannot make a
//! remote address look local. Plugins run after this policy and can only narrow it.

use std::borrow::Cow;

use smtp_proto::RcptTo;

use crate::address::Address;
use std::sync::Arc;

use crate::plugin::Hook;
use crate::queue::{Notify, Recipient, Route};
use crate::smtp::reply::{common, Reply};
use crate::smtp::session::{Phase, Session};
use crate::smtp::SmtpServer;

impl Session {
    /// Where mail for `address` goes, or the reply refusing it.
    pub fn route_for(&self, address: &Address) -> Result<Route, Reply> {
        let config = &self.server.config;
        let domain = address.domain_lower();
        if self.server.users.is_local_domain(&domain) {
            return match self.server.users.resolve(address) {
                Some(mailbox) => Ok(Route::Local { mailbox }),
                None => Err(Reply::new(
                    550,
                    "5.1.1",
                    "Mailbox unavailable: no such user",
                )),
            };
        }
        if self.auth.is_some() || config.is_trusted_network(self.peer.ip()) {
            Ok(Route::Remote)
        } else {
            Err(Reply::new(550, "5.7.1", "Relaying denied"))
        }
    }

    pub async fn cmd_rcpt(&mut self, to: RcptTo<Cow<'_, str>>, line: &[u8]) -> Reply {
        let config = self.server.config.clone();
        let Phase::Transaction(tx) = &mut self.phase else {
            return common::bad_sequence("Need MAIL before RCPT");
        };
        tx.rcpt_attempts += 1;
        if tx.recipients.len() + tx.merged_rcpts >= config.limits.max_recipients {
            return Reply::new(452, "4.5.3", "Too many recipients");
        }
        let raw = to.address.to_string();
        let Some((notify, orcpt)) = dsn_of(&to) else {
            return Reply::new(
                501,
                "5.5.4",
                "NOTIFY=NEVER cannot be combined with other values",
            );
        };
        if !raw.is_ascii() && !tx.smtputf8 {
            return Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
        }
        let sender = tx.sender.clone();
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
        let route = match self.route_for(&address) {
            Ok(route) => route,
            Err(reply) => return reply,
        };
        if let Route::Local { mailbox } = &route {
            if let Some(reply) = over_quota(self.server.clone(), mailbox.clone()).await {
                return reply;
            }
        }
        let recipient = address.to_string();
        // One copy per mailbox: RCPT TO the same mailbox again (by any case, or through an
        // alias) is answered 250 as Postfix does, and merged, so fifty RCPTs of one address do
        // not store fifty copies.
        if let Phase::Transaction(tx) = &mut self.phase {
            if tx
                .recipients
                .iter()
                .any(|r| same_destination(r, &recipient, &route))
            {
                tx.merged_rcpts += 1;
                return Reply::new(250, "2.1.5", "Recipient OK (duplicate merged)");
            }
        }
        let local = matches!(route, Route::Local { .. });
        let hook = Hook::Rcpt {
            sender: &sender,
            recipient: &recipient,
            local,
        };
        if let Some(reply) = self.consult(hook).await {
            return reply;
        }
        if let Phase::Transaction(tx) = &mut self.phase {
            let mut recipient = Recipient::new(recipient, route);
            recipient.notify = notify;
            recipient.orcpt = orcpt;
            tx.recipients.push(recipient);
        }
        Reply::new(250, "2.1.5", "Recipient OK")
    }
}

/// RCPT's NOTIFY and ORCPT (RFC 3461 §4.1, §4.2); smtp-proto has checked their syntax
/// (`rfc822;` addresses only, xtext decoded) except that NEVER stands alone: None when not.
fn dsn_of(to: &RcptTo<Cow<'_, str>>) -> Option<(Option<Notify>, Option<String>)> {
    use smtp_proto::{
        RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS,
    };
    let flags = to.flags;
    let given = RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY | RCPT_NOTIFY_NEVER;
    let notify = (flags & given != 0).then_some(Notify {
        success: flags & RCPT_NOTIFY_SUCCESS != 0,
        failure: flags & RCPT_NOTIFY_FAILURE != 0,
        delay: flags & RCPT_NOTIFY_DELAY != 0,
    });
    if flags & RCPT_NOTIFY_NEVER != 0 && flags & (given & !RCPT_NOTIFY_NEVER) != 0 {
        return None;
    }
    Some((notify, to.orcpt.as_ref().map(|o| o.to_string())))
}

/// RFC 3463 X.2.2 (mailbox full): a local mailbox already at its quota takes no more mail, told
/// at RCPT so the sender's server keeps the message and retries (452, as Postfix and Dovecot's
/// LMTP answer). A message that arrives just under the quota is still taken whole.
async fn over_quota(server: Arc<SmtpServer>, mailbox: String) -> Option<Reply> {
    let quota = server.users.quota(&mailbox);
    let store = server.store.clone()?;
    if !quota.is_limited() {
        return None;
    }
    let used = tokio::task::spawn_blocking(move || store.usage(&mailbox))
        .await
        .ok()?
        .ok()?;
    (!quota.allows(used, 0, 1)).then(|| Reply::new(452, "4.2.2", "Mailbox full"))
}

/// Whether a recipient already in the transaction gets the same delivery as `address`: the
/// same local mailbox, or the same remote address (compared without case).
fn same_destination(known: &Recipient, address: &str, route: &Route) -> bool {
    match (&known.route, route) {
        (Route::Local { mailbox: a }, Route::Local { mailbox: b }) => a.eq_ignore_ascii_case(b),
        (Route::Remote, Route::Remote) => known.address.eq_ignore_ascii_case(address),
        _ => false,
    }
}
