//! Logging: tracing to stderr, filtered by RUST_LOG or the configured level; human-readable
//! lines (coloured on a terminal) or JSON lines for log collectors (`--log-format json`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub mod metrics;
pub mod sessions;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-12-02T05:23:52Z  INFO smtp{session=1 …}: queued queue_id=… size=…`.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`), `spans`.
    Json,
}

pub fn init(default_filter: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

/// One line per message event that greps like Postfix's `mail.log`: the queue id first, then
/// `key=value` fields in Postfix's order, so `grep QUEUEID` follows a message from acceptance
/// to each recipient's outcome, and tools written for Postfix logs (pflogsumm-style counting of
/// `status=sent`) find what they expect. Logged under the target `postern::outcome`.
pub mod outcome {
    use tracing::info;

    /// What came of one recipient.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Status {
        Sent,
        Deferred,
        Bounced,
    }

    impl Status {
        fn as_str(self) -> &'static str {
            match self {
                Status::Sent => "sent",
                Status::Deferred => "deferred",
                Status::Bounced => "bounced",
            }
        }
    }

    /// A message accepted into the queue (Postfix's qmgr `from=` line).
    pub fn accepted(queue_id: &str, sender: &str, size: usize, recipients: usize) {
        let m = super::metrics::get();
        m.messages_accepted.inc();
        m.received_bytes.inc_by(size as u64);
        info!(target: "postern::outcome", "{queue_id}: from=<{sender}>, size={size}, nrcpt={recipients} (queue active)");
    }

    /// An operator's action on a queued message, in Postfix's words (`removed`, `placed on
    /// hold`, `released from hold`, ...).
    pub fn administered(queue_id: &str, what: &str) {
        info!(target: "postern::outcome", "{queue_id}: {what} (by the mail administrator)");
    }

    /// One recipient's outcome (Postfix's delivery agent line). `relay` is `local` or the
    /// remote host; `received_at` (Unix seconds) gives the delay; `dsn` the RFC 3463 status.
    pub fn delivery(
        queue_id: &str,
        to: &str,
        relay: &str,
        received_at: i64,
        dsn: &str,
        status: Status,
        detail: &str,
    ) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let delay = (now - received_at).max(0);
        let status = status.as_str();
        super::metrics::get()
            .deliveries
            .get_or_create(&super::metrics::Delivery {
                route: if relay == "local" { "local" } else { "remote" },
                status,
            })
            .inc();
        info!(target: "postern::outcome", "{queue_id}: to=<{to}>, relay={relay}, delay={delay}, dsn={dsn}, status={status} ({detail})");
    }
}
