//! The `kv` capability: a key-value store per plugin, with expiry and atomic counters, kept
//! across restarts.
//!
//! Each namespace (one per plugin) is a map in memory plus an append-only log on disk
//! (`<dir>/<namespace>.log`, one JSON record per line). Every change is appended before the call
//! returns, so a crash of the server process loses nothing the plugin was told was stored (an
//! operating-system crash may lose the last writes: greylisting and rate data tolerate that, and
//! the log is not fsynced per call so a plugin's `set` costs microseconds, not a disk flush).
//! The log is compacted at open and whenever it grows well past the live data.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
    #[error("kv log: {0}")]
    Io(#[from] io::Error),
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

/// One plugin's namespace.
pub struct Namespace {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    entries: HashMap<String, Entry>,
    log: BufWriter<File>,
    /// Records in the log file (live or not), to know when to compact.
    records: usize,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Namespace {
    /// Opens (creating) the namespace stored at `<dir>/<name>.log`.
    pub fn open(dir: &Path, name: &str) -> io::Result<Namespace> {
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
        Ok(Namespace {
            path,
            state: Mutex::new(State {
                records: entries.len(),
                entries,
                log,
            }),
        })
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
        if key.len() > MAX_KEY {
            return Err(KvError::KeyTooLong);
        }
        if value.len() > MAX_VALUE {
            return Err(KvError::ValueTooLong);
        }
        let expires = ttl_secs.map(|t| now_ms().saturating_add(t.saturating_mul(1000)));
        let mut state = self.state.lock().expect("kv lock");
        self.put(&mut state, key, Entry { value, expires })
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        let mut state = self.state.lock().expect("kv lock");
        let existed = state.entries.remove(key).is_some();
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
            Some(entry) => (
                std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(0),
                entry.expires,
            ),
            None => (
                0,
                ttl_secs.map(|t| now.saturating_add(t.saturating_mul(1000))),
            ),
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
        if !state.entries.contains_key(key) && state.entries.len() >= MAX_ENTRIES {
            let now = now_ms();
            state
                .entries
                .retain(|_, e| e.expires.is_none_or(|t| t > now));
            if state.entries.len() >= MAX_ENTRIES {
                return Err(KvError::Full);
            }
        }
        let record = Record {
            k: key.to_string(),
            v: Some(BASE64.encode(&entry.value)),
            e: entry.expires,
        };
        state.entries.insert(key.to_string(), entry);
        append(state, &record)?;
        if state.records > 2 * state.entries.len() + 10_000 {
            let now = now_ms();
            state
                .entries
                .retain(|_, e| e.expires.is_none_or(|t| t > now));
            state.log = write_snapshot(&self.path, &state.entries)?;
            state.records = state.entries.len();
        }
        Ok(())
    }
}

fn append(state: &mut State, record: &Record) -> Result<(), KvError> {
    serde_json::to_writer(&mut state.log, record).map_err(io::Error::other)?;
    state.log.write_all(b"\n")?;
    // Into the kernel before the plugin hears "stored": survives a crash of this process.
    state.log.flush()?;
    state.records += 1;
    Ok(())
}

/// Rewrites the log as a snapshot of the live entries (temp file, flush, rename) and returns a
/// writer appending to it.
fn write_snapshot(path: &Path, entries: &HashMap<String, Entry>) -> io::Result<BufWriter<File>> {
    let tmp = path.with_extension("log.tmp");
    {
        let mut out = BufWriter::new(File::create(&tmp)?);
        for (k, e) in entries {
            let record = Record {
                k: k.clone(),
                v: Some(BASE64.encode(&e.value)),
                e: e.expires,
            };
            serde_json::to_writer(&mut out, &record).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
        }
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
            let ns = Namespace::open(dir.path(), "greylist").unwrap();
            ns.set("a", b"1".to_vec(), None).unwrap();
            ns.set("gone", b"x".to_vec(), Some(0)).unwrap();
            assert_eq!(ns.increment("hits", 2, Some(3600)).unwrap(), 2);
            assert_eq!(ns.increment("hits", 3, Some(1)).unwrap(), 5);
            assert!(ns.delete("a").unwrap());
            ns.set("b", vec![0, 255], None).unwrap();
            assert_eq!(ns.get("gone"), None, "ttl 0 expires at once");
        }
        let ns = Namespace::open(dir.path(), "greylist").unwrap();
        assert_eq!(ns.get("a"), None);
        assert_eq!(ns.get("b"), Some(vec![0, 255]));
        assert_eq!(ns.get("hits"), Some(b"5".to_vec()));
        assert!(!ns.delete("nope").unwrap());
    }

    #[test]
    fn torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ns = Namespace::open(dir.path(), "n").unwrap();
            ns.set("k", b"v".to_vec(), None).unwrap();
        }
        let path = dir.path().join("n.log");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{\"k\":\"half");
        fs::write(&path, text).unwrap();
        let ns = Namespace::open(dir.path(), "n").unwrap();
        assert_eq!(ns.get("k"), Some(b"v".to_vec()));
    }

    #[test]
    fn limits_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::open(dir.path(), "n").unwrap();
        assert!(matches!(
            ns.set(&"k".repeat(2000), vec![], None),
            Err(KvError::KeyTooLong)
        ));
        assert!(matches!(
            ns.set("k", vec![0; MAX_VALUE + 1], None),
            Err(KvError::ValueTooLong)
        ));
    }
}
