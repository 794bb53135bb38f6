//! One IMAP session: the state machine of RFC 9051 §3 driven by one async loop (read a command,
//! act on the store, answer). Responses are flushed only when no complete command is waiting,
//! so pipelined commands cost one write.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use imap_codec::imap_types::command::{
    Command, CommandBody, FetchModifier, SelectParameter, StoreModifier,
};
use imap_codec::imap_types::extensions::binary::LiteralOrLiteral8;
use imap_codec::imap_types::fetch::{
    Macro, MacroOrMessageDataItemNames, MessageDataItemName, Section,
};
use imap_codec::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::SequenceSet;
use imap_codec::imap_types::status::StatusDataItemName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::codec::{self, Event, Extended, Mode, Reader, Refusal};
use super::fetch::{self, Parsed};
use super::search::{self, Lazy, Subject};
use super::selected::{paired_sets, range_set, uid_set, Report, Selected};
use super::ImapServer;
use crate::auth::{
    AuthUser, Credentials, LoginVerdict, Mechanism, SaslError, SaslExchange, SaslStep, Secret,
};
use crate::config::{ListenerConfig, TlsMode};
use crate::store::watched::Change;
use crate::store::{FlagChange, FlagOutcome, Flags, MailStore, MessageInfo, StoreError};
use crate::stream::{Io, ReadError};

/// Messages rendered per blocking batch in FETCH, and the message octets one batch may read:
/// together they bound what one response holds before it is written.
const FETCH_BATCH: usize = 32;
const FETCH_BATCH_BYTES: u64 = 1024 * 1024;
/// What a message costs a FETCH that does not read it (flags, dates, sizes).
const FETCH_META_BYTES: u64 = 4 * 1024;
/// How long a FETCH waits for other sessions to give memory back before `NO [LIMIT]`.
const FETCH_MEMORY_WAIT: Duration = Duration::from_secs(10);

/// Splits FETCH targets into batches of at most [`FETCH_BATCH`] messages and, when the message
/// is read, [`FETCH_BATCH_BYTES`] (a bigger message is a batch of its own), each with the memory
/// it needs: the rendered output and its copy in the write buffer.
fn fetch_batches(
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

enum State {
    NotAuthenticated,
    Authenticated,
    Selected(Selected),
}

/// How a command ended (its tagged response, or the end of the session).
enum Done {
    Ok(Option<String>, String),
    No(Option<String>, String),
    Bad(String),
    /// The tagged response is already queued (STARTTLS answers before its handshake).
    Sent,
    /// Nothing more to send: the connection closes.
    Close,
}

fn ok(text: &str) -> Done {
    Done::Ok(None, text.to_string())
}

fn no(code: Option<&str>, text: &str) -> Done {
    Done::No(code.map(str::to_string), text.to_string())
}

/// Numbers in the order given as a sequence set: runs of consecutive ascending numbers become
/// ranges, nothing is reordered (RFC 5267 §3.2 for ESORT's ALL).
fn ordered_set(numbers: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let mut j = i;
        while j + 1 < numbers.len() && numbers[j + 1] == numbers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            numbers[i].to_string()
        } else {
            format!("{}:{}", numbers[i], numbers[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// SEARCH, SORT and THREAD take US-ASCII and UTF-8 (RFC 9051 §6.4.4); anything else is refused
/// with the charsets we take.
fn unsupported_charset(charset: &imap_codec::imap_types::core::Charset<'_>) -> Option<Done> {
    use imap_codec::imap_types::core::Charset;
    let name = match charset {
        Charset::Atom(atom) => atom.as_ref().to_ascii_uppercase(),
        Charset::Quoted(quoted) => quoted.as_ref().to_ascii_uppercase(),
    };
    (name != "US-ASCII" && name != "UTF-8")
        .then(|| no(Some("BADCHARSET (US-ASCII UTF-8)"), "Unsupported charset"))
}

/// The store's refusal in IMAP terms (RFC 5530 response codes).
fn store_failure(err: &StoreError) -> Done {
    match err {
        StoreError::NoSuchFolder(_) => no(Some("NONEXISTENT"), "No such mailbox"),
        StoreError::Exists(_) => no(Some("ALREADYEXISTS"), "Mailbox already exists"),
        StoreError::InvalidName(_) => no(Some("CANNOT"), "Invalid mailbox name"),
        StoreError::Full(_) => no(Some("OVERQUOTA"), "Mail storage is full"),
        StoreError::Gone(_) => no(Some("EXPUNGEISSUED"), "Message was expunged"),
        StoreError::TooManyKeywords(_) => no(Some("LIMIT"), "No room for another keyword"),
        StoreError::Io(_) => no(Some("SERVERBUG"), "Internal error, try again later"),
    }
}

pub struct Session {
    id: u64,
    server: Arc<ImapServer>,
    listener: Arc<ListenerConfig>,
    peer: SocketAddr,
    tls: bool,
    state: State,
    /// The logged-in user's mailbox key.
    user: Option<String>,
    /// ENABLE IMAP4rev2 was given: SEARCH answers in ESEARCH form, no RECENT.
    rev2: bool,
    /// RFC 7162: CONDSTORE was enabled (explicitly or by a command that uses it).
    condstore: bool,
    /// RFC 7162: ENABLE QRESYNC was given.
    qresync: bool,
    errors: u32,
    auth_failures: u32,
    reader: Reader,
    changes: broadcast::Receiver<Change>,
    /// A change to the user's mailbox was announced since the last look.
    dirty: bool,
}

/// Reads until the reader has an event, sending queued responses before waiting.
async fn read_event<S>(
    reader: &mut Reader,
    io: &mut Io<S>,
    mode: Mode,
    deadline: Instant,
) -> Result<Event, ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    loop {
        if let Some(event) = reader.next(mode) {
            return Ok(event);
        }
        io.flush().await?;
        io.fill(deadline).await?;
        reader.feed(&io.input);
        io.input.clear();
    }
}

/// Runs store work on a blocking thread.
/// Runs store work off the async threads, as session `writer` (see `watched::writing_as`).
async fn blocking<T, F>(writer: u64, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || crate::store::watched::writing_as(writer, work))
        .await
        .unwrap_or_else(|_| Err(StoreError::Io(std::io::Error::other("store task failed"))))
}

/// A mailbox name as the store knows it: `/`-separated, INBOX in upper case.
fn folder_name(mailbox: &Mailbox<'_>) -> Result<String, Done> {
    match mailbox {
        Mailbox::Inbox => Ok("INBOX".into()),
        Mailbox::Other(other) => {
            let name = std::str::from_utf8(other.as_ref())
                .map_err(|_| no(Some("CANNOT"), "Mailbox names must be UTF-8"))?;
            let name = name.trim_end_matches('/');
            if name.eq_ignore_ascii_case("INBOX") {
                return Ok("INBOX".into());
            }
            if !crate::store::valid_folder_name(name) {
                return Err(no(Some("CANNOT"), "Invalid mailbox name"));
            }
            Ok(name.to_string())
        }
    }
}

/// The system flags of a flag list, and its keywords by name (`$Forwarded` is Maildir's `P`).
fn store_flags(flags: &[Flag<'_>]) -> (Flags, Vec<String>) {
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
fn flags_in_folder(
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

/// IMAP `list-wildcards` matching (RFC 9051 §6.3.9): `*` matches anything, `%` anything but
/// the hierarchy delimiter. It runs the pattern as an automaton over the name, keeping the set
/// of pattern positions reachable so far, so it costs at most pattern × name steps whatever the
/// wildcards (a backtracking matcher is exponential in the number of `*`).
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let m = pattern.len();
    // live[i]: the first i pattern octets can match the name read so far.
    let mut live = vec![false; m + 1];
    let mut next = vec![false; m + 1];
    live[0] = true;
    let close = |set: &mut [bool]| {
        // A wildcard may match nothing: whoever reaches it reaches past it too.
        for i in 0..m {
            if set[i] && matches!(pattern[i], b'*' | b'%') {
                set[i + 1] = true;
            }
        }
    };
    close(&mut live);
    for &c in name {
        next.fill(false);
        for i in 0..m {
            if !live[i] {
                continue;
            }
            match pattern[i] {
                b'*' => next[i] = true,
                b'%' if c != b'/' => next[i] = true,
                b'%' => {}
                p if p == c => next[i + 1] = true,
                _ => {}
            }
        }
        close(&mut next);
        std::mem::swap(&mut live, &mut next);
        if !live.iter().any(|l| *l) {
            return false;
        }
    }
    live[m]
}

fn list_match(pattern: &str, name: &str) -> bool {
    // INBOX is case-insensitive, in a pattern as in a name.
    let fold = |s: &str| {
        if s.len() >= 5
            && s[..5].eq_ignore_ascii_case("INBOX")
            && (s.len() == 5 || s.as_bytes()[5] == b'/')
        {
            format!("INBOX{}", &s[5..])
        } else {
            s.to_string()
        }
    };
    wildcard_match(fold(pattern).as_bytes(), fold(name).as_bytes())
}

/// How a session takes part in \Recent (RFC 3501 §2.3.2) when it opens or re-reads a folder.
#[derive(Clone, Copy)]
enum RecentMode {
    /// IMAP4rev2 (no \Recent at all).
    None,
    /// Read-only (EXAMINE): sees what no session claimed, claims nothing.
    Look,
    /// Read-write: claims what it is the first to see.
    Claim,
}

impl RecentMode {
    /// The boundary above which the snapshot's messages are \Recent for this session.
    fn boundary(
        self,
        store: &dyn MailStore,
        user: &str,
        folder: &str,
        snapshot: &crate::store::FolderSnapshot,
    ) -> Result<Option<u32>, StoreError> {
        let last = snapshot.messages.last().map_or(0, |m| m.uid);
        let claim = match self {
            RecentMode::None => return Ok(None),
            RecentMode::Look => None,
            RecentMode::Claim => Some(last),
        };
        store
            .recent_boundary(user, folder, snapshot.uid_validity, claim)
            .map(Some)
    }
}

/// The selected folder as a SEARCH, SORT or THREAD sees it, owned so it can go to a blocking
/// thread.
struct SearchScope {
    user: String,
    store: Arc<dyn MailStore>,
    folder: String,
    messages: Vec<MessageInfo>,
    keywords: Vec<String>,
    recent: std::collections::HashSet<u32>,
}

impl SearchScope {
    /// Indexes of the messages `key` matches. Blocking: reads headers and bodies as needed.
    fn matching(&self, key: &SearchKey<'_>) -> Vec<usize> {
        let last_seq = self.messages.len() as u32;
        let last_uid = self.messages.last().map(|m| m.uid).unwrap_or(0);
        let sets = search::SetCache::new(key);
        let mut found = Vec::new();
        for (i, info) in self.messages.iter().enumerate() {
            let subject = Subject {
                seq: i as u32 + 1,
                info,
                last_seq,
                last_uid,
                keywords: &self.keywords,
                sets: &sets,
                recent: self.recent.contains(&info.uid),
            };
            let mut load_header = || self.store.read_header(&self.user, &self.folder, info).ok();
            let mut load = || self.store.read(&self.user, &self.folder, info).ok();
            let mut lazy = Lazy::new(&mut load_header, &mut load);
            if search::matches(key, &subject, &mut lazy) {
                found.push(i);
            }
        }
        found
    }

    /// The sort and thread fields of the messages `key` matches, in sequence order.
    fn fields(&self, key: &SearchKey<'_>) -> Vec<super::sort::Fields> {
        self.matching(key)
            .into_iter()
            .map(|i| {
                let info = &self.messages[i];
                let header = self
                    .store
                    .read_header(&self.user, &self.folder, info)
                    .unwrap_or_else(|_| Arc::from(&b""[..]));
                super::sort::Fields::read(i as u32 + 1, info, &header)
            })
            .collect()
    }
}

/// The longest LIST/LSUB pattern (reference and mailbox together) taken.
const MAX_LIST_PATTERN: usize = 1024;

/// What a LIST or LSUB command asks for, beyond its pattern.
struct ListOptions {
    lsub: bool,
    /// LIST-EXTENDED syntax (RFC 5258): `\NonExistent` instead of `\Noselect`.
    extended: bool,
    only_subscribed: bool,
    only_special: bool,
    /// RFC 5258 §3.5 RECURSIVEMATCH: a matching folder that is not selected itself but has a
    /// selected (subscribed) descendant is listed with `CHILDINFO ("SUBSCRIBED")`.
    recursive: bool,
    show_subscribed: bool,
    /// LIST-STATUS: name the existing folders that need a STATUS line.
    want_status: bool,
}

/// The LIST (or LSUB) response lines for a user's folders, and the folders LIST-STATUS asks
/// about. Every folder costs a hash look-up and one pattern match, linear in its length.
fn list_lines(
    folders: &[String],
    subscribed: &[String],
    patterns: &[String],
    options: &ListOptions,
    specials: &std::collections::BTreeMap<String, String>,
) -> (Vec<u8>, Vec<String>) {
    use std::collections::BTreeSet;
    let verb = if options.lsub { "LSUB" } else { "LIST" };
    let existing: BTreeSet<&str> = folders.iter().map(String::as_str).collect();
    let subscribed: BTreeSet<&str> = subscribed.iter().map(String::as_str).collect();
    let mut names: BTreeSet<&str> = existing.clone();
    names.insert("INBOX");
    // RFC 9051 §6.3.9: superiors of existing folders are listed (as \NonExistent if absent).
    for folder in folders {
        let mut parent = folder.as_str();
        while let Some((up, _)) = parent.rsplit_once('/') {
            if !names.insert(up) {
                break;
            }
            parent = up;
        }
    }
    if options.only_subscribed {
        names.extend(subscribed.iter().copied());
    }
    let with_children: BTreeSet<&str> = names
        .iter()
        .filter_map(|name| name.rsplit_once('/').map(|(up, _)| up))
        .collect();
    let mut ordered: Vec<&str> = names.into_iter().collect();
    ordered.sort_by(|a, b| (*a != "INBOX", a).cmp(&(*b != "INBOX", b)));
    let mut out = Vec::new();
    let mut status_for = Vec::new();
    for name in ordered {
        if !patterns.iter().any(|pattern| list_match(pattern, name)) {
            continue;
        }
        let is_subscribed = subscribed.contains(name);
        // A folder not subscribed itself, with a subscribed descendant that this command does
        // not list: LSUB shows it as \Noselect (RFC 3501 §6.3.9), RECURSIVEMATCH with CHILDINFO
        // (RFC 5258 §3.5).
        let mut child_info = false;
        let mut lsub_parent = false;
        if options.only_subscribed && !is_subscribed {
            let below = format!("{name}/");
            let hidden_descendant = subscribed.iter().any(|s| {
                s.starts_with(&below) && !patterns.iter().any(|pattern| list_match(pattern, s))
            });
            match (hidden_descendant, options.lsub, options.recursive) {
                (true, true, _) => lsub_parent = true,
                (true, false, true) => child_info = true,
                _ => continue,
            }
        }
        let exists = name == "INBOX" || existing.contains(name);
        let special = specials.get(name);
        if options.only_special && special.is_none() {
            continue;
        }
        let mut attributes: Vec<&str> = Vec::new();
        if lsub_parent {
            attributes.push("\\Noselect");
        } else if !exists {
            attributes.push(if options.extended || options.lsub {
                "\\NonExistent"
            } else {
                "\\Noselect"
            });
        }
        if !options.lsub {
            attributes.push(if with_children.contains(name) {
                "\\HasChildren"
            } else {
                "\\HasNoChildren"
            });
        }
        if let Some(special) = special {
            attributes.push(special.as_str());
        }
        if options.show_subscribed && is_subscribed && !options.lsub {
            attributes.push("\\Subscribed");
        }
        out.extend_from_slice(format!("* {verb} ({}) \"/\" ", attributes.join(" ")).as_bytes());
        codec::astring(&mut out, name.as_bytes());
        if child_info {
            out.extend_from_slice(b" (CHILDINFO (\"SUBSCRIBED\"))");
        }
        out.extend_from_slice(b"\r\n");
        if exists && options.want_status {
            status_for.push(name.to_string());
        }
    }
    (out, status_for)
}

impl Session {
    pub fn new(
        server: Arc<ImapServer>,
        listener: Arc<ListenerConfig>,
        peer: SocketAddr,
    ) -> Session {
        let changes = server.watched.subscribe();
        // Until login, literals are capped at a few KiB (see `PREAUTH_LITERAL_LIMIT`).
        let reader = Reader::new(codec::PREAUTH_LITERAL_LIMIT);
        Session {
            id: crate::stream::next_session_id(),
            server,
            listener,
            peer,
            tls: false,
            state: State::NotAuthenticated,
            user: None,
            rev2: false,
            condstore: false,
            qresync: false,
            errors: 0,
            auth_failures: 0,
            reader,
            changes,
            dirty: false,
        }
    }

    pub async fn run<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let span = tracing::info_span!("imap", session = self.id, peer = %self.peer, listener = %self.listener.name);
        self.serve(stream).instrument(span).await
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.server.config.imap.idle_timeout_secs)
    }

    /// The largest literal this session takes now: a few KiB before login, APPENDLIMIT after.
    fn literal_limit(&self) -> u32 {
        match self.state {
            State::NotAuthenticated => codec::PREAUTH_LITERAL_LIMIT,
            _ => self.server.config.imap.append_limit,
        }
    }

    fn plaintext_allowed(&self) -> bool {
        self.tls || self.listener.trusted
    }

    async fn serve<S>(mut self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut io = Io::new(stream, self.idle_timeout());
        if self.listener.tls == TlsMode::Implicit {
            if io
                .start_implicit_tls(self.server.tls.as_ref())
                .await
                .is_none()
            {
                return;
            }
            self.tls = true;
        }
        let greeting = format!("[CAPABILITY {}] Postern IMAP ready", self.capabilities());
        io.queue(&codec::status(None, "OK", None, &greeting));
        let mut shutdown = self.server.shutdown.clone();
        loop {
            let deadline = Instant::now() + self.idle_timeout();
            let event = tokio::select! {
                event = read_event(&mut self.reader, &mut io, Mode::Command, deadline) => event,
                _ = shutdown.wait_for(|down| *down) => {
                    io.queue(b"* BYE Server shutting down\r\n");
                    break;
                }
            };
            let event = match event {
                Ok(event) => event,
                Err(ReadError::Timeout) => {
                    io.queue(b"* BYE Autologout: idle for too long\r\n");
                    break;
                }
                Err(err) => {
                    debug!("connection ended: {err}");
                    return;
                }
            };
            let (tag, done) = match event {
                Event::LiteralWanted => {
                    io.queue(b"+ Ready for literal data\r\n");
                    continue;
                }
                Event::LiteralRefused {
                    tag,
                    length,
                    why: Refusal::TooBig,
                } => {
                    let limit = self.literal_limit();
                    let text = format!("Literal of {length} octets is over the limit of {limit}");
                    (tag, no(Some("TOOBIG"), &text))
                }
                Event::LiteralRefused {
                    tag,
                    why: Refusal::NoMemory,
                    ..
                } => {
                    warn!("literal refused: the memory budget is exhausted");
                    let text = "Server memory for messages in flight is exhausted, try again later";
                    (tag, no(Some("LIMIT"), text))
                }
                Event::TooLong { tag } => (tag, no(Some("TOOBIG"), "Command too long")),
                Event::Bad { tag, text } => (tag, Done::Bad(text)),
                Event::Line(_) => (None, Done::Bad("Unexpected line".into())),
                Event::Command { command, extended } => {
                    let tag = command.tag.as_ref().to_string();
                    let done = self.dispatch(&mut io, *command, extended).await;
                    (Some(tag), done)
                }
            };
            match done {
                Done::Close => break,
                Done::Sent => {}
                Done::Ok(code, text) => {
                    io.queue(&codec::status(tag.as_deref(), "OK", code.as_deref(), &text))
                }
                Done::No(code, text) => {
                    io.queue(&codec::status(tag.as_deref(), "NO", code.as_deref(), &text))
                }
                Done::Bad(text) => {
                    self.errors += 1;
                    io.queue(&codec::status(tag.as_deref(), "BAD", None, &text));
                }
            }
            if self.errors >= self.server.config.limits.max_errors {
                io.queue(b"* BYE Too many errors, closing\r\n");
                break;
            }
        }
        io.shutdown().await;
        debug!("closed");
    }

    fn capabilities(&self) -> String {
        let mut caps = vec![
            "IMAP4rev1",
            "IMAP4rev2",
            "LITERAL+",
            "SASL-IR",
            "ID",
            "ENABLE",
            "IDLE",
            "NAMESPACE",
            "UNSELECT",
            "UIDPLUS",
            "MOVE",
            "CHILDREN",
            "SPECIAL-USE",
            "LIST-EXTENDED",
            "LIST-STATUS",
            "ESEARCH",
            "BINARY",
            "COMPRESS=DEFLATE",
            "CONDSTORE",
            "QRESYNC",
            "SORT",
            "SORT=DISPLAY",
            "ESORT",
            "THREAD=ORDEREDSUBJECT",
            "THREAD=REFERENCES",
        ];
        if matches!(self.state, State::NotAuthenticated) {
            if !self.tls && self.listener.tls == TlsMode::Starttls && self.server.tls.is_some() {
                caps.push("STARTTLS");
            }
            if self.plaintext_allowed() {
                caps.push("AUTH=PLAIN");
                caps.push("AUTH=LOGIN");
            } else {
                caps.push("LOGINDISABLED");
            }
        }
        let mut text = caps.join(" ");
        text.push_str(&format!(
            " APPENDLIMIT={}",
            self.server.config.imap.append_limit
        ));
        text
    }

    /// RFC 7162 §3.1: a CONDSTORE-enabling command (FETCH MODSEQ, SEARCH MODSEQ, STORE
    /// UNCHANGEDSINCE, STATUS HIGHESTMODSEQ) turns CONDSTORE on; when a mailbox is selected the
    /// client then hears its HIGHESTMODSEQ, as it would have from SELECT.
    fn enable_condstore<S>(&mut self, io: &mut Io<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if self.condstore {
            return;
        }
        self.condstore = true;
        if let State::Selected(selected) = &self.state {
            let highest = selected.highest_modseq.max(1);
            io.queue(&codec::status(
                None,
                "OK",
                Some(&format!("HIGHESTMODSEQ {highest}")),
                "Highest",
            ));
        }
    }

    fn recent_mode(&self, read_only: bool) -> RecentMode {
        match (self.rev2, read_only) {
            (true, _) => RecentMode::None,
            (false, true) => RecentMode::Look,
            (false, false) => RecentMode::Claim,
        }
    }

    fn report(&self) -> Report {
        Report {
            condstore: self.condstore,
            qresync: self.qresync,
            recent: !self.rev2,
        }
    }

    /// Notes announcements about this user's mailbox.
    fn drain_changes(&mut self) {
        let Some(user) = &self.user else {
            return;
        };
        loop {
            match self.changes.try_recv() {
                Ok(change) => {
                    // Our own writes are in our view already (APPEND and COPY mark it dirty).
                    if change.writer != self.id
                        && change.mailbox.as_ref() == user.to_ascii_lowercase()
                    {
                        self.dirty = true;
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.dirty = true,
                Err(_) => break,
            }
        }
    }

    /// Brings the client up to date on the selected folder, when something changed.
    async fn updates(&mut self, expunge_allowed: bool) -> Vec<u8> {
        self.drain_changes();
        if !self.dirty {
            return Vec::new();
        }
        let (Some(user), State::Selected(selected)) = (self.user.clone(), &self.state) else {
            return Vec::new();
        };
        let store = self.server.store.clone();
        let folder = selected.folder.clone();
        let recent = self.recent_mode(selected.read_only);
        let snapshot = blocking(self.id, move || {
            let snapshot = store.snapshot(&user, &folder)?;
            let boundary = recent.boundary(&*store, &user, &folder, &snapshot)?;
            Ok((snapshot, boundary))
        })
        .await;
        let report = self.report();
        let State::Selected(selected) = &mut self.state else {
            return Vec::new();
        };
        match snapshot {
            Ok((snapshot, boundary)) => {
                // Only a complete report clears the flag; one that had to hold back EXPUNGEs
                // leaves it for the next command.
                if expunge_allowed {
                    self.dirty = false;
                }
                selected.refresh(snapshot, expunge_allowed, report, boundary)
            }
            Err(StoreError::NoSuchFolder(_)) => {
                b"* BYE Selected mailbox was deleted, please reconnect\r\n".to_vec()
            }
            Err(err) => {
                warn!("cannot refresh the selected folder: {err}");
                Vec::new()
            }
        }
    }

    async fn dispatch<S>(
        &mut self,
        io: &mut Io<S>,
        command: Command<'static>,
        extended: Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let tag = command.tag.as_ref().to_string();
        // RFC 9051 §7.5.1: no EXPUNGE during FETCH, STORE or SEARCH (their UID forms allow it).
        let expunge_allowed = !matches!(
            command.body,
            CommandBody::Fetch { uid: false, .. }
                | CommandBody::Store { uid: false, .. }
                | CommandBody::Search { uid: false, .. }
        );
        let done = match command.body {
            CommandBody::Capability => {
                io.queue(format!("* CAPABILITY {}\r\n", self.capabilities()).as_bytes());
                ok("CAPABILITY completed")
            }
            CommandBody::Noop => ok("NOOP completed"),
            CommandBody::Logout => {
                io.queue(b"* BYE Logging out\r\n");
                io.queue(&codec::status(Some(&tag), "OK", None, "LOGOUT completed"));
                return Done::Close;
            }
            CommandBody::Id { .. } => {
                io.queue(b"* ID (\"name\" \"Postern\" \"vendor\" \"Postern\")\r\n");
                ok("ID completed")
            }
            CommandBody::StartTLS => return self.starttls(io, &tag).await,
            CommandBody::Login { username, password } => {
                if !matches!(self.state, State::NotAuthenticated) {
                    return Done::Bad("Already logged in".into());
                }
                if !self.plaintext_allowed() {
                    return no(Some("PRIVACYREQUIRED"), "Use STARTTLS first");
                }
                let login = String::from_utf8_lossy(username.as_ref()).into_owned();
                let password = String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
                self.login(io, login, password, "LOGIN").await
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                let initial = initial_response.map(|r| {
                    use base64::Engine as _;
                    let bytes = r.declassify();
                    if bytes.is_empty() {
                        "=".to_string()
                    } else {
                        base64::engine::general_purpose::STANDARD.encode(bytes.as_ref())
                    }
                });
                self.authenticate(io, mechanism.as_ref(), initial).await
            }
            _ if matches!(self.state, State::NotAuthenticated) => Done::Bad("Log in first".into()),
            body => self.authenticated(io, &tag, body, extended).await,
        };
        if matches!(done, Done::Close | Done::Sent) {
            return done;
        }
        let updates = self.updates(expunge_allowed).await;
        io.queue(&updates);
        done
    }

    async fn starttls<S>(&mut self, io: &mut Io<S>, tag: &str) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let acceptor = match (&self.server.tls, self.listener.tls, self.tls, &self.state) {
            (_, _, true, _) => return Done::Bad("TLS is already active".into()),
            (_, _, _, State::Authenticated | State::Selected(_)) => {
                return Done::Bad("Already logged in".into())
            }
            (Some(acceptor), TlsMode::Starttls, false, _) => acceptor.clone(),
            _ => return Done::Bad("STARTTLS is not available here".into()),
        };
        io.queue(&codec::status(
            Some(tag),
            "OK",
            None,
            "Begin TLS negotiation now",
        ));
        if io.flush().await.is_err() {
            return Done::Close;
        }
        match io
            .start_tls(&acceptor, crate::stream::TLS_HANDSHAKE_TIMEOUT)
            .await
        {
            Ok(_) => {
                self.tls = true;
                // Nothing sent before the handshake may be obeyed after it.
                self.reader.reset();
                Done::Sent
            }
            Err(err) => {
                info!("STARTTLS handshake failed: {err}");
                Done::Close
            }
        }
    }

    fn throttle_allows(&self) -> bool {
        if self.server.login_gate.allows(self.peer.ip()) {
            return true;
        }
        info!("login refused: too many failures from this address");
        false
    }

    async fn authenticate<S>(
        &mut self,
        io: &mut Io<S>,
        mechanism: &str,
        initial: Option<String>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if !matches!(self.state, State::NotAuthenticated) {
            return Done::Bad("Already logged in".into());
        }
        if !self.plaintext_allowed() {
            return no(Some("PRIVACYREQUIRED"), "Use STARTTLS first");
        }
        let Some(mechanism) = Mechanism::parse(mechanism) else {
            return no(Some("CANNOT"), "Unsupported authentication mechanism");
        };
        let (mut exchange, mut step) = SaslExchange::start(mechanism, initial.as_deref());
        let (login, password) = loop {
            step = match step {
                SaslStep::Done(login, password) => break (login, password),
                SaslStep::Failed(SaslError::Cancelled) => {
                    return Done::Bad("Authentication cancelled".into())
                }
                SaslStep::Failed(SaslError::Malformed) => {
                    return Done::Bad("Cannot decode the response".into())
                }
                SaslStep::Challenge(challenge) => {
                    io.queue(format!("+ {challenge}\r\n").as_bytes());
                    let deadline = Instant::now() + self.idle_timeout();
                    match read_event(&mut self.reader, io, Mode::Line, deadline).await {
                        Ok(Event::Line(line)) => exchange.respond(&String::from_utf8_lossy(&line)),
                        Ok(_) => return Done::Bad("Malformed response".into()),
                        Err(_) => return Done::Close,
                    }
                }
            };
        };
        self.login(io, login, password.0, mechanism.name()).await
    }

    async fn login<S>(
        &mut self,
        io: &mut Io<S>,
        login: String,
        password: String,
        method: &str,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if !self.throttle_allows() {
            return no(
                Some("UNAVAILABLE"),
                "Too many failed logins from your address, try again later",
            );
        }
        let credentials = Credentials::Password {
            login: login.clone(),
            password: Secret(password),
        };
        let user = match self
            .server
            .login_gate
            .check(self.peer.ip(), credentials)
            .await
        {
            LoginVerdict::Accepted(AuthUser(user)) => Some(user),
            LoginVerdict::Refused => None,
            LoginVerdict::Throttled => {
                return no(
                    Some("UNAVAILABLE"),
                    "Too many failed logins from your address, try again later",
                )
            }
        };
        let Some(user) = user else {
            self.auth_failures += 1;
            warn!(login = %login.chars().take(64).collect::<String>(), method, failures = self.auth_failures, "authentication failed");
            tokio::time::sleep(crate::auth::FAILURE_DELAY * self.auth_failures).await;
            if self.auth_failures >= self.server.config.limits.max_auth_failures {
                io.queue(b"* BYE Too many failed logins, closing connection\r\n");
                return Done::Close;
            }
            return no(Some("AUTHENTICATIONFAILED"), "Authentication failed");
        };
        info!(%user, method, "logged in");
        self.make_special_folders(&user).await;
        self.user = Some(user);
        self.state = State::Authenticated;
        self.reader.set_literal_limit(
            self.server.config.imap.append_limit,
            Some(self.server.budget.clone()),
        );
        self.drain_changes();
        Done::Ok(
            Some(format!("CAPABILITY {}", self.capabilities())),
            "Logged in".into(),
        )
    }

    /// Creates (and subscribes) the configured special-use folders a user does not have yet.
    async fn make_special_folders(&self, user: &str) {
        let wanted: Vec<String> = self
            .server
            .config
            .imap
            .special_folders
            .keys()
            .cloned()
            .collect();
        let store = self.server.store.clone();
        let user = user.to_string();
        let made = blocking(self.id, move || {
            let existing = store.folders(&user)?;
            let mut made = Vec::new();
            for folder in wanted {
                if existing.contains(&folder) {
                    continue;
                }
                match store.create_folder(&user, &folder) {
                    Ok(()) | Err(StoreError::Exists(_)) => {}
                    Err(err) => return Err(err),
                }
                store.set_subscribed(&user, &folder, true)?;
                made.push(folder);
            }
            Ok(made)
        })
        .await;
        match made {
            Ok(made) if !made.is_empty() => info!(folders = ?made, "special-use folders created"),
            Ok(_) => {}
            Err(err) => warn!("cannot create special-use folders: {err}"),
        }
    }

    fn user(&self) -> String {
        self.user.clone().unwrap_or_default()
    }

    fn selected(&mut self) -> Option<&mut Selected> {
        match &mut self.state {
            State::Selected(selected) => Some(selected),
            _ => None,
        }
    }

    async fn authenticated<S>(
        &mut self,
        io: &mut Io<S>,
        tag: &str,
        body: CommandBody<'static>,
        extended: Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        match body {
            CommandBody::Compress { .. } => {
                // RFC 4978 §3: DEFLATE is the only algorithm imap-codec parses.
                if io.is_compressed() {
                    return no(Some("COMPRESSIONACTIVE"), "DEFLATE is already active");
                }
                // The OK goes out uncompressed; everything after it in both directions is not.
                io.queue(&codec::status(Some(tag), "OK", None, "DEFLATE active"));
                if io.flush().await.is_err() {
                    return Done::Close;
                }
                io.start_deflate();
                self.reader.reset();
                Done::Sent
            }
            CommandBody::Enable { capabilities } => {
                let mut enabled = Vec::new();
                for capability in capabilities.as_ref() {
                    let name = capability.to_string();
                    if name.eq_ignore_ascii_case("IMAP4rev2") {
                        self.rev2 = true;
                        enabled.push("IMAP4rev2");
                    } else if name.eq_ignore_ascii_case("CONDSTORE") {
                        self.condstore = true;
                        enabled.push("CONDSTORE");
                    } else if name.eq_ignore_ascii_case("QRESYNC") {
                        // RFC 7162 §3.2.3: QRESYNC implies CONDSTORE.
                        self.condstore = true;
                        self.qresync = true;
                        enabled.push("QRESYNC");
                    }
                }
                io.queue(
                    format!("* ENABLED {}\r\n", enabled.join(" "))
                        .trim_end()
                        .as_bytes(),
                );
                io.queue(b"\r\n");
                ok("ENABLE completed")
            }
            CommandBody::Namespace => {
                io.queue(b"* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
                ok("NAMESPACE completed")
            }
            CommandBody::Select {
                mailbox,
                parameters,
            } => self.select(io, &mailbox, false, parameters).await,
            CommandBody::Examine {
                mailbox,
                parameters,
            } => self.select(io, &mailbox, true, parameters).await,
            CommandBody::Create { mailbox } => {
                let name = match folder_name(&mailbox) {
                    Ok(name) => name,
                    Err(done) => return done,
                };
                if name == "INBOX" {
                    return no(Some("ALREADYEXISTS"), "INBOX always exists");
                }
                let (store, user) = (self.server.store.clone(), self.user());
                let created = blocking(self.id, move || {
                    // RFC 9051 §6.3.4: superior names are created as needed, so every level is
                    // a folder that can be selected, renamed and deleted.
                    for (end, _) in name.match_indices('/') {
                        match store.create_folder(&user, &name[..end]) {
                            Ok(()) | Err(StoreError::Exists(_)) => {}
                            Err(err) => return Err(err),
                        }
                    }
                    store.create_folder(&user, &name)
                });
                match created.await {
                    Ok(()) => ok("CREATE completed"),
                    Err(err) => store_failure(&err),
                }
            }
            CommandBody::Delete { mailbox } => {
                let name = match folder_name(&mailbox) {
                    Ok(name) => name,
                    Err(done) => return done,
                };
                if name == "INBOX" {
                    return no(Some("CANNOT"), "INBOX cannot be deleted");
                }
                let (store, user) = (self.server.store.clone(), self.user());
                let folder = name.clone();
                match blocking(self.id, move || store.delete_folder(&user, &folder)).await {
                    Ok(()) => {
                        if self.selected().is_some_and(|s| s.folder == name) {
                            self.state = State::Authenticated;
                        }
                        ok("DELETE completed")
                    }
                    Err(err) => store_failure(&err),
                }
            }
            CommandBody::Rename { from, to } => {
                let (from, to) = match (folder_name(&from), folder_name(&to)) {
                    (Ok(from), Ok(to)) => (from, to),
                    (Err(done), _) | (_, Err(done)) => return done,
                };
                let (store, user) = (self.server.store.clone(), self.user());
                match blocking(self.id, move || store.rename_folder(&user, &from, &to)).await {
                    Ok(()) => ok("RENAME completed"),
                    Err(err) => store_failure(&err),
                }
            }
            CommandBody::Subscribe { mailbox } => self.subscribe(&mailbox, true).await,
            CommandBody::Unsubscribe { mailbox } => self.subscribe(&mailbox, false).await,
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => {
                self.list(io, &reference, &mailbox_wildcard, &extended, false)
                    .await
            }
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => {
                self.list(io, &reference, &mailbox_wildcard, &extended, true)
                    .await
            }
            CommandBody::Status {
                mailbox,
                item_names,
            } => {
                let name = match folder_name(&mailbox) {
                    Ok(name) => name,
                    Err(done) => return done,
                };
                if item_names.contains(&StatusDataItemName::HighestModSeq) {
                    self.enable_condstore(io);
                }
                match self.status_line(&name, item_names.as_ref()).await {
                    Ok(line) => {
                        io.queue(&line);
                        ok("STATUS completed")
                    }
                    Err(err) => store_failure(&err),
                }
            }
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => {
                let name = match folder_name(&mailbox) {
                    Ok(name) => name,
                    Err(done) => return done,
                };
                let bytes = match message {
                    LiteralOrLiteral8::Literal(literal) => literal.as_ref().to_vec(),
                    LiteralOrLiteral8::Literal8(literal) => literal.data.as_ref().to_vec(),
                };
                if bytes.is_empty() {
                    return no(None, "Empty message");
                }
                let received_at = date
                    .map(|d| d.as_ref().timestamp())
                    .unwrap_or_else(|| chrono::Utc::now().timestamp());
                let (system, names) = store_flags(&flags);
                let (store, user) = (self.server.store.clone(), self.user());
                let into_selected = matches!(&self.state, State::Selected(s) if s.folder == name);
                match blocking(self.id, move || {
                    let (flags, _) = flags_in_folder(&*store, &user, &name, system, &names)?;
                    store.append(&user, &name, &bytes, flags, received_at)
                })
                .await
                {
                    Ok((validity, uid)) => {
                        // Our own write is not announced to us: the next update re-reads the
                        // selected folder when it gained the message (a Sent copy does not).
                        if into_selected {
                            self.dirty = true;
                        }
                        Done::Ok(
                            Some(format!("APPENDUID {validity} {uid}")),
                            "APPEND completed".into(),
                        )
                    }
                    Err(StoreError::NoSuchFolder(_)) => no(Some("TRYCREATE"), "No such mailbox"),
                    Err(err) => store_failure(&err),
                }
            }
            CommandBody::Idle => self.idle(io).await,
            _ if self.selected().is_none() => Done::Bad("No mailbox selected".into()),
            body => self.in_selected(io, tag, body, extended).await,
        }
    }

    async fn subscribe(&mut self, mailbox: &Mailbox<'_>, on: bool) -> Done {
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        let (store, user) = (self.server.store.clone(), self.user());
        match blocking(self.id, move || store.set_subscribed(&user, &name, on)).await {
            Ok(()) => ok(if on {
                "SUBSCRIBE completed"
            } else {
                "UNSUBSCRIBE completed"
            }),
            Err(err) => store_failure(&err),
        }
    }

    async fn select<S>(
        &mut self,
        io: &mut Io<S>,
        mailbox: &Mailbox<'_>,
        read_only: bool,
        parameters: Vec<SelectParameter>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut resync = None;
        for parameter in parameters {
            match parameter {
                SelectParameter::CondStore => self.condstore = true,
                // RFC 7162 §3.2.5: QRESYNC parameters only after ENABLE QRESYNC.
                SelectParameter::QResync { .. } if !self.qresync => {
                    return Done::Bad("ENABLE QRESYNC first".into());
                }
                SelectParameter::QResync {
                    uid_validity,
                    mod_sequence_value,
                    known_uids,
                    ..
                } => resync = Some((uid_validity.get(), mod_sequence_value.get(), known_uids)),
            }
        }
        // RFC 9051 §6.3.2: a failed SELECT leaves no mailbox selected.
        if matches!(self.state, State::Selected(_)) {
            self.state = State::Authenticated;
            if self.rev2 || self.qresync {
                io.queue(b"* OK [CLOSED] Previous mailbox closed\r\n");
            }
        }
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        let (store, user, folder) = (self.server.store.clone(), self.user(), name.clone());
        let recent = self.recent_mode(read_only);
        let opened = blocking(self.id, move || {
            let snapshot = store.snapshot(&user, &folder)?;
            let boundary = recent.boundary(&*store, &user, &folder, &snapshot)?;
            Ok((snapshot, boundary))
        })
        .await;
        let (snapshot, boundary) = match opened {
            Ok(opened) => opened,
            Err(err) => return store_failure(&err),
        };
        self.drain_changes();
        self.dirty = false;
        let selected = Selected::new(name, read_only, snapshot, boundary);
        let mut out = Vec::new();
        out.extend_from_slice(format!("* {} EXISTS\r\n", selected.exists()).as_bytes());
        if !self.rev2 {
            out.extend_from_slice(format!("* {} RECENT\r\n", selected.recent_count()).as_bytes());
            if let Some(first) = selected.first_unseen() {
                out.extend_from_slice(format!("* OK [UNSEEN {first}] First unseen\r\n").as_bytes());
            }
        }
        out.extend_from_slice(&selected.flag_responses());
        out.extend_from_slice(
            format!(
                "* OK [UIDVALIDITY {}] UIDs valid\r\n",
                selected.uid_validity
            )
            .as_bytes(),
        );
        out.extend_from_slice(
            format!(
                "* OK [UIDNEXT {}] Predicted next UID\r\n",
                selected.uid_next
            )
            .as_bytes(),
        );
        // RFC 7162 §3.1.2.1: sent on every SELECT by a server that keeps mod-sequences.
        out.extend_from_slice(
            format!(
                "* OK [HIGHESTMODSEQ {}] Highest\r\n",
                selected.highest_modseq
            )
            .as_bytes(),
        );
        if self.rev2 {
            // RFC 9051 §6.3.2: the mailbox's name as the server spells it (INBOX in any case).
            out.extend_from_slice(b"* LIST () \"/\" ");
            codec::astring(&mut out, selected.folder.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        // RFC 7162 §3.2.5.2: what changed since the client's last visit, when it still knows
        // this folder (same UIDVALIDITY).
        if let Some((validity, since, known)) = resync {
            if validity == selected.uid_validity && since < selected.highest_modseq {
                let missing = selected.missing_uids(known.as_ref());
                if !missing.is_empty() {
                    out.extend_from_slice(
                        format!("* VANISHED (EARLIER) {}\r\n", range_set(&missing)).as_bytes(),
                    );
                }
                for (index, message) in selected.messages.iter().enumerate() {
                    if message.modseq > since {
                        selected.flags_fetch(&mut out, index, true, self.report());
                    }
                }
            }
        }
        io.queue(&out);
        self.state = State::Selected(selected);
        if read_only {
            Done::Ok(Some("READ-ONLY".into()), "EXAMINE completed".into())
        } else {
            Done::Ok(Some("READ-WRITE".into()), "SELECT completed".into())
        }
    }

    async fn status_line(
        &self,
        name: &str,
        items: &[StatusDataItemName],
    ) -> Result<Vec<u8>, StoreError> {
        let (store, user, folder) = (self.server.store.clone(), self.user(), name.to_string());
        let wants_recent = items.contains(&StatusDataItemName::Recent);
        let (snapshot, recent_above) = blocking(self.id, move || {
            let snapshot = store.snapshot(&user, &folder)?;
            // STATUS only looks: what no session has claimed yet is recent (RFC 3501 §6.3.10).
            let boundary = if wants_recent {
                store.recent_boundary(&user, &folder, snapshot.uid_validity, None)?
            } else {
                0
            };
            Ok((snapshot, boundary))
        })
        .await?;
        let mut parts = Vec::new();
        for item in items {
            let value = match item {
                StatusDataItemName::Messages => format!("MESSAGES {}", snapshot.messages.len()),
                StatusDataItemName::Recent => format!(
                    "RECENT {}",
                    snapshot
                        .messages
                        .iter()
                        .filter(|m| m.uid > recent_above)
                        .count()
                ),
                StatusDataItemName::UidNext => format!("UIDNEXT {}", snapshot.uid_next),
                StatusDataItemName::UidValidity => format!("UIDVALIDITY {}", snapshot.uid_validity),
                StatusDataItemName::Unseen => format!(
                    "UNSEEN {}",
                    snapshot
                        .messages
                        .iter()
                        .filter(|m| !m.flags.contains(Flags::SEEN))
                        .count()
                ),
                StatusDataItemName::Deleted => format!(
                    "DELETED {}",
                    snapshot
                        .messages
                        .iter()
                        .filter(|m| m.flags.contains(Flags::DELETED))
                        .count()
                ),
                StatusDataItemName::HighestModSeq => {
                    format!("HIGHESTMODSEQ {}", snapshot.highest_modseq)
                }
                StatusDataItemName::DeletedStorage => format!(
                    "DELETED-STORAGE {}",
                    snapshot
                        .messages
                        .iter()
                        .filter(|m| m.flags.contains(Flags::DELETED))
                        .map(|m| m.size)
                        .sum::<u64>()
                ),
                #[allow(unreachable_patterns)]
                _ => continue,
            };
            parts.push(value);
        }
        let mut out = b"* STATUS ".to_vec();
        codec::astring(&mut out, name.as_bytes());
        out.extend_from_slice(format!(" ({})\r\n", parts.join(" ")).as_bytes());
        Ok(out)
    }

    async fn list<S>(
        &mut self,
        io: &mut Io<S>,
        reference: &Mailbox<'_>,
        pattern: &ListMailbox<'_>,
        extended: &Extended,
        lsub: bool,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let reference = match reference {
            Mailbox::Inbox => "INBOX".to_string(),
            Mailbox::Other(other) => String::from_utf8_lossy(other.as_ref()).into_owned(),
        };
        let pattern = match pattern {
            ListMailbox::Token(token) => String::from_utf8_lossy(token.as_ref()).into_owned(),
            ListMailbox::String(string) => String::from_utf8_lossy(string.as_ref()).into_owned(),
        };
        let verb = if lsub { "LSUB" } else { "LIST" };
        // RFC 5258 §3: unknown options, and RECURSIVEMATCH alone (or with REMOTE only), are
        // errors.
        let known_select = ["SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"];
        let known_return = ["SUBSCRIBED", "CHILDREN", "SPECIAL-USE"];
        if let Some(bad) = extended
            .list_select
            .iter()
            .find(|o| !known_select.contains(&o.as_str()))
            .or_else(|| {
                extended
                    .list_return
                    .iter()
                    .find(|o| !known_return.contains(&o.as_str()))
            })
        {
            return Done::Bad(format!("Unknown LIST option {bad}"));
        }
        if extended.list_select.iter().any(|o| o == "RECURSIVEMATCH")
            && !extended
                .list_select
                .iter()
                .any(|o| o == "SUBSCRIBED" || o == "SPECIAL-USE")
        {
            return Done::Bad("RECURSIVEMATCH needs another selection option".into());
        }
        if pattern.is_empty() && !lsub {
            io.queue(b"* LIST (\\Noselect) \"/\" \"\"\r\n");
            return ok("LIST completed");
        }
        let patterns: Vec<String> = std::iter::once(pattern)
            .chain(
                extended
                    .list_patterns
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned()),
            )
            .map(|p| format!("{reference}{p}"))
            .collect();
        if patterns.iter().map(String::len).sum::<usize>() > MAX_LIST_PATTERN {
            return no(Some("LIMIT"), "Mailbox pattern too long");
        }
        let (store, user) = (self.server.store.clone(), self.user());
        let config = self.server.config.clone();
        let options = ListOptions {
            lsub,
            extended: extended.list_extended,
            only_subscribed: lsub || extended.list_select.iter().any(|o| o == "SUBSCRIBED"),
            only_special: extended.list_select.iter().any(|o| o == "SPECIAL-USE"),
            recursive: extended.list_select.iter().any(|o| o == "RECURSIVEMATCH"),
            show_subscribed: lsub
                || extended
                    .list_select
                    .iter()
                    .chain(&extended.list_return)
                    .any(|o| o == "SUBSCRIBED"),
            want_status: !extended.list_status.is_empty(),
        };
        // Matching and rendering are linear in the number of folders but still per folder:
        // they run on the blocking thread with the listing, never on the async executor.
        let listing = blocking(self.id, move || {
            let folders = store.folders(&user)?;
            let subscribed = store.subscriptions(&user)?;
            Ok(list_lines(
                &folders,
                &subscribed,
                &patterns,
                &options,
                &config.imap.special_folders,
            ))
        })
        .await;
        let (out, status_for) = match listing {
            Ok(listing) => listing,
            Err(err) => return store_failure(&err),
        };
        io.queue(&out);
        if !status_for.is_empty() {
            let items: Vec<StatusDataItemName> = extended
                .list_status
                .iter()
                .filter_map(|item| match item.as_str() {
                    "MESSAGES" => Some(StatusDataItemName::Messages),
                    "RECENT" => Some(StatusDataItemName::Recent),
                    "UIDNEXT" => Some(StatusDataItemName::UidNext),
                    "UIDVALIDITY" => Some(StatusDataItemName::UidValidity),
                    "UNSEEN" => Some(StatusDataItemName::Unseen),
                    "DELETED" => Some(StatusDataItemName::Deleted),
                    _ => None,
                })
                .collect();
            for name in status_for {
                if let Ok(line) = self.status_line(&name, &items).await {
                    io.queue(&line);
                }
            }
        }
        ok(&format!("{verb} completed"))
    }

    async fn idle<S>(&mut self, io: &mut Io<S>) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let updates = self.updates(true).await;
        io.queue(&updates);
        io.queue(b"+ idling\r\n");
        let deadline = Instant::now() + self.idle_timeout();
        let mut shutdown = self.server.shutdown.clone();
        let user = self.user().to_ascii_lowercase();
        loop {
            if io.flush().await.is_err() {
                return Done::Close;
            }
            enum Woken {
                Input(Result<Event, ReadError>),
                Change(Result<Change, broadcast::error::RecvError>),
                Shutdown,
            }
            let woken = tokio::select! {
                event = read_event(&mut self.reader, io, Mode::Line, deadline) => Woken::Input(event),
                change = self.changes.recv() => Woken::Change(change),
                _ = shutdown.wait_for(|down| *down) => Woken::Shutdown,
            };
            match woken {
                Woken::Input(event) => {
                    return match event {
                        Ok(Event::Line(line)) if line.eq_ignore_ascii_case(b"DONE") => {
                            ok("IDLE terminated")
                        }
                        Ok(_) => Done::Bad("Expected DONE".into()),
                        Err(ReadError::Timeout) => {
                            io.queue(b"* BYE Autologout: idle for too long\r\n");
                            Done::Close
                        }
                        Err(_) => Done::Close,
                    };
                }
                Woken::Change(Ok(change))
                    if change.mailbox.as_ref() != user || change.writer == self.id =>
                {
                    continue
                }
                Woken::Change(Err(broadcast::error::RecvError::Closed)) => return Done::Close,
                Woken::Change(_) => {
                    self.dirty = true;
                    let updates = self.updates(true).await;
                    io.queue(&updates);
                }
                Woken::Shutdown => {
                    io.queue(b"* BYE Server shutting down\r\n");
                    return Done::Close;
                }
            }
        }
    }

    async fn in_selected<S>(
        &mut self,
        io: &mut Io<S>,
        tag: &str,
        body: CommandBody<'static>,
        extended: Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        match body {
            CommandBody::Check => ok("CHECK completed"),
            CommandBody::Unselect => {
                self.state = State::Authenticated;
                ok("UNSELECT completed")
            }
            CommandBody::Close => {
                let selected = self.selected().map(|s| (s.read_only, s.folder.clone()));
                if let Some((false, folder)) = selected {
                    let doomed: Vec<MessageInfo> = self
                        .selected()
                        .map(|s| {
                            s.messages
                                .iter()
                                .filter(|m| m.flags.contains(Flags::DELETED))
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default();
                    if !doomed.is_empty() {
                        let (store, user) = (self.server.store.clone(), self.user());
                        let result = blocking(self.id, move || {
                            let refs: Vec<&MessageInfo> = doomed.iter().collect();
                            store.remove(&user, &folder, &refs)
                        })
                        .await;
                        if let Err(err) = result {
                            return store_failure(&err);
                        }
                    }
                }
                self.state = State::Authenticated;
                ok("CLOSE completed")
            }
            CommandBody::Expunge => self.expunge(io, None).await,
            CommandBody::ExpungeUid { sequence_set } => self.expunge(io, Some(sequence_set)).await,
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => {
                if let Some(refused) = charset.as_ref().and_then(unsupported_charset) {
                    return refused;
                }
                let key = match criteria.as_ref() {
                    [one] => one.clone(),
                    _ => SearchKey::And(criteria),
                };
                self.search(io, tag, key, uid, &extended).await
            }
            CommandBody::Sort {
                sort_criteria,
                charset,
                search_criteria,
                uid,
            } => {
                if let Some(refused) = unsupported_charset(&charset) {
                    return refused;
                }
                let key = match search_criteria.as_ref() {
                    [one] => one.clone(),
                    _ => SearchKey::And(search_criteria),
                };
                self.sort(io, tag, sort_criteria.into_inner(), key, uid, &extended)
                    .await
            }
            CommandBody::Thread {
                algorithm,
                charset,
                search_criteria,
                uid,
            } => {
                use imap_codec::imap_types::extensions::thread::ThreadingAlgorithm;
                if let Some(refused) = unsupported_charset(&charset) {
                    return refused;
                }
                let references = match algorithm {
                    ThreadingAlgorithm::References => true,
                    ThreadingAlgorithm::OrderedSubject => false,
                    ThreadingAlgorithm::Other(_) => {
                        return Done::Bad("Unknown threading algorithm".into())
                    }
                };
                let key = match search_criteria.as_ref() {
                    [one] => one.clone(),
                    _ => SearchKey::And(search_criteria),
                };
                self.thread(io, references, key, uid).await
            }
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => {
                self.fetch(io, &sequence_set, macro_or_item_names, uid, modifiers)
                    .await
            }
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => {
                let unchanged_since = modifiers
                    .iter()
                    .map(|StoreModifier::UnchangedSince(n)| *n)
                    .next();
                let request = StoreRequest {
                    kind,
                    response,
                    flags: &flags,
                    uid,
                    unchanged_since,
                };
                self.store(io, &sequence_set, request).await
            }
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(io, &sequence_set, &mailbox, uid, false).await,
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(io, &sequence_set, &mailbox, uid, true).await,
            _ => Done::Bad("Command not supported".into()),
        }
    }

    /// Removes \Deleted messages (all, or those in a UID set) and reports them.
    async fn expunge<S>(&mut self, io: &mut Io<S>, uids: Option<SequenceSet>) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let updates = self.updates(true).await;
        io.queue(&updates);
        let user = self.user();
        let store = self.server.store.clone();
        let Some(selected) = self.selected() else {
            return Done::Bad("No mailbox selected".into());
        };
        if selected.read_only {
            return no(Some("READ-ONLY"), "Mailbox is read-only");
        }
        let in_set: Vec<usize> = match &uids {
            Some(set) => selected.resolve(set, true),
            None => (0..selected.messages.len()).collect(),
        };
        let doomed: Vec<usize> = in_set
            .into_iter()
            .filter(|i| selected.messages[*i].flags.contains(Flags::DELETED))
            .collect();
        if doomed.is_empty() {
            return ok("EXPUNGE completed");
        }
        let messages: Vec<MessageInfo> = doomed
            .iter()
            .map(|i| selected.messages[*i].clone())
            .collect();
        let folder = selected.folder.clone();
        let result = blocking(self.id, move || {
            let refs: Vec<&MessageInfo> = messages.iter().collect();
            store.remove(&user, &folder, &refs)
        })
        .await;
        if let Err(err) = result {
            return store_failure(&err);
        }
        let report = self.report();
        let Some(selected) = self.selected() else {
            return Done::Bad("No mailbox selected".into());
        };
        let out = selected.expunged(doomed, report);
        io.queue(&out);
        ok("EXPUNGE completed")
    }

    /// What a SEARCH, SORT or THREAD looks through: the selected folder as this session sees
    /// it, ready to be moved to a blocking thread.
    fn search_scope(&mut self) -> Option<SearchScope> {
        let user = self.user();
        let store = self.server.store.clone();
        let rev2 = self.rev2;
        let selected = self.selected()?;
        Some(SearchScope {
            user,
            store,
            folder: selected.folder.clone(),
            messages: selected.messages.clone(),
            keywords: selected.keywords.clone(),
            recent: if rev2 {
                Default::default()
            } else {
                selected.recent.clone()
            },
        })
    }

    /// SORT (RFC 5256 §3): the messages a search finds, in the order the criteria give.
    async fn sort<S>(
        &mut self,
        io: &mut Io<S>,
        tag: &str,
        criteria: Vec<imap_codec::imap_types::extensions::sort::SortCriterion>,
        key: SearchKey<'static>,
        uid: bool,
        extended: &Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(scope) = self.search_scope() else {
            return Done::Bad("No mailbox selected".into());
        };
        let sorted = blocking(self.id, move || {
            let mut fields = scope.fields(&key);
            super::sort::sort(&mut fields, &criteria);
            Ok(fields)
        })
        .await;
        let sorted = match sorted {
            Ok(sorted) => sorted,
            Err(err) => return store_failure(&err),
        };
        let numbers: Vec<u32> = sorted
            .iter()
            .map(|f| if uid { f.uid } else { f.seq })
            .collect();
        let mut out = Vec::new();
        match &extended.search_return {
            // RFC 5267 §3.2 ESORT: MIN and MAX are the first and last in sort order, ALL the
            // numbers in sort order.
            Some(options) => {
                out.extend_from_slice(b"* ESEARCH (TAG ");
                codec::string(&mut out, tag.as_bytes());
                out.push(b')');
                if uid {
                    out.extend_from_slice(b" UID");
                }
                let all = options.is_empty() || options.iter().any(|o| o == "ALL");
                for option in options {
                    match (option.as_str(), numbers.first(), numbers.last()) {
                        ("MIN", Some(first), _) => {
                            out.extend_from_slice(format!(" MIN {first}").as_bytes())
                        }
                        ("MAX", _, Some(last)) => {
                            out.extend_from_slice(format!(" MAX {last}").as_bytes())
                        }
                        ("COUNT", _, _) => {
                            out.extend_from_slice(format!(" COUNT {}", numbers.len()).as_bytes())
                        }
                        _ => {}
                    }
                }
                if all && !numbers.is_empty() {
                    out.extend_from_slice(format!(" ALL {}", ordered_set(&numbers)).as_bytes());
                }
            }
            None => {
                out.extend_from_slice(b"* SORT");
                for n in &numbers {
                    out.extend_from_slice(format!(" {n}").as_bytes());
                }
            }
        }
        out.extend_from_slice(b"\r\n");
        io.queue(&out);
        ok("SORT completed")
    }

    /// THREAD (RFC 5256 §3) with ORDEREDSUBJECT or REFERENCES.
    async fn thread<S>(
        &mut self,
        io: &mut Io<S>,
        references: bool,
        key: SearchKey<'static>,
        uid: bool,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(scope) = self.search_scope() else {
            return Done::Bad("No mailbox selected".into());
        };
        let rendered = blocking(self.id, move || {
            let fields = scope.fields(&key);
            let threads = if references {
                super::thread::references(&fields)
            } else {
                super::thread::ordered_subject(&fields)
            };
            let mut out = b"* THREAD ".to_vec();
            super::thread::render(&mut out, &threads, &|m| {
                if uid {
                    fields[m].uid
                } else {
                    fields[m].seq
                }
            });
            out.extend_from_slice(b"\r\n");
            Ok(out)
        })
        .await;
        match rendered {
            Ok(out) => {
                io.queue(&out);
                ok("THREAD completed")
            }
            Err(err) => store_failure(&err),
        }
    }

    async fn search<S>(
        &mut self,
        io: &mut Io<S>,
        tag: &str,
        key: SearchKey<'static>,
        uid: bool,
        extended: &Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(scope) = self.search_scope() else {
            return Done::Bad("No mailbox selected".into());
        };
        let by_modseq = search::uses_modseq(&key);
        if by_modseq {
            self.enable_condstore(io);
        }
        let found = blocking(self.id, move || {
            Ok(scope
                .matching(&key)
                .into_iter()
                .map(|i| {
                    let info = &scope.messages[i];
                    (if uid { info.uid } else { i as u32 + 1 }, info.modseq)
                })
                .collect::<Vec<_>>())
        })
        .await;
        let found = match found {
            Ok(found) => found,
            Err(err) => return store_failure(&err),
        };
        let returns = match &extended.search_return {
            Some(options) => Some(options.clone()),
            None if self.rev2 => Some(vec!["ALL".into()]),
            None => None,
        };
        // RFC 7162 §3.1.5: a search by MODSEQ tells the highest mod-sequence of what it returns:
        // of the MIN and MAX messages when only those are asked for (RFC 4731 §3.2), else of
        // every message found.
        let only_ends = returns.as_ref().is_some_and(|options| {
            !options.is_empty() && options.iter().all(|o| o == "MIN" || o == "MAX")
        });
        let modseq = if !by_modseq || found.is_empty() {
            None
        } else if only_ends {
            let options = returns.as_deref().unwrap_or_default();
            let min = found.iter().min_by_key(|(n, _)| *n);
            let max = found.iter().max_by_key(|(n, _)| *n);
            [
                options.iter().any(|o| o == "MIN").then_some(min).flatten(),
                options.iter().any(|o| o == "MAX").then_some(max).flatten(),
            ]
            .into_iter()
            .flatten()
            .map(|(_, modseq)| *modseq)
            .max()
        } else {
            found.iter().map(|(_, modseq)| *modseq).max()
        };
        let found: Vec<u32> = found.into_iter().map(|(n, _)| n).collect();
        let mut out = Vec::new();
        match returns {
            None => {
                out.extend_from_slice(b"* SEARCH");
                for n in &found {
                    out.extend_from_slice(format!(" {n}").as_bytes());
                }
                if let Some(modseq) = modseq {
                    out.extend_from_slice(format!(" (MODSEQ {modseq})").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
            Some(mut options) => {
                if options.is_empty() {
                    options.push("ALL".into());
                }
                out.extend_from_slice(b"* ESEARCH (TAG ");
                codec::string(&mut out, tag.as_bytes());
                out.push(b')');
                if uid {
                    out.extend_from_slice(b" UID");
                }
                for option in &options {
                    match option.as_str() {
                        "MIN" if !found.is_empty() => out.extend_from_slice(
                            format!(" MIN {}", found.iter().min().unwrap_or(&0)).as_bytes(),
                        ),
                        "MAX" if !found.is_empty() => out.extend_from_slice(
                            format!(" MAX {}", found.iter().max().unwrap_or(&0)).as_bytes(),
                        ),
                        "COUNT" => {
                            out.extend_from_slice(format!(" COUNT {}", found.len()).as_bytes())
                        }
                        "ALL" if !found.is_empty() => out.extend_from_slice(
                            format!(" ALL {}", uid_set(found.clone())).as_bytes(),
                        ),
                        _ => {}
                    }
                }
                if let Some(modseq) = modseq {
                    out.extend_from_slice(format!(" MODSEQ {modseq}").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        io.queue(&out);
        ok("SEARCH completed")
    }

    #[allow(clippy::too_many_lines)]
    async fn fetch<S>(
        &mut self,
        io: &mut Io<S>,
        set: &SequenceSet,
        items: MacroOrMessageDataItemNames<'static>,
        uid: bool,
        modifiers: Vec<FetchModifier>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
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
            self.enable_condstore(io);
        }
        let condstore = self.condstore;
        let user = self.user();
        let store = self.server.store.clone();
        let rev2 = self.rev2;
        let Some(selected) = self.selected() else {
            return Done::Bad("No mailbox selected".into());
        };
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
        let keywords = Arc::new(selected.keywords.clone());
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
                    Some("LIMIT"),
                    "Server memory for messages in flight is exhausted, try again later",
                );
            };
            let mut batch = targets[start..end].to_vec();
            let (store, user, folder, items, keywords, recent) = (
                store.clone(),
                user.clone(),
                folder.clone(),
                items.clone(),
                keywords.clone(),
                recent.clone(),
            );
            let rendered = blocking(self.id, move || {
                // The implicit \Seen is stored first, so the FETCH can tell its mod-sequence.
                let mut seen = Vec::new();
                if marks_seen {
                    let unseen: Vec<&MessageInfo> = batch
                        .iter()
                        .map(|(_, info)| info)
                        .filter(|info| !info.flags.contains(Flags::SEEN))
                        .collect();
                    if !unseen.is_empty() {
                        let change = FlagChange::Add(Flags::SEEN);
                        let outcome = store.change_flags(&user, &folder, &unseen, change, None)?;
                        seen = outcome.updated;
                    }
                }
                let mut out = Vec::new();
                for (index, info) in &mut batch {
                    let now = seen.iter().find(|(uid, _, _)| *uid == info.uid);
                    if let Some((_, flags, modseq)) = now {
                        info.flags = *flags;
                        info.modseq = *modseq;
                    }
                    let shown = Shown {
                        keywords: &keywords,
                        flags_changed: now.is_some(),
                        condstore,
                        recent: recent.contains(&info.uid),
                    };
                    match render(
                        &mut out, &*store, &user, &folder, *index, info, &items, &shown,
                    ) {
                        Ok(()) => {}
                        Err(StoreError::Gone(_)) => continue,
                        Err(err) => return Err(err),
                    }
                }
                Ok((out, seen))
            })
            .await;
            let (out, seen) = match rendered {
                Ok(rendered) => rendered,
                Err(err) => return store_failure(&err),
            };
            if let Some(selected) = self.selected() {
                for (uid, flags, modseq) in seen {
                    if let Ok(at) = selected.messages.binary_search_by_key(&uid, |m| m.uid) {
                        selected.messages[at].flags = flags;
                        selected.messages[at].modseq = modseq;
                    }
                }
            }
            io.queue(&out);
            if io.flush().await.is_err() {
                return Done::Close;
            }
        }
        ok("FETCH completed")
    }

    async fn store<S>(
        &mut self,
        io: &mut Io<S>,
        set: &SequenceSet,
        request: StoreRequest<'_>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if request.unchanged_since.is_some() {
            self.enable_condstore(io);
        }
        let report = self.report();
        let user = self.user();
        let store = self.server.store.clone();
        let Some(selected) = self.selected() else {
            return Done::Bad("No mailbox selected".into());
        };
        if selected.read_only {
            return no(Some("READ-ONLY"), "Mailbox is read-only");
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
        let result = blocking(self.id, move || {
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
        let Some(selected) = self.selected() else {
            return Done::Bad("No mailbox selected".into());
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
                Some(format!("MODIFIED {}", uid_set(modified))),
                "Conditional STORE failed for some messages".into(),
            )
        }
    }

    async fn copy<S>(
        &mut self,
        io: &mut Io<S>,
        set: &SequenceSet,
        mailbox: &Mailbox<'_>,
        uid: bool,
        moving: bool,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let target = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        let user = self.user();
        let store = self.server.store.clone();
        let Some(selected) = self.selected() else {
            return Done::Bad("No mailbox selected".into());
        };
        if moving && selected.read_only {
            return no(Some("READ-ONLY"), "Mailbox is read-only");
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
        let result = blocking(self.id, move || {
            let refs: Vec<&MessageInfo> = messages.iter().collect();
            let copied = store.copy(&user, &folder, &refs, &target)?;
            if moving {
                store.remove(&user, &folder, &refs)?;
            }
            Ok(copied)
        })
        .await;
        let (validity, pairs) = match result {
            Ok(copied) => copied,
            Err(StoreError::NoSuchFolder(_)) => return no(Some("TRYCREATE"), "No such mailbox"),
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
            Some(format!("COPYUID {validity} {from} {to}"))
        };
        if !moving {
            return Done::Ok(code, "COPY completed".into());
        }
        if let Some(code) = &code {
            io.queue(format!("* OK [{code}] Moved\r\n").as_bytes());
        }
        let report = self.report();
        let Some(selected) = self.selected() else {
            return Done::Bad("No mailbox selected".into());
        };
        let out = selected.expunged(indexes, report);
        io.queue(&out);
        ok("MOVE completed")
    }
}

/// A STORE command's arguments.
struct StoreRequest<'a> {
    kind: StoreType,
    response: StoreResponse,
    flags: &'a [Flag<'a>],
    uid: bool,
    /// RFC 7162 UNCHANGEDSINCE.
    unchanged_since: Option<u64>,
}

/// How a FETCH shows what the listing does not say by itself.
struct Shown<'a> {
    /// The folder's keyword table.
    keywords: &'a [String],
    /// This FETCH set \Seen: FLAGS goes out even if not asked for.
    flags_changed: bool,
    condstore: bool,
    /// The message is \Recent in this session.
    recent: bool,
}

/// Renders one `* n FETCH (...)` response.
#[allow(clippy::too_many_arguments)]
fn render(
    out: &mut Vec<u8>,
    store: &dyn MailStore,
    user: &str,
    folder: &str,
    index: usize,
    info: &MessageInfo,
    items: &[MessageDataItemName<'_>],
    shown: &Shown<'_>,
) -> Result<(), StoreError> {
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
    // ENVELOPE and header sections need only the header, which the store may have at hand.
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
    let raw: Option<std::borrow::Cow<'_, [u8]>> = match (needs_message, header_only) {
        (false, _) => None,
        (true, true) => Some(store.read_header(user, folder, info)?.to_vec().into()),
        (true, false) => Some(store.read(user, folder, info)?.into()),
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
                fetch::flags(out, info.flags, shown.keywords, shown.recent);
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
        fetch::flags(out, info.flags, shown.keywords, shown.recent);
    }
    // RFC 7162 §3.2.4: under CONDSTORE a flag change is told with its mod-sequence.
    if shown.flags_changed && shown.condstore && !modseq_sent {
        sep(out);
        out.extend_from_slice(format!("MODSEQ ({})", info.modseq).as_bytes());
    }
    out.extend_from_slice(b")\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_wildcards() {
        assert!(list_match("*", "Sent/2024"));
        assert!(list_match("%", "Sent"));
        assert!(!list_match("%", "Sent/2024"));
        assert!(list_match("Sent/%", "Sent/2024"));
        assert!(list_match("inbox", "INBOX"));
        assert!(list_match("S*4", "Sent/2024"));
        assert!(!list_match("Drafts", "Sent"));
        assert!(list_match("%/%", "Sent/2024"));
        assert!(!list_match("%/%", "Sent/2024/01"));
        assert!(list_match("*%*", ""));
        assert!(list_match("S%t", "Sent"));
        assert!(!list_match("S%t", "S/t"));
        assert!(list_match("a**b*%c", "axxbyc"));
        assert!(!list_match("ab", "a"));
        assert!(!list_match("a", "ab"));
        // What took a backtracking matcher forever (2,000 stars) is pattern × name steps.
        let stars = "*".repeat(2000) + "x";
        assert!(!list_match(&stars, &"a".repeat(1000)));
        assert!(list_match(&stars, &("a".repeat(1000) + "x")));
    }
}
