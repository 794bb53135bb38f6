//! A Postern mailbox backend: every folder is two append-only logs, one of message bytes and one
//! of index lines (see `folder.rs`), compacted when removed messages fill half of them. A
//! folder of 100,000 messages is four files, listing it needs no directory scan, and a batch
//! of deliveries, flag changes or removals costs two flushes however many messages it holds.
//!
//! ```toml
//! [[mailbox_backend]]
//! name = "mailbox-log"
//! path = "plugins/target/wasm32-wasip2/release/mailbox_log.wasm"
//! domains = ["example.test"]
//! ```
//!
//! Layout under the backend's directory (`/data` in the sandbox), names percent-encoded:
//! `<mailbox>/f.<folder>/{current,index.<gen>,messages.<gen>,recent,metadata}`, and per mailbox
//! `subscriptions`, `metadata` and `validity` (the last UIDVALIDITY given).

mod folder;
mod names;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use folder::{sync_dir, write_whole, Folder, Message};
use names::{decode, encode};

wit_bindgen::generate!({
    path: "../../wit/deps/postern-plugin-0.1.0",
    world: "postern:plugin/mailbox-backend@0.1.0",
});

use exports::postern::plugin::mailbox::Guest;
use postern::plugin::mailbox_types::{
    Delivery, FlagChange, FlagMode, FlagOutcome, FolderSnapshot, Imported, ImportedFolder,
    Incoming, MailboxUsage, MessageInfo, MessageRef, StoreError, SystemFlags, Updated,
};

const ROOT: &str = "/data";
/// Folders an instance keeps loaded; past it, it starts over (they reload from disk).
const KEPT_FOLDERS: usize = 256;
/// Bytes per read of an incoming message or a copy.
const CHUNK: u32 = 1 << 20;

/// Errors inside the backend, answered as the contract's.
#[derive(Debug)]
pub enum Error {
    Full(String),
    Io(String),
    Invalid(String),
    NoSuchFolder(String),
    Gone(String),
    Exists(String),
}

impl From<Error> for StoreError {
    fn from(err: Error) -> StoreError {
        match err {
            Error::Full(s) => StoreError::Full(s),
            Error::Io(s) => StoreError::Io(s),
            Error::Invalid(s) => StoreError::InvalidName(s),
            Error::NoSuchFolder(s) => StoreError::NoSuchFolder(s),
            Error::Gone(s) => StoreError::Gone(s),
            Error::Exists(s) => StoreError::Exists(s),
        }
    }
}

fn io(context: &str) -> impl Fn(io::Error) -> Error + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::StorageFull {
            Error::Full(format!("{context}: {e}"))
        } else {
            Error::Io(format!("{context}: {e}"))
        }
    }
}

/// A random number (WASI random, through the standard library's hasher seed).
pub fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

thread_local! {
    static FOLDERS: RefCell<HashMap<PathBuf, Folder>> = RefCell::new(HashMap::new());
}

fn mailbox_dir(mailbox: &str) -> PathBuf {
    Path::new(ROOT).join(encode(&mailbox.to_ascii_lowercase()))
}

fn is_inbox(folder: &str) -> bool {
    folder.eq_ignore_ascii_case("INBOX")
}

fn folder_dir(mailbox: &str, folder: &str) -> PathBuf {
    let name = if is_inbox(folder) { "INBOX" } else { folder };
    mailbox_dir(mailbox).join(format!("f.{}", encode(name)))
}

/// The mailbox's directory, made (durably) when missing.
fn ensure_mailbox(mailbox: &str) -> Result<PathBuf, Error> {
    let dir = mailbox_dir(mailbox);
    if !dir.is_dir() {
        fs::create_dir_all(&dir).map_err(io("create mailbox"))?;
        sync_dir(Path::new(ROOT))?;
    }
    Ok(dir)
}

/// A UIDVALIDITY no folder of the mailbox had: one above the last given, kept durably.
fn next_validity(mailbox_dir: &Path) -> Result<u32, Error> {
    let last: u32 = fs::read_to_string(mailbox_dir.join("validity"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| (random() as u32 >> 2).max(1));
    let next = last.checked_add(1).unwrap_or(1);
    write_whole(mailbox_dir, "validity", format!("{next}\n").as_bytes())?;
    Ok(next)
}

/// Runs `f` on a folder, loaded or refreshed; INBOX (and, with `create`, any folder) is made
/// when missing.
fn with_folder<R>(
    mailbox: &str,
    folder: &str,
    create: bool,
    f: impl FnOnce(&mut Folder) -> Result<R, Error>,
) -> Result<R, Error> {
    let dir = folder_dir(mailbox, folder);
    FOLDERS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let fresh = match cache.get_mut(&dir) {
            Some(kept) => kept.refresh()?,
            None => false,
        };
        if !fresh {
            cache.remove(&dir);
            if cache.len() >= KEPT_FOLDERS {
                cache.clear();
            }
            let loaded = match Folder::open(&dir)? {
                Some(loaded) => loaded,
                None if create || is_inbox(folder) => {
                    let parent = ensure_mailbox(mailbox)?;
                    let validity = next_validity(&parent)?;
                    match Folder::create(&parent, &dir, validity) {
                        Ok(()) | Err(Error::Exists(_)) => {}
                        Err(err) => return Err(err),
                    }
                    Folder::open(&dir)?.ok_or_else(|| Error::NoSuchFolder(folder.into()))?
                }
                None => return Err(Error::NoSuchFolder(folder.into())),
            };
            cache.insert(dir.clone(), loaded);
        }
        f(cache.get_mut(&dir).expect("just loaded"))
    })
}

fn forget(dir: &Path) {
    FOLDERS.with(|cache| cache.borrow_mut().remove(dir));
}

fn valid_folder(folder: &str) -> bool {
    is_inbox(folder)
        || (!folder.is_empty()
            && folder.len() <= 255
            && folder.split('/').all(|p| {
                !p.is_empty() && p != "." && p != ".." && !p.chars().any(char::is_control)
            }))
}

/// Streams a source of bytes into the message log; returns the bytes written.
fn stream_in(out: &mut File, prepend: &[u8], incoming: &Incoming) -> Result<u64, Error> {
    out.write_all(prepend).map_err(io("message log"))?;
    let size = incoming.size();
    let mut offset = 0;
    while offset < size {
        let chunk = incoming.read(offset, CHUNK);
        if chunk.is_empty() {
            break;
        }
        out.write_all(&chunk).map_err(io("message log"))?;
        offset += chunk.len() as u64;
    }
    Ok(prepend.len() as u64 + offset)
}

fn bits(flags: SystemFlags) -> u8 {
    let mut b = 0;
    for (i, f) in [
        SystemFlags::SEEN,
        SystemFlags::ANSWERED,
        SystemFlags::FLAGGED,
        SystemFlags::DELETED,
        SystemFlags::DRAFT,
        SystemFlags::FORWARDED,
    ]
    .into_iter()
    .enumerate()
    {
        if flags.contains(f) {
            b |= 1 << i;
        }
    }
    b
}

fn flags_of(b: u8) -> SystemFlags {
    let mut flags = SystemFlags::empty();
    for (i, f) in [
        SystemFlags::SEEN,
        SystemFlags::ANSWERED,
        SystemFlags::FLAGGED,
        SystemFlags::DELETED,
        SystemFlags::DRAFT,
        SystemFlags::FORWARDED,
    ]
    .into_iter()
    .enumerate()
    {
        if b & (1 << i) != 0 {
            flags |= f;
        }
    }
    flags
}

/// Keywords each once (case-insensitively), in the order given.
fn unique(keywords: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in keywords {
        if !out.iter().any(|o| o.eq_ignore_ascii_case(k)) {
            out.push(k.clone());
        }
    }
    out
}

fn info(m: &Message) -> MessageInfo {
    MessageInfo {
        uid: m.uid,
        key: m.uid.to_string(),
        handle: m.offset.to_string(),
        size: m.size,
        flags: flags_of(m.flags),
        keywords: m.keywords.clone(),
        received_at: m.received_at,
        modseq: m.modseq,
    }
}

fn find<'f>(folder: &'f Folder, message: &MessageRef) -> Option<&'f Message> {
    folder
        .messages
        .get(&message.uid)
        .filter(|m| m.uid.to_string() == message.key)
}

/// Copies a message's bytes from a message log file into another.
fn copy_bytes(from: &Path, offset: u64, size: u64, to: &mut File) -> Result<(), Error> {
    let mut source = File::open(from).map_err(io("message log"))?;
    source
        .seek(SeekFrom::Start(offset))
        .map_err(io("message log"))?;
    let copied = io::copy(&mut source.take(size), to).map_err(io("copy"))?;
    if copied != size {
        return Err(Error::Io("a message is cut short in the log".into()));
    }
    Ok(())
}

fn read_lines(path: &Path) -> Result<Vec<String>, Error> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().filter_map(decode).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io("read")(e)),
    }
}

fn read_metadata(path: &Path) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("read metadata")(e)),
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            let value = (0..value.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(value.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            Some((decode(name)?, value))
        })
        .collect())
}

fn metadata_place(mailbox: &str, folder: Option<&str>) -> Result<(PathBuf, &'static str), Error> {
    match folder {
        Some(folder) => {
            let dir = folder_dir(mailbox, folder);
            if !dir.is_dir() && !is_inbox(folder) {
                return Err(Error::NoSuchFolder(folder.into()));
            }
            with_folder(mailbox, folder, false, |_| Ok(()))?;
            Ok((dir, "metadata"))
        }
        None => Ok((ensure_mailbox(mailbox)?, "metadata")),
    }
}

/// The folder names of a mailbox, INBOX included when it exists.
fn folder_names(mailbox: &str) -> Result<Vec<String>, Error> {
    let entries = match fs::read_dir(mailbox_dir(mailbox)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list folders")(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("list folders"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(folder) = name.strip_prefix("f.").and_then(decode) {
            names.push(folder);
        }
    }
    Ok(names)
}

struct Backend;

impl Backend {
    fn deliver_group(batch: &[Delivery], indexes: &[usize]) -> Vec<Result<(), Error>> {
        let first = &batch[indexes[0]];
        let outcome = with_folder(&first.mailbox, &first.folder, true, |folder| {
            let (mut out, mut at) = folder.data_appender()?;
            let mut lines = Vec::new();
            let mut uid = folder.next_uid;
            let mut modseq = folder.next_modseq();
            let mut ids = std::collections::HashSet::new();
            for index in indexes {
                let d = &batch[*index];
                if folder.delivered.contains(&d.delivery_id) || !ids.insert(d.delivery_id.clone()) {
                    continue; // stored by an earlier attempt
                }
                let size = stream_in(&mut out, &d.prepend, &d.message)?;
                let message = Message {
                    uid,
                    offset: at,
                    size,
                    received_at: d.received_at,
                    modseq,
                    flags: 0,
                    keywords: Vec::new(),
                    delivery: Some(d.delivery_id.clone()),
                };
                lines.push(Folder::append_line(&message));
                at += size;
                uid += 1;
                modseq += 1;
            }
            out.sync_data().map_err(io("message log"))?;
            folder.note_appended(at);
            folder.commit(&lines)
        });
        match outcome {
            Ok(()) => indexes.iter().map(|_| Ok(())).collect(),
            Err(err) => indexes
                .iter()
                .map(|_| {
                    Err(match &err {
                        Error::Full(s) => Error::Full(s.clone()),
                        Error::Invalid(s) => Error::Invalid(s.clone()),
                        other => Error::Io(format!("{other:?}")),
                    })
                })
                .collect(),
        }
    }
}

impl Guest for Backend {
    fn deliver(batch: Vec<Delivery>) -> Vec<Result<(), StoreError>> {
        let mut results: Vec<Result<(), StoreError>> = batch.iter().map(|_| Ok(())).collect();
        let mut groups: Vec<((String, String), Vec<usize>)> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            if !valid_folder(&d.folder) {
                results[i] = Err(StoreError::InvalidName(d.folder.clone()));
                continue;
            }
            let key = (d.mailbox.to_ascii_lowercase(), d.folder.clone());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        for (_, indexes) in groups {
            for (i, r) in indexes.iter().zip(Backend::deliver_group(&batch, &indexes)) {
                results[*i] = r.map_err(StoreError::from);
            }
        }
        results
    }

    fn snapshot(mailbox: String, folder: String) -> Result<FolderSnapshot, StoreError> {
        Ok(with_folder(&mailbox, &folder, false, |f| {
            Ok(FolderSnapshot {
                uid_validity: f.validity,
                uid_next: f.next_uid,
                messages: f.messages.values().map(info).collect(),
                keywords: f.defined.clone(),
                more_keywords: true,
                highest_modseq: f.highest,
            })
        })?)
    }

    fn read(
        mailbox: String,
        folder: String,
        message: MessageRef,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        Ok(with_folder(&mailbox, &folder, false, |f| {
            let m = find(f, &message).ok_or_else(|| Error::Gone(message.key.clone()))?;
            f.read(m, offset, len.min(CHUNK))
        })?)
    }

    fn read_headers(
        mailbox: String,
        folder: String,
        messages: Vec<MessageRef>,
    ) -> Vec<Result<Vec<u8>, StoreError>> {
        let answer = with_folder(&mailbox, &folder, false, |f| {
            Ok(messages
                .iter()
                .map(|r| {
                    let m = find(f, r).ok_or_else(|| Error::Gone(r.key.clone()))?;
                    // The header ends at the first empty line; read until it shows.
                    let mut header = Vec::new();
                    while (header.len() as u64) < m.size {
                        let chunk = f.read(m, header.len() as u64, 16 << 10)?;
                        let from = header.len().saturating_sub(3);
                        header.extend_from_slice(&chunk);
                        if let Some(at) = header[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                            header.truncate(from + at + 4);
                            break;
                        }
                    }
                    Ok(header)
                })
                .collect::<Vec<Result<Vec<u8>, Error>>>())
        });
        match answer {
            Ok(headers) => headers
                .into_iter()
                .map(|h| h.map_err(StoreError::from))
                .collect(),
            Err(err) => {
                let err = StoreError::from(err);
                messages.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }

    fn change_flags(
        mailbox: String,
        folder: String,
        messages: Vec<MessageRef>,
        change: FlagChange,
        unchanged_since: Option<u64>,
    ) -> Result<FlagOutcome, StoreError> {
        Ok(with_folder(&mailbox, &folder, false, |f| {
            let mut outcome = FlagOutcome {
                updated: Vec::new(),
                refused: Vec::new(),
            };
            let mut lines = Vec::new();
            let mut modseq = f.next_modseq();
            let wanted_bits = bits(change.flags);
            for r in &messages {
                let Some(m) = find(f, r) else { continue };
                if unchanged_since.is_some_and(|limit| m.modseq > limit) {
                    outcome.refused.push(m.uid);
                    continue;
                }
                let (new_bits, new_keywords) = match change.mode {
                    FlagMode::Add => {
                        let mut k = m.keywords.clone();
                        k.extend(change.keywords.iter().cloned());
                        (m.flags | wanted_bits, unique(&k))
                    }
                    FlagMode::Remove => (
                        m.flags & !wanted_bits,
                        m.keywords
                            .iter()
                            .filter(|k| !change.keywords.iter().any(|c| c.eq_ignore_ascii_case(k)))
                            .cloned()
                            .collect(),
                    ),
                    FlagMode::Replace => (wanted_bits, unique(&change.keywords)),
                };
                let same_keywords = new_keywords.len() == m.keywords.len()
                    && new_keywords
                        .iter()
                        .all(|k| m.keywords.iter().any(|o| o.eq_ignore_ascii_case(k)));
                // RFC 7162 §3.1.3: a change that changes nothing keeps the mod-sequence.
                let now = if new_bits == m.flags && same_keywords {
                    m.modseq
                } else {
                    lines.push(Folder::flags_line(m.uid, modseq, new_bits, &new_keywords));
                    modseq += 1;
                    modseq - 1
                };
                outcome.updated.push(Updated {
                    uid: m.uid,
                    flags: flags_of(new_bits),
                    keywords: if same_keywords {
                        m.keywords.clone()
                    } else {
                        new_keywords
                    },
                    modseq: now,
                });
            }
            f.commit(&lines)?;
            f.compact_if_due()?;
            Ok(outcome)
        })?)
    }

    fn append(
        mailbox: String,
        folder: String,
        message: Incoming,
        flags: SystemFlags,
        keywords: Vec<String>,
        received_at: i64,
    ) -> Result<(u32, u32), StoreError> {
        Ok(with_folder(&mailbox, &folder, false, |f| {
            let (mut out, at) = f.data_appender()?;
            let size = stream_in(&mut out, &[], &message)?;
            out.sync_data().map_err(io("message log"))?;
            f.note_appended(at + size);
            let m = Message {
                uid: f.next_uid,
                offset: at,
                size,
                received_at,
                modseq: f.next_modseq(),
                flags: bits(flags),
                keywords: unique(&keywords),
                delivery: None,
            };
            f.commit(&[Folder::append_line(&m)])?;
            Ok((f.validity, m.uid))
        })?)
    }

    fn copy(
        mailbox: String,
        folder: String,
        messages: Vec<MessageRef>,
        target: String,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        let (source_log, found) = with_folder(&mailbox, &folder, false, |f| {
            let found: Vec<Message> = messages
                .iter()
                .filter_map(|r| find(f, r).cloned())
                .collect();
            Ok((f.data_path(), found))
        })?;
        Ok(with_folder(&mailbox, &target, false, |t| {
            let (mut out, mut at) = t.data_appender()?;
            let mut lines = Vec::new();
            let mut pairs = Vec::new();
            let (mut uid, mut modseq) = (t.next_uid, t.next_modseq());
            for m in &found {
                copy_bytes(&source_log, m.offset, m.size, &mut out)?;
                let copy = Message {
                    uid,
                    offset: at,
                    modseq,
                    delivery: None,
                    ..m.clone()
                };
                lines.push(Folder::append_line(&copy));
                pairs.push((m.uid, uid));
                at += m.size;
                uid += 1;
                modseq += 1;
            }
            out.sync_data().map_err(io("message log"))?;
            t.note_appended(at);
            t.commit(&lines)?;
            Ok((t.validity, pairs))
        })?)
    }

    fn remove(
        mailbox: String,
        folder: String,
        messages: Vec<MessageRef>,
    ) -> Result<(), StoreError> {
        Ok(with_folder(&mailbox, &folder, false, |f| {
            let mut modseq = f.next_modseq();
            let mut lines = Vec::new();
            for r in &messages {
                if let Some(m) = find(f, r) {
                    lines.push(Folder::expunge_line(m.uid, modseq));
                    modseq += 1;
                }
            }
            f.commit(&lines)?;
            f.compact_if_due()
        })?)
    }

    fn folders(mailbox: String) -> Result<Vec<String>, StoreError> {
        Ok(folder_names(&mailbox)?
            .into_iter()
            .filter(|f| !is_inbox(f))
            .collect())
    }

    fn create_folder(mailbox: String, folder: String) -> Result<(), StoreError> {
        if is_inbox(&folder) || !valid_folder(&folder) {
            return Err(StoreError::InvalidName(folder));
        }
        let parent = ensure_mailbox(&mailbox)?;
        let dir = folder_dir(&mailbox, &folder);
        if dir.exists() {
            return Err(StoreError::Exists(folder));
        }
        let validity = next_validity(&parent)?;
        forget(&dir);
        Folder::create(&parent, &dir, validity).map_err(|e| match e {
            Error::Exists(_) => StoreError::Exists(folder.clone()),
            other => other.into(),
        })
    }

    fn delete_folder(mailbox: String, folder: String) -> Result<(), StoreError> {
        if is_inbox(&folder) {
            return Err(StoreError::InvalidName(folder));
        }
        let dir = folder_dir(&mailbox, &folder);
        if !dir.is_dir() {
            return Err(StoreError::NoSuchFolder(folder));
        }
        let parent = mailbox_dir(&mailbox);
        // Out of sight in one rename, then removed.
        let doomed = parent.join(format!("trash.{:016x}", random()));
        fs::rename(&dir, &doomed).map_err(io("delete folder"))?;
        forget(&dir);
        sync_dir(&parent)?;
        fs::remove_dir_all(&doomed).map_err(io("delete folder"))?;
        Ok(())
    }

    fn rename_folder(mailbox: String, from: String, to: String) -> Result<(), StoreError> {
        if is_inbox(&to) || !valid_folder(&to) {
            return Err(StoreError::InvalidName(to));
        }
        if folder_dir(&mailbox, &to).exists() {
            return Err(StoreError::Exists(to));
        }
        if is_inbox(&from) {
            // RFC 9051 §6.3.6: INBOX's messages move to the new folder; INBOX stays, empty.
            Backend::create_folder(mailbox.clone(), to.clone())?;
            let listed = Backend::snapshot(mailbox.clone(), "INBOX".into())?;
            let refs: Vec<MessageRef> = listed
                .messages
                .iter()
                .map(|m| MessageRef {
                    uid: m.uid,
                    key: m.key.clone(),
                    handle: m.handle.clone(),
                })
                .collect();
            Backend::copy(mailbox.clone(), "INBOX".into(), refs.clone(), to)?;
            return Backend::remove(mailbox, "INBOX".into(), refs);
        }
        if !folder_dir(&mailbox, &from).is_dir() {
            return Err(StoreError::NoSuchFolder(from));
        }
        let prefix = format!("{from}/");
        for name in folder_names(&mailbox)? {
            let renamed = if name == from {
                to.clone()
            } else if let Some(rest) = name.strip_prefix(&prefix) {
                format!("{to}/{rest}")
            } else {
                continue;
            };
            let (old, new) = (folder_dir(&mailbox, &name), folder_dir(&mailbox, &renamed));
            fs::rename(&old, &new).map_err(io("rename folder"))?;
            forget(&old);
            forget(&new);
        }
        Ok(sync_dir(&mailbox_dir(&mailbox))?)
    }

    fn subscriptions(mailbox: String) -> Result<Vec<String>, StoreError> {
        Ok(read_lines(&mailbox_dir(&mailbox).join("subscriptions"))?)
    }

    fn set_subscribed(mailbox: String, folder: String, subscribed: bool) -> Result<(), StoreError> {
        let dir = ensure_mailbox(&mailbox)?;
        let mut names = read_lines(&dir.join("subscriptions"))?;
        names.retain(|n| *n != folder);
        if subscribed {
            names.push(folder);
        }
        let text: String = names.iter().map(|n| format!("{}\n", encode(n))).collect();
        Ok(write_whole(&dir, "subscriptions", text.as_bytes())?)
    }

    fn recent_boundary(
        mailbox: String,
        folder: String,
        validity: u32,
        claim: Option<u32>,
    ) -> Result<u32, StoreError> {
        Ok(with_folder(&mailbox, &folder, false, |f| {
            let path = f.dir.join("recent");
            let (known, boundary) = fs::read_to_string(&path)
                .ok()
                .and_then(|t| {
                    let (v, uid) = t.trim().split_once(' ')?;
                    Some((v.parse::<u32>().ok()?, uid.parse::<u32>().ok()?))
                })
                .unwrap_or((validity, 0));
            let boundary = if known == validity { boundary } else { 0 };
            if let Some(upto) = claim.filter(|u| *u > boundary) {
                // Advisory (a crash makes a few messages recent again): not flushed.
                let _ = fs::write(&path, format!("{validity} {upto}\n"));
            }
            Ok(boundary)
        })?)
    }

    fn metadata(
        mailbox: String,
        folder: Option<String>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (dir, file) = metadata_place(&mailbox, folder.as_deref())?;
        Ok(read_metadata(&dir.join(file))?)
    }

    fn set_metadata(
        mailbox: String,
        folder: Option<String>,
        changes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), StoreError> {
        let (dir, file) = metadata_place(&mailbox, folder.as_deref())?;
        let mut entries: std::collections::BTreeMap<String, Vec<u8>> =
            read_metadata(&dir.join(file))?.into_iter().collect();
        for (name, value) in changes {
            match value {
                Some(value) => entries.insert(name, value),
                None => entries.remove(&name),
            };
        }
        let text: String = entries
            .iter()
            .map(|(name, value)| {
                let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
                format!("{} {hex}\n", encode(name))
            })
            .collect();
        Ok(write_whole(&dir, file, text.as_bytes())?)
    }

    fn import_messages(
        mailbox: String,
        folder: String,
        numbers: ImportedFolder,
        messages: Vec<Imported>,
    ) -> Result<(), StoreError> {
        if !valid_folder(&folder) {
            return Err(StoreError::InvalidName(folder));
        }
        let parent = ensure_mailbox(&mailbox)?;
        let dir = folder_dir(&mailbox, &folder);
        forget(&dir);
        match Folder::open(&dir)? {
            None => Folder::create(&parent, &dir, numbers.uid_validity)?,
            Some(f) if f.validity != numbers.uid_validity => {
                if !f.messages.is_empty() || f.next_uid > 1 {
                    return Err(StoreError::Exists(folder));
                }
                // An empty folder takes the imported UIDVALIDITY: made again under it.
                let doomed = parent.join(format!("trash.{:016x}", random()));
                fs::rename(&dir, &doomed).map_err(io("replace folder"))?;
                sync_dir(&parent)?;
                fs::remove_dir_all(&doomed).map_err(io("replace folder"))?;
                Folder::create(&parent, &dir, numbers.uid_validity)?;
            }
            Some(_) => {}
        }
        Ok(with_folder(&mailbox, &folder, false, |f| {
            let (mut out, mut at) = f.data_appender()?;
            let mut lines = Vec::new();
            let mut modseq = f.next_modseq();
            // Above the UIDs present (not UIDNEXT: an earlier batch raised it already).
            let mut last = f.messages.keys().next_back().copied().unwrap_or(0);
            for m in &messages {
                if f.messages.contains_key(&m.uid) {
                    continue; // brought by an earlier run
                }
                if m.uid <= last {
                    return Err(Error::Exists(format!("{folder}: UID {}", m.uid)));
                }
                let size = stream_in(&mut out, &[], &m.message)?;
                lines.push(Folder::append_line(&Message {
                    uid: m.uid,
                    offset: at,
                    size,
                    received_at: m.received_at,
                    modseq,
                    flags: bits(m.flags),
                    keywords: unique(&m.keywords),
                    delivery: None,
                }));
                at += size;
                modseq += 1;
                last = m.uid;
            }
            out.sync_data().map_err(io("message log"))?;
            f.note_appended(at);
            lines.push(format!("N {}", numbers.uid_next.max(last + 1)));
            lines.push(format!(
                "H {}",
                numbers.highest_modseq.max(modseq - 1).max(1)
            ));
            f.commit(&lines)
        })?)
    }

    fn usage(mailbox: String) -> Result<MailboxUsage, StoreError> {
        let mut usage = MailboxUsage {
            bytes: 0,
            messages: 0,
        };
        for name in folder_names(&mailbox)? {
            with_folder(&mailbox, &name, false, |f| {
                usage.messages += f.messages.len() as u64;
                usage.bytes += f.messages.values().map(|m| m.size).sum::<u64>();
                Ok(())
            })?;
        }
        Ok(usage)
    }
}

export!(Backend);
