//! `postern plugin test PLUGIN.wasm --eml MESSAGE.eml`: a plugin author's inner loop without a
//! running server. The component is loaded as the server loads it (same engine, limits and
//! capability checks), its hooks are called in a session's order (connect, HELO, MAIL FROM,
//! each RCPT, DATA, then the after-queue filter and, for each remote recipient, the outbound
//! hook) on the message given, and each hook's decision, edits and time are printed;
//! `--expect` lines make it a test runner (exit status 1 when one is not met), so a plugin
//! project can run it in its own CI.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;

use crate::auth::UserDirectory;
use crate::config::{Capability, Config, DnsConfig, OnError, PluginConfig, PluginsConfig};
use crate::message::Edit;
use crate::plugin::bindings::types;
use crate::plugin::{
    Changes, DataOutcome, Filtering, Hook, LoginProtocol, Outbound, OutboundRoute, PluginRuntime,
    PluginSession, SessionInfo, Stage, Verdict,
};

#[derive(Args)]
pub struct PluginTest {
    /// The component to run.
    wasm: PathBuf,
    /// Its `[plugin.config]`: a TOML file, or the TOML itself (`'reject_at = 5.0'`).
    #[arg(long)]
    config: Option<String>,
    /// Capabilities to grant (default: all it imports, with DNS pointed at nothing).
    #[arg(long = "capability", value_name = "NAME")]
    capabilities: Vec<String>,
    /// The message given to the data hook.
    #[arg(long)]
    eml: PathBuf,
    #[arg(long, default_value = "sender@remote.test")]
    from: String,
    /// Recipients (default alice@example.test, a user of the embedded configuration).
    #[arg(long = "rcpt")]
    rcpts: Vec<String>,
    #[arg(long, default_value = "client.test")]
    helo: String,
    #[arg(long, default_value = "192.0.2.1")]
    ip: String,
    /// The user a login hook sees log in (over IMAP, with LOGIN), before the SMTP stages.
    #[arg(long, default_value = "alice@example.test")]
    user: String,
    /// `HOOK: OUTCOME`, met when a line printed for that hook starts with it, for example
    /// `rcpt: refuse 550 5.7.1`, `data: quarantine`, `data: pass`, `data: +X-Spam-Score`.
    #[arg(long = "expect", value_name = "LINE")]
    expects: Vec<String>,
}

fn capability(name: &str) -> anyhow::Result<Capability> {
    Ok(match name {
        "log" => Capability::Log,
        "config" => Capability::Config,
        "kv" => Capability::Kv,
        "clock" => Capability::Clock,
        "directory" => Capability::Directory,
        "dns" => Capability::Dns,
        other => bail!("unknown capability {other:?} (log, config, kv, clock, directory, dns)"),
    })
}

fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Pass => "pass".into(),
        Verdict::Refuse(reply) => format!(
            "refuse {} {} {}",
            reply.code,
            reply.status,
            reply.lines.join(" ")
        ),
        Verdict::Disconnect(reply) => format!(
            "disconnect {} {} {}",
            reply.code,
            reply.status,
            reply.lines.join(" ")
        ),
    }
}

fn edits(outcome: &DataOutcome) -> Vec<String> {
    let mut out = Vec::new();
    if outcome.discard {
        out.push("discard".to_string());
    }
    if let Some(why) = &outcome.quarantine {
        out.push(format!("quarantine ({why})"));
    }
    out.extend(changes(&outcome.changes));
    out
}

/// Local in the embedded configuration the offline session stands for.
fn is_local(rcpt: &str) -> bool {
    rcpt.ends_with("@example.test") || rcpt.ends_with("@localhost")
}

fn outbound(o: &Outbound) -> String {
    match o {
        Outbound::Send {
            route,
            require_tls,
            sender,
        } => {
            let mut out = match route {
                OutboundRoute::Default => "default".to_string(),
                OutboundRoute::Mx => "mx".to_string(),
                OutboundRoute::Host(h) => format!("host {h}"),
                OutboundRoute::Transport(t) => format!("transport {t}"),
            };
            if *require_tls {
                out.push_str(", TLS required");
            }
            if let Some(sender) = sender {
                out.push_str(&format!(", sender <{sender}>"));
            }
            out
        }
        Outbound::Defer(why) => format!("defer ({why})"),
        Outbound::Fail(why) => format!("fail ({why})"),
    }
}

fn filtering(f: &Filtering) -> String {
    match f {
        Filtering::Deliver => "deliver".into(),
        Filtering::Quarantine(why) => format!("quarantine ({why})"),
        Filtering::Discard(why) => format!("discard ({why})"),
        Filtering::Bounce(why) => format!("bounce ({why})"),
        Filtering::Defer(why) => format!("defer ({why})"),
    }
}

fn changes(changes: &Changes) -> Vec<String> {
    let mut out = Vec::new();
    for edit in &changes.edits {
        out.push(match edit {
            Edit::Add(field) | Edit::Insert(field) => {
                format!("+{}", String::from_utf8_lossy(&field.raw).trim_end())
            }
            Edit::Change { name, index, value } => format!("~{name}[{index}]: {value}"),
            Edit::Remove { name, index } => format!("-{name}[{index}]"),
            Edit::ReplaceBody(body) => format!("body replaced ({} bytes)", body.len()),
        });
    }
    if let Some(sender) = &changes.new_sender {
        out.push(format!("sender <{sender}>"));
    }
    out.extend(
        changes
            .add_recipients
            .iter()
            .map(|r| format!("+rcpt <{r}>")),
    );
    out.extend(
        changes
            .remove_recipients
            .iter()
            .map(|r| format!("-rcpt <{r}>")),
    );
    out
}

fn took(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

pub fn run(test: PluginTest) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(test))
}

async fn run_async(test: PluginTest) -> anyhow::Result<()> {
    let message =
        std::fs::read(&test.eml).with_context(|| format!("cannot read {}", test.eml.display()))?;
    // The server hands hooks CRLF lines, whatever the file has.
    let message = Arc::new(crate::framing::crlf_line_ends(&message).into_owned());
    let table: toml::Table = match &test.config {
        None => toml::Table::new(),
        Some(text) => {
            let text = match std::fs::read_to_string(text) {
                Ok(file) => file,
                Err(_) => text.clone(),
            };
            toml::from_str(&text).context("--config is neither a TOML file nor TOML")?
        }
    };
    let capabilities = if test.capabilities.is_empty() {
        vec![
            Capability::Log,
            Capability::Config,
            Capability::Kv,
            Capability::Clock,
            Capability::Directory,
            Capability::Dns,
        ]
    } else {
        test.capabilities
            .iter()
            .map(|c| capability(c))
            .collect::<anyhow::Result<_>>()?
    };
    let scratch = tempfile::tempdir()?;
    let defaults = Config::embedded_default();
    let users = Arc::new(UserDirectory::from_config(&defaults));
    // Offline: a resolver that reaches nothing answers every lookup with a timeout.
    let dns = crate::dns::Dns::new(&DnsConfig {
        nameservers: vec!["127.0.0.1:9".parse().expect("an address")],
        timeout_ms: 100,
        trust_anchor: None,
    })
    .ok()
    .map(Arc::new);
    let settings = PluginsConfig {
        cache_dir: Some(scratch.path().join("cache")),
        default_timeout_ms: 5000,
        ..PluginsConfig::default()
    };
    let plugins = Arc::new(PluginRuntime::new(&settings, scratch.path(), users, dns)?);
    let report = plugins
        .load(&[PluginConfig {
            name: "test".into(),
            path: test.wasm.clone(),
            on_error: OnError::Tempfail,
            timeout_ms: None,
            queued_timeout_secs: None,
            memory_mb: None,
            kv_quota_mb: 16,
            capabilities,
            directory: None,
            config: table,
        }])
        .await;
    if let Some((_, why)) = report.failed.first() {
        bail!("{why}");
    }
    let set = plugins.current();
    let mut session = PluginSession::new(plugins);
    let mut info = SessionInfo {
        id: 1,
        listener: "smtp".into(),
        peer_ip: test.ip.clone(),
        peer_port: 40000,
        tls: false,
        helo: None,
        user: None,
    };
    let rcpts = if test.rcpts.is_empty() {
        vec!["alice@example.test".to_string()]
    } else {
        test.rcpts.clone()
    };
    let mut printed: Vec<(String, String)> = Vec::new();
    let mut say = |hook: &str, what: String, time: Option<Duration>| {
        match time {
            Some(time) => println!("{hook:<10} {what}  ({})", took(time)),
            None => println!("{hook:<10} {what}"),
        }
        printed.push((hook.to_string(), what));
    };
    // Hooks the component does not export are passed over, as in the server.
    let exported = |stage: Stage| set.has(stage);
    if exported(Stage::Connect) {
        let started = Instant::now();
        let v = session.decide(&info, Hook::Connect).await;
        say("connect", verdict(&v), Some(started.elapsed()));
    }
    if exported(Stage::Login) {
        let started = Instant::now();
        let hook = Hook::Login {
            protocol: LoginProtocol::Imap,
            mechanism: "LOGIN",
            user: &test.user,
        };
        let v = session.decide(&info, hook).await;
        say("login", verdict(&v), Some(started.elapsed()));
    }
    info.helo = Some(test.helo.clone());
    if exported(Stage::Helo) {
        let started = Instant::now();
        let hook = Hook::Helo {
            name: &test.helo,
            extended: true,
        };
        let v = session.decide(&info, hook).await;
        say("helo", verdict(&v), Some(started.elapsed()));
    }
    if exported(Stage::MailFrom) {
        let started = Instant::now();
        let hook = Hook::MailFrom {
            sender: &test.from,
            size: message.len() as u64,
        };
        let v = session.decide(&info, hook).await;
        say("mail-from", verdict(&v), Some(started.elapsed()));
    }
    let mut accepted = Vec::new();
    for rcpt in &rcpts {
        if !exported(Stage::Rcpt) {
            accepted.push(rcpt.clone());
            continue;
        }
        let local = is_local(rcpt);
        let started = Instant::now();
        let hook = Hook::Rcpt {
            sender: &test.from,
            recipient: rcpt,
            local,
        };
        let v = session.decide(&info, hook).await;
        say(
            "rcpt",
            format!("{} <{rcpt}>", verdict(&v)),
            Some(started.elapsed()),
        );
        if v == Verdict::Pass {
            accepted.push(rcpt.clone());
        }
    }
    let envelope = types::Envelope {
        queue_id: "TEST".into(),
        sender: test.from.clone(),
        recipients: accepted,
    };
    let mut queued = !envelope.recipients.is_empty();
    if exported(Stage::Data) && envelope.recipients.is_empty() {
        say("data", "not reached (no recipient)".into(), None);
    } else if exported(Stage::Data) {
        let checks = Arc::new(crate::message_auth::Verification::default());
        let started = Instant::now();
        let outcome = session.on_data(&info, &envelope, &message, &checks).await;
        let time = started.elapsed();
        say("data", verdict(&outcome.verdict), Some(time));
        for edit in edits(&outcome) {
            say("data", edit, None);
        }
        queued = outcome.verdict == Verdict::Pass && !outcome.discard;
    }
    // After the queue, on the message as given (a server would filter it with the data hook's
    // edits applied).
    if exported(Stage::Queued) && !queued {
        say("queued", "not reached (not queued)".into(), None);
    } else if exported(Stage::Queued) {
        let started = Instant::now();
        let outcome = session.on_queued(&envelope, &message).await;
        say(
            "queued",
            filtering(&outcome.filtering),
            Some(started.elapsed()),
        );
        for change in changes(&outcome.changes) {
            say("queued", change, None);
        }
    }
    // The relay asks about each remote recipient before sending its copy.
    if exported(Stage::Outbound) {
        let remote: Vec<&String> = envelope
            .recipients
            .iter()
            .filter(|r| !is_local(r))
            .collect();
        if !queued || remote.is_empty() {
            say(
                "outbound",
                "not reached (no remote recipient queued)".into(),
                None,
            );
        }
        for rcpt in remote.into_iter().filter(|_| queued) {
            let started = Instant::now();
            let decided = session.on_outbound(&envelope, rcpt, &message).await;
            say(
                "outbound",
                format!("{} <{rcpt}>", outbound(&decided)),
                Some(started.elapsed()),
            );
        }
    }
    let mut unmet = Vec::new();
    for expect in &test.expects {
        let (hook, outcome) = expect
            .split_once(':')
            .map(|(h, o)| (h.trim(), o.trim()))
            .with_context(|| format!("--expect {expect:?}: say HOOK: OUTCOME"))?;
        if !printed
            .iter()
            .any(|(h, what)| h == hook && what.starts_with(outcome))
        {
            unmet.push(expect.clone());
        }
    }
    if !unmet.is_empty() {
        for expect in &unmet {
            eprintln!("expected, not seen: {expect}");
        }
        bail!(
            "{} of {} expectations not met",
            unmet.len(),
            test.expects.len()
        );
    }
    if !test.expects.is_empty() {
        println!("all {} expectations met", test.expects.len());
    }
    Ok(())
}
