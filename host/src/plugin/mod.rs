//! The plugin platform: WebAssembly components attached to hooks at every stage of a mail's life.
//!
//! - [`bindings`]: the host bindings of the WIT contract (`wit/plugin.wit`, 0.2.0, taking in 0.1.0).
//! - [`engine`]: wasmtime with pooling, epoch interruption, and the compiled-component cache.
//! - [`capability`]: the capabilities a plugin may import, a file each, and the grant check.
//! - [`events`]: mailbox events, queued from sessions to the plugins that listen.
//! - [`hooks`]: the hook table (stages, export discovery, per-instance handles).
//! - [`host`]: a plugin store's data and the capabilities it can import.
//! - [`kv`]: the durable key-value store behind the `kv` capability.
//! - [`limits`]: one instance's memories and tables counted together against its cap.
//! - [`registry`]: loading, hook discovery, capability checks and hot reload.
//! - [`chain`]: running a stage through the plugins of a session, with deadlines and policies.

pub mod bindings;
pub mod capability;
pub mod chain;
pub mod engine;
pub mod events;
pub mod hooks;
pub mod host;
pub mod kv;
pub mod limits;
pub mod registry;

pub use chain::{
    session_info, Changes, DataOutcome, Filtering, Hook, LoginProtocol, Lookup, MailboxAction,
    Outbound, OutboundRoute, PluginSession, QueuedOutcome, Routing, SessionInfo, Verdict,
};
pub use registry::{PluginRuntime, Stage};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin engine: {0}")]
    Engine(String),
    #[error("plugin {name} cannot be loaded: {reason}")]
    Load { name: String, reason: String },
    #[error("plugin {name} failed: {reason}")]
    Trap { name: String, reason: String },
    #[error("plugin {name} ran past its deadline")]
    Timeout { name: String },
    #[error("plugin {name} returned an invalid answer: {reason}")]
    InvalidReply { name: String, reason: String },
}

/// The message the epoch callback stops a guest with when its deadline has passed.
pub const DEADLINE_PASSED: &str = "plugin deadline passed";

impl PluginError {
    /// Classifies an error from guest code: the deadline, or any other trap.
    pub fn from_wasm(name: &str, err: &wasmtime::Error) -> PluginError {
        if format!("{err:#}").contains(DEADLINE_PASSED) {
            PluginError::Timeout {
                name: name.to_string(),
            }
        } else {
            PluginError::trap(name, err)
        }
    }

    pub fn trap(name: &str, err: &wasmtime::Error) -> PluginError {
        PluginError::Trap {
            name: name.to_string(),
            reason: format!("{err:#}").chars().take(500).collect(),
        }
    }
}
