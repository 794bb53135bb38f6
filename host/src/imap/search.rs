//! SEARCH criteria (RFC 9051 §6.4.4) evaluated against one message. Flag, size, date and set
//! criteria use the listing only; header and text criteria read the message, once, lazily.
//! String matches are case-insensitive substring matches, as the RFC asks; header values are
//! decoded (RFC 2047) and bodies are searched both as sent and as decoded text.

use std::sync::Arc;

use chrono::{NaiveDate, TimeZone, Utc};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use mail_parser::{HeaderName, MessageParser};

use crate::store::{Flags, MessageInfo};

/// (low, high) inclusive ranges with `*` resolved to `largest`, sorted and merged, so that
/// membership is a binary search and a walk over them never visits a number twice (a client
/// may send thousands of ranges, overlapping, in any order).
pub fn ranges(set: &SequenceSet, largest: u32) -> Vec<(u32, u32)> {
    let value = |v: &SeqOrUid| match v {
        SeqOrUid::Value(n) => n.get(),
        SeqOrUid::Asterisk => largest,
    };
    let mut ranges: Vec<(u32, u32)> = set
        .0
        .as_ref()
        .iter()
        .map(|sequence| match sequence {
            Sequence::Single(v) => (value(v), value(v)),
            Sequence::Range(a, b) => {
                let (a, b) = (value(a), value(b));
                (a.min(b), a.max(b))
            }
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (low, high) in ranges {
        match merged.last_mut() {
            Some(last) if low <= last.1.saturating_add(1) => last.1 = last.1.max(high),
            _ => merged.push((low, high)),
        }
    }
    merged
}

/// Whether `n` is in sorted, merged `ranges` (see [`ranges`]).
pub fn contains(ranges: &[(u32, u32)], n: u32) -> bool {
    let at = ranges.partition_point(|(_, high)| *high < n);
    ranges.get(at).is_some_and(|(low, _)| *low <= n)
}

/// The ranges of each sequence set of one SEARCH key, computed once for the whole folder
/// instead of once per message. Sets are told apart by their address, which is sound because
/// the cache borrows the key for its whole life: no set of it can move or be dropped meanwhile.
pub struct SetCache<'k> {
    _key: std::marker::PhantomData<&'k ()>,
    /// (set address, what `*` means) → its ranges.
    sets: std::cell::RefCell<std::collections::HashMap<(usize, u32), Ranges>>,
}

/// Sorted, merged inclusive ranges (see [`ranges`]).
type Ranges = Arc<[(u32, u32)]>;

impl<'k> SetCache<'k> {
    pub fn new(_key: &'k SearchKey<'_>) -> SetCache<'k> {
        SetCache {
            _key: std::marker::PhantomData,
            sets: Default::default(),
        }
    }

    fn ranges(&self, set: &SequenceSet, largest: u32) -> Ranges {
        let key = (set as *const SequenceSet as usize, largest);
        self.sets
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| ranges(set, largest).into())
            .clone()
    }
}

/// Fields whose values are address lists.
const ADDRESS_FIELDS: [&str; 6] = ["From", "To", "Cc", "Bcc", "Sender", "Reply-To"];

/// An address field's text with comments removed and no white space around `@` and `.`.
fn without_comments(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let (mut depth, mut quoted, mut escaped) = (0u32, false, false);
    for c in raw.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    let mut tight = String::with_capacity(out.len());
    let chars: Vec<char> = out.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if c.is_whitespace() {
            let prev = chars[..i].iter().rev().find(|c| !c.is_whitespace());
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(prev, Some('@') | Some('.')) || matches!(next, Some('@') | Some('.')) {
                continue;
            }
        }
        tight.push(*c);
    }
    tight
}

type Loader<'a, T> = &'a mut dyn FnMut() -> Option<T>;

/// What a search by field `name` matches in one field `header` parsed from `bytes`: the field
/// as written (unfolded) and decoded (RFC 2047), and for address fields the addresses without
/// comments and folding (RFC 5322 §3.4.1: `<user (c)@ (c) domain>` is user@domain).
fn field_value(name: &str, bytes: &[u8], header: &mail_parser::Header<'_>) -> String {
    let raw = bytes
        .get(header.offset_start as usize..header.offset_end as usize)
        .unwrap_or_default();
    let raw = String::from_utf8_lossy(raw).replace("\r\n", "");
    let decoded = match &header.value {
        mail_parser::HeaderValue::Text(t) => t.to_string(),
        _ => String::new(),
    };
    let mut value = format!("{} {decoded}", raw.trim());
    if ADDRESS_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(name)) {
        value.push(' ');
        value.push_str(&without_comments(&raw));
    }
    value
}

/// The fields of a header section named `name` (ASCII case ignored, RFC 5322 §1.2.2), each from
/// its name to the end of its last folded line (§2.2.3), in order. A line that is neither a
/// field nor a continuation of one ends nothing: like the parser, the scan goes on to the
/// blank line that ends the section.
fn fields_named<'h>(header: &'h [u8], name: &str) -> Vec<&'h [u8]> {
    let name = name.as_bytes();
    let mut fields: Vec<&[u8]> = Vec::new();
    // Start of the field being gathered, when it is one of those wanted.
    let mut open: Option<usize> = None;
    let mut at = 0;
    while at < header.len() {
        let end = memchr::memchr(b'\n', &header[at..]).map_or(header.len(), |i| at + i + 1);
        let line = &header[at..end];
        if matches!(line.first(), Some(b' ' | b'\t')) {
            at = end; // folded: part of the field before
            continue;
        }
        if let Some(start) = open.take() {
            fields.push(&header[start..at]);
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let named = line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()..]
                .iter()
                .find(|b| !matches!(b, b' ' | b'\t'))
                == Some(&b':');
        if named {
            open = Some(at);
        }
        at = end;
    }
    if let Some(start) = open {
        fields.push(&header[start..at]);
    }
    fields
}

/// The message's header and bytes, each read on first use (header criteria need only the
/// header, which the store may have at hand).
pub struct Lazy<'a> {
    load_header: Loader<'a, Arc<[u8]>>,
    load: Loader<'a, Vec<u8>>,
    header: Option<Option<Arc<[u8]>>>,
    bytes: Option<Option<Vec<u8>>>,
    parsed_text: Option<String>,
}

impl<'a> Lazy<'a> {
    pub fn new(load_header: Loader<'a, Arc<[u8]>>, load: Loader<'a, Vec<u8>>) -> Lazy<'a> {
        Lazy {
            load_header,
            load,
            header: None,
            bytes: None,
            parsed_text: None,
        }
    }

    fn bytes(&mut self) -> Option<&[u8]> {
        if self.bytes.is_none() {
            self.bytes = Some((self.load)());
        }
        self.bytes.as_ref().and_then(|b| b.as_deref())
    }

    /// The header section: from the whole message when that was read already.
    fn header(&mut self) -> Option<&[u8]> {
        if let Some(Some(bytes)) = &self.bytes {
            return Some(&bytes[..crate::message::body_offset(bytes)]);
        }
        if self.header.is_none() {
            self.header = Some((self.load_header)());
        }
        self.header.as_ref().and_then(|h| h.as_deref())
    }

    fn header_values(&mut self, name: &str) -> Vec<String> {
        let Some(bytes) = self.header() else {
            return Vec::new();
        };
        // Only the fields of that name are handed to the parser: a search reads a field of
        // every message in the folder, and parsing whole header sections to skip the other
        // fields was half of its time.
        let fields = fields_named(bytes, name);
        if fields.is_empty() {
            return Vec::new();
        }
        let Some(wanted) = HeaderName::parse(name.to_string()) else {
            return Vec::new(); // not a field name any message can have
        };
        // The wanted field is decoded as text, not as addresses or a date.
        let parser = MessageParser::new()
            .default_header_ignore()
            .header_text(wanted.clone());
        let mut values = Vec::new();
        for field in fields {
            let Some(message) = parser.parse_headers(field) else {
                continue;
            };
            values.extend(
                message
                    .headers()
                    .iter()
                    .filter(|header| header.name == wanted)
                    .map(|header| field_value(name, field, header)),
            );
        }
        values
    }

    fn sent_date(&mut self) -> Option<NaiveDate> {
        let bytes = self.header()?;
        static DATE_ONLY: std::sync::LazyLock<MessageParser> = std::sync::LazyLock::new(|| {
            MessageParser::new()
                .default_header_ignore()
                .header_date(HeaderName::Date)
        });
        let message = DATE_ONLY.parse_headers(bytes)?;
        let date = message.date()?;
        // RFC 3501 §6.4.4: the Date field's day "disregarding time and timezone": the day as
        // written in the field's own zone, not converted to UTC.
        NaiveDate::from_ymd_opt(
            i32::from(date.year),
            u32::from(date.month),
            u32::from(date.day),
        )
    }

    /// The body as sent, then its decoded text parts, for TEXT and BODY.
    fn body_text(&mut self) -> String {
        if let Some(text) = &self.parsed_text {
            return text.clone();
        }
        let Some(bytes) = self.bytes() else {
            return String::new();
        };
        let body = &bytes[crate::message::body_offset(bytes)..];
        let mut text = String::from_utf8_lossy(body).into_owned();
        if let Some(message) = mail_parser::MessageParser::default().parse(bytes) {
            for i in 0..message.text_body.len() {
                if let Some(part) = message.body_text(i) {
                    text.push('\n');
                    text.push_str(&part);
                }
            }
        }
        let text = text.to_lowercase();
        self.parsed_text = Some(text.clone());
        text
    }

    fn whole_text(&mut self) -> String {
        let header = match self.bytes() {
            Some(bytes) => {
                String::from_utf8_lossy(&bytes[..crate::message::body_offset(bytes)]).to_lowercase()
            }
            None => String::new(),
        };
        format!("{header}\n{}", self.body_text())
    }
}

/// What a message is measured against.
pub struct Subject<'a> {
    pub seq: u32,
    pub info: &'a MessageInfo,
    /// The highest sequence number and UID in the mailbox (what `*` means).
    pub last_seq: u32,
    pub last_uid: u32,
    /// Sequence sets of the search, resolved once.
    pub sets: &'a SetCache<'a>,
    /// The session sees the message as \Recent (always false under IMAP4rev2).
    pub recent: bool,
    /// RFC 5182: when the command named `$`, the saved result (UIDs, ascending).
    pub saved: Option<&'a [u32]>,
}

/// Whether `set` is the stand-in for `$` (see `codec::SAVED_RESULT_SET`).
pub fn is_saved_set(set: &SequenceSet) -> bool {
    matches!(set.0.as_ref(), [Sequence::Single(SeqOrUid::Value(n))] if n.get() == u32::MAX)
}

/// Whether a message has a keyword, by name.
fn has_keyword(subject: &Subject<'_>, word: &str) -> bool {
    if word.eq_ignore_ascii_case("$Forwarded") {
        return subject.info.flags.contains(Flags::FORWARDED);
    }
    subject.info.keywords.contains(word)
}

fn has(haystack: &str, needle: &[u8]) -> bool {
    let needle = String::from_utf8_lossy(needle).to_lowercase();
    haystack.to_lowercase().contains(&needle)
}

fn internal_day(info: &MessageInfo) -> NaiveDate {
    Utc.timestamp_opt(info.received_at, 0)
        .single()
        .unwrap_or_default()
        .date_naive()
}

/// Whether the criteria read header fields, so a search can fetch every header at once (one
/// store call, one crossing for a backend behind a boundary) instead of one at a time.
pub fn uses_header(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::From(_)
        | SearchKey::To(_)
        | SearchKey::Cc(_)
        | SearchKey::Bcc(_)
        | SearchKey::Subject(_)
        | SearchKey::Header(..)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_)
        | SearchKey::Text(_) => true,
        SearchKey::And(keys) => keys.as_ref().iter().any(uses_header),
        SearchKey::Or(a, b) => uses_header(a) || uses_header(b),
        SearchKey::Not(k) => uses_header(k),
        _ => false,
    }
}

/// Whether the criteria read message bodies (BODY, TEXT), not only headers and the listing.
pub fn uses_body(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::Body(_) | SearchKey::Text(_) => true,
        SearchKey::And(keys) => keys.as_ref().iter().any(uses_body),
        SearchKey::Or(a, b) => uses_body(a) || uses_body(b),
        SearchKey::Not(k) => uses_body(k),
        _ => false,
    }
}

/// Whether the criteria use MODSEQ (the SEARCH response then tells the highest one found).
pub fn uses_modseq(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::ModSequence { .. } => true,
        SearchKey::And(keys) => keys.as_ref().iter().any(uses_modseq),
        SearchKey::Or(a, b) => uses_modseq(a) || uses_modseq(b),
        SearchKey::Not(k) => uses_modseq(k),
        _ => false,
    }
}

pub fn matches(key: &SearchKey<'_>, subject: &Subject<'_>, message: &mut Lazy<'_>) -> bool {
    let flags = subject.info.flags;
    let flag = |f: Flags| flags.contains(f);
    let header = |message: &mut Lazy<'_>, name: &str, needle: &[u8]| {
        message
            .header_values(name)
            .iter()
            .any(|value| has(value, needle))
    };
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().all(|k| matches(k, subject, message)),
        SearchKey::Or(a, b) => matches(a, subject, message) || matches(b, subject, message),
        SearchKey::Not(k) => !matches(k, subject, message),
        SearchKey::All => true,
        SearchKey::SequenceSet(set) | SearchKey::Uid(set)
            if subject.saved.is_some() && is_saved_set(set) =>
        {
            subject
                .saved
                .is_some_and(|saved| saved.binary_search(&subject.info.uid).is_ok())
        }
        SearchKey::SequenceSet(set) => {
            contains(&subject.sets.ranges(set, subject.last_seq), subject.seq)
        }
        SearchKey::Uid(set) => contains(
            &subject.sets.ranges(set, subject.last_uid),
            subject.info.uid,
        ),
        SearchKey::Answered => flag(Flags::ANSWERED),
        SearchKey::Unanswered => !flag(Flags::ANSWERED),
        SearchKey::Deleted => flag(Flags::DELETED),
        SearchKey::Undeleted => !flag(Flags::DELETED),
        SearchKey::Draft => flag(Flags::DRAFT),
        SearchKey::Undraft => !flag(Flags::DRAFT),
        SearchKey::Flagged => flag(Flags::FLAGGED),
        SearchKey::Unflagged => !flag(Flags::FLAGGED),
        SearchKey::Seen => flag(Flags::SEEN),
        SearchKey::Unseen => !flag(Flags::SEEN),
        // RFC 3501 §6.4.4: NEW is RECENT UNSEEN, OLD is NOT RECENT.
        SearchKey::New => subject.recent && !flag(Flags::SEEN),
        SearchKey::Old => !subject.recent,
        SearchKey::Recent => subject.recent,
        SearchKey::Keyword(word) => has_keyword(subject, word.as_ref()),
        SearchKey::Unkeyword(word) => !has_keyword(subject, word.as_ref()),
        // RFC 7162 §3.1.5: messages whose mod-sequence is at least the value (the entry
        // name and type only narrow it down for servers that keep per-flag mod-sequences).
        SearchKey::ModSequence { modseq, .. } => subject.info.modseq >= *modseq,
        SearchKey::Larger(n) => subject.info.size > u64::from(*n),
        SearchKey::Smaller(n) => subject.info.size < u64::from(*n),
        SearchKey::Before(date) => internal_day(subject.info) < *date.as_ref(),
        SearchKey::On(date) => internal_day(subject.info) == *date.as_ref(),
        SearchKey::Since(date) => internal_day(subject.info) >= *date.as_ref(),
        SearchKey::SentBefore(date) => message.sent_date().is_some_and(|d| d < *date.as_ref()),
        SearchKey::SentOn(date) => message.sent_date().is_some_and(|d| d == *date.as_ref()),
        SearchKey::SentSince(date) => message.sent_date().is_some_and(|d| d >= *date.as_ref()),
        SearchKey::From(s) => header(message, "From", s.as_ref()),
        SearchKey::To(s) => header(message, "To", s.as_ref()),
        SearchKey::Cc(s) => header(message, "Cc", s.as_ref()),
        SearchKey::Bcc(s) => header(message, "Bcc", s.as_ref()),
        SearchKey::Subject(s) => header(message, "Subject", s.as_ref()),
        SearchKey::Header(name, value) => {
            let name = String::from_utf8_lossy(name.as_ref()).into_owned();
            let values = message.header_values(&name);
            // RFC 9051: an empty string matches every message that has the field.
            !values.is_empty()
                && (value.as_ref().is_empty() || values.iter().any(|v| has(v, value.as_ref())))
        }
        SearchKey::Body(s) => has(&message.body_text(), s.as_ref()),
        SearchKey::Text(s) => has(&message.whole_text(), s.as_ref()),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::imap_types::core::AString;

    fn info(uid: u32, flags: Flags, size: u64) -> MessageInfo {
        MessageInfo {
            uid,
            key: format!("k{uid}"),
            handle: Default::default(),
            size,
            flags,
            keywords: Default::default(),
            received_at: 1_795_300_000,
            modseq: 40,
        }
    }

    /// What `header_values` gave when it parsed the whole header section: the scan for the
    /// wanted fields must give the same.
    fn values_from_whole_section(bytes: &[u8], name: &str) -> Vec<String> {
        let wanted = HeaderName::parse(name.to_string()).unwrap();
        let parser = MessageParser::new()
            .default_header_ignore()
            .header_text(wanted.clone());
        let Some(message) = parser.parse_headers(bytes) else {
            return Vec::new();
        };
        message
            .headers()
            .iter()
            .filter(|header| header.name == wanted)
            .map(|header| field_value(name, bytes, header))
            .collect()
    }

    #[test]
    fn a_field_is_found_and_decoded_as_in_the_whole_section() {
        let sections: [&[u8]; 9] = [
            b"From: Alice <alice@example.test>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= lunch\r\nTo: b@example.test\r\n\r\n",
            b"subject: lower case\r\nSUBJECT: upper, twice\r\n\r\nbody Subject: no\r\n",
            b"Subject: folded\r\n  over\r\n\tthree lines\r\nX: y\r\n\r\n",
            b"Subject : space before the colon\r\n\r\n",
            b"Subjects: another field\r\nSubject-X: and another\r\n\r\n",
            b"Subject: bare LF\nFrom: (comment) <a (c)@ (c) example.test>\n\n",
            b"From: first\r\nnot a field line\r\nSubject: after junk\r\n\r\n",
            b"Subject: no blank line at the end",
            b"To: =?iso-8859-1?q?J=F6rg?= <j@example.test>,\r\n (folded) k@example.test\r\nCc: <c@example.test>\r\n\r\n",
        ];
        let mut found = 0;
        for section in sections {
            for name in ["Subject", "From", "To", "Cc", "X", "Subject-X", "Missing"] {
                let mut load_header = || Some(Arc::<[u8]>::from(section));
                let mut load = || None;
                let mut lazy = Lazy::new(&mut load_header, &mut load);
                let values = lazy.header_values(name);
                assert_eq!(
                    values,
                    values_from_whole_section(section, name),
                    "{name} in {:?}",
                    String::from_utf8_lossy(section)
                );
                found += values.len();
            }
        }
        assert_eq!(found, 16);
        let mut load_header = || Some(Arc::<[u8]>::from(sections[0]));
        let mut load = || None;
        let mut lazy = Lazy::new(&mut load_header, &mut load);
        assert_eq!(
            lazy.header_values("subject"),
            ["=?utf-8?q?Gr=C3=BC=C3=9Fe?= lunch Grüße lunch"]
        );
    }

    #[test]
    fn criteria() {
        let raw = b"From: Alice <alice@example.test>\r\nTo: =?utf-8?q?J=C3=B6rg?= <j@example.test>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= lunch\r\nDate: Sun, 22 Nov 2026 09:00:00 +0000\r\nX-Ticket: folded\r\n  value 42\r\n\r\nLet us meet at noon.\r\n".to_vec();
        let mut message = info(7, Flags::SEEN, raw.len() as u64);
        message.keywords = crate::store::Keywords::from_names(["Work"]);
        let check = |key: SearchKey<'_>| {
            let sets = SetCache::new(&key);
            let subject = Subject {
                seq: 3,
                info: &message,
                last_seq: 5,
                last_uid: 9,
                sets: &sets,
                recent: false,
                saved: None,
            };
            let header: Arc<[u8]> = Arc::from(&raw[..crate::message::body_offset(&raw)]);
            let mut load_header = move || Some(header.clone());
            let raw = raw.clone();
            let mut load = move || Some(raw.clone());
            let mut lazy = Lazy::new(&mut load_header, &mut load);
            matches(&key, &subject, &mut lazy)
        };
        let s = |t: &'static str| AString::try_from(t).unwrap();
        assert!(check(SearchKey::Seen));
        assert!(!check(SearchKey::Unseen));
        assert!(check(SearchKey::From(s("ALICE"))));
        assert!(check(SearchKey::Subject(s("grüße"))), "decoded subject");
        assert!(check(SearchKey::Subject(s("lunch"))));
        assert!(check(SearchKey::Body(s("NOON"))));
        assert!(
            !check(SearchKey::Body(s("alice"))),
            "BODY is not the header"
        );
        assert!(check(SearchKey::Text(s("alice"))));
        assert!(check(SearchKey::To(s("jörg"))), "decoded display name");
        assert!(check(SearchKey::To(s("=?utf-8?q?J"))), "as sent too");
        assert!(check(SearchKey::To(s("j@example.test"))));
        assert!(!check(SearchKey::Cc(s("j@example.test"))));
        assert!(
            check(SearchKey::Header(s("x-TICKET"), s("value 42"))),
            "unfolded"
        );
        assert!(!check(SearchKey::Header(s("x-ticket"), s("43"))));
        assert!(!check(SearchKey::Header(s("bad name"), s(""))));
        assert!(check(SearchKey::Header(s("date"), s(""))));
        assert!(!check(SearchKey::Header(s("cc"), s(""))));
        assert!(check(SearchKey::Uid(SequenceSet::try_from("5:*").unwrap())));
        assert!(!check(SearchKey::Uid(
            SequenceSet::try_from("8:*").unwrap()
        )));
        assert!(check(SearchKey::SequenceSet(
            SequenceSet::try_from("1,3").unwrap()
        )));
        assert!(check(SearchKey::Not(Box::new(SearchKey::Deleted))));
        assert!(check(SearchKey::Or(
            Box::new(SearchKey::Deleted),
            Box::new(SearchKey::Seen)
        )));
        let day = NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
        assert!(check(SearchKey::SentOn(day.try_into().unwrap())));
        assert!(check(SearchKey::Larger(10)));
        let atom = |t: &'static str| imap_codec::imap_types::core::Atom::try_from(t).unwrap();
        assert!(check(SearchKey::Keyword(atom("work"))));
        assert!(!check(SearchKey::Keyword(atom("$Junk"))));
        assert!(check(SearchKey::Unkeyword(atom("Unknown"))));
        assert!(check(SearchKey::ModSequence {
            entry: None,
            modseq: 40
        }));
        assert!(!check(SearchKey::ModSequence {
            entry: None,
            modseq: 41
        }));
        assert!(!check(SearchKey::Smaller(10)));
    }
}
