//! FETCH (RFC 9051 §6.4.5): message data rendered in batches bounded by count, bytes and the server-wide memory budget, with the implicit \\Seen stored first.

use crate::imap::fetch::{self, Parsed};
use crate::imap::selected::{range_set, Selected};
use crate::store::{FlagChange, Flags, MailStore, MessageInfo, StoreError};
use crate::stream::Io;
use imap_codec::imap_types::command::FetchModifier;
use imap_codec::imap_types::fetch::{
    Macro, MacroOrMessageDataItemNames, MessageDataItemName, Section,
};
use imap_codec::imap_types::sequence::SequenceSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use crate::imap::code::Code;
use crate::imap::session::*;

/// Messages rendered per blocking batch in FETCH, and the message octets one batch may read:
/// together they bound what one response holds before it is written.
pub(in crate::imap) const FETCH_BATCH: usize = 32;
pub(in crate::imap) const FETCH_BATCH_BYTES: u64 = 1024 * 1024;
/// What a message costs a FETCH that does not read it (flags, dates, sizes).
pub(in crate::imap) const FETCH_META_BYTES: u64 = 4 * 1024;
/// How long a FETCH waits for other sessions to give memory back before `NO [LIMIT]`.
pub(in crate::imap) const FETCH_MEMORY_WAIT: Duration = Duration::from_secs(10);

/// Splits FETCH targets into batches of at most [`FETCH_BATCH`] messages and, when the message
/// is read, [`FETCH_BATCH_BYTES`] (a bigger message is a batch of its own), each with the memory
/// it needs: the rendered output and its copy in the write buffer.
pub(in crate::imap) fn fetch_batches(
    targets: &[(usize, MessageInfo)],
    reads_message: bool,
) -> Vec<(usize, usize, u64)> {
    let cost = |info: &MessageInfo| {
        if reads_message {
            2 * info.size + FETCH_META_BYTES
        } else {
            FETCH_META_BYTES
        }
    };
    let mut batches = Vec::new();
    let mut start = 0;
    while start < targets.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < targets.len()
            && end - start < FETCH_BATCH
            && (end == start || bytes + cost(&targets[end].1) <= 2 * FETCH_BATCH_BYTES)
        {
            bytes += cost(&targets[end].1);
            end += 1;
        }
        batches.push((start, end, bytes));
        start = end;
    }
    batches
}

/// How a FETCH shows what the listing does not say by itself.
pub(in crate::imap) struct Shown {
    /// This FETCH set \Seen: FLAGS goes out even if not asked for.
    flags_changed: bool,
    condstore: bool,
    /// The message is \Recent in this session.
    recent: bool,
}

/// What of a message a FETCH's items need.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(in crate::imap) enum Reads {
    /// Flags, dates, sizes: the listing has them.
    Nothing,
    /// ENVELOPE and header sections, which the store may have at hand (and reads in batches).
    Header,
    Whole,
}

pub(in crate::imap) fn reads(items: &[MessageDataItemName<'_>]) -> Reads {
    let needs_message = items.iter().any(|item| {
        !matches!(
            item,
            MessageDataItemName::Uid
                | MessageDataItemName::Flags
                | MessageDataItemName::InternalDate
                | MessageDataItemName::Rfc822Size
                | MessageDataItemName::ModSeq
        )
    });
    let header_only = items.iter().all(|item| match item {
        MessageDataItemName::BodyExt { section, .. } => matches!(
            section,
            Some(
                Section::Header(None)
                    | Section::HeaderFields(None, _)
                    | Section::HeaderFieldsNot(None, _)
            )
        ),
        _ => !matches!(
            item,
            MessageDataItemName::Body
                | MessageDataItemName::BodyStructure
                | MessageDataItemName::Binary { .. }
                | MessageDataItemName::BinarySize { .. }
                | MessageDataItemName::Rfc822
                | MessageDataItemName::Rfc822Text
        ),
    });
    match (needs_message, header_only) {
        (false, _) => Reads::Nothing,
        (true, true) => Reads::Header,
        (true, false) => Reads::Whole,
    }
}

/// Renders one `* n FETCH (...)` response; `header` is the message's header when the batch
/// read it already (`Reads::Header`).
#[allow(clippy::too_many_arguments)]
pub(in crate::imap) fn render(
    out: &mut Vec<u8>,
    store: &dyn MailStore,
    user: &str,
    folder: &str,
    index: usize,
    info: &MessageInfo,
    items: &[MessageDataItemName<'_>],
    header: Option<Result<Arc<[u8]>, StoreError>>,
    shown: &Shown,
) -> Result<(), StoreError> {
    let raw: Option<std::borrow::Cow<'_, [u8]>> = match (reads(items), header) {
        (Reads::Nothing, _) => None,
        (Reads::Header, Some(header)) => Some(header?.to_vec().into()),
        (Reads::Header, None) => Some(store.read_header(user, folder, info)?.to_vec().into()),
        (Reads::Whole, _) => Some(store.read(user, folder, info)?.into()),
    };
    let parsed = raw.as_deref().map(Parsed::new);
    out.extend_from_slice(format!("* {} FETCH (", index + 1).as_bytes());
    let mut first = true;
    let mut sep = |out: &mut Vec<u8>| {
        if !first {
            out.push(b' ');
        }
        first = false;
    };
    let mut flags_sent = false;
    let mut modseq_sent = false;
    for item in items {
        match item {
            MessageDataItemName::Uid => {
                sep(out);
                out.extend_from_slice(format!("UID {}", info.uid).as_bytes());
            }
            MessageDataItemName::Flags => {
                sep(out);
                out.extend_from_slice(b"FLAGS ");
                fetch::flags(out, info.flags, &info.keywords, shown.recent);
                flags_sent = true;
            }
            MessageDataItemName::ModSeq => {
                sep(out);
                out.extend_from_slice(format!("MODSEQ ({})", info.modseq).as_bytes());
                modseq_sent = true;
            }
            MessageDataItemName::InternalDate => {
                sep(out);
                out.extend_from_slice(
                    format!("INTERNALDATE {}", fetch::internal_date(info.received_at)).as_bytes(),
                );
            }
            MessageDataItemName::Rfc822Size => {
                sep(out);
                out.extend_from_slice(format!("RFC822.SIZE {}", info.size).as_bytes());
            }
            MessageDataItemName::Envelope => {
                sep(out);
                out.extend_from_slice(b"ENVELOPE ");
                if let Some(parsed) = &parsed {
                    parsed.envelope(out);
                }
            }
            MessageDataItemName::Body => {
                sep(out);
                out.extend_from_slice(b"BODY ");
                if let Some(parsed) = &parsed {
                    parsed.structure(out, false);
                }
            }
            MessageDataItemName::BodyStructure => {
                sep(out);
                out.extend_from_slice(b"BODYSTRUCTURE ");
                if let Some(parsed) = &parsed {
                    parsed.structure(out, true);
                }
            }
            MessageDataItemName::BodyExt {
                section, partial, ..
            } => {
                sep(out);
                let name = format!("BODY[{}]", fetch::section_name(section.as_ref()));
                let data = parsed.as_ref().and_then(|p| p.section(section.as_ref()));
                fetch::section_data(
                    out,
                    &name,
                    Some(data.as_deref().unwrap_or_default()),
                    *partial,
                );
            }
            MessageDataItemName::Binary {
                section, partial, ..
            } => {
                sep(out);
                let path: Vec<NonZeroU32> = section.clone();
                let name = format!(
                    "BINARY[{}]",
                    path.iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(".")
                );
                let data = parsed.as_ref().and_then(|p| p.binary(&path));
                fetch::section_data(out, &name, data.as_deref(), *partial);
            }
            // RFC 3516 §4.2: the size of the part as BINARY would send it (decoded).
            MessageDataItemName::BinarySize { section } => {
                sep(out);
                let path: Vec<NonZeroU32> = section.clone();
                let size = parsed
                    .as_ref()
                    .and_then(|p| p.binary(&path))
                    .map_or(0, |data| data.len());
                let name = path
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(".");
                out.extend_from_slice(format!("BINARY.SIZE[{name}] {size}").as_bytes());
            }
            MessageDataItemName::Rfc822 => {
                sep(out);
                fetch::section_data(out, "RFC822", raw.as_deref(), None);
            }
            MessageDataItemName::Rfc822Header => {
                sep(out);
                let header = raw.as_deref().map(|r| &r[..crate::message::body_offset(r)]);
                fetch::section_data(out, "RFC822.HEADER", header, None);
            }
            MessageDataItemName::Rfc822Text => {
                sep(out);
                let text = raw.as_deref().map(|r| &r[crate::message::body_offset(r)..]);
                fetch::section_data(out, "RFC822.TEXT", text, None);
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
    if shown.flags_changed && !flags_sent {
        sep(out);
        out.extend_from_slice(b"FLAGS ");
        fetch::flags(out, info.flags, &info.keywords, shown.recent);
    }
    // RFC 7162 §3.2.4: under CONDSTORE a flag change is told with its mod-sequence.
    if shown.flags_changed && shown.condstore && !modseq_sent {
        sep(out);
        out.extend_from_slice(format!("MODSEQ ({})", info.modseq).as_bytes());
    }
    out.extend_from_slice(b")\r\n");
    Ok(())
}

/// A FETCH as the client sent it.
pub(in crate::imap) struct FetchRequest<'a> {
    pub(in crate::imap) set: &'a SequenceSet,
    pub(in crate::imap) items: MacroOrMessageDataItemNames<'static>,
    pub(in crate::imap) uid: bool,
    pub(in crate::imap) modifiers: Vec<FetchModifier>,
}

impl Conn {
    #[allow(clippy::too_many_lines)]
    pub(in crate::imap) async fn fetch<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        selected: &mut Selected,
        request: FetchRequest<'_>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let FetchRequest {
            set,
            items,
            uid,
            modifiers,
        } = request;
        let mut changed_since = None;
        let mut vanished = false;
        for modifier in modifiers {
            match modifier {
                FetchModifier::ChangedSince(n) => changed_since = Some(n.get()),
                FetchModifier::Vanished => vanished = true,
            }
        }
        // RFC 7162 §3.2.6: VANISHED only in UID FETCH with CHANGEDSINCE, after ENABLE QRESYNC.
        if vanished && (!self.qresync || !uid || changed_since.is_none()) {
            return Done::Bad("VANISHED needs UID FETCH, CHANGEDSINCE and QRESYNC".into());
        }
        let mut items = match items {
            MacroOrMessageDataItemNames::Macro(Macro::Fast) => vec![
                MessageDataItemName::Flags,
                MessageDataItemName::InternalDate,
                MessageDataItemName::Rfc822Size,
            ],
            MacroOrMessageDataItemNames::Macro(Macro::All) => vec![
                MessageDataItemName::Flags,
                MessageDataItemName::InternalDate,
                MessageDataItemName::Rfc822Size,
                MessageDataItemName::Envelope,
            ],
            MacroOrMessageDataItemNames::Macro(_) => vec![
                MessageDataItemName::Flags,
                MessageDataItemName::InternalDate,
                MessageDataItemName::Rfc822Size,
                MessageDataItemName::Envelope,
                MessageDataItemName::Body,
            ],
            MacroOrMessageDataItemNames::MessageDataItemNames(items) => items,
        };
        if uid && !items.contains(&MessageDataItemName::Uid) {
            items.insert(0, MessageDataItemName::Uid);
        }
        // RFC 7162 §3.1.4: CHANGEDSINCE implies MODSEQ; either enables CONDSTORE.
        if changed_since.is_some() && !items.contains(&MessageDataItemName::ModSeq) {
            items.push(MessageDataItemName::ModSeq);
        }
        if items.contains(&MessageDataItemName::ModSeq) {
            self.enable_condstore(io, Some(selected));
        }
        let condstore = self.condstore;
        let user = user.to_string();
        let store = self.store.clone();
        let rev2 = self.rev2;
        if !uid && !selected.valid_sequence(set) {
            return Done::Bad("Invalid message sequence number".into());
        }
        let marks_seen = !selected.read_only
            && items.iter().any(|item| {
                matches!(
                    item,
                    MessageDataItemName::BodyExt { peek: false, .. }
                        | MessageDataItemName::Binary { peek: false, .. }
                        | MessageDataItemName::Rfc822
                        | MessageDataItemName::Rfc822Text
                )
            });
        let mut indexes = selected.resolve(set, uid);
        if let Some(since) = changed_since {
            indexes.retain(|i| selected.messages[*i].modseq > since);
            if vanished && since < selected.highest_modseq {
                let missing = selected.missing_uids(Some(set));
                if !missing.is_empty() {
                    io.queue(
                        format!("* VANISHED (EARLIER) {}\r\n", range_set(&missing)).as_bytes(),
                    );
                }
            }
        }
        let folder = selected.folder.clone();
        // The UIDs of the targets this (IMAP4rev1) session sees as \Recent.
        let recent: Arc<std::collections::HashSet<u32>> = Arc::new(if rev2 {
            Default::default()
        } else {
            indexes
                .iter()
                .filter(|i| selected.is_recent(**i))
                .map(|i| selected.messages[*i].uid)
                .collect()
        });
        let targets: Vec<(usize, MessageInfo)> = indexes
            .iter()
            .map(|i| (*i, selected.messages[*i].clone()))
            .collect();
        let reads_message = items.iter().any(|item| {
            !matches!(
                item,
                MessageDataItemName::Flags
                    | MessageDataItemName::Uid
                    | MessageDataItemName::InternalDate
                    | MessageDataItemName::Rfc822Size
                    | MessageDataItemName::ModSeq
            )
        });
        let items = Arc::new(items);
        for (start, end, cost) in fetch_batches(&targets, reads_message) {
            // The batch's memory comes from the budget SMTP bodies and literals share.
            let Some(_memory) = self
                .server
                .budget
                .reserve(cost as usize, FETCH_MEMORY_WAIT)
                .await
            else {
                warn!("FETCH stopped: the memory budget is exhausted");
                return no(
                    Some(Code::Limit),
                    "Server memory for messages in flight is exhausted, try again later",
                );
            };
            // Without the implicit \Seen a batch only reads, and a small one is read on the
            // async thread (see `Conn::short_read`).
            let (files, bytes) = match reads(&items) {
                Reads::Nothing => (0, 0),
                Reads::Header => (end - start, 0),
                Reads::Whole => (
                    end - start,
                    targets[start..end].iter().map(|(_, m)| m.size).sum(),
                ),
            };
            let short = !marks_seen && self.short_read(&user, 0, files, bytes);
            let mut batch = targets[start..end].to_vec();
            let (store, user, folder, items, recent) = (
                store.clone(),
                user.clone(),
                folder.clone(),
                items.clone(),
                recent.clone(),
            );
            let work = move || {
                // The implicit \Seen is stored first, so the FETCH can tell its mod-sequence.
                let mut seen = Vec::new();
                if marks_seen {
                    let unseen: Vec<&MessageInfo> = batch
                        .iter()
                        .map(|(_, info)| info)
                        .filter(|info| !info.flags.contains(Flags::SEEN))
                        .collect();
                    if !unseen.is_empty() {
                        let change = FlagChange::add(Flags::SEEN);
                        let outcome = store.change_flags(&user, &folder, &unseen, &change, None)?;
                        seen = outcome.updated;
                    }
                }
                // Headers for the whole batch in one store call (one round trip for a
                // backend behind a boundary or a database).
                let mut headers = if reads(&items) == Reads::Header {
                    let infos: Vec<&MessageInfo> = batch.iter().map(|(_, info)| info).collect();
                    store
                        .read_headers(&user, &folder, &infos)
                        .into_iter()
                        .map(Some)
                        .collect()
                } else {
                    Vec::new()
                };
                headers.resize_with(batch.len(), || None);
                let mut out = Vec::new();
                for ((index, info), header) in batch.iter_mut().zip(headers) {
                    let now = seen.iter().find(|u| u.uid == info.uid);
                    if let Some(now) = now {
                        info.flags = now.flags;
                        info.keywords.clone_from(&now.keywords);
                        info.modseq = now.modseq;
                    }
                    let shown = Shown {
                        flags_changed: now.is_some(),
                        condstore,
                        recent: recent.contains(&info.uid),
                    };
                    match render(
                        &mut out, &*store, &user, &folder, *index, info, &items, header, &shown,
                    ) {
                        Ok(()) => {}
                        Err(StoreError::Gone(_)) => continue,
                        Err(err) => return Err(err),
                    }
                }
                Ok((out, seen))
            };
            let rendered = reading(short, work).await;
            let (out, seen) = match rendered {
                Ok(rendered) => rendered,
                Err(err) => return store_failure(&err),
            };
            for now in seen {
                if let Ok(at) = selected.messages.binary_search_by_key(&now.uid, |m| m.uid) {
                    let message = &mut selected.messages[at];
                    message.flags = now.flags;
                    message.keywords = now.keywords;
                    message.modseq = now.modseq;
                }
            }
            io.queue(&out);
            if io.flush().await.is_err() {
                return Done::Close;
            }
        }
        ok("FETCH completed")
    }
}
