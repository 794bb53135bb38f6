//! Capability `kv`: the plugin's namespace of the durable store (`plugin::kv`), in both
//! versions: 0.1.0 traps on a failure, 0.2.0 answers it.

use crate::plugin::bindings::{v1::kv, v2};
use crate::plugin::host::PluginState;
use crate::plugin::kv::Namespace;

impl PluginState {
    fn kv(&self) -> wasmtime::Result<&Namespace> {
        // Unreachable for a plugin that was not granted kv (refused at load), kept as a guard.
        self.meta
            .kv
            .as_deref()
            .ok_or_else(|| wasmtime::format_err!("capability kv not granted"))
    }
}

/// 0.1.0's `kv`: a failure traps (the call ends with the plugin's on-error policy).
impl kv::Host for PluginState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.kv()?
            .get(&key)
            .map_err(|e| wasmtime::format_err!("{e}"))
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl_secs: Option<u64>) -> wasmtime::Result<()> {
        self.kv()?
            .set(&key, value, ttl_secs)
            .map_err(|e| wasmtime::format_err!("{e}"))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<bool> {
        self.kv()?
            .delete(&key)
            .map_err(|e| wasmtime::format_err!("{e}"))
    }

    fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_secs: Option<u64>,
    ) -> wasmtime::Result<i64> {
        self.kv()?
            .increment(&key, delta, ttl_secs)
            .map_err(|e| wasmtime::format_err!("{e}"))
    }
}

/// 0.2.0's `kv`: the same store, failures as values the plugin handles.
impl v2::kv::Host for PluginState {
    fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, v2::kv::KvError>> {
        Ok(self.kv()?.get(&key).map_err(kv_error))
    }

    fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_secs: Option<u64>,
    ) -> wasmtime::Result<Result<(), v2::kv::KvError>> {
        Ok(self.kv()?.set(&key, value, ttl_secs).map_err(kv_error))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<Result<bool, v2::kv::KvError>> {
        Ok(self.kv()?.delete(&key).map_err(kv_error))
    }

    fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_secs: Option<u64>,
    ) -> wasmtime::Result<Result<i64, v2::kv::KvError>> {
        Ok(self
            .kv()?
            .increment(&key, delta, ttl_secs)
            .map_err(kv_error))
    }
}

fn kv_error(err: crate::plugin::kv::KvError) -> v2::kv::KvError {
    use crate::plugin::kv::KvError;
    match err {
        KvError::KeyTooLong => v2::kv::KvError::KeyTooLong,
        KvError::ValueTooLong => v2::kv::KvError::ValueTooLong,
        KvError::Full => v2::kv::KvError::Full,
        KvError::Quota(_) => v2::kv::KvError::QuotaExceeded,
        KvError::Io(_) | KvError::Unavailable(_) => v2::kv::KvError::Unavailable(err.to_string()),
    }
}
