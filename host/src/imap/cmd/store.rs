//! STORE (RFC 9051 §6.4.6) with CONDSTORE's UNCHANGEDSINCE (RFC 7162 §3.1.3), and the flag lists APPEND shares.

use crate::imap::selected::{uid_set, Selected};
use crate::store::{FlagChange, FlagOutcome, Flags, MailStore, MessageInfo, StoreError};
use crate::stream::Io;
use imap_codec::imap_types::command::StoreModifier;
use imap_codec::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_codec::imap_types::sequence::SequenceSet;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::code::Code;
use crate::imap::session::*;

/// The system flags of a flag list, and its keywords by name (`$Forwarded` is Maildir's `P`).
pub(in crate::imap) fn store_flags(flags: &[Flag<'_>]) -> (Flags, Vec<String>) {
    let mut system = Flags::empty();
    let mut names: Vec<String> = Vec::new();
    for flag in flags {
        system = system.union(match flag {
            Flag::Seen => Flags::SEEN,
            Flag::Answered => Flags::ANSWERED,
            Flag::Flagged => Flags::FLAGGED,
            Flag::Deleted => Flags::DELETED,
            Flag::Draft => Flags::DRAFT,
            Flag::Keyword(k) if k.as_ref().eq_ignore_ascii_case("$Forwarded") => Flags::FORWARDED,
            Flag::Keyword(k) => {
                let name = k.as_ref();
                if crate::store::maildir::keywords::valid(name)
                    && !names.iter().any(|n| n.eq_ignore_ascii_case(name))
                {
                    names.push(name.to_string());
                }
                Flags::empty()
            }
            _ => Flags::empty(),
        });
    }
    (system, names)
}

/// Flags with their keywords given slots in the folder's table (which may grow), and the
/// table when keywords were named.
pub(in crate::imap) fn flags_in_folder(
    store: &dyn MailStore,
    user: &str,
    folder: &str,
    system: Flags,
    names: &[String],
) -> Result<(Flags, Option<Vec<String>>), StoreError> {
    if names.is_empty() {
        return Ok((system, None));
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (slots, table) = store.keyword_slots(user, folder, &names)?;
    Ok((system.union(slots), Some(table)))
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
        let (system, names) = store_flags(request.flags);
        let kind = request.kind;
        let unchanged_since = request.unchanged_since;
        let indexes = selected.resolve(set, uid);
        let messages: Vec<MessageInfo> = indexes
            .iter()
            .map(|i| selected.messages[*i].clone())
            .collect();
        let folder = selected.folder.clone();
        let result = blocking(move || {
            let (wanted, table) = flags_in_folder(&*store, &user, &folder, system, &names)?;
            let change = match kind {
                StoreType::Add => FlagChange::Add(wanted),
                StoreType::Remove => FlagChange::Remove(wanted),
                StoreType::Replace => FlagChange::Replace(wanted),
            };
            let refs: Vec<&MessageInfo> = messages.iter().collect();
            let outcome = store.change_flags(&user, &folder, &refs, change, unchanged_since)?;
            Ok((outcome, table))
        })
        .await;
        let (outcome, table): (FlagOutcome, _) = match result {
            Ok(done) => done,
            Err(err) => return store_failure(&err),
        };
        let mut out = Vec::new();
        if let Some(table) = table {
            out.extend_from_slice(&selected.learn_keywords(table));
        }
        let mut modified = Vec::new();
        for index in indexes {
            let message_uid = selected.messages[index].uid;
            if outcome.refused.contains(&message_uid) {
                modified.push(if uid { message_uid } else { index as u32 + 1 });
                continue;
            }
            let Some((_, flags, modseq)) = outcome.updated.iter().find(|u| u.0 == message_uid)
            else {
                continue;
            };
            let message = &mut selected.messages[index];
            let moved = message.modseq != *modseq;
            message.flags = *flags;
            message.modseq = *modseq;
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
