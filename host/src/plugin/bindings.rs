//! The one `bindgen!` for the plugin contract (`wit/plugin.wit`).
//!
//! Host imports are synchronous (they are quick and never block); hook exports are async so that
//! a plugin can be interrupted at epoch ticks without holding a runtime thread.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "postern:plugin/plugin",
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

pub use self::exports::postern::plugin as hooks;
pub use self::postern::plugin::types;
