//! IMAP URLs of one message or part (RFC 5092 §3 `imessagepart`), as CATENATE names the
//! pieces of a new message (RFC 4469 §5): `/mailbox[;UIDVALIDITY=v]/;UID=n[/;SECTION=s]
//! [/;PARTIAL=o[.l]]`, relative to this server, or absolute as `imap://[user@]host[:port]/…`.
//! Sans-IO: the URL is parsed here, the message is read by the caller.

/// A message (or part of one) an IMAP URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageUrl {
    /// The mailbox name, percent-decoded.
    pub mailbox: String,
    pub uid_validity: Option<u32>,
    pub uid: u32,
    /// The section as FETCH spells it inside `BODY[…]` (percent-decoded), if any.
    pub section: Option<String>,
    /// Octet offset and length (RFC 5092 §3: `;PARTIAL=offset[.length]`).
    pub partial: Option<(u32, Option<u32>)>,
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `;NAME=value` (the name case-insensitive), or None when `part` is not that parameter.
fn parameter<'a>(part: &'a str, name: &str) -> Option<&'a str> {
    let rest = part.strip_prefix(';')?;
    let (key, value) = rest.split_once('=')?;
    key.eq_ignore_ascii_case(name).then_some(value)
}

impl MessageUrl {
    pub fn parse(url: &str) -> Option<MessageUrl> {
        let path = match url.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("imap://") => {
                let after = &url[7..];
                &after[after.find('/')?..]
            }
            _ => url,
        };
        let path = path.strip_prefix('/')?;
        // The mailbox runs to the first "/;" (a mailbox name may itself hold '/').
        let (mailbox_part, rest) = path.split_once("/;")?;
        let (mailbox, uid_validity) = match mailbox_part.split_once(';') {
            Some((name, validity)) => {
                let value = parameter(&format!(";{validity}"), "UIDVALIDITY")?.to_string();
                (name, Some(value.parse().ok()?))
            }
            None => (mailbox_part, None),
        };
        let mut parts = rest.split("/;").map(|p| format!(";{p}"));
        let uid = parameter(&parts.next()?, "UID")?.parse().ok()?;
        let (mut section, mut partial) = (None, None);
        for part in parts {
            if let Some(value) = parameter(&part, "SECTION") {
                if section.is_some() || partial.is_some() {
                    return None;
                }
                section = Some(percent_decode(value)?);
            } else if let Some(value) = parameter(&part, "PARTIAL") {
                if partial.is_some() {
                    return None;
                }
                let (offset, length) = match value.split_once('.') {
                    Some((o, l)) => (o.parse().ok()?, Some(l.parse().ok()?)),
                    None => (value.parse().ok()?, None),
                };
                partial = Some((offset, length));
            } else {
                return None;
            }
        }
        Some(MessageUrl {
            mailbox: percent_decode(mailbox)?,
            uid_validity,
            uid,
            section,
            partial,
        })
    }

    /// The named bytes of `data` (the section already taken): the PARTIAL range, cut to what
    /// there is.
    pub fn cut<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        match self.partial {
            None => data,
            Some((offset, length)) => {
                let start = (offset as usize).min(data.len());
                let end = match length {
                    Some(length) => start.saturating_add(length as usize).min(data.len()),
                    None => data.len(),
                };
                &data[start..end]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_urls() {
        let url =
            MessageUrl::parse("/INBOX;UIDVALIDITY=785799047/;UID=113330/;SECTION=1.5.9").unwrap();
        assert_eq!(url.mailbox, "INBOX");
        assert_eq!(url.uid_validity, Some(785799047));
        assert_eq!(url.uid, 113330);
        assert_eq!(url.section.as_deref(), Some("1.5.9"));
        let url =
            MessageUrl::parse("imap://joe@example.com/Drafts%20old/;uid=20/;partial=5.3").unwrap();
        assert_eq!(url.mailbox, "Drafts old");
        assert_eq!(url.partial, Some((5, Some(3))));
        assert_eq!(url.cut(b"0123456789"), b"567");
        assert_eq!(url.cut(&b"0123"[..]), b"");
        assert!(MessageUrl::parse("/INBOX").is_none());
        assert!(MessageUrl::parse("/INBOX/;UID=x").is_none());
        assert!(MessageUrl::parse("/INBOX/;UID=1/;BOGUS=2").is_none());
    }
}
