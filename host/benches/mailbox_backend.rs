//! The cost of the Wasm boundary for mailbox storage: the same contract calls on the embedded
//! Maildir and on the shipped mailbox-log backend through the host adaptor (`store::wasm`),
//! medians. `recent-boundary` on a warm instance is the boundary alone (a small file read
//! inside); `snapshot` of 100 messages and `read` of one add the data crossing it.
//!
//! `cargo bench -p postern --bench mailbox_backend` (build the plugins first: scripts/test does).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern::config::{Config, MailboxBackendConfig, PluginsConfig};
use postern::store::maildir::Maildir;
use postern::store::wasm::WasmStore;
use postern::store::{Flags, Keywords, MailStore};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn fmt(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn time(calls: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..calls / 10 {
        f();
    }
    median(
        (0..calls)
            .map(|_| {
                let at = Instant::now();
                f();
                at.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let data = tempfile::tempdir().expect("temp dir");
    let settings = PluginsConfig {
        cache_dir: Some(repo().join("target/plugin-cache-bench")),
        ..PluginsConfig::default()
    };
    let config = Config::parse(
        "[server]\nhostname = \"mx.test\"\ndata_dir = \"/x\"\n[relay]\nlocal_domains = [\"example.test\"]\n",
        "bench",
    )
    .expect("config");
    let engine = postern::plugin::engine::build(&settings).expect("engine");
    let wasm = repo().join("plugins/target/wasm32-wasip2/release/mailbox_log.wasm");
    let backend = MailboxBackendConfig {
        name: "mailbox-log".into(),
        path: wasm,
        domains: vec!["example.test".into()],
        directory: Some(data.path().join("backend")),
        timeout_ms: 5000,
        memory_mb: None,
        instances: 1,
        capabilities: Vec::new(),
        config: Default::default(),
    };
    let users = Arc::new(postern::auth::UserDirectory::from_config(&config));
    let stores: Vec<(&str, Arc<dyn MailStore>)> = vec![
        (
            "maildir",
            Arc::new(Maildir::new(data.path().join("maildir"), "mx.test")),
        ),
        (
            "mailbox-log (Wasm)",
            Arc::new(
                WasmStore::new(&backend, &settings, engine, data.path(), users)
                    .expect("backend loads"),
            ),
        ),
    ];
    let user = "bench@example.test";
    let body =
        b"From: a@example.test\r\nSubject: bench\r\n\r\nA line of text for the benchmark.\r\n";
    println!(
        "{:<20} {:>16} {:>18} {:>14}",
        "store", "recent-boundary", "snapshot (100)", "read (80 B)"
    );
    for (label, store) in stores {
        for _ in 0..100 {
            store
                .append(user, "INBOX", body, Flags::empty(), &Keywords::new(), 0)
                .expect("append");
        }
        let listed = store.snapshot(user, "INBOX").expect("snapshot");
        let validity = listed.uid_validity;
        let first = listed.messages[0].clone();
        let boundary = time(20_000, || {
            store
                .recent_boundary(user, "INBOX", validity, None)
                .expect("recent");
        });
        let snapshot = time(2_000, || {
            store.snapshot(user, "INBOX").expect("snapshot");
        });
        let read = time(20_000, || {
            store.read(user, "INBOX", &first).expect("read");
        });
        println!(
            "{label:<20} {:>16} {:>18} {:>14}",
            fmt(boundary),
            fmt(snapshot),
            fmt(read)
        );
    }
}
