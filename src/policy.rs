//! The allocation policy: which port a request gets, and which leases may be reclaimed.
//!
//! Plain Rust over the [`Tx`] interface and the probe traits: no SQL, no syscalls, so the
//! same rules run over the SQLite store and the in-memory store and can be tested with fakes.
//!
//! # How a port is chosen
//!
//! 0. With [`Request::reuse_detached`], the name's own unexpired detached lease on its
//!    remembered port is taken over (same port, no probe), if that port is the preferred one
//!    or, without a preference, lies in the range, and the lease covers the protocols asked
//!    for.
//! 1. The preferred port, if the request names one and it is *available*: not reserved (by
//!    the handle's settings or for the whole registry), no lease that still counts on it,
//!    and the port probe says the host has it free.
//! 2. Otherwise the name's remembered port (the port it got last), if it lies in the range
//!    and is available.
//! 3. Otherwise a search of the range from a persisted cursor (next-fit, wrapping around), so
//!    that recently released ports are not handed out again at once. The search skips ports
//!    that other names remember, to keep their stickiness, unless nothing else is left; then
//!    it first forgets the memories used longest ago (see "Forgotten ports").
//! 4. Otherwise the range is full of leases: the ones whose owner is dead or whose expiry has
//!    passed are reclaimed, and the search runs once more.
//! 5. Otherwise [`Error::Exhausted`].
//!
//! A lease "still counts" unless it has expired or its owner is dead; a lease met in step 1
//! or 2 that no longer counts is reclaimed on the spot. Everything happens in the caller's
//! single transaction, so no other participant sees a half-made choice.
//!
//! # Clocks that were wrong
//!
//! A TTL lease never lives longer than its TTL as measured by the clock that judges it. A
//! TTL lease stamped in the future (its clock was ahead, or this one was set back since) is
//! started again, with the same TTL, by the claim or reap that meets it: it is written back
//! with `acquired_at` = now and `expires_at` = now + its TTL. A claim meets the leases on its
//! preferred and remembered ports; a reap meets every lease. (A claim that fails is rolled
//! back, its restamping with it.) A lease stamped in the past (its clock was behind) simply
//! expires earlier: that only hands back a port whose holder asked for a limit.
//!
//! # Remembered ports
//!
//! A name remembers the port of its latest claim, except when its remembered port was taken
//! by a live holder *of the same name* (a second instance of a service): the first instance
//! keeps its port for next time and the second gets another without moving it. A port is
//! remembered by at most one name.
//!
//! # Forgotten ports
//!
//! A registry that outlives many names (a per-user registry whose tests name their ports
//! after themselves) would otherwise end with every port of the range remembered, and then
//! each new name's search would walk the whole range past remembered ports before lending
//! one out. So memories are kept by recency of use:
//!
//! - Each memory carries the time its name last used it (`used_at`): set when the name
//!   remembers a port, and brought up to date when the name gets its remembered port again,
//!   at most once per [`MEMORY_REFRESH`] (a day), so that the common claim, a name getting
//!   its own port back, writes no memory at all. A memory stamped in the future (by a clock
//!   that was ahead) is stamped again at its next use, so that it does not pass for the
//!   newest for as long as that lead.
//! - Memories are kept for as long as the range has a vacant port that no name remembers.
//!   When a search finds none (step 3 would have to lend out a remembered port), the
//!   memories of ports that no lease holds are forgotten, those used longest ago first, as
//!   many as a quarter of the range's ports ([`forget_batch`]), and the search runs again.
//!   A memory of a port that a lease holds stays (it blocks no search: the lease does).
//!   The names used most recently keep their ports; a forgotten name simply gets a port by
//!   search at its next claim, and remembers that one.
//! - Nothing is forgotten while the range has room, nor when it is full of leases: the
//!   forgetting happens only when a remembered but vacant port is what the search would hand
//!   out, so one search in many walks the range, and the claims after it find a forgotten
//!   port at once.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use crate::builder::Settings;
use crate::error::{Error, Result};
use crate::lease::{
    at_storage_precision, new_lease_id, to_millis, Choice, Lease, LeaseState, Owner, Protocol,
};
use crate::probe::{PortProbe, ProcessProbe};
use crate::range::PortRange;
use crate::request::Request;
use crate::reserved::RegistryReserved;
use crate::store::{Counter, Tally, Tx};

/// How stale a name's memory (`used_at`) may grow while the name keeps getting its
/// remembered port, before a claim records the use again: see "Forgotten ports" above.
pub(crate) const MEMORY_REFRESH: Duration = Duration::from_secs(24 * 60 * 60);

/// How many memories a search forgets when every vacant port of `range` is remembered: a
/// quarter of the range's ports (at least one), so that the cost of the search that found no
/// unremembered port is shared by the many claims after it.
pub(crate) fn forget_batch(range: PortRange) -> usize {
    (range.len() / 4).max(1)
}

/// What the policy needs to know besides the store.
pub(crate) struct Env<'a> {
    pub(crate) range: PortRange,
    pub(crate) reserved: &'a BTreeSet<u16>,
    /// The ranges reserved for the whole registry, read from the transaction on first use.
    pub(crate) registry_reserved: RegistryReserved,
    pub(crate) ports: &'a dyn PortProbe,
    pub(crate) processes: &'a dyn ProcessProbe,
    /// The calling process: its own leases are alive without asking the probe.
    pub(crate) me: &'a Owner,
    pub(crate) now: SystemTime,
    /// What the transaction counts; recorded when it ends.
    pub(crate) tally: &'a Tally,
}

impl<'a> Env<'a> {
    /// The policy's view of the world under `settings`, with owners judged by `processes`
    /// and `me` as the owner of new claims, at the settings' clock's present.
    pub(crate) fn new(
        settings: &'a Settings,
        processes: &'a dyn ProcessProbe,
        me: &'a Owner,
        tally: &'a Tally,
    ) -> Self {
        Env {
            range: settings.range,
            reserved: &settings.reserved,
            registry_reserved: RegistryReserved::default(),
            ports: &*settings.ports,
            processes,
            me,
            now: settings.clock.now(),
            tally,
        }
    }

    /// The same view, with ports probed by `ports`.
    pub(crate) fn with_ports(&self, ports: &'a dyn PortProbe) -> Self {
        Env {
            ports,
            registry_reserved: self.registry_reserved.clone(),
            ..*self
        }
    }
}

/// Why a port cannot be handed out.
enum Blocked {
    /// Reserved by the handle's settings ([`crate::Builder::reserve`]).
    Reserved,
    /// In a range reserved for the whole registry.
    RegistryReserved(PortRange),
    Leased(Lease),
    Foreign,
}

/// Why a port a program outside the registry holds is refused; the registry names that
/// program after the claim, outside the lock.
pub(crate) const FOREIGN: &str = "a program outside the registry has it bound";

impl Blocked {
    fn describe(&self) -> String {
        match self {
            Blocked::Reserved => {
                "it is reserved by this handle's settings (`Builder::reserve`)".into()
            }
            Blocked::RegistryReserved(range) => format!(
                "it lies in the range {range} reserved for every user of the registry; \
                 `portdaddy reserve` lists the reserved ranges, `portdaddy unreserve` frees them"
            ),
            Blocked::Leased(l) => match l.pid() {
                Some(pid) => format!("leased as {:?} by pid {pid}", l.name),
                None => format!("leased as {:?} (detached)", l.name),
            },
            Blocked::Foreign => FOREIGN.into(),
        }
    }
}

impl Env<'_> {
    /// Whether a lease no longer counts: expired, or owned by a dead process.
    pub(crate) fn is_reclaimable(&self, lease: &Lease) -> bool {
        lease.is_expired_at(self.now) || lease.owner.as_ref().is_some_and(|o| !self.owner_alive(o))
    }

    /// What `lease` is now: expired first (an expired lease no longer counts, owned or not),
    /// then detached, then live or dead by its owner.
    pub(crate) fn state(&self, lease: &Lease) -> LeaseState {
        if lease.is_expired_at(self.now) {
            return LeaseState::Expired;
        }
        match &lease.owner {
            None => LeaseState::Detached,
            Some(owner) if self.owner_alive(owner) => LeaseState::Live,
            Some(_) => LeaseState::Dead,
        }
    }

    fn owner_alive(&self, owner: &Owner) -> bool {
        owner == self.me || self.processes.is_alive(owner)
    }

    /// Whether the port probe finds `port` free; a probe that cannot tell (out of file
    /// descriptors, say) fails the claim instead of passing the port over.
    fn is_free(&self, port: u16, protocol: Protocol) -> Result<bool> {
        self.ports
            .try_is_free(port, protocol)
            .map_err(|error| Error::Probe { port, error })
    }

    /// Bounds what a clock can do to a TTL lease: one stamped in the future (by a clock that
    /// was ahead, or set back since) would otherwise live its TTL *plus* that lead, as this
    /// clock judges it; years, for a clock that was years ahead. Such a lease is started
    /// again now, keeping its TTL, and written back so that every participant sees the new
    /// times. Other leases come back as they were.
    fn clamp(&self, tx: &mut dyn Tx, lease: Lease) -> Result<Lease> {
        let Some(expires_at) = lease.expires_at else {
            return Ok(lease);
        };
        if lease.acquired_at <= self.now {
            return Ok(lease);
        }
        let ttl = expires_at
            .duration_since(lease.acquired_at)
            .unwrap_or_default();
        let acquired_at = at_storage_precision(self.now);
        let Ok(expires_at) = expiry(acquired_at, ttl) else {
            return Ok(lease);
        };
        let clamped = Lease {
            acquired_at,
            expires_at: Some(expires_at),
            ..lease.clone()
        };
        if tx.restart(lease.port, lease.id, acquired_at, Some(expires_at))? {
            tracing::info!(
                port = lease.port,
                name = %lease.name,
                ?ttl,
                "a lease was stamped in the future by a clock that was ahead; it starts again now"
            );
        }
        Ok(clamped)
    }

    /// Why `port` is reserved, if it is: by the handle's settings, or for the whole registry.
    fn reservation(&self, tx: &mut dyn Tx, port: u16) -> Result<Option<Blocked>> {
        if self.reserved.contains(&port) {
            return Ok(Some(Blocked::Reserved));
        }
        Ok(self
            .registry_reserved
            .covering(tx, port)?
            .map(Blocked::RegistryReserved))
    }

    /// Checks one port, reclaiming a lease on it that no longer counts.
    fn check(&self, tx: &mut dyn Tx, port: u16, protocol: Protocol) -> Result<Option<Blocked>> {
        if let Some(reserved) = self.reservation(tx, port)? {
            return Ok(Some(reserved));
        }
        if let Some(lease) = tx.lease_on(port)? {
            let lease = self.clamp(tx, lease)?;
            if !self.is_reclaimable(&lease) {
                return Ok(Some(Blocked::Leased(lease)));
            }
            if tx.delete_lease(lease.port, lease.id)? {
                self.tally.add(Counter::Reaped, 1);
                log_reclaimed(&lease);
            }
        }
        if !self.is_free(port, protocol)? {
            return Ok(Some(Blocked::Foreign));
        }
        Ok(None)
    }

    /// Checks the `len` ports from `first` on; the first port that cannot be had, and why.
    fn check_block(
        &self,
        tx: &mut dyn Tx,
        first: u16,
        len: u16,
        protocol: Protocol,
    ) -> Result<Option<(u16, Blocked)>> {
        for port in block_ports(first, len) {
            if let Some(blocked) = self.check(tx, port, protocol)? {
                return Ok(Some((port, blocked)));
            }
        }
        Ok(None)
    }

    /// Next-fit search from the cursor, wrapping around once, for `len` consecutive ports
    /// that lie wholly inside the range.
    fn search(
        &self,
        tx: &mut dyn Tx,
        protocol: Protocol,
        len: u16,
        avoid: bool,
    ) -> Result<Option<u16>> {
        let (lo, hi) = (self.range.start(), self.range.end());
        if usize::from(len) > self.range.len() {
            return Ok(None);
        }
        // The last port a block may start on.
        let last_start = hi - (len - 1);
        let start = tx
            .cursor()?
            .filter(|c| (lo..=last_start).contains(c))
            .unwrap_or(lo);
        let mut segments = vec![(start, last_start)];
        if start > lo {
            segments.push((lo, start - 1));
        }
        for (from, to) in segments {
            let mut from = u32::from(from);
            while from <= u32::from(to) {
                let Some(port) = tx.first_vacant(from as u16, to, avoid)? else {
                    break;
                };
                match self.run_fits(tx, port, len, protocol, avoid)? {
                    None => return Ok(Some(port)),
                    Some(taken) => from = u32::from(taken) + 1,
                }
            }
        }
        Ok(None)
    }

    /// Whether the `len` ports from the vacant port `first` on can all be had: vacant,
    /// not reserved, free on the host. If not, the first one that cannot, or the last port
    /// of the reserved range it lies in, so that the search goes on after that range.
    fn run_fits(
        &self,
        tx: &mut dyn Tx,
        first: u16,
        len: u16,
        protocol: Protocol,
        avoid: bool,
    ) -> Result<Option<u16>> {
        for port in block_ports(first, len) {
            let vacant = port == first || tx.first_vacant(port, port, avoid)? == Some(port);
            match self.reservation(tx, port)? {
                Some(Blocked::RegistryReserved(range)) => return Ok(Some(range.end())),
                Some(_) => return Ok(Some(port)),
                None => {}
            }
            if !vacant || !self.is_free(port, protocol)? {
                return Ok(Some(port));
            }
        }
        Ok(None)
    }
}

/// The `len` ports from `first` on (the caller made sure they do not run past 65535).
fn block_ports(first: u16, len: u16) -> impl Iterator<Item = u16> {
    (u32::from(first)..u32::from(first) + u32::from(len)).map(|p| p as u16)
}

/// Refuses a request that no claim over `range` could satisfy as asked: checked before the
/// registry's lock is taken, so that bad input neither waits for the lock nor touches the
/// file.
pub(crate) fn check_request(request: &Request, range: PortRange) -> Result<()> {
    request.validate()?;
    let len = request.block_len;
    if usize::from(len) > range.len() && request.preferred.is_none() {
        return Err(Error::InvalidRequest {
            reason: format!(
                "a block of {len} ports does not fit in the range {range} ({} ports); ask for \
                 a shorter block, prefer a first port, or widen the range",
                range.len()
            ),
        });
    }
    Ok(())
}

/// Claims one port for `request`, which [`check_request`] accepted.
pub(crate) fn claim(tx: &mut dyn Tx, env: &Env<'_>, request: &Request) -> Result<(Lease, Choice)> {
    let protocol = request.protocol;
    let len = request.block_len;
    let mut keep_memory = false;
    // When the name last recorded a use of its remembered port, if it gets that port again.
    let mut used_at = None;

    let found = 'choose: {
        if request.reuse_detached {
            if let Some((lease, at)) = detached_lease_of(tx, env, request)? {
                tx.delete_lease(lease.port, lease.id)?;
                used_at = Some(at);
                break 'choose Some((lease.port, Choice::Remembered));
            }
        }
        if let Some(port) = request.preferred {
            match env.check_block(tx, port, len, protocol)? {
                None => break 'choose Some((port, Choice::Preferred)),
                Some((taken, blocked)) if request.strict => {
                    return Err(Error::PortUnavailable {
                        port: taken,
                        reason: blocked.describe(),
                    });
                }
                Some(_) => {}
            }
        }
        if let Some((port, at)) = tx.remembered_port(&request.name)? {
            if fits_range(env.range, port, len) {
                match env.check_block(tx, port, len, protocol)?.map(|(_, b)| b) {
                    None => {
                        used_at = Some(at);
                        break 'choose Some((port, Choice::Remembered));
                    }
                    Some(Blocked::Leased(l)) if l.name == request.name => keep_memory = true,
                    Some(_) => {}
                }
            }
        }
        None
    };

    let (port, choice) = match found {
        Some(found) => found,
        None => {
            let port = match search_range(tx, env, protocol, len)? {
                Some(port) => port,
                None => return Err(exhausted(tx, env, len)?),
            };
            let next = u32::from(port) + u32::from(len);
            tx.set_cursor(if next > u32::from(env.range.end()) {
                env.range.start()
            } else {
                next as u16
            })?;
            (port, Choice::Searched)
        }
    };

    let acquired_at = at_storage_precision(env.now);
    let expires_at = match request.ttl {
        None => None,
        // From the stored start, the TTL rounded up to whole milliseconds: a TTL of at least
        // 1 ms (see `Request::validate`) never ends at or before the claim.
        Some(ttl) => Some(expiry(acquired_at, ttl_at_storage_precision(ttl))?),
    };
    let lease = Lease {
        id: new_lease_id(),
        port,
        block_len: len,
        name: request.name.clone(),
        protocol,
        owner: Some(request.owner.clone().unwrap_or_else(|| env.me.clone())),
        acquired_at,
        expires_at,
    };
    tx.insert_lease(&lease)?;
    // A remembered port handed out again is remembered already; its use is recorded again
    // only once the memory has grown stale, or was stamped in the future by a clock that
    // was ahead (see "Forgotten ports").
    let stale = used_at.is_none_or(|at| {
        env.now
            .duration_since(at)
            .map_or(true, |age| age >= MEMORY_REFRESH)
    });
    if !keep_memory && (choice != Choice::Remembered || stale) {
        tx.remember(&request.name, port, env.now)?;
    }
    tracing::debug!(port, name = %lease.name, ?choice, "port leased");
    Ok((lease, choice))
}

/// Steps 3 and 4: search the range, then search again lending out remembered ports, then
/// reclaim dead and expired leases and search once more.
fn search_range(
    tx: &mut dyn Tx,
    env: &Env<'_>,
    protocol: Protocol,
    len: u16,
) -> Result<Option<u16>> {
    if let Some(port) = env.search(tx, protocol, len, true)? {
        return Ok(Some(port));
    }
    if let Some(port) = env.search(tx, protocol, len, false)? {
        // Every vacant port of the range is remembered: forget the memories used longest
        // ago, and take one of their ports if it fits (see "Forgotten ports").
        let forgotten = tx.forget_oldest(env.range, forget_batch(env.range))?;
        if forgotten > 0 {
            tracing::debug!(
                forgotten,
                range = %env.range,
                "every vacant port of the range was remembered; forgot the memories used \
                 longest ago"
            );
            if let Some(port) = env.search(tx, protocol, len, true)? {
                return Ok(Some(port));
            }
        }
        return Ok(Some(port));
    }
    if reap(tx, env, Some(env.range))? > 0 {
        return env.search(tx, protocol, len, false);
    }
    Ok(None)
}

/// Whether the block of `len` ports from `first` lies wholly inside `range`.
fn fits_range(range: PortRange, first: u16, len: u16) -> bool {
    range.contains(first) && u32::from(first) + u32::from(len) - 1 <= u32::from(range.end())
}

/// `ttl` rounded up to the registry's precision, whole milliseconds.
fn ttl_at_storage_precision(ttl: Duration) -> Duration {
    let whole = Duration::from_millis(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
    if whole < ttl {
        whole.saturating_add(Duration::from_millis(1))
    } else {
        whole
    }
}

/// `now + ttl`, if the registry can store it.
fn expiry(now: SystemTime, ttl: Duration) -> Result<SystemTime> {
    now.checked_add(ttl)
        .filter(|t| to_millis(*t) < i64::MAX)
        .ok_or_else(|| Error::InvalidRequest {
            reason: format!(
                "a TTL of {ttl:?} ends beyond the dates the registry can store; give a shorter \
                 TTL, or none for a lease without expiry"
            ),
        })
}

/// The name's own unexpired detached lease on its remembered port, if the request would
/// accept that port: the preferred port when one is asked for (so `require` stays strict),
/// else a port of the range; and checked for at least the requested protocols. With it, when
/// the name last recorded a use of that port.
fn detached_lease_of(
    tx: &mut dyn Tx,
    env: &Env<'_>,
    request: &Request,
) -> Result<Option<(Lease, SystemTime)>> {
    let Some((port, used_at)) = tx.remembered_port(&request.name)? else {
        return Ok(None);
    };
    let wanted = match request.preferred {
        Some(preferred) => preferred == port,
        None => fits_range(env.range, port, request.block_len),
    };
    if !wanted {
        return Ok(None);
    }
    for p in block_ports(port, request.block_len) {
        if env.reservation(tx, p)?.is_some() {
            return Ok(None);
        }
    }
    Ok(tx
        .lease_on(port)?
        .filter(|l| {
            l.name == request.name
                && l.is_detached()
                && !l.is_expired_at(env.now)
                && l.block_len == request.block_len
                && (l.protocol == request.protocol || l.protocol == Protocol::Both)
        })
        .map(|lease| (lease, used_at)))
}

/// The error for a full range, or for a block that found no run: counts the ports of the
/// range that leases still holding their port hold (dead and expired ones may be left when
/// the search was skipped, as for a block longer than the range).
fn exhausted(tx: &mut dyn Tx, env: &Env<'_>, block_len: u16) -> Result<Error> {
    let held: BTreeSet<u16> = tx
        .leases(Some(env.range))?
        .iter()
        .filter(|l| env.state(l).holds_port())
        .flat_map(|l| {
            l.ports()
                .filter(|p| env.range.contains(*p))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut reserved = 0;
    for port in env.range.start()..=env.range.end() {
        if !held.contains(&port) && env.reservation(tx, port)?.is_some() {
            reserved += 1;
        }
    }
    Ok(Error::Exhausted {
        range: env.range,
        held: held.len(),
        reserved,
        block_len,
    })
}

/// Reclaims every lease (in `range`, if given) that has expired or whose owner is dead.
pub(crate) fn reap(tx: &mut dyn Tx, env: &Env<'_>, range: Option<PortRange>) -> Result<usize> {
    // Many leases often share one owner: ask the probe once per owner. The owner's lock file
    // is part of the key: one process's handles each hold their own, and one handle's file
    // may be gone while another's is held. So is the time namespace its start time was read
    // through, which decides whether that start time can be compared.
    let mut alive: HashMap<(Owner, Option<String>, Option<u64>), bool> = HashMap::new();
    let mut reaped = 0;
    for lease in tx.leases(range)? {
        let dead = lease.is_expired_at(env.now)
            || lease.owner.as_ref().is_some_and(|owner| {
                let key = (
                    owner.clone(),
                    owner.lock_name().map(str::to_owned),
                    owner.time_namespace(),
                );
                !*alive.entry(key).or_insert_with(|| env.owner_alive(owner))
            });
        if !dead {
            env.clamp(tx, lease)?;
        } else if tx.delete_lease(lease.port, lease.id)? {
            log_reclaimed(&lease);
            reaped += 1;
        }
    }
    env.tally.add(Counter::Reaped, reaped as u64);
    Ok(reaped)
}

fn log_reclaimed(lease: &Lease) {
    tracing::info!(
        port = lease.port,
        name = %lease.name,
        pid = ?lease.pid(),
        "reclaimed a lease whose owner is gone or whose expiry passed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Protocol;
    use crate::store::memory::MemoryStore;

    #[test]
    fn reap_judges_each_owner_lock_file_on_its_own() {
        // One process with two handles: the first handle's lock file is gone, the second's
        // is held. Only the first handle's lease may be reaped.
        let process = Owner::new(7, 70, "boot");
        let dropped = process.clone().with_lock(Some("gone".into()));
        let open = process.with_lock(Some("held".into()));
        let store = MemoryStore::default();
        let lease = |port, owner: &Owner| Lease {
            id: u64::from(port),
            port,
            block_len: 1,
            name: "x".into(),
            protocol: Protocol::Tcp,
            owner: Some(owner.clone()),
            acquired_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
        };
        let all_free = |_: u16, _: Protocol| true;
        let by_lock = |o: &Owner| o.lock_name() == Some("held");
        let me = Owner::new(1, 1, "boot");
        let env = Env {
            range: PortRange::new(20000, 20009).unwrap(),
            reserved: &BTreeSet::new(),
            registry_reserved: RegistryReserved::default(),
            ports: &all_free,
            processes: &by_lock,
            me: &me,
            now: SystemTime::UNIX_EPOCH,
            tally: &Tally::default(),
        };
        let left = store
            .transact(|tx| {
                tx.insert_lease(&lease(20000, &dropped))?;
                tx.insert_lease(&lease(20001, &open))?;
                assert_eq!(reap(tx, &env, None)?, 1);
                tx.leases(None)
            })
            .unwrap();
        assert_eq!(left.iter().map(|l| l.port).collect::<Vec<_>>(), [20001]);
    }

    /// A claim of `name` at `secs` seconds after the epoch, over the ports 20000-20007 with
    /// every port free; its lease is released again.
    fn claim_at(store: &MemoryStore, name: &str, secs: u64) -> (u16, Choice) {
        let me = Owner::new(1, 1, "boot");
        let all_free = |_: u16, _: Protocol| true;
        let alive = |_: &Owner| true;
        let env = Env {
            range: PortRange::new(20000, 20007).unwrap(),
            reserved: &BTreeSet::new(),
            ports: &all_free,
            processes: &alive,
            me: &me,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            tally: &Tally::default(),
            registry_reserved: RegistryReserved::default(),
        };
        store
            .transact(|tx| {
                let (lease, choice) = claim(tx, &env, &Request::new(name))?;
                tx.delete_lease(lease.port, lease.id)?;
                Ok((lease.port, choice))
            })
            .unwrap()
    }

    fn memory_of(store: &MemoryStore, name: &str) -> Option<(u16, SystemTime)> {
        store.transact(|tx| tx.remembered_port(name)).unwrap()
    }

    #[test]
    fn a_range_whose_every_vacant_port_is_remembered_forgets_the_oldest_quarter() {
        let store = MemoryStore::default();
        for i in 0..8 {
            assert_eq!(
                claim_at(&store, &format!("n{i}"), 100 + i).0,
                20000 + i as u16
            );
        }
        // Every port is remembered: the new name costs the two memories used longest ago,
        // and gets one of their ports.
        assert_eq!(claim_at(&store, "new", 200), (20000, Choice::Searched));
        assert_eq!(memory_of(&store, "n0"), None);
        assert_eq!(memory_of(&store, "n1"), None);
        for i in 2..8 {
            assert_eq!(
                memory_of(&store, &format!("n{i}")).unwrap().0,
                20000 + i as u16
            );
        }
        // The next new name finds the other forgotten port at once, forgetting nothing more.
        assert_eq!(claim_at(&store, "newer", 201), (20001, Choice::Searched));
        assert!(memory_of(&store, "n2").is_some());
    }

    #[test]
    fn a_name_that_gets_its_port_back_records_the_use_once_the_memory_is_a_day_old() {
        let store = MemoryStore::default();
        let day = MEMORY_REFRESH.as_secs();
        let (port, _) = claim_at(&store, "a", 1000);
        let at = |secs: u64| Some((port, SystemTime::UNIX_EPOCH + Duration::from_secs(secs)));
        assert_eq!(
            claim_at(&store, "a", 1000 + day - 1),
            (port, Choice::Remembered)
        );
        assert_eq!(memory_of(&store, "a"), at(1000), "not written within a day");
        assert_eq!(
            claim_at(&store, "a", 1000 + day),
            (port, Choice::Remembered)
        );
        assert_eq!(
            memory_of(&store, "a"),
            at(1000 + day),
            "recorded again after a day"
        );
    }

    #[test]
    fn a_memory_stamped_in_the_future_is_stamped_again_at_its_next_use() {
        let store = MemoryStore::default();
        let (port, _) = claim_at(&store, "a", 5000);
        // The clock was ahead at the first claim: now it says earlier.
        assert_eq!(claim_at(&store, "a", 1000), (port, Choice::Remembered));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(memory_of(&store, "a"), Some((port, now)));
    }

    #[test]
    fn a_range_full_of_leases_forgets_nothing() {
        let store = MemoryStore::default();
        let me = Owner::new(1, 1, "boot");
        let all_free = |_: u16, _: Protocol| true;
        let alive = |_: &Owner| true;
        let env = Env {
            range: PortRange::new(20000, 20007).unwrap(),
            reserved: &BTreeSet::new(),
            ports: &all_free,
            processes: &alive,
            me: &me,
            now: SystemTime::UNIX_EPOCH,
            tally: &Tally::default(),
            registry_reserved: RegistryReserved::default(),
        };
        store
            .transact(|tx| {
                for i in 0..8 {
                    claim(tx, &env, &Request::new(format!("n{i}")))?;
                }
                Ok(())
            })
            .unwrap();
        let result = store.transact(|tx| claim(tx, &env, &Request::new("new")));
        assert!(matches!(result, Err(Error::Exhausted { .. })));
        for i in 0..8 {
            assert!(memory_of(&store, &format!("n{i}")).is_some());
        }
    }
}
