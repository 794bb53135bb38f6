//! Sans-IO POP3: command lines in, typed commands out; responses and dot-stuffed multi-line
//! bodies out. No sockets here (RFC 1939 §3, RFC 2449 §3 for lengths).

use crate::auth::Secret;
pub use crate::framing::DotStuffer;

/// Longest command line accepted, CRLF included. RFC 2449 §4 caps commands at 255 octets; AUTH
/// initial responses (RFC 5034) can be longer, so the cap leaves room for a long PLAIN token.
pub const MAX_LINE: usize = 2048;

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    User(String),
    /// The rest of the line: passwords may contain spaces (RFC 1939 §7 note).
    Pass(Secret<String>),
    Apop {
        name: String,
        digest: String,
    },
    /// `AUTH` alone lists the mechanisms (as Dovecot and older clients expect).
    Auth {
        mechanism: Option<String>,
        initial: Option<String>,
    },
    Stls,
    Capa,
    Stat,
    List(Option<u32>),
    Retr(u32),
    Dele(u32),
    Noop,
    Rset,
    Quit,
    Top {
        message: u32,
        lines: u32,
    },
    Uidl(Option<u32>),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Unknown command")]
    Unknown,
    #[error("{0}")]
    Syntax(&'static str),
}

/// Parses one command line (with or without its line ending).
pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    let line = line
        .strip_suffix(b"\n")
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .unwrap_or(line);
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax("Invalid UTF-8"))?;
    let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
    let keyword = keyword.to_ascii_uppercase();
    if keyword == "PASS" {
        if rest.is_empty() {
            return Err(ParseError::Syntax("PASS needs a password"));
        }
        return Ok(Command::Pass(Secret(rest.to_string())));
    }
    let args: Vec<&str> = rest.split_whitespace().collect();
    let arity = |min: usize, max: usize| {
        if args.len() < min || args.len() > max {
            Err(ParseError::Syntax("Wrong number of arguments"))
        } else {
            Ok(())
        }
    };
    let optional_msg = |args: &[&str]| args.first().map(|a| message_number(a)).transpose();
    Ok(match keyword.as_str() {
        "USER" => {
            arity(1, 1)?;
            Command::User(args[0].to_string())
        }
        "APOP" => {
            arity(2, 2)?;
            Command::Apop {
                name: args[0].to_string(),
                digest: args[1].to_ascii_lowercase(),
            }
        }
        "AUTH" => {
            arity(0, 2)?;
            Command::Auth {
                mechanism: args.first().map(|m| m.to_string()),
                initial: args.get(1).map(|i| i.to_string()),
            }
        }
        "STLS" => no_args(&args, Command::Stls)?,
        "CAPA" => no_args(&args, Command::Capa)?,
        "STAT" => no_args(&args, Command::Stat)?,
        "NOOP" => no_args(&args, Command::Noop)?,
        "RSET" => no_args(&args, Command::Rset)?,
        "QUIT" => no_args(&args, Command::Quit)?,
        "LIST" => {
            arity(0, 1)?;
            Command::List(optional_msg(&args)?)
        }
        "UIDL" => {
            arity(0, 1)?;
            Command::Uidl(optional_msg(&args)?)
        }
        "RETR" => {
            arity(1, 1)?;
            Command::Retr(message_number(args[0])?)
        }
        "DELE" => {
            arity(1, 1)?;
            Command::Dele(message_number(args[0])?)
        }
        "TOP" => {
            arity(2, 2)?;
            Command::Top {
                message: message_number(args[0])?,
                lines: args[1]
                    .parse()
                    .ok()
                    .filter(|_| args[1].bytes().all(|b| b.is_ascii_digit()))
                    .ok_or(ParseError::Syntax("Invalid line count"))?,
            }
        }
        _ => return Err(ParseError::Unknown),
    })
}

fn no_args(args: &[&str], command: Command) -> Result<Command, ParseError> {
    if args.is_empty() {
        Ok(command)
    } else {
        Err(ParseError::Syntax("No arguments expected"))
    }
}

fn message_number(arg: &str) -> Result<u32, ParseError> {
    arg.parse::<u32>()
        .ok()
        .filter(|n| *n > 0 && arg.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(ParseError::Syntax("Invalid message number"))
}

/// `+OK text`.
pub fn ok(text: &str) -> Vec<u8> {
    format!("+OK {text}\r\n").into_bytes()
}

/// `-ERR [CODE] text`, with an RFC 2449 response code when there is one.
pub fn err(code: Option<&str>, text: &str) -> Vec<u8> {
    match code {
        Some(code) => format!("-ERR [{code}] {text}\r\n").into_bytes(),
        None => format!("-ERR {text}\r\n").into_bytes(),
    }
}

/// The header, the blank line and the first `lines` lines of the body (TOP, RFC 1939 §7).
pub fn top(message: &[u8], lines: u32) -> &[u8] {
    let body_start = if message.starts_with(b"\r\n") {
        2
    } else {
        match memchr::memmem::find(message, b"\r\n\r\n") {
            Some(pos) => pos + 4,
            None => return message,
        }
    };
    let mut end = body_start;
    for _ in 0..lines {
        if end >= message.len() {
            break;
        }
        end = match memchr::memchr(b'\n', &message[end..]) {
            Some(pos) => end + pos + 1,
            None => message.len(),
        };
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse(b"user alice@x\r\n"),
            Ok(Command::User("alice@x".into()))
        );
        assert_eq!(
            parse(b"PASS two words \r\n"),
            Ok(Command::Pass(Secret("two words ".into())))
        );
        assert_eq!(
            parse(b"APOP a@x C4C9334BAC560ECC979E58001B3E22FB\r\n"),
            Ok(Command::Apop {
                name: "a@x".into(),
                digest: "c4c9334bac560ecc979e58001b3e22fb".into()
            })
        );
        assert_eq!(
            parse(b"AUTH\r\n"),
            Ok(Command::Auth {
                mechanism: None,
                initial: None
            })
        );
        assert_eq!(
            parse(b"AUTH PLAIN AGEAYg==\n"),
            Ok(Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some("AGEAYg==".into())
            })
        );
        assert_eq!(parse(b"list\r\n"), Ok(Command::List(None)));
        assert_eq!(parse(b"LIST 3\r\n"), Ok(Command::List(Some(3))));
        assert_eq!(parse(b"UIDL 1\r\n"), Ok(Command::Uidl(Some(1))));
        assert_eq!(parse(b"RETR 2\r\n"), Ok(Command::Retr(2)));
        assert_eq!(parse(b"DELE 2\r\n"), Ok(Command::Dele(2)));
        assert_eq!(
            parse(b"TOP 1 0\r\n"),
            Ok(Command::Top {
                message: 1,
                lines: 0
            })
        );
        for (line, command) in [
            (&b"STAT\r\n"[..], Command::Stat),
            (b"NOOP\r\n", Command::Noop),
            (b"RSET\r\n", Command::Rset),
            (b"QUIT\r\n", Command::Quit),
            (b"CAPA\r\n", Command::Capa),
            (b"STLS\r\n", Command::Stls),
        ] {
            assert_eq!(parse(line), Ok(command));
        }
    }

    #[test]
    fn refuses_malformed_commands() {
        for line in [
            &b"RETR 0\r\n"[..],
            b"RETR -1\r\n",
            b"RETR +1\r\n",
            b"RETR 99999999999\r\n",
            b"RETR\r\n",
            b"RETR 1 2\r\n",
            b"TOP 1\r\n",
            b"TOP 1 -5\r\n",
            b"STAT now\r\n",
            b"PASS\r\n",
            b"USER\r\n",
            b"LIST \xff\r\n",
        ] {
            assert!(
                matches!(parse(line), Err(ParseError::Syntax(_))),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(parse(b"HELO x\r\n"), Err(ParseError::Unknown));
        assert_eq!(parse(b"\r\n"), Err(ParseError::Unknown));
        assert_eq!(parse(b""), Err(ParseError::Unknown));
    }

    #[test]
    fn commands_framed_from_any_chunking() {
        use crate::framing::{LineEvent, LineFramer};
        let input = b"USER a@x\r\nPASS p w\r\nSTAT\nLIST 1\r\nQUIT\r\n";
        for size in 1..input.len() {
            let mut framer = LineFramer::new(MAX_LINE);
            let mut buf = Vec::new();
            let mut commands = Vec::new();
            for chunk in input.chunks(size) {
                buf.extend_from_slice(chunk);
                while let LineEvent::Line(line) = framer.next_line(&mut buf) {
                    commands.push(parse(&line).unwrap());
                }
            }
            assert_eq!(
                commands,
                vec![
                    Command::User("a@x".into()),
                    Command::Pass(Secret("p w".into())),
                    Command::Stat,
                    Command::List(Some(1)),
                    Command::Quit
                ],
                "chunks of {size}"
            );
        }
        // An overlong line is reported once and the next command is still understood.
        let mut framer = LineFramer::new(MAX_LINE);
        let mut buf = vec![b'X'; MAX_LINE * 3];
        assert_eq!(framer.next_line(&mut buf), LineEvent::Incomplete);
        buf.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(framer.next_line(&mut buf), LineEvent::TooLong);
        let LineEvent::Line(line) = framer.next_line(&mut buf) else {
            panic!("NOOP expected");
        };
        assert_eq!(parse(&line), Ok(Command::Noop));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let alphabet = b"RETRTOPLISTUIDLDELEAPOPUSER 0123456789 \r\n\xff";
        let mut seed = 0x2545_f491_u32;
        for _ in 0..20_000 {
            let len = (seed % 40) as usize;
            let line: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    alphabet[seed as usize % alphabet.len()]
                })
                .collect();
            let _ = parse(&line);
        }
    }

    #[test]
    fn dot_stuffing_in_any_chunking() {
        let body = b"a\r\n.b\r\n..\r\n.\r\nlast";
        let expected = b"a\r\n..b\r\n...\r\n..\r\nlast\r\n.\r\n".to_vec();
        for split in 0..=body.len() {
            let mut stuffer = DotStuffer::default();
            let mut out = Vec::new();
            stuffer.feed(&body[..split], &mut out);
            stuffer.feed(&body[split..], &mut out);
            stuffer.finish(&mut out);
            assert_eq!(out, expected, "split at {split}");
        }
        let mut out = Vec::new();
        DotStuffer::default().finish(&mut out);
        assert_eq!(out, b".\r\n");
    }

    #[test]
    fn top_takes_header_and_lines() {
        let msg = b"A: 1\r\nB: 2\r\n\r\none\r\ntwo\r\nthree\r\n";
        assert_eq!(top(msg, 0), b"A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(top(msg, 2), b"A: 1\r\nB: 2\r\n\r\none\r\ntwo\r\n");
        assert_eq!(top(msg, 99), &msg[..]);
        assert_eq!(top(b"\r\nbody\r\n", 0), b"\r\n");
        assert_eq!(top(b"A: no body", 3), b"A: no body");
    }
}
