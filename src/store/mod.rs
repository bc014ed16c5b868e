//! Storage: the small transactional interface that the allocation policy runs over, and its
//! two implementations, a SQLite file shared by processes and a map in memory.
//!
//! A store knows nothing of probes or choices: it finds, inserts and deletes rows. Every
//! call on a [`Tx`] happens inside one transaction that commits as a whole or not at all.

pub(crate) mod memory;
pub(crate) mod sqlite;

use std::time::SystemTime;

use crate::error::Result;
use crate::lease::{Lease, Owner};
use crate::range::PortRange;

/// One transaction on a store.
pub(crate) trait Tx {
    /// The lease that holds `port`, if any (live or not): one on that port, or a block
    /// that starts below it and runs over it.
    fn lease_on(&mut self, port: u16) -> Result<Option<Lease>>;

    /// The port `name` had last, and when the name last recorded it ([`remember`]).
    ///
    /// [`remember`]: Tx::remember
    fn remembered_port(&mut self, name: &str) -> Result<Option<(u16, SystemTime)>>;

    /// The lowest port in `from..=to` that no lease holds and, when `avoid_remembered`, no
    /// name remembers.
    fn first_vacant(&mut self, from: u16, to: u16, avoid_remembered: bool) -> Result<Option<u16>>;

    /// Adds a lease; its ports must be vacant.
    fn insert_lease(&mut self, lease: &Lease) -> Result<()>;

    /// Records `port` as the last port of `name`, used `at`; other names that remembered it
    /// forget it.
    fn remember(&mut self, name: &str, port: u16, at: SystemTime) -> Result<()>;

    /// Forgets the `count` memories of ports in `range` that no lease holds and that were
    /// recorded longest ago (ties broken by name); how many were forgotten.
    fn forget_oldest(&mut self, range: PortRange, count: usize) -> Result<usize>;

    /// Deletes the lease on `port` if its id is `id`; whether there was one.
    fn delete_lease(&mut self, port: u16, id: u64) -> Result<bool>;

    /// Deletes the lease that holds `port`; whether there was one.
    fn delete_port(&mut self, port: u16) -> Result<bool>;

    /// Removes the owner of the lease on `port` if its id is `id`; whether there was one.
    fn detach(&mut self, port: u16, id: u64) -> Result<bool>;

    /// Records `owner` as the owner of the lease on `port` if its id is `id`, changing
    /// nothing else of it; whether there was one.
    fn set_owner(&mut self, port: u16, id: u64, owner: Option<&Owner>) -> Result<bool>;

    /// Starts the lease on `port` again at `acquired_at`, to expire at `expires_at`, if its
    /// id is `id`, changing nothing else of it; whether there was one.
    fn restart(
        &mut self,
        port: u16,
        id: u64,
        acquired_at: SystemTime,
        expires_at: Option<SystemTime>,
    ) -> Result<bool>;

    /// All leases, or those holding a port of `range`, oldest first.
    fn leases(&mut self, range: Option<PortRange>) -> Result<Vec<Lease>>;

    /// Where the next search of the range starts.
    fn cursor(&mut self) -> Result<Option<u16>>;

    /// Moves the search start.
    fn set_cursor(&mut self, port: u16) -> Result<()>;

    /// The ranges reserved for the whole registry, by first port, with when each was added.
    fn reservations(&mut self) -> Result<Vec<(PortRange, SystemTime)>>;

    /// Records `range` as reserved since `at`; it must not overlap a reserved range.
    fn insert_reservation(&mut self, range: PortRange, at: SystemTime) -> Result<()>;

    /// Deletes the reserved range that starts at `first`; whether there was one.
    fn delete_reservation(&mut self, first: u16) -> Result<bool>;

    /// Adds `by` to a persisted counter: one statement.
    fn count(&mut self, counter: Counter, by: u64) -> Result<()>;

    /// The value of a persisted counter (0 if never counted).
    fn counter(&mut self, counter: Counter) -> Result<u64>;
}

/// The counters a registry keeps about itself, behind [`crate::Stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Counter {
    /// Leases handed out.
    Acquired,
    /// Leases released by their holder or by port or name.
    Released,
    /// Leases reclaimed because their owner died or their expiry passed.
    Reaped,
    /// Claims that failed because the range was full.
    Exhausted,
    /// Claims that failed for any other reason.
    Errors,
}

impl Counter {
    /// Every counter.
    pub(crate) const ALL: [Counter; 5] = [
        Counter::Acquired,
        Counter::Released,
        Counter::Reaped,
        Counter::Exhausted,
        Counter::Errors,
    ];

    /// The counter's key in the store.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Counter::Acquired => "count.acquired",
            Counter::Released => "count.released",
            Counter::Reaped => "count.reaped",
            Counter::Exhausted => "count.exhausted",
            Counter::Errors => "count.errors",
        }
    }
}

/// What one transaction counted, recorded in the store in one place ([`Tally::record`]) as
/// the transaction ends: each counter is one statement however often it was bumped.
#[derive(Debug, Default)]
pub(crate) struct Tally([std::cell::Cell<u64>; Counter::ALL.len()]);

impl Tally {
    /// Adds `by` to `counter`, to be recorded with the transaction.
    pub(crate) fn add(&self, counter: Counter, by: u64) {
        let slot = &self.0[counter as usize];
        slot.set(slot.get().saturating_add(by));
    }

    /// Adds what was counted to the store's counters, in the transaction `tx`: the only
    /// place that bumps them.
    pub(crate) fn record(&self, tx: &mut dyn Tx) -> Result<()> {
        for counter in Counter::ALL {
            let by = self.0[counter as usize].take();
            if by > 0 {
                tx.count(counter, by)?;
            }
        }
        Ok(())
    }
}

/// Every port held by leases given as ascending, non-overlapping `(first port, length)`
/// pairs, in ascending order.
pub(crate) fn held_ports<I>(mut blocks: I) -> impl Iterator<Item = Result<u16>>
where
    I: Iterator<Item = Result<(u16, u16)>>,
{
    // The ports `next..=last` of the current block are still to come.
    let (mut next, mut last) = (1u32, 0u32);
    std::iter::from_fn(move || {
        while next > last {
            match blocks.next()? {
                Ok((first, len)) => {
                    next = u32::from(first);
                    last = (next + u32::from(len.max(1)) - 1).min(u32::from(u16::MAX));
                }
                Err(e) => return Some(Err(e)),
            }
        }
        let port = next as u16;
        next += 1;
        Some(Ok(port))
    })
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
    fn blocks_expand_to_every_port_they_hold() {
        let ports: Vec<u16> = held_ports([Ok((10, 1)), Ok((12, 3)), Ok((65534, 2))].into_iter())
            .map(Result::unwrap)
            .collect();
        assert_eq!(ports, [10, 12, 13, 14, 65534, 65535]);
        assert_eq!(
            gap(
                10,
                20,
                &held_ports([Ok((10, 4))].into_iter())
                    .map(Result::unwrap)
                    .collect::<Vec<_>>(),
                &[]
            ),
            Some(14)
        );
    }

    #[test]
    fn a_tally_records_each_counter_once_with_its_sum() {
        let store = memory::MemoryStore::default();
        let tally = Tally::default();
        for _ in 0..3 {
            tally.add(Counter::Reaped, 1);
        }
        tally.add(Counter::Released, 2);
        let counts = store
            .transact(|tx| {
                tally.record(tx)?;
                // Recorded once: a second record adds nothing.
                tally.record(tx)?;
                Counter::ALL
                    .map(|c| tx.counter(c))
                    .into_iter()
                    .collect::<Result<Vec<_>>>()
            })
            .unwrap();
        assert_eq!(counts, [0, 2, 3, 0, 0]);
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
