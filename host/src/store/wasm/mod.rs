//! Mailbox backends as sandboxed Wasm components: [`WasmStore`] meets the mailbox contract
//! ([`MailStore`]) by calling a component that exports `postern:plugin/mailbox`
//! (`wit/deps/postern-plugin-0.1.0/mailbox.wit`).
//!
//! The sandbox is the hooks' one: the same engine (epoch deadline per call, pooling allocator),
//! the same per-instance memory cap over all memories and tables, WASI with exactly the
//! backend's own directory preopened as `/data`, no sockets, and only the `log`, `config`, `kv`
//! and `clock` capabilities, when granted.
//!
//! Concurrency: instances are pooled (up to `instances`), so calls for different mailboxes run
//! at once; calls for one mailbox are serialised by a lock per mailbox, so a backend never sees
//! two writers of the same mailbox and only has to notice what other instances wrote before
//! (the WIT file says how).
//!
//! Containment: a call that traps, passes its deadline or its memory cap, or answers what the
//! contract forbids (see [`check`]) fails with [`StoreError::Unavailable`], which is temporary:
//! delivery keeps the message queued and retries, IMAP answers `NO [UNAVAILABLE]`, POP3
//! `-ERR [SYS/TEMP]`. The instance is dropped, so the next call gets a fresh one, and the cause
//! is logged with the backend's name.
//!
//! Hot reload: before a call, at most once a second, the component file is looked at; a new one
//! is compiled (from the shared cache when it can) and serves the next calls. Instances of the
//! old version finish the call they are in and are dropped; IMAP sessions hold none, so they
//! stay open. A file that fails to load leaves the old version serving, and says why.

mod bindings;
mod check;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use wasmtime::component::{Linker, Resource};
use wasmtime::{Engine, Store};

use self::bindings::{types, MailboxBackend, MailboxBackendPre};
use super::headers::HeaderCache;
use super::{
    Delivery, FlagChange, FlagMode, FlagOutcome, Flags, FolderSnapshot, Keywords, MailStore,
    MessageInfo, StoreError, Updated, Usage,
};
use crate::auth::UserDirectory;
use crate::config::{Capability, MailboxBackendConfig, PluginsConfig};
use crate::plugin::host::{PluginMeta, PluginState};
use crate::plugin::kv::Namespace;
use crate::plugin::{engine, DEADLINE_PASSED};

/// The most a backend hands over in one `read` (and the host asks for).
const CHUNK: u32 = 1 << 20;

/// How often the component file is looked at for a new version.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// Bytes of a message coming in, behind the `incoming` resource.
pub struct Incoming(Arc<[u8]>);

impl types::Host for PluginState {}

impl types::HostIncoming for PluginState {
    fn size(&mut self, this: Resource<Incoming>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&this)?.0.len() as u64)
    }

    fn read(
        &mut self,
        this: Resource<Incoming>,
        offset: u64,
        len: u32,
    ) -> wasmtime::Result<Vec<u8>> {
        let bytes = &self.table.get(&this)?.0;
        let start = (offset.min(bytes.len() as u64)) as usize;
        let end = start
            .saturating_add(len.min(CHUNK) as usize)
            .min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }

    fn drop(&mut self, this: Resource<Incoming>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

/// One loaded version of the component.
struct Version {
    pre: MailboxBackendPre<PluginState>,
    /// The file as it was when loaded (modification time and length).
    stamp: Option<(SystemTime, u64)>,
    generation: u64,
}

/// A live instance.
struct Live {
    store: Store<PluginState>,
    guest: MailboxBackend,
    generation: u64,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Live>,
    /// Instances alive, idle or in a call.
    alive: usize,
}

/// Why a call did not give an answer the contract allows.
enum Fault {
    /// The backend answered with an error of the contract (the instance is fine).
    Refused(StoreError),
    /// It trapped, ran out of time or memory, or answered nonsense: the instance is dropped.
    Broken(String),
}

impl From<wasmtime::component::ResourceTableError> for Fault {
    fn from(err: wasmtime::component::ResourceTableError) -> Fault {
        Fault::Broken(format!("host resource table: {err}"))
    }
}

impl From<wasmtime::Error> for Fault {
    fn from(err: wasmtime::Error) -> Fault {
        let text = format!("{err:#}");
        if text.contains(DEADLINE_PASSED) {
            Fault::Broken("it ran past its deadline".into())
        } else if let Some(trap) = err.downcast_ref::<wasmtime::Trap>() {
            // The trap itself, not the backtrace wasmtime puts in front of it.
            Fault::Broken(format!("wasm trap: {trap}"))
        } else {
            Fault::Broken(text.chars().take(500).collect())
        }
    }
}

/// A folder's (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ).
type Numbers = (u32, u32, u64);

pub struct WasmStore {
    name: String,
    engine: Engine,
    linker: Linker<PluginState>,
    meta: Arc<PluginMeta>,
    path: PathBuf,
    cache_dir: PathBuf,
    capabilities: Vec<Capability>,
    timeout: Duration,
    max_instances: usize,
    version: Mutex<(Arc<Version>, Instant)>,
    pool: Mutex<Pool>,
    freed: Condvar,
    /// One lock per mailbox: calls for a mailbox never overlap.
    mailboxes: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Per (mailbox, folder): the UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ last seen, so a
    /// backend whose numbers go back is caught (RFC 9051 §2.3.1.1, RFC 7162 §3.1.1).
    seen: Mutex<HashMap<(String, String), Numbers>>,
    /// Headers read, by (mailbox, folder) and key: SEARCH and ENVELOPE read them again and
    /// again, and each read would cross the boundary. A backend's keys may come back in a
    /// folder made again under an old name, so a mailbox's entries go when a folder of it is
    /// deleted, renamed or imported into (all of which pass through here).
    headers: Mutex<HeaderCache<(String, String)>>,
}

impl WasmStore {
    /// Loads the backend. Blocking (it may compile the component).
    pub fn new(
        config: &MailboxBackendConfig,
        plugins: &PluginsConfig,
        engine: Engine,
        data_dir: &std::path::Path,
        users: Arc<UserDirectory>,
    ) -> Result<WasmStore, String> {
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| e.to_string())?;
        crate::plugin::bindings::Plugin::add_to_linker::<
            PluginState,
            wasmtime::component::HasSelf<PluginState>,
        >(&mut linker, |s| s)
        .map_err(|e| e.to_string())?;
        types::add_to_linker::<PluginState, wasmtime::component::HasSelf<PluginState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| e.to_string())?;
        let directory = config
            .directory
            .clone()
            .unwrap_or_else(|| data_dir.join("mailbox-backends").join(&config.name));
        std::fs::create_dir_all(&directory)
            .map_err(|e| format!("cannot make {}: {e}", directory.display()))?;
        let kv = if config.capabilities.contains(&Capability::Kv) {
            let ns = Namespace::open(
                &data_dir.join("plugin-kv"),
                &format!("mailbox-{}", config.name),
            )
            .map_err(|e| format!("kv store: {e}"))?;
            ns.set_quota(16 << 20);
            Some(Arc::new(ns))
        } else {
            None
        };
        let memory_mb = config.memory_mb.unwrap_or(plugins.default_memory_mb);
        let meta = Arc::new(PluginMeta {
            name: config.name.clone(),
            config: config.config.clone(),
            kv,
            directory: users,
            dns: None,
            directory_grant: Some(directory),
            memory_bytes: (memory_mb as usize) << 20,
            wall_clock: config.capabilities.contains(&Capability::Clock),
            blocking_io: true,
        });
        let cache_dir = plugins
            .cache_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("plugin-cache"));
        let first = load(
            &engine,
            &linker,
            &config.path,
            &cache_dir,
            &config.capabilities,
            1,
        )?;
        Ok(WasmStore {
            name: config.name.clone(),
            engine,
            linker,
            meta,
            path: config.path.clone(),
            cache_dir,
            capabilities: config.capabilities.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            max_instances: config.instances,
            version: Mutex::new((Arc::new(first), Instant::now())),
            pool: Mutex::new(Pool::default()),
            freed: Condvar::new(),
            mailboxes: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            headers: Mutex::new(HeaderCache::default()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version to call: the current one, or a new one when the file changed (looked at
    /// most once a second).
    fn current(&self) -> Arc<Version> {
        let mut version = self.version.lock().expect("backend version");
        if version.1.elapsed() < RELOAD_CHECK {
            return version.0.clone();
        }
        version.1 = Instant::now();
        let stamp = file_stamp(&self.path);
        if stamp.is_none() || stamp == version.0.stamp {
            return version.0.clone();
        }
        let generation = version.0.generation + 1;
        match load(
            &self.engine,
            &self.linker,
            &self.path,
            &self.cache_dir,
            &self.capabilities,
            generation,
        ) {
            Ok(new) => {
                tracing::info!(backend = %self.name, generation, "mailbox backend reloaded");
                version.0 = Arc::new(new);
            }
            Err(reason) => {
                tracing::error!(backend = %self.name, "mailbox backend not reloaded, the previous version serves on: {reason}");
                // Not tried again until the file changes once more.
                let old = &version.0;
                version.0 = Arc::new(Version {
                    pre: old.pre.clone(),
                    stamp,
                    generation: old.generation,
                });
            }
        }
        version.0.clone()
    }

    /// Forgets the kept headers of a mailbox whose folders changed.
    fn forget_headers(&self, mailbox: &str) {
        let mailbox = mailbox.to_ascii_lowercase();
        self.headers
            .lock()
            .expect("header cache")
            .forget(|(m, _)| *m == mailbox);
    }

    fn mailbox_lock(&self, mailbox: &str) -> Arc<Mutex<()>> {
        self.mailboxes
            .lock()
            .expect("mailbox locks")
            .entry(mailbox.to_ascii_lowercase())
            .or_default()
            .clone()
    }

    /// An instance of `version`: an idle one, a new one while the pool has room, or the next
    /// one freed. Idle instances of older versions are dropped on the way.
    fn take(&self, version: &Version) -> Result<Live, Fault> {
        let mut pool = self.pool.lock().expect("backend pool");
        loop {
            while let Some(live) = pool.idle.pop() {
                if live.generation == version.generation {
                    return Ok(live);
                }
                pool.alive -= 1;
            }
            if pool.alive < self.max_instances {
                pool.alive += 1;
                break;
            }
            pool = self.freed.wait(pool).expect("backend pool");
        }
        drop(pool);
        self.instantiate(version).inspect_err(|_| self.discard())
    }

    fn instantiate(&self, version: &Version) -> Result<Live, Fault> {
        let state = PluginState::new(self.meta.clone())?;
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_callback(|store| {
            if Instant::now() >= store.data().deadline {
                Err(wasmtime::Error::msg(DEADLINE_PASSED))
            } else {
                Ok(wasmtime::UpdateDeadline::Continue(1))
            }
        });
        store.data_mut().deadline = Instant::now() + self.timeout;
        store.set_epoch_deadline(1);
        let deadline = store.data().deadline;
        let guest = finish(deadline, version.pre.instantiate_async(&mut store))?;
        Ok(Live {
            store,
            guest,
            generation: version.generation,
        })
    }

    fn give_back(&self, live: Live) {
        self.pool.lock().expect("backend pool").idle.push(live);
        self.freed.notify_one();
    }

    /// An instance is gone (dropped after a fault, or never made).
    fn discard(&self) {
        self.pool.lock().expect("backend pool").alive -= 1;
        self.freed.notify_one();
    }

    /// Runs one call for `mailbox` on an instance, under the mailbox's lock and the call's
    /// deadline; a fault drops the instance and is logged.
    fn call<R>(
        &self,
        mailbox: &str,
        what: &str,
        f: impl FnOnce(&mut Live) -> Result<R, Fault>,
    ) -> Result<R, StoreError> {
        let lock = self.mailbox_lock(mailbox);
        let _one_call_per_mailbox = lock.lock().expect("mailbox lock");
        let version = self.current();
        let _running = crate::plugin::engine::GuestRunning::start();
        let outcome = self.take(&version).and_then(|mut live| {
            live.store.data_mut().deadline = Instant::now() + self.timeout;
            live.store.set_epoch_deadline(1);
            match f(&mut live) {
                Ok(answer) => {
                    self.give_back(live);
                    Ok(answer)
                }
                Err(Fault::Refused(err)) => {
                    self.give_back(live);
                    Err(Fault::Refused(err))
                }
                Err(broken) => {
                    drop(live);
                    self.discard();
                    Err(broken)
                }
            }
        });
        outcome.map_err(|fault| match fault {
            Fault::Refused(err) => err,
            Fault::Broken(reason) => {
                tracing::error!(backend = %self.name, mailbox, call = what, "mailbox backend failed: {reason}");
                StoreError::Unavailable {
                    name: self.name.clone(),
                    reason: format!("{what}: {reason}"),
                }
            }
        })
    }

    /// Notes a folder's numbers from a listing, and checks that none went back.
    fn note_listing(
        &self,
        mailbox: &str,
        folder: &str,
        listed: &FolderSnapshot,
    ) -> Result<(), Fault> {
        let mut seen = self.seen.lock().expect("seen numbers");
        let key = (mailbox.to_ascii_lowercase(), folder.to_string());
        let (validity, next, modseq) =
            (listed.uid_validity, listed.uid_next, listed.highest_modseq);
        match seen.get_mut(&key) {
            Some(entry) if entry.0 == validity => {
                if next < entry.1 || modseq < entry.2 {
                    return Err(Fault::Broken(format!(
                        "folder {folder:?} went back under UIDVALIDITY {validity}: UIDNEXT {} then {next}, HIGHESTMODSEQ {} then {modseq}",
                        entry.1, entry.2
                    )));
                }
                *entry = (validity, next, modseq);
            }
            _ => {
                seen.insert(key, (validity, next, modseq));
            }
        }
        Ok(())
    }

    /// Checks that an appended message's UID is above every UID listed before.
    fn note_appended(
        &self,
        mailbox: &str,
        folder: &str,
        validity: u32,
        uid: u32,
    ) -> Result<(), Fault> {
        let mut seen = self.seen.lock().expect("seen numbers");
        let key = (mailbox.to_ascii_lowercase(), folder.to_string());
        if let Some(entry) = seen.get_mut(&key).filter(|e| e.0 == validity) {
            if uid < entry.1 {
                return Err(Fault::Broken(format!(
                    "append gave UID {uid} in {folder:?}, below its UIDNEXT {}",
                    entry.1
                )));
            }
            entry.1 = uid.saturating_add(1);
        }
        Ok(())
    }

    /// Bytes `start..end` of a message (`end` at most its size), read in chunks of at most
    /// [`CHUNK`]. With `whole` (the message from 0 to its size), one byte past the end is asked
    /// for too, so a backend with more bytes than it listed is caught, and a short chunk before
    /// the end is a backend that listed more bytes than it has.
    #[allow(clippy::too_many_arguments)]
    fn read_chunks(
        &self,
        live: &mut Live,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
        start: u64,
        end: u64,
        whole: bool,
    ) -> Result<Vec<u8>, Fault> {
        let reference = reference(message);
        let mut bytes = Vec::with_capacity((end - start).min(64 << 20) as usize);
        let mut offset = start;
        loop {
            let left = end - offset;
            if left == 0 && !whole {
                return Ok(bytes);
            }
            let ask = (left + u64::from(whole)).min(u64::from(CHUNK)) as u32;
            let chunk = finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_read(
                    &mut live.store,
                    mailbox,
                    folder,
                    &reference,
                    offset,
                    ask,
                ),
            )?
            .map_err(refused)?;
            if chunk.len() > ask as usize || chunk.len() as u64 > left {
                return Err(Fault::Broken(format!(
                    "message {} has more bytes than its size {}",
                    message.uid, message.size
                )));
            }
            let short = chunk.len() < ask as usize;
            offset += chunk.len() as u64;
            bytes.extend_from_slice(&chunk);
            if offset == end {
                return Ok(bytes);
            }
            if chunk.is_empty() || (whole && short) {
                return Err(Fault::Broken(format!(
                    "message {} ends at {offset}, its listing said {}",
                    message.uid, message.size
                )));
            }
        }
    }
}

/// Loads a version of the component: compiled (or from the cache), its imports checked against
/// the grants, linked and pre-instantiated.
fn load(
    engine: &Engine,
    linker: &Linker<PluginState>,
    path: &std::path::Path,
    cache_dir: &std::path::Path,
    capabilities: &[Capability],
    generation: u64,
) -> Result<Version, String> {
    let stamp = file_stamp(path);
    let (component, _digest) = engine::load_component(engine, path, cache_dir)?;
    crate::plugin::capability::check_imports(engine, &component, capabilities)?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| format!("cannot link: {e:#}"))?;
    let pre = MailboxBackendPre::new(pre)
        .map_err(|e| format!("does not export postern:plugin/mailbox: {e:#}"))?;
    Ok(Version {
        pre,
        stamp,
        generation,
    })
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Drives a call to the end on this (blocking) thread, or to its deadline. Nothing in a
/// backend's call waits on I/O outside the guest (its imports are synchronous), and the epoch
/// callback never yields, so a poll runs a well-behaved call to its end. A guest that waits
/// outside its own code (WASI's poll: a `sleep`, which every guest can call) is not stopped by
/// the epoch callback, which runs only in guest code: past the deadline the call is dropped
/// here, and the caller discards the instance as after any fault.
fn finish<T>(
    deadline: Instant,
    future: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        if Instant::now() >= deadline {
            return Err(wasmtime::Error::msg(DEADLINE_PASSED));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn reference(message: &MessageInfo) -> types::MessageRef {
    types::MessageRef {
        uid: message.uid,
        key: message.key.clone(),
        handle: message.handle.as_str().to_string(),
    }
}

fn references(messages: &[&MessageInfo]) -> Vec<types::MessageRef> {
    messages.iter().map(|m| reference(m)).collect()
}

fn refused(err: types::StoreError) -> Fault {
    Fault::Refused(check::store_error(err))
}

impl MailStore for WasmStore {
    fn deliver(&self, batch: &[Delivery<'_>]) -> Vec<Result<(), StoreError>> {
        let mut results: Vec<Result<(), StoreError>> = batch.iter().map(|_| Ok(())).collect();
        // One call per mailbox, under its lock.
        let mut by_mailbox: Vec<(String, Vec<usize>)> = Vec::new();
        for (index, delivery) in batch.iter().enumerate() {
            let key = delivery.mailbox.to_ascii_lowercase();
            match by_mailbox.iter_mut().find(|(m, _)| *m == key) {
                Some((_, indexes)) => indexes.push(index),
                None => by_mailbox.push((key, vec![index])),
            }
        }
        for (mailbox, indexes) in by_mailbox {
            let answered = self.call(&mailbox, "deliver", |live| {
                let mut handles = Vec::with_capacity(indexes.len());
                let mut shared: Vec<(*const u8, Arc<[u8]>)> = Vec::new();
                for index in &indexes {
                    let message = batch[*index].message;
                    // A message to several recipients is handed over once.
                    let bytes = match shared.iter().find(|(at, _)| *at == message.as_ptr()) {
                        Some((_, bytes)) => bytes.clone(),
                        None => {
                            let bytes: Arc<[u8]> = Arc::from(message);
                            shared.push((message.as_ptr(), bytes.clone()));
                            bytes
                        }
                    };
                    handles.push(live.store.data_mut().table.push(Incoming(bytes))?);
                }
                let wit: Vec<types::Delivery> = indexes
                    .iter()
                    .zip(handles)
                    .map(|(index, handle)| {
                        let d = &batch[*index];
                        types::Delivery {
                            mailbox: d.mailbox.to_string(),
                            folder: d.folder.to_string(),
                            delivery_id: d.delivery_id.to_string(),
                            retry: d.retry,
                            received_at: d.received_at,
                            prepend: d.prepend.to_vec(),
                            // Owned by the backend now: it drops the handle when done.
                            message: handle,
                        }
                    })
                    .collect();
                let answer = finish(
                    live.store.data().deadline,
                    live.guest
                        .postern_plugin0_1_0_mailbox()
                        .call_deliver(&mut live.store, &wit),
                );
                let answer = answer?;
                if answer.len() != indexes.len() {
                    return Err(Fault::Broken(format!(
                        "deliver answered {} results for {} deliveries",
                        answer.len(),
                        indexes.len()
                    )));
                }
                Ok(answer)
            });
            match answered {
                Ok(answer) => {
                    for (index, result) in indexes.iter().zip(answer) {
                        results[*index] = result.map_err(check::store_error);
                    }
                }
                Err(err) => {
                    for index in &indexes {
                        results[*index] = Err(err.again());
                    }
                }
            }
        }
        results
    }

    fn snapshot(&self, mailbox: &str, folder: &str) -> Result<FolderSnapshot, StoreError> {
        self.call(mailbox, "snapshot", |live| {
            let snapshot = finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_snapshot(
                    &mut live.store,
                    mailbox,
                    folder,
                ),
            )?
            .map_err(refused)?;
            let snapshot = check::snapshot(snapshot).map_err(Fault::Broken)?;
            self.note_listing(mailbox, folder, &snapshot)?;
            Ok(snapshot)
        })
    }

    fn read(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Vec<u8>, StoreError> {
        self.call(mailbox, "read", |live| {
            self.read_chunks(live, mailbox, folder, message, 0, message.size, true)
        })
    }

    fn read_range(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        let end = range.end.min(message.size);
        let start = range.start.min(end);
        self.call(mailbox, "read", |live| {
            self.read_chunks(live, mailbox, folder, message, start, end, false)
        })
    }

    fn read_header(
        &self,
        mailbox: &str,
        folder: &str,
        message: &MessageInfo,
    ) -> Result<Arc<[u8]>, StoreError> {
        self.read_headers(mailbox, folder, &[message])
            .pop()
            .unwrap_or_else(|| Err(StoreError::Gone(message.key.clone())))
    }

    fn read_headers(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Vec<Result<Arc<[u8]>, StoreError>> {
        let place = (mailbox.to_ascii_lowercase(), folder.to_string());
        let mut headers: Vec<Option<Result<Arc<[u8]>, StoreError>>> = {
            let cache = self.headers.lock().expect("header cache");
            messages
                .iter()
                .map(|m| cache.get(&place, &m.key).map(Ok))
                .collect()
        };
        let missing: Vec<&MessageInfo> = messages
            .iter()
            .zip(&headers)
            .filter(|(_, h)| h.is_none())
            .map(|(m, _)| *m)
            .collect();
        if missing.is_empty() {
            return headers.into_iter().flatten().collect();
        }
        let answered = self.call(mailbox, "read-headers", |live| {
            let answer = finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_read_headers(
                    &mut live.store,
                    mailbox,
                    folder,
                    &references(&missing),
                ),
            )?;
            if answer.len() != missing.len() {
                return Err(Fault::Broken(format!(
                    "read-headers answered {} headers for {} messages",
                    answer.len(),
                    missing.len()
                )));
            }
            let mut read = Vec::with_capacity(answer.len());
            for (message, header) in missing.iter().zip(answer) {
                read.push(match header {
                    Ok(header) if header.len() as u64 > message.size => {
                        return Err(Fault::Broken(format!(
                            "the header of message {} is longer than the message",
                            message.uid
                        )))
                    }
                    Ok(header) => Ok(Arc::<[u8]>::from(header)),
                    Err(err) => Err(check::store_error(err)),
                });
            }
            // Kept under the mailbox's lock, so a folder deleted meanwhile cannot leave its
            // headers behind (forget_headers runs under it too).
            let mut cache = self.headers.lock().expect("header cache");
            for (message, header) in missing.iter().zip(&read) {
                if let Ok(header) = header {
                    cache.put(&place, &message.key, header.clone());
                }
            }
            Ok(read)
        });
        let mut read = match answered {
            Ok(read) => read.into_iter(),
            Err(err) => missing
                .iter()
                .map(|_| Err(err.again()))
                .collect::<Vec<_>>()
                .into_iter(),
        };
        for slot in headers.iter_mut().filter(|slot| slot.is_none()) {
            *slot = Some(read.next().expect("one answer per missing header"));
        }
        headers.into_iter().flatten().collect()
    }

    fn change_flags(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        change: &FlagChange,
        unchanged_since: Option<u64>,
    ) -> Result<FlagOutcome, StoreError> {
        self.call(mailbox, "change-flags", |live| {
            let wit = types::FlagChange {
                mode: match change.mode {
                    FlagMode::Add => types::FlagMode::Add,
                    FlagMode::Remove => types::FlagMode::Remove,
                    FlagMode::Replace => types::FlagMode::Replace,
                },
                flags: check::to_wit_flags(change.flags),
                keywords: change.keywords.iter().map(str::to_string).collect(),
            };
            let outcome = finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_change_flags(
                    &mut live.store,
                    mailbox,
                    folder,
                    &references(messages),
                    &wit,
                    unchanged_since,
                ),
            )?
            .map_err(refused)?;
            let asked: std::collections::HashSet<u32> = messages.iter().map(|m| m.uid).collect();
            if let Some(uid) = outcome
                .updated
                .iter()
                .map(|u| u.uid)
                .chain(outcome.refused.iter().copied())
                .find(|uid| !asked.contains(uid))
            {
                return Err(Fault::Broken(format!(
                    "change-flags answered for message {uid}, which it was not asked about"
                )));
            }
            let mut updated = Vec::with_capacity(outcome.updated.len());
            for u in outcome.updated {
                updated.push(Updated {
                    uid: u.uid,
                    flags: check::from_wit_flags(u.flags),
                    keywords: check::keywords(u.keywords).map_err(Fault::Broken)?,
                    modseq: u.modseq,
                });
            }
            Ok(FlagOutcome {
                updated,
                refused: outcome.refused,
            })
        })
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
        self.call(mailbox, "append", |live| {
            let handle = live
                .store
                .data_mut()
                .table
                .push(Incoming(Arc::from(message)))?;
            let names: Vec<String> = keywords.iter().map(str::to_string).collect();
            let answer = finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_append(
                    &mut live.store,
                    mailbox,
                    folder,
                    handle,
                    check::to_wit_flags(flags),
                    &names,
                    received_at,
                ),
            );
            let (validity, uid) = answer?.map_err(refused)?;
            if uid == 0 || validity == 0 {
                return Err(Fault::Broken("append answered UID or UIDVALIDITY 0".into()));
            }
            self.note_appended(mailbox, folder, validity, uid)?;
            Ok((validity, uid))
        })
    }

    fn copy(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
        target: &str,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        self.call(mailbox, "copy", |live| {
            let (validity, pairs) = finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_copy(
                    &mut live.store,
                    mailbox,
                    folder,
                    &references(messages),
                    target,
                ),
            )?
            .map_err(refused)?;
            let asked: std::collections::HashSet<u32> = messages.iter().map(|m| m.uid).collect();
            if pairs
                .iter()
                .any(|(from, to)| !asked.contains(from) || *to == 0)
            {
                return Err(Fault::Broken(
                    "copy answered UIDs it was not asked about".into(),
                ));
            }
            Ok((validity, pairs))
        })
    }

    fn remove(
        &self,
        mailbox: &str,
        folder: &str,
        messages: &[&MessageInfo],
    ) -> Result<(), StoreError> {
        self.call(mailbox, "remove", |live| {
            finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_remove(
                    &mut live.store,
                    mailbox,
                    folder,
                    &references(messages),
                ),
            )?
            .map_err(refused)
        })
    }

    fn folders(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        self.call(mailbox, "folders", |live| {
            let folders = finish(
                live.store.data().deadline,
                live.guest
                    .postern_plugin0_1_0_mailbox()
                    .call_folders(&mut live.store, mailbox),
            )?
            .map_err(refused)?;
            // A name the host could not have made is the backend's mistake.
            if let Some(bad) = folders.iter().find(|f| !super::valid_folder_name(f)) {
                return Err(Fault::Broken(format!("folders listed {bad:?}")));
            }
            Ok(folders)
        })
    }

    fn create_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        if folder.eq_ignore_ascii_case("INBOX") || !super::valid_folder_name(folder) {
            return Err(StoreError::InvalidName(folder.into()));
        }
        self.call(mailbox, "create-folder", |live| {
            finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_create_folder(
                    &mut live.store,
                    mailbox,
                    folder,
                ),
            )?
            .map_err(refused)
        })
    }

    fn delete_folder(&self, mailbox: &str, folder: &str) -> Result<(), StoreError> {
        if folder.eq_ignore_ascii_case("INBOX") {
            return Err(StoreError::InvalidName(folder.into()));
        }
        self.call(mailbox, "delete-folder", |live| {
            self.forget_headers(mailbox);
            finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_delete_folder(
                    &mut live.store,
                    mailbox,
                    folder,
                ),
            )?
            .map_err(refused)
        })
    }

    fn rename_folder(&self, mailbox: &str, from: &str, to: &str) -> Result<(), StoreError> {
        if to.eq_ignore_ascii_case("INBOX") || !super::valid_folder_name(to) {
            return Err(StoreError::InvalidName(to.into()));
        }
        self.call(mailbox, "rename-folder", |live| {
            self.forget_headers(mailbox);
            finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_rename_folder(
                    &mut live.store,
                    mailbox,
                    from,
                    to,
                ),
            )?
            .map_err(refused)
        })
    }

    fn subscriptions(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        self.call(mailbox, "subscriptions", |live| {
            finish(
                live.store.data().deadline,
                live.guest
                    .postern_plugin0_1_0_mailbox()
                    .call_subscriptions(&mut live.store, mailbox),
            )?
            .map_err(refused)
        })
    }

    fn set_subscribed(
        &self,
        mailbox: &str,
        folder: &str,
        subscribed: bool,
    ) -> Result<(), StoreError> {
        self.call(mailbox, "set-subscribed", |live| {
            finish(
                live.store.data().deadline,
                live.guest
                    .postern_plugin0_1_0_mailbox()
                    .call_set_subscribed(&mut live.store, mailbox, folder, subscribed),
            )?
            .map_err(refused)
        })
    }

    fn recent_boundary(
        &self,
        mailbox: &str,
        folder: &str,
        validity: u32,
        claim: Option<u32>,
    ) -> Result<u32, StoreError> {
        self.call(mailbox, "recent-boundary", |live| {
            finish(
                live.store.data().deadline,
                live.guest
                    .postern_plugin0_1_0_mailbox()
                    .call_recent_boundary(&mut live.store, mailbox, folder, validity, claim),
            )?
            .map_err(refused)
        })
    }

    fn metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>, StoreError> {
        self.call(mailbox, "metadata", |live| {
            let entries = finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_metadata(
                    &mut live.store,
                    mailbox,
                    folder,
                ),
            )?
            .map_err(refused)?;
            Ok(entries.into_iter().collect())
        })
    }

    fn set_metadata(
        &self,
        mailbox: &str,
        folder: Option<&str>,
        changes: &[(String, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        self.call(mailbox, "set-metadata", |live| {
            finish(
                live.store.data().deadline,
                live.guest.postern_plugin0_1_0_mailbox().call_set_metadata(
                    &mut live.store,
                    mailbox,
                    folder,
                    changes,
                ),
            )?
            .map_err(refused)
        })
    }

    fn import(
        &self,
        mailbox: &str,
        folder: &str,
        numbers: super::ImportedFolder,
        messages: &[super::Imported<'_>],
    ) -> Result<(), StoreError> {
        self.call(mailbox, "import-messages", |live| {
            self.forget_headers(mailbox);
            let mut wit = Vec::with_capacity(messages.len());
            for m in messages {
                let handle = live
                    .store
                    .data_mut()
                    .table
                    .push(Incoming(Arc::from(m.message)))?;
                wit.push(types::Imported {
                    uid: m.uid,
                    flags: check::to_wit_flags(m.flags),
                    keywords: m.keywords.iter().map(str::to_string).collect(),
                    received_at: m.received_at,
                    message: handle,
                });
            }
            let numbers = types::ImportedFolder {
                uid_validity: numbers.uid_validity,
                uid_next: numbers.uid_next,
                highest_modseq: numbers.highest_modseq,
            };
            finish(
                live.store.data().deadline,
                live.guest
                    .postern_plugin0_1_0_mailbox()
                    .call_import_messages(&mut live.store, mailbox, folder, numbers, &wit),
            )?
            .map_err(refused)
        })
    }

    fn usage(&self, mailbox: &str) -> Result<Usage, StoreError> {
        self.call(mailbox, "usage", |live| {
            let usage = finish(
                live.store.data().deadline,
                live.guest
                    .postern_plugin0_1_0_mailbox()
                    .call_usage(&mut live.store, mailbox),
            )?
            .map_err(refused)?;
            Ok(Usage {
                bytes: usage.bytes,
                messages: usage.messages,
            })
        })
    }
}
