//! STORE (RFC 9051 §6.4.6) with CONDSTORE's UNCHANGEDSINCE (RFC 7162 §3.1.3), and the flag lists APPEND shares.

use crate::imap::selected::{uid_set, Selected};
use crate::store::{FlagChange, FlagMode, FlagOutcome, Flags, Keywords, MessageInfo};
use crate::stream::Io;
use imap_codec::imap_types::command::StoreModifier;
use imap_codec::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_codec::imap_types::sequence::SequenceSet;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::code::Code;
use crate::imap::session::*;
use crate::plugin::MailboxAction;

/// The system flags of a flag list, and its keywords by name (`$Forwarded` is a system flag of
/// the store's: Maildir's `P`).
pub(in crate::imap) fn store_flags(flags: &[Flag<'_>]) -> (Flags, Keywords) {
    let mut system = Flags::empty();
    let mut names = Keywords::new();
    for flag in flags {
        system = system.union(match flag {
            Flag::Seen => Flags::SEEN,
            Flag::Answered => Flags::ANSWERED,
            Flag::Flagged => Flags::FLAGGED,
            Flag::Deleted => Flags::DELETED,
            Flag::Draft => Flags::DRAFT,
            Flag::Keyword(k) if k.as_ref().eq_ignore_ascii_case("$Forwarded") => Flags::FORWARDED,
            Flag::Keyword(k) => {
                names.insert(k.as_ref());
                Flags::empty()
            }
            _ => Flags::empty(),
        });
    }
    (system, names)
}

/// A STORE command's arguments.
pub(in crate::imap) struct StoreRequest<'a> {
    pub(in crate::imap) kind: StoreType,
    pub(in crate::imap) response: StoreResponse,
    pub(in crate::imap) flags: &'a [Flag<'a>],
    pub(in crate::imap) uid: bool,
    /// RFC 7162 UNCHANGEDSINCE.
    pub(in crate::imap) unchanged_since: Option<u64>,
}

impl<'a> StoreRequest<'a> {
    pub(in crate::imap) fn new(
        kind: StoreType,
        response: StoreResponse,
        flags: &'a [Flag<'a>],
        uid: bool,
        modifiers: &[StoreModifier],
    ) -> StoreRequest<'a> {
        let unchanged_since = modifiers
            .iter()
            .map(|StoreModifier::UnchangedSince(n)| *n)
            .next();
        StoreRequest {
            kind,
            response,
            flags,
            uid,
            unchanged_since,
        }
    }
}

impl Conn {
    pub(in crate::imap) async fn store<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        selected: &mut Selected,
        set: &SequenceSet,
        request: StoreRequest<'_>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if request.unchanged_since.is_some() {
            self.enable_condstore(io, Some(selected));
        }
        let report = self.report();
        let user = user.to_string();
        let store = self.store.clone();
        if selected.read_only {
            return no(Some(Code::ReadOnly), "Mailbox is read-only");
        }
        let uid = request.uid;
        if !uid && !selected.valid_sequence(set) {
            return Done::Bad("Invalid message sequence number".into());
        }
        let (flags, keywords) = store_flags(request.flags);
        let kind = request.kind;
        let unchanged_since = request.unchanged_since;
        let indexes = selected.resolve(set, uid);
        let messages: Vec<MessageInfo> = indexes
            .iter()
            .map(|i| selected.messages[*i].clone())
            .collect();
        let folder = selected.folder.clone();
        let change = FlagChange {
            mode: match kind {
                StoreType::Add => FlagMode::Add,
                StoreType::Remove => FlagMode::Remove,
                StoreType::Replace => FlagMode::Replace,
            },
            flags,
            keywords,
        };
        let events = self.server.events();
        let reader = events.clone();
        let (owner, source) = (user.clone(), folder.clone());
        let result = blocking(move || {
            let refs: Vec<&MessageInfo> = messages.iter().collect();
            let outcome = store.change_flags(&user, &folder, &refs, &change, unchanged_since)?;
            // The changed messages, for `mailbox-event` plugins when one listens (one that
            // went away meanwhile is passed over).
            let mut bodies = Vec::new();
            if let Some(events) = &reader {
                let changed: Vec<MessageInfo> = outcome
                    .updated
                    .iter()
                    .filter_map(|now| {
                        let mut message = messages.iter().find(|m| m.uid == now.uid)?.clone();
                        message.flags = now.flags;
                        message.keywords.clone_from(&now.keywords);
                        Some(message)
                    })
                    .collect();
                for (index, body) in events.read(&changed, |m| store.read(&user, &folder, m).ok()) {
                    let message = &changed[index];
                    bodies.push((message.flags, message.keywords.clone(), body));
                }
            }
            Ok((outcome, bodies))
        })
        .await;
        let outcome: FlagOutcome = match result {
            Ok((done, bodies)) => {
                if let Some(events) = events {
                    events.tell_each(
                        &owner,
                        MailboxAction::FlagsChanged,
                        (&source, None),
                        &self.server.config.imap.special_folders,
                        bodies,
                    );
                }
                done
            }
            Err(err) => return store_failure(&err),
        };
        let mut out = Vec::new();
        let named: Vec<&str> = outcome
            .updated
            .iter()
            .flat_map(|u| u.keywords.iter())
            .collect();
        out.extend_from_slice(&selected.learn_keywords(named));
        let mut modified = Vec::new();
        for index in indexes {
            let message_uid = selected.messages[index].uid;
            if outcome.refused.contains(&message_uid) {
                modified.push(if uid { message_uid } else { index as u32 + 1 });
                continue;
            }
            let Some(now) = outcome.updated.iter().find(|u| u.uid == message_uid) else {
                continue;
            };
            let modseq = now.modseq;
            let message = &mut selected.messages[index];
            let moved = message.modseq != modseq;
            message.flags = now.flags;
            message.keywords.clone_from(&now.keywords);
            message.modseq = modseq;
            if request.response == StoreResponse::Answer {
                selected.flags_fetch(&mut out, index, uid, report);
            } else if report.condstore && moved {
                // RFC 7162 §3.1.3: even a silent STORE tells the new mod-sequences.
                out.extend_from_slice(
                    format!(
                        "* {} FETCH (UID {message_uid} MODSEQ ({modseq}))\r\n",
                        index + 1
                    )
                    .as_bytes(),
                );
            }
        }
        io.queue(&out);
        if modified.is_empty() {
            ok("STORE completed")
        } else {
            Done::Ok(
                Some(Code::Modified(uid_set(modified))),
                "Conditional STORE failed for some messages".into(),
            )
        }
    }
}
