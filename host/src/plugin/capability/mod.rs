//! The capabilities a plugin may import, a file each, and the one check that a component
//! imports only what it was granted.
//!
//! Each file implements the host side of one WIT interface (both versions where there are two).
//! A new capability needs its interface in the WIT, a `config::Capability`, a line in
//! [`INTERFACES`] and a file here.

use wasmtime::component::types::ComponentItem;
use wasmtime::component::Component;
use wasmtime::Engine;

use crate::config::Capability;

mod clock;
mod config;
mod directory;
mod dns;
mod kv;
mod log;

/// Each `postern:plugin` interface a component may import (any version), and the grant it needs;
/// None for the shared types, which every plugin has.
pub const INTERFACES: &[(&str, Option<Capability>)] = &[
    ("postern:plugin/types", None),
    ("postern:plugin/mailbox-types", None),
    ("postern:plugin/log", Some(Capability::Log)),
    ("postern:plugin/config", Some(Capability::Config)),
    ("postern:plugin/kv", Some(Capability::Kv)),
    ("postern:plugin/clock", Some(Capability::Clock)),
    ("postern:plugin/directory", Some(Capability::Directory)),
    ("postern:plugin/dns", Some(Capability::Dns)),
];

/// Refuses a component that imports a host capability it was not granted, or anything that is
/// neither ours nor WASI.
pub(crate) fn check_imports(
    engine: &Engine,
    component: &Component,
    granted: &[Capability],
) -> Result<(), String> {
    for (name, item) in component.component_type().imports(engine) {
        let interface = name.split('@').next().unwrap_or(name);
        let needed = match INTERFACES.iter().find(|(known, _)| *known == interface) {
            Some((_, needed)) => *needed,
            None if interface.starts_with("wasi:")
                && matches!(item.ty, ComponentItem::ComponentInstance(_)) =>
            {
                None
            }
            None => {
                return Err(format!(
                    "imports {interface:?}, which this host does not provide"
                ))
            }
        };
        if let Some(capability) = needed {
            if !granted.contains(&capability) {
                return Err(format!(
                    "imports {name} but the configuration does not grant {capability:?} (capabilities = [...])"
                ));
            }
        }
    }
    Ok(())
}
