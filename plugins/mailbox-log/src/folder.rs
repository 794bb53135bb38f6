//! One folder: a message log and an index log.
//!
//! `messages.<gen>` holds the messages' bytes (CRLF line endings, as the host hands them over)
//! one after another; `index.<gen>` holds one text line per event, replayed in order at load:
//!
//! ```text
//! V <uidvalidity>                       first line
//! N <uidnext>                           (after compaction: UIDs are never reused)
//! H <highest modseq>                    (after compaction)
//! K <keyword>                           a keyword the folder defines
//! A <uid> <offset> <size> <received> <modseq> <flags> <keywords|-> <delivery id|->
//! F <uid> <modseq> <flags> <keywords|->  new flags
//! X <uid> <modseq>                      removed
//! ```
//!
//! Writes append: bytes to the message log, flushed, then the lines, flushed; the answer goes
//! back only after both. A crash before the lines are flushed leaves bytes no line points to
//! (dropped at the next compaction) and nothing acknowledged; a torn last line is cut off at
//! load. `current` names the generation: compaction writes both files anew under the next
//! generation, flushes them, and switches `current` atomically (write, flush, rename, flush the
//! directory), so a crash leaves one whole generation in use.
//!
//! Another instance may have appended since this one last looked: every call first reads
//! `current` and the index's length, and replays what is new (or reloads when the generation
//! changed). The host never runs two calls for one mailbox at once, so there is one writer.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::names::{decode, encode};
use crate::Error;

/// Compaction starts when removed bytes are over half of the message log and over this much.
const COMPACT_DEAD_BYTES: u64 = 1 << 20;
/// Or when the index has this many more lines than it would after compaction.
const COMPACT_LINES: u64 = 20_000;

/// Flag bits as the WIT `system-flags` (seen, answered, flagged, deleted, draft, forwarded).
pub type FlagBits = u8;

#[derive(Debug, Clone)]
pub struct Message {
    pub uid: u32,
    pub offset: u64,
    pub size: u64,
    pub received_at: i64,
    pub modseq: u64,
    pub flags: FlagBits,
    pub keywords: Vec<String>,
    pub delivery: Option<String>,
}

pub struct Folder {
    pub dir: PathBuf,
    generation: u64,
    /// Index bytes replayed so far.
    consumed: u64,
    pub validity: u32,
    pub next_uid: u32,
    pub highest: u64,
    pub messages: BTreeMap<u32, Message>,
    /// Delivery ids stored (idempotent delivery).
    pub delivered: HashSet<String>,
    /// Keywords the folder defines, in the spelling first seen.
    pub defined: Vec<String>,
    /// Bytes of the message log no live message points to.
    dead: u64,
    data_len: u64,
    lines: u64,
}

fn io_err(context: &str, err: io::Error) -> Error {
    if err.kind() == io::ErrorKind::StorageFull {
        Error::Full(format!("{context}: {err}"))
    } else {
        Error::Io(format!("{context}: {err}"))
    }
}

pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(&format!("flush {}", dir.display()), e))
}

/// Writes a small file whole and durably: temporary name, flush, rename, flush the directory.
pub fn write_whole(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp).map_err(|e| io_err("create", e))?;
    file.write_all(bytes).map_err(|e| io_err("write", e))?;
    file.sync_all().map_err(|e| io_err("flush", e))?;
    fs::rename(&tmp, dir.join(name)).map_err(|e| io_err("rename", e))?;
    sync_dir(dir)
}

fn read_generation(dir: &Path) -> Result<Option<u64>, Error> {
    match fs::read_to_string(dir.join("current")) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read current", e)),
    }
}

fn keywords_field(keywords: &[String]) -> String {
    if keywords.is_empty() {
        "-".into()
    } else {
        keywords
            .iter()
            .map(|k| encode(k))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn parse_keywords(field: &str) -> Vec<String> {
    if field == "-" {
        Vec::new()
    } else {
        field.split(',').filter_map(decode).collect()
    }
}

impl Folder {
    /// Makes a new folder directory at `dir` (which must not exist), built aside and renamed
    /// in, so a crash never leaves half a folder.
    pub fn create(parent: &Path, dir: &Path, validity: u32) -> Result<(), Error> {
        let building = parent.join(format!("tmp.{:016x}", crate::random()));
        fs::create_dir(&building).map_err(|e| io_err("create folder", e))?;
        let generation = crate::random() >> 1;
        let index = format!("V {validity}\n");
        for (name, bytes) in [
            (format!("index.{generation}"), index.as_bytes()),
            (format!("messages.{generation}"), &b""[..]),
            ("current".to_string(), format!("{generation}\n").as_bytes()),
        ] {
            let mut file = File::create(building.join(name)).map_err(|e| io_err("create", e))?;
            file.write_all(bytes).map_err(|e| io_err("write", e))?;
            file.sync_all().map_err(|e| io_err("flush", e))?;
        }
        sync_dir(&building)?;
        fs::rename(&building, dir).map_err(|e| {
            let _ = fs::remove_dir_all(&building);
            if e.kind() == io::ErrorKind::AlreadyExists || dir.exists() {
                Error::Exists(String::new())
            } else {
                io_err("rename folder", e)
            }
        })?;
        sync_dir(parent)
    }

    /// Loads the folder at `dir`; None when it does not exist.
    pub fn open(dir: &Path) -> Result<Option<Folder>, Error> {
        let Some(generation) = read_generation(dir)? else {
            return Ok(None);
        };
        let mut folder = Folder {
            dir: dir.to_path_buf(),
            generation,
            consumed: 0,
            validity: 0,
            next_uid: 1,
            highest: 1,
            messages: BTreeMap::new(),
            delivered: HashSet::new(),
            defined: Vec::new(),
            dead: 0,
            data_len: 0,
            lines: 0,
        };
        folder.data_len = fs::metadata(folder.data_path())
            .map_err(|e| io_err("message log", e))?
            .len();
        folder.catch_up()?;
        if folder.validity == 0 {
            return Err(Error::Io(format!(
                "{}: index without V line",
                dir.display()
            )));
        }
        Ok(Some(folder))
    }

    /// Whether what is kept still describes the folder on disk (same generation); replays what
    /// another instance appended. False when the folder was replaced, deleted or compacted:
    /// the caller opens it afresh.
    pub fn refresh(&mut self) -> Result<bool, Error> {
        if read_generation(&self.dir)? != Some(self.generation) {
            return Ok(false);
        }
        let len = fs::metadata(self.index_path())
            .map_err(|e| io_err("index", e))?
            .len();
        if len < self.consumed {
            return Ok(false);
        }
        if len > self.consumed {
            self.catch_up()?;
            self.data_len = fs::metadata(self.data_path())
                .map_err(|e| io_err("message log", e))?
                .len();
        }
        Ok(true)
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join(format!("index.{}", self.generation))
    }

    pub fn data_path(&self) -> PathBuf {
        self.dir.join(format!("messages.{}", self.generation))
    }

    /// Replays the index from where this instance stopped. A torn last line (no newline) is
    /// not applied, and is cut off so the next append starts on a line of its own.
    fn catch_up(&mut self) -> Result<(), Error> {
        let mut file = File::open(self.index_path()).map_err(|e| io_err("index", e))?;
        file.seek(SeekFrom::Start(self.consumed))
            .map_err(|e| io_err("index", e))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(|e| io_err("index", e))?;
        let whole = text
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |at| at + 1);
        if whole < text.len() {
            let index = OpenOptions::new()
                .write(true)
                .open(self.index_path())
                .map_err(|e| io_err("index", e))?;
            index
                .set_len(self.consumed + whole as u64)
                .and_then(|()| index.sync_all())
                .map_err(|e| io_err("index", e))?;
        }
        for line in String::from_utf8_lossy(&text[..whole]).lines() {
            self.apply(line);
        }
        self.consumed += whole as u64;
        Ok(())
    }

    fn define(&mut self, keywords: &[String]) {
        for k in keywords {
            if !self.defined.iter().any(|d| d.eq_ignore_ascii_case(k)) {
                self.defined.push(k.clone());
            }
        }
    }

    /// Applies one index line; a line that does not parse is skipped.
    fn apply(&mut self, line: &str) {
        self.lines += 1;
        let f: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        match f.first().copied() {
            Some("V") => self.validity = num(1).unwrap_or(0) as u32,
            Some("N") => self.next_uid = self.next_uid.max(num(1).unwrap_or(1) as u32),
            Some("H") => self.highest = self.highest.max(num(1).unwrap_or(1)),
            Some("K") => {
                if let Some(k) = f.get(1).and_then(|k| decode(k)) {
                    self.define(&[k]);
                }
            }
            Some("A") if f.len() == 9 => {
                let (Some(uid), Some(offset), Some(size), Some(modseq), Some(flags)) =
                    (num(1), num(2), num(3), num(5), num(6))
                else {
                    return;
                };
                let received_at = f[4].parse().unwrap_or(0);
                let keywords = parse_keywords(f[7]);
                let delivery = (f[8] != "-").then(|| decode(f[8])).flatten();
                if let Some(id) = &delivery {
                    self.delivered.insert(id.clone());
                }
                self.define(&keywords);
                let uid = uid as u32;
                self.next_uid = self.next_uid.max(uid.saturating_add(1));
                self.highest = self.highest.max(modseq);
                self.messages.insert(
                    uid,
                    Message {
                        uid,
                        offset,
                        size,
                        received_at,
                        modseq,
                        flags: flags as u8,
                        keywords,
                        delivery,
                    },
                );
            }
            Some("F") if f.len() == 5 => {
                let (Some(uid), Some(modseq), Some(flags)) = (num(1), num(2), num(3)) else {
                    return;
                };
                let keywords = parse_keywords(f[4]);
                self.define(&keywords);
                self.highest = self.highest.max(modseq);
                if let Some(m) = self.messages.get_mut(&(uid as u32)) {
                    m.modseq = modseq;
                    m.flags = flags as u8;
                    m.keywords = keywords;
                }
            }
            Some("X") if f.len() == 3 => {
                let (Some(uid), Some(modseq)) = (num(1), num(2)) else {
                    return;
                };
                self.highest = self.highest.max(modseq);
                if let Some(m) = self.messages.remove(&(uid as u32)) {
                    self.dead += m.size;
                }
            }
            _ => {}
        }
    }

    /// Appends lines to the index durably, and applies them.
    pub fn commit(&mut self, lines: &[String]) -> Result<(), Error> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(self.index_path())
            .map_err(|e| io_err("index", e))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| io_err("index", e))?;
        for line in lines {
            self.apply(line);
        }
        self.consumed += text.len() as u64;
        Ok(())
    }

    /// The message log, opened to append bytes: returns it and the offset writes start at.
    pub fn data_appender(&mut self) -> Result<(File, u64), Error> {
        let file = OpenOptions::new()
            .append(true)
            .open(self.data_path())
            .map_err(|e| io_err("message log", e))?;
        let at = file.metadata().map_err(|e| io_err("message log", e))?.len();
        Ok((file, at))
    }

    pub fn note_appended(&mut self, len: u64) {
        self.data_len = self.data_len.max(len);
    }

    /// Bytes `offset..offset+len` of a message, cut to its size.
    pub fn read(&self, message: &Message, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        let start = offset.min(message.size);
        let end = (start + u64::from(len)).min(message.size);
        let mut file = File::open(self.data_path()).map_err(|e| io_err("message log", e))?;
        file.seek(SeekFrom::Start(message.offset + start))
            .map_err(|e| io_err("message log", e))?;
        let mut bytes = vec![0; (end - start) as usize];
        file.read_exact(&mut bytes)
            .map_err(|e| io_err("message log", e))?;
        Ok(bytes)
    }

    pub fn next_modseq(&mut self) -> u64 {
        self.highest + 1
    }

    pub fn append_line(m: &Message) -> String {
        format!(
            "A {} {} {} {} {} {} {} {}",
            m.uid,
            m.offset,
            m.size,
            m.received_at,
            m.modseq,
            m.flags,
            keywords_field(&m.keywords),
            m.delivery.as_deref().map_or("-".to_string(), encode)
        )
    }

    pub fn flags_line(uid: u32, modseq: u64, flags: FlagBits, keywords: &[String]) -> String {
        format!("F {uid} {modseq} {flags} {}", keywords_field(keywords))
    }

    pub fn expunge_line(uid: u32, modseq: u64) -> String {
        format!("X {uid} {modseq}")
    }

    /// Rewrites both logs without what was removed when enough was, under a new generation.
    pub fn compact_if_due(&mut self) -> Result<(), Error> {
        let live_lines = self.messages.len() as u64 + self.defined.len() as u64 + 3;
        let dead_due = self.dead > COMPACT_DEAD_BYTES && self.dead * 2 > self.data_len;
        let lines_due = self.lines > live_lines + COMPACT_LINES;
        if !dead_due && !lines_due {
            return Ok(());
        }
        let generation = self.generation + 1;
        let old_data = File::open(self.data_path()).map_err(|e| io_err("message log", e))?;
        let new_data_path = self.dir.join(format!("messages.{generation}"));
        let mut new_data = File::create(&new_data_path).map_err(|e| io_err("compact", e))?;
        let mut index = format!(
            "V {}\nN {}\nH {}\n",
            self.validity, self.next_uid, self.highest
        );
        for k in &self.defined {
            index.push_str(&format!("K {}\n", encode(k)));
        }
        let mut offset = 0u64;
        let mut moved = BTreeMap::new();
        for (uid, m) in &self.messages {
            let mut reader = &old_data;
            reader
                .seek(SeekFrom::Start(m.offset))
                .map_err(|e| io_err("compact", e))?;
            let copied = io::copy(&mut reader.take(m.size), &mut new_data)
                .map_err(|e| io_err("compact", e))?;
            if copied != m.size {
                return Err(Error::Io(format!("message {uid} is cut short in the log")));
            }
            let mut m = m.clone();
            m.offset = offset;
            offset += m.size;
            index.push_str(&Self::append_line(&m));
            index.push('\n');
            moved.insert(*uid, m);
        }
        new_data.sync_all().map_err(|e| io_err("compact", e))?;
        let index_path = self.dir.join(format!("index.{generation}"));
        let mut file = File::create(&index_path).map_err(|e| io_err("compact", e))?;
        file.write_all(index.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err("compact", e))?;
        write_whole(&self.dir, "current", format!("{generation}\n").as_bytes())?;
        let (old_index, old_data_path) = (self.index_path(), self.data_path());
        self.generation = generation;
        self.messages = moved;
        self.consumed = index.len() as u64;
        self.lines = index.lines().count() as u64;
        self.dead = 0;
        self.data_len = offset;
        let _ = fs::remove_file(old_index);
        let _ = fs::remove_file(old_data_path);
        Ok(())
    }
}
