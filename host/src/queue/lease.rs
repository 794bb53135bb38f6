//! Leases on the shared queue (`[database] queue = true`): a node holds the rows it stored or
//! took over for `lease_seconds` at a time and renews them while it lives; other nodes take
//! over what a dead node's lease left.
//!
//! A lease is only as good as its last renewal. A node that is alive but cut off from the
//! database, or starved of CPU (or stopped), may find its lease run out in the middle of a
//! delivery, and another node that took the message over would then send a second copy. So a
//! node fences itself ([`Hold`]): it starts no delivery unless its last successful renewal
//! began less than half a lease ago, and each delivery carries the [`Ticket`] it started
//! with, checked again before the final dot. The other half of the lease is the margin for
//! the remote server's reply and the commit of the outcome. A renewal that comes more than a
//! whole lease after the one before it may find rows already taken over, so it voids every
//! ticket given out before it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{recovered, Queued, Spool};

/// Whether this node may still act on what it holds in the shared queue. Cheap to clone; with
/// the file spool it always may (nobody else can take its messages).
#[derive(Clone, Default)]
pub struct Hold(Option<Arc<Renewals>>);

struct Renewals {
    lease: Duration,
    /// When the last successful renewal began (the database's clock ran it no earlier, so the
    /// lease lasts at least `lease` from then), and how many times the lease ran out between
    /// two renewals.
    last: Mutex<(Instant, u64)>,
}

/// Leave to deliver, given while the hold was fresh.
#[derive(Clone)]
pub struct Ticket {
    hold: Hold,
    lapses: u64,
}

impl Hold {
    /// A hold on leases of `lease` each, counted as renewed now: every row this node holds is
    /// leased from the moment it stored or took it, which is later than this.
    pub fn leased(lease: Duration) -> Hold {
        Hold(Some(Arc::new(Renewals {
            lease,
            last: Mutex::new((Instant::now(), 0)),
        })))
    }

    /// Records a successful renewal that began at `started`.
    pub fn renewed(&self, started: Instant) {
        if let Some(r) = &self.0 {
            let mut last = r.last.lock().expect("lease renewals");
            if started > last.0 {
                if started - last.0 > r.lease {
                    last.1 += 1;
                }
                last.0 = started;
            }
        }
    }

    /// (fresh, lapses so far).
    fn state(&self) -> (bool, u64) {
        match &self.0 {
            None => (true, 0),
            Some(r) => {
                let last = r.last.lock().expect("lease renewals");
                (last.0.elapsed() < r.lease / 2, last.1)
            }
        }
    }

    /// Leave to start a delivery, while the last renewal began less than half a lease ago.
    pub fn ticket(&self) -> Option<Ticket> {
        let (fresh, lapses) = self.state();
        fresh.then(|| Ticket {
            hold: self.clone(),
            lapses,
        })
    }
}

impl Ticket {
    /// Still good: the hold is fresh and the lease has not run out since the ticket was given.
    pub fn valid(&self) -> bool {
        let (fresh, lapses) = self.hold.state();
        fresh && lapses == self.lapses
    }
}

/// While the queue is shared through the database: renews this node's leases every third of the
/// lease, and takes over the messages of nodes whose leases ran out, handing them to the
/// scheduler as recovered (their delivery states say what is still owed). Returns at once for
/// the file spool.
pub async fn keep_leases(spool: Spool, scheduler: mpsc::Sender<Queued>) {
    let Some((store, lease)) = spool.database() else {
        return;
    };
    // Renewing never waits behind a busy scheduler: a lease must not run out because this
    // node is slow to take on more work.
    let renewing = store.clone();
    let hold = spool.hold();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lapsed = false;
        loop {
            tick.tick().await;
            let store = renewing.clone();
            let started = Instant::now();
            match tokio::task::spawn_blocking(move || store.queue_renew(lease)).await {
                Ok(Ok(_)) => {
                    hold.renewed(started);
                    if std::mem::take(&mut lapsed) {
                        tracing::info!("queue: leases renewed; deliveries resume");
                    }
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "queue: cannot renew this node's leases")
                }
                Err(_) => {}
            }
            if hold.ticket().is_none() && !lapsed {
                lapsed = true;
                tracing::warn!(
                    "queue: this node's leases were not renewed for half a lease; no delivery starts until they are"
                );
            }
        }
    });
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the start has just claimed what had expired (`Spool::list`).
    tick.tick().await;
    loop {
        tick.tick().await;
        let (store, spool) = (store.clone(), spool.clone());
        let taken = tokio::task::spawn_blocking(move || {
            // What could not be read before (the database was down), then what dead nodes left.
            let mut ids = spool.take_deferred();
            match store.queue_claim(lease, 100) {
                Ok(claimed) => ids.extend(claimed),
                Err(err) => {
                    tracing::warn!(error = %err, "queue: cannot take over expired leases")
                }
            }
            recovered(&spool, &ids)
        })
        .await
        .unwrap_or_default();
        if !taken.is_empty() {
            tracing::info!(
                count = taken.len(),
                "queue: took over messages of a node whose lease ran out"
            );
        }
        for queued in taken {
            if scheduler.send(queued).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_lapse_half_a_lease_after_the_last_renewal() {
        assert!(Hold::default().ticket().is_some_and(|t| t.valid()));
        let hold = Hold::leased(Duration::from_millis(200));
        let ticket = hold.ticket().expect("fresh at first");
        std::thread::sleep(Duration::from_millis(120));
        assert!(!ticket.valid(), "half the lease passed with no renewal");
        assert!(hold.ticket().is_none());
        // Renewed within the lease: the rows are still this node's, the ticket good again.
        hold.renewed(Instant::now());
        assert!(ticket.valid());
        // An older renewal finishing late does not move the hold back.
        hold.renewed(Instant::now() - Duration::from_millis(150));
        assert!(ticket.valid());
    }

    #[test]
    fn a_renewal_after_the_lease_ran_out_voids_earlier_tickets() {
        let hold = Hold::leased(Duration::from_millis(100));
        let ticket = hold.ticket().expect("fresh at first");
        std::thread::sleep(Duration::from_millis(150));
        // Another node may have taken rows over meanwhile: what was under way must not go on.
        hold.renewed(Instant::now());
        assert!(!ticket.valid());
        assert!(hold.ticket().is_some_and(|t| t.valid()));
    }
}
