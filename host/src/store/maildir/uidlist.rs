//! The per-folder UID index (`postern-uidlist`), in the spirit of Dovecot's `dovecot-uidlist`.
//!
//! Maildir itself has no message numbers that survive renames, so IMAP UIDs (and the POP3 UIDLs
//! derived from them) live here: a header with UIDVALIDITY and the next UID, then one `<uid> <key>`
//! line per message in UID order, where the key is the unique part of the Maildir file name (it does
//! not change when flags do). New messages are appended as lines (like Dovecot appends to its
//! uidlist): one flush of the file, no new inode, no directory flush. Removals and compaction
//! replace the file whole (write, fsync, rename, fsync the directory). An append cut short by a
//! crash can only leave the last line without its end, which was never acknowledged and is
//! ignored (and the file rewritten before the next append); any other damage rebuilds the index.
//! UIDs are never reused: `next` only grows (past the header's `N` with every appended line),
//! and a lost or damaged index gets a new UIDVALIDITY, which tells clients to forget what they
//! cached (RFC 9051 §2.3.1.1).

use std::collections::HashSet;
use std::sync::Arc;

pub const FILE_NAME: &str = "postern-uidlist";
const MAGIC: &str = "postern-uidlist 1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidList {
    pub validity: u32,
    pub next: u32,
    /// (uid, key) in increasing UID order.
    /// Keys shared, not copied, by the folder's kept index and every listing made from it.
    pub entries: Vec<(u32, Arc<str>)>,
}

impl UidList {
    /// An empty index for a new (or rebuilt) folder. `previous` is the UIDVALIDITY of an index
    /// that was lost, if known: the new one must differ from it.
    pub fn fresh(now: u32, previous: Option<u32>) -> UidList {
        let validity = match previous {
            Some(old) if old >= now => old.wrapping_add(1).max(1),
            _ => now.max(1),
        };
        UidList {
            validity,
            next: 1,
            entries: Vec::new(),
        }
    }

    /// Parses an index; None when it is damaged (the caller rebuilds it).
    pub fn parse(text: &str) -> Option<(UidList, FileState)> {
        // Only the end of an append can be torn: whatever follows the last line end.
        let (whole, torn) = match text.rfind('\n') {
            Some(end) => (&text[..=end], end + 1 < text.len()),
            None => return None,
        };
        let mut lines = whole.lines();
        let header = lines.next()?.strip_prefix(MAGIC)?;
        let mut validity = None;
        let mut next = None;
        for field in header.split_whitespace() {
            if let Some(v) = field.strip_prefix('V') {
                validity = v.parse::<u32>().ok();
            } else if let Some(n) = field.strip_prefix('N') {
                next = n.parse::<u32>().ok();
            }
        }
        let (validity, mut next) = (validity.filter(|v| *v > 0)?, next.filter(|n| *n > 0)?);
        let mut entries = Vec::new();
        let mut last = 0;
        for line in lines {
            let (uid, key) = line.split_once(' ')?;
            let uid: u32 = uid.parse().ok()?;
            if uid <= last || uid == u32::MAX || key.is_empty() || key.contains(['\0', ' ']) {
                return None;
            }
            last = uid;
            next = next.max(uid + 1);
            entries.push((uid, Arc::from(key)));
        }
        let file = FileState {
            lines: entries.len(),
            torn,
        };
        Some((
            UidList {
                validity,
                next,
                entries,
            },
            file,
        ))
    }

    /// The line that appends `(uid, key)` to a stored index.
    pub fn line(uid: u32, key: &str) -> String {
        format!("{uid} {key}\n")
    }

    pub fn render(&self) -> String {
        let mut out = format!("{MAGIC} V{} N{}\n", self.validity, self.next);
        for (uid, key) in &self.entries {
            out.push_str(&Self::line(*uid, key));
        }
        out
    }

    /// Brings the index in line with the keys present in the folder: drops entries whose message
    /// is gone and gives new keys the next UIDs in the order given (arrival order). Returns
    /// whether anything changed.
    pub fn reconcile<'a>(
        &mut self,
        present: &HashSet<&str>,
        new_in_order: impl IntoIterator<Item = &'a str>,
    ) -> Result<bool, UidsExhausted> {
        let before = self.entries.len();
        self.entries.retain(|(_, key)| present.contains(&**key));
        let mut changed = self.entries.len() != before;
        for key in new_in_order {
            if self.next == u32::MAX {
                return Err(UidsExhausted);
            }
            self.entries.push((self.next, Arc::from(key)));
            self.next += 1;
            changed = true;
        }
        Ok(changed)
    }
}

/// What an index file held when it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileState {
    /// Entry lines, counting those of messages gone since.
    pub lines: usize,
    /// The file ends in an unfinished append: rewrite it before appending to it.
    pub torn: bool,
}

impl FileState {
    /// Whether entries new to `now` may be appended to the file rather than the file replaced:
    /// it has no torn end, and not so many lines of messages gone that it is worth compacting.
    pub fn appendable(&self, now: &UidList) -> bool {
        !self.torn && self.lines <= 2 * now.entries.len() + 64
    }
}

/// The folder used every UID (2^32 - 1 arrivals); it must be rebuilt with a new UIDVALIDITY.
#[derive(Debug, PartialEq, Eq)]
pub struct UidsExhausted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut list = UidList::fresh(1_700_000_000, None);
        let present: HashSet<&str> = ["a", "b"].into_iter().collect();
        assert!(list.reconcile(&present, ["a", "b"]).unwrap());
        let text = list.render();
        assert_eq!(
            text,
            "postern-uidlist 1 V1700000000 N3\n1 a\n2 b\n".to_string()
        );
        let (parsed, file) = UidList::parse(&text).unwrap();
        assert_eq!(parsed, list);
        assert_eq!(
            file,
            FileState {
                lines: 2,
                torn: false
            }
        );
        assert_eq!(UidList::parse("postern-uidlist 1 V5 N9\n2 a\n2 b\n"), None);
        assert_eq!(UidList::parse("postern-uidlist 1 V5 N9\n3 a\n2 b\n"), None);
        assert_eq!(UidList::parse("postern-uidlist 1 V5 N9\n3\n"), None);
        assert_eq!(UidList::parse("postern-uidlist 1 V5 N9\nx a\n"), None);
        assert_eq!(UidList::parse("postern-uidlist 1 V0 N9\n"), None);
        assert_eq!(UidList::parse("garbage\n"), None);
        assert_eq!(UidList::parse(""), None);
    }

    #[test]
    fn appended_lines_move_next_on_and_a_torn_append_is_ignored() {
        let mut text = "postern-uidlist 1 V5 N2\n1 a\n".to_string();
        text.push_str(&UidList::line(2, "b"));
        text.push_str(&UidList::line(3, "c"));
        let (list, file) = UidList::parse(&text).unwrap();
        assert_eq!(list.next, 4);
        assert_eq!(list.entries.len(), 3);
        assert!(file.appendable(&list));
        // A crash in the middle of appending line 4: cut anywhere, or the length extended but
        // the bytes never written (zeros).
        for cut in ["4", "4 d", "\0\0\0\0"] {
            let (list, file) = UidList::parse(&format!("{text}{cut}")).unwrap();
            assert_eq!((list.next, list.entries.len()), (4, 3), "{cut:?}");
            assert!(file.torn && !file.appendable(&list));
        }
        // Only the end can be torn: a bad line before it is damage.
        assert_eq!(UidList::parse(&format!("{text}\0\0\n4 d\n")), None);
    }

    #[test]
    fn many_lines_of_messages_gone_call_for_a_rewrite() {
        let mut text = "postern-uidlist 1 V5 N1\n".to_string();
        for uid in 1..=100 {
            text.push_str(&UidList::line(uid, &format!("k{uid}")));
        }
        let (mut list, file) = UidList::parse(&text).unwrap();
        assert!(file.appendable(&list));
        let present: HashSet<&str> = ["k1", "k2"].into_iter().collect();
        list.reconcile(&present, []).unwrap();
        assert!(!file.appendable(&list));
        assert_eq!(list.next, 101);
    }

    #[test]
    fn uids_are_never_reused() {
        let mut list = UidList::fresh(100, None);
        let ab: HashSet<&str> = ["a", "b"].into_iter().collect();
        list.reconcile(&ab, ["a", "b"]).unwrap();
        let bc: HashSet<&str> = ["b", "c"].into_iter().collect();
        assert!(list.reconcile(&bc, ["c"]).unwrap());
        assert_eq!(list.entries, vec![(2, "b".into()), (3, "c".into())]);
        assert!(!list.reconcile(&bc, []).unwrap());
    }

    #[test]
    fn rebuilt_index_changes_validity() {
        assert_eq!(UidList::fresh(100, Some(100)).validity, 101);
        assert_eq!(UidList::fresh(100, Some(50)).validity, 100);
    }
}
