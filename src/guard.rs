//! [`PortGuard`]: a lease that ends when the guard drops, and [`GuardError`], what its
//! explicit operations return when they fail.

use std::fmt;
use std::mem;
use std::net::{TcpListener, UdpSocket};
use std::ops::RangeInclusive;

use crate::error::Error;
use crate::lease::{Choice, Lease};
use crate::probe::handover::Sockets;
use crate::registry::PortDaddy;

/// A leased port, released when the guard is dropped.
///
/// No other participant of the registry gets the port while the guard lives, with two
/// exceptions that someone has to ask for: a lease taken with a [`Request::ttl`] can be
/// reclaimed once the TTL has passed, and [`PortDaddy::release_port`] frees a port whoever holds
/// it. Dropping the guard deletes exactly this lease: if the port went to someone else in
/// one of those ways, their lease is left alone.
///
/// [`Request::ttl`]: crate::Request::ttl
///
/// ```
/// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
/// let guard = registry.acquire("postgres")?;
/// let port = guard.port();
/// // start_server(port) ...
/// guard.release()?; // or just let it drop
/// assert!(registry.list()?.iter().all(|l| l.port() != port));
/// # Ok::<(), portdaddy::Error>(())
/// ```
///
/// # Resource Leaking
///
/// `Drop` does not run when the process is killed (`SIGKILL`, a crash, power loss) or ends
/// through [`std::process::exit`]. The lease then stays in the registry until someone needs
/// it: the next claim that finds it in its way sees that the owner is dead and reclaims it.
/// Nothing has to be run by hand. A guard dropped in a child made by `fork` releases nothing,
/// since the lease belongs to the parent.
#[must_use = "dropping a PortGuard releases its port at once; keep the guard alive while the port is in use"]
pub struct PortGuard {
    registry: PortDaddy,
    lease: Lease,
    choice: Choice,
    /// The port the request preferred or required, if any.
    preferred: Option<u16>,
    /// Sockets bound for [`Request::listen_on`](crate::Request::listen_on), until taken.
    sockets: Sockets,
    /// The process that took the lease; a forked child must not release it.
    creator: u32,
    armed: bool,
}

impl PortGuard {
    pub(crate) fn new(registry: PortDaddy, lease: Lease, choice: Choice, sockets: Sockets) -> Self {
        Self {
            registry,
            lease,
            choice,
            preferred: None,
            sockets,
            creator: std::process::id(),
            armed: true,
        }
    }

    /// Records the port the request preferred, for [`preferred_port_holders`](Self::preferred_port_holders).
    pub(crate) fn preferring(mut self, port: Option<u16>) -> Self {
        self.preferred = port;
        self
    }

    /// The leased port.
    pub fn port(&self) -> u16 {
        self.lease.port()
    }

    /// Every port of the lease: just [`port`](Self::port), unless it is a block
    /// ([`Request::block`](crate::Request::block)).
    pub fn ports(&self) -> RangeInclusive<u16> {
        self.lease.ports()
    }

    /// Takes the TCP listeners bound for [`Request::listen_on`](crate::Request::listen_on),
    /// one per port of the lease in port order; empty if none were asked for or they were
    /// taken already.
    ///
    /// The listeners and the lease are independent once taken: the lease still ends when the
    /// guard drops, so keep the guard as long as the server runs.
    ///
    /// ```
    /// use std::net::Ipv4Addr;
    /// use portdaddy::{PortDaddy, Request};
    ///
    /// let registry = PortDaddy::builder().in_memory().open()?;
    /// let request = Request::new("cluster").block(2).listen_on(Ipv4Addr::LOCALHOST.into());
    /// let mut guard = registry.acquire_with(&request)?;
    /// let listeners = guard.take_tcp_listeners();
    /// assert_eq!(listeners.len(), 2);
    /// assert_eq!(listeners[1].local_addr()?.port(), guard.port() + 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn take_tcp_listeners(&mut self) -> Vec<TcpListener> {
        mem::take(&mut self.sockets.tcp)
    }

    /// Takes the UDP sockets bound for [`Request::listen_on`](crate::Request::listen_on)
    /// with a protocol that includes UDP, one per port in port order; empty if none were
    /// asked for or they were taken already.
    pub fn take_udp_sockets(&mut self) -> Vec<UdpSocket> {
        mem::take(&mut self.sockets.udp)
    }

    /// The name the port was leased under.
    pub fn name(&self) -> &str {
        self.lease.name()
    }

    /// The lease as it was recorded.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// How the port was chosen: the preferred port, the name's remembered one, or a search.
    pub fn choice(&self) -> Choice {
        self.choice
    }

    /// Waits until a server listens on the guard's [`port`](Self::port), for at most
    /// `timeout`: a TCP connection to it on `127.0.0.1` or `::1` is accepted, or for a UDP
    /// lease a socket is bound on it (both for [`Protocol::Both`](crate::Protocol::Both)).
    /// For a fixture that starts a server and must not connect before it listens. See
    /// [`wait_until_listening`](crate::wait_until_listening) for how it checks.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let guard = registry.acquire("api")?;
    /// let port = guard.port();
    /// let server = std::thread::spawn(move || {
    ///     let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    ///     listener.accept().map(|_| ())
    /// });
    /// guard.wait_until_listening(Duration::from_secs(10))?;
    /// // the server listens now
    /// # server.join().unwrap()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::NotListening`] once `timeout` has passed, naming the port and how long was
    /// waited.
    pub fn wait_until_listening(&self, timeout: std::time::Duration) -> crate::Result<()> {
        crate::listening::wait_until_listening(self.port(), self.lease.protocol(), timeout)
    }

    /// Why the preferred port ([`Request::preferred`](crate::Request::preferred)) was not
    /// given, where programs outside the registry hold it: the processes with a socket bound
    /// on that port (see [`socket_holders`](crate::socket_holders)), looked up now, not at the
    /// claim, so that claims pay nothing for it.
    ///
    /// `None` if the preferred port was given ([`Choice::Preferred`]), none was asked for, or
    /// the system cannot tell; an empty list if no process has a socket on it (another lease
    /// holds it, it is reserved, or the holder has gone since).
    ///
    /// ```
    /// let foreign = std::net::TcpListener::bind("127.0.0.1:0")?; // a program outside the registry
    /// let taken = foreign.local_addr()?.port();
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let guard = registry.acquire_with(&portdaddy::Request::new("api").preferred(taken))?;
    /// assert_ne!(guard.port(), taken);
    /// if let Some(holders) = guard.preferred_port_holders() {
    ///     assert!(holders.iter().any(|h| h.pid == Some(std::process::id())));
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn preferred_port_holders(&self) -> Option<Vec<crate::SocketHolder>> {
        match (self.preferred, self.choice) {
            (Some(port), choice) if choice != Choice::Preferred => crate::socket_holders(port),
            _ => None,
        }
    }

    /// Detaches the lease from this process and returns it: it now outlives the process and
    /// lasts until released by port ([`PortDaddy::release_port`]) or until its TTL, if it has one,
    /// runs out. This is what a build script wants.
    ///
    /// ```
    /// use std::time::Duration;
    /// use portdaddy::{PortDaddy, Request};
    ///
    /// let registry = PortDaddy::builder().in_memory().open()?;
    /// let request = Request::new("build-server").ttl(Duration::from_secs(3600));
    /// let lease = registry.acquire_with(&request)?.keep()?;
    /// assert!(lease.is_detached());
    /// assert!(registry.list()?.contains(&lease));
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A registry error, with the guard given back; or [`Error::LeaseLost`], without a guard,
    /// if the lease was reclaimed or released by port meanwhile.
    pub fn keep(mut self) -> Result<Lease, GuardError> {
        match self.registry.detach_exact(self.lease.port, self.lease.id) {
            Ok(true) => {
                self.armed = false;
                let mut lease = self.lease.clone();
                lease.owner = None;
                Ok(lease)
            }
            Ok(false) => {
                self.armed = false;
                let port = self.lease.port;
                Err(GuardError::new(Error::LeaseLost { port }, None))
            }
            Err(error) => Err(GuardError::new(error, Some(self))),
        }
    }

    /// Gives up the guard without ending the lease: it stays in the registry, owned by the
    /// process recorded in it, until released or reclaimed when that process dies (or its
    /// TTL passes). Unlike [`keep`](Self::keep) this writes nothing and cannot fail.
    ///
    /// This is for a tool that takes a port on behalf of another process
    /// ([`Request::owner`](crate::Request::owner)) and exits at once: the lease then lives as
    /// long as that process. A lease owned by the calling process itself lasts until this
    /// process exits and is reclaimed after that.
    ///
    /// ```
    /// use portdaddy::{Owner, PortDaddy, Request};
    ///
    /// let registry = PortDaddy::builder().in_memory().open()?;
    /// let caller = Owner::current()?; // a tool would use `Owner::of_pid(parent pid)`
    /// let lease = registry
    ///     .acquire_with(&Request::new("db").owner(caller.clone()))?
    ///     .into_lease();
    /// assert_eq!(lease.owner(), Some(&caller));
    /// assert!(registry.list()?.contains(&lease), "dropping nothing released it");
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    #[must_use = "the lease stays in the registry; use it, or drop the guard to release instead"]
    pub fn into_lease(mut self) -> Lease {
        self.armed = false;
        if self.lease.owner().is_some_and(|o| o.lock_name().is_some()) {
            // Owned by this process through the handle's owner lock file, which other PID
            // namespaces judge it by: the file must stay locked as long as the process runs,
            // not only as long as the handle.
            self.registry.keep_open_until_exit();
        } else {
            // Another process's now: the handle no longer vouches for it.
            self.registry.forget_held(self.lease.port, self.lease.id);
        }
        self.lease.clone()
    }

    /// Releases the lease now and reports failure, which dropping cannot do.
    ///
    /// # Errors
    ///
    /// A registry error, with the guard given back to retry. A lease that is already gone
    /// (reclaimed after its TTL, or released by port) is not an error. [`Error::LeaseLost`],
    /// without a guard, when the registry file was deleted or replaced and another holder
    /// took the port before the handle could record the lease again in the new file (see
    /// `RELIABILITY.md`).
    pub fn release(mut self) -> Result<(), GuardError> {
        match self.registry.delete_exact(self.lease.port, self.lease.id) {
            Ok(found) => {
                if !found {
                    tracing::debug!(port = self.lease.port, "lease was already gone at release");
                }
                self.armed = false;
                Ok(())
            }
            Err(error @ Error::LeaseLost { .. }) => {
                self.armed = false;
                Err(GuardError::new(error, None))
            }
            Err(error) => Err(GuardError::new(error, Some(self))),
        }
    }
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if std::process::id() != self.creator {
            tracing::debug!(
                port = self.lease.port,
                "guard dropped in a forked child; not releasing"
            );
            return;
        }
        // A probe or clock of the caller's may panic in the release; `Drop` must not (during
        // unwinding that would abort the process). The transaction is rolled back as the
        // panic unwinds through it, so the lease stays until the process exits.
        let (port, id) = (self.lease.port, self.lease.id);
        let registry = &self.registry;
        let released = std::panic::catch_unwind(|| registry.delete_exact(port, id));
        match released {
            Ok(Ok(_)) => {}
            // Logged when it was lost.
            Ok(Err(Error::LeaseLost { .. })) => {}
            Ok(Err(error)) => tracing::warn!(
                port = self.lease.port,
                name = %self.lease.name,
                error = %crate::error::Chain(&error),
                "could not release a port lease; it will be reclaimed once this process exits"
            ),
            Err(_) => tracing::warn!(
                port = self.lease.port,
                name = %self.lease.name,
                "a probe or clock panicked while releasing a port lease; it will be reclaimed \
                 once this process exits"
            ),
        }
    }
}

impl fmt::Debug for PortGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortGuard")
            .field("port", &self.lease.port)
            .field("name", &self.lease.name)
            .field("ports", &self.lease.ports())
            .field("choice", &self.choice)
            .finish_non_exhaustive()
    }
}

/// An explicit operation on a [`PortGuard`] failed.
///
/// Returned by [`PortGuard::release`] and [`PortGuard::keep`]. When the registry could not be
/// reached, the lease is still there and the guard is handed back to retry
/// ([`into_guard`](GuardError::into_guard)); dropping the error drops the guard, which then
/// releases quietly. When the lease itself is gone ([`Error::LeaseLost`]) there is no guard
/// to give back. Converts into [`enum@Error`] with `?`.
///
/// ```
/// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
/// let mut guard = registry.acquire("api")?;
/// for attempt in 1.. {
///     match guard.release() {
///         Ok(()) => break,
///         Err(e) if attempt < 3 => match e.into_guard() {
///             Some(back) => guard = back, // the lease is still there: try again
///             None => break,              // the lease is gone: nothing left to release
///         },
///         Err(e) => return Err(e.into()),
///     }
/// }
/// assert!(registry.list()?.is_empty());
/// # Ok::<(), portdaddy::Error>(())
/// ```
#[derive(Debug)]
pub struct GuardError {
    error: Error,
    guard: Option<Box<PortGuard>>,
}

impl GuardError {
    pub(crate) fn new(error: Error, guard: Option<PortGuard>) -> Self {
        Self {
            error,
            guard: guard.map(Box::new),
        }
    }

    /// The error that occurred.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// Takes the guard back to retry, if it still holds a lease.
    pub fn into_guard(self) -> Option<PortGuard> {
        self.guard.map(|g| *g)
    }
}

/// The error's own message: a `GuardError` is its [`error`](GuardError::error) with the
/// guard attached, so it says nothing of its own.
impl fmt::Display for GuardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// The [`error`](GuardError::error)'s cause: the error itself is not repeated as a cause of
/// the same message.
impl std::error::Error for GuardError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl From<GuardError> for Error {
    fn from(e: GuardError) -> Self {
        e.error
    }
}
