//! Collision-free TCP and UDP ports for every thread, process and script on one host.
//!
//! ```
//! # let dir = tempfile::tempdir()?;
//! # std::env::set_var("PORTDADDY_DB", dir.path().join("r.sqlite3"));
//! let guard = portdaddy::acquire("postgres")?;
//! let port = guard.port(); // nobody else on this host gets it while `guard` lives
//! # assert!(port >= 1024);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Binding port 0, reading the port and closing the socket, then handing the number to a
//! server races: between the close and the server's bind, any other test, process or
//! outgoing connection may take the same port. portdaddy records each port it hands out in a
//! registry that every participant shares, and probes the port by binding it before handing
//! it out, so neither another portdaddy user nor a program that already listens gets it.
//!
//! - The registry is a SQLite file ([`PortDaddy::default_path`], or `$PORTDADDY_DB`); no
//!   daemon runs. Each claim is one short transaction under a file lock.
//! - A lease belongs to a process (pid, start time, boot). When that process dies, by
//!   `SIGKILL` or a crash, its leases are reclaimed by the next claim that needs them.
//! - A name remembers its port: a restarted dev server or a rebuilt build script gets the
//!   same port back while it is free.
//! - [`PortDaddy::in_process`] coordinates the threads of one process without any file.
//!
//! Start with [`acquire`], then [`PortDaddy`] for a chosen path or range, [`Request`] for a
//! preferred port, TTL or protocol, and [`PortGuard::keep`] for a lease that outlives the
//! process.

#![deny(missing_docs)]
#![warn(clippy::print_stdout, clippy::print_stderr, clippy::dbg_macro)]

mod builder;
mod clock;
mod doctor;
mod error;
mod guard;
mod lease;
mod lock;
mod paths;
mod policy;
mod probe;
mod range;
mod registry;
mod request;
mod stats;
mod store;

pub use builder::Builder;
pub use clock::{Clock, SystemClock};
pub use doctor::{Check, Diagnosis, Status};
pub use error::{Error, GuardError, Result};
pub use guard::PortGuard;
pub use lease::{Choice, Lease, LeaseState, Owner, Protocol};
pub use paths::ENV_VAR;
pub use probe::{BindProbe, PortProbe, ProcessProbe, SystemProcessProbe};
pub use range::PortRange;
pub use registry::PortDaddy;
pub use request::{Request, MAX_NAME_LEN};
pub use stats::Stats;

/// Leases a port under `name` from the default registry, opened on first use.
///
/// The registry is `$PORTDADDY_DB` or the per-user default path
/// ([`PortDaddy::default_path`]). The port stays reserved until the guard drops.
///
/// # Errors
///
/// [`Error::InvalidName`], [`Error::Exhausted`], or an error opening the registry (which is
/// tried again on the next call).
pub fn acquire(name: &str) -> Result<PortGuard> {
    registry::default_registry()?.acquire(name)
}
