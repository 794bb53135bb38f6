//! Spam filter: scored rules on headers and body, the GTUBE test string, and a token classifier
//! trained from a corpus (`spam-train`). Adds `X-Spam-Score` and `X-Spam-Status`, and quarantines
//! or rejects messages whose score reaches the configured thresholds.
//!
//! ```toml
//! [[plugin]]
//! name = "spam-filter"
//! path = "plugins/spam_filter.wasm"
//! capabilities = ["config", "log"]
//! [plugin.config]
//! quarantine_at = 5.0          # score from which the message goes to the Quarantine folder
//! reject_at = 10.0             # score from which it is refused with 550 5.7.1
//! bayes_weight = 5.0           # the classifier adds (2p - 1) * weight
//! rules = ["header:subject:viagra:4.0", "body:wire transfer:2.5", "header:from:@spam.test:6"]
//! dnsbls = ["zen.spamhaus.org:3.5"]   # zone:score; needs the dns capability
//! model = """..."""            # printed by spam-train
//! ```

use std::sync::OnceLock;

use postern_plugin_sdk::types::{
    DataDecision, DataVerdict, Envelope, HeaderField, Message, Modification, Session,
};
use postern_plugin_sdk::{config, config_list, config_or, debug, dns, dnsbl_name, reply};
use spam_classifier::classifier::{Model, Scorer};
use spam_classifier::{parse_rule, score, Rule};

postern_plugin_sdk::plugin!(SpamFilter, version = "0.1.0");

/// Text scanned at most: the start of a message carries its signal, and the cost of scanning
/// grows with size (SpamAssassin's body_part_scan_size is 50,000 bytes by default).
const MAX_TEXT: usize = 50_000;

struct SpamFilter;

/// The classifier, read and made ready once per instance.
fn model() -> Option<&'static Scorer> {
    static MODEL: OnceLock<Option<Scorer>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            config::get("model")
                .and_then(|text| Model::parse(&text))
                .map(|model| model.scorer())
        })
        .as_ref()
}

/// The rules, parsed once per instance (the configuration does not change under one).
fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        config_list("rules")
            .iter()
            .filter_map(|r| parse_rule(r))
            .collect()
    })
}

impl exports::postern::plugin0_1_0::data::Guest for SpamFilter {
    fn on_data(session: Session, envelope: Envelope, message: &Message) -> DataVerdict {
        let subject = message.header("subject").join(" ");
        let mut text = String::new();
        for part in message.text_parts() {
            let room = MAX_TEXT.saturating_sub(text.len());
            if room == 0 {
                break;
            }
            // Cut on a character boundary.
            let cut = (0..=room.min(part.len()))
                .rev()
                .find(|i| part.is_char_boundary(*i))
                .unwrap_or(0);
            text.push_str(&part[..cut]);
            text.push('\n');
        }
        let rules = rules();
        let headers = |name: &str| message.header(name);
        let (mut total, mut tests) = score(
            &subject,
            &headers,
            &text,
            rules,
            model(),
            config_or("bayes_weight", 5.0),
        );
        // DNSBLs: the client's IPv4 address listed (any 127.0.0.0/8 answer) adds the zone's score.
        for entry in config_list("dnsbls") {
            let Some((zone, weight)) = entry.rsplit_once(':') else {
                continue;
            };
            let (Ok(weight), Some(name)) =
                (weight.parse::<f64>(), dnsbl_name(&session.peer_ip, zone))
            else {
                continue;
            };
            if let Ok(answers) = dns::lookup_a(&name) {
                if answers.iter().any(|a| a.starts_with("127.")) {
                    total += weight;
                    tests.push(format!("DNSBL_{zone}"));
                }
            }
        }
        let quarantine_at = config_or("quarantine_at", 5.0f64);
        let reject_at = config_or("reject_at", 10.0f64);
        debug(&format!(
            "{}: score {total:.1} tests {}",
            envelope.queue_id,
            tests.join(",")
        ));
        let status = if total >= quarantine_at { "Yes" } else { "No" };
        let modifications = vec![
            Modification::AddHeader(HeaderField {
                name: "X-Spam-Score".into(),
                value: format!("{total:.1}"),
            }),
            Modification::AddHeader(HeaderField {
                name: "X-Spam-Status".into(),
                value: format!(
                    "{status}, score={total:.1} required={quarantine_at:.1} tests={}",
                    if tests.is_empty() {
                        "none".to_string()
                    } else {
                        tests.join(",")
                    }
                ),
            }),
        ];
        let decision = if total >= reject_at {
            DataDecision::Reject(reply(
                550,
                "5.7.1",
                &format!("Message rejected as spam (score {total:.1})"),
            ))
        } else if total >= quarantine_at {
            DataDecision::Quarantine(format!("spam score {total:.1}"))
        } else {
            DataDecision::Continue
        };
        DataVerdict {
            decision,
            modifications,
        }
    }
}
