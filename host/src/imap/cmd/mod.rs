//! The IMAP verbs, one file per group, and the table that says which state allows which
//! command (`Conn::dispatch`, below):
//!
//! | file | verbs |
//! | --- | --- |
//! | `info` | CAPABILITY, NOOP, LOGOUT, ID, ENABLE, NAMESPACE |
//! | `auth` | STARTTLS, AUTHENTICATE, LOGIN, COMPRESS |
//! | `folders` | CREATE, DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB, STATUS |
//! | `select` | SELECT, EXAMINE, CLOSE, UNSELECT, EXPUNGE, UID EXPUNGE |
//! | `append` | APPEND, MULTIAPPEND |
//! | `idle` | IDLE |
//! | `metadata` | GETMETADATA, SETMETADATA |
//! | `notify` | NOTIFY |
//! | `quota` | GETQUOTA, GETQUOTAROOT, SETQUOTA |
//! | `fetch` | FETCH, UID FETCH |
//! | `search` | SEARCH, SORT, THREAD (and their UID forms) |
//! | `store` | STORE, UID STORE |
//! | `copy` | COPY, MOVE (and their UID forms) |
//!
//! Each handler takes the decoded arguments and the parts of the state it needs (the user, the
//! selected folder), calls the store on a blocking thread (`blocking`) and ends in a `Done`.

pub(in crate::imap) mod append;
pub(in crate::imap) mod auth;
pub(in crate::imap) mod copy;
pub(in crate::imap) mod fetch;
pub(in crate::imap) mod folders;
pub(in crate::imap) mod idle;
pub(in crate::imap) mod info;
pub(in crate::imap) mod metadata;
pub(in crate::imap) mod notify;
pub(in crate::imap) mod quota;
pub(in crate::imap) mod search;
pub(in crate::imap) mod select;
pub(in crate::imap) mod store;

pub(in crate::imap) use append::AppendMessage;
pub(in crate::imap) use copy::CopyRequest;
pub(in crate::imap) use fetch::FetchRequest;
pub(in crate::imap) use store::*;

use imap_codec::imap_types::command::{Command, CommandBody};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::codec::Extended;
use crate::imap::session::{no, ok, Conn, Done, State};
use crate::stream::Io;

/// The commands only the Selected state allows (RFC 9051 §6.4).
fn needs_selected(body: &CommandBody<'_>) -> bool {
    matches!(
        body,
        CommandBody::Check
            | CommandBody::Close
            | CommandBody::Unselect
            | CommandBody::Expunge
            | CommandBody::ExpungeUid { .. }
            | CommandBody::Search { .. }
            | CommandBody::Sort { .. }
            | CommandBody::Thread { .. }
            | CommandBody::Fetch { .. }
            | CommandBody::Store { .. }
            | CommandBody::Copy { .. }
            | CommandBody::Move { .. }
    )
}

impl Conn {
    /// Runs one command in the state that allows it: the match is the state table of RFC 9051
    /// §6 (any state §6.1, not authenticated §6.2, authenticated §6.3, selected §6.4). After a
    /// command in the Selected state the client hears what changed in the folder meanwhile.
    pub(in crate::imap) async fn dispatch<S>(
        &mut self,
        io: &mut Io<S>,
        state: &mut State,
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
        let moving = matches!(command.body, CommandBody::Move { .. });
        let examine = matches!(command.body, CommandBody::Examine { .. });
        use CommandBody as C;
        use State::{LoggedIn, NotAuthenticated};
        if let LoggedIn {
            selected: Some(selected),
            ..
        } = state
        {
            selected.saved_named = extended.saved_result;
        }
        let done = match (&mut *state, command.body) {
            // RFC 5267 §4.2 CANCELUPDATE (decoded as NOOP, see `codec::lift_extensions`).
            (
                LoggedIn {
                    selected: Some(selected),
                    ..
                },
                C::Noop,
            ) if extended.cancel_update.is_some() => {
                let tags = extended.cancel_update.as_deref().unwrap_or_default();
                self.cancel_update(selected, tags)
            }
            (_, C::Noop) if extended.cancel_update.is_some() => {
                Done::Bad("No mailbox selected".into())
            }
            // RFC 5465 NOTIFY (decoded as NOOP, likewise).
            (LoggedIn { user, selected }, C::Noop) if extended.notify.is_some() => {
                let request = extended.notify.as_deref().unwrap_or_default();
                self.notify(io, user, selected.as_ref(), request).await
            }
            (NotAuthenticated, C::Noop) if extended.notify.is_some() => {
                Done::Bad("Log in first".into())
            }

            // Any state.
            (state, C::Capability) => self.capability(io, state),
            (_, C::Noop) => ok("NOOP completed"),
            (_, C::Logout) => return self.logout(io, &tag),
            (_, C::Id { .. }) => self.id_command(io),

            // Not authenticated.
            (NotAuthenticated, C::StartTLS) => return self.starttls(io, &tag).await,
            (state @ NotAuthenticated, C::Login { username, password }) => {
                self.login_command(io, state, username, password).await
            }
            (
                state @ NotAuthenticated,
                C::Authenticate {
                    mechanism,
                    initial_response,
                },
            ) => {
                self.authenticate(io, state, mechanism, initial_response)
                    .await
            }
            (NotAuthenticated, _) => Done::Bad("Log in first".into()),

            // Authenticated (and so also Selected).
            (LoggedIn { .. }, C::StartTLS | C::Login { .. } | C::Authenticate { .. }) => {
                Done::Bad("Already logged in".into())
            }
            (LoggedIn { .. }, C::Compress { .. }) => return self.compress(io, &tag).await,
            (LoggedIn { selected, .. }, C::Enable { capabilities }) => {
                self.enable(io, selected.as_ref(), capabilities.as_ref())
            }
            (LoggedIn { .. }, C::Namespace) => self.namespace(io),
            (
                LoggedIn { user, selected },
                C::Select {
                    mailbox,
                    parameters,
                }
                | C::Examine {
                    mailbox,
                    parameters,
                },
            ) => {
                self.select(io, user, selected, &mailbox, examine, parameters)
                    .await
            }
            (LoggedIn { user, .. }, C::Create { mailbox }) => self.create(user, &mailbox).await,
            (LoggedIn { user, selected }, C::Delete { mailbox }) => {
                self.delete(user, selected, &mailbox).await
            }
            (LoggedIn { user, .. }, C::Rename { from, to }) => self.rename(user, &from, &to).await,
            (LoggedIn { user, .. }, C::Subscribe { mailbox }) => {
                self.subscribe(user, &mailbox, true).await
            }
            (LoggedIn { user, .. }, C::Unsubscribe { mailbox }) => {
                self.subscribe(user, &mailbox, false).await
            }
            (
                LoggedIn { user, .. },
                C::List {
                    reference,
                    mailbox_wildcard,
                },
            ) => {
                self.list(io, user, &reference, &mailbox_wildcard, &extended, false)
                    .await
            }
            (
                LoggedIn { user, .. },
                C::Lsub {
                    reference,
                    mailbox_wildcard,
                },
            ) => {
                self.list(io, user, &reference, &mailbox_wildcard, &extended, true)
                    .await
            }
            (
                LoggedIn { user, selected },
                C::Status {
                    mailbox,
                    item_names,
                },
            ) => {
                self.status(io, user, selected.as_ref(), &mailbox, item_names.as_ref())
                    .await
            }
            (
                LoggedIn { user, selected },
                C::Append {
                    mailbox,
                    flags,
                    date,
                    message,
                },
            ) => {
                let first = AppendMessage {
                    flags,
                    date,
                    message,
                };
                let (more, catenate) = (extended.appends, extended.catenate);
                self.append(user, selected.as_ref(), &mailbox, first, more, catenate)
                    .await
            }
            (LoggedIn { user, selected }, C::Idle) => self.idle(io, user, selected.as_mut()).await,
            (LoggedIn { user, .. }, C::GetQuotaRoot { mailbox }) => {
                self.get_quota_root(io, user, &mailbox).await
            }
            (LoggedIn { user, .. }, C::GetQuota { root }) => self.get_quota(io, user, &root).await,
            (
                LoggedIn { user, .. },
                C::GetMetadata {
                    options,
                    mailbox,
                    entries,
                },
            ) => {
                self.get_metadata(io, user, options, &mailbox, entries)
                    .await
            }
            (
                LoggedIn { user, .. },
                C::SetMetadata {
                    mailbox,
                    entry_values,
                },
            ) => self.set_metadata(user, &mailbox, entry_values).await,
            (LoggedIn { .. }, C::SetQuota { .. }) => no(
                Some(crate::imap::code::Code::Cannot),
                "Quotas are set in the server's configuration",
            ),

            // Selected.
            (
                LoggedIn {
                    selected: Some(_), ..
                },
                C::Check,
            ) => ok("CHECK completed"),
            (
                LoggedIn {
                    selected: selected @ Some(_),
                    ..
                },
                C::Unselect,
            ) => self.unselect(selected),
            (
                LoggedIn {
                    user,
                    selected: selected @ Some(_),
                },
                C::Close,
            ) => self.close(user, selected).await,
            (
                LoggedIn {
                    user,
                    selected: Some(selected),
                },
                C::Expunge,
            ) => self.expunge(io, user, selected, None).await,
            (
                LoggedIn {
                    user,
                    selected: Some(selected),
                },
                C::ExpungeUid { sequence_set },
            ) => self.expunge(io, user, selected, Some(sequence_set)).await,
            (
                LoggedIn {
                    user,
                    selected: Some(selected),
                },
                body @ (C::Search { .. } | C::Sort { .. } | C::Thread { .. }),
            ) => {
                self.search_command(io, user, selected, &tag, body, &extended)
                    .await
            }
            (
                LoggedIn {
                    user,
                    selected: Some(selected),
                },
                C::Fetch {
                    sequence_set,
                    macro_or_item_names,
                    uid,
                    modifiers,
                },
            ) => {
                let request = FetchRequest {
                    set: &sequence_set,
                    items: macro_or_item_names,
                    uid,
                    modifiers,
                };
                self.fetch(io, user, selected, request).await
            }
            (
                LoggedIn {
                    user,
                    selected: Some(selected),
                },
                C::Store {
                    sequence_set,
                    kind,
                    response,
                    flags,
                    uid,
                    modifiers,
                },
            ) => {
                let request = StoreRequest::new(kind, response, &flags, uid, &modifiers);
                self.store(io, user, selected, &sequence_set, request).await
            }
            (
                LoggedIn {
                    user,
                    selected: Some(selected),
                },
                C::Copy {
                    sequence_set,
                    mailbox,
                    uid,
                }
                | C::Move {
                    sequence_set,
                    mailbox,
                    uid,
                },
            ) => {
                let request = CopyRequest {
                    set: &sequence_set,
                    mailbox: &mailbox,
                    uid,
                    moving,
                };
                self.copy(io, user, selected, request).await
            }
            (LoggedIn { .. }, body) if needs_selected(&body) => {
                Done::Bad("No mailbox selected".into())
            }
            (LoggedIn { .. }, _) => Done::Bad("Command not supported".into()),
        };
        if matches!(done, Done::Close | Done::Sent) {
            return done;
        }
        if let LoggedIn {
            user,
            selected: Some(selected),
        } = state
        {
            let updates = self.updates(user, selected, expunge_allowed).await;
            io.queue(&updates);
            let kept = self.kept_searches(user, selected).await;
            io.queue(&kept);
        }
        self.notifications(io, state, false).await;
        done
    }
}
