//! `postern reload` and SIGHUP: everything that can change without dropping a connection is
//! taken from the configuration file again, as Postfix's `postfix reload` and Dovecot's
//! `doveadm reload` do; what cannot is named in the answer so the operator knows a restart is
//! owed. Sessions already open keep the configuration they started with (a session never
//! sees its limits change under it); new ones get the new one.
//!
//! Taken live: `[limits]` (but the three below), `[tls]` certificate and key (new handshakes
//! present the new pair), listeners (added, removed, rebound when changed), `[[user]]`,
//! `[aliases]`, `[relay]`, `[pop3]`, `[imap]`, `[mail_auth]`, `[[dkim]]`, the plugin list, and
//! `shutdown_grace_secs`. Restart needed: the data directory, the log level, the hostname (the
//! relay's EHLO name), `[dns]`, `[outbound]`, `[database]`, `[[mailbox_backend]]`,
//! `[metrics]`, `[admin]`, the plugin engine's `[plugins]` settings, and the memory budget and
//! per-IP login throttle in `[limits]`.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

use super::listeners::{ConnectionLimiter, Listeners, LiveServices, Services};
use crate::auth::UserDirectory;
use crate::config::{Config, PluginConfig, TlsMode};
use crate::plugin::registry::ReloadReport;
use crate::plugin::PluginRuntime;
use crate::tls::LiveCert;

/// What a reload did.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// What changed and is in force now.
    pub applied: Vec<String>,
    /// What changed but is read only at start.
    pub restart_needed: Vec<String>,
    /// What changed but could not be applied (the running version stays).
    pub failed: Vec<String>,
    pub plugins: ReloadReport,
}

/// Everything a reload replaces.
pub(crate) struct Reloader {
    /// The file re-read (None for the embedded default: nothing to re-read).
    pub(super) path: Option<PathBuf>,
    /// The configuration in force; the lock also makes reloads one at a time.
    pub(super) current: tokio::sync::Mutex<Arc<Config>>,
    pub(super) users: Arc<UserDirectory>,
    pub(super) plugins: Arc<PluginRuntime>,
    /// The TLS configuration's swappable certificate, once a listener needed TLS.
    pub(super) tls: std::sync::Mutex<Option<(TlsAcceptor, Arc<LiveCert>)>>,
    pub(super) services: Arc<LiveServices>,
    pub(super) listeners: Arc<Listeners>,
    pub(super) limiter: Arc<ConnectionLimiter>,
    pub(super) dns: Option<Arc<crate::dns::Dns>>,
}

/// Sections compare by their Debug rendering: the configuration types are plain data.
fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

impl Reloader {
    /// The configuration in force now.
    pub async fn config(&self) -> Arc<Config> {
        self.current.lock().await.clone()
    }

    fn read(&self, current: &Config) -> Result<Config, String> {
        match &self.path {
            None => Ok(current.clone()),
            Some(path) => Config::load(path).map_err(|err| {
                let message = format!("configuration not reloaded, the running one stays: {err}");
                error!("{message}");
                message
            }),
        }
    }

    /// Reloads the plugins only (`postern plugin reload`, a changed plugin file).
    pub async fn reload_plugins(&self, why: &str) -> Result<ReloadReport, String> {
        let mut current = self.current.lock().await;
        let list = self.read(&current)?.plugin_list;
        let report = self.load_plugins(&list, why).await;
        Arc::make_mut(&mut current).plugin_list = list;
        Ok(report)
    }

    /// SIGHUP (`systemctl reload postern`) reloads as `postern reload` does.
    pub async fn on_signal(self: Arc<Self>) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let _ = self.reload("SIGHUP").await;
        }
    }

    /// Polls the configuration file and every plugin file; a change reloads the plugins
    /// (`[plugins] watch`). Polling (twice a second) instead of inotify keeps working across
    /// editors' rename-into-place and on any filesystem.
    pub async fn on_plugin_change(self: Arc<Self>) {
        fn stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        }
        let watched = |list: &[PluginConfig]| -> Vec<PathBuf> {
            self.path
                .iter()
                .cloned()
                .chain(list.iter().map(|p| p.path.clone()))
                .collect()
        };
        let mut files = watched(&self.config().await.plugin_list);
        let mut stamps: Vec<_> = files.iter().map(|f| stamp(f)).collect();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let now: Vec<_> = files.iter().map(|f| stamp(f)).collect();
            if now == stamps {
                continue;
            }
            let _ = self.reload_plugins("file changed").await;
            files = watched(&self.config().await.plugin_list);
            stamps = files.iter().map(|f| stamp(f)).collect();
        }
    }

    async fn load_plugins(&self, list: &[PluginConfig], why: &str) -> ReloadReport {
        info!(reason = why, "reloading plugins");
        let report = self.plugins.load(list).await;
        crate::telemetry::metrics::get()
            .reloads
            .get_or_create(&crate::telemetry::metrics::Outcome {
                result: if report.failed.is_empty() {
                    "ok"
                } else {
                    "failed"
                },
            })
            .inc();
        info!(
            loaded = ?report.loaded,
            unchanged = report.unchanged.len(),
            failed = report.failed.len(),
            "plugins reloaded"
        );
        report
    }

    /// Reloads everything that can change live (see the module's comment).
    pub async fn reload(&self, why: &str) -> Result<Report, String> {
        let mut current = self.current.lock().await;
        let new = self.read(&current)?;
        let old = current.clone();
        let mut report = Report::default();
        info!(reason = why, "reloading the configuration");

        let restart_only: [(&str, bool); 13] = [
            (
                "[server] data_dir",
                old.server.data_dir != new.server.data_dir,
            ),
            ("[server] log", old.server.log != new.server.log),
            (
                "[server] hostname",
                old.server.hostname != new.server.hostname,
            ),
            ("[dns]", differs(&old.dns, &new.dns)),
            ("[outbound]", differs(&old.outbound, &new.outbound)),
            ("[database]", differs(&old.database, &new.database)),
            (
                "[[mailbox_backend]]",
                differs(&old.mailbox_backends, &new.mailbox_backends),
            ),
            ("[metrics]", differs(&old.metrics, &new.metrics)),
            ("[admin]", differs(&old.admin, &new.admin)),
            ("[plugins]", differs(&old.plugins, &new.plugins)),
            (
                "[limits] body_memory_budget",
                old.limits.body_memory_budget != new.limits.body_memory_budget,
            ),
            (
                "[limits] max_auth_failures_per_ip",
                old.limits.max_auth_failures_per_ip != new.limits.max_auth_failures_per_ip,
            ),
            (
                "[limits] auth_failure_window_secs",
                old.limits.auth_failure_window_secs != new.limits.auth_failure_window_secs,
            ),
        ];
        report.restart_needed = restart_only
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| name.to_string())
            .collect();

        // TLS first: new listeners and sessions may need it.
        let tls = self.reload_tls(&old, &new, &mut report);

        let mut config = new.clone();
        // What only a restart changes stays as it runs, so nothing half-applies it.
        config.server.data_dir = old.server.data_dir.clone();
        config.server.hostname = old.server.hostname.clone();
        config.server.log = old.server.log.clone();
        config.dns = old.dns.clone();
        config.outbound = old.outbound.clone();
        config.database = old.database.clone();
        config.mailbox_backends = old.mailbox_backends.clone();
        config.metrics = old.metrics.clone();
        config.admin = old.admin.clone();
        config.plugins = old.plugins.clone();
        config.limits.body_memory_budget = old.limits.body_memory_budget;
        config.limits.max_auth_failures_per_ip = old.limits.max_auth_failures_per_ip;
        config.limits.auth_failure_window_secs = old.limits.auth_failure_window_secs;
        let config = Arc::new(config);

        let running = self.services.get();
        let message_auth =
            if differs(&old.mail_auth, &new.mail_auth) || differs(&old.dkim, &new.dkim) {
                match crate::message_auth::MessageAuth::new(&config, self.dns.as_deref()) {
                    Ok(auth) => {
                        report.applied.push("[mail_auth] and [[dkim]]".into());
                        Some(Arc::new(auth))
                    }
                    Err(err) => {
                        report
                            .failed
                            .push(format!("[[dkim]]: {err}; the running keys stay"));
                        running.smtp.message_auth.clone()
                    }
                }
            } else {
                running.smtp.message_auth.clone()
            };
        self.services.set(Services {
            smtp: Arc::new(
                running
                    .smtp
                    .reconfigured(config.clone(), tls.clone(), message_auth),
            ),
            pop3: Arc::new(running.pop3.reconfigured(config.clone(), tls.clone())),
            imap: Arc::new(running.imap.reconfigured(config.clone(), tls)),
        });
        for (name, changed) in [
            ("[limits]", differs(&old.limits, &config.limits)),
            ("[relay]", differs(&old.relay, &new.relay)),
            ("[pop3]", differs(&old.pop3, &new.pop3)),
            ("[imap]", differs(&old.imap, &new.imap)),
            (
                "[server] shutdown_grace_secs",
                old.server.shutdown_grace_secs != new.server.shutdown_grace_secs,
            ),
        ] {
            if changed {
                report.applied.push(format!("{name} (new sessions)"));
            }
        }
        self.limiter.set_limits(
            config.limits.max_connections,
            config.limits.max_connections_per_ip,
        );

        if differs(&old.users, &new.users)
            || differs(&old.aliases, &new.aliases)
            || old.relay.local_domains != new.relay.local_domains
            || old.limits.default_quota_mb != new.limits.default_quota_mb
            || old.limits.default_quota_messages != new.limits.default_quota_messages
        {
            let users = self.users.reconfigure(&config);
            report
                .applied
                .push(format!("users, aliases and local domains ({users} users)"));
        }

        let (done, failed) = self.listeners.apply(&config.listeners).await;
        report.applied.extend(done);
        report.failed.extend(failed);

        report.plugins = self.load_plugins(&config.plugin_list, why).await;
        *current = config;
        info!(
            applied = ?report.applied,
            restart_needed = ?report.restart_needed,
            failed = ?report.failed,
            "configuration reloaded"
        );
        Ok(report)
    }

    /// The TLS acceptor, made now if no listener needed one yet (the HTTPS admin API).
    pub fn acceptor(&self, config: &Config) -> Result<TlsAcceptor, crate::tls::TlsError> {
        let mut tls = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((acceptor, _)) = tls.as_ref() {
            return Ok(acceptor.clone());
        }
        let (server, cert) = crate::tls::live_server_config(config)?;
        let acceptor = crate::stream::acceptor(&server);
        *tls = Some((acceptor.clone(), cert));
        Ok(acceptor)
    }

    /// Reads the certificate again when TLS is in use (or now needed); returns the acceptor
    /// the new services use.
    fn reload_tls(&self, old: &Config, new: &Config, report: &mut Report) -> Option<TlsAcceptor> {
        let mut tls = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        let needed = new.listeners.iter().any(|l| l.tls != TlsMode::None);
        // Paths compared, and the files read again either way: a renewed certificate is
        // usually written over the old one (certbot, acme.sh).
        let mut cert_config = new.clone();
        cert_config.server.data_dir = old.server.data_dir.clone();
        cert_config.server.hostname = old.server.hostname.clone();
        match tls.as_ref() {
            Some((acceptor, cert)) => match cert.reload(&cert_config) {
                Ok(changed) => {
                    if changed {
                        report
                            .applied
                            .push("[tls] certificate (new handshakes)".into());
                    }
                    Some(acceptor.clone())
                }
                Err(err) => {
                    report
                        .failed
                        .push(format!("[tls]: {err}; the running certificate stays"));
                    Some(acceptor.clone())
                }
            },
            None if needed => match crate::tls::live_server_config(&cert_config) {
                Ok((server, cert)) => {
                    let acceptor = crate::stream::acceptor(&server);
                    *tls = Some((acceptor.clone(), cert));
                    report.applied.push("[tls] certificate".into());
                    Some(acceptor)
                }
                Err(err) => {
                    report.failed.push(format!("[tls]: {err}"));
                    None
                }
            },
            None => None,
        }
    }
}
