//! SORT (RFC 5256 §3) and SORT=DISPLAY (RFC 5957): the sort keys of a message, taken from its
//! header, and the ordering. Pure: the session reads the headers and sends the answer.
//!
//! Keys compare with the i;ascii-casemap collation (ASCII upper-cased, the rest by octet); ties,
//! whatever the criteria, go by sequence number (RFC 5256 §3).

use std::cmp::Ordering;

use imap_codec::imap_types::extensions::sort::{SortCriterion, SortKey};
use mail_parser::{Address, MessageParser};

use crate::store::MessageInfo;

/// What SORT and THREAD need of one message.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    /// Sequence number in the selected folder.
    pub seq: u32,
    pub uid: u32,
    /// Internal date (unix seconds).
    pub arrival: i64,
    pub size: u64,
    /// The Date field in unix seconds, or the internal date when it has none (RFC 5256 §3).
    pub sent: i64,
    /// Base subject (RFC 5256 §2.1), case-mapped.
    pub subject: String,
    /// Whether the subject had a reply/forward marker (THREAD=REFERENCES step 4).
    pub subject_is_reply: bool,
    pub from: String,
    pub to: String,
    pub cc: String,
    pub display_from: String,
    pub display_to: String,
    pub message_id: Option<String>,
    /// References, then In-Reply-To's first id when References is absent (RFC 5256 §3 step 1A).
    pub references: Vec<String>,
}

impl Fields {
    pub fn read(seq: u32, info: &MessageInfo, header: &[u8]) -> Fields {
        // A message may be all header with no line end at its close (RFC 5322 §3.5): the
        // parser needs the last field ended.
        let ended;
        let header = if header.ends_with(b"\n") {
            header
        } else {
            ended = [header, b"\r\n"].concat();
            &ended[..]
        };
        let parsed = MessageParser::default().parse_headers(header);
        let mut fields = Fields {
            seq,
            uid: info.uid,
            arrival: info.received_at,
            size: info.size,
            sent: info.received_at,
            ..Fields::default()
        };
        let Some(message) = parsed else {
            return fields;
        };
        if let Some(date) = message.date() {
            fields.sent = date.to_timestamp();
        }
        let raw_subject = message.subject().unwrap_or_default();
        let (base, reply) = base_subject(raw_subject);
        fields.subject = casemap(&base);
        fields.subject_is_reply = reply;
        // The first address of a field; a group's first "address" is its start, named by the
        // group (as in the ENVELOPE's group syntax, RFC 9051 §7.5.2).
        let first = |a: Option<&Address<'_>>| -> Option<(Option<String>, Option<String>)> {
            match a? {
                Address::Group(groups) => {
                    let group = groups.first()?;
                    match &group.name {
                        Some(name) => Some((None, Some(name.to_string()))),
                        None => group.addresses.first().map(|a| {
                            (
                                a.name.as_deref().map(str::to_string),
                                a.address.as_deref().map(str::to_string),
                            )
                        }),
                    }
                }
                list => list.first().map(|a| {
                    (
                        a.name.as_deref().map(str::to_string),
                        a.address.as_deref().map(str::to_string),
                    )
                }),
            }
        };
        let mailbox = |a: Option<&Address<'_>>| {
            first(a)
                .and_then(|(_, address)| address)
                .map(|address| casemap(address.rsplit_once('@').map_or(&address[..], |(l, _)| l)))
                .unwrap_or_default()
        };
        // RFC 5957 §3: the display name, or the address when there is none.
        let display = |a: Option<&Address<'_>>| {
            first(a)
                .and_then(|(name, address)| name.filter(|n| !n.trim().is_empty()).or(address))
                .map(|text| casemap(&text))
                .unwrap_or_default()
        };
        fields.from = mailbox(message.from());
        fields.to = mailbox(message.to());
        fields.cc = mailbox(message.cc());
        fields.display_from = display(message.from());
        fields.display_to = display(message.to());
        fields.message_id = message.message_id().map(str::to_string);
        fields.references = message
            .references()
            .as_text_list()
            .map(|ids| ids.iter().map(|id| id.to_string()).collect())
            .or_else(|| {
                message
                    .references()
                    .as_text()
                    .map(|id| vec![id.to_string()])
            })
            .unwrap_or_default();
        if fields.references.is_empty() {
            let in_reply_to = message.in_reply_to();
            let first = in_reply_to
                .as_text_list()
                .and_then(|ids| ids.first().map(|id| id.to_string()))
                .or_else(|| in_reply_to.as_text().map(str::to_string));
            fields.references.extend(first);
        }
        fields
    }
}

/// i;ascii-casemap: ASCII letters upper-cased.
fn casemap(text: &str) -> String {
    text.to_ascii_uppercase()
}

/// Orders messages by the criteria (RFC 5256 §3), ties by sequence number.
pub fn sort(messages: &mut [Fields], criteria: &[SortCriterion]) {
    messages.sort_by(|a, b| {
        for criterion in criteria {
            let order = compare(a, b, &criterion.key);
            let order = if criterion.reverse {
                order.reverse()
            } else {
                order
            };
            if order != Ordering::Equal {
                return order;
            }
        }
        a.seq.cmp(&b.seq)
    });
}

fn compare(a: &Fields, b: &Fields, key: &SortKey) -> Ordering {
    match key {
        SortKey::Arrival => a.arrival.cmp(&b.arrival),
        SortKey::Cc => a.cc.cmp(&b.cc),
        SortKey::Date => a.sent.cmp(&b.sent),
        SortKey::From => a.from.cmp(&b.from),
        SortKey::Size => a.size.cmp(&b.size),
        SortKey::Subject => a.subject.cmp(&b.subject),
        SortKey::To => a.to.cmp(&b.to),
        SortKey::DisplayFrom => a.display_from.cmp(&b.display_from),
        SortKey::DisplayTo => a.display_to.cmp(&b.display_to),
    }
}

/// The base subject of RFC 5256 §2.1, and whether a reply or forward marker was removed
/// (`Re:`, `Fwd:`, `(fwd)`, `[fwd: …]`). The subject is already decoded (RFC 2047).
pub fn base_subject(subject: &str) -> (String, bool) {
    // (1) Tabs and folding as spaces, runs of spaces as one.
    let mut text = subject.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut reply = false;
    loop {
        // (2) Trailing "(fwd)" and white space, repeatedly.
        loop {
            let trimmed = text.trim_end();
            if trimmed.len() >= 5 && trimmed[trimmed.len() - 5..].eq_ignore_ascii_case("(fwd)") {
                text = trimmed[..trimmed.len() - 5].to_string();
                reply = true;
            } else if trimmed.len() != text.len() {
                text = trimmed.to_string();
            } else {
                break;
            }
        }
        // (3) and (4): leading subj-leaders and subj-blobs, until neither changes anything.
        loop {
            let before = text.len();
            if let Some(rest) = strip_leader(&text) {
                text = rest;
                reply = true;
            }
            if let Some(rest) = strip_blob(&text) {
                // A blob goes only when something is left after it.
                if !rest.is_empty() {
                    text = rest;
                }
            }
            if text.len() == before {
                break;
            }
        }
        // (5) "[fwd: …]" around the whole: take the inside and start over.
        if text.len() >= 6 && text[..5].eq_ignore_ascii_case("[fwd:") && text.ends_with(']') {
            text = text[5..text.len() - 1].to_string();
            reply = true;
            continue;
        }
        return (text.trim().to_string(), reply);
    }
}

/// `subj-blob = "[" *BLOBCHAR "]" *WSP`: what follows one at the start, if there is one.
fn strip_blob(text: &str) -> Option<String> {
    let inner = text.strip_prefix('[')?;
    let close = inner.find(']')?;
    if inner[..close].contains('[') {
        return None;
    }
    Some(inner[close + 1..].trim_start().to_string())
}

/// `subj-leader = (*subj-blob subj-refwd) / WSP` with `subj-refwd = ("re" / ("fw" ["d"]))
/// *WSP [subj-blob] ":"`: what follows one at the start, if there is one.
fn strip_leader(text: &str) -> Option<String> {
    if text.starts_with(' ') {
        return Some(text.trim_start().to_string());
    }
    let mut rest = text;
    while let Some(after) = strip_blob(rest) {
        let consumed = rest.len() - after.len();
        rest = &rest[consumed..];
    }
    let lower = rest.to_ascii_lowercase();
    let marker = ["re", "fwd", "fw"]
        .into_iter()
        .find(|m| lower.starts_with(m))?;
    let mut after = rest[marker.len()..].trim_start();
    if let Some(more) = strip_blob(after) {
        let consumed = after.len() - more.len();
        after = &after[consumed..];
    }
    after.strip_prefix(':').map(|a| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_subjects() {
        let base = |s: &str| base_subject(s).0;
        assert_eq!(base("Re: hello"), "hello");
        assert_eq!(base("RE: Re:  hello (fwd) (FWD)"), "hello");
        assert_eq!(base("[list] Re: [list] hello"), "hello");
        assert_eq!(base("[fwd: Re: hello]"), "hello");
        assert_eq!(base("Fw[x]: hello"), "hello");
        assert_eq!(base("[only a blob]"), "[only a blob]");
        assert_eq!(base("Rewrite"), "Rewrite");
        assert!(base_subject("Re: x").1);
        assert!(!base_subject("x").1);
    }

    #[test]
    fn sorts_by_criteria_then_sequence() {
        let f = |seq, subject: &str, size| Fields {
            seq,
            subject: subject.into(),
            size,
            ..Fields::default()
        };
        let mut messages = vec![f(1, "B", 5), f(2, "A", 7), f(3, "B", 9), f(4, "A", 7)];
        let criteria = [
            SortCriterion {
                reverse: false,
                key: SortKey::Subject,
            },
            SortCriterion {
                reverse: true,
                key: SortKey::Size,
            },
        ];
        sort(&mut messages, &criteria);
        let order: Vec<u32> = messages.iter().map(|m| m.seq).collect();
        assert_eq!(order, [2, 4, 3, 1]);
    }
}
