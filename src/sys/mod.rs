//! Platform code, in one place: every `unsafe` block and system call of the library other
//! than through std lives below this module, and the rest of the crate calls the functions
//! here, which have the same signatures on every platform. The rest has no `cfg` of its own
//! but one: the walk of Unix paths in `paths::resolve`. Reading Linux's `/proc` (plain file
//! reads) stays with the process probe, which asks [`PROCFS`] whether there is one.
//!
//! - `unix.rs`: the Unix implementation, through rustix (safe wrappers over the system
//!   calls); the parts only Linux has (namespaces, `O_PATH`, `statx`, the ephemeral port
//!   range) are marked there. The one call rustix does not cover (`pthread_atfork`) goes
//!   through `libc`.
//! - `sockets.rs`: Linux only, which processes have a socket bound on a port, read from
//!   `/proc` (plain file reads); elsewhere [`socket_holders`] says it cannot tell.
//! - `portable.rs`: the process query through `sysinfo`, for every platform but Linux.
//! - `wal_index.rs`: Linux only, the blocks of SQLite's mapped index of the write-ahead log
//!   (`-shm`) allocated before SQLite stores into them, through SQLite's C interface;
//!   elsewhere [`allocate_wal_index`] leaves the connection as it is.
//! - `unsupported.rs`: every other platform. It compiles everywhere and gives the answer
//!   that keeps the rest safe: no evidence (`None`) where a question cannot be asked, which
//!   the liveness rule turns into "keep the lease", or an [`io::ErrorKind::Unsupported`]
//!   error where something cannot be done.
//!
//! The user rule: a file is ours when it belongs to the *effective* user id ([`euid`]). The
//! kernel creates our files with the effective uid, so under setuid (or anything else that
//! makes the real and effective ids differ) comparing with the real uid would refuse the
//! files we just made, and accept those of the user who started us.
//!
//! [`io::ErrorKind::Unsupported`]: std::io::ErrorKind::Unsupported

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as imp;

#[cfg(not(unix))]
mod unsupported;
#[cfg(not(unix))]
use unsupported as imp;

// The fallback is compiled and tested on Unix too, so that it keeps building for the
// platforms nobody here runs.
#[cfg(all(test, unix))]
#[allow(dead_code, unused_imports)]
mod unsupported;

pub(crate) use imp::*;

#[cfg(target_os = "linux")]
mod sockets;

/// A process with a socket bound on a port, as [`socket_holders`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketOwner {
    /// A UDP socket; a listening TCP socket otherwise.
    pub(crate) udp: bool,
    /// `None`: a socket whose process cannot be seen (another user's, or `/proc` mounted
    /// with `hidepid`).
    pub(crate) pid: Option<u32>,
    /// Its command line, where it can be read.
    pub(crate) command: Option<String>,
}

#[cfg(target_os = "linux")]
mod wal_index;
#[cfg(target_os = "linux")]
pub(crate) use wal_index::allocate_wal_index;

/// Elsewhere SQLite's index of the write-ahead log is mapped as SQLite maps it (see
/// `wal_index.rs`): `false`, the connection left as it is.
#[cfg(not(target_os = "linux"))]
pub(crate) fn allocate_wal_index(_conn: &rusqlite::Connection) -> bool {
    false
}

// Processes where there is no Linux `/proc`: `sysinfo`, which Linux builds need not compile.
#[cfg(not(target_os = "linux"))]
mod portable;
#[cfg(not(target_os = "linux"))]
pub(crate) use portable::process_state;
