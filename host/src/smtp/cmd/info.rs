//! HELP, VRFY and EXPN. VRFY and EXPN reveal nothing: address harvesting is their main use.

use crate::smtp::reply::Reply;
use crate::smtp::session::Session;

impl Session {
    pub fn cmd_help() -> Reply {
        Reply {
            code: 214,
            status: "2.0.0",
            lines: vec![
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY EXPN STARTTLS AUTH"
                    .into(),
                "See RFC 5321".into(),
            ],
        }
    }

    /// RFC 5321 §3.5.3: 252 says "cannot verify, but will try to deliver".
    pub fn cmd_vrfy() -> Reply {
        Reply::new(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }

    pub fn cmd_expn() -> Reply {
        Reply::new(502, "5.5.1", "EXPN not available")
    }
}
