//! Making writes durable, cheaply for batches, and the data directory's lock.
//!
//! A message is acknowledged only after its bytes and its directory entry are on disk. Every file
//! is flushed with its own `fdatasync`, because only that reports a write-back error for that
//! file: `syncfs` does not on kernels before 5.8, so a batch flushed with it could be
//! acknowledged after a failed write. A batch first starts write-back of all its files
//! (`sync_file_range`), so the flushes that follow overlap instead of waiting one by one.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Flushes the data (and the metadata needed to read it back) of every file to stable storage;
/// an error of any one of them is returned.
pub fn sync_files(files: &[&File]) -> io::Result<()> {
    if files.len() > 1 {
        for file in files {
            // SAFETY: the fd is valid for the duration of the call (borrowed from a live File).
            // Only starts write-back; errors are reported by the fdatasync below.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
    }
    for file in files {
        file.sync_data()?;
    }
    Ok(())
}

/// Creates `dir` and any missing parents, flushing the parent of every directory it created,
/// so that a file acknowledged inside a new directory cannot vanish with it after a power loss
/// (ext4 and XFS journal new entries, but POSIX promises nothing until the parent is flushed).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.is_dir() {
        missing.push(at);
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    for new in missing.iter().rev() {
        match std::fs::create_dir(new) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && new.is_dir() => continue,
            Err(err) => return Err(err),
        }
        if let Some(parent) = new.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`): a rename must never
/// replace a file silently, such as a spooled message under a reused name.
pub fn rename_new(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let from_c = CString::new(from.as_os_str().as_bytes())?;
    let to_c = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        // A filesystem without RENAME_NOREPLACE: a hard link fails if the target exists.
        std::fs::hard_link(from, to)?;
        return std::fs::remove_file(from);
    }
    Err(err)
}

/// The data directory's lock: an exclusive `flock` on the pid file, which also names the pid
/// of the holder. Released when dropped or when the process dies (kill -9 included).
pub struct DirectoryLock {
    _file: File,
}

#[derive(Debug)]
pub enum LockError {
    /// Another process holds the lock; its pid as the file says.
    Held {
        pid: String,
    },
    Io(io::Error),
}

impl DirectoryLock {
    pub fn acquire(pid_file: &Path) -> Result<DirectoryLock, LockError> {
        use std::io::{Read, Seek};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(pid_file)
            .map_err(LockError::Io)?;
        // SAFETY: a valid fd borrowed from the live File.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim().to_string();
                return Err(LockError::Held {
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid
                    },
                });
            }
            return Err(LockError::Io(err));
        }
        file.set_len(0).map_err(LockError::Io)?;
        file.rewind().map_err(LockError::Io)?;
        writeln!(file, "{}", std::process::id()).map_err(LockError::Io)?;
        Ok(DirectoryLock { _file: file })
    }
}

/// Writes `bytes` to `tmp`, flushes them, and renames the file to `target`, so `target` holds
/// either its old content or all of the new, never a part. The rename itself is durable only
/// once the caller flushes `target`'s directory ([`sync_dir`]), which callers writing several
/// files do once for all. A failed write leaves no `tmp` behind.
pub fn write_and_rename(tmp: &Path, target: &Path, bytes: &[u8]) -> io::Result<()> {
    let write = || -> io::Result<()> {
        let mut file = File::create(tmp)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        std::fs::rename(tmp, target)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(tmp);
    })
}

/// Writes `bytes` to a new file at `path` without flushing it; the caller flushes it (with
/// others) through [`sync_all`]. A failed write leaves no file behind.
pub fn write_unsynced(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let write = || -> io::Result<File> {
        let mut file = File::create(path)?;
        file.write_all(bytes)?;
        Ok(file)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Appends `bytes` to an existing file, leaving them to be flushed by [`sync_all`].
pub fn append_unsynced(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(bytes)?;
    Ok(file)
}

/// Makes the writes to `files` and the renames in `dirs` durable. (Flushing them from threads
/// side by side, or with one `syncfs`, measured no faster here: a flush is cheap on this disk and
/// the threads or the global flush cost more than they saved under load.)
pub fn sync_all(files: &[&File], dirs: &[&Path]) -> io::Result<()> {
    for file in files {
        file.sync_data()?;
    }
    for dir in dirs {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Flushes a directory so that renames and new entries in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// True for errors that mean "the disk is full" (reply 452 4.3.1, never 5xx).
pub fn is_disk_full(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn syncs_single_and_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for i in 0..4 {
            let mut f = File::create(dir.path().join(format!("f{i}"))).unwrap();
            f.write_all(b"x").unwrap();
            files.push(f);
        }
        let refs: Vec<&File> = files.iter().collect();
        sync_files(&refs[..1]).unwrap();
        sync_files(&refs).unwrap();
        sync_dir(dir.path()).unwrap();
    }

    #[test]
    fn creates_parents_and_never_renames_over_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_all(&deep).unwrap();
        std::fs::write(dir.path().join("x"), b"new").unwrap();
        std::fs::write(dir.path().join("y"), b"old").unwrap();
        let err = rename_new(&dir.path().join("x"), &dir.path().join("y")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(dir.path().join("y")).unwrap(), b"old");
        rename_new(&dir.path().join("x"), &dir.path().join("z")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("z")).unwrap(), b"new");
    }

    #[test]
    fn the_directory_lock_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("postern.pid");
        let held = DirectoryLock::acquire(&pid).unwrap();
        // flock locks belong to the open file description: a second open conflicts even in
        // the same process.
        match DirectoryLock::acquire(&pid) {
            Err(LockError::Held { pid }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("{:?}", other.err()),
        }
        drop(held);
        DirectoryLock::acquire(&pid).unwrap();
    }
}
