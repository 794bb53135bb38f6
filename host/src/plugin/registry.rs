//! Loaded plugins and their hot reload.
//!
//! A [`PluginSet`] is an immutable snapshot: the plugins in configuration order, each compiled,
//! linked and pre-instantiated, with the hooks it exports. Sessions hold an `Arc` of the snapshot
//! they started with; a reload builds a new snapshot off the hot path and swaps it in atomically,
//! so a transaction in flight finishes on the version it started with. A plugin that fails to
//! load keeps its previous version in the new snapshot, and the reason is logged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use wasmtime::component::{InstancePre, Linker};
use wasmtime::Engine;

use super::bindings::Plugin;
pub use super::hooks::{HookIndices, Stage};
use super::host::{PluginMeta, PluginState};
use super::kv::Namespace;
use super::{capability, engine, PluginError};
use crate::auth::UserDirectory;
use crate::config::{Capability, OnError, PluginConfig, PluginsConfig};

/// One plugin, ready to instantiate.
pub struct LoadedPlugin {
    pub meta: Arc<PluginMeta>,
    pub pre: InstancePre<PluginState>,
    pub hooks: HookIndices,
    pub timeout: Duration,
    /// The `queued` hook's deadline (after the queue, no session waits).
    pub queued_timeout: Duration,
    pub on_error: OnError,
    /// SHA-256 of the wasm file (reload skips unchanged plugins).
    pub digest: String,
    /// The configuration it was loaded with (reload also reacts to config changes).
    config: PluginConfig,
}

/// A loaded plugin as `postern plugin list` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PluginSummary {
    pub name: String,
    pub path: PathBuf,
    pub digest: String,
    pub hooks: Vec<String>,
    pub capabilities: Vec<String>,
    pub on_error: String,
    pub timeout_ms: u64,
    pub memory_bytes: usize,
    /// Since the server started, per hook called so far.
    pub calls: Vec<crate::telemetry::metrics::HookSummary>,
}

impl LoadedPlugin {
    pub fn summary(&self) -> PluginSummary {
        PluginSummary {
            name: self.meta.name.clone(),
            path: self.config.path.clone(),
            digest: self.digest.clone(),
            hooks: self.hooks.names().into_iter().map(String::from).collect(),
            capabilities: self
                .config
                .capabilities
                .iter()
                .map(|c| format!("{c:?}").to_lowercase())
                .collect(),
            on_error: format!("{:?}", self.on_error).to_lowercase(),
            timeout_ms: self.timeout.as_millis() as u64,
            memory_bytes: self.meta.memory_bytes,
            calls: crate::telemetry::metrics::get().plugin_summary(&self.meta.name),
        }
    }
}

/// An immutable snapshot of the loaded plugins, in chain order.
pub struct PluginSet {
    pub plugins: Vec<Arc<LoadedPlugin>>,
    pub generation: u64,
}

impl PluginSet {
    pub fn has(&self, stage: Stage) -> bool {
        self.plugins.iter().any(|p| p.hooks.has(stage))
    }
}

pub struct PluginRuntime {
    pub engine: Engine,
    linker: Linker<PluginState>,
    settings: PluginsConfig,
    cache_dir: PathBuf,
    kv_dir: PathBuf,
    directory: Arc<UserDirectory>,
    dns: Option<Arc<crate::dns::Dns>>,
    current: RwLock<Arc<PluginSet>>,
    generation: AtomicU64,
    /// KV namespaces stay open across reloads (one writer per file).
    namespaces: Mutex<HashMap<String, Arc<Namespace>>>,
    /// The database the namespaces live in instead, when `[database] kv = true`.
    shared_kv: std::sync::OnceLock<Arc<crate::store::postgres::PgStore>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

/// What a reload did, per plugin.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    pub loaded: Vec<String>,
    pub unchanged: Vec<String>,
    pub failed: Vec<(String, String)>,
}

impl PluginRuntime {
    /// Keeps the plugins' kv namespaces in the database from now on (before the first load).
    pub fn share_kv(&self, db: Arc<crate::store::postgres::PgStore>) {
        let _ = self.shared_kv.set(db);
    }

    pub fn new(
        settings: &PluginsConfig,
        data_dir: &std::path::Path,
        directory: Arc<UserDirectory>,
        dns: Option<Arc<crate::dns::Dns>>,
    ) -> Result<PluginRuntime, PluginError> {
        let engine = engine::build(settings)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        Plugin::add_to_linker::<PluginState, wasmtime::component::HasSelf<PluginState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| PluginError::Engine(e.to_string()))?;
        Ok(PluginRuntime {
            engine,
            linker,
            settings: settings.clone(),
            cache_dir: settings
                .cache_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("plugin-cache")),
            kv_dir: data_dir.join("plugin-kv"),
            directory,
            dns,
            current: RwLock::new(Arc::new(PluginSet {
                plugins: Vec::new(),
                generation: 0,
            })),
            generation: AtomicU64::new(0),
            namespaces: Mutex::new(HashMap::new()),
            shared_kv: std::sync::OnceLock::new(),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    pub fn settings(&self) -> &PluginsConfig {
        &self.settings
    }

    /// The snapshot new sessions and transactions use.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.read().expect("plugin set lock").clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Loads the configured plugins and swaps them in. Plugins whose file and configuration did
    /// not change are kept as they are; a plugin that fails to load keeps its previous version
    /// (or is left out if it has none) and the failure is reported.
    pub async fn load(self: &Arc<Self>, configs: &[PluginConfig]) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().await;
        let previous = self.current();
        let mut report = ReloadReport::default();
        let mut plugins = Vec::new();
        for config in configs {
            let old = previous
                .plugins
                .iter()
                .find(|p| p.meta.name == config.name)
                .cloned();
            let runtime = self.clone();
            let owned = config.clone();
            let old_digest = old.as_ref().map(|p| (p.digest.clone(), p.config.clone()));
            // Compiling takes from milliseconds (Rust) to seconds (Python): never on a runtime thread.
            let result = tokio::task::spawn_blocking(move || runtime.load_one(&owned, old_digest))
                .await
                .unwrap_or_else(|e| {
                    Err(PluginError::Load {
                        name: config.name.clone(),
                        reason: e.to_string(),
                    })
                });
            match (result, old) {
                (Ok(Some(loaded)), _) => {
                    tracing::info!(plugin = %config.name, hooks = ?loaded.hooks.names(), "plugin loaded");
                    report.loaded.push(config.name.clone());
                    plugins.push(Arc::new(loaded));
                }
                (Ok(None), Some(old)) => {
                    report.unchanged.push(config.name.clone());
                    plugins.push(old);
                }
                (Ok(None), None) => {}
                (Err(err), old) => {
                    tracing::error!(plugin = %config.name, "plugin not loaded: {err}");
                    report.failed.push((config.name.clone(), err.to_string()));
                    if let Some(old) = old {
                        tracing::warn!(plugin = %config.name, "keeping the previous version");
                        plugins.push(old);
                    }
                }
            }
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        *self.current.write().expect("plugin set lock") = Arc::new(PluginSet {
            plugins,
            generation,
        });
        report
    }

    /// Loads one plugin; Ok(None) when it is unchanged from `old` (same wasm digest and config).
    fn load_one(
        &self,
        config: &PluginConfig,
        old: Option<(String, PluginConfig)>,
    ) -> Result<Option<LoadedPlugin>, PluginError> {
        let fail = |reason: String| PluginError::Load {
            name: config.name.clone(),
            reason,
        };
        let (component, digest) =
            engine::load_component(&self.engine, &config.path, &self.cache_dir).map_err(fail)?;
        if let Some((old_digest, old_config)) = old {
            if old_digest == digest && same_config(&old_config, config) {
                return Ok(None);
            }
        }
        capability::check_imports(&self.engine, &component, &config.capabilities).map_err(fail)?;
        if let Some(dir) = config.directory.as_ref().filter(|d| !d.is_dir()) {
            return Err(fail(format!(
                "granted directory {} does not exist",
                dir.display()
            )));
        }
        if config.capabilities.contains(&Capability::Dns) && self.dns.is_none() {
            return Err(fail(
                "granted dns, but the server has no working resolver (see [dns])".into(),
            ));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| fail(format!("cannot link: {e:#}")))?;
        let hooks = HookIndices::discover(&pre);
        if hooks.names().is_empty() {
            return Err(fail("exports no postern:plugin hook".into()));
        }
        let kv = if config.capabilities.contains(&Capability::Kv) {
            let mut namespaces = self.namespaces.lock().expect("namespaces lock");
            let ns = match namespaces.get(&config.name) {
                Some(ns) => ns.clone(),
                None => {
                    let ns = Arc::new(match self.shared_kv.get() {
                        Some(db) => Namespace::shared(db.clone(), &config.name),
                        None => Namespace::open(&self.kv_dir, &config.name)
                            .map_err(|e| fail(format!("kv store: {e}")))?,
                    });
                    namespaces.insert(config.name.clone(), ns.clone());
                    ns
                }
            };
            // A reload may change the quota; the namespace (and what it holds) stays.
            ns.set_quota((config.kv_quota_mb as usize).saturating_mul(1 << 20));
            Some(ns)
        } else {
            None
        };
        let memory_mb = config.memory_mb.unwrap_or(self.settings.default_memory_mb);
        Ok(Some(LoadedPlugin {
            meta: Arc::new(PluginMeta {
                name: config.name.clone(),
                config: config.config.clone(),
                kv,
                directory: self.directory.clone(),
                dns: config
                    .capabilities
                    .contains(&Capability::Dns)
                    .then(|| self.dns.clone())
                    .flatten(),
                directory_grant: config.directory.clone(),
                memory_bytes: (memory_mb as usize) << 20,
                wall_clock: config.capabilities.contains(&Capability::Clock),
                blocking_io: false,
            }),
            pre,
            hooks,
            timeout: Duration::from_millis(
                config
                    .timeout_ms
                    .unwrap_or(self.settings.default_timeout_ms),
            ),
            queued_timeout: Duration::from_secs(
                config
                    .queued_timeout_secs
                    .unwrap_or(self.settings.queued_timeout_secs),
            ),
            on_error: config.on_error,
            digest,
            config: config.clone(),
        }))
    }
}

fn same_config(a: &PluginConfig, b: &PluginConfig) -> bool {
    a.path == b.path
        && a.on_error == b.on_error
        && a.timeout_ms == b.timeout_ms
        && a.queued_timeout_secs == b.queued_timeout_secs
        && a.memory_mb == b.memory_mb
        && a.capabilities == b.capabilities
        && a.directory == b.directory
        && a.config == b.config
}
