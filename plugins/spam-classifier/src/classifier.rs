//! A token classifier (naive Bayes with Robinson's smoothing), trained from ham and spam corpora.
//!
//! The model is text, so it fits in the plugin's configuration: a first line
//! `postern-spam-model 1 <spam messages> <ham messages>` and one line per token
//! `<token> <spam count> <ham count>`.

use std::borrow::Cow;
use std::collections::HashMap;

/// Tokens: lower-cased words of 3 to 24 letters or digits from the text, plus `subject:` tokens.
pub fn tokens(subject: &str, body: &str) -> Vec<String> {
    let mut out = Vec::new();
    each_word(subject, |w| out.push(format!("subject:{w}")));
    each_word(body, |w| out.push(w.to_string()));
    out.sort();
    out.dedup();
    out
}

/// Calls `f` with each word of a text as a token: lower-cased, 3 to 24 characters, not all
/// digits. Words are borrowed from the text or lower-cased into one reused buffer, so a large
/// text costs no allocation per word.
pub fn each_word(text: &str, mut f: impl FnMut(&str)) {
    let mut lowered = String::new();
    words(text, BODY, |token| {
        if token.lower {
            f(token.word);
        } else {
            lowered.clear();
            lowered.push_str(token.word);
            lowered.make_ascii_lowercase();
            f(&lowered);
        }
    });
}

/// One word of a text, as [`words`] finds it.
#[derive(Debug, Clone, Copy)]
pub struct Word<'a> {
    /// The word; when `lower` is false, an ASCII word with upper-case letters as written.
    pub word: &'a str,
    pub lower: bool,
    /// [`hash`] of the lower-cased word with the seed [`words`] was given.
    pub hash: u64,
}

/// Byte classes, for [`words`].
const WORD: u8 = 1;
const UPPER: u8 = 2;
/// A word byte that is not a digit.
const NOT_DIGIT: u8 = 4;
const QUOTE: u8 = 8;
/// Beyond ASCII: `char`'s rules decide.
const HIGH: u8 = 16;
const CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = if c >= 128 {
            HIGH
        } else if c.is_ascii_digit() {
            WORD
        } else if c.is_ascii_uppercase() {
            WORD | UPPER | NOT_DIGIT
        } else if c.is_ascii_alphanumeric() || c == b'$' {
            WORD | NOT_DIGIT
        } else if c == b'\'' {
            WORD | QUOTE | NOT_DIGIT
        } else {
            0
        };
        b += 1;
    }
    table
};

/// Seeds of [`hash`]: body words, subject words.
const BODY: u64 = 0;
const SUBJECT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Calls `visit` with the eight-byte pieces a word is hashed from: whole words of eight bytes
/// and the last eight, overlapping; a shorter word as overlapping halves or three of its
/// bytes (wyhash's reads), so no byte is copied. Zero bytes pad the short pieces.
#[inline]
fn pieces(bytes: &[u8], mut visit: impl FnMut(u64)) {
    let n = bytes.len();
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
    let u32_at = |at: usize| {
        u64::from(u32::from_le_bytes(
            bytes[at..at + 4].try_into().expect("four bytes"),
        ))
    };
    if n >= 8 {
        let mut at = 0;
        while at + 8 < n {
            visit(u64_at(at));
            at += 8;
        }
        visit(u64_at(n - 8));
    } else if n >= 4 {
        visit(u32_at(0) | u32_at(n - 4) << 32);
    } else if n > 0 {
        let byte = |at: usize| u64::from(bytes[at]);
        visit(byte(0) | byte(n / 2) << 8 | byte(n - 1) << 16);
    }
}

const HASH_K: u64 = 0xf135_7aea_2e62_a9c5;

/// A word's hash, from its [`pieces`] (FxHash's multiply, with rustc-hash 2's final rotation
/// so hashbrown's tag bits vary). `lower`: ASCII upper-case letters hash as their lower case
/// (for ASCII words only).
#[inline]
pub fn hash(seed: u64, bytes: &[u8], lower: bool) -> u64 {
    let mut h = seed ^ bytes.len() as u64;
    pieces(bytes, |v| {
        let v = if lower { ascii_lower(v) } else { v };
        h = (h ^ v).wrapping_mul(HASH_K);
    });
    h.rotate_left(26)
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x80 * ONES;

/// The high bit of each byte of `v` (all below 0x80) that is within `lo..=hi`: adding
/// `0x80 - lo` sets it from `lo` up, adding `0x7f - hi` from above `hi` (no byte carries).
#[inline]
fn in_range(v: u64, lo: u8, hi: u8) -> u64 {
    let from_lo = v + u64::from(0x80 - lo) * ONES;
    let above_hi = v + u64::from(0x7f - hi) * ONES;
    from_lo & !above_hi & HIGHS
}

/// `str::is_ascii`, eight bytes at a time also in WebAssembly (where the standard library's
/// `usize` words are four).
pub fn is_ascii(text: &str) -> bool {
    let mut chunks = text.as_bytes().chunks_exact(8);
    let high = (&mut chunks).fold(0, |high, eight| {
        high | u64::from_le_bytes(eight.try_into().expect("eight bytes"))
    });
    high & HIGHS == 0 && chunks.remainder().is_ascii()
}

/// The eight ASCII bytes of `v` with `A`..`Z` lower-cased, all at once (bytes below 0x80).
#[inline]
pub fn ascii_lower(v: u64) -> u64 {
    v | (in_range(v, b'A', b'Z') >> 2)
}

/// Which bytes of `v` (ASCII) are letters, and which are `'` or `$`, as high bits.
#[inline]
fn letters_and_marks(v: u64) -> (u64, u64) {
    let letters = in_range(v | (0x20 * ONES), b'a', b'z');
    let marks = in_range(v, b'\'', b'\'') | in_range(v, b'$', b'$');
    (letters, marks)
}

/// [`words`] of ASCII text: each eight bytes classified at once, word boundaries found by
/// counting trailing zeros, each word's hash and classes from its [`pieces`].
fn ascii_words(text: &str, seed: u64, mut f: impl FnMut(Word<'_>)) {
    let bytes = text.as_bytes();
    let mut emit = |start: usize, end: usize| {
        let run = &text[start..end];
        if run.len() > 24 {
            // Too long, unless trimming its quotes makes it short enough (rare).
            if run.contains('\'') {
                any_words(run, seed, &mut f);
            }
            return;
        }
        let mut h = seed ^ run.len() as u64;
        let (mut upper, mut not_digit, mut quote) = (0, 0, 0);
        pieces(run.as_bytes(), |v| {
            let (letters, marks) = letters_and_marks(v);
            upper |= in_range(v, b'A', b'Z');
            not_digit |= letters | marks;
            quote |= in_range(v, b'\'', b'\'');
            h = (h ^ ascii_lower(v)).wrapping_mul(HASH_K);
        });
        if quote != 0 {
            any_words(run, seed, &mut f);
            return;
        }
        if run.len() >= 3 && not_digit != 0 {
            f(Word {
                word: run,
                lower: upper == 0,
                hash: h.rotate_left(26),
            });
        }
    };
    let mut start = None;
    let mut base = 0;
    while base < bytes.len() {
        let v = match bytes.get(base..base + 8) {
            Some(eight) => u64::from_le_bytes(eight.try_into().expect("eight bytes")),
            None => {
                // The tail, padded with zero bytes (not word bytes).
                let mut padded = [0u8; 8];
                padded[..bytes.len() - base].copy_from_slice(&bytes[base..]);
                u64::from_le_bytes(padded)
            }
        };
        let (letters, marks) = letters_and_marks(v);
        let word = letters | marks | in_range(v, b'0', b'9');
        // The bytes of this piece not yet looked at, as high bits.
        let mut ahead = HIGHS;
        loop {
            let found = match start {
                None => word & ahead,
                Some(_) => !word & ahead,
            };
            if found == 0 {
                break;
            }
            let at = base + (found.trailing_zeros() / 8) as usize;
            match start.take() {
                None => start = Some(at),
                Some(begun) => emit(begun, at),
            }
            // From the byte found on (its own bit kept).
            ahead &= !((found & found.wrapping_neg()) - 1);
        }
        base += 8;
    }
    if let Some(begun) = start {
        emit(begun, bytes.len());
    }
}

/// The words of a text: runs of letters, digits, `$` and `'`, quotes trimmed off their ends,
/// 3 to 24 characters, not all digits (`char`'s Unicode rules beyond ASCII). A message's text
/// is thousands of words and this is the classifier's main cost: ASCII text (most mail) is
/// classified eight bytes at a time and each word hashed from a few loads with no copy
/// ([`ascii_words`]), other text a byte at a time.
pub fn words(text: &str, seed: u64, f: impl FnMut(Word<'_>)) {
    if is_ascii(text) {
        ascii_words(text, seed, f);
    } else {
        any_words(text, seed, f);
    }
}

/// [`words`] of any text, a byte (or a `char`) at a time.
fn any_words(text: &str, seed: u64, mut f: impl FnMut(Word<'_>)) {
    let bytes = text.as_bytes();
    let alphanumeric_at = |at: usize| {
        let c = text[at..].chars().next().expect("a character");
        (c.is_alphanumeric(), c.len_utf8())
    };
    let mut at = 0;
    while at < bytes.len() {
        let class = CLASS[usize::from(bytes[at])];
        if class & WORD == 0 {
            if class & HIGH == 0 {
                at += 1;
                continue;
            }
            let (alphanumeric, len) = alphanumeric_at(at);
            if !alphanumeric {
                at += len;
                continue;
            }
        }
        let start = at;
        let mut flags = 0u8;
        while at < bytes.len() {
            let class = CLASS[usize::from(bytes[at])];
            if class & WORD != 0 {
                flags |= class;
                at += 1;
                continue;
            }
            if class & HIGH == 0 {
                break;
            }
            let (alphanumeric, len) = alphanumeric_at(at);
            if !alphanumeric {
                break;
            }
            flags |= HIGH;
            at += len;
        }
        let mut word = &text[start..at];
        if flags & QUOTE != 0 {
            // A word's quotes are not part of it ("'quoted'"); the rest is classed again.
            word = word.trim_matches('\'');
            flags = word
                .bytes()
                .fold(0, |flags, b| flags | CLASS[usize::from(b)]);
        }
        if flags & HIGH == 0 {
            if (3..=24).contains(&word.len()) && flags & NOT_DIGIT != 0 {
                let lower = flags & UPPER == 0;
                f(Word {
                    word,
                    lower,
                    hash: hash(seed, word.as_bytes(), !lower),
                });
            }
            continue;
        }
        if word.len() > 24 * 4 {
            continue; // more than 24 characters, whatever they are
        }
        let lowered: Cow<'_, str> = if word.chars().any(char::is_uppercase) {
            Cow::Owned(word.to_lowercase())
        } else {
            Cow::Borrowed(word)
        };
        // Lower-casing may change a word's length: counted after it. A word with a letter
        // beyond ASCII is never all digits.
        if (3..=24).contains(&lowered.chars().count()) {
            f(Word {
                word: &lowered,
                lower: true,
                hash: hash(seed, lowered.as_bytes(), false),
            });
        }
    }
}

/// FNV-1a: tokens are short, and a message's thousands of lookups must be cheap (SipHash,
/// the default, costs more than the rest of the scoring together).
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

/// Token → (spam count, ham count).
pub type Counts = HashMap<String, (u64, u64), std::hash::BuildHasherDefault<Fnv>>;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Model {
    pub spam_messages: u64,
    pub ham_messages: u64,
    pub counts: Counts,
}

impl Model {
    pub fn learn(&mut self, subject: &str, body: &str, spam: bool) {
        if spam {
            self.spam_messages += 1;
        } else {
            self.ham_messages += 1;
        }
        for token in tokens(subject, body) {
            let entry = self.counts.entry(token).or_default();
            if spam {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }

    /// Adds another model's counts (what users taught to what a corpus did).
    pub fn add(&mut self, other: &Model) {
        self.spam_messages += other.spam_messages;
        self.ham_messages += other.ham_messages;
        for (token, (s, h)) in &other.counts {
            let entry = self.counts.entry(token.clone()).or_default();
            entry.0 += s;
            entry.1 += h;
        }
    }

    pub fn to_text(&self) -> String {
        let mut lines: Vec<String> = self
            .counts
            .iter()
            .map(|(t, (s, h))| format!("{t} {s} {h}"))
            .collect();
        lines.sort();
        format!(
            "postern-spam-model 1 {} {}\n{}\n",
            self.spam_messages,
            self.ham_messages,
            lines.join("\n")
        )
    }

    pub fn parse(text: &str) -> Option<Model> {
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next()?.split_whitespace().collect();
        if head.len() != 4 || head[0] != "postern-spam-model" || head[1] != "1" {
            return None;
        }
        let mut model = Model {
            spam_messages: head[2].parse().ok()?,
            ham_messages: head[3].parse().ok()?,
            counts: Counts::default(),
        };
        for line in lines {
            let mut parts = line.split_whitespace();
            if let (Some(t), Some(s), Some(h)) = (parts.next(), parts.next(), parts.next()) {
                model
                    .counts
                    .insert(t.to_string(), (s.parse().ok()?, h.parse().ok()?));
            }
        }
        Some(model)
    }

    /// Probability that a message is spam, from its 15 most telling known tokens; 0.5 when the
    /// model knows nothing about it. (A filter scoring many messages prepares a [`Scorer`]
    /// once instead.)
    pub fn spam_probability(&self, subject: &str, body: &str) -> f64 {
        self.scorer().spam_probability(subject, body)
    }

    /// The model made ready for scoring: each token's probability worked out once, and tokens
    /// numbered so a message's repeats are told apart without hashing them again.
    pub fn scorer(&self) -> Scorer {
        let mut index = TokenIndex::with_capacity(self.counts.len());
        let mut tokens: Vec<String> = Vec::with_capacity(self.counts.len());
        let mut probs = Vec::with_capacity(self.counts.len());
        let known = self.spam_messages > 0 && self.ham_messages > 0;
        for (token, &(s, h)) in &self.counts {
            // Robinson: f(w) = (s * x + n * p(w)) / (s + n), strength s = 1, prior x = 0.5.
            let spam_freq = s as f64 / self.spam_messages.max(1) as f64;
            let ham_freq = h as f64 / self.ham_messages.max(1) as f64;
            let p = if spam_freq + ham_freq > 0.0 {
                spam_freq / (spam_freq + ham_freq)
            } else {
                0.5
            };
            let n = (s + h) as f64;
            let slot = probs.len() as u32;
            tokens.push(token.clone());
            index.insert(token_hash(token), slot);
            probs.push(((0.5 + n * p) / (1.0 + n)).clamp(0.01, 0.99));
        }
        Scorer {
            index,
            tokens,
            probs,
            known,
        }
    }
}

/// Token slots by their full 64-bit hash, open addressing with linear probing at most half
/// full: a lookup compares whole hashes (one load each) and the token's text only when they
/// are equal, so a word the model does not know costs a probe or two and no string compare.
/// (A general hash table compares a 7-bit tag and then the key; in WebAssembly, where every
/// load is bounds-checked, that costs half the classifier's time.)
struct TokenIndex {
    /// (hash, slot); slot `EMPTY` is a free entry.
    entries: Vec<(u64, u32)>,
    mask: usize,
    /// No two tokens share a hash (so the first entry with a word's hash is the only one).
    unique: bool,
}

const EMPTY: u32 = u32::MAX;

impl TokenIndex {
    fn with_capacity(tokens: usize) -> TokenIndex {
        let size = (tokens * 2).next_power_of_two().max(16);
        TokenIndex {
            entries: vec![(0, EMPTY); size],
            mask: size - 1,
            unique: true,
        }
    }

    fn insert(&mut self, hash: u64, slot: u32) {
        let mut at = hash as usize & self.mask;
        while self.entries[at].1 != EMPTY {
            self.unique &= self.entries[at].0 != hash;
            at = (at + 1) & self.mask;
        }
        self.entries[at] = (hash, slot);
    }

    /// The slot whose hash is `hash` and for which `is` says yes.
    #[inline]
    fn find(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<u32> {
        let mut at = hash as usize & self.mask;
        loop {
            let (entry, slot) = self.entries[at];
            if slot == EMPTY {
                return None;
            }
            if entry == hash && is(slot) {
                return Some(slot);
            }
            at = (at + 1) & self.mask;
        }
    }
}

/// The prefix of a subject's tokens.
const SUBJECT: &str = "subject:";

/// A model token's hash: a `subject:` token is its word hashed with the subject's seed.
fn token_hash(token: &str) -> u64 {
    match token.strip_prefix(SUBJECT) {
        Some(word) => hash(SUBJECT_SEED, word.as_bytes(), false),
        None => hash(BODY, token.as_bytes(), false),
    }
}

/// A [`Model`] ready to score messages: tokens found by the hash [`words`] computes as it
/// scans, so a message's words are never copied, lower-cased or hashed a second time.
pub struct Scorer {
    /// Token slots by [`token_hash`].
    index: TokenIndex,
    tokens: Vec<String>,
    probs: Vec<f64>,
    /// False when the model has no spam or no ham: it then knows nothing.
    known: bool,
}

impl Scorer {
    /// See [`Model::spam_probability`].
    pub fn spam_probability(&self, subject: &str, body: &str) -> f64 {
        if !self.known {
            return 0.5;
        }
        // Each distinct known token once.
        let mut seen = vec![false; self.probs.len()];
        let mut probs = Vec::new();
        let mut note = |prefix: &str, word: Word<'_>| {
            let found = self.index.find(word.hash, |slot| {
                // A token already counted needs no compare: whether this word is it or merely
                // shares its hash, nothing more is to be done (words repeat: most lookups).
                if seen[slot as usize] && self.index.unique {
                    return true;
                }
                let token = &self.tokens[slot as usize];
                token.strip_prefix(prefix).is_some_and(|rest| {
                    if word.lower {
                        rest == word.word
                    } else {
                        rest.len() == word.word.len()
                            && rest
                                .bytes()
                                .zip(word.word.bytes())
                                .all(|(t, w)| t == w.to_ascii_lowercase())
                    }
                })
            });
            if let Some(slot) = found {
                let slot = slot as usize;
                if !std::mem::replace(&mut seen[slot], true) {
                    probs.push(self.probs[slot]);
                }
            }
        };
        words(subject, SUBJECT_SEED, |w| note(SUBJECT, w));
        words(body, BODY, |w| note("", w));
        if probs.is_empty() {
            return 0.5;
        }
        // The most telling first; equally telling ones by value, so the pick does not depend
        // on the order tokens were seen in.
        probs.sort_by(|a, b| {
            (b - 0.5)
                .abs()
                .total_cmp(&(a - 0.5).abs())
                .then(a.total_cmp(b))
        });
        probs.truncate(15);
        let (log_spam, log_ham) = probs
            .iter()
            .fold((0.0, 0.0), |(s, h), p| (s + p.ln(), h + (1.0 - p).ln()));
        1.0 / (1.0 + (log_ham - log_spam).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_and_round_trips() {
        let mut model = Model::default();
        model.learn("cheap pills", "buy cheap pills now, limited offer", true);
        model.learn("lottery", "you won the lottery claim your prize", true);
        model.learn(
            "meeting notes",
            "notes from the project meeting on tuesday",
            false,
        );
        model.learn("lunch", "shall we have lunch after the meeting", false);
        let text = model.to_text();
        let parsed = Model::parse(&text).unwrap();
        assert_eq!(parsed, model);
        assert!(parsed.spam_probability("cheap offer", "claim your prize pills") > 0.9);
        assert!(parsed.spam_probability("project", "meeting about lunch") < 0.1);
    }
}

#[cfg(test)]
mod word_tests {
    use super::*;

    #[test]
    fn words_split_lower_and_filter_as_before() {
        let text = "Hello, WORLD! it's 12345 a $5000 offer 'quoted' Grüße ÉTÉ x1y2z3 \
                    abcdefghijklmnopqrstuvwxyz1";
        let mut got: Vec<String> = Vec::new();
        each_word(text, |w| got.push(w.to_string()));
        assert_eq!(
            got,
            ["hello", "world", "it's", "$5000", "offer", "quoted", "grüße", "été", "x1y2z3"]
        );
        // The same as splitting with the standard library and lower-casing each word.
        let plain: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric() && c != '$' && c != '\'')
            .map(|w| w.trim_matches('\'').to_lowercase())
            .filter(|w| {
                (3..=24).contains(&w.chars().count()) && !w.chars().all(|c| c.is_ascii_digit())
            })
            .collect();
        assert_eq!(got, plain);
    }

    #[test]
    fn each_hash_is_that_of_the_lowered_word() {
        let text = "Hello WORLD it's ''quoted'' x'y 1'2 '123' Grüße ÉTÉ O'Brien CAPS$5 \
                    'ÉCOLE' a'' 99999 KÖLN";
        for seed in [BODY, SUBJECT_SEED] {
            let mut seen = Vec::new();
            words(text, seed, |w| {
                let lowered = w.word.to_lowercase();
                assert_eq!(w.lower, w.word == lowered, "{}", w.word);
                assert_eq!(w.hash, hash(seed, lowered.as_bytes(), false), "{}", w.word);
                seen.push(lowered);
            });
            let mut each = Vec::new();
            each_word(text, |w| each.push(w.to_string()));
            assert_eq!(seen, each);
        }
    }

    #[test]
    fn ascii_words_are_those_found_a_byte_at_a_time() {
        // Pseudo-random ASCII text rich in word bytes, quotes, digits and separators.
        let alphabet = b"aAzZbQ09$''' .,-\n@[`{";
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut text = String::new();
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            text.push(char::from(
                alphabet[(state % alphabet.len() as u64) as usize],
            ));
        }
        let long = "x".repeat(30) + " '''''''''''''''''''''''''abc'''''''''''''''' 1234 ab";
        let samples = [
            text.as_str(),
            &long,
            "abc",
            "ab",
            "",
            "'",
            "abcdefgh",
            "abcdefghi",
        ];
        type Scan = fn(&str, u64, &mut dyn FnMut(Word<'_>));
        let fast: Scan = |t, s, f| ascii_words(t, s, f);
        let slow: Scan = |t, s, f| any_words(t, s, f);
        for sample in samples {
            for start in 0..sample.len().min(9) {
                let sample = &sample[start..];
                for seed in [BODY, SUBJECT_SEED] {
                    let collect = |scan: Scan| {
                        let mut got = Vec::new();
                        scan(sample, seed, &mut |w| {
                            got.push((w.word.to_string(), w.lower, w.hash))
                        });
                        got
                    };
                    assert_eq!(collect(fast), collect(slow), "{sample:?}");
                }
            }
        }
    }

    #[test]
    fn scoring_finds_tokens_whatever_their_case() {
        let mut model = Model::default();
        model.learn("Cheap Pills", "BUY cheap pills now, O'Brien's offer", true);
        model.learn("meeting", "notes from the Tuesday meeting", false);
        let scorer = model.scorer();
        let upper = scorer.spam_probability("CHEAP PILLS", "BUY NOW O'BRIEN'S OFFER");
        let lower = scorer.spam_probability("cheap pills", "buy now o'brien's offer");
        assert_eq!(upper, lower);
        assert!(upper > 0.9);
        // Subject tokens are not body tokens.
        let swapped = scorer.spam_probability("notes", "cheap pills");
        assert_ne!(swapped, scorer.spam_probability("cheap pills", "notes"));
    }
}
