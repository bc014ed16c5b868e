//! Model-based test of the allocation policy, on both backends.
//!
//! Random sequences of operations (acquire, acquire many, drop or release a guard, keep a
//! guard, release by port, reap, crash an owner, drop a crashed owner's guard late, let time
//! pass) run against a real registry and, side by side, against [`Model`]: a plain
//! re-statement of the rules of `src/policy.rs` (preferred port, remembered port with the
//! "keep memory" rule, next-fit search from a cursor that avoids other names' ports (forgetting the memories used
//! longest ago when every vacant port is remembered), reclaim
//! of dead or expired leases, exhaustion). After every step:
//!
//! - the registry's listing equals the model's leases exactly (ports, ids, names, owners,
//!   timestamps, order), and every answer (port, choice, error, reap count) equals the
//!   model's;
//! - and, stated independently of the model's mechanics, the invariants of the spec:
//!   (1) no two leases share a port and every live guard's lease is listed exactly once;
//!   (4) a full range with dead or expired leases still serves an acquire, `Exhausted` comes
//!   only when every usable port of the range is held by a lease that still counts, with
//!   `held` equal to that count, and a lease that still counts is never removed except by
//!   its own guard or by releasing its port; (5) a name whose remembered port is vacant gets
//!   it back as `Choice::Remembered`; (7) dropping or releasing a guard removes exactly its
//!   own lease, even when that lease was reclaimed and the port handed to someone else.
//!
//! Owners are fake processes ([`FakeProcesses`]); a crash kills one, restarts its slot under
//! a new pid, and moves its guards to a zombie list (a crashed process never runs `Drop`; a
//! zombie may be dropped later to check (7)). Time is a [`FakeClock`] that starts and moves
//! between milliseconds; the registry may record times rounded down to its precision, which
//! the model learns from each new lease ([`adopt`]). No port is ever bound (the port probe
//! says every port is free). The SQLite variant opens two handles on one file and uses them
//! in turn, as two participants would. Ports: 25000-25007 (the block of this file).
//!
//! A failing case shrinks to a list of operations printed as the Rust that builds them; paste
//! it into a test like the fixed scenarios at the end of this file to keep it as a
//! regression test (file persistence of proptest failures is off).

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use portdaddy::{Choice, Error, Lease, Owner, PortDaddy, PortGuard, Protocol, Request};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use common::{FakeClock, FakeProcesses};

/// First port of the range; the range is `BASE..BASE + len` with `len` in 4..=6.
const BASE: u16 = 25000;
/// Ports that operations name: the range plus a few ports just above it.
const LAST_NAMED_PORT: u16 = BASE + 7;
const NAMES: &[&str] = &["a", "b", "c"];
/// Fake processes that can own leases (besides the test process itself).
const SLOTS: usize = 3;
/// Fake pids start here, far above any real pid.
const FIRST_FAKE_PID: u32 = 4_000_000;

type Check<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// How the registry of one run is set up.
#[derive(Clone)]
struct Config {
    /// Ports in the range, from [`BASE`].
    len: u16,
    /// A port of the range that is reserved, if any.
    reserved: Option<u16>,
}

/// A preferred (`strict: false`) or required (`strict: true`) port.
#[derive(Clone, Copy, Debug)]
struct Pref {
    port: u16,
    strict: bool,
}

/// One request: a name, an owner slot (`None`: the test process itself), a TTL, a
/// preference, a protocol.
#[derive(Clone)]
struct Req {
    name: &'static str,
    owner: Option<usize>,
    ttl_secs: Option<u64>,
    pref: Option<Pref>,
    protocol: Protocol,
}

/// Builders, in the same words as the `Debug` output, so that a shrunk failing case can be
/// pasted into a test as it is printed.
impl Req {
    fn new(name: &'static str) -> Self {
        Req {
            name,
            owner: None,
            ttl_secs: None,
            pref: None,
            protocol: Protocol::Tcp,
        }
    }

    fn owner(self, slot: usize) -> Self {
        Req {
            owner: Some(slot),
            ..self
        }
    }

    fn ttl(self, secs: u64) -> Self {
        Req {
            ttl_secs: Some(secs),
            ..self
        }
    }

    fn prefer(self, port: u16) -> Self {
        Req {
            pref: Some(Pref {
                port,
                strict: false,
            }),
            ..self
        }
    }

    fn require(self, port: u16) -> Self {
        Req {
            pref: Some(Pref { port, strict: true }),
            ..self
        }
    }

    fn protocol(self, protocol: Protocol) -> Self {
        Req { protocol, ..self }
    }
}

impl fmt::Debug for Req {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Req::new({:?})", self.name)?;
        if let Some(slot) = self.owner {
            write!(f, ".owner({slot})")?;
        }
        if let Some(secs) = self.ttl_secs {
            write!(f, ".ttl({secs})")?;
        }
        match self.pref {
            Some(Pref {
                port,
                strict: false,
            }) => write!(f, ".prefer({port})")?,
            Some(Pref { port, strict: true }) => write!(f, ".require({port})")?,
            None => {}
        }
        if self.protocol != Protocol::Tcp {
            write!(f, ".protocol(Protocol::{:?})", self.protocol)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Config {{ len: {}, reserved: {:?} }}",
            self.len, self.reserved
        )
    }
}

#[derive(Clone)]
enum Op {
    Acquire(Req),
    /// `acquire_many_with`: all or nothing.
    AcquireMany(Vec<Req>),
    /// Drops the live guard at this index (modulo the number of live guards).
    Drop(usize),
    /// `PortGuard::release` of the live guard at this index.
    Release(usize),
    /// `PortGuard::keep` of the live guard at this index.
    Keep(usize),
    /// `PortDaddy::release_port(port)`.
    ReleasePort(u16),
    Reap,
    /// The owner in this slot dies; the slot restarts as a new process.
    Crash(usize),
    /// Drops the crashed owner's guard at this index, long after the crash.
    DropZombie(usize),
    /// The clock moves forward.
    Advance(Duration),
}

/// One line per operation, as Rust that builds it.
impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Acquire(req) => write!(f, "Acquire({req:?})"),
            Op::AcquireMany(reqs) => {
                let reqs: Vec<String> = reqs.iter().map(|r| format!("{r:?}")).collect();
                write!(f, "AcquireMany(vec![{}])", reqs.join(", "))
            }
            Op::Drop(i) => write!(f, "Drop({i})"),
            Op::Release(i) => write!(f, "Release({i})"),
            Op::Keep(i) => write!(f, "Keep({i})"),
            Op::ReleasePort(port) => write!(f, "ReleasePort({port})"),
            Op::Reap => write!(f, "Reap"),
            Op::Crash(slot) => write!(f, "Crash({slot})"),
            Op::DropZombie(i) => write!(f, "DropZombie({i})"),
            Op::Advance(by) => write!(f, "Advance(Duration::from_micros({}))", by.as_micros()),
        }
    }
}

fn req_strategy() -> impl Strategy<Value = Req> {
    let name = prop::sample::select(NAMES);
    let owner = prop_oneof![1 => Just(None), 3 => (0..SLOTS).prop_map(Some)];
    let ttl = prop_oneof![4 => Just(None), 1 => Just(Some(10u64)), 1 => Just(Some(60u64))];
    let pref = prop_oneof![
        4 => Just(None),
        1 => (BASE..=LAST_NAMED_PORT, any::<bool>()).prop_map(|(port, strict)| Some(Pref { port, strict })),
    ];
    let protocol =
        prop_oneof![3 => Just(Protocol::Tcp), 1 => Just(Protocol::Udp), 1 => Just(Protocol::Both)];
    (name, owner, ttl, pref, protocol).prop_map(|(name, owner, ttl_secs, pref, protocol)| Req {
        name,
        owner,
        ttl_secs,
        pref,
        protocol,
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => req_strategy().prop_map(Op::Acquire),
        1 => prop::collection::vec(req_strategy(), 2..=3).prop_map(Op::AcquireMany),
        2 => (0..8usize).prop_map(Op::Drop),
        1 => (0..8usize).prop_map(Op::Release),
        1 => (0..8usize).prop_map(Op::Keep),
        1 => (BASE..=LAST_NAMED_PORT).prop_map(Op::ReleasePort),
        1 => Just(Op::Reap),
        2 => (0..SLOTS).prop_map(Op::Crash),
        1 => (0..8usize).prop_map(Op::DropZombie),
        1 => prop_oneof![
            Just(Duration::from_micros(1_500)),
            Just(Duration::from_secs(5)),
            Just(Duration::from_secs(30)),
        ]
        .prop_map(Op::Advance),
    ]
}

fn config_strategy() -> impl Strategy<Value = Config> {
    (4u16..=6).prop_flat_map(|len| {
        let reserved = prop_oneof![2 => Just(None), 1 => (BASE..BASE + len).prop_map(Some)];
        reserved.prop_map(move |reserved| Config { len, reserved })
    })
}

fn ops_strategy(max_len: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op_strategy(), 1..=max_len)
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// A lease as the model knows it. The registry picks `id`, and may store times at a coarser
/// precision than the clock's: both are learned from the guard when the lease is made (see
/// [`adopt`]).
#[derive(Clone, PartialEq, Eq)]
struct MLease {
    id: u64,
    port: u16,
    name: String,
    protocol: Protocol,
    owner: Option<Owner>,
    acquired_at: SystemTime,
    expires_at: Option<SystemTime>,
}

impl MLease {
    fn of(lease: &Lease) -> Self {
        MLease {
            id: lease.id(),
            port: lease.port(),
            name: lease.name().to_owned(),
            protocol: lease.protocol(),
            owner: lease.owner().cloned(),
            acquired_at: lease.acquired_at(),
            expires_at: lease.expires_at(),
        }
    }
}

/// A time as seconds since the fake clock's start.
fn since_start(t: SystemTime) -> String {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    match t.duration_since(start) {
        Ok(d) => format!("+{:.4}s", d.as_secs_f64()),
        Err(e) => format!("-{:.4}s", e.duration().as_secs_f64()),
    }
}

impl fmt::Debug for MLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} id {} {:?} ",
            self.port, self.name, self.id, self.protocol
        )?;
        match &self.owner {
            Some(o) => write!(f, "owner pid {}", o.pid())?,
            None => write!(f, "detached")?,
        }
        write!(f, " at {}", since_start(self.acquired_at))?;
        if let Some(t) = self.expires_at {
            write!(f, " expires {}", since_start(t))?;
        }
        Ok(())
    }
}

/// What a port check in the policy finds.
enum Slot {
    Available,
    Reserved,
    /// A lease that still counts, under this name.
    Held(String),
}

/// What an acquire (one port) or a batch (several) gave.
type Outcome = Result<Vec<(u16, Choice)>, Refusal>;

/// Why the model refuses a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Refusal {
    Exhausted { held: usize },
    Unavailable { port: u16 },
}

/// The registry state and the rules of `src/policy.rs`, restated plainly.
#[derive(Clone)]
struct Model {
    lo: u16,
    hi: u16,
    reserved: BTreeSet<u16>,
    /// The test process: always alive.
    me: Owner,
    alive: HashSet<Owner>,
    now: SystemTime,
    leases: BTreeMap<u16, MLease>,
    /// name -> remembered port and when the name last recorded its use; a port is
    /// remembered by at most one name.
    names: BTreeMap<String, (u16, SystemTime)>,
    cursor: Option<u16>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut alive: Vec<u32> = self.alive.iter().map(Owner::pid).collect();
        alive.sort_unstable();
        writeln!(f, "model at {}:", since_start(self.now))?;
        writeln!(
            f,
            "  range {}-{}, reserved {:?}",
            self.lo, self.hi, self.reserved
        )?;
        writeln!(f, "  me {}, alive fake pids {alive:?}", self.me.pid())?;
        writeln!(f, "  remembered {:?}, cursor {:?}", self.names, self.cursor)?;
        for lease in self.leases.values() {
            let state = if self.counts(lease) {
                "counts"
            } else {
                "reclaimable"
            };
            writeln!(f, "  lease {lease:?} ({state})")?;
        }
        Ok(())
    }
}

impl Model {
    fn in_range(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    fn is_alive(&self, owner: &Owner) -> bool {
        *owner == self.me || self.alive.contains(owner)
    }

    /// Whether a lease still counts: not expired, and owned by a live process or detached.
    fn counts(&self, lease: &MLease) -> bool {
        let expired = lease.expires_at.is_some_and(|t| t <= self.now);
        !expired && lease.owner.as_ref().is_none_or(|o| self.is_alive(o))
    }

    /// Whether a port could be handed out now: not reserved, no lease that counts on it.
    fn vacant(&self, port: u16) -> bool {
        !self.reserved.contains(&port) && !self.leases.get(&port).is_some_and(|l| self.counts(l))
    }

    fn usable_ports(&self) -> impl Iterator<Item = u16> + '_ {
        (self.lo..=self.hi).filter(|p| !self.reserved.contains(p))
    }

    fn leases_in_range(&self) -> usize {
        self.leases.keys().filter(|p| self.in_range(**p)).count()
    }

    /// The policy's `check`: reclaims a lease on `port` that no longer counts.
    fn check(&mut self, port: u16) -> Slot {
        if self.reserved.contains(&port) {
            return Slot::Reserved;
        }
        if let Some(lease) = self.leases.get(&port) {
            if self.counts(lease) {
                return Slot::Held(lease.name.clone());
            }
            self.leases.remove(&port);
        }
        Slot::Available
    }

    /// Next-fit from the cursor, wrapping once; skips leased ports (dead or not), reserved
    /// ports and, when `avoid`, ports that any name remembers.
    fn search(&self, avoid: bool) -> Option<u16> {
        let start = self.cursor.filter(|c| self.in_range(*c)).unwrap_or(self.lo);
        (start..=self.hi).chain(self.lo..start).find(|p| {
            let remembered = avoid && self.names.values().any(|(q, _)| q == p);
            !self.reserved.contains(p) && !self.leases.contains_key(p) && !remembered
        })
    }

    /// Removes every lease that no longer counts (in the range only, if `only_range`).
    fn reap(&mut self, only_range: bool) -> usize {
        let dead: Vec<u16> = self
            .leases
            .values()
            .filter(|l| (!only_range || self.in_range(l.port)) && !self.counts(l))
            .map(|l| l.port)
            .collect();
        for port in &dead {
            self.leases.remove(port);
        }
        dead.len()
    }

    fn remember(&mut self, name: &str, port: u16) {
        self.names.retain(|n, (p, _)| *p != port || n == name);
        self.names.insert(name.to_owned(), (port, self.now));
    }

    /// Forgets a quarter of the range's size (at least one) of the memories of ports no
    /// lease holds, those used longest ago, ties broken by name; how many.
    fn forget_oldest(&mut self) -> usize {
        let batch = (usize::from(self.hi - self.lo) + 1) / 4;
        let mut oldest: Vec<(SystemTime, String)> = self
            .names
            .iter()
            .filter(|(_, (p, _))| self.in_range(*p) && !self.leases.contains_key(p))
            .map(|(n, (_, at))| (*at, n.clone()))
            .collect();
        oldest.sort();
        oldest.truncate(batch.max(1));
        for (_, name) in &oldest {
            self.names.remove(name);
        }
        oldest.len()
    }

    /// One claim, as `policy::claim` makes it. On `Err` the caller discards this model (the
    /// registry rolls the transaction back).
    fn claim(&mut self, req: &Req, owner: Owner) -> Result<(u16, Choice), Refusal> {
        let mut keep_memory = false;
        let mut found = None;
        if let Some(Pref { port, strict }) = req.pref {
            match self.check(port) {
                Slot::Available => found = Some((port, Choice::Preferred)),
                _ if strict => return Err(Refusal::Unavailable { port }),
                _ => {}
            }
        }
        if found.is_none() {
            if let Some(port) = self
                .names
                .get(req.name)
                .map(|(p, _)| *p)
                .filter(|p| self.in_range(*p))
            {
                match self.check(port) {
                    Slot::Available => found = Some((port, Choice::Remembered)),
                    Slot::Held(name) if name == req.name => keep_memory = true,
                    _ => {}
                }
            }
        }
        let (port, choice) = match found {
            Some(found) => found,
            None => {
                let exhausted = |m: &Model| Refusal::Exhausted {
                    held: m.leases_in_range(),
                };
                // When every vacant port is remembered, the memories used longest ago go.
                let forgetting = |m: &mut Model, port: u16| {
                    if m.forget_oldest() > 0 {
                        m.search(true).unwrap_or(port)
                    } else {
                        port
                    }
                };
                let port = match self.search(true) {
                    Some(port) => port,
                    None if self.search(false).is_some() => {
                        let port = self.search(false).expect("just found");
                        forgetting(self, port)
                    }
                    None if self.reap(true) > 0 => {
                        self.search(false).ok_or_else(|| exhausted(self))?
                    }
                    None => return Err(exhausted(self)),
                };
                self.cursor = Some(if port == self.hi { self.lo } else { port + 1 });
                (port, Choice::Searched)
            }
        };
        let lease = MLease {
            id: 0,
            port,
            name: req.name.to_owned(),
            protocol: req.protocol,
            owner: Some(owner),
            acquired_at: self.now,
            expires_at: req.ttl_secs.map(|s| self.now + Duration::from_secs(s)),
        };
        assert!(
            self.leases.insert(port, lease).is_none(),
            "model bug: claimed a leased port"
        );
        // A remembered port handed out again is recorded again only once a day.
        let fresh = choice == Choice::Remembered
            && self.names.get(req.name).is_some_and(|(_, at)| {
                self.now
                    .duration_since(*at)
                    .is_ok_and(|age| age < Duration::from_secs(24 * 60 * 60))
            });
        if !keep_memory && !fresh {
            self.remember(req.name, port);
        }
        Ok((port, choice))
    }

    /// The listing the registry must show: every lease, oldest first (then by id).
    fn listing(&self) -> Vec<MLease> {
        let mut all: Vec<MLease> = self.leases.values().cloned().collect();
        all.sort_by_key(|l| (l.acquired_at, l.id));
        all
    }

    /// Removes the lease on `port` if it is lease `id`; whether it was.
    fn delete_lease(&mut self, port: u16, id: u64) -> bool {
        if self.leases.get(&port).is_some_and(|l| l.id == id) {
            self.leases.remove(&port);
            true
        } else {
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: one registry, its fakes, the guards, and the model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Sqlite,
}

/// A guard the test holds, with what it was issued as.
struct Held {
    guard: PortGuard,
    id: u64,
    port: u16,
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{} on {}", self.guard.name(), self.id, self.port)
    }
}

struct Harness {
    /// Handles on the registry: one in memory; two independent ones on the SQLite file,
    /// used in turn, as two participants would.
    handles: Vec<PortDaddy>,
    /// Steps taken, which picks the handle.
    steps: usize,
    processes: FakeProcesses,
    clock: FakeClock,
    /// The current process of each owner slot.
    slots: Vec<Owner>,
    next_pid: u32,
    /// Guards of live owners (or of the test process).
    live: Vec<Held>,
    /// Guards of crashed owners, never dropped by their process.
    zombies: Vec<Held>,
    model: Model,
    /// The registry's listing after the previous step (checked against the model then).
    listed: Vec<MLease>,
    /// What each acquire and batch gave, in order.
    outcomes: Vec<Outcome>,
    _dir: Option<tempfile::TempDir>,
}

/// What a step allows to disappear from the listing besides leases that no longer count.
enum Removal {
    Nothing,
    /// Exactly this lease, if present (a guard drop or release).
    Lease(u64),
    /// Whatever lease is on this port (release by port).
    Port(u16),
    /// Any lease that no longer counts (an acquire or a reap may reclaim it).
    Reclaimable,
}

impl Harness {
    fn new(backend: Backend, config: &Config) -> Self {
        let processes = FakeProcesses::default();
        let clock = FakeClock::new();
        let hi = BASE + config.len - 1;
        let builder = || {
            PortDaddy::builder()
                .range(BASE..=hi)
                .reserve(config.reserved)
                .process_probe(processes.probe())
                .port_probe(common::all_free)
                .clock(clock.as_fn())
        };
        let (handles, dir) = match backend {
            Backend::Memory => (
                vec![builder().in_memory().open().expect("open in memory")],
                None,
            ),
            Backend::Sqlite => {
                let (dir, path) = common::temp_registry();
                let open = || {
                    builder()
                        .path(&path)
                        .open()
                        .expect("open the SQLite registry")
                };
                (vec![open(), open()], Some(dir))
            }
        };
        let slots: Vec<Owner> = (0..SLOTS as u32)
            .map(|i| processes.spawn(FIRST_FAKE_PID + i))
            .collect();
        // Start between two milliseconds, as a real clock would.
        clock.advance(Duration::from_micros(700));
        let model = Model {
            lo: BASE,
            hi,
            reserved: config.reserved.into_iter().collect(),
            me: Owner::current().expect("describe the test process"),
            alive: slots.iter().cloned().collect(),
            now: clock.as_fn()(),
            leases: BTreeMap::new(),
            names: BTreeMap::new(),
            cursor: None,
        };
        Harness {
            handles,
            steps: 0,
            processes,
            clock,
            slots,
            next_pid: FIRST_FAKE_PID + SLOTS as u32,
            live: Vec::new(),
            zombies: Vec::new(),
            model,
            listed: Vec::new(),
            outcomes: Vec::new(),
            _dir: dir,
        }
    }

    /// The handle this step uses.
    fn registry(&self) -> &PortDaddy {
        &self.handles[self.steps % self.handles.len()]
    }

    fn owner_of(&self, req: &Req) -> Owner {
        req.owner
            .map_or_else(|| self.model.me.clone(), |slot| self.slots[slot].clone())
    }

    fn request(&self, req: &Req) -> Request {
        let mut request = Request::new(req.name);
        if let Some(slot) = req.owner {
            request = request.owner(self.slots[slot].clone());
        }
        if let Some(secs) = req.ttl_secs {
            request = request.ttl(Duration::from_secs(secs));
        }
        let request = request.protocol(req.protocol);
        match req.pref {
            Some(Pref {
                port,
                strict: false,
            }) => request.preferred(port),
            Some(Pref { port, strict: true }) => request.require(port),
            None => request,
        }
    }

    fn step(&mut self, op: &Op) -> Check {
        self.steps += 1;
        let before = self.model.clone();
        let removal = match op {
            Op::Acquire(req) => {
                self.acquire(req)?;
                Removal::Reclaimable
            }
            Op::AcquireMany(reqs) => {
                self.acquire_many(reqs)?;
                Removal::Reclaimable
            }
            Op::Drop(i) | Op::Release(i) => {
                if self.live.is_empty() {
                    return self.verify(&before, Removal::Nothing);
                }
                let held = self.live.remove(i % self.live.len());
                let id = held.id;
                self.model.delete_lease(held.port, held.id);
                if let Op::Release(_) = op {
                    let what = format!("{held:?}");
                    held.guard
                        .release()
                        .map_err(|e| format!("release of {what} failed: {e}"))?;
                } else {
                    drop(held);
                }
                Removal::Lease(id)
            }
            Op::DropZombie(i) => {
                if self.zombies.is_empty() {
                    return self.verify(&before, Removal::Nothing);
                }
                let held = self.zombies.remove(i % self.zombies.len());
                let id = held.id;
                self.model.delete_lease(held.port, held.id);
                drop(held);
                Removal::Lease(id)
            }
            Op::Keep(i) => {
                if self.live.is_empty() {
                    return self.verify(&before, Removal::Nothing);
                }
                let held = self.live.remove(i % self.live.len());
                let (id, port) = (held.id, held.port);
                let present = self.model.leases.get(&port).is_some_and(|l| l.id == id);
                match (held.guard.keep(), present) {
                    (Ok(lease), true) => {
                        let model = self.model.leases.get_mut(&port).expect("present");
                        model.owner = None;
                        ensure!(
                            MLease::of(&lease) == *model,
                            "keep returned {lease:?}, the model expected {model:?}"
                        );
                    }
                    (Err(e), false) => ensure!(
                        matches!(e.error(), Error::LeaseLost { port: p, .. } if *p == port),
                        "keep of a lost lease on {port} failed with {e:?}, expected LeaseLost"
                    ),
                    (got, present) => {
                        return Err(format!(
                            "keep of lease {id} on {port} gave {got:?}; the model says the \
                             lease is present: {present}"
                        ))
                    }
                }
                Removal::Nothing
            }
            Op::ReleasePort(port) => {
                let expected = self.model.leases.remove(port).is_some();
                let got = self
                    .registry()
                    .release_port(*port)
                    .map_err(|e| format!("release_port({port}): {e}"))?;
                ensure!(
                    got == expected,
                    "release_port({port}) returned {got}, the model expected {expected}"
                );
                Removal::Port(*port)
            }
            Op::Reap => {
                let expected = self.model.reap(false);
                let got = self.registry().reap().map_err(|e| format!("reap: {e}"))?;
                ensure!(
                    got == expected,
                    "reap() returned {got}, the model expected {expected}"
                );
                Removal::Reclaimable
            }
            Op::Crash(slot) => {
                let dead = self.slots[*slot].clone();
                self.processes.kill(&dead);
                self.model.alive.remove(&dead);
                let restarted = self.processes.spawn(self.next_pid);
                self.next_pid += 1;
                self.model.alive.insert(restarted.clone());
                self.slots[*slot] = restarted;
                let (crashed, live): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.live)
                    .into_iter()
                    .partition(|h| h.guard.lease().owner() == Some(&dead));
                self.live = live;
                self.zombies.extend(crashed);
                Removal::Nothing
            }
            Op::Advance(by) => {
                self.clock.advance(*by);
                self.model.now += *by;
                Removal::Nothing
            }
        };
        self.verify(&before, removal)
    }

    fn acquire(&mut self, req: &Req) -> Check {
        let before = self.model.clone();
        let mut next = self.model.clone();
        let expected = next.claim(req, self.owner_of(req));
        let got = self.registry().acquire_with(&self.request(req));
        let outcome = match &got {
            Ok(guard) => Ok((guard.port(), guard.choice())),
            Err(Error::Exhausted { range, held, .. }) => {
                ensure!(
                    (range.start(), range.end()) == (before.lo, before.hi),
                    "Exhausted names range {range}, not {}-{}",
                    before.lo,
                    before.hi
                );
                Err(Refusal::Exhausted { held: *held })
            }
            Err(Error::PortUnavailable { port, .. }) => Err(Refusal::Unavailable { port: *port }),
            Err(other) => return Err(format!("acquire {req:?} failed unexpectedly: {other:?}")),
        };
        check_acquire_rules(&before, req, &outcome)?;
        self.outcomes.push(outcome.clone().map(|got| vec![got]));
        ensure!(
            outcome == expected,
            "acquire {req:?} gave {outcome:?}, the model expected {expected:?}\n{before:?}"
        );
        if let Ok(guard) = got {
            let port = guard.port();
            let id = adopt(&mut next, &guard)?;
            ensure!(
                guard.name() == req.name,
                "guard named {:?}, not {:?}",
                guard.name(),
                req.name
            );
            self.live.push(Held { id, port, guard });
            self.model = next;
        }
        Ok(())
    }

    fn acquire_many(&mut self, reqs: &[Req]) -> Check {
        let mut next = self.model.clone();
        let expected: Result<Vec<(u16, Choice)>, Refusal> = reqs
            .iter()
            .map(|req| next.claim(req, self.owner_of(req)))
            .collect();
        let requests: Vec<Request> = reqs.iter().map(|r| self.request(r)).collect();
        let got = self.registry().acquire_many_with(&requests);
        let outcome: Outcome = match &got {
            Ok(guards) => Ok(guards.iter().map(|g| (g.port(), g.choice())).collect()),
            Err(Error::Exhausted { held, .. }) => Err(Refusal::Exhausted { held: *held }),
            Err(Error::PortUnavailable { port, .. }) => Err(Refusal::Unavailable { port: *port }),
            Err(other) => {
                return Err(format!(
                    "acquire_many {reqs:?} failed unexpectedly: {other:?}"
                ))
            }
        };
        self.outcomes.push(outcome.clone());
        ensure!(
            outcome == expected,
            "acquire_many {reqs:?} gave {outcome:?}, the model expected {expected:?}\n\
             {:?}",
            self.model
        );
        if let Ok(guards) = got {
            let ports: BTreeSet<u16> = guards.iter().map(PortGuard::port).collect();
            ensure!(
                ports.len() == guards.len(),
                "(1) acquire_many handed out one port twice: {guards:?}"
            );
            for guard in guards {
                let port = guard.port();
                ensure!(
                    self.model.vacant(port),
                    "(1) acquire_many took {port}, held by a lease that counts"
                );
                let id = adopt(&mut next, &guard)?;
                self.live.push(Held { id, port, guard });
            }
            self.model = next;
        }
        Ok(())
    }

    /// Compares the registry with the model and checks the invariants after one step.
    fn verify(&mut self, before: &Model, removal: Removal) -> Check {
        let listed: Vec<MLease> = self
            .registry()
            .list()
            .map_err(|e| format!("list failed: {e}"))?
            .iter()
            .map(MLease::of)
            .collect();

        // (1) Never a duplicate.
        let ports: BTreeSet<u16> = listed.iter().map(|l| l.port).collect();
        ensure!(
            ports.len() == listed.len(),
            "(1) two leases share a port: {listed:#?}"
        );
        // (7) A guard's drop or release removes nothing but its own lease.
        if let Removal::Lease(id) = removal {
            let expected: Vec<&MLease> = self.listed.iter().filter(|l| l.id != id).collect();
            let got: Vec<&MLease> = listed.iter().collect();
            ensure!(
                got == expected,
                "(7) dropping or releasing the guard of lease {id} changed other leases: \
                 before {:#?}, after {listed:#?}",
                self.listed
            );
        }

        // (4)/(7) Leases that still count disappear only through their own guard or port.
        for lease in &self.listed {
            if listed.iter().any(|l| l.id == lease.id) {
                continue;
            }
            let allowed = match removal {
                Removal::Nothing => false,
                Removal::Lease(id) => lease.id == id,
                Removal::Port(port) => lease.port == port,
                Removal::Reclaimable => !before.counts(lease),
            };
            ensure!(
                allowed,
                "(4) lease {lease:?} disappeared although it still counted and the step did \
                 not release it (only its own guard or its port may)"
            );
        }
        // (1) Every live guard whose lease the model still has is listed exactly once.
        for held in &self.live {
            let on_port: Vec<&MLease> = listed.iter().filter(|l| l.port == held.port).collect();
            let mine = on_port.iter().filter(|l| l.id == held.id).count();
            ensure!(
                mine <= 1,
                "(1) the lease of {held:?} is listed {mine} times"
            );
            if self
                .model
                .leases
                .get(&held.port)
                .is_some_and(|l| l.id == held.id)
            {
                ensure!(
                    on_port.len() == 1 && mine == 1,
                    "(1) live guard {held:?} is not listed exactly once: {on_port:?}"
                );
            }
        }

        // The registry is exactly the model.
        let expected = self.model.listing();
        ensure!(
            listed == expected,
            "the registry lists {listed:#?}\nthe model expects {expected:#?}"
        );
        self.listed = listed;
        Ok(())
    }

    /// Drops every guard still held (live first, then zombies), checking after each.
    fn finish(&mut self) -> Check {
        while !self.live.is_empty() {
            self.step(&Op::Drop(0))?;
        }
        while !self.zombies.is_empty() {
            self.step(&Op::DropZombie(0))?;
        }
        Ok(())
    }
}

/// How much coarser than the clock the registry may record a lease's times.
const TIME_PRECISION: Duration = Duration::from_millis(1);

/// Learns the id and the recorded times of a lease the model predicted, from its guard, and
/// checks the rest of the guard's lease against the prediction. A recorded time may be
/// rounded down by less than [`TIME_PRECISION`]; from then on the model uses it as recorded
/// (so expiry is decided on the recorded value), and the listing must show exactly it.
fn adopt(model: &mut Model, guard: &PortGuard) -> Check<u64> {
    let got = MLease::of(guard.lease());
    let lease = model
        .leases
        .get_mut(&got.port)
        .expect("the model leased the port");
    let rounded = |recorded: SystemTime, exact: SystemTime| {
        exact
            .duration_since(recorded)
            .is_ok_and(|d| d < TIME_PRECISION)
    };
    let times_ok = rounded(got.acquired_at, lease.acquired_at)
        && match (got.expires_at, lease.expires_at) {
            (Some(g), Some(e)) => rounded(g, e),
            (g, e) => g == e,
        };
    ensure!(
        times_ok,
        "the guard's lease {got:?} has other times than the model's {lease:?}"
    );
    lease.id = got.id;
    lease.acquired_at = got.acquired_at;
    lease.expires_at = got.expires_at;
    ensure!(
        got == *lease,
        "the guard's lease {got:?} differs from the model's {lease:?}"
    );
    Ok(got.id)
}

/// The spec's rules for one acquire, from what the model knew before it: (1) never a port
/// held by a lease that counts, (4) exhaustion only when every usable port of the range is
/// held by such a lease, (5) a vacant remembered port comes back as `Remembered`.
fn check_acquire_rules(m: &Model, req: &Req, outcome: &Result<(u16, Choice), Refusal>) -> Check {
    let pref_vacant = req.pref.filter(|p| m.vacant(p.port));
    let remembered = m
        .names
        .get(req.name)
        .map(|(p, _)| *p)
        .filter(|p| m.in_range(*p) && m.vacant(*p));
    match *outcome {
        Ok((port, choice)) => {
            ensure!(
                m.vacant(port),
                "(1) acquire {req:?} got {port}, reserved or held by a lease that counts"
            );
            if let Some(pref) = pref_vacant {
                ensure!(
                    (port, choice) == (pref.port, Choice::Preferred),
                    "acquire {req:?}: the preferred port was vacant, yet got {port} ({choice:?})"
                );
            } else if let Some(sticky) = remembered {
                ensure!(
                    (port, choice) == (sticky, Choice::Remembered),
                    "(5) {:?} remembers {sticky}, which is vacant, yet got {port} ({choice:?})",
                    req.name
                );
            } else if choice == Choice::Searched {
                ensure!(
                    m.in_range(port),
                    "acquire {req:?}: searched port {port} is outside the range"
                );
            } else {
                return Err(format!(
                    "acquire {req:?} got {port} as {choice:?}, which was not on offer"
                ));
            }
        }
        Err(Refusal::Exhausted { held }) => {
            let busy: Vec<u16> = m.usable_ports().filter(|p| m.vacant(*p)).collect();
            ensure!(
                busy.is_empty() && pref_vacant.is_none(),
                "(4) acquire {req:?} returned Exhausted although {busy:?} (or the preferred \
                 port) could be reclaimed or was free"
            );
            ensure!(
                held == m.leases_in_range() && held == m.usable_ports().count(),
                "(4) Exhausted reports held = {held}; {} leases in the range, {} usable ports",
                m.leases_in_range(),
                m.usable_ports().count()
            );
        }
        Err(Refusal::Unavailable { port }) => {
            ensure!(
                req.pref.is_some_and(|p| p.strict && p.port == port) && !m.vacant(port),
                "acquire {req:?} refused port {port} although it was not required or was vacant"
            );
        }
    }
    Ok(())
}

/// Runs `ops` on a fresh registry of `backend`, checking after every step; what each acquire
/// gave.
fn run(backend: Backend, config: &Config, ops: &[Op]) -> Check<Vec<Outcome>> {
    let mut harness = Harness::new(backend, config);
    for (i, op) in ops.iter().enumerate() {
        harness.step(op).map_err(|e| {
            format!(
                "{backend:?} registry (handle {}), step {i} {op:?}: {e}\nlive guards: {:?}\nzombie guards: {:?}",
                harness.steps % harness.handles.len(),
                harness.live,
                harness.zombies
            )
        })?;
    }
    harness
        .finish()
        .map_err(|e| format!("{backend:?} registry, dropping the remaining guards: {e}"))?;
    Ok(harness.outcomes)
}

fn proptest_config(default_cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig {
        // Regressions are kept as named tests in this file instead of a side file.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    config
}

proptest! {
    #![proptest_config(proptest_config(512))]

    #[test]
    fn memory_registry_follows_the_model(config in config_strategy(), ops in ops_strategy(60)) {
        run(Backend::Memory, &config, &ops).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(proptest_config(192))]

    #[test]
    fn sqlite_registry_follows_the_model(config in config_strategy(), ops in ops_strategy(40)) {
        run(Backend::Sqlite, &config, &ops).map_err(TestCaseError::fail)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed scenarios: the paths the spec names, exercised on every run whatever proptest draws
// ---------------------------------------------------------------------------------------------

fn both_backends(config: &Config, ops: &[Op], expected: &[Outcome]) {
    for backend in [Backend::Memory, Backend::Sqlite] {
        match run(backend, config, ops) {
            Ok(outcomes) => assert_eq!(outcomes, expected, "{backend:?} registry"),
            Err(e) => panic!("{e}"),
        }
    }
}

fn searched(port: u16) -> Outcome {
    Ok(vec![(port, Choice::Searched)])
}

fn remembered(port: u16) -> Outcome {
    Ok(vec![(port, Choice::Remembered)])
}

fn preferred(port: u16) -> Outcome {
    Ok(vec![(port, Choice::Preferred)])
}

fn exhausted(held: usize) -> Outcome {
    Err(Refusal::Exhausted { held })
}

const FOUR: Config = Config {
    len: 4,
    reserved: None,
};

#[test]
fn full_range_of_crashed_owners_serves_the_next_acquire() {
    both_backends(
        &FOUR,
        &[
            Op::Acquire(Req::new("a").owner(0)),
            Op::Acquire(Req::new("b").owner(0)),
            Op::Acquire(Req::new("c").owner(1)),
            Op::Acquire(Req::new("a")),
            Op::Acquire(Req::new("b").owner(2)), // full, everyone alive
            Op::Crash(0),
            Op::Acquire(Req::new("c").owner(2)), // reaps both of slot 0's leases
            Op::Acquire(Req::new("a").owner(1)), // takes b's remembered port as a last resort
            Op::Acquire(Req::new("b").owner(1)), // full again
            Op::DropZombie(0),                   // its port went to c: must delete nothing
            Op::DropZombie(0),                   // its port went to a: must delete nothing
        ],
        &[
            searched(BASE),
            searched(BASE + 1),
            searched(BASE + 2),
            searched(BASE + 3),
            exhausted(4),
            searched(BASE),
            searched(BASE + 1),
            exhausted(4),
        ],
    );
}

#[test]
fn sticky_names_come_back_and_keep_their_memory_for_a_second_instance() {
    both_backends(
        &Config {
            len: 5,
            reserved: Some(BASE + 1),
        },
        &[
            Op::Acquire(Req::new("a")),
            Op::Acquire(Req::new("b").owner(0)), // skips the reserved port
            Op::Drop(0),                         // a's port is vacant, and remembered
            Op::Acquire(Req::new("c")),
            Op::Acquire(Req::new("c").owner(1)), // second instance: c keeps its memory
            Op::Acquire(Req::new("a").owner(1)), // a's port back
            Op::Acquire(Req::new("a").owner(2)), // full
            Op::Drop(0),                         // b's port is vacant, and remembered
            Op::Acquire(Req::new("a").owner(2)), // nothing else left: takes b's port
            Op::Crash(1),
            Op::Acquire(Req::new("a")), // a's port, reclaimed from its dead first instance
            Op::Acquire(Req::new("b")), // b's port is a's now: full, reaps c's dead instance
        ],
        &[
            searched(BASE),
            searched(BASE + 2),
            searched(BASE + 3),
            searched(BASE + 4),
            remembered(BASE),
            exhausted(4),
            searched(BASE + 2),
            remembered(BASE),
            searched(BASE + 4),
        ],
    );
}

#[test]
fn kept_and_expired_leases_follow_their_rules() {
    let ttl = |name, secs| Op::Acquire(Req::new(name).owner(0).ttl(secs).protocol(Protocol::Both));
    both_backends(
        &FOUR,
        &[
            ttl("a", 10),
            Op::Keep(0), // detached, expires in 10 s
            Op::Acquire(Req::new("b")),
            Op::Keep(0), // detached for good
            ttl("c", 60),
            Op::Acquire(Req::new("a").owner(1)), // second instance of a
            Op::Acquire(Req::new("b").owner(2)), // full: nothing expired yet
            Op::Advance(Duration::from_secs(30)), // a's detached lease expires
            Op::Acquire(Req::new("a").owner(2)), // its expired lease is reclaimed on the spot
            Op::ReleasePort(BASE + 1),           // the only end of b's detached lease
            Op::Advance(Duration::from_secs(30)), // c expires although its owner lives
            Op::Reap,
            Op::Drop(0), // c's guard: its lease is gone, nothing else may go
            Op::Drop(0),
        ],
        &[
            searched(BASE),
            searched(BASE + 1),
            searched(BASE + 2),
            searched(BASE + 3),
            exhausted(4),
            remembered(BASE),
        ],
    );
}

#[test]
fn a_released_port_reissued_to_another_name_survives_the_old_guard() {
    both_backends(
        &FOUR,
        &[
            Op::Acquire(Req::new("a").owner(0)),
            Op::ReleasePort(BASE),
            Op::Acquire(Req::new("b").owner(1).require(BASE).protocol(Protocol::Udp)),
            Op::Drop(0), // a's guard: b's lease on the same port stays
            Op::Keep(0),
            Op::Acquire(Req::new("a")), // a forgot its port when b took it
        ],
        &[searched(BASE), preferred(BASE), searched(BASE + 1)],
    );
}

#[test]
fn a_failed_batch_leaves_no_trace() {
    both_backends(
        &FOUR,
        &[
            Op::Acquire(Req::new("c").owner(1)),
            Op::Crash(1),
            // The first claim reclaims the dead lease and remembers; the second fails.
            Op::AcquireMany(vec![
                Req::new("a").owner(0).prefer(BASE),
                Req::new("b").owner(0).require(BASE),
            ]),
            Op::Acquire(Req::new("b")),
            Op::AcquireMany(vec![
                Req::new("a").owner(0).prefer(BASE + 6),
                Req::new("b").owner(0).prefer(BASE + 6),
            ]),
            Op::Reap,
            Op::Acquire(Req::new("a")), // a remembers a port outside the range: searched
        ],
        &[
            searched(BASE),
            Err(Refusal::Unavailable { port: BASE }),
            searched(BASE + 1),
            Ok(vec![
                (BASE + 6, Choice::Preferred),
                (BASE + 2, Choice::Searched),
            ]),
            searched(BASE + 3),
        ],
    );
}

/// With a clock finer than the registry's time precision (the system clock is), the lease a
/// guard holds and the one `keep()` returns are still exactly the lease `list()` shows.
#[test]
fn lease_in_hand_equals_the_listed_lease_below_a_millisecond() {
    for backend in [Backend::Memory, Backend::Sqlite] {
        let clock = FakeClock::new();
        clock.advance(Duration::from_micros(1_500));
        let (_dir, path) = common::temp_registry();
        let builder = PortDaddy::builder()
            .range(BASE..=BASE + 3)
            .port_probe(common::all_free)
            .clock(clock.as_fn());
        let registry = match backend {
            Backend::Memory => builder.in_memory().open(),
            Backend::Sqlite => builder.path(&path).open(),
        }
        .expect("open");
        let guard = registry
            .acquire_with(&Request::new("a").ttl(Duration::from_secs(60)))
            .expect("acquire");
        assert_eq!(
            registry.list().expect("list"),
            [guard.lease().clone()],
            "{backend:?}"
        );
        let kept = guard.keep().expect("keep");
        assert_eq!(registry.list().expect("list"), [kept], "{backend:?}");
    }
}
