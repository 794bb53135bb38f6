//! SMTP codec: command framing, command parsing (smtp-proto, as the session uses it), and the
//! DATA/BDAT body decoders. Besides "no panic", checks that the events do not depend on how the
//! stream was split into reads, that no line exceeds the limit, and that a body never grows
//! past its limit.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use postern::framing::{LineEvent, LineFramer};
use postern::smtp::codec::{ChunkReader, DotDecoder};
use smtp_proto::Request;

const MAX_LINE: usize = 512;
const BODY_LIMIT: usize = 2048;

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"EHLO client.example\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b.example>",
    b"RCPT TO:<",
    b">\r\n",
    b"DATA\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r\n..",
    b"BDAT ",
    b" LAST\r\n",
    b"RSET\r\n",
    b"AUTH PLAIN ",
    b"STARTTLS\r\n",
    b"QUIT\r\n",
    b"NOOP\r\n",
    b"VRFY ",
    b"EXPN ",
    b" SIZE=",
    b" BODY=8BITMIME",
    b" SMTPUTF8",
    b"@[127.0.0.1]",
    b"\"quoted local\"",
    b"%",
    b"@a,@b:",
    b"\xc3\xa9",
    b"\0",
    b"\r",
    b"\n",
    b"999999999999999999999",
];

#[derive(Debug, PartialEq)]
enum Event {
    Line(Vec<u8>),
    TooLong,
    Body(Vec<u8>, bool),
    Chunk(usize),
}

enum State {
    Commands,
    Data(DotDecoder, Vec<u8>),
    Bdat(ChunkReader, usize),
}

fn run(reads: &[Vec<u8>]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut framer = LineFramer::new(MAX_LINE);
    let mut buf = Vec::new();
    let mut state = State::Commands;
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            match &mut state {
                State::Commands => match framer.next_line(&mut buf) {
                    LineEvent::Line(line) => {
                        assert!(line.len() <= MAX_LINE);
                        match Request::parse(&mut line.iter()) {
                            Ok(Request::Data) => {
                                state = State::Data(DotDecoder::new(BODY_LIMIT), Vec::new())
                            }
                            Ok(Request::Bdat { chunk_size, .. }) => {
                                state = State::Bdat(ChunkReader::new(chunk_size.min(1 << 20)), 0)
                            }
                            _ => {}
                        }
                        events.push(Event::Line(line));
                    }
                    LineEvent::TooLong => events.push(Event::TooLong),
                    LineEvent::Incomplete => break,
                },
                State::Data(decoder, body) => {
                    if buf.is_empty() {
                        break;
                    }
                    let progress = decoder.feed(&buf, body);
                    assert!(progress.consumed <= buf.len());
                    assert!(body.len() <= BODY_LIMIT);
                    buf.drain(..progress.consumed);
                    if !progress.done {
                        continue;
                    }
                    events.push(Event::Body(std::mem::take(body), decoder.overflowed()));
                    state = State::Commands;
                }
                State::Bdat(reader, taken) => {
                    if buf.is_empty() {
                        break;
                    }
                    let (take, complete) = reader.feed(buf.len());
                    buf.drain(..take);
                    *taken += take;
                    if complete {
                        events.push(Event::Chunk(*taken));
                        state = State::Commands;
                    }
                }
            }
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    common::assert_split_independent(&common::chunks(data, TOKENS), run);
});
