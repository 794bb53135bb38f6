//! METADATA (RFC 5464): annotations on a folder, or on the server (mailbox `""`), under
//! `/private/` and `/shared/` (the same thing here: nobody else reads a user's mailbox).
//! GETMETADATA with MAXSIZE and DEPTH, SETMETADATA (NIL removes), every change durable before
//! the OK; values up to [`MAX_VALUE`] octets, at most [`MAX_ENTRIES`] per folder.

use std::collections::BTreeMap;

use imap_codec::imap_types::core::{NString8, Vec1};
use imap_codec::imap_types::extensions::metadata::{Depth, Entry, EntryValue, GetMetadataOption};
use imap_codec::imap_types::mailbox::Mailbox;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::code::Code;
use crate::imap::codec;
use crate::imap::session::*;
use crate::stream::Io;

/// The largest value SETMETADATA takes (RFC 5464 §4.3 MAXSIZE).
pub(in crate::imap) const MAX_VALUE: usize = 64 * 1024;
/// Most entries one folder (or the server) may hold (RFC 5464 §4.3 TOOMANY).
pub(in crate::imap) const MAX_ENTRIES: usize = 100;

/// RFC 5464 §3.2: `/private/…` or `/shared/…`, no empty component, no trailing `/`, no
/// wildcards, printable ASCII.
fn valid_entry(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("/private/")
        .or_else(|| name.strip_prefix("/shared/"))
    else {
        return false;
    };
    !rest.is_empty()
        && !rest.ends_with('/')
        && !rest.contains("//")
        && rest
            .bytes()
            .all(|b| (0x21..0x7f).contains(&b) && b != b'*' && b != b'%')
}

fn entry_name(entry: &Entry<'_>) -> Option<String> {
    let name = std::str::from_utf8(entry.as_ref())
        .ok()?
        .to_ascii_lowercase();
    valid_entry(&name).then_some(name)
}

/// The folder an annotation command names: `None` for the server (`""`).
fn target(mailbox: &Mailbox<'_>) -> Result<Option<String>, Done> {
    match mailbox {
        Mailbox::Other(other) if other.as_ref().is_empty() => Ok(None),
        _ => folder_name(mailbox).map(Some),
    }
}

impl Conn {
    /// RFC 5464 §4.2: the entries asked for (and, with DEPTH, those below them) that exist.
    pub(in crate::imap) async fn get_metadata<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        options: Vec<GetMetadataOption>,
        mailbox: &Mailbox<'_>,
        entries: Vec1<Entry<'_>>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let folder = match target(mailbox) {
            Ok(folder) => folder,
            Err(done) => return done,
        };
        let (mut max_size, mut depth) = (None, Depth::Null);
        for option in options {
            match option {
                GetMetadataOption::MaxSize(n) => max_size = Some(n as usize),
                GetMetadataOption::Depth(d) => depth = d,
            }
        }
        let mut wanted = Vec::new();
        for entry in entries.as_ref() {
            match entry_name(entry) {
                Some(name) => wanted.push(name),
                None => return Done::Bad("Invalid entry name".into()),
            }
        }
        let (store, owner) = (self.store.clone(), user.to_string());
        let found = blocking(move || store.metadata(&owner, folder.as_deref())).await;
        let stored = match found {
            Ok(stored) => stored,
            Err(err) => return store_failure(&err),
        };
        let below = |name: &str, root: &str| -> bool {
            let Some(rest) = name.strip_prefix(root).and_then(|r| r.strip_prefix('/')) else {
                return false;
            };
            match depth {
                Depth::Null => false,
                Depth::One => !rest.contains('/'),
                Depth::Infinity => true,
            }
        };
        let mut shown: BTreeMap<&str, &[u8]> = BTreeMap::new();
        let mut longest_left_out = 0;
        for (name, value) in &stored {
            if !wanted.iter().any(|w| name == w || below(name, w)) {
                continue;
            }
            if max_size.is_some_and(|max| value.len() > max) {
                longest_left_out = longest_left_out.max(value.len());
                continue;
            }
            shown.insert(name, value);
        }
        if !shown.is_empty() {
            let mut out = b"* METADATA ".to_vec();
            codec::astring(&mut out, mailbox_bytes(mailbox).as_slice());
            out.extend_from_slice(b" (");
            for (i, (name, value)) in shown.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                out.extend_from_slice(name.as_bytes());
                out.push(b' ');
                codec::string(&mut out, value);
            }
            out.extend_from_slice(b")\r\n");
            io.queue(&out);
        }
        if longest_left_out > 0 {
            // RFC 5464 §4.2.1: entries left out for MAXSIZE, and the size of the longest.
            return Done::Ok(
                Some(Code::MetadataLongEntries(longest_left_out)),
                "GETMETADATA completed".into(),
            );
        }
        ok("GETMETADATA completed")
    }

    /// RFC 5464 §4.3: sets or removes entries, all or none.
    pub(in crate::imap) async fn set_metadata(
        &mut self,
        user: &str,
        mailbox: &Mailbox<'_>,
        entry_values: Vec1<EntryValue<'_>>,
    ) -> Done {
        let folder = match target(mailbox) {
            Ok(folder) => folder,
            Err(done) => return done,
        };
        let mut changes = Vec::new();
        for EntryValue { entry, value } in entry_values.into_inner() {
            let Some(name) = entry_name(&entry) else {
                return Done::Bad("Invalid entry name".into());
            };
            let value: Option<Vec<u8>> = match value {
                NString8::NString(nstring) => nstring.0.map(|s| s.as_ref().to_vec()),
                NString8::Literal8(literal) => Some(literal.data.as_ref().to_vec()),
            };
            if value.as_ref().is_some_and(|v| v.len() > MAX_VALUE) {
                return no(Some(Code::MetadataMaxSize(MAX_VALUE)), "Value too long");
            }
            changes.push((name, value));
        }
        let (store, owner) = (self.store.clone(), user.to_string());
        let result = blocking(move || {
            let mut entries = store.metadata(&owner, folder.as_deref())?;
            for (name, value) in &changes {
                match value {
                    Some(value) => entries.insert(name.clone(), value.clone()),
                    None => entries.remove(name),
                };
            }
            if entries.len() > MAX_ENTRIES {
                return Ok(false);
            }
            store.set_metadata(&owner, folder.as_deref(), &changes)?;
            Ok(true)
        })
        .await;
        match result {
            Ok(true) => ok("SETMETADATA completed"),
            Ok(false) => no(Some(Code::MetadataTooMany), "Too many entries"),
            Err(err) => store_failure(&err),
        }
    }
}

/// The mailbox name as the client gave it (for the METADATA response).
fn mailbox_bytes(mailbox: &Mailbox<'_>) -> Vec<u8> {
    match mailbox {
        Mailbox::Inbox => b"INBOX".to_vec(),
        Mailbox::Other(other) => other.as_ref().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        assert!(valid_entry("/private/comment"));
        assert!(valid_entry("/shared/vendor/x.y/z"));
        assert!(!valid_entry("/private/"));
        assert!(!valid_entry("/private/a//b"));
        assert!(!valid_entry("/private/a/"));
        assert!(!valid_entry("/other/a"));
        assert!(!valid_entry("/private/a*"));
    }
}
