//! The SQLite store: one registry file shared by every process of the user.
//!
//! # Open sequence
//!
//! Everything after creating the lock file `<registry>.lock` (mode `0600`, its directory
//! `0700`) happens under the write lock, so no process sees a registry half created.
//!
//! 0. The path is resolved to the real file, through links of ours or root's only, and every
//!    side file (the lock file, the owners directory, SQLite's `-wal`, `-shm` and
//!    `-journal`) is named after the real file; the files already there are checked before
//!    the lock file is created, again under the lock, and once more after SQLite has opened
//!    its side files (see the `paths` module: anything another user planted or may change is
//!    refused). SQLite opens the real file with `SQLITE_OPEN_NOFOLLOW` and its side files
//!    with `O_NOFOLLOW`; in a directory others may write (sticky), `-wal` and `-shm` are
//!    created by us (`O_EXCL`, `0600`) before SQLite opens them. SQLite removes them again
//!    when the last connection closes, so this runs at every open.
//! 1. The path is checked before SQLite sees it: anything but a regular file we can read and
//!    write, a non-empty file without the SQLite header, or one whose header names another
//!    application is refused, and nothing is written. (The plainest of these are refused
//!    even before the lock file is created.)
//! 2. A missing file is created empty with mode `0600`.
//! 3. The database is inspected read-only: it must be empty (new) or
//!    carry our `application_id`; its `user_version` must not be newer than this build knows;
//!    `PRAGMA quick_check` must pass. Only then is anything written: WAL mode, and the pending
//!    migrations in one transaction.
//!
//! # Locking and durability
//!
//! Every write transaction first takes an exclusive `flock` on `<registry>.lock` (see the
//! `lock` module), then runs `BEGIN IMMEDIATE … COMMIT`. Waiting writers block in the
//! kernel's lock queue and are woken the moment the lock is free, instead of sleeping in
//! whole milliseconds as SQLite's busy handler does, which let one busy writer starve the
//! others. (The kernel does not promise first-come-first-served; it promises no sleeping
//! through free moments.) SQLite's busy handler is left for the rare moments when a reader
//! meets a checkpoint. Reads (listing) take no file lock: in WAL mode they see
//! a consistent snapshot while a writer works.
//!
//! The journal is WAL with `synchronous=NORMAL`: a commit is atomic and survives a crash of
//! any process, but the last transactions before a power loss or kernel crash may be lost.
//! Leases are ephemeral (a reboot kills every owner anyway), so the fsync per claim that
//! `synchronous=FULL` costs buys nothing here.
//!
//! WAL needs shared memory that works across processes, so the registry must live on a local
//! filesystem, not on NFS or another network mount.
//!
//! # A registry deleted or replaced under open handles
//!
//! The registry file is anchored at open, by path, under the write lock (on Linux with an
//! `O_PATH` descriptor, which unlike any other descriptor of our own does not drop SQLite's
//! POSIX locks when closed). Every write checks under the lock, with one `fstat`, that the
//! file is still linked, and every read checks before it reads; when it is not (deleted, or
//! another file put in its place), the store opens the file the path names now through the
//! same open sequence (the path resolved, planted files refused) and tells the caller
//! ([`Opened::Anew`]), which records its leases there again. A path that leads to another
//! real file by then (a symbolic link on it changed) is an error: the handle judges owners
//! by the lock files beside the file it first opened. A registry renamed or moved elsewhere is still linked and goes unnoticed (where
//! there is no `O_PATH`, the path's inode is compared instead, which notices that too).
//! Closing the old connection is safe: SQLite does not checkpoint on close (nor delete `-wal` and
//! `-shm` by name) once the path no longer names its file. A registry created where the
//! main file is missing first removes `-wal` and `-shm` left of a deleted one, on which
//! SQLite would otherwise fail with "disk I/O error".
//!
//! # Schema
//!
//! [`MIGRATIONS`] is an append-only list; `PRAGMA user_version` counts how many have run.
//! Never edit or reorder an entry: add a new one.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::config::DbConfig;
use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior,
};

use super::{first_gap, held_ports, Counter, Tx};
use crate::error::{Error, Result};
use crate::lease::{from_millis, to_millis, Lease, Owner, Protocol};
use crate::lock::{Anchor, Deadline, FileLock};
use crate::paths::{self, sibling};
use crate::range::PortRange;

/// Marks a database as a portdaddy registry (`PRAGMA application_id`): ASCII "PtDy".
const APPLICATION_ID: i32 = 0x5074_4479;

/// The schema, one migration per entry; entry `i` takes `user_version` from `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: leases, the sticky port of each name, and small settings such as the search cursor.
    "CREATE TABLE leases (
        id          INTEGER PRIMARY KEY,
        port        INTEGER NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
        name        TEXT    NOT NULL,
        protocol    INTEGER NOT NULL,
        owner_pid   INTEGER,
        owner_start INTEGER,
        owner_boot  TEXT,
        acquired_at INTEGER NOT NULL,
        expires_at  INTEGER
    ) STRICT;
    CREATE TABLE names (
        name    TEXT PRIMARY KEY,
        port    INTEGER NOT NULL,
        used_at INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX names_port ON names (port);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;",
    // 2: blocks of consecutive ports; a lease holds `block_len` ports from `port` on.
    "ALTER TABLE leases ADD COLUMN block_len INTEGER NOT NULL DEFAULT 1
        CHECK (block_len BETWEEN 1 AND 65535);",
    // 3: the PID namespace in which `owner_pid` is meaningful, and the owner's lock file in
    // `<registry>.owners/`, by which other namespaces tell whether it lives.
    "ALTER TABLE leases ADD COLUMN owner_ns INTEGER;
     ALTER TABLE leases ADD COLUMN owner_lock TEXT;",
    // 4: leases stored in port order (the port is the key), so that a claim writes one page
    // of the table instead of a table page and an index page, and the search for a vacant
    // port reads each lease's `port` and `block_len` in one pass, without a lookup per row.
    "CREATE TABLE leases_by_port (
        port        INTEGER PRIMARY KEY CHECK (port BETWEEN 1 AND 65535),
        id          INTEGER NOT NULL,
        name        TEXT    NOT NULL,
        protocol    INTEGER NOT NULL,
        owner_pid   INTEGER,
        owner_start INTEGER,
        owner_boot  TEXT,
        acquired_at INTEGER NOT NULL,
        expires_at  INTEGER,
        block_len   INTEGER NOT NULL DEFAULT 1 CHECK (block_len BETWEEN 1 AND 65535),
        owner_ns    INTEGER,
        owner_lock  TEXT
    ) STRICT, WITHOUT ROWID;
    INSERT INTO leases_by_port (port, id, name, protocol, owner_pid, owner_start, owner_boot,
                                acquired_at, expires_at, block_len, owner_ns, owner_lock)
        SELECT port, id, name, protocol, owner_pid, owner_start, owner_boot,
               acquired_at, expires_at, block_len, owner_ns, owner_lock
        FROM leases;
    DROP TABLE leases;
    ALTER TABLE leases_by_port RENAME TO leases;",
    // 5: the time namespace through which `owner_start` was read (start times read through
    // another one are not compared), and the PID namespaces above `owner_ns` (space-separated,
    // nearest first), which tell who sees every process of the owner's namespace.
    "ALTER TABLE leases ADD COLUMN owner_time_ns INTEGER;
     ALTER TABLE leases ADD COLUMN owner_ns_parents TEXT;",
];

/// How many prepared statements a connection keeps.
const STATEMENT_CACHE: usize = 64;

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Length of the SQLite file header.
const HEADER_LEN: usize = 100;

/// The columns of a lease, in the order [`SqlTx::lease_from_row`] reads them.
macro_rules! lease_columns {
    () => {
        "id, port, name, protocol, owner_pid, owner_start, owner_boot, acquired_at, expires_at, \
         block_len, owner_ns, owner_lock, owner_time_ns, owner_ns_parents"
    };
}

/// The lease starting nearest at or below `?1`: the only one that can hold port `?1`, since
/// leases never overlap.
const SELECT_LEASE_AT_OR_BELOW: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM leases WHERE port <= ?1 ORDER BY port DESC LIMIT 1"
);
const SELECT_LEASES_IN: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM leases WHERE port <= ?2 AND port + block_len > ?1 ORDER BY acquired_at, id"
);
const INSERT_LEASE: &str = concat!(
    "INSERT INTO leases (",
    lease_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
);

#[derive(Debug)]
pub(crate) struct SqliteStore {
    path: PathBuf,
    /// `path` with its links resolved, beside which every side file lives.
    real: PathBuf,
    conn: Connection,
    lock: FileLock,
    /// Tells whether the registry file the connection has open was deleted or replaced.
    anchor: Anchor,
    /// Tells whether the `-shm` index of the write-ahead log that the connection has mapped
    /// was deleted or replaced (see [`shm_removed`](Self::shm_removed)); `None` if there was
    /// none to anchor.
    shm: Option<Anchor>,
    /// How the store was opened, to open the path again if its file is replaced.
    shared_tmp: bool,
    /// Declared after `conn`, so that the file is marked in use until the connection closed.
    _in_use: InUse,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // A connection whose `-shm` was removed would checkpoint through its stale index
        // when it closes, and then delete the write-ahead log by name, with every lease
        // recorded through the new index since: it must close without a checkpoint.
        if shm_gone(&self.shm) {
            if let Err(e) = self
                .conn
                .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "could not keep a registry whose -shm was removed from a checkpoint on close");
            }
        }
    }
}

/// Whether the `-shm` file anchored in `shm` was deleted or replaced. A check that fails
/// says nothing, and the store goes on as before.
fn shm_gone(shm: &Option<Anchor>) -> bool {
    matches!(shm.as_ref().map(Anchor::is_gone), Some(Ok(true)))
}

/// The registry's `-shm` was removed under the connection (a cleaner, or `rm` of the side
/// files while the registry file stayed). The connection's mapped index of the write-ahead
/// log is then no longer the one other processes use: writing through it would overwrite
/// what they wrote, and SQLite cannot map another while this process has the file open.
/// The store refuses to write (and to read a stale view) instead; its leases are reclaimed
/// when the process exits.
fn shm_removed_err(path: &Path) -> Error {
    Error::Registry {
        path: path.to_owned(),
        source: "its -shm file was deleted while this process had the registry open, and \
                 this process can no longer write it without overwriting the leases of \
                 others; restart the process (its leases are reclaimed when it exits)"
            .into(),
    }
}

/// Whether the file a write ran on is the one the store had open before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// The same file as the previous operation.
    Same,
    /// The path no longer named the file the store had open (it was deleted, or replaced
    /// with another): the store opened the file the path names now, creating a new registry
    /// if there was none. Nothing written through the store before is in it.
    Anew {
        /// The leases of the file the store had open, read just before it was closed, so
        /// that a lease others released there is not taken for one still held; `None` if
        /// that file could not be read.
        left_behind: Option<Vec<Lease>>,
    },
}

/// The registry files this process has an SQLite connection on, by (device, inode), and
/// how many.
///
/// SQLite locks its files with POSIX locks, which the kernel drops for the whole process
/// when any one descriptor of the file is closed. A registry file this process uses must
/// therefore never be opened and closed again beside SQLite ([`check_file`]): another
/// process would then take itself for the last one using the registry, remove its
/// write-ahead log under this one, and the two would lease from different logs.
static IN_USE: std::sync::Mutex<std::collections::BTreeMap<(u64, u64), usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn in_use_table() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<(u64, u64), usize>> {
    IN_USE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The (device, inode) of a file, where the platform has POSIX locks.
#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// A registry file marked in [`IN_USE`] while this process has a connection on it.
#[derive(Debug)]
struct InUse(Option<(u64, u64)>);

impl InUse {
    /// Marks the file at `real` in use, before SQLite opens it.
    fn mark(real: &Path) -> io::Result<Self> {
        let id = file_id(&std::fs::symlink_metadata(real)?);
        if let Some(id) = id {
            *in_use_table().entry(id).or_insert(0) += 1;
        }
        Ok(Self(id))
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let Some(id) = self.0 else { return };
        let mut table = in_use_table();
        if let Some(count) = table.get_mut(&id) {
            *count -= 1;
            if *count == 0 {
                table.remove(&id);
            }
        }
    }
}

impl SqliteStore {
    pub(crate) fn open(path: &Path, shared_tmp: bool, timeout: Duration) -> Result<Self> {
        let deadline = Deadline::after(timeout);
        let open_err = |e: io::Error| Error::Open {
            path: path.to_owned(),
            source: e.into(),
        };
        if path.file_name().is_none() {
            return Err(open_err(io::Error::other(
                "the path names no file; give the path of a registry file",
            )));
        }
        if path.is_dir() {
            return Err(open_err(io::Error::other(
                "the path is a directory; give a file path",
            )));
        }
        if shared_tmp {
            paths::prepare_shared_dir(path)?;
        }
        // Every side file is named after the real file, as SQLite names its own, so that one
        // registry has one lock and one owners directory however it is reached.
        let real = paths::resolve(path)?;
        paths::check_name_length(path, &real)?;
        paths::prepare_dirs(path, &real)?;
        // What a registry being created by another process cannot look like, and files
        // planted by others, are refused at once, without even a lock file beside them.
        paths::check_files(path, &real)?;
        check_existing_file(path, &real, false)?;
        let mut lock = FileLock::open(&lock_path(&real)).map_err(|e| lock_err(path, e))?;
        let (conn, anchor, shm, in_use) = {
            // The whole sequence runs under the write lock, so no process ever inspects a
            // registry that another is still creating or migrating.
            // The lock file may be opened again there (if it was replaced meanwhile), with
            // the same refusals.
            let _held = lock
                .lock(deadline)
                .map_err(|e| lock_err(path, e))?
                .ok_or_else(|| Error::LockTimeout {
                    path: path.to_owned(),
                    waited: deadline.elapsed(),
                })?;
            // Again under the lock: the files SQLite is about to open are as they were
            // checked, since every process of ours checks under this lock too.
            paths::check_files(path, &real)?;
            check_existing_file(path, &real, true)?;
            remove_orphaned_side_files(&real).map_err(open_err)?;
            paths::create_private_file(&real).map_err(open_err)?;
            // Before SQLite locks it: from now on nothing of this process closes it again.
            let in_use = InUse::mark(&real).map_err(open_err)?;
            let (created, journal) = if paths::dir_open_to_others(&real) {
                let created = paths::precreate_side_files(&real).map_err(open_err)?;
                let journal = paths::precreate_journal(&real).map_err(open_err)?;
                // What another user put there after the check, before ours were made, is
                // refused before SQLite opens it.
                if let Err(e) = paths::check_files(path, &real) {
                    paths::remove_created(journal);
                    paths::remove_created(created);
                    return Err(e);
                }
                (created, journal)
            } else {
                (Vec::new(), Vec::new())
            };
            let opened = open_checked(path, &real, deadline)
                .and_then(|conn| paths::check_files(path, &real).map(|()| conn));
            // In WAL mode no journal is written: ours only kept others from planting one
            // for SQLite's first read.
            paths::remove_created(journal);
            let conn = match opened {
                Ok(conn) => conn,
                Err(e) => {
                    // Beside a file that is no registry of ours, nothing of ours uses them.
                    // Beside one of ours (a newer schema, say) a reader may have opened them
                    // meanwhile, and removing them would split its WAL from the next one's:
                    // they stay then, as SQLite would leave them.
                    if matches!(e, Error::Corrupt { .. }) {
                        paths::remove_created(created);
                    }
                    return Err(e);
                }
            };
            // The file SQLite has open, anchored by path under the lock (see `Anchor` for why
            // that is no ordinary descriptor).
            let anchor = Anchor::at(&real).map_err(open_err)?;
            // SQLite mapped it on its first read, above, under the lock.
            let shm = match Anchor::at(&sibling(&real, "-shm")) {
                Ok(shm) => Some(shm),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(open_err(e)),
            };
            (conn, anchor, shm, in_use)
        };
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| open_sql_err(path, deadline, e))?;
        // Room for every statement of the store (rusqlite keeps 16 by default), so none is
        // parsed again on the hot path.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        tracing::debug!(path = %path.display(), "opened port registry");
        Ok(Self {
            path: path.to_owned(),
            real,
            conn,
            lock,
            anchor,
            shm,
            shared_tmp,
            _in_use: in_use,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The registry file with its links resolved, beside which every side file lives.
    pub(crate) fn real_path(&self) -> &Path {
        &self.real
    }

    /// Runs `f` as one write transaction under the file lock, giving up at `deadline`.
    ///
    /// Under the lock, the file the store has open is checked to be still linked. If it is
    /// not (the registry was deleted or replaced), the store opens the file the path
    /// names now, as [`open`](Self::open) does, and `f` is told so with [`Opened::Anew`]:
    /// it runs in the first transaction on that file.
    pub(crate) fn write<R>(
        &mut self,
        deadline: Deadline,
        f: impl FnOnce(&mut dyn Tx, Opened) -> Result<R>,
    ) -> Result<R> {
        let mut opened = Opened::Same;
        // A registry replaced again while it was being opened anew is opened once more; a
        // path that keeps changing under us is an error rather than a loop.
        for _ in 0..3 {
            {
                let Self {
                    path,
                    conn,
                    lock,
                    anchor,
                    shm,
                    ..
                } = self;
                let registry_err = |e: io::Error| Error::Registry {
                    path: path.clone(),
                    source: e.into(),
                };
                match lock.lock(deadline) {
                    Ok(Some(_held)) => {
                        if !anchor.is_gone().map_err(registry_err)? {
                            if shm_gone(shm) {
                                return Err(shm_removed_err(path));
                            }
                            return run_write(conn, path, deadline, opened, f);
                        }
                    }
                    Ok(None) => {
                        return Err(Error::LockTimeout {
                            path: path.clone(),
                            waited: deadline.elapsed(),
                        })
                    }
                    // The lock file cannot be opened again, say because its directory went
                    // with the registry: then the open below makes both anew.
                    Err(e) => {
                        if !anchor.is_gone().map_err(registry_err)? {
                            // Opened again with the refusals of an open: name a refused file.
                            return Err(refusal(path, e).unwrap_or_else(registry_err));
                        }
                    }
                }
            }
            // What the file we had open says last, before it is closed: read once, from the
            // file this store's writes went to, not from one replaced again meanwhile.
            let left_behind = match opened {
                Opened::Same => self.leases_left_behind(deadline),
                Opened::Anew { left_behind } => left_behind,
            };
            self.reopen(deadline)?;
            opened = Opened::Anew { left_behind };
        }
        Err(Error::Registry {
            path: self.path.clone(),
            source: "the registry file was deleted or replaced again each time it was opened \
                     anew"
                .into(),
        })
    }

    /// The leases of the file the store has open (deleted or replaced), read through its
    /// connection, or `None` if it cannot be read: then there is no telling what others
    /// released in it.
    fn leases_left_behind(&mut self, deadline: Deadline) -> Option<Vec<Lease>> {
        match self.read(deadline, |tx| tx.leases(None)) {
            Ok(leases) => Some(leases),
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e,
                    "could not read the leases of the replaced registry file");
                None
            }
        }
    }

    /// Opens the file the path names now in place of the one the store has open.
    fn reopen(&mut self, deadline: Deadline) -> Result<()> {
        tracing::warn!(path = %self.path.display(),
            "the port registry file was deleted or replaced; opening the one now at its path");
        let timeout = deadline.remaining().unwrap_or(Duration::MAX);
        let fresh = Self::open(&self.path, self.shared_tmp, timeout)?;
        // The handle judges owners by the lock files beside the file it first opened: a path
        // that leads elsewhere now (a symbolic link changed) is another registry.
        let (was, now) = (self.real_path(), fresh.real_path());
        if now != was {
            return Err(Error::Registry {
                path: self.path.clone(),
                source: format!(
                    "the registry file was deleted, and the path now leads to {} instead of \
                     {}; open the registry again",
                    now.display(),
                    was.display()
                )
                .into(),
            });
        }
        // Closing the old connection does not touch the new registry: SQLite checkpoints on
        // close (and then deletes `<path>-wal` and `<path>-shm` by name) only while the path
        // still names the file it has open, which it checks itself. The `replaced` tests
        // hold it to that.
        drop(std::mem::replace(self, fresh));
        Ok(())
    }

    /// Whether the file the store has open is still the registry at its path (still linked;
    /// see [`Anchor`]).
    ///
    /// A registry whose `-shm` was removed under the connection is an error (see
    /// [`shm_removed_err`]).
    pub(crate) fn is_current(&self) -> Result<bool> {
        match self.anchor.is_gone() {
            Ok(false) if shm_gone(&self.shm) => Err(shm_removed_err(&self.path)),
            Ok(gone) => Ok(!gone),
            Err(e) => Err(Error::Registry {
                path: self.path.clone(),
                source: e.into(),
            }),
        }
    }

    /// Runs `f` on a consistent snapshot, without the file lock.
    ///
    /// The caller checks [`is_current`](Self::is_current) first if it needs to: a store whose
    /// file was replaced reads the old file.
    pub(crate) fn read<R>(
        &mut self,
        deadline: Deadline,
        f: impl FnOnce(&mut dyn Tx) -> Result<R>,
    ) -> Result<R> {
        let Self { path, conn, .. } = self;
        let sql = |e| sql_err(path, deadline, e);
        conn.busy_timeout(busy_timeout(deadline)).map_err(sql)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(sql)?;
        f(&mut SqlTx {
            tx: &tx,
            path,
            deadline,
        })
    }
}

/// The transaction of [`SqliteStore::write`], once the lock is held on the right file.
fn run_write<R>(
    conn: &mut Connection,
    path: &Path,
    deadline: Deadline,
    opened: Opened,
    f: impl FnOnce(&mut dyn Tx, Opened) -> Result<R>,
) -> Result<R> {
    let sql = |e| sql_err(path, deadline, e);
    conn.busy_timeout(busy_timeout(deadline)).map_err(sql)?;
    // BEGIN and COMMIT as cached statements: parsed once per connection, not per call.
    let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
    run("BEGIN IMMEDIATE").map_err(sql)?;
    let _open = RollbackUnlessCommitted(conn);
    let value = f(
        &mut SqlTx {
            tx: conn,
            path,
            deadline,
        },
        opened,
    )?;
    run("COMMIT").map_err(sql)?;
    Ok(value)
}

/// Removes `<path>-wal` and `<path>-shm` when `path` itself is missing: they are what is left
/// of a registry deleted while processes had it open (those keep their open files), and
/// SQLite would fail with "disk I/O error" on a new registry beside them. The caller holds
/// the write lock and is about to create the file.
fn remove_orphaned_side_files(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        _ => return Ok(()),
    }
    for suffix in ["-wal", "-shm"] {
        let side = sibling(path, suffix);
        match std::fs::symlink_metadata(&side) {
            Ok(meta) if !meta.is_dir() => {
                tracing::warn!(path = %side.display(),
                    "removing what is left of a deleted registry beside the new one");
                match std::fs::remove_file(&side) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The PID namespaces stored in `owner_ns_parents`: inode numbers separated by spaces;
/// `None` if the text is anything else.
fn parse_parents(text: &str) -> Option<Vec<u64>> {
    text.split_ascii_whitespace()
        .map(|n| n.parse().ok())
        .collect()
}

/// What is left of `deadline`, as far as SQLite's busy timeout (an `int` of milliseconds)
/// can express it.
fn busy_timeout(deadline: Deadline) -> Duration {
    let most = Duration::from_millis(i32::MAX as u64);
    deadline.remaining().map_or(most, |left| left.min(most))
}

/// Opens the connection, inspects the file read-only, then sets WAL mode and migrates.
/// The caller holds the write lock.
/// `real` is the registry file with its links resolved; `path` names it in errors.
fn open_checked(path: &Path, real: &Path, deadline: Deadline) -> Result<Connection> {
    let sql = |e| open_sql_err(path, deadline, e);
    // The links are resolved: a link in the path now was put there since, and is not
    // followed.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let mut conn = Connection::open_with_flags(real, flags).map_err(sql)?;
    conn.busy_timeout(busy_timeout(deadline)).map_err(sql)?;
    // Closing the last connection checkpoints the WAL into the file: not before we know the
    // file is ours.
    let guard_wal = sibling(real, "-wal").exists();
    if guard_wal {
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(sql)?;
    }
    inspect(&conn, path, deadline)?;
    if guard_wal {
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)
            .map_err(sql)?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), %mode, "the registry could not switch to WAL mode");
    }
    migrate(&mut conn).map_err(sql)?;
    Ok(conn)
}

fn lock_path(path: &Path) -> PathBuf {
    sibling(path, ".lock")
}

/// Maps a failure to open the lock file: a refusal of the file when it is one.
fn lock_err(path: &Path, e: io::Error) -> Error {
    refusal(path, e).unwrap_or_else(|e| Error::Open {
        path: path.to_owned(),
        source: e.into(),
    })
}

/// [`Error::Refused`] when `e` is a refusal of the lock file; else `e` back.
fn refusal(path: &Path, e: io::Error) -> std::result::Result<Error, io::Error> {
    e.downcast::<crate::lock::Refusal>()
        .map(|refusal| Error::Refused {
            path: path.to_owned(),
            file: refusal.file,
            reason: refusal.reason,
            advice: paths::ADVICE_OWN,
        })
}

/// Refuses, without letting SQLite touch it, an existing path that is not a regular file
/// we can read and write, is not SQLite at all, or is plainly another application's database.
///
/// The last check matters because SQLite repairs as it reads: it rolls a hot journal back
/// into the file, so a foreign database must be turned away before SQLite opens it.
/// `locked` says whether the caller holds the write lock: only then can a rollback journal
/// be told from the transient one of a registry that another process is creating.
fn check_existing_file(path: &Path, real: &Path, locked: bool) -> Result<()> {
    check_file(path, real, locked, true)
}

/// [`check_existing_file`], opening the file for writing too only when `write`.
/// `real` is the file with its links resolved; `path` names it in errors.
fn check_file(path: &Path, real: &Path, locked: bool, write: bool) -> Result<()> {
    let open_err = |e: io::Error| Error::Open {
        path: path.to_owned(),
        source: e.into(),
    };
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
        return Ok(());
    }
    let mut options = OpenOptions::new();
    options.read(true).write(write);
    // Non-blocking, so that a FIFO at the path cannot hang the open or the read.
    // When opening for use, `real` has its links resolved already: one there now is not
    // followed.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NONBLOCK | if write { libc::O_NOFOLLOW } else { 0 },
    );
    let file = match options.open(real) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(open_err(e)),
    };
    let meta = file.metadata().map_err(open_err)?;
    if file_id(&meta).is_some_and(|id| in_use.contains_key(&id)) {
        // The path was switched to a file in use since it was looked at: keep the
        // descriptor open rather than drop the locks on it.
        std::mem::forget(file);
        return Ok(());
    }
    if !meta.is_file() {
        return Err(open_err(io::Error::other(
            "the path is not a regular file; give the path of a registry file",
        )));
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    file.take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(open_err)?;
    if header.is_empty() {
        return Ok(());
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
    Ok(())
}

/// Read-only checks: is this an empty database or one of ours, of a schema we know, intact?
fn inspect(conn: &Connection, path: &Path, deadline: Deadline) -> Result<()> {
    let corrupt = |detail: String| Error::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let query = |sql: &str| -> Result<i64> {
        conn.query_row(sql, [], |r| r.get(0))
            .map_err(|e| open_sql_err(path, deadline, e))
    };
    let tables = query("SELECT count(*) FROM sqlite_schema")?;
    let app_id = query("PRAGMA application_id")?;
    let version = query("PRAGMA user_version")?;
    let fresh = tables == 0 && app_id == 0 && version == 0;
    if !fresh && app_id != i64::from(APPLICATION_ID) {
        return Err(corrupt(format!(
            "an SQLite database of another application (application_id {app_id:#x})"
        )));
    }
    let supported = MIGRATIONS.len() as u32;
    let Ok(found) = u32::try_from(version) else {
        return Err(corrupt(format!(
            "its schema version {version} is not valid"
        )));
    };
    if found > supported {
        return Err(Error::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported,
        });
    }
    if found > 0 {
        let ours = query(
            "SELECT count(*) FROM sqlite_schema
             WHERE type = 'table' AND name IN ('leases', 'names', 'meta')",
        )?;
        if ours != 3 {
            return Err(corrupt("tables of the registry are missing".into()));
        }
    }
    let check: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(|e| open_sql_err(path, deadline, e))?;
    if check != "ok" {
        return Err(corrupt(format!("integrity check failed: {check}")));
    }
    Ok(())
}

/// Applies the pending migrations in one transaction.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version < MIGRATIONS.len() {
        for migration in &MIGRATIONS[version..] {
            tx.execute_batch(migration)?;
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    }
    tx.commit()
}

/// Maps an SQLite error met while opening: as [`sql_err`], except that other failures mean
/// the registry could not be opened.
fn open_sql_err(path: &Path, deadline: Deadline, e: rusqlite::Error) -> Error {
    match sql_err(path, deadline, e) {
        Error::Registry { path, source } => Error::Open { path, source },
        other => other,
    }
}

/// Maps an SQLite error met while using an open registry.
///
/// SQLite reports a file it could not open (the database, its `-wal`, `-shm` or a temporary
/// file) as "unable to open database file", whatever the reason; when this process cannot
/// open the descriptors a connection needs at that moment, the reason is named instead
/// (see the `descriptors` module).
fn sql_err(path: &Path, deadline: Deadline, e: rusqlite::Error) -> Error {
    let code = e.sqlite_error_code();
    if code == Some(ErrorCode::CannotOpen) {
        use crate::descriptors::{lacking, out_of_descriptors, SQLITE_NEEDS};
        if let Some(error) = lacking(SQLITE_NEEDS) {
            return out_of_descriptors(path, format!("SQLite: {e}"), error);
        }
    }
    match code {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => Error::Corrupt {
            path: path.to_owned(),
            detail: e.to_string(),
        },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::LockTimeout {
            path: path.to_owned(),
            waited: deadline.elapsed(),
        },
        _ => Error::Registry {
            path: path.to_owned(),
            source: e.into(),
        },
    }
}

/// Rolls back the connection's open transaction when dropped (an error or a panic came
/// before the commit); does nothing after a commit.
struct RollbackUnlessCommitted<'a>(&'a Connection);

impl Drop for RollbackUnlessCommitted<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            if let Err(error) = self.0.execute_batch("ROLLBACK") {
                tracing::warn!(%error, "could not roll back a registry transaction");
            }
        }
    }
}

/// One transaction: the connection, inside `BEGIN … COMMIT`.
struct SqlTx<'a> {
    tx: &'a Connection,
    path: &'a Path,
    deadline: Deadline,
}

impl<'t> SqlTx<'t> {
    /// The first column of `rows` as ports, read lazily so that a search stops at the first
    /// gap instead of loading every row.
    fn port_column<'a, 'r>(
        &'a self,
        rows: &'a mut rusqlite::Rows<'r>,
    ) -> impl Iterator<Item = Result<u16>> + use<'a, 'r, 't> {
        std::iter::from_fn(move || match rows.next() {
            Ok(Some(row)) => Some(row.get::<_, u16>(0).map_err(|e| self.err(e))),
            Ok(None) => None,
            Err(e) => Some(Err(self.err(e))),
        })
    }

    /// The first two columns of `rows` as `(first port, block length)`, read lazily.
    fn block_column<'a, 'r>(
        &'a self,
        rows: &'a mut rusqlite::Rows<'r>,
    ) -> impl Iterator<Item = Result<(u16, u16)>> + use<'a, 'r, 't> {
        std::iter::from_fn(move || match rows.next() {
            Ok(Some(row)) => Some(
                row.get::<_, u16>(0)
                    .and_then(|port| Ok((port, row.get::<_, u16>(1)?)))
                    .map_err(|e| self.err(e)),
            ),
            Ok(None) => None,
            Err(e) => Some(Err(self.err(e))),
        })
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        sql_err(self.path, self.deadline, e)
    }

    fn lease_from_row(&self, row: &Row<'_>) -> rusqlite::Result<Result<Lease>> {
        let id: i64 = row.get(0)?;
        let port: i64 = row.get(1)?;
        let protocol: i64 = row.get(3)?;
        let pid: Option<i64> = row.get(4)?;
        let start: Option<i64> = row.get(5)?;
        let boot: Option<String> = row.get(6)?;
        let expires: Option<i64> = row.get(8)?;
        let block_len: i64 = row.get(9)?;
        let namespace: Option<i64> = row.get(10)?;
        let lock: Option<String> = row.get(11)?;
        let time_namespace: Option<i64> = row.get(12)?;
        let parents: Option<String> = row.get(13)?;
        let bad = |what: &str| Error::Corrupt {
            path: self.path.to_owned(),
            detail: format!("lease {id} has an invalid {what}"),
        };
        let port = match u16::try_from(port) {
            Ok(p) => p,
            Err(_) => return Ok(Err(bad("port"))),
        };
        let Some(protocol) = Protocol::from_code(protocol) else {
            return Ok(Err(bad("protocol")));
        };
        let block_len = match u16::try_from(block_len) {
            Ok(n) if n >= 1 && u32::from(port) + u32::from(n) - 1 <= u32::from(u16::MAX) => n,
            _ => return Ok(Err(bad("block length"))),
        };
        let parents = match parents.as_deref().map(parse_parents) {
            None => None,
            Some(Some(parents)) => Some(parents),
            Some(None) => return Ok(Err(bad("owner namespace"))),
        };
        let owner = match (pid, start) {
            (Some(pid), Some(start)) => match (u32::try_from(pid), u64::try_from(start)) {
                (Ok(pid), Ok(start)) => Some(
                    Owner::new(pid, start, boot.unwrap_or_default())
                        .in_namespace(namespace.map(|ns| ns as u64))
                        .with_lock(lock)
                        .in_time_namespace(time_namespace.map(|ns| ns as u64))
                        .with_namespace_parents(parents),
                ),
                _ => return Ok(Err(bad("owner"))),
            },
            _ => None,
        };
        Ok(Ok(Lease {
            id: id as u64,
            port,
            block_len,
            name: row.get(2)?,
            protocol,
            owner,
            acquired_at: from_millis(row.get(7)?),
            expires_at: expires.map(from_millis),
        }))
    }
}

impl Tx for SqlTx<'_> {
    fn lease_on(&mut self, port: u16) -> Result<Option<Lease>> {
        let mut stmt = self
            .tx
            .prepare_cached(SELECT_LEASE_AT_OR_BELOW)
            .map_err(|e| self.err(e))?;
        let nearest = stmt
            .query_row([port], |row| self.lease_from_row(row))
            .optional()
            .map_err(|e| self.err(e))?
            .transpose()?;
        Ok(nearest.filter(|l| l.covers(port)))
    }

    fn remembered_port(&mut self, name: &str) -> Result<Option<u16>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT port FROM names WHERE name = ?1")
            .map_err(|e| self.err(e))?;
        stmt.query_row([name], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    fn first_vacant(&mut self, from: u16, to: u16, avoid_remembered: bool) -> Result<Option<u16>> {
        // From the lease starting nearest at or below `from`, which may be a block holding it.
        let mut leased = self
            .tx
            .prepare_cached(
                "SELECT port, block_len FROM leases
                 WHERE port >= coalesce((SELECT max(port) FROM leases WHERE port <= ?1), 0)
                   AND port <= ?2
                 ORDER BY port",
            )
            .map_err(|e| self.err(e))?;
        let mut leased_rows = leased.query(params![from, to]).map_err(|e| self.err(e))?;
        let leased_iter = held_ports(self.block_column(&mut leased_rows));
        if !avoid_remembered {
            return first_gap(from, to, leased_iter, std::iter::empty());
        }
        let mut named = self
            .tx
            .prepare_cached("SELECT port FROM names WHERE port BETWEEN ?1 AND ?2 ORDER BY port")
            .map_err(|e| self.err(e))?;
        let mut named_rows = named.query(params![from, to]).map_err(|e| self.err(e))?;
        let named_iter = self.port_column(&mut named_rows);
        first_gap(from, to, leased_iter, named_iter)
    }

    fn insert_lease(&mut self, lease: &Lease) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached(INSERT_LEASE)
            .map_err(|e| self.err(e))?;
        let owner = lease.owner.as_ref();
        stmt.execute(params![
            lease.id as i64,
            lease.port,
            lease.name,
            lease.protocol.code(),
            owner.map(Owner::pid),
            owner.map(|o| o.start_time() as i64),
            owner.map(Owner::boot_id),
            to_millis(lease.acquired_at),
            lease.expires_at.map(to_millis),
            lease.block_len,
            owner.and_then(Owner::pid_namespace).map(|ns| ns as i64),
            owner.and_then(Owner::lock_name),
            owner.and_then(Owner::time_namespace).map(|ns| ns as i64),
            owner
                .and_then(Owner::namespace_parents)
                .map(|parents| parents
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")),
        ])
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn remember(&mut self, name: &str, port: u16, at: SystemTime) -> Result<()> {
        let mut forget = self
            .tx
            .prepare_cached("DELETE FROM names WHERE port = ?1 AND name <> ?2")
            .map_err(|e| self.err(e))?;
        forget
            .execute(params![port, name])
            .map_err(|e| self.err(e))?;
        let mut upsert = self
            .tx
            .prepare_cached(
                "INSERT INTO names (name, port, used_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET port = excluded.port, used_at = excluded.used_at",
            )
            .map_err(|e| self.err(e))?;
        upsert
            .execute(params![name, port, to_millis(at)])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn delete_lease(&mut self, port: u16, id: u64) -> Result<bool> {
        let mut stmt = self
            .tx
            .prepare_cached("DELETE FROM leases WHERE port = ?1 AND id = ?2")
            .map_err(|e| self.err(e))?;
        Ok(stmt
            .execute(params![port, id as i64])
            .map_err(|e| self.err(e))?
            > 0)
    }

    fn delete_port(&mut self, port: u16) -> Result<bool> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "DELETE FROM leases
                 WHERE port = (SELECT max(port) FROM leases WHERE port <= ?1)
                   AND port + block_len > ?1",
            )
            .map_err(|e| self.err(e))?;
        Ok(stmt.execute([port]).map_err(|e| self.err(e))? > 0)
    }

    fn detach(&mut self, port: u16, id: u64) -> Result<bool> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "UPDATE leases SET owner_pid = NULL, owner_start = NULL, owner_boot = NULL,
                                  owner_ns = NULL, owner_lock = NULL,
                                  owner_time_ns = NULL, owner_ns_parents = NULL
                 WHERE port = ?1 AND id = ?2",
            )
            .map_err(|e| self.err(e))?;
        Ok(stmt
            .execute(params![port, id as i64])
            .map_err(|e| self.err(e))?
            > 0)
    }

    fn leases(&mut self, range: Option<PortRange>) -> Result<Vec<Lease>> {
        let (lo, hi) = range.map_or((0, u16::MAX), |r| (r.start(), r.end()));
        let mut stmt = self
            .tx
            .prepare_cached(SELECT_LEASES_IN)
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![lo, hi], |row| self.lease_from_row(row))
            .map_err(|e| self.err(e))?;
        rows.map(|r| r.map_err(|e| self.err(e))?).collect()
    }

    fn cursor(&mut self) -> Result<Option<u16>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT value FROM meta WHERE key = 'cursor'")
            .map_err(|e| self.err(e))?;
        let value: Option<i64> = stmt
            .query_row([], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(value.and_then(|v| u16::try_from(v).ok()))
    }

    fn set_cursor(&mut self, port: u16) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('cursor', ?1)")
            .map_err(|e| self.err(e))?;
        stmt.execute([port]).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn count(&mut self, counter: Counter, by: u64) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            )
            .map_err(|e| self.err(e))?;
        let by = i64::try_from(by).unwrap_or(i64::MAX);
        stmt.execute(params![counter.key(), by])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn counter(&mut self, counter: Counter) -> Result<u64> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .map_err(|e| self.err(e))?;
        let value: Option<i64> = stmt
            .query_row([counter.key()], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        // A negative count can only come from a damaged row; show it as none.
        Ok(value.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
    }
}

/// What [`examine`] found in a registry file, without changing it.
#[derive(Debug)]
pub(crate) struct Examination {
    /// The schema version in the file (`0` for an empty file).
    pub(crate) schema_found: u32,
    /// The journal mode SQLite reports.
    pub(crate) journal_mode: String,
    /// `PRAGMA integrity_check`: `Ok` or the first problem.
    pub(crate) integrity: std::result::Result<(), String>,
    /// The leases, read when the schema is the one this build writes.
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
    conn.busy_timeout(busy_timeout(deadline)).map_err(sql)?;
    let query = |conn: &Connection, q: &str| -> Result<i64> {
        conn.query_row(q, [], |r| r.get(0)).map_err(sql)
    };
    let tables = query(&conn, "SELECT count(*) FROM sqlite_schema")?;
    let app_id = query(&conn, "PRAGMA application_id")?;
    let version = query(&conn, "PRAGMA user_version")?;
    if !(tables == 0 && app_id == 0 && version == 0) && app_id != i64::from(APPLICATION_ID) {
        return Err(Error::Corrupt {
            path: path.to_owned(),
            detail: format!(
                "an SQLite database of another application (application_id {app_id:#x})"
            ),
        });
    }
    let schema_found = u32::try_from(version).map_err(|_| Error::Corrupt {
        path: path.to_owned(),
        detail: format!("its schema version {version} is not valid"),
    })?;
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
    let leases = (schema_found as usize == MIGRATIONS.len()).then(|| {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(sql)?;
        SqlTx {
            tx: &tx,
            path,
            deadline,
        }
        .leases(None)
    });
    Ok(Examination {
        schema_found,
        journal_mode,
        integrity,
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

/// The newest schema version this build knows.
pub(crate) fn schema_supported() -> u32 {
    MIGRATIONS.len() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrating_twice_is_a_no_op() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let app: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(app, APPLICATION_ID);
    }

    #[test]
    fn an_open_registry_runs_wal_with_synchronous_normal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("r.sqlite3"), false, Duration::from_secs(5))
            .unwrap();
        let pragma = |name| -> String {
            store
                .conn
                .pragma_query_value(None, name, |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .unwrap()
        };
        assert_eq!(pragma("journal_mode"), "Text(\"wal\")");
        assert_eq!(pragma("synchronous"), "Integer(1)", "1 is NORMAL");
    }

    #[test]
    fn leases_written_before_blocks_existed_hold_one_port() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO leases (id, port, name, protocol, acquired_at) VALUES (7, 20000, 'x', 1, 0)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let len: i64 = conn
            .query_row("SELECT block_len FROM leases WHERE id = 7", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(len, 1);
    }

    #[test]
    fn leases_keep_every_column_when_stored_in_port_order() {
        let mut conn = Connection::open_in_memory().unwrap();
        for migration in &MIGRATIONS[..3] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        let row = concat!(
            "(9, 20010, 'svc', 3, 4242, 777, 'boot', 1000, 2000, 4, 4026531836, 'owner.lock'),",
            "(8, 20001, 'old', 1, NULL, NULL, NULL, 500, NULL, 1, NULL, NULL)"
        );
        // The columns as they were at version 3.
        let columns = "id, port, name, protocol, owner_pid, owner_start, owner_boot, \
                       acquired_at, expires_at, block_len, owner_ns, owner_lock";
        conn.execute_batch(&format!("INSERT INTO leases ({columns}) VALUES {row}"))
            .unwrap();
        let read = |conn: &Connection| -> Vec<String> {
            let mut stmt = conn
                .prepare(&format!("SELECT {columns} FROM leases ORDER BY id"))
                .unwrap();
            let rows = stmt
                .query_map([], |r| {
                    (0..12)
                        .map(|i| r.get::<_, rusqlite::types::Value>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .unwrap();
            rows.map(|r| format!("{:?}", r.unwrap())).collect()
        };
        let before = read(&conn);
        migrate(&mut conn).unwrap();
        assert_eq!(read(&conn), before);
        let without_rowid: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_index_list('leases') WHERE origin = 'pk'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(without_rowid, 1, "the port is the table's key");
    }

    #[test]
    fn owners_keep_their_time_namespace_and_namespace_parents() {
        let mut conn = Connection::open_in_memory().unwrap();
        for migration in &MIGRATIONS[..4] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        // A lease written before the time namespace was recorded.
        conn.execute_batch(
            "INSERT INTO leases (id, port, name, protocol, owner_pid, owner_start, owner_boot,
                                 acquired_at, block_len, owner_ns)
             VALUES (1, 20000, 'old', 1, 42, 777, 'boot', 0, 1, 7)",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let path = Path::new("memory");
        let deadline = Deadline::after(Duration::from_secs(5));
        let mut tx = SqlTx {
            tx: &conn,
            path,
            deadline,
        };
        let old = tx.lease_on(20000).unwrap().unwrap();
        let owner = old.owner().unwrap();
        assert_eq!(
            (owner.time_namespace(), owner.namespace_parents()),
            (None, None)
        );
        let recorded = Owner::new(43, 778, "boot")
            .in_namespace(Some(7))
            .in_time_namespace(Some(9))
            .with_namespace_parents(Some(vec![5, 3]));
        let top = Owner::new(44, 779, "boot").with_namespace_parents(Some(Vec::new()));
        for (port, owner) in [(20001, &recorded), (20002, &top)] {
            tx.insert_lease(&Lease {
                owner: Some(owner.clone()),
                port,
                id: u64::from(port),
                ..old.clone()
            })
            .unwrap();
        }
        let read = tx.lease_on(20001).unwrap().unwrap();
        let owner = read.owner().unwrap();
        assert_eq!(owner.time_namespace(), Some(9));
        assert_eq!(owner.namespace_parents(), Some(&[5, 3][..]));
        let read = tx.lease_on(20002).unwrap().unwrap();
        assert_eq!(read.owner().unwrap().namespace_parents(), Some(&[][..]));
        conn.execute_batch("UPDATE leases SET owner_ns_parents = '5 x' WHERE port = 20001")
            .unwrap();
        let mut tx = SqlTx {
            tx: &conn,
            path,
            deadline,
        };
        assert!(matches!(tx.lease_on(20001), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn a_write_that_fails_or_panics_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            SqliteStore::open(&dir.path().join("r.sqlite3"), false, Duration::from_secs(5))
                .unwrap();
        let deadline = || Deadline::after(Duration::from_secs(5));
        let failed = store.write(deadline(), |tx, _| {
            tx.set_cursor(2000)?;
            Err::<(), _>(Error::Exhausted {
                range: PortRange::new(2000, 2001).unwrap(),
                held: 2,
                block_len: 1,
            })
        });
        assert!(failed.is_err());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.write(deadline(), |tx, _| -> Result<()> {
                tx.set_cursor(3000)?;
                panic!("a bug half-way through a claim");
            })
        }));
        assert!(panicked.is_err());
        // Both were rolled back, and the connection takes a new transaction.
        assert_eq!(store.write(deadline(), |tx, _| tx.cursor()).unwrap(), None);
        store
            .write(deadline(), |tx, _| tx.set_cursor(4000))
            .unwrap();
        assert_eq!(
            store.read(deadline(), |tx| tx.cursor()).unwrap(),
            Some(4000)
        );
    }

    /// A registry deleted under a store is opened again through the open sequence, with its
    /// refusals: a file others may write put in its place is refused and left as it was.
    #[cfg(unix)]
    #[test]
    fn a_registry_replaced_by_a_file_others_may_write_is_refused_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite3");
        let mut store = SqliteStore::open(&path, false, Duration::from_secs(5)).unwrap();
        let deadline = || Deadline::after(Duration::from_secs(5));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(sibling(&path, suffix));
        }
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = store.write(deadline(), |tx, _| tx.cursor()).unwrap_err();
        assert!(
            matches!(&err, Error::Refused { file, .. } if *file == path),
            "{err:?}"
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o666,
            "the mode was changed"
        );
        assert_eq!(meta.len(), 0, "the planted file was written");
    }

    /// A lock file deleted under a store is opened again with the refusals of an open: a
    /// symbolic link put in its place is refused, and its target is not created.
    #[cfg(unix)]
    #[test]
    fn a_lock_file_replaced_by_a_link_is_refused_at_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite3");
        let mut store = SqliteStore::open(&path, false, Duration::from_secs(5)).unwrap();
        let lock = lock_path(&path);
        let target = dir.path().join("target");
        std::fs::remove_file(&lock).unwrap();
        std::os::unix::fs::symlink(&target, &lock).unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        let err = store.write(deadline, |tx, _| tx.cursor()).unwrap_err();
        assert!(
            matches!(&err, Error::Refused { file, .. } if *file == lock),
            "{err:?}"
        );
        assert!(!target.exists(), "the link's target was created");
    }

    /// The handle judges owners by the lock files beside the file it first opened: when the
    /// registry is deleted and its path (a symbolic link) now leads to another file, the
    /// store says so instead of using that file.
    #[cfg(unix)]
    #[test]
    fn a_path_that_leads_elsewhere_after_a_deletion_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&first, &second] {
            std::fs::create_dir(d).unwrap();
        }
        let link = dir.path().join("r.sqlite3");
        std::os::unix::fs::symlink(first.join("r.sqlite3"), &link).unwrap();
        let mut store = SqliteStore::open(&link, false, Duration::from_secs(5)).unwrap();
        std::fs::remove_dir_all(&first).unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(second.join("r.sqlite3"), &link).unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        let err = store.write(deadline, |tx, _| tx.cursor()).unwrap_err();
        assert!(
            matches!(&err, Error::Registry { source, .. } if source.to_string().contains("leads to")),
            "{err:?}"
        );
    }

    /// The anchor is a descriptor of our own on the registry file: closing it must leave
    /// SQLite's POSIX locks on the file in place, as closing any other descriptor would not.
    #[cfg(target_os = "linux")]
    #[test]
    fn closing_an_anchor_keeps_sqlites_locks_on_the_registry() {
        use std::os::unix::fs::MetadataExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite3");
        let mut store = SqliteStore::open(&path, false, Duration::from_secs(5)).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        let posix_locks = || -> Vec<String> {
            let id = format!(":{ino} ");
            let pid = format!(" {} ", std::process::id());
            std::fs::read_to_string("/proc/locks")
                .unwrap()
                .lines()
                .filter(|l| l.contains("POSIX") && l.contains(&id) && l.contains(&pid))
                .map(str::to_owned)
                .collect()
        };
        let deadline = Deadline::after(Duration::from_secs(5));
        store
            .read(deadline, |tx| {
                tx.cursor()?;
                let held = posix_locks();
                assert!(!held.is_empty(), "SQLite holds a lock while it reads");
                drop(Anchor::at(&path).unwrap());
                assert_eq!(
                    posix_locks(),
                    held,
                    "closing the anchor dropped SQLite's locks"
                );
                // What the anchor avoids: any other descriptor drops them when closed.
                drop(std::fs::File::open(&path).unwrap());
                assert!(posix_locks().is_empty(), "a plain descriptor drops them");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn the_schema_refuses_two_leases_on_one_port() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let insert = "INSERT INTO leases (id, port, name, protocol, acquired_at)
                      VALUES (?1, 20000, 'x', 1, 0)";
        conn.execute(insert, [1]).unwrap();
        assert!(conn.execute(insert, [2]).is_err());
    }
}
