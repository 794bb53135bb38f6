//! Mailbox events (WIT 0.2.0 `mailbox-event`): what users do in their mailboxes, told to the
//! plugins that export the hook, after the client had its answer.
//!
//! Sessions hand an event to a bounded queue and go on; one task tells the plugins, in order,
//! each event in a plugin session of its own. A full queue drops the event (and says so in the
//! log): a slow or stuck plugin must never hold up a mailbox, and a lost training sample costs
//! less than a client waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::chain::{FolderRef, MailboxAction, MailboxEvent};
use super::{PluginRuntime, PluginSession, Stage};
use crate::store::{Flags, Keywords};

/// Events waiting at most; past it new ones are dropped.
const QUEUE: usize = 1024;

pub struct MailboxEvents {
    runtime: Arc<PluginRuntime>,
    queue: mpsc::Sender<(MailboxEvent, Arc<Vec<u8>>)>,
    dropped: AtomicU64,
}

impl MailboxEvents {
    /// Starts the task that tells the plugins (on the current runtime).
    pub fn start(runtime: Arc<PluginRuntime>) -> Arc<MailboxEvents> {
        let (queue, mut events) = mpsc::channel::<(MailboxEvent, Arc<Vec<u8>>)>(QUEUE);
        let task_runtime = runtime.clone();
        tokio::spawn(async move {
            while let Some((event, message)) = events.recv().await {
                let mut plugins = PluginSession::new(task_runtime.clone());
                plugins.on_mailbox_event(&event, &message).await;
            }
        });
        Arc::new(MailboxEvents {
            runtime,
            queue,
            dropped: AtomicU64::new(0),
        })
    }

    /// Whether any loaded plugin listens: sessions read messages for events only then.
    pub fn wanted(&self) -> bool {
        self.runtime.current().has(Stage::MailboxEvent)
    }

    pub fn tell(&self, event: MailboxEvent, message: Arc<Vec<u8>>) {
        if self.queue.try_send((event, message)).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped,
                "mailbox-event plugins are behind; an event was dropped"
            );
        }
    }
}

/// A folder as events name it, with its special use from `[imap] special_folders`.
pub fn folder_ref(name: &str, special: &std::collections::BTreeMap<String, String>) -> FolderRef {
    FolderRef {
        name: name.to_string(),
        special_use: special.get(name).cloned(),
    }
}

/// RFC 9051 §2.3.2 system flags; `$Forwarded` is a keyword there (RFC 5550).
const SYSTEM_FLAGS: [(Flags, &str); 6] = [
    (Flags::SEEN, "\\Seen"),
    (Flags::ANSWERED, "\\Answered"),
    (Flags::FLAGGED, "\\Flagged"),
    (Flags::DELETED, "\\Deleted"),
    (Flags::DRAFT, "\\Draft"),
    (Flags::FORWARDED, "$Forwarded"),
];

/// An event for one message.
pub fn event(
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
        flags: SYSTEM_FLAGS
            .iter()
            .filter(|(flag, _)| flags.contains(*flag))
            .map(|(_, name)| name.to_string())
            .chain(keywords.iter().map(String::from))
            .collect(),
    }
}
