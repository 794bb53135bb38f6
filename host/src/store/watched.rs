//! A store wrapper that announces every change to a mailbox, so IMAP sessions on it (IDLE, or
//! another client's session) learn of new mail and flag changes without polling the disk.
//!
//! Announcements say only which mailbox changed (and in which folder, or that its folder list or
//! subscriptions did), and who changed it; a session that hears one
//! re-reads its folder and works out the differences itself, so a missed or merged announcement
//! never loses an update. A session skips its own announcements: it already knows what it did.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::{
    Delivery, FlagChange, FlagOutcome, FolderSnapshot, MailStore, MessageInfo, StoreError,
};

/// Announcements are small and sessions re-read on any of them; a session that falls this far
/// behind just treats the lag as "something changed".
const BACKLOG: usize = 1024;

/// The mailbox of an announcement that concerns every mailbox (no address is `*`).
pub const ANY_MAILBOX: &str = "*";

/// One announcement.
#[derive(Debug, Clone)]
pub struct Change {
    /// The mailbox (user key), lower-cased, or [`ANY_MAILBOX`].
    pub mailbox: Arc<str>,
    /// Who wrote: the session id of the handle it went through ([`Watched::as_writer`]), 0 for
    /// everyone else (delivery, POP3).
    pub writer: u64,
    /// The folder whose messages changed; None when folders were created, deleted or renamed,
    /// or subscriptions changed.
    pub folder: Option<Arc<str>>,
}

/// The store, and who is writing through this handle: 0 for everyone but IMAP sessions
/// (delivery, POP3), a session's id for the handle it was given ([`Watched::as_writer`]).
#[derive(Clone)]
pub struct Watched {
    shared: Arc<Shared>,
    writer: u64,
}

struct Shared {
    inner: Arc<dyn MailStore>,
    changes: broadcast::Sender<Change>,
}

impl Watched {
    pub fn new(inner: Arc<dyn MailStore>) -> Watched {
        Watched {
            shared: Arc::new(Shared {
                inner,
                changes: broadcast::channel(BACKLOG).0,
            }),
            writer: 0,
        }
    }

    /// The same store for session `writer`: what is changed through it is announced as that
    /// session's, so the session can skip its own announcements.
    pub fn as_writer(&self, writer: u64) -> Watched {
        Watched {
            shared: self.shared.clone(),
            writer,
        }
    }

    /// Mailboxes as they change.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.shared.changes.subscribe()
    }

    /// A change made elsewhere (another node sharing the store): `mailbox` None when anything
    /// may have changed, as after a lost connection to the other nodes' announcements.
    pub fn changed_elsewhere(&self, mailbox: Option<&str>, folder: Option<&str>) {
        let _ = self.shared.changes.send(Change {
            mailbox: Arc::from(mailbox.map_or(ANY_MAILBOX.to_string(), str::to_ascii_lowercase)),
            writer: 0,
            folder: folder.map(Arc::from),
        });
    }

    fn inner(&self) -> &dyn MailStore {
        &*self.shared.inner
    }

    fn announce(&self, mailbox: &str, folder: Option<&str>) {
        let _ = self.shared.changes.send(Change {
            mailbox: Arc::from(mailbox.to_ascii_lowercase()),
            writer: self.writer,
            folder: folder.map(Arc::from),
        });
    }

    fn announce_if<T>(
        &self,
        mailbox: &str,
        folder: Option<&str>,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if result.is_ok() {
            self.announce(mailbox, folder);
        }
        result
    }
}

/// Counts and times one store call (`postern_store_operations_total`,
/// `postern_store_operation_seconds`): every backend is called through here.
fn timed<T>(
    op: &'static str,
    call: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let result = call();
    crate::telemetry::metrics::get().store_op(op, started.elapsed(), result.is_ok());
    result
}

impl MailStore for Watched {
    fn deliver(&self, batch: &[Delivery<'_>]) -> Vec<Result<(), StoreError>> {
        let started = std::time::Instant::now();
        let results = self.inner().deliver(batch);
        crate::telemetry::metrics::get().store_op(
            "deliver",
            started.elapsed(),
            results.iter().all(Result::is_ok),
        );
        let mut told: Vec<(&str, &str)> = Vec::new();
        for (delivery, result) in batch.iter().zip(&results) {
            let place = (delivery.mailbox, delivery.folder);
            if result.is_ok() && !told.contains(&place) {
                told.push(place);
                self.announce(delivery.mailbox, Some(delivery.folder));
            }
        }
        results
    }

    fn reads_inline(&self, mailbox: &str) -> bool {
        self.inner().reads_inline(mailbox)
    }

    fn snapshot(&self, mailbox: &str, folder: &str) -> Result<FolderSnapshot, StoreError> {
        timed("snapshot", || self.inner().snapshot(mailbox, folder))
    }

    fn read(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Vec<u8>, StoreError> {
        timed("read", || self.inner().read(mailbox, folder, message))
    }

    fn read_header(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Arc<[u8]>, StoreError> {
        timed("read_header", || {
            self.inner().read_header(mailbox, folder, message)
        })
    }

    fn read_range(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        timed("read_range", || {
            self.inner().read_range(mailbox, folder, message, range)
        })
    }

    fn read_headers(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Vec<Result<Arc<[u8]>, StoreError>> {
        {
            let started = std::time::Instant::now();
            let results = self.inner().read_headers(mailbox, folder, messages);
            crate::telemetry::metrics::get().store_op(
                "read_headers",
                started.elapsed(),
                results.iter().all(Result::is_ok),
            );
            results
        }
    }

    fn change_flags(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        change: &FlagChange,
        unchanged_since: Option<u64>,
    ) -> Result<FlagOutcome, StoreError> {
        let result = timed("change_flags", || {
            self.inner()
                .change_flags(mailbox, folder, messages, change, unchanged_since)
        });
        if result
            .as_ref()
            .is_ok_and(|outcome| !outcome.updated.is_empty())
        {
            self.announce(mailbox, Some(folder));
        }
        result
    }

    fn import(
        &self,
        mailbox: &str,
        folder: &str,
        numbers: super::ImportedFolder,
        messages: &[super::Imported<'_>],
    ) -> Result<(), StoreError> {
        let result = timed("import", || {
            self.inner().import(mailbox, folder, numbers, messages)
        });
        self.announce_if(mailbox, Some(folder), result)
    }

    fn remove(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Result<(), StoreError> {
        let result = timed("remove", || self.inner().remove(mailbox, folder, messages));
        self.announce_if(mailbox, Some(folder), result)
    }

    fn append(
        &self,
        mailbox: &str,
        folder: &str,
        message: &[u8],
        flags: super::Flags,
        keywords: &super::Keywords,
        received_at: i64,
    ) -> Result<(u32, u32), StoreError> {
        let result = timed("append", || {
            self.inner()
                .append(mailbox, folder, message, flags, keywords, received_at)
        });
        self.announce_if(mailbox, Some(folder), result)
    }

    fn copy(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        target: &str,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        let result = timed("copy", || {
            self.inner().copy(mailbox, folder, messages, target)
        });
        self.announce_if(mailbox, Some(target), result)
    }

    fn folders(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        timed("folders", || self.inner().folders(mailbox))
    }

    fn create_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        let result = timed("create_folder", || {
            self.inner().create_folder(mailbox, folder)
        });
        self.announce_if(mailbox, None, result)
    }

    fn delete_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        let result = timed("delete_folder", || {
            self.inner().delete_folder(mailbox, folder)
        });
        self.announce_if(mailbox, None, result)
    }

    fn rename_folder(&self, mailbox: &str, from: &str, to: &str) -> Result<(), StoreError> {
        let result = timed("rename_folder", || {
            self.inner().rename_folder(mailbox, from, to)
        });
        self.announce_if(mailbox, None, result)
    }

    fn subscriptions(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        timed("subscriptions", || self.inner().subscriptions(mailbox))
    }

    fn recent_boundary(
        &self,
        mailbox: &str,
        folder: &str,
        validity: u32,
        claim: Option<u32>,
    ) -> Result<u32, StoreError> {
        timed("recent_boundary", || {
            self.inner()
                .recent_boundary(mailbox, folder, validity, claim)
        })
    }

    fn set_subscribed(
        &self,
        mailbox: &str,
        folder: &str,
        subscribed: bool,
    ) -> Result<(), StoreError> {
        let result = timed("set_subscribed", || {
            self.inner().set_subscribed(mailbox, folder, subscribed)
        });
        self.announce_if(mailbox, None, result)
    }

    fn metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>, StoreError> {
        timed("metadata", || self.inner().metadata(mailbox, folder))
    }

    fn set_metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
        changes: &[(String, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        timed("set_metadata", || {
            self.inner().set_metadata(mailbox, folder, changes)
        })
    }

    fn usage(&self, mailbox: &str) -> Result<super::Usage, StoreError> {
        timed("usage", || self.inner().usage(mailbox))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::maildir::Maildir;
    use crate::store::Flags;

    #[test]
    fn the_watched_store_meets_the_mailbox_contract() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        crate::store::conformance::run_all(&|| {
            Arc::new(Watched::new(Arc::new(Maildir::new(&root, "host"))))
        });
    }

    #[test]
    fn announcements_name_their_writer() {
        let dir = tempfile::tempdir().unwrap();
        let watched = Watched::new(Arc::new(Maildir::new(dir.path(), "host")));
        let mut changes = watched.subscribe();
        let message = b"Subject: x\r\n\r\nbody\r\n";
        watched
            .as_writer(7)
            .append(
                "Alice@Example.Test",
                "INBOX",
                message,
                Flags::empty(),
                &Default::default(),
                0,
            )
            .unwrap();
        watched
            .append(
                "alice@example.test",
                "INBOX",
                message,
                Flags::empty(),
                &Default::default(),
                0,
            )
            .unwrap();
        let first = changes.try_recv().unwrap();
        assert_eq!((&*first.mailbox, first.writer), ("alice@example.test", 7));
        let second = changes.try_recv().unwrap();
        assert_eq!(second.writer, 0, "the shared handle writes as nobody");
    }
}
