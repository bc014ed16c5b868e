//! Ports reserved for the whole registry: kept in the store, honoured by every claim of every
//! process that uses the registry, and changed by [`PortDaddy::reserve_ports`] and
//! [`PortDaddy::unreserve_ports`].
//!
//! The store keeps them as ranges that neither overlap nor touch: adding a range merges it
//! with the ranges it overlaps or touches, and removing part of a range splits it. A claim
//! reads them once, from the transaction it runs in, the first time it needs to know whether
//! a port is reserved ([`RegistryReserved`]).

use std::cell::OnceCell;
use std::time::SystemTime;

use crate::error::Result;
use crate::lease::Lease;
use crate::range::PortRange;
use crate::registry::PortDaddy;
use crate::store::Tx;

impl PortDaddy {
    /// Reserves `range` for every user of the registry: from the next claim on, no process
    /// that uses the registry is handed a port of it, not as a preferred port either, and a
    /// request that [requires](crate::Request::require) one fails with
    /// [`Error::PortUnavailable`](crate::Error::PortUnavailable) naming the reserved range.
    /// Returns the leases that hold a port of the range now (live, or detached and not
    /// expired), oldest first.
    ///
    /// Those leases are not ended: their holders keep their ports until they release them;
    /// from then on the ports are not handed out again. Reserving what is reserved already
    /// changes nothing; ranges that overlap or touch are kept as one. For an in-memory
    /// registry, "every user" means every handle cloned from this one.
    ///
    /// The reservations live in the registry file (`portdaddy reserve` and `portdaddy
    /// unreserve` change them too); ports reserved with [`Builder::reserve`] hold for one
    /// handle only. A portdaddy version that does not know reserved ranges (one whose
    /// registry schema is older than 6) does not honour them and may hand such a port out;
    /// it still never hands one port to two holders.
    ///
    /// ```
    /// use portdaddy::{PortDaddy, PortRange, Request};
    ///
    /// let registry = PortDaddy::builder()
    ///     .in_memory()
    ///     .range(20000..=20009)
    ///     .port_probe(|_, _| true)
    ///     .open()?;
    /// let held = registry.acquire_with(&Request::new("db").require(20001))?;
    /// let overlapping = registry.reserve_ports(PortRange::new(20000, 20004)?)?;
    /// assert_eq!(overlapping, [held.lease().clone()]); // still held: not revoked
    /// assert_eq!(registry.acquire("web")?.port(), 20005);
    /// assert!(registry.acquire_with(&Request::new("x").require(20002)).is_err());
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A registry error; then nothing is reserved.
    ///
    /// [`Builder::reserve`]: crate::Builder::reserve
    pub fn reserve_ports(&self, range: PortRange) -> Result<Vec<Lease>> {
        self.write(|tx, env| {
            add(tx, range, env.now)?;
            Ok(tx
                .leases(Some(range))?
                .into_iter()
                .filter(|lease| env.state(lease).holds_port())
                .collect())
        })
    }

    /// Stops reserving the ports of `range` for the registry; returns the parts of `range`
    /// that were reserved, ascending: empty if no port of it was, which is not an error.
    /// Freeing part of a reserved range leaves the rest of it reserved.
    ///
    /// ```
    /// use portdaddy::{PortDaddy, PortRange};
    ///
    /// let registry = PortDaddy::builder().in_memory().open()?;
    /// registry.reserve_ports(PortRange::new(20000, 20009)?)?;
    /// let freed = registry.unreserve_ports(PortRange::new(20005, 20019)?)?;
    /// assert_eq!(freed, [PortRange::new(20005, 20009)?]);
    /// assert_eq!(registry.reserved_ports()?, [PortRange::new(20000, 20004)?]);
    /// assert!(registry.unreserve_ports(PortRange::new(30000, 30000)?)?.is_empty());
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A registry error; then nothing is changed.
    pub fn unreserve_ports(&self, range: PortRange) -> Result<Vec<PortRange>> {
        self.write(|tx, _| remove(tx, range))
    }

    /// The ranges reserved for every user of the registry
    /// ([`reserve_ports`](Self::reserve_ports)), ascending; ranges that overlap or touch
    /// are merged into one. Ports reserved with [`Builder::reserve`](crate::Builder::reserve)
    /// for this handle alone are not among them.
    ///
    /// ```
    /// use portdaddy::{PortDaddy, PortRange};
    ///
    /// let registry = PortDaddy::builder().in_memory().open()?;
    /// registry.reserve_ports(PortRange::new(8080, 8080)?)?;
    /// registry.reserve_ports(PortRange::new(8081, 8089)?)?;
    /// assert_eq!(registry.reserved_ports()?, [PortRange::new(8080, 8089)?]);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A registry error.
    pub fn reserved_ports(&self) -> Result<Vec<PortRange>> {
        self.read(|tx| {
            Ok(merged(tx.reservations()?)
                .into_iter()
                .map(|(r, _)| r)
                .collect())
        })
    }
}

/// The registry's reserved ranges as one transaction sees them, read from it on first use.
#[derive(Clone, Debug, Default)]
pub(crate) struct RegistryReserved(OnceCell<Vec<PortRange>>);

impl RegistryReserved {
    /// The reserved range that holds `port`, if any.
    pub(crate) fn covering(&self, tx: &mut dyn Tx, port: u16) -> Result<Option<PortRange>> {
        let ranges = match self.0.get() {
            Some(ranges) => ranges,
            None => {
                let read = merged(tx.reservations()?)
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect();
                self.0.get_or_init(|| read)
            }
        };
        Ok(covering(ranges, port))
    }
}

/// The range of `ranges` (ascending, not overlapping) that holds `port`.
fn covering(ranges: &[PortRange], port: u16) -> Option<PortRange> {
    let after = ranges.partition_point(|r| r.start() <= port);
    after
        .checked_sub(1)
        .map(|i| ranges[i])
        .filter(|r| r.contains(port))
}

/// Reserves `range` from `at` on, merged with the reserved ranges it overlaps or touches
/// (which keep the earliest time any of them was added).
pub(crate) fn add(tx: &mut dyn Tx, range: PortRange, at: SystemTime) -> Result<()> {
    let (mut start, mut end, mut since) = (range.start(), range.end(), at);
    for (old, added) in normalised(tx)? {
        if touches(old, range) {
            tx.delete_reservation(old.start())?;
            start = start.min(old.start());
            end = end.max(old.end());
            since = since.min(added);
        }
    }
    tx.insert_reservation(PortRange::new(start, end)?, since)
}

/// Stops reserving the ports of `range`; the parts of it that were reserved, ascending
/// (none if no port of it was). What is left of a range on either side stays reserved, with
/// the time it was added.
pub(crate) fn remove(tx: &mut dyn Tx, range: PortRange) -> Result<Vec<PortRange>> {
    let mut removed = Vec::new();
    for (old, added) in normalised(tx)? {
        if !old.overlaps(&range) {
            continue;
        }
        tx.delete_reservation(old.start())?;
        let (left, cut, right) = split(old, range)?;
        for kept in [left, right].into_iter().flatten() {
            tx.insert_reservation(kept, added)?;
        }
        removed.push(cut);
    }
    Ok(removed)
}

/// `rows` (ascending by first port) with the ranges that overlap or touch merged into one,
/// which keeps the earliest time: the store keeps them so, but nothing in its schema stops a
/// hand edit or another version from writing rows that overlap, and every port of every row
/// stays reserved.
fn merged(rows: Vec<(PortRange, SystemTime)>) -> Vec<(PortRange, SystemTime)> {
    let mut out: Vec<(PortRange, SystemTime)> = Vec::with_capacity(rows.len());
    for (range, added) in rows {
        match out.last_mut() {
            Some((last, since)) if touches(*last, range) => {
                // Both bounds are ports of the two ranges, in order: always a range.
                if let Ok(joined) = PortRange::new(last.start(), last.end().max(range.end())) {
                    *last = joined;
                }
                *since = (*since).min(added);
            }
            _ => out.push((range, added)),
        }
    }
    out
}

/// The reserved ranges, after rewriting rows that overlap or touch as one row each, so that
/// a change by first port touches a range and nothing else.
fn normalised(tx: &mut dyn Tx) -> Result<Vec<(PortRange, SystemTime)>> {
    let rows = tx.reservations()?;
    let merged = merged(rows.clone());
    if merged.len() != rows.len() {
        for (old, _) in &rows {
            tx.delete_reservation(old.start())?;
        }
        for (range, added) in &merged {
            tx.insert_reservation(*range, *added)?;
        }
    }
    Ok(merged)
}

/// Whether `a` and `b` overlap or are next to each other.
fn touches(a: PortRange, b: PortRange) -> bool {
    u32::from(a.start()) <= u32::from(b.end()) + 1 && u32::from(b.start()) <= u32::from(a.end()) + 1
}

/// `old` cut by `cut`, which it overlaps: what lies below the cut, the ports of both, and
/// what lies above it.
fn split(
    old: PortRange,
    cut: PortRange,
) -> Result<(Option<PortRange>, PortRange, Option<PortRange>)> {
    let left = (old.start() < cut.start()).then(|| (old.start(), cut.start() - 1));
    let right = (old.end() > cut.end()).then(|| (cut.end() + 1, old.end()));
    let both = (old.start().max(cut.start()), old.end().min(cut.end()));
    let range = |(a, b): (u16, u16)| PortRange::new(a, b);
    Ok((
        left.map(range).transpose()?,
        range(both)?,
        right.map(range).transpose()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn r(a: u16, b: u16) -> PortRange {
        PortRange::new(a, b).unwrap()
    }

    fn ranges(store: &MemoryStore) -> Vec<PortRange> {
        store
            .transact(|tx| Ok(tx.reservations()?.into_iter().map(|(r, _)| r).collect()))
            .unwrap()
    }

    #[test]
    fn adding_merges_overlapping_and_touching_ranges() {
        let store = MemoryStore::default();
        let t = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        store
            .transact(|tx| {
                add(tx, r(100, 200), t(5))?;
                add(tx, r(300, 300), t(6))?;
                add(tx, r(400, 500), t(7))?;
                // Touches 100-200 and overlaps 300: one range from 100 to 350.
                add(tx, r(201, 350), t(8))
            })
            .unwrap();
        assert_eq!(ranges(&store), [r(100, 350), r(400, 500)]);
        let since = store.transact(|tx| tx.reservations()).unwrap()[0].1;
        assert_eq!(since, t(5), "a merged range keeps the earliest time");
        store.transact(|tx| add(tx, r(1, 65535), t(9))).unwrap();
        assert_eq!(ranges(&store), [r(1, 65535)]);
    }

    #[test]
    fn removing_part_of_a_range_splits_it_and_says_what_was_reserved() {
        let store = MemoryStore::default();
        let now = SystemTime::UNIX_EPOCH;
        store
            .transact(|tx| {
                add(tx, r(100, 200), now)?;
                add(tx, r(300, 400), now)
            })
            .unwrap();
        let removed = store.transact(|tx| remove(tx, r(150, 349))).unwrap();
        assert_eq!(removed, [r(150, 200), r(300, 349)]);
        assert_eq!(ranges(&store), [r(100, 149), r(350, 400)]);
        let removed = store.transact(|tx| remove(tx, r(360, 360))).unwrap();
        assert_eq!(removed, [r(360, 360)]);
        assert_eq!(ranges(&store), [r(100, 149), r(350, 359), r(361, 400)]);
        // Nothing reserved there: nothing removed, nothing changed.
        assert!(store
            .transact(|tx| remove(tx, r(1, 99)))
            .unwrap()
            .is_empty());
        assert_eq!(
            store.transact(|tx| remove(tx, r(1, 65535))).unwrap().len(),
            3
        );
        assert!(ranges(&store).is_empty());
    }

    #[test]
    fn finds_the_range_that_covers_a_port() {
        let all = [r(10, 20), r(30, 30), r(65535, 65535)];
        assert_eq!(covering(&all, 9), None);
        assert_eq!(covering(&all, 10), Some(r(10, 20)));
        assert_eq!(covering(&all, 20), Some(r(10, 20)));
        assert_eq!(covering(&all, 21), None);
        assert_eq!(covering(&all, 30), Some(r(30, 30)));
        assert_eq!(covering(&all, 65535), Some(r(65535, 65535)));
        assert_eq!(covering(&[], 1), None);
    }

    #[test]
    fn a_transaction_reads_the_reserved_ranges_once() {
        let store = MemoryStore::default();
        store
            .transact(|tx| add(tx, r(10, 20), SystemTime::UNIX_EPOCH))
            .unwrap();
        let seen = RegistryReserved::default();
        store
            .transact(|tx| {
                assert_eq!(seen.covering(tx, 15)?, Some(r(10, 20)));
                // Removed within the same transaction after the first read: the claim goes
                // on with what it read.
                remove(tx, r(10, 20))?;
                assert_eq!(seen.covering(tx, 15)?, Some(r(10, 20)));
                Ok(())
            })
            .unwrap();
    }
}
