//! The spool: where an accepted message lives, durably, until it is delivered.
//!
//! One file per message, `queue/<id>`: a magic line, the envelope as one JSON line, then the message
//! bytes. A file is written under `tmp/`, flushed, renamed into `queue/` and the directory flushed
//! before the client hears 250, so a file in `queue/` is always complete; a file in `tmp/` never was
//! acknowledged and is removed at start.
//!
//! With `[database] queue = true` the spool is the database's `queue` table instead (see
//! `store::postgres::queue`), shared by every node: a message and its envelope are one row,
//! committed before the 250, and the node that stored it holds it by a lease that it renews while
//! it lives ([`keep_leases`](super::keep_leases)); another node takes over what a dead one held.
//!
//! Flushing is group-committed: sessions hand their written files to one committer thread, which
//! takes everything that queued up while it was busy and makes the whole batch durable with one
//! flush of the files and one of the directory. Throughput then grows with concurrency instead of
//! being capped at one message per disk flush. The database spool commits its batch as one
//! transaction the same way.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use super::envelope::{Envelope, QueueId};
use super::Hold;
use crate::durable;
use crate::store::postgres::{PgStore, QueueRow};

const MAGIC: &[u8] = b"POSTERN-SPOOL 1\n";
/// The most files one group commit takes; bounds the latency of the first in the batch.
const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool disk is full: {0}")]
    Full(io::Error),
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("spool file {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("spool committer has stopped")]
    Stopped,
    #[error("queue database unavailable: {0}")]
    Unavailable(String),
    /// Delivered, or taken over by another node after this node's lease ran out.
    #[error("message {0} is no longer this node's to deliver")]
    Gone(QueueId),
}

impl SpoolError {
    fn from_write(err: io::Error) -> SpoolError {
        if durable::is_disk_full(&err) {
            SpoolError::Full(err)
        } else {
            SpoolError::Io(err)
        }
    }
}

/// What a session hands the committer, and where it hears how the commit went.
struct CommitRequest<T> {
    item: T,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// The committer thread of one kind of spool: files to flush and rename, or rows to insert.
type Committer<T> = std_mpsc::Sender<CommitRequest<T>>;

/// Where the spool keeps its messages.
enum Backing {
    Files {
        tmp_dir: PathBuf,
        queue_dir: PathBuf,
        committer: Committer<Written>,
    },
    Database {
        store: Arc<PgStore>,
        lease: Duration,
        hold: Hold,
        committer: Committer<QueueRow>,
    },
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<SpoolInner>,
}

struct SpoolInner {
    backing: Arc<Backing>,
    /// Shared queue: messages this node holds but could not read (the database was down), for
    /// the lease keeper to read again.
    deferred: std::sync::Mutex<Vec<QueueId>>,
    sequence: AtomicU64,
    /// Random per process: ids stay unique when the clock steps back across a restart.
    instance: u32,
}

/// 32 random bits from the kernel (the clock is not trusted for uniqueness).
fn random_u32() -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    // SAFETY: writes at most 4 bytes into the local buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != 4 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes(bytes))
}

impl Spool {
    /// Opens (creating) the spool under `root` and starts its committer thread. Leftovers in
    /// `tmp/` were never acknowledged and are removed.
    pub fn open(root: &Path) -> io::Result<Spool> {
        let tmp_dir = root.join("tmp");
        let queue_dir = root.join("queue");
        durable::create_dir_all(&tmp_dir)?;
        durable::create_dir_all(&queue_dir)?;
        for entry in fs::read_dir(&tmp_dir)? {
            let _ = fs::remove_file(entry?.path());
        }
        let committer = {
            let queue_dir = queue_dir.clone();
            spawn_committer(move |batch| commit_files(batch, &queue_dir))?
        };
        Spool::start(Backing::Files {
            tmp_dir,
            queue_dir,
            committer,
        })
    }

    /// The queue shared by every node through the database: messages this node stores are
    /// leased to it for `lease` at a time.
    pub fn shared(store: Arc<PgStore>, lease: Duration) -> io::Result<Spool> {
        let committer = {
            let store = store.clone();
            spawn_committer(move |batch| commit_rows(batch, &store, lease))?
        };
        Spool::start(Backing::Database {
            store,
            lease,
            hold: Hold::leased(lease),
            committer,
        })
    }

    fn start(backing: Backing) -> io::Result<Spool> {
        Ok(Spool {
            inner: Arc::new(SpoolInner {
                backing: Arc::new(backing),
                deferred: Default::default(),
                sequence: AtomicU64::new(0),
                instance: random_u32()?,
            }),
        })
    }

    /// Shared queue: hands a message this node holds back to the lease keeper, to be read and
    /// delivered again once the database answers (its row stays leased to this node, so no
    /// other node takes it meanwhile). The file spool needs none: its files are there at the
    /// next start.
    pub fn defer(&self, id: &str) {
        if self.database().is_some() {
            self.inner
                .deferred
                .lock()
                .expect("deferred ids")
                .push(id.to_string());
        }
    }

    /// What [`Spool::defer`] handed back, taken.
    pub fn take_deferred(&self) -> Vec<QueueId> {
        std::mem::take(&mut *self.inner.deferred.lock().expect("deferred ids"))
    }

    /// The database and lease, when the queue is shared.
    pub fn database(&self) -> Option<(Arc<PgStore>, Duration)> {
        match &*self.inner.backing {
            Backing::Database { store, lease, .. } => Some((store.clone(), *lease)),
            Backing::Files { .. } => None,
        }
    }

    /// Whether this node may still deliver what it holds (always, with the file spool).
    pub fn hold(&self) -> Hold {
        match &*self.inner.backing {
            Backing::Database { hold, .. } => hold.clone(),
            Backing::Files { .. } => Hold::default(),
        }
    }

    /// A new queue id: microseconds since the epoch (so ids roughly sort by arrival), this
    /// process's random instance, and a sequence number, in hex. Uniqueness rests on the
    /// instance and the sequence, not the clock: a clock that steps back across a restart
    /// cannot make an id repeat (and the spool's rename refuses to replace a file anyway). Ids
    /// also name Maildir files (`store::maildir`), so a repeat would pass for a redelivery.
    pub fn new_id(&self) -> QueueId {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let seq = self.inner.sequence.fetch_add(1, Ordering::Relaxed);
        format!(
            "{micros:013X}{:08X}{:08X}",
            self.inner.instance,
            seq & 0xFFFF_FFFF
        )
    }

    /// Writes the message and its envelope and returns once both are durable.
    pub async fn store(
        &self,
        envelope: &Envelope,
        message: Arc<Vec<u8>>,
    ) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        let sent = match &*self.inner.backing {
            Backing::Files {
                tmp_dir,
                queue_dir,
                committer,
            } => {
                let mut header = Vec::with_capacity(512);
                header.extend_from_slice(MAGIC);
                serde_json::to_writer(&mut header, envelope).map_err(io::Error::other)?;
                header.push(b'\n');
                let tmp_path = tmp_dir.join(&envelope.id);
                let final_path = queue_dir.join(&envelope.id);
                let write_path = tmp_path.clone();
                let file = tokio::task::spawn_blocking(move || -> Result<File, SpoolError> {
                    let mut file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&write_path)
                        .map_err(SpoolError::from_write)?;
                    let written = file
                        .write_all(&header)
                        .and_then(|_| file.write_all(&message));
                    if let Err(err) = written {
                        drop(file);
                        let _ = fs::remove_file(&write_path);
                        return Err(SpoolError::from_write(err));
                    }
                    Ok(file)
                })
                .await
                .map_err(|_| SpoolError::Stopped)??;
                let item = (file, tmp_path, final_path);
                committer.send(CommitRequest { item, done }).is_ok()
            }
            Backing::Database { committer, .. } => {
                let json = serde_json::to_string(envelope).map_err(io::Error::other)?;
                let item = (envelope.id.clone(), json, message);
                committer.send(CommitRequest { item, done }).is_ok()
            }
        };
        if !sent {
            return Err(SpoolError::Stopped);
        }
        wait.await.map_err(|_| SpoolError::Stopped)?
    }

    /// Ids of every message in the queue, oldest first (blocking). With the shared queue: the
    /// messages whose lease ran out (a node died, or this one restarted), now leased to this
    /// node.
    pub fn list(&self) -> io::Result<Vec<QueueId>> {
        match &*self.inner.backing {
            Backing::Files { queue_dir, .. } => {
                let mut ids: Vec<QueueId> = fs::read_dir(queue_dir)?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect();
                ids.sort();
                Ok(ids)
            }
            Backing::Database { store, lease, .. } => {
                let mut ids = Vec::new();
                loop {
                    let claimed = store.queue_claim(*lease, 500).map_err(io::Error::other)?;
                    if claimed.is_empty() {
                        return Ok(ids);
                    }
                    ids.extend(claimed);
                }
            }
        }
    }

    /// Reads a spooled message (blocking).
    pub fn read(&self, id: &str) -> Result<(Envelope, Vec<u8>), SpoolError> {
        let queue_dir = match &*self.inner.backing {
            Backing::Files { queue_dir, .. } => queue_dir,
            Backing::Database { store, .. } => {
                let (json, message) = store
                    .queue_read(id)
                    .map_err(|e| SpoolError::Unavailable(e.to_string()))?
                    .ok_or_else(|| SpoolError::Gone(id.to_string()))?;
                let envelope: Envelope =
                    serde_json::from_str(&json).map_err(|e| SpoolError::Damaged {
                        path: PathBuf::from(format!("queue row {id}")),
                        reason: format!("envelope: {e}"),
                    })?;
                return Ok((envelope, message));
            }
        };
        let path = queue_dir.join(id);
        let damaged = |reason: &str| SpoolError::Damaged {
            path: path.clone(),
            reason: reason.to_string(),
        };
        let mut reader = BufReader::new(File::open(&path)?);
        let mut magic = vec![0u8; MAGIC.len()];
        reader.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(damaged("bad magic"));
        }
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line)?;
        let envelope: Envelope =
            serde_json::from_slice(&line).map_err(|e| damaged(&format!("envelope: {e}")))?;
        let mut message = Vec::with_capacity(envelope.message_len as usize);
        reader.read_to_end(&mut message)?;
        if message.len() as u64 != envelope.message_len {
            return Err(damaged("message length differs from envelope"));
        }
        Ok((envelope, message))
    }

    /// Replaces a spooled message and its envelope with a changed version (the after-queue
    /// filter's), durably, before any copy of it is delivered (blocking). The file is rewritten
    /// under `tmp/` and renamed over the old one, so a crash leaves either version whole, never
    /// a mix; `Gone` when the message is no longer spooled.
    pub fn replace(&self, envelope: &Envelope, message: &[u8]) -> Result<(), SpoolError> {
        let json = serde_json::to_string(envelope).map_err(io::Error::other)?;
        let (tmp_dir, queue_dir) = match &*self.inner.backing {
            Backing::Files {
                tmp_dir, queue_dir, ..
            } => (tmp_dir, queue_dir),
            Backing::Database { store, .. } => {
                return match store.queue_replace(&envelope.id, &json, message) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(SpoolError::Gone(envelope.id.clone())),
                    Err(err) => Err(SpoolError::Unavailable(err.to_string())),
                };
            }
        };
        let target = queue_dir.join(&envelope.id);
        if !target.exists() {
            return Err(SpoolError::Gone(envelope.id.clone()));
        }
        let mut bytes = Vec::with_capacity(MAGIC.len() + json.len() + 1 + message.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(json.as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(message);
        // Not the name `store` writes under: that one is created new, this one replaced.
        let tmp = tmp_dir.join(format!("{}.filtered", envelope.id));
        durable::write_and_rename(&tmp, &target, &bytes).map_err(SpoolError::from_write)?;
        durable::sync_dir(queue_dir).map_err(SpoolError::from_write)
    }

    /// Removes delivered messages (blocking). The directory is flushed so that a crash does not
    /// bring them back; if it did, delivery is idempotent (see `store::maildir`).
    pub fn remove(&self, ids: &[QueueId]) -> io::Result<()> {
        let queue_dir = match &*self.inner.backing {
            Backing::Files { queue_dir, .. } => queue_dir,
            Backing::Database { store, .. } => {
                return store.queue_delete(ids).map_err(io::Error::other)
            }
        };
        for id in ids {
            match fs::remove_file(queue_dir.join(id)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        durable::sync_dir(queue_dir)
    }
}

/// Starts a committer thread: it takes what sessions hand it in batches (as many as are
/// waiting, up to `MAX_BATCH`) and commits each batch at once (group commit: one flush for
/// many sessions).
fn spawn_committer<T: Send + 'static>(
    commit: impl Fn(Vec<CommitRequest<T>>) + Send + 'static,
) -> io::Result<Committer<T>> {
    let (tx, rx) = std_mpsc::channel::<CommitRequest<T>>();
    std::thread::Builder::new()
        .name("spool-commit".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                commit(batch);
            }
        })?;
    Ok(tx)
}

/// Flushes and renames a batch into `queue/`, and tells each session how it went.
fn commit_files(batch: Vec<CommitRequest<Written>>, queue_dir: &Path) {
    let (files, rest): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|request| (request.item, request.done))
        .unzip();
    let result = commit_batch(&files, queue_dir);
    for (n, ((_, tmp_path, final_path), done)) in files.iter().zip(rest).enumerate() {
        let outcome = match &result {
            Ok(()) => Ok(()),
            Err((renamed, err)) => {
                let _ = fs::remove_file(tmp_path);
                // Only a file this batch renamed into place is removed: a name that was
                // taken belongs to another message.
                if n < *renamed {
                    let _ = fs::remove_file(final_path);
                }
                Err(SpoolError::from_write(io::Error::new(
                    err.kind(),
                    err.to_string(),
                )))
            }
        };
        let _ = done.send(outcome);
    }
}

/// Inserts a batch in one transaction, and tells each session how it went: nothing of a batch
/// whose commit failed is in the queue, so every session answers 451 and its client retries.
fn commit_rows(batch: Vec<CommitRequest<QueueRow>>, store: &PgStore, lease: Duration) {
    let (rows, dones): (Vec<QueueRow>, Vec<_>) = batch
        .into_iter()
        .map(|request| (request.item, request.done))
        .unzip();
    let result = store.queue_insert(&rows, lease);
    for done in dones {
        let _ = done.send(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| SpoolError::Unavailable(e.to_string())),
        );
    }
}

/// A message written to `tmp/`, to be flushed and renamed into `queue/`: the file, its
/// path there and its final path.
type Written = (File, PathBuf, PathBuf);

/// Flushes and renames a batch into `queue/`. On failure: how many were renamed, and why.
fn commit_batch(batch: &[Written], queue_dir: &Path) -> Result<(), (usize, io::Error)> {
    let files: Vec<&File> = batch.iter().map(|(file, _, _)| file).collect();
    durable::sync_files(&files).map_err(|err| (0, err))?;
    for (n, (_, tmp_path, final_path)) in batch.iter().enumerate() {
        durable::rename_new(tmp_path, final_path).map_err(|err| (n, err))?;
    }
    durable::sync_dir(queue_dir).map_err(|err| (batch.len(), err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::envelope::{Recipient, Route};

    fn envelope(id: &str, len: usize) -> Envelope {
        Envelope {
            id: id.into(),
            received_at: 1,
            sender: "a@b.test".into(),
            recipients: vec![Recipient::new(
                "alice@example.test".into(),
                Route::Local {
                    mailbox: "alice@example.test".into(),
                },
            )],
            helo: "client".into(),
            peer: "127.0.0.1".into(),
            auth_user: None,
            smtputf8: false,
            message_len: len as u64,
            quarantine: None,
            filtered: false,
            dsn: Default::default(),
            require_tls: false,
        }
    }

    #[tokio::test]
    async fn concurrent_stores_are_durable_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                let id = spool.new_id();
                let body = Arc::new(format!("message {i}\r\n").into_bytes());
                spool.store(&envelope(&id, body.len()), body).await.unwrap();
                id
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        let mut listed = spool.list().unwrap();
        listed.sort();
        ids.sort();
        assert_eq!(listed, ids);
        let (env, msg) = spool.read(&ids[0]).unwrap();
        assert_eq!(env.id, ids[0]);
        assert!(msg.starts_with(b"message "));
        spool.remove(&ids).unwrap();
        assert!(spool.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_replaced_message_reads_back_whole_and_a_gone_one_is_not_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = spool.new_id();
        let body = Arc::new(b"Subject: a\r\n\r\nbody\r\n".to_vec());
        spool.store(&envelope(&id, body.len()), body).await.unwrap();
        let changed = b"Subject: a\r\nX-Scanned: yes\r\n\r\nbody\r\n";
        let mut filtered = envelope(&id, changed.len());
        filtered.filtered = true;
        spool.replace(&filtered, changed).unwrap();
        assert_eq!(
            spool.read(&id).unwrap(),
            (filtered.clone(), changed.to_vec())
        );
        assert_eq!(spool.list().unwrap(), vec![id.clone()]);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        spool.remove(std::slice::from_ref(&id)).unwrap();
        assert!(matches!(
            spool.replace(&filtered, changed),
            Err(SpoolError::Gone(_))
        ));
        assert!(spool.list().unwrap().is_empty());
    }

    #[test]
    fn truncated_file_is_reported_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let env = envelope("X1", 100);
        let mut bytes = MAGIC.to_vec();
        bytes.extend(serde_json::to_vec(&env).unwrap());
        bytes.extend(b"\nshort");
        fs::write(dir.path().join("queue/X1"), bytes).unwrap();
        assert!(matches!(spool.read("X1"), Err(SpoolError::Damaged { .. })));
    }

    #[tokio::test]
    async fn ids_do_not_rest_on_the_clock_and_a_taken_name_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let first = Spool::open(dir.path()).unwrap().new_id();
        // A restart whose clock went back would see the same time: the instance part differs.
        let again = Spool::open(dir.path()).unwrap();
        let second = again.new_id();
        assert_ne!(first[13..21], second[13..21], "{first} {second}");
        // A message already spooled under an id is not overwritten by another with that id.
        let id = again.new_id();
        let old = Arc::new(b"first message\r\n".to_vec());
        again.store(&envelope(&id, old.len()), old).await.unwrap();
        let new = Arc::new(b"second message\r\n".to_vec());
        assert!(again.store(&envelope(&id, new.len()), new).await.is_err());
        let (_, bytes) = again.read(&id).unwrap();
        assert_eq!(bytes, b"first message\r\n");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
