//! One IMAP session: the state machine of RFC 9051 §3 driven by one async loop (read a command,
//! act on the store, answer). Responses are flushed only when no complete command is waiting,
//! so pipelined commands cost one write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use imap_codec::imap_types::mailbox::Mailbox;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use super::code::Code;
use super::codec::{self, Event, Mode, Reader, Refusal};
use super::selected::{Report, Selected};
use super::ImapServer;
use crate::config::{ListenerConfig, TlsMode};
use crate::serve::{Farewell, Flow};
use crate::store::watched::Change;
use crate::store::{MailStore, StoreError};
use crate::stream::{Io, ReadError};

/// RFC 9051 §3: each state holds what it needs. Authenticated and Selected share the user's
/// mailbox key, so they are one variant: `selected: None` is the Authenticated state, `Some` the
/// Selected state with the session's view of its folder. (Logout is the end of `serve`.)
/// One per session, so the size of the Selected view inline costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(in crate::imap) enum State {
    NotAuthenticated,
    LoggedIn {
        user: String,
        selected: Option<Selected>,
    },
}

/// How a command ended (its tagged response, or the end of the session).
pub(in crate::imap) enum Done {
    Ok(Option<Code>, String),
    No(Option<Code>, String),
    Bad(String),
    /// The tagged response is already queued (STARTTLS answers before its handshake).
    Sent,
    /// Nothing more to send: the connection closes.
    Close,
}

pub(in crate::imap) fn ok(text: &str) -> Done {
    Done::Ok(None, text.to_string())
}

pub(in crate::imap) fn no(code: Option<Code>, text: &str) -> Done {
    Done::No(code, text.to_string())
}

/// The store's refusal in IMAP terms (RFC 5530 response codes).
pub(in crate::imap) fn store_failure(err: &StoreError) -> Done {
    match err {
        StoreError::NoSuchFolder(_) => no(Some(Code::Nonexistent), "No such mailbox"),
        StoreError::Exists(_) => no(Some(Code::AlreadyExists), "Mailbox already exists"),
        StoreError::InvalidName(_) => no(Some(Code::Cannot), "Invalid mailbox name"),
        StoreError::Full(_) => no(Some(Code::OverQuota), "Mail storage is full"),
        StoreError::OverQuota(_) => no(Some(Code::OverQuota), "Quota exceeded"),
        StoreError::Gone(_) => no(Some(Code::ExpungeIssued), "Message was expunged"),
        StoreError::TooManyKeywords(_) => no(Some(Code::Limit), "No room for another keyword"),
        StoreError::Io(_) => no(Some(Code::ServerBug), "Internal error, try again later"),
        StoreError::Unavailable { .. } => no(
            Some(Code::Unavailable),
            "Mail storage is unavailable, try again later",
        ),
    }
}

/// A session: its connection and its protocol state, kept apart so a handler can borrow the
/// state's parts (the user, the selected folder) beside the connection.
pub struct Session {
    conn: Conn,
    state: State,
}

impl Session {
    /// Unique per server run, across SMTP, POP3 and IMAP (logs, `postern who`).
    pub fn id(&self) -> u64 {
        self.conn.id
    }
}

/// Everything of a session but its protocol state.
pub(in crate::imap) struct Conn {
    pub(in crate::imap) id: u64,
    pub(in crate::imap) server: Arc<ImapServer>,
    /// The store as this session writes to it: its changes are announced as this session's
    /// (`Watched::as_writer`), so it skips them when it hears them.
    pub(in crate::imap) store: Arc<dyn MailStore>,
    pub(in crate::imap) listener: Arc<ListenerConfig>,
    pub(in crate::imap) peer: SocketAddr,
    pub(in crate::imap) tls: bool,
    /// ENABLE IMAP4rev2 was given: SEARCH answers in ESEARCH form, no RECENT.
    pub(in crate::imap) rev2: bool,
    /// RFC 7162: CONDSTORE was enabled (explicitly or by a command that uses it).
    pub(in crate::imap) condstore: bool,
    /// RFC 7162: ENABLE QRESYNC was given.
    pub(in crate::imap) qresync: bool,
    pub(in crate::imap) errors: u32,
    pub(in crate::imap) auth_failures: u32,
    pub(in crate::imap) reader: Reader,
    pub(in crate::imap) changes: broadcast::Receiver<Change>,
    /// Users who may no longer log in (`UserDirectory::revocations`): this session ends when
    /// its user is one.
    pub(in crate::imap) revoked: broadcast::Receiver<crate::auth::Revocation>,
    /// A change to the user's mailbox was announced since the last look.
    pub(in crate::imap) dirty: bool,
    /// RFC 5465: what NOTIFY SET asked for.
    pub(in crate::imap) notify: Option<super::cmd::notify::Notify>,
}

/// Reads until the reader has an event, sending queued responses before waiting.
pub(in crate::imap) async fn read_event<S>(
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

/// Runs store work off the async threads.
pub(in crate::imap) async fn blocking<T, F>(work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|_| Err(store_task_failed()))
}

fn store_task_failed() -> StoreError {
    StoreError::Io(std::io::Error::other("store task failed"))
}

/// Store work that only reads, small enough for the async thread (see [`Conn::short_read`]),
/// runs there; the rest goes to a blocking thread like any other store call.
pub(in crate::imap) async fn reading<T, F>(short: bool, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    if short {
        // As on a blocking thread, a panic in store code fails the command, not the session.
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|_| Err(store_task_failed()));
    }
    blocking(work).await
}

/// Bounds of a read short enough to run on the async thread (see [`Conn::short_read`]): a
/// listing of this many messages, this many message files opened, this many bytes read. Each
/// is well under a millisecond from the page cache.
const SHORT_LISTING: usize = 2_000;
const SHORT_FILES: usize = 200;
const SHORT_BYTES: u64 = 1 << 20;

/// A mailbox name as the store knows it: `/`-separated, INBOX in upper case.
pub(in crate::imap) fn folder_name(mailbox: &Mailbox<'_>) -> Result<String, Done> {
    match mailbox {
        Mailbox::Inbox => Ok("INBOX".into()),
        Mailbox::Other(other) => {
            let name = std::str::from_utf8(other.as_ref())
                .map_err(|_| no(Some(Code::Cannot), "Mailbox names must be UTF-8"))?;
            let name = name.trim_end_matches('/');
            if name.eq_ignore_ascii_case("INBOX") {
                return Ok("INBOX".into());
            }
            if !crate::store::valid_folder_name(name) {
                return Err(no(Some(Code::Cannot), "Invalid mailbox name"));
            }
            Ok(name.to_string())
        }
    }
}

/// Whether a change to `user`'s mailbox was made by another writer than session `me`. (The
/// announcement carries the mailbox lower-cased.)
pub(in crate::imap) fn by_another(change: &Change, me: u64, user: &str) -> bool {
    change.writer != me
        && (change.mailbox.eq_ignore_ascii_case(user)
            || &*change.mailbox == crate::store::watched::ANY_MAILBOX)
}

/// Whether another writer's change may alter the view of `selected` of `user`: one to its
/// messages, or to the folder list (the folder may be gone). Our own writes are in our view
/// already (APPEND and COPY into the selected folder mark it dirty).
pub(in crate::imap) fn concerns(
    change: &Change,
    me: u64,
    user: &str,
    selected: Option<&str>,
) -> bool {
    by_another(change, me, user)
        && selected.is_some_and(|folder| change.folder.as_deref().is_none_or(|f| f == folder))
}

/// How a session takes part in \Recent (RFC 3501 §2.3.2) when it opens or re-reads a folder.
#[derive(Clone, Copy)]
pub(in crate::imap) enum RecentMode {
    /// IMAP4rev2 (no \Recent at all).
    None,
    /// Read-only (EXAMINE): sees what no session claimed, claims nothing.
    Look,
    /// Read-write: claims what it is the first to see.
    Claim,
}

impl RecentMode {
    /// The boundary above which the snapshot's messages are \Recent for this session.
    pub(in crate::imap) fn boundary(
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

impl Session {
    pub fn new(
        server: Arc<ImapServer>,
        listener: Arc<ListenerConfig>,
        peer: SocketAddr,
    ) -> Session {
        let changes = server.watched.subscribe();
        let revoked = server.users.revocations();
        // Until login, literals are capped at a few KiB (see `PREAUTH_LITERAL_LIMIT`).
        let reader = Reader::new(codec::PREAUTH_LITERAL_LIMIT);
        let id = crate::stream::next_session_id();
        let conn = Conn {
            id,
            store: Arc::new(server.watched.as_writer(id)),
            server,
            listener,
            peer,
            tls: false,
            rev2: false,
            condstore: false,
            qresync: false,
            errors: 0,
            auth_failures: 0,
            reader,
            changes,
            revoked,
            dirty: false,
            notify: None,
        };
        Session {
            conn,
            state: State::NotAuthenticated,
        }
    }

    pub async fn run<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let conn = &self.conn;
        let span = tracing::info_span!("imap", session = conn.id, peer = %conn.peer, listener = %conn.listener.name);
        self.serve(stream).instrument(span).await
    }

    async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let timeout = self.conn.idle_timeout();
        crate::serve::serve(self, stream, timeout).await
    }
}

/// What the serve loop hands a session: a decoded input, or (under NOTIFY) a change to tell.
pub enum Input {
    Event(Event),
    Change(Result<Change, broadcast::error::RecvError>),
    /// A user lost the right to log in.
    Revoked(crate::auth::Revocation),
}

impl crate::serve::Protocol for Session {
    type Input = Input;

    fn tls_mode(&self) -> TlsMode {
        self.conn.listener.tls
    }

    fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.conn.server.tls.clone()
    }

    fn tls_started(&mut self, _info: crate::stream::TlsInfo) {
        self.conn.tls = true;
    }

    fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.conn.server.shutdown.clone()
    }

    fn errors(&self) -> (u32, u32) {
        (self.conn.errors, self.conn.server.config.limits.max_errors)
    }

    async fn greet<S>(&mut self, io: &mut Io<S>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let capabilities = self.conn.capabilities(&self.state);
        let greeting = format!("[CAPABILITY {capabilities}] Postern IMAP ready");
        io.queue(&codec::status(None, "OK", None, &greeting));
        Flow::Continue
    }

    async fn next_input<S>(&mut self, io: &mut Io<S>) -> Result<Input, ReadError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let conn = &mut self.conn;
        let deadline = Instant::now() + conn.idle_timeout();
        // Under NOTIFY (RFC 5465) changes are told between commands too.
        let listening = conn.notify.is_some();
        tokio::select! {
            event = read_event(&mut conn.reader, io, Mode::Command, deadline) => event.map(Input::Event),
            change = conn.changes.recv(), if listening => Ok(Input::Change(change)),
            Ok(user) = conn.revoked.recv() => Ok(Input::Revoked(user)),
        }
    }

    async fn handle<S>(&mut self, io: &mut Io<S>, input: Input) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Session { conn, state } = self;
        let event = match input {
            Input::Event(event) => event,
            Input::Revoked(revoked) => {
                if matches!(&*state, State::LoggedIn { user, .. } if user.eq_ignore_ascii_case(&revoked.user))
                {
                    info!(user = %revoked.user, why = ?revoked.why, "login revoked; closing the session");
                    io.queue(format!("* BYE {}\r\n", revoked.why.text()).as_bytes());
                    return Flow::Close;
                }
                return Flow::Continue;
            }
            Input::Change(Err(broadcast::error::RecvError::Closed)) => return Flow::Close,
            Input::Change(change) => {
                if let (Ok(change), State::LoggedIn { user, .. }) = (&change, &*state) {
                    if by_another(change, conn.id, user) {
                        conn.note(change);
                    }
                } else if let Some(notify) = &mut conn.notify {
                    notify.lagged();
                }
                conn.notifications(io, state, true).await;
                return Flow::Continue;
            }
        };
        let (tag, done) = match event {
            Event::LiteralWanted => {
                io.queue(b"+ Ready for literal data\r\n");
                return Flow::Continue;
            }
            Event::LiteralRefused {
                tag,
                length,
                why: Refusal::TooBig,
            } => {
                let limit = conn.literal_limit(state);
                let text = format!("Literal of {length} octets is over the limit of {limit}");
                (tag, no(Some(Code::TooBig), &text))
            }
            Event::LiteralRefused {
                tag,
                why: Refusal::NoMemory,
                ..
            } => {
                warn!("literal refused: the memory budget is exhausted");
                let text = "Server memory for messages in flight is exhausted, try again later";
                (tag, no(Some(Code::Limit), text))
            }
            Event::TooLong { tag } => (tag, no(Some(Code::TooBig), "Command too long")),
            Event::Bad { tag, text } => (tag, Done::Bad(text)),
            Event::Line(_) => (None, Done::Bad("Unexpected line".into())),
            Event::Command { command, extended } => {
                let tag = command.tag.as_ref().to_string();
                let done = conn.dispatch(io, state, *command, *extended).await;
                (Some(tag), done)
            }
        };
        match done {
            Done::Close => return Flow::Close,
            Done::Sent => {}
            Done::Ok(code, text) => io.queue(&codec::status(
                tag.as_deref(),
                "OK",
                code.map(|c| c.to_string()).as_deref(),
                &text,
            )),
            Done::No(code, text) => io.queue(&codec::status(
                tag.as_deref(),
                "NO",
                code.map(|c| c.to_string()).as_deref(),
                &text,
            )),
            Done::Bad(text) => {
                conn.errors += 1;
                io.queue(&codec::status(tag.as_deref(), "BAD", None, &text));
            }
        }
        Flow::Continue
    }

    fn farewell(&self, why: Farewell) -> Vec<u8> {
        match why {
            Farewell::ShuttingDown => b"* BYE Server shutting down\r\n".to_vec(),
            Farewell::IdleTimeout => b"* BYE Autologout: idle for too long\r\n".to_vec(),
            Farewell::TooManyErrors => b"* BYE Too many errors, closing\r\n".to_vec(),
        }
    }
}

impl Conn {
    pub(in crate::imap) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.server.config.imap.idle_timeout_secs)
    }

    /// The largest literal this session takes now: a few KiB before login, APPENDLIMIT after.
    pub(in crate::imap) fn literal_limit(&self, state: &State) -> u32 {
        match state {
            State::NotAuthenticated => codec::PREAUTH_LITERAL_LIMIT,
            State::LoggedIn { .. } => self.server.config.imap.append_limit,
        }
    }

    pub(in crate::imap) fn plaintext_allowed(&self) -> bool {
        self.tls || self.listener.trusted
    }

    pub(in crate::imap) fn recent_mode(&self, read_only: bool) -> RecentMode {
        match (self.rev2, read_only) {
            (true, _) => RecentMode::None,
            (false, true) => RecentMode::Look,
            (false, false) => RecentMode::Claim,
        }
    }

    pub(in crate::imap) fn report(&self) -> Report {
        Report {
            condstore: self.condstore,
            qresync: self.qresync,
            recent: !self.rev2,
        }
    }

    /// Notes announcements about this user's mailbox that concern the selected folder (`None`:
    /// nothing selected, so only the backlog is cleared).
    pub(in crate::imap) fn drain_changes(&mut self, user: &str, selected: Option<&str>) {
        loop {
            match self.changes.try_recv() {
                Ok(change) => {
                    if concerns(&change, self.id, user, selected) {
                        self.dirty = true;
                    }
                    if by_another(&change, self.id, user) {
                        self.note(&change);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.dirty = true;
                    if let Some(notify) = &mut self.notify {
                        notify.lagged();
                    }
                }
                Err(_) => break,
            }
        }
    }

    /// Whether a read from this user's store is short enough for the async thread: the store's
    /// reads are local (`MailStore::reads_inline`: files, not a database or a plugin) and the
    /// work is small: a listing of `listed` messages, `files` message files opened, `bytes`
    /// read. Handing a command's store call to a blocking thread and back costs two thread
    /// switches, which were the largest single cost of a small IMAP command under load (a
    /// sixth of the server's CPU); work that scales with a large folder, and every change
    /// (which waits for the disk's flush), goes to a blocking thread all the same.
    pub(in crate::imap) fn short_read(
        &self,
        user: &str,
        listed: usize,
        files: usize,
        bytes: u64,
    ) -> bool {
        listed <= SHORT_LISTING
            && files <= SHORT_FILES
            && bytes <= SHORT_BYTES
            && self.store.reads_inline(user)
    }

    /// Brings the client up to date on the selected folder, when something changed.
    /// (`concerns` decides what counts.)
    pub(in crate::imap) async fn updates(
        &mut self,
        user: &str,
        selected: &mut Selected,
        expunge_allowed: bool,
    ) -> Vec<u8> {
        self.drain_changes(user, Some(&selected.folder));
        if !self.dirty {
            return Vec::new();
        }
        let (user, folder, read_only) = (
            user.to_string(),
            selected.folder.clone(),
            selected.read_only,
        );
        let store = self.store.clone();
        let recent = self.recent_mode(read_only);
        let short = self.short_read(&user, selected.messages.len(), 0, 0);
        let snapshot = reading(short, move || {
            let snapshot = store.snapshot(&user, &folder)?;
            let boundary = recent.boundary(&*store, &user, &folder, &snapshot)?;
            Ok((snapshot, boundary))
        })
        .await;
        match snapshot {
            Ok((snapshot, boundary)) => {
                // Only a complete report clears the flag; one that had to hold back EXPUNGEs
                // leaves it for the next command.
                if expunge_allowed {
                    self.dirty = false;
                }
                selected.refresh(snapshot, expunge_allowed, self.report(), boundary)
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
}
