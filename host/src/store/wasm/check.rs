//! What a backend answers, turned into the contract's types and checked: a backend is untrusted
//! code, and an answer that breaks the contract (UIDs out of order, a keyword that is not an
//! IMAP atom, a mod-sequence above the highest) must not reach a client.

use super::bindings::types;
use crate::store::{Flags, FolderSnapshot, Keywords, MessageHandle, MessageInfo, StoreError};

pub fn to_wit_flags(flags: Flags) -> types::SystemFlags {
    let mut wit = types::SystemFlags::empty();
    for (flag, bit) in pairs() {
        if flags.contains(flag) {
            wit |= bit;
        }
    }
    wit
}

pub fn from_wit_flags(wit: types::SystemFlags) -> Flags {
    pairs()
        .into_iter()
        .filter(|(_, bit)| wit.contains(*bit))
        .fold(Flags::empty(), |acc, (flag, _)| acc.union(flag))
}

fn pairs() -> [(Flags, types::SystemFlags); 6] {
    [
        (Flags::SEEN, types::SystemFlags::SEEN),
        (Flags::ANSWERED, types::SystemFlags::ANSWERED),
        (Flags::FLAGGED, types::SystemFlags::FLAGGED),
        (Flags::DELETED, types::SystemFlags::DELETED),
        (Flags::DRAFT, types::SystemFlags::DRAFT),
        (Flags::FORWARDED, types::SystemFlags::FORWARDED),
    ]
}

pub fn keywords(names: Vec<String>) -> Result<Keywords, String> {
    if let Some(bad) = names.iter().find(|n| !crate::store::valid_keyword(n)) {
        return Err(format!("keyword {bad:?} is not an IMAP atom"));
    }
    Ok(Keywords::from_names(names))
}

pub fn store_error(err: types::StoreError) -> StoreError {
    match err {
        types::StoreError::Full(reason) => StoreError::Full(std::io::Error::other(reason)),
        types::StoreError::Io(reason) => StoreError::Io(std::io::Error::other(reason)),
        types::StoreError::InvalidName(name) => StoreError::InvalidName(name),
        types::StoreError::NoSuchFolder(name) => StoreError::NoSuchFolder(name),
        types::StoreError::Gone(key) => StoreError::Gone(key),
        types::StoreError::Exists(name) => StoreError::Exists(name),
        types::StoreError::TooManyKeywords(name) => StoreError::TooManyKeywords(name),
    }
}

/// A listing, checked: UIDVALIDITY not 0, UIDs ascending and below UIDNEXT, mod-sequences from
/// 1 to HIGHESTMODSEQ, keywords that are atoms.
pub fn snapshot(wit: types::FolderSnapshot) -> Result<FolderSnapshot, String> {
    if wit.uid_validity == 0 {
        return Err("UIDVALIDITY 0".into());
    }
    let mut messages = Vec::with_capacity(wit.messages.len());
    let mut last = 0;
    for m in wit.messages {
        if m.uid <= last {
            return Err(format!("UID {} listed after UID {last}", m.uid));
        }
        if m.uid >= wit.uid_next {
            return Err(format!(
                "UID {} is not below UIDNEXT {}",
                m.uid, wit.uid_next
            ));
        }
        if m.modseq == 0 || m.modseq > wit.highest_modseq {
            return Err(format!(
                "message {} has mod-sequence {}, outside 1..={}",
                m.uid, m.modseq, wit.highest_modseq
            ));
        }
        last = m.uid;
        messages.push(MessageInfo {
            uid: m.uid,
            key: m.key,
            handle: MessageHandle::new(m.handle),
            size: m.size,
            flags: from_wit_flags(m.flags),
            keywords: keywords(m.keywords)?,
            received_at: m.received_at,
            modseq: m.modseq,
        });
    }
    let defined = keywords(wit.keywords)?;
    Ok(FolderSnapshot {
        uid_validity: wit.uid_validity,
        uid_next: wit.uid_next,
        messages,
        keywords: defined.iter().map(str::to_string).collect(),
        more_keywords: wit.more_keywords,
        highest_modseq: wit.highest_modseq,
    })
}
