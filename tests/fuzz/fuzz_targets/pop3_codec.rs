//! POP3 codec: command framing and parsing, TOP, and dot-stuffing of multi-line replies.
//! Checks that stuffing a stored (CRLF) message and undoing it as a client would gives the
//! message back, whatever the chunking.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use postern::framing::{DotStuffer, LineEvent, LineFramer};
use postern::pop3::codec::{parse, top, MAX_LINE};
use postern::smtp::codec::DotDecoder;

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"USER alice\r\n",
    b"PASS ",
    b"APOP alice ",
    b"AUTH PLAIN ",
    b"AUTH\r\n",
    b"STLS\r\n",
    b"CAPA\r\n",
    b"STAT\r\n",
    b"LIST ",
    b"RETR ",
    b"DELE ",
    b"NOOP\r\n",
    b"RSET\r\n",
    b"QUIT\r\n",
    b"TOP ",
    b"UIDL ",
    b"1",
    b"0",
    b"4294967296",
    b" ",
    b".",
    b"\r\n.\r\n",
    b"\r\n\r\n",
    b"Subject: x\r\n",
    b"\xff\xfe",
    b"\0",
];

/// A stored message is CRLF throughout: a lone CR or LF becomes CRLF.
fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            other => out.push(other),
        }
        i += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let reads = common::chunks(data, TOKENS);

    // Commands, as the session frames and parses them.
    let mut framer = LineFramer::new(MAX_LINE);
    let mut buf = Vec::new();
    for read in &reads {
        buf.extend_from_slice(read);
        loop {
            match framer.next_line(&mut buf) {
                LineEvent::Line(line) => {
                    assert!(line.len() <= MAX_LINE);
                    let _ = parse(&line);
                }
                LineEvent::TooLong => {}
                LineEvent::Incomplete => break,
            }
        }
        assert!(buf.len() <= MAX_LINE + read.len());
    }

    // The same bytes as a stored message: TOP and the dot-stuffed RETR answer.
    let message = crlf(&common::joined(&reads));
    for lines in [0, 1, 3, u32::MAX] {
        let head = top(&message, lines);
        assert!(message.starts_with(head));
    }
    let mut stuffer = DotStuffer::default();
    let mut wire = Vec::new();
    // Stuffing is fed the stored form in pieces of the same sizes as the reads.
    let mut offset = 0;
    for read in &reads {
        let end = (offset + read.len()).min(message.len());
        stuffer.feed(&message[offset..end], &mut wire);
        offset = end;
    }
    stuffer.feed(&message[offset..], &mut wire);
    stuffer.finish(&mut wire);

    let mut decoder = DotDecoder::new(usize::MAX);
    let mut decoded = Vec::new();
    let progress = decoder.feed(&wire, &mut decoded);
    assert!(progress.done, "the terminating dot line was not found");
    assert_eq!(progress.consumed, wire.len(), "bytes after the terminator");
    let mut expected = message.clone();
    if !expected.is_empty() && !expected.ends_with(b"\n") {
        expected.extend_from_slice(b"\r\n");
    }
    assert_eq!(decoded, expected, "dot-stuffing did not round-trip");
});
