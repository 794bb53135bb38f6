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

/// Runs the stream as the given reads and as one read, and asserts both give the same events:
/// framing must not depend on where a peer's writes happened to be cut.
#[allow(dead_code)]
pub fn assert_split_independent<T: PartialEq + std::fmt::Debug>(
    reads: &[Vec<u8>],
    run: impl Fn(&[Vec<u8>]) -> Vec<T>,
) {
    let split = run(reads);
    let whole = run(&[joined(reads)]);
    assert_eq!(split, whole, "events depend on how the stream was split");
}
