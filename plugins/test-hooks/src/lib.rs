//! A plugin for the end-to-end tests: it exports every hook and does, at each stage, what the
//! config key of that stage says (`connect`, `helo`, `auth`, `login`, `mail-from`, `rcpt`,
//! `data`, `deliver`, `vrfy`, `expn`; absent means continue). It is a WIT 0.2.0 plugin: `login`
//! and `kv` are 0.2.0's, the other hooks 0.1.0's.
//!
//! - mailbox-event: every event is printed to stdout (so the server's log has it) as
//!   `mailbox-event ACTION SOURCE -> FOLDER (SPECIAL-USE) [FLAGS] subject=SUBJECT`, after
//!   sleeping MS milliseconds when the action is `sleep:MS`.
//! - login only: `login-smtp`, `login-imap`, `login-pop3` are read before `login`, so one
//!   protocol can be refused alone; `reject-user:USER` refuses that user with 550 5.7.1.
//!
//! - `continue`, `accept`, `reject:CODE:ENHANCED:TEXT`, `tempfail:…`, `disconnect:…`
//! - data only: `discard`, `quarantine:REASON`, `echo-subject` (rejects with the Subject it read),
//!   `echo-text` (rejects with the first text part it decoded); and `data-modifications`, a list
//!   of `add-header:NAME:VALUE`, `insert-header:NAME:VALUE`, `change-header:NAME:INDEX:VALUE`,
//!   `remove-header:NAME:INDEX`, `change-sender:ADDR`, `add-recipient:ADDR`,
//!   `remove-recipient:ADDR`, `replace-body:TEXT`
//! - queued only: `quarantine:REASON`, `discard:REASON`, `bounce:REASON`, `defer:REASON`,
//!   `defer-until:N` (defers until it has been called N times, counted in kv), `sleep:MS:THEN`
//!   (sleeps, then does THEN); `queued-modifications` as `data-modifications`. Every call is
//!   printed as `queued ID from=<SENDER> to=RCPTS subject=SUBJECT`; with `queued-only-subject`
//!   the action applies only to messages whose Subject contains it (after any sleep).
//! - outbound only: `mx`, `host:HOST[:PORT]`, `transport:NAME`, `defer:TEXT`, `fail:TEXT`; with
//!   `outbound-only-rcpt` only for recipients containing it, and for those `outbound-sender`
//!   (the envelope sender to use) and `outbound-require-tls` (any value) too.
//! - deliver only: `folder:NAME`, `forward:ADDR`, `discard`, `defer:TEXT`, `fail:TEXT`
//! - vrfy/expn: `found:ADDR`, `not-found`, `cannot-verify`
//! - `echo-table:KEY`, `echo-numbers:KEY`: reject with the SDK's reading of a config table
//!   (`k=v ...`) or the sum of an array of numbers
//! - misbehaviour: `loop` (never returns), `sleep:MS` (sleeps in WASI's poll, then continues), `alloc` (grows memory until it fails), `panic`,
//!   `read-file:PATH` and `connect:HOST:PORT` (try the sandbox; the outcome is the reject text),
//!   `kv-count` (counts calls in the kv store and rejects with the count), `kv-fill` (stores
//!   64 KiB values until the store says no, and rejects with what it said), `wall-clock` (rejects
//!   with the seconds WASI's wall clock tells)
//! - `print:TEXT` (writes TEXT to stdout and stderr, then continues), `dns-a:NAME` and
//!   `dns-txt:NAME` (look NAME up and reject with what the resolver said)

use postern_plugin_sdk::types::{
    DataDecision, DataVerdict, Decision, Delivery, DeliveryTarget, Envelope, HeaderChange,
    HeaderField, HeaderRemoval, LookupAnswer, Mailbox, Message, Modification, Reply, Session,
};
use postern_plugin_sdk::v2::kv;
use postern_plugin_sdk::{config, config_list, config_table, config_values, dns, reply};

postern_plugin_sdk::plugin!(TestHooks);

use exports::postern::plugin0_2_0::login::Protocol;
use exports::postern::plugin0_2_0::mailbox_event::{Action, Event as MailboxEvent};
use exports::postern::plugin0_2_0::outbound::{OutboundDecision, OutboundVerdict, Route};
use exports::postern::plugin0_2_0::queued::{QueuedDecision, QueuedVerdict};

struct TestHooks;

/// A stage's action, read from the config once per instance (the host makes a fresh instance
/// per session, and a reload makes new instances, so the cache never goes stale).
fn action(stage: &str) -> String {
    static ACTIONS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut actions = ACTIONS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, action)) = actions.iter().find(|(s, _)| s == stage) {
        return action.clone();
    }
    let action = config::get(stage).unwrap_or_else(|| "continue".into());
    actions.push((stage.to_string(), action.clone()));
    action
}

/// `kind:code:enhanced:text` → the reply part.
fn parse_reply(rest: &str) -> Reply {
    let mut parts = rest.splitn(3, ':');
    let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let enhanced = parts.next().unwrap_or("").to_string();
    let text = parts.next().unwrap_or("").to_string();
    reply(code, &enhanced, &text)
}

/// Actions every stage understands; None when the action is stage-specific.
fn common(action: &str) -> Option<Decision> {
    let (kind, rest) = action.split_once(':').unwrap_or((action, ""));
    Some(match kind {
        "continue" => Decision::Continue,
        "accept" => Decision::Accept,
        "reject" => Decision::Reject(parse_reply(rest)),
        "tempfail" => Decision::Tempfail(parse_reply(rest)),
        "disconnect" => Decision::Disconnect(parse_reply(rest)),
        // The SDK's typed getters on the host's rendering: a table and an array of numbers.
        "echo-table" => {
            let pairs: Vec<String> = config_table(rest)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            Decision::Reject(reply(550, "5.7.1", &pairs.join(" ")))
        }
        "echo-numbers" => {
            let sum: f64 = config_values::<f64>(rest).iter().sum();
            Decision::Reject(reply(550, "5.7.1", &format!("sum {sum}")))
        }
        // Waits in WASI's poll, outside guest code: the host's timer must stop it.
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_millis(rest.parse().unwrap_or(0)));
            Decision::Continue
        }
        "loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "panic" => panic!("test-hooks asked to panic"),
        "wall-clock" => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            Decision::Reject(reply(550, "5.7.1", &format!("wall clock {secs}")))
        }
        "read-file" => {
            let text = match std::fs::read(rest) {
                Ok(bytes) => format!("read ok: {} bytes", bytes.len()),
                Err(err) => format!("read failed: {err}"),
            };
            Decision::Reject(reply(550, "5.7.1", &text))
        }
        "connect" => {
            let text = match std::net::TcpStream::connect(rest) {
                Ok(_) => "connect ok".to_string(),
                Err(err) => format!("connect failed: {err}"),
            };
            Decision::Reject(reply(550, "5.7.1", &text))
        }
        "print" => {
            println!("{rest}");
            eprintln!("{rest} (stderr)");
            Decision::Continue
        }
        "dns-a" | "dns-txt" => {
            let answer = if kind == "dns-a" {
                dns::lookup_a(rest)
            } else {
                dns::lookup_txt(rest)
            };
            let text = match answer {
                Ok(records) => format!("dns ok: {}", records.join(",")),
                Err(dns::DnsError::NotFound) => "dns not found".to_string(),
                Err(dns::DnsError::Timeout) => "dns timeout".to_string(),
                Err(dns::DnsError::Failed(why)) => format!("dns failed: {why}"),
            };
            Decision::Reject(reply(550, "5.7.1", &text))
        }
        "kv-count" => match kv::increment("calls", 1, None) {
            Ok(n) => Decision::Reject(reply(550, "5.7.1", &format!("call {n}"))),
            Err(err) => Decision::Reject(reply(550, "5.7.1", &format!("kv: {err:?}"))),
        },
        "kv-fill" => {
            let value = vec![b'x'; 64 * 1024];
            let mut stored = 0;
            let err = loop {
                match kv::set(&format!("fill-{stored}"), &value, None) {
                    Ok(()) => stored += 1,
                    Err(err) => break err,
                }
            };
            Decision::Reject(reply(550, "5.7.1", &format!("kv: {err:?} after {stored}")))
        }
        _ => return None,
    })
}

fn decide(stage: &str) -> Decision {
    common(&action(stage)).unwrap_or(Decision::Continue)
}

impl exports::postern::plugin0_1_0::connect::Guest for TestHooks {
    fn on_connect(_session: Session) -> Decision {
        decide("connect")
    }
}

impl exports::postern::plugin0_1_0::helo::Guest for TestHooks {
    fn on_helo(_session: Session, _name: String, _extended: bool) -> Decision {
        decide("helo")
    }
}

impl exports::postern::plugin0_1_0::auth::Guest for TestHooks {
    fn on_auth(_session: Session, _mechanism: String, _user: String) -> Decision {
        decide("auth")
    }
}

impl exports::postern::plugin0_2_0::login::Guest for TestHooks {
    fn on_login(
        _session: Session,
        protocol: Protocol,
        _mechanism: String,
        user: String,
    ) -> Decision {
        let name = match protocol {
            Protocol::Smtp => "login-smtp",
            Protocol::Imap => "login-imap",
            Protocol::Pop3 => "login-pop3",
        };
        let action = config::get(name).unwrap_or_else(|| action("login"));
        match action.strip_prefix("reject-user:") {
            Some(refused) if refused.eq_ignore_ascii_case(&user) => {
                Decision::Reject(reply(550, "5.7.1", &format!("{user} may not log in now")))
            }
            Some(_) => Decision::Continue,
            None => common(&action).unwrap_or(Decision::Continue),
        }
    }
}

impl exports::postern::plugin0_2_0::mailbox_event::Guest for TestHooks {
    fn on_mailbox_event(event: MailboxEvent, message: &Message) {
        // `sleep:MS`: a slow listener, for the queue's bounds.
        if let Some(ms) = action("mailbox-event").strip_prefix("sleep:") {
            std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
        }
        let action = match event.action {
            Action::Appended => "appended",
            Action::Copied => "copied",
            Action::Moved => "moved",
            Action::FlagsChanged => "flags-changed",
        };
        let source = event.source.map(|f| f.name).unwrap_or_else(|| "-".into());
        let special = event.folder.special_use.unwrap_or_else(|| "none".into());
        let subject = message.header("subject").join(" ");
        println!(
            "mailbox-event {action} {source} -> {} ({special}) [{}] subject={subject} user={}",
            event.folder.name,
            event.flags.join(" "),
            event.user
        );
    }
}

impl exports::postern::plugin0_1_0::mail_from::Guest for TestHooks {
    fn on_mail_from(_session: Session, _sender: String, _size: u64) -> Decision {
        decide("mail-from")
    }
}

impl exports::postern::plugin0_1_0::rcpt::Guest for TestHooks {
    fn on_rcpt(_session: Session, _sender: String, _recipient: String, _local: bool) -> Decision {
        decide("rcpt")
    }
}

fn modification(spec: &str) -> Option<Modification> {
    let (kind, rest) = spec.split_once(':')?;
    let two = || {
        rest.split_once(':')
            .map(|(a, b)| (a.to_string(), b.to_string()))
    };
    Some(match kind {
        "add-header" => {
            two().map(|(name, value)| Modification::AddHeader(HeaderField { name, value }))?
        }
        "insert-header" => {
            two().map(|(name, value)| Modification::InsertHeader(HeaderField { name, value }))?
        }
        "change-header" => {
            let mut p = rest.splitn(3, ':');
            Modification::ChangeHeader(HeaderChange {
                name: p.next()?.to_string(),
                index: p.next()?.parse().ok()?,
                value: p.next()?.to_string(),
            })
        }
        "remove-header" => two().map(|(name, index)| {
            Modification::RemoveHeader(HeaderRemoval {
                name,
                index: index.parse().unwrap_or(0),
            })
        })?,
        "change-sender" => Modification::ChangeSender(rest.to_string()),
        "add-recipient" => Modification::AddRecipient(rest.to_string()),
        "remove-recipient" => Modification::RemoveRecipient(rest.to_string()),
        "replace-body" => Modification::ReplaceBody(rest.replace("\\n", "\r\n").into_bytes()),
        _ => return None,
    })
}

impl exports::postern::plugin0_1_0::data::Guest for TestHooks {
    fn on_data(_session: Session, _envelope: Envelope, message: &Message) -> DataVerdict {
        let action = action("data");
        let decision = match action.split_once(':').unwrap_or((action.as_str(), "")) {
            ("discard", _) => DataDecision::Discard,
            ("quarantine", reason) => DataDecision::Quarantine(reason.to_string()),
            ("echo-subject", _) => {
                let subject = message.header("subject").join(" | ");
                DataDecision::Reject(reply(
                    550,
                    "5.7.1",
                    &format!("subject was {subject}; size {}", message.size()),
                ))
            }
            // What a DMARC enforcement plugin does: refuse failures under p=reject.
            ("dmarc-reject", _) => {
                let auth = message.authentication();
                if auth.dmarc == "fail" && auth.dmarc_policy == "reject" {
                    DataDecision::Reject(reply(
                        550,
                        "5.7.1",
                        &format!(
                            "DMARC policy of {} rejects this message (spf={}, dkim={})",
                            auth.from_domain, auth.spf, auth.dkim
                        ),
                    ))
                } else {
                    DataDecision::Continue
                }
            }
            ("echo-text", _) => {
                let text = message.text_parts().first().cloned().unwrap_or_default();
                DataDecision::Reject(reply(550, "5.7.1", &format!("text was {}", text.trim())))
            }
            _ => match common(&action).unwrap_or(Decision::Continue) {
                Decision::Continue => DataDecision::Continue,
                Decision::Accept => DataDecision::Accept,
                Decision::Reject(r) => DataDecision::Reject(r),
                Decision::Tempfail(r) => DataDecision::Tempfail(r),
                Decision::Disconnect(r) => DataDecision::Disconnect(r),
            },
        };
        DataVerdict {
            decision,
            modifications: config_list("data-modifications")
                .iter()
                .filter_map(|m| modification(m))
                .collect(),
        }
    }
}

impl exports::postern::plugin0_2_0::queued::Guest for TestHooks {
    fn on_queued(envelope: Envelope, message: &Message) -> QueuedVerdict {
        let mut action = action("queued");
        // `sleep:MS:THEN`: a slow filter (WASI's monotonic clock, which every plugin has),
        // then THEN.
        if let Some(rest) = action.strip_prefix("sleep:") {
            let (ms, then) = rest.split_once(':').unwrap_or((rest, "continue"));
            std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
            action = then.to_string();
        }
        let subject = message.header("subject").join(" ");
        if let Some(only) = config::get("queued-only-subject") {
            if !subject.contains(&only) {
                action = "continue".into();
            }
        }
        println!(
            "queued {} from=<{}> to={} subject={subject}",
            envelope.queue_id,
            envelope.sender,
            envelope.recipients.join(",")
        );
        let (kind, why) = action.split_once(':').unwrap_or((action.as_str(), ""));
        let decision = match kind {
            "quarantine" => QueuedDecision::Quarantine(why.to_string()),
            "discard" => QueuedDecision::Discard(why.to_string()),
            "bounce" => QueuedDecision::Bounce(why.to_string()),
            "defer" => QueuedDecision::Defer(why.to_string()),
            // Defers until the kv counter `queued-tries` reaches N (a scanner coming back).
            "defer-until" => {
                let tries = kv::increment("queued-tries", 1, None).unwrap_or(0);
                if tries < why.parse().unwrap_or(0) {
                    QueuedDecision::Defer(format!("try {tries}"))
                } else {
                    QueuedDecision::Continue
                }
            }
            _ => {
                common(&action);
                QueuedDecision::Continue
            }
        };
        QueuedVerdict {
            decision,
            modifications: config_list("queued-modifications")
                .iter()
                .filter_map(|m| modification(m))
                .collect(),
        }
    }
}

impl exports::postern::plugin0_2_0::outbound::Guest for TestHooks {
    fn on_outbound(_envelope: Envelope, recipient: String, _message: &Message) -> OutboundVerdict {
        let mut action = action("outbound");
        if let Some(only) = config::get("outbound-only-rcpt") {
            if !recipient.contains(&only) {
                action = "continue".into();
            }
        }
        let (kind, rest) = action.split_once(':').unwrap_or((action.as_str(), ""));
        let decision = match kind {
            "mx" => OutboundDecision::Route(Route::Mx),
            "host" => OutboundDecision::Route(Route::Host(rest.to_string())),
            "transport" => OutboundDecision::Route(Route::Transport(rest.to_string())),
            "defer" => OutboundDecision::Defer(rest.to_string()),
            "fail" => OutboundDecision::Fail(rest.to_string()),
            _ => {
                common(&action);
                OutboundDecision::Continue
            }
        };
        let applies = kind != "continue";
        OutboundVerdict {
            decision,
            require_tls: applies && config::get("outbound-require-tls").is_some(),
            sender: config::get("outbound-sender").filter(|_| applies),
        }
    }
}

impl exports::postern::plugin0_1_0::deliver::Guest for TestHooks {
    fn on_deliver(_envelope: Envelope, _target: DeliveryTarget, _message: &Message) -> Delivery {
        let action = action("deliver");
        match action.split_once(':').unwrap_or((action.as_str(), "")) {
            ("folder", name) => Delivery::Folder(name.to_string()),
            ("forward", to) => Delivery::Forward(to.to_string()),
            ("discard", _) => Delivery::Discard,
            ("defer", why) => Delivery::Defer(why.to_string()),
            ("fail", why) => Delivery::Fail(why.to_string()),
            _ => {
                common(&action);
                Delivery::Continue
            }
        }
    }
}

fn lookup(stage: &str) -> LookupAnswer {
    let action = action(stage);
    match action.split_once(':').unwrap_or((action.as_str(), "")) {
        ("found", address) => LookupAnswer::Found(vec![Mailbox {
            address: address.to_string(),
            display_name: None,
        }]),
        ("not-found", _) => LookupAnswer::NotFound,
        ("cannot-verify", _) => LookupAnswer::CannotVerify,
        _ => match common(&action) {
            Some(Decision::Reject(r))
            | Some(Decision::Tempfail(r))
            | Some(Decision::Disconnect(r)) => LookupAnswer::Custom(r),
            _ => LookupAnswer::Continue,
        },
    }
}

impl exports::postern::plugin0_1_0::vrfy::Guest for TestHooks {
    fn on_vrfy(_session: Session, _query: String) -> LookupAnswer {
        lookup("vrfy")
    }
}

impl exports::postern::plugin0_1_0::expn::Guest for TestHooks {
    fn on_expn(_session: Session, _list: String) -> LookupAnswer {
        lookup("expn")
    }
}
