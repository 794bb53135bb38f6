//! Capability `directory`: the server's users and aliases, one address at a time.

use crate::plugin::bindings::v1::directory;
use crate::plugin::host::PluginState;

impl directory::Host for PluginState {
    fn resolve(&mut self, address: String) -> wasmtime::Result<Option<String>> {
        Ok(crate::address::Address::parse(&address).and_then(|a| self.meta.directory.resolve(&a)))
    }
}
