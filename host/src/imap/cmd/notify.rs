//! NOTIFY (RFC 5465): the client names the mailboxes and events it wants to hear of, and the
//! server tells them as they happen, between commands as well as after them: the selected
//! folder's changes as EXISTS/EXPUNGE/FETCH at once (SELECTED) or after the next command
//! (SELECTED-DELAYED), other folders' as STATUS, folder and subscription changes as LIST.
//!
//! Supported events: MessageNew (without fetch attributes), MessageExpunge, FlagChange,
//! MailboxName, SubscriptionChange. The metadata and annotation events are refused with
//! BADEVENT, as the RFC asks of a server without those extensions (§5.9).

use imap_codec::imap_types::status::StatusDataItemName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::code::Code;
use crate::imap::codec;
use crate::imap::selected::Selected;
use crate::imap::session::*;
use crate::store::watched::Change;
use crate::stream::Io;

/// The events NOTIFY can report here (for BADEVENT).
const SUPPORTED: &str = "MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange";

/// Changes remembered between two looks; more are merged into "anything may have changed".
const MAX_PENDING: usize = 64;

/// Which mailboxes a group of events is about (RFC 5465 §6).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Filter {
    Selected { delayed: bool },
    Inboxes,
    Personal,
    Subscribed,
    Subtree(Vec<String>),
    Mailboxes(Vec<String>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Events {
    new: bool,
    expunge: bool,
    flags: bool,
    name: bool,
    subscription: bool,
}

impl Events {
    fn messages(self) -> bool {
        self.new || self.expunge || self.flags
    }
}

/// What a NOTIFY SET asked for, and what the session last told of folders and subscriptions
/// (to report their changes as differences).
pub(in crate::imap) struct Notify {
    groups: Vec<(Filter, Events)>,
    folders: Vec<String>,
    subscribed: Vec<String>,
    /// Changes heard since the last look.
    pending: Vec<Change>,
    /// More changes than `pending` holds were heard: look at everything.
    overflow: bool,
}

/// Tokens of a NOTIFY argument line: atoms, quoted strings (unquoted), `(` and `)`.
fn tokens(text: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' => {}
            '(' | ')' => out.push(c.to_string()),
            '"' => {
                let mut word = String::new();
                let mut escaped = false;
                loop {
                    let c = chars.next()?;
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => {
                            escaped = false;
                            word.push(c);
                        }
                    }
                }
                // A quoted token is never a parenthesis.
                out.push(format!("\"{word}"));
            }
            _ => {
                let mut word = c.to_string();
                while let Some(&next) = chars.peek() {
                    if matches!(next, ' ' | '(' | ')') {
                        break;
                    }
                    word.push(next);
                    chars.next();
                }
                out.push(word);
            }
        }
    }
    Some(out)
}

/// A token as a mailbox name (INBOX in upper case, quotes gone).
fn mailbox(token: &str) -> String {
    let name = token.strip_prefix('"').unwrap_or(token);
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX".into()
    } else {
        name.trim_end_matches('/').to_string()
    }
}

/// The request (`NONE`, or `SET [STATUS] groups`): Ok(None) for NONE, Err(done) when refused.
#[allow(clippy::type_complexity)]
fn parse(text: &str) -> Result<Option<(bool, Vec<(Filter, Events)>)>, Done> {
    let bad = || Done::Bad("Malformed NOTIFY".into());
    let tokens = tokens(text).ok_or_else(bad)?;
    let mut t = tokens.iter().map(String::as_str).peekable();
    match t.next().map(str::to_ascii_uppercase).as_deref() {
        Some("NONE") if t.peek().is_none() => return Ok(None),
        Some("SET") => {}
        _ => return Err(bad()),
    }
    let status = t.peek().is_some_and(|w| w.eq_ignore_ascii_case("STATUS"));
    if status {
        t.next();
    }
    let mut groups = Vec::new();
    let mut unsupported = false;
    while let Some(open) = t.next() {
        if open != "(" {
            return Err(bad());
        }
        let kind = t.next().ok_or_else(bad)?.to_ascii_uppercase();
        let mut names = || -> Result<Vec<String>, Done> {
            match t.next() {
                Some("(") => {
                    let mut list = Vec::new();
                    loop {
                        match t.next() {
                            Some(")") => break,
                            Some(name) => list.push(mailbox(name)),
                            None => return Err(bad()),
                        }
                    }
                    Ok(list)
                }
                Some(")") | None => Err(bad()),
                Some(name) => Ok(vec![mailbox(name)]),
            }
        };
        let filter = match kind.as_str() {
            "SELECTED" => Filter::Selected { delayed: false },
            "SELECTED-DELAYED" => Filter::Selected { delayed: true },
            "INBOXES" => Filter::Inboxes,
            "PERSONAL" => Filter::Personal,
            "SUBSCRIBED" => Filter::Subscribed,
            "SUBTREE" => Filter::Subtree(names()?),
            "MAILBOXES" => Filter::Mailboxes(names()?),
            _ => return Err(bad()),
        };
        let mut events = Events::default();
        match t.next() {
            Some(none) if none.eq_ignore_ascii_case("NONE") => {}
            Some("(") => loop {
                let Some(event) = t.next() else {
                    return Err(bad());
                };
                match event.to_ascii_uppercase().as_str() {
                    ")" => break,
                    "MESSAGENEW" => {
                        events.new = true;
                        if t.peek() == Some(&"(") {
                            // Fetch attributes for new messages: not supported here.
                            return Err(no(
                                Some(Code::Cannot),
                                "MessageNew with fetch attributes is not supported",
                            ));
                        }
                    }
                    "MESSAGEEXPUNGE" => events.expunge = true,
                    "FLAGCHANGE" => events.flags = true,
                    "MAILBOXNAME" => events.name = true,
                    "SUBSCRIPTIONCHANGE" => events.subscription = true,
                    _ => unsupported = true,
                }
            },
            _ => return Err(bad()),
        }
        if t.next() != Some(")") {
            return Err(bad());
        }
        groups.push((filter, events));
    }
    if groups.is_empty() {
        return Err(bad());
    }
    if unsupported {
        return Err(no(
            Some(Code::BadEvent(SUPPORTED.into())),
            "Unsupported NOTIFY event",
        ));
    }
    Ok(Some((status, groups)))
}

impl Notify {
    /// Announcements were missed: look at everything next time.
    pub(in crate::imap) fn lagged(&mut self) {
        self.overflow = true;
    }

    /// The events asked for about a folder other than the selected one (the first group
    /// whose filter takes it, RFC 5465 §6).
    fn events_for(&self, folder: &str) -> Option<Events> {
        self.groups.iter().find_map(|(filter, events)| {
            let takes = match filter {
                Filter::Selected { .. } => false,
                Filter::Inboxes => folder == "INBOX",
                Filter::Personal => true,
                Filter::Subscribed => self.subscribed.iter().any(|s| s == folder),
                Filter::Subtree(roots) => roots.iter().any(|root| {
                    folder == root
                        || folder
                            .strip_prefix(root.as_str())
                            .is_some_and(|rest| rest.starts_with('/'))
                }),
                Filter::Mailboxes(names) => names.iter().any(|n| n == folder),
            };
            takes.then_some(*events)
        })
    }

    /// The SELECTED (or SELECTED-DELAYED) group's events and whether they wait.
    fn selected_events(&self) -> Option<(Events, bool)> {
        self.groups
            .iter()
            .find_map(|(filter, events)| match filter {
                Filter::Selected { delayed } => Some((*events, *delayed)),
                _ => None,
            })
    }

    fn any(&self, wanted: impl Fn(Events) -> bool) -> bool {
        self.groups.iter().any(|(_, events)| wanted(*events))
    }
}

/// RFC 5465 §5: the STATUS items that tell of each kind of message event.
fn status_items(events: Events, condstore: bool) -> Vec<StatusDataItemName> {
    let mut items = Vec::new();
    if events.new || events.expunge {
        items.push(StatusDataItemName::Messages);
    }
    if events.new {
        items.push(StatusDataItemName::UidNext);
    }
    if events.new || events.flags {
        items.push(StatusDataItemName::UidValidity);
    }
    if events.flags || (condstore && events.new) {
        items.push(StatusDataItemName::HighestModSeq);
    }
    items
}

/// The user's folders (INBOX, which always exists, first) and subscriptions.
async fn folder_lists(
    store: std::sync::Arc<dyn crate::store::MailStore>,
    user: &str,
) -> Result<(Vec<String>, Vec<String>), crate::store::StoreError> {
    let owner = user.to_string();
    blocking(move || Ok((store.all_folders(&owner)?, store.subscriptions(&owner)?))).await
}

impl Conn {
    /// NOTIFY SET or NONE. With STATUS, each watched folder but the selected one is told at
    /// once as STATUS (RFC 5465 §3.1).
    pub(in crate::imap) async fn notify<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        selected: Option<&Selected>,
        request: &str,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (status, groups) = match parse(request) {
            Ok(Some(set)) => set,
            Ok(None) => {
                self.notify = None;
                return ok("NOTIFY completed");
            }
            Err(done) => return done,
        };
        let (folders, subscribed) = match folder_lists(self.store.clone(), user).await {
            Ok(listed) => listed,
            Err(err) => return store_failure(&err),
        };
        let notify = Notify {
            groups,
            folders,
            subscribed,
            pending: Vec::new(),
            overflow: false,
        };
        if status {
            let selected_folder = selected.map(|s| s.folder.as_str());
            for folder in &notify.folders {
                if Some(folder.as_str()) == selected_folder {
                    continue;
                }
                let Some(events) = notify.events_for(folder).filter(|e| e.messages()) else {
                    continue;
                };
                let items = status_items(events, self.condstore);
                if let Ok(line) = self.status_line(user, folder, &items).await {
                    io.queue(&line);
                }
            }
        }
        self.notify = Some(notify);
        ok("NOTIFY completed")
    }

    /// Remembers a change for the next look (see [`Conn::notifications`]).
    pub(in crate::imap) fn note(&mut self, change: &Change) {
        if let Some(notify) = &mut self.notify {
            if &*change.mailbox == crate::store::watched::ANY_MAILBOX {
                // Anything may have changed (another node's announcements were lost for a
                // while): as when the backlog overflows.
                notify.lagged();
            } else if notify.pending.len() >= MAX_PENDING {
                notify.overflow = true;
            } else {
                notify.pending.push(change.clone());
            }
        }
    }

    /// Tells what the changes heard since the last look mean under NOTIFY: `between` is true
    /// when no command is running (the selected folder's changes may then go out at once).
    pub(in crate::imap) async fn notifications<S>(
        &mut self,
        io: &mut Io<S>,
        state: &mut State,
        between: bool,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let State::LoggedIn { user, selected } = state else {
            return;
        };
        let Some(notify) = &mut self.notify else {
            return;
        };
        if notify.pending.is_empty() && !notify.overflow {
            return;
        }
        let pending = std::mem::take(&mut notify.pending);
        let overflow = std::mem::replace(&mut notify.overflow, false);
        let lists_changed = overflow || pending.iter().any(|c| c.folder.is_none());
        let mut folders: Vec<String> = if overflow {
            notify.folders.clone()
        } else {
            let mut named: Vec<String> = pending
                .iter()
                .filter_map(|c| c.folder.as_deref().map(str::to_string))
                .collect();
            named.sort();
            named.dedup();
            named
        };
        // The selected folder: at once for SELECTED, after the next command otherwise.
        if let Some(open) = selected.as_mut() {
            // After a command its updates already covered the changes drained meanwhile; a
            // change heard between commands is the session's news alone.
            if between && (folders.contains(&open.folder) || lists_changed) {
                self.dirty = true;
                let now = notify
                    .selected_events()
                    .is_some_and(|(events, delayed)| events.messages() && !delayed);
                if now {
                    let updates = self.updates(user, open, true).await;
                    io.queue(&updates);
                    let kept = self.kept_searches(user, open).await;
                    io.queue(&kept);
                }
            }
            folders.retain(|f| *f != open.folder);
        }
        let Some(notify) = &mut self.notify else {
            return;
        };
        if lists_changed && notify.any(|e| e.name || e.subscription) {
            if let Ok((now_folders, now_subscribed)) = folder_lists(self.store.clone(), user).await
            {
                let mut out = Vec::new();
                let list = |out: &mut Vec<u8>, attributes: &str, name: &str| {
                    out.extend_from_slice(format!("* LIST ({attributes}) \"/\" ").as_bytes());
                    codec::astring(out, name.as_bytes());
                    out.extend_from_slice(b"\r\n");
                };
                if notify.any(|e| e.name) {
                    for gone in notify.folders.iter().filter(|f| !now_folders.contains(f)) {
                        list(&mut out, "\\NonExistent", gone);
                    }
                    for new in now_folders.iter().filter(|f| !notify.folders.contains(f)) {
                        list(&mut out, "", new);
                    }
                }
                if notify.any(|e| e.subscription) {
                    for on in now_subscribed
                        .iter()
                        .filter(|f| !notify.subscribed.contains(f))
                    {
                        list(&mut out, "\\Subscribed", on);
                    }
                    for off in notify
                        .subscribed
                        .iter()
                        .filter(|f| !now_subscribed.contains(f) && now_folders.contains(f))
                    {
                        list(&mut out, "", off);
                    }
                }
                notify.folders = now_folders;
                notify.subscribed = now_subscribed;
                io.queue(&out);
            }
        }
        let Some(notify) = &self.notify else {
            return;
        };
        let wanted: Vec<(String, Events)> = folders
            .into_iter()
            .filter_map(|f| {
                let events = notify.events_for(&f).filter(|e| e.messages())?;
                Some((f, events))
            })
            .collect();
        for (folder, events) in wanted {
            let items = status_items(events, self.condstore);
            if let Ok(line) = self.status_line(user, &folder, &items).await {
                io.queue(&line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_refuse_what_is_not_supported() {
        let (status, groups) = parse("SET STATUS (SELECTED (MessageNew MessageExpunge)) (MAILBOXES (a \"b c\") (FlagChange)) (personal none)")
            .ok()
            .flatten()
            .unwrap();
        assert!(status);
        assert_eq!(groups.len(), 3);
        assert_eq!(
            groups[1].0,
            Filter::Mailboxes(vec!["a".into(), "b c".into()])
        );
        assert!(groups[1].1.flags && !groups[1].1.new);
        assert!(matches!(parse("NONE"), Ok(None)));
        assert!(matches!(
            parse("SET (PERSONAL (AnnotationChange))"),
            Err(Done::No(Some(Code::BadEvent(_)), _))
        ));
        assert!(matches!(
            parse("SET (BOGUS (MessageNew))"),
            Err(Done::Bad(_))
        ));
        assert!(matches!(parse("SET"), Err(Done::Bad(_))));
    }
}
