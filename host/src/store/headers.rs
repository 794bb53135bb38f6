//! Message headers kept at hand for SEARCH by header and FETCH ENVELOPE, by any store.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// Headers of messages, kept because SEARCH by header reads every message of a folder and
/// FETCH ENVELOPE every listed one, again and again. A message never changes under its key, so
/// an entry is never stale while its folder lives (a store whose keys can come back, in a
/// folder made again under the same name, forgets the folder when it goes). Bounded by bytes:
/// when full it is emptied and fills again with what is used.
pub struct HeaderCache<F> {
    /// Folder → key → header.
    folders: HashMap<F, HashMap<String, Arc<[u8]>>>,
    bytes: usize,
}

impl<F> Default for HeaderCache<F> {
    fn default() -> Self {
        HeaderCache {
            folders: HashMap::new(),
            bytes: 0,
        }
    }
}

impl<F: Hash + Eq + Clone> HeaderCache<F> {
    const BUDGET: usize = 32 * 1024 * 1024;

    pub fn get(&self, folder: &F, key: &str) -> Option<Arc<[u8]>> {
        self.folders.get(folder)?.get(key).cloned()
    }

    /// Headers of many messages of one folder: the folder is looked up once.
    pub fn get_many<'k>(
        &self,
        folder: &F,
        keys: impl Iterator<Item = &'k str>,
    ) -> Vec<Option<Arc<[u8]>>> {
        let headers = self.folders.get(folder);
        keys.map(|key| headers.and_then(|h| h.get(key).cloned()))
            .collect()
    }

    pub fn put(&mut self, folder: &F, key: &str, header: Arc<[u8]>) {
        if self.bytes + header.len() > Self::BUDGET {
            self.folders.clear();
            self.bytes = 0;
        }
        self.bytes += header.len();
        self.folders
            .entry(folder.clone())
            .or_default()
            .insert(key.to_string(), header);
    }

    /// Forgets the folders `gone` says went away (deleted, renamed, replaced).
    pub fn forget(&mut self, gone: impl Fn(&F) -> bool) {
        self.folders.retain(|folder, headers| {
            let keep = !gone(folder);
            if !keep {
                self.bytes -= headers.values().map(|h| h.len()).sum::<usize>();
            }
            keep
        });
    }
}
