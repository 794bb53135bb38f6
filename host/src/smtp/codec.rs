//! Sans-IO SMTP input framing: bytes in, events out. No sockets here.
//!
//! The session reads into one buffer and asks the receiver for its current phase to take what it
//! can: a command line ([`crate::framing::LineFramer`]), a DATA body ([`DotDecoder`]) or a BDAT chunk
//! ([`ChunkReader`]). Each has a hard size cap and keeps consuming (discarding) past it, so a peer
//! can never make the server buffer more than the cap, and the stream stays in sync for the reply.

use memchr::memchr2;

pub use crate::framing::{LineEvent, LineFramer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotState {
    /// At the start of a line (the DATA command's CRLF counts as one).
    LineStart,
    /// At the start of a line that followed a bare LF: a dot here is data, never the end.
    BareLineStart,
    /// A '.' began the line.
    Dot,
    /// ".\r" began the line.
    DotCr,
    /// Inside a line.
    Mid,
    /// After a CR inside a line.
    Cr,
}

/// What feeding DATA bytes produced.
#[derive(Debug, PartialEq, Eq)]
pub struct DotProgress {
    /// Input bytes taken.
    pub consumed: usize,
    /// The terminating `CRLF.CRLF` was seen.
    pub done: bool,
}

/// Decodes a DATA body (RFC 5321 §4.5.2): removes dot-stuffing and finds the end.
///
/// Only `CRLF . CRLF` ends the body. A bare LF and a bare CR are normalized to CRLF, and
/// `LF . LF` or `CR . CR` do *not* end it: treating them as the end lets an attacker smuggle a
/// second message past filters that disagree about where the first one stops ("SMTP smuggling",
/// CVE-2023-51766 and kin). Normalizing the bare CR as well means no next hop is ever handed one
/// to misread (a line "." that follows is data, and is stuffed again if the message is relayed).
#[derive(Debug)]
pub struct DotDecoder {
    state: DotState,
    limit: usize,
    size: usize,
    overflow: bool,
}

impl DotDecoder {
    pub fn new(limit: usize) -> DotDecoder {
        DotDecoder {
            state: DotState::LineStart,
            limit,
            size: 0,
            overflow: false,
        }
    }

    /// True when the body went past the limit; what went past was discarded.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// Decoded size so far, including what was discarded past the limit.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Keeps bytes up to the limit and counts the rest, so what is kept never depends on how
    /// the input was split into reads (a fuzzing find: a run past the limit used to drop a
    /// whole run, keeping less or more by chunking).
    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.size);
        out.extend_from_slice(&bytes[..room.min(bytes.len())]);
        self.size += bytes.len();
        if self.size > self.limit {
            self.overflow = true;
        }
    }

    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> DotProgress {
        let mut i = 0;
        while i < input.len() {
            if self.state == DotState::Mid {
                // Fast path: copy the rest of the line in one go.
                match memchr2(b'\r', b'\n', &input[i..]) {
                    Some(off) => {
                        self.emit(out, &input[i..i + off]);
                        i += off;
                    }
                    None => {
                        self.emit(out, &input[i..]);
                        return DotProgress {
                            consumed: input.len(),
                            done: false,
                        };
                    }
                }
            }
            let byte = input[i];
            i += 1;
            self.state = match (self.state, byte) {
                (DotState::LineStart, b'.') => DotState::Dot,
                (DotState::DotCr, b'\n') => {
                    return DotProgress {
                        consumed: i,
                        done: true,
                    }
                }
                (DotState::Dot, b'\r') => DotState::DotCr,
                // ".X" is a stuffed dot: the first '.' is removed (RFC 5321 §4.5.2).
                (DotState::LineStart | DotState::Dot | DotState::Mid, b'\n')
                | (DotState::BareLineStart, b'\n') => {
                    self.emit(out, b"\r\n");
                    DotState::BareLineStart
                }
                // A CR not followed by LF ends its line as a CRLF would, but the line after it
                // starts like one after a bare LF; the byte is looked at again from there.
                (DotState::DotCr | DotState::Cr, other) if other != b'\n' => {
                    self.emit(
                        out,
                        if self.state == DotState::DotCr {
                            b"\r\n"
                        } else {
                            b"\n"
                        },
                    );
                    i -= 1;
                    DotState::BareLineStart
                }
                (DotState::Cr, b'\n') => {
                    self.emit(out, b"\n");
                    DotState::LineStart
                }
                (_, b'\r') => {
                    self.emit(out, b"\r");
                    DotState::Cr
                }
                (_, other) => {
                    self.emit(out, &[other]);
                    DotState::Mid
                }
            };
        }
        DotProgress {
            consumed: input.len(),
            done: false,
        }
    }
}

/// Reads exactly one BDAT chunk (RFC 3030): raw bytes, no stuffing, no terminator.
#[derive(Debug)]
pub struct ChunkReader {
    remaining: usize,
}

impl ChunkReader {
    pub fn new(size: usize) -> ChunkReader {
        ChunkReader { remaining: size }
    }

    /// Given `available` buffered bytes, returns how many of them belong to the chunk and
    /// whether the chunk is then complete. The caller takes those bytes off its buffer.
    pub fn feed(&mut self, available: usize) -> (usize, bool) {
        let take = self.remaining.min(available);
        self.remaining -= take;
        (take, self.remaining == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], chunk: usize) -> (Vec<u8>, bool, usize) {
        let mut dec = DotDecoder::new(1 << 20);
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in input.chunks(chunk) {
            let p = dec.feed(piece, &mut out);
            consumed += p.consumed;
            if p.done {
                return (out, true, consumed);
            }
        }
        (out, false, consumed)
    }

    #[test]
    fn what_is_kept_past_the_limit_does_not_depend_on_the_reads() {
        let body = b"Subject: x\r\n\r\n0123456789abcdef\r\nline two\r\n.\r\n";
        let whole = {
            let mut decoder = DotDecoder::new(20);
            let mut out = Vec::new();
            assert!(decoder.feed(body, &mut out).done);
            assert!(decoder.overflowed());
            out
        };
        assert_eq!(whole, b"Subject: x\r\n\r\n012345");
        for split in 1..body.len() {
            let mut decoder = DotDecoder::new(20);
            let mut out = Vec::new();
            let first = decoder.feed(&body[..split], &mut out);
            assert!(!first.done);
            assert!(decoder.feed(&body[split..], &mut out).done);
            assert_eq!(out, whole, "split at {split}");
        }
    }

    #[test]
    fn finds_end_and_unstuffs_in_any_chunking() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\nline\r\n.\r\nNEXT";
        for chunk in 1..input.len() {
            let (out, done, consumed) = decode_all(input, chunk);
            assert!(done, "chunk {chunk}");
            assert_eq!(
                out, b"Subject: x\r\n\r\n.leading dot\r\nline\r\n",
                "chunk {chunk}"
            );
            assert_eq!(consumed, input.len() - 4, "chunk {chunk}");
        }
    }

    #[test]
    fn bare_lf_dot_does_not_end_data() {
        for input in [
            &b"a\n.\nMAIL FROM:<x>\r\n"[..],
            b"a\r.\rb\r\n",
            b"a\n.\r\nb\r\n",
        ] {
            let (_, done, _) = decode_all(input, 3);
            assert!(!done, "{:?}", String::from_utf8_lossy(input));
        }
        // Bare CRs become CRLF, and a dot line after one is data.
        for chunk in 1..6 {
            let (out, done, _) = decode_all(b"a\r.\rb\r\r\n.\r\n", chunk);
            assert!(done, "chunk {chunk}");
            assert_eq!(out, b"a\r\n.\r\nb\r\n\r\n", "chunk {chunk}");
        }
        let (out, done, _) = decode_all(b".\rx\r\n.\r\n", 1);
        assert!(done);
        assert_eq!(out, b"\r\nx\r\n");
        let (out, done, _) = decode_all(b"a\nb\n.\r\n", 1);
        // "\n.\r\n" is a line "." preceded by a bare LF: only a CRLF before the dot ends DATA,
        // and the dot is kept as data (it is stuffed again if the message is relayed).
        assert!(!done);
        assert_eq!(out, b"a\r\nb\r\n.\r\n");
    }

    #[test]
    fn empty_body_ends_immediately() {
        let (out, done, _) = decode_all(b".\r\n", 1);
        assert!(done);
        assert!(out.is_empty());
    }

    #[test]
    fn overflow_discards_but_keeps_sync() {
        let mut dec = DotDecoder::new(10);
        let mut out = Vec::new();
        let p = dec.feed(b"0123456789ABCDEF\r\n.\r\nRSET\r\n", &mut out);
        assert!(p.done);
        assert!(dec.overflowed());
        assert!(out.len() <= 10);
        assert_eq!(p.consumed, 21);
    }

    #[test]
    fn chunk_reader_takes_exact_size() {
        let mut r = ChunkReader::new(5);
        assert_eq!(r.feed(3), (3, false));
        assert_eq!(r.feed(8), (2, true));
        assert_eq!(ChunkReader::new(0).feed(4), (0, true));
    }
}
