//! The shared queue in the database (migration 5), for `[database] queue = true`: the rows
//! behind `queue::Spool` and `relay::state::StateDir` when several nodes share one queue.
//!
//! A node owns what it stored and what it took over, by lease. Every read and write of a row
//! is filtered by the owner, so a node whose lease ran out (it was cut off from the database
//! for longer than the lease) finds the message gone and drops it rather than deliver it
//! beside the node that took it over.

use std::sync::Arc;
use std::time::Duration;

use super::{db, PgStore, Result};

/// A message to queue: id, envelope (JSON) and bytes.
pub type QueueRow = (String, String, Arc<Vec<u8>>);

impl PgStore {
    /// Stores a batch of messages in one transaction, leased to this node: one commit (one
    /// flush of the write-ahead log) for every session that was waiting.
    pub fn queue_insert(&self, rows: &[QueueRow], lease: Duration) -> Result<()> {
        self.block(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let insert = tx
                .prepare(
                    "INSERT INTO queue (id, envelope, message, lease_owner, lease_until)
                     VALUES ($1, $2, $3, $4, now() + $5 * interval '1 second')",
                )
                .await
                .map_err(db)?;
            let seconds = lease.as_secs_f64();
            for (id, envelope, message) in rows {
                tx.execute(
                    &insert,
                    &[id, envelope, &message.as_slice(), &self.node, &seconds],
                )
                .await
                .map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
    }

    /// One row of a message this node holds, read with `columns`; None when it is not (or no
    /// longer) this node's.
    fn held_row(&self, id: &str, columns: &str) -> Result<Option<tokio_postgres::Row>> {
        self.block(async {
            let c = self.client().await?;
            c.query_opt(
                &format!("SELECT {columns} FROM queue WHERE id = $1 AND lease_owner = $2"),
                &[&id, &self.node],
            )
            .await
            .map_err(db)
        })
    }

    /// A message this node holds: envelope (JSON) and bytes; None when it is not (or no longer)
    /// this node's.
    pub fn queue_read(&self, id: &str) -> Result<Option<(String, Vec<u8>)>> {
        Ok(self
            .held_row(id, "envelope, message")?
            .map(|r| (r.get(0), r.get(1))))
    }

    /// Replaces the envelope and bytes of a message this node holds (the after-queue filter
    /// changed it). False when it holds it no longer.
    pub fn queue_replace(&self, id: &str, envelope: &str, message: &[u8]) -> Result<bool> {
        self.block(async {
            let c = self.client().await?;
            let n = c
                .execute(
                    "UPDATE queue SET envelope = $3, message = $4 WHERE id = $1 AND lease_owner = $2",
                    &[&id, &self.node, &envelope, &message],
                )
                .await
                .map_err(db)?;
            Ok(n == 1)
        })
    }

    /// Removes delivered messages this node holds.
    pub fn queue_delete(&self, ids: &[String]) -> Result<()> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "DELETE FROM queue WHERE id = ANY($1) AND lease_owner = $2",
                &[&ids, &self.node],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    /// The per-recipient delivery state (JSON) of a message this node holds, if one was saved.
    pub fn queue_state(&self, id: &str) -> Result<Option<String>> {
        Ok(self.held_row(id, "state")?.and_then(|r| r.get(0)))
    }

    /// Replaces the delivery state of a message this node holds. False when it holds it no
    /// longer.
    pub fn queue_save_state(&self, id: &str, state: &str) -> Result<bool> {
        self.block(async {
            let c = self.client().await?;
            let n = c
                .execute(
                    "UPDATE queue SET state = $3 WHERE id = $1 AND lease_owner = $2",
                    &[&id, &self.node, &state],
                )
                .await
                .map_err(db)?;
            Ok(n == 1)
        })
    }

    /// Renews the leases of everything this node holds. Returns how many.
    pub fn queue_renew(&self, lease: Duration) -> Result<u64> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "UPDATE queue SET lease_until = now() + $2 * interval '1 second'
                 WHERE lease_owner = $1",
                &[&self.node, &lease.as_secs_f64()],
            )
            .await
            .map_err(db)
        })
    }

    /// Takes over up to `limit` messages whose lease ran out (their node died, or restarted
    /// under a new name), oldest lease first; rows another node is taking at the same moment
    /// are skipped, not waited for. Returns their ids.
    pub fn queue_claim(&self, lease: Duration, limit: i64) -> Result<Vec<String>> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "UPDATE queue q SET lease_owner = $1,
                         lease_until = now() + $2 * interval '1 second'
                     FROM (SELECT id FROM queue WHERE lease_until < now() AND lease_owner <> $1
                           ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED) expired
                     WHERE q.id = expired.id
                     RETURNING q.id",
                    &[&self.node, &lease.as_secs_f64(), &limit],
                )
                .await
                .map_err(db)?;
            let mut ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            ids.sort();
            Ok(ids)
        })
    }
}
