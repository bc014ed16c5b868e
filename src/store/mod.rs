//! Storage: the small transactional interface that the allocation policy runs over, and its
//! two implementations, a SQLite file shared by processes and a map in memory.
//!
//! A store knows nothing of probes or choices: it finds, inserts and deletes rows. Every
//! call on a [`Tx`] happens inside one transaction that commits as a whole or not at all.

pub(crate) mod memory;
pub(crate) mod sqlite;

use std::time::SystemTime;

use crate::error::Result;
use crate::lease::Lease;
use crate::range::PortRange;

/// One transaction on a store.
pub(crate) trait Tx {
    /// The lease on `port`, if any (live or not).
    fn lease_on(&mut self, port: u16) -> Result<Option<Lease>>;

    /// The port `name` had last.
    fn remembered_port(&mut self, name: &str) -> Result<Option<u16>>;

    /// The lowest port in `from..=to` with no lease on it and, when `avoid_remembered`, no
    /// name remembering it.
    fn first_vacant(&mut self, from: u16, to: u16, avoid_remembered: bool) -> Result<Option<u16>>;

    /// Adds a lease; its port must be vacant.
    fn insert_lease(&mut self, lease: &Lease) -> Result<()>;

    /// Records `port` as the last port of `name`; other names that remembered it forget it.
    fn remember(&mut self, name: &str, port: u16, at: SystemTime) -> Result<()>;

    /// Deletes the lease on `port` if its id is `id`; whether there was one.
    fn delete_lease(&mut self, port: u16, id: u64) -> Result<bool>;

    /// Deletes the lease on `port`; whether there was one.
    fn delete_port(&mut self, port: u16) -> Result<bool>;

    /// Removes the owner of the lease on `port` if its id is `id`; whether there was one.
    fn detach(&mut self, port: u16, id: u64) -> Result<bool>;

    /// All leases, or those in `range`, oldest first.
    fn leases(&mut self, range: Option<PortRange>) -> Result<Vec<Lease>>;

    /// Where the next search of the range starts.
    fn cursor(&mut self) -> Result<Option<u16>>;

    /// Moves the search start.
    fn set_cursor(&mut self, port: u16) -> Result<()>;
}

/// The lowest port of `from..=to` that neither ascending stream of occupied ports contains.
///
/// Reads only as far as the first gap, so a search among spread-out leases touches a few rows.
pub(crate) fn first_gap<A, B>(from: u16, to: u16, mut a: A, mut b: B) -> Result<Option<u16>>
where
    A: Iterator<Item = Result<u16>>,
    B: Iterator<Item = Result<u16>>,
{
    let mut candidate = u32::from(from);
    let mut next_a = a.next().transpose()?;
    let mut next_b = b.next().transpose()?;
    while candidate <= u32::from(to) {
        while next_a.is_some_and(|p| u32::from(p) < candidate) {
            next_a = a.next().transpose()?;
        }
        while next_b.is_some_and(|p| u32::from(p) < candidate) {
            next_b = b.next().transpose()?;
        }
        let taken = |next: Option<u16>| next.is_some_and(|p| u32::from(p) == candidate);
        if !taken(next_a) && !taken(next_b) {
            return Ok(u16::try_from(candidate).ok());
        }
        candidate += 1;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(from: u16, to: u16, a: &[u16], b: &[u16]) -> Option<u16> {
        first_gap(
            from,
            to,
            a.iter().copied().map(Ok),
            b.iter().copied().map(Ok),
        )
        .unwrap()
    }

    #[test]
    fn finds_the_first_hole_across_both_streams() {
        assert_eq!(gap(10, 20, &[], &[]), Some(10));
        assert_eq!(gap(10, 20, &[10, 11, 13], &[12]), Some(14));
        assert_eq!(gap(10, 20, &[10, 12], &[10, 11]), Some(13));
        assert_eq!(gap(10, 12, &[10, 11, 12], &[]), None);
        assert_eq!(gap(65534, 65535, &[65534, 65535], &[]), None);
        assert_eq!(gap(65534, 65535, &[65534], &[]), Some(65535));
    }
}
