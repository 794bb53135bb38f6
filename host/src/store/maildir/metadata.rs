//! RFC 5464 annotations as Maildir keeps them: one line per entry, `<entry name> <value as
//! hex>`, replaced whole (and flushed) at every change.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

pub const FOLDER_FILE: &str = "postern-metadata";
pub const MAILBOX_FILE: &str = "postern-mailbox-metadata";

/// The entries in a file; none when it does not exist. Lines that do not parse are skipped.
pub fn read(path: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(err) => return Err(err),
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, hex) = line.split_once(' ')?;
            Some((name.to_string(), decode_hex(hex)?))
        })
        .collect())
}

pub fn render(entries: &BTreeMap<String, Vec<u8>>) -> String {
    let mut out = String::new();
    for (name, value) in entries {
        out.push_str(name);
        out.push(' ');
        for byte in value {
            out.push_str(&format!("{byte:02x}"));
        }
        out.push('\n');
    }
    out
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut entries = BTreeMap::new();
        entries.insert("/private/comment".to_string(), b"a b\n\0c".to_vec());
        entries.insert("/shared/empty".to_string(), Vec::new());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FOLDER_FILE);
        fs::write(&path, render(&entries)).unwrap();
        assert_eq!(read(&path).unwrap(), entries);
    }
}
