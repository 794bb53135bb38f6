//! IMAP codec: the reader (imap-codec's fragmentizer and command parser plus our LIST-EXTENDED
//! and ESEARCH lifting) fed arbitrary streams, switching to line mode after IDLE and
//! AUTHENTICATE as the session does. Checks that the events do not depend on how the stream
//! was split into reads and that nothing larger than the limits is ever handed over.
#![no_main]

mod common;

use imap_codec::imap_types::command::CommandBody;
use libfuzzer_sys::fuzz_target;
use postern::imap::codec::{lift_extensions, Event, Mode, Reader, MAX_LINE};

const LITERAL_LIMIT: u32 = 4096;

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"a1 ",
    b"LOGIN alice secret\r\n",
    b"SELECT INBOX\r\n",
    b"EXAMINE \"Sent\"\r\n",
    b"FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)]<0.10>)\r\n",
    b"UID ",
    b"STORE 1 +FLAGS (\\Seen)\r\n",
    b"SEARCH RETURN (MIN MAX COUNT) ",
    b"OR SUBJECT x NOT FROM y",
    b"LIST (SUBSCRIBED) \"\" \"*\" RETURN (CHILDREN STATUS (MESSAGES UNSEEN))\r\n",
    b"APPEND INBOX (\\Seen) ",
    b"{5}\r\n",
    b"{5+}\r\n",
    b"{99999999}\r\n",
    b"~{3}\r\n",
    b"IDLE\r\n",
    b"DONE\r\n",
    b"AUTHENTICATE PLAIN\r\n",
    b"AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"*",
    b"\"",
    b"\\",
    b"(",
    b")",
    b"[",
    b"]",
    b"<",
    b">",
    b"1:*",
    b"4294967295",
    b"BINARY[1.2]",
    b"ENABLE IMAP4rev2 CONDSTORE\r\n",
    b"ID (\"name\" \"x\")\r\n",
    b"MOVE 1:3 Trash\r\n",
    b"STATUS INBOX (MESSAGES UIDNEXT)\r\n",
    b"\xe2\x82\xac",
    b"\0",
];

fn run(reads: &[Vec<u8>]) -> Vec<String> {
    let mut reader = Reader::new(LITERAL_LIMIT);
    let mut mode = Mode::Command;
    let mut in_idle = false;
    let mut events = Vec::new();
    for read in reads {
        reader.feed(read);
        while let Some(event) = reader.next(mode) {
            match &event {
                Event::Command { command, .. } => match command.body {
                    CommandBody::Idle => {
                        mode = Mode::Line;
                        in_idle = true;
                    }
                    CommandBody::Authenticate { .. } => mode = Mode::Line,
                    _ => {}
                },
                Event::Line(line) => {
                    assert!(line.len() <= MAX_LINE);
                    if !in_idle || line.eq_ignore_ascii_case(b"DONE") {
                        mode = Mode::Command;
                        in_idle = false;
                    }
                }
                Event::LiteralRefused { length, .. } => assert!(*length > LITERAL_LIMIT),
                _ => {}
            }
            events.push(format!("{event:?}"));
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let reads = common::chunks(data, TOKENS);
    common::assert_split_independent(&reads, run);
    // The lifting alone, on any line: never longer than what it was given.
    let joined = common::joined(&reads);
    let (rest, _) = lift_extensions(&joined);
    assert!(rest.len() <= joined.len());
});
