//! A received message as bytes (CRLF line ends): its header fields, and the edits plugins ask for.
//!
//! Header parsing here is deliberately small (RFC 5322 §2.2: a field is a name, a colon, and a
//! value continued on lines that start with white space); decoding of MIME bodies is left to
//! mail-parser. Edits rebuild the header and keep the body bytes as they are.

use memchr::memmem;

/// One header field: its name and the raw bytes of the whole field (name, colon, value, folded
/// lines and the final CRLF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub raw: Vec<u8>,
}

impl Field {
    pub fn new(name: &str, value: &str) -> Field {
        let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        Field {
            name: name.to_string(),
            raw: format!("{name}: {value}\r\n").into_bytes(),
        }
    }

    /// A field whose value this server wrote folded (`CRLF` before white space), kept folded so
    /// long values stay under RFC 5322's line limit. Any other line break is removed, as in
    /// [`Field::new`], so the value can never start a field of its own.
    pub fn folded(name: &str, value: &str) -> Field {
        let mut text = String::with_capacity(value.len());
        for (i, line) in value.split("\r\n").enumerate() {
            let line: String = line.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            if i > 0 {
                if line.trim().is_empty() {
                    continue;
                }
                text.push_str("\r\n");
                if !line.starts_with([' ', '\t']) {
                    text.push(' ');
                }
            }
            text.push_str(&line);
        }
        Field {
            name: name.to_string(),
            raw: format!("{name}: {text}\r\n").into_bytes(),
        }
    }

    /// The value, unfolded (CRLF before white space removed) and trimmed.
    pub fn value(&self) -> String {
        let text = String::from_utf8_lossy(&self.raw);
        let after = text.split_once(':').map(|(_, v)| v).unwrap_or("");
        after
            .replace("\r\n", "")
            .replace('\n', "")
            .trim()
            .to_string()
    }
}

/// Where the header ends: the offset of the first body byte.
pub fn body_offset(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 2;
    }
    match memmem::find(message, b"\r\n\r\n") {
        Some(pos) => pos + 4,
        None => message.len(),
    }
}

/// Splits the header into fields. Lines that are not fields (no colon) are kept attached to the
/// previous field so that rebuilding loses nothing.
pub fn parse_fields(message: &[u8]) -> Vec<Field> {
    let header = &message[..body_offset(message)];
    let mut fields: Vec<Field> = Vec::new();
    for line in header.split_inclusive(|b| *b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        let name = line
            .iter()
            .position(|b| *b == b':')
            .map(|colon| String::from_utf8_lossy(&line[..colon]).trim().to_string());
        match (continuation, name, fields.last_mut()) {
            (false, Some(name), _) if !name.is_empty() && !name.contains(' ') => {
                fields.push(Field {
                    name,
                    raw: line.to_vec(),
                })
            }
            (_, _, Some(last)) => last.raw.extend_from_slice(line),
            (_, _, None) => fields.push(Field {
                name: String::new(),
                raw: line.to_vec(),
            }),
        }
    }
    fields
}

/// Values of every field called `name` (case-insensitive), unfolded.
pub fn header_values(message: &[u8], name: &str) -> Vec<String> {
    parse_fields(message)
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(name))
        .map(Field::value)
        .collect()
}

/// The decoded text of the text parts (plain, then HTML as is), via mail-parser.
pub fn text_parts(message: &[u8]) -> Vec<String> {
    let Some(parsed) = mail_parser::MessageParser::default().parse(message) else {
        return Vec::new();
    };
    let mut out: Vec<String> = parsed
        .text_bodies()
        .filter_map(|part| part.text_contents().map(str::to_string))
        .collect();
    out.extend(
        parsed
            .html_bodies()
            .filter(|part| part.is_text_html())
            .filter_map(|part| part.text_contents().map(str::to_string)),
    );
    out
}

/// A header or body edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Append at the end of the header.
    Add(Field),
    /// Insert at the top, after the first `keep_first` fields (the host's trace header).
    Insert(Field),
    /// Change the `index`-th (1-based) field called `name`.
    Change {
        name: String,
        index: u32,
        value: String,
    },
    /// Remove the `index`-th (1-based) field called `name`, or all when `index` is 0.
    Remove {
        name: String,
        index: u32,
    },
    ReplaceBody(Vec<u8>),
}

/// Applies edits in order. `protected` leading fields (our own Received header) stay first.
pub fn apply_edits(message: &[u8], edits: &[Edit], protected: usize) -> Vec<u8> {
    if edits.is_empty() {
        return message.to_vec();
    }
    let offset = body_offset(message);
    let mut fields = parse_fields(message);
    let mut body = message[offset..].to_vec();
    let protected = protected.min(fields.len());
    for edit in edits {
        match edit {
            Edit::Add(field) => fields.push(field.clone()),
            Edit::Insert(field) => fields.insert(protected, field.clone()),
            Edit::Change { name, index, value } => {
                if let Some(field) = nth_field(&mut fields, name, *index, protected) {
                    *field = Field::new(&field.name.clone(), value);
                }
            }
            Edit::Remove { name, index } => {
                let mut seen = 0;
                let mut position = 0;
                fields.retain(|f| {
                    let keep_protected = position < protected;
                    position += 1;
                    if keep_protected || !f.name.eq_ignore_ascii_case(name) {
                        return true;
                    }
                    seen += 1;
                    *index != 0 && seen != *index
                });
            }
            Edit::ReplaceBody(new_body) => body = new_body.clone(),
        }
    }
    let mut out = Vec::with_capacity(message.len() + 256);
    for field in &fields {
        out.extend_from_slice(&field.raw);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

fn nth_field<'a>(
    fields: &'a mut [Field],
    name: &str,
    index: u32,
    protected: usize,
) -> Option<&'a mut Field> {
    fields
        .iter_mut()
        .skip(protected)
        .filter(|f| f.name.eq_ignore_ascii_case(name))
        .nth((index.max(1) - 1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"Received: from x\r\n\tby y; date\r\nSubject: Hello\r\n world\r\nX-A: 1\r\nx-a: 2\r\n\r\nBody line\r\n";

    #[test]
    fn fields_and_unfolding() {
        let fields = parse_fields(MSG);
        assert_eq!(fields.len(), 4);
        assert_eq!(fields[0].name, "Received");
        assert_eq!(header_values(MSG, "subject"), vec!["Hello world"]);
        assert_eq!(header_values(MSG, "X-A"), vec!["1", "2"]);
        assert_eq!(&MSG[body_offset(MSG)..], b"Body line\r\n");
    }

    #[test]
    fn edits_keep_trace_header_first_and_body_intact() {
        let out = apply_edits(
            MSG,
            &[
                Edit::Insert(Field::new("X-Top", "t")),
                Edit::Add(Field::new("X-Spam-Score", "5.2")),
                Edit::Change {
                    name: "x-a".into(),
                    index: 2,
                    value: "two".into(),
                },
                Edit::Remove {
                    name: "Subject".into(),
                    index: 0,
                },
            ],
            1,
        );
        assert_eq!(
            out,
            b"Received: from x\r\n\tby y; date\r\nX-Top: t\r\nX-A: 1\r\nx-a: two\r\nX-Spam-Score: 5.2\r\n\r\nBody line\r\n".to_vec()
        );
        let replaced = apply_edits(MSG, &[Edit::ReplaceBody(b"new\r\n".to_vec())], 1);
        assert!(replaced.ends_with(b"x-a: 2\r\n\r\nnew\r\n"));
    }

    #[test]
    fn injected_line_breaks_cannot_add_fields() {
        let out = apply_edits(MSG, &[Edit::Add(Field::new("X-B", "v\r\nBcc: evil@x"))], 1);
        assert_eq!(header_values(&out, "bcc"), Vec::<String>::new());
        assert_eq!(header_values(&out, "x-b"), vec!["vBcc: evil@x"]);
        let field = Field::folded("X-F", "a;\r\n\tb\r\nBcc: evil@x\r\n \r\n\nc");
        assert_eq!(
            field.raw,
            b"X-F: a;\r\n\tb\r\n Bcc: evil@x\r\n c\r\n".to_vec()
        );
    }

    #[test]
    fn decoded_text_parts() {
        let msg = b"Subject: t\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n";
        assert_eq!(text_parts(msg), vec!["café\r\n"]);
    }
}
