//! `postern mailbox list|status|create|delete|rename|expunge|import|export` on a running
//! server (`admin::mailbox`); `mailbox migrate`, run with the server stopped, is `cli::migrate`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::admin::{call_with_progress, Target};
use crate::admin::mailbox::{Format, MailboxStatus, Moved};
use crate::admin::Request;

/// Where an import comes from or an export goes: one of the two.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct Files {
    /// A Maildir (with Maildir++ subfolders `.Name`), read or written on the server's side.
    #[arg(long)]
    maildir: Option<PathBuf>,
    /// An mbox file (mboxrd), read or written on the server's side.
    #[arg(long)]
    mbox: Option<PathBuf>,
}

impl Files {
    fn format_and_path(&self) -> anyhow::Result<(Format, PathBuf)> {
        let (format, path) = match (&self.maildir, &self.mbox) {
            (Some(dir), _) => (Format::Maildir, dir),
            (_, Some(file)) => (Format::Mbox, file),
            (None, None) => anyhow::bail!("say --maildir DIR or --mbox FILE"),
        };
        // The server resolves paths from its own working directory: send it an absolute one.
        Ok((format, std::path::absolute(path)?))
    }
}

#[derive(Subcommand)]
pub enum LiveCommand {
    /// A mailbox's folders with their message counts.
    List {
        user: String,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Each folder's messages, unseen, size, UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, and the
    /// quota.
    Status {
        user: String,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Make a folder (subscribed).
    Create {
        user: String,
        folder: String,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a folder and its messages.
    Delete {
        user: String,
        folder: String,
        #[command(flatten)]
        target: Target,
    },
    /// Rename a folder (its subfolders move with it).
    Rename {
        user: String,
        from: String,
        to: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a folder's messages that arrived longer ago than the age given (90s, 30m,
    /// 2h, 30d).
    Expunge {
        user: String,
        folder: String,
        #[arg(long, value_parser = super::admin::parse_age)]
        older_than: i64,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Bring mail in, keeping flags and arrival times (into --folder, default INBOX; a
    /// Maildir's subfolders under it).
    Import {
        user: String,
        #[command(flatten)]
        files: Files,
        #[arg(long, default_value = "INBOX")]
        folder: String,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Write mail out: every folder as a Maildir++ tree, or one folder (--folder) as a
    /// Maildir or an mbox file (which must not exist yet).
    Export {
        user: String,
        #[command(flatten)]
        files: Files,
        #[arg(long)]
        folder: Option<String>,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
}

/// A progress bar on a terminal; nothing otherwise.
fn progress_bar(what: &'static str) -> impl FnMut(usize, usize) {
    let shown = std::io::stderr().is_terminal();
    move |done, total| {
        if !shown || total == 0 {
            return;
        }
        let width = 40;
        let filled = done * width / total;
        eprint!(
            "\r{what} [{}{}] {done}/{total}",
            "#".repeat(filled),
            " ".repeat(width - filled)
        );
        if done == total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

/// An import or an export, with a progress bar, and what it moved.
fn transfer(
    target: &Target,
    request: Request,
    verb: &'static str,
    json: bool,
) -> anyhow::Result<()> {
    let doing = if verb == "imported" {
        "importing"
    } else {
        "exporting"
    };
    let value = call_with_progress(
        &super::admin::data_dir(target)?,
        &request,
        &mut progress_bar(doing),
    )?;
    print_moved(&serde_json::from_value(value)?, verb, json)
}

fn print_moved(moved: &Moved, verb: &str, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(moved)?);
        return Ok(());
    }
    for (folder, count) in &moved.folders {
        println!("{folder}: {count} messages {verb}");
    }
    for skipped in &moved.skipped {
        println!("skipped: {skipped}");
    }
    Ok(())
}

pub fn run(command: LiveCommand) -> anyhow::Result<()> {
    let ask = |target: &Target, request: Request| {
        call_with_progress(&super::admin::data_dir(target)?, &request, &mut |_, _| {})
    };
    match command {
        LiveCommand::List { user, target, json } | LiveCommand::Status { user, target, json }
            if json =>
        {
            let value = ask(&target, Request::MailboxStatus { user })?;
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        LiveCommand::List { user, target, .. } => {
            let status: MailboxStatus =
                serde_json::from_value(ask(&target, Request::MailboxStatus { user })?)?;
            for folder in &status.folders {
                println!("{:<40} {:>8} messages", folder.name, folder.messages);
            }
        }
        LiveCommand::Status { user, target, .. } => {
            let status: MailboxStatus =
                serde_json::from_value(ask(&target, Request::MailboxStatus { user })?)?;
            println!(
                "{:<32} {:>8} {:>8} {:>12} {:>11} {:>8} {:>14}",
                "folder", "messages", "unseen", "bytes", "uidvalidity", "uidnext", "highestmodseq"
            );
            for f in &status.folders {
                println!(
                    "{:<32} {:>8} {:>8} {:>12} {:>11} {:>8} {:>14}",
                    f.name,
                    f.messages,
                    f.unseen,
                    f.bytes,
                    f.uid_validity,
                    f.uid_next,
                    f.highest_modseq
                );
            }
            let limit = |l: Option<u64>| l.map_or("no limit".to_string(), |l| l.to_string());
            println!(
                "-- {}: {} messages, {} bytes (quota: {} bytes, {} messages)",
                status.user,
                status.messages,
                status.bytes,
                limit(status.quota_bytes),
                limit(status.quota_messages)
            );
        }
        LiveCommand::Create {
            user,
            folder,
            target,
        } => {
            ask(
                &target,
                Request::MailboxCreate {
                    user,
                    folder: folder.clone(),
                },
            )?;
            println!("{folder}: created");
        }
        LiveCommand::Delete {
            user,
            folder,
            target,
        } => {
            ask(
                &target,
                Request::MailboxDelete {
                    user,
                    folder: folder.clone(),
                },
            )?;
            println!("{folder}: deleted");
        }
        LiveCommand::Rename {
            user,
            from,
            to,
            target,
        } => {
            ask(
                &target,
                Request::MailboxRename {
                    user,
                    from: from.clone(),
                    to: to.clone(),
                },
            )?;
            println!("{from}: renamed to {to}");
        }
        LiveCommand::Expunge {
            user,
            folder,
            older_than,
            target,
            json,
        } => {
            let removed = ask(
                &target,
                Request::MailboxExpunge {
                    user,
                    folder: folder.clone(),
                    older_than_secs: older_than,
                },
            )?;
            if json {
                println!("{}", serde_json::json!({ "removed": removed }));
            } else {
                println!("{folder}: {removed} messages removed");
            }
        }
        LiveCommand::Import {
            user,
            files,
            folder,
            target,
            json,
        } => {
            let (format, path) = files.format_and_path()?;
            let request = Request::MailboxImport {
                user,
                folder,
                format,
                path,
            };
            transfer(&target, request, "imported", json)?;
        }
        LiveCommand::Export {
            user,
            files,
            folder,
            target,
            json,
        } => {
            let (format, path) = files.format_and_path()?;
            let request = Request::MailboxExport {
                user,
                folder,
                format,
                path,
            };
            transfer(&target, request, "exported", json)?;
        }
    }
    Ok(())
}
