//! What the registry records: leases, their owners, and the protocols they cover.

use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Which transport protocols a port must be free for.
///
/// A lease always holds the port number for every protocol in the registry; the protocol only
/// decides which kinds of socket the [`PortProbe`](crate::PortProbe) tries before handing the
/// port out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum Protocol {
    /// TCP only. The default.
    #[default]
    Tcp,
    /// UDP only.
    Udp,
    /// Both TCP and UDP.
    Both,
}

impl Protocol {
    /// Whether the protocol includes TCP: a claim needs the port free for TCP.
    ///
    /// ```
    /// use portdaddy::Protocol;
    ///
    /// assert!(Protocol::Both.includes_tcp() && Protocol::Both.includes_udp());
    /// assert!(!Protocol::Udp.includes_tcp());
    /// ```
    pub fn includes_tcp(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Both)
    }

    /// Whether the protocol includes UDP: a claim needs the port free for UDP.
    pub fn includes_udp(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::Both)
    }

    pub(crate) fn code(self) -> i64 {
        match self {
            Protocol::Tcp => 1,
            Protocol::Udp => 2,
            Protocol::Both => 3,
        }
    }

    pub(crate) fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Protocol::Tcp),
            2 => Some(Protocol::Udp),
            3 => Some(Protocol::Both),
            _ => None,
        }
    }
}

/// The process a lease belongs to, identified beyond its pid.
///
/// A pid alone is ambiguous: the kernel reuses pids, and a reboot starts them afresh. An owner
/// is therefore a pid plus that process's start time plus the identity of the boot it runs
/// in, plus (on Linux) the PID namespace in which the pid is meaningful; a lease whose
/// recorded owner differs from the live process in any of them belongs to a dead process.
/// The values are opaque tokens produced by the system: compare them, do not interpret them.
///
/// # Owners in other PID namespaces
///
/// A pid means nothing outside its PID namespace: a container's pid 1 is not the host's.
/// Each handle on a file registry therefore also takes an exclusive lock on a file of its own
/// in `<registry>.owners/` and records that file's name with the leases it takes. Every
/// process judges such an owner by that lock first: held means alive, and the kernel drops
/// it when the owner dies, however it dies. An owner recorded without a lock (one named with
/// [`Request::owner`](crate::Request::owner)) is judged across the boundary only by a
/// process that can see every process of the owner's namespace (see below).
///
/// # How liveness is judged
///
/// Only positive evidence makes an owner dead; evidence that cannot be read or compared
/// keeps the lease (a false "alive" costs one port until the next positive evidence, a
/// false "dead" hands a port to two holders). In order:
///
/// 1. An owner with a lock file: held means alive, whatever its pid, start time or boot
///    says; present and free means dead. (The `portdaddy run` command hands its lock to the
///    command it runs, so its leases live as long as the command does; see
///    [`PortDaddy::share_owner_lock`](crate::PortDaddy::share_owner_lock).) A file that is
///    there but cannot be opened or locked (this process is out of descriptors) means alive:
///    it may be held. A missing file means its owner closed its handle: across PID
///    namespaces that is dead, in the owner's own namespace the pid decides, as below.
/// 2. An owner whose pid is meaningful here (same PID namespace, or none recorded): dead if
///    `kill(pid, 0)` says the pid is gone, if both boot identities are known and differ, or
///    if the process runs with another start time read through the same time namespace
///    (see [`time_namespace`](Self::time_namespace)). A process that exists but whose
///    `/proc` entry is hidden (`hidepid`) or unreadable counts as alive, and so does one
///    whose start time was read through another time namespace.
/// 3. An owner in another PID namespace without a lock file (one named with
///    [`Request::owner`](crate::Request::owner) there): a process in an ancestor namespace
///    (the host, for a container) sees the namespace's processes and compares the owner's
///    pid (its pid in that namespace) and start time with them. When this process sees the
///    whole namespace (it sees processes of it, or the owner recorded this process's
///    namespace among its namespace's ancestors; and nothing hides processes from it: it is
///    root, or `/proc` has no `hidepid`), an owner it cannot find, or a namespace without
///    processes left, is dead. A process that cannot see the owner's namespace (a sibling
///    container, or the namespace of a container seen from inside it) cannot tell, and
///    keeps the lease: such a lease is reclaimed by a process that can see it, or by its
///    expiry, or at reboot.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Owner {
    pid: u32,
    start_time: u64,
    boot_id: String,
    #[cfg_attr(feature = "serde", serde(default))]
    pid_namespace: Option<u64>,
    /// The name of the lock file the owner holds in `<registry>.owners/`, if any. Not part
    /// of the identity: it says how to check liveness from another namespace.
    #[cfg_attr(feature = "serde", serde(default))]
    lock: Option<String>,
    /// The time namespace through which the start time was read (on Linux, the inode number
    /// of `/proc/self/ns/time` of the recorder). Not part of the identity: it says whether a
    /// start time read here can be compared with the recorded one.
    #[cfg_attr(feature = "serde", serde(default))]
    time_namespace: Option<u64>,
    /// The PID namespaces above [`pid_namespace`](Self::pid_namespace), nearest first, as
    /// far as the recorder could see them. Not part of the identity: it says which
    /// namespaces can see every process of the owner's namespace.
    #[cfg_attr(feature = "serde", serde(default))]
    namespace_parents: Option<Vec<u64>>,
}

impl PartialEq for Owner {
    fn eq(&self, other: &Self) -> bool {
        self.pid == other.pid
            && self.start_time == other.start_time
            && self.boot_id == other.boot_id
            && self.pid_namespace == other.pid_namespace
    }
}

impl Eq for Owner {}

impl std::hash::Hash for Owner {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.pid, self.start_time, &self.boot_id, self.pid_namespace).hash(state);
    }
}

impl Owner {
    /// An owner with the given identity, in no particular PID namespace; for tests and custom
    /// [`ProcessProbe`]s.
    ///
    /// [`ProcessProbe`]: crate::ProcessProbe
    pub fn new(pid: u32, start_time: u64, boot_id: impl Into<String>) -> Self {
        Self {
            pid,
            start_time,
            boot_id: boot_id.into(),
            pid_namespace: None,
            lock: None,
            time_namespace: None,
            namespace_parents: None,
        }
    }

    /// The same owner, its start time read through the time namespace `namespace`.
    pub(crate) fn in_time_namespace(mut self, namespace: Option<u64>) -> Self {
        self.time_namespace = namespace;
        self
    }

    /// The same owner, its PID namespace below `parents` (nearest first).
    pub(crate) fn with_namespace_parents(mut self, parents: Option<Vec<u64>>) -> Self {
        self.namespace_parents = parents;
        self
    }

    /// The same owner, its pid meaningful in the PID namespace `namespace`.
    pub(crate) fn in_namespace(mut self, namespace: Option<u64>) -> Self {
        self.pid_namespace = namespace;
        self
    }

    /// The same owner, holding the lock file `name` in `<registry>.owners/`.
    pub(crate) fn with_lock(mut self, name: Option<String>) -> Self {
        self.lock = name;
        self
    }

    /// The calling process.
    ///
    /// # Errors
    ///
    /// Fails only when the system cannot describe its own process (for instance `/proc` is
    /// not mounted on Linux).
    pub fn current() -> crate::Result<Owner> {
        crate::probe::system::current_owner()
    }

    /// The running process with this pid, for handing a lease to another process (for
    /// instance the shell that started a command).
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchProcess`](crate::Error::NoSuchProcess) when no such process runs.
    pub fn of_pid(pid: u32) -> crate::Result<Owner> {
        crate::probe::system::owner_of(pid)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When the process started, in the system's own unit (clock ticks since boot on Linux,
    /// seconds since the epoch elsewhere).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The identity of the boot the process runs in.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// The PID namespace in which [`pid`](Self::pid) is meaningful (on Linux, the inode
    /// number of `/proc/self/ns/pid` of the process that recorded it), or `None` where
    /// unknown.
    pub fn pid_namespace(&self) -> Option<u64> {
        self.pid_namespace
    }

    /// The time namespace through which [`start_time`](Self::start_time) was read (on
    /// Linux, the inode number of `/proc/self/ns/time` of the process that recorded it), or
    /// `None` where unknown.
    ///
    /// Linux shifts the start times that a process reads by the boot-time offset of the
    /// reader's time namespace, so a start time is compared only with one read through the
    /// same time namespace. An owner recorded without one (by an older version) is compared
    /// as before.
    pub fn time_namespace(&self) -> Option<u64> {
        self.time_namespace
    }

    /// The PID namespaces above [`pid_namespace`](Self::pid_namespace), nearest first, as far
    /// as the recording process could see them (`None` where unknown).
    pub(crate) fn namespace_parents(&self) -> Option<&[u64]> {
        self.namespace_parents.as_deref()
    }

    /// The owner's lock file in `<registry>.owners/`, if it holds one.
    pub(crate) fn lock_name(&self) -> Option<&str> {
        self.lock.as_deref()
    }
}

/// One port, or one block of consecutive ports, held in the registry.
///
/// A lease is *owned* while it records an [`Owner`]: it lasts until released or until that
/// process dies. A *detached* lease (from [`PortGuard::keep`](crate::PortGuard::keep)) has no
/// owner and lasts until released by port or until its expiry passes.
///
/// ```
/// use portdaddy::{PortDaddy, Request};
///
/// let registry = PortDaddy::builder().in_memory().open()?;
/// let guard = registry.acquire_with(&Request::new("cluster").block(2))?;
/// let lease = &registry.list()?[0];
/// assert_eq!((lease.name(), lease.port(), lease.block_len()), ("cluster", guard.port(), 2));
/// assert_eq!(lease.pid(), Some(std::process::id()));
/// assert!(!lease.is_detached() && lease.expires_at().is_none());
/// # Ok::<(), portdaddy::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Lease {
    pub(crate) id: u64,
    pub(crate) port: u16,
    /// How many consecutive ports, from `port` on, the lease holds.
    #[cfg_attr(feature = "serde", serde(default = "one_port"))]
    pub(crate) block_len: u16,
    pub(crate) name: String,
    pub(crate) protocol: Protocol,
    pub(crate) owner: Option<Owner>,
    pub(crate) acquired_at: SystemTime,
    pub(crate) expires_at: Option<SystemTime>,
}

#[cfg(feature = "serde")]
fn one_port() -> u16 {
    1
}

impl Lease {
    /// The leased port: the first one, for a block (see [`Request::block`]).
    ///
    /// [`Request::block`]: crate::Request::block
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every port the lease holds: `port()..=port()` unless it is a block.
    pub fn ports(&self) -> RangeInclusive<u16> {
        self.port..=self.last_port()
    }

    /// How many consecutive ports the lease holds (1 unless it is a block).
    pub fn block_len(&self) -> u16 {
        self.block_len
    }

    /// The last port the lease holds.
    pub(crate) fn last_port(&self) -> u16 {
        // The policy never stores a block that runs past 65535; saturate regardless.
        self.port.saturating_add(self.block_len.saturating_sub(1))
    }

    /// Whether the lease holds `port`.
    pub(crate) fn covers(&self, port: u16) -> bool {
        self.ports().contains(&port)
    }

    /// The name the lease was taken under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The protocols the port was checked for.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The pid of the owning process, or `None` for a detached lease.
    pub fn pid(&self) -> Option<u32> {
        self.owner.as_ref().map(Owner::pid)
    }

    /// The owning process, or `None` for a detached lease.
    pub fn owner(&self) -> Option<&Owner> {
        self.owner.as_ref()
    }

    /// When the lease was taken.
    pub fn acquired_at(&self) -> SystemTime {
        self.acquired_at
    }

    /// When the lease expires, if it was given a TTL.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// Whether the lease has no owner process (see [`PortGuard::keep`](crate::PortGuard::keep)).
    pub fn is_detached(&self) -> bool {
        self.owner.is_none()
    }

    /// Whether the expiry has passed at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// A unique identifier of this lease: two leases never share it, even on the same port.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// What a lease is at a given moment, as the registry judges it with its own process probe
/// and clock ([`PortDaddy::state_of`](crate::PortDaddy::state_of)).
///
/// Only [`Live`](LeaseState::Live) and [`Detached`](LeaseState::Detached) leases hold their
/// port; [`Dead`](LeaseState::Dead) and [`Expired`](LeaseState::Expired) ones are reclaimed by
/// the next claim that needs the port, or by [`PortDaddy::reap`](crate::PortDaddy::reap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum LeaseState {
    /// Owned by a process that is still running, and not expired.
    Live,
    /// Owned by a process that has exited (or a pid now used by another process).
    Dead,
    /// Its expiry has passed, whether it has an owner or not.
    Expired,
    /// Without an owner process, and not expired.
    Detached,
}

impl LeaseState {
    /// Whether a lease in this state still holds its port.
    pub fn holds_port(self) -> bool {
        matches!(self, LeaseState::Live | LeaseState::Detached)
    }

    /// The state in lower case, as listings show it: `live`, `dead`, `expired`, `detached`.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Live => "live",
            LeaseState::Dead => "dead",
            LeaseState::Expired => "expired",
            LeaseState::Detached => "detached",
        }
    }
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a guard's port was chosen ([`PortGuard::choice`](crate::PortGuard::choice)).
///
/// ```
/// use portdaddy::{Choice, PortDaddy, Request};
///
/// let registry = PortDaddy::builder()
///     .in_memory()
///     .range(20000..=20099)
///     .port_probe(|_, _| true) // every port free, for the example
///     .open()?;
/// let guard = registry.acquire_with(&Request::new("api").preferred(20042))?;
/// assert_eq!(guard.choice(), Choice::Preferred);
/// assert_eq!(guard.choice().as_str(), "preferred");
/// # Ok::<(), portdaddy::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum Choice {
    /// The port asked for with [`Request::preferred`](crate::Request::preferred) or
    /// [`Request::require`](crate::Request::require).
    Preferred,
    /// The port this name had last time.
    Remembered,
    /// A port found by searching the range (the preferred or remembered one, if any, was taken).
    Searched,
}

impl Choice {
    /// The choice in lower case, as the command's JSON shows it: `preferred`, `remembered`,
    /// `searched`.
    pub fn as_str(self) -> &'static str {
        match self {
            Choice::Preferred => "preferred",
            Choice::Remembered => "remembered",
            Choice::Searched => "searched",
        }
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the Unix epoch, saturating, for storage.
pub(crate) fn to_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// `t` at the precision the registry stores (milliseconds), so a lease in hand equals the
/// same lease read back.
pub(crate) fn at_storage_precision(t: SystemTime) -> SystemTime {
    from_millis(to_millis(t))
}

pub(crate) fn from_millis(ms: i64) -> SystemTime {
    let offset = Duration::from_millis(ms.unsigned_abs());
    let t = if ms >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    // A value no clock of this platform can show came from a damaged row; the epoch is as
    // good a stand-in as any, and never panics.
    t.unwrap_or(UNIX_EPOCH)
}

/// A fresh lease identifier: random, never 0, and below 2^63 so that SQLite stores it as a
/// positive integer.
pub(crate) fn new_lease_id() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let id = h.finish() >> 1;
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(from_millis(to_millis(t)), t);
    }

    #[test]
    fn lease_ids_are_distinct_and_positive() {
        let ids: std::collections::HashSet<u64> = (0..10_000).map(|_| new_lease_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|&i| i > 0 && i < (1 << 63)));
    }
}
