//! The wasmtime engine: component model, async, epoch interruption and the pooling allocator;
//! plus the on-disk cache of compiled components.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
pub use wasmtime::Engine;
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::PluginError;
use crate::config::PluginsConfig;

/// How often the epoch advances. A running hook yields at every tick, and its deadline is
/// checked then.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

pub fn build(config: &PluginsConfig) -> Result<Engine, PluginError> {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    wasm.epoch_interruption(true);
    let slot = (config.max_memory_mb as usize) << 20;
    let instances = config.max_instances;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(4))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(2))
        // Components made by componentize-py carry dozens of core modules.
        .max_core_instances_per_component(64)
        .max_memories_per_component(64)
        .max_tables_per_component(64)
        .table_elements(50_000)
        .max_memory_size(slot);
    wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // A pooled slot reserves only what the largest plugin may use, not 4 GiB per memory.
    wasm.memory_reservation(slot as u64);
    wasm.memory_guard_size(32 << 20);
    let engine = Engine::new(&wasm).map_err(|e| PluginError::Engine(e.to_string()))?;
    start_epoch_ticker(engine.clone());
    Ok(engine)
}

/// How often a sleeping epoch thread looks whether guest code runs, should a wake-up have
/// been missed (see `start_epoch_ticker`).
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// Calls into guest code in flight, in every engine (see [`GuestRunning`]).
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// The engines' epoch threads, woken when guest code starts to run.
static TICKERS: Mutex<Vec<std::thread::Thread>> = Mutex::new(Vec::new());

/// Held while guest code may run (an instantiation or a call): the epoch advances, and so
/// deadlines pass, only while one is held. Without guest code running the epoch threads sleep:
/// a server with plugins loaded but idle, or none called by the protocol at hand, was woken a
/// thousand times a second for nothing (now ten, see [`IDLE_CHECK`]). Epoch deadlines are relative to the epoch when they
/// are set, so time spent asleep counts toward none.
pub struct GuestRunning(());

impl GuestRunning {
    pub fn start() -> GuestRunning {
        if RUNNING.fetch_add(1, Ordering::SeqCst) == 0 {
            for ticker in TICKERS.lock().expect("epoch tickers").iter() {
                ticker.unpark();
            }
        }
        GuestRunning(())
    }
}

impl Drop for GuestRunning {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

fn start_epoch_ticker(engine: Engine) {
    let thread = std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || loop {
            // A start between the check and the park leaves the thread's token set, so the
            // park returns at once; one that came before this thread was listed in TICKERS
            // is seen at the next timeout, so no deadline waits longer than that for a tick.
            while RUNNING.load(Ordering::SeqCst) == 0 {
                std::thread::park_timeout(IDLE_CHECK);
            }
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
        })
        .expect("epoch thread");
    TICKERS
        .lock()
        .expect("epoch tickers")
        .push(thread.thread().clone());
}

/// Compiles a component, or loads it from the cache keyed by the wasm's SHA-256 and the engine's
/// compatibility hash. Blocking: call from a blocking thread.
pub fn load_component(
    engine: &Engine,
    wasm_path: &Path,
    cache_dir: &Path,
) -> Result<(Component, String), String> {
    let bytes = std::fs::read(wasm_path)
        .map_err(|e| format!("cannot read {}: {e}", wasm_path.display()))?;
    let digest = hex(&Sha256::digest(&bytes));
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let cached: PathBuf = cache_dir.join(format!("{digest}-{:016x}.cwasm", hasher.finish()));
    if cached.exists() {
        // SAFETY: this directory holds only files this function wrote with `serialize` for an
        // engine with the same compatibility hash (it is in the name).
        if let Ok(component) = unsafe { Component::deserialize_file(engine, &cached) } {
            return Ok((component, digest));
        }
    }
    let component = Component::new(engine, &bytes).map_err(|e| format!("{e:#}"))?;
    if let Ok(serialized) = component.serialize() {
        let _ = std::fs::create_dir_all(cache_dir);
        let tmp = cached.with_extension("tmp");
        if std::fs::write(&tmp, serialized).is_ok() {
            let _ = std::fs::rename(&tmp, &cached);
        }
    }
    Ok((component, digest))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
