//! The read-only examination of a registry file behind `PortDaddy::diagnose`.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::schema::{check_demands, identify, schema_supported};
use super::tx::SqlTx;
use super::vet::check_file;
use super::{busy_timeout, open_sql_err};
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::lock::Deadline;
use crate::paths::sibling;
use crate::store::Tx;

/// What [`examine`] found in a registry file, without changing it.
#[derive(Debug)]
pub(crate) struct Examination {
    /// The schema version in the file (`0` for an empty file).
    pub(crate) schema_found: u32,
    /// The journal mode SQLite reports.
    pub(crate) journal_mode: String,
    /// `PRAGMA integrity_check`: `Ok` or the first problem.
    pub(crate) integrity: std::result::Result<(), String>,
    /// [`Error::SchemaTooNew`] when the registry demands a newer reader (its
    /// `min_reader_version`).
    pub(crate) too_new: Option<Error>,
    /// The leases, read when the schema has every column this build reads (it is this
    /// build's or a newer one's) and the registry does not demand a newer reader.
    pub(crate) leases: Option<Result<Vec<Lease>>>,
}

/// Inspects the registry at `path` through a read-only connection: nothing is written,
/// created, rolled back or checkpointed. A file that is no registry of ours, or that SQLite
/// cannot open, is an error.
pub(crate) fn examine(path: &Path, timeout: Duration) -> Result<Examination> {
    let deadline = Deadline::after(timeout);
    check_file(path, path, true, false)?;
    let sql = |e| open_sql_err(path, deadline, e);
    // A read-only connection still creates the `-wal` and `-shm` files of a WAL database
    // that nobody has open, and cannot remove them again. Without a `-wal` file the main
    // file holds the whole registry and changes only once a writer has created one, so it is
    // read as immutable then: no side files, no locks.
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let in_use = sibling(path, "-wal").exists();
    let uri = uri_of(path, !in_use);
    let mut conn = Connection::open_with_flags(&uri, flags).map_err(sql)?;
    // As the store's open does: a full disk fails the examination, it kills no process.
    crate::sys::allocate_wal_index(&conn);
    conn.busy_timeout(busy_timeout(deadline)).map_err(sql)?;
    let schema_found = identify(&conn, path, deadline)?;
    let journal_mode: String = if in_use {
        conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(sql)?
    } else {
        // An immutable connection reports no journal mode of its own; the header says
        // whether the file is in WAL mode (format versions 2 at offsets 18 and 19).
        let mut header = [0u8; 20];
        let wal = std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut header))
            .is_ok_and(|()| header[18] == 2 && header[19] == 2);
        if wal { "wal" } else { "delete" }.to_owned()
    };
    let integrity = conn
        .query_row("PRAGMA integrity_check(1)", [], |r| r.get::<_, String>(0))
        .map_err(|e| e.to_string())
        .and_then(|check| if check == "ok" { Ok(()) } else { Err(check) });
    // The same test of what the registry demands as the open's: what the open refuses is
    // never called fine here.
    let too_new = if schema_found > 0 {
        match check_demands(&conn, path, deadline) {
            Ok(()) => None,
            Err(e @ Error::SchemaTooNew { .. }) => Some(e),
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let leases = (schema_found >= schema_supported() && too_new.is_none()).then(|| {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(sql)?;
        SqlTx::new(&tx, path, deadline).leases(None)
    });
    Ok(Examination {
        schema_found,
        journal_mode,
        integrity,
        too_new,
        leases,
    })
}

/// A `file:` URI for `path` that SQLite reads exactly as given, `immutable` if asked.
fn uri_of(path: &Path, immutable: bool) -> String {
    let mut uri = String::from("file:");
    let text = path.to_string_lossy();
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                uri.push(b as char)
            }
            _ => uri.push_str(&format!("%{b:02X}")),
        }
    }
    if immutable {
        uri.push_str("?immutable=1");
    }
    uri
}
