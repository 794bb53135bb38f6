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
    for (word, ascii, upper) in (Words { text, at: 0 }) {
        // A word's quotes are not part of it ("'quoted'"); a quote is one byte, so trimming
        // bytes keeps character boundaries.
        let bytes = word.as_bytes();
        let start = bytes
            .iter()
            .position(|b| *b != b'\'')
            .unwrap_or(bytes.len());
        let end = bytes
            .iter()
            .rposition(|b| *b != b'\'')
            .map_or(start, |i| i + 1);
        let word = &word[start..end];
        if ascii {
            let bytes = word.as_bytes();
            if !(3..=24).contains(&bytes.len()) || bytes.iter().all(u8::is_ascii_digit) {
                continue;
            }
            if upper {
                lowered.clear();
                lowered.push_str(word);
                lowered.make_ascii_lowercase();
                f(&lowered);
            } else {
                f(word);
            }
            continue;
        }
        if word.len() > 24 * 4 {
            continue; // more than 24 characters, whatever they are
        }
        let word: Cow<'_, str> = if word.chars().any(char::is_uppercase) {
            Cow::Owned(word.to_lowercase())
        } else {
            Cow::Borrowed(word)
        };
        // Lower-casing may change a word's length: counted after it.
        if (3..=24).contains(&word.chars().count()) {
            f(&word);
        }
    }
}

/// Word bytes among ASCII: letters, digits, `$` and `'`.
const WORD: [bool; 128] = {
    let mut table = [false; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'$' || c == b'\'';
        b += 1;
    }
    table
};

/// The runs of word characters (letters, digits, `$` and `'`) of a text, each with whether it
/// is all ASCII and has an upper-case letter; ASCII is classified by table, the rest by
/// `char::is_alphanumeric`.
struct Words<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Iterator for Words<'a> {
    type Item = (&'a str, bool, bool);

    fn next(&mut self) -> Option<(&'a str, bool, bool)> {
        let bytes = self.text.as_bytes();
        let mut at = self.at;
        // Skip to the next word character.
        loop {
            let &b = bytes.get(at)?;
            if b < 128 {
                if WORD[usize::from(b)] {
                    break;
                }
                at += 1;
            } else {
                let c = self.text[at..].chars().next()?;
                if c.is_alphanumeric() {
                    break;
                }
                at += c.len_utf8();
            }
        }
        let start = at;
        let (mut ascii, mut upper) = (true, false);
        while let Some(&b) = bytes.get(at) {
            if b < 128 {
                if !WORD[usize::from(b)] {
                    break;
                }
                upper |= b.is_ascii_uppercase();
                at += 1;
            } else {
                let Some(c) = self.text[at..].chars().next() else {
                    break;
                };
                if !c.is_alphanumeric() {
                    break;
                }
                ascii = false;
                at += c.len_utf8();
            }
        }
        self.at = at;
        Some((&self.text[start..at], ascii, upper))
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
        let mut index = HashMap::with_capacity_and_hasher(self.counts.len(), Default::default());
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
            index.insert(token.clone(), probs.len() as u32);
            probs.push(((0.5 + n * p) / (1.0 + n)).clamp(0.01, 0.99));
        }
        Scorer {
            index,
            probs,
            known,
        }
    }
}

/// A [`Model`] ready to score messages.
pub struct Scorer {
    index: HashMap<String, u32, std::hash::BuildHasherDefault<Fnv>>,
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
        let mut note = |slot: Option<&u32>| {
            if let Some(&slot) = slot {
                let slot = slot as usize;
                if !std::mem::replace(&mut seen[slot], true) {
                    probs.push(self.probs[slot]);
                }
            }
        };
        each_word(subject, |w| note(self.index.get(&format!("subject:{w}"))));
        each_word(body, |w| note(self.index.get(w)));
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
}
