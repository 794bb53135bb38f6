//! Sans-IO command-line framing shared by the line protocols (SMTP, POP3, IMAP): bytes in, lines
//! out, with a hard cap so a peer can never make the server buffer an unbounded line.

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

#[cfg(test)]
mod tests {
    use super::*;

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
