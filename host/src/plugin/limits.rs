//! What one plugin instance may hold: its linear memories and tables counted together against
//! its `memory_mb`, and at most so many instances, memories and tables.
//!
//! wasmtime's `StoreLimits` caps each linear memory on its own, and an instance may have 64 of
//! them (componentize-py components carry dozens of core modules), so a plugin could take 64
//! times its cap. This limiter sums: every growth of any memory or table of the store is checked
//! against what all of them hold already.

use wasmtime::ResourceLimiter;

/// Bytes a table element is counted as (a function reference: a pointer and some).
const TABLE_ELEMENT_BYTES: usize = 16;

/// Instances, memories and tables one store may create (componentize-py needs dozens).
const MAX_PARTS: usize = 64;

pub struct InstanceLimits {
    cap: usize,
    /// Bytes held by every memory and table of the store.
    held: usize,
}

impl InstanceLimits {
    pub fn new(cap_bytes: usize) -> InstanceLimits {
        InstanceLimits {
            cap: cap_bytes,
            held: 0,
        }
    }

    /// Bytes all memories and tables hold now.
    pub fn held(&self) -> usize {
        self.held
    }

    fn grow(&mut self, more: usize, what: &str) -> wasmtime::Result<bool> {
        match self.held.checked_add(more) {
            Some(total) if total <= self.cap => {
                self.held = total;
                Ok(true)
            }
            // A trap, not a failed grow: the plugin is contained by its on_error policy
            // instead of running on with a memory.grow of -1 it may not check.
            _ => Err(wasmtime::format_err!(
                "{what} would take the plugin past its memory limit of {} MiB (all memories and tables together)",
                self.cap >> 20
            )),
        }
    }
}

impl ResourceLimiter for InstanceLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        self.grow(desired.saturating_sub(current), "growing a memory")
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let more = desired
            .saturating_sub(current)
            .saturating_mul(TABLE_ELEMENT_BYTES);
        self.grow(more, "growing a table")
    }

    fn instances(&self) -> usize {
        MAX_PARTS
    }

    fn tables(&self) -> usize {
        MAX_PARTS
    }

    fn memories(&self) -> usize {
        MAX_PARTS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memories_and_tables_count_together() {
        let mut limits = InstanceLimits::new(4 << 20);
        assert!(limits.memory_growing(0, 2 << 20, None).unwrap());
        // A second memory of 2 MiB fits exactly; a third does not, though each alone would.
        assert!(limits.memory_growing(0, 2 << 20, None).unwrap());
        assert!(limits.memory_growing(0, 64 << 10, None).is_err());
        assert!(limits.table_growing(0, 1, None).is_err());
        assert_eq!(limits.held(), 4 << 20);
        assert!(!limits.memory_growing(0, 10, Some(5)).unwrap());
    }

    /// A module with three memories, each growing within its own bound, is stopped when all
    /// three together pass the cap (StoreLimits let each take the whole cap).
    #[test]
    fn a_plugin_cannot_multiply_its_cap_with_more_memories() {
        let wasm = wat::parse_str(
            r#"(module
                (memory $a 1) (memory $b 1) (memory $c 1)
                (func (export "grow") (param $mem i32) (result i32)
                  (if (result i32) (i32.eq (local.get $mem) (i32.const 0))
                    (then (memory.grow $a (i32.const 96)))
                    (else (if (result i32) (i32.eq (local.get $mem) (i32.const 1))
                      (then (memory.grow $b (i32.const 96)))
                      (else (memory.grow $c (i32.const 96))))))))"#,
        )
        .unwrap();
        let engine = wasmtime::Engine::default();
        let module = wasmtime::Module::new(&engine, &wasm).unwrap();
        let mut store = wasmtime::Store::new(&engine, InstanceLimits::new(16 << 20));
        store.limiter(|limits| limits);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let grow = instance
            .get_typed_func::<i32, i32>(&mut store, "grow")
            .unwrap();
        // 96 pages are 6 MiB: two memories grown fit in 16 MiB, the third does not.
        assert_eq!(grow.call(&mut store, 0).unwrap(), 1);
        assert_eq!(grow.call(&mut store, 1).unwrap(), 1);
        let err = grow.call(&mut store, 2).unwrap_err();
        assert!(format!("{err:?}").contains("memory limit"), "{err:?}");
        assert!(store.data().held() <= 16 << 20);
    }
}
