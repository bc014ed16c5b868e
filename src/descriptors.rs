//! Telling "out of file descriptors" apart from a registry that cannot be used.
//!
//! A process at its limit on open files (`EMFILE`, `ulimit -n`), or a host whose file table
//! is full (`ENFILE`), cannot open the registry, its lock file, SQLite's `-wal` and `-shm`
//! files or an owner lock file. Nothing is wrong with the registry then, and the error says
//! so ([`Error::OutOfDescriptors`]) instead of "cannot open the port registry".
//!
//! Our own system calls return the `errno`. SQLite does not: it turns a failed `open` into
//! `SQLITE_CANTOPEN` ("unable to open database file"), and by the time its error reaches us
//! it has closed what it had opened for the step, and the connection whose
//! `sqlite3_system_errno` would tell may be gone. So for that error we ask the kernel
//! ourselves, at that moment: can this process open [`SQLITE_NEEDS`] more descriptors?

use std::io;
use std::path::Path;

use crate::error::Error;

/// How many descriptors one SQLite connection may need at once beyond those it holds
/// between calls: the database, its `-wal` and `-shm` files, and briefly one more (the
/// directory it syncs after creating a file, `/dev/urandom`, a temporary file).
pub(crate) const SQLITE_NEEDS: usize = 4;

/// Whether `error` is the operating system saying that the process (`EMFILE`) or the host
/// (`ENFILE`) has no file descriptor left.
pub(crate) fn exhausted(error: &io::Error) -> bool {
    crate::sys::is_out_of_descriptors(error)
}

/// Whether `error` is the host's file table being full (`ENFILE`), not only this process's
/// limit.
pub(crate) fn host_wide(error: &io::Error) -> bool {
    crate::sys::is_host_out_of_descriptors(error)
}

/// The `EMFILE`/`ENFILE` error the kernel gives when this process tries to open `n`
/// descriptors at once now, or `None` when it can (or the check cannot tell: `/dev/null`
/// missing, another platform). Only for error paths: it costs `n` opens and closes.
pub(crate) fn lacking(n: usize) -> Option<io::Error> {
    let null = crate::sys::NULL_DEVICE?;
    let mut opened = Vec::with_capacity(n);
    for _ in 0..n {
        match std::fs::File::open(null) {
            Ok(file) => opened.push(file),
            Err(e) if exhausted(&e) => return Some(e),
            Err(_) => return None,
        }
    }
    None
}

/// `error` as [`Error::OutOfDescriptors`] when what the operating system said under it is
/// `EMFILE` or `ENFILE`; any other error unchanged.
pub(crate) fn name_cause(error: Error) -> Error {
    let (Error::Open {
        path,
        source: Some(source),
        ..
    }
    | Error::Registry {
        path,
        source: Some(source),
        ..
    }) = &error
    else {
        return error;
    };
    match source.downcast_ref::<io::Error>() {
        Some(e) if exhausted(e) => {
            out_of_descriptors(path, "a file of the registry cannot be opened", copy(e))
        }
        _ => error,
    }
}

/// [`Error::OutOfDescriptors`] for the registry at `path`, where `detail` could not be done.
pub(crate) fn out_of_descriptors(
    path: &Path,
    detail: impl Into<String>,
    error: io::Error,
) -> Error {
    Error::OutOfDescriptors {
        path: path.to_owned(),
        detail: detail.into(),
        error,
    }
}

/// A copy of an operating-system error (`io::Error` is not `Clone`).
fn copy(error: &io::Error) -> io::Error {
    error.raw_os_error().map_or_else(
        || io::Error::new(error.kind(), error.to_string()),
        io::Error::from_raw_os_error,
    )
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn an_open_or_registry_error_from_emfile_or_enfile_names_the_cause() {
        for errno in [
            rustix::io::Errno::MFILE.raw_os_error(),
            rustix::io::Errno::NFILE.raw_os_error(),
        ] {
            let open = Error::open("/r".as_ref(), io::Error::from_raw_os_error(errno));
            let Error::OutOfDescriptors { error, .. } = name_cause(open) else {
                panic!("not named for errno {errno}");
            };
            assert_eq!(error.raw_os_error(), Some(errno));
            let used = Error::registry("/r".as_ref(), io::Error::from_raw_os_error(errno));
            assert!(matches!(name_cause(used), Error::OutOfDescriptors { .. }));
        }
    }

    #[test]
    fn other_errors_are_left_as_they_are() {
        let denied = Error::Open {
            path: "/r".into(),
            reason: None,
            source: Some(
                io::Error::from_raw_os_error(rustix::io::Errno::ACCESS.raw_os_error()).into(),
            ),
        };
        assert!(matches!(name_cause(denied), Error::Open { .. }));
        let said = Error::Registry {
            path: "/r".into(),
            reason: None,
            source: Some("unable to open database file".into()),
        };
        assert!(matches!(name_cause(said), Error::Registry { .. }));
    }

    #[test]
    fn a_process_with_descriptors_to_spare_lacks_none() {
        assert!(lacking(SQLITE_NEEDS).is_none());
    }
}
