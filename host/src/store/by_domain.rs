//! The store each local domain's mailboxes live in: the embedded Maildir, or the mailbox
//! backend configured for the domain (`[[mailbox_backend]] domains = [...]`). Mailbox keys are
//! `user@domain`, so every call is routed by the part after the `@`; a delivery batch is split
//! by store, and the results are put back in order.

use std::collections::HashMap;
use std::sync::Arc;

use super::{
    Delivery, FlagChange, FlagOutcome, Flags, FolderSnapshot, Keywords, MailStore, MessageInfo,
    StoreError, Usage,
};

pub struct ByDomain {
    default: Arc<dyn MailStore>,
    /// Lower-cased domain → its store.
    domains: HashMap<String, Arc<dyn MailStore>>,
}

impl ByDomain {
    pub fn new(default: Arc<dyn MailStore>) -> ByDomain {
        ByDomain {
            default,
            domains: HashMap::new(),
        }
    }

    pub fn route(&mut self, domain: &str, store: Arc<dyn MailStore>) {
        self.domains.insert(domain.to_ascii_lowercase(), store);
    }

    /// Makes `store` the one for every domain not routed: `keep` (the configured domains) stay
    /// with the old default, and domains added later (`postern domain add`) go to `store`.
    pub fn default_to(&mut self, store: Arc<dyn MailStore>, keep: &[String]) {
        for domain in keep {
            let domain = domain.to_ascii_lowercase();
            if !self.domains.contains_key(&domain) {
                self.domains.insert(domain, self.default.clone());
            }
        }
        self.default = store;
    }

    fn store(&self, mailbox: &str) -> &dyn MailStore {
        let domain = mailbox.rsplit_once('@').map_or("", |(_, d)| d);
        match self.domains.get(&domain.to_ascii_lowercase()) {
            Some(store) => &**store,
            None => &*self.default,
        }
    }
}

impl MailStore for ByDomain {
    fn deliver(&self, batch: &[Delivery<'_>]) -> Vec<Result<(), StoreError>> {
        if self.domains.is_empty() {
            return self.default.deliver(batch);
        }
        let mut results: Vec<Option<Result<(), StoreError>>> = batch.iter().map(|_| None).collect();
        let mut groups: Vec<(*const (), Vec<usize>)> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            let at = self.store(d.mailbox) as *const dyn MailStore as *const ();
            match groups.iter_mut().find(|(s, _)| *s == at) {
                Some((_, v)) => v.push(i),
                None => groups.push((at, vec![i])),
            }
        }
        for (_, indexes) in groups {
            let part: Vec<Delivery<'_>> = indexes
                .iter()
                .map(|i| {
                    let d = &batch[*i];
                    Delivery { ..*d }
                })
                .collect();
            let store = self.store(part[0].mailbox);
            for (i, result) in indexes.iter().zip(store.deliver(&part)) {
                results[*i] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(StoreError::Io(std::io::Error::other("not delivered"))))
            })
            .collect()
    }

    fn reads_inline(&self, mailbox: &str) -> bool {
        self.store(mailbox).reads_inline(mailbox)
    }

    fn snapshot(&self, mailbox: &str, folder: &str) -> Result<FolderSnapshot, StoreError> {
        self.store(mailbox).snapshot(mailbox, folder)
    }

    fn read(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Vec<u8>, StoreError> {
        self.store(mailbox).read(mailbox, folder, message)
    }

    fn read_header(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Arc<[u8]>, StoreError> {
        self.store(mailbox).read_header(mailbox, folder, message)
    }

    fn read_range(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        self.store(mailbox)
            .read_range(mailbox, folder, message, range)
    }

    fn read_headers(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Vec<Result<Arc<[u8]>, StoreError>> {
        self.store(mailbox).read_headers(mailbox, folder, messages)
    }

    fn add_flags(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        flags: Flags,
    ) -> Result<(), StoreError> {
        self.store(mailbox)
            .add_flags(mailbox, folder, messages, flags)
    }

    fn change_flags(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        change: &FlagChange,
        unchanged_since: Option<u64>,
    ) -> Result<FlagOutcome, StoreError> {
        self.store(mailbox)
            .change_flags(mailbox, folder, messages, change, unchanged_since)
    }

    fn append(
        &self,
        mailbox: &str,
        folder: &str,
        message: &[u8],
        flags: Flags,
        keywords: &Keywords,
        received_at: i64,
    ) -> Result<(u32, u32), StoreError> {
        self.store(mailbox)
            .append(mailbox, folder, message, flags, keywords, received_at)
    }

    fn copy(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        target: &str,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        self.store(mailbox).copy(mailbox, folder, messages, target)
    }

    fn folders(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        self.store(mailbox).folders(mailbox)
    }

    fn all_folders(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        self.store(mailbox).all_folders(mailbox)
    }

    fn has_folder(&self, mailbox: &str, folder: &str) -> Result<bool, StoreError> {
        self.store(mailbox).has_folder(mailbox, folder)
    }

    fn create_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        self.store(mailbox).create_folder(mailbox, folder)
    }

    fn delete_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        self.store(mailbox).delete_folder(mailbox, folder)
    }

    fn rename_folder(&self, mailbox: &str, from: &str, to: &str) -> Result<(), StoreError> {
        self.store(mailbox).rename_folder(mailbox, from, to)
    }

    fn subscriptions(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        self.store(mailbox).subscriptions(mailbox)
    }

    fn recent_boundary(
        &self,
        mailbox: &str,
        folder: &str,
        validity: u32,
        claim: Option<u32>,
    ) -> Result<u32, StoreError> {
        self.store(mailbox)
            .recent_boundary(mailbox, folder, validity, claim)
    }

    fn set_subscribed(
        &self,
        mailbox: &str,
        folder: &str,
        subscribed: bool,
    ) -> Result<(), StoreError> {
        self.store(mailbox)
            .set_subscribed(mailbox, folder, subscribed)
    }

    fn metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>, StoreError> {
        self.store(mailbox).metadata(mailbox, folder)
    }

    fn set_metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
        changes: &[(String, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        self.store(mailbox).set_metadata(mailbox, folder, changes)
    }

    fn import(
        &self,
        mailbox: &str,
        folder: &str,
        numbers: super::ImportedFolder,
        messages: &[super::Imported<'_>],
    ) -> Result<(), StoreError> {
        self.store(mailbox)
            .import(mailbox, folder, numbers, messages)
    }

    fn usage(&self, mailbox: &str) -> Result<Usage, StoreError> {
        self.store(mailbox).usage(mailbox)
    }

    fn remove(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Result<(), StoreError> {
        self.store(mailbox).remove(mailbox, folder, messages)
    }
}
