//! Copies mailboxes from one store to another keeping what clients cached: UIDVALIDITY, UIDs,
//! UIDNEXT, HIGHESTMODSEQ, flags, keywords, arrival dates, the \Recent boundary,
//! subscriptions and annotations
//! (`postern mailbox migrate`). Each folder goes over in batches through
//! [`MailStore::import`], which skips UIDs already there, so a migration that was interrupted
//! can simply run again.

use super::{Imported, ImportedFolder, MailStore, MessageInfo, StoreError};

/// Messages per import call, and the bytes a batch holds at most (one message may be larger).
const BATCH_MESSAGES: usize = 200;
const BATCH_BYTES: u64 = 32 << 20;

/// What has been copied so far, for a progress display.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub folder: String,
    pub messages: u64,
    pub bytes: u64,
}

/// What a mailbox's migration copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    pub folders: u64,
    pub messages: u64,
    pub bytes: u64,
}

/// What a mailbox holds, to size a progress bar.
pub fn size(from: &dyn MailStore, mailbox: &str) -> Result<super::Usage, StoreError> {
    from.usage(mailbox)
}

/// Copies one mailbox; `progress` is called after every batch.
pub fn mailbox(
    from: &dyn MailStore,
    to: &dyn MailStore,
    mailbox: &str,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Copied, StoreError> {
    let mut copied = Copied::default();
    let mut done = Progress::default();
    for folder in from.all_folders(mailbox)? {
        let snapshot = match from.snapshot(mailbox, &folder) {
            Ok(snapshot) => snapshot,
            Err(StoreError::NoSuchFolder(_)) => continue,
            Err(err) => return Err(err),
        };
        let numbers = ImportedFolder {
            uid_validity: snapshot.uid_validity,
            uid_next: snapshot.uid_next,
            highest_modseq: snapshot.highest_modseq,
        };
        done.folder.clone_from(&folder);
        // An empty folder is made (with its UIDVALIDITY) too.
        if snapshot.messages.is_empty() {
            to.import(mailbox, &folder, numbers, &[])?;
        }
        for batch in batches(&snapshot.messages) {
            let mut bodies = Vec::with_capacity(batch.len());
            for message in batch {
                match from.read(mailbox, &folder, message) {
                    Ok(bytes) => bodies.push((message, bytes)),
                    // Removed since the listing (the server is not running, so only by hand).
                    Err(StoreError::Gone(_)) => {}
                    Err(err) => return Err(err),
                }
            }
            let imported: Vec<Imported<'_>> = bodies
                .iter()
                .map(|(m, bytes)| Imported {
                    uid: m.uid,
                    flags: m.flags,
                    keywords: &m.keywords,
                    received_at: m.received_at,
                    message: bytes,
                })
                .collect();
            to.import(mailbox, &folder, numbers, &imported)?;
            done.messages += imported.len() as u64;
            done.bytes += bodies.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
            progress(&done);
        }
        // \Recent (RFC 3501 §2.3.2): what sessions already saw stays seen.
        let boundary = from.recent_boundary(mailbox, &folder, numbers.uid_validity, None)?;
        if boundary > 0 {
            to.recent_boundary(mailbox, &folder, numbers.uid_validity, Some(boundary))?;
        }
        if let Ok(entries) = from.metadata(mailbox, Some(&folder)) {
            put_metadata(to, mailbox, Some(&folder), entries)?;
        }
        copied.folders += 1;
    }
    for folder in from.subscriptions(mailbox)? {
        to.set_subscribed(mailbox, &folder, true)?;
    }
    put_metadata(to, mailbox, None, from.metadata(mailbox, None)?)?;
    copied.messages = done.messages;
    copied.bytes = done.bytes;
    Ok(copied)
}

/// Sets annotations read from the other store (of a folder, or of the mailbox with `None`).
fn put_metadata(
    to: &dyn MailStore,
    mailbox: &str,
    folder: Option<&str>,
    entries: std::collections::BTreeMap<String, Vec<u8>>,
) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let changes: Vec<(String, Option<Vec<u8>>)> =
        entries.into_iter().map(|(k, v)| (k, Some(v))).collect();
    to.set_metadata(mailbox, folder, &changes)
}

/// The listing cut into import batches.
fn batches(messages: &[MessageInfo]) -> Vec<&[MessageInfo]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in messages.iter().enumerate() {
        if i > start && (i - start >= BATCH_MESSAGES || bytes + m.size > BATCH_BYTES) {
            out.push(&messages[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += m.size;
    }
    if start < messages.len() {
        out.push(&messages[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::maildir::Maildir;
    use crate::store::{Delivery, FlagChange, FlagMode, Flags, Keywords};

    /// Maildir to Maildir (the same code runs for every pair of stores): everything a client
    /// cached comes over, and a second run copies nothing twice.
    #[test]
    fn a_mailbox_moves_with_its_numbers_and_a_second_run_adds_nothing() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Maildir::new(a.path(), "host");
        let to = Maildir::new(b.path(), "host");
        let user = "alice@example.test";
        for n in 0..250 {
            let id = format!("Q{n}");
            let message = format!("Subject: {n}\r\n\r\nbody {n}\r\n").into_bytes();
            from.deliver(&[Delivery {
                mailbox: user,
                folder: "INBOX",
                delivery_id: &id,
                retry: false,
                received_at: 1_700_000_000 + n,
                prepend: b"",
                message: &message,
            }]);
        }
        from.create_folder(user, "Archive").unwrap();
        from.set_subscribed(user, "Archive", true).unwrap();
        let listed = from.snapshot(user, "INBOX").unwrap();
        let first: Vec<&MessageInfo> = listed.messages.iter().take(3).collect();
        let change = FlagChange {
            mode: FlagMode::Add,
            flags: Flags::FLAGGED,
            keywords: Keywords::from_names(["$Work"]),
        };
        from.change_flags(user, "INBOX", &first, &change, None)
            .unwrap();
        from.remove(user, "INBOX", &[&listed.messages[10]]).unwrap();
        from.set_metadata(
            user,
            None,
            &[("/private/comment".into(), Some(b"hi".to_vec()))],
        )
        .unwrap();
        let before = from.snapshot(user, "INBOX").unwrap();

        let mut calls = 0;
        let copied = mailbox(&from, &to, user, &mut |_| calls += 1).unwrap();
        assert_eq!((copied.folders, copied.messages), (2, 249));
        assert_eq!(calls, 2, "249 messages go over in two batches");
        let after = to.snapshot(user, "INBOX").unwrap();
        assert_eq!(after.uid_validity, before.uid_validity);
        assert!(after.uid_next >= before.uid_next);
        assert!(after.highest_modseq >= before.highest_modseq);
        let shape = |s: &crate::store::FolderSnapshot| -> Vec<_> {
            s.messages
                .iter()
                .map(|m| (m.uid, m.flags, m.keywords.clone(), m.received_at, m.size))
                .collect()
        };
        assert_eq!(shape(&after), shape(&before));
        assert_eq!(
            to.read(user, "INBOX", &after.messages[5]).unwrap(),
            from.read(user, "INBOX", &before.messages[5]).unwrap()
        );
        assert_eq!(to.subscriptions(user).unwrap(), ["Archive"]);
        assert_eq!(to.metadata(user, None).unwrap()["/private/comment"], b"hi");
        assert!(to.has_folder(user, "Archive").unwrap());

        let again = mailbox(&from, &to, user, &mut |_| {}).unwrap();
        assert_eq!(again.messages, 249, "read again");
        assert_eq!(
            to.snapshot(user, "INBOX").unwrap().messages.len(),
            249,
            "stored once"
        );
    }
}
