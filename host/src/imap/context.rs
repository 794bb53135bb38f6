//! Searches kept up to date (RFC 5267 §4, CONTEXT=SEARCH): `SEARCH RETURN (UPDATE …)` leaves
//! its criteria with the selected folder, and every change to the folder's view is told as
//! `ESEARCH (TAG "t") ADDTO`/`REMOVEFROM` (result sets) or a fresh `MIN`/`MAX`/`COUNT`.
//!
//! Messages that leave the result by being expunged are told at once, with the numbers they had,
//! before their EXPUNGE responses (`Selected::expunged`); everything else is found by
//! re-running the search after a command or an IDLE wake-up, when the view changed.

use std::hash::{Hash, Hasher};

use imap_codec::imap_types::search::SearchKey;

use crate::imap::codec;
use crate::imap::selected::uid_set;
use crate::store::MessageInfo;

/// At most this many searches are kept up to date per session; more are answered once with
/// `NOUPDATE` (RFC 5267 §4.3.1), so a client cannot make every change cost many searches.
pub const MAX_UPDATES: usize = 5;

/// What a kept search reports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// The result set itself: ADDTO and REMOVEFROM.
    All,
    /// Only some of MIN, MAX, COUNT: sent afresh when they change.
    Summary { min: bool, max: bool, count: bool },
}

/// One search kept up to date.
pub struct Kept {
    pub tag: String,
    pub key: SearchKey<'static>,
    pub uid: bool,
    pub reported: Reported,
    /// The result as last told, as UIDs, ascending.
    pub result: Vec<u32>,
    /// The view this result was computed on (see [`fingerprint`]).
    pub seen: u64,
}

/// A digest of a view's messages, their flags and mod-sequences: a kept search needs running
/// again only when it changed.
pub fn fingerprint(messages: &[MessageInfo]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for message in messages {
        message.uid.hash(&mut hasher);
        message.flags.bits().hash(&mut hasher);
        message.modseq.hash(&mut hasher);
    }
    hasher.finish()
}

fn head(out: &mut Vec<u8>, kept: &Kept) {
    out.extend_from_slice(b"* ESEARCH (TAG ");
    codec::string(out, kept.tag.as_bytes());
    out.push(b')');
    if kept.uid {
        out.extend_from_slice(b" UID");
    }
}

/// `ADDTO`/`REMOVEFROM` with position 0, which RFC 5267 §4.3.2 gives unsorted (SEARCH) results.
fn change_line(out: &mut Vec<u8>, kept: &Kept, what: &str, numbers: Vec<u32>) {
    if numbers.is_empty() {
        return;
    }
    head(out, kept);
    out.extend_from_slice(format!(" {what} (0 {})\r\n", uid_set(numbers)).as_bytes());
}

impl Kept {
    /// Messages about to be expunged (indexes into `messages`, the view before the expunge):
    /// those in the result leave it, told with the numbers they have now. A summary is left
    /// stale, to be sent again after the command.
    pub fn expunging(&mut self, out: &mut Vec<u8>, messages: &[MessageInfo], indexes: &[usize]) {
        let mut gone = Vec::new();
        for index in indexes {
            let uid = messages[*index].uid;
            if let Ok(at) = self.result.binary_search(&uid) {
                self.result.remove(at);
                gone.push(if self.uid { uid } else { *index as u32 + 1 });
            }
        }
        match self.reported {
            Reported::All => change_line(out, self, "REMOVEFROM", gone),
            Reported::Summary { .. } if !gone.is_empty() => self.seen = 0,
            Reported::Summary { .. } => {}
        }
    }

    fn items(&self, out: &mut Vec<u8>, messages: &[MessageInfo], found: &[u32]) {
        let number = |uid: u32| -> u32 {
            if self.uid {
                uid
            } else {
                messages.partition_point(|m| m.uid < uid) as u32 + 1
            }
        };
        let (min, max, count, all) = match self.reported {
            Reported::All => (false, false, false, true),
            Reported::Summary { min, max, count } => (min, max, count, false),
        };
        if let (true, Some(first)) = (min, found.first()) {
            out.extend_from_slice(format!(" MIN {}", number(*first)).as_bytes());
        }
        if let (true, Some(last)) = (max, found.last()) {
            out.extend_from_slice(format!(" MAX {}", number(*last)).as_bytes());
        }
        if count {
            out.extend_from_slice(format!(" COUNT {}", found.len()).as_bytes());
        }
        if all && !found.is_empty() {
            let numbers = found.iter().map(|uid| number(*uid)).collect();
            out.extend_from_slice(format!(" ALL {}", uid_set(numbers)).as_bytes());
        }
    }

    /// Tells how the result `now` (UIDs, ascending, in the view `messages`) differs from the
    /// one last told, and keeps it.
    pub fn changed(&mut self, out: &mut Vec<u8>, messages: &[MessageInfo], now: Vec<u32>) {
        if now == self.result {
            return;
        }
        match self.reported {
            Reported::All => {
                let number = |uid: &u32| -> Option<u32> {
                    if self.uid {
                        return Some(*uid);
                    }
                    messages
                        .binary_search_by_key(uid, |m| m.uid)
                        .ok()
                        .map(|at| at as u32 + 1)
                };
                let removed = self
                    .result
                    .iter()
                    .filter(|uid| now.binary_search(uid).is_err())
                    .filter_map(number)
                    .collect();
                let added = now
                    .iter()
                    .filter(|uid| self.result.binary_search(uid).is_err())
                    .filter_map(number)
                    .collect();
                change_line(out, self, "REMOVEFROM", removed);
                change_line(out, self, "ADDTO", added);
            }
            Reported::Summary { .. } => {
                head(out, self);
                self.items(out, messages, &now);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.result = now;
    }
}
