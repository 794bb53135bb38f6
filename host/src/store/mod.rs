//! Mailbox storage behind one trait.
//!
//! Local delivery, POP3 and IMAP all go through [`MailStore`]; Maildir ([`maildir::Maildir`]) is the
//! embedded default and a Wasm mailbox backend is meant to be another implementation. The trait is
//! blocking and batch-shaped: callers run it on blocking threads, and a batch lets an implementation
//! make many deliveries durable with one flush.

pub mod by_domain;
pub mod conformance;
pub mod headers;
pub mod maildir;
pub mod migrate;
pub mod postgres;
pub mod wasm;
pub mod watched;

use std::io;
use std::sync::Arc;

/// One message to put in one mailbox.
#[derive(Debug)]
pub struct Delivery<'a> {
    /// The user key (`alice@example.test`).
    pub mailbox: &'a str,
    /// The folder; `INBOX` is the mailbox's root.
    pub folder: &'a str,
    /// A name unique to this (message, recipient) pair that does not change when delivery is
    /// retried, so that a retry after a crash finds the first copy instead of making a second.
    pub delivery_id: &'a str,
    /// True when an earlier attempt may have stored this delivery (a message recovered after a
    /// restart): the store then looks for the earlier copy first. Fresh deliveries skip that scan.
    pub retry: bool,
    /// Unix seconds the message was received (part of stable names).
    pub received_at: i64,
    /// Trace headers to put in front of the message (`Return-Path`, `Delivered-To`), CRLF-terminated.
    pub prepend: &'a [u8],
    /// The message as received, CRLF line endings.
    pub message: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("mailbox storage is full: {0}")]
    Full(io::Error),
    #[error("mailbox I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("invalid mailbox or folder name {0:?}")]
    InvalidName(String),
    #[error("no folder {0:?}")]
    NoSuchFolder(String),
    #[error("message {0} is no longer in the mailbox")]
    Gone(String),
    #[error("folder {0:?} already exists")]
    Exists(String),
    #[error("folder {0:?} has no room for another keyword")]
    TooManyKeywords(String),
    /// The backend failed or answered nonsense (a Wasm backend that trapped, ran out of time
    /// or memory, or broke the contract): temporary, the next call gets a fresh instance.
    #[error("mailbox backend {name:?} failed: {reason}")]
    Unavailable { name: String, reason: String },
    /// The user's quota would be exceeded (checked by the protocols, RFC 9208).
    #[error("mailbox {0:?} is over its quota")]
    OverQuota(String),
}

impl StoreError {
    pub fn from_io(err: io::Error) -> StoreError {
        if crate::durable::is_disk_full(&err) {
            StoreError::Full(err)
        } else {
            StoreError::Io(err)
        }
    }

    /// The same error again, for every item of a batch that failed whole.
    pub fn again(&self) -> StoreError {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            StoreError::Full(e) => StoreError::Full(io(e)),
            StoreError::Io(e) => StoreError::Io(io(e)),
            StoreError::InvalidName(s) => StoreError::InvalidName(s.clone()),
            StoreError::NoSuchFolder(s) => StoreError::NoSuchFolder(s.clone()),
            StoreError::Gone(s) => StoreError::Gone(s.clone()),
            StoreError::Exists(s) => StoreError::Exists(s.clone()),
            StoreError::TooManyKeywords(s) => StoreError::TooManyKeywords(s.clone()),
            StoreError::OverQuota(s) => StoreError::OverQuota(s.clone()),
            StoreError::Unavailable { name, reason } => StoreError::Unavailable {
                name: name.clone(),
                reason: reason.clone(),
            },
        }
    }

    /// Whether retrying later can succeed.
    pub fn is_temporary(&self) -> bool {
        !matches!(
            self,
            StoreError::InvalidName(_)
                | StoreError::Gone(_)
                | StoreError::NoSuchFolder(_)
                | StoreError::Exists(_)
                | StoreError::TooManyKeywords(_)
        )
    }
}

/// Whether a folder name is acceptable to every store: `INBOX`, or `/`-separated parts that are
/// not empty, `.` or `..`, hold no dot, backslash, NUL or control character, and do not start
/// with a dot.
pub fn valid_folder_name(folder: &str) -> bool {
    folder.eq_ignore_ascii_case("INBOX")
        || (folder.len() <= 255
            && folder.split('/').all(|part| {
                !part.is_empty()
                    && !part.contains(['.', '\\', '\0'])
                    && !part.chars().any(char::is_control)
            }))
}

/// A message's system flags (RFC 9051 §2.3.2), plus `$Forwarded`, which mutt and Maildir keep as
/// a flag of its own. Keywords travel by name beside them ([`Keywords`]); how a backend stores
/// either is its own business (Maildir: file name letters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    /// The IMAP names of the system flags (RFC 9051 §2.3.2); `$Forwarded` is a keyword there
    /// (RFC 5550) that Maildir keeps as a flag.
    pub const NAMES: [(Flags, &'static str); 6] = [
        (Flags::SEEN, "\\Seen"),
        (Flags::ANSWERED, "\\Answered"),
        (Flags::FLAGGED, "\\Flagged"),
        (Flags::DELETED, "\\Deleted"),
        (Flags::DRAFT, "\\Draft"),
        (Flags::FORWARDED, "$Forwarded"),
    ];

    pub const SEEN: Flags = Flags(1);
    pub const ANSWERED: Flags = Flags(2);
    pub const FLAGGED: Flags = Flags(4);
    pub const DELETED: Flags = Flags(8);
    pub const DRAFT: Flags = Flags(16);
    /// Maildir's "passed" (forwarded); IMAP shows it as the `$Forwarded` keyword.
    pub const FORWARDED: Flags = Flags(32);
    const ALL: u8 = 63;

    /// The Maildir info letters of the system flags (cr.yp.to/proto/maildir.html), in the
    /// ASCII order a file name lists them.
    pub const MAILDIR_LETTERS: [(char, Flags); 6] = [
        ('D', Flags::DRAFT),
        ('F', Flags::FLAGGED),
        ('P', Flags::FORWARDED),
        ('R', Flags::ANSWERED),
        ('S', Flags::SEEN),
        ('T', Flags::DELETED),
    ];

    /// The flag a Maildir info letter stands for (none for keyword letters and others).
    pub fn from_maildir_letter(letter: char) -> Flags {
        Self::MAILDIR_LETTERS
            .iter()
            .find(|(l, _)| *l == letter)
            .map_or(Flags::empty(), |(_, flag)| *flag)
    }

    /// The Maildir info letters of these flags.
    pub fn maildir_letters(self) -> String {
        Self::MAILDIR_LETTERS
            .iter()
            .filter(|(_, flag)| self.contains(*flag))
            .map(|(letter, _)| *letter)
            .collect()
    }

    pub const fn empty() -> Flags {
        Flags(0)
    }
    /// The raw bits (`SEEN` = 1 … `FORWARDED` = 32), for stores that keep flags as a number.
    pub fn bits(self) -> u8 {
        self.0
    }
    /// Flags from [`Flags::bits`]; unknown bits are dropped.
    pub fn from_bits(bits: u8) -> Flags {
        Flags(bits & Self::ALL)
    }
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
    pub fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
}

/// Whether a name is a keyword a client could set: an IMAP atom (RFC 9051 §9 `flag-keyword`)
/// of at most 128 bytes, so it fits a line of any store's table.
pub fn valid_keyword(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| {
            b.is_ascii_graphic()
                && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
        })
}

/// A message's keywords (RFC 9051 §2.3.2 flag-keywords such as `$Junk`), by name. Names compare
/// case-insensitively (as IMAP flags do); each is kept once, in the spelling first given, ordered
/// by its lower-case form so equal sets compare equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Keywords(Vec<Arc<str>>);

impl Keywords {
    pub const fn new() -> Keywords {
        Keywords(Vec::new())
    }

    pub fn from_names<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Keywords {
        let mut keywords = Keywords::new();
        for name in names {
            keywords.insert(name.as_ref());
        }
        keywords
    }

    /// Adds a name unless it is there already (in any case).
    pub fn insert(&mut self, name: &str) {
        let key = name.to_ascii_lowercase();
        if let Err(at) = self
            .0
            .binary_search_by(|have| have.to_ascii_lowercase().cmp(&key))
        {
            self.0.insert(at, Arc::from(name));
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|have| have.eq_ignore_ascii_case(name))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|name| &**name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn union(&self, other: &Keywords) -> Keywords {
        let mut all = self.clone();
        for name in other.iter() {
            all.insert(name);
        }
        all
    }

    pub fn without(&self, other: &Keywords) -> Keywords {
        Keywords(
            self.0
                .iter()
                .filter(|name| !other.contains(name))
                .cloned()
                .collect(),
        )
    }
}

/// How a flag update combines with the flags a message has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagMode {
    Add,
    Remove,
    Replace,
}

/// A flag update: system flags and keywords, added, removed or put in place of the old ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagChange {
    pub mode: FlagMode,
    pub flags: Flags,
    pub keywords: Keywords,
}

impl FlagChange {
    /// Adds system flags only (for example `\Seen` after a POP3 RETR).
    pub fn add(flags: Flags) -> FlagChange {
        FlagChange {
            mode: FlagMode::Add,
            flags,
            keywords: Keywords::new(),
        }
    }

    /// The flags and keywords a message with `flags` and `keywords` has after the change.
    pub fn apply(&self, flags: Flags, keywords: &Keywords) -> (Flags, Keywords) {
        match self.mode {
            FlagMode::Add => (flags.union(self.flags), keywords.union(&self.keywords)),
            FlagMode::Remove => (flags.without(self.flags), keywords.without(&self.keywords)),
            FlagMode::Replace => (self.flags, self.keywords.clone()),
        }
    }
}

/// The backend's own reference to a stored message, handed out in a listing and given back on
/// reads and changes, so a backend finds the message without searching (Maildir: where the file
/// was, `cur/<file name>`; a database: a row id). Opaque to callers, and only a hint: a backend
/// must still find the message by its key when the handle is stale.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MessageHandle(Arc<str>);

impl MessageHandle {
    pub fn new(handle: impl Into<Arc<str>>) -> MessageHandle {
        MessageHandle(handle.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One message as a folder lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfo {
    /// IMAP UID, stable for the life of the folder's UIDVALIDITY (POP3's UIDL derives from both).
    pub uid: u32,
    /// The store's stable name for the message (Maildir: the unique part of the file name).
    pub key: String,
    /// The backend's reference to it (see [`MessageHandle`]).
    pub handle: MessageHandle,
    /// RFC 822 size: the message with CRLF line endings, as POP3 and IMAP send it.
    pub size: u64,
    pub flags: Flags,
    pub keywords: Keywords,
    /// Unix seconds the message arrived (IMAP INTERNALDATE).
    pub received_at: i64,
    /// When its flags last changed or it arrived (RFC 7162 mod-sequence, never 0 in a listing).
    pub modseq: u64,
}

/// A folder's messages at one moment, in UID order.
#[derive(Debug, Clone)]
pub struct FolderSnapshot {
    pub uid_validity: u32,
    pub uid_next: u32,
    pub messages: Vec<MessageInfo>,
    /// The keywords defined in the folder (IMAP's FLAGS response): every keyword a message of it
    /// has, and those it had. A backend may keep more than its messages use, never fewer.
    pub keywords: Vec<String>,
    /// Whether messages can be given keywords the folder has not defined yet (IMAP's `\*` in
    /// PERMANENTFLAGS); a backend with a fixed table says false when it is full.
    pub more_keywords: bool,
    /// The highest mod-sequence of the folder (RFC 7162 HIGHESTMODSEQ): grows with every flag
    /// change, arrival and expunge, and never goes back, not even across a crash.
    pub highest_modseq: u64,
}

/// One message's flags after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated {
    pub uid: u32,
    pub flags: Flags,
    pub keywords: Keywords,
    /// Its mod-sequence now (unchanged when the change changed nothing, RFC 7162 §3.1.3).
    pub modseq: u64,
}

/// What a flag change did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagOutcome {
    /// Each message still there and not refused.
    pub updated: Vec<Updated>,
    /// UIDs left alone because they changed after `unchanged_since` (RFC 7162 MODIFIED).
    pub refused: Vec<u32>,
}

/// A message brought from another store under its own UID ([`MailStore::import`]).
#[derive(Debug)]
pub struct Imported<'a> {
    pub uid: u32,
    pub flags: Flags,
    pub keywords: &'a Keywords,
    /// Unix seconds (IMAP INTERNALDATE), kept.
    pub received_at: i64,
    /// The message with CRLF line endings.
    pub message: &'a [u8],
}

/// The numbers a folder brought from another store keeps ([`MailStore::import`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportedFolder {
    pub uid_validity: u32,
    /// UIDNEXT becomes at least this, so no UID the old store gave out is given again.
    pub uid_next: u32,
    /// HIGHESTMODSEQ becomes at least this, so a client's CONDSTORE state stays behind it.
    pub highest_modseq: u64,
}

/// What a mailbox holds, all folders together (for quotas, RFC 9208).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// RFC 822 sizes (CRLF line endings) summed.
    pub bytes: u64,
    pub messages: u64,
}

pub trait MailStore: Send + Sync {
    /// Delivers each message durably, or reports why not, one result per delivery in order. A
    /// delivery whose `delivery_id` is already stored succeeds without storing a second copy.
    fn deliver(&self, batch: &[Delivery<'_>]) -> Vec<Result<(), StoreError>>;

    /// Whether reads of this mailbox (listings, message and header reads) are local and short,
    /// so a session may make a small one on its async thread rather than hand it to a blocking
    /// thread (see `imap::session::Conn::short_read`): files on a local disk, mostly in the
    /// page cache, are; a database, a plugin or anything behind a network round trip is not
    /// (and may block on a runtime of its own). Changes always go to a blocking thread.
    fn reads_inline(&self, _mailbox: &str) -> bool {
        false
    }

    /// Lists a folder, giving new messages their UIDs; the UIDs are durable before this returns,
    /// so a client never sees a UID that a crash could hand to another message. A folder that
    /// was never delivered to is empty.
    fn snapshot(&self, mailbox: &str, folder: &str) -> Result<FolderSnapshot, StoreError>;

    /// The message with CRLF line endings (exactly `size` bytes). [`StoreError::Gone`] when
    /// another session removed it.
    fn read(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Vec<u8>, StoreError>;

    /// The message's header section (CRLF line endings, up to and including the blank line that
    /// ends it; all of it when there is none). SEARCH by header and FETCH ENVELOPE need nothing
    /// else, and a store may keep headers at hand: messages never change, so a header read once
    /// stays right.
    fn read_header(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Arc<[u8]>, StoreError> {
        let mut whole = self.read(mailbox, folder, message)?;
        whole.truncate(crate::message::body_offset(&whole));
        Ok(Arc::from(whole))
    }

    /// Bytes `range` of the message with CRLF line endings, cut to its end (IMAP's partial
    /// FETCH, `BODY[]<start.length>`). A store that can seek does, so a backend behind a
    /// boundary does not hand over the whole message for a slice of it.
    fn read_range(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        let whole = self.read(mailbox, folder, message)?;
        let end = (range.end.min(whole.len() as u64)) as usize;
        let start = (range.start as usize).min(end);
        Ok(whole[start..end].to_vec())
    }

    /// The header sections of many messages, one result per message in order (SEARCH by
    /// header, FETCH ENVELOPE of a range): one call, so a backend behind a boundary answers
    /// a range in one round trip.
    fn read_headers(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Vec<Result<Arc<[u8]>, StoreError>> {
        messages
            .iter()
            .map(|message| self.read_header(mailbox, folder, message))
            .collect()
    }

    /// Adds flags to messages (for example `\Seen` after a POP3 RETR). Messages already gone are
    /// skipped.
    fn add_flags(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        flags: Flags,
    ) -> Result<(), StoreError> {
        self.change_flags(mailbox, folder, messages, &FlagChange::add(flags), None)
            .map(|_| ())
    }

    /// Changes messages' flags and keywords (IMAP STORE); with `unchanged_since`, only those whose
    /// mod-sequence is not above it (RFC 7162 UNCHANGEDSINCE, checked and applied atomically).
    /// Messages already gone are skipped.
    fn change_flags(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        change: &FlagChange,
        unchanged_since: Option<u64>,
    ) -> Result<FlagOutcome, StoreError>;

    /// Stores a message a client hands over (IMAP APPEND) durably, with its flags and arrival
    /// time, and returns (UIDVALIDITY, UID) of the new message.
    fn append(
        &self,
        mailbox: &str,
        folder: &str,
        message: &[u8],
        flags: Flags,
        keywords: &Keywords,
        received_at: i64,
    ) -> Result<(u32, u32), StoreError>;

    /// Copies messages to another folder durably, keeping flags and arrival times. Returns the
    /// target's UIDVALIDITY and (source UID, new UID) for each message copied; messages
    /// already gone are skipped.
    fn copy(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        target: &str,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError>;

    /// The mailbox's folders other than INBOX (which always exists), `/`-separated, in no
    /// particular order.
    fn folders(&self, mailbox: &str) -> Result<Vec<String>, StoreError>;

    /// Every folder of the mailbox, INBOX first.
    fn all_folders(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        let mut folders = self.folders(mailbox)?;
        folders.retain(|f| f != "INBOX");
        folders.insert(0, "INBOX".to_string());
        Ok(folders)
    }

    /// Whether the mailbox has this folder (INBOX always).
    fn has_folder(&self, mailbox: &str, folder: &str) -> Result<bool, StoreError> {
        Ok(folder == "INBOX" || self.folders(mailbox)?.iter().any(|f| f == folder))
    }

    fn create_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError>;

    /// Deletes a folder and its messages (not its sub-folders).
    fn delete_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError>;

    /// Renames a folder and its sub-folders. Renaming INBOX moves its messages into the new
    /// folder and leaves INBOX empty (RFC 9051 §6.3.6).
    fn rename_folder(&self, mailbox: &str, from: &str, to: &str) -> Result<(), StoreError>;

    /// Subscribed folder names (IMAP LSUB, LIST's \Subscribed).
    fn subscriptions(&self, mailbox: &str) -> Result<Vec<String>, StoreError>;

    /// IMAP4rev1 \Recent (RFC 3501 §2.3.2): messages with a UID above the returned boundary are
    /// recent, for UIDVALIDITY `validity`. With `claim` the boundary moves up to that UID, so
    /// no later session sees those messages as recent (a read-write session claims what it is
    /// the first to see; a read-only one only looks). Advisory: kept without a flush.
    fn recent_boundary(
        &self,
        mailbox: &str,
        folder: &str,
        validity: u32,
        claim: Option<u32>,
    ) -> Result<u32, StoreError>;

    fn set_subscribed(
        &self,
        mailbox: &str,
        folder: &str,
        subscribed: bool,
    ) -> Result<(), StoreError>;

    /// RFC 5464 annotations of a folder (`Some`) or of the mailbox as a whole (`None`, the
    /// server annotations of IMAP METADATA), by entry name (`/private/…`, `/shared/…`).
    fn metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>, StoreError>;

    /// Sets (`Some`) or removes (`None`) annotations, all durably before it returns.
    fn set_metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
        changes: &[(String, Option<Vec<u8>>)],
    ) -> Result<(), StoreError>;

    /// What the mailbox holds in all its folders. By default the sum of every folder's
    /// snapshot; a store that can count more cheaply does.
    fn usage(&self, mailbox: &str) -> Result<Usage, StoreError> {
        let mut usage = Usage::default();
        for folder in self.all_folders(mailbox)? {
            let snapshot = match self.snapshot(mailbox, &folder) {
                Ok(snapshot) => snapshot,
                Err(StoreError::NoSuchFolder(_)) => continue,
                Err(err) => return Err(err),
            };
            usage.messages += snapshot.messages.len() as u64;
            usage.bytes += snapshot.messages.iter().map(|m| m.size).sum::<u64>();
        }
        Ok(usage)
    }

    /// Brings messages from another store (`postern mailbox migrate`) keeping what clients
    /// cached: the folder (made if missing) takes `numbers.uid_validity` when it has no
    /// messages, and refuses with [`StoreError::Exists`] when it has messages under another
    /// UIDVALIDITY; each message keeps its UID, flags, keywords and arrival time, and one whose
    /// UID is there already is skipped (so an interrupted migration can run again). UIDs must
    /// ascend and be above those already there. Durable before it returns.
    fn import(
        &self,
        mailbox: &str,
        folder: &str,
        numbers: ImportedFolder,
        messages: &[Imported<'_>],
    ) -> Result<(), StoreError>;

    /// Removes messages durably (POP3 UPDATE, IMAP EXPUNGE). Messages already gone are skipped.
    fn remove(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Result<(), StoreError>;
}
