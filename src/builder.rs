//! Configuring a registry handle before opening it.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::probe::{BindProbe, PortProbe, ProcessProbe, SystemProcessProbe};
use crate::range::PortRange;
use crate::registry::PortDaddy;

/// How long a write waits for another process's transaction, by default.
pub(crate) const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Configures and opens a [`PortDaddy`]. Made by [`PortDaddy::builder`].
///
/// ```
/// use std::time::Duration;
/// use portdaddy::PortDaddy;
///
/// let dir = tempfile::tempdir()?;
/// let registry = PortDaddy::builder()
///     .path(dir.path().join("ports.sqlite3"))
///     .range(21000..=21999)
///     .reserve([21080])
///     .lock_timeout(Duration::from_secs(2))
///     .open()?;
/// let guard = registry.acquire("api")?;
/// assert!((21000..=21999).contains(&guard.port()) && guard.port() != 21080);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
#[derive(Default)]
pub struct Builder {
    opts: Options,
}

/// What the builder collects; the builder only fills it.
#[derive(Default)]
struct Options {
    target: Target,
    range: Option<(u16, u16)>,
    reserved: BTreeSet<u16>,
    processes: Option<Arc<dyn ProcessProbe>>,
    ports: Option<Arc<dyn PortProbe>>,
    clock: Option<Arc<dyn Clock>>,
    lock_timeout: Option<Duration>,
}

#[derive(Debug, Default)]
enum Target {
    #[default]
    DefaultPath,
    Path(PathBuf),
    Memory,
}

/// The settings an opened registry keeps.
pub(crate) struct Settings {
    pub(crate) range: PortRange,
    pub(crate) reserved: BTreeSet<u16>,
    pub(crate) processes: Arc<dyn ProcessProbe>,
    pub(crate) ports: Arc<dyn PortProbe>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Settings {
    /// Every setting at its default.
    pub(crate) fn defaults() -> Self {
        Self::with_range(PortRange::default_for_host())
    }

    /// Every setting but the range at its default.
    fn with_range(range: PortRange) -> Self {
        Settings {
            range,
            reserved: BTreeSet::new(),
            processes: Arc::new(SystemProcessProbe),
            ports: Arc::new(BindProbe),
            clock: Arc::new(SystemClock),
        }
    }
}

impl Builder {
    /// A builder with every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the registry file lives. It is created (with its directories) if missing.
    ///
    /// Default: `$PORTDADDY_DB`, else the per-user default of [`PortDaddy::default_path`].
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("ci/ports.sqlite3");
    /// let registry = portdaddy::PortDaddy::builder().path(&path).open()?;
    /// assert_eq!(registry.path(), Some(path.as_path()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(mut self, path: impl AsRef<Path>) -> Self {
        self.opts.target = Target::Path(path.as_ref().to_owned());
        self
    }

    /// Keeps the registry in memory instead of a file: a new registry, private to the returned
    /// handle and its clones, that coordinates threads but not processes.
    ///
    /// Default: a file.
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// assert_eq!(registry.path(), None);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    pub fn in_memory(mut self) -> Self {
        self.opts.target = Target::Memory;
        self
    }

    /// The ports automatic choices come from (both ends included). A range that overlaps the
    /// kernel's ephemeral range is allowed but logged as a warning, since the kernel hands
    /// those ports to `bind(0)` and outgoing connections.
    ///
    /// Default: [`PortRange::default_for_host`], outside the ephemeral range.
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().range(20000..=20099).open()?;
    /// assert_eq!(registry.range().len(), 100);
    /// // An empty or reversed range is an error, not a panic.
    /// let reversed = portdaddy::PortDaddy::builder().in_memory().range(9..=3).open();
    /// assert!(matches!(reversed, Err(portdaddy::Error::InvalidRange { .. })));
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    pub fn range(mut self, range: std::ops::RangeInclusive<u16>) -> Self {
        self.opts.range = Some((*range.start(), *range.end()));
        self
    }

    /// Ports this handle never hands out, not even when preferred. May be called repeatedly.
    /// For ports that no user of the registry may be handed, see
    /// [`PortDaddy::reserve_ports`](crate::PortDaddy::reserve_ports).
    ///
    /// Default: none.
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder()
    ///     .in_memory()
    ///     .range(20000..=20001)
    ///     .reserve([20000])
    ///     .port_probe(|_, _| true)
    ///     .open()?;
    /// assert_eq!(registry.acquire("svc")?.port(), 20001);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    pub fn reserve(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.opts.reserved.extend(ports);
        self
    }

    /// How to tell whether a lease's owner is alive.
    ///
    /// Default: [`SystemProcessProbe`].
    ///
    /// ```
    /// use portdaddy::{Owner, PortDaddy, Request};
    ///
    /// // Every other process counts as dead, so its leases are reclaimed when in the way.
    /// let registry = PortDaddy::builder()
    ///     .in_memory()
    ///     .range(20000..=20000)
    ///     .port_probe(|_, _| true)
    ///     .process_probe(|_: &Owner| false)
    ///     .open()?;
    /// let ghost = Owner::new(4_000_000, 1, "another-boot");
    /// std::mem::forget(registry.acquire_with(&Request::new("old").owner(ghost))?);
    /// assert_eq!(registry.acquire("new")?.port(), 20000);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    pub fn process_probe(mut self, probe: impl ProcessProbe + 'static) -> Self {
        self.opts.processes = Some(Arc::new(probe));
        self
    }

    /// How to tell whether a port is free on the host.
    ///
    /// Default: [`BindProbe`].
    ///
    /// ```
    /// use portdaddy::{PortDaddy, Protocol};
    ///
    /// let registry = PortDaddy::builder()
    ///     .in_memory()
    ///     .range(20000..=20001)
    ///     .port_probe(|port: u16, _: Protocol| port % 2 == 1)
    ///     .open()?;
    /// assert_eq!(registry.acquire("odd")?.port(), 20001);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    pub fn port_probe(mut self, probe: impl PortProbe + 'static) -> Self {
        self.opts.ports = Some(Arc::new(probe));
        self
    }

    /// Where the current time comes from (lease stamps and TTL expiry).
    ///
    /// Default: [`SystemClock`].
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    ///
    /// let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    /// let registry = portdaddy::PortDaddy::builder().in_memory().clock(move || epoch).open()?;
    /// assert_eq!(registry.acquire("stamped")?.lease().acquired_at(), epoch);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.opts.clock = Some(Arc::new(clock));
        self
    }

    /// How long a call waits for another process that holds the registry's write lock before
    /// failing with [`Error::LockTimeout`]. Transactions last microseconds; a long wait means
    /// a holder is stopped or hung.
    ///
    /// Default: 10 seconds.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let registry = portdaddy::PortDaddy::builder()
    ///     .path(dir.path().join("ports.sqlite3"))
    ///     .lock_timeout(Duration::from_millis(500))
    ///     .open()?;
    /// # drop(registry);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.opts.lock_timeout = Some(timeout);
        self
    }

    /// Opens the registry.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] for an empty or reversed range or one made only of reserved
    /// ports; for a file registry, [`Error::Open`], [`Error::Corrupt`],
    /// [`Error::SchemaTooNew`], [`Error::LockTimeout`] or [`Error::Refused`] (a file another
    /// user planted or may change, a registry file reached by other names too, a name too
    /// long for the side files), and [`Error::OutOfDescriptors`] when the process or host has
    /// no file descriptor left to open it, or [`Error::ForkedHandle`] in a child made by
    /// `fork` from a process that had file registries open. A file that cannot be used is
    /// left exactly as it was.
    ///
    /// # Security
    ///
    /// The path is resolved to the real file through symbolic links of this user or root only,
    /// and every side file (`.lock`, `.owners/`, SQLite's `-wal`, `-shm`, `-journal`) is named
    /// after the real file. Nothing is opened through a link among them, and no directory is
    /// created inside another user's.
    pub fn open(self) -> Result<PortDaddy> {
        let opts = self.opts;
        let range = match opts.range {
            Some((start, end)) => {
                let range = PortRange::new(start, end)?;
                let ephemeral = PortRange::ephemeral();
                if range.overlaps(&ephemeral) {
                    tracing::warn!(
                        %range,
                        %ephemeral,
                        "the port range overlaps the kernel's ephemeral range; ports there may \
                         be taken by outgoing connections at any moment"
                    );
                }
                range
            }
            None => PortRange::default_for_host(),
        };
        if (range.start()..=range.end()).all(|p| opts.reserved.contains(&p)) {
            return Err(Error::InvalidRange {
                start: range.start(),
                end: range.end(),
                reason: "every port of the range is reserved; widen the range or reserve fewer",
            });
        }
        // Not through `Settings::defaults()`, whose default range would read the kernel's
        // ephemeral range a second time.
        let mut settings = Settings::with_range(range);
        settings.reserved = opts.reserved;
        if let Some(processes) = opts.processes {
            settings.processes = processes;
        }
        if let Some(ports) = opts.ports {
            settings.ports = ports;
        }
        if let Some(clock) = opts.clock {
            settings.clock = clock;
        }
        let timeout = opts.lock_timeout.unwrap_or(DEFAULT_LOCK_TIMEOUT);
        match opts.target {
            Target::Memory => Ok(PortDaddy::memory(settings)),
            Target::Path(path) => PortDaddy::file(&path, false, timeout, settings),
            Target::DefaultPath => {
                let (path, shared_tmp) = crate::paths::default_location();
                PortDaddy::file(&path, shared_tmp, timeout, settings)
            }
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.opts;
        f.debug_struct("Builder")
            .field("target", &o.target)
            .field("range", &o.range)
            .field("reserved", &o.reserved)
            .field("custom_process_probe", &o.processes.is_some())
            .field("custom_port_probe", &o.ports.is_some())
            .field("custom_clock", &o.clock.is_some())
            .field("lock_timeout", &o.lock_timeout)
            .finish()
    }
}
