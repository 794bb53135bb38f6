//! APPEND (RFC 9051 §6.3.12) with MULTIAPPEND (RFC 3502): every message stored durably before
//! the OK, and a MULTIAPPEND all or nothing.

use imap_codec::imap_types::datetime::DateTime;
use imap_codec::imap_types::extensions::binary::LiteralOrLiteral8;
use imap_codec::imap_types::flag::Flag;
use imap_codec::imap_types::mailbox::Mailbox;

use crate::imap::code::Code;
use crate::imap::selected::{uid_set, Selected};
use crate::imap::session::*;
use crate::store::{MessageInfo, StoreError};
use imap_codec::imap_types::command::{Command, CommandBody};

use super::{flags_in_folder, store_flags};

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
        let mut prepared = Vec::with_capacity(messages.len());
        for m in messages {
            let bytes = match m.message {
                LiteralOrLiteral8::Literal(literal) => literal.as_ref().to_vec(),
                LiteralOrLiteral8::Literal8(literal) => literal.data.as_ref().to_vec(),
            };
            if bytes.is_empty() {
                return no(None, "Empty message");
            }
            let received_at = m
                .date
                .map(|d| d.as_ref().timestamp())
                .unwrap_or_else(|| chrono::Utc::now().timestamp());
            let (system, names) = store_flags(&m.flags);
            prepared.push((bytes, received_at, system, names));
        }
        let (store, user) = (self.server.store.clone(), user.to_string());
        let into_selected = selected.is_some_and(|s| s.folder == name);
        let stored = blocking(self.id, move || {
            let mut uids = Vec::new();
            let mut validity = 0;
            for (bytes, received_at, system, names) in &prepared {
                let appended = flags_in_folder(&*store, &user, &name, *system, names)
                    .and_then(|(flags, _)| store.append(&user, &name, bytes, flags, *received_at));
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
            Ok((validity, uids))
        })
        .await;
        match stored {
            Ok((validity, uids)) => {
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
