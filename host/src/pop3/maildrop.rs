//! The TRANSACTION-state view of a maildrop (RFC 1939 §5): the messages as they were at login,
//! numbered from 1, with deletion marks that only take effect in the UPDATE state.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::store::{FolderSnapshot, MessageInfo};

/// Which maildrops have a POP3 session in the TRANSACTION state (RFC 1939 §8: exclusive access).
#[derive(Default)]
pub struct MaildropLocks {
    held: Mutex<HashSet<String>>,
}

/// Holds a maildrop until dropped (however the session ends).
pub struct MaildropLock {
    locks: Arc<MaildropLocks>,
    user: String,
}

impl MaildropLocks {
    pub fn try_lock(self: &Arc<Self>, user: &str) -> Option<MaildropLock> {
        let mut held = self.held.lock().expect("maildrop locks");
        held.insert(user.to_string()).then(|| MaildropLock {
            locks: self.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        self.locks
            .held
            .lock()
            .expect("maildrop locks")
            .remove(&self.user);
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaildropError {
    #[error("No such message")]
    NoSuchMessage,
    #[error("Message is deleted")]
    Deleted,
}

pub struct Maildrop {
    pub user: String,
    snapshot: FolderSnapshot,
    deleted: Vec<bool>,
    retrieved: Vec<bool>,
    _lock: MaildropLock,
}

/// What the UPDATE state does.
pub struct Update<'a> {
    pub remove: Vec<&'a MessageInfo>,
    pub mark_seen: Vec<&'a MessageInfo>,
}

impl Maildrop {
    pub fn new(user: String, snapshot: FolderSnapshot, lock: MaildropLock) -> Maildrop {
        let count = snapshot.messages.len();
        Maildrop {
            user,
            snapshot,
            deleted: vec![false; count],
            retrieved: vec![false; count],
            _lock: lock,
        }
    }

    /// Message `number` (1-based), unless it does not exist or is marked deleted.
    pub fn get(&self, number: u32) -> Result<&MessageInfo, MaildropError> {
        let index = (number as usize)
            .checked_sub(1)
            .filter(|i| *i < self.deleted.len())
            .ok_or(MaildropError::NoSuchMessage)?;
        if self.deleted[index] {
            return Err(MaildropError::Deleted);
        }
        Ok(&self.snapshot.messages[index])
    }

    /// (message count, octets) of the messages not marked deleted.
    pub fn stat(&self) -> (usize, u64) {
        self.live()
            .fold((0, 0), |(n, size), (_, m)| (n + 1, size + m.size))
    }

    /// The messages not marked deleted, with their numbers.
    pub fn live(&self) -> impl Iterator<Item = (u32, &MessageInfo)> {
        self.snapshot
            .messages
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.deleted[*i])
            .map(|(i, m)| (i as u32 + 1, m))
    }

    /// The unique-id listing (RFC 1939 §7): the IMAP UID and UIDVALIDITY, formatted as Dovecot's
    /// default `%08Xu%08Xv`, so POP3 and IMAP name a message the same way.
    pub fn uidl(&self, message: &MessageInfo) -> String {
        format!("{:08X}{:08X}", message.uid, self.snapshot.uid_validity)
    }

    pub fn delete(&mut self, number: u32) -> Result<(), MaildropError> {
        self.get(number)?;
        self.deleted[number as usize - 1] = true;
        Ok(())
    }

    pub fn mark_retrieved(&mut self, number: u32) {
        if let Some(flag) = self.retrieved.get_mut((number as usize).wrapping_sub(1)) {
            *flag = true;
        }
    }

    pub fn reset(&mut self) {
        self.deleted.iter_mut().for_each(|d| *d = false);
    }

    /// The UPDATE state's work. `expire` decides, for a message not deleted by the client,
    /// whether the server's retention policy removes it anyway (given whether it was retrieved).
    pub fn update(&self, expire: impl Fn(&MessageInfo, bool) -> bool) -> Update<'_> {
        let mut update = Update {
            remove: Vec::new(),
            mark_seen: Vec::new(),
        };
        for (i, message) in self.snapshot.messages.iter().enumerate() {
            if self.deleted[i] || expire(message, self.retrieved[i]) {
                update.remove.push(message);
            } else if self.retrieved[i] {
                update.mark_seen.push(message);
            }
        }
        update
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Flags;

    fn maildrop(locks: &Arc<MaildropLocks>) -> Maildrop {
        let messages = (1..=3)
            .map(|uid| MessageInfo {
                uid,
                key: format!("k{uid}"),
                handle: crate::store::MessageHandle::new(format!("new/k{uid}")),
                size: 100 * uid as u64,
                flags: Flags::empty(),
                keywords: Default::default(),
                received_at: 0,
                modseq: 1,
            })
            .collect();
        let snapshot = FolderSnapshot {
            uid_validity: 0x5F00_0000,
            uid_next: 4,
            messages,
            keywords: Vec::new(),
            more_keywords: true,
            highest_modseq: 1,
        };
        Maildrop::new("a@x".into(), snapshot, locks.try_lock("a@x").unwrap())
    }

    #[test]
    fn numbering_deletion_and_reset() {
        let locks = Arc::new(MaildropLocks::default());
        let mut drop = maildrop(&locks);
        assert_eq!(drop.stat(), (3, 600));
        assert_eq!(drop.get(0), Err(MaildropError::NoSuchMessage));
        assert_eq!(drop.get(4), Err(MaildropError::NoSuchMessage));
        drop.delete(2).unwrap();
        assert_eq!(drop.delete(2), Err(MaildropError::Deleted));
        assert_eq!(drop.get(2), Err(MaildropError::Deleted));
        assert_eq!(drop.stat(), (2, 400));
        assert_eq!(drop.live().map(|(n, _)| n).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(drop.uidl(drop.get(3).unwrap()), "000000035F000000");
        drop.mark_retrieved(1);
        let update = drop.update(|_, _| false);
        assert_eq!(update.remove.len(), 1);
        assert_eq!(update.mark_seen[0].uid, 1);
        drop.reset();
        assert_eq!(drop.stat(), (3, 600));
    }

    #[test]
    fn one_session_per_maildrop() {
        let locks = Arc::new(MaildropLocks::default());
        let first = maildrop(&locks);
        assert!(locks.try_lock("a@x").is_none());
        assert!(locks.try_lock("b@x").is_some());
        std::mem::drop(first);
        assert!(locks.try_lock("a@x").is_some());
    }
}
