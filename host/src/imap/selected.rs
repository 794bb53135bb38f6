//! The selected mailbox as one session sees it: message sequence numbers, UIDs and flags, and
//! the untagged responses that bring the client up to date when the folder changed (RFC 9051
//! §5.2, §7.4.1, §7.5.1).
//!
//! The store is the truth; this view only changes when the session reports a change to its
//! client. Another session's expunge is therefore invisible here until it may be announced,
//! which keeps sequence numbers stable during FETCH, STORE and SEARCH as the RFC requires.

use super::fetch;
use super::search::{contains, ranges};
use crate::store::{Flags, FolderSnapshot, MessageInfo};
use imap_codec::imap_types::sequence::SequenceSet;

pub struct Selected {
    pub folder: String,
    pub read_only: bool,
    pub uid_validity: u32,
    pub uid_next: u32,
    /// In UID order: the message with sequence number n is `messages[n - 1]`.
    pub messages: Vec<MessageInfo>,
}

impl Selected {
    pub fn new(folder: String, read_only: bool, snapshot: FolderSnapshot) -> Selected {
        Selected {
            folder,
            read_only,
            uid_validity: snapshot.uid_validity,
            uid_next: snapshot.uid_next,
            messages: snapshot.messages,
        }
    }

    pub fn exists(&self) -> u32 {
        self.messages.len() as u32
    }

    pub fn last_uid(&self) -> u32 {
        self.messages.last().map(|m| m.uid).unwrap_or(0)
    }

    /// Indexes (sequence number - 1) of the messages a set names, in increasing order. For UIDs,
    /// `*` is the highest UID present; a UID range names only messages that exist.
    pub fn resolve(&self, set: &SequenceSet, uid: bool) -> Vec<usize> {
        if uid {
            // RFC 9051 §6.4.8: `n:*` includes the last message even when n is larger.
            let ranges = ranges(set, self.last_uid());
            self.messages
                .iter()
                .enumerate()
                .filter(|(_, m)| contains(&ranges, m.uid))
                .map(|(i, _)| i)
                .collect()
        } else {
            let ranges = ranges(set, self.exists());
            (0..self.messages.len())
                .filter(|i| contains(&ranges, *i as u32 + 1))
                .collect()
        }
    }

    /// Whether a sequence set names only messages that exist (RFC 9051 §6.4.5: otherwise BAD).
    pub fn valid_sequence(&self, set: &SequenceSet) -> bool {
        ranges(set, self.exists())
            .iter()
            .all(|(low, high)| *low >= 1 && *high <= self.exists())
    }

    /// Takes a fresh listing and returns the untagged responses that report the difference:
    /// EXPUNGE (highest first, so each number is right when it is read), FETCH FLAGS for
    /// changed flags, then EXISTS. With `expunge_allowed = false` vanished messages stay in the
    /// view (their numbers must not move yet) and only additions and flag changes are told.
    pub fn refresh(&mut self, snapshot: FolderSnapshot, expunge_allowed: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if snapshot.uid_validity != self.uid_validity {
            // The folder was rebuilt: the client must start over.
            out.extend_from_slice(
                b"* BYE [UIDVALIDITY] Folder index was rebuilt, please reconnect\r\n",
            );
            return out;
        }
        let fresh = snapshot.messages;
        if expunge_allowed {
            let vanished: Vec<usize> = (0..self.messages.len())
                .filter(|i| {
                    let uid = self.messages[*i].uid;
                    fresh.binary_search_by_key(&uid, |m| m.uid).is_err()
                })
                .collect();
            out.extend_from_slice(&self.expunged(vanished));
        }
        for (i, message) in self.messages.iter_mut().enumerate() {
            if let Ok(at) = fresh.binary_search_by_key(&message.uid, |m| m.uid) {
                let now = &fresh[at];
                if now.flags != message.flags {
                    message.flags = now.flags;
                    out.extend_from_slice(format!("* {} FETCH (FLAGS ", i + 1).as_bytes());
                    fetch::flags(&mut out, message.flags);
                    out.extend_from_slice(b")\r\n");
                }
                message.location.clone_from(&now.location);
            }
        }
        let last = self.last_uid();
        let before = self.messages.len();
        self.messages
            .extend(fresh.into_iter().filter(|m| m.uid > last));
        if self.messages.len() != before {
            out.extend_from_slice(format!("* {} EXISTS\r\n", self.messages.len()).as_bytes());
        }
        self.uid_next = snapshot.uid_next.max(self.uid_next);
        out
    }

    /// Forgets expunged messages (by index) and returns their EXPUNGE responses.
    pub fn expunged(&mut self, mut indexes: Vec<usize>) -> Vec<u8> {
        indexes.sort_unstable();
        indexes.dedup();
        let mut out = Vec::new();
        for i in indexes.into_iter().rev() {
            if i < self.messages.len() {
                self.messages.remove(i);
                out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
            }
        }
        out
    }

    pub fn first_unseen(&self) -> Option<u32> {
        self.messages
            .iter()
            .position(|m| !m.flags.contains(Flags::SEEN))
            .map(|i| i as u32 + 1)
    }
}

/// A compact UID set (`1:3,7`) for COPYUID and ESEARCH.
pub fn uid_set(mut uids: Vec<u32>) -> String {
    uids.sort_unstable();
    uids.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// COPYUID keeps the source and target sets in the same order (RFC 4315 §3): compacted when
/// both ascend together (the store numbers copies in source order), else listed one by one.
pub fn paired_sets(pairs: &[(u32, u32)]) -> (String, String) {
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable();
    if pairs.windows(2).all(|w| w[0].1 < w[1].1) {
        return (
            uid_set(pairs.iter().map(|(a, _)| *a).collect()),
            uid_set(pairs.iter().map(|(_, b)| *b).collect()),
        );
    }
    let from: Vec<String> = pairs.iter().map(|(a, _)| a.to_string()).collect();
    let to: Vec<String> = pairs.iter().map(|(_, b)| b.to_string()).collect();
    (from.join(","), to.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(uid: u32, flags: Flags) -> MessageInfo {
        MessageInfo {
            uid,
            key: format!("k{uid}"),
            location: String::new(),
            size: 10,
            flags,
            received_at: 0,
        }
    }

    fn snap(messages: Vec<MessageInfo>) -> FolderSnapshot {
        FolderSnapshot {
            uid_validity: 7,
            uid_next: messages.last().map(|m| m.uid + 1).unwrap_or(1),
            messages,
        }
    }

    #[test]
    fn refresh_reports_expunges_flags_and_arrivals() {
        let e = Flags::empty();
        let mut view = Selected::new(
            "INBOX".into(),
            false,
            snap(vec![info(1, e), info(2, e), info(3, e), info(4, e)]),
        );
        let fresh = snap(vec![info(1, e), info(3, Flags::SEEN), info(5, e)]);
        let out = view.refresh(fresh.clone(), false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* 3 FETCH (FLAGS (\\Seen))\r\n* 5 EXISTS\r\n",
            "no EXPUNGE while not allowed; numbers stay"
        );
        let out = view.refresh(fresh, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* 4 EXPUNGE\r\n* 2 EXPUNGE\r\n"
        );
        assert_eq!(
            view.messages.iter().map(|m| m.uid).collect::<Vec<_>>(),
            [1, 3, 5]
        );
    }

    #[test]
    fn sets() {
        let e = Flags::empty();
        let view = Selected::new("INBOX".into(), false, snap(vec![info(3, e), info(9, e)]));
        assert_eq!(
            view.resolve(&SequenceSet::try_from("2:*").unwrap(), false),
            [1]
        );
        assert_eq!(
            view.resolve(&SequenceSet::try_from("4:*").unwrap(), true),
            [1]
        );
        assert_eq!(
            view.resolve(&SequenceSet::try_from("20:*").unwrap(), true),
            [1]
        );
        assert_eq!(
            view.resolve(&SequenceSet::try_from("1:5").unwrap(), true),
            [0]
        );
        assert!(!view.valid_sequence(&SequenceSet::try_from("3").unwrap()));
        assert_eq!(uid_set(vec![5, 1, 2, 3, 9]), "1:3,5,9");
        let owned = |(a, b): (&str, &str)| (a.to_string(), b.to_string());
        assert_eq!(
            paired_sets(&[(3, 8), (1, 6), (2, 7), (9, 10)]),
            owned(("1:3,9", "6:8,10"))
        );
        // Not ascending together: pairs spelled out so positions still match.
        assert_eq!(paired_sets(&[(1, 7), (2, 6)]), owned(("1,2", "7,6")));
    }
}
