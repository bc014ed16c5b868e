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
//! # Which call to use
//!
//! | You need | Use |
//! |----------|-----|
//! | a port number for a server you start | [`acquire`], or [`PortDaddy::acquire`] on a registry you opened |
//! | the bound socket itself: no gap between check and server | [`PortDaddy::acquire_listener`], [`PortDaddy::acquire_udp_socket`], [`Request::listen_on`] |
//! | several ports, all or none | [`PortDaddy::acquire_many`]; consecutive ports: [`Request::block`] |
//! | a port that outlives the process (build scripts) | [`Request::ttl`] + [`Request::reuse_detached`], then [`PortGuard::keep`] |
//! | threads of one process only, no file | [`PortDaddy::in_process`] |
//! | a preferred port, a range, UDP, another owner | [`Request`], [`PortDaddy::builder`] |
//! | to wait until the server you started listens | [`PortGuard::wait_until_listening`], [`wait_until_listening`] |
//! | to know which process holds a port | [`socket_holders`] |
//! | ports that no process using the registry may be handed | [`PortDaddy::reserve_ports`] |
//!
//! # Compared with the usual ways
//!
//! | | bind port 0, close, pass the number | [`portpicker`](https://docs.rs/portpicker) | a port-broker daemon | portdaddy |
//! |---|---|---|---|---|
//! | port reserved until you are done | no: free again at `close` | no: nothing is recorded | yes | yes, until the guard drops |
//! | apart across processes (`cargo nextest`, scripts) | no | no | yes | yes, through a shared file |
//! | skips ports other programs hold | yes, at the bind | yes, at the probe | depends | yes, at the probe |
//! | no gap before the server binds | no | no | no | with [`PortDaddy::acquire_listener`] |
//! | a crashed holder's port comes back | — | — | when the daemon notices | at the next claim that needs it |
//! | the same port again for the same name | no | no | sometimes | yes, while it is free |
//! | needs a service running | no | no | yes | no |
//!
//! # How it works
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
//! A program that takes only a port number still has a short window between portdaddy's
//! probe and its own bind in which a program *outside* the registry could bind the port.
//! Shrink it by starting the server right after the claim; close it by handing the server
//! the socket ([`PortDaddy::acquire_listener`]) where the server accepts one.
//!
//! # Features
//!
//! - `serde`: `Serialize` and `Deserialize` for [`Lease`], [`Owner`], [`Protocol`],
//!   [`LeaseState`], [`Choice`] and [`PortRange`] (checked like [`PortRange::new`] on the way
//!   in), and `Serialize` for [`Stats`], [`Diagnosis`], [`Check`], [`Status`] and
//!   [`SocketHolder`]. Off by default.
//! - `cli`: the `portdaddy` command-line tool; turns on `serde`.

#![deny(missing_docs)]
#![warn(clippy::print_stdout, clippy::print_stderr, clippy::dbg_macro)]

mod builder;
mod clock;
mod descriptors;
mod doctor;
mod error;
mod fork;
mod guard;
mod lease;
mod listening;
mod lock;
mod paths;
mod policy;
mod probe;
mod range;
mod registry;
mod request;
mod reserved;
mod stats;
mod store;
mod sys;
mod text;

pub use builder::Builder;
pub use clock::{Clock, SystemClock};
pub use doctor::{Check, Diagnosis, Status};
pub use error::{Error, Result};
pub use guard::{GuardError, PortGuard};
pub use lease::{Choice, Lease, LeaseState, Owner, Protocol};
pub use listening::{socket_holders, wait_until_listening, SocketHolder};
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
/// tried again on the next call). [`Error::ForkedHandle`] at once in a child made by `fork`
/// from a process that had a file registry open (see [`PortDaddy`]'s "Forking").
pub fn acquire(name: &str) -> Result<PortGuard> {
    registry::default_registry()?.acquire(name)
}

/// The code blocks of README.md, run as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
