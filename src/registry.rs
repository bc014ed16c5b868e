//! The registry handle: [`PortDaddy`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::builder::{Builder, Settings};
use crate::error::{Error, Result};
use crate::guard::PortGuard;
use crate::lease::{Lease, Owner};
use crate::lock::Deadline;
use crate::policy::{self, Env};
use crate::range::PortRange;
use crate::request::Request;
use crate::store::memory::MemoryStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Tx;

/// A handle on a port registry: cheap to clone, `Send + Sync`.
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
/// Every participant of a file registry must see the same processes: liveness is judged by
/// pid, so processes in another PID namespace (a container sharing the file with the host)
/// would take each other's leases for dead. They must also agree on the time; a
/// [`Clock`](crate::Clock) other than the system clock is for in-memory registries in tests.
///
/// # Security
///
/// The registry is private to its user (`0700` directory, `0600` files), and portdaddy
/// trusts every process that can write it: anyone who can write the file can hand out or
/// free any port in it. Share it with other users only if you trust them that far.
///
/// # Forking
///
/// A file registry handle refuses to work in a child created by `fork` without `exec`
/// ([`Error::ForkedHandle`]): open a new one there. [`portdaddy::acquire`](crate::acquire)
/// does that by itself.
#[derive(Clone)]
pub struct PortDaddy {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    settings: Settings,
    me: Owner,
    path: Option<PathBuf>,
}

enum Backend {
    File {
        store: Mutex<SqliteStore>,
        timeout: Duration,
    },
    Memory(MemoryStore),
}

impl PortDaddy {
    /// Opens (creating if needed) the file registry at `path`, with default settings.
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

    pub(crate) fn memory(settings: Settings) -> Self {
        let pid = std::process::id();
        // In memory, only this process's identity matters; a placeholder serves if the
        // system cannot describe it.
        let me = Owner::current().unwrap_or_else(|_| Owner::new(pid, 0, ""));
        Self::from_inner(Inner {
            backend: Backend::Memory(MemoryStore::default()),
            settings,
            me,
            path: None,
        })
    }

    pub(crate) fn file(
        path: &Path,
        shared_tmp: bool,
        timeout: Duration,
        settings: Settings,
    ) -> Result<Self> {
        // Leases must name this process exactly, or others would take them for dead.
        let me = Owner::current()?;
        let store = SqliteStore::open(path, shared_tmp, timeout)?;
        let path = Some(store.path().to_owned());
        Ok(Self::from_inner(Inner {
            backend: Backend::File {
                store: Mutex::new(store),
                timeout,
            },
            settings,
            me,
            path,
        }))
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
    /// [`Error::InvalidName`](crate::Error::InvalidName),
    /// [`Error::Exhausted`](crate::Error::Exhausted), or a registry error.
    pub fn acquire(&self, name: &str) -> Result<PortGuard> {
        self.acquire_with(&Request::new(name))
    }

    /// Leases a port as `request` describes (preferred port, TTL, protocol, owner).
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire), plus
    /// [`Error::PortUnavailable`](crate::Error::PortUnavailable) for a required port that is
    /// taken and [`Error::InvalidRequest`](crate::Error::InvalidRequest).
    pub fn acquire_with(&self, request: &Request) -> Result<PortGuard> {
        let (lease, choice) = self.write(|tx, env| policy::claim(tx, env, request))?;
        Ok(PortGuard::new(self.clone(), lease, choice))
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
        let claims = self.write(|tx, env| {
            requests
                .iter()
                .map(|request| policy::claim(tx, env, request))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(claims
            .into_iter()
            .map(|(lease, choice)| PortGuard::new(self.clone(), lease, choice))
            .collect())
    }

    /// Releases whatever lease is on `port`, whoever holds it; whether there was one.
    ///
    /// A guard of that lease then releases nothing when it drops. To end a lease you hold
    /// without any risk of freeing someone else's, use [`release_lease`](Self::release_lease).
    ///
    /// # Errors
    ///
    /// A registry error.
    pub fn release(&self, port: u16) -> Result<bool> {
        self.write(|tx, _| tx.delete_port(port))
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

    /// The registry file, or `None` for an in-memory registry.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The range automatic choices come from.
    pub fn range(&self) -> PortRange {
        self.inner.settings.range
    }

    /// Releases exactly `lease`: unlike [`release`](Self::release), nothing happens if the
    /// port has meanwhile gone to another holder (say, after the lease expired). The way to
    /// end a detached lease from [`PortGuard::keep`](crate::PortGuard::keep).
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
    /// A registry error.
    pub fn release_lease(&self, lease: &Lease) -> Result<bool> {
        self.delete_exact(lease.port(), lease.id())
    }

    /// Deletes exactly the lease `id` on `port`.
    pub(crate) fn delete_exact(&self, port: u16, id: u64) -> Result<bool> {
        self.write(|tx, _| tx.delete_lease(port, id))
    }

    /// Removes the owner of exactly the lease `id` on `port`.
    pub(crate) fn detach_exact(&self, port: u16, id: u64) -> Result<bool> {
        self.write(|tx, _| tx.detach(port, id))
    }

    /// Runs `f` as one write transaction; the policy's view of the world (the time above
    /// all) is taken once the transaction holds the lock.
    fn write<R>(&self, f: impl FnOnce(&mut dyn Tx, &Env<'_>) -> Result<R>) -> Result<R> {
        let inner = &*self.inner;
        let run = |tx: &mut dyn Tx| f(tx, &inner.env());
        match &inner.backend {
            Backend::File { store, timeout } => {
                // One bound for the whole call, waiting for the handle included.
                let deadline = Deadline::after(*timeout);
                inner.check_not_forked()?;
                store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(deadline, run)
            }
            Backend::Memory(store) => store.transact(run),
        }
    }

    fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        match &self.inner.backend {
            Backend::File { store, timeout } => {
                let deadline = Deadline::after(*timeout);
                self.inner.check_not_forked()?;
                store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(deadline, f)
            }
            Backend::Memory(store) => store.transact(f),
        }
    }
}

impl Inner {
    fn env(&self) -> Env<'_> {
        let s = &self.settings;
        Env {
            range: s.range,
            reserved: &s.reserved,
            ports: &*s.ports,
            processes: &*s.processes,
            me: &self.me,
            now: s.clock.now(),
        }
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

/// The handle behind [`crate::acquire`]: opened on first use, and again in a forked child.
pub(crate) fn default_registry() -> Result<PortDaddy> {
    static DEFAULT: Mutex<Option<PortDaddy>> = Mutex::new(None);
    let mut slot = DEFAULT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(registry) = slot.as_ref() {
        if registry.inner.me.pid() == std::process::id() {
            return Ok(registry.clone());
        }
        // Inherited from the parent across fork: closing its connection here could
        // checkpoint or delete the parent's WAL, so leak it instead.
        std::mem::forget(slot.take());
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
