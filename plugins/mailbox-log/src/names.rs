//! Names on disk: mailbox keys, folder names, keywords and delivery ids percent-encoded, so
//! nothing a client or sender chose can make a path (`/`, `..`) or break an index line.

/// Keeps ASCII letters, digits, `@`, `-`, `_` and `+`; everything else becomes `%XX`.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'@' | b'-' | b'_' | b'+') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_no_path_characters() {
        for name in [
            "INBOX",
            "Lists/Rust",
            "..",
            "a b%c",
            "Grüße",
            "alice@example.test",
        ] {
            let encoded = encode(name);
            assert!(!encoded.contains(['/', '.', ' ']), "{encoded}");
            assert_eq!(decode(&encoded).as_deref(), Some(name));
        }
        assert_eq!(decode("%4"), None);
    }
}
