//! The one `bindgen!` for the plugin contract: world `plugin` of `wit/plugin.wit` (0.2.0), which
//! takes in 0.1.0 (`wit/deps/postern-plugin-0.1.0/`) by name, so one set of bindings serves
//! plugins of both versions.
//!
//! Host imports are synchronous (they are quick and never block); hook exports are async so that
//! a plugin can be interrupted at epoch ticks without holding a runtime thread.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "postern:plugin/plugin@0.2.0",
    imports: {
        // DNS lookups wait on the network: they must not block a runtime thread.
        "postern:plugin/dns.lookup-a": async | trappable,
        "postern:plugin/dns.lookup-txt": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    with: {
        "postern:plugin/types.message": crate::plugin::host::MessageView,
    },
});

/// The interfaces of 0.1.0: shared types, SMTP-stage hooks, capabilities.
pub use self::postern::plugin0_1_0 as v1;
/// What 0.2.0 adds.
pub use self::postern::plugin0_2_0 as v2;

/// Hook exports of either version, by interface name.
pub mod hooks {
    pub use super::exports::postern::plugin0_1_0::*;
    pub use super::exports::postern::plugin0_2_0::*;
}

pub use v1::types;
