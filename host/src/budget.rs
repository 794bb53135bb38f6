//! The server-wide memory budget for message data in flight: SMTP bodies being received, IMAP
//! literals being read and FETCH responses being written all count against it, so the memory
//! that all sessions together can pin is bounded whatever the number of connections. A request
//! past it is refused (`452 4.3.1`, `NO [LIMIT]`), never an out-of-memory kill.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget counts in KiB.
const UNIT: usize = 1024;

#[derive(Clone)]
pub struct MemoryBudget(Arc<Semaphore>);

/// Memory taken from the budget; it goes back when this drops.
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    units: usize,
}

fn units(bytes: usize) -> u32 {
    bytes
        .div_ceil(UNIT)
        .min(Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize) as u32
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> MemoryBudget {
        MemoryBudget(Arc::new(Semaphore::new(
            (bytes / UNIT).min(Semaphore::MAX_PERMITS),
        )))
    }

    /// Takes `bytes` now, or nothing if the budget has not that much left.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        let units = units(bytes);
        if units == 0 {
            return Some(Reservation::empty());
        }
        let permit = self.0.clone().try_acquire_many_owned(units).ok()?;
        Some(Reservation {
            permit: Some(permit),
            units: units as usize,
        })
    }

    /// Takes `bytes`, waiting up to `wait` for other sessions to give memory back.
    pub async fn reserve(&self, bytes: usize, wait: Duration) -> Option<Reservation> {
        let units = units(bytes);
        if units == 0 {
            return Some(Reservation::empty());
        }
        let acquire = self.0.clone().acquire_many_owned(units);
        match tokio::time::timeout(wait, acquire).await {
            Ok(Ok(permit)) => Some(Reservation {
                permit: Some(permit),
                units: units as usize,
            }),
            _ => None,
        }
    }

    /// What is left, in bytes (for tests and metrics).
    pub fn available(&self) -> usize {
        self.0.available_permits() * UNIT
    }
}

impl Reservation {
    pub fn empty() -> Reservation {
        Reservation {
            permit: None,
            units: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.units * UNIT
    }

    /// Adds another reservation to this one.
    pub fn merge(&mut self, other: Reservation) {
        self.units += other.units;
        match (&mut self.permit, other.permit) {
            (Some(held), Some(more)) => held.merge(more),
            (held @ None, more) => *held = more,
            (Some(_), None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_and_given_back() {
        let budget = MemoryBudget::new(128 * 1024);
        let a = budget.try_reserve(100 * 1024).unwrap();
        assert!(budget.try_reserve(64 * 1024).is_none(), "only 28 KiB left");
        drop(a);
        let mut b = budget.try_reserve(64 * 1024).unwrap();
        b.merge(budget.try_reserve(1).unwrap());
        assert_eq!(b.bytes(), 65 * 1024);
        assert_eq!(budget.available(), 63 * 1024);
    }
}
