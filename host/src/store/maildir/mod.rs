//! Maildir storage (the embedded default), readable as it is by mutt, Dovecot and backup tools.
//!
//! Layout: `<root>/<domain>/<user>/{tmp,new,cur}` for INBOX and Maildir++ folders as
//! `<root>/<domain>/<user>/.<Folder>/{tmp,new,cur}`. Files hold LF line endings as Postfix's local
//! delivery writes them; the name carries Dovecot's `,S=<size>,W=<size with CRLF>` so POP3 and IMAP
//! report exact RFC 822 sizes without reading the file. A message that has a bare LF of its own
//! (binary content appended over IMAP, RFC 3516) cannot round-trip through LF endings, so it is
//! kept as it came, and its name says so by `S` equal to `W` (the file is its own CRLF form).
//!
//! Delivery follows the Maildir protocol: write to `tmp/`, flush, rename into `new/`, flush the
//! directory. Names are stable for a (message, recipient) pair (`<time>.Q<delivery id>.<host>`), so a
//! delivery retried after a crash sees the earlier copy (in `new/`, or in `cur/` once a client has
//! seen it) and does not store a second one.
//!
//! Reading: a message's key is its file name up to the `:2,` info part, which carries the flags
//! (`D`raft, `F`lagged, `P`assed, `R`eplied, `S`een, `T`rashed) as mutt and Dovecot write them.
//! UIDs come from the folder's [`uidlist`].
//!
//! Files: `names` (file names, sizes and line-ending forms), `letters` (flags as file name
//! letters), `keywords` (the keyword letters' names), `listing` (reading `new/` and `cur/`, and
//! the kept listing), `index` (UIDs for a listing), `uidlist` (the index file), `modseq`
//! (mod-sequences), `delivery` (the batched Maildir protocol),
//! `folders` (folders and subscriptions), `import` (messages under their own UIDs, for
//! migrations), `metadata` (annotations); this file holds the store itself: folder locks and
//! the contract's message operations (listing, reads, flags, APPEND, COPY, removal).

mod delivery;
mod folders;
mod import;
mod index;
pub mod keywords;
mod letters;
mod listing;
mod metadata;
pub mod modseq;
mod names;
mod spares;
pub mod uidlist;

use crate::store::headers::HeaderCache;
use index::*;
use letters::Letters;
use listing::*;
use names::*;

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::warn;

use super::{
    Delivery, FlagChange, FlagMode, FlagOutcome, Flags, FolderSnapshot, Keywords, MailStore,
    MessageHandle, MessageInfo, StoreError, Updated,
};

/// The subscribed folder names, one a line, in the mailbox's root (as Dovecot keeps them).
const SUBSCRIPTIONS: &str = "subscriptions";
use crate::durable;
use modseq::ModLog;
use uidlist::UidList;

/// The folder's \Recent boundary (see `MailStore::recent_boundary`): `V<validity> <uid>`.
const RECENT: &str = "postern-recent";

/// What this process keeps about a folder, behind the folder's lock.
#[derive(Default)]
struct FolderState {
    /// Loaded on first use.
    modlog: Option<ModLog>,
    /// (UIDVALIDITY, highest UID claimed as recent), loaded on first use.
    recent: Option<(u32, u32)>,
    /// The folder's last listing, while it can be trusted (see [`Listing`]).
    listing: Option<Listing>,
    /// The UID index file as last read or written (see [`KeptIndex`]).
    index: Option<KeptIndex>,
    /// Emptied files of expunged messages, for the next new ones (see [`spares`]).
    spares: spares::Spares,
}

impl FolderState {
    /// The folder's mod-sequence log for this UIDVALIDITY, loaded (or started over) as needed.
    fn modlog(&mut self, dir: &Path, validity: u32) -> io::Result<&mut ModLog> {
        match &mut self.modlog {
            Some(log) if log.validity() == validity => {}
            slot => *slot = Some(ModLog::load(dir, validity)?),
        }
        Ok(self.modlog.as_mut().expect("just loaded"))
    }
}

pub struct Maildir {
    root: PathBuf,
    /// Host name as it appears in file names (`/` and `:` escaped per the Maildir spec).
    host: String,
    /// One lock per folder directory: index, keyword and mod-sequence updates in this process
    /// never interleave.
    folder_locks: Mutex<HashMap<PathBuf, Arc<Mutex<FolderState>>>>,
    /// Message headers read recently, by folder directory and key (see [`HeaderCache`]).
    headers: Mutex<HeaderCache<PathBuf>>,
}

impl Maildir {
    pub fn new(root: impl Into<PathBuf>, hostname: &str) -> Maildir {
        let host = hostname.replace('/', "\\057").replace(':', "\\072");
        Maildir {
            root: root.into(),
            host,
            folder_locks: Mutex::new(HashMap::new()),
            headers: Mutex::new(HeaderCache::default()),
        }
    }

    fn folder_lock(&self, dir: &Path) -> Arc<Mutex<FolderState>> {
        self.folder_locks
            .lock()
            .expect("folder lock map")
            .entry(dir.to_path_buf())
            .or_default()
            .clone()
    }

    /// Drops what this process keeps about a folder directory that was deleted or renamed, so
    /// a folder made later at the same path starts afresh (a kept mod-sequence log of the old
    /// folder made it unselectable until a restart).
    fn forget_folder(&self, dir: &Path) {
        self.folder_locks
            .lock()
            .expect("folder lock map")
            .remove(dir);
    }

    /// The directory of a folder that exists (INBOX always does).
    fn existing_folder(&self, mailbox: &str, folder: &str) -> Result<PathBuf, StoreError> {
        let dir = self.folder_path(mailbox, folder)?;
        if folder.eq_ignore_ascii_case("INBOX") {
            ensure_maildir(&dir).map_err(StoreError::from_io)?;
        } else if !dir.join("cur").is_dir() {
            return Err(StoreError::NoSuchFolder(folder.into()));
        }
        Ok(dir)
    }

    /// The directory of a folder of a mailbox (`alice@example.test`, `INBOX` or a folder name).
    pub fn folder_path(&self, mailbox: &str, folder: &str) -> Result<PathBuf, StoreError> {
        let (user, domain) = mailbox
            .rsplit_once('@')
            .ok_or_else(|| StoreError::InvalidName(mailbox.into()))?;
        for part in [user, domain] {
            if !is_safe_component(part) {
                return Err(StoreError::InvalidName(mailbox.into()));
            }
        }
        let mut path = self.root.join(domain).join(user);
        if !folder.eq_ignore_ascii_case("INBOX") {
            // Maildir++: sub-folders are ".A.B" directories beside cur/new/tmp.
            if folder
                .split('/')
                .any(|p| !is_safe_component(p) || p.contains('.'))
            {
                return Err(StoreError::InvalidName(folder.into()));
            }
            path = path.join(format!(".{}", folder.replace('/', ".")));
        }
        Ok(path)
    }
}

/// Creates `tmp`, `new` and `cur` (and their parents) if missing, durably: the parent of every
/// directory made is flushed, so the first message delivered to a new user or folder cannot be
/// lost with its directory after the 250 (see `durable::create_dir_all`).
pub fn ensure_maildir(dir: &Path) -> io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        // One stat in the usual case, where creating first costs a failed mkdir and a stat.
        crate::durable::create_dir_all(&dir.join(sub))?;
    }
    Ok(())
}

impl MailStore for Maildir {
    fn deliver(&self, batch: &[Delivery<'_>]) -> Vec<Result<(), StoreError>> {
        self.deliver_batch(batch)
    }

    /// Files on a local disk. A listing may still wait for the folder's lock behind another
    /// session's change, or flush the UID index when new messages arrived: one disk flush at
    /// most, which is the price of sparing every small read two thread switches.
    fn reads_inline(&self, _mailbox: &str) -> bool {
        true
    }

    fn snapshot(&self, mailbox: &str, folder: &str) -> Result<FolderSnapshot, StoreError> {
        let dir = self.existing_folder(mailbox, folder)?;
        let lock = self.folder_lock(&dir);
        let mut state = lock.lock().expect("folder lock");
        let files = state.listed(&dir).map_err(StoreError::from_io)?;
        let index = index_files(&dir, &files, &[], &mut state.index)?;
        let table = keywords::read(&dir).map_err(StoreError::from_io)?;
        let mut letters: Vec<(u32, Letters, u64)> = index
            .entries
            .iter()
            .map(|(uid, key)| (*uid, files[&**key].flags, 0))
            .collect();
        let log = state
            .modlog(&dir, index.validity)
            .map_err(StoreError::from_io)?;
        log.reconcile(&dir, &mut letters)
            .map_err(StoreError::from_io)?;
        let mut messages = Vec::with_capacity(index.entries.len());
        for ((uid, key), (_, flags, modseq)) in index.entries.iter().zip(letters) {
            let listed = &files[&**key];
            let size = match listed.size {
                Some(size) => size,
                None => crlf_size(&dir.join(&listed.location)).map_err(StoreError::from_io)?,
            };
            messages.push(MessageInfo {
                uid: *uid,
                key: key.to_string(),
                handle: MessageHandle::new(listed.location.as_str()),
                size,
                flags: flags.system(),
                keywords: flags.keywords(&table),
                received_at: listed.received_at,
                modseq,
            });
        }
        Ok(FolderSnapshot {
            uid_validity: index.validity,
            uid_next: index.next,
            messages,
            more_keywords: table.len() < Letters::MAX_KEYWORDS,
            keywords: table.into_iter().filter(|k| !k.starts_with('\\')).collect(),
            highest_modseq: log.highest(),
        })
    }

    fn read(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Vec<u8>, StoreError> {
        let dir = self.folder_path(mailbox, folder)?;
        if stored_verbatim(&message.key) {
            return self.read_file(&dir, message);
        }
        Ok(to_crlf(&self.read_file(&dir, message)?))
    }

    fn read_header(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Arc<[u8]>, StoreError> {
        let dir = self.folder_path(mailbox, folder)?;
        if let Some(header) = self
            .headers
            .lock()
            .expect("header cache")
            .get(&dir, &message.key)
        {
            return Ok(header);
        }
        let mut whole = self.read(mailbox, folder, message)?;
        whole.truncate(crate::message::body_offset(&whole));
        let header: Arc<[u8]> = Arc::from(whole);
        self.headers
            .lock()
            .expect("header cache")
            .put(&dir, &message.key, header.clone());
        Ok(header)
    }

    /// Those at hand from one look into the header cache (a SEARCH by header asks for every
    /// message of the folder), the rest read one by one.
    fn read_headers(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Vec<Result<Arc<[u8]>, StoreError>> {
        let cached = match self.folder_path(mailbox, folder) {
            Ok(dir) => self
                .headers
                .lock()
                .expect("header cache")
                .get_many(&dir, messages.iter().map(|m| m.key.as_str())),
            Err(_) => vec![None; messages.len()],
        };
        messages
            .iter()
            .zip(cached)
            .map(|(message, cached)| match cached {
                Some(header) => Ok(header),
                None => self.read_header(mailbox, folder, message),
            })
            .collect()
    }

    fn change_flags(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        change: &FlagChange,
        unchanged_since: Option<u64>,
    ) -> Result<FlagOutcome, StoreError> {
        let dir = self.folder_path(mailbox, folder)?;
        let lock = self.folder_lock(&dir);
        let mut state = lock.lock().expect("folder lock");
        // Keywords become letters of the folder's table; a name it lacks gets a letter before any
        // file name uses it (a removal needs none).
        let mut table = keywords::read(&dir).map_err(StoreError::from_io)?;
        let slots = if change.mode == FlagMode::Remove {
            keywords::find(&table, &change.keywords)
        } else {
            keywords::slots(&dir, &mut table, &change.keywords)
                .map_err(StoreError::from_io)?
                .ok_or_else(|| StoreError::TooManyKeywords(folder.into()))?
        };
        let change_letters = Letters::from_system(change.flags).union(slots);
        let validity = match &state.modlog {
            Some(log) => log.validity(),
            None => {
                read_index_kept(&dir, &mut state.index)
                    .map_err(StoreError::from_io)?
                    .0
                    .validity
            }
        };
        let keeps_listing = state.listing_before_change(&dir).is_some();
        let mut renamed: Vec<(&str, String, Letters)> = Vec::new();
        // The listing as it was before the renames below (they are applied to it after them).
        let kept = state
            .listing
            .as_ref()
            .filter(|_| keeps_listing)
            .map(|kept| kept.files.clone());
        let log = state.modlog(&dir, validity).map_err(StoreError::from_io)?;
        let mut outcome = FlagOutcome::default();
        // Directories whose entries the renames changed: flushed once, before the answer, so a
        // STORE (or the implicit \Seen of a FETCH) that was told OK survives a power loss.
        let (mut cur_changed, mut new_changed) = (false, false);
        for message in messages {
            let Some(location) =
                current_location(&dir, message, kept.as_deref()).map_err(StoreError::from_io)?
            else {
                continue;
            };
            let known = log.known(message.uid);
            if let (Some(limit), Some((modseq, _))) = (unchanged_since, known) {
                if modseq > limit {
                    outcome.refused.push(message.uid);
                    continue;
                }
            }
            let (_, old_flags) = parse_name(location.rsplit('/').next().unwrap_or_default());
            let wanted = match change.mode {
                FlagMode::Add => old_flags.union(change_letters),
                FlagMode::Remove => old_flags.without(change_letters),
                FlagMode::Replace => change_letters,
            };
            let target = format!("cur/{}:2,{}", message.key, flag_letters(wanted));
            if target != location {
                match fs::rename(dir.join(&location), dir.join(&target)) {
                    Ok(()) => {
                        cur_changed = true;
                        new_changed |= location.starts_with("new/");
                        if keeps_listing {
                            renamed.push((message.key.as_str(), target.clone(), wanted));
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(StoreError::from_io(err)),
                }
            }
            // RFC 7162 §3.1.3: a STORE that changes nothing does not move the mod-sequence on.
            let modseq = match known {
                Some((modseq, flags)) if flags == wanted => modseq,
                _ => log
                    .record(&dir, message.uid, wanted)
                    .map_err(StoreError::from_io)?,
            };
            outcome.updated.push(Updated {
                uid: message.uid,
                flags: wanted.system(),
                keywords: wanted.keywords(&table),
                modseq,
            });
        }
        log.flush(&dir).map_err(StoreError::from_io)?;
        // Dropped first, so the kept listing is changed in place rather than copied.
        drop(kept);
        if let Some(kept) = state.listing.as_mut().filter(|_| keeps_listing) {
            let files = Arc::make_mut(&mut kept.files);
            for (key, location, flags) in renamed {
                if let Some(listed) = files.get_mut(key) {
                    listed.location = location;
                    listed.flags = flags;
                }
            }
            state.listing_after_change(&dir);
        }
        if new_changed {
            durable::sync_dir(&dir.join("new")).map_err(StoreError::from_io)?;
        }
        if cur_changed {
            durable::sync_dir(&dir.join("cur")).map_err(StoreError::from_io)?;
        }
        Ok(outcome)
    }

    fn append(
        &self,
        mailbox: &str,
        folder: &str,
        message: &[u8],
        flags: Flags,
        keywords: &Keywords,
        received_at: i64,
    ) -> Result<(u32, u32), StoreError> {
        let dir = self.existing_folder(mailbox, folder)?;
        let flags =
            Letters::from_system(flags).union(self.keyword_letters(&dir, folder, keywords)?);
        let (content, size, crlf_size) = stored_form(b"", message);
        let key = format!(
            "{received_at}.{}.{},S={size},W={crlf_size}",
            unique_part(),
            self.host,
        );
        let name = format!("{key}:2,{}", flag_letters(flags));
        let tmp = dir.join("tmp").join(&key);
        let lock = self.folder_lock(&dir);
        let spare = lock.lock().expect("folder lock").spares.take(&dir);
        let file = spares::write_new(spare, &tmp, &content).map_err(StoreError::from_io)?;
        let mut state = lock.lock().expect("folder lock");
        let failed = StoreError::from_io;
        let mut appended = || -> Result<(u32, u32), StoreError> {
            let (mut index, on_disk) = read_index_kept(&dir, &mut state.index).map_err(failed)?;
            if on_disk.is_some_and(|state| state.appendable(&index)) && index.next < u32::MAX {
                // The index gains a line for the new key (no listing: other arrivals are
                // numbered at the next one). The message's bytes and that line are flushed
                // together, then the rename into cur/: two flushes of the disk. A crash in
                // between leaves a UID without its message (never reused), or a torn line that
                // was never acknowledged, and the APPEND unanswered.
                let uid = index.next;
                append_entries(
                    &dir,
                    &[(uid, key.as_str().into())],
                    &mut state.index,
                    &[&file],
                )
                .map_err(failed)?;
                let keeps_listing = state.listing_before_change(&dir).is_some();
                fs::rename(&tmp, dir.join("cur").join(&name)).map_err(failed)?;
                if let Some(kept) = state.listing.as_mut().filter(|_| keeps_listing) {
                    Arc::make_mut(&mut kept.files).insert(
                        key.clone(),
                        Listed {
                            location: format!("cur/{name}"),
                            flags,
                            size: Some(crlf_size as u64),
                            received_at,
                        },
                    );
                    state.listing_after_change(&dir);
                }
                durable::sync_all(&[], &[&dir.join("cur")]).map_err(failed)?;
                return Ok((index.validity, uid));
            }
            // A new, damaged or compactable index is replaced whole: the new one is written
            // beside the message before either is in place, so both files' bytes, then both
            // renames, make it all durable.
            let mut files = list_files(&dir).map_err(failed)?;
            files.insert(
                key.clone(),
                Listed {
                    location: format!("cur/{name}"),
                    flags,
                    size: Some(crlf_size as u64),
                    received_at,
                },
            );
            index = renumbered(&dir, &files, &[], &mut state.index)?.0;
            // Replaced below.
            state.index = None;
            let uid = index
                .entries
                .iter()
                .rev()
                .find(|(_, k)| **k == *key)
                .map(|(uid, _)| *uid)
                .ok_or_else(|| StoreError::Gone(key.clone()))?;
            let index_tmp = dir.join(format!("{}.tmp", uidlist::FILE_NAME));
            let index_file =
                durable::write_unsynced(&index_tmp, index.render().as_bytes()).map_err(failed)?;
            durable::sync_all(&[&file, &index_file], &[]).map_err(failed)?;
            fs::rename(&tmp, dir.join("cur").join(&name)).map_err(failed)?;
            fs::rename(&index_tmp, dir.join(uidlist::FILE_NAME)).map_err(failed)?;
            durable::sync_all(&[], &[&dir.join("cur"), &dir]).map_err(failed)?;
            Ok((index.validity, uid))
        };
        appended().inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    fn copy(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        target: &str,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        let source = self.folder_path(mailbox, folder)?;
        let dest = self.existing_folder(mailbox, target)?;
        // Held from the first link on: no other session numbers the copies before we do, so
        // they get UIDs in the order of the source (RFC 4315's COPYUID sets then ascend together).
        let lock = self.folder_lock(&dest);
        let _guard = lock.lock().expect("folder lock");
        let mut found = Vec::new();
        for message in messages {
            if let Some(location) =
                current_location(&source, message, None).map_err(StoreError::from_io)?
            {
                found.push((message.uid, location));
            }
        }
        // Keywords are slots of each folder's own table: map them by name, and make room in the
        // target's table before anything is linked, so a full table refuses the whole copy.
        let source_table = keywords::read(&source).map_err(StoreError::from_io)?;
        let mut dest_table = keywords::read(&dest).map_err(StoreError::from_io)?;
        let mut names: Vec<&str> = Vec::new();
        for (_, location) in &found {
            let (_, flags) = parse_name(location.rsplit('/').next().unwrap_or_default());
            for slot in flags.keyword_slots() {
                if let Some(name) = source_table.get(slot) {
                    if !names.contains(&name.as_str()) {
                        names.push(name);
                    }
                }
            }
        }
        keywords::slots(&dest, &mut dest_table, &Keywords::from_names(&names))
            .map_err(StoreError::from_io)?
            .ok_or_else(|| StoreError::TooManyKeywords(target.into()))?;
        let remap = |flags: Letters| {
            flags
                .keyword_slots()
                .fold(Letters::from_system(flags.system()), |acc, slot| {
                    let slot = source_table.get(slot).and_then(|name| {
                        dest_table.iter().position(|k| k.eq_ignore_ascii_case(name))
                    });
                    slot.map_or(acc, |slot| acc.union(Letters::keyword(slot)))
                })
        };
        let mut copied = Vec::new();
        for (uid, location) in found {
            let name = location.rsplit('/').next().unwrap_or_default();
            let (key, flags) = parse_name(name);
            let flags = remap(flags);
            // Same arrival time and sizes, a new unique part.
            let stamp = key.split('.').next().unwrap_or("0");
            let sizes = key.find(",S=").map(|at| &key[at..]).unwrap_or("");
            let new_key = format!("{stamp}.{}.{}{sizes}", unique_part(), self.host);
            let target_path = dest
                .join("cur")
                .join(format!("{new_key}:2,{}", flag_letters(flags)));
            // A hard link shares the already durable bytes; a copy is the fallback.
            let linked = fs::hard_link(source.join(&location), &target_path);
            if let Err(err) = linked {
                if err.kind() == io::ErrorKind::NotFound {
                    continue;
                }
                let bytes =
                    spares::read_in_place(&source.join(&location)).map_err(StoreError::from_io)?;
                let tmp = dest.join("tmp").join(&new_key);
                durable::write_and_rename(&tmp, &target_path, &bytes)
                    .map_err(StoreError::from_io)?;
            }
            copied.push((uid, new_key));
        }
        durable::sync_dir(&dest.join("cur")).map_err(StoreError::from_io)?;
        let order: Vec<&str> = copied.iter().map(|(_, key)| key.as_str()).collect();
        let (index, _) = indexed_in_order(&dest, &order)?;
        let uids: HashMap<&str, u32> = index
            .entries
            .iter()
            .map(|(uid, key)| (&**key, *uid))
            .collect();
        let pairs = copied
            .iter()
            .filter_map(|(old, key)| uids.get(key.as_str()).map(|new| (*old, *new)))
            .collect();
        Ok((index.validity, pairs))
    }

    fn folders(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        self.list_folders(mailbox)
    }

    fn create_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        self.make_folder(mailbox, folder)
    }

    fn delete_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        self.remove_folder(mailbox, folder)
    }

    fn rename_folder(&self, mailbox: &str, from: &str, to: &str) -> Result<(), StoreError> {
        self.move_folder(mailbox, from, to)
    }

    fn recent_boundary(
        &self,
        mailbox: &str,
        folder: &str,
        validity: u32,
        claim: Option<u32>,
    ) -> Result<u32, StoreError> {
        let dir = self.existing_folder(mailbox, folder)?;
        let lock = self.folder_lock(&dir);
        let mut state = lock.lock().expect("folder lock");
        let (known_validity, boundary) = *state.recent.get_or_insert_with(|| {
            fs::read_to_string(dir.join(RECENT))
                .ok()
                .and_then(|text| {
                    let (v, uid) = text.trim().strip_prefix('V')?.split_once(' ')?;
                    Some((v.parse().ok()?, uid.parse().ok()?))
                })
                .unwrap_or((validity, 0))
        });
        // A rebuilt index (new UIDVALIDITY) starts over: its messages are all new to clients.
        let boundary = if known_validity == validity {
            boundary
        } else {
            0
        };
        if let Some(upto) = claim.filter(|upto| *upto > boundary) {
            state.recent = Some((validity, upto));
            // Advisory (a crash makes a few messages recent again): no flush.
            let _ = write_recent(&dir, validity, upto);
        } else {
            state.recent = Some((validity, boundary));
        }
        Ok(boundary)
    }

    fn subscriptions(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        self.read_subscriptions(mailbox)
    }

    fn set_subscribed(
        &self,
        mailbox: &str,
        folder: &str,
        subscribed: bool,
    ) -> Result<(), StoreError> {
        self.write_subscribed(mailbox, folder, subscribed)
    }

    /// Annotations live in `postern-metadata` in the folder's directory, and the mailbox's own
    /// in `postern-mailbox-metadata` at its root (which is also INBOX's directory): one line
    /// per entry, `<name> <value in hex>`, so they go and move with their folder.
    fn metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>, StoreError> {
        let (dir, file) = self.metadata_file(mailbox, folder)?;
        metadata::read(&dir.join(file)).map_err(StoreError::from_io)
    }

    fn set_metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
        changes: &[(String, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        let (dir, file) = self.metadata_file(mailbox, folder)?;
        ensure_maildir(&dir).map_err(StoreError::from_io)?;
        let lock = self.folder_lock(&dir.join(file));
        let _guard = lock.lock().expect("metadata lock");
        let path = dir.join(file);
        let mut entries = metadata::read(&path).map_err(StoreError::from_io)?;
        for (name, value) in changes {
            match value {
                Some(value) => entries.insert(name.clone(), value.clone()),
                None => entries.remove(name),
            };
        }
        let tmp = dir.join(format!("{file}.tmp"));
        durable::write_and_rename(&tmp, &path, metadata::render(&entries).as_bytes())
            .and_then(|()| durable::sync_dir(&dir))
            .map_err(StoreError::from_io)
    }

    /// Sizes come from the file names (or the files, for names without them), listings from
    /// the kept ones: no index is read or written.
    fn usage(&self, mailbox: &str) -> Result<super::Usage, StoreError> {
        let mut usage = super::Usage::default();
        for folder in self.all_folders(mailbox)? {
            let Ok(dir) = self.existing_folder(mailbox, &folder) else {
                continue;
            };
            let lock = self.folder_lock(&dir);
            let files = lock
                .lock()
                .expect("folder lock")
                .listed(&dir)
                .map_err(StoreError::from_io)?;
            for listed in files.values() {
                usage.messages += 1;
                usage.bytes += match listed.size {
                    Some(size) => size,
                    None => crlf_size(&dir.join(&listed.location)).unwrap_or(0),
                };
            }
        }
        Ok(usage)
    }

    fn import(
        &self,
        mailbox: &str,
        folder: &str,
        numbers: super::ImportedFolder,
        messages: &[super::Imported<'_>],
    ) -> Result<(), StoreError> {
        self.import_messages(mailbox, folder, numbers, messages)
    }

    fn remove(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Result<(), StoreError> {
        let dir = self.folder_path(mailbox, folder)?;
        let lock = self.folder_lock(&dir);
        let mut state = lock.lock().expect("folder lock");
        let keeps_listing = state.listing_before_change(&dir).is_some();
        let kept = state
            .listing
            .as_ref()
            .filter(|_| keeps_listing)
            .map(|kept| kept.files.clone());
        let mut touched = BTreeSet::new();
        let mut gone = Vec::new();
        let mut gone_keys = Vec::new();
        for message in messages {
            let Some(location) =
                current_location(&dir, message, kept.as_deref()).map_err(StoreError::from_io)?
            else {
                continue;
            };
            match state.spares.discard(&dir, &location) {
                Ok(()) => {
                    touched.insert(location.split('/').next().unwrap_or("cur").to_string());
                    gone.push(message.uid);
                    gone_keys.push(message.key.as_str());
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(StoreError::from_io(err)),
            }
        }
        drop(kept);
        if let Some(kept) = state.listing.as_mut().filter(|_| keeps_listing) {
            let files = Arc::make_mut(&mut kept.files);
            for key in gone_keys {
                files.remove(key);
            }
            state.listing_after_change(&dir);
        }
        for sub in touched {
            durable::sync_dir(&dir.join(sub)).map_err(StoreError::from_io)?;
        }
        // The next listing would notice too; telling the log now moves HIGHESTMODSEQ on at once.
        if let Some(log) = &mut state.modlog {
            log.expunged(&dir, &gone).map_err(StoreError::from_io)?;
        }
        Ok(())
    }
}

impl Maildir {
    /// A message file's bytes as stored, wherever a rename since the listing took it.
    /// Where a folder's (or the mailbox's) annotations are kept.
    fn metadata_file(
        &self,
        mailbox: &str,
        folder: Option<&str>,
    ) -> Result<(PathBuf, &'static str), StoreError> {
        Ok(match folder {
            Some(folder) => (
                self.existing_folder(mailbox, folder)?,
                metadata::FOLDER_FILE,
            ),
            None => (self.folder_path(mailbox, "INBOX")?, metadata::MAILBOX_FILE),
        })
    }

    /// The letters for these keywords in the folder's table, adding those it lacks (under the
    /// folder's lock, so two sessions naming a new keyword at once agree on its letter).
    fn keyword_letters(
        &self,
        dir: &Path,
        folder: &str,
        names: &Keywords,
    ) -> Result<Letters, StoreError> {
        if names.is_empty() {
            return Ok(Letters::empty());
        }
        let lock = self.folder_lock(dir);
        let _guard = lock.lock().expect("folder lock");
        let mut table = keywords::read(dir).map_err(StoreError::from_io)?;
        keywords::slots(dir, &mut table, names)
            .map_err(StoreError::from_io)?
            .ok_or_else(|| StoreError::TooManyKeywords(folder.into()))
    }

    fn read_file(&self, dir: &Path, message: &MessageInfo) -> Result<Vec<u8>, StoreError> {
        match spares::read_in_place(&dir.join(message.handle.as_str())) {
            Ok(content) => Ok(content),
            // Renamed since the listing (flags changed): find it by key.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let location = locate(dir, &message.key)
                    .map_err(StoreError::from_io)?
                    .ok_or_else(|| StoreError::Gone(message.key.clone()))?;
                spares::read_in_place(&dir.join(location)).map_err(|err| match err.kind() {
                    io::ErrorKind::NotFound => StoreError::Gone(message.key.clone()),
                    _ => StoreError::from_io(err),
                })
            }
            Err(err) => Err(StoreError::from_io(err)),
        }
    }
}

/// Records the \Recent boundary in place: one fixed-width record over the old one, in one
/// `write` well inside a sector, so a reader never sees a mix. A rewrite through a temporary
/// file would allocate a fresh inode at every SELECT that claims, and on ext4 inode allocation
/// next to many recently freed inodes (every EXPUNGE frees some) is the costliest call the
/// server makes: it was a third of its CPU under the IMAP benchmark.
fn write_recent(dir: &Path, validity: u32, upto: u32) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(RECENT))?;
    // Zero-padded to the widest u32, so every record covers every earlier one.
    file.write_all_at(format!("V{validity:010} {upto:010}\n").as_bytes(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends a message without flags to INBOX, as an IMAP client would.
    fn append_to_inbox(
        store: &Maildir,
        user: &str,
        message: &[u8],
        received_at: i64,
    ) -> (u32, u32) {
        store
            .append(
                user,
                "INBOX",
                message,
                Flags::empty(),
                &Keywords::new(),
                received_at,
            )
            .unwrap()
    }

    fn delivery<'a>(id: &'a str, message: &'a [u8]) -> Delivery<'a> {
        Delivery {
            mailbox: "alice@example.test",
            folder: "INBOX",
            delivery_id: id,
            retry: true,
            received_at: 1700000000,
            prepend: b"Return-Path: <s@x.test>\r\n",
            message,
        }
    }

    #[test]
    fn maildir_meets_the_mailbox_contract() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        crate::store::conformance::run_all(&|| Arc::new(Maildir::new(&root, "mx.test")));
    }

    #[test]
    fn the_kept_listing_follows_changes_by_this_store_and_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let user = "alice@example.test";
        let folder = dir.path().join("example.test/alice");
        for n in 0..2 {
            let message = format!("Subject: {n}\r\n\r\nbody\r\n");
            append_to_inbox(&store, user, message.as_bytes(), 1700000000 + n);
        }
        let first = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(first.messages.len(), 2);
        // This store's own changes keep the listing exact.
        let target = [&first.messages[0]];
        store
            .change_flags(user, "INBOX", &target, &FlagChange::add(Flags::SEEN), None)
            .unwrap();
        store.remove(user, "INBOX", &[&first.messages[1]]).unwrap();
        let after = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(after.messages.len(), 1);
        assert!(after.messages[0].flags.contains(Flags::SEEN));
        // Another program's changes (a deliverer writing into new/, mutt renaming for a flag)
        // are seen at the next snapshot.
        fs::write(
            folder.join("new/1700000100.M1P1.other,S=10"),
            b"Subject: x\n\nb\n",
        )
        .unwrap();
        let seen = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(seen.messages.len(), 2);
        let location = &seen.messages[0].handle.as_str();
        let flagged = location.replace(":2,S", ":2,FS");
        fs::rename(folder.join(location), folder.join(&flagged)).unwrap();
        let seen = store.snapshot(user, "INBOX").unwrap();
        assert!(seen.messages[0].flags.contains(Flags::FLAGGED));
    }

    #[test]
    fn the_kept_index_follows_appends_and_sees_the_file_replaced_or_grown_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let user = "alice@example.test";
        let folder = dir.path().join("example.test/alice");
        let append = |n: i64| {
            let message = format!("Subject: {n}\r\n\r\nbody\r\n");
            append_to_inbox(&store, user, message.as_bytes(), 1700000000 + n)
        };
        let (validity, first) = append(0);
        let kept = |store: &Maildir| {
            let lock = store.folder_lock(&folder);
            let state = lock.lock().unwrap();
            state.index.as_ref().map(|kept| kept.index.clone())
        };
        // An APPEND adds its line to the kept index as it adds it to the file.
        store.snapshot(user, "INBOX").unwrap();
        let (_, second) = append(1);
        assert_eq!(kept(&store), Some(read_index(&folder).unwrap()));
        let uids: Vec<u32> = store
            .snapshot(user, "INBOX")
            .unwrap()
            .messages
            .iter()
            .map(|m| m.uid)
            .collect();
        assert_eq!(uids, [first, second]);
        // Replaced behind this store's back (another inode): read again.
        let mut other = read_index(&folder).unwrap();
        other.validity = validity + 7;
        write_index(&folder, &other).unwrap();
        assert_eq!(
            store.snapshot(user, "INBOX").unwrap().uid_validity,
            validity + 7
        );
        // Grown behind its back (same inode, longer): the new line is seen.
        fs::write(folder.join("new/1700000100.M1P1.other,S=10"), b"x\n").unwrap();
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(folder.join(uidlist::FILE_NAME))
            .unwrap();
        io::Write::write_all(&mut file, b"40 1700000100.M1P1.other,S=10\n").unwrap();
        let snapshot = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(snapshot.messages.last().map(|m| m.uid), Some(40));
        assert_eq!(snapshot.uid_next, 41);
    }

    #[test]
    fn a_message_renamed_by_this_store_is_found_without_listing_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let user = "alice@example.test";
        let folder = dir.path().join("example.test/alice");
        append_to_inbox(&store, user, b"Subject: a\r\n\r\nbody\r\n", 1700000000);
        let listed = store.snapshot(user, "INBOX").unwrap();
        // The session still holds the name from before the STORE, as IMAP sessions do until
        // their next listing.
        let stale = listed.messages[0].clone();
        store
            .change_flags(
                user,
                "INBOX",
                &[&stale],
                &FlagChange::add(Flags::DELETED),
                None,
            )
            .unwrap();
        let lock = store.folder_lock(&folder);
        let kept = lock.lock().unwrap().listing.as_ref().unwrap().files.clone();
        assert_eq!(
            current_location(&folder, &stale, Some(&kept)).unwrap(),
            Some(format!("cur/{}:2,T", stale.key))
        );
        drop(kept);
        store.remove(user, "INBOX", &[&stale]).unwrap();
        assert!(store.snapshot(user, "INBOX").unwrap().messages.is_empty());
        assert_eq!(fs::read_dir(folder.join("cur")).unwrap().count(), 0);
    }

    #[test]
    fn a_message_with_a_bare_lf_is_kept_as_it_came() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let user = "alice@example.test";
        // RFC 3516 binary content: a bare LF, a CRLF and a NUL must come back unchanged.
        let message = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\0-\xe4\n\r\n\n";
        append_to_inbox(&store, user, message, 1700000000);
        let snapshot = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(snapshot.messages[0].size, message.len() as u64);
        let read = store.read(user, "INBOX", &snapshot.messages[0]).unwrap();
        assert_eq!(read, message);
        // A clean message is still stored with LF endings.
        append_to_inbox(&store, user, b"Subject: t\r\n\r\nx\r\n", 1700000001);
        let snapshot = store.snapshot(user, "INBOX").unwrap();
        let clean = &snapshot.messages[1];
        assert_eq!(
            fs::read(
                dir.path()
                    .join("example.test/alice")
                    .join(clean.handle.as_str())
            )
            .unwrap(),
            b"Subject: t\n\nx\n"
        );
        assert_eq!(
            store.read(user, "INBOX", clean).unwrap(),
            b"Subject: t\r\n\r\nx\r\n"
        );
    }

    #[test]
    fn delivers_with_lf_endings_and_sizes_in_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let results = store.deliver(&[delivery("A_0", b"Subject: hi\r\n\r\nbody\r\n")]);
        assert!(results[0].is_ok());
        let new_dir = dir.path().join("example.test/alice/new");
        let entries: Vec<_> = fs::read_dir(&new_dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        assert_eq!(entries.len(), 1);
        let content = fs::read(entries[0].path()).unwrap();
        assert_eq!(content, b"Return-Path: <s@x.test>\nSubject: hi\n\nbody\n");
        let name = entries[0].file_name().into_string().unwrap();
        assert!(name.ends_with(",S=42,W=46"), "{name}");
        assert!(fs::read_dir(dir.path().join("example.test/alice/tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn a_folder_deleted_and_made_again_has_a_new_uidvalidity_and_works() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let user = "alice@example.test";
        let mut seen = Vec::new();
        for round in 0..3 {
            store.create_folder(user, "Box").unwrap();
            let (validity, uid) = store
                .append(
                    user,
                    "Box",
                    b"Subject: r\r\n\r\nx\r\n",
                    Flags::empty(),
                    &Keywords::new(),
                    0,
                )
                .unwrap();
            assert_eq!(uid, 1, "round {round}");
            let snap = store.snapshot(user, "Box").unwrap();
            assert_eq!(snap.uid_validity, validity);
            assert_eq!(snap.messages.len(), 1);
            let flagged = store
                .change_flags(
                    user,
                    "Box",
                    &[&snap.messages[0]],
                    &FlagChange::add(Flags::SEEN),
                    None,
                )
                .unwrap();
            assert_eq!(flagged.updated.len(), 1, "round {round}");
            assert!(!seen.contains(&validity), "UIDVALIDITY {validity} reused");
            seen.push(validity);
            store.delete_folder(user, "Box").unwrap();
        }
    }

    #[test]
    fn redelivery_of_same_id_is_idempotent_even_after_move_to_cur() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let msg = b"x\r\n";
        store
            .deliver(&[delivery("B_0", msg)])
            .into_iter()
            .for_each(|r| r.unwrap());
        let user = dir.path().join("example.test/alice");
        let name = fs::read_dir(user.join("new"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        fs::rename(
            user.join("new").join(&name),
            user.join("cur")
                .join(format!("{}:2,S", name.to_string_lossy())),
        )
        .unwrap();
        store
            .deliver(&[delivery("B_0", msg)])
            .into_iter()
            .for_each(|r| r.unwrap());
        assert_eq!(fs::read_dir(user.join("new")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(user.join("cur")).unwrap().count(), 1);
    }

    #[test]
    fn snapshot_read_flag_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let msg = b"Subject: a\r\n\r\nline\r\n";
        for id in ["C_0", "C_1"] {
            store.deliver(&[delivery(id, msg)])[0].as_ref().unwrap();
        }
        let snap = store.snapshot("alice@example.test", "INBOX").unwrap();
        assert_eq!(snap.messages.len(), 2);
        assert_eq!(snap.uid_next, 3);
        let first = &snap.messages[0];
        assert_eq!(first.uid, 1);
        let bytes = store.read("alice@example.test", "INBOX", first).unwrap();
        assert_eq!(
            bytes,
            b"Return-Path: <s@x.test>\r\nSubject: a\r\n\r\nline\r\n"
        );
        assert_eq!(first.size, bytes.len() as u64);

        store
            .add_flags("alice@example.test", "INBOX", &[first], Flags::SEEN)
            .unwrap();
        // The listed location is stale now; reads still find the message by key.
        let again = store.read("alice@example.test", "INBOX", first).unwrap();
        assert_eq!(again, bytes);
        let snap2 = store.snapshot("alice@example.test", "INBOX").unwrap();
        assert_eq!(snap2.uid_validity, snap.uid_validity);
        assert_eq!(snap2.messages[0].uid, 1);
        assert!(snap2.messages[0].flags.contains(Flags::SEEN));
        assert!(snap2.messages[0].handle.as_str().starts_with("cur/"));
        assert!(snap2.messages[0].handle.as_str().ends_with(":2,S"));

        store
            .remove("alice@example.test", "INBOX", &[&snap2.messages[0]])
            .unwrap();
        store.deliver(&[delivery("C_2", msg)])[0].as_ref().unwrap();
        let snap3 = store.snapshot("alice@example.test", "INBOX").unwrap();
        let uids: Vec<u32> = snap3.messages.iter().map(|m| m.uid).collect();
        assert_eq!(uids, vec![2, 3], "UID 1 is never reused");
        assert!(matches!(
            store.read("alice@example.test", "INBOX", &snap2.messages[0]),
            Err(StoreError::Gone(_))
        ));

        // A damaged index is rebuilt with a new UIDVALIDITY.
        let user = dir.path().join("example.test/alice");
        let damaged = format!("postern-uidlist 1 V{} N9\n5 x\n3 y\n", snap3.uid_validity);
        fs::write(user.join(uidlist::FILE_NAME), damaged).unwrap();
        let snap4 = store.snapshot("alice@example.test", "INBOX").unwrap();
        assert_ne!(snap4.uid_validity, snap3.uid_validity);
        assert_eq!(snap4.messages.len(), 2);
        assert!(matches!(
            store.snapshot("alice@example.test", "Nope"),
            Err(StoreError::NoSuchFolder(_))
        ));
    }

    #[test]
    fn folders_and_hostile_names() {
        let store = Maildir::new("/m", "h");
        assert_eq!(
            store.folder_path("bob@example.test", "Lists/Rust").unwrap(),
            PathBuf::from("/m/example.test/bob/.Lists.Rust")
        );
        assert!(store.folder_path("../x@example.test", "INBOX").is_err());
        assert!(store.folder_path("bob@..", "INBOX").is_err());
        assert!(store.folder_path("bob@example.test", "../../etc").is_err());
    }

    #[test]
    fn the_index_grows_by_lines_survives_a_torn_one_and_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let user = "alice@example.test";
        let index_path = dir
            .path()
            .join("example.test/alice")
            .join(uidlist::FILE_NAME);
        let append = |n: u32| {
            let message = format!("Subject: {n}\r\n\r\nbody\r\n");
            append_to_inbox(&store, user, message.as_bytes(), 1_700_000_000)
        };
        // The first APPEND writes the index whole, the following ones append a line each.
        let (validity, _) = append(1);
        let whole = fs::read_to_string(&index_path).unwrap();
        assert_eq!(whole.lines().count(), 2);
        assert_eq!(append(2), (validity, 2));
        assert_eq!(append(3), (validity, 3));
        let text = fs::read_to_string(&index_path).unwrap();
        assert!(text.starts_with(&whole), "appended, not rewritten");
        assert!(text.lines().last().unwrap().starts_with("3 "));

        // A crash in the middle of an append: the torn line is ignored and the file rewritten
        // before it is appended to again. UIDVALIDITY stays, UIDs keep counting.
        fs::write(&index_path, format!("{text}4 1700000000.P1N")).unwrap();
        assert_eq!(
            store.snapshot(user, "INBOX").unwrap().uid_validity,
            validity
        );
        assert_eq!(append(4), (validity, 4));
        let text = fs::read_to_string(&index_path).unwrap();
        assert!(!text.contains(".P1N\n") && text.ends_with('\n'));
        assert_eq!(text.lines().count(), 5);

        // An SMTP delivery is numbered by the next listing, appended too.
        store.deliver(&[delivery("D_1", b"Subject: d\r\n\r\nx\r\n")])[0]
            .as_ref()
            .unwrap();
        let snap = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(snap.messages.last().unwrap().uid, 5);
        assert_eq!(fs::read_to_string(&index_path).unwrap().lines().count(), 6);

        // Expunged messages leave their lines until they outnumber the rest by far; then a
        // listing compacts the file.
        for n in 6..=80 {
            append(n);
        }
        let snap = store.snapshot(user, "INBOX").unwrap();
        let gone: Vec<&MessageInfo> = snap.messages.iter().skip(2).collect();
        store.remove(user, "INBOX", &gone).unwrap();
        assert_eq!(fs::read_to_string(&index_path).unwrap().lines().count(), 81);
        let snap = store.snapshot(user, "INBOX").unwrap();
        let uids: Vec<u32> = snap.messages.iter().map(|m| m.uid).collect();
        assert_eq!(uids, vec![1, 2]);
        let text = fs::read_to_string(&index_path).unwrap();
        assert_eq!(text.lines().count(), 3, "compacted: {text}");
        assert!(text.contains(" N81"), "the next UID is kept: {text}");
        assert_eq!(append(81), (validity, 81));
    }

    #[test]
    fn folders_append_copy_rename_delete_subscriptions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let user = "alice@example.test";
        assert!(store.folders(user).unwrap().is_empty());
        store.create_folder(user, "Work/2026").unwrap();
        assert!(matches!(
            store.create_folder(user, "Work/2026"),
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(
            store.create_folder(user, "a.b"),
            Err(StoreError::InvalidName(_))
        ));
        assert_eq!(store.folders(user).unwrap(), vec!["Work/2026".to_string()]);

        let (validity, uid) = store
            .append(
                user,
                "Work/2026",
                b"Subject: a\r\n\r\nx\r\n",
                Flags::SEEN,
                &Keywords::new(),
                1_700_000_000,
            )
            .unwrap();
        assert_eq!(uid, 1);
        let snap = store.snapshot(user, "Work/2026").unwrap();
        assert_eq!(snap.uid_validity, validity);
        let appended = &snap.messages[0];
        assert_eq!(appended.flags, Flags::SEEN);
        assert_eq!(appended.received_at, 1_700_000_000);
        assert_eq!(
            store.read(user, "Work/2026", appended).unwrap(),
            b"Subject: a\r\n\r\nx\r\n"
        );
        assert!(matches!(
            store.append(user, "Nope", b"x\r\n", Flags::empty(), &Keywords::new(), 0),
            Err(StoreError::NoSuchFolder(_))
        ));

        let (_, pairs) = store.copy(user, "Work/2026", &[appended], "INBOX").unwrap();
        assert_eq!(pairs, vec![(1, 1)]);
        let inbox = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(
            inbox.messages[0].flags,
            Flags::SEEN,
            "flags travel with a copy"
        );
        assert_eq!(inbox.messages[0].received_at, 1_700_000_000);
        store
            .change_flags(
                user,
                "INBOX",
                &[&inbox.messages[0]],
                &FlagChange {
                    mode: FlagMode::Replace,
                    flags: Flags::FLAGGED,
                    keywords: Keywords::new(),
                },
                None,
            )
            .unwrap();
        let inbox = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(inbox.messages[0].flags, Flags::FLAGGED);
        let source = store.snapshot(user, "Work/2026").unwrap();
        assert_eq!(
            source.messages[0].flags,
            Flags::SEEN,
            "the copy is a separate file"
        );

        store.rename_folder(user, "Work", "Old").unwrap_err();
        store.create_folder(user, "Work").unwrap();
        store.rename_folder(user, "Work", "Old").unwrap();
        let mut folders = store.folders(user).unwrap();
        folders.sort();
        assert_eq!(folders, vec!["Old".to_string(), "Old/2026".to_string()]);
        assert_eq!(store.snapshot(user, "Old/2026").unwrap().messages.len(), 1);

        store.set_subscribed(user, "Old", true).unwrap();
        store.set_subscribed(user, "Old/2026", true).unwrap();
        store.set_subscribed(user, "Old", false).unwrap();
        assert_eq!(
            store.subscriptions(user).unwrap(),
            vec!["Old/2026".to_string()]
        );

        store.delete_folder(user, "Old/2026").unwrap();
        assert_eq!(store.folders(user).unwrap(), vec!["Old".to_string()]);
        assert!(matches!(
            store.delete_folder(user, "Old/2026"),
            Err(StoreError::NoSuchFolder(_))
        ));
        assert_eq!(store.snapshot(user, "INBOX").unwrap().messages.len(), 1);
    }

    #[test]
    fn keywords_are_letters_copies_remap_them_and_modseqs_move() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let user = "alice@example.test";
        store.create_folder(user, "Archive").unwrap();
        // The target folder already uses slot 0 (letter a) for another keyword.
        let archive_dir = store.folder_path(user, "Archive").unwrap();
        assert_eq!(
            store
                .keyword_letters(&archive_dir, "Archive", &Keywords::from_names(["Other"]))
                .unwrap(),
            Letters::keyword(0)
        );
        let keywords = Keywords::from_names(["$Junk", "Work"]);
        store
            .append(
                user,
                "INBOX",
                b"Subject: k\r\n\r\nx\r\n",
                Flags::SEEN,
                &keywords,
                1_700_000_000,
            )
            .unwrap();
        let inbox = dir.path().join("example.test/alice");
        let name = fs::read_dir(inbox.join("cur"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        assert!(name.to_string_lossy().ends_with(":2,Sab"), "{name:?}");
        assert_eq!(
            fs::read_to_string(inbox.join("dovecot-keywords")).unwrap(),
            "0 $Junk\n1 Work\n"
        );
        let snap = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(snap.messages[0].flags, Flags::SEEN);
        assert_eq!(snap.messages[0].keywords, keywords);
        assert_eq!(snap.keywords, ["$Junk", "Work"]);
        let first_modseq = snap.messages[0].modseq;
        assert_eq!(snap.highest_modseq, first_modseq);

        store
            .copy(user, "INBOX", &[&snap.messages[0]], "Archive")
            .unwrap();
        let archive = store.snapshot(user, "Archive").unwrap();
        assert_eq!(archive.keywords, ["Other", "$Junk", "Work"]);
        assert_eq!(archive.messages[0].keywords, keywords);
        let copied = fs::read_dir(archive_dir.join("cur"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        assert!(
            copied.to_string_lossy().ends_with(":2,Sbc"),
            "keywords travel by name, not by letter: {copied:?}"
        );

        // UNCHANGEDSINCE: refused when the message changed after the given mod-sequence.
        let message = &snap.messages[0];
        let outcome = store
            .change_flags(
                user,
                "INBOX",
                &[message],
                &FlagChange::add(Flags::FLAGGED),
                Some(first_modseq - 1),
            )
            .unwrap();
        assert_eq!(outcome.refused, [message.uid]);
        let outcome = store
            .change_flags(
                user,
                "INBOX",
                &[message],
                &FlagChange::add(Flags::FLAGGED),
                Some(first_modseq),
            )
            .unwrap();
        let (now, modseq) = (outcome.updated[0].flags, outcome.updated[0].modseq);
        assert!(now.contains(Flags::FLAGGED) && modseq > first_modseq);
        assert_eq!(outcome.updated[0].keywords, keywords);
        let again = store.snapshot(user, "INBOX").unwrap();
        assert_eq!(again.messages[0].modseq, modseq);
        store.remove(user, "INBOX", &[&again.messages[0]]).unwrap();
        assert!(store.snapshot(user, "INBOX").unwrap().highest_modseq > modseq);
    }
}
