//! The two questions the registry asks the operating system, behind pluggable traits.
//!
//! [`ProcessProbe`] answers "is this lease's owner still running?" and [`PortProbe`] answers
//! "can this port be bound right now?". The defaults ask the system; tests pass closures.

mod bind;
pub(crate) mod handover;
pub(crate) mod owner_lock;
pub(crate) mod system;

pub use bind::BindProbe;
pub use system::SystemProcessProbe;

use std::io;

use crate::lease::{Owner, Protocol};

/// Tells whether the process that owns a lease is still alive.
///
/// The registry asks only when a lease stands in the way of a claim (or on
/// [`PortDaddy::reap`](crate::PortDaddy::reap)); a lease whose owner is reported dead is
/// reclaimed. Any `Fn(&Owner) -> bool + Send + Sync` closure is a probe:
///
/// ```
/// use portdaddy::{Owner, PortDaddy};
///
/// // Treat every other process as alive, whatever the system says.
/// let registry = PortDaddy::builder()
///     .in_memory()
///     .process_probe(|_owner: &Owner| true)
///     .open()?;
/// # drop(registry);
/// # Ok::<(), portdaddy::Error>(())
/// ```
pub trait ProcessProbe: Send + Sync {
    /// Whether `owner` (pid, start time and boot) describes a process that is running now.
    ///
    /// Answer `true` when in doubt: a wrong `false` lets another holder take a live port.
    fn is_alive(&self, owner: &Owner) -> bool;
}

impl<F> ProcessProbe for F
where
    F: Fn(&Owner) -> bool + Send + Sync,
{
    fn is_alive(&self, owner: &Owner) -> bool {
        self(owner)
    }
}

/// Tells whether a port is free on the host, outside the registry.
///
/// The registry asks while it holds the claim, just before handing a port out, so ports that
/// programs outside portdaddy hold are skipped. Any `Fn(u16, Protocol) -> bool + Send + Sync`
/// closure is a probe:
///
/// ```
/// use portdaddy::{PortDaddy, Protocol};
///
/// // Pretend that something else listens on 20000.
/// let registry = PortDaddy::builder()
///     .in_memory()
///     .range(20000..=20001)
///     .port_probe(|port: u16, _: Protocol| port != 20000)
///     .open()?;
/// assert_eq!(registry.acquire("svc")?.port(), 20001);
/// # Ok::<(), portdaddy::Error>(())
/// ```
///
/// A probe that can fail for reasons that say nothing about the port (the process is out of
/// file descriptors, the host out of memory) implements [`try_is_free`](Self::try_is_free)
/// as well, so that the claim reports the failure instead of taking every port for bound
/// and the range for full.
pub trait PortProbe: Send + Sync {
    /// Whether `port` can be bound for `protocol` right now.
    fn is_free(&self, port: u16, protocol: Protocol) -> bool;

    /// Whether `port` can be bound for `protocol` right now, or why the probe could not
    /// tell. The registry calls this one.
    ///
    /// Default: `Ok(self.is_free(port, protocol))`, for probes that cannot fail.
    ///
    /// # Errors
    ///
    /// The reason the question could not be answered, such as `EMFILE` when no socket can
    /// be created; the claim then fails with [`Error::Probe`](crate::Error::Probe).
    fn try_is_free(&self, port: u16, protocol: Protocol) -> io::Result<bool> {
        Ok(self.is_free(port, protocol))
    }
}

impl<F> PortProbe for F
where
    F: Fn(u16, Protocol) -> bool + Send + Sync,
{
    fn is_free(&self, port: u16, protocol: Protocol) -> bool {
        self(port, protocol)
    }
}
