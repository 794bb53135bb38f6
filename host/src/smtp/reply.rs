//! SMTP replies as typed values (RFC 5321 §4.2) with enhanced status codes (RFC 3463, RFC 2034).

use std::borrow::Cow;
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status (`"5.7.1"`); empty for replies that do not carry one (220, 221, 354, EHLO).
    pub status: Cow<'static, str>,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, status: impl Into<Cow<'static, str>>, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: status.into(),
            lines: vec![text.into()],
        }
    }

    pub fn multiline(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            status: Cow::Borrowed(""),
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// 421 replies close the connection (RFC 5321 §3.8).
    pub fn closes_connection(&self) -> bool {
        self.code == 421 || self.code == 221
    }

    /// Renders the reply; each line is `code-` except the last, which is `code `.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut text = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // A reply line must not carry a bare CR or LF from anywhere (config, plugin, peer).
            let line: String = line.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            if self.status.is_empty() {
                let _ = write!(text, "{}{}{}\r\n", self.code, sep, line);
            } else {
                let _ = write!(text, "{}{}{} {}\r\n", self.code, sep, self.status, line);
            }
        }
        if self.lines.is_empty() {
            let _ = write!(text, "{} {}\r\n", self.code, self.status);
        }
        out.extend_from_slice(text.as_bytes());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

/// The replies the session uses in more than one place, so their wording stays consistent.
pub mod common {
    use super::Reply;

    pub fn ok() -> Reply {
        Reply::new(250, "2.0.0", "OK")
    }
    pub fn bad_sequence(text: &str) -> Reply {
        Reply::new(503, "5.5.1", text)
    }
    pub fn syntax(text: &str) -> Reply {
        Reply::new(501, "5.5.4", text)
    }
    pub fn line_too_long() -> Reply {
        Reply::new(500, "5.5.2", "Line too long")
    }
    pub fn too_many_errors() -> Reply {
        Reply::new(421, "4.7.0", "Too many errors, closing connection")
    }
    pub fn timeout() -> Reply {
        Reply::new(421, "4.4.2", "Timeout, closing connection")
    }
    pub fn shutting_down() -> Reply {
        Reply::new(421, "4.3.2", "Server shutting down, try again later")
    }
    pub fn storage_full() -> Reply {
        Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
    }
    pub fn local_error() -> Reply {
        Reply::new(451, "4.3.0", "Local error in processing, try again later")
    }
    pub fn message_too_big() -> Reply {
        Reply::new(552, "5.3.4", "Message too big for system")
    }
    pub fn tls_required() -> Reply {
        Reply::new(
            538,
            "5.7.11",
            "Encryption required for requested authentication mechanism",
        )
    }
    pub fn auth_required() -> Reply {
        Reply::new(530, "5.7.0", "Authentication required")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_single_and_multi_line() {
        assert_eq!(
            Reply::new(250, "2.1.0", "Sender OK").to_bytes(),
            b"250 2.1.0 Sender OK\r\n"
        );
        let ehlo = Reply::multiline(
            250,
            vec!["host".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(
            ehlo.to_bytes(),
            b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n".to_vec()
        );
    }

    #[test]
    fn strips_line_breaks_from_text() {
        let reply = Reply::new(550, "5.7.1", "no\r\n250 injected");
        assert_eq!(reply.to_bytes(), b"550 5.7.1 no250 injected\r\n");
    }
}
