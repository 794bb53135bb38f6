//! Mailbox backends as Wasm components, against the mailbox contract: the conformance suite the
//! embedded Maildir passes (`store::conformance`) runs on the shipped `mailbox-log` backend
//! through the host adaptor, and a backend that breaks the contract is contained.

use std::path::Path;
use std::sync::Arc;

use postern::config::{Config, MailboxBackendConfig, PluginsConfig};
use postern::store::wasm::WasmStore;
use postern::store::MailStore;
use postern_e2e::plugin_wasm;

const CONFIG: &str = r#"
[server]
hostname = "mx.example.test"
data_dir = "/nonexistent"
[relay]
local_domains = ["example.test"]
"#;

fn backend_config(path: &Path, directory: &Path) -> MailboxBackendConfig {
    MailboxBackendConfig {
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
        path: path.to_path_buf(),
        domains: vec!["example.test".into()],
        directory: Some(directory.to_path_buf()),
        timeout_ms: 5000,
        // Python components carry an interpreter.
        memory_mb: Some(128),
        instances: 4,
        capabilities: Vec::new(),
        config: Default::default(),
    }
}

fn open(engine: &postern::plugin::engine::Engine, data: &Path, wasm: &Path) -> Arc<dyn MailStore> {
    let config = Config::parse(CONFIG, "test").unwrap();
    let users = Arc::new(postern::auth::UserDirectory::from_config(&config));
    let store = WasmStore::new(
        &backend_config(wasm, &data.join("backend")),
        &PluginsConfig::default(),
        engine.clone(),
        data,
        users,
    )
    .unwrap_or_else(|e| panic!("backend loads: {e}"));
    Arc::new(store)
}

#[test]
fn the_log_backend_meets_the_mailbox_contract() {
    let wasm = plugin_wasm("mailbox_log");
    let data = tempfile::tempdir().unwrap();
    let engine = postern::plugin::engine::build(&PluginsConfig::default()).unwrap();
    // Each open is a new adaptor with new instances over the same directory: what a restart
    // (or a crash, nothing is closed cleanly) would see.
    postern::store::conformance::run_all(&|| open(&engine, data.path(), &wasm));
    // The mail is where the backend keeps it: its own directory (names percent-encoded), one
    // log pair per folder.
    let inbox = data.path().join("backend/copy@example%2Etest/f.Archive");
    let names: Vec<String> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("messages."))
            && names.iter().any(|n| n.starts_with("index.")),
        "{names:?}"
    );
}

/// The example backend in Python (componentize-py, examples/plugins/python-mailbox) meets the
/// same contract: storage too can be written in any language that compiles to a component.
#[test]
fn the_python_backend_meets_the_mailbox_contract() {
    let wasm = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/plugins/python-mailbox/python_mailbox.wasm");
    assert!(
        wasm.exists(),
        "{} is missing: examples/plugins/build makes it (scripts/test does)",
        wasm.display()
    );
    let data = tempfile::tempdir().unwrap();
    let engine = postern::plugin::engine::build(&PluginsConfig::default()).unwrap();
    postern::store::conformance::run_all(&|| open(&engine, data.path(), &wasm));
}
