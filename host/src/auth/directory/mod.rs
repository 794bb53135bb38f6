//! The live user directory: users, aliases and local domains that change while the server runs, kept in a
//! file in the data directory (`file.rs`, the default) or in PostgreSQL (`[database] users`,
//! `store::postgres::directory`, shared by every node). The CLI (`postern user …`, `postern
//! alias …`) edits it; the server looks at its stamp once a second and reloads it when it
//! changed, so a user added on one node logs in on every node within a second or two.
//!
//! The configuration's `[[user]]` entries and `[aliases]` stay a static source beside it and win
//! over it: an address defined there cannot be changed or disabled from the directory.

pub mod file;

use std::fmt;

use serde::{Deserialize, Serialize};

/// One user as the directory keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRecord {
    /// The user key (`alice@example.test`, lower-cased).
    pub address: String,
    /// A PHC string (argon2id).
    pub password: String,
    /// MiB of stored mail, all folders together (None: the default quota; 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_mb: Option<u64>,
    /// Messages, all folders together (None: the default; 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_messages: Option<u64>,
    /// A disabled user cannot log in (mail for it is still accepted and stored, as Dovecot's
    /// `nologin` does: disabling is not deleting).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// Everything a directory holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entries {
    /// Local domains beside the configuration's `relay.local_domains`, lower-cased. (First:
    /// TOML writes plain values before tables.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    #[serde(default, rename = "user")]
    pub users: Vec<UserRecord>,
    /// Canonical alias → user key.
    #[serde(default)]
    pub aliases: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: {reason}")]
    Damaged { path: String, reason: String },
    #[error("database: {0}")]
    Database(String),
}

/// What changed, so the caller can report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Added,
    Replaced,
    Removed,
    Missing,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Added => "added",
            Outcome::Replaced => "updated",
            Outcome::Removed => "removed",
            Outcome::Missing => "not found",
        })
    }
}

/// A store of users and aliases. Blocking: call from a blocking thread (or the CLI).
pub trait Directory: Send + Sync {
    /// Everything, as it is now.
    fn load(&self) -> Result<Entries, DirectoryError>;
    /// Changes whenever the entries may have (cheap: the server asks once a second).
    fn stamp(&self) -> Result<u64, DirectoryError>;
    /// Adds a user or replaces the one with that address.
    fn put_user(&self, user: UserRecord) -> Result<Outcome, DirectoryError>;
    fn remove_user(&self, address: &str) -> Result<Outcome, DirectoryError>;
    fn put_alias(&self, alias: &str, target: &str) -> Result<Outcome, DirectoryError>;
    fn remove_alias(&self, alias: &str) -> Result<Outcome, DirectoryError>;
    fn put_domain(&self, domain: &str) -> Result<Outcome, DirectoryError>;
    fn remove_domain(&self, domain: &str) -> Result<Outcome, DirectoryError>;
}

/// The directory the configuration names: the database's (`store`, the configuration's
/// `[database]` opened) with `[database] users = true`, else `data_dir/directory.toml`.
pub fn configured(
    config: &crate::config::Config,
    store: Option<std::sync::Arc<crate::store::postgres::PgStore>>,
) -> std::sync::Arc<dyn Directory> {
    match store {
        Some(store) if users_in_database(config) => store,
        _ => std::sync::Arc::new(file::FileDirectory::new(&config.server.data_dir)),
    }
}

/// Whether the configuration keeps the directory in the database.
pub fn users_in_database(config: &crate::config::Config) -> bool {
    config.database.as_ref().is_some_and(|d| d.users)
}

/// Loads the directory into `users` now (blocking); returns the stamp it had.
pub fn load_into(
    directory: &dyn Directory,
    users: &super::UserDirectory,
) -> Result<u64, DirectoryError> {
    let stamp = directory.stamp()?;
    users.refresh(&directory.load()?);
    Ok(stamp)
}

/// Loads the directory into `users` again whenever its stamp moves from `seen` (looked at once
/// a second), until shutdown. A directory that cannot be read keeps the last entries served: a
/// database outage does not log everyone out.
pub async fn keep_fresh(
    directory: std::sync::Arc<dyn Directory>,
    users: std::sync::Arc<super::UserDirectory>,
    mut seen: Option<u64>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        let (d, u) = (directory.clone(), users.clone());
        let last = seen;
        let looked =
            tokio::task::spawn_blocking(move || -> Result<Option<(u64, usize)>, DirectoryError> {
                let stamp = d.stamp()?;
                if last == Some(stamp) {
                    return Ok(None);
                }
                let entries = d.load()?;
                Ok(Some((stamp, u.refresh(&entries))))
            })
            .await;
        match looked {
            Ok(Ok(Some((stamp, count)))) => {
                tracing::info!(users = count, "user directory reloaded");
                seen = Some(stamp);
                failing = false;
            }
            Ok(Ok(None)) => failing = false,
            Ok(Err(err)) if !failing => {
                tracing::warn!(error = %err, "user directory unreadable; serving the last one read");
                failing = true;
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|down| *down) => return,
        }
    }
}
