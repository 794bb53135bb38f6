//! The plugins' kv namespaces in the database (migration 4), for `[database] kv = true`.
//! Each write is one transaction that first locks the namespace's `kv_usage` row: writers of a
//! namespace take turns across every node, so a read-modify-write (a counter) is atomic and
//! the quota is exact. Reads take no lock. Expired entries are ignored by reads and purged when
//! a write would pass the quota, as the file namespaces do.

use super::{db, PgStore, Result};

/// A stored entry: value and expiry (Unix milliseconds).
pub type KvEntry = (Vec<u8>, Option<u64>);

fn size(key: &str, value: &[u8]) -> i64 {
    (key.len() + value.len()) as i64
}

/// Locks the namespace's usage row (made when missing) for the transaction: the namespace's
/// writers take turns. Returns the bytes it holds.
async fn lock_usage(tx: &deadpool_postgres::Transaction<'_>, namespace: &str) -> Result<i64> {
    tx.execute(
        "INSERT INTO kv_usage (namespace) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&namespace],
    )
    .await
    .map_err(db)?;
    Ok(tx
        .query_one(
            "SELECT bytes FROM kv_usage WHERE namespace = $1 FOR UPDATE",
            &[&namespace],
        )
        .await
        .map_err(db)?
        .get(0))
}

impl PgStore {
    pub fn kv_get(&self, namespace: &str, key: &str, now_ms: u64) -> Result<Option<Vec<u8>>> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT value FROM kv WHERE namespace = $1 AND key = $2
                     AND (expires_ms IS NULL OR expires_ms > $3)",
                    &[&namespace, &key, &(now_ms as i64)],
                )
                .await
                .map_err(db)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    pub fn kv_bytes(&self, namespace: &str) -> Result<u64> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT bytes FROM kv_usage WHERE namespace = $1",
                    &[&namespace],
                )
                .await
                .map_err(db)?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
        })
    }

    /// Replaces `key`'s entry with what `change` makes of the live one (None: absent or
    /// expired), within `quota` bytes. Ok(None): it did not fit, and nothing changed.
    pub fn kv_write(
        &self,
        namespace: &str,
        key: &str,
        now_ms: u64,
        quota: usize,
        change: impl FnOnce(Option<KvEntry>) -> KvEntry,
    ) -> Result<Option<()>> {
        let quota = quota.min(i64::MAX as usize) as i64;
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(db)?;
            let mut bytes = lock_usage(&tx, namespace).await?;
            let current = tx
                .query_opt(
                    "SELECT value, expires_ms FROM kv WHERE namespace = $1 AND key = $2",
                    &[&namespace, &key],
                )
                .await
                .map_err(db)?
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Option<i64>>(1)));
            let now = now_ms as i64;
            let mut old = current.as_ref().map_or(0, |(v, _)| size(key, v));
            let live = current
                .filter(|(_, e)| e.is_none_or(|e| e > now))
                .map(|(v, e)| (v, e.map(|e| e as u64)));
            let (value, expires) = change(live);
            let new = size(key, &value);
            if bytes - old + new > quota {
                // Expired entries make room first.
                let freed: i64 = tx
                    .query(
                        "DELETE FROM kv WHERE namespace = $1 AND expires_ms <= $2
                         RETURNING length(key) + length(value), key = $3",
                        &[&namespace, &now, &key],
                    )
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| {
                        if r.get::<_, bool>(1) {
                            old = 0;
                        }
                        i64::from(r.get::<_, i32>(0))
                    })
                    .sum();
                bytes -= freed;
                if bytes - old + new > quota {
                    // The purge is kept: it only dropped what had expired.
                    tx.execute(
                        "UPDATE kv_usage SET bytes = $2 WHERE namespace = $1",
                        &[&namespace, &bytes],
                    )
                    .await
                    .map_err(db)?;
                    tx.commit().await.map_err(db)?;
                    return Ok(None);
                }
            }
            tx.execute(
                "INSERT INTO kv (namespace, key, value, expires_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (namespace, key)
                 DO UPDATE SET value = EXCLUDED.value, expires_ms = EXCLUDED.expires_ms",
                &[&namespace, &key, &value, &expires.map(|e| e as i64)],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "UPDATE kv_usage SET bytes = $2 WHERE namespace = $1",
                &[&namespace, &(bytes - old + new)],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(Some(()))
        })
    }

    /// Removes `key`; true when it was there and live.
    pub fn kv_delete(&self, namespace: &str, key: &str, now_ms: u64) -> Result<bool> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(db)?;
            lock_usage(&tx, namespace).await?;
            let gone = tx
                .query_opt(
                    "DELETE FROM kv WHERE namespace = $1 AND key = $2
                     RETURNING length(key) + length(value), expires_ms",
                    &[&namespace, &key],
                )
                .await
                .map_err(db)?;
            let Some(gone) = gone else {
                tx.commit().await.map_err(db)?;
                return Ok(false);
            };
            let freed = i64::from(gone.get::<_, i32>(0));
            tx.execute(
                "UPDATE kv_usage SET bytes = bytes - $2 WHERE namespace = $1",
                &[&namespace, &freed],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok(gone
                .get::<_, Option<i64>>(1)
                .is_none_or(|e| e > now_ms as i64))
        })
    }
}
