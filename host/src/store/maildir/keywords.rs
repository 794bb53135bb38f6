//! A folder's keyword table (`dovecot-keywords`), in Dovecot's own format so that Dovecot, mutt
//! and Postern read the same letters the same way: one `<slot> <name>` line per keyword, where
//! slot 0 is the file name letter `a`, slot 1 `b`, and so on to `z`.
//!
//! Slots are only ever added (never renumbered or removed): a letter in a file name keeps its
//! meaning for the life of the folder. The table is replaced whole and durably before any file
//! name uses a new letter, so after a crash every letter on disk has its name.

use std::fs;
use std::io;
use std::path::Path;

use super::letters::Letters;
use crate::durable;
use crate::store::Keywords;

pub const FILE_NAME: &str = "dovecot-keywords";

/// The names by slot. Lines that do not parse, or name a slot out of range, are skipped (a
/// hand-edited or foreign file must not stop the folder from opening).
pub fn read(dir: &Path) -> io::Result<Vec<String>> {
    let text = match fs::read_to_string(dir.join(FILE_NAME)) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) if err.kind() == io::ErrorKind::InvalidData => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    Ok(parse(&text))
}

pub fn parse(text: &str) -> Vec<String> {
    let mut slots: Vec<Option<String>> = Vec::new();
    for line in text.lines() {
        let Some((slot, name)) = line.split_once(' ') else {
            continue;
        };
        let Ok(slot) = slot.parse::<usize>() else {
            continue;
        };
        if slot >= Letters::MAX_KEYWORDS || !crate::store::valid_keyword(name) {
            continue;
        }
        if slots.len() <= slot {
            slots.resize(slot + 1, None);
        }
        slots[slot] = Some(name.to_string());
    }
    // A gap (a slot Dovecot freed) keeps its place under a name no client can send.
    slots
        .into_iter()
        .enumerate()
        .map(|(slot, name)| name.unwrap_or_else(|| format!("\\unused{slot}")))
        .collect()
}

pub fn render(names: &[String]) -> String {
    names
        .iter()
        .enumerate()
        .filter(|(_, name)| !name.starts_with('\\'))
        .map(|(slot, name)| format!("{slot} {name}\n"))
        .collect()
}

/// The letters of the names the table has (others are left out).
pub fn find(table: &[String], names: &Keywords) -> Letters {
    names
        .iter()
        .filter_map(|name| table.iter().position(|k| k.eq_ignore_ascii_case(name)))
        .fold(Letters::empty(), |acc, slot| {
            acc.union(Letters::keyword(slot))
        })
}

/// Finds each name's slot, adding those the table lacks; writes the table durably when it grew.
/// None (and the table as it was) when the table has no room for them all.
pub fn slots(dir: &Path, table: &mut Vec<String>, names: &Keywords) -> io::Result<Option<Letters>> {
    let before = table.len();
    let mut flags = Letters::empty();
    for name in names.iter() {
        // A name the table cannot hold on a line is not kept (IMAP atoms always fit).
        if !crate::store::valid_keyword(name) {
            continue;
        }
        let slot = match table.iter().position(|k| k.eq_ignore_ascii_case(name)) {
            Some(slot) => slot,
            None if table.len() < Letters::MAX_KEYWORDS => {
                table.push(name.to_string());
                table.len() - 1
            }
            None => {
                table.truncate(before);
                return Ok(None);
            }
        };
        flags = flags.union(Letters::keyword(slot));
    }
    if table.len() != before {
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        durable::write_and_rename(&tmp, &dir.join(FILE_NAME), render(table).as_bytes())?;
        durable::sync_dir(dir)?;
    }
    Ok(Some(flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dovecot_format_round_trip() {
        let names = parse("0 $Junk\n1 NonJunk\nbroken\n30 far\n3 after-gap\n");
        assert_eq!(names, ["$Junk", "NonJunk", "\\unused2", "after-gap"]);
        assert_eq!(render(&names), "0 $Junk\n1 NonJunk\n3 after-gap\n");
        assert!(
            !crate::store::valid_keyword("a b")
                && !crate::store::valid_keyword("\\Seen")
                && !crate::store::valid_keyword("")
                && crate::store::valid_keyword("$MDNSent")
        );
    }

    #[test]
    fn slots_are_added_durably_and_matched_case_insensitively() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = read(dir.path()).unwrap();
        let flags = slots(
            dir.path(),
            &mut table,
            &Keywords::from_names(["$Junk", "Work"]),
        )
        .unwrap();
        assert_eq!(flags, Some(Letters::keyword(0).union(Letters::keyword(1))));
        let again = slots(dir.path(), &mut table, &Keywords::from_names(["work"])).unwrap();
        assert_eq!(again, Some(Letters::keyword(1)));
        assert_eq!(read(dir.path()).unwrap(), ["$Junk", "Work"]);
        let many: Vec<String> = (0..24).map(|i| format!("k{i}")).collect();
        assert!(slots(dir.path(), &mut table, &Keywords::from_names(&many))
            .unwrap()
            .is_some());
        assert_eq!(table.len(), 26);
        assert_eq!(
            slots(dir.path(), &mut table, &Keywords::from_names(["one-more"])).unwrap(),
            None
        );
        assert_eq!(table.len(), 26, "a refused name leaves the table as it was");
    }
}
