//! IMAP on the wire, sans-IO: bytes in, [`Event`]s out; and the small encoders responses are
//! built from.
//!
//! Framing (lines and literals) is imap-codec's `Fragmentizer` and the grammar is its
//! `CommandCodec`. Two extensions clients use are unfinished in imap-codec 2.0-alpha, so they are
//! lifted off the command line before it is decoded: ESEARCH's `SEARCH RETURN (...)` (RFC 4731)
//! and LIST-EXTENDED's selection and return options (RFC 5258, with RFC 5819's `STATUS`). What
//! remains is decoded by imap-codec as plain SEARCH and LIST.

use std::collections::VecDeque;

use imap_codec::decode::Decoder;
use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer, LiteralAnnouncement};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::imap_types::IntoStatic;
use imap_codec::CommandCodec;

use crate::budget::{MemoryBudget, Reservation};

/// A command line without its literals may not exceed this (RFC 9051 §4 asks servers to allow at
/// least 8000 octets).
pub const MAX_LINE: usize = 64 * 1024;

/// The largest literal taken before login: a password fits, a message does not (Dovecot and
/// Cyrus cap unauthenticated literals similarly), so a client that has not logged in cannot make
/// the server buffer more than a few KiB per connection.
pub const PREAUTH_LITERAL_LIMIT: u32 = 8 * 1024;

/// What the next complete input is expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Command,
    /// A line in an exchange: AUTHENTICATE's responses, IDLE's `DONE`.
    Line,
}

/// Options lifted off a command before decoding (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extended {
    /// ESEARCH return options, upper-cased (`MIN`, `MAX`, `COUNT`, `ALL`, `SAVE`); `Some(empty)`
    /// for `RETURN ()`, which means `ALL`.
    pub search_return: Option<Vec<String>>,
    /// RFC 9394 / RFC 5267 §4.4: the range after `PARTIAL` as sent (checked by the handler).
    pub search_partial: Option<String>,
    /// RFC 5182: the command named `$`, decoded as [`SAVED_RESULT_SET`].
    pub saved_result: bool,
    /// RFC 5465: a NOTIFY and its arguments as sent (decoded as NOOP).
    pub notify: Option<String>,
    /// RFC 5267 §4.2: a CANCELUPDATE and its tags (decoded as NOOP).
    pub cancel_update: Option<Vec<String>>,
    /// LIST selection options (`SUBSCRIBED`, `SPECIAL-USE`, `RECURSIVEMATCH`, `REMOTE`).
    pub list_select: Vec<String>,
    /// LIST return options (`SUBSCRIBED`, `CHILDREN`, `SPECIAL-USE`).
    pub list_return: Vec<String>,
    /// LIST-STATUS items (`MESSAGES`, `UNSEEN`, …).
    pub list_status: Vec<String>,
    /// Whether the command was LIST-EXTENDED at all (answers differ slightly).
    pub list_extended: bool,
    /// RFC 5258 §3: patterns after the first of a parenthesized pattern list (the first stays
    /// in the command, which imap-codec decodes with one pattern).
    pub list_patterns: Vec<Vec<u8>>,
    /// RFC 3502 MULTIAPPEND: the messages after the first, each decoded as an APPEND of its own
    /// to the same mailbox (imap-codec decodes APPEND with one message).
    pub appends: Vec<Command<'static>>,
    /// RFC 4469 CATENATE: for each message of the APPEND (the first, then `appends`), its parts
    /// when it was a CATENATE (the decoded APPEND then carries an empty literal); empty when no
    /// message was.
    pub catenate: Vec<Option<Vec<CatPart>>>,
}

/// One part of a CATENATE (RFC 4469 §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatPart {
    Text(Vec<u8>),
    Url(String),
}

#[derive(Debug)]
pub enum Event {
    Command {
        command: Box<Command<'static>>,
        extended: Box<Extended>,
    },
    /// A complete line in [`Mode::Line`], without its line end.
    Line(Vec<u8>),
    /// The client announced a synchronizing literal that will be accepted: send `+`.
    LiteralWanted,
    /// A literal refused: a synchronizing one before the client sends it (no continuation), a
    /// LITERAL+ one read and dropped. The command is not run.
    LiteralRefused {
        tag: Option<String>,
        length: u32,
        why: Refusal,
    },
    /// A command longer than allowed (read and thrown away).
    TooLong { tag: Option<String> },
    /// A command that does not parse.
    Bad { tag: Option<String>, text: String },
}

/// Why a literal was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the literal limit (`NO [TOOBIG]`).
    TooBig,
    /// The server-wide memory budget has no room now (`NO [LIMIT]`).
    NoMemory,
}

pub struct Reader {
    fragmentizer: Fragmentizer,
    literal_limit: u32,
    /// Where literals take their memory from (none: unaccounted, as in codec tests).
    budget: Option<MemoryBudget>,
    /// The memory the current command's literals hold; given back when the next one starts.
    held: Reservation,
    /// Octets of a refused LITERAL+ literal still to drop, then the rest of its line.
    discard_left: u64,
    discard_line: bool,
    /// Received bytes not yet handed to the fragmentizer. They are handed over a line or a
    /// literal at a time, so that a line without an end is cut off at [`MAX_LINE`] instead of
    /// being buffered up to the fragmentizer's limit for a whole message (APPENDLIMIT).
    pending: VecDeque<u8>,
    /// Literal octets the fragmentizer expects next (0: it is reading a line).
    literal_left: u64,
    /// Octets of the current line handed over so far.
    line_len: usize,
    /// The current line went past [`MAX_LINE`]: the rest of it is dropped.
    overlong: bool,
}

impl Reader {
    /// `literal_limit`: the largest literal taken (APPENDLIMIT).
    pub fn new(literal_limit: u32) -> Reader {
        let max = literal_limit.saturating_add(MAX_LINE as u32);
        Reader {
            fragmentizer: Fragmentizer::new(max),
            literal_limit,
            budget: None,
            held: Reservation::empty(),
            discard_left: 0,
            discard_line: false,
            pending: VecDeque::new(),
            literal_left: 0,
            line_len: 0,
            overlong: false,
        }
    }

    /// Takes literals up to `literal_limit` from now on, each against `budget` (after login).
    /// Called between commands, so no message is in the fragmentizer.
    pub fn set_literal_limit(&mut self, literal_limit: u32, budget: Option<MemoryBudget>) {
        self.literal_limit = literal_limit;
        self.fragmentizer = Fragmentizer::new(literal_limit.saturating_add(MAX_LINE as u32));
        self.budget = budget;
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
    }

    /// Hands the fragmentizer the next piece of input: the rest of a literal, or of a line up
    /// to its end. Returns false when nothing is left to hand over.
    fn hand_over(&mut self) -> bool {
        loop {
            if self.pending.is_empty() {
                return false;
            }
            if self.discard_left > 0 || self.discard_line {
                // A refused LITERAL+ literal, then the rest of its command line: dropped unread.
                let n = self.pending.len().min(self.discard_left as usize);
                self.pending.drain(..n);
                self.discard_left -= n as u64;
                if self.discard_left == 0 {
                    match self.pending.iter().position(|b| *b == b'\n') {
                        Some(at) => {
                            self.pending.drain(..=at);
                            self.discard_line = false;
                        }
                        None => self.pending.clear(),
                    }
                }
                continue;
            }
            if self.literal_left > 0 {
                let n = self.pending.len().min(self.literal_left as usize);
                let piece: Vec<u8> = self.pending.drain(..n).collect();
                self.fragmentizer.enqueue_bytes(&piece);
                self.literal_left -= n as u64;
                return true;
            }
            let end = self.pending.iter().position(|b| *b == b'\n');
            let upto = end.map_or(self.pending.len(), |at| at + 1);
            if self.overlong {
                // Dropped unread up to the line end, which is handed over to finish the line.
                self.pending.drain(..upto);
                if end.is_some() {
                    self.fragmentizer.enqueue_bytes(b"\n");
                    self.line_len = 0;
                    return true;
                }
                continue;
            }
            let room = MAX_LINE + 1 - self.line_len;
            if upto > room {
                // One octet past the limit reaches the fragmentizer, so the line is known long.
                let piece: Vec<u8> = self.pending.drain(..room).collect();
                self.fragmentizer.enqueue_bytes(&piece);
                self.fragmentizer.poison_message();
                self.overlong = true;
                self.line_len += room;
                return true;
            }
            let piece: Vec<u8> = self.pending.drain(..upto).collect();
            self.fragmentizer.enqueue_bytes(&piece);
            self.line_len = if end.is_some() {
                0
            } else {
                self.line_len + upto
            };
            return true;
        }
    }

    /// Drops whatever is buffered (after STARTTLS: nothing sent in the clear may be obeyed).
    pub fn reset(&mut self) {
        let budget = self.budget.take();
        *self = Reader::new(self.literal_limit);
        self.budget = budget;
    }

    /// Refuses the literal just announced: the message is dropped, and a LITERAL+ literal,
    /// which the client sends anyway, is read and thrown away with the rest of its line.
    fn refuse(&mut self, lit: LiteralMode, length: u32, why: Refusal) -> Event {
        let tag = self.tag();
        self.fragmentizer.skip_message();
        self.literal_left = 0;
        self.line_len = 0;
        self.held = Reservation::empty();
        if lit == LiteralMode::NonSync {
            self.discard_left = u64::from(length);
            self.discard_line = true;
        }
        Event::LiteralRefused { tag, length, why }
    }

    fn tag(&self) -> Option<String> {
        self.fragmentizer
            .decode_tag()
            .map(|tag| tag.as_ref().to_string())
    }

    /// The next event, or None when more input is needed.
    pub fn next(&mut self, mode: Mode) -> Option<Event> {
        if self.fragmentizer.is_message_complete() {
            // The last command is done with: its literals' memory goes back.
            self.held = Reservation::empty();
        }
        loop {
            let Some(fragment) = self.fragmentizer.progress() else {
                if self.hand_over() {
                    continue;
                }
                return None;
            };
            if let FragmentInfo::Line {
                start,
                end,
                announcement,
                ..
            } = fragment
            {
                if end - start > MAX_LINE {
                    self.fragmentizer.poison_message();
                }
                if let Some(LiteralAnnouncement { mode: lit, length }) = announcement {
                    // The fragmentizer reads a literal next (unless it is skipped below).
                    self.literal_left = u64::from(length);
                    if mode == Mode::Line {
                        self.fragmentizer.poison_message();
                    } else if self.fragmentizer.is_message_poisoned() {
                        // Already refused (too long a line): read along, answered when complete.
                    } else if length > self.literal_limit {
                        return Some(self.refuse(lit, length, Refusal::TooBig));
                    } else {
                        let reserved = match &self.budget {
                            Some(budget) => budget.try_reserve(length as usize),
                            None => Some(Reservation::empty()),
                        };
                        let Some(reserved) = reserved else {
                            return Some(self.refuse(lit, length, Refusal::NoMemory));
                        };
                        self.held.merge(reserved);
                        if lit == LiteralMode::Sync {
                            return Some(Event::LiteralWanted);
                        }
                    }
                }
            }
            if !self.fragmentizer.is_message_complete() {
                continue;
            }
            return Some(self.complete(mode));
        }
    }

    fn complete(&mut self, mode: Mode) -> Event {
        let tag = self.tag();
        if self.fragmentizer.is_max_message_size_exceeded() {
            return Event::TooLong { tag };
        }
        if self.fragmentizer.is_message_poisoned() {
            let bytes = self.fragmentizer.message_bytes();
            let long = std::mem::take(&mut self.overlong) || bytes.len() > MAX_LINE;
            return if long {
                Event::TooLong { tag }
            } else {
                Event::Bad {
                    tag,
                    text: "Literal refused or malformed command".into(),
                }
            };
        }
        let bytes = self.fragmentizer.message_bytes();
        if mode == Mode::Line {
            let line = bytes
                .strip_suffix(b"\r\n")
                .or_else(|| bytes.strip_suffix(b"\n"))
                .unwrap_or(bytes);
            return Event::Line(line.to_vec());
        }
        let (bytes, mut extended) = lift_extensions(bytes);
        match CommandCodec::default().decode(&bytes) {
            Ok((b"", command)) => Event::Command {
                command: Box::new(command.into_static()),
                extended: Box::new(extended),
            },
            // An APPEND of several messages (RFC 3502) or with CATENATE (RFC 4469): imap-codec
            // decodes APPEND with one literal message only.
            Ok(_) | Err(_) => match appends::split(&bytes) {
                Some((mut commands, parts)) => {
                    let first = commands.remove(0);
                    extended.appends = commands;
                    extended.catenate = parts;
                    Event::Command {
                        command: Box::new(first),
                        extended: Box::new(extended),
                    }
                }
                None => Event::Bad {
                    tag,
                    text: if appends::is_catenate(&bytes) {
                        "Syntax error in CATENATE".into()
                    } else {
                        "Syntax error in command".into()
                    },
                },
            },
        }
    }
}

/// The APPENDs imap-codec does not parse: several messages (RFC 3502 MULTIAPPEND, `tag APPEND
/// box [flags] [date] {n}<data> [flags] [date] {m}<data>…`), each of which may be
/// `CATENATE (TEXT literal / URL astring …)` (RFC 4469), split into one APPEND per message.
mod appends {
    use super::{CatPart, Command, CommandBody, CommandCodec, Decoder, IntoStatic};

    pub fn is_catenate(message: &[u8]) -> bool {
        let line_end = message
            .iter()
            .position(|b| *b == b'\n')
            .unwrap_or(message.len());
        let line = message[..line_end].to_ascii_uppercase();
        line.windows(10).any(|w| w == b" CATENATE ") && line.windows(8).any(|w| w == b" APPEND ")
    }

    struct Cursor<'a> {
        bytes: &'a [u8],
        pos: usize,
    }

    impl<'a> Cursor<'a> {
        fn peek(&self) -> Option<u8> {
            self.bytes.get(self.pos).copied()
        }

        fn eat(&mut self, byte: u8) -> Option<()> {
            (self.peek()? == byte).then(|| self.pos += 1)
        }

        fn word(&mut self) -> Option<&'a [u8]> {
            let start = self.pos;
            while let Some(b) = self.peek() {
                if matches!(b, b' ' | b'(' | b')' | b'\r' | b'\n' | b'{' | b'"') {
                    break;
                }
                self.pos += 1;
            }
            (self.pos > start).then(|| &self.bytes[start..self.pos])
        }

        /// A quoted string, as it is on the wire (quotes included).
        fn quoted(&mut self) -> Option<&'a [u8]> {
            let start = self.pos;
            self.eat(b'"')?;
            let mut escaped = false;
            loop {
                let b = self.peek()?;
                self.pos += 1;
                match b {
                    b'\\' if !escaped => escaped = true,
                    b'"' if !escaped => return Some(&self.bytes[start..self.pos]),
                    b'\r' | b'\n' => return None,
                    _ => escaped = false,
                }
            }
        }

        /// A literal or literal8: (what announced it, from `~`/`{` to its line end, and its data).
        fn literal(&mut self) -> Option<(&'a [u8], &'a [u8])> {
            let start = self.pos;
            self.eat(b'~');
            self.eat(b'{')?;
            let digits = self.pos;
            while self.peek()?.is_ascii_digit() {
                self.pos += 1;
            }
            let length: usize = std::str::from_utf8(&self.bytes[digits..self.pos])
                .ok()?
                .parse()
                .ok()?;
            self.eat(b'+');
            self.eat(b'}')?;
            self.eat(b'\r');
            self.eat(b'\n')?;
            let announced = &self.bytes[start..self.pos];
            let data = self.bytes.get(self.pos..self.pos + length)?;
            self.pos += length;
            Some((announced, data))
        }

        fn astring(&mut self) -> Option<Vec<u8>> {
            match self.peek()? {
                b'"' => {
                    let quoted = self.quoted()?;
                    let inner = &quoted[1..quoted.len() - 1];
                    let mut out = Vec::with_capacity(inner.len());
                    let mut escaped = false;
                    for b in inner {
                        if *b == b'\\' && !escaped {
                            escaped = true;
                            continue;
                        }
                        escaped = false;
                        out.push(*b);
                    }
                    Some(out)
                }
                b'{' | b'~' => Some(self.literal()?.1.to_vec()),
                _ => Some(self.word()?.to_vec()),
            }
        }
    }

    /// The APPEND split into one decoded APPEND per message (a CATENATE one with an empty
    /// literal) and the CATENATE parts of each.
    #[allow(clippy::type_complexity)]
    pub fn split(message: &[u8]) -> Option<(Vec<Command<'static>>, Vec<Option<Vec<CatPart>>>)> {
        let mut c = Cursor {
            bytes: message,
            pos: 0,
        };
        let tag = c.word()?;
        c.eat(b' ')?;
        if !c.word()?.eq_ignore_ascii_case(b"APPEND") {
            return None;
        }
        c.eat(b' ')?;
        let mailbox_start = c.pos;
        match c.peek()? {
            b'"' => {
                c.quoted()?;
            }
            b'{' => {
                c.literal()?;
            }
            _ => {
                c.word()?;
            }
        }
        let mailbox = &message[mailbox_start..c.pos];
        let (mut commands, mut parts) = (Vec::new(), Vec::new());
        loop {
            c.eat(b' ')?;
            let mut one = Vec::new();
            one.extend_from_slice(tag);
            one.extend_from_slice(b" APPEND ");
            one.extend_from_slice(mailbox);
            if c.peek()? == b'(' {
                let start = c.pos;
                while c.peek()? != b')' {
                    c.pos += 1;
                }
                c.pos += 1;
                one.push(b' ');
                one.extend_from_slice(&message[start..c.pos]);
                c.eat(b' ')?;
            }
            if c.peek()? == b'"' {
                one.push(b' ');
                one.extend_from_slice(c.quoted()?);
                c.eat(b' ')?;
            }
            match c.peek()? {
                b'{' | b'~' => {
                    let (announced, data) = c.literal()?;
                    one.push(b' ');
                    one.extend_from_slice(announced);
                    one.extend_from_slice(data);
                    parts.push(None);
                }
                _ => {
                    if !c.word()?.eq_ignore_ascii_case(b"CATENATE") {
                        return None;
                    }
                    c.eat(b' ')?;
                    c.eat(b'(')?;
                    let mut cat = Vec::new();
                    loop {
                        let kind = c.word()?.to_ascii_uppercase();
                        c.eat(b' ')?;
                        match kind.as_slice() {
                            b"TEXT" => cat.push(CatPart::Text(c.literal()?.1.to_vec())),
                            b"URL" => cat.push(CatPart::Url(String::from_utf8(c.astring()?).ok()?)),
                            _ => return None,
                        }
                        if c.eat(b')').is_some() {
                            break;
                        }
                        c.eat(b' ')?;
                    }
                    one.extend_from_slice(b" {0}\r\n");
                    parts.push(Some(cat));
                }
            }
            one.extend_from_slice(b"\r\n");
            match CommandCodec::default().decode(&one) {
                Ok((b"", command)) if matches!(command.body, CommandBody::Append { .. }) => {
                    commands.push(command.into_static())
                }
                _ => return None,
            }
            if c.eat(b'\r').is_some() || c.peek() == Some(b'\n') {
                c.eat(b'\n')?;
                break;
            }
        }
        (c.pos == message.len()).then_some((commands, parts))
    }
}

/// Takes ESEARCH and LIST-EXTENDED options off a command (see the module docs). Anything that
/// does not look like them is left alone for imap-codec to judge.
pub fn lift_extensions(message: &[u8]) -> (Vec<u8>, Extended) {
    let mut extended = Extended::default();
    let mut line_end = message
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(message.len());
    if line_end > 0 && message[line_end - 1] == b'\r' {
        line_end -= 1;
    }
    let Ok(line) = std::str::from_utf8(&message[..line_end]) else {
        return (message.to_vec(), extended);
    };
    let mut words = line.splitn(3, ' ');
    let (Some(tag), Some(verb), Some(rest)) = (words.next(), words.next(), words.next()) else {
        return (message.to_vec(), extended);
    };
    let upper = verb.to_ascii_uppercase();
    let (prefix, verb, rest) = if upper == "UID" {
        let mut more = rest.splitn(2, ' ');
        let (Some(verb), Some(rest)) = (more.next(), more.next()) else {
            return (message.to_vec(), extended);
        };
        (format!("{tag} UID "), verb.to_ascii_uppercase(), rest)
    } else {
        (format!("{tag} "), upper, rest)
    };
    let rebuilt = match verb.as_str() {
        // RFC 4731 SEARCH RETURN, RFC 5267 §3 SORT RETURN (ESORT) and §4 (CONTEXT=SEARCH:
        // UPDATE, PARTIAL, and RFC 9394's PARTIAL ranges); RFC 5182's `$` among the criteria.
        "SEARCH" | "SORT" | "THREAD" => {
            let mut rest = rest.to_string();
            if verb != "THREAD" {
                if let Some(after) = strip_prefix_ci(&rest, "RETURN ") {
                    let Some((options, after)) = parenthesized(after) else {
                        return (message.to_vec(), extended);
                    };
                    let mut names = Vec::new();
                    let mut words = options.split_whitespace();
                    while let Some(word) = words.next() {
                        let word = word.to_ascii_uppercase();
                        if word == "PARTIAL" {
                            extended.search_partial = Some(words.next().unwrap_or("").to_string());
                        }
                        names.push(word);
                    }
                    extended.search_return = Some(names);
                    rest = after.trim_start().to_string();
                }
            }
            if let Some(replaced) = replace_saved_in_criteria(&rest) {
                extended.saved_result = true;
                rest = replaced;
            }
            if extended.search_return.is_none() && !extended.saved_result {
                return (message.to_vec(), extended);
            }
            format!("{prefix}{verb} {rest}")
        }
        // RFC 5182: `$` as the sequence set of FETCH, STORE, COPY, MOVE and UID EXPUNGE.
        "FETCH" | "STORE" | "COPY" | "MOVE" | "EXPUNGE" => {
            let Some(after) = rest.strip_prefix('$') else {
                return (message.to_vec(), extended);
            };
            if !(after.is_empty() || after.starts_with(' ')) {
                return (message.to_vec(), extended);
            }
            extended.saved_result = true;
            format!("{prefix}{verb} {SAVED_RESULT_SET}{after}")
        }
        // RFC 5465 NOTIFY, which imap-codec does not know: decoded as NOOP with the arguments
        // lifted off (and parsed by its handler).
        "NOTIFY" => {
            extended.notify = Some(rest.to_string());
            format!("{tag} NOOP")
        }
        // RFC 5267 §4.2 CANCELUPDATE, which imap-codec does not know: decoded as NOOP with
        // the tags lifted off.
        "CANCELUPDATE" => {
            let mut tags = Vec::new();
            let mut left = rest.trim_start();
            while let Some((token, more)) = split_token(left) {
                tags.push(unquote(token));
                left = more.trim_start();
            }
            if tags.is_empty() || !left.is_empty() {
                return (message.to_vec(), extended);
            }
            extended.cancel_update = Some(tags);
            format!("{tag} NOOP")
        }
        "LIST" => {
            let mut rest = rest.to_string();
            if rest.starts_with('(') {
                let Some((options, after)) = parenthesized(&rest) else {
                    return (message.to_vec(), extended);
                };
                extended.list_select = options
                    .split_whitespace()
                    .map(|o| o.to_ascii_uppercase())
                    .collect();
                extended.list_extended = true;
                rest = after.trim_start().to_string();
            }
            if let Some(at) = find_ci(&rest, " RETURN (") {
                let Some((options, after)) = parenthesized(&rest[at + 8..]) else {
                    return (message.to_vec(), extended);
                };
                if !after.trim().is_empty() {
                    return (message.to_vec(), extended);
                }
                let mut words = options.split_whitespace().peekable();
                let mut status = String::new();
                while let Some(word) = words.next() {
                    let word = word.to_ascii_uppercase();
                    if word == "STATUS" {
                        let remaining: Vec<&str> = words.by_ref().collect();
                        status = remaining.join(" ");
                        break;
                    }
                    extended.list_return.push(word);
                }
                if !status.is_empty() {
                    let inner = status.trim().trim_start_matches('(').trim_end_matches(')');
                    extended.list_status = inner
                        .split_whitespace()
                        .map(|s| s.to_ascii_uppercase())
                        .collect();
                }
                extended.list_extended = true;
                rest.truncate(at);
            }
            // RFC 5258 §3: `LIST reference (pattern pattern …)`.
            if let Some((reference, after)) = split_token(&rest) {
                let after = after.trim_start();
                if after.starts_with('(') {
                    let Some((inner, tail)) = parenthesized(after) else {
                        return (message.to_vec(), extended);
                    };
                    let mut patterns = Vec::new();
                    let mut left = inner.trim_start();
                    while let Some((token, more)) = split_token(left) {
                        patterns.push(token.to_string());
                        left = more.trim_start();
                    }
                    if patterns.is_empty() || !left.is_empty() {
                        return (message.to_vec(), extended);
                    }
                    let first = patterns.remove(0);
                    extended.list_patterns =
                        patterns.iter().map(|p| unquote(p).into_bytes()).collect();
                    extended.list_extended = true;
                    rest = format!("{reference} {first}{tail}");
                }
            }
            if !extended.list_extended {
                return (message.to_vec(), extended);
            }
            format!("{prefix}LIST {rest}")
        }
        _ => return (message.to_vec(), extended),
    };
    let mut out = rebuilt.into_bytes();
    out.extend_from_slice(&message[line_end..]);
    (out, extended)
}

/// RFC 5182: `$` stands where a sequence set goes. imap-codec does not know it, so the command is
/// decoded with this set in its place and [`Extended::saved_result`] says that it means `$`.
pub const SAVED_RESULT_SET: &str = "4294967295";

/// Replaces each `$` search key (a token of its own, outside quoted strings) with
/// [`SAVED_RESULT_SET`]; `None` when there is none.
fn replace_saved_in_criteria(criteria: &str) -> Option<String> {
    let bytes = criteria.as_bytes();
    let mut out = String::with_capacity(criteria.len() + 16);
    let (mut quoted, mut escaped, mut found) = (false, false, false);
    for (i, c) in criteria.char_indices() {
        if quoted {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => quoted = false,
                _ => escaped = false,
            }
            out.push(c);
            continue;
        }
        let before_ok = i == 0 || matches!(bytes[i - 1], b' ' | b'(');
        let after_ok = matches!(bytes.get(i + 1), None | Some(b' ' | b')'));
        match c {
            '"' => {
                quoted = true;
                out.push(c);
            }
            '$' if before_ok && after_ok => {
                found = true;
                out.push_str(SAVED_RESULT_SET);
            }
            _ => out.push(c),
        }
    }
    found.then_some(out)
}

/// The first token of `text`, a quoted string (with its quotes) or an atom, and what follows.
fn split_token(text: &str) -> Option<(&str, &str)> {
    if text.is_empty() {
        return None;
    }
    if let Some(body) = text.strip_prefix('"') {
        let mut escaped = false;
        for (i, c) in body.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => return Some((&text[..i + 2], &text[i + 2..])),
                _ => escaped = false,
            }
        }
        return None;
    }
    let end = text.find([' ', ')']).unwrap_or(text.len());
    (end > 0).then(|| (&text[..end], &text[end..]))
}

/// A quoted string's content, or an atom as it is.
fn unquote(token: &str) -> String {
    match token.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::new();
            let mut escaped = false;
            for c in inner.chars() {
                if c == '\\' && !escaped {
                    escaped = true;
                    continue;
                }
                escaped = false;
                out.push(c);
            }
            out
        }
        None => token.to_string(),
    }
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    // `get`, not indexing: the cut may fall inside a multi-byte character (found by fuzzing).
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn find_ci(text: &str, needle: &str) -> Option<usize> {
    text.to_ascii_uppercase().find(&needle.to_ascii_uppercase())
}

/// `(a b (c d)) rest` → (`a b (c d)`, ` rest`).
fn parenthesized(text: &str) -> Option<(&str, &str)> {
    if !text.starts_with('(') {
        return None;
    }
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&text[1..i], &text[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

// ----- Encoding -----

/// A string as IMAP `string`: quoted when it is short, 7-bit and free of CR, LF and NUL;
/// otherwise a literal.
pub fn string(out: &mut Vec<u8>, value: &[u8]) {
    let quotable = value.len() <= 1024
        && value
            .iter()
            .all(|b| *b != b'\r' && *b != b'\n' && *b != 0 && *b < 0x80);
    if quotable {
        out.push(b'"');
        for b in value {
            if *b == b'"' || *b == b'\\' {
                out.push(b'\\');
            }
            out.push(*b);
        }
        out.push(b'"');
    } else {
        literal(out, value);
    }
}

/// An `astring` (mailbox names): bare when every byte is an ASTRING-CHAR (RFC 9051 §9), as
/// the RFC's own examples print names; quoted or a literal otherwise.
pub fn astring(out: &mut Vec<u8>, value: &[u8]) {
    let bare = !value.is_empty()
        && value.iter().all(|b| {
            (0x21..0x7f).contains(b)
                && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
        });
    if bare {
        out.extend_from_slice(value);
    } else {
        string(out, value);
    }
}

pub fn literal(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", value.len()).as_bytes());
    out.extend_from_slice(value);
}

/// `nstring`: NIL or a string.
pub fn nstring(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(value) => string(out, value),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// A tagged or untagged status response line.
pub fn status(tag: Option<&str>, kind: &str, code: Option<&str>, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + text.len());
    out.extend_from_slice(tag.unwrap_or("*").as_bytes());
    out.push(b' ');
    out.extend_from_slice(kind.as_bytes());
    out.push(b' ');
    if let Some(code) = code {
        out.push(b'[');
        out.extend_from_slice(code.as_bytes());
        out.extend_from_slice(b"] ");
    }
    let text: String = text.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    out.extend_from_slice(if text.is_empty() { "done" } else { &text }.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::imap_types::command::CommandBody;

    fn events(reader: &mut Reader, mode: Mode) -> Vec<Event> {
        std::iter::from_fn(|| reader.next(mode)).collect()
    }

    #[test]
    fn commands_in_any_chunking() {
        let input = b"a1 NOOP\r\na2 LOGIN alice \"pass word\"\r\na3 SELECT INBOX\r\n";
        for split in 1..input.len() {
            let mut reader = Reader::new(1024);
            let mut got = Vec::new();
            for chunk in input.chunks(split) {
                reader.feed(chunk);
                got.extend(events(&mut reader, Mode::Command));
            }
            let tags: Vec<String> = got
                .iter()
                .map(|e| match e {
                    Event::Command { command, .. } => command.tag.as_ref().to_string(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(tags, ["a1", "a2", "a3"], "split {split}");
        }
    }

    #[test]
    fn synchronizing_literal_is_asked_for_then_decoded() {
        let mut reader = Reader::new(1024);
        reader.feed(b"a APPEND INBOX {5}\r\n");
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::LiteralWanted)
        ));
        assert!(reader.next(Mode::Command).is_none());
        reader.feed(b"hello\r\n");
        match reader.next(Mode::Command) {
            Some(Event::Command { command, .. }) => {
                assert!(matches!(command.body, CommandBody::Append { .. }))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn literal_plus_needs_no_continuation_and_big_literals_are_refused() {
        let mut reader = Reader::new(10);
        reader.feed(b"a APPEND INBOX {5+}\r\nhello\r\n");
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::Command { .. })
        ));
        reader.feed(b"b APPEND INBOX {50}\r\nc NOOP\r\n");
        match reader.next(Mode::Command) {
            Some(Event::LiteralRefused { tag, length, why }) => {
                assert_eq!(tag.as_deref(), Some("b"));
                assert_eq!(length, 50);
                assert_eq!(why, Refusal::TooBig);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::Command { .. })
        ));
        // A non-synchronizing literal over the limit is read and answered, not obeyed.
        reader.feed(b"d APPEND INBOX {20+}\r\n01234567890123456789\r\ne NOOP\r\n");
        let got = events(&mut reader, Mode::Command);
        assert!(
            matches!(&got[0], Event::LiteralRefused { tag: Some(t), why: Refusal::TooBig, .. } if t == "d"),
            "{got:?}"
        );
        assert!(matches!(&got[1], Event::Command { .. }), "{got:?}");
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn a_refused_literal_plus_is_dropped_as_it_arrives_not_buffered() {
        let mut reader = Reader::new(PREAUTH_LITERAL_LIMIT);
        reader.feed(b"a LOGIN {52428800+}\r\n");
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::LiteralRefused {
                why: Refusal::TooBig,
                ..
            })
        ));
        for _ in 0..100 {
            reader.feed(&[b'x'; 64 * 1024]);
            assert!(reader.next(Mode::Command).is_none());
            assert!(reader.pending.is_empty());
            assert!(reader.fragmentizer.message_bytes().is_empty());
        }
        reader.discard_left = 3; // skip to the literal's end
        reader.feed(b"xxx pass\r\nb NOOP\r\n");
        let got = events(&mut reader, Mode::Command);
        assert!(
            matches!(&got[..], [Event::Command { command, .. }] if command.tag.as_ref() == "b"),
            "{got:?}"
        );
    }

    #[test]
    fn literals_take_memory_from_the_budget_until_the_next_command() {
        let budget = MemoryBudget::new(64 * 1024);
        let mut reader = Reader::new(PREAUTH_LITERAL_LIMIT);
        reader.feed(b"a LOGIN {9000}\r\n");
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::LiteralRefused {
                why: Refusal::TooBig,
                length: 9000,
                ..
            })
        ));
        reader.set_literal_limit(1024 * 1024, Some(budget.clone()));
        reader.feed(b"b APPEND INBOX {40000}\r\n");
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::LiteralWanted)
        ));
        assert!(budget.available() < 30 * 1024);
        reader.feed(&[b'm'; 40000]);
        reader.feed(b"\r\nc APPEND INBOX {40000}\r\n");
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::Command { .. })
        ));
        // b's literal is given back once c is read, so c fits.
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::LiteralWanted)
        ));
        // Another session takes what c left; d wants more than c gives back.
        let _other = budget.try_reserve(budget.available()).unwrap();
        reader.feed(&[b'm'; 40000]);
        reader.feed(b"\r\nd APPEND INBOX {50000}\r\n");
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::Command { .. })
        ));
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::LiteralRefused {
                why: Refusal::NoMemory,
                ..
            })
        ));
    }

    #[test]
    fn garbage_is_bad_with_its_tag_when_there_is_one() {
        let mut reader = Reader::new(1024);
        reader.feed(b"x1 FROBNICATE\r\n\r\n)(*&\r\nx2 NOOP\r\n");
        let got = events(&mut reader, Mode::Command);
        assert!(matches!(&got[0], Event::Bad { tag: Some(t), .. } if t == "x1"));
        assert!(matches!(&got[1], Event::Bad { .. }));
        assert!(matches!(&got[2], Event::Bad { .. }));
        assert!(matches!(&got[3], Event::Command { .. }));
    }

    #[test]
    fn a_line_without_end_is_cut_off_at_max_line_not_at_appendlimit() {
        let mut reader = Reader::new(50 * 1024 * 1024);
        reader.feed(b"a1 NOOP\r\nb1 LOGIN ");
        assert!(matches!(
            reader.next(Mode::Command),
            Some(Event::Command { .. })
        ));
        for _ in 0..640 {
            reader.feed(&[b'x'; 16 * 1024]); // 10 MiB, no line end
            assert!(reader.next(Mode::Command).is_none());
            assert!(reader.fragmentizer.message_bytes().len() <= MAX_LINE + 1);
            assert!(reader.pending.is_empty());
        }
        reader.feed(b"yyy {5}\r\nc1 NOOP\r\n");
        let got = events(&mut reader, Mode::Command);
        assert!(
            matches!(&got[0], Event::TooLong { tag: Some(t) } if t == "b1"),
            "{got:?}"
        );
        assert!(matches!(&got[1], Event::Command { .. }), "{got:?}");
        // Literals still pass whole, and the line after one starts counting afresh.
        let mut big = b"d1 APPEND INBOX {100000+}\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'z', 100_000));
        big.extend_from_slice(b"\r\n");
        reader.feed(&big);
        match reader.next(Mode::Command) {
            Some(Event::Command { command, .. }) => {
                assert_eq!(command.tag.as_ref(), "d1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn overlong_line_then_a_good_one() {
        let mut reader = Reader::new(1024);
        let mut long = b"a ".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        long.extend_from_slice(b"\r\nb NOOP\r\n");
        reader.feed(&long);
        let got = events(&mut reader, Mode::Command);
        assert!(matches!(&got[0], Event::TooLong { .. }), "{got:?}");
        assert!(matches!(&got[1], Event::Command { .. }));
    }

    #[test]
    fn lifting_survives_multibyte_text_where_a_keyword_was_expected() {
        // A fuzzing find: "RETURN" compared against a cut through '€' panicked.
        for line in [
            "a6 SEARCH RETE2r\u{20ac}t\r\n",
            "a LIST \u{20ac}\u{20ac} x\r\n",
            "a SEARCH R\u{e9}\r\n",
        ] {
            let (rest, _) = lift_extensions(line.as_bytes());
            assert_eq!(rest, line.as_bytes());
        }
    }

    #[test]
    fn catenate_appends_are_split_into_parts() {
        let message = b"t APPEND Drafts (\\Seen) CATENATE (URL \"/INBOX/;UID=1\" TEXT {3+}\r\nabc) {2+}\r\nhi\r\n";
        assert!(appends::is_catenate(message));
        let (commands, parts) = appends::split(message).unwrap();
        assert_eq!(commands.len(), 2);
        assert_eq!(
            parts,
            vec![
                Some(vec![
                    CatPart::Url("/INBOX/;UID=1".into()),
                    CatPart::Text(b"abc".to_vec())
                ]),
                None
            ]
        );
        assert!(appends::split(b"t APPEND Drafts CATENATE (BOGUS x)\r\n").is_none());
        assert!(appends::split(b"t APPEND Drafts CATENATE (TEXT {9+}\r\nab)\r\n").is_none());
    }

    #[test]
    fn saved_result_partial_and_cancelupdate_are_lifted() {
        let (bytes, ext) = lift_extensions(b"t UID FETCH $ (FLAGS)\r\n");
        assert_eq!(bytes, b"t UID FETCH 4294967295 (FLAGS)\r\n");
        assert!(ext.saved_result);
        let (bytes, ext) =
            lift_extensions(b"t SEARCH RETURN (PARTIAL -1:-5 SAVE) OR $ SUBJECT \"$\"\r\n");
        assert_eq!(bytes, b"t SEARCH OR 4294967295 SUBJECT \"$\"\r\n");
        assert!(ext.saved_result);
        assert_eq!(ext.search_partial.as_deref(), Some("-1:-5"));
        let (bytes, ext) = lift_extensions(b"t CANCELUPDATE \"a1\" \"b2\"\r\n");
        assert_eq!(bytes, b"t NOOP\r\n");
        assert_eq!(
            ext.cancel_update,
            Some(vec!["a1".to_string(), "b2".to_string()])
        );
        // `$` inside a keyword or a quoted string is not the saved result.
        let (_, ext) = lift_extensions(b"t SEARCH KEYWORD $Forwarded\r\n");
        assert!(!ext.saved_result);
    }

    #[test]
    fn esearch_and_list_extended_options_are_lifted() {
        let (bytes, ext) = lift_extensions(b"t UID SEARCH RETURN (MIN COUNT) UNSEEN\r\n");
        assert_eq!(bytes, b"t UID SEARCH UNSEEN\r\n");
        assert_eq!(ext.search_return, Some(vec!["MIN".into(), "COUNT".into()]));
        let (bytes, ext) = lift_extensions(
            b"t LIST (SUBSCRIBED) \"\" \"*\" RETURN (CHILDREN STATUS (MESSAGES UNSEEN))\r\n",
        );
        assert_eq!(bytes, b"t LIST \"\" \"*\"\r\n");
        assert!(ext.list_extended);
        assert_eq!(ext.list_select, vec!["SUBSCRIBED"]);
        assert_eq!(ext.list_return, vec!["CHILDREN"]);
        assert_eq!(ext.list_status, vec!["MESSAGES", "UNSEEN"]);
        let (bytes, ext) = lift_extensions(b"t LIST \"\" %\r\n");
        assert_eq!(bytes, b"t LIST \"\" %\r\n");
        assert!(!ext.list_extended);
    }

    #[test]
    fn strings_quote_or_go_literal() {
        let mut out = Vec::new();
        string(&mut out, b"a \"b\\");
        assert_eq!(out, b"\"a \\\"b\\\\\"");
        out.clear();
        string(&mut out, "é".as_bytes());
        assert_eq!(out, b"{2}\r\n\xc3\xa9");
        out.clear();
        nstring(&mut out, None);
        assert_eq!(out, b"NIL");
        for (name, encoded) in [
            ("owatagusiam/blurdybloop", "owatagusiam/blurdybloop"),
            ("[Gmail]/Sent", "[Gmail]/Sent"),
            ("two words", "\"two words\""),
            ("50%", "\"50%\""),
            ("", "\"\""),
        ] {
            out.clear();
            astring(&mut out, name.as_bytes());
            assert_eq!(String::from_utf8_lossy(&out), encoded);
        }
    }
}
