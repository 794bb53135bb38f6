//! One IMAP session: the state machine of RFC 9051 §3 driven by one async loop (read a command,
//! act on the store, answer). Responses are flushed only when no complete command is waiting,
//! so pipelined commands cost one write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use imap_codec::imap_types::command::{Command, CommandBody, StoreModifier};
use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::status::StatusDataItemName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use super::cmd::*;
use super::code::Code;
use super::codec::{self, Event, Extended, Mode, Reader, Refusal};
use super::selected::{Report, Selected};
use super::ImapServer;
use crate::config::{ListenerConfig, TlsMode};
use crate::store::watched::Change;
use crate::store::{Flags, MailStore, MessageInfo, StoreError};
use crate::stream::{Io, ReadError};

/// RFC 9051 §3: each state holds what it needs — after login the user's mailbox key, once a
/// folder is selected the session's view of it too.
pub(in crate::imap) enum State {
    NotAuthenticated,
    Authenticated { user: String },
    Selected { user: String, selected: Selected },
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
        StoreError::Gone(_) => no(Some(Code::ExpungeIssued), "Message was expunged"),
        StoreError::TooManyKeywords(_) => no(Some(Code::Limit), "No room for another keyword"),
        StoreError::Io(_) => no(Some(Code::ServerBug), "Internal error, try again later"),
    }
}

pub struct Session {
    pub(in crate::imap) id: u64,
    pub(in crate::imap) server: Arc<ImapServer>,
    pub(in crate::imap) listener: Arc<ListenerConfig>,
    pub(in crate::imap) peer: SocketAddr,
    pub(in crate::imap) tls: bool,
    pub(in crate::imap) state: State,
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
    /// A change to the user's mailbox was announced since the last look.
    pub(in crate::imap) dirty: bool,
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

/// Runs store work on a blocking thread.
/// Runs store work off the async threads, as session `writer` (see `watched::writing_as`).
pub(in crate::imap) async fn blocking<T, F>(writer: u64, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || crate::store::watched::writing_as(writer, work))
        .await
        .unwrap_or_else(|_| Err(StoreError::Io(std::io::Error::other("store task failed"))))
}

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
        // Until login, literals are capped at a few KiB (see `PREAUTH_LITERAL_LIMIT`).
        let reader = Reader::new(codec::PREAUTH_LITERAL_LIMIT);
        Session {
            id: crate::stream::next_session_id(),
            server,
            listener,
            peer,
            tls: false,
            state: State::NotAuthenticated,
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

    pub(in crate::imap) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.server.config.imap.idle_timeout_secs)
    }

    /// The largest literal this session takes now: a few KiB before login, APPENDLIMIT after.
    pub(in crate::imap) fn literal_limit(&self) -> u32 {
        match self.state {
            State::NotAuthenticated => codec::PREAUTH_LITERAL_LIMIT,
            _ => self.server.config.imap.append_limit,
        }
    }

    pub(in crate::imap) fn plaintext_allowed(&self) -> bool {
        self.tls || self.listener.trusted
    }

    pub(in crate::imap) async fn serve<S>(mut self, stream: S)
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
                    let done = self.dispatch(&mut io, *command, extended).await;
                    (Some(tag), done)
                }
            };
            match done {
                Done::Close => break,
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

    /// Notes announcements about this user's mailbox.
    pub(in crate::imap) fn drain_changes(&mut self) {
        let (State::Authenticated { user } | State::Selected { user, .. }) = &self.state else {
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
    pub(in crate::imap) async fn updates(&mut self, expunge_allowed: bool) -> Vec<u8> {
        self.drain_changes();
        if !self.dirty {
            return Vec::new();
        }
        let State::Selected { user, selected } = &self.state else {
            return Vec::new();
        };
        let (user, folder, read_only) = (user.clone(), selected.folder.clone(), selected.read_only);
        let store = self.server.store.clone();
        let recent = self.recent_mode(read_only);
        let snapshot = blocking(self.id, move || {
            let snapshot = store.snapshot(&user, &folder)?;
            let boundary = recent.boundary(&*store, &user, &folder, &snapshot)?;
            Ok((snapshot, boundary))
        })
        .await;
        let report = self.report();
        let State::Selected { selected, .. } = &mut self.state else {
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

    pub(in crate::imap) async fn dispatch<S>(
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
                    return no(Some(Code::PrivacyRequired), "Use STARTTLS first");
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

    /// Leaves the Selected state for Authenticated (CLOSE, UNSELECT, a new SELECT).
    pub(in crate::imap) fn deselect(&mut self) {
        if !matches!(self.state, State::Selected { .. }) {
            return;
        }
        if let State::Selected { user, .. } =
            std::mem::replace(&mut self.state, State::NotAuthenticated)
        {
            self.state = State::Authenticated { user };
        }
    }

    pub(in crate::imap) fn user(&self) -> String {
        match &self.state {
            State::Authenticated { user } | State::Selected { user, .. } => user.clone(),
            State::NotAuthenticated => String::new(),
        }
    }

    pub(in crate::imap) fn selected(&mut self) -> Option<&mut Selected> {
        match &mut self.state {
            State::Selected { selected, .. } => Some(selected),
            _ => None,
        }
    }

    pub(in crate::imap) async fn authenticated<S>(
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
                    return no(Some(Code::CompressionActive), "DEFLATE is already active");
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
                    return no(Some(Code::AlreadyExists), "INBOX always exists");
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
                    return no(Some(Code::Cannot), "INBOX cannot be deleted");
                }
                let (store, user) = (self.server.store.clone(), self.user());
                let folder = name.clone();
                match blocking(self.id, move || store.delete_folder(&user, &folder)).await {
                    Ok(()) => {
                        if self.selected().is_some_and(|s| s.folder == name) {
                            self.deselect();
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
                let mut messages = vec![AppendMessage {
                    flags,
                    date,
                    message,
                }];
                // RFC 3502: the other messages of a MULTIAPPEND, for the same mailbox.
                for more in extended.appends {
                    match more.body {
                        CommandBody::Append {
                            mailbox: other,
                            flags,
                            date,
                            message,
                        } if other == mailbox => messages.push(AppendMessage {
                            flags,
                            date,
                            message,
                        }),
                        _ => return Done::Bad("MULTIAPPEND to one mailbox only".into()),
                    }
                }
                self.append(&mailbox, messages).await
            }
            CommandBody::Idle => self.idle(io).await,
            _ if self.selected().is_none() => Done::Bad("No mailbox selected".into()),
            body => self.in_selected(io, tag, body, extended).await,
        }
    }

    pub(in crate::imap) async fn in_selected<S>(
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
                self.deselect();
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
                self.deselect();
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
}
