//! MAIL FROM (RFC 5321 §4.1.1.2) with SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8
//! (RFC 6531), RET and ENVID (DSN, RFC 3461 §4.3, §4.4) and REQUIRETLS (RFC 8689 §4.1).

use smtp_proto::MailFrom;

use crate::address::Address;
use crate::plugin::Hook;
use crate::queue::{Dsn, Ret};
use crate::smtp::reply::{common, Reply};
use crate::smtp::session::{Phase, Session, Transaction};

impl Session {
    pub async fn cmd_mail(&mut self, from: MailFrom<std::borrow::Cow<'_, str>>) -> Reply {
        match self.phase {
            Phase::Greeting => return common::bad_sequence("Send HELO/EHLO first"),
            Phase::Transaction(_) => return common::bad_sequence("Nested MAIL command"),
            Phase::Idle => {}
        }
        if self.is_submission() && self.auth.is_none() {
            return common::auth_required();
        }
        let limit = self.server.config.limits.max_message_size;
        if from.size > limit {
            return Reply::new(
                552,
                "5.3.4",
                format!("Message size exceeds fixed limit of {limit} bytes"),
            );
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return Reply::new(555, "5.5.4", "BODY=BINARYMIME is not supported");
        }
        // RFC 8689 §2: REQUIRETLS is offered only over TLS, so it means nothing on a session
        // without it; refused rather than ignored, since the sender asked for protection.
        let require_tls = from.flags & smtp_proto::MAIL_REQUIRETLS != 0;
        if require_tls && self.tls.is_none() {
            return Reply::new(530, "5.7.10", "REQUIRETLS needs a TLS session");
        }
        let dsn = Dsn {
            ret: if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
                Some(Ret::Full)
            } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
                Some(Ret::Hdrs)
            } else {
                None
            },
            envid: from.env_id.as_ref().map(|e| e.to_string()),
        };
        let sender = from.address.to_string();
        if !sender.is_ascii() && !smtputf8 {
            return Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
        }
        if !sender.is_empty() && Address::parse(&sender).is_none() {
            return Reply::new(501, "5.1.7", "Invalid sender address");
        }
        // An authenticated user sends only as itself, whichever listener it logged in on: AUTH
        // on port 25 is no way around the submission rule (Postfix's
        // reject_sender_login_mismatch, Stalwart's default).
        if let (Some(owner), true) = (
            &self.auth,
            self.server.config.relay.authenticated_sender_must_match,
        ) {
            let owned = Address::parse(&sender)
                .and_then(|a| self.server.users.resolve(&a))
                .is_some_and(|key| key == owner.0);
            if !owned {
                return Reply::new(
                    553,
                    "5.7.1",
                    "Sender address is not owned by the authenticated user",
                );
            }
        }
        if let Some(plugins) = self.plugins.as_mut() {
            // A new transaction starts on the newest plugin versions.
            plugins.refresh();
        }
        let hook = Hook::MailFrom {
            sender: &sender,
            size: from.size as u64,
        };
        if let Some(reply) = self.consult(hook).await {
            return reply;
        }
        self.phase = Phase::Transaction(Transaction {
            id: self.server.queue.new_id(),
            sender,
            smtputf8,
            dsn,
            require_tls,
            recipients: Vec::new(),
            rcpt_attempts: 0,
            merged_rcpts: 0,
            chunks: None,
        });
        Reply::new(250, "2.1.0", "Sender OK")
    }
}
