//! Maildir file names and the bytes in the files: the `<time>.<unique>.<host>,S=<size>,W=<crlf
//! size>:2,<flags>` names (the flags as mutt and Dovecot write them), and the LF line endings
//! files hold (or the message as it came, when it has a bare LF of its own).

use std::fs;
use std::io;
use std::path::Path;

use super::*;

pub(super) fn is_safe_component(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && !part.starts_with('.')
        && !part.contains(['/', '\\', '\0'])
        && !part.chars().any(char::is_control)
}

/// The bytes to store for a message and its `S=`/`W=` sizes: LF line endings, or the message as
/// it came when it has a bare LF (which the LF form would turn into a CRLF on the way back).
pub(super) fn stored_form(prepend: &[u8], message: &[u8]) -> (Vec<u8>, usize, usize) {
    let mut content = Vec::with_capacity(prepend.len() + message.len());
    if has_bare_lf(prepend) || has_bare_lf(message) {
        content.extend_from_slice(prepend);
        content.extend_from_slice(message);
        let size = content.len();
        return (content, size, size);
    }
    let lf_count = to_lf(prepend, &mut content) + to_lf(message, &mut content);
    let size = content.len();
    (content, size, size + lf_count)
}

pub(super) fn has_bare_lf(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', bytes).any(|at| at == 0 || bytes[at - 1] != b'\r')
}

/// A file stored as it came (see [`stored_form`]): its name gives equal `S=` and `W=`. A file
/// without LFs at all also qualifies, and reads the same either way.
pub(super) fn stored_verbatim(name: &str) -> bool {
    matches!(
        (size_field(name, ",S="), size_field(name, ",W=")),
        (Some(s), Some(w)) if s == w
    )
}

/// Converts CRLF to LF (a lone CR stays) and returns the number of LFs written, which is what the
/// CRLF form adds to the size.
pub(super) fn to_lf(input: &[u8], out: &mut Vec<u8>) -> usize {
    let mut lines = 0;
    let mut rest = input;
    while let Some(pos) = memchr::memchr(b'\n', rest) {
        let line_end = if pos > 0 && rest[pos - 1] == b'\r' {
            pos - 1
        } else {
            pos
        };
        out.extend_from_slice(&rest[..line_end]);
        out.push(b'\n');
        lines += 1;
        rest = &rest[pos + 1..];
    }
    out.extend_from_slice(rest);
    lines
}

/// A name no other message of this process or host will get: time, process and a counter.
pub(super) fn unique_part() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "P{}N{nanos}C{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Splits a Maildir file name into its key and flags (`key:2,FS`).
pub(super) fn parse_name(name: &str) -> (&str, Letters) {
    let system = |flag: Flags| Letters::from_system(flag);
    match name.split_once(':') {
        Some((key, info)) => {
            let mut flags = Letters::empty();
            if let Some(letters) = info.strip_prefix("2,") {
                for letter in letters.chars() {
                    flags = flags.union(match letter {
                        'a'..='z' => Letters::keyword(usize::from(letter as u8 - b'a')),
                        _ => system(Flags::from_maildir_letter(letter)),
                    });
                }
            }
            (key, flags)
        }
        None => (name, Letters::empty()),
    }
}

/// Flag letters in the ASCII order the Maildir spec asks for: system flags, then keywords.
pub(super) fn flag_letters(flags: Letters) -> String {
    let keywords = flags
        .keyword_slots()
        .map(|slot| char::from(b'a' + slot as u8));
    let mut letters = flags.system().maildir_letters();
    letters.extend(keywords);
    letters
}

pub(super) fn size_field(key: &str, field: &str) -> Option<u64> {
    let start = key.find(field)? + field.len();
    let digits: &str = &key[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// LF to CRLF: the inverse of [`to_lf`] (every LF came from a CRLF).
pub(super) fn to_crlf(content: &[u8]) -> Vec<u8> {
    let lines = memchr::memchr_iter(b'\n', content).count();
    let mut out = Vec::with_capacity(content.len() + lines);
    for (i, part) in content.split(|b| *b == b'\n').enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(part);
    }
    out
}

/// The CRLF size of a file whose name does not say it.
pub(super) fn crlf_size(path: &Path) -> io::Result<u64> {
    let content = fs::read(path)?;
    Ok((content.len() + memchr::memchr_iter(b'\n', &content).count()) as u64)
}
