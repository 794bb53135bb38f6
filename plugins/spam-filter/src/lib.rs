//! Spam filter: scored rules on headers and body, the GTUBE test string, and a token classifier
//! trained from a corpus (`spam-train`). Adds `X-Spam-Score` and `X-Spam-Status`, and quarantines
//! or rejects messages whose score reaches the configured thresholds.
//!
//! It learns from what users do (WIT 0.2.0 `mailbox-event`): a message moved or copied into a
//! `\Junk` folder is learned as spam, one moved out of it as ham. What it learned is one model
//! in its kv store (`learned`, at most 60 KiB; past it new lessons are not kept and the log says
//! so), added to the configured model for the messages that follow.
//!
//! ```toml
//! [[plugin]]
//! name = "spam-filter"
//! path = "plugins/spam_filter.wasm"
//! capabilities = ["config", "log", "kv"]
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
use postern_plugin_sdk::v2::kv;
use postern_plugin_sdk::{config, config_list, config_or, debug, dns, dnsbl_name, info, reply};
use spam_classifier::classifier::{Model, Scorer};
use spam_classifier::{parse_rule, score, Rule};

use exports::postern::plugin0_2_0::mailbox_event::{Action, Event as MailboxEvent};

postern_plugin_sdk::plugin!(SpamFilter);

/// The learned model's largest size: a kv value holds 64 KiB.
const MAX_LEARNED: usize = 60 * 1024;

/// Text scanned at most: the start of a message carries its signal, and the cost of scanning
/// grows with size (SpamAssassin's body_part_scan_size is 50,000 bytes by default).
const MAX_TEXT: usize = 50_000;

struct SpamFilter;

/// What users taught it so far (empty when nothing).
fn learned() -> Option<Model> {
    let bytes = kv::get("learned").ok().flatten()?;
    Model::parse(std::str::from_utf8(&bytes).ok()?)
}

/// The classifier, read and made ready once per instance (an instance serves one session, so
/// lessons learned meanwhile are in the next session's): the configured model with what users
/// taught it added.
fn model() -> Option<&'static Scorer> {
    static MODEL: OnceLock<Option<Scorer>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let configured = config::get("model").and_then(|text| Model::parse(&text));
            let model = match (configured, learned()) {
                (Some(mut model), Some(learned)) => {
                    model.add(&learned);
                    model
                }
                (Some(model), None) | (None, Some(model)) => model,
                (None, None) => return None,
            };
            Some(model.scorer())
        })
        .as_ref()
}

/// The message's subject and decoded text, as the classifier reads them.
fn subject_and_text(message: &Message) -> (String, String) {
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
    (subject, text)
}

impl exports::postern::plugin0_2_0::mailbox_event::Guest for SpamFilter {
    fn on_mailbox_event(event: MailboxEvent, message: &Message) {
        let junk = |folder: &Option<String>| folder.as_deref() == Some("\\Junk");
        let into_junk = junk(&event.folder.special_use);
        let from_junk = event.source.as_ref().is_some_and(|s| junk(&s.special_use));
        let spam = match event.action {
            Action::Moved | Action::Copied if into_junk && !from_junk => true,
            Action::Moved if from_junk && !into_junk => false,
            _ => return,
        };
        let (subject, text) = subject_and_text(message);
        let mut model = learned().unwrap_or_default();
        model.learn(&subject, &text, spam);
        let text = model.to_text();
        if text.len() > MAX_LEARNED {
            info(&format!(
                "learned model full ({} bytes): a lesson from {} was not kept",
                text.len(),
                event.user
            ));
            return;
        }
        if let Err(err) = kv::set("learned", text.as_bytes(), None) {
            info(&format!("cannot keep a lesson: {err:?}"));
            return;
        }
        info(&format!(
            "learned a message of {} as {}",
            event.user,
            if spam { "spam" } else { "ham" }
        ));
    }
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
        let (subject, text) = subject_and_text(message);
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
