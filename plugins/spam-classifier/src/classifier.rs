//! A token classifier (naive Bayes with Robinson's smoothing), trained from ham and spam corpora.
//!
//! The model is text, so it fits in the plugin's configuration: a first line
//! `postern-spam-model 1 <spam messages> <ham messages>` and one line per token
//! `<token> <spam count> <ham count>`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// Tokens: lower-cased words of 3 to 24 letters or digits from the text, plus `subject:` tokens.
pub fn tokens(subject: &str, body: &str) -> Vec<String> {
    let mut out: Vec<String> = words(subject)
        .map(|w| format!("subject:{w}"))
        .chain(words(body).map(Cow::into_owned))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The words of a text as tokens: lower-cased, 3 to 24 characters, not all digits. A word
/// already in lower case is borrowed, so a large text costs few allocations.
fn words(text: &str) -> impl Iterator<Item = Cow<'_, str>> {
    text.split(|c: char| !c.is_alphanumeric() && c != '$' && c != '\'')
        .filter_map(|word| {
            let word = word.trim_matches('\'');
            if word.is_empty() || word.len() > 24 * 4 {
                return None;
            }
            let word = if word.chars().any(char::is_uppercase) {
                Cow::Owned(word.to_lowercase())
            } else {
                Cow::Borrowed(word)
            };
            let len = word.chars().count();
            ((3..=24).contains(&len) && !word.bytes().all(|b| b.is_ascii_digit())).then_some(word)
        })
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Model {
    pub spam_messages: u64,
    pub ham_messages: u64,
    pub counts: HashMap<String, (u64, u64)>,
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
            counts: HashMap::new(),
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
    /// model knows nothing about it.
    pub fn spam_probability(&self, subject: &str, body: &str) -> f64 {
        if self.spam_messages == 0 || self.ham_messages == 0 {
            return 0.5;
        }
        // Robinson: f(w) = (s * x + n * p(w)) / (s + n), strength s = 1, prior x = 0.5.
        // Each distinct token once; body tokens are looked up as borrowed slices.
        let subject_tokens: HashSet<String> =
            words(subject).map(|w| format!("subject:{w}")).collect();
        let body_tokens: HashSet<Cow<'_, str>> = words(body).collect();
        let mut probs: Vec<f64> = subject_tokens
            .iter()
            .map(String::as_str)
            .chain(body_tokens.iter().map(|t| t.as_ref()))
            .filter_map(|t| self.counts.get(t))
            .map(|&(s, h)| {
                let spam_freq = s as f64 / self.spam_messages as f64;
                let ham_freq = h as f64 / self.ham_messages as f64;
                let p = spam_freq / (spam_freq + ham_freq);
                let n = (s + h) as f64;
                ((0.5 + n * p) / (1.0 + n)).clamp(0.01, 0.99)
            })
            .collect();
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
