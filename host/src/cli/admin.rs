//! Commands that act on a running server through its admin API (`admin`): `postern queue …`,
//! `postern reload`, `postern who`, `postern kick` and `postern plugin list|reload`. Exit status: 0 done, 1 failed (the reason on stderr), 2 bad usage.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use crate::admin::{Request, Response};
use crate::relay::control::{Action, Entry, Filter, Report, Status};

/// Which server: the one running on this configuration's data directory.
#[derive(Args, Clone)]
pub struct Target {
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides server.data_dir.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Which messages (every condition given must hold).
#[derive(Args, Clone, Default)]
pub struct Select {
    /// Queue ids.
    pub ids: Vec<String>,
    /// Part of the sender's address.
    #[arg(long)]
    pub sender: Option<String>,
    /// Part of a recipient's address.
    #[arg(long)]
    pub recipient: Option<String>,
    /// A recipient's domain.
    #[arg(long)]
    pub domain: Option<String>,
    /// Queued longer than this (`90s`, `30m`, `2h`, `3d`).
    #[arg(long, value_parser = parse_age)]
    pub older_than: Option<i64>,
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StatusArg {
    Deferred,
    Held,
    Active,
}

pub(super) fn parse_age(text: &str) -> Result<i64, String> {
    crate::config::parse_duration(text)
        .map(|d| d.as_secs() as i64)
        .ok_or_else(|| format!("not a duration: {text:?} (try 90s, 30m, 2h, 3d)"))
}

impl Select {
    fn filter(&self) -> Filter {
        Filter {
            ids: self.ids.clone(),
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            domain: self.domain.clone(),
            older_than_secs: self.older_than,
            status: self.status.map(|s| match s {
                StatusArg::Deferred => Status::Deferred,
                StatusArg::Held => Status::Held,
                StatusArg::Active => Status::Active,
            }),
        }
    }

    fn is_everything(&self) -> bool {
        self.ids.is_empty()
            && self.sender.is_none()
            && self.recipient.is_none()
            && self.domain.is_none()
            && self.older_than.is_none()
            && self.status.is_none()
    }
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Messages waiting for delivery (like `postqueue -p`), oldest first.
    List {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// One message: envelope, each recipient's state and last reply, attempts, next attempt.
    Show {
        id: String,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Attempt delivery now (like `postqueue -i` / `-f`).
    #[command(alias = "flush")]
    Retry(Acting),
    /// Keep messages from delivery until released (like `postsuper -h`); kept across restarts.
    Hold(Acting),
    /// Undo a hold and attempt delivery now (like `postsuper -H`).
    Release(Acting),
    /// Remove messages without telling their senders (like `postsuper -d`).
    Delete(Destroying),
    /// Give up on messages and return them to their senders with a bounce.
    Bounce(Destroying),
}

/// Which messages an action is for, and where the server is.
#[derive(Args, Clone)]
pub struct Acting {
    #[command(flatten)]
    select: Select,
    /// Every message (when no id or filter is given).
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    target: Target,
    #[arg(long)]
    json: bool,
}

/// An action that cannot be undone: confirmed unless only ids are given.
#[derive(Args, Clone)]
pub struct Destroying {
    #[command(flatten)]
    acting: Acting,
    /// Do not ask before acting on more than the ids given.
    #[arg(long, short = 'y')]
    yes: bool,
}

pub(super) fn data_dir(target: &Target) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &target.data_dir {
        return Ok(dir.clone());
    }
    Ok(super::load_config(target.config.as_ref())?.server.data_dir)
}

/// One request to the server on `data_dir`, and its result.
fn call(data_dir: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    call_with_progress(data_dir, request, &mut |_, _| {})
}

/// A request whose answer may be preceded by progress lines, each handed to `progress`.
pub(super) fn call_with_progress(
    data_dir: &Path,
    request: &Request,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<serde_json::Value> {
    let path = crate::admin::socket_path(data_dir);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach a running server at {} (is it running on this data directory? its log says why the admin API is missing)",
            path.display()
        )
    })?;
    // Generous: an import counts a large mbox before its first progress line.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(600)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut answer = String::new();
        reader
            .read_line(&mut answer)
            .context("no answer from the server")?;
        match serde_json::from_str::<Response>(&answer).context("a garbled answer")? {
            Response::Ok { result } => return Ok(result),
            Response::Error { message } => bail!("{message}"),
            Response::Progress { done, total } => progress(done, total),
        }
    }
}

fn list(dir: &Path, filter: Filter) -> anyhow::Result<Vec<Entry>> {
    let value = call(dir, &Request::QueueList { filter })?;
    Ok(serde_json::from_value(value)?)
}

fn time(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| unix.to_string())
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Deferred => "deferred",
        Status::Held => "held",
        Status::Active => "active",
    }
}

fn print_entry(entry: &Entry, detail: bool) {
    let sender = if entry.sender.is_empty() {
        "<>"
    } else {
        &entry.sender
    };
    println!(
        "{:<24} {:>9}  {}  {:<8}  {sender}",
        entry.id,
        entry.size,
        time(entry.received_at),
        status_name(entry.status)
    );
    if detail {
        println!("  attempts: {}", entry.attempts);
        if let Some(next) = entry.next_attempt {
            println!("  next attempt: {}", time(next));
        }
    }
    for r in &entry.recipients {
        match &r.last {
            Some(last) if detail => {
                println!("    {:<40} {}", r.address, r.state);
                println!("      last: {} {}", last.status, last.diagnostic);
                if let Some(mta) = &last.remote_mta {
                    println!("      remote: {mta}");
                }
            }
            Some(last) => println!("    {:<40} {:<8} {}", r.address, r.state, last.diagnostic),
            None => println!("    {:<40} {}", r.address, r.state),
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn queue(command: QueueCommand) -> anyhow::Result<()> {
    let (acting, yes, action) = match command {
        QueueCommand::List {
            select,
            target,
            json,
        } => {
            let entries = list(&data_dir(&target)?, select.filter())?;
            if json {
                return print_json(&entries);
            }
            for entry in &entries {
                print_entry(entry, false);
            }
            let bytes: u64 = entries.iter().map(|e| e.size).sum();
            println!("-- {} messages, {bytes} bytes", entries.len());
            return Ok(());
        }
        QueueCommand::Show { id, target, json } => {
            let filter = Filter {
                ids: vec![id.clone()],
                ..Filter::default()
            };
            let entry = list(&data_dir(&target)?, filter)?
                .pop()
                .with_context(|| format!("{id}: not in the queue"))?;
            if json {
                return print_json(&entry);
            }
            print_entry(&entry, true);
            return Ok(());
        }
        QueueCommand::Retry(acting) => (acting, true, Action::Retry),
        QueueCommand::Hold(acting) => (acting, true, Action::Hold),
        QueueCommand::Release(acting) => (acting, true, Action::Release),
        QueueCommand::Delete(d) => (d.acting, d.yes, Action::Delete),
        QueueCommand::Bounce(d) => (d.acting, d.yes, Action::Bounce),
    };
    let Acting {
        select,
        all,
        target,
        json,
    } = acting;
    if select.is_everything() && !all {
        bail!("name queue ids or a filter, or say --all");
    }
    let dir = data_dir(&target)?;
    let mut filter = select.filter();
    // Bulk removals are counted and confirmed first, and then only what was counted is
    // acted on (still under the filter, in case a message changed meanwhile).
    if !yes && filter.ids.is_empty() {
        let chosen = list(&dir, filter.clone())?;
        if chosen.is_empty() {
            println!("no message matches");
            return Ok(());
        }
        let verb = if action == Action::Delete {
            "Delete"
        } else {
            "Bounce"
        };
        if !std::io::stdin().is_terminal() {
            bail!(
                "{} messages match; say --yes to {} them without a prompt",
                chosen.len(),
                verb.to_lowercase()
            );
        }
        eprint!("{verb} {} messages? [y/N] ", chosen.len());
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("nothing done");
        }
        filter.ids = chosen.into_iter().map(|e| e.id).collect();
    }
    let value = call(&dir, &Request::QueueAct { action, filter })?;
    let report: Report = serde_json::from_value(value)?;
    if json {
        return print_json(&report);
    }
    let done = match action {
        Action::Retry => "to be attempted now",
        Action::Hold => "held",
        Action::Release => "released",
        Action::Delete => "deleted",
        Action::Bounce => "to be returned to their senders",
    };
    for id in &report.done {
        println!("{id}: {done}");
    }
    for id in &report.after_attempt {
        println!("{id}: under attempt; {done} when the attempt ends (if anything is left)");
    }
    println!(
        "-- {} messages {done}, {} after their attempt",
        report.done.len(),
        report.after_attempt.len()
    );
    Ok(())
}

/// `postern kick USER`.
pub fn kick(user: &str, target: &Target) -> anyhow::Result<()> {
    let value = call(
        &data_dir(target)?,
        &Request::Kick {
            user: user.to_string(),
        },
    )?;
    if value.get("known").and_then(|k| k.as_bool()) != Some(true) {
        bail!("{user}: no such user");
    }
    println!("{user}: open IMAP and POP3 sessions ended");
    Ok(())
}

/// `postern who`: the open sessions, oldest first.
pub fn who(target: &Target, json: bool) -> anyhow::Result<()> {
    let value = call(&data_dir(target)?, &Request::Who)?;
    let sessions: Vec<crate::telemetry::sessions::Entry> = serde_json::from_value(value)?;
    if json {
        return print_json(&sessions);
    }
    println!(
        "{:<8} {:<6} {:<12} {:<40} {:<19}  peer",
        "session", "proto", "listener", "user", "since"
    );
    for s in &sessions {
        println!(
            "{:<8} {:<6} {:<12} {:<40} {:<19}  {}",
            s.id,
            s.protocol,
            s.listener,
            s.user.as_deref().unwrap_or("-"),
            time(s.since),
            s.peer
        );
    }
    println!("-- {} sessions", sessions.len());
    Ok(())
}

/// `postern plugin list`.
pub fn plugin_list(target: &Target, json: bool) -> anyhow::Result<()> {
    let value = call(&data_dir(target)?, &Request::PluginList)?;
    let plugins: Vec<crate::plugin::registry::PluginSummary> = serde_json::from_value(value)?;
    if json {
        return print_json(&plugins);
    }
    for p in &plugins {
        println!("{}  {}", p.name, p.path.display());
        println!("  digest: sha256:{}", p.digest);
        println!("  hooks: {}", p.hooks.join(", "));
        println!(
            "  capabilities: {}",
            if p.capabilities.is_empty() {
                "none".to_string()
            } else {
                p.capabilities.join(", ")
            }
        );
        println!(
            "  on_error: {}, timeout: {} ms, memory: {} MiB",
            p.on_error,
            p.timeout_ms,
            p.memory_bytes >> 20
        );
        for c in &p.calls {
            println!(
                "  {:<10} {:>9} calls {:>6} errors  p50 {} µs  p99 {} µs",
                c.hook, c.calls, c.errors, c.p50_us, c.p99_us
            );
        }
    }
    if plugins.is_empty() {
        println!("no plugins loaded");
    }
    Ok(())
}

/// `postern plugin reload`: the server reloads its plugins from its configuration file and
/// says what it did; a plugin that failed to load keeps its previous version.
pub fn plugin_reload(target: &Target, json: bool) -> anyhow::Result<()> {
    let value = call(&data_dir(target)?, &Request::PluginReload)?;
    let report: crate::plugin::registry::ReloadReport = serde_json::from_value(value)?;
    if json {
        print_json(&report)?;
    } else {
        for name in &report.loaded {
            println!("{name}: loaded");
        }
        for name in &report.unchanged {
            println!("{name}: unchanged");
        }
        for (name, why) in &report.failed {
            println!("{name}: failed, previous version kept: {why}");
        }
    }
    if !report.failed.is_empty() {
        bail!("{} plugins failed to load", report.failed.len());
    }
    Ok(())
}

/// `postern reload`.
pub fn reload(target: &Target, json: bool) -> anyhow::Result<()> {
    let value = call(&data_dir(target)?, &Request::Reload)?;
    let report: crate::server::ReloadReport = serde_json::from_value(value)?;
    if json {
        print_json(&report)?;
    } else {
        for what in &report.applied {
            println!("applied: {what}");
        }
        for what in &report.restart_needed {
            println!("changed, takes effect after a restart: {what}");
        }
        for what in &report.failed {
            println!("failed: {what}");
        }
        for name in &report.plugins.loaded {
            println!("plugin {name}: loaded");
        }
        for (name, why) in &report.plugins.failed {
            println!("plugin {name}: failed, previous version kept: {why}");
        }
        if report.applied.is_empty()
            && report.restart_needed.is_empty()
            && report.failed.is_empty()
            && report.plugins.loaded.is_empty()
            && report.plugins.failed.is_empty()
        {
            println!("nothing changed");
        }
    }
    let failures = report.failed.len() + report.plugins.failed.len();
    if failures > 0 {
        bail!("{failures} changes could not be applied");
    }
    Ok(())
}
