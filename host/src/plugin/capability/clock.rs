//! Capability `clock`: the wall clock (without it, WASI's wall clock is frozen, see `host`).

use crate::plugin::bindings::v1::clock;
use crate::plugin::host::PluginState;

impl clock::Host for PluginState {
    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(chrono::Utc::now().timestamp_millis().max(0) as u64)
    }
}
