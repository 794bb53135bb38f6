//! The running server: opens the spool and store, starts the scheduler, binds listeners, enforces
//! connection limits, and shuts down gracefully.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::auth::UserDirectory;
use crate::config::{Config, TlsMode};
use crate::imap::ImapServer;
use crate::plugin::PluginRuntime;
use crate::pop3::Pop3Server;
use crate::queue::scheduler::{LocalDelivery, Scheduler};
use crate::queue::{Queue, Spool};
use crate::smtp::SmtpServer;
use crate::store::maildir::Maildir;
use crate::store::watched::Watched;
use crate::store::MailStore;
use tokio_util::task::TaskTracker;

mod listeners;
mod reload;

use listeners::{ConnectionLimiter, Listeners, LiveServices, Services};
pub(crate) use reload::Reloader;
pub use reload::Report as ReloadReport;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the data directory {path} is in use by another postern serve (pid {pid}); stop it first or use another --data-dir")]
    InUse {
        path: std::path::PathBuf,
        pid: String,
    },
    #[error("{0}")]
    Admin(String),
    #[error("cannot open the spool: {0}")]
    Spool(std::io::Error),
    #[error("{0}")]
    MailboxBackend(String),
    #[error("user directory: {0}")]
    Directory(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Plugin(#[from] crate::plugin::PluginError),
    #[error(transparent)]
    MessageAuth(crate::message_auth::KeyError),
    #[error("cannot write the pid file {path}: {source}")]
    PidFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {address} ({name}): {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Where the server writes its pid (`kill -HUP $(cat …)` reloads the plugins; systemd uses it).
pub fn pid_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("postern.pid")
}

/// Runs the server until `stop` turns true (SIGINT or SIGTERM, see `signals`). `config_path` is
/// re-read on plugin reloads (None for the embedded default).
pub async fn run(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let config = Arc::new(config);
    let data_dir = config.server.data_dir.clone();
    crate::durable::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let pid_file = pid_path(&data_dir);
    // Held for the life of the process: a second server on the same data directory would
    // deliver the same spool twice and clear the spool's tmp/ under this one's feet.
    let _lock = crate::durable::DirectoryLock::acquire(&pid_file).map_err(|err| match err {
        crate::durable::LockError::Held { pid } => ServerError::InUse {
            path: data_dir.clone(),
            pid,
        },
        crate::durable::LockError::Io(source) => ServerError::PidFile {
            path: pid_file.clone(),
            source,
        },
    })?;
    let needs_tls = config.listeners.iter().any(|l| l.tls != TlsMode::None);
    let live_tls = if needs_tls {
        let (server, cert) = crate::tls::live_server_config(&config)?;
        Some((crate::stream::acceptor(&server), cert))
    } else {
        None
    };
    let tls = live_tls.as_ref().map(|(acceptor, _)| acceptor.clone());
    let users = Arc::new(UserDirectory::from_config(&config));

    let dns = match crate::dns::Dns::new(&config.dns) {
        Ok(dns) => Some(Arc::new(dns)),
        Err(err) => {
            warn!("no DNS resolver: {err}; plugins granted dns will not load");
            None
        }
    };
    let plugins = Arc::new(PluginRuntime::new(
        &config.plugins,
        &data_dir,
        users.clone(),
        dns.clone(),
    )?);
    let maildir: Arc<dyn MailStore> = Arc::new(Maildir::new(
        data_dir.join("mailboxes"),
        &config.server.hostname,
    ));
    let mut mailboxes = crate::store::by_domain::ByDomain::new(maildir);
    for backend in &config.mailbox_backends {
        let (backend, settings, engine, dir, directory) = (
            backend.clone(),
            config.plugins.clone(),
            plugins.engine.clone(),
            data_dir.clone(),
            users.clone(),
        );
        let name = backend.name.clone();
        // Compiling may take a while: not on a runtime thread.
        let loaded = tokio::task::spawn_blocking(move || {
            crate::store::wasm::WasmStore::new(&backend, &settings, engine, &dir, directory)
                .map(|store| (store, backend.domains))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let (store, domains) = loaded.map_err(|reason| {
            ServerError::MailboxBackend(format!("mailbox_backend {name:?} did not load: {reason}"))
        })?;
        info!(backend = %name, ?domains, "mailbox backend loaded");
        let store: Arc<dyn MailStore> = Arc::new(store);
        for domain in domains {
            mailboxes.route(&domain, store.clone());
        }
    }
    let mut database_store = None;
    if let Some(database) = config.database.clone() {
        let opened = tokio::task::spawn_blocking(move || {
            let store = crate::store::postgres::PgStore::connect_with(
                &database.url,
                database.pool_size,
                std::time::Duration::from_secs(database.timeout_seconds),
                std::sync::Arc::new(crate::store::postgres::bodies::InDatabase),
            )?;
            if database.migrate {
                store.migrate()?;
            }
            Ok::<_, crate::store::StoreError>((store, database.domains))
        })
        .await
        .map_err(|e| ServerError::MailboxBackend(e.to_string()))?
        .map_err(|e| ServerError::MailboxBackend(format!("database: {e}")))?;
        let (store, domains) = opened;
        info!(?domains, "mailboxes in PostgreSQL");
        let store = Arc::new(store);
        for domain in domains {
            mailboxes.route(&domain, store.clone());
        }
        // With the directory in the database, a domain added while running is every node's:
        // its mailboxes are the database's too.
        if crate::auth::directory::users_in_database(&config) {
            mailboxes.default_to(store.clone(), &config.relay.local_domains);
        }
        database_store = Some(store);
    }
    // The live user directory: the database's when it holds users, else the data directory's
    // file. A damaged file refuses the start; an unreachable database is only warned about
    // (the configuration's users still log in, and the directory is read once it answers).
    let users_in_database = crate::auth::directory::users_in_database(&config);
    let directory = crate::auth::directory::configured(&config, database_store.clone());
    let directory_stamp = {
        let (d, u) = (directory.clone(), users.clone());
        match tokio::task::spawn_blocking(move || crate::auth::directory::load_into(&*d, &u))
            .await
            .map_err(|e| ServerError::Directory(e.to_string()))?
        {
            Ok(stamp) => Some(stamp),
            Err(err) if !users_in_database => return Err(ServerError::Directory(err.to_string())),
            Err(err) => {
                warn!(error = %err, "user directory unreadable at start; retrying");
                None
            }
        }
    };
    // Every writer goes through the watched store, so IMAP sessions hear of every change.
    let watched = Arc::new(Watched::new(Arc::new(mailboxes)));
    if let Some(database) = &database_store {
        // ...and of the other nodes' changes to the mailboxes they share.
        let told = (*watched).clone();
        database.listen(move |notice| match notice {
            crate::store::postgres::Notice::Changed { mailbox, folder } => {
                told.changed_elsewhere(Some(&mailbox), folder.as_deref())
            }
            crate::store::postgres::Notice::Anything => told.changed_elsewhere(None, None),
        });
    }
    let store: Arc<dyn MailStore> = watched.clone();
    let admin_store = store.clone();
    if let Some(database) = database_store
        .as_ref()
        .filter(|_| config.database.as_ref().is_some_and(|d| d.kv))
    {
        plugins.share_kv(database.clone());
    }
    let report = plugins.load(&config.plugin_list).await;
    if let Some((name, reason)) = report.failed.first() {
        // At start there is no previous version to fall back on: refuse to run half-configured.
        return Err(ServerError::Plugin(crate::plugin::PluginError::Load {
            name: name.clone(),
            reason: reason.clone(),
        }));
    }
    let (to_relay, relay_inbox) = mpsc::channel(256);
    // The queue: files under data_dir/spool, or the database's rows shared by every node. The
    // per-recipient delivery states live beside it, shared by the scheduler (which writes the
    // first) and the relay (which owns the message from then on).
    let shared_queue = database_store
        .clone()
        .zip(config.database.as_ref().filter(|d| d.queue));
    let (spool, states) = match shared_queue {
        Some((database, settings)) => {
            let lease = std::time::Duration::from_secs(settings.lease_seconds);
            info!(
                lease_seconds = settings.lease_seconds,
                "queue in PostgreSQL, shared"
            );
            (
                Spool::shared(database.clone(), lease).map_err(ServerError::Spool)?,
                crate::relay::state::StateDir::Database(database),
            )
        }
        None => (
            Spool::open(&data_dir.join("spool")).map_err(ServerError::Spool)?,
            crate::relay::state::StateDir::open(&data_dir.join("spool").join("relay"))
                .map_err(ServerError::Spool)?,
        ),
    };
    // What an earlier run left (with the shared queue: what dead nodes' leases left), read
    // off the runtime: the database may be slow to answer.
    let recovered = {
        let spool = spool.clone();
        let shared = spool.database().is_some();
        match tokio::task::spawn_blocking(move || spool.list())
            .await
            .map_err(|e| ServerError::Spool(std::io::Error::other(e.to_string())))?
        {
            Ok(ids) => ids,
            // Taken over later by the lease keeper, once the database answers.
            Err(err) if shared => {
                warn!(error = %err, "queue database unreachable at start; recovering later");
                Vec::new()
            }
            Err(err) => return Err(ServerError::Spool(err)),
        }
    };
    let (to_scheduler, scheduler_inbox) = mpsc::channel(256);
    tokio::spawn(crate::queue::keep_leases(
        spool.clone(),
        to_scheduler.clone(),
    ));
    let local = Arc::new(LocalDelivery::new(
        store.clone(),
        users.clone(),
        Some(plugins.clone()),
    ));
    let relay = crate::relay::Relay::new(
        config.clone(),
        dns.clone(),
        spool.clone(),
        Queue::new(spool.clone(), to_scheduler.clone()),
        local.clone(),
        states.clone(),
        relay_inbox,
    )
    .map_err(ServerError::Spool)?;
    let (to_relay_control, relay_control) = mpsc::channel(16);
    // Turned on once the sessions are over: the scheduler delivers what they queued and the
    // relay lets the attempts under way finish, then both end.
    let (drain_tx, drain_rx) = watch::channel(false);
    let relay = tokio::spawn(
        relay
            .with_control(relay_control)
            .with_drain(drain_rx.clone())
            .run(),
    );
    let filter = crate::queue::filter::AfterQueue::new(
        plugins.clone(),
        spool.clone(),
        crate::queue::filter::FilterSettings {
            concurrency: config.plugins.queued_concurrency,
            retry: std::time::Duration::from_secs(config.plugins.queued_retry_secs),
            max_age: config.outbound.max_age,
            hostname: config.server.hostname.clone(),
        },
    );
    let scheduler = Scheduler::new(spool.clone(), local, states, scheduler_inbox)
        .with_filter(filter)
        .with_relay(to_relay)
        .with_drain(drain_rx);
    let scheduler = tokio::spawn(scheduler.run(recovered));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(crate::auth::directory::keep_fresh(
        directory,
        users.clone(),
        directory_stamp,
        shutdown_rx.clone(),
    ));
    let mut smtp = SmtpServer::new(
        config.clone(),
        users.clone(),
        Queue::new(spool, to_scheduler),
        tls.clone(),
        shutdown_rx.clone(),
    );
    smtp.plugins = Some(plugins.clone());
    smtp.login_gate.consult_plugins(plugins.clone());
    smtp.store = Some(store.clone());
    smtp.message_auth = Some(Arc::new(
        crate::message_auth::MessageAuth::new(&config, dns.as_deref())
            .map_err(ServerError::MessageAuth)?,
    ));
    let pop3 = Arc::new(Pop3Server::new(
        config.clone(),
        users.clone(),
        store,
        tls.clone(),
        smtp.login_gate.clone(),
        shutdown_rx.clone(),
    ));
    let mut imap = ImapServer::new(
        config.clone(),
        users.clone(),
        watched,
        tls,
        smtp.login_gate.clone(),
        shutdown_rx.clone(),
        smtp.body_budget.clone(),
    );
    imap.events = Some(crate::plugin::events::MailboxEvents::start(plugins.clone()));
    let imap = Arc::new(imap);
    let services = Arc::new(LiveServices::new(Services {
        smtp: Arc::new(smtp),
        pop3,
        imap,
    }));
    let limiter = ConnectionLimiter::new(
        config.limits.max_connections,
        config.limits.max_connections_per_ip,
    );
    // Every session, so shutdown can wait for them to end instead of polling a count.
    let sessions = TaskTracker::new();
    let listeners = Arc::new(Listeners::new(
        services.clone(),
        limiter.clone(),
        sessions.clone(),
        shutdown_rx.clone(),
    ));
    let mut bound = Vec::new();
    for listener_config in &config.listeners {
        let address = listeners.start(listener_config).await?;
        bound.push((listener_config.name.clone(), address));
    }
    let reloader = Arc::new(Reloader {
        path: config_path,
        current: tokio::sync::Mutex::new(config.clone()),
        users: users.clone(),
        plugins: plugins.clone(),
        tls: std::sync::Mutex::new(live_tls),
        services,
        listeners,
        limiter: limiter.clone(),
        dns: dns.clone(),
    });
    tokio::spawn(reloader.clone().on_signal());
    if config.plugins.watch {
        tokio::spawn(reloader.clone().on_plugin_change());
    }
    let admin = Arc::new(crate::admin::Admin {
        relay: to_relay_control.clone(),
        users: users.clone(),
        plugins: plugins.clone(),
        reloader: reloader.clone(),
        mailboxes: Arc::new(crate::admin::mailbox::Mailboxes {
            store: admin_store,
            users: users.clone(),
        }),
    });
    // Mail flows without the admin API; an operator who finds `postern queue` unable to
    // connect finds why in the log.
    match crate::admin::bind(&data_dir) {
        Ok(listener) => {
            tokio::spawn(crate::admin::serve(
                listener,
                admin.clone(),
                shutdown_rx.clone(),
            ));
        }
        Err(err) => error!(
            path = %crate::admin::socket_path(&data_dir).display(),
            "admin API unavailable: cannot open its socket: {err}"
        ),
    }
    // Asked for by name: unlike the socket, a misconfigured HTTPS API refuses the start.
    if let Some(settings) = &config.admin {
        let token =
            crate::admin::https::read_token(&settings.token_file).map_err(ServerError::Admin)?;
        let bind_error = |source| ServerError::Bind {
            name: "admin".into(),
            address: settings.address,
            source,
        };
        let listener = TcpListener::bind(settings.address)
            .await
            .map_err(bind_error)?;
        bound.push(("admin".into(), listener.local_addr().map_err(bind_error)?));
        let acceptor = reloader.acceptor(&config)?;
        tokio::spawn(crate::admin::https::serve(
            listener,
            acceptor,
            admin.clone(),
            token,
            shutdown_rx.clone(),
        ));
    }
    if let Some(metrics) = &config.metrics {
        let bind_error = |source| ServerError::Bind {
            name: "metrics".into(),
            address: metrics.address,
            source,
        };
        let listener = crate::telemetry::metrics::bind(metrics.address)
            .await
            .map_err(bind_error)?;
        bound.push(("metrics".into(), listener.local_addr().map_err(bind_error)?));
        tokio::spawn(crate::telemetry::metrics::serve(
            listener,
            to_relay_control,
            shutdown_rx.clone(),
        ));
    }
    // Machine-readable lines for scripts and tests (ports may have been chosen by the OS).
    {
        let mut out = std::io::stdout().lock();
        for (name, address) in &bound {
            info!(listener = %name, %address, "listening");
            let _ = writeln!(out, "postern: listening {name} {address}");
        }
        let _ = writeln!(out, "postern: ready");
        let _ = out.flush();
    }

    let _ = stop.wait_for(|down| *down).await;
    // Listeners stop accepting and every session ends at its next command boundary (IMAP
    // IDLE and NOTIFY at once) with its protocol's farewell; those still busy get the grace
    // period, then the delivery tasks finish what is under way within what is left of it.
    info!(sessions = limiter.active(), "shutting down");
    let _ = shutdown_tx.send(true);
    let grace = Duration::from_secs(reloader.config().await.server.shutdown_grace_secs);
    let deadline = tokio::time::Instant::now() + grace;
    sessions.close();
    if tokio::time::timeout_at(deadline, sessions.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = limiter.active(),
            "grace period over; closing the sessions still open"
        );
    }
    let _ = drain_tx.send(true);
    // A message whose delivery is cut short stays queued and is delivered after the next
    // start (at worst twice to a remote host, which RFC 5321 §6.1 allows over losing it).
    let delivery_deadline = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
    let delivery = async {
        let _ = scheduler.await;
        let _ = relay.await;
    };
    if tokio::time::timeout_at(delivery_deadline, delivery)
        .await
        .is_err()
    {
        warn!("grace period over; deliveries under way are left queued");
    }
    info!(remaining = limiter.active(), "stopped");
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}
