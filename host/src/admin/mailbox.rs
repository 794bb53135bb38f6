//! `postern mailbox …` on a running server (Dovecot's `doveadm mailbox` and `doveadm
//! import/export`): every operation goes through the server's own store, the watched one, so
//! IMAP sessions hear of each change as they would of another client's, and every storage
//! backend (Maildir, a Wasm backend, PostgreSQL) is served the same way by the one contract.
//!
//! Import and export read and write files on the server's side, as the server's user (the
//! admin socket is only open to it): a Maildir (`cur/`, `new/`, and Maildir++ subfolders
//! `.Name`), or an mbox file (mboxrd quoting, RFC 4155).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::auth::UserDirectory;
use crate::store::{Flags, Keywords, MailStore, StoreError};

/// Which file format an import or export uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Maildir,
    Mbox,
}

/// One folder in `mailbox list` and `mailbox status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FolderStatus {
    pub name: String,
    pub messages: usize,
    pub unseen: usize,
    /// RFC 822 sizes summed.
    pub bytes: u64,
    pub uid_validity: u32,
    pub uid_next: u32,
    pub highest_modseq: u64,
    pub subscribed: bool,
}

/// `mailbox status`: each folder and the quota.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxStatus {
    pub user: String,
    pub folders: Vec<FolderStatus>,
    pub bytes: u64,
    pub messages: u64,
    pub quota_bytes: Option<u64>,
    pub quota_messages: Option<u64>,
}

/// What an import or export moved, per folder.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Moved {
    pub folders: Vec<(String, usize)>,
    /// Files that were not messages (unreadable, empty), with the reason.
    pub skipped: Vec<String>,
}

/// A mailbox operation's reach: the store and who may be named.
pub struct Mailboxes {
    pub store: Arc<dyn MailStore>,
    pub users: Arc<UserDirectory>,
}

/// Errors as the operator reads them.
fn said(err: StoreError) -> String {
    err.to_string()
}

impl Mailboxes {
    /// The mailbox key of a user (an alias names its user's mailbox).
    pub fn user(&self, login: &str) -> Result<String, String> {
        Address::parse(login)
            .and_then(|address| self.users.resolve(&address))
            .ok_or_else(|| format!("{login}: no such user"))
    }

    pub fn status(&self, user: &str) -> Result<MailboxStatus, String> {
        let key = self.user(user)?;
        let subscribed = self.store.subscriptions(&key).map_err(said)?;
        let mut folders = Vec::new();
        for name in self.store.all_folders(&key).map_err(said)? {
            let snapshot = match self.store.snapshot(&key, &name) {
                Ok(snapshot) => snapshot,
                Err(StoreError::NoSuchFolder(_)) => continue,
                Err(err) => return Err(said(err)),
            };
            folders.push(FolderStatus {
                messages: snapshot.messages.len(),
                unseen: snapshot
                    .messages
                    .iter()
                    .filter(|m| !m.flags.contains(Flags::SEEN))
                    .count(),
                bytes: snapshot.messages.iter().map(|m| m.size).sum(),
                uid_validity: snapshot.uid_validity,
                uid_next: snapshot.uid_next,
                highest_modseq: snapshot.highest_modseq,
                subscribed: name == "INBOX" || subscribed.contains(&name),
                name,
            });
        }
        let quota = self.users.quota(&key);
        Ok(MailboxStatus {
            user: key,
            bytes: folders.iter().map(|f| f.bytes).sum(),
            messages: folders.iter().map(|f| f.messages as u64).sum(),
            folders,
            quota_bytes: quota.bytes,
            quota_messages: quota.messages,
        })
    }

    pub fn create(&self, user: &str, folder: &str) -> Result<(), String> {
        let key = self.user(user)?;
        self.store.create_folder(&key, folder).map_err(said)?;
        // Subscribed, as IMAP clients expect of a folder made for them.
        self.store.set_subscribed(&key, folder, true).map_err(said)
    }

    pub fn delete(&self, user: &str, folder: &str) -> Result<(), String> {
        let key = self.user(user)?;
        if folder.eq_ignore_ascii_case("INBOX") {
            return Err("INBOX cannot be deleted".into());
        }
        self.store.delete_folder(&key, folder).map_err(said)?;
        let _ = self.store.set_subscribed(&key, folder, false);
        Ok(())
    }

    pub fn rename(&self, user: &str, from: &str, to: &str) -> Result<(), String> {
        let key = self.user(user)?;
        self.store.rename_folder(&key, from, to).map_err(said)?;
        if self
            .store
            .subscriptions(&key)
            .map_err(said)?
            .iter()
            .any(|s| s == from)
        {
            let _ = self.store.set_subscribed(&key, from, false);
            let _ = self.store.set_subscribed(&key, to, true);
        }
        Ok(())
    }

    /// Removes the folder's messages that arrived more than `older_than_secs` ago; returns
    /// how many.
    pub fn expunge(&self, user: &str, folder: &str, older_than_secs: i64) -> Result<usize, String> {
        let key = self.user(user)?;
        let snapshot = self.store.snapshot(&key, folder).map_err(said)?;
        let cutoff = chrono::Utc::now().timestamp() - older_than_secs;
        let old: Vec<_> = snapshot
            .messages
            .iter()
            .filter(|m| m.received_at <= cutoff)
            .collect();
        self.store.remove(&key, folder, &old).map_err(said)?;
        Ok(old.len())
    }

    /// Brings messages in from files into `folder` (its subfolders under it for a Maildir++
    /// tree), with their flags and arrival times. `progress(done, total)` is told as it goes.
    pub fn import(
        &self,
        user: &str,
        folder: &str,
        format: Format,
        path: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Moved, String> {
        let key = self.user(user)?;
        let sources = match format {
            Format::Maildir => maildir_folders(path, folder)?,
            Format::Mbox => {
                open_mbox(path)?;
                vec![(folder.to_string(), Source::Mbox(path.to_path_buf()))]
            }
        };
        let mut moved = Moved::default();
        let mut total = 0;
        for (_, source) in &sources {
            total += source.count()?;
        }
        let mut done = 0;
        progress(0, total);
        for (target, source) in sources {
            if !self.store.has_folder(&key, &target).map_err(said)? {
                self.store.create_folder(&key, &target).map_err(said)?;
                let _ = self.store.set_subscribed(&key, &target, true);
            }
            let mut count = 0;
            source.each(&mut moved.skipped, &mut |message| {
                self.store
                    .append(
                        &key,
                        &target,
                        &message.bytes,
                        message.flags,
                        &Keywords::new(),
                        message.received_at,
                    )
                    .map_err(|err| format!("{target}: {err}"))?;
                count += 1;
                done += 1;
                if done % 50 == 0 {
                    progress(done, total);
                }
                Ok(())
            })?;
            moved.folders.push((target, count));
        }
        progress(done, total);
        Ok(moved)
    }

    /// Writes a folder (every folder when None) out to files: a Maildir++ tree under `path`,
    /// or one mbox file (one folder only).
    pub fn export(
        &self,
        user: &str,
        folder: Option<&str>,
        format: Format,
        path: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Moved, String> {
        let key = self.user(user)?;
        let folders = match folder {
            Some(folder) => vec![folder.to_string()],
            None if format == Format::Mbox => {
                return Err("an mbox file holds one folder: say which with --folder".into())
            }
            None => self.store.all_folders(&key).map_err(said)?,
        };
        let mut snapshots = Vec::new();
        for name in folders {
            let snapshot = self.store.snapshot(&key, &name).map_err(said)?;
            snapshots.push((name, snapshot));
        }
        let total = snapshots.iter().map(|(_, s)| s.messages.len()).sum();
        let (mut done, mut moved) = (0, Moved::default());
        progress(0, total);
        let mut mbox = match format {
            Format::Mbox => Some(MboxWriter::create(path)?),
            Format::Maildir => None,
        };
        for (name, snapshot) in snapshots {
            let dir = match format {
                Format::Maildir => Some(maildir_path(path, &name)?),
                Format::Mbox => None,
            };
            let mut count = 0;
            for info in &snapshot.messages {
                let bytes = match self.store.read(&key, &name, info) {
                    Ok(bytes) => bytes,
                    Err(StoreError::Gone(_)) => continue,
                    Err(err) => return Err(format!("{name}: {err}")),
                };
                let lf = crlf_to_lf(&bytes);
                match (&dir, &mut mbox) {
                    (Some(dir), _) => write_maildir_message(dir, info, &lf)?,
                    (None, Some(mbox)) => mbox.write(info.received_at, &lf)?,
                    (None, None) => unreachable!("one of the two formats"),
                }
                count += 1;
                done += 1;
                if done % 50 == 0 {
                    progress(done, total);
                }
            }
            moved.folders.push((name, count));
        }
        if let Some(mbox) = mbox {
            mbox.finish()?;
        }
        progress(done, total);
        Ok(moved)
    }
}

/// A message read from a file, CRLF line endings.
struct FileMessage {
    bytes: Vec<u8>,
    flags: Flags,
    received_at: i64,
}

enum Source {
    Maildir(PathBuf),
    Mbox(PathBuf),
}

/// One message at a time, so an import of any size holds one message in memory.
type Each<'a> = dyn FnMut(FileMessage) -> Result<(), String> + 'a;

/// A message bigger than this in an import is skipped (and named).
const LARGEST_IMPORT: usize = 256 << 20;

impl Source {
    /// How many messages it holds (for the progress count).
    fn count(&self) -> Result<usize, String> {
        match self {
            Source::Maildir(dir) => Ok(maildir_files(dir).len()),
            Source::Mbox(file) => {
                use std::io::BufRead;
                let reader = open_mbox(file)?;
                let mut n = 0;
                for line in reader.split(b'\n') {
                    let line = line.map_err(|e| format!("{}: {e}", file.display()))?;
                    n += usize::from(line.starts_with(b"From "));
                }
                Ok(n)
            }
        }
    }

    fn each(&self, skipped: &mut Vec<String>, f: &mut Each<'_>) -> Result<(), String> {
        match self {
            Source::Maildir(dir) => each_maildir(dir, skipped, f),
            Source::Mbox(file) => each_mbox(file, skipped, f),
        }
    }
}

/// The folders of a Maildir++ tree: the directory itself into `folder`, each `.A.B`
/// subdirectory with a `cur/` into `folder/A/B` (INBOX's subfolders at the top level).
fn maildir_folders(root: &Path, folder: &str) -> Result<Vec<(String, Source)>, String> {
    let is_maildir = |dir: &Path| dir.join("cur").is_dir() || dir.join("new").is_dir();
    if !is_maildir(root) {
        return Err(format!(
            "{}: not a Maildir (no cur/ or new/)",
            root.display()
        ));
    }
    let mut out = vec![(folder.to_string(), Source::Maildir(root.to_path_buf()))];
    let entries = std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut subs: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            let sub = name.strip_prefix('.')?.replace('.', "/");
            (!sub.is_empty() && is_maildir(&entry.path())).then_some((sub, entry.path()))
        })
        .collect();
    subs.sort();
    for (sub, dir) in subs {
        let target = if folder == "INBOX" {
            sub
        } else {
            format!("{folder}/{sub}")
        };
        out.push((target, Source::Maildir(dir)));
    }
    Ok(out)
}

/// A folder's message files with their modification times, oldest first (so UIDs follow
/// arrival as they did where the mail came from).
fn maildir_files(dir: &Path) -> Vec<(PathBuf, i64)> {
    let mut files = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let at = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or_else(|| chrono::Utc::now().timestamp(), |d| d.as_secs() as i64);
            files.push((entry.path(), at));
        }
    }
    files.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    files
}

fn each_maildir(dir: &Path, skipped: &mut Vec<String>, f: &mut Each<'_>) -> Result<(), String> {
    for (path, received_at) in maildir_files(dir) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) if bytes.is_empty() => {
                skipped.push(format!("{}: empty", path.display()));
                continue;
            }
            Ok(bytes) if bytes.len() > LARGEST_IMPORT => {
                skipped.push(format!(
                    "{}: larger than {LARGEST_IMPORT} bytes",
                    path.display()
                ));
                continue;
            }
            Ok(bytes) => bytes,
            Err(err) => {
                skipped.push(format!("{}: {err}", path.display()));
                continue;
            }
        };
        f(FileMessage {
            bytes: crlf(&bytes),
            flags: maildir_flags(name),
            received_at,
        })?;
    }
    Ok(())
}

/// The system flags of a Maildir file name's `:2,` part (keyword letters need the source's
/// own keyword table, so they are left out).
fn maildir_flags(name: &str) -> Flags {
    let Some((_, letters)) = name.split_once(":2,") else {
        return Flags::empty();
    };
    letters.chars().fold(Flags::empty(), |flags, letter| {
        flags.union(Flags::from_maildir_letter(letter))
    })
}

fn open_mbox(file: &Path) -> Result<std::io::BufReader<std::fs::File>, String> {
    use std::io::BufRead;
    let mut reader = std::fs::File::open(file)
        .map(std::io::BufReader::new)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let start = reader
        .fill_buf()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if !start.is_empty() && !start.starts_with(b"From ") {
        return Err(format!(
            "{}: not an mbox file (no From line first)",
            file.display()
        ));
    }
    Ok(reader)
}

/// Messages of an mbox file: each starts at a `From ` line (RFC 4155); `>From ` lines are
/// unquoted once (mboxrd, which also reads mboxo files right but for lines that began with
/// `>From ` in the original).
fn each_mbox(file: &Path, skipped: &mut Vec<String>, f: &mut Each<'_>) -> Result<(), String> {
    use std::io::BufRead;
    let mut reader = open_mbox(file)?;
    let mut current: Option<(i64, Vec<u8>)> = None;
    let mut too_big = false;
    let mut line = Vec::new();
    let mut number = 0usize;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        if n == 0 || line.starts_with(b"From ") {
            if let Some((at, body)) = current.take() {
                if too_big {
                    skipped.push(format!(
                        "{} message {number}: larger than {LARGEST_IMPORT} bytes",
                        file.display()
                    ));
                } else {
                    f(mbox_message(at, body))?;
                }
            }
            if n == 0 {
                return Ok(());
            }
            number += 1;
            too_big = false;
            current = Some((from_line_date(&line), Vec::new()));
            continue;
        }
        let Some((_, body)) = current.as_mut() else {
            continue;
        };
        if too_big {
            continue;
        }
        if body.len() + line.len() > LARGEST_IMPORT {
            too_big = true;
            *body = Vec::new();
            continue;
        }
        let quoted = line.iter().take_while(|b| **b == b'>').count();
        if quoted > 0 && line[quoted..].starts_with(b"From ") {
            body.extend_from_slice(&line[1..]);
        } else {
            body.extend_from_slice(&line);
        }
    }
}

fn mbox_message(received_at: i64, mut body: Vec<u8>) -> FileMessage {
    // The blank line before the next From line belongs to the file, not the message.
    if body.ends_with(b"\n\n") {
        body.pop();
    }
    FileMessage {
        bytes: crlf(&body),
        flags: Flags::empty(),
        received_at,
    }
}

/// The asctime date at the end of a `From sender date` line, or now.
fn from_line_date(line: &[u8]) -> i64 {
    let text = String::from_utf8_lossy(line);
    let fields: Vec<&str> = text.split_whitespace().collect();
    // From SENDER Www Mmm dd hh:mm:ss yyyy
    if fields.len() >= 7 {
        let date = fields[fields.len() - 5..].join(" ");
        if let Ok(parsed) = chrono::NaiveDateTime::parse_from_str(&date, "%a %b %e %H:%M:%S %Y") {
            return parsed.and_utc().timestamp();
        }
    }
    chrono::Utc::now().timestamp()
}

/// CRLF line ends, as the store takes messages (a bare LF or CR becomes CRLF).
fn crlf(bytes: &[u8]) -> Vec<u8> {
    crate::framing::crlf_line_ends(bytes).into_owned()
}

fn crlf_to_lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The directory of a folder in an exported Maildir++ tree (made with cur/, new/, tmp/).
fn maildir_path(root: &Path, folder: &str) -> Result<PathBuf, String> {
    let dir = if folder == "INBOX" {
        root.to_path_buf()
    } else {
        root.join(format!(".{}", folder.replace('/', ".")))
    };
    for sub in ["cur", "new", "tmp"] {
        crate::durable::create_dir_all(&dir.join(sub))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(dir)
}

fn write_maildir_message(
    dir: &Path,
    info: &crate::store::MessageInfo,
    lf: &[u8],
) -> Result<(), String> {
    let name = format!(
        "{}.P{}U{}.exported:2,{}",
        info.received_at,
        std::process::id(),
        info.uid,
        info.flags.maildir_letters()
    );
    let path = dir.join("cur").join(name);
    std::fs::write(&path, lf).map_err(|e| format!("{}: {e}", path.display()))?;
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(info.received_at.max(0) as u64);
    let _ = std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(at));
    Ok(())
}

/// An mbox file being written (mboxrd quoting), created anew.
struct MboxWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl MboxWriter {
    fn create(path: &Path) -> Result<MboxWriter, String> {
        let file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(MboxWriter {
            file: std::io::BufWriter::new(file),
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, received_at: i64, lf: &[u8]) -> Result<(), String> {
        use std::io::Write;
        let date = chrono::DateTime::from_timestamp(received_at, 0)
            .unwrap_or_default()
            .format("%a %b %e %H:%M:%S %Y");
        let mut out = format!("From MAILER-DAEMON {date}\n").into_bytes();
        for line in lf.split_inclusive(|b| *b == b'\n') {
            let quoted = line.iter().take_while(|b| **b == b'>').count();
            if line[quoted..].starts_with(b"From ") {
                out.push(b'>');
            }
            out.extend_from_slice(line);
        }
        if !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        out.push(b'\n');
        self.file
            .write_all(&out)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    fn finish(self) -> Result<(), String> {
        let file = self
            .file
            .into_inner()
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        file.sync_all()
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbox_round_trip_keeps_bytes_dates_and_from_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.mbox");
        let mut writer = MboxWriter::create(&path).unwrap();
        let one = b"Subject: one\n\nFrom the start\n>From quoted\nend\n";
        let two = b"Subject: two\n\nno newline at the end";
        writer.write(1_700_000_000, one).unwrap();
        writer.write(1_700_000_100, two).unwrap();
        writer.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\n>From the start\n>>From quoted\n"),
            "{text}"
        );
        let mut back = Vec::new();
        each_mbox(&path, &mut Vec::new(), &mut |m| {
            back.push(m);
            Ok(())
        })
        .unwrap();
        assert_eq!(Source::Mbox(path.clone()).count().unwrap(), 2);
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].bytes, crlf(one));
        assert_eq!(back[0].received_at, 1_700_000_000);
        assert_eq!(
            back[1].bytes,
            crlf(b"Subject: two\n\nno newline at the end\n")
        );
        assert_eq!(back[1].received_at, 1_700_000_100);
    }

    #[test]
    fn maildir_flags_and_line_endings() {
        assert_eq!(
            maildir_flags("123.abc:2,FRS"),
            Flags::FLAGGED.union(Flags::ANSWERED).union(Flags::SEEN)
        );
        assert_eq!(maildir_flags("123.abc"), Flags::empty());
        assert_eq!(maildir_flags("x:2,TSRPFD").maildir_letters(), "DFPRST");
        assert_eq!(crlf(b"a\nb\r\nc"), b"a\r\nb\r\nc");
        assert_eq!(crlf_to_lf(b"a\r\nb\r\n"), b"a\nb\n");
    }
}
