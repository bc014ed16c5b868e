//! The checks of a registry file before SQLite opens it, shared by the store's open
//! sequence and the read-only examination: one implementation of what makes a file ours.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::path::Path;

use super::schema::APPLICATION_ID;
use super::{file_id, in_use_table};
use crate::error::{Error, Result};
use crate::paths::sibling;

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Length of the SQLite file header.
const HEADER_LEN: usize = 100;

/// What [`check_file`] read of a file it let through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Vetted {
    /// The file's header says it is in WAL mode (file format versions 2 at bytes 18 and 19),
    /// and no rollback journal beside it can change that. `false` where the header was not
    /// read (the file is missing, empty, or in use by this process) or not under the write
    /// lock, where it could change before SQLite reads it.
    pub(super) wal: bool,
    /// Nothing was at the path: a file there later appeared since, and was not checked.
    pub(super) missing: bool,
}

/// Refuses, without letting SQLite touch it, an existing path that is not a regular file
/// we can read and write, is not SQLite at all, or is plainly another application's database.
///
/// The last check matters because SQLite repairs as it reads: it rolls a hot journal back
/// into the file, so a foreign database must be turned away before SQLite opens it.
/// `locked` says whether the caller holds the write lock: only then can a rollback journal
/// be told from the transient one of a registry that another process is creating.
pub(super) fn check_existing_file(path: &Path, real: &Path, locked: bool) -> Result<Vetted> {
    check_file(path, real, locked, true)
}

/// [`check_existing_file`], opening the file for writing too only when `write`.
/// `real` is the file with its links resolved; `path` names it in errors.
pub(super) fn check_file(path: &Path, real: &Path, locked: bool, write: bool) -> Result<Vetted> {
    let open_err = |e: io::Error| Error::open(path, e);
    let corrupt = |detail: String| Error::Corrupt {
        path: path.to_owned(),
        detail,
    };
    // A file this process has a connection on was checked when it was opened; closing a
    // descriptor of it here would drop that connection's locks (see `IN_USE`). The table
    // stays locked until the descriptor below is closed, so no connection opens meanwhile.
    let in_use = in_use_table();
    let metadata = if write {
        std::fs::symlink_metadata(real)
    } else {
        std::fs::metadata(real)
    };
    if metadata
        .ok()
        .and_then(|m| file_id(&m))
        .is_some_and(|id| in_use.contains_key(&id))
    {
        return Ok(Vetted::default());
    }
    let mut options = OpenOptions::new();
    options.read(true).write(write);
    // Non-blocking, so that a FIFO at the path cannot hang the open or the read.
    // When opening for use, `real` has its links resolved already: one there now is not
    // followed.
    crate::sys::open_flags(&mut options, write, true);
    let file = match options.open(real) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Vetted {
                missing: true,
                ..Vetted::default()
            })
        }
        Err(e) => return Err(open_err(e)),
    };
    let meta = file.metadata().map_err(open_err)?;
    if file_id(&meta).is_some_and(|id| in_use.contains_key(&id)) {
        // The path was switched to a file in use since it was looked at: keep the
        // descriptor open rather than drop the locks on it.
        std::mem::forget(file);
        return Ok(Vetted::default());
    }
    if !meta.is_file() {
        return Err(Error::open_because(
            path,
            "the path is not a regular file; give the path of a registry file",
        ));
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    file.take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(open_err)?;
    if header.is_empty() {
        return Ok(Vetted::default());
    }
    if !header.starts_with(SQLITE_MAGIC) {
        return Err(corrupt("the file is not an SQLite database".into()));
    }
    if header.len() < HEADER_LEN {
        return Err(corrupt("the SQLite header is cut short".into()));
    }
    let app_id = i32::from_be_bytes([header[68], header[69], header[70], header[71]]);
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(corrupt(format!(
            "an SQLite database of another application (application_id {app_id:#x})"
        )));
    }
    // A registry is only ever written in WAL mode, so a rollback journal beside a file that
    // does not yet say it is ours belongs to someone else.
    if locked && app_id == 0 && sibling(real, "-journal").exists() {
        return Err(corrupt(
            "an SQLite database of another application (it has a rollback journal)".into(),
        ));
    }
    Ok(Vetted {
        // A hot journal beside it is rolled back as SQLite first reads the file, and may
        // bring back a page 1 that says otherwise (a switch to WAL mode cut short).
        wal: locked
            && header[18] == 2
            && header[19] == 2
            && std::fs::symlink_metadata(sibling(real, "-journal")).is_err(),
        missing: false,
    })
}
