//! Message headers kept at hand for SEARCH by header and FETCH ENVELOPE.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Headers of messages, kept because SEARCH by header reads every message of a folder and
/// FETCH ENVELOPE every listed one, again and again. A message never changes under its key, so
/// an entry is never stale; a copy in another folder has another key. Bounded by bytes: when
/// full it is emptied and fills again with what is used.
#[derive(Default)]
pub(super) struct HeaderCache {
    /// Folder directory → key → header.
    pub(super) folders: HashMap<PathBuf, HashMap<String, Arc<[u8]>>>,
    pub(super) bytes: usize,
}

impl HeaderCache {
    const BUDGET: usize = 32 * 1024 * 1024;

    pub(super) fn get(&self, dir: &Path, key: &str) -> Option<Arc<[u8]>> {
        self.folders.get(dir)?.get(key).cloned()
    }

    pub(super) fn put(&mut self, dir: &Path, key: &str, header: Arc<[u8]>) {
        if self.bytes + header.len() > Self::BUDGET {
            self.folders.clear();
            self.bytes = 0;
        }
        self.bytes += header.len();
        self.folders
            .entry(dir.to_path_buf())
            .or_default()
            .insert(key.to_string(), header);
    }
}
