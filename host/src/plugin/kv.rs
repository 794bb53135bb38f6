//! The `kv` capability: a key-value store per plugin, with expiry and atomic counters, kept
//! across restarts.
//!
//! Each namespace (one per plugin) is a map in memory plus an append-only log on disk
//! (`<dir>/<namespace>.log`, one JSON record per line). Every change is appended before the call
//! returns, so a crash of the server process loses nothing the plugin was told was stored (an
//! operating-system crash may lose the last writes: greylisting and rate data tolerate that, and
//! the log is not fsynced per call so a plugin's `set` costs microseconds, not a disk flush).
//! The log is compacted at open and whenever it grows well past the live data; that rewrite runs
//! on a thread of its own, never inside the plugin's call on the async executor.
//!
//! What a namespace holds lives in host memory, outside the plugin's memory cap, so it has a
//! quota of its own (`kv_quota_mb`, keys and values together): past it a write is refused with
//! an error the plugin sees, and nothing is evicted behind its back.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub const MAX_KEY: usize = 1024;
pub const MAX_VALUE: usize = 64 * 1024;
pub const MAX_ENTRIES: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("key longer than {MAX_KEY} bytes")]
    KeyTooLong,
    #[error("value longer than {MAX_VALUE} bytes")]
    ValueTooLong,
    #[error("namespace holds {MAX_ENTRIES} entries already")]
    Full,
    #[error("the kv quota of {0} bytes is used up")]
    Quota(usize),
    #[error("kv log: {0}")]
    Io(#[from] io::Error),
    #[error("kv database: {0}")]
    Unavailable(String),
}

/// A plugin's namespace: in the data directory, or (`[database] kv = true`) in PostgreSQL,
/// shared by every node, so greylisting and rate limits hold across them.
pub enum Namespace {
    File(FileNamespace),
    Shared(SharedNamespace),
}

impl Namespace {
    /// The namespace stored at `<dir>/<name>.log`.
    pub fn open(dir: &Path, name: &str) -> io::Result<Namespace> {
        FileNamespace::open(dir, name).map(Namespace::File)
    }

    /// The namespace `name` in the database.
    pub fn shared(db: Arc<crate::store::postgres::PgStore>, name: &str) -> Namespace {
        Namespace::Shared(SharedNamespace {
            db,
            name: name.to_string(),
            quota: AtomicUsize::new(usize::MAX),
        })
    }

    pub fn set_quota(&self, bytes: usize) {
        match self {
            Namespace::File(ns) => ns.set_quota(bytes),
            Namespace::Shared(ns) => ns.quota.store(bytes, Ordering::Relaxed),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Namespace::File(ns) => ns.bytes(),
            Namespace::Shared(ns) => {
                off_executor(|| ns.db.kv_bytes(&ns.name)).unwrap_or(0) as usize
            }
        }
    }

    /// The value, unless absent or expired (or, shared, the database cannot be reached).
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match self {
            Namespace::File(ns) => Ok(ns.get(key)),
            Namespace::Shared(ns) => {
                off_executor(|| ns.db.kv_get(&ns.name, key, now_ms())).map_err(unavailable)
            }
        }
    }

    pub fn set(&self, key: &str, value: Vec<u8>, ttl_secs: Option<u64>) -> Result<(), KvError> {
        match self {
            Namespace::File(ns) => ns.set(key, value, ttl_secs),
            Namespace::Shared(ns) => {
                check_sizes(key, &value)?;
                ns.write(key, |now, _| (value, expiry(now, ttl_secs)))
            }
        }
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        match self {
            Namespace::File(ns) => ns.delete(key),
            Namespace::Shared(ns) => {
                off_executor(|| ns.db.kv_delete(&ns.name, key, now_ms())).map_err(unavailable)
            }
        }
    }

    /// As [`FileNamespace::increment`]: atomic across nodes too (the database serialises the
    /// writers of a namespace).
    pub fn increment(&self, key: &str, delta: i64, ttl_secs: Option<u64>) -> Result<i64, KvError> {
        match self {
            Namespace::File(ns) => ns.increment(key, delta, ttl_secs),
            Namespace::Shared(ns) => {
                if key.len() > MAX_KEY {
                    return Err(KvError::KeyTooLong);
                }
                let mut next = 0;
                ns.write(key, |now, live| {
                    let (current, expires) = match live {
                        Some((value, expires)) => (counter(&value), expires),
                        None => (0, expiry(now, ttl_secs)),
                    };
                    next = current.saturating_add(delta);
                    (next.to_string().into_bytes(), expires)
                })?;
                Ok(next)
            }
        }
    }
}

/// A namespace in the database (`store::postgres::kv`).
pub struct SharedNamespace {
    db: Arc<crate::store::postgres::PgStore>,
    name: String,
    quota: AtomicUsize,
}

impl SharedNamespace {
    /// Replaces `key`'s entry with what `change` makes of the live one, given the time, within
    /// the quota.
    fn write(
        &self,
        key: &str,
        change: impl FnOnce(
            u64,
            Option<crate::store::postgres::KvEntry>,
        ) -> crate::store::postgres::KvEntry,
    ) -> Result<(), KvError> {
        let now = now_ms();
        let quota = self.quota.load(Ordering::Relaxed);
        let fitted = off_executor(|| {
            self.db
                .kv_write(&self.name, key, now, quota, |live| change(now, live))
        })
        .map_err(unavailable)?;
        fitted.ok_or(KvError::Quota(quota))
    }
}

/// When an entry written at `now` with `ttl_secs` expires (Unix milliseconds).
fn expiry(now: u64, ttl_secs: Option<u64>) -> Option<u64> {
    ttl_secs.map(|t| now.saturating_add(t.saturating_mul(1000)))
}

fn unavailable(err: crate::store::StoreError) -> KvError {
    KvError::Unavailable(err.to_string())
}

fn check_sizes(key: &str, value: &[u8]) -> Result<(), KvError> {
    if key.len() > MAX_KEY {
        return Err(KvError::KeyTooLong);
    }
    if value.len() > MAX_VALUE {
        return Err(KvError::ValueTooLong);
    }
    Ok(())
}

/// A counter's value as stored (decimal text; anything else counts as 0).
fn counter(value: &[u8]) -> i64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(0)
}

/// Runs a blocking database call from a host function: plugins run on the async executor,
/// whose worker must be told it is about to block (on a blocking thread it just runs).
fn off_executor<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[derive(Clone)]
struct Entry {
    value: Vec<u8>,
    /// Unix milliseconds; None never expires.
    expires: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    k: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<u64>,
}

/// One plugin's namespace in the data directory.
pub struct FileNamespace {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    /// Bytes (keys and values) the namespace may hold.
    quota: AtomicUsize,
}

struct State {
    entries: HashMap<String, Entry>,
    /// Bytes of keys and values in `entries`.
    bytes: usize,
    log: BufWriter<File>,
    /// Records in the log file (live or not), to know when to compact.
    records: usize,
    /// While a compaction runs: the records appended since its snapshot, which it adds to the
    /// new log before that replaces the old one.
    compacting: Option<Vec<Record>>,
}

fn size_of(key: &str, entry: &Entry) -> usize {
    key.len() + entry.value.len()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl FileNamespace {
    /// Opens (creating) the namespace stored at `<dir>/<name>.log`.
    pub fn open(dir: &Path, name: &str) -> io::Result<FileNamespace> {
        fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.log"));
        let mut entries = HashMap::new();
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines() {
                let line = line?;
                // A torn last line (crash mid-append) is skipped, the rest replays.
                let Ok(record) = serde_json::from_str::<Record>(&line) else {
                    continue;
                };
                match record.v.and_then(|v| BASE64.decode(v).ok()) {
                    Some(value) => {
                        entries.insert(
                            record.k,
                            Entry {
                                value,
                                expires: record.e,
                            },
                        );
                    }
                    None => {
                        entries.remove(&record.k);
                    }
                }
            }
        }
        let now = now_ms();
        entries.retain(|_, e: &mut Entry| e.expires.is_none_or(|t| t > now));
        let log = write_snapshot(&path, &entries)?;
        let bytes = entries.iter().map(|(k, e)| size_of(k, e)).sum();
        Ok(FileNamespace {
            path,
            state: Arc::new(Mutex::new(State {
                records: entries.len(),
                entries,
                bytes,
                log,
                compacting: None,
            })),
            quota: AtomicUsize::new(usize::MAX),
        })
    }

    /// Sets what the namespace may hold from now on (the plugin's `kv_quota_mb`).
    pub fn set_quota(&self, bytes: usize) {
        self.quota.store(bytes, Ordering::Relaxed);
    }

    /// Bytes of keys and values held now.
    pub fn bytes(&self) -> usize {
        self.state.lock().expect("kv lock").bytes
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let state = self.state.lock().expect("kv lock");
        let entry = state.entries.get(key)?;
        entry
            .expires
            .is_none_or(|t| t > now_ms())
            .then(|| entry.value.clone())
    }

    pub fn set(&self, key: &str, value: Vec<u8>, ttl_secs: Option<u64>) -> Result<(), KvError> {
        check_sizes(key, &value)?;
        let expires = expiry(now_ms(), ttl_secs);
        let mut state = self.state.lock().expect("kv lock");
        self.put(&mut state, key, Entry { value, expires })
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        let mut state = self.state.lock().expect("kv lock");
        let removed = state.entries.remove(key);
        if let Some(entry) = &removed {
            state.bytes -= size_of(key, entry);
        }
        let existed = removed.is_some();
        if existed {
            append(
                &mut state,
                &Record {
                    k: key.to_string(),
                    v: None,
                    e: None,
                },
            )?;
        }
        Ok(existed)
    }

    pub fn increment(&self, key: &str, delta: i64, ttl_secs: Option<u64>) -> Result<i64, KvError> {
        if key.len() > MAX_KEY {
            return Err(KvError::KeyTooLong);
        }
        let now = now_ms();
        let mut state = self.state.lock().expect("kv lock");
        let live = state
            .entries
            .get(key)
            .filter(|e| e.expires.is_none_or(|t| t > now))
            .cloned();
        let (current, expires) = match live {
            Some(entry) => (counter(&entry.value), entry.expires),
            None => (0, expiry(now, ttl_secs)),
        };
        let next = current.saturating_add(delta);
        self.put(
            &mut state,
            key,
            Entry {
                value: next.to_string().into_bytes(),
                expires,
            },
        )?;
        Ok(next)
    }

    fn put(&self, state: &mut State, key: &str, entry: Entry) -> Result<(), KvError> {
        let quota = self.quota.load(Ordering::Relaxed);
        let old = state.entries.get(key).map_or(0, |e| size_of(key, e));
        let fits = |state: &State| {
            (state.entries.contains_key(key) || state.entries.len() < MAX_ENTRIES)
                && state.bytes - old + size_of(key, &entry) <= quota
        };
        if !fits(state) {
            // Expired entries make room first.
            let now = now_ms();
            state
                .entries
                .retain(|_, e| e.expires.is_none_or(|t| t > now));
            state.bytes = state.entries.iter().map(|(k, e)| size_of(k, e)).sum();
            let old = state.entries.get(key).map_or(0, |e| size_of(key, e));
            if !state.entries.contains_key(key) && state.entries.len() >= MAX_ENTRIES {
                return Err(KvError::Full);
            }
            if state.bytes - old + size_of(key, &entry) > quota {
                return Err(KvError::Quota(quota));
            }
        }
        let record = Record {
            k: key.to_string(),
            v: Some(BASE64.encode(&entry.value)),
            e: entry.expires,
        };
        state.bytes += size_of(key, &entry);
        if let Some(previous) = state.entries.insert(key.to_string(), entry) {
            state.bytes -= size_of(key, &previous);
        }
        append(state, &record)?;
        if state.compacting.is_none() && state.records > 2 * state.entries.len() + 10_000 {
            self.compact_in_background(state);
        }
        Ok(())
    }

    /// Starts rewriting the log from a copy of the live entries on a thread of its own.
    fn compact_in_background(&self, state: &mut State) {
        let now = now_ms();
        let snapshot: HashMap<String, Entry> = state
            .entries
            .iter()
            .filter(|(_, e)| e.expires.is_none_or(|t| t > now))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        state.compacting = Some(Vec::new());
        let shared = self.state.clone();
        let path = self.path.clone();
        let started = std::thread::Builder::new()
            .name("kv-compact".into())
            .spawn(move || compact(&shared, &path, snapshot));
        if started.is_err() {
            state.compacting = None;
        }
    }
}

/// Writes the snapshot and the records appended meanwhile to a new log that replaces the old;
/// on failure the old log, which got every record too, stays.
fn compact(shared: &Mutex<State>, path: &Path, snapshot: HashMap<String, Entry>) {
    let tmp = path.with_extension("log.tmp");
    let written = (|| -> io::Result<()> {
        let mut out = BufWriter::new(File::create(&tmp)?);
        write_records(&mut out, &snapshot)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    let mut state = shared.lock().expect("kv lock");
    let pending = state.compacting.take().unwrap_or_default();
    if let Err(err) = written {
        tracing::warn!(path = %path.display(), "kv compaction failed, keeping the old log: {err}");
        let _ = fs::remove_file(&tmp);
        return;
    }
    // The records that came during the write, then the switch: short, under the lock.
    let switched = (|| -> io::Result<BufWriter<File>> {
        let mut out = BufWriter::new(OpenOptions::new().append(true).open(&tmp)?);
        for record in &pending {
            serde_json::to_writer(&mut out, record).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        fs::rename(&tmp, path)?;
        Ok(BufWriter::new(OpenOptions::new().append(true).open(path)?))
    })();
    match switched {
        Ok(log) => {
            state.log = log;
            state.records = snapshot.len() + pending.len();
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), "kv compaction failed, keeping the old log: {err}");
            let _ = fs::remove_file(&tmp);
        }
    }
    drop(state);
    if let Some(dir) = path.parent() {
        let _ = crate::durable::sync_dir(dir);
    }
}

fn append(state: &mut State, record: &Record) -> Result<(), KvError> {
    serde_json::to_writer(&mut state.log, record).map_err(io::Error::other)?;
    state.log.write_all(b"\n")?;
    // Into the kernel before the plugin hears "stored": survives a crash of this process.
    state.log.flush()?;
    state.records += 1;
    if let Some(pending) = &mut state.compacting {
        pending.push(Record {
            k: record.k.clone(),
            v: record.v.clone(),
            e: record.e,
        });
    }
    Ok(())
}

fn write_records(out: &mut impl Write, entries: &HashMap<String, Entry>) -> io::Result<()> {
    for (k, e) in entries {
        let record = Record {
            k: k.clone(),
            v: Some(BASE64.encode(&e.value)),
            e: e.expires,
        };
        serde_json::to_writer(&mut *out, &record).map_err(io::Error::other)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Rewrites the log as a snapshot of the live entries (temp file, flush, rename) and returns a
/// writer appending to it (at open, before any plugin runs).
fn write_snapshot(path: &Path, entries: &HashMap<String, Entry>) -> io::Result<BufWriter<File>> {
    let tmp = path.with_extension("log.tmp");
    {
        let mut out = BufWriter::new(File::create(&tmp)?);
        write_records(&mut out, entries)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        crate::durable::sync_dir(dir)?;
    }
    Ok(BufWriter::new(OpenOptions::new().append(true).open(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_counters_and_expiry_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ns = FileNamespace::open(dir.path(), "greylist").unwrap();
            ns.set("a", b"1".to_vec(), None).unwrap();
            ns.set("gone", b"x".to_vec(), Some(0)).unwrap();
            assert_eq!(ns.increment("hits", 2, Some(3600)).unwrap(), 2);
            assert_eq!(ns.increment("hits", 3, Some(1)).unwrap(), 5);
            assert!(ns.delete("a").unwrap());
            ns.set("b", vec![0, 255], None).unwrap();
            assert_eq!(ns.get("gone"), None, "ttl 0 expires at once");
        }
        let ns = FileNamespace::open(dir.path(), "greylist").unwrap();
        assert_eq!(ns.get("a"), None);
        assert_eq!(ns.get("b"), Some(vec![0, 255]));
        assert_eq!(ns.get("hits"), Some(b"5".to_vec()));
        assert!(!ns.delete("nope").unwrap());
    }

    #[test]
    fn torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ns = FileNamespace::open(dir.path(), "n").unwrap();
            ns.set("k", b"v".to_vec(), None).unwrap();
        }
        let path = dir.path().join("n.log");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{\"k\":\"half");
        fs::write(&path, text).unwrap();
        let ns = FileNamespace::open(dir.path(), "n").unwrap();
        assert_eq!(ns.get("k"), Some(b"v".to_vec()));
    }

    #[test]
    fn limits_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let ns = FileNamespace::open(dir.path(), "n").unwrap();
        assert!(matches!(
            ns.set(&"k".repeat(2000), vec![], None),
            Err(KvError::KeyTooLong)
        ));
        assert!(matches!(
            ns.set("k", vec![0; MAX_VALUE + 1], None),
            Err(KvError::ValueTooLong)
        ));
    }

    #[test]
    fn the_quota_refuses_writes_past_it_and_counts_replacements_once() {
        let dir = tempfile::tempdir().unwrap();
        let ns = FileNamespace::open(dir.path(), "q").unwrap();
        ns.set_quota(10_000);
        ns.set("a", vec![0; 6000], None).unwrap();
        // Replacing a value counts only the difference.
        ns.set("a", vec![0; 9000], None).unwrap();
        assert!(matches!(
            ns.set("b", vec![0; 2000], None),
            Err(KvError::Quota(10_000))
        ));
        assert_eq!(ns.bytes(), 9001);
        assert!(ns.delete("a").unwrap());
        ns.set("b", vec![0; 2000], None).unwrap();
        assert_eq!(ns.bytes(), 2001);
        // Expired entries make room before a write is refused.
        ns.set("c", vec![0; 7000], Some(0)).unwrap();
        ns.set("d", vec![0; 7000], None).unwrap();
        assert_eq!(ns.get("d").map(|v| v.len()), Some(7000));
    }

    #[test]
    fn compaction_runs_beside_writes_and_loses_none_of_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ns = FileNamespace::open(dir.path(), "c").unwrap();
            // Rewriting one key over and over grows the log until it is compacted (more than
            // once), while writes go on.
            for n in 0..40_000u32 {
                ns.set("hot", n.to_string().into_bytes(), None).unwrap();
                if n % 1000 == 0 {
                    ns.set(&format!("k{n}"), b"v".to_vec(), None).unwrap();
                }
            }
            // Let a compaction in flight finish.
            for _ in 0..200 {
                if ns.state.lock().unwrap().compacting.is_none() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let lines = fs::read_to_string(dir.path().join("c.log"))
                .unwrap()
                .lines()
                .count();
            assert!(lines < 40_000, "compacted: {lines} lines");
        }
        let ns = FileNamespace::open(dir.path(), "c").unwrap();
        assert_eq!(ns.get("hot"), Some(b"39999".to_vec()));
        assert_eq!(ns.get("k39000"), Some(b"v".to_vec()));
        assert_eq!(ns.get("k0"), Some(b"v".to_vec()));
    }
}
