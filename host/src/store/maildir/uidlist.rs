//! The per-folder UID index (`postern-uidlist`), in the spirit of Dovecot's `dovecot-uidlist`.
//!
//! Maildir itself has no message numbers that survive renames, so IMAP UIDs (and the POP3 UIDLs
//! derived from them) live here: a header with UIDVALIDITY and the next UID, then one `<uid> <key>`
//! line per message in UID order, where the key is the unique part of the Maildir file name (it does
//! not change when flags do). The file is only ever replaced whole (write, fsync, rename, fsync the
//! directory), so after a crash it is either the old or the new version, never a mix. UIDs are
//! never reused: `next` only grows, and a lost or damaged index gets a new UIDVALIDITY, which tells
//! clients to forget what they cached (RFC 9051 §2.3.1.1).

use std::collections::HashSet;

pub const FILE_NAME: &str = "postern-uidlist";
const MAGIC: &str = "postern-uidlist 1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidList {
    pub validity: u32,
    pub next: u32,
    /// (uid, key) in increasing UID order.
    pub entries: Vec<(u32, String)>,
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

    /// Parses an index; None when it is damaged in any way (the caller rebuilds it).
    pub fn parse(text: &str) -> Option<UidList> {
        let mut lines = text.lines();
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
        let (validity, next) = (validity.filter(|v| *v > 0)?, next.filter(|n| *n > 0)?);
        let mut entries = Vec::new();
        let mut last = 0;
        for line in lines {
            let (uid, key) = line.split_once(' ')?;
            let uid: u32 = uid.parse().ok()?;
            if uid <= last || uid >= next || key.is_empty() {
                return None;
            }
            last = uid;
            entries.push((uid, key.to_string()));
        }
        if !text.ends_with('\n') {
            return None; // a torn write (should not happen with rename, but never trust it)
        }
        Some(UidList {
            validity,
            next,
            entries,
        })
    }

    pub fn render(&self) -> String {
        let mut out = format!("{MAGIC} V{} N{}\n", self.validity, self.next);
        for (uid, key) in &self.entries {
            out.push_str(&uid.to_string());
            out.push(' ');
            out.push_str(key);
            out.push('\n');
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
        self.entries
            .retain(|(_, key)| present.contains(key.as_str()));
        let mut changed = self.entries.len() != before;
        for key in new_in_order {
            if self.next == u32::MAX {
                return Err(UidsExhausted);
            }
            self.entries.push((self.next, key.to_string()));
            self.next += 1;
            changed = true;
        }
        Ok(changed)
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
        assert_eq!(UidList::parse(&text), Some(list.clone()));
        assert_eq!(UidList::parse(&text[..text.len() - 1]), None, "torn");
        assert_eq!(UidList::parse("postern-uidlist 1 V5 N2\n1 a\n2 b\n"), None);
        assert_eq!(UidList::parse("postern-uidlist 1 V5 N9\n2 a\n2 b\n"), None);
        assert_eq!(UidList::parse("garbage\n"), None);
        assert_eq!(UidList::parse(""), None);
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
