//! SELECT and EXAMINE (RFC 9051 §6.3.2, with CONDSTORE and QRESYNC parameters of RFC 7162),
//! leaving the folder with CLOSE (§6.4.1) or UNSELECT (RFC 3691), EXPUNGE and UID EXPUNGE
//! (§6.4.3, RFC 4315).

use crate::imap::codec::{self};
use crate::imap::selected::{range_set, Selected};
use crate::store::{Flags, MessageInfo};
use crate::stream::Io;
use imap_codec::imap_types::command::SelectParameter;
use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::imap_types::sequence::SequenceSet;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::code::Code;
use crate::imap::session::*;

impl Conn {
    pub(in crate::imap) async fn select<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        current: &mut Option<Selected>,
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
        // Selecting the selected folder again (as clients do to resynchronise): its size is
        // known, so a small one is listed on the async thread (see `Conn::short_read`).
        let known_size = folder_name(mailbox).ok().and_then(|name| {
            current
                .as_ref()
                .filter(|selected| selected.folder == name)
                .map(|selected| selected.messages.len())
        });
        // RFC 9051 §6.3.2: a failed SELECT leaves no mailbox selected.
        if current.take().is_some() && (self.rev2 || self.qresync) {
            io.queue(b"* OK [CLOSED] Previous mailbox closed\r\n");
        }
        let name = match folder_name(mailbox) {
            Ok(name) => name,
            Err(done) => return done,
        };
        let (store, folder) = (self.store.clone(), name.clone());
        let owner = user.to_string();
        let recent = self.recent_mode(read_only);
        let short = known_size.is_some_and(|size| self.short_read(user, size, 0, 0));
        let opened = reading(short, move || {
            let snapshot = store.snapshot(&owner, &folder)?;
            let boundary = recent.boundary(&*store, &owner, &folder, &snapshot)?;
            Ok((snapshot, boundary))
        })
        .await;
        let (snapshot, boundary) = match opened {
            Ok(opened) => opened,
            Err(err) => return store_failure(&err),
        };
        self.drain_changes(user, None);
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
        *current = Some(selected);
        if read_only {
            Done::Ok(Some(Code::ReadOnly), "EXAMINE completed".into())
        } else {
            Done::Ok(Some(Code::ReadWrite), "SELECT completed".into())
        }
    }

    /// RFC 3691: leaves the folder, expunging nothing.
    pub(in crate::imap) fn unselect(&mut self, selected: &mut Option<Selected>) -> Done {
        *selected = None;
        ok("UNSELECT completed")
    }

    /// RFC 9051 §6.4.1: leaves the folder, silently removing its \Deleted messages first
    /// (unless it was opened read-only).
    pub(in crate::imap) async fn close(
        &mut self,
        user: &str,
        selected: &mut Option<Selected>,
    ) -> Done {
        if let Some(open) = selected.as_ref().filter(|s| !s.read_only) {
            let doomed: Vec<MessageInfo> = open
                .messages
                .iter()
                .filter(|m| m.flags.contains(Flags::DELETED))
                .cloned()
                .collect();
            if !doomed.is_empty() {
                let (store, user, folder) =
                    (self.store.clone(), user.to_string(), open.folder.clone());
                let result = blocking(move || {
                    let refs: Vec<&MessageInfo> = doomed.iter().collect();
                    store.remove(&user, &folder, &refs)
                })
                .await;
                if let Err(err) = result {
                    return store_failure(&err);
                }
            }
        }
        *selected = None;
        ok("CLOSE completed")
    }

    /// Removes \Deleted messages (all, or those in a UID set) and reports them.
    pub(in crate::imap) async fn expunge<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        selected: &mut Selected,
        uids: Option<SequenceSet>,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let updates = self.updates(user, selected, true).await;
        io.queue(&updates);
        let user = user.to_string();
        let store = self.store.clone();
        if selected.read_only {
            return no(Some(Code::ReadOnly), "Mailbox is read-only");
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
        let result = blocking(move || {
            let refs: Vec<&MessageInfo> = messages.iter().collect();
            store.remove(&user, &folder, &refs)
        })
        .await;
        if let Err(err) = result {
            return store_failure(&err);
        }
        let out = selected.expunged(doomed, self.report());
        io.queue(&out);
        ok("EXPUNGE completed")
    }
}
