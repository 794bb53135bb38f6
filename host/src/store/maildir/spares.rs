//! Spare message files: the file of an expunged message, emptied and kept under `tmp/`, becomes
//! the file of the folder's next new message.
//!
//! Why: ext4 without a journal (this project's CI and benchmark machine, and some cloud images)
//! checks, for every inode it allocates, each inode of the block group freed in the last five
//! minutes, reading its deletion time (`recently_deleted()` in fs/ext4/ialloc.c). A mail client's
//! steady churn (one APPEND, one EXPUNGE) frees inodes as fast as it allocates them, so each new
//! file scans more: it was a sixth of the machine's CPU under the IMAP stress benchmark. Reusing
//! the inode skips the scan and the free alike. On a journalled ext4 this changes little.
//!
//! Safety:
//! - A file with other links (COPY hard-links messages between folders) is unlinked, never
//!   emptied: the other folder's copy keeps its bytes.
//! - The expunged message leaves `cur/` by a rename, so no one can open it by its name once it
//!   is a spare. A reader that opened it before checks, after reading, that the name still
//!   names the inode it read (see [`read_in_place`]): message names never come back, so a
//!   file that is still in place was not a spare while it was read.
//! - Spares are emptied before they are kept: an expunged message's bytes do not linger.
//! - A crash leaves spares in `tmp/`, where the Maildir protocol expects only files that were
//!   never delivered; the next use of the folder adopts them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::names::unique_part;

/// Spare names start with a dot, which every Maildir reader skips.
const PREFIX: &str = ".spare.";
/// Kept per folder: enough for a client's burst of expunges, few enough to be free on disk.
const MAX_PER_FOLDER: usize = 16;

/// A folder's spare files, behind the folder's lock.
#[derive(Default)]
pub(super) struct Spares {
    /// Names under `tmp/`; None until `tmp/` was read for spares an earlier run left.
    names: Option<Vec<String>>,
}

impl Spares {
    fn names(&mut self, dir: &Path) -> &mut Vec<String> {
        self.names.get_or_insert_with(|| {
            fs::read_dir(dir.join("tmp"))
                .into_iter()
                .flatten()
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter(|name| name.starts_with(PREFIX))
                .take(MAX_PER_FOLDER)
                .collect()
        })
    }

    /// Takes a message file out of the folder (`location` under `dir`, such as `cur/<name>`):
    /// kept as an empty spare when it may be, unlinked otherwise. NotFound when it is not there.
    pub(super) fn discard(&mut self, dir: &Path, location: &str) -> io::Result<()> {
        let path = dir.join(location);
        if self.names(dir).len() >= MAX_PER_FOLDER {
            return fs::remove_file(path);
        }
        let name = format!("{PREFIX}{}", unique_part());
        let spare = dir.join("tmp").join(&name);
        if let Err(err) = fs::rename(&path, &spare) {
            if err.kind() == io::ErrorKind::NotFound {
                return Err(err);
            }
            return fs::remove_file(path);
        }
        // From here the message is out of the folder; what follows only decides about the inode.
        let emptied = OpenOptions::new()
            .write(true)
            .open(&spare)
            .and_then(|file| {
                if file.metadata()?.nlink() > 1 {
                    return Err(io::Error::other("linked elsewhere"));
                }
                file.set_len(0)
            });
        match emptied {
            Ok(()) => self.names(dir).push(name),
            Err(_) => {
                let _ = fs::remove_file(&spare);
            }
        }
        Ok(())
    }

    /// A spare's path to write the next new message into, if the folder has one.
    pub(super) fn take(&mut self, dir: &Path) -> Option<PathBuf> {
        self.names(dir).pop().map(|name| dir.join("tmp").join(name))
    }
}

/// Writes a new message file at `path` (under the folder's `tmp/`), in the inode of `spare` when
/// given one (from [`Spares::take`]). The bytes are not flushed: the caller flushes them with the
/// rest of its batch.
pub(super) fn write_new(spare: Option<PathBuf>, path: &Path, bytes: &[u8]) -> io::Result<File> {
    if let Some(spare) = spare {
        if crate::durable::rename_new(&spare, path).is_ok() {
            let written = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .and_then(|mut file| file.write_all(bytes).map(|()| file));
            if written.is_ok() {
                return written;
            }
            let _ = fs::remove_file(path);
        } else {
            // `path` is taken (a delivery retried after a crash): the spare is not needed.
            let _ = fs::remove_file(&spare);
        }
    }
    crate::durable::write_unsynced(path, bytes)
}

/// Reads a message file, or NotFound when `path` no longer names the file that was read: it was
/// expunged (and its inode perhaps reused as a spare) or renamed while being read.
pub(super) fn read_in_place(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let opened = file.metadata()?;
    let mut bytes = Vec::with_capacity(opened.len() as usize);
    io::Read::read_to_end(&mut file, &mut bytes)?;
    let now = fs::metadata(path)?;
    if (now.dev(), now.ino()) != (opened.dev(), opened.ino()) {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        dir
    }

    #[test]
    fn an_expunged_file_is_emptied_and_its_inode_holds_the_next_message() {
        let dir = folder();
        let d = dir.path();
        fs::write(d.join("cur/a:2,S"), b"old secret").unwrap();
        let inode = fs::metadata(d.join("cur/a:2,S")).unwrap().ino();
        let mut spares = Spares::default();
        spares.discard(d, "cur/a:2,S").unwrap();
        assert!(!d.join("cur/a:2,S").exists());
        let kept: Vec<_> = fs::read_dir(d.join("tmp")).unwrap().collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            fs::metadata(kept[0].as_ref().unwrap().path())
                .unwrap()
                .len(),
            0
        );
        let file = write_new(spares.take(d), &d.join("tmp/b"), b"new").unwrap();
        drop(file);
        assert_eq!(fs::read(d.join("tmp/b")).unwrap(), b"new");
        assert_eq!(fs::metadata(d.join("tmp/b")).unwrap().ino(), inode);
        assert_eq!(fs::read_dir(d.join("tmp")).unwrap().count(), 1);
        // Gone is gone: NotFound as before.
        let missing = spares.discard(d, "cur/a:2,S").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_linked_from_another_folder_keeps_its_bytes() {
        let dir = folder();
        let d = dir.path();
        fs::write(d.join("cur/a"), b"shared").unwrap();
        fs::hard_link(d.join("cur/a"), d.join("copy")).unwrap();
        let mut spares = Spares::default();
        spares.discard(d, "cur/a").unwrap();
        assert_eq!(fs::read(d.join("copy")).unwrap(), b"shared");
        assert_eq!(fs::read_dir(d.join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn spares_left_by_an_earlier_run_are_adopted_and_the_pool_is_bounded() {
        let dir = folder();
        let d = dir.path();
        for n in 0..MAX_PER_FOLDER + 4 {
            fs::write(d.join(format!("tmp/{PREFIX}{n}")), b"").unwrap();
        }
        let mut spares = Spares::default();
        fs::write(d.join("cur/last"), b"x").unwrap();
        spares.discard(d, "cur/last").unwrap();
        // The pool was full: unlinked, not kept.
        assert_eq!(
            fs::read_dir(d.join("tmp")).unwrap().count(),
            MAX_PER_FOLDER + 4
        );
        write_new(spares.take(d), &d.join("tmp/new"), b"n").unwrap();
        assert_eq!(
            fs::read_dir(d.join("tmp")).unwrap().count(),
            MAX_PER_FOLDER + 4
        );
    }

    #[test]
    fn a_read_in_place_reads_the_file_or_finds_it_gone() {
        let dir = folder();
        let d = dir.path();
        fs::write(d.join("cur/a"), b"bytes").unwrap();
        assert_eq!(read_in_place(&d.join("cur/a")).unwrap(), b"bytes");
        Spares::default().discard(d, "cur/a").unwrap();
        let gone = read_in_place(&d.join("cur/a")).unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
    }
}
