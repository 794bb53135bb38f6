//! The one `bindgen!` for mailbox backends (`wit/deps/postern-plugin-0.1.0/mailbox.wit`, world `mailbox-backend`).
//!
//! The capabilities a backend may import (`log`, `config`, `kv`, `clock`) are the hooks' own
//! interfaces, implemented once in `plugin::host`; only `mailbox-types` (the `incoming`
//! resource) is new here. Exports are async because the engine is; the store drives them to
//! the end on the blocking thread that called it (`super::finish`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "postern:plugin/mailbox-backend@0.1.0",
    imports: { default: trappable },
    exports: { default: async },
    with: {
        "postern:plugin/log": crate::plugin::bindings::v1::log,
        "postern:plugin/config": crate::plugin::bindings::v1::config,
        "postern:plugin/kv": crate::plugin::bindings::v1::kv,
        "postern:plugin/clock": crate::plugin::bindings::v1::clock,
        "postern:plugin/mailbox-types.incoming": crate::store::wasm::Incoming,
    },
});

pub use self::postern::plugin0_1_0::mailbox_types as types;
