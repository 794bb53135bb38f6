//! The folder's UID index (`postern-uidlist`, see [`super::uidlist`]) brought in line with a
//! listing: new files get UIDs, durably, before any is shown.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::*;

/// Lists a folder and brings its UID index up to date (new files get UIDs, vanished ones lose
/// theirs), writing the index durably when it changed, numbering the unindexed files named in
/// `first` before the others and in that order (a copy's messages in their source order); the
/// rest by arrival. The caller holds the folder lock.
pub(super) fn indexed_in_order(
    dir: &Path,
    first: &[&str],
) -> Result<(UidList, HashMap<String, Listed>), StoreError> {
    let files = list_files(dir).map_err(StoreError::from_io)?;
    let index = index_files(dir, &files, first)?;
    Ok((index, files))
}

/// The UID index brought in line with a listing (see [`indexed_in_order`]), written durably
/// when it changed. The caller holds the folder lock.
pub(super) fn index_files(
    dir: &Path,
    files: &HashMap<String, Listed>,
    first: &[&str],
) -> Result<UidList, StoreError> {
    let (index, update) = renumbered(dir, files, first)?;
    match update {
        IndexUpdate::Keep => {}
        IndexUpdate::Append { from } => {
            let lines: String = index
                .entries
                .iter()
                .filter(|(uid, _)| *uid >= from)
                .map(|(uid, key)| UidList::line(*uid, key))
                .collect();
            let file = append_index(dir, &lines).map_err(StoreError::from_io)?;
            durable::sync_all(&[&file], &[]).map_err(StoreError::from_io)?;
        }
        IndexUpdate::Rewrite => write_index(dir, &index).map_err(StoreError::from_io)?,
    }
    Ok(index)
}

/// How the index file must change after a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IndexUpdate {
    /// Nothing new: entries of vanished messages leave the file at its next rewrite.
    Keep,
    /// Append the entries numbered from this UID on.
    Append { from: u32 },
    /// Replace it whole: it is new, damaged, torn, or mostly lines of messages gone.
    Rewrite,
}

/// The folder's UID index brought in line with `files` (see [`indexed_in_order`]), and how the
/// file must change. New messages are appended; when messages only went away nothing is
/// written: the entries of vanished messages are dropped at every listing anyway, and leave the
/// file when it is next rewritten (when they outnumber the rest). That spares an expunge two disk
/// flushes; what it costs is that a message which comes back under the same name (the same
/// delivery retried after a crash, see `already_delivered`) is recognised rather than numbered
/// anew.
pub(super) fn renumbered(
    dir: &Path,
    files: &HashMap<String, Listed>,
    first: &[&str],
) -> Result<(UidList, IndexUpdate), StoreError> {
    let (mut index, file) = read_index_as_stored(dir).map_err(StoreError::from_io)?;
    let next_before = index.next;
    let present: HashSet<&str> = files.keys().map(String::as_str).collect();
    let indexed: HashSet<&str> = index.entries.iter().map(|(_, k)| k.as_str()).collect();
    let mut arrivals: Vec<(&String, &Listed)> = files
        .iter()
        .filter(|(key, _)| !indexed.contains(key.as_str()))
        .collect();
    let rank = |key: &str| first.iter().position(|k| *k == key).unwrap_or(usize::MAX);
    arrivals
        .sort_by(|a, b| (rank(a.0), a.1.received_at, a.0).cmp(&(rank(b.0), b.1.received_at, b.0)));
    let update = match index.reconcile(&present, arrivals.iter().map(|(k, _)| k.as_str())) {
        Ok(_) => match file {
            Some(file) if file.appendable(&index) => {
                if index.next == next_before {
                    IndexUpdate::Keep
                } else {
                    IndexUpdate::Append { from: next_before }
                }
            }
            _ => IndexUpdate::Rewrite,
        },
        Err(uidlist::UidsExhausted) => {
            warn!(dir = %dir.display(), "UIDs exhausted, rebuilding the index");
            index = UidList::fresh(fresh_validity(), Some(index.validity));
            let mut all: Vec<_> = files.iter().collect();
            all.sort_by(|a, b| (a.1.received_at, a.0).cmp(&(b.1.received_at, b.0)));
            index
                .reconcile(&present, all.iter().map(|(k, _)| k.as_str()))
                .map_err(|_| StoreError::Io(io::Error::other("folder has too many messages")))?;
            IndexUpdate::Rewrite
        }
    };
    Ok((index, update))
}

/// A UIDVALIDITY for a new or rebuilt index: the time, but never one this process handed out
/// before, so a folder deleted and created again within the same second (or rebuilt twice) gets
/// a different UIDVALIDITY and no client can trust its stale UIDs (RFC 9051 §2.3.1.1).
pub(super) fn fresh_validity() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static LAST: AtomicU32 = AtomicU32::new(0);
    let now = unix_now();
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last.wrapping_add(1)).max(1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

pub(super) fn read_index(dir: &Path) -> io::Result<UidList> {
    read_index_as_stored(dir).map(|(index, _)| index)
}

/// The folder's UID index, and what its file held (None: missing or damaged, so this is a new
/// index with a new UIDVALIDITY that must be written before anyone sees it).
pub(super) fn read_index_as_stored(
    dir: &Path,
) -> io::Result<(UidList, Option<uidlist::FileState>)> {
    match fs::read_to_string(dir.join(uidlist::FILE_NAME)) {
        Ok(text) => Ok(match UidList::parse(&text) {
            Some((index, file)) => (index, Some(file)),
            None => {
                warn!(dir = %dir.display(), "damaged UID index, rebuilding with a new UIDVALIDITY");
                let previous = text
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix('V')?.parse::<u32>().ok());
                (UidList::fresh(fresh_validity(), previous), None)
            }
        }),
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::InvalidData
            ) =>
        {
            Ok((UidList::fresh(fresh_validity(), None), None))
        }
        Err(err) => Err(err),
    }
}

/// Appends entry lines to the index file, to be flushed by the caller.
pub(super) fn append_index(dir: &Path, lines: &str) -> io::Result<File> {
    durable::append_unsynced(&dir.join(uidlist::FILE_NAME), lines.as_bytes())
}

/// Replaces the index atomically and durably.
pub(super) fn write_index(dir: &Path, index: &UidList) -> io::Result<()> {
    let tmp = dir.join(format!("{}.tmp", uidlist::FILE_NAME));
    durable::write_and_rename(
        &tmp,
        &dir.join(uidlist::FILE_NAME),
        index.render().as_bytes(),
    )?;
    durable::sync_dir(dir)
}

pub(super) fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}
