//! The one error type of the crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::range::PortRange;
use crate::text::escape;

/// A specialised `Result` whose error is [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from a layer below (SQLite, the operating system).
type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong while handing out ports.
///
/// Every variant names what was wrong and carries the context needed to fix it: the registry
/// path, the port, the range. Match on the variant to react, or ask the accessors
/// ([`path`](Self::path), [`is_registry_unusable`](Self::is_registry_unusable)); print it
/// (`Display`) to tell a person. New variants, and new fields of a variant, may be added in
/// minor releases.
///
/// # Causes
///
/// A variant that wraps an error of a layer below ([`Error::Open`], [`Error::Registry`])
/// returns it from [`source`](std::error::Error::source) and does not repeat it in its own
/// message, so that error-chain printers (`anyhow`'s `{:#}`, `eyre`, `tracing`) show it
/// once. What portdaddy itself has to say (what it found wrong, what to do) is always in the
/// message, never only in a cause: a `source()` is only ever what the operating system or
/// SQLite said. The variants that name what the operating system said as part of their
/// advice ([`Error::Probe`], [`Error::OutOfDescriptors`]) have no `source()`. Print the
/// whole chain to show a person everything:
///
/// ```
/// use std::error::Error as _;
///
/// let dir = tempfile::tempdir()?;
/// let blocker = dir.path().join("not-a-directory");
/// std::fs::write(&blocker, "")?;
/// let error = portdaddy::PortDaddy::open(blocker.join("r.sqlite3")).unwrap_err();
/// let mut line = error.to_string();
/// let mut cause = error.source();
/// while let Some(c) = cause {
///     line += &format!(": {c}");
///     cause = c.source();
/// }
/// assert!(line.starts_with("cannot open the port registry at "));
/// assert!(line.len() > error.to_string().len(), "{line}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// The messages escape control and bidirectional characters of the paths and text they
/// show; the text of a cause is the lower layer's own, so escape the chain before printing
/// it to a terminal if its paths may be hostile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No port of the range is free: every one is leased, reserved or bound by another program.
    /// For a block ([`Request::block`](crate::Request::block)), no run of `block_len`
    /// consecutive ports is free.
    #[non_exhaustive]
    #[error("{}", exhausted_message(*range, *held, *reserved, *block_len))]
    Exhausted {
        /// The range that was searched.
        range: PortRange,
        /// How many ports of the range are leased by holders that are still alive, or by
        /// detached leases that have not expired.
        held: usize,
        /// How many of the other ports of the range are reserved: for the whole registry
        /// ([`PortDaddy::reserve_ports`](crate::PortDaddy::reserve_ports)) or for the handle
        /// ([`Builder::reserve`](crate::Builder::reserve)).
        reserved: usize,
        /// How many consecutive ports the claim asked for (1 for a single port).
        block_len: u16,
    },

    /// A lease name breaks the naming rule (see [`Request::new`](crate::Request::new)).
    #[non_exhaustive]
    #[error("invalid lease name {}: {reason}", escape(name))]
    InvalidName {
        /// The offending name, quoted and shortened for display.
        name: String,
        /// Which part of the rule it breaks.
        reason: &'static str,
    },

    /// A port range is empty, reversed, or leaves no usable port.
    #[non_exhaustive]
    #[error("invalid port range {start}-{end}: {reason}")]
    InvalidRange {
        /// First port of the range as given.
        start: u16,
        /// Last port of the range as given.
        end: u16,
        /// Why it cannot be used.
        reason: &'static str,
    },

    /// A request carries a value that cannot be honoured (port 0, a zero TTL, …).
    #[non_exhaustive]
    #[error("invalid request: {}", escape(reason))]
    InvalidRequest {
        /// What is wrong with it.
        reason: String,
    },

    /// A port asked for with [`Request::require`](crate::Request::require) is not available.
    #[non_exhaustive]
    #[error("port {port} is not available: {}", escape(reason))]
    PortUnavailable {
        /// The port that was required.
        port: u16,
        /// Who or what holds it.
        reason: String,
    },

    /// The port probe could not tell whether a port is free, for a reason that says nothing
    /// about the port: the process is out of file descriptors (`EMFILE`), the host out of
    /// them (`ENFILE`) or of memory (`ENOBUFS`, `ENOMEM`). Nothing was leased; the range is
    /// not full.
    #[non_exhaustive]
    #[error("cannot check whether port {port} is free: {}", probe_advice(error))]
    Probe {
        /// The port being checked.
        port: u16,
        /// What the operating system said.
        error: std::io::Error,
    },

    /// The process is out of file descriptors (`EMFILE`: its limit, `ulimit -n`, is reached)
    /// or the host is (`ENFILE`: the system's file table is full), so the registry, its lock
    /// file, SQLite's `-wal`/`-shm` files or an owner lock file could not be opened.
    ///
    /// Nothing is wrong with the registry, and nothing was leased or changed: raise the limit
    /// or close some files, then try again.
    #[non_exhaustive]
    #[error(
        "cannot use the port registry at {}: {}: {} (the registry itself is fine)",
        shown(path),
        escape(detail),
        descriptor_advice(error)
    )]
    OutOfDescriptors {
        /// The registry path.
        path: PathBuf,
        /// What could not be done, e.g. `SQLite: unable to open database file`.
        detail: String,
        /// What the operating system said: `EMFILE` or `ENFILE`.
        error: std::io::Error,
    },

    /// The registry file or its directory cannot be opened or created. What portdaddy found
    /// wrong, and what to do about it, is the `reason`, shown in the message; what the
    /// operating system or SQLite said is the [`source`](std::error::Error::source).
    #[non_exhaustive]
    #[error(
        "cannot open the port registry at {}{}",
        shown(path),
        reason_shown(reason)
    )]
    Open {
        /// The registry path.
        path: PathBuf,
        /// What portdaddy found wrong with the path and what to do (`the path is a
        /// directory; give a file path`), or what it was doing when the operating system or
        /// SQLite failed; `None` when the source says it all.
        reason: Option<String>,
        /// What the operating system or SQLite said; `None` when portdaddy itself found the
        /// path unusable (the `reason` says why).
        #[source]
        source: Option<Source>,
    },

    /// The file at the registry path is not a portdaddy registry, or is damaged.
    ///
    /// The file is left exactly as it was so that it can be inspected; move it away or point
    /// `PORTDADDY_DB` elsewhere to start afresh.
    #[non_exhaustive]
    #[error(
        "{} is not a usable port registry ({}); it was left untouched: move it away or \
         set PORTDADDY_DB to another path",
        shown(path),
        escape(detail)
    )]
    Corrupt {
        /// The registry path.
        path: PathBuf,
        /// What is wrong with the file.
        detail: String,
    },

    /// The registry was marked by a newer portdaddy as needing a reader of a newer format
    /// generation (its `meta` row `min_reader_version`): that version judges ports free or
    /// owners alive by rules this one does not know. A registry that a newer version only
    /// added to (a higher `user_version`) is no reason for this error. The file is left as
    /// it was.
    #[non_exhaustive]
    #[error(
        "the port registry at {} needs portdaddy of registry format generation {required} or \
         newer (its min_reader_version), and this version reads generation {supported}; \
         upgrade portdaddy in this project, or set PORTDADDY_DB to use another registry",
        shown(path)
    )]
    SchemaTooNew {
        /// The registry path.
        path: PathBuf,
        /// The format generation the registry demands (its `min_reader_version`); `u32::MAX`
        /// when that names a generation above it, or none at all (not a number).
        required: u32,
        /// The format generation this version of portdaddy reads.
        supported: u32,
    },

    /// Another process kept the registry locked for longer than the configured lock timeout.
    #[non_exhaustive]
    #[error(
        "timed out after {waited:?} waiting for the lock on the port registry at {}; another \
         process holds it (is one stopped in a debugger?)",
        shown(path)
    )]
    LockTimeout {
        /// The registry path.
        path: PathBuf,
        /// How long this call waited.
        waited: Duration,
    },

    /// The lease behind a guard is gone: it expired and was reclaimed, or it was released by
    /// port from elsewhere.
    #[non_exhaustive]
    #[error(
        "the lease on port {port} is no longer in the registry (expired or released elsewhere)"
    )]
    LeaseLost {
        /// The port the lease was for.
        port: u16,
    },

    /// A file registry was used or opened in a child process made by `fork` (without
    /// `exec`) from a process that had file registries open.
    ///
    /// SQLite's connections and lock state do not cross `fork`: the child inherits the
    /// parent's in-memory view of the file's locks, possibly mid-transaction, and a connection
    /// it opened itself would share that view. So the child can use no file registry, neither
    /// an inherited handle nor a new one ([`portdaddy::acquire`](crate::acquire) included),
    /// and is told so at once. `exec` a program in the child, or fork before opening any.
    #[non_exhaustive]
    #[error(
        "process {child} was forked from process {parent} while that had port registries \
         open, and cannot use one (SQLite connections and locks do not survive fork); exec a \
         program in the child, or fork before opening a registry"
    )]
    ForkedHandle {
        /// The process that had the file registries open.
        parent: u32,
        /// The forked child that tried to use or open one.
        child: u32,
    },

    /// A process that a lease should belong to does not exist.
    #[non_exhaustive]
    #[error("no process with pid {pid} is running")]
    NoSuchProcess {
        /// The pid that was looked up.
        pid: u32,
    },

    /// A process exists but its identity (start time) cannot be read, so it cannot own
    /// leases: it belongs to another user on a system that hides other users' processes, or
    /// `/proc` is not mounted.
    #[non_exhaustive]
    #[error(
        "cannot read the start time of process {pid} (another user's process hidden by \
         hidepid, or /proc not mounted), so it cannot own port leases"
    )]
    ProcessUnreadable {
        /// The pid that was looked up.
        pid: u32,
    },

    /// Nothing started listening on a port before the time given to
    /// [`wait_until_listening`](crate::wait_until_listening) (or
    /// [`PortGuard::wait_until_listening`](crate::PortGuard::wait_until_listening)) had passed:
    /// no TCP connection to `127.0.0.1` or `::1` was accepted, or for UDP no socket was bound
    /// on the port.
    #[non_exhaustive]
    #[error(
        "nothing listens on port {port} ({}) after waiting {:?}; check that the server \
         started, and that it listens on 127.0.0.1 or ::1 (or on all addresses)",
        protocol_name(*protocol),
        Duration::from_millis(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX))
    )]
    NotListening {
        /// The port waited for.
        port: u16,
        /// What had to listen: TCP, UDP, or both.
        protocol: crate::lease::Protocol,
        /// How long was waited.
        waited: Duration,
    },

    /// Reading or writing the registry failed. What portdaddy found wrong, and what to do
    /// about it, is the `reason`, shown in the message; what SQLite or the operating system
    /// said is the [`source`](std::error::Error::source).
    #[non_exhaustive]
    #[error(
        "reading or writing the port registry at {} failed{}",
        shown(path),
        reason_shown(reason)
    )]
    Registry {
        /// The registry path.
        path: PathBuf,
        /// What portdaddy found wrong and what to do (`the registry file was deleted or
        /// replaced again each time it was opened anew`), or what it was doing when SQLite
        /// or the operating system failed; `None` when the source says it all.
        reason: Option<String>,
        /// What SQLite or the operating system said; `None` when portdaddy itself found the
        /// registry unusable (the `reason` says why).
        #[source]
        source: Option<Source>,
    },

    /// A file or directory of the registry was refused before anything was written to it or
    /// created through it: another user could have planted it or can change it (a symbolic
    /// link of another user, a file or directory of another user, one that group or others
    /// may write, a directory others may write without the sticky bit), it would make one
    /// registry two (a second hard link, a file mounted on its own), creating it would put a
    /// directory of ours into another user's, or its name leaves no room for the side files.
    ///
    /// The refused file is left exactly as it was.
    #[non_exhaustive]
    #[error(
        "refusing {}: {}; it was left as it was: {advice}",
        refused_what(path, file),
        escape(reason)
    )]
    Refused {
        /// The registry path, as given.
        path: PathBuf,
        /// The file or directory that was refused.
        file: PathBuf,
        /// Why it was refused (naming its owner where that is the reason).
        reason: String,
        /// What to do about it.
        advice: &'static str,
    },
}

/// A protocol as the messages name it.
fn protocol_name(protocol: crate::lease::Protocol) -> &'static str {
    match protocol {
        crate::lease::Protocol::Udp => "UDP",
        crate::lease::Protocol::Both => "TCP and UDP",
        _ => "TCP",
    }
}

impl Error {
    /// The registry path the error is about, for the errors that concern a registry file:
    /// [`Error::Open`], [`Error::Corrupt`], [`Error::SchemaTooNew`], [`Error::LockTimeout`],
    /// [`Error::Registry`], [`Error::Refused`] (the registry, not the refused file beside
    /// it, which is its `file`) and [`Error::OutOfDescriptors`]; `None` for the rest.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("r.sqlite3");
    /// std::fs::write(&path, "not a registry")?;
    /// let error = portdaddy::PortDaddy::open(&path).unwrap_err();
    /// assert_eq!(error.path(), Some(path.as_path()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::OutOfDescriptors { path, .. }
            | Error::Open { path, .. }
            | Error::Corrupt { path, .. }
            | Error::SchemaTooNew { path, .. }
            | Error::LockTimeout { path, .. }
            | Error::Registry { path, .. }
            | Error::Refused { path, .. } => Some(path),
            Error::Exhausted { .. }
            | Error::InvalidName { .. }
            | Error::InvalidRange { .. }
            | Error::InvalidRequest { .. }
            | Error::PortUnavailable { .. }
            | Error::Probe { .. }
            | Error::LeaseLost { .. }
            | Error::ForkedHandle { .. }
            | Error::NoSuchProcess { .. }
            | Error::ProcessUnreadable { .. }
            | Error::NotListening { .. } => None,
        }
    }

    /// Whether the registry file itself cannot be used as it is, so that trying again fails
    /// the same way until someone acts on the file, its directory or the portdaddy version
    /// (the message says what to do): it cannot be opened or created ([`Error::Open`]), is
    /// not a portdaddy registry or is damaged ([`Error::Corrupt`]), was written by a newer
    /// version ([`Error::SchemaTooNew`]), was refused as another user could have planted or
    /// can change it ([`Error::Refused`]), or reading or writing it failed
    /// ([`Error::Registry`]). [`path`](Self::path) names the file. Nothing was leased or
    /// released; the request, the range and the ports have nothing to do with it.
    ///
    /// `false` for every error that leaves the registry usable:
    ///
    /// - [`Error::LockTimeout`]: the registry is fine, only busy: another process held its
    ///   lock for longer than the lock timeout. That is transient; try again later (or look
    ///   for a process stopped in a debugger).
    /// - [`Error::OutOfDescriptors`]: the registry is fine; this process or the host is out
    ///   of file descriptors.
    /// - [`Error::ForkedHandle`]: the registry is fine; this forked child can use no file
    ///   registry.
    /// - the errors of the request, the range, the ports and the processes.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("r.sqlite3");
    /// std::fs::write(&path, "not a registry")?;
    /// let error = portdaddy::PortDaddy::open(&path).unwrap_err();
    /// assert!(error.is_registry_unusable());
    /// assert_eq!(std::fs::read(&path)?, b"not a registry", "left as it was");
    ///
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let error = registry.acquire("").unwrap_err(); // an invalid name
    /// assert!(!error.is_registry_unusable());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_registry_unusable(&self) -> bool {
        match self {
            Error::Open { .. }
            | Error::Corrupt { .. }
            | Error::SchemaTooNew { .. }
            | Error::Refused { .. }
            | Error::Registry { .. } => true,
            Error::LockTimeout { .. }
            | Error::OutOfDescriptors { .. }
            | Error::ForkedHandle { .. }
            | Error::Exhausted { .. }
            | Error::InvalidName { .. }
            | Error::InvalidRange { .. }
            | Error::InvalidRequest { .. }
            | Error::PortUnavailable { .. }
            | Error::Probe { .. }
            | Error::LeaseLost { .. }
            | Error::NoSuchProcess { .. }
            | Error::ProcessUnreadable { .. }
            | Error::NotListening { .. } => false,
        }
    }
}

/// An error's message followed by each of its causes (`msg: cause: cause`), escaped: for the
/// places where the library itself turns an error into text (its logs, the diagnosis), which
/// would otherwise lose the causes that the messages no longer repeat.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {}", escape(&c.to_string()))?;
            cause = c.source();
        }
        Ok(())
    }
}

impl Error {
    /// [`Error::Open`] for what the operating system or SQLite said.
    pub(crate) fn open(path: &Path, source: impl Into<Source>) -> Self {
        Error::Open {
            path: path.to_owned(),
            reason: None,
            source: Some(source.into()),
        }
    }

    /// [`Error::Open`] for what portdaddy found wrong itself, with what to do.
    pub(crate) fn open_because(path: &Path, reason: impl Into<String>) -> Self {
        Error::Open {
            path: path.to_owned(),
            reason: Some(reason.into()),
            source: None,
        }
    }

    /// [`Error::Registry`] for what the operating system or SQLite said.
    pub(crate) fn registry(path: &Path, source: impl Into<Source>) -> Self {
        Error::Registry {
            path: path.to_owned(),
            reason: None,
            source: Some(source.into()),
        }
    }

    /// [`Error::Registry`] for what portdaddy found wrong itself, with what to do.
    pub(crate) fn registry_because(path: &Path, reason: impl Into<String>) -> Self {
        Error::Registry {
            path: path.to_owned(),
            reason: Some(reason.into()),
            source: None,
        }
    }
}

/// The `reason` of [`Error::Open`] and [`Error::Registry`] as their messages end: `: reason`,
/// escaped, or nothing.
fn reason_shown(reason: &Option<String>) -> String {
    reason
        .as_deref()
        .map(|r| format!(": {}", escape(r)))
        .unwrap_or_default()
}

/// What [`Error::Refused`] refused: the registry itself, or a file beside it.
fn refused_what(path: &Path, file: &Path) -> String {
    if path == file {
        format!("the port registry at {}", shown(path))
    } else {
        format!("{} for the port registry at {}", shown(file), shown(path))
    }
}

/// A path as an error message shows it: control and layout characters escaped, so that a
/// hostile file name cannot steer the terminal the message is printed on.
fn shown(path: &Path) -> String {
    escape(&path.display().to_string())
}

/// What [`Error::OutOfDescriptors`] and [`Error::Probe`] say about a process (`EMFILE`)
/// or host (`ENFILE`) out of file descriptors, and what to do.
fn descriptor_advice(error: &std::io::Error) -> String {
    if crate::descriptors::host_wide(error) {
        return format!(
            "too many open files in the system (ENFILE: {error}): the host's file table is \
             full; close some files or raise fs.file-max, then try again"
        );
    }
    format!(
        "too many open files (EMFILE: {error}): raise the limit (ulimit -n) or close some \
         files, then try again"
    )
}

/// What [`Error::Probe`] says: the cause, when it is one the probe knows.
fn probe_advice(error: &std::io::Error) -> String {
    if crate::descriptors::exhausted(error) {
        return descriptor_advice(error);
    }
    format!(
        "{error}; the host may be out of memory or socket buffers (ENOMEM, ENOBUFS); free \
         some, then try again"
    )
}

/// What [`Error::Exhausted`] says: for a block, that no run of its length was left, which
/// is not the same as a full range.
fn exhausted_message(range: PortRange, held: usize, reserved: usize, block_len: u16) -> String {
    let ports = range.len();
    if block_len <= 1 {
        format!(
            "no free port in {range}: {held} leased by live holders, {reserved} reserved, the \
             rest bound by other programs; release or unreserve ports, or widen the range"
        )
    } else if usize::from(block_len) > ports {
        format!(
            "no {block_len} consecutive free ports: the preferred block is taken, and a block \
             of {block_len} does not fit in the range {range} ({ports} ports); prefer another \
             first port, ask for a shorter block, or widen the range"
        )
    } else {
        format!(
            "no {block_len} consecutive free ports in {range}: {held} of its {ports} ports are \
             leased by live holders, and the rest hold no run of {block_len} without a \
             reserved port or one bound by another program; release ports, ask for a shorter \
             block, or widen the range"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeSet;
    use std::error::Error as _;

    /// The text every cause below carries, to be found (or not) in a message.
    const CAUSE: &str = "the-cause-said-this";

    /// One error of every variant, each with a cause where the variant has one.
    fn every_variant() -> Vec<Error> {
        let path = || PathBuf::from("/tmp/r.sqlite3");
        let io = || std::io::Error::other(CAUSE);
        vec![
            Error::Exhausted {
                range: PortRange::new(2000, 2009).unwrap(),
                held: 3,
                reserved: 0,
                block_len: 1,
            },
            Error::InvalidName {
                name: "n".into(),
                reason: "r",
            },
            Error::InvalidRange {
                start: 9,
                end: 3,
                reason: "r",
            },
            Error::InvalidRequest { reason: "r".into() },
            Error::PortUnavailable {
                port: 2000,
                reason: "r".into(),
            },
            Error::Probe {
                port: 2000,
                error: io(),
            },
            Error::OutOfDescriptors {
                path: path(),
                detail: "d".into(),
                error: io(),
            },
            Error::Open {
                path: path(),
                reason: None,
                source: Some(io().into()),
            },
            Error::Corrupt {
                path: path(),
                detail: "d".into(),
            },
            Error::SchemaTooNew {
                path: path(),
                required: 9,
                supported: 4,
            },
            Error::LockTimeout {
                path: path(),
                waited: Duration::from_secs(1),
            },
            Error::LeaseLost { port: 2000 },
            Error::ForkedHandle {
                parent: 1,
                child: 2,
            },
            Error::NoSuchProcess { pid: 1 },
            Error::ProcessUnreadable { pid: 1 },
            Error::NotListening {
                port: 2000,
                protocol: crate::lease::Protocol::Udp,
                waited: Duration::from_millis(1500),
            },
            Error::Registry {
                path: path(),
                reason: None,
                source: Some(CAUSE.into()),
            },
            Error::Refused {
                path: path(),
                file: path(),
                reason: "r".into(),
                advice: "a",
            },
        ]
    }

    /// The variant's name; a variant added to [`Error`] fails to compile here until it is
    /// added to [`every_variant`] too.
    fn variant(error: &Error) -> &'static str {
        match error {
            Error::Exhausted { .. } => "Exhausted",
            Error::InvalidName { .. } => "InvalidName",
            Error::InvalidRange { .. } => "InvalidRange",
            Error::InvalidRequest { .. } => "InvalidRequest",
            Error::PortUnavailable { .. } => "PortUnavailable",
            Error::Probe { .. } => "Probe",
            Error::OutOfDescriptors { .. } => "OutOfDescriptors",
            Error::Open { .. } => "Open",
            Error::Corrupt { .. } => "Corrupt",
            Error::SchemaTooNew { .. } => "SchemaTooNew",
            Error::LockTimeout { .. } => "LockTimeout",
            Error::LeaseLost { .. } => "LeaseLost",
            Error::ForkedHandle { .. } => "ForkedHandle",
            Error::NoSuchProcess { .. } => "NoSuchProcess",
            Error::ProcessUnreadable { .. } => "ProcessUnreadable",
            Error::NotListening { .. } => "NotListening",
            Error::Registry { .. } => "Registry",
            Error::Refused { .. } => "Refused",
        }
    }

    #[test]
    fn every_variant_is_checked() {
        let names: BTreeSet<_> = every_variant().iter().map(variant).collect();
        assert_eq!(names.len(), 18, "{names:?}");
    }

    #[test]
    fn no_message_repeats_the_text_of_its_cause() {
        let mut with_cause = 0;
        for error in every_variant() {
            let message = error.to_string();
            let mut cause = error.source();
            while let Some(c) = cause {
                with_cause += 1;
                let said = c.to_string();
                assert!(
                    !message.contains(&said),
                    "{}: {message:?} repeats its cause {said:?}",
                    variant(&error)
                );
                cause = c.source();
            }
        }
        assert_eq!(with_cause, 2, "Open and Registry return their causes");
    }

    #[test]
    fn what_portdaddy_found_wrong_is_in_the_message_and_a_cause_only_what_a_layer_said() {
        let path = Path::new("/tmp/r.sqlite3");
        let advice = "the path is a directory; give a file path";
        for error in [
            Error::open_because(path, advice),
            Error::registry_because(path, advice),
        ] {
            assert!(
                error.to_string().ends_with(&format!(": {advice}")),
                "{error}"
            );
            assert!(error.source().is_none(), "{error:?}");
        }
        let error = Error::Open {
            path: path.to_owned(),
            reason: Some("cannot create an owner lock file in /tmp/r.sqlite3.owners".into()),
            source: Some(std::io::Error::other(CAUSE).into()),
        };
        let message = error.to_string();
        assert!(message.contains("owner lock file"), "{message}");
        assert!(!message.contains(CAUSE), "{message}");
        assert_eq!(error.source().unwrap().to_string(), CAUSE);
        let plain = Error::open(path, std::io::Error::other(CAUSE));
        assert_eq!(
            plain.to_string(),
            "cannot open the port registry at /tmp/r.sqlite3"
        );
    }

    #[test]
    fn a_guard_error_shows_its_error_and_the_cause_once() {
        let error = Error::Registry {
            path: "/tmp/r.sqlite3".into(),
            reason: None,
            source: Some(CAUSE.into()),
        };
        let message = error.to_string();
        let guard_error = crate::guard::GuardError::new(error, None);
        assert_eq!(guard_error.to_string(), message);
        let chain = Chain(&guard_error).to_string();
        assert_eq!(chain, format!("{message}: {CAUSE}"));
        assert_eq!(chain.matches(CAUSE).count(), 1, "{chain}");
    }

    #[test]
    fn a_cause_a_message_does_not_repeat_is_shown_by_the_chain_escaped() {
        let error = Error::Open {
            path: "/tmp/r.sqlite3".into(),
            reason: None,
            source: Some("a\u{1b}[2Jb".into()),
        };
        let chain = Chain(&error).to_string();
        assert!(!chain.chars().any(crate::text::needs_escape), "{chain:?}");
        assert_eq!(
            chain,
            r"cannot open the port registry at /tmp/r.sqlite3: a\u{1b}[2Jb"
        );
    }

    #[test]
    fn path_names_the_registry_of_the_errors_about_a_registry_file() {
        let with_path: BTreeSet<_> = every_variant()
            .iter()
            .filter(|e| e.path() == Some(Path::new("/tmp/r.sqlite3")))
            .map(variant)
            .collect();
        let expected = [
            "OutOfDescriptors",
            "Open",
            "Corrupt",
            "SchemaTooNew",
            "LockTimeout",
            "Registry",
            "Refused",
        ];
        assert_eq!(with_path, BTreeSet::from(expected));
        let refused = Error::Refused {
            path: "/tmp/r.sqlite3".into(),
            file: "/tmp/r.sqlite3.lock".into(),
            reason: "r".into(),
            advice: "a",
        };
        assert_eq!(refused.path(), Some(Path::new("/tmp/r.sqlite3")));
    }

    #[test]
    fn only_errors_of_the_registry_file_itself_make_it_unusable() {
        let unusable: BTreeSet<_> = every_variant()
            .iter()
            .filter(|e| e.is_registry_unusable())
            .map(variant)
            .collect();
        // Not LockTimeout (busy, transient), OutOfDescriptors (the process or host is out
        // of descriptors), ForkedHandle (this process cannot use any registry).
        let expected = ["Open", "Corrupt", "SchemaTooNew", "Registry", "Refused"];
        assert_eq!(unusable, BTreeSet::from(expected));
    }

    #[cfg(unix)]
    #[test]
    fn out_of_descriptors_says_whether_the_process_or_the_host_ran_out() {
        let shown = |errno| {
            Error::OutOfDescriptors {
                path: "/tmp/r.sqlite3".into(),
                detail: "SQLite: unable to open database file".into(),
                error: std::io::Error::from_raw_os_error(errno),
            }
            .to_string()
        };
        let process = shown(rustix::io::Errno::MFILE.raw_os_error());
        assert!(
            process.contains("too many open files (EMFILE: ") && process.contains("ulimit -n"),
            "{process}"
        );
        let host = shown(rustix::io::Errno::NFILE.raw_os_error());
        assert!(
            host.contains("too many open files in the system (ENFILE: ")
                && host.contains("fs.file-max"),
            "{host}"
        );
        for text in [process, host] {
            assert!(text.contains("unable to open database file"), "{text}");
            assert!(text.contains("the registry itself is fine"), "{text}");
        }
    }

    #[test]
    fn a_refusal_escapes_the_files_and_the_reason_it_names() {
        let evil = "a\u{1b}[2J\u{202e}b\nc\u{9b}d";
        let registry = PathBuf::from(format!("/tmp/{evil}/r.sqlite3"));
        let refusal = |file: &Path, reason: &str| Error::Refused {
            path: registry.clone(),
            file: file.to_owned(),
            reason: reason.into(),
            advice: "set PORTDADDY_DB",
        };
        let beside = PathBuf::from(format!("/tmp/{evil}/r.sqlite3.lock"));
        for error in [
            refusal(&registry, "it belongs to user x (uid 7)"),
            refusal(&beside, "it belongs to user x (uid 7)"),
            refusal(&registry, evil),
        ] {
            let text = error.to_string();
            assert!(!text.chars().any(crate::text::needs_escape), "{text:?}");
            assert!(
                text.contains(r"/tmp/a\u{1b}[2J\u{202e}b\nc\u{9b}d/r.sqlite3"),
                "{text:?}"
            );
        }
        let text = refusal(&beside, "r").to_string();
        assert!(text.contains(r"d/r.sqlite3.lock for the port registry at /tmp/a\u{1b}"));
    }

    #[test]
    fn display_escapes_control_and_bidi_characters_of_paths_and_text() {
        let evil = "a\u{1b}[2J\u{202e}b\nc\u{9b}d";
        let path = || PathBuf::from(format!("/tmp/{evil}/r.sqlite3"));
        let errors = [
            Error::InvalidName {
                name: evil.into(),
                reason: "r",
            },
            Error::InvalidRequest {
                reason: evil.into(),
            },
            Error::PortUnavailable {
                port: 1,
                reason: evil.into(),
            },
            Error::Open {
                path: path(),
                reason: None,
                source: Some(evil.into()),
            },
            Error::Corrupt {
                path: path(),
                detail: evil.into(),
            },
            Error::SchemaTooNew {
                path: path(),
                required: 9,
                supported: 4,
            },
            Error::LockTimeout {
                path: path(),
                waited: Duration::from_secs(1),
            },
            Error::Registry {
                path: path(),
                reason: None,
                source: Some(evil.into()),
            },
            Error::OutOfDescriptors {
                path: path(),
                detail: evil.into(),
                error: std::io::Error::from_raw_os_error(24),
            },
        ];
        for error in errors {
            let text = error.to_string();
            assert!(!text.chars().any(crate::text::needs_escape), "{text:?}");
            assert!(text.contains(r"\u{1b}[2J\u{202e}b"), "{text:?}");
        }
    }
}
