//! The durable queue: spool (accepted, fsynced messages), the after-queue filter and the
//! scheduler that delivers them.

pub mod envelope;
pub mod filter;
pub mod lease;
pub mod scheduler;
pub mod spool;

use std::sync::Arc;

use tokio::sync::mpsc;

pub use envelope::{Dsn, Envelope, Notify, QueueId, Recipient, Ret, Route};
pub use lease::{keep_leases, Hold, Ticket};
pub use spool::{Spool, SpoolError};

/// Messages up to this size travel to the scheduler in memory; larger ones are read back from the
/// spool, so a stalled scheduler never pins more than channel capacity × this much memory.
pub const IN_MEMORY_HANDOFF: usize = 256 * 1024;

/// A message handed to the scheduler, with its bytes when they are still in memory.
#[derive(Debug)]
pub struct Queued {
    pub envelope: Envelope,
    /// None: read it from the spool.
    pub message: Option<Arc<Vec<u8>>>,
    /// Recovered from the spool after a restart, or a retry: an earlier attempt may have
    /// stored a copy already.
    pub retry: bool,
}

/// The sessions' door to the queue.
#[derive(Clone)]
pub struct Queue {
    spool: Spool,
    scheduler: mpsc::Sender<Queued>,
}

/// Reads messages back from the spool for the scheduler, as recovered (an earlier attempt may
/// have delivered some recipients). Blocking; one that cannot be read is left where it is.
pub fn recovered(spool: &Spool, ids: &[QueueId]) -> Vec<Queued> {
    ids.iter()
        .filter_map(|id| match spool.read(id) {
            Ok((envelope, message)) => Some(Queued {
                envelope,
                message: Some(Arc::new(message)),
                retry: true,
            }),
            Err(SpoolError::Gone(_)) => None,
            Err(err) => {
                tracing::error!(queue_id = %id, "cannot read spooled message: {err}");
                spool.defer(id);
                None
            }
        })
        .collect()
}

impl Queue {
    pub fn new(spool: Spool, scheduler: mpsc::Sender<Queued>) -> Queue {
        Queue { spool, scheduler }
    }

    pub fn new_id(&self) -> QueueId {
        self.spool.new_id()
    }

    /// Makes the message durable, then hands it to the scheduler. When this returns Ok the
    /// message may be acknowledged: it survives a crash from here on.
    pub async fn submit(
        &self,
        envelope: Envelope,
        message: Arc<Vec<u8>>,
    ) -> Result<(), SpoolError> {
        self.spool.store(&envelope, message.clone()).await?;
        let message = (message.len() <= IN_MEMORY_HANDOFF).then_some(message);
        // A full channel slows acceptance down to the delivery rate instead of growing memory.
        // If the scheduler is gone (shutdown), the message is in the spool and recovered at start.
        let _ = self
            .scheduler
            .send(Queued {
                envelope,
                message,
                retry: false,
            })
            .await;
        Ok(())
    }
}
