//! Prometheus metrics (`[metrics] address`, off unless configured): one process-wide registry
//! the code counts into where each event happens, served in the OpenMetrics text format at
//! `/metrics` on a listener of its own (`serve`). Label values come from closed sets (protocols,
//! commands, reply codes, plugin and hook names) so no client can grow the series without bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::relay::control::Control;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Protocol {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SmtpReply {
    pub command: &'static str,
    pub code: u16,
    /// The enhanced status's class and subject (RFC 3463 §3: `5.7` security or policy, `4.2`
    /// mailbox, `5.1` addressing, …), the reason a client was refused; `none` without one.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Login {
    pub protocol: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Delivery {
    /// `local` or `remote`.
    pub route: &'static str,
    /// `sent`, `deferred` or `bounced`.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginHook {
    pub plugin: String,
    pub hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOp {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreCall {
    pub op: &'static str,
}

type Timings<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 50 µs to about 13 s.
    Histogram::new(exponential_buckets(0.000_05, 4.0, 10))
}

/// Every metric the server keeps.
pub struct Metrics {
    registry: Registry,
    pub connections: Family<Protocol, Counter>,
    pub sessions: Family<Protocol, Gauge>,
    pub smtp_replies: Family<SmtpReply, Counter>,
    pub messages_accepted: Counter,
    pub received_bytes: Counter,
    pub deliveries: Family<Delivery, Counter>,
    pub tls_handshakes: Family<Outcome, Counter>,
    pub logins: Family<Login, Counter>,
    pub plugin_calls: Family<PluginHook, Counter>,
    pub plugin_errors: Family<PluginHook, Counter>,
    pub plugin_seconds: Timings<PluginHook>,
    pub reloads: Family<Outcome, Counter>,
    pub store_operations: Family<StoreOp, Counter>,
    pub store_seconds: Timings<StoreCall>,
    /// Finer latency counts than the exported histogram, for `postern plugin list`'s p50/p99.
    plugin_stats: Mutex<HashMap<(String, &'static str), CallStats>>,
    queue_messages: Gauge,
    queue_oldest_seconds: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("postern");
        let m = Metrics {
            connections: Family::default(),
            sessions: Family::default(),
            smtp_replies: Family::default(),
            messages_accepted: Counter::default(),
            received_bytes: Counter::default(),
            deliveries: Family::default(),
            tls_handshakes: Family::default(),
            logins: Family::default(),
            plugin_calls: Family::default(),
            plugin_errors: Family::default(),
            plugin_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
            reloads: Family::default(),
            store_operations: Family::default(),
            store_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
            plugin_stats: Mutex::default(),
            queue_messages: Gauge::default(),
            queue_oldest_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Connections accepted, by protocol",
            m.connections.clone(),
        );
        r.register(
            "sessions",
            "Sessions open now, by protocol",
            m.sessions.clone(),
        );
        r.register(
            "smtp_replies",
            "SMTP replies sent, by command, reply code (2xx accepted, 4xx deferred, 5xx refused) and reason (RFC 3463 class.subject)",
            m.smtp_replies.clone(),
        );
        r.register(
            "messages_accepted",
            "Messages accepted into the queue",
            m.messages_accepted.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes of messages accepted into the queue",
            m.received_bytes.clone(),
        );
        r.register(
            "deliveries",
            "Recipient outcomes, by route and status",
            m.deliveries.clone(),
        );
        r.register(
            "tls_handshakes",
            "Server TLS handshakes, by result",
            m.tls_handshakes.clone(),
        );
        r.register(
            "logins",
            "Login attempts, by protocol and result",
            m.logins.clone(),
        );
        r.register(
            "plugin_calls",
            "Plugin hook calls, by plugin and hook",
            m.plugin_calls.clone(),
        );
        r.register(
            "plugin_errors",
            "Plugin hook calls that failed (trap, fuel, memory, timeout), by plugin and hook",
            m.plugin_errors.clone(),
        );
        r.register(
            "plugin_call_seconds",
            "Time per plugin hook call, by plugin and hook",
            m.plugin_seconds.clone(),
        );
        r.register(
            "reloads",
            "Plugin and configuration reloads, by result",
            m.reloads.clone(),
        );
        r.register(
            "store_operations",
            "Mailbox store calls, by operation and result (every backend)",
            m.store_operations.clone(),
        );
        r.register(
            "store_operation_seconds",
            "Time per mailbox store call, by operation",
            m.store_seconds.clone(),
        );
        r.register(
            "queue_messages",
            "Messages waiting in this node's delivery queue",
            m.queue_messages.clone(),
        );
        r.register(
            "queue_oldest_seconds",
            "Age of the oldest message in this node's delivery queue",
            m.queue_oldest_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an SMTP reply.
    pub fn smtp_reply(&self, command: &'static str, code: u16, status: &str) {
        let reason = reason_of(status);
        self.smtp_replies
            .get_or_create(&SmtpReply {
                command,
                code,
                reason,
            })
            .inc();
    }

    /// Counts and times a mailbox store call.
    pub fn store_op(&self, op: &'static str, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.store_operations
            .get_or_create(&StoreOp { op, result })
            .inc();
        self.store_seconds
            .get_or_create(&StoreCall { op })
            .observe(took.as_secs_f64());
    }

    /// Counts a plugin hook call.
    pub fn plugin_call(&self, plugin: &str, hook: &'static str, took: Duration, failed: bool) {
        let labels = PluginHook {
            plugin: plugin.to_string(),
            hook,
        };
        self.plugin_calls.get_or_create(&labels).inc();
        if failed {
            self.plugin_errors.get_or_create(&labels).inc();
        }
        self.plugin_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        let mut stats = self.plugin_stats.lock().unwrap_or_else(|e| e.into_inner());
        stats
            .entry((labels.plugin, hook))
            .or_default()
            .add(took, failed);
    }

    /// A plugin's calls since start, per hook: count, errors, p50 and p99.
    pub fn plugin_summary(&self, plugin: &str) -> Vec<HookSummary> {
        let stats = self.plugin_stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<HookSummary> = stats
            .iter()
            .filter(|((name, _), _)| name == plugin)
            .map(|((_, hook), s)| HookSummary {
                hook: hook.to_string(),
                calls: s.calls,
                errors: s.errors,
                p50_us: s.quantile(0.50),
                p99_us: s.quantile(0.99),
            })
            .collect();
        out.sort_by(|a, b| a.hook.cmp(&b.hook));
        out
    }

    /// The text Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}

/// `5.7.1` → `5.7`: class and subject only, from the closed set RFC 3463 defines, so a plugin
/// inventing detail codes cannot grow the series.
fn reason_of(status: &str) -> &'static str {
    const SUBJECTS: [[&str; 8]; 3] = [
        ["2.0", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7"],
        ["4.0", "4.1", "4.2", "4.3", "4.4", "4.5", "4.6", "4.7"],
        ["5.0", "5.1", "5.2", "5.3", "5.4", "5.5", "5.6", "5.7"],
    ];
    let bytes = status.as_bytes();
    if status.is_empty() {
        return "none";
    }
    let class = match bytes.first() {
        Some(b'2') => 0,
        Some(b'4') => 1,
        Some(b'5') => 2,
        _ => return "other",
    };
    match (bytes.get(1), bytes.get(2), bytes.get(3)) {
        (Some(b'.'), Some(d @ b'0'..=b'7'), Some(b'.')) => SUBJECTS[class][usize::from(d - b'0')],
        _ => "other",
    }
}

/// One hook of one plugin in `postern plugin list`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HookSummary {
    pub hook: String,
    pub calls: u64,
    pub errors: u64,
    /// Microseconds: the upper edge of the bucket the quantile falls in (at most 19% above it).
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Call times in buckets four to a doubling, from 1 µs to over an hour: enough for quantiles
/// within 19%, in constant memory per plugin and hook.
struct CallStats {
    calls: u64,
    errors: u64,
    buckets: [u64; CallStats::BUCKETS],
}

impl Default for CallStats {
    fn default() -> CallStats {
        CallStats {
            calls: 0,
            errors: 0,
            buckets: [0; CallStats::BUCKETS],
        }
    }
}

impl CallStats {
    const BUCKETS: usize = 128;

    fn bucket(took: Duration) -> usize {
        let us = took.as_micros().max(1) as f64;
        ((us.log2() * 4.0).floor() as usize).min(Self::BUCKETS - 1)
    }

    fn upper_edge(bucket: usize) -> u64 {
        2f64.powf((bucket + 1) as f64 / 4.0).ceil() as u64
    }

    fn add(&mut self, took: Duration, failed: bool) {
        self.calls += 1;
        self.errors += u64::from(failed);
        self.buckets[Self::bucket(took)] += 1;
    }

    /// The smallest bucket edge at or below which `q` of the calls fall (0 with no calls).
    fn quantile(&self, q: f64) -> u64 {
        let wanted = (q * self.calls as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= wanted {
                return Self::upper_edge(bucket);
            }
        }
        0
    }
}

/// Binds the metrics listener.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves `GET /metrics` until shutdown; the queue gauges are read from the relay at each
/// scrape.
pub async fn serve(
    listener: TcpListener,
    relay: mpsc::Sender<Control>,
    shutdown: watch::Receiver<bool>,
) {
    use hyper::{Method, StatusCode};
    let relay = Arc::new(relay);
    let handler = move |_peer, request: hyper::Request<hyper::body::Incoming>| {
        let relay = relay.clone();
        async move {
            let text = "text/plain; charset=utf-8";
            if request.method() != Method::GET {
                crate::http::answer(StatusCode::METHOD_NOT_ALLOWED, text, b"GET only\n".to_vec())
            } else if request.uri().path() != "/metrics" {
                crate::http::answer(StatusCode::NOT_FOUND, text, b"see /metrics\n".to_vec())
            } else {
                refresh_queue(&relay).await;
                crate::http::answer(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    get().encode().into_bytes(),
                )
            }
        }
    };
    let limits = crate::http::Limits {
        connections: 8,
        head: Duration::from_secs(10),
        // A scrape is one request; a client that lingers is cut off.
        connection: Duration::from_secs(30),
    };
    crate::http::serve(listener, None, limits, handler, shutdown).await
}

async fn refresh_queue(relay: &mpsc::Sender<Control>) {
    let (reply, answer) = oneshot::channel();
    if relay.send(Control::Stats { reply }).await.is_err() {
        return;
    }
    if let Ok(Ok(stats)) = tokio::time::timeout(Duration::from_secs(5), answer).await {
        let m = get();
        m.queue_messages.set(stats.messages as i64);
        let now = chrono::Utc::now().timestamp();
        m.queue_oldest_seconds
            .set(stats.oldest.map_or(0, |oldest| (now - oldest).max(0)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_a_closed_set() {
        assert_eq!(reason_of("5.7.1"), "5.7");
        assert_eq!(reason_of("4.2.2"), "4.2");
        assert_eq!(reason_of(""), "none");
        assert_eq!(reason_of("5.9.1"), "other");
        assert_eq!(reason_of("3.1.1"), "other");
        assert_eq!(reason_of("5.70.1"), "other");
    }

    #[test]
    fn quantiles_land_within_a_bucket_of_the_truth() {
        let mut stats = CallStats::default();
        for us in 1..=1000u64 {
            stats.add(Duration::from_micros(us), us % 100 == 0);
        }
        assert_eq!((stats.calls, stats.errors), (1000, 10));
        let p50 = stats.quantile(0.5);
        let p99 = stats.quantile(0.99);
        assert!((500..=500 * 119 / 100).contains(&p50), "{p50}");
        assert!((990..=990 * 119 / 100).contains(&p99), "{p99}");
        assert_eq!(CallStats::default().quantile(0.5), 0);
        // An hour-long call lands in the last bucket instead of overflowing.
        stats.add(Duration::from_secs(1 << 40), false);
    }
}
