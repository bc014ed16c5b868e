//! [`Stats`]: what a registry has counted about itself.

/// Counters a registry keeps in itself, shared by every process that uses it, and the
/// current number of leases by state. Returned by [`PortDaddy::stats`](crate::PortDaddy::stats).
///
/// The counters only grow; they start at zero when the registry is created. A batch
/// ([`PortDaddy::acquire_many`](crate::PortDaddy::acquire_many)) counts one acquisition per
/// lease when it succeeds (a block of consecutive ports is one lease), and one failure when it
/// does not.
///
/// ```
/// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
/// let guard = registry.acquire("api")?;
/// let stats = registry.stats()?;
/// assert_eq!((stats.acquired, stats.live), (1, 1));
/// guard.release()?;
/// assert_eq!(registry.stats()?.released, 1);
/// # Ok::<(), portdaddy::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Stats {
    /// Leases handed out.
    pub acquired: u64,
    /// Leases ended by their holder (a guard dropped or released) or released by port or name.
    pub released: u64,
    /// Leases reclaimed because their owner had died or their expiry had passed, by a claim
    /// that needed the port or by [`PortDaddy::reap`](crate::PortDaddy::reap).
    pub reaped: u64,
    /// Claims that failed because no port of the range was free.
    pub exhausted: u64,
    /// Claims that failed for another reason: a required port that was taken, a registry
    /// error. Failures that leave the registry unwritable (it cannot be opened, is damaged,
    /// or stays locked) cannot be counted in it, and an invalid name or request is refused
    /// before the registry is touched, so it counts nothing.
    pub errors: u64,
    /// Leases now held by a running owner process ([`LeaseState::Live`](crate::LeaseState::Live)).
    pub live: u64,
    /// Leases now held without an owner and not expired
    /// ([`LeaseState::Detached`](crate::LeaseState::Detached)).
    pub detached: u64,
    /// Leases now in the registry whose owner died or whose expiry passed, not yet reclaimed.
    pub stale: u64,
}
