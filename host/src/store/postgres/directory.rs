//! The user directory in the database (migrations 3 and 7), for `[database] users = true`: every node
//! authenticates the same users. Each call is one statement (autocommit); the triggers move
//! `directory_version` on, which is the stamp nodes poll.

use deadpool_postgres::GenericClient;

use super::PgStore;
use crate::auth::directory::{Directory, DirectoryError, Entries, Outcome, UserRecord};

fn failed(err: crate::store::StoreError) -> DirectoryError {
    DirectoryError::Database(err.to_string())
}

/// An upsert's outcome, from `RETURNING (xmax = 0)` (true only for a row it inserted).
fn upserted(inserted: bool) -> Outcome {
    if inserted {
        Outcome::Added
    } else {
        Outcome::Replaced
    }
}

impl Directory for PgStore {
    fn load(&self) -> Result<Entries, DirectoryError> {
        self.block(async {
            let c = self.client().await?;
            let users = c
                .query(
                    "SELECT address, password, quota_mb, quota_messages, disabled FROM users
                     ORDER BY address",
                    &[],
                )
                .await
                .map_err(super::db)?;
            let aliases = c
                .query("SELECT alias, target FROM aliases", &[])
                .await
                .map_err(super::db)?;
            let domains = c
                .query("SELECT name FROM domains ORDER BY name", &[])
                .await
                .map_err(super::db)?;
            Ok(Entries {
                domains: domains.iter().map(|r| r.get(0)).collect(),
                users: users
                    .iter()
                    .map(|r| UserRecord {
                        address: r.get(0),
                        password: r.get(1),
                        quota_mb: r.get::<_, Option<i64>>(2).map(|n| n as u64),
                        quota_messages: r.get::<_, Option<i64>>(3).map(|n| n as u64),
                        disabled: r.get(4),
                    })
                    .collect(),
                aliases: aliases.iter().map(|r| (r.get(0), r.get(1))).collect(),
            })
        })
        .map_err(failed)
    }

    fn stamp(&self) -> Result<u64, DirectoryError> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_one("SELECT version FROM directory_version", &[])
                .await
                .map_err(super::db)?;
            Ok(row.get::<_, i64>(0) as u64)
        })
        .map_err(failed)
    }

    fn put_user(&self, user: UserRecord) -> Result<Outcome, DirectoryError> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "INSERT INTO users (address, password, quota_mb, quota_messages, disabled)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (address) DO UPDATE SET password = EXCLUDED.password,
                         quota_mb = EXCLUDED.quota_mb, quota_messages = EXCLUDED.quota_messages,
                         disabled = EXCLUDED.disabled
                     RETURNING (xmax = 0)",
                    &[
                        &user.address,
                        &user.password,
                        &user.quota_mb.map(|n| n as i64),
                        &user.quota_messages.map(|n| n as i64),
                        &user.disabled,
                    ],
                )
                .await
                .map_err(super::db)?;
            Ok(upserted(row.get(0)))
        })
        .map_err(failed)
    }

    fn remove_user(&self, address: &str) -> Result<Outcome, DirectoryError> {
        self.remove("DELETE FROM users WHERE address = $1", address)
    }

    fn put_alias(&self, alias: &str, target: &str) -> Result<Outcome, DirectoryError> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "INSERT INTO aliases (alias, target) VALUES ($1, $2)
                     ON CONFLICT (alias) DO UPDATE SET target = EXCLUDED.target
                     RETURNING (xmax = 0)",
                    &[&alias, &target],
                )
                .await
                .map_err(super::db)?;
            Ok(upserted(row.get(0)))
        })
        .map_err(failed)
    }

    fn remove_alias(&self, alias: &str) -> Result<Outcome, DirectoryError> {
        self.remove("DELETE FROM aliases WHERE alias = $1", alias)
    }

    fn put_domain(&self, domain: &str) -> Result<Outcome, DirectoryError> {
        self.block(async {
            let c = self.client().await?;
            let n = c
                .execute(
                    "INSERT INTO domains (name) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&domain],
                )
                .await
                .map_err(super::db)?;
            Ok(if n == 1 {
                Outcome::Added
            } else {
                Outcome::Replaced
            })
        })
        .map_err(failed)
    }

    fn remove_domain(&self, domain: &str) -> Result<Outcome, DirectoryError> {
        self.remove("DELETE FROM domains WHERE name = $1", domain)
    }
}

impl PgStore {
    fn remove(&self, statement: &str, key: &str) -> Result<Outcome, DirectoryError> {
        self.block(async {
            let c = self.client().await?;
            let n = c.execute(statement, &[&key]).await.map_err(super::db)?;
            Ok(if n == 0 {
                Outcome::Missing
            } else {
                Outcome::Removed
            })
        })
        .map_err(failed)
    }
}
