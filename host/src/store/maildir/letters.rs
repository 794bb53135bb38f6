//! Flags as Maildir writes them in file names: the system flags' capital letters and up to 26
//! keywords as the lower-case letters `a`..`z`, each a slot of the folder's keyword table
//! ([`super::keywords`]). This is Maildir's own shape; the mailbox contract sees flags and
//! keyword names ([`Flags`], [`Keywords`]), converted at the edge of this module.

use crate::store::{Flags, Keywords};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Letters(u64);

impl Letters {
    /// Keyword slots per folder: Maildir has 26 letters for them.
    pub const MAX_KEYWORDS: usize = 26;
    const KEYWORD_SHIFT: usize = 32;

    pub const fn empty() -> Letters {
        Letters(0)
    }
    /// The system flags, as the contract has them.
    pub fn system(self) -> Flags {
        Flags::from_bits((self.0 & 0xff) as u8)
    }
    pub fn from_system(flags: Flags) -> Letters {
        Letters(u64::from(flags.bits()))
    }
    /// The keyword in slot `slot` of the folder's table (`slot < MAX_KEYWORDS`).
    pub fn keyword(slot: usize) -> Letters {
        debug_assert!(slot < Self::MAX_KEYWORDS);
        Letters(1 << (Self::KEYWORD_SHIFT + slot))
    }
    /// The keyword slots set, in increasing order.
    pub fn keyword_slots(self) -> impl Iterator<Item = usize> {
        (0..Self::MAX_KEYWORDS).filter(move |slot| self.contains(Letters::keyword(*slot)))
    }
    /// The keywords by name; a letter the table does not name (written by another tool) is
    /// left out.
    pub fn keywords(self, table: &[String]) -> Keywords {
        Keywords::from_names(
            self.keyword_slots()
                .filter_map(|slot| table.get(slot))
                .filter(|name| !name.starts_with('\\')),
        )
    }
    pub fn bits(self) -> u64 {
        self.0
    }
    pub const fn from_bits(bits: u64) -> Letters {
        Letters(bits)
    }
    pub fn contains(self, other: Letters) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn union(self, other: Letters) -> Letters {
        Letters(self.0 | other.0)
    }
    pub fn without(self, other: Letters) -> Letters {
        Letters(self.0 & !other.0)
    }
}
