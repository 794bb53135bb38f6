//! A folder's mod-sequences (RFC 7162 CONDSTORE/QRESYNC), kept in `postern-modseq` beside the
//! UID index.
//!
//! Maildir file names are the truth about flags; this log only remembers, per UID, the flags last
//! seen and the mod-sequence they got. Every listing compares the two, so a change made by
//! another tool (mutt renaming a file) or one whose log line a crash lost is found and given a
//! fresh mod-sequence. Lines are appended without a flush (one `write` per operation); what a
//! crash can lose is thereby only ever re-detected, never wrong.
//!
//! The one thing that must survive a crash is the guarantee that mod-sequences never go back: a
//! client that saw 1005 and asks for changes since 1005 must not miss a change numbered 1003
//! after a restart. So numbers are handed out from a durably reserved block (`R` line, flushed
//! before the first number of the block is used); a new process starts above the last
//! reservation.
//!
//! Line forms: `<uid> <modseq> <flags in hex>`, `H <modseq>` (the highest, raised by an
//! expunge), `R <modseq>` (reserved up to). A torn or unknown line is skipped.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use super::letters::Letters;
use crate::durable;

pub const FILE_NAME: &str = "postern-modseq";
const MAGIC: &str = "postern-modseq 1";
/// Mod-sequences reserved per flushed `R` line.
const BLOCK: u64 = 4096;

#[derive(Debug)]
pub struct ModLog {
    validity: u32,
    highest: u64,
    reserved: u64,
    /// UID → (mod-sequence, flags when it was given).
    known: HashMap<u32, (u64, Letters)>,
    /// Lines in the file (for compaction).
    lines: usize,
    /// Lines not yet appended.
    pending: String,
}

impl ModLog {
    /// Reads the folder's log for this UIDVALIDITY. A missing log starts at 1 (it is created,
    /// durably, at the folder's first listing, before any number is handed out); one for
    /// another UIDVALIDITY starts empty above what it held.
    pub fn load(dir: &Path, validity: u32) -> io::Result<ModLog> {
        let text = match fs::read(dir.join(FILE_NAME)) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(err),
        };
        let mut log = ModLog {
            validity,
            highest: 0,
            reserved: 0,
            known: HashMap::new(),
            lines: 0,
            pending: String::new(),
        };
        let mut lines = text.split_inclusive('\n');
        let header = lines.next().unwrap_or_default();
        let same_folder = header.trim_end() == format!("{MAGIC} V{validity}");
        for line in lines {
            // A line without its newline is a torn append.
            let Some(line) = line.strip_suffix('\n') else {
                break;
            };
            log.lines += 1;
            let mut fields = line.split(' ');
            match (fields.next(), fields.next(), fields.next()) {
                (Some("R"), Some(n), None) => {
                    log.reserved = log.reserved.max(n.parse().unwrap_or(0));
                }
                (Some("H"), Some(n), None) => {
                    log.highest = log.highest.max(n.parse().unwrap_or(0));
                }
                (Some(uid), Some(modseq), Some(flags)) if same_folder => {
                    let (Ok(uid), Ok(modseq), Ok(flags)) = (
                        uid.parse::<u32>(),
                        modseq.parse::<u64>(),
                        u64::from_str_radix(flags, 16),
                    ) else {
                        continue;
                    };
                    log.highest = log.highest.max(modseq);
                    log.known.insert(uid, (modseq, Letters::from_bits(flags)));
                }
                _ => {}
            }
        }
        // Whatever a previous process handed out is at most what it had reserved; and
        // HIGHESTMODSEQ is positive even for an empty folder (RFC 7162 `mod-sequence-value`).
        log.highest = log.highest.max(log.reserved).max(1);
        if !same_folder || text.is_empty() {
            log.known.clear();
            log.rewrite(dir)?;
        }
        Ok(log)
    }

    pub fn validity(&self) -> u32 {
        self.validity
    }

    pub fn highest(&self) -> u64 {
        self.highest
    }

    pub fn modseq(&self, uid: u32) -> Option<u64> {
        self.known.get(&uid).map(|(modseq, _)| *modseq)
    }

    /// (mod-sequence, flags it was given for) of a message.
    pub fn known(&self, uid: u32) -> Option<(u64, Letters)> {
        self.known.get(&uid).copied()
    }

    /// The next mod-sequence, reserving (durably) a new block when the current one is used up.
    fn next(&mut self, dir: &Path) -> io::Result<u64> {
        if self.highest >= self.reserved {
            self.reserved = self.highest + BLOCK;
            self.pending.push_str(&format!("R {}\n", self.reserved));
            self.append(dir, true)?;
        }
        self.highest += 1;
        Ok(self.highest)
    }

    /// Gives each listed message its mod-sequence: the remembered one when its flags are as
    /// remembered, a new one when they changed or it is new. Forgets UIDs no longer listed and
    /// raises the highest mod-sequence once if any were (an expunge is a change too).
    /// `listed` is (UID, flags, mod-sequence): the mod-sequence is filled in.
    pub fn reconcile(&mut self, dir: &Path, listed: &mut [(u32, Letters, u64)]) -> io::Result<()> {
        for (uid, letters, modseq) in listed.iter_mut() {
            match self.known.get(uid) {
                Some((known, flags)) if flags == letters => *modseq = *known,
                _ => *modseq = self.record(dir, *uid, *letters)?,
            }
        }
        if self.known.len() > listed.len() {
            let listed: std::collections::HashSet<u32> = listed.iter().map(|m| m.0).collect();
            self.known.retain(|uid, _| listed.contains(uid));
            let modseq = self.next(dir)?;
            self.pending.push_str(&format!("H {modseq}\n"));
        }
        self.flush(dir)
    }

    /// Notes new flags for a message and returns its new mod-sequence.
    pub fn record(&mut self, dir: &Path, uid: u32, flags: Letters) -> io::Result<u64> {
        let modseq = self.next(dir)?;
        self.known.insert(uid, (modseq, flags));
        self.pending
            .push_str(&format!("{uid} {modseq} {:x}\n", flags.bits()));
        Ok(modseq)
    }

    /// Raises the highest mod-sequence to at least `at_least`, durably (an imported folder keeps
    /// its clients' CONDSTORE state behind it).
    pub fn raise_to(&mut self, dir: &Path, at_least: u64) -> io::Result<()> {
        if self.highest >= at_least {
            return Ok(());
        }
        self.highest = at_least;
        self.reserved = self.reserved.max(at_least + BLOCK);
        self.pending
            .push_str(&format!("R {}\nH {at_least}\n", self.reserved));
        self.append(dir, true)
    }

    /// Notes that messages were expunged: the highest mod-sequence moves on.
    pub fn expunged(&mut self, dir: &Path, uids: &[u32]) -> io::Result<()> {
        if uids.is_empty() {
            return Ok(());
        }
        for uid in uids {
            self.known.remove(uid);
        }
        let modseq = self.next(dir)?;
        self.pending.push_str(&format!("H {modseq}\n"));
        self.flush(dir)
    }

    /// Appends what is pending; rewrites the log when it is mostly superseded lines.
    pub fn flush(&mut self, dir: &Path) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.lines > 4 * self.known.len() + 4096 {
            return self.rewrite(dir);
        }
        self.append(dir, false)
    }

    fn append(&mut self, dir: &Path, durably: bool) -> io::Result<()> {
        let mut file = OpenOptions::new().append(true).open(dir.join(FILE_NAME))?;
        file.write_all(self.pending.as_bytes())?;
        if durably {
            file.sync_data()?;
        }
        self.lines += self.pending.matches('\n').count();
        self.pending.clear();
        Ok(())
    }

    /// Replaces the log with its current content, durably.
    fn rewrite(&mut self, dir: &Path) -> io::Result<()> {
        self.reserved = self.reserved.max(self.highest + BLOCK);
        let mut text = format!(
            "{MAGIC} V{}\nR {}\nH {}\n",
            self.validity, self.reserved, self.highest
        );
        let mut entries: Vec<_> = self.known.iter().collect();
        entries.sort_unstable_by_key(|(uid, _)| **uid);
        for (uid, (modseq, flags)) in entries {
            text.push_str(&format!("{uid} {modseq} {:x}\n", flags.bits()));
        }
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        durable::write_and_rename(&tmp, &dir.join(FILE_NAME), text.as_bytes())?;
        durable::sync_dir(dir)?;
        self.lines = text.matches('\n').count() - 1;
        self.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEN: Letters = Letters::from_bits(1);
    const NONE: Letters = Letters::empty();

    fn message(uid: u32, flags: Letters) -> (u32, Letters, u64) {
        (uid, flags, 0)
    }

    #[test]
    fn changes_get_new_numbers_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ModLog::load(dir.path(), 7).unwrap();
        let mut listed = vec![message(1, NONE), message(2, SEEN)];
        log.reconcile(dir.path(), &mut listed).unwrap();
        assert_eq!((listed[0].2, listed[1].2), (2, 3));
        // Unchanged: same numbers. Changed outside (a rename by another tool): a new one.
        listed[1].1 = NONE;
        log.reconcile(dir.path(), &mut listed).unwrap();
        assert_eq!((listed[0].2, listed[1].2), (2, 4));
        assert_eq!(log.highest(), 4);

        // A new process resumes above the reserved block, keeping what was recorded.
        let mut again = ModLog::load(dir.path(), 7).unwrap();
        assert_eq!(again.modseq(2), Some(4));
        assert_eq!(again.highest(), 1 + BLOCK);
        let mut listed = vec![message(2, NONE)];
        again.reconcile(dir.path(), &mut listed).unwrap();
        assert_eq!(listed[0].2, 4);
        assert_eq!(
            again.highest(),
            BLOCK + 2,
            "the expunge of UID 1 is a change"
        );
    }

    #[test]
    fn lost_lines_are_redetected_above_anything_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ModLog::load(dir.path(), 7).unwrap();
        let mut listed = vec![message(1, NONE)];
        log.reconcile(dir.path(), &mut listed).unwrap();
        let handed_out = log.record(dir.path(), 1, SEEN).unwrap();
        // The crash: the pending line is never written, but the file was renamed (flags \Seen).
        drop(log);
        let mut again = ModLog::load(dir.path(), 7).unwrap();
        let mut listed = vec![message(1, SEEN)];
        again.reconcile(dir.path(), &mut listed).unwrap();
        assert!(listed[0].2 > handed_out);
    }

    #[test]
    fn torn_tail_and_other_validity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(FILE_NAME),
            "postern-modseq 1 V7\nR 4096\n1 5 1\n2 9 0\n3 1",
        )
        .unwrap();
        let log = ModLog::load(dir.path(), 7).unwrap();
        assert_eq!(
            (log.modseq(1), log.modseq(2), log.modseq(3)),
            (Some(5), Some(9), None)
        );
        let log = ModLog::load(dir.path(), 8).unwrap();
        assert_eq!(log.modseq(1), None, "another UIDVALIDITY starts over");
        assert!(log.highest() >= 4096, "but never lower");
    }
}
