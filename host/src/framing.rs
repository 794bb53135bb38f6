//! Sans-IO framing shared by the line protocols (SMTP, POP3, IMAP): command lines in, with a hard
//! cap so a peer can never make the server buffer an unbounded line; dot-stuffed bodies out.

use memchr::memchr;

/// One framed command line, or why there is none yet.
#[derive(Debug, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete line including its terminating LF.
    Line(Vec<u8>),
    /// A line longer than the limit ended; it was discarded.
    TooLong,
    /// Need more input.
    Incomplete,
}

/// Frames command lines (RFC 5321 §2.3.8: lines end in CRLF; bare LF is tolerated for commands).
#[derive(Debug)]
pub struct LineFramer {
    max_len: usize,
    /// Inside an overlong line: discard until its LF.
    discarding: bool,
}

impl LineFramer {
    pub fn new(max_len: usize) -> LineFramer {
        LineFramer {
            max_len,
            discarding: false,
        }
    }

    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> LineEvent {
        match memchr(b'\n', buf) {
            Some(pos) => {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                if self.discarding || line.len() > self.max_len {
                    self.discarding = false;
                    LineEvent::TooLong
                } else {
                    LineEvent::Line(line)
                }
            }
            None => {
                if buf.len() > self.max_len {
                    // Keep nothing of an overlong line: memory stays bounded by the read size.
                    buf.clear();
                    self.discarding = true;
                }
                LineEvent::Incomplete
            }
        }
    }
}

/// The message with every line ending as CRLF: a bare LF or a bare CR becomes CRLF. What we
/// relay must not carry a bare CR (or LF) that the next hop could read as a line end, the
/// whole "SMTP smuggling" family (2023); a message received by BDAT, or edited by a plugin, may.
pub fn crlf_line_ends(message: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let clean = !message.iter().enumerate().any(|(i, b)| match b {
        b'\r' => message.get(i + 1) != Some(&b'\n'),
        b'\n' => i == 0 || message[i - 1] != b'\r',
        _ => false,
    });
    if clean {
        return std::borrow::Cow::Borrowed(message);
    }
    let mut out = Vec::with_capacity(message.len() + message.len() / 32);
    let mut i = 0;
    while i < message.len() {
        match message[i] {
            b'\r' if message.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            other => out.push(other),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// Writes a dot-terminated body (POP3 multi-line replies, RFC 1939 §3; SMTP DATA, RFC 5321
/// §4.5.2): a line starting with `.` gets another, the body ends with CRLF even if the message
/// did not, then the terminating `.` line. Fed in pieces, so a large message can be sent a
/// chunk at a time.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    last: u8,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            last: b'\n',
        }
    }
}

impl DotStuffer {
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + 16);
        let mut rest = input;
        while !rest.is_empty() {
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            match memchr::memchr(b'\n', rest) {
                Some(pos) => {
                    out.extend_from_slice(&rest[..=pos]);
                    rest = &rest[pos + 1..];
                    self.at_line_start = true;
                }
                None => {
                    out.extend_from_slice(rest);
                    rest = &[];
                    self.at_line_start = false;
                }
            }
        }
        if let Some(last) = input.last() {
            self.last = *last;
        }
    }

    pub fn finish(self, out: &mut Vec<u8>) {
        if self.last != b'\n' {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_become_crlf() {
        assert!(matches!(
            crlf_line_ends(b"a\r\nb\r\n"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            &*crlf_line_ends(b"a\r.\rb\nc\r\n\r"),
            b"a\r\n.\r\nb\r\nc\r\n\r\n"
        );
    }

    #[test]
    fn framer_caps_line_length_and_resyncs() {
        let mut f = LineFramer::new(16);
        let mut buf = b"NOOP\r\n".to_vec();
        assert_eq!(f.next_line(&mut buf), LineEvent::Line(b"NOOP\r\n".to_vec()));
        buf.extend_from_slice(&[b'A'; 40]);
        assert_eq!(f.next_line(&mut buf), LineEvent::Incomplete);
        assert!(buf.is_empty(), "overlong input is not kept");
        buf.extend_from_slice(b"AAAA\r\nQUIT\r\n");
        assert_eq!(f.next_line(&mut buf), LineEvent::TooLong);
        assert_eq!(f.next_line(&mut buf), LineEvent::Line(b"QUIT\r\n".to_vec()));
        assert_eq!(f.next_line(&mut buf), LineEvent::Incomplete);
    }
}
