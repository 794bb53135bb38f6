//! HELO and EHLO (RFC 5321 §4.1.1.1): greet, reset any transaction, list extensions.

use crate::plugin::Hook;
use crate::smtp::reply::Reply;
use crate::smtp::session::{Helo, Phase, Session};

impl Session {
    pub async fn cmd_hello(&mut self, host: &str, extended: bool) -> Reply {
        // The name ends up in Received headers: keep it to printable ASCII without spaces.
        let name: String = host
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        if name.is_empty() {
            let verb = if extended { "EHLO" } else { "HELO" };
            return Reply::new(501, "5.5.4", format!("Syntax: {verb} hostname"));
        }
        if let Some(plugins) = self.plugins.as_mut() {
            plugins.refresh();
        }
        if let Some(reply) = self
            .consult(Hook::Helo {
                name: &name,
                extended,
            })
            .await
        {
            return reply;
        }
        // RFC 5321 §4.1.4: EHLO/HELO in the middle of a transaction resets it.
        self.phase = Phase::Idle;
        self.helo = Some(Helo { name, extended });
        let hostname = &self.server.config.server.hostname;
        if !extended {
            return Reply::new(250, "", format!("{hostname} Hello"));
        }
        let mut lines = vec![
            format!("{hostname} Hello {}", self.peer.ip()),
            "PIPELINING".into(),
            format!("SIZE {}", self.server.config.limits.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
            "DSN".into(),
        ];
        // RFC 8689 §2: offered only once the session is protected.
        if self.tls.is_some() {
            lines.push("REQUIRETLS".into());
        }
        if self.starttls_available() {
            lines.push("STARTTLS".into());
        }
        if self.auth_allowed() && self.auth.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        Reply::multiline(250, lines)
    }
}
