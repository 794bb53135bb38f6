//! Delivery: write to `tmp/`, flush every file of the batch at once, rename into `new/`, flush
//! each directory that gained an entry once (the Maildir protocol, batched). Names are stable for
//! a (message, recipient) pair, so a retry after a crash finds the first copy.

use std::fs::{self, File};
use std::io;

use super::*;

type Written = (File, PathBuf, PathBuf, PathBuf);

struct Pending {
    index: usize,
    file: File,
    tmp_path: PathBuf,
    new_path: PathBuf,
    folder_dir: PathBuf,
}

impl Maildir {
    pub(super) fn deliver_batch(&self, batch: &[Delivery<'_>]) -> Vec<Result<(), StoreError>> {
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

    fn base_name(&self, delivery: &Delivery<'_>) -> String {
        format!(
            "{}.Q{}.{}",
            delivery.received_at, delivery.delivery_id, self.host
        )
    }

    /// True when a file for this delivery already exists in `new/` or `cur/`, or did (its key is
    /// still in the UID index: the user expunged it since), so a retry never brings back a
    /// message the user deleted.
    fn already_delivered(dir: &Path, base: &str) -> io::Result<bool> {
        let prefix = format!("{base},");
        let indexed = read_index(dir)?
            .entries
            .iter()
            .any(|(_, key)| key.starts_with(&prefix) || &**key == base);
        if indexed {
            return Ok(true);
        }
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

    fn write_tmp(&self, delivery: &Delivery<'_>) -> Result<Option<Written>, StoreError> {
        let folder_dir = self.folder_path(delivery.mailbox, delivery.folder)?;
        ensure_maildir(&folder_dir).map_err(StoreError::from_io)?;
        let base = self.base_name(delivery);
        if delivery.retry
            && Self::already_delivered(&folder_dir, &base).map_err(StoreError::from_io)?
        {
            return Ok(None);
        }
        let (content, size, crlf_size) = stored_form(delivery.prepend, delivery.message);
        let name = format!("{base},S={size},W={crlf_size}");
        let tmp_path = folder_dir.join("tmp").join(&name);
        let new_path = folder_dir.join("new").join(&name);
        let spare = self
            .folder_lock(&folder_dir)
            .lock()
            .expect("folder lock")
            .spares
            .take(&folder_dir);
        let file = spares::write_new(spare, &tmp_path, &content).map_err(StoreError::from_io)?;
        Ok(Some((file, tmp_path, new_path, folder_dir)))
    }
}
