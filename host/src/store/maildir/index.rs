//! The folder's UID index (`postern-uidlist`, see [`super::uidlist`]) brought in line with a
//! listing: new files get UIDs, durably, before any is shown.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::Arc;

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
    let index = index_files(dir, &files, first, &mut None)?;
    Ok((index, files))
}

/// The UID index brought in line with a listing (see [`indexed_in_order`]), written durably
/// when it changed. The caller holds the folder lock.
pub(super) fn index_files(
    dir: &Path,
    files: &HashMap<String, Listed>,
    first: &[&str],
    kept: &mut Option<KeptIndex>,
) -> Result<UidList, StoreError> {
    let (index, update) = renumbered(dir, files, first, kept)?;
    match update {
        IndexUpdate::Keep => {}
        IndexUpdate::Append { from } => {
            let appended: Vec<(u32, Arc<str>)> = index
                .entries
                .iter()
                .filter(|(uid, _)| *uid >= from)
                .cloned()
                .collect();
            append_entries(dir, &appended, kept, &[]).map_err(StoreError::from_io)?;
        }
        IndexUpdate::Rewrite => {
            *kept = None;
            write_index(dir, &index).map_err(StoreError::from_io)?
        }
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
    kept: &mut Option<KeptIndex>,
) -> Result<(UidList, IndexUpdate), StoreError> {
    let (mut index, file) = read_index_kept(dir, kept).map_err(StoreError::from_io)?;
    let next_before = index.next;
    let present: HashSet<&str> = files.keys().map(String::as_str).collect();
    let indexed: HashSet<&str> = index.entries.iter().map(|(_, k)| &**k).collect();
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
    read_index_kept(dir, &mut None).map(|(index, _)| index)
}

/// The index file as this process last read or wrote it, kept (in the folder's state, under its
/// lock) so that every listing does not read and parse the file again. The file only ever gains
/// lines at its end or is replaced by a rename (see [`uidlist`]), so one `stat` tells whether it
/// is still what was read: a longer file, another inode or a new change time means it is not.
pub(super) struct KeptIndex {
    stamp: FileStamp,
    /// What the file holds (lines of messages gone included), as parsed.
    pub(super) index: UidList,
    file: uidlist::FileState,
}

/// What tells one version of the index file from another (see [`KeptIndex`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The folder's UID index, and what its file held (None: missing or damaged, so this is a new
/// index with a new UIDVALIDITY that must be written before anyone sees it): the kept one while
/// the file is unchanged, else the file read again (and kept).
pub(super) fn read_index_kept(
    dir: &Path,
    kept: &mut Option<KeptIndex>,
) -> io::Result<(UidList, Option<uidlist::FileState>)> {
    let path = dir.join(uidlist::FILE_NAME);
    if let Some(held) = kept.as_ref() {
        match fs::metadata(&path) {
            Ok(meta) if FileStamp::of(&meta) == held.stamp => {
                return Ok((held.index.clone(), Some(held.file)));
            }
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    *kept = None;
    // The stamp is taken before the bytes are read: a change in between makes the kept copy
    // look stale at the next read, never the other way round.
    let read = File::open(&path).and_then(|mut file| {
        let stamp = FileStamp::of(&file.metadata()?);
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text)?;
        Ok((stamp, text))
    });
    match read {
        Ok((stamp, text)) => Ok(match UidList::parse(&text) {
            Some((index, file)) => {
                *kept = Some(KeptIndex {
                    stamp,
                    index: index.clone(),
                    file,
                });
                (index, Some(file))
            }
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

/// Appends entry lines to the index file and flushes it with `also` (a message's file whose
/// bytes must be durable with its line). The kept index gains the lines when the file grew by
/// exactly them (so nobody else wrote it since it was read); else it is dropped.
pub(super) fn append_entries(
    dir: &Path,
    entries: &[(u32, Arc<str>)],
    kept: &mut Option<KeptIndex>,
    also: &[&File],
) -> io::Result<()> {
    let lines: String = entries
        .iter()
        .map(|(uid, key)| UidList::line(*uid, key))
        .collect();
    let path = dir.join(uidlist::FILE_NAME);
    let before = kept.as_ref().map(|held| held.stamp.len);
    let file = durable::append_unsynced(&path, lines.as_bytes()).inspect_err(|_| *kept = None)?;
    let mut files = also.to_vec();
    files.push(&file);
    durable::sync_all(&files, &[]).inspect_err(|_| *kept = None)?;
    let stamp = file.metadata().map(|meta| FileStamp::of(&meta));
    match (kept.as_mut(), stamp, before) {
        (Some(held), Ok(stamp), Some(len)) if stamp.len == len + lines.len() as u64 => {
            held.stamp = stamp;
            held.file.lines += entries.len();
            for (uid, key) in entries {
                held.index.next = held.index.next.max(uid + 1);
                held.index.entries.push((*uid, key.clone()));
            }
        }
        _ => *kept = None,
    }
    Ok(())
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
