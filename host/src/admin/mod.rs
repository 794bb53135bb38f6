//! The admin API of a running server: one JSON request and one JSON reply per connection, over
//! a Unix socket in the data directory (`admin/socket`, inside a directory of mode 0700, so file
//! permissions decide who may use it). The `postern queue …` and `postern kick` commands speak
//! it (`cli::admin`).
//!
//! A request is one line of JSON of at most [`MAX_REQUEST`] bytes, read within
//! [`REQUEST_TIMEOUT`]; anything else gets an error reply and the connection is closed.

pub mod https;
pub mod mailbox;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::auth::UserDirectory;
use crate::plugin::registry::PluginRuntime;
use crate::relay::control::{Action, Control, Filter};

pub const MAX_REQUEST: u64 = 64 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the admin socket of the server on `data_dir` is.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin").join("socket")
}

/// What a client may ask.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// The queued messages that meet the filter, oldest first.
    QueueList {
        #[serde(default)]
        filter: Filter,
    },
    /// An action on the queued messages that meet the filter.
    QueueAct {
        action: Action,
        filter: Filter,
    },
    /// Ends a user's open IMAP and POP3 sessions.
    Kick {
        user: String,
    },
    /// The open sessions.
    Who,
    /// The loaded plugins with their calls since start.
    PluginList,
    /// Reloads the plugins from the configuration file.
    PluginReload,
    /// Reloads everything that can change while running (`server::reload`).
    Reload,
    /// Each folder of a mailbox with its counts, and the quota.
    MailboxStatus {
        user: String,
    },
    MailboxCreate {
        user: String,
        folder: String,
    },
    MailboxDelete {
        user: String,
        folder: String,
    },
    MailboxRename {
        user: String,
        from: String,
        to: String,
    },
    /// Removes a folder's messages older than the age given.
    MailboxExpunge {
        user: String,
        folder: String,
        older_than_secs: i64,
    },
    /// Brings messages in from a Maildir or an mbox file on the server's side.
    MailboxImport {
        user: String,
        folder: String,
        format: mailbox::Format,
        path: PathBuf,
    },
    /// Writes a folder (or every folder) out to a Maildir or an mbox file.
    MailboxExport {
        user: String,
        folder: Option<String>,
        format: mailbox::Format,
        path: PathBuf,
    },
}

/// The reply: `{"status":"ok","result":…}` or `{"status":"error","message":…}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Response {
    Ok {
        result: serde_json::Value,
    },
    Error {
        message: String,
    },
    /// Before the answer of a long request (import, export): how far it is.
    Progress {
        done: usize,
        total: usize,
    },
}

/// What the API acts on.
pub struct Admin {
    pub relay: mpsc::Sender<Control>,
    pub users: Arc<UserDirectory>,
    pub plugins: Arc<PluginRuntime>,
    pub(crate) reloader: Arc<crate::server::Reloader>,
    pub mailboxes: Arc<mailbox::Mailboxes>,
}

impl Admin {
    async fn handle(
        &self,
        request: Request,
        progress: mpsc::UnboundedSender<Response>,
    ) -> Response {
        let mut tell = move |done, total| {
            let _ = progress.send(Response::Progress { done, total });
        };
        let result = match request {
            Request::QueueList { filter } => {
                let (reply, answer) = oneshot::channel();
                self.ask(Control::List { filter, reply }, answer).await
            }
            Request::QueueAct { action, filter } => {
                let (reply, answer) = oneshot::channel();
                self.ask(
                    Control::Act {
                        action,
                        filter,
                        reply,
                    },
                    answer,
                )
                .await
            }
            Request::Kick { user } => {
                let ended = self.users.end_sessions(&user);
                Ok(serde_json::json!({ "user": user, "known": ended }))
            }
            Request::Who => to_json(crate::telemetry::sessions::list()),
            Request::PluginList => {
                let set = self.plugins.current();
                to_json(set.plugins.iter().map(|p| p.summary()).collect::<Vec<_>>())
            }
            Request::PluginReload => self
                .reloader
                .reload_plugins("admin request")
                .await
                .and_then(to_json),
            Request::Reload => self
                .reloader
                .reload("admin request")
                .await
                .and_then(to_json),
            Request::MailboxStatus { user } => self.mailbox(move |m| m.status(&user)).await,
            Request::MailboxCreate { user, folder } => {
                self.mailbox(move |m| m.create(&user, &folder)).await
            }
            Request::MailboxDelete { user, folder } => {
                self.mailbox(move |m| m.delete(&user, &folder)).await
            }
            Request::MailboxRename { user, from, to } => {
                self.mailbox(move |m| m.rename(&user, &from, &to)).await
            }
            Request::MailboxExpunge {
                user,
                folder,
                older_than_secs,
            } => {
                self.mailbox(move |m| m.expunge(&user, &folder, older_than_secs))
                    .await
            }
            Request::MailboxImport {
                user,
                folder,
                format,
                path,
            } => {
                self.mailbox(move |m| m.import(&user, &folder, format, &path, &mut tell))
                    .await
            }
            Request::MailboxExport {
                user,
                folder,
                format,
                path,
            } => {
                self.mailbox(move |m| m.export(&user, folder.as_deref(), format, &path, &mut tell))
                    .await
            }
        };
        match result {
            Ok(result) => Response::Ok { result },
            Err(message) => Response::Error { message },
        }
    }

    /// A mailbox operation, on a blocking thread: the store's calls block.
    async fn mailbox<T: Serialize + Send + 'static>(
        &self,
        op: impl FnOnce(&mailbox::Mailboxes) -> Result<T, String> + Send + 'static,
    ) -> Result<serde_json::Value, String> {
        let mailboxes = self.mailboxes.clone();
        tokio::task::spawn_blocking(move || op(&mailboxes))
            .await
            .map_err(|e| format!("the operation failed: {e}"))?
            .and_then(to_json)
    }

    async fn ask<T: Serialize>(
        &self,
        control: Control,
        answer: oneshot::Receiver<T>,
    ) -> Result<serde_json::Value, String> {
        let gone = || "the relay is not running (shutting down?)".to_string();
        self.relay.send(control).await.map_err(|_| gone())?;
        to_json(answer.await.map_err(|_| gone())?)
    }
}

fn to_json<T: Serialize>(value: T) -> Result<serde_json::Value, String> {
    serde_json::to_value(value).map_err(|e| e.to_string())
}

/// Binds the socket (replacing a stale one: the data directory's lock says no other server
/// runs here) inside a directory only this user may enter.
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = socket_path(data_dir);
    let dir = path.parent().expect("socket in a directory");
    crate::durable::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    match std::fs::remove_file(&path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the API until shutdown; connections are served one task each.
pub async fn serve(listener: UnixListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, admin.clone()));
            }
            Err(err) => {
                warn!("admin socket: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, admin: Arc<Admin>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST + 1);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let response = match read {
        Err(_) => Response::Error {
            message: "no request within the time allowed".into(),
        },
        Ok(Err(err)) => Response::Error {
            message: format!("cannot read the request: {err}"),
        },
        Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST || !line.ends_with('\n') => Response::Error {
            message: format!("a request is one line of at most {MAX_REQUEST} bytes"),
        },
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                info!(?request, "admin request");
                let (progress, mut reports) = mpsc::unbounded_channel();
                let answer = admin.handle(request, progress);
                tokio::pin!(answer);
                // Progress lines go out while the request runs; a client that stops reading
                // them does not stop the request.
                loop {
                    tokio::select! {
                        response = &mut answer => break response,
                        Some(report) = reports.recv() => {
                            let mut bytes = serde_json::to_vec(&report).unwrap_or_default();
                            bytes.push(b'\n');
                            let _ = tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&bytes)).await;
                        }
                    }
                }
            }
            Err(err) => Response::Error {
                message: format!("not a request: {err}"),
            },
        },
    };
    let mut bytes = serde_json::to_vec(&response).unwrap_or_default();
    bytes.push(b'\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&bytes)).await;
}
