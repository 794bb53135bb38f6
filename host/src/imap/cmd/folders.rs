//! CREATE, DELETE and RENAME (RFC 9051 §6.3.4-6), LIST and LSUB (§6.3.9, RFC 5258 LIST-EXTENDED,
//! RFC 5819 LIST-STATUS), STATUS (§6.3.11), SUBSCRIBE and UNSUBSCRIBE (§6.3.7-8).

use crate::imap::codec::{self, Extended};
use crate::store::{Flags, StoreError};
use crate::stream::Io;
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::status::StatusDataItemName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::code::Code;
use crate::imap::selected::Selected;
use crate::imap::session::*;

/// IMAP `list-wildcards` matching (RFC 9051 §6.3.9): `*` matches anything, `%` anything but
/// the hierarchy delimiter. It runs the pattern as an automaton over the name, keeping the set
/// of pattern positions reachable so far, so it costs at most pattern × name steps whatever the
/// wildcards (a backtracking matcher is exponential in the number of `*`).
pub(in crate::imap) fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
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

pub(in crate::imap) fn list_match(pattern: &str, name: &str) -> bool {
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

/// The longest LIST/LSUB pattern (reference and mailbox together) taken.
pub(in crate::imap) const MAX_LIST_PATTERN: usize = 1024;

/// What a LIST or LSUB command asks for, beyond its pattern.
pub(in crate::imap) struct ListOptions {
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
pub(in crate::imap) fn list_lines(
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

impl Conn {
    pub(in crate::imap) async fn create(&mut self, user: &str, mailbox: &Mailbox<'_>) -> Done {
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        if name == "INBOX" {
            return no(Some(Code::AlreadyExists), "INBOX always exists");
        }
        let (store, user) = (self.store.clone(), user.to_string());
        let created = blocking(move || {
            // RFC 9051 §6.3.4: superior names are created as needed, so every level is a
            // folder that can be selected, renamed and deleted.
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

    /// RFC 9051 §6.3.5. Deleting the selected folder leaves the Selected state.
    pub(in crate::imap) async fn delete(
        &mut self,
        user: &str,
        selected: &mut Option<Selected>,
        mailbox: &Mailbox<'_>,
    ) -> Done {
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        if name == "INBOX" {
            return no(Some(Code::Cannot), "INBOX cannot be deleted");
        }
        let (store, user) = (self.store.clone(), user.to_string());
        let folder = name.clone();
        match blocking(move || store.delete_folder(&user, &folder)).await {
            Ok(()) => {
                if selected.as_ref().is_some_and(|s| s.folder == name) {
                    *selected = None;
                }
                ok("DELETE completed")
            }
            Err(err) => store_failure(&err),
        }
    }

    /// RFC 9051 §6.3.6 (renaming INBOX moves its messages: the store's concern).
    pub(in crate::imap) async fn rename(
        &mut self,
        user: &str,
        from: &Mailbox<'_>,
        to: &Mailbox<'_>,
    ) -> Done {
        let (from, to) = match (folder_name(from), folder_name(to)) {
            (Ok(from), Ok(to)) => (from, to),
            (Err(done), _) | (_, Err(done)) => return done,
        };
        let (store, user) = (self.store.clone(), user.to_string());
        match blocking(move || store.rename_folder(&user, &from, &to)).await {
            Ok(()) => ok("RENAME completed"),
            Err(err) => store_failure(&err),
        }
    }

    pub(in crate::imap) async fn subscribe(
        &mut self,
        user: &str,
        mailbox: &Mailbox<'_>,
        on: bool,
    ) -> Done {
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        let (store, user) = (self.store.clone(), user.to_string());
        match blocking(move || store.set_subscribed(&user, &name, on)).await {
            Ok(()) => ok(if on {
                "SUBSCRIBE completed"
            } else {
                "UNSUBSCRIBE completed"
            }),
            Err(err) => store_failure(&err),
        }
    }

    /// RFC 9051 §6.3.11 (with RFC 7162's HIGHESTMODSEQ and RFC 9208's DELETED-STORAGE).
    pub(in crate::imap) async fn status<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        selected: Option<&Selected>,
        mailbox: &Mailbox<'_>,
        items: &[StatusDataItemName],
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        if items.contains(&StatusDataItemName::HighestModSeq) {
            self.enable_condstore(io, selected);
        }
        match self.status_line(user, &name, items).await {
            Ok(line) => {
                io.queue(&line);
                ok("STATUS completed")
            }
            Err(err) => store_failure(&err),
        }
    }

    pub(in crate::imap) async fn status_line(
        &self,
        user: &str,
        name: &str,
        items: &[StatusDataItemName],
    ) -> Result<Vec<u8>, StoreError> {
        let (store, user, folder) = (self.store.clone(), user.to_string(), name.to_string());
        let wants_recent = items.contains(&StatusDataItemName::Recent);
        let (snapshot, recent_above) = blocking(move || {
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

    pub(in crate::imap) async fn list<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
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
            return no(Some(Code::Limit), "Mailbox pattern too long");
        }
        let (store, owner) = (self.store.clone(), user.to_string());
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
        let listing = blocking(move || {
            let folders = store.folders(&owner)?;
            let subscribed = store.subscriptions(&owner)?;
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
                if let Ok(line) = self.status_line(user, &name, &items).await {
                    io.queue(&line);
                }
            }
        }
        ok(&format!("{verb} completed"))
    }
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
