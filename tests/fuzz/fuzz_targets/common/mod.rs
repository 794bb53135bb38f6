//! Maps arbitrary fuzz input onto a protocol's alphabet so that mutations reach deep states:
//! bytes below 0x80 are taken as they are, 0xFF cuts the stream into another read (so framing
//! is exercised in every split), and the other high bytes pick a whole token (a verb, a CRLF,
//! a literal announcement, a dot line) from the protocol's dictionary.

/// The byte stream the input stands for, as the reads a peer would make.
pub fn chunks(data: &[u8], tokens: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut chunks = vec![Vec::new()];
    for &byte in data {
        match byte {
            0xFF => chunks.push(Vec::new()),
            0x80..=0xFE => {
                let token = tokens[(byte - 0x80) as usize % tokens.len()];
                chunks.last_mut().unwrap().extend_from_slice(token);
            }
            _ => chunks.last_mut().unwrap().push(byte),
        }
    }
    chunks.retain(|chunk| !chunk.is_empty());
    chunks
}

/// The whole stream as one read.
#[allow(dead_code)]
pub fn joined(chunks: &[Vec<u8>]) -> Vec<u8> {
    chunks.concat()
}
