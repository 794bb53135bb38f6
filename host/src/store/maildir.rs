//! Maildir storage (the embedded default), readable as it is by mutt, Dovecot and backup tools.
//!
//! Layout: `<root>/<domain>/<user>/{tmp,new,cur}` for INBOX and Maildir++ folders as
//! `<root>/<domain>/<user>/.<Folder>/{tmp,new,cur}`. Files hold LF line endings as Postfix's local
//! delivery writes them; the name carries Dovecot's `,S=<size>,W=<size with CRLF>` so POP3 and IMAP
//! report exact RFC 822 sizes without reading the file.
//!
//! Delivery follows the Maildir protocol: write to `tmp/`, flush, rename into `new/`, flush the
//! directory. Names are stable for a (message, recipient) pair (`<time>.Q<delivery id>.<host>`), so a
//! delivery retried after a crash sees the earlier copy (in `new/`, or in `cur/` once a client has
//! seen it) and does not store a second one.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{Delivery, MailStore, StoreError};
use crate::durable;

pub struct Maildir {
    root: PathBuf,
    /// Host name as it appears in file names (`/` and `:` escaped per the Maildir spec).
    host: String,
}

impl Maildir {
    pub fn new(root: impl Into<PathBuf>, hostname: &str) -> Maildir {
        let host = hostname.replace('/', "\\057").replace(':', "\\072");
        Maildir {
            root: root.into(),
            host,
        }
    }

    /// The directory of a folder of a mailbox (`alice@example.test`, `INBOX` or a folder name).
    pub fn folder_path(&self, mailbox: &str, folder: &str) -> Result<PathBuf, StoreError> {
        let (user, domain) = mailbox
            .rsplit_once('@')
            .ok_or_else(|| StoreError::InvalidName(mailbox.into()))?;
        for part in [user, domain] {
            if !is_safe_component(part) {
                return Err(StoreError::InvalidName(mailbox.into()));
            }
        }
        let mut path = self.root.join(domain).join(user);
        if !folder.eq_ignore_ascii_case("INBOX") {
            // Maildir++: sub-folders are ".A.B" directories beside cur/new/tmp.
            if folder
                .split('/')
                .any(|p| !is_safe_component(p) || p.contains('.'))
            {
                return Err(StoreError::InvalidName(folder.into()));
            }
            path = path.join(format!(".{}", folder.replace('/', ".")));
        }
        Ok(path)
    }

    fn base_name(&self, delivery: &Delivery<'_>) -> String {
        format!(
            "{}.Q{}.{}",
            delivery.received_at, delivery.delivery_id, self.host
        )
    }

    /// True when a file for this delivery already exists in `new/` or `cur/`.
    fn already_delivered(dir: &Path, base: &str) -> io::Result<bool> {
        let prefix = format!("{base},");
        for sub in ["new", "cur"] {
            for entry in fs::read_dir(dir.join(sub))? {
                let name = entry?.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(&prefix) || name == base {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

fn is_safe_component(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && !part.starts_with('.')
        && !part.contains(['/', '\\', '\0'])
        && !part.chars().any(char::is_control)
}

/// Creates `tmp`, `new` and `cur` (and their parents) if missing.
pub fn ensure_maildir(dir: &Path) -> io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    Ok(())
}

/// Converts CRLF to LF (a lone CR stays) and returns the number of LFs written, which is what the
/// CRLF form adds to the size.
fn to_lf(input: &[u8], out: &mut Vec<u8>) -> usize {
    let mut lines = 0;
    let mut rest = input;
    while let Some(pos) = memchr::memchr(b'\n', rest) {
        let line_end = if pos > 0 && rest[pos - 1] == b'\r' {
            pos - 1
        } else {
            pos
        };
        out.extend_from_slice(&rest[..line_end]);
        out.push(b'\n');
        lines += 1;
        rest = &rest[pos + 1..];
    }
    out.extend_from_slice(rest);
    lines
}

struct Pending {
    index: usize,
    file: File,
    tmp_path: PathBuf,
    new_path: PathBuf,
    folder_dir: PathBuf,
}

impl MailStore for Maildir {
    fn deliver(&self, batch: &[Delivery<'_>]) -> Vec<Result<(), StoreError>> {
        let mut results: Vec<Result<(), StoreError>> = (0..batch.len()).map(|_| Ok(())).collect();
        let mut pending = Vec::new();
        for (index, delivery) in batch.iter().enumerate() {
            match self.write_tmp(delivery) {
                Ok(Some((file, tmp_path, new_path, folder_dir))) => pending.push(Pending {
                    index,
                    file,
                    tmp_path,
                    new_path,
                    folder_dir,
                }),
                Ok(None) => {} // already delivered by an earlier attempt
                Err(err) => results[index] = Err(err),
            }
        }
        if pending.is_empty() {
            return results;
        }
        let files: Vec<&File> = pending.iter().map(|p| &p.file).collect();
        let synced = durable::sync_files(&files).map_err(StoreError::from_io);
        let mut dirs = BTreeSet::new();
        for p in &pending {
            let outcome = match &synced {
                Ok(()) => fs::rename(&p.tmp_path, &p.new_path).map_err(StoreError::from_io),
                Err(err) => Err(StoreError::Io(io::Error::other(err.to_string()))),
            };
            match outcome {
                Ok(()) => {
                    dirs.insert(p.folder_dir.join("new"));
                }
                Err(err) => {
                    let _ = fs::remove_file(&p.tmp_path);
                    results[p.index] = Err(err);
                }
            }
        }
        for dir in dirs {
            if let Err(err) = durable::sync_dir(&dir) {
                for p in pending.iter().filter(|p| p.folder_dir.join("new") == dir) {
                    results[p.index] = Err(StoreError::from_io(io::Error::new(
                        err.kind(),
                        err.to_string(),
                    )));
                }
            }
        }
        results
    }
}

type Written = (File, PathBuf, PathBuf, PathBuf);

impl Maildir {
    fn write_tmp(&self, delivery: &Delivery<'_>) -> Result<Option<Written>, StoreError> {
        let folder_dir = self.folder_path(delivery.mailbox, delivery.folder)?;
        ensure_maildir(&folder_dir).map_err(StoreError::from_io)?;
        let base = self.base_name(delivery);
        if delivery.retry
            && Self::already_delivered(&folder_dir, &base).map_err(StoreError::from_io)?
        {
            return Ok(None);
        }
        let mut content = Vec::with_capacity(delivery.prepend.len() + delivery.message.len());
        let mut lf_count = to_lf(delivery.prepend, &mut content);
        lf_count += to_lf(delivery.message, &mut content);
        let size = content.len();
        let name = format!("{base},S={size},W={}", size + lf_count);
        let tmp_path = folder_dir.join("tmp").join(&name);
        let new_path = folder_dir.join("new").join(&name);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(StoreError::from_io)?;
        if let Err(err) = file.write_all(&content) {
            let _ = fs::remove_file(&tmp_path);
            return Err(StoreError::from_io(err));
        }
        Ok(Some((file, tmp_path, new_path, folder_dir)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery<'a>(id: &'a str, message: &'a [u8]) -> Delivery<'a> {
        Delivery {
            mailbox: "alice@example.test",
            folder: "INBOX",
            delivery_id: id,
            retry: true,
            received_at: 1700000000,
            prepend: b"Return-Path: <s@x.test>\r\n",
            message,
        }
    }

    #[test]
    fn delivers_with_lf_endings_and_sizes_in_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let results = store.deliver(&[delivery("A_0", b"Subject: hi\r\n\r\nbody\r\n")]);
        assert!(results[0].is_ok());
        let new_dir = dir.path().join("example.test/alice/new");
        let entries: Vec<_> = fs::read_dir(&new_dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        assert_eq!(entries.len(), 1);
        let content = fs::read(entries[0].path()).unwrap();
        assert_eq!(content, b"Return-Path: <s@x.test>\nSubject: hi\n\nbody\n");
        let name = entries[0].file_name().into_string().unwrap();
        assert!(name.ends_with(",S=42,W=46"), "{name}");
        assert!(fs::read_dir(dir.path().join("example.test/alice/tmp"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn redelivery_of_same_id_is_idempotent_even_after_move_to_cur() {
        let dir = tempfile::tempdir().unwrap();
        let store = Maildir::new(dir.path(), "mx.test");
        let msg = b"x\r\n";
        store
            .deliver(&[delivery("B_0", msg)])
            .into_iter()
            .for_each(|r| r.unwrap());
        let user = dir.path().join("example.test/alice");
        let name = fs::read_dir(user.join("new"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        fs::rename(
            user.join("new").join(&name),
            user.join("cur")
                .join(format!("{}:2,S", name.to_string_lossy())),
        )
        .unwrap();
        store
            .deliver(&[delivery("B_0", msg)])
            .into_iter()
            .for_each(|r| r.unwrap());
        assert_eq!(fs::read_dir(user.join("new")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(user.join("cur")).unwrap().count(), 1);
    }

    #[test]
    fn folders_and_hostile_names() {
        let store = Maildir::new("/m", "h");
        assert_eq!(
            store.folder_path("bob@example.test", "Lists/Rust").unwrap(),
            PathBuf::from("/m/example.test/bob/.Lists.Rust")
        );
        assert!(store.folder_path("../x@example.test", "INBOX").is_err());
        assert!(store.folder_path("bob@..", "INBOX").is_err());
        assert!(store.folder_path("bob@example.test", "../../etc").is_err());
    }
}
