//! Scoring for the spam-filter plugin, kept free of WebAssembly bindings so that it builds and is
//! tested natively and the trainer (`spam-train`) shares it.

pub mod classifier;

use classifier::Scorer;

/// The GTUBE string: any spam filter must treat a message carrying it as spam.
pub const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
/// A scored rule: `header:NAME:SUBSTRING:SCORE` or `body:SUBSTRING:SCORE` (case-insensitive).
#[derive(Debug, PartialEq)]
pub enum Rule {
    Header {
        name: String,
        needle: String,
        score: f64,
    },
    Body {
        needle: String,
        score: f64,
    },
}

pub fn parse_rule(spec: &str) -> Option<Rule> {
    let (kind, rest) = spec.split_once(':')?;
    let (rest, score) = rest.rsplit_once(':')?;
    let score: f64 = score.trim().parse().ok()?;
    match kind {
        "header" => {
            let (name, needle) = rest.split_once(':')?;
            Some(Rule::Header {
                name: name.to_string(),
                needle: needle.to_lowercase(),
                score,
            })
        }
        "body" => Some(Rule::Body {
            needle: rest.to_lowercase(),
            score,
        }),
        _ => None,
    }
}

/// Whether ASCII `text` contains `needle` (ASCII; lower-case when `fold`, which then ignores
/// the text's ASCII case). Places where the needle's first byte is are found eight bytes at a
/// time, then compared: plugins run as WebAssembly, where the standard library's searches
/// and lower-casing go a byte at a time.
fn find_ascii(text: &[u8], needle: &[u8], fold: bool) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let Some(&first) = needle.first() else {
        return true;
    };
    let fold_byte = |b: u8| if fold { b.to_ascii_lowercase() } else { b };
    let matches_at = |at: usize| {
        text.get(at..at + needle.len())
            .is_some_and(|there| there.iter().zip(needle).all(|(t, n)| fold_byte(*t) == *n))
    };
    let last = text.len().saturating_sub(needle.len());
    let mut base = 0;
    while base <= last {
        let v = match text.get(base..base + 8) {
            Some(eight) => u64::from_le_bytes(eight.try_into().expect("eight bytes")),
            None => {
                // The tail, padded with bytes the needle cannot start with.
                let mut padded = [!first & 0x7f; 8];
                padded[..text.len() - base].copy_from_slice(&text[base..]);
                u64::from_le_bytes(padded)
            }
        };
        let v = if fold { classifier::ascii_lower(v) } else { v };
        // Bytes equal to `first` become zero; a byte below 0x80 plus 0x7f keeps its high bit
        // clear only when it was zero.
        let x = v ^ (u64::from(first) * ONES);
        let mut zero = !(x + 0x7f * ONES) & (0x80 * ONES);
        while zero != 0 {
            let at = base + (zero.trailing_zeros() / 8) as usize;
            if at > last {
                return false;
            }
            if matches_at(at) {
                return true;
            }
            zero &= zero - 1;
        }
        base += 8;
    }
    false
}

/// Scores a message: (total, names of the tests that fired).
pub fn score(
    subject: &str,
    headers: &dyn Fn(&str) -> Vec<String>,
    text: &str,
    rules: &[Rule],
    model: Option<&Scorer>,
    bayes_weight: f64,
) -> (f64, Vec<String>) {
    let mut total = 0.0;
    let mut tests = Vec::new();
    let ascii = classifier::is_ascii(text);
    let gtube = if ascii {
        find_ascii(text.as_bytes(), GTUBE.as_bytes(), false)
    } else {
        text.contains(GTUBE)
    };
    if gtube {
        total += 1000.0;
        tests.push("GTUBE".to_string());
    }
    // Body rules ignore case. ASCII text (most mail) with an ASCII needle is searched as it
    // is; otherwise the text is lower-cased once.
    let mut lower = None;
    for (i, rule) in rules.iter().enumerate() {
        let hit = match rule {
            Rule::Header { name, needle, .. } => headers(name)
                .iter()
                .any(|v| v.to_lowercase().contains(needle.as_str())),
            Rule::Body { needle, .. } if ascii && needle.is_ascii() => {
                find_ascii(text.as_bytes(), needle.as_bytes(), true)
            }
            Rule::Body { needle, .. } => lower
                .get_or_insert_with(|| text.to_lowercase())
                .contains(needle.as_str()),
        };
        if hit {
            let (Rule::Header { score, .. } | Rule::Body { score, .. }) = rule;
            total += score;
            tests.push(format!("RULE_{}", i + 1));
        }
    }
    if let Some(model) = model {
        let p = model.spam_probability(subject, text);
        let contribution = (2.0 * p - 1.0) * bayes_weight;
        if contribution.abs() >= 0.1 {
            total += contribution;
            tests.push(format!("BAYES_{:02}", (p * 100.0).round() as u32));
        }
    }
    (total, tests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_gtube() {
        assert_eq!(
            parse_rule("header:subject:Viagra:4.5"),
            Some(Rule::Header {
                name: "subject".into(),
                needle: "viagra".into(),
                score: 4.5
            })
        );
        assert_eq!(
            parse_rule("body:wire transfer:2"),
            Some(Rule::Body {
                needle: "wire transfer".into(),
                score: 2.0
            })
        );
        assert_eq!(parse_rule("nonsense"), None);
        let rules = vec![
            parse_rule("body:wire transfer:2").unwrap(),
            parse_rule("header:from:@spam.test:6").unwrap(),
        ];
        let headers = |name: &str| {
            if name == "from" {
                vec!["x@SPAM.test".to_string()]
            } else {
                vec![]
            }
        };
        let (total, tests) = score(
            "hi",
            &headers,
            "please send a Wire Transfer",
            &rules,
            None,
            5.0,
        );
        assert_eq!(total, 8.0);
        assert_eq!(tests, vec!["RULE_1", "RULE_2"]);
        let none = |_: &str| Vec::new();
        let (total, tests) = score("x", &none, &format!("test {GTUBE} test"), &[], None, 5.0);
        assert!(total >= 1000.0 && tests == vec!["GTUBE"]);
        // GTUBE is matched exactly; rules whatever the case, in ASCII text and not.
        let lowered = GTUBE.to_lowercase();
        assert_eq!(score("x", &none, &lowered, &[], None, 5.0).0, 0.0);
        assert!(score("x", &none, &format!("é {GTUBE}"), &[], None, 5.0).0 >= 1000.0);
        for text in ["WIRE TRANSFER", "Grüße, wire TRANSFER", "wire transfer ÉTÉ"] {
            let (total, _) = score("x", &none, text, &rules[..1], None, 5.0);
            assert_eq!(total, 2.0, "{text}");
        }
        let accented = [parse_rule("body:überweisung:3").unwrap()];
        assert_eq!(
            score("x", &none, "Ihre ÜBERWEISUNG", &accented, None, 5.0).0,
            3.0
        );
    }

    #[test]
    fn ascii_search_is_the_standard_one() {
        let all: String = (0u8..128).map(char::from).collect();
        let text = format!("{all} Hello WORLD @[`{{ AZaz 09 wire TRANSFER wirewire transfer");
        let needles = [
            "wire transfer",
            "hello",
            "zaz",
            "@[`",
            "a",
            "09 w",
            "transferx",
            "\u{7f}",
        ];
        for start in 0..12 {
            let text = &text[start..];
            let lower = text.to_ascii_lowercase();
            for needle in needles {
                let expected = lower.contains(needle);
                assert_eq!(
                    find_ascii(text.as_bytes(), needle.as_bytes(), true),
                    expected
                );
                let exact = text.contains(needle);
                assert_eq!(find_ascii(text.as_bytes(), needle.as_bytes(), false), exact);
            }
        }
        assert!(!find_ascii(b"wir", b"wire", true));
        assert!(find_ascii(b"abc", b"", true));
    }
}
