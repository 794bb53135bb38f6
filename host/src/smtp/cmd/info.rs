//! HELP, VRFY and EXPN. Without a policy plugin VRFY and EXPN reveal nothing: address harvesting
//! is their main use. A plugin exporting the vrfy or expn hook decides what to answer.

use crate::plugin::Hook;
use crate::smtp::reply::Reply;
use crate::smtp::session::Session;

impl Session {
    pub fn cmd_help() -> Reply {
        Reply {
            code: 214,
            status: "2.0.0".into(),
            lines: vec![
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY EXPN STARTTLS AUTH"
                    .into(),
                "See RFC 5321".into(),
            ],
        }
    }

    pub async fn cmd_vrfy(&mut self, query: &str) -> Reply {
        match self.consult_lookup(Hook::Vrfy(query)).await {
            Some(reply) => reply,
            None => Self::default_vrfy(),
        }
    }

    pub async fn cmd_expn(&mut self, list: &str) -> Reply {
        match self.consult_lookup(Hook::Expn(list)).await {
            Some(reply) => reply,
            None => Self::default_expn(),
        }
    }

    /// RFC 5321 §3.5.3: 252 says "cannot verify, but will try to deliver".
    pub fn default_vrfy() -> Reply {
        Reply::new(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }

    pub fn default_expn() -> Reply {
        Reply::new(502, "5.5.1", "EXPN not available")
    }
}
