//! Where "now" comes from, so that expiry can be tested without sleeping.

use std::time::SystemTime;

/// A source of the current wall-clock time, used to stamp leases and to expire TTLs.
///
/// The default is the system clock. Any `Fn() -> SystemTime + Send + Sync` closure is a
/// clock too, which lets a test move time forward instead of sleeping:
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::time::{Duration, SystemTime};
///
/// let now = Arc::new(Mutex::new(SystemTime::now()));
/// let clock = { let now = now.clone(); move || *now.lock().unwrap() };
/// let registry = portdaddy::PortDaddy::builder().in_memory().clock(clock).open()?;
/// let request = portdaddy::Request::new("job").ttl(Duration::from_secs(60));
/// let lease = registry.acquire_with(&request)?.keep()?;
/// assert_eq!(registry.reap()?, 0);
/// *now.lock().unwrap() += Duration::from_secs(3600); // an hour passes, instantly
/// assert_eq!(registry.reap()?, 1, "the lease on {} expired", lease.port());
/// # Ok::<(), portdaddy::Error>(())
/// ```
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> SystemTime;
}

impl<F> Clock for F
where
    F: Fn() -> SystemTime + Send + Sync,
{
    fn now(&self) -> SystemTime {
        self()
    }
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
