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
/// path, the port, the range. Match on the variant to react; print it (`Display`) to tell a
/// person. New variants may be added in minor releases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No port of the range is free: every one is leased, reserved or bound by another program.
    /// For a block ([`Request::block`](crate::Request::block)), no run of `block_len`
    /// consecutive ports is free.
    #[error("{}", exhausted_message(*range, *held, *block_len))]
    Exhausted {
        /// The range that was searched.
        range: PortRange,
        /// How many ports of the range are leased by holders that are still alive, or by
        /// detached leases that have not expired.
        held: usize,
        /// How many consecutive ports the claim asked for (1 for a single port).
        block_len: u16,
    },

    /// A lease name breaks the naming rule (see [`Request::new`](crate::Request::new)).
    #[error("invalid lease name {}: {reason}", escape(name))]
    InvalidName {
        /// The offending name, quoted and shortened for display.
        name: String,
        /// Which part of the rule it breaks.
        reason: &'static str,
    },

    /// A port range is empty, reversed, or leaves no usable port.
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
    #[error("invalid request: {}", escape(reason))]
    InvalidRequest {
        /// What is wrong with it.
        reason: String,
    },

    /// A port asked for with [`Request::require`](crate::Request::require) is not available.
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

    /// The registry file or its directory cannot be opened or created.
    #[error("cannot open the port registry at {}: {}", shown(path), escape(&source.to_string()))]
    Open {
        /// The registry path.
        path: PathBuf,
        /// What the operating system or SQLite said.
        #[source]
        source: Source,
    },

    /// The file at the registry path is not a portdaddy registry, or is damaged.
    ///
    /// The file is left exactly as it was so that it can be inspected; move it away or point
    /// `PORTDADDY_DB` elsewhere to start afresh.
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

    /// The registry was written by a newer portdaddy whose schema this version does not know.
    #[error(
        "the port registry at {} has schema version {found}, newer than the {supported} this \
         version of portdaddy understands; upgrade portdaddy or use another registry path",
        shown(path)
    )]
    SchemaTooNew {
        /// The registry path.
        path: PathBuf,
        /// The schema version found in the file.
        found: u32,
        /// The newest schema version this build understands.
        supported: u32,
    },

    /// Another process kept the registry locked for longer than the configured lock timeout.
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
    #[error("no process with pid {pid} is running")]
    NoSuchProcess {
        /// The pid that was looked up.
        pid: u32,
    },

    /// A process exists but its identity (start time) cannot be read, so it cannot own
    /// leases: it belongs to another user on a system that hides other users' processes, or
    /// `/proc` is not mounted.
    #[error(
        "cannot read the start time of process {pid} (another user's process hidden by \
         hidepid, or /proc not mounted), so it cannot own port leases"
    )]
    ProcessUnreadable {
        /// The pid that was looked up.
        pid: u32,
    },

    /// Reading or writing the registry failed.
    #[error("port registry at {} failed: {}", shown(path), escape(&source.to_string()))]
    Registry {
        /// The registry path.
        path: PathBuf,
        /// What SQLite or the operating system said.
        #[source]
        source: Source,
    },

    /// A file or directory of the registry was refused before anything was written to it or
    /// created through it: another user could have planted it or can change it (a symbolic
    /// link of another user, a file or directory of another user, one that group or others
    /// may write, a directory others may write without the sticky bit), it would make one
    /// registry two (a second hard link, a file mounted on its own), creating it would put a
    /// directory of ours into another user's, or its name leaves no room for the side files.
    ///
    /// The refused file is left exactly as it was.
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
fn exhausted_message(range: PortRange, held: usize, block_len: u16) -> String {
    let ports = range.len();
    if block_len <= 1 {
        format!(
            "no free port in {range}: {held} leased by live holders, the rest reserved or \
             bound by other programs; release ports or widen the range"
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
        let process = shown(libc::EMFILE);
        assert!(
            process.contains("too many open files (EMFILE: ") && process.contains("ulimit -n"),
            "{process}"
        );
        let host = shown(libc::ENFILE);
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
                source: evil.into(),
            },
            Error::Corrupt {
                path: path(),
                detail: evil.into(),
            },
            Error::SchemaTooNew {
                path: path(),
                found: 9,
                supported: 4,
            },
            Error::LockTimeout {
                path: path(),
                waited: Duration::from_secs(1),
            },
            Error::Registry {
                path: path(),
                source: evil.into(),
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
