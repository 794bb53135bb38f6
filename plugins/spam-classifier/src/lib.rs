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
    if text.contains(GTUBE) {
        total += 1000.0;
        tests.push("GTUBE".to_string());
    }
    // ASCII text (most mail) lower-cases byte by byte; the same result, much cheaper.
    let lower = if text.is_ascii() {
        text.to_ascii_lowercase()
    } else {
        text.to_lowercase()
    };
    for (i, rule) in rules.iter().enumerate() {
        let hit = match rule {
            Rule::Header { name, needle, .. } => headers(name)
                .iter()
                .any(|v| v.to_lowercase().contains(needle.as_str())),
            Rule::Body { needle, .. } => lower.contains(needle.as_str()),
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
    }
}
