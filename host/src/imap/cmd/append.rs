//! APPEND (RFC 9051 §6.3.12) with MULTIAPPEND (RFC 3502) and CATENATE (RFC 4469): every
//! message stored durably before the OK, and a MULTIAPPEND all or nothing.

use imap_codec::imap_types::datetime::DateTime;
use imap_codec::imap_types::extensions::binary::LiteralOrLiteral8;
use imap_codec::imap_types::flag::Flag;
use imap_codec::imap_types::mailbox::Mailbox;

use crate::imap::code::Code;
use crate::imap::selected::{uid_set, Selected};
use crate::imap::session::*;
use crate::plugin::MailboxAction;
use crate::store::{MessageInfo, StoreError};
use imap_codec::imap_types::command::{Command, CommandBody};

use super::store_flags;
use crate::imap::codec::CatPart;
use crate::imap::url::MessageUrl;
use crate::store::MailStore;

/// A message to append: as sent, or to be put together from parts (CATENATE).
enum Content {
    Bytes(Vec<u8>),
    Catenate(Vec<CatPart>),
}

/// Why a CATENATE cannot be put together.
enum Refused {
    /// RFC 4469 §6: a URL that names nothing this user can read.
    BadUrl(String),
    TooBig,
    Empty,
    /// RFC 9208 §4.1: the user's quota would be exceeded.
    OverQuota,
}

/// The section a URL names, as FETCH decodes it (`BODY[<section>]`).
fn url_section(text: &str) -> Option<Option<imap_codec::imap_types::fetch::Section<'static>>> {
    use imap_codec::decode::Decoder;
    use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName};
    use imap_codec::imap_types::IntoStatic;
    let command = format!("a FETCH 1 BODY[{text}]\r\n");
    let (_, decoded) = imap_codec::CommandCodec::default()
        .decode(command.as_bytes())
        .ok()?;
    match decoded.body {
        CommandBody::Fetch {
            macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(items),
            ..
        } => match items.into_iter().next()? {
            MessageDataItemName::BodyExt { section, .. } => Some(section.map(|s| s.into_static())),
            _ => None,
        },
        _ => None,
    }
}

/// RFC 4469 §5: the parts of a CATENATE put together, each URL read from this user's mailbox
/// (checking UIDVALIDITY when given); at most `limit` octets.
fn catenated(
    store: &dyn MailStore,
    user: &str,
    parts: &[CatPart],
    limit: usize,
) -> Result<Result<Vec<u8>, Refused>, StoreError> {
    let mut out = Vec::new();
    for part in parts {
        match part {
            CatPart::Text(text) => out.extend_from_slice(text),
            CatPart::Url(text) => {
                let bad = || Refused::BadUrl(text.clone());
                let Some(url) = MessageUrl::parse(text) else {
                    return Ok(Err(bad()));
                };
                let folder = if url.mailbox.eq_ignore_ascii_case("INBOX") {
                    "INBOX".to_string()
                } else {
                    url.mailbox.clone()
                };
                let snapshot = match store.snapshot(user, &folder) {
                    Ok(snapshot) => snapshot,
                    Err(StoreError::NoSuchFolder(_) | StoreError::InvalidName(_)) => {
                        return Ok(Err(bad()))
                    }
                    Err(err) => return Err(err),
                };
                if url.uid_validity.is_some_and(|v| v != snapshot.uid_validity) {
                    return Ok(Err(bad()));
                }
                let Ok(at) = snapshot.messages.binary_search_by_key(&url.uid, |m| m.uid) else {
                    return Ok(Err(bad()));
                };
                let raw = match store.read(user, &folder, &snapshot.messages[at]) {
                    Ok(raw) => raw,
                    Err(StoreError::Gone(_)) => return Ok(Err(bad())),
                    Err(err) => return Err(err),
                };
                let data = match &url.section {
                    None => raw,
                    Some(text) => {
                        let Some(section) = url_section(text) else {
                            return Ok(Err(bad()));
                        };
                        let parsed = crate::imap::fetch::Parsed::new(&raw);
                        match parsed.section(section.as_ref()) {
                            Some(data) => data,
                            None => return Ok(Err(bad())),
                        }
                    }
                };
                out.extend_from_slice(url.cut(&data));
            }
        }
        if out.len() > limit {
            return Ok(Err(Refused::TooBig));
        }
    }
    if out.is_empty() {
        return Ok(Err(Refused::Empty));
    }
    Ok(Ok(out))
}

/// One message of an APPEND.
pub(in crate::imap) struct AppendMessage {
    pub(in crate::imap) flags: Vec<Flag<'static>>,
    pub(in crate::imap) date: Option<DateTime>,
    pub(in crate::imap) message: LiteralOrLiteral8<'static>,
}

impl Conn {
    /// `first` is the APPEND's message; `more` the other messages of a MULTIAPPEND, each
    /// decoded as an APPEND of its own (RFC 3502: to the same mailbox).
    pub(in crate::imap) async fn append(
        &mut self,
        user: &str,
        selected: Option<&Selected>,
        mailbox: &Mailbox<'_>,
        first: AppendMessage,
        more: Vec<Command<'static>>,
        catenate: Vec<Option<Vec<CatPart>>>,
    ) -> Done {
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        let mut messages = vec![first];
        for command in more {
            match command.body {
                CommandBody::Append {
                    mailbox: other,
                    flags,
                    date,
                    message,
                } if other == *mailbox => messages.push(AppendMessage {
                    flags,
                    date,
                    message,
                }),
                _ => return Done::Bad("MULTIAPPEND to one mailbox only".into()),
            }
        }
        let mut catenate = catenate.into_iter();
        let mut prepared = Vec::with_capacity(messages.len());
        for m in messages {
            let bytes = match m.message {
                LiteralOrLiteral8::Literal(literal) => literal.as_ref().to_vec(),
                LiteralOrLiteral8::Literal8(literal) => literal.data.as_ref().to_vec(),
            };
            let content = match catenate.next().flatten() {
                Some(parts) => Content::Catenate(parts),
                None if bytes.is_empty() => return no(None, "Empty message"),
                None => Content::Bytes(bytes),
            };
            let received_at = m
                .date
                .map(|d| d.as_ref().timestamp())
                .unwrap_or_else(|| chrono::Utc::now().timestamp());
            let (system, names) = store_flags(&m.flags);
            prepared.push((content, received_at, system, names));
        }
        let (store, user) = (self.store.clone(), user.to_string());
        let into_selected = selected.is_some_and(|s| s.folder == name);
        let limit = self.server.config.imap.append_limit as usize;
        let quota = self.server.users.quota(&user);
        let events = self.server.events();
        let listened = events.is_some();
        let (owner, folder) = (user.clone(), name.clone());
        let stored = blocking(move || {
            // RFC 4469 §5: a missing target is TRYCREATE whatever the URLs say, so it is
            // checked first; then every part is resolved before anything is stored.
            let catenates = prepared
                .iter()
                .any(|(content, ..)| matches!(content, Content::Catenate(_)));
            if catenates && !store.has_folder(&user, &name)? {
                return Err(StoreError::NoSuchFolder(name.clone()));
            }
            let mut resolved = Vec::with_capacity(prepared.len());
            for (content, received_at, system, names) in prepared {
                let bytes = match content {
                    Content::Bytes(bytes) => bytes,
                    Content::Catenate(parts) => match catenated(&*store, &user, &parts, limit)? {
                        Ok(bytes) => bytes,
                        Err(refused) => return Ok(Err(refused)),
                    },
                };
                resolved.push((bytes, received_at, system, names));
            }
            let prepared = resolved;
            // RFC 9208 §4.1: what would go over the quota is refused whole. (Checked, then
            // stored: two APPENDs at once can each pass, going over by at most one message.)
            if quota.is_limited() {
                let bytes: u64 = prepared.iter().map(|(b, ..)| b.len() as u64).sum();
                if !quota.allows(store.usage(&user)?, bytes, prepared.len() as u64) {
                    return Ok(Err(Refused::OverQuota));
                }
            }
            let mut uids = Vec::new();
            let mut validity = 0;
            for (bytes, received_at, system, names) in &prepared {
                let appended = store.append(&user, &name, bytes, *system, names, *received_at);
                match appended {
                    Ok((v, uid)) => {
                        validity = v;
                        uids.push(uid);
                    }
                    Err(err) => {
                        // RFC 3502 §6.3.11: when one message fails, none is appended.
                        if !uids.is_empty() {
                            let snapshot = store.snapshot(&user, &name)?;
                            let stored: Vec<&MessageInfo> = snapshot
                                .messages
                                .iter()
                                .filter(|m| uids.contains(&m.uid))
                                .collect();
                            store.remove(&user, &name, &stored)?;
                        }
                        return Err(err);
                    }
                }
            }
            // What `mailbox-event` plugins are told, when one listens.
            let appended = if listened { prepared } else { Vec::new() };
            Ok(Ok((validity, uids, appended)))
        })
        .await;
        match stored {
            Ok(Err(Refused::BadUrl(url))) => no(Some(Code::BadUrl(url)), "Cannot use that URL"),
            Ok(Err(Refused::TooBig)) => no(Some(Code::TooBig), "Message over the APPENDLIMIT"),
            Ok(Err(Refused::Empty)) => no(None, "Empty message"),
            Ok(Err(Refused::OverQuota)) => no(Some(Code::OverQuota), "Quota exceeded"),
            Ok(Ok((validity, uids, appended))) => {
                if let Some(events) = events {
                    events.tell_each(
                        &owner,
                        MailboxAction::Appended,
                        (&folder, None),
                        &self.server.config.imap.special_folders,
                        appended
                            .into_iter()
                            .map(|(bytes, _, system, names)| (system, names, bytes)),
                    );
                }
                // Our own write is not announced to us: the next update re-reads the selected
                // folder when it gained the messages (a Sent copy does not).
                if into_selected {
                    self.dirty = true;
                }
                Done::Ok(
                    Some(Code::AppendUid {
                        validity,
                        uids: uid_set(uids),
                    }),
                    "APPEND completed".into(),
                )
            }
            Err(StoreError::NoSuchFolder(_)) => no(Some(Code::TryCreate), "No such mailbox"),
            Err(err) => store_failure(&err),
        }
    }
}
