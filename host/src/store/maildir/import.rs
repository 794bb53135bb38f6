//! Messages brought from another store under their own UIDs (`MailStore::import`, used by
//! `postern mailbox migrate`): written into `cur/` with their flags as letters, then the index
//! gains their `<uid> <key>` lines under the UIDVALIDITY they had, and the mod-sequence log is
//! raised to the old store's HIGHESTMODSEQ.

use std::fs;

use super::*;
use crate::store::{Imported, ImportedFolder};

impl Maildir {
    pub(super) fn import_messages(
        &self,
        mailbox: &str,
        folder: &str,
        numbers: ImportedFolder,
        messages: &[Imported<'_>],
    ) -> Result<(), StoreError> {
        let failed = StoreError::from_io;
        let dir = match self.existing_folder(mailbox, folder) {
            Err(StoreError::NoSuchFolder(_)) => {
                self.create_folder(mailbox, folder)?;
                self.existing_folder(mailbox, folder)?
            }
            other => other?,
        };
        // Letters first: the table takes the folder's lock, which the rest holds.
        let mut letters = Vec::with_capacity(messages.len());
        for m in messages {
            letters.push(
                Letters::from_system(m.flags)
                    .union(self.keyword_letters(&dir, folder, m.keywords)?),
            );
        }
        let lock = self.folder_lock(&dir);
        let _guard = lock.lock().expect("folder lock");
        let mut index = read_index(&dir).map_err(failed)?;
        if index.validity != numbers.uid_validity {
            if !index.entries.is_empty() || !list_files(&dir).map_err(failed)?.is_empty() {
                return Err(StoreError::Exists(folder.into()));
            }
            index = UidList {
                validity: numbers.uid_validity,
                next: 1,
                entries: Vec::new(),
            };
        }
        let mut last = index.entries.last().map_or(0, |(uid, _)| *uid);
        let mut written = Vec::new();
        for (m, letters) in messages.iter().zip(letters) {
            if index.entries.iter().any(|(uid, _)| *uid == m.uid) {
                continue; // brought by an earlier run
            }
            // Above those present; not checked against UIDNEXT, which an earlier batch of the
            // same import raised to the old store's.
            if m.uid <= last {
                return Err(StoreError::Exists(format!("{folder}: UID {}", m.uid)));
            }
            last = m.uid;
            let (content, size, crlf_size) = stored_form(b"", m.message);
            let key = format!(
                "{}.{}.{},S={size},W={crlf_size}",
                m.received_at,
                unique_part(),
                self.host
            );
            let tmp = dir.join("tmp").join(&key);
            let file = durable::write_unsynced(&tmp, &content).map_err(failed)?;
            written.push((file, tmp, format!("{key}:2,{}", flag_letters(letters))));
            index.entries.push((m.uid, key.into()));
        }
        let files: Vec<&File> = written.iter().map(|(f, _, _)| f).collect();
        durable::sync_files(&files).map_err(failed)?;
        for (_, tmp, name) in &written {
            fs::rename(tmp, dir.join("cur").join(name)).map_err(failed)?;
        }
        durable::sync_dir(&dir.join("cur")).map_err(failed)?;
        index.next = index.next.max(numbers.uid_next).max(last.saturating_add(1));
        write_index(&dir, &index).map_err(failed)?;
        // What this process kept about the folder (listing, log) describes the old one.
        self.forget_folder(&dir);
        let mut log = modseq::ModLog::load(&dir, index.validity).map_err(failed)?;
        log.raise_to(&dir, numbers.highest_modseq).map_err(failed)
    }
}
