//! The registry handle: [`PortDaddy`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::builder::{Builder, Settings};
use crate::descriptors;
use crate::error::{Error, Result};
use crate::guard::PortGuard;
use crate::lease::{Choice, Lease, LeaseState, Owner, Protocol};
use crate::lock::Deadline;
use crate::policy::{self, Env};
use crate::probe::handover::{self, Handover, Sockets};
use crate::probe::owner_lock::{owners_dir, Liveness, OwnerLock};
use crate::range::PortRange;
use crate::request::Request;
use crate::stats::Stats;
use crate::store::memory::MemoryStore;
use crate::store::sqlite::{Opened, SqliteStore};
use crate::store::{Counter, Tally, Tx};

/// A handle on a port registry: cheap to clone, `Send + Sync`, unwind safe.
///
/// A file registry coordinates every thread and process of the user that opens the same
/// file; an in-memory registry coordinates the threads that share the handle.
///
/// ```
/// use portdaddy::PortDaddy;
///
/// let dir = tempfile::tempdir()?;
/// let registry = PortDaddy::open(dir.path().join("ports.sqlite3"))?;
/// let a = registry.acquire("api")?;
/// let b = registry.acquire("api")?; // names are labels, not keys: b gets another port
/// assert_ne!(a.port(), b.port());
/// assert_eq!(registry.list()?.len(), 2);
/// drop((a, b));
/// assert!(registry.list()?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Who can share a registry
///
/// Every process of the host that can open the file, in any PID namespace: a container that
/// shares the file with the host works. Within one namespace an owner is judged by pid and
/// start time; across namespaces, where pids mean nothing, by a lock file that each handle
/// holds in `<registry>.owners/` while it is open (see [`Owner`]). All participants must
/// run on one host (one kernel: the file locks and the boot identity are per host) and agree
/// on the time; a [`Clock`](crate::Clock) other than the system clock is for in-memory
/// registries in tests.
///
/// # Security
///
/// The registry is private to its user (`0700` directory, `0600` files), and portdaddy
/// trusts every process that can write it: anyone who can write the file can hand out or
/// free any port in it. Share it with other users only if you trust them that far.
///
/// # A registry deleted under open handles
///
/// If the registry file or its directory is deleted (or another file put in its place) while
/// handles are open, new processes create a new registry at the path. Each handle notices
/// at its next operation, opens the new file and records there again the leases it holds; a
/// lease whose port someone took meanwhile is lost, and its guard's
/// [`release`](PortGuard::release) reports [`Error::LeaseLost`]. Until the handle's next
/// operation only the port probe keeps its ports from newcomers, so bind a leased port early
/// (or take the listener with [`acquire_listener`](Self::acquire_listener)).
///
/// # Forking
///
/// A child created by `fork` without `exec` from a process that has a file registry open
/// can use no file registry: the handle it inherited, a new one, and
/// [`portdaddy::acquire`](crate::acquire) all fail at once with [`Error::ForkedHandle`],
/// touching neither the file nor its lock, so the parent goes on undisturbed. (SQLite keeps
/// each file's lock state in process memory, which the child inherits as it was, perhaps
/// mid-transaction.) `exec` a program in the child, or fork before opening a registry.
///
/// # Panics and unwinding
///
/// `PortDaddy` and [`PortGuard`] are [`UnwindSafe`] and [`RefUnwindSafe`], so a test harness
/// can use them across [`std::panic::catch_unwind`]. A panic inside a call, say in a
/// [`PortProbe`](crate::PortProbe), [`ProcessProbe`](crate::ProcessProbe) or
/// [`Clock`](crate::Clock) of yours, leaves the registry as it was before the call: the
/// call's transaction is rolled back (a batch is all or nothing here too), the registry's
/// lock is let go, and the handle records a lease as held only once its transaction has
/// committed. The handle stays usable after the panic. Your probes and clock are called
/// again by later calls: if a panic of theirs can leave them in a state they should not be
/// used in, that is theirs to handle.
#[derive(Clone)]
pub struct PortDaddy {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    settings: Settings,
    /// The configured process probe, with owners of other PID namespaces judged by their
    /// lock files.
    liveness: Liveness,
    /// This process, as the handle was opened (a file handle's current owner lock file is
    /// in its [`FileState`]).
    me: Owner,
    path: Option<PathBuf>,
    /// Counts an open file registry, so that a forked child knows it inherited one. Last, so
    /// that it is dropped after the store.
    _opened: Option<crate::fork::Opened>,
}

// A handle is unwind safe (see "Panics and unwinding" above): a panic during a call rolls
// its transaction back (SQLite's through `RollbackUnlessCommitted`, the memory store's
// through its undo log), and the handle's state behind a mutex changes only once a
// transaction has committed, which is why a poisoned mutex is simply taken over. What
// the compiler cannot see through are the caller's probes and clock, shared as `Arc<dyn …>`
// in `settings` and `liveness`; everything else in `Inner` must be unwind safe on its own,
// which the check below holds to.
impl UnwindSafe for Inner {}
impl RefUnwindSafe for Inner {}

const _: fn() = || {
    fn unwind_safe<T: UnwindSafe + RefUnwindSafe>() {}
    // Every field of `Inner` but `settings` and `liveness`.
    unwind_safe::<Backend>();
    unwind_safe::<Owner>();
    unwind_safe::<Option<PathBuf>>();
    unwind_safe::<Option<crate::fork::Opened>>();
    // What the crate promises.
    fn promised<T: Send + Sync + UnwindSafe + RefUnwindSafe>() {}
    promised::<PortDaddy>();
    promised::<PortGuard>();
};

enum Backend {
    File {
        // Boxed: a file handle's state is several times the size of a memory store.
        file: Box<Mutex<FileState>>,
        timeout: Duration,
    },
    Memory(MemoryStore),
}

/// A file registry as one handle uses it: the store, the handle's owner lock file, and the
/// leases the handle holds, so that it can record them again if the registry file is
/// deleted or replaced under it.
struct FileState {
    store: SqliteStore,
    /// Held while the handle lives, so that other PID namespaces can tell this process lives.
    owner_lock: OwnerLock,
    /// This process with the name of `owner_lock`: the owner its claims record.
    me: Owner,
    holdings: Holdings,
}

/// What a file handle holds in its registry.
#[derive(Default)]
struct Holdings {
    /// The leases this handle claimed and has not released or detached, by port and id, as
    /// recorded.
    held: BTreeMap<(u16, u64), Lease>,
    /// Leases that could not be recorded again in a new registry file because another holder
    /// had taken a port of theirs meanwhile: releasing them reports [`Error::LeaseLost`].
    lost: BTreeSet<(u16, u64)>,
    /// The store opened a new registry file, and `held` is not recorded in it yet.
    new_file: bool,
    /// The handle took a new owner lock file, and its leases in the registry do not name it
    /// yet.
    restamp: bool,
}

impl Holdings {
    fn hold(&mut self, lease: &Lease) {
        self.held.insert((lease.port, lease.id), lease.clone());
    }

    /// Forgets the held leases that are not among `left_behind`, the leases of the registry
    /// file they were recorded in as it was last: others released (or reaped) them there,
    /// and their ports may be someone else's now.
    fn keep_only(&mut self, left_behind: &[Lease]) {
        let there: BTreeSet<(u16, u64)> = left_behind.iter().map(|l| (l.port, l.id)).collect();
        self.held.retain(|key, lease| {
            let keep = there.contains(key);
            if !keep {
                tracing::info!(port = lease.port, name = %lease.name,
                    "a held lease had been released by others before the registry file was \
                     deleted or replaced; not recording it again");
            }
            keep
        });
    }

    /// Forgets the lease `id` on `port`; whether it had been lost.
    fn forget(&mut self, port: u16, id: u64) -> bool {
        self.held.remove(&(port, id));
        self.lost.remove(&(port, id))
    }
}

impl PortDaddy {
    /// Opens (creating if needed) the file registry at `path`, with default settings.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let path = dir.path().join("registry.sqlite3");
    /// let registry = portdaddy::PortDaddy::open(&path)?;
    /// let guard = registry.acquire("postgres")?;
    /// assert!(registry.range().contains(guard.port()));
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// See [`Builder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Builder::new().path(path).open()
    }

    /// Opens the registry at the default path ([`PortDaddy::default_path`]).
    ///
    /// # Errors
    ///
    /// See [`Builder::open`].
    pub fn open_default() -> Result<Self> {
        Builder::new().open()
    }

    /// The process-wide in-memory registry: every call returns a handle to the same one, with
    /// default settings. It coordinates the threads of this process and touches no file.
    ///
    /// It does not coordinate processes: under `cargo nextest`, which runs each test in a
    /// process of its own, only the port probe keeps two tests apart. Use
    /// [`crate::acquire`] (the per-user file registry) there. For a separate in-memory
    /// registry with settings of its own use `PortDaddy::builder().in_memory().open()`.
    ///
    /// ```
    /// let guard = portdaddy::PortDaddy::in_process().acquire("worker")?;
    /// assert!(guard.port() >= 1024);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    pub fn in_process() -> Self {
        static SHARED: OnceLock<PortDaddy> = OnceLock::new();
        SHARED
            .get_or_init(|| PortDaddy::memory(Settings::defaults()))
            .clone()
    }

    /// A builder to choose the path, range, reserved ports, probes, clock and lock timeout.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The registry path used when none is given: `$PORTDADDY_DB` if set, else
    /// `$XDG_STATE_HOME/portdaddy/registry.sqlite3`, else
    /// `~/.local/state/portdaddy/registry.sqlite3` (`%LOCALAPPDATA%\portdaddy\…` on Windows),
    /// else `portdaddy-<uid>/registry.sqlite3` in the temp directory.
    pub fn default_path() -> PathBuf {
        crate::paths::default_location().0
    }

    /// Examines the registry file at `path` and reports one [`Check`](crate::Check) per
    /// topic: the path, directory and file permissions, schema version, journal mode,
    /// integrity, `range` against the kernel's ephemeral range, and leases whose owner died
    /// or whose expiry passed (judged by the default probes and the system clock).
    ///
    /// Nothing is created, written, migrated or reclaimed: the file is read through a
    /// read-only connection, so a registry that cannot be used stays exactly as it was for
    /// inspection, and a missing one is not created. A registry that cannot be opened is
    /// itself a failed check, not an error.
    ///
    /// See [`Diagnosis`](crate::Diagnosis) for an example.
    pub fn diagnose(path: impl AsRef<Path>, range: PortRange) -> crate::Diagnosis {
        crate::doctor::diagnose(path.as_ref(), range)
    }

    pub(crate) fn memory(settings: Settings) -> Self {
        let pid = std::process::id();
        // In memory, only this process's identity matters; a placeholder serves if the
        // system cannot describe it.
        let me = Owner::current().unwrap_or_else(|_| Owner::new(pid, 0, ""));
        Self::from_inner(Inner {
            backend: Backend::Memory(MemoryStore::default()),
            liveness: Liveness::new(settings.processes.clone(), &me, None),
            settings,
            me,
            path: None,
            _opened: None,
        })
    }

    pub(crate) fn file(
        path: &Path,
        shared_tmp: bool,
        timeout: Duration,
        settings: Settings,
    ) -> Result<Self> {
        // Before anything touches SQLite: a child that inherited connections must not.
        let opened = crate::fork::opening()?;
        // Leases must name this process exactly, or others would take them for dead.
        let me = Owner::current().map_err(|e| match e {
            // Reading /proc/self takes a descriptor: without one, this process only seems
            // to be unreadable.
            Error::ProcessUnreadable { .. } | Error::NoSuchProcess { .. } => {
                match descriptors::lacking(1) {
                    Some(error) => descriptors::out_of_descriptors(
                        path,
                        "cannot read the identity of this process from /proc",
                        error,
                    ),
                    None => e,
                }
            }
            other => other,
        })?;
        let store =
            SqliteStore::open(path, shared_tmp, timeout).map_err(descriptors::name_cause)?;
        // Beside the real file, as the lock file is, however the registry was reached.
        let owners = owners_dir(store.real_path());
        let lock =
            OwnerLock::take(&owners, &me).map_err(|e| owner_lock_err(store.path(), &owners, e))?;
        let me = me.with_lock(Some(lock.name().to_owned()));
        let path = Some(store.path().to_owned());
        Ok(Self::from_inner(Inner {
            backend: Backend::File {
                file: Box::new(Mutex::new(FileState {
                    store,
                    owner_lock: lock,
                    me: me.clone(),
                    holdings: Holdings::default(),
                })),
                timeout,
            },
            liveness: Liveness::new(settings.processes.clone(), &me, Some(owners)),
            settings,
            me,
            path,
            _opened: Some(opened),
        }))
    }

    /// Keeps this handle, and with it its owner lock file, open until the process exits.
    pub(crate) fn keep_open_until_exit(&self) {
        static KEPT: Mutex<Vec<PortDaddy>> = Mutex::new(Vec::new());
        let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        if !kept.iter().any(|r| Arc::ptr_eq(&r.inner, &self.inner)) {
            kept.push(self.clone());
        }
    }

    fn from_inner(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Leases a port under `name`: its remembered port if free, else a free port of the range.
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let first = registry.acquire("web")?.port(); // released again at once
    /// assert_eq!(registry.acquire("web")?.port(), first); // the name remembers its port
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`],
    /// [`Error::Exhausted`], or a registry error.
    pub fn acquire(&self, name: &str) -> Result<PortGuard> {
        self.acquire_with(&Request::new(name))
    }

    /// Leases a port as `request` describes (preferred port, TTL, protocol, owner).
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire), plus
    /// [`Error::PortUnavailable`] for a required port that is
    /// taken and [`Error::InvalidRequest`].
    pub fn acquire_with(&self, request: &Request) -> Result<PortGuard> {
        self.check_request(request)?;
        let (lease, choice, sockets) = self
            .counted_claim(
                1,
                |tx, env| claim(tx, env, request),
                |holdings, (lease, _, _)| holdings.hold(lease),
            )
            .map_err(name_foreign_holder)?;
        Ok(PortGuard::new(self.clone(), lease, choice, sockets).preferring(request.preferred))
    }

    /// Leases a port under `name` together with the TCP listener, bound on `127.0.0.1`, that
    /// proved it free: give the listener to the server, and no other program can take the
    /// port between the check and the server's start.
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let (guard, listener) = registry.acquire_listener("api")?;
    /// assert_eq!(listener.local_addr()?.port(), guard.port());
    /// // serve(listener) while `guard` lives
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// For another address, or more than one port, use [`Request::listen_on`] and
    /// [`PortGuard::take_tcp_listeners`].
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    pub fn acquire_listener(&self, name: &str) -> Result<(PortGuard, TcpListener)> {
        let request = Request::new(name).listen_on(Ipv4Addr::LOCALHOST.into());
        let mut guard = self.acquire_with(&request)?;
        let listener = guard
            .take_tcp_listeners()
            .pop()
            .ok_or_else(missing_socket)?;
        Ok((guard, listener))
    }

    /// Leases a port under `name` together with the UDP socket, bound on `127.0.0.1`, that
    /// proved it free. The UDP twin of [`acquire_listener`](Self::acquire_listener).
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let (guard, socket) = registry.acquire_udp_socket("dns")?;
    /// assert_eq!(socket.local_addr()?.port(), guard.port());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire).
    pub fn acquire_udp_socket(&self, name: &str) -> Result<(PortGuard, UdpSocket)> {
        let request = Request::new(name)
            .protocol(Protocol::Udp)
            .listen_on(Ipv4Addr::LOCALHOST.into());
        let mut guard = self.acquire_with(&request)?;
        let socket = guard.take_udp_sockets().pop().ok_or_else(missing_socket)?;
        Ok((guard, socket))
    }

    /// Leases one port per name in a single transaction: all of them, or none.
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let guards = registry.acquire_many(&["api", "web", "db"])?;
    /// assert_eq!(guards.len(), 3);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire); on any error no port is leased.
    pub fn acquire_many<N: AsRef<str>>(&self, names: &[N]) -> Result<Vec<PortGuard>> {
        let requests: Vec<Request> = names.iter().map(|n| Request::new(n.as_ref())).collect();
        self.acquire_many_with(&requests)
    }

    /// Like [`acquire_many`](Self::acquire_many), with a full [`Request`] for each port.
    ///
    /// # Errors
    ///
    /// As [`acquire_with`](Self::acquire_with); on any error no port is leased.
    pub fn acquire_many_with(&self, requests: &[Request]) -> Result<Vec<PortGuard>> {
        requests
            .iter()
            .try_for_each(|request| self.check_request(request))?;
        let claims = self
            .counted_claim(
                requests.len(),
                |tx, env| {
                    requests
                        .iter()
                        .map(|request| claim(tx, env, request))
                        .collect::<Result<Vec<_>>>()
                },
                |holdings, claims| {
                    for (lease, _, _) in claims {
                        holdings.hold(lease);
                    }
                },
            )
            .map_err(name_foreign_holder)?;
        Ok(claims
            .into_iter()
            .zip(requests)
            .map(|((lease, choice, sockets), request)| {
                PortGuard::new(self.clone(), lease, choice, sockets).preferring(request.preferred)
            })
            .collect())
    }

    /// Releases whatever lease is on `port`, whoever holds it; whether there was one.
    ///
    /// A guard of that lease then releases nothing when it drops. To end a lease you hold
    /// without any risk of freeing someone else's, use [`release_lease`](Self::release_lease).
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let guard = registry.acquire("web")?;
    /// assert!(registry.release_port(guard.port())?, "freed, whoever held it");
    /// assert!(!registry.release_port(guard.port())?, "nothing is left on the port");
    /// drop(guard); // releases nothing now
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A registry error.
    pub fn release_port(&self, port: u16) -> Result<bool> {
        self.write_tracked(
            |tx, env| {
                let found = tx.delete_port(port)?;
                env.tally.add(Counter::Released, u64::from(found));
                Ok(found)
            },
            |holdings, &found| {
                if found {
                    holdings.held.retain(|_, lease| !lease.covers(port));
                }
                Ok(())
            },
        )
    }

    /// Releases every lease taken under `name`, whoever holds it, in one transaction; the
    /// leases that were released, oldest first (none if no lease has that name).
    ///
    /// Names are labels, not keys: this ends every holder's lease of that name, as
    /// [`release_port`](Self::release_port) does for a port.
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let (web1, web2) = (registry.acquire("web")?.keep()?, registry.acquire("web")?.keep()?);
    /// let db = registry.acquire("db")?;
    /// let released = registry.release_name("web")?;
    /// assert!(released.len() == 2 && released.contains(&web1) && released.contains(&web2));
    /// assert_eq!(registry.list()?, std::slice::from_ref(db.lease()));
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A registry error; then nothing is released.
    pub fn release_name(&self, name: &str) -> Result<Vec<Lease>> {
        self.write_tracked(
            |tx, env| {
                let mut released = Vec::new();
                for lease in tx.leases(None)? {
                    if lease.name == name && tx.delete_lease(lease.port, lease.id)? {
                        released.push(lease);
                    }
                }
                env.tally.add(Counter::Released, released.len() as u64);
                Ok(released)
            },
            |holdings, released| {
                for lease in released {
                    holdings.forget(lease.port, lease.id);
                }
                Ok(())
            },
        )
    }

    /// What `lease` is now (live, dead, expired or detached), judged as a claim would judge
    /// it: by this registry's process probe and clock.
    ///
    /// ```
    /// use portdaddy::LeaseState;
    ///
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let guard = registry.acquire("api")?;
    /// assert_eq!(registry.state_of(guard.lease()), LeaseState::Live);
    /// let lease = guard.keep()?;
    /// assert_eq!(registry.state_of(&lease), LeaseState::Detached);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    pub fn state_of(&self, lease: &Lease) -> LeaseState {
        let tally = Tally::default();
        self.inner.env(&self.inner.me, &tally).state(lease)
    }

    /// The registry's counters and the current number of leases by state (see [`Stats`]).
    ///
    /// # Errors
    ///
    /// A registry error.
    pub fn stats(&self) -> Result<Stats> {
        let (counts, leases) = self.read(|tx| {
            let mut counts = [0; Counter::ALL.len()];
            for (slot, counter) in counts.iter_mut().zip(Counter::ALL) {
                *slot = tx.counter(counter)?;
            }
            Ok((counts, tx.leases(None)?))
        })?;
        let [acquired, released, reaped, exhausted, errors] = counts;
        let mut stats = Stats {
            acquired,
            released,
            reaped,
            exhausted,
            errors,
            ..Stats::default()
        };
        let tally = Tally::default();
        let env = self.inner.env(&self.inner.me, &tally);
        for lease in &leases {
            match env.state(lease) {
                LeaseState::Live => stats.live += 1,
                LeaseState::Detached => stats.detached += 1,
                _ => stats.stale += 1,
            }
        }
        Ok(stats)
    }

    /// Every lease in the registry, oldest first, including those whose owner has died but
    /// that were not reclaimed yet.
    ///
    /// # Errors
    ///
    /// A registry error.
    pub fn list(&self) -> Result<Vec<Lease>> {
        self.read(|tx| tx.leases(None))
    }

    /// Makes `command` inherit this handle's owner lock, so that the leases of this handle
    /// stay alive while the command (or any process it passes the descriptor on to) runs,
    /// even if this process dies first, and are reclaimed once all of them have exited.
    ///
    /// A lease of a file registry lives while its owner's lock file in `<registry>.owners/`
    /// is locked, and the lock belongs to the open file description, which the command then
    /// shares. `portdaddy run` does this for the command it runs, so a `run` killed with
    /// `SIGKILL` (or by the OOM killer) leaves the command's ports to the command.
    ///
    /// The command keeps this handle (and so its lock file) open for as long as it is not
    /// dropped. In the command the descriptor is an open file like any other; a command that
    /// closes it gives the leases up when this process also ends. An in-memory registry,
    /// whose leases die with this process anyway, and systems other than Unix leave the
    /// command unchanged.
    ///
    /// The command shares the lock file that the handle holds when this is called (if that
    /// file was removed already, the handle first takes a new one and names it in its
    /// leases). If the file is removed later (a temp cleaner, or the registry deleted under
    /// the handle), the handle takes a new one at its next write, which the command does
    /// not hold: from then on the leases live while this process does, as they would
    /// without the command.
    ///
    /// ```
    /// # #[cfg(unix)] {
    /// let dir = tempfile::tempdir()?;
    /// let registry = portdaddy::PortDaddy::open(dir.path().join("ports.sqlite3"))?;
    /// let guard = registry.acquire("web")?;
    /// let mut command = std::process::Command::new("true");
    /// command.env("PORT", guard.port().to_string());
    /// registry.share_owner_lock(&mut command)?;
    /// assert!(command.status()?.success());
    /// # }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::ForkedHandle`] in a child made by `fork` without
    /// `exec`, where this handle's lock is the parent's; a registry error if a removed lock
    /// file cannot be replaced, or the descriptor cannot be duplicated. Spawning the command
    /// fails if its descriptor cannot be kept open across `exec`.
    pub fn share_owner_lock(&self, command: &mut std::process::Command) -> Result<()> {
        let Backend::File { file, .. } = &self.inner.backend else {
            return Ok(());
        };
        self.inner.check_not_forked()?;
        let in_place = {
            let file = file.lock().unwrap_or_else(|p| p.into_inner());
            file.owner_lock.is_in_place()
        };
        if !in_place {
            // Take a new lock file now, and name it in the leases, so that the command
            // shares one that others can see.
            self.write(|_, _| Ok(()))?;
        }
        // A duplicate of the locked descriptor: the same open file description, and so
        // the same lock. The command owns it, so it stays open until the command is
        // spawned even if the handle takes a new lock file meanwhile and closes its own.
        let shared = {
            let file = file.lock().unwrap_or_else(|p| p.into_inner());
            file.owner_lock.share().map_err(|e| {
                descriptors::name_cause(Error::registry(
                    self.inner.path.as_deref().unwrap_or(Path::new("")),
                    e,
                ))
            })?
        };
        // The command holds the handle too, so that the lock file stays where others
        // look for it (the handle removes it when it closes) until the command is spawned.
        match crate::sys::keep_open_across_exec(command, shared, self.clone()) {
            // Where a command cannot be handed a descriptor, the lease's owner keeps it.
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(()),
            other => other.map_err(|e| {
                Error::registry(self.inner.path.as_deref().unwrap_or(Path::new("")), e)
            }),
        }
    }

    /// Reclaims every lease whose owner is dead or whose expiry has passed; how many.
    ///
    /// Claims do this by themselves when a dead lease stands in their way, so calling this is
    /// never required; it tidies the listing.
    ///
    /// # Errors
    ///
    /// A registry error.
    pub fn reap(&self) -> Result<usize> {
        self.write(|tx, env| policy::reap(tx, env, None))
    }

    /// The registry file as its path was given (its side files sit beside the file that path
    /// leads to), or `None` for an in-memory registry.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The range automatic choices come from.
    pub fn range(&self) -> PortRange {
        self.inner.settings.range
    }

    /// Releases exactly `lease`: unlike [`release_port`](Self::release_port), nothing happens
    /// if the port has meanwhile gone to another holder (say, after the lease expired). The way
    /// to end a detached lease from [`PortGuard::keep`](crate::PortGuard::keep).
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let lease = registry.acquire("job")?.keep()?;
    /// assert!(registry.release_lease(&lease)?);
    /// assert!(!registry.release_lease(&lease)?, "already gone");
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A registry error; or [`Error::LeaseLost`] for a lease of this handle that could not
    /// be recorded again when the registry file was deleted or replaced under it, because
    /// another holder had taken its port meanwhile.
    pub fn release_lease(&self, lease: &Lease) -> Result<bool> {
        self.delete_exact(lease.port(), lease.id())
    }

    /// Deletes exactly the lease `id` on `port`; [`Error::LeaseLost`] if this handle lost it
    /// when its registry file was replaced.
    pub(crate) fn delete_exact(&self, port: u16, id: u64) -> Result<bool> {
        self.write_tracked(
            |tx, env| {
                let found = tx.delete_lease(port, id)?;
                env.tally.add(Counter::Released, u64::from(found));
                Ok(found)
            },
            |holdings, &found| {
                if holdings.forget(port, id) && !found {
                    return Err(Error::LeaseLost { port });
                }
                Ok(())
            },
        )
    }

    /// Removes the owner of exactly the lease `id` on `port`.
    pub(crate) fn detach_exact(&self, port: u16, id: u64) -> Result<bool> {
        self.write_tracked(
            |tx, _| tx.detach(port, id),
            |holdings, _| {
                holdings.forget(port, id);
                Ok(())
            },
        )
    }

    /// Stops tracking the lease `id` on `port`, which the handle no longer vouches for (it
    /// was handed to another process with [`PortGuard::into_lease`]).
    pub(crate) fn forget_held(&self, port: u16, id: u64) {
        if let Backend::File { file, .. } = &self.inner.backend {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            file.holdings.forget(port, id);
        }
    }

    /// Runs the claims of `f` (`ports` of them) as one write transaction, and counts them:
    /// in the same transaction when they succeed, and in a small one of its own when they
    /// fail (the failed transaction is rolled back, its count with it).
    fn counted_claim<R>(
        &self,
        ports: usize,
        f: impl FnOnce(&mut dyn Tx, &Env<'_>) -> Result<R>,
        track: impl FnOnce(&mut Holdings, &R),
    ) -> Result<R> {
        let result = self.write_tracked(
            |tx, env| {
                let value = f(tx, env)?;
                env.tally.add(Counter::Acquired, ports as u64);
                Ok(value)
            },
            |holdings, value| {
                track(holdings, value);
                Ok(())
            },
        );
        if let Err(error) = &result {
            self.count_failure(error);
        }
        result
    }

    /// Refuses a request that cannot be claimed as asked, before the registry is locked or
    /// touched: nothing is counted or written for it.
    fn check_request(&self, request: &Request) -> Result<()> {
        policy::check_request(request, self.inner.settings.range)?;
        check_listen_address(request)
    }

    /// Counts a failed claim, if the registry can still be written.
    fn count_failure(&self, error: &Error) {
        let counter = match error {
            Error::Exhausted { .. } => Counter::Exhausted,
            // One read or write failed; the count may still be written.
            Error::Registry { .. } => Counter::Errors,
            // The registry cannot be written (or only after another long wait): nothing to count in.
            e if e.is_registry_unusable() => return,
            Error::LockTimeout { .. } | Error::ForkedHandle { .. } => return,
            _ => Counter::Errors,
        };
        if let Err(e) = self.write(|_, env| {
            env.tally.add(counter, 1);
            Ok(())
        }) {
            tracing::debug!(error = %crate::error::Chain(&e), "could not count a failed claim");
        }
    }

    /// Runs `f` as one write transaction; the policy's view of the world (the time above
    /// all) is taken once the transaction holds the lock.
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut dyn Tx, &Env<'_>) -> Result<R>) -> Result<R> {
        self.write_tracked(f, |_, _| Ok(()))
    }

    /// As [`write`](Self::write); for a file registry, `track` then updates what the handle
    /// holds, under the same lock of the handle as the transaction.
    fn write_tracked<R>(
        &self,
        f: impl FnOnce(&mut dyn Tx, &Env<'_>) -> Result<R>,
        track: impl FnOnce(&mut Holdings, &R) -> Result<()>,
    ) -> Result<R> {
        let inner = &*self.inner;
        match &inner.backend {
            Backend::File { file, timeout } => {
                // One bound for the whole call, waiting for the handle included.
                let deadline = Deadline::after(*timeout);
                inner.check_not_forked()?;
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                let value = file
                    .write(inner, deadline, f)
                    .map_err(descriptors::name_cause)?;
                track(&mut file.holdings, &value)?;
                Ok(value)
            }
            Backend::Memory(store) => store.transact(|tx| inner.run(tx, &inner.me, f)),
        }
    }

    pub(crate) fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        let inner = &*self.inner;
        match &inner.backend {
            Backend::File { file, timeout } => {
                let deadline = Deadline::after(*timeout);
                inner.check_not_forked()?;
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                let current = file.store.is_current().map_err(descriptors::name_cause)?;
                if !current {
                    // Read what the path names, with this handle's leases recorded in it.
                    file.write(inner, deadline, |_, _| Ok(()))
                        .map_err(descriptors::name_cause)?;
                }
                file.store
                    .read(deadline, f)
                    .map_err(descriptors::name_cause)
            }
            Backend::Memory(store) => store.transact(f),
        }
    }
}

impl FileState {
    /// Runs `f` as one write transaction on the registry the path names. When that is no
    /// longer the file the handle had open, or the handle's owner lock file was removed,
    /// the handle's leases are first recorded again, in a transaction of their own (see
    /// [`rerecord`]).
    fn write<R>(
        &mut self,
        inner: &Inner,
        deadline: Deadline,
        f: impl FnOnce(&mut dyn Tx, &Env<'_>) -> Result<R>,
    ) -> Result<R> {
        let mut f = Some(f);
        // Each round either recovers (and commits that alone) or runs `f`; a registry
        // replaced again during a recovery is recovered again, but not for ever.
        for _ in 0..4 {
            let Self {
                store,
                owner_lock,
                me,
                holdings,
            } = self;
            let step = store.write(deadline, |tx, opened| {
                if let Opened::Anew { left_behind } = opened {
                    // Only the file this handle's leases were recorded in tells which of them
                    // others released there; one replaced again before they were recorded
                    // anew does not.
                    if !holdings.new_file {
                        if let Some(left_behind) = left_behind {
                            holdings.keep_only(&left_behind);
                        }
                    }
                    holdings.new_file = true;
                }
                if !owner_lock.is_in_place() {
                    *owner_lock = retake_owner_lock(inner, me)?;
                    *me = me.clone().with_lock(Some(owner_lock.name().to_owned()));
                    holdings.restamp = true;
                }
                if holdings.new_file || holdings.restamp {
                    rerecord(tx, me, holdings)?;
                    return Ok(None);
                }
                let f = f.take().expect("f runs once");
                inner.run(tx, me, f).map(Some)
            })?;
            match step {
                Some(value) => return Ok(value),
                None => {
                    holdings.new_file = false;
                    holdings.restamp = false;
                }
            }
        }
        Err(Error::registry_because(
            self.store.path(),
            "the registry file or the owner lock file kept being deleted or replaced while \
             this handle recorded its leases again",
        ))
    }
}

/// Takes a new owner lock file for `me`, in place of one that was removed, with the same
/// checks of the directory as at open. It goes in the directory by which the handle judges
/// owners, `owners_dir` of the real registry file: the store never opens a file at another
/// real path (see `SqliteStore::write`), so that is the directory beside the file it has open.
fn retake_owner_lock(inner: &Inner, me: &Owner) -> Result<OwnerLock> {
    // A file handle always has both.
    let (Some(path), Some(owners)) = (inner.path.as_deref(), inner.liveness.owners.as_deref())
    else {
        return Err(Error::registry_because(
            inner.path.as_deref().unwrap_or(Path::new("")),
            "no owners directory to take a lock file in",
        ));
    };
    tracing::warn!(dir = %owners.display(),
        "this handle's owner lock file was removed; taking a new one");
    OwnerLock::take(owners, me).map_err(|e| owner_lock_err(path, owners, e))
}

/// Maps a failure to take an owner lock file in `owners`, beside the registry at `path`.
fn owner_lock_err(path: &Path, owners: &Path, e: std::io::Error) -> Error {
    let detail = format!("cannot create an owner lock file in {}", owners.display());
    if descriptors::exhausted(&e) {
        return descriptors::out_of_descriptors(path, detail, e);
    }
    match crate::store::sqlite::refusal(path, e) {
        Ok(refused) => refused,
        Err(e) => Error::Open {
            path: path.to_owned(),
            reason: Some(detail),
            source: Some(e.into()),
        },
    }
}

/// Records the leases a handle holds in the registry again, naming the handle's current
/// owner lock file: every one that is missing from a new registry file and whose ports are
/// all vacant there is inserted; one whose port another holder took meanwhile is lost (and
/// logged); one still in the file names the current lock file afterwards. In the registry
/// file the handle had open all along, a missing lease was released by others and stays
/// released.
fn rerecord(tx: &mut dyn Tx, me: &Owner, holdings: &mut Holdings) -> Result<()> {
    let mut lost = Vec::new();
    for (&key, lease) in holdings.held.iter_mut() {
        let mut current = lease.clone();
        if current.owner.as_ref().is_some_and(|o| o == me) {
            current.owner = Some(me.clone());
        }
        match tx.lease_on(lease.port)? {
            Some(found) if found.id == lease.id => {
                if found.owner.as_ref().and_then(Owner::lock_name)
                    != current.owner.as_ref().and_then(Owner::lock_name)
                {
                    tx.set_owner(found.port, found.id, current.owner.as_ref())?;
                }
            }
            Some(other) => lost.push((key, Some(other))),
            None if !holdings.new_file => lost.push((key, None)),
            None => {
                let mut taken = None;
                for port in lease.ports() {
                    if let Some(other) = tx.lease_on(port)? {
                        taken = Some(other);
                        break;
                    }
                }
                match taken {
                    None => {
                        tx.insert_lease(&current)?;
                        tracing::info!(port = lease.port, name = %lease.name,
                            "recorded a held lease again in the new registry file");
                    }
                    Some(other) => lost.push((key, Some(other))),
                }
            }
        }
        *lease = current;
    }
    for (key, taken_by) in lost {
        let lease = holdings.held.remove(&key).expect("a held lease");
        // One released by others in the same file is no longer held, and not lost either.
        if let Some(other) = taken_by {
            tracing::error!(port = lease.port, name = %lease.name, other = %other.name,
                "lost a held lease: the registry file was deleted or replaced, and another \
                 holder took its port before this handle could record it again");
            holdings.lost.insert(key);
        }
    }
    Ok(())
}

/// Names the process that holds a required port outside the registry, where it can be
/// seen. Only on this failure path, after the claim's transaction: the claims that succeed
/// pay nothing for it.
fn name_foreign_holder(error: Error) -> Error {
    match error {
        Error::PortUnavailable { port, reason } if reason == policy::FOREIGN => {
            let reason = match crate::listening::describe_holders(port) {
                Some(holders) => format!("{reason}: {holders}"),
                None => reason,
            };
            Error::PortUnavailable { port, reason }
        }
        other => other,
    }
}

/// Claims one port for `request`; with [`Request::listen_on`], the probe keeps the sockets
/// it binds and they come back with the lease.
fn claim(tx: &mut dyn Tx, env: &Env<'_>, request: &Request) -> Result<(Lease, Choice, Sockets)> {
    let Some(ip) = request.listen_on else {
        let (lease, choice) = policy::claim(tx, env, request)?;
        return Ok((lease, choice, Sockets::default()));
    };
    let handover = Handover::new(env.ports, ip);
    let env = env.with_ports(&handover);
    let (lease, choice) = policy::claim(tx, &env, request)?;
    let sockets = handover
        .take(lease.ports(), request.protocol)
        .map_err(|(port, e)| Error::PortUnavailable {
            port,
            reason: format!("it cannot be bound on {ip} to be handed over ({e})"),
        })?;
    Ok((lease, choice, sockets))
}

/// Refuses a [`Request::listen_on`] address on which nothing can be bound (one of another
/// host, or IPv6 where the host has none) before the claim: otherwise every port of the range
/// would look taken, and the claim would search it all under the registry's lock.
fn check_listen_address(request: &Request) -> Result<()> {
    let Some(ip) = request.listen_on else {
        return Ok(());
    };
    handover::check_address(ip, request.protocol).map_err(|e| Error::InvalidRequest {
        reason: format!(
            "no socket can be bound on {ip} ({e}); give an address of this host, such as \
             127.0.0.1"
        ),
    })
}

/// A handover that returned no socket: cannot happen, since a claim with
/// [`Request::listen_on`] binds every port of its lease or fails.
fn missing_socket() -> Error {
    Error::InvalidRequest {
        reason: "the claim bound no socket to hand over".into(),
    }
}

impl Inner {
    /// The policy's view of the world, with `me` as the owner of new claims and what is
    /// counted going to `tally`.
    fn env<'a>(&'a self, me: &'a Owner, tally: &'a Tally) -> Env<'a> {
        Env::new(&self.settings, &self.liveness, me, tally)
    }

    /// Runs `f` in the transaction `tx` with the policy's view of the world, then records
    /// what it counted in the same transaction: every counter is bumped here.
    fn run<R>(
        &self,
        tx: &mut dyn Tx,
        me: &Owner,
        f: impl FnOnce(&mut dyn Tx, &Env<'_>) -> Result<R>,
    ) -> Result<R> {
        let tally = Tally::default();
        let value = f(tx, &self.env(me, &tally))?;
        tally.record(tx)?;
        Ok(value)
    }

    /// A file handle holds a SQLite connection and a lock that must not be shared with a
    /// child made by `fork`: using them there could corrupt the registry or let parent and
    /// child write at once.
    fn check_not_forked(&self) -> Result<()> {
        let child = std::process::id();
        if child != self.me.pid() {
            return Err(Error::ForkedHandle {
                parent: self.me.pid(),
                child,
            });
        }
        Ok(())
    }
}

/// The handle behind [`crate::acquire`]: opened on first use. In a child made by `fork` it
/// fails at once with [`Error::ForkedHandle`] if the parent had file registries open.
pub(crate) fn default_registry() -> Result<PortDaddy> {
    static DEFAULT: Mutex<Option<PortDaddy>> = Mutex::new(None);
    // Counted before the lock is taken, so that a child forked while another thread holds
    // it (opening the registry) fails here instead of waiting for ever. A registry in the
    // slot stays counted, so a forked child fails here too and never meets the parent's.
    let _opening = crate::fork::opening()?;
    let mut slot = DEFAULT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(registry) = slot.as_ref() {
        return Ok(registry.clone());
    }
    let registry = PortDaddy::open_default()?;
    *slot = Some(registry.clone());
    Ok(registry)
}

impl fmt::Debug for PortDaddy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortDaddy")
            .field("path", &self.inner.path)
            .field("range", &self.inner.settings.range)
            .field("reserved", &self.inner.settings.reserved)
            .finish_non_exhaustive()
    }
}
