//! Listeners: one accept loop each, the connection limits, and the set of running listeners
//! that `postern reload` rebinds (a listener whose settings changed is stopped and bound
//! again; connections it accepted before keep going).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use super::ServerError;
use crate::config::{ListenerConfig, ListenerProtocol, TlsMode};
use crate::imap::ImapServer;
use crate::pop3::Pop3Server;
use crate::smtp::reply::Reply;
use crate::smtp::session::Session;
use crate::smtp::SmtpServer;
use crate::telemetry::sessions::Registered;

/// Counts connections in total and per client IP.
pub struct ConnectionLimiter {
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    state: Mutex<LimiterState>,
}

#[derive(Default)]
struct LimiterState {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds a connection's place; releases it when dropped.
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionLimiter> {
        Arc::new(ConnectionLimiter {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            state: Mutex::new(LimiterState::default()),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut state = self.state.lock().expect("limiter lock");
        let for_ip = state.per_ip.get(&ip).copied().unwrap_or(0);
        if state.total >= self.max_total.load(Ordering::Relaxed)
            || for_ip >= self.max_per_ip.load(Ordering::Relaxed)
        {
            return None;
        }
        state.total += 1;
        state.per_ip.insert(ip, for_ip + 1);
        Some(ConnectionSlot {
            limiter: self.clone(),
            ip,
        })
    }

    /// New limits from `postern reload`: connections over them stay, new ones are refused
    /// until the count is under.
    pub fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    pub fn active(&self) -> usize {
        self.state.lock().expect("limiter lock").total
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut state = self.limiter.state.lock().expect("limiter lock");
        state.total -= 1;
        if let Some(count) = state.per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                state.per_ip.remove(&self.ip);
            }
        }
    }
}

/// The protocol servers a listener can hand connections to.
pub(super) struct Services {
    pub smtp: Arc<SmtpServer>,
    pub pop3: Arc<Pop3Server>,
    pub imap: Arc<ImapServer>,
}

/// The services new connections are handed to. A reload puts new ones in place (built on the
/// new configuration); a session keeps those it started with to its end.
pub(super) struct LiveServices(RwLock<Arc<Services>>);

impl LiveServices {
    pub fn new(services: Services) -> LiveServices {
        LiveServices(RwLock::new(Arc::new(services)))
    }

    pub fn get(&self) -> Arc<Services> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, services: Services) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(services);
    }
}

/// The listeners running now, by name.
pub(super) struct Listeners {
    running: tokio::sync::Mutex<HashMap<String, Running>>,
    services: Arc<LiveServices>,
    limiter: Arc<ConnectionLimiter>,
    sessions: TaskTracker,
    shutdown: watch::Receiver<bool>,
}

struct Running {
    config: ListenerConfig,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Listeners {
    pub fn new(
        services: Arc<LiveServices>,
        limiter: Arc<ConnectionLimiter>,
        sessions: TaskTracker,
        shutdown: watch::Receiver<bool>,
    ) -> Listeners {
        Listeners {
            running: tokio::sync::Mutex::default(),
            services,
            limiter,
            sessions,
            shutdown,
        }
    }

    /// Binds a listener and starts accepting on it; returns the bound address.
    pub async fn start(&self, config: &ListenerConfig) -> Result<SocketAddr, ServerError> {
        let mut running = self.running.lock().await;
        self.start_locked(&mut running, config).await
    }

    async fn start_locked(
        &self,
        running: &mut HashMap<String, Running>,
        config: &ListenerConfig,
    ) -> Result<SocketAddr, ServerError> {
        let bind_error = |source| ServerError::Bind {
            name: config.name.clone(),
            address: config.address,
            source,
        };
        let listener = TcpListener::bind(config.address)
            .await
            .map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::new(config.clone()),
            self.services.clone(),
            self.limiter.clone(),
            self.sessions.clone(),
            self.shutdown.clone(),
            stopped,
        ));
        running.insert(
            config.name.clone(),
            Running {
                config: config.clone(),
                stop,
                task,
            },
        );
        Ok(address)
    }

    /// Stops the listener and waits until its socket is closed.
    async fn stop_locked(running: &mut HashMap<String, Running>, name: &str) {
        if let Some(old) = running.remove(name) {
            let _ = old.stop.send(true);
            let _ = old.task.await;
        }
    }

    /// Makes the running listeners those `wanted` lists: new ones are bound, removed ones
    /// stopped, changed ones stopped and bound again. Returns what was done and what failed
    /// (a listener that cannot be bound again is left stopped and named).
    pub async fn apply(&self, wanted: &[ListenerConfig]) -> (Vec<String>, Vec<String>) {
        let mut running = self.running.lock().await;
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        let names: Vec<String> = running.keys().cloned().collect();
        for name in names {
            if !wanted.iter().any(|w| w.name == name) {
                Self::stop_locked(&mut running, &name).await;
                done.push(format!("listener {name} stopped"));
            }
        }
        for config in wanted {
            let verb = match running.get(&config.name) {
                Some(old) if old.config == *config => continue,
                Some(_) => {
                    // The same address may be asked for again: the old socket goes first.
                    Self::stop_locked(&mut running, &config.name).await;
                    "rebound"
                }
                None => "started",
            };
            match self.start_locked(&mut running, config).await {
                Ok(address) => done.push(format!("listener {} {verb} on {address}", config.name)),
                Err(err) => {
                    error!("reload: {err}");
                    failed.push(err.to_string());
                }
            }
        }
        (done, failed)
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: Arc<ListenerConfig>,
    services: Arc<LiveServices>,
    limiter: Arc<ConnectionLimiter>,
    sessions: TaskTracker,
    mut shutdown: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|down| *down) => return,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                error!("accept failed on {}: {err}", config.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(slot) = limiter.try_acquire(peer.ip()) else {
            warn!(%peer, "connection refused: too many connections");
            tokio::spawn(refuse(stream, config.clone()));
            continue;
        };
        let services = services.get();
        type Run = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let (id, protocol, run): (u64, &'static str, Run) = match config.protocol {
            ListenerProtocol::Smtp | ListenerProtocol::Submission => {
                let session = Session::new(services.smtp.clone(), config.clone(), peer);
                (session.id, "smtp", Box::pin(session.run(stream)))
            }
            ListenerProtocol::Pop3 => {
                let session =
                    crate::pop3::session::Session::new(services.pop3.clone(), config.clone(), peer);
                (session.id, "pop3", Box::pin(session.run(stream)))
            }
            ListenerProtocol::Imap => {
                let session =
                    crate::imap::session::Session::new(services.imap.clone(), config.clone(), peer);
                (session.id(), "imap", Box::pin(session.run(stream)))
            }
        };
        let registered = Registered::open(id, protocol, &config.name, peer);
        sessions.spawn(async move {
            run.await;
            drop((slot, registered));
        });
    }
}

/// Tells a client over the connection limit why it is turned away, in its protocol's words
/// (SMTP: RFC 5321 §3.1 421; POP3: RFC 2449 `[SYS/TEMP]`).
async fn refuse(mut stream: TcpStream, listener: Arc<ListenerConfig>) {
    if listener.tls != TlsMode::Implicit {
        let text = "Too many connections, try again later";
        let reply = match listener.protocol {
            ListenerProtocol::Smtp | ListenerProtocol::Submission => {
                Reply::new(421, "4.7.0", text).to_bytes()
            }
            ListenerProtocol::Pop3 => crate::pop3::codec::err(Some("SYS/TEMP"), text),
            ListenerProtocol::Imap => format!("* BYE [UNAVAILABLE] {text}\r\n").into_bytes(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&reply)).await;
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_counts_total_and_per_ip() {
        let limiter = ConnectionLimiter::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = limiter.try_acquire(a).unwrap();
        let _s2 = limiter.try_acquire(a).unwrap();
        assert!(limiter.try_acquire(a).is_none(), "per-IP limit");
        let _s3 = limiter.try_acquire(b).unwrap();
        assert!(limiter.try_acquire(b).is_none(), "total limit");
        drop(s1);
        assert!(limiter.try_acquire(a).is_some());
    }
}
