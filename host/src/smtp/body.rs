//! A message body being received, held in memory against a server-wide budget.
//!
//! Every session's body counts against one semaphore (KiB permits), so the memory all sessions
//! can pin is bounded whatever the number of connections. A body that cannot get more budget is
//! refused with 452 4.3.1 at its end (the client may retry later) instead of growing memory.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const UNIT: usize = 1024;
/// Budget is taken in steps, not per byte.
const STEP_UNITS: u32 = 64;

pub fn budget_permits(bytes: usize) -> usize {
    (bytes / UNIT).min(Semaphore::MAX_PERMITS)
}

pub struct BodyBuffer {
    pub bytes: Vec<u8>,
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    reserved_units: u32,
    exhausted: bool,
}

impl BodyBuffer {
    pub fn new(budget: Arc<Semaphore>) -> BodyBuffer {
        BodyBuffer {
            bytes: Vec::new(),
            budget,
            permit: None,
            reserved_units: 0,
            exhausted: false,
        }
    }

    /// True when the budget ran out; the body is then incomplete and must be refused.
    pub fn exhausted(&self) -> bool {
        self.exhausted
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Appends if the budget allows; otherwise drops the data and marks the body exhausted.
    pub fn append(&mut self, data: &[u8]) {
        if self.exhausted || data.is_empty() {
            return;
        }
        let needed_units = (self.bytes.len() + data.len()).div_ceil(UNIT) as u32;
        while self.reserved_units < needed_units {
            let step = STEP_UNITS.max(needed_units - self.reserved_units);
            match self.budget.clone().try_acquire_many_owned(step) {
                Ok(permit) => {
                    self.reserved_units += step;
                    match &mut self.permit {
                        Some(held) => held.merge(permit),
                        None => self.permit = Some(permit),
                    }
                }
                Err(_) => {
                    self.exhausted = true;
                    self.bytes = Vec::new();
                    return;
                }
            }
        }
        self.bytes.extend_from_slice(data);
    }

    /// Hands the bytes over (the budget is released when the buffer drops).
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_shared_and_released() {
        let budget = Arc::new(Semaphore::new(128));
        let mut a = BodyBuffer::new(budget.clone());
        a.append(&[0u8; 100 * 1024]);
        assert!(!a.exhausted());
        let mut b = BodyBuffer::new(budget.clone());
        b.append(&[0u8; 64 * 1024]);
        assert!(b.exhausted(), "only 28 KiB left");
        drop(a);
        let mut c = BodyBuffer::new(budget.clone());
        c.append(&[0u8; 64 * 1024]);
        assert!(!c.exhausted());
    }
}
