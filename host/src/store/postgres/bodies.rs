//! Where message bodies live: the one interface the PostgreSQL store reads and writes bodies
//! through, so a store outside the database (an S3-compatible one) can follow.
//!
//! A message row points at a `bodies` row (one per body, however many recipients or copies
//! share it). That row holds the bytes themselves ([`InDatabase`], the default: written in the
//! transaction that stores the message, so a body is committed exactly when its message is), or
//! the `location` a [`BodyStore`] gave for bytes it keeps. For such a store:
//! - `put` runs before the transaction commits: a transaction that then fails leaves an object
//!   no row points at (harmless, and what a sweep of unreferenced objects would remove), never a
//!   row pointing at nothing;
//! - `delete` runs only after the transaction that dropped the last reference committed, so a
//!   failed expunge never loses a body a message still points at.

use super::Result;

/// Bodies kept outside the database. Calls are made from the store's blocking calls.
pub trait BodyStore: Send + Sync {
    /// Keeps `bytes`; returns where, or None to keep them in the database row.
    fn put(&self, bytes: &[u8]) -> Result<Option<String>>;
    /// The bytes kept at `location`.
    fn get(&self, location: &str) -> Result<Vec<u8>>;
    /// Forgets bodies no message points at any more (already committed).
    fn delete(&self, locations: &[String]) -> Result<()>;
}

/// The default: bodies in the `bodies` table, in the message's own transaction.
pub struct InDatabase;

impl BodyStore for InDatabase {
    fn put(&self, _bytes: &[u8]) -> Result<Option<String>> {
        Ok(None)
    }

    fn get(&self, location: &str) -> Result<Vec<u8>> {
        // No row of this store has a location.
        Err(super::StoreError::Gone(location.to_string()))
    }

    fn delete(&self, _locations: &[String]) -> Result<()> {
        Ok(())
    }
}
