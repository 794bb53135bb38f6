//! The selected mailbox as one session sees it: message sequence numbers, UIDs and flags, and
//! the untagged responses that bring the client up to date when the folder changed (RFC 9051
//! §5.2, §7.4.1, §7.5.1).
//!
//! The store is the truth; this view only changes when the session reports a change to its
//! client. Another session's expunge is therefore invisible here until it may be announced,
//! which keeps sequence numbers stable during FETCH, STORE and SEARCH as the RFC requires.

use super::context::Kept;
use super::fetch;
use super::search::{is_saved_set, ranges};
use crate::store::{Flags, FolderSnapshot, MessageInfo};
use imap_codec::imap_types::sequence::SequenceSet;

/// What the client enabled that shapes untagged responses (RFC 7162).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// FETCH responses about flag changes carry UID and MODSEQ.
    pub condstore: bool,
    /// Expunges are told as `VANISHED <uids>` instead of `<n> EXPUNGE`.
    pub qresync: bool,
    /// An IMAP4rev1 session: `\Recent` and `* n RECENT` are told (IMAP4rev2 dropped them).
    pub recent: bool,
}

pub struct Selected {
    pub folder: String,
    pub read_only: bool,
    pub uid_validity: u32,
    pub uid_next: u32,
    /// In UID order: the message with sequence number n is `messages[n - 1]`.
    pub messages: Vec<MessageInfo>,
    /// The folder's keyword table as last told to the client (FLAGS).
    pub keywords: Vec<String>,
    /// Whether the store takes keywords the folder has not defined yet (PERMANENTFLAGS `\*`).
    pub more_keywords: bool,
    /// The HIGHESTMODSEQ everything told so far adds up to.
    pub highest_modseq: u64,
    /// UIDs this session sees as \Recent (RFC 3501 §2.3.2).
    pub recent: std::collections::HashSet<u32>,
    /// RFC 5182: the saved search result (`$`), as UIDs, ascending; empty until a SEARCH
    /// RETURN (SAVE).
    pub saved: Vec<u32>,
    /// The command being run named `$` (decoded as `codec::SAVED_RESULT_SET`).
    pub saved_named: bool,
    /// RFC 5267 §4: searches kept up to date.
    pub kept: Vec<Kept>,
}

impl Selected {
    /// `recent_above`: messages with a higher UID are \Recent in this session (None: none).
    pub fn new(
        folder: String,
        read_only: bool,
        snapshot: FolderSnapshot,
        recent_above: Option<u32>,
    ) -> Selected {
        let recent = match recent_above {
            Some(boundary) => snapshot
                .messages
                .iter()
                .filter(|m| m.uid > boundary)
                .map(|m| m.uid)
                .collect(),
            None => Default::default(),
        };
        Selected {
            folder,
            read_only,
            uid_validity: snapshot.uid_validity,
            uid_next: snapshot.uid_next,
            messages: snapshot.messages,
            keywords: snapshot.keywords,
            more_keywords: snapshot.more_keywords,
            highest_modseq: snapshot.highest_modseq,
            recent,
            saved: Vec::new(),
            saved_named: false,
            kept: Vec::new(),
        }
    }

    /// Whether the message at `index` is \Recent in this session.
    pub fn is_recent(&self, index: usize) -> bool {
        self.messages
            .get(index)
            .is_some_and(|m| self.recent.contains(&m.uid))
    }

    /// How many messages of the view are \Recent.
    pub fn recent_count(&self) -> usize {
        self.recent.len()
    }

    /// The FLAGS and PERMANENTFLAGS responses for the folder's current keyword table.
    pub fn flag_responses(&self) -> Vec<u8> {
        let permanent = if self.read_only {
            "()".to_string()
        } else {
            fetch::flag_list(&self.keywords, true, self.more_keywords)
        };
        format!(
            "* FLAGS {}\r\n* OK [PERMANENTFLAGS {permanent}] Flags the store keeps\r\n",
            fetch::flag_list(&self.keywords, false, false)
        )
        .into_bytes()
    }

    /// Takes keywords the store named (a listing's, or a message's after a change); tells the
    /// client the new FLAGS when the folder has keywords it did not know (RFC 9051 §7.3.5).
    pub fn learn_keywords<'k>(&mut self, names: impl IntoIterator<Item = &'k str>) -> Vec<u8> {
        let before = self.keywords.len();
        for name in names {
            if !self.keywords.iter().any(|k| k.eq_ignore_ascii_case(name)) {
                self.keywords.push(name.to_string());
            }
        }
        if self.keywords.len() > before {
            return self.flag_responses();
        }
        Vec::new()
    }

    /// `* n FETCH (FLAGS (…))` for a flag change, with UID and MODSEQ under CONDSTORE.
    pub fn flags_fetch(&self, out: &mut Vec<u8>, index: usize, with_uid: bool, report: Report) {
        let message = &self.messages[index];
        out.extend_from_slice(format!("* {} FETCH (", index + 1).as_bytes());
        if with_uid || report.condstore {
            out.extend_from_slice(format!("UID {} ", message.uid).as_bytes());
        }
        out.extend_from_slice(b"FLAGS ");
        let recent = report.recent && self.recent.contains(&message.uid);
        fetch::flags(out, message.flags, &message.keywords, recent);
        if report.condstore {
            out.extend_from_slice(format!(" MODSEQ ({})", message.modseq).as_bytes());
        }
        out.extend_from_slice(b")\r\n");
    }

    pub fn exists(&self) -> u32 {
        self.messages.len() as u32
    }

    pub fn last_uid(&self) -> u32 {
        self.messages.last().map(|m| m.uid).unwrap_or(0)
    }

    /// Indexes (sequence number - 1) of the messages a set names, in increasing order. For UIDs,
    /// `*` is the highest UID present; a UID range names only messages that exist.
    /// Costs the ranges' number times log(folder) plus what it returns, whatever the set.
    pub fn resolve(&self, set: &SequenceSet, uid: bool) -> Vec<usize> {
        let mut out = Vec::new();
        if self.saved_named && is_saved_set(set) {
            // RFC 5182 §2.1: `$` names the same messages in UID and non-UID commands; those
            // expunged since are simply not there any more.
            out.extend(
                self.saved
                    .iter()
                    .filter_map(|uid| self.messages.binary_search_by_key(uid, |m| m.uid).ok()),
            );
            return out;
        }
        if uid {
            // RFC 9051 §6.4.8: `n:*` includes the last message even when n is larger.
            for (low, high) in ranges(set, self.last_uid()) {
                let start = self.messages.partition_point(|m| m.uid < low);
                let end = self.messages.partition_point(|m| m.uid <= high);
                out.extend(start..end.max(start));
            }
        } else {
            let exists = self.messages.len();
            for (low, high) in ranges(set, self.exists()) {
                let start = (low.max(1) as usize - 1).min(exists);
                let end = (high as usize).min(exists);
                out.extend(start..end.max(start));
            }
        }
        out
    }

    /// Whether a sequence set names only messages that exist (RFC 9051 §6.4.5: otherwise BAD).
    pub fn valid_sequence(&self, set: &SequenceSet) -> bool {
        if self.saved_named && is_saved_set(set) {
            return true;
        }
        ranges(set, self.exists())
            .iter()
            .all(|(low, high)| *low >= 1 && *high <= self.exists())
    }

    /// Takes a fresh listing and returns the untagged responses that report the difference:
    /// EXPUNGE (highest first, so each number is right when it is read) or VANISHED, FLAGS when
    /// the keyword table grew, FETCH FLAGS for changed flags, then EXISTS. With
    /// `expunge_allowed = false` vanished messages stay in the view (their numbers must not move
    /// yet) and only additions and flag changes are told; under CONDSTORE flag changes then wait
    /// too, so that no MODSEQ a client sees is above an expunge it has not been told (RFC 7162
    /// erratum 1810).
    /// New messages above `recent_above` become \Recent in this view.
    pub fn refresh(
        &mut self,
        snapshot: FolderSnapshot,
        expunge_allowed: bool,
        report: Report,
        recent_above: Option<u32>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        if snapshot.uid_validity != self.uid_validity {
            // The folder was rebuilt: the client must start over.
            out.extend_from_slice(
                b"* BYE [UIDVALIDITY] Folder index was rebuilt, please reconnect\r\n",
            );
            return out;
        }
        let fresh = snapshot.messages;
        let vanished: Vec<usize> = (0..self.messages.len())
            .filter(|i| {
                let uid = self.messages[*i].uid;
                fresh.binary_search_by_key(&uid, |m| m.uid).is_err()
            })
            .collect();
        let withheld = !expunge_allowed && !vanished.is_empty();
        if !withheld {
            out.extend_from_slice(&self.expunged(vanished, report));
        }
        self.more_keywords = snapshot.more_keywords;
        out.extend_from_slice(&self.learn_keywords(snapshot.keywords.iter().map(String::as_str)));
        if !(withheld && report.condstore) {
            for i in 0..self.messages.len() {
                let message = &mut self.messages[i];
                if let Ok(at) = fresh.binary_search_by_key(&message.uid, |m| m.uid) {
                    let now = &fresh[at];
                    let told = now.flags != message.flags
                        || now.keywords != message.keywords
                        || (report.condstore && now.modseq != message.modseq);
                    message.flags = now.flags;
                    message.keywords.clone_from(&now.keywords);
                    message.modseq = now.modseq;
                    message.handle.clone_from(&now.handle);
                    if told {
                        self.flags_fetch(&mut out, i, false, report);
                    }
                }
            }
        }
        let last = self.last_uid();
        let before = self.messages.len();
        self.messages
            .extend(fresh.into_iter().filter(|m| m.uid > last));
        if let Some(boundary) = recent_above {
            let arrived = self.messages[before..].iter().map(|m| m.uid);
            self.recent.extend(arrived.filter(|uid| *uid > boundary));
        }
        if self.messages.len() != before {
            out.extend_from_slice(format!("* {} EXISTS\r\n", self.messages.len()).as_bytes());
            if report.recent {
                out.extend_from_slice(format!("* {} RECENT\r\n", self.recent_count()).as_bytes());
            }
        }
        self.uid_next = snapshot.uid_next.max(self.uid_next);
        if !withheld {
            self.highest_modseq = snapshot.highest_modseq.max(self.highest_modseq);
        }
        out
    }

    /// Forgets expunged messages (by index) and returns their EXPUNGE (or VANISHED) responses.
    pub fn expunged(&mut self, mut indexes: Vec<usize>, report: Report) -> Vec<u8> {
        indexes.sort_unstable();
        indexes.dedup();
        indexes.retain(|i| *i < self.messages.len());
        let mut out = Vec::new();
        for kept in &mut self.kept {
            kept.expunging(&mut out, &self.messages, &indexes);
        }
        if report.qresync {
            let uids: Vec<u32> = indexes.iter().map(|i| self.messages[*i].uid).collect();
            if !uids.is_empty() {
                out.extend_from_slice(format!("* VANISHED {}\r\n", uid_set(uids)).as_bytes());
            }
        }
        for i in indexes.into_iter().rev() {
            self.recent.remove(&self.messages[i].uid);
            self.messages.remove(i);
            if !report.qresync {
                out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
            }
        }
        out
    }

    /// The UIDs in `known` (all UIDs below UIDNEXT when None) that no message has: what
    /// `VANISHED (EARLIER)` reports. The store does not remember when each UID was expunged,
    /// so this is every expunged UID in the range, which RFC 7162 §3.2.5.2 allows (the client
    /// ignores UIDs it never had); computed range by range, never UID by UID.
    pub fn missing_uids(&self, known: Option<&SequenceSet>) -> Vec<(u32, u32)> {
        let top = self.uid_next.saturating_sub(1);
        let mut wanted = match known {
            Some(set) => ranges(set, top),
            None => vec![(1, top)],
        };
        wanted.sort_unstable();
        let mut missing: Vec<(u32, u32)> = Vec::new();
        let mut covered = 0u32; // everything up to here is decided
        for (low, high) in wanted {
            let (low, high) = (low.max(covered.saturating_add(1)).max(1), high.min(top));
            if low > high {
                continue;
            }
            let mut next = low;
            let start = self.messages.partition_point(|m| m.uid < low);
            for message in self.messages[start..].iter().take_while(|m| m.uid <= high) {
                if message.uid > next {
                    missing.push((next, message.uid - 1));
                }
                next = message.uid + 1;
            }
            if next <= high {
                missing.push((next, high));
            }
            covered = covered.max(high);
        }
        // Adjacent ranges from neighbouring parts of `known` become one.
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (low, high) in missing {
            match merged.last_mut() {
                Some(last) if last.1.saturating_add(1) >= low => last.1 = last.1.max(high),
                _ => merged.push((low, high)),
            }
        }
        merged
    }

    pub fn first_unseen(&self) -> Option<u32> {
        self.messages
            .iter()
            .position(|m| !m.flags.contains(Flags::SEEN))
            .map(|i| i as u32 + 1)
    }
}

/// Ranges as a sequence set (`1:3,7`).
pub fn range_set(ranges: &[(u32, u32)]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|(low, high)| {
            if low == high {
                low.to_string()
            } else {
                format!("{low}:{high}")
            }
        })
        .collect();
    parts.join(",")
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
            handle: Default::default(),
            size: 10,
            flags,
            keywords: Default::default(),
            received_at: 0,
            modseq: u64::from(uid),
        }
    }

    fn snap(messages: Vec<MessageInfo>) -> FolderSnapshot {
        FolderSnapshot {
            uid_validity: 7,
            uid_next: messages.last().map(|m| m.uid + 1).unwrap_or(1),
            highest_modseq: messages.iter().map(|m| m.modseq).max().unwrap_or(1),
            messages,
            keywords: Vec::new(),
            more_keywords: true,
        }
    }

    #[test]
    fn sets_resolve_in_order_once_each_whatever_their_shape() {
        let e = Flags::empty();
        let uids = [2, 3, 5, 8, 13, 21];
        let view = Selected::new(
            "INBOX".into(),
            false,
            snap(uids.iter().map(|u| info(*u, e)).collect()),
            None,
        );
        let set = |t: &str| SequenceSet::try_from(t).unwrap();
        assert_eq!(
            view.resolve(&set("4:2,1,6:*,3,2"), false),
            vec![0, 1, 2, 3, 5]
        );
        assert_eq!(view.resolve(&set("*"), false), vec![5]);
        assert_eq!(view.resolve(&set("7:9"), false), Vec::<usize>::new());
        assert_eq!(view.resolve(&set("4:13,1,100:*"), true), vec![2, 3, 4, 5]);
        assert_eq!(view.resolve(&set("22:30"), true), Vec::<usize>::new());
        // Thousands of overlapping ranges cost their number, not their number × the folder.
        let many: Vec<String> = (1..5000)
            .map(|n| format!("{}:{}", n % 7 + 1, n % 11 + 1))
            .collect();
        assert_eq!(
            view.resolve(&set(&many.join(",")), false),
            vec![0, 1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn refresh_reports_expunges_flags_and_arrivals() {
        let e = Flags::empty();
        let mut view = Selected::new(
            "INBOX".into(),
            false,
            snap(vec![info(1, e), info(2, e), info(3, e), info(4, e)]),
            None,
        );
        let fresh = snap(vec![info(1, e), info(3, Flags::SEEN), info(5, e)]);
        let plain = Report::default();
        let out = view.refresh(fresh.clone(), false, plain, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* 3 FETCH (FLAGS (\\Seen))\r\n* 5 EXISTS\r\n",
            "no EXPUNGE while not allowed; numbers stay"
        );
        let out = view.refresh(fresh, true, plain, None);
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
    fn recent_messages_are_counted_and_flagged_for_imap4rev1() {
        let e = Flags::empty();
        let mut view = Selected::new(
            "INBOX".into(),
            false,
            snap(vec![info(1, e), info(2, e)]),
            Some(1),
        );
        assert_eq!(view.recent_count(), 1);
        assert!(!view.is_recent(0) && view.is_recent(1));
        let rev1 = Report {
            recent: true,
            ..Report::default()
        };
        let out = view.refresh(
            snap(vec![info(1, e), info(2, e), info(3, e)]),
            true,
            rev1,
            Some(2),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* 3 EXISTS\r\n* 2 RECENT\r\n"
        );
        let mut flags = Vec::new();
        view.flags_fetch(&mut flags, 2, false, rev1);
        assert_eq!(flags, b"* 3 FETCH (FLAGS (\\Recent))\r\n");
        // Claimed by another session meanwhile: a new arrival is not recent here.
        let out = view.refresh(
            snap(vec![info(1, e), info(2, e), info(3, e), info(4, e)]),
            true,
            rev1,
            Some(4),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* 4 EXISTS\r\n* 2 RECENT\r\n"
        );
    }

    #[test]
    fn condstore_and_qresync_reports() {
        let e = Flags::empty();
        let mut view = Selected::new(
            "INBOX".into(),
            false,
            snap(vec![info(1, e), info(2, e), info(3, e)]),
            None,
        );
        let report = Report {
            condstore: true,
            qresync: true,
            recent: false,
        };
        let mut changed = info(3, e);
        changed.keywords = crate::store::Keywords::from_names(["$Junk"]);
        changed.modseq = 9;
        let mut fresh = snap(vec![info(1, e), changed]);
        fresh.keywords = vec!["$Junk".into()];
        // While expunges must wait, so do flag changes under CONDSTORE.
        let out = view.refresh(fresh.clone(), false, report, None);
        assert_eq!(out, b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Junk)\r\n* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Junk \\*)] Flags the store keeps\r\n");
        assert_eq!(view.highest_modseq, 3);
        let out = view.refresh(fresh, true, report, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* VANISHED 2\r\n* 2 FETCH (UID 3 FLAGS ($Junk) MODSEQ (9))\r\n"
        );
        assert_eq!(view.highest_modseq, 9);
    }

    #[test]
    fn missing_uids_by_range() {
        let e = Flags::empty();
        let mut s = snap(vec![info(3, e), info(4, e), info(9, e)]);
        s.uid_next = 12;
        let view = Selected::new("INBOX".into(), false, s, None);
        assert_eq!(view.missing_uids(None), [(1, 2), (5, 8), (10, 11)]);
        let known = SequenceSet::try_from("2:5,4:10,4000000000").unwrap();
        assert_eq!(view.missing_uids(Some(&known)), [(2, 2), (5, 8), (10, 10)]);
        assert_eq!(range_set(&view.missing_uids(None)), "1:2,5:8,10:11");
    }

    #[test]
    fn sets() {
        let e = Flags::empty();
        let view = Selected::new(
            "INBOX".into(),
            false,
            snap(vec![info(3, e), info(9, e)]),
            None,
        );
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
