//! Mailbox events (WIT 0.2.0 `mailbox-event`): what users do in their mailboxes, told to the
//! plugins that export the hook, after the client had its answer.
//!
//! Sessions hand an event to a bounded queue and go on; one task tells the plugins, in order,
//! each event in a plugin session of its own. A full queue drops the event (and says so in the
//! log): a slow or stuck plugin must never hold up a mailbox, and a lost training sample costs
//! less than a client waiting. The messages queued are bounded in bytes as well as in number,
//! and sessions read a message for an event only while there is room for it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::chain::{FolderRef, MailboxAction, MailboxEvent};
use super::{PluginRuntime, PluginSession, Stage};
use crate::store::{Flags, Keywords};

/// Events waiting at most; past it new ones are dropped.
const QUEUE: usize = 1024;
/// Bytes of messages waiting at most (a COPY of a large folder must not read it all into memory).
const QUEUE_BYTES: usize = 64 << 20;

pub struct MailboxEvents {
    runtime: Arc<PluginRuntime>,
    queue: mpsc::Sender<(MailboxEvent, Arc<Vec<u8>>)>,
    /// Bytes of the messages queued and being told.
    queued: Arc<AtomicUsize>,
    dropped: AtomicU64,
}

impl MailboxEvents {
    /// Starts the task that tells the plugins (on the current runtime).
    pub fn start(runtime: Arc<PluginRuntime>) -> Arc<MailboxEvents> {
        let (queue, mut events) = mpsc::channel::<(MailboxEvent, Arc<Vec<u8>>)>(QUEUE);
        let task_runtime = runtime.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        let told = queued.clone();
        tokio::spawn(async move {
            while let Some((event, message)) = events.recv().await {
                let mut plugins = PluginSession::new(task_runtime.clone());
                plugins.on_mailbox_event(&event, &message).await;
                told.fetch_sub(message.len(), Ordering::AcqRel);
            }
        });
        Arc::new(MailboxEvents {
            runtime,
            queue,
            queued,
            dropped: AtomicU64::new(0),
        })
    }

    /// Bytes of messages that may still be queued now: a session reads messages for events
    /// only up to it.
    pub fn room(&self) -> usize {
        QUEUE_BYTES.saturating_sub(self.queued.load(Ordering::Acquire))
    }

    /// Counts events a session left out for want of room.
    pub fn dropped(&self, count: usize) {
        if count > 0 {
            let dropped = self.dropped.fetch_add(count as u64, Ordering::Relaxed) + count as u64;
            tracing::warn!(dropped, "mailbox-event queue full; events were dropped");
        }
    }

    /// Whether any loaded plugin listens: sessions read messages for events only then.
    pub fn wanted(&self) -> bool {
        self.runtime.current().has(Stage::MailboxEvent)
    }

    pub fn tell(&self, event: MailboxEvent, message: Arc<Vec<u8>>) {
        let size = message.len();
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        if before + size > QUEUE_BYTES || self.queue.try_send((event, message)).is_err() {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            self.dropped(1);
        }
    }

    /// Tells one event per message: `action` on `user`'s messages, now in `folder` (from
    /// `source`), each with its flags after the change and its bytes.
    pub fn tell_each(
        &self,
        user: &str,
        action: MailboxAction,
        (folder, source): (&str, Option<&str>),
        special: &std::collections::BTreeMap<String, String>,
        messages: impl IntoIterator<Item = (Flags, Keywords, Vec<u8>)>,
    ) {
        for (flags, keywords, bytes) in messages {
            let event = event(
                user,
                action,
                folder_ref(folder, special),
                source.map(|name| folder_ref(name, special)),
                &flags,
                &keywords,
            );
            self.tell(event, Arc::new(bytes));
        }
    }

    /// Reads the messages events are about, in order, while they fit in the queue's room (on
    /// the store's blocking thread), each with its index in `messages`; the rest are counted
    /// as dropped.
    pub fn read(
        &self,
        messages: &[crate::store::MessageInfo],
        mut read: impl FnMut(&crate::store::MessageInfo) -> Option<Vec<u8>>,
    ) -> Vec<(usize, Vec<u8>)> {
        let mut room = self.room();
        let mut out = Vec::new();
        let mut left_out = 0;
        for (index, message) in messages.iter().enumerate() {
            let size = message.size as usize;
            if size > room {
                left_out += 1;
                continue;
            }
            if let Some(body) = read(message) {
                room -= size;
                out.push((index, body));
            }
        }
        self.dropped(left_out);
        out
    }
}

/// A folder as events name it, with its special use from `[imap] special_folders`.
fn folder_ref(name: &str, special: &std::collections::BTreeMap<String, String>) -> FolderRef {
    FolderRef {
        name: name.to_string(),
        special_use: special.get(name).cloned(),
    }
}

/// An event for one message.
fn event(
    user: &str,
    action: MailboxAction,
    folder: FolderRef,
    source: Option<FolderRef>,
    flags: &Flags,
    keywords: &Keywords,
) -> MailboxEvent {
    MailboxEvent {
        user: user.to_string(),
        action,
        folder,
        source,
        flags: Flags::NAMES
            .iter()
            .filter(|(flag, _)| flags.contains(*flag))
            .map(|(_, name)| name.to_string())
            .chain(keywords.iter().map(String::from))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::UserDirectory;
    use crate::config::{Config, PluginsConfig};
    use crate::store::{MessageHandle, MessageInfo};

    fn message(uid: u32, size: usize) -> MessageInfo {
        MessageInfo {
            uid,
            key: format!("m{uid}"),
            handle: MessageHandle::new(format!("m{uid}")),
            size: size as u64,
            flags: Flags::empty(),
            keywords: Keywords::new(),
            received_at: 0,
            modseq: 1,
        }
    }

    #[tokio::test]
    async fn what_is_queued_is_bounded_in_bytes() {
        let data = tempfile::tempdir().unwrap();
        let users = Arc::new(UserDirectory::from_config(&Config::embedded_default()));
        let runtime = Arc::new(
            PluginRuntime::new(&PluginsConfig::default(), data.path(), users, None).unwrap(),
        );
        let events = MailboxEvents::start(runtime);
        assert_eq!(events.room(), QUEUE_BYTES);
        // 40 + 30 + 10 MiB: the 30 MiB message does not fit after the first, the 10 MiB one does.
        let messages = [
            message(1, 40 << 20),
            message(2, 30 << 20),
            message(3, 10 << 20),
        ];
        let mut asked = Vec::new();
        let read = events.read(&messages, |m| {
            asked.push(m.uid);
            Some(Vec::new())
        });
        assert_eq!(read.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(
            asked,
            [1, 3],
            "a message that does not fit is not even read"
        );
        assert_eq!(events.dropped.load(Ordering::Relaxed), 1);
        // A message larger than the whole queue is dropped and leaves no bytes counted.
        let event = event(
            "alice@example.test",
            MailboxAction::Appended,
            folder_ref("INBOX", &Default::default()),
            None,
            &Flags::empty(),
            &Keywords::new(),
        );
        events.tell(event.clone(), Arc::new(vec![0; QUEUE_BYTES + 1]));
        assert_eq!(events.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(events.room(), QUEUE_BYTES);
        // One that fits is queued, and its bytes are given back once it was told.
        events.tell(event, Arc::new(vec![0; 1 << 20]));
        for _ in 0..200 {
            if events.room() == QUEUE_BYTES {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(events.room(), QUEUE_BYTES);
        assert_eq!(events.dropped.load(Ordering::Relaxed), 2);
    }
}
