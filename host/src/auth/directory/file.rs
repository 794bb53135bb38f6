//! The directory as a TOML file in the data directory (`directory.toml`, the same `[[user]]`
//! and `[aliases]` shape as the configuration). The CLI edits it under an exclusive lock
//! (`directory.lock`), writing a new file, flushing it, renaming it over the old one and
//! flushing the directory, so the server never reads half a file and an edit survives a crash
//! once the command has returned.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{Directory, DirectoryError, Entries, Outcome, UserRecord};
use crate::durable;

pub const FILE_NAME: &str = "directory.toml";

pub struct FileDirectory {
    path: PathBuf,
    lock: PathBuf,
}

impl FileDirectory {
    pub fn new(data_dir: &Path) -> FileDirectory {
        FileDirectory {
            path: data_dir.join(FILE_NAME),
            lock: data_dir.join("directory.lock"),
        }
    }

    /// Reads, changes and writes back the entries under the lock.
    fn edit(
        &self,
        change: impl FnOnce(&mut Entries) -> Outcome,
    ) -> Result<Outcome, DirectoryError> {
        if let Some(dir) = self.path.parent() {
            durable::create_dir_all(dir)?;
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)?;
        // SAFETY: flock on a descriptor this function owns; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        let mut entries = self.load()?;
        let outcome = change(&mut entries);
        if matches!(
            outcome,
            Outcome::Added | Outcome::Replaced | Outcome::Removed
        ) {
            let text = toml::to_string(&entries).map_err(|e| DirectoryError::Damaged {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            })?;
            let header = "# Users and aliases edited by `postern user` and `postern alias`; the \
                          server reloads this file when it changes.\n";
            let tmp = self.path.with_extension("toml.tmp");
            durable::write_and_rename(&tmp, &self.path, format!("{header}{text}").as_bytes())?;
            if let Some(dir) = self.path.parent() {
                durable::sync_dir(dir)?;
            }
        }
        Ok(outcome)
    }
}

impl Directory for FileDirectory {
    fn load(&self) -> Result<Entries, DirectoryError> {
        match fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str(&text).map_err(|e| DirectoryError::Damaged {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Entries::default()),
            Err(err) => Err(err.into()),
        }
    }

    fn stamp(&self) -> Result<u64, DirectoryError> {
        // Every edit is a rename: a new inode, whatever the clock or the file system's
        // timestamp granularity does.
        match fs::metadata(&self.path) {
            Ok(meta) => Ok(meta.ino() ^ (meta.size() << 32) ^ meta.mtime_nsec() as u64),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(err) => Err(err.into()),
        }
    }

    fn put_user(&self, user: UserRecord) -> Result<Outcome, DirectoryError> {
        self.edit(|entries| put_user(entries, user))
    }

    fn remove_user(&self, address: &str) -> Result<Outcome, DirectoryError> {
        self.edit(|entries| {
            let before = entries.users.len();
            entries.users.retain(|u| u.address != address);
            if entries.users.len() < before {
                Outcome::Removed
            } else {
                Outcome::Missing
            }
        })
    }

    fn put_alias(&self, alias: &str, target: &str) -> Result<Outcome, DirectoryError> {
        self.edit(
            |entries| match entries.aliases.insert(alias.into(), target.into()) {
                Some(_) => Outcome::Replaced,
                None => Outcome::Added,
            },
        )
    }

    fn remove_alias(&self, alias: &str) -> Result<Outcome, DirectoryError> {
        self.edit(|entries| match entries.aliases.remove(alias) {
            Some(_) => Outcome::Removed,
            None => Outcome::Missing,
        })
    }

    fn put_domain(&self, domain: &str) -> Result<Outcome, DirectoryError> {
        self.edit_domains(domain, true)
    }

    fn remove_domain(&self, domain: &str) -> Result<Outcome, DirectoryError> {
        self.edit_domains(domain, false)
    }
}

impl FileDirectory {
    fn edit_domains(&self, domain: &str, add: bool) -> Result<Outcome, DirectoryError> {
        self.edit(|entries| {
            let present = entries.domains.iter().any(|d| d == domain);
            match (add, present) {
                (true, true) => Outcome::Replaced,
                (true, false) => {
                    entries.domains.push(domain.into());
                    entries.domains.sort();
                    Outcome::Added
                }
                (false, true) => {
                    entries.domains.retain(|d| d != domain);
                    Outcome::Removed
                }
                (false, false) => Outcome::Missing,
            }
        })
    }
}

fn put_user(entries: &mut Entries, user: UserRecord) -> Outcome {
    match entries.users.iter_mut().find(|u| u.address == user.address) {
        Some(existing) => {
            *existing = user;
            Outcome::Replaced
        }
        None => {
            entries.users.push(user);
            Outcome::Added
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carol(password: &str) -> UserRecord {
        UserRecord {
            address: "carol@example.test".into(),
            password: password.into(),
            quota_mb: Some(5),
            quota_messages: None,
            disabled: false,
        }
    }

    #[test]
    fn edits_are_kept_and_change_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let directory = FileDirectory::new(dir.path());
        assert_eq!(directory.load().unwrap(), Entries::default());
        let empty = directory.stamp().unwrap();
        assert_eq!(directory.put_user(carol("h1")).unwrap(), Outcome::Added);
        let one = directory.stamp().unwrap();
        assert_ne!(one, empty);
        assert_eq!(directory.put_user(carol("h2")).unwrap(), Outcome::Replaced);
        assert_ne!(directory.stamp().unwrap(), one);
        assert_eq!(
            directory
                .put_alias("c@example.test", "carol@example.test")
                .unwrap(),
            Outcome::Added
        );
        let entries = FileDirectory::new(dir.path()).load().unwrap();
        assert_eq!(entries.users, vec![carol("h2")]);
        assert_eq!(entries.aliases["c@example.test"], "carol@example.test");
        assert_eq!(
            directory.remove_user("carol@example.test").unwrap(),
            Outcome::Removed
        );
        assert_eq!(
            directory.remove_user("carol@example.test").unwrap(),
            Outcome::Missing
        );
        assert_eq!(
            directory.remove_alias("c@example.test").unwrap(),
            Outcome::Removed
        );
        assert_eq!(directory.load().unwrap(), Entries::default());
    }
}
