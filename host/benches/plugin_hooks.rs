//! Per-hook plugin overhead: the rcpt hook and the data hook (10 KB, 100 KB, 1 MB) on a live
//! session instance, for a Rust, a Python and a JavaScript plugin; plus the cost of a session's
//! first call (instantiation). Prints medians.
//!
//! `cargo bench -p postern --bench plugin_hooks` (build the plugins first: scripts/test does);
//! `HOOKS_ONLY=spam` measures only the plugins whose label contains it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern::auth::UserDirectory;
use postern::config::{Capability, Config, DnsConfig, OnError, PluginConfig, PluginsConfig};
use postern::plugin::bindings::types;
use postern::plugin::{Hook, PluginRuntime, PluginSession, SessionInfo, Stage};

const RCPT: Hook = Hook::Rcpt {
    sender: "s@remote.test",
    recipient: "alice@example.test",
    local: true,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Subject {
    label: &'static str,
    wasm: PathBuf,
    capabilities: Vec<Capability>,
    config: String,
    rcpt_calls: usize,
    data_calls: usize,
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.2} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn message(size: usize) -> Arc<Vec<u8>> {
    let mut m = b"Received: from bench ([127.0.0.1])\r\n\tby localhost (Postern) with ESMTP id B1;\r\n\tSun, 22 Nov 2026 00:00:00 +0000\r\nFrom: bench@remote.test\r\nTo: alice@example.test\r\nSubject: benchmark message\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    Arc::new(m)
}

// One thread: a measured call never hops between runtime workers.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let settings = PluginsConfig {
        cache_dir: Some(repo().join("target/plugin-cache-bench")),
        default_timeout_ms: 5000,
        ..PluginsConfig::default()
    };
    let users = Arc::new(UserDirectory::from_config(&Config::embedded_default()));
    // The spam filter with the classifier trained on tests/corpus (when the trainer was built).
    let trainer = repo().join("plugins/target/release/spam-train");
    let model = std::process::Command::new(&trainer)
        .arg(repo().join("tests/corpus/spam"))
        .arg(repo().join("tests/corpus/ham"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // The spam filter as shipped: its rules, and the trained model or none.
    let spam_filter = |label, model: &str| Subject {
        label,
        wasm: repo().join("plugins/target/wasm32-wasip2/release/spam_filter.wasm"),
        capabilities: vec![
            Capability::Config,
            Capability::Log,
            Capability::Dns,
            Capability::Kv,
        ],
        config: format!(
            "quarantine_at = 5.0\nreject_at = 10.0\nrules = [\"body:wire transfer:1.5\"]\n{model}"
        ),
        rcpt_calls: 0,
        data_calls: 400,
    };
    let subjects = [
        spam_filter("Rust (spam-filter, trained)", &model),
        spam_filter("Rust (spam-filter, rules only)", ""),
        Subject {
            label: "Rust (test-hooks, continue)",
            wasm: repo().join("plugins/target/wasm32-wasip2/release/test_hooks.wasm"),
            capabilities: vec![Capability::Config, Capability::Kv, Capability::Dns],
            config: String::new(),
            rcpt_calls: 20_000,
            data_calls: 2_000,
        },
        Subject {
            label: "Python (python-filter)",
            wasm: repo().join("examples/plugins/python-filter/python_filter.wasm"),
            capabilities: vec![Capability::Config, Capability::Log],
            config: "blocked_recipients = [\"nobody@example.test\"]\nblocked_words = [\"casino\"]"
                .into(),
            rcpt_calls: 2_000,
            data_calls: 200,
        },
        Subject {
            label: "JavaScript (js-filter)",
            wasm: repo().join("examples/plugins/js-filter/js_filter.wasm"),
            capabilities: vec![Capability::Config],
            config: "paused_prefixes = [\"paused\"]".into(),
            rcpt_calls: 2_000,
            data_calls: 200,
        },
    ];
    let info = SessionInfo {
        id: 1,
        listener: "smtp".into(),
        peer_ip: "192.0.2.1".into(),
        peer_port: 4000,
        tls: false,
        helo: Some("bench.test".into()),
        user: None,
    };
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "plugin", "first call", "rcpt", "data 10KB", "data 100KB", "data 1MB"
    );
    let only = std::env::var("HOOKS_ONLY").unwrap_or_default();
    for subject in subjects {
        if !subject.label.contains(&only) {
            continue;
        }
        if !subject.wasm.exists() {
            println!(
                "{:<30} missing {} (build the plugins first)",
                subject.label,
                subject.wasm.display()
            );
            continue;
        }
        // test-hooks imports dns (unused here): a resolver pointed at a dead port satisfies it.
        let dns = postern::dns::Dns::new(&DnsConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout_ms: 100,
            trust_anchor: None,
        })
        .expect("resolver");
        let runtime = Arc::new(
            PluginRuntime::new(
                &settings,
                data_dir.path(),
                users.clone(),
                Some(Arc::new(dns)),
            )
            .expect("runtime"),
        );
        let report = runtime
            .load(&[PluginConfig {
                name: "bench".into(),
                path: subject.wasm.clone(),
                on_error: OnError::Tempfail,
                timeout_ms: None,
                queued_timeout_secs: None,
                memory_mb: Some(128),
                kv_quota_mb: 16,
                capabilities: subject.capabilities.clone(),
                directory: None,
                config: toml::from_str(&subject.config).expect("config"),
            }])
            .await;
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let mut session = PluginSession::new(runtime.clone());
        let start = Instant::now();
        session.decide(&info, RCPT).await;
        let first = start.elapsed();
        let mut times = Vec::with_capacity(subject.rcpt_calls);
        for _ in 0..subject.rcpt_calls {
            let t = Instant::now();
            let verdict = session.decide(&info, RCPT).await;
            times.push(t.elapsed());
            assert_eq!(verdict, postern::plugin::Verdict::Pass);
        }
        let rcpt = if subject.rcpt_calls > 0 {
            fmt(median(times))
        } else {
            "n/a".to_string()
        };
        let mut data = Vec::new();
        for size in [10 * 1024, 100 * 1024, 1024 * 1024] {
            if !runtime.current().has(Stage::Data) {
                data.push("n/a".to_string());
                continue;
            }
            let msg = message(size);
            let envelope = types::Envelope {
                queue_id: "B1".into(),
                sender: "s@remote.test".into(),
                recipients: vec!["alice@example.test".into()],
            };
            let calls = if size >= 1024 * 1024 {
                subject.data_calls / 4
            } else {
                subject.data_calls
            };
            let mut times = Vec::with_capacity(calls);
            let checks = Arc::new(postern::message_auth::Verification::default());
            for _ in 0..calls.max(5) {
                let t = Instant::now();
                let outcome = session.on_data(&info, &envelope, &msg, &checks).await;
                times.push(t.elapsed());
                assert_eq!(outcome.verdict, postern::plugin::Verdict::Pass);
            }
            data.push(fmt(median(times)));
        }
        println!(
            "{:<30} {:>12} {:>12} {:>12} {:>12} {:>12}",
            subject.label,
            fmt(first),
            rcpt,
            data[0],
            data[1],
            data[2]
        );
    }
}
