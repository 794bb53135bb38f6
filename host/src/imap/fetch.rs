//! What FETCH returns about one message: flags and dates from the store's listing; ENVELOPE,
//! BODYSTRUCTURE and body sections from the message, parsed by mail-parser (RFC 9051 §7.5.2).
//!
//! mail-parser keeps every part's offsets into the original bytes, so sections are cut from the
//! message exactly as stored; nothing is re-encoded.

use std::num::NonZeroU32;

use chrono::{TimeZone, Utc};
use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::fetch::{Part, Section};
use mail_parser::{Address, HeaderName, HeaderValue, Message, MessagePart, MimeHeaders, PartType};

use super::codec::{astring, literal, nstring, string};
use crate::store::{Flags, Keywords};

/// `(\Seen \Flagged $Junk)`: a message's flags and keywords.
/// `recent`: the session sees the message as \Recent (IMAP4rev1 only).
pub fn flags(out: &mut Vec<u8>, flags: Flags, keywords: &Keywords, recent: bool) {
    out.push(b'(');
    let mut first = !recent;
    if recent {
        out.extend_from_slice(b"\\Recent");
    }
    let mut put = |out: &mut Vec<u8>, name: &str| {
        if !first {
            out.push(b' ');
        }
        out.extend_from_slice(name.as_bytes());
        first = false;
    };
    for (flag, name) in Flags::NAMES {
        if flags.contains(flag) {
            put(out, name);
        }
    }
    for name in keywords.iter() {
        put(out, name);
    }
    out.push(b')');
}

/// The flags a folder can have, for the FLAGS response and (with `\*` when the store takes new
/// keywords) PERMANENTFLAGS.
pub fn flag_list(keywords: &[String], permanent: bool, more_keywords: bool) -> String {
    let mut list = String::from("(\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded");
    for keyword in keywords.iter().filter(|k| !k.starts_with('\\')) {
        list.push(' ');
        list.push_str(keyword);
    }
    if permanent && more_keywords {
        list.push_str(" \\*");
    }
    list.push(')');
    list
}

/// RFC 9051 `date-time`: `"22-Nov-2026 09:30:00 +0000"`.
pub fn internal_date(unix: i64) -> String {
    let when = Utc.timestamp_opt(unix, 0).single().unwrap_or_default();
    format!("\"{}\"", when.format("%d-%b-%Y %H:%M:%S +0000"))
}

/// Parses what FETCH answers from: the MIME fields (BODYSTRUCTURE, sections; Content-ID raw), the address
/// fields (ENVELOPE) and Content-Language; every other field stays raw (ENVELOPE sends Date,
/// Subject and the message IDs as they are), so no dates, trace fields or IDs are parsed
/// only to go unused.
static FETCH_PARSER: std::sync::LazyLock<mail_parser::MessageParser> =
    std::sync::LazyLock::new(|| {
        mail_parser::MessageParser::new()
            .with_mime_headers()
            // body-fld-id is the field as sent, angle brackets and all (as Dovecot and Cyrus
            // send it; the ID parser would strip them).
            .header_raw(HeaderName::ContentId)
            .with_address_headers()
            .header_comma_separated(HeaderName::ContentLanguage)
    });

/// A parsed message and the bytes it was parsed from.
pub struct Parsed<'a> {
    pub raw: &'a [u8],
    message: Option<Message<'a>>,
}

impl<'a> Parsed<'a> {
    pub fn new(raw: &'a [u8]) -> Parsed<'a> {
        Parsed {
            raw,
            message: FETCH_PARSER.parse(raw),
        }
    }

    fn slice(&self, from: u32, to: u32) -> &'a [u8] {
        let (from, to) = (from as usize, to as usize);
        self.raw
            .get(from.min(to)..to.min(self.raw.len()))
            .unwrap_or_default()
    }

    /// The header section (with its blank line) and the body of the whole message.
    fn split(&self) -> (&'a [u8], &'a [u8]) {
        let at = crate::message::body_offset(self.raw);
        (&self.raw[..at], &self.raw[at..])
    }

    /// The part a section path names, with the message it belongs to.
    fn resolve(&self, path: &[NonZeroU32]) -> Option<(&Message<'a>, usize)> {
        let mut message = self.message.as_ref()?;
        let mut index = 0usize;
        for (depth, n) in path.iter().enumerate() {
            if depth > 0 {
                if let PartType::Message(nested) = &message.parts.get(index)?.body {
                    message = nested;
                    index = 0;
                }
            }
            match &message.parts.get(index)?.body {
                PartType::Multipart(children) => {
                    index = *children.get(n.get() as usize - 1)? as usize;
                }
                _ if n.get() == 1 => {}
                _ => return None,
            }
        }
        Some((message, index))
    }

    /// The bytes of a section (RFC 9051 §6.4.5); None when the message has no such part.
    pub fn section(&self, section: Option<&Section<'_>>) -> Option<Vec<u8>> {
        let Some(section) = section else {
            return Some(self.raw.to_vec());
        };
        match section {
            Section::Part(Part(path)) => {
                let (message, index) = self.resolve(path.as_ref())?;
                let part = &message.parts[index];
                Some(self.slice(part.offset_body, part.offset_end).to_vec())
            }
            Section::Mime(Part(path)) => {
                let (message, index) = self.resolve(path.as_ref())?;
                let part = &message.parts[index];
                Some(self.slice(part.offset_header, part.offset_body).to_vec())
            }
            Section::Header(part) => Some(self.header_of(part.as_ref())?.to_vec()),
            Section::Text(part) => Some(self.text_of(part.as_ref())?.to_vec()),
            Section::HeaderFields(part, names) => {
                let header = self.header_of(part.as_ref())?;
                Some(filter_fields(header, names.as_ref(), true))
            }
            Section::HeaderFieldsNot(part, names) => {
                let header = self.header_of(part.as_ref())?;
                Some(filter_fields(header, names.as_ref(), false))
            }
        }
    }

    /// The nested message a `n.HEADER`/`n.TEXT` section points at (`None` path: the message).
    fn nested(&self, part: Option<&Part>) -> Option<Option<&Message<'a>>> {
        match part {
            None => Some(None),
            Some(Part(path)) => {
                let (message, index) = self.resolve(path.as_ref())?;
                match &message.parts[index].body {
                    PartType::Message(nested) => Some(Some(nested)),
                    _ => None,
                }
            }
        }
    }

    fn header_of(&self, part: Option<&Part>) -> Option<&'a [u8]> {
        match self.nested(part)? {
            None => Some(self.split().0),
            Some(nested) => {
                let root = nested.parts.first()?;
                Some(self.slice(root.offset_header, root.offset_body))
            }
        }
    }

    fn text_of(&self, part: Option<&Part>) -> Option<&'a [u8]> {
        match self.nested(part)? {
            None => Some(self.split().1),
            Some(nested) => {
                let root = nested.parts.first()?;
                // The nested message's text runs to the end of the part that holds it: a
                // multipart's epilogue is text too (the root part ends at its last boundary).
                let end = part
                    .and_then(|Part(path)| self.resolve(path.as_ref()))
                    .map_or(root.offset_end, |(message, index)| {
                        message.parts[index].offset_end
                    });
                Some(self.slice(root.offset_body, end.max(root.offset_body)))
            }
        }
    }

    /// BINARY[section]: the part's content with its transfer encoding undone (RFC 3516).
    pub fn binary(&self, path: &[NonZeroU32]) -> Option<Vec<u8>> {
        if path.is_empty() {
            return Some(self.raw.to_vec());
        }
        let (message, index) = self.resolve(path)?;
        let part = &message.parts[index];
        let raw = self.slice(part.offset_body, part.offset_end);
        let encoding = part
            .content_transfer_encoding()
            .unwrap_or("7bit")
            .to_ascii_lowercase();
        Some(match encoding.as_str() {
            "base64" => {
                use base64::Engine as _;
                let clean: Vec<u8> = raw
                    .iter()
                    .copied()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect();
                base64::engine::general_purpose::STANDARD
                    .decode(&clean)
                    .or_else(|_| {
                        base64::engine::general_purpose::STANDARD_NO_PAD
                            .decode(clean.trim_ascii_end().strip_suffix(b"=").unwrap_or(&clean))
                    })
                    .ok()?
            }
            "quoted-printable" => quoted_printable(raw),
            _ => raw.to_vec(),
        })
    }

    pub fn envelope(&self, out: &mut Vec<u8>) {
        match &self.message {
            Some(message) => envelope(out, message),
            None => out.extend_from_slice(b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"),
        }
    }

    /// BODY (`extensible = false`) or BODYSTRUCTURE.
    pub fn structure(&self, out: &mut Vec<u8>, extensible: bool) {
        match &self.message {
            Some(message) => structure(out, self, message, 0, extensible),
            None => {
                let lines = memchr::memchr_iter(b'\n', self.raw).count();
                out.extend_from_slice(
                    format!(
                        "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" {} {lines})",
                        self.raw.len()
                    )
                    .as_bytes(),
                );
            }
        }
    }
}

/// Quoted-printable decoding (RFC 2045 §6.7), line by line: whitespace at the end of a line is
/// transport padding and goes (rule 3); a line that then ends in `=` is a soft break and joins
/// the next (rule 5); `=XX` is the octet XX; a stray `=` stays as it is.
fn quoted_printable(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while !rest.is_empty() {
        let (line, ending, next) = match memchr::memchr(b'\n', rest) {
            Some(at) if at > 0 && rest[at - 1] == b'\r' => {
                (&rest[..at - 1], &b"\r\n"[..], &rest[at + 1..])
            }
            Some(at) => (&rest[..at], &b"\n"[..], &rest[at + 1..]),
            None => (rest, &b""[..], &b""[..]),
        };
        rest = next;
        let line = line.trim_ascii_end();
        let (line, soft) = match line.strip_suffix(b"=") {
            Some(joined) => (joined, true),
            None => (line, false),
        };
        let mut i = 0;
        while i < line.len() {
            let byte = (line[i] == b'=')
                .then(|| line.get(i + 1..i + 3))
                .flatten()
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match byte {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    out.push(line[i]);
                    i += 1;
                }
            }
        }
        if !soft {
            out.extend_from_slice(ending);
        }
    }
    out
}

/// The header fields named (or, with `keep = false`, all but those), then the blank line.
fn filter_fields(header: &[u8], names: &[AString<'_>], keep: bool) -> Vec<u8> {
    let wanted: Vec<String> = names
        .iter()
        .map(|n| String::from_utf8_lossy(n.as_ref()).to_ascii_lowercase())
        .collect();
    let mut out = Vec::new();
    for field in crate::message::parse_fields(header) {
        if wanted.contains(&field.name.to_ascii_lowercase()) == keep {
            out.extend_from_slice(&field.raw);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn unfolded(message: &Message<'_>, name: HeaderName<'_>) -> Option<Vec<u8>> {
    let raw = message.header_raw(name)?;
    let text: String = raw.replace("\r\n", "").replace('\n', "");
    Some(text.trim().as_bytes().to_vec())
}

fn envelope(out: &mut Vec<u8>, message: &Message<'_>) {
    out.push(b'(');
    nstring(out, unfolded(message, HeaderName::Date).as_deref());
    out.push(b' ');
    nstring(out, unfolded(message, HeaderName::Subject).as_deref());
    let from = message.header(HeaderName::From);
    for (name, fallback) in [
        (HeaderName::From, None),
        (HeaderName::Sender, from),
        (HeaderName::ReplyTo, from),
        (HeaderName::To, None),
        (HeaderName::Cc, None),
        (HeaderName::Bcc, None),
    ] {
        out.push(b' ');
        // RFC 3501 §7.4.2: Sender and Reply-To absent *or empty* are the From member.
        let value = message.header(name).filter(|v| has_addresses(v));
        addresses(out, value.or(fallback));
    }
    out.push(b' ');
    nstring(out, unfolded(message, HeaderName::InReplyTo).as_deref());
    out.push(b' ');
    nstring(out, unfolded(message, HeaderName::MessageId).as_deref());
    out.push(b')');
}

fn address(out: &mut Vec<u8>, name: Option<&str>, email: Option<&str>) {
    out.push(b'(');
    nstring(out, name.map(str::as_bytes));
    out.push(b' ');
    // RFC 5322 §4.4 obsolete source route `<@a,@b:user@domain>`: the envelope's adl member.
    let (route, email) = match email.and_then(|e| e.strip_prefix('@').map(|_| e)) {
        Some(routed) => match routed.split_once(':') {
            Some((route, rest)) => (Some(route), Some(rest)),
            None => (None, Some(routed)),
        },
        None => (None, email),
    };
    nstring(out, route.map(str::as_bytes));
    out.push(b' ');
    let (local, domain) = match email {
        Some(email) => match email.rsplit_once('@') {
            Some((l, d)) => (Some(l), Some(d)),
            None => (Some(email), None),
        },
        None => (None, None),
    };
    nstring(out, local.map(str::as_bytes));
    out.push(b' ');
    nstring(out, domain.map(str::as_bytes));
    out.push(b')');
}

/// Whether an address field holds at least one address or group.
fn has_addresses(value: &HeaderValue<'_>) -> bool {
    match value {
        HeaderValue::Address(Address::List(list)) => !list.is_empty(),
        HeaderValue::Address(Address::Group(groups)) => !groups.is_empty(),
        _ => false,
    }
}

fn addresses(out: &mut Vec<u8>, value: Option<&HeaderValue<'_>>) {
    let Some(HeaderValue::Address(list)) = value else {
        out.extend_from_slice(b"NIL");
        return;
    };
    let start = out.len();
    out.push(b'(');
    match list {
        Address::List(addrs) => {
            for addr in addrs {
                address(out, addr.name.as_deref(), addr.address.as_deref());
            }
        }
        Address::Group(groups) => {
            for group in groups {
                if let Some(name) = &group.name {
                    // RFC 9051 §7.5.2: a group is (NIL NIL "name" NIL) … (NIL NIL NIL NIL).
                    out.extend_from_slice(b"(NIL NIL ");
                    string(out, name.as_bytes());
                    out.extend_from_slice(b" NIL)");
                }
                // Inside a group, a member with no address is a comment or junk the parser
                // kept (`group2: (foo) ;` has no members), not a mailbox.
                let named = group.name.is_some();
                for addr in &group.addresses {
                    if named && addr.address.as_deref().is_none_or(str::is_empty) {
                        continue;
                    }
                    address(out, addr.name.as_deref(), addr.address.as_deref());
                }
                if group.name.is_some() {
                    out.extend_from_slice(b"(NIL NIL NIL NIL)");
                }
            }
        }
    }
    if out.len() == start + 1 {
        out.truncate(start);
        out.extend_from_slice(b"NIL");
    } else {
        out.push(b')');
    }
}

/// `("NAME" "value" …)` or NIL.
fn parameters(out: &mut Vec<u8>, attributes: Option<&[mail_parser::Attribute<'_>]>) {
    match attributes {
        Some(attributes) if !attributes.is_empty() => {
            out.push(b'(');
            for (i, attribute) in attributes.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                string(out, attribute.name.to_ascii_uppercase().as_bytes());
                out.push(b' ');
                string(out, attribute.value.as_bytes());
            }
            out.push(b')');
        }
        _ => out.extend_from_slice(b"NIL"),
    }
}

/// The extension data after the basic fields: disposition, language, location.
fn extension_tail(out: &mut Vec<u8>, part: &MessagePart<'_>) {
    out.push(b' ');
    match part.content_disposition() {
        Some(disposition) => {
            out.push(b'(');
            string(out, disposition.c_type.to_ascii_uppercase().as_bytes());
            out.push(b' ');
            parameters(out, disposition.attributes());
            out.push(b')');
        }
        None => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    match part.content_language() {
        HeaderValue::Text(language) => {
            out.push(b'(');
            string(out, language.as_bytes());
            out.push(b')');
        }
        HeaderValue::TextList(languages) if !languages.is_empty() => {
            out.push(b'(');
            for (i, language) in languages.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                string(out, language.as_bytes());
            }
            out.push(b')');
        }
        _ => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    nstring(out, part.content_location().map(str::as_bytes));
}

fn structure(
    out: &mut Vec<u8>,
    parsed: &Parsed<'_>,
    message: &Message<'_>,
    index: usize,
    extensible: bool,
) {
    let Some(part) = message.parts.get(index) else {
        out.extend_from_slice(b"NIL");
        return;
    };
    let content_type = part.content_type();
    let (main, sub) = match content_type {
        Some(ct) => (
            ct.c_type.to_ascii_uppercase(),
            ct.c_subtype
                .as_deref()
                .map(str::to_ascii_uppercase)
                .unwrap_or_else(|| "PLAIN".into()),
        ),
        None => ("TEXT".to_string(), "PLAIN".to_string()),
    };
    if let PartType::Multipart(children) = &part.body {
        out.push(b'(');
        if children.is_empty() {
            // RFC 9051 needs at least one body; an empty multipart shows an empty text part.
            out.extend_from_slice(b"(\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 0 0)");
        }
        for child in children {
            structure(out, parsed, message, *child as usize, extensible);
        }
        out.push(b' ');
        string(out, sub.as_bytes());
        if extensible {
            out.push(b' ');
            parameters(out, content_type.and_then(|c| c.attributes()));
            extension_tail(out, part);
        }
        out.push(b')');
        return;
    }
    let body = parsed.slice(part.offset_body, part.offset_end);
    out.push(b'(');
    string(out, main.as_bytes());
    out.push(b' ');
    string(out, sub.as_bytes());
    out.push(b' ');
    match content_type.and_then(|c| c.attributes()) {
        Some(attributes) => parameters(out, Some(attributes)),
        None if main == "TEXT" => out.extend_from_slice(b"(\"CHARSET\" \"US-ASCII\")"),
        None => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    nstring(out, part.content_id().map(str::as_bytes));
    out.push(b' ');
    nstring(out, part.content_description().map(str::as_bytes));
    out.push(b' ');
    let encoding = part
        .content_transfer_encoding()
        .unwrap_or("7BIT")
        .to_ascii_uppercase();
    string(out, encoding.as_bytes());
    out.extend_from_slice(format!(" {}", body.len()).as_bytes());
    // Text lines: a last line without its line end still counts.
    let lines = memchr::memchr_iter(b'\n', body).count()
        + usize::from(!body.is_empty() && !body.ends_with(b"\n"));
    match &part.body {
        PartType::Message(nested) => {
            out.push(b' ');
            envelope(out, nested);
            out.push(b' ');
            structure(out, parsed, nested, 0, extensible);
            out.extend_from_slice(format!(" {lines}").as_bytes());
        }
        _ if main == "TEXT" => out.extend_from_slice(format!(" {lines}").as_bytes()),
        _ => {}
    }
    if extensible {
        out.extend_from_slice(b" NIL"); // MD5
        extension_tail(out, part);
    }
    out.push(b')');
}

/// `BODY[section]<origin>` data: the name as the client will match it, then the bytes.
pub fn section_data(
    out: &mut Vec<u8>,
    name: &str,
    data: Option<&[u8]>,
    partial: Option<(u32, NonZeroU32)>,
) {
    out.extend_from_slice(name.as_bytes());
    let Some(data) = data else {
        out.extend_from_slice(b" NIL");
        return;
    };
    let data = match partial {
        Some((start, length)) => {
            out.extend_from_slice(format!("<{start}> ").as_bytes());
            let start = (start as usize).min(data.len());
            let end = start.saturating_add(length.get() as usize).min(data.len());
            &data[start..end]
        }
        None => {
            out.push(b' ');
            data
        }
    };
    // RFC 3516 §4.3: decoded content with a NUL goes as a literal8; other literals may not
    // carry one (RFC 9051 §4.3: CHAR8 excludes NUL), so BODY[] data has each NUL sent as 0x80,
    // as Dovecot does: the size and every other octet stay as stored.
    if !data.contains(&0) {
        literal(out, data);
    } else if name.starts_with("BINARY[") {
        out.push(b'~');
        literal(out, data);
    } else {
        let cleaned: Vec<u8> = data
            .iter()
            .map(|b| if *b == 0 { 0x80 } else { *b })
            .collect();
        literal(out, &cleaned);
    }
}

/// The section's name in a response (`BODY[1.HEADER.FIELDS (FROM TO)]`).
pub fn section_name(section: Option<&Section<'_>>) -> String {
    let part = |p: &Part| {
        p.0.as_ref()
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(".")
    };
    let with = |p: &Option<Part>, what: &str| match p {
        Some(p) => format!("{}.{what}", part(p)),
        None => what.to_string(),
    };
    let names = |list: &[AString<'_>]| {
        list.iter()
            .map(|n| {
                let mut out = Vec::new();
                astring(
                    &mut out,
                    String::from_utf8_lossy(n.as_ref())
                        .to_ascii_uppercase()
                        .as_bytes(),
                );
                String::from_utf8_lossy(&out).into_owned()
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    match section {
        None => String::new(),
        Some(Section::Part(p)) => part(p),
        Some(Section::Mime(p)) => format!("{}.MIME", part(p)),
        Some(Section::Header(p)) => with(p, "HEADER"),
        Some(Section::Text(p)) => with(p, "TEXT"),
        Some(Section::HeaderFields(p, list)) => {
            format!("{} ({})", with(p, "HEADER.FIELDS"), names(list.as_ref()))
        }
        Some(Section::HeaderFieldsNot(p, list)) => {
            format!(
                "{} ({})",
                with(p, "HEADER.FIELDS.NOT"),
                names(list.as_ref())
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::imap_types::core::Vec1;

    const MULTI: &[u8] = b"From: Alice <alice@example.test>\r\nTo: bob@example.test, \"Carol C\" <carol@c.test>\r\nSubject: parts\r\nDate: Sun, 22 Nov 2026 09:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\nworld\r\n--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"a.bin\"\r\n\r\nAAECAw==\r\n--XX\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nFrom: x@y.test\r\n\r\ninner body\r\n--XX--\r\n";

    fn part(path: &[u32]) -> Part {
        Part(
            Vec1::try_from(
                path.iter()
                    .map(|n| NonZeroU32::new(*n).unwrap())
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn sections_are_cut_from_the_original_bytes() {
        let parsed = Parsed::new(MULTI);
        let text = |s: Section<'_>| String::from_utf8(parsed.section(Some(&s)).unwrap()).unwrap();
        assert_eq!(text(Section::Part(part(&[1]))), "hello\r\nworld");
        assert_eq!(
            text(Section::Mime(part(&[1]))),
            "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        );
        assert_eq!(text(Section::Part(part(&[2]))), "AAECAw==");
        assert_eq!(
            parsed.binary(part(&[2]).0.as_ref()).unwrap(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(
            text(Section::Header(Some(part(&[3])))),
            "Subject: inner\r\nFrom: x@y.test\r\n\r\n"
        );
        assert_eq!(text(Section::Text(Some(part(&[3])))), "inner body");
        assert!(text(Section::Header(None)).ends_with("boundary=\"XX\"\r\n\r\n"));
        assert!(text(Section::Text(None)).starts_with("preamble\r\n--XX"));
        let fields = Section::HeaderFields(
            None,
            Vec1::try_from(vec![AString::try_from("subject").unwrap()]).unwrap(),
        );
        assert_eq!(text(fields), "Subject: parts\r\n\r\n");
        assert!(parsed.section(Some(&Section::Part(part(&[4])))).is_none());
    }

    #[test]
    fn single_part_message_is_its_own_part_one() {
        let raw = b"Subject: x\r\n\r\nbody\r\n";
        let parsed = Parsed::new(raw);
        assert_eq!(
            parsed.section(Some(&Section::Part(part(&[1])))).unwrap(),
            b"body\r\n"
        );
        let mut out = Vec::new();
        parsed.structure(&mut out, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 6 1)"
        );
    }

    #[test]
    fn envelope_and_structure() {
        let parsed = Parsed::new(MULTI);
        let mut out = Vec::new();
        parsed.envelope(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "(\"Sun, 22 Nov 2026 09:00:00 +0000\" \"parts\" ((\"Alice\" NIL \"alice\" \"example.test\")) ((\"Alice\" NIL \"alice\" \"example.test\")) ((\"Alice\" NIL \"alice\" \"example.test\")) ((NIL NIL \"bob\" \"example.test\")(\"Carol C\" NIL \"carol\" \"c.test\")) NIL NIL NIL \"<m1@example.test>\")"
        );
        let mut out = Vec::new();
        parsed.structure(&mut out, true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 12 2 NIL NIL NIL NIL)(\"APPLICATION\" \"OCTET-STREAM\" NIL NIL NIL \"BASE64\" 8 NIL (\"ATTACHMENT\" (\"FILENAME\" \"a.bin\")) NIL NIL)(\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 44 (NIL \"inner\" ((NIL NIL \"x\" \"y.test\"))"), "{text}");
        assert!(
            text.ends_with(" \"MIXED\" (\"BOUNDARY\" \"XX\") NIL NIL NIL)"),
            "{text}"
        );
    }

    #[test]
    fn extension_data_and_raw_fields_survive_the_narrow_parser() {
        let raw = b"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nIn-Reply-To: <a@x.test>\r\nMessage-ID: <b@x.test>\r\nContent-Type: text/plain; charset=utf-8\r\nContent-ID: <part@x.test>\r\nContent-Description: greeting\r\nContent-Language: en, de\r\nContent-Location: http://x.test/a\r\n\r\nhi\r\n";
        let parsed = Parsed::new(raw);
        let mut out = Vec::new();
        parsed.envelope(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "(\"Sun, 22 Nov 2026 09:00:00 +0000\" \"=?utf-8?q?Gr=C3=BC=C3=9Fe?=\" NIL NIL NIL NIL NIL NIL \"<a@x.test>\" \"<b@x.test>\")"
        );
        let mut out = Vec::new();
        parsed.structure(&mut out, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") \"<part@x.test>\" \"greeting\" \"7BIT\" 4 1 NIL NIL (\"en\" \"de\") \"http://x.test/a\")"
        );
    }

    #[test]
    fn internal_date_format() {
        assert_eq!(internal_date(0), "\"01-Jan-1970 00:00:00 +0000\"");
    }

    #[test]
    fn quoted_printable_drops_padding_and_joins_soft_breaks() {
        // imaptest's fetch-binary-mime-qp part, RFC 2045 §6.7 rules 3 and 5.
        let raw = b"hello  \r\nbar=\r\n\r\nfoo\t=\r\nbar\r\nfoo\t \t= \r\n=62\r\nfoo = \t\r\nbar\r\nfoo =\r\n=62\r\nfoo  \r\nbar=\r\n\r\nfoo_bar\r\n";
        assert_eq!(
            quoted_printable(raw),
            b"hello\r\nbar\r\nfoo\tbar\r\nfoo\t \tb\r\nfoo bar\r\nfoo b\r\nfoo\r\nbar\r\nfoo_bar\r\n"
        );
        assert_eq!(quoted_printable(b"a=3Db =XY=\r\nc"), b"a=b =XYc");
    }
}
