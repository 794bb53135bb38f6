//! A message body being received, held in memory against the server-wide budget (`budget`).
//! A body that cannot get more budget is refused with 452 4.3.1 at its end (the client may retry
//! later) instead of growing memory.

use crate::budget::{MemoryBudget, Reservation};

/// Budget is taken in steps, not per byte.
const STEP: usize = 64 * 1024;

pub struct BodyBuffer {
    pub bytes: Vec<u8>,
    budget: MemoryBudget,
    reserved: Reservation,
    exhausted: bool,
}

impl BodyBuffer {
    pub fn new(budget: MemoryBudget) -> BodyBuffer {
        BodyBuffer {
            bytes: Vec::new(),
            budget,
            reserved: Reservation::empty(),
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
        let needed = self.bytes.len() + data.len();
        if self.reserved.bytes() < needed {
            let step = STEP.max(needed - self.reserved.bytes());
            match self.budget.try_reserve(step) {
                Some(more) => self.reserved.merge(more),
                None => {
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
        let budget = MemoryBudget::new(128 * 1024);
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
