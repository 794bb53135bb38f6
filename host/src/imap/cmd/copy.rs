//! COPY and MOVE (RFC 9051 §6.4.7, RFC 6851) with UIDPLUS codes (RFC 4315).

use crate::imap::selected::{paired_sets, Selected};
use crate::store::{MessageInfo, StoreError};
use crate::stream::Io;
use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::imap_types::sequence::SequenceSet;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::code::Code;
use crate::imap::session::*;
use crate::plugin::MailboxAction;

/// A COPY or MOVE as the client sent it.
pub(in crate::imap) struct CopyRequest<'a> {
    pub(in crate::imap) set: &'a SequenceSet,
    pub(in crate::imap) mailbox: &'a Mailbox<'a>,
    pub(in crate::imap) uid: bool,
    pub(in crate::imap) moving: bool,
}

impl Conn {
    pub(in crate::imap) async fn copy<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        selected: &mut Selected,
        request: CopyRequest<'_>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let CopyRequest {
            set,
            mailbox,
            uid,
            moving,
        } = request;
        let target = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        let user = user.to_string();
        let store = self.store.clone();
        if moving && selected.read_only {
            return no(Some(Code::ReadOnly), "Mailbox is read-only");
        }
        if !uid && !selected.valid_sequence(set) {
            return Done::Bad("Invalid message sequence number".into());
        }
        let indexes = selected.resolve(set, uid);
        if indexes.is_empty() {
            return ok(if moving {
                "MOVE completed"
            } else {
                "COPY completed"
            });
        }
        let messages: Vec<MessageInfo> = indexes
            .iter()
            .map(|i| selected.messages[*i].clone())
            .collect();
        let folder = selected.folder.clone();
        let into_selected = target == folder;
        // RFC 9208 §4.1: a COPY that would go over the quota is refused (a MOVE within the
        // mailbox adds nothing).
        let quota = self.server.users.quota(&user);
        let events = self.server.events();
        let reader = events.clone();
        let (source, owner, into) = (folder.clone(), user.clone(), target.clone());
        let result = blocking(move || {
            let refs: Vec<&MessageInfo> = messages.iter().collect();
            // Read before a MOVE takes them away; only when a plugin listens.
            let bodies = match &reader {
                Some(events) => events.read(&messages, |m| store.read(&user, &folder, m).ok()),
                None => Vec::new(),
            };
            if !moving && quota.is_limited() {
                let bytes = messages.iter().map(|m| m.size).sum();
                if !quota.allows(store.usage(&user)?, bytes, messages.len() as u64) {
                    return Err(StoreError::OverQuota(user.clone()));
                }
            }
            let copied = store.copy(&user, &folder, &refs, &target)?;
            if moving {
                store.remove(&user, &folder, &refs)?;
            }
            Ok((copied, messages, bodies))
        })
        .await;
        let (validity, pairs) = match result {
            Ok((copied, messages, bodies)) => {
                if let Some(events) = events {
                    let action = if moving {
                        MailboxAction::Moved
                    } else {
                        MailboxAction::Copied
                    };
                    events.tell_each(
                        &owner,
                        action,
                        (&into, Some(&source)),
                        &self.server.config.imap.special_folders,
                        bodies.into_iter().map(|(index, body)| {
                            let message = &messages[index];
                            (message.flags, message.keywords.clone(), body)
                        }),
                    );
                }
                copied
            }
            Err(StoreError::NoSuchFolder(_)) => {
                return no(Some(Code::TryCreate), "No such mailbox")
            }
            Err(err) => return store_failure(&err),
        };
        // Our own write is not announced to us: a copy into the selected folder is seen by
        // re-reading it at the next update.
        if into_selected {
            self.dirty = true;
        }
        let code = if pairs.is_empty() {
            None
        } else {
            let (from, to) = paired_sets(&pairs);
            Some(Code::CopyUid { validity, from, to })
        };
        if !moving {
            return Done::Ok(code, "COPY completed".into());
        }
        if let Some(code) = &code {
            io.queue(format!("* OK [{code}] Moved\r\n").as_bytes());
        }
        let out = selected.expunged(indexes, self.report());
        io.queue(&out);
        ok("MOVE completed")
    }
}
