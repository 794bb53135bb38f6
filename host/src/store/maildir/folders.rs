//! Folders (Maildir++ `.A.B` directories beside `cur/`), made under a temporary name and renamed
//! in, deleted by renaming out of sight first; and the subscriptions file, as Dovecot keeps it.

use std::fs;
use std::io;

use super::*;

impl Maildir {
    pub(super) fn list_folders(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        let root = self.folder_path(mailbox, "INBOX")?;
        let entries = match fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(StoreError::from_io(err)),
        };
        let mut folders = Vec::new();
        for entry in entries {
            let entry = entry.map_err(StoreError::from_io)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Some(folder) = name.strip_prefix('.') else {
                continue;
            };
            let folder = folder.replace('.', "/");
            if crate::store::valid_folder_name(&folder) && entry.path().join("cur").is_dir() {
                folders.push(folder);
            }
        }
        Ok(folders)
    }

    pub(super) fn make_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        if folder.eq_ignore_ascii_case("INBOX") || !crate::store::valid_folder_name(folder) {
            return Err(StoreError::InvalidName(folder.into()));
        }
        let dir = self.folder_path(mailbox, folder)?;
        if dir.exists() {
            return Err(StoreError::Exists(folder.into()));
        }
        let root = self.folder_path(mailbox, "INBOX")?;
        ensure_maildir(&root).map_err(StoreError::from_io)?;
        // Built under a temporary name and renamed, so a crash never leaves half a folder.
        let building = root.join(format!("..creating.{}", unique_part()));
        ensure_maildir(&building).map_err(StoreError::from_io)?;
        fs::rename(&building, &dir).map_err(|err| {
            let _ = fs::remove_dir_all(&building);
            StoreError::from_io(err)
        })?;
        durable::sync_dir(&root).map_err(StoreError::from_io)
    }

    pub(super) fn remove_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        if folder.eq_ignore_ascii_case("INBOX") {
            return Err(StoreError::InvalidName(folder.into()));
        }
        let dir = self.existing_folder(mailbox, folder)?;
        let root = self.folder_path(mailbox, "INBOX")?;
        // Out of sight first (one atomic rename), then removed at leisure.
        let doomed = root.join(format!("..deleting.{}", unique_part()));
        fs::rename(&dir, &doomed).map_err(StoreError::from_io)?;
        self.forget_folder(&dir);
        durable::sync_dir(&root).map_err(StoreError::from_io)?;
        fs::remove_dir_all(&doomed).map_err(StoreError::from_io)
    }

    pub(super) fn move_folder(
        &self,
        mailbox: &str,
        from: &str,
        to: &str,
    ) -> Result<(), StoreError> {
        if to.eq_ignore_ascii_case("INBOX") || !crate::store::valid_folder_name(to) {
            return Err(StoreError::InvalidName(to.into()));
        }
        let target = self.folder_path(mailbox, to)?;
        if target.exists() {
            return Err(StoreError::Exists(to.into()));
        }
        let root = self.folder_path(mailbox, "INBOX")?;
        if from.eq_ignore_ascii_case("INBOX") {
            self.create_folder(mailbox, to)?;
            let snapshot = self.snapshot(mailbox, "INBOX")?;
            let all: Vec<&MessageInfo> = snapshot.messages.iter().collect();
            self.copy(mailbox, "INBOX", &all, to)?;
            return self.remove(mailbox, "INBOX", &all);
        }
        self.existing_folder(mailbox, from)?;
        let old_prefix = format!(".{}", from.replace('/', "."));
        let new_prefix = format!(".{}", to.replace('/', "."));
        let mut moves = Vec::new();
        for entry in fs::read_dir(&root).map_err(StoreError::from_io)? {
            let entry = entry.map_err(StoreError::from_io)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name == old_prefix || name.starts_with(&format!("{old_prefix}.")) {
                moves.push(format!("{new_prefix}{}", &name[old_prefix.len()..]));
                moves.push(name);
            }
        }
        for pair in moves.chunks(2) {
            let (new, old) = (&pair[0], &pair[1]);
            fs::rename(root.join(old), root.join(new)).map_err(StoreError::from_io)?;
            self.forget_folder(&root.join(old));
            self.forget_folder(&root.join(new));
        }
        durable::sync_dir(&root).map_err(StoreError::from_io)
    }

    pub(super) fn read_subscriptions(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        let path = self.folder_path(mailbox, "INBOX")?.join(SUBSCRIPTIONS);
        match fs::read_to_string(path) {
            Ok(text) => Ok(text
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(err) => Err(StoreError::from_io(err)),
        }
    }

    pub(super) fn write_subscribed(
        &self,
        mailbox: &str,
        folder: &str,
        subscribed: bool,
    ) -> Result<(), StoreError> {
        let root = self.folder_path(mailbox, "INBOX")?;
        ensure_maildir(&root).map_err(StoreError::from_io)?;
        let lock = self.folder_lock(&root.join(SUBSCRIPTIONS));
        let _guard = lock.lock().expect("subscriptions lock");
        let mut names = self.subscriptions(mailbox)?;
        names.retain(|n| n != folder);
        if subscribed {
            names.push(folder.to_string());
        }
        let mut text = names.join("\n");
        text.push('\n');
        let tmp = root.join(format!("{SUBSCRIPTIONS}.tmp"));
        durable::write_and_rename(&tmp, &root.join(SUBSCRIPTIONS), text.as_bytes())
            .and_then(|()| durable::sync_dir(&root))
            .map_err(StoreError::from_io)
    }
}
