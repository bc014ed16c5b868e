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
//!    created by us (`O_EXCL`, `0600`) before SQLite opens them, where they are missing (a
//!    new registry, or side files someone removed).
//! 1. The path is checked before SQLite sees it: anything but a regular file we can read and
//!    write, a non-empty file without the SQLite header, or one whose header names another
//!    application is refused, and nothing is written. (The plainest of these are refused
//!    even before the lock file is created.)
//! 2. A missing file is created whole (see `create`): its whole initial image (every
//!    migration, WAL mode in the header; kept built ahead) is written to a file of ours
//!    beside it (unnamed, `O_TMPFILE`, on Linux; else a random name, `O_EXCL |
//!    O_NOFOLLOW`; mode `0600`), synced once, and given the registry's path without
//!    replacing anything; a file that appeared meanwhile wins. A crash leaves no registry
//!    or a complete one. The brand-new log's first commit is made without syncing
//!    (`create::start_log`), which only a log started over needs. Where no link or rename
//!    can put a file in place without replacing, the file is created empty with mode
//!    `0600` and built in place by step 3, as an existing empty file is.
//! 3. The database is inspected read-only: it must be empty (new) or carry our
//!    `application_id`; its `min_reader_version` (see `schema`: "Registry format") must not
//!    be above the generation this build reads; `PRAGMA quick_check` must pass, or only its
//!    check of the tables of leases and reserved ports where the file is as the last full
//!    check found it (see `last_check`: the lock file records the file's identity, size and
//!    change times, and any write moves them). Only then
//!    is anything written, and only what the file needs: WAL mode, unless the file's header
//!    said so already when step 1 read it under the lock, with no rollback journal beside
//!    it (only a switch, which every process of ours makes under the lock, changes it, or a
//!    hot journal that SQLite rolls back as it first reads the file); and the pending
//!    migrations in one transaction, unless the `user_version` the inspection read is this
//!    build's schema or a newer one (every version migrates under the lock, so it is still
//!    the file's). A registry refused for its `min_reader_version` is left as it was, and
//!    so is its directory: a lock file this open created is removed again.
//!
//!    Each statement is parsed once per process, and a fresh process (a test under nextest,
//!    a call of the command) pays for every one: a registry that needs nothing costs
//!    `PRAGMA application_id`, `PRAGMA user_version`, the marker's `SELECT` (which loads the
//!    schema, in which the tables are then looked up without SQL), `synchronous` and
//!    `journal_size_limit`; and `PRAGMA quick_check`, which reads every page of the file,
//!    once after each change of the file.
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
//! # Write-ahead log
//!
//! No connection checkpoints when it closes (`SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`), so `-wal`
//! and `-shm` stay beside the registry between processes, as they do after a process that
//! was killed. Were the last connection to close to checkpoint and delete them, as SQLite
//! does by default, every short-lived process (a test under nextest, a call of the command)
//! would pay for two `fsync`s, two unlinks, and creating and syncing a new log. What a
//! commit wrote is in the log either way, and every process reads it: a crash of any
//! process loses no committed lease. The log is copied into the file by SQLite's automatic
//! checkpoint (every 1,000 pages) in a long-lived process, and by an open that finds it
//! holding more than 64 frames (`trim_wal`, which reads the log's own frame headers): the
//! first process to open the registry rebuilds the log's index by reading the log's frames
//! since it was last started over, so their number is what a fresh process pays for.
//! Starting the log over writes over the old frames in place: a log that grew past
//! [`WAL_LIMIT_BYTES`] (a reader held back the checkpoints) is truncated to that length then
//! (`journal_size_limit`), but the usual log is never cut short, since a log that had to
//! grow again page by page would cost every commit a block allocation.
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
//! Closing the old connection is safe: it does not checkpoint (nor delete `-wal` and `-shm` by
//! name; see "Write-ahead log"). A registry created where the
//! main file is missing first removes `-wal` and `-shm` left of a deleted one, on which
//! SQLite would otherwise fail with "disk I/O error".
//!
//! # Files
//!
//! `schema` holds the migrations and the format policy (see its docs: "Registry format"),
//! `last_check` the record of the last integrity check, `create` the creation of a missing
//! registry in one step, `vet` the checks of a file before SQLite opens it (shared by the
//! store and the examination), `tx` the transaction, `examine` the read-only examination
//! behind `PortDaddy::diagnose`; this file the store and its open sequence.

mod create;
mod examine;
mod last_check;
mod schema;
mod tx;
mod vet;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use super::Tx;
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::lock::{Anchor, Deadline, FileLock};
use crate::paths::{self, sibling};

pub(crate) use examine::examine;
use last_check::{FileStamp, LastCheck};
pub(crate) use schema::schema_supported;
use schema::{inspect, migrate, Integrity};
use tx::{run_write, SqlTx};
use vet::check_existing_file;

/// How many prepared statements a connection keeps.
const STATEMENT_CACHE: usize = 64;

/// How many frames past which an open checkpoints the write-ahead log (see "Write-ahead log"
/// above): 64 frames of 4 KiB pages, that is 16 claims or releases of two pages each. The
/// first process to open the registry reads the log's frames since it was last started over
/// to rebuild its index, so this bounds what a fresh process reads; a checkpoint costs two
/// `fsync`s.
const WAL_TRIM_FRAMES: u32 = 64;

/// The length to which SQLite cuts the log when it starts it over, if it grew longer
/// (`journal_size_limit`): twice what the automatic checkpoint (every 1,000 pages) lets it
/// reach, so that only a log that readers kept from being checkpointed is cut.
const WAL_LIMIT_BYTES: i64 = 2 * 1000 * (4096 + 24) + 32;

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
    /// was deleted or replaced (see [`shm_gone`]); `None` if there was none to anchor.
    shm: Option<Anchor>,
    /// How the store was opened, to open the path again if its file is replaced.
    shared_tmp: bool,
    /// Declared after `conn`, so that the file is marked in use until the connection closed.
    _in_use: InUse,
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
    Error::registry_because(
        path,
        "its -shm file was deleted while this process had the registry open, and this \
         process can no longer write it without overwriting the leases of others; restart \
         the process (its leases are reclaimed when it exits)",
    )
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
/// therefore never be opened and closed again beside SQLite (`vet::check_file`): another
/// process would then take itself for the last one using the registry, remove its
/// write-ahead log under this one, and the two would lease from different logs.
static IN_USE: std::sync::Mutex<std::collections::BTreeMap<(u64, u64), usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn in_use_table() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<(u64, u64), usize>> {
    IN_USE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The (device, inode) of a file, where the platform has POSIX locks.
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    crate::sys::file_id(meta)
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
        let open_err = |e: io::Error| Error::open(path, e);
        if path.file_name().is_none() {
            return Err(Error::open_because(
                path,
                "the path names no file; give the path of a registry file",
            ));
        }
        if path.is_dir() {
            return Err(Error::open_because(
                path,
                "the path is a directory; give a file path",
            ));
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
        paths::check_files(path, &real).or_else(|e| {
            // A creation killed between its hard link and its unlink left the registry a
            // second name (see `create`): removed, and the files checked again.
            if matches!(e, Error::Refused { .. }) && create::remove_second_name(&real) {
                paths::check_files(path, &real)
            } else {
                Err(e)
            }
        })?;
        check_existing_file(path, &real, false)?;
        let lock_was_there = std::fs::symlink_metadata(lock_path(&real)).is_ok();
        let mut lock = FileLock::open(&lock_path(&real)).map_err(|e| lock_err(path, e))?;
        let (conn, anchor, shm, in_use) = {
            // The whole sequence runs under the write lock, so no process ever inspects a
            // registry that another is still creating or migrating.
            // The lock file may be opened again there (if it was replaced meanwhile), with
            // the same refusals.
            let held = lock
                .lock(deadline)
                .map_err(|e| lock_err(path, e))?
                .ok_or_else(|| Error::LockTimeout {
                    path: path.to_owned(),
                    waited: deadline.elapsed(),
                })?;
            // Again under the lock: the files SQLite is about to open are as they were
            // checked, since every process of ours checks under this lock too.
            paths::check_files(path, &real)?;
            let vetted = check_existing_file(path, &real, true)?;
            remove_orphaned_side_files(&real).map_err(open_err)?;
            // A missing registry is created whole (see `create`); the rest of the sequence
            // treats it as any existing file.
            let made_whole = match create::create_missing(path, &real, vetted.missing)? {
                create::Creation::Whole => true,
                create::Creation::Found => false,
                create::Creation::Unable => {
                    paths::create_private_file(&real).map_err(open_err)?;
                    // A file put there since the path was looked at is not ours: checked
                    // before SQLite opens it, as one that appears at a link is.
                    check_existing_file(path, &real, true)?;
                    false
                }
            };
            // Before SQLite locks it: from now on nothing of this process closes it again.
            let in_use = InUse::mark(&real).map_err(open_err)?;
            // A `-wal` made below is empty: SQLite may checkpoint it and remove it on close.
            let wal_was_there = sibling(&real, "-wal").exists();
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
            // An image made whole here is in WAL mode already; a file that appeared meanwhile
            // was not read, and is switched if it needs it.
            let in_wal = vetted.wal || made_whole;
            // A file as the last integrity check left it is not checked again in full (see
            // `last_check`); decided once the file is known to be a registry this build may
            // use, so that the lock file beside one it refuses is left as it was.
            let last = LastCheck::read(held.file());
            let (mut start, mut before) = (None, None);
            let integrity = || {
                let found = FileStamp::of(&real);
                if last.covers(found) {
                    before = found;
                    return Integrity::AsLastChecked;
                }
                // The file system's clock read before the file is stamped, so that a write
                // after the stamp shows in the file's times or in the clock's.
                start = last.begin_check(held.file());
                before = FileStamp::of(&real);
                Integrity::Check
            };
            let opened = open_checked(path, &real, deadline, wal_was_there, in_wal, integrity)
                .and_then(|conn| paths::check_files(path, &real).map(|()| conn));
            // Whether anything wrote the file while it was checked (or found as checked).
            let unchanged = before.is_some() && FileStamp::of(&real) == before;
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
                    // A registry for newer versions only is left as this open found it,
                    // without a lock file beside it. Removed under the lock, which is safe:
                    // whoever locks the file next finds it unlinked and takes a new one.
                    if matches!(e, Error::SchemaTooNew { .. }) && !lock_was_there {
                        if let Err(error) = std::fs::remove_file(lock_path(&real)) {
                            tracing::debug!(%error, "could not remove the lock file it created");
                        }
                    }
                    return Err(e);
                }
            };
            if made_whole {
                create::start_log(&conn, &real).map_err(|e| sql_err(path, deadline, e))?;
            }
            // The file as it was checked in full, if nothing wrote it meanwhile; not after a
            // checkpoint, which the next open's full check records.
            let trimmed = trim_wal(&conn, &real);
            if let (Some(start), Some(stamp), true, false) = (start, before, unchanged, trimmed) {
                last.record(held.file(), stamp, start, path);
            }
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
                let registry_err = |e: io::Error| Error::registry(path, e);
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
        Err(Error::registry_because(
            &self.path,
            "the registry file was deleted or replaced again each time it was opened anew",
        ))
    }

    /// The leases of the file the store has open (deleted or replaced), read through its
    /// connection, or `None` if it cannot be read: then there is no telling what others
    /// released in it.
    fn leases_left_behind(&mut self, deadline: Deadline) -> Option<Vec<Lease>> {
        match self.read(deadline, |tx| tx.leases(None)) {
            Ok(leases) => Some(leases),
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %crate::error::Chain(&e),
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
            return Err(Error::registry_because(
                &self.path,
                format!(
                    "the registry file was deleted, and the path now leads to {} instead of \
                     {}; open the registry again",
                    now.display(),
                    was.display()
                ),
            ));
        }
        // Closing the old connection does not touch the new registry: it never checkpoints on
        // close (which would delete `<path>-wal` and `<path>-shm` by name). The `replaced`
        // tests hold it to that.
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
            Err(e) => Err(Error::registry(&self.path, e)),
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
        f(&mut SqlTx::new(&tx, path, deadline))
    }
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

/// Checkpoints the write-ahead log beside `real` when it holds more than [`WAL_TRIM_FRAMES`]
/// frames, so that the next writer starts it over from its first frame; whether it tried. The
/// caller holds the write lock, so no claim of ours waits on the copy. A checkpoint that
/// fails or cannot finish (a reader still needs old frames) changes nothing; the next open
/// tries again.
fn trim_wal(conn: &Connection, real: &Path) -> bool {
    if !wal_longer_than(real, WAL_TRIM_FRAMES) {
        return false;
    }
    if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::debug!(path = %real.display(), %error, "could not checkpoint the registry");
    }
    true
}

/// Whether the write-ahead log beside `real` holds more than `frames` frames since it was
/// last started over: whether frame number `frames` (counting from 0) carries the salt of
/// the log's header, as every frame written since the restart does and none of an earlier
/// round does (SQLite's WAL format: a 32-byte header with the page size at bytes 8-11 and
/// the salt at 16-23, then frames of a 24-byte header, the salt at 8-15, and a page). The
/// log's length would not tell, since a log started over keeps its length and is written
/// over in place. Only a hint of when to checkpoint: a wrong answer costs a checkpoint or
/// defers one, nothing else.
///
/// The log is read through a descriptor of its own, never the index (`-shm`): closing a
/// descriptor drops every POSIX lock this process holds on that file, and SQLite's locks
/// are on `-shm` and on the registry file, never on the log.
fn wal_longer_than(real: &Path, frames: u32) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    // Not through a link, and without waiting on a FIFO put in its place.
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    crate::sys::open_flags(&mut options, true, true);
    let Ok(mut wal) = options.open(sibling(real, "-wal")) else {
        return false;
    };
    let mut header = [0u8; 32];
    if wal.read_exact(&mut header).is_err() {
        return false;
    }
    let word = |bytes: &[u8], at: usize| {
        u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    };
    if !matches!(word(&header, 0), 0x377f_0682 | 0x377f_0683) {
        return false;
    }
    let page = u64::from(word(&header, 8));
    let at = 32 + u64::from(frames) * (page + 24);
    let mut frame = [0u8; 24];
    if wal.seek(SeekFrom::Start(at)).is_err() || wal.read_exact(&mut frame).is_err() {
        return false;
    }
    frame[8..16] == header[16..24]
}

/// What is left of `deadline`, as far as SQLite's busy timeout (an `int` of milliseconds)
/// can express it.
fn busy_timeout(deadline: Deadline) -> Duration {
    let most = Duration::from_millis(i32::MAX as u64);
    deadline.remaining().map_or(most, |left| left.min(most))
}

/// Opens the connection, inspects the file read-only, then sets WAL mode and migrates,
/// each only where the file needs it. The caller holds the write lock.
/// `real` is the registry file with its links resolved; `path` names it in errors.
/// `wal_was_there` says whether a `-wal` was there before this open made one; `in_wal` that
/// the file's header, read under the lock, says it is in WAL mode already; `integrity` is
/// asked whether to check the file's integrity in full (see `last_check`).
fn open_checked(
    path: &Path,
    real: &Path,
    deadline: Deadline,
    wal_was_there: bool,
    in_wal: bool,
    integrity: impl FnOnce() -> Integrity,
) -> Result<Connection> {
    let sql = |e| open_sql_err(path, deadline, e);
    // The links are resolved: a link in the path now was put there since, and is not
    // followed.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let mut conn = Connection::open_with_flags(real, flags).map_err(sql)?;
    // Before SQLite first maps the index of the log: on a full disk a map fails with an
    // error rather than a `SIGBUS` (see `sys::allocate_wal_index`).
    crate::sys::allocate_wal_index(&conn);
    conn.busy_timeout(busy_timeout(deadline)).map_err(sql)?;
    // Closing a connection checkpoints the log into the file: not before the file is known
    // to be ours. An empty `-wal` this open made (in a directory open to others) has nothing
    // to checkpoint, and closing removes it again, as it would one SQLite made; a file
    // refused below is left as it was found.
    let guard_wal = wal_was_there;
    if guard_wal {
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(sql)?;
    }
    let found = inspect(&conn, path, deadline, integrity)?;
    // From now on the connection never checkpoints as it closes, so the log and its index
    // stay (see "Write-ahead log" above): not through an index that was removed, nor at
    // every exit of a short-lived process.
    if !guard_wal {
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(sql)?;
    }
    // Before anything is written, so that creating a registry syncs no more than a claim.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    // A file in WAL mode says so in its header, and SQLite opens it in that mode: the switch
    // is only for a new file, or one someone switched to a rollback journal. Only a switch
    // writes the header, and every process of ours switches under the write lock, so what
    // the header said under the lock holds.
    if !in_wal {
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), %mode,
                "the registry could not switch to WAL mode");
        }
    }
    conn.pragma_update(None, "journal_size_limit", WAL_LIMIT_BYTES)
        .map_err(sql)?;
    // Every version migrates under the write lock, which this open holds: the schema version
    // read above is still the file's, and a registry at this build's schema or a newer one
    // has nothing to migrate (the transaction would only read `user_version` again).
    if found < schema::schema_supported() {
        migrate(&mut conn).map_err(sql)?;
    }
    Ok(conn)
}

fn lock_path(path: &Path) -> PathBuf {
    sibling(path, ".lock")
}

/// Maps a failure to open the lock file: a refusal of the file when it is one.
fn lock_err(path: &Path, e: io::Error) -> Error {
    refusal(path, e).unwrap_or_else(|e| Error::open(path, e))
}

/// [`Error::Refused`] when `e` is a refusal of the lock file; else `e` back.
pub(crate) fn refusal(path: &Path, e: io::Error) -> std::result::Result<Error, io::Error> {
    e.downcast::<crate::lock::Refusal>()
        .map(|refusal| Error::Refused {
            path: path.to_owned(),
            file: refusal.file,
            reason: refusal.reason,
            advice: paths::ADVICE_OWN,
        })
}

/// Maps an SQLite error met while opening: as [`sql_err`], except that other failures mean
/// the registry could not be opened.
fn open_sql_err(path: &Path, deadline: Deadline, e: rusqlite::Error) -> Error {
    match sql_err(path, deadline, e) {
        Error::Registry {
            path,
            reason,
            source,
        } => Error::Open {
            path,
            reason,
            source,
        },
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
        // SQLite says "disk I/O error" where it cannot make room for the log's index:
        // on a full filesystem, as the new registry's image may just have filled it.
        _ if matches!(&e, rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_IOERR_SHMSIZE) =>
        {
            Error::Registry {
                path: path.to_owned(),
                reason: Some(
                    "no room for the index of its write-ahead log (-shm): the filesystem may \
                     be full"
                        .into(),
                ),
                source: Some(e.into()),
            }
        }
        _ => Error::registry(path, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::PortRange;

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
                reserved: 0,
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
            matches!(&err, Error::Registry { reason: Some(r), .. } if r.contains("leads to")),
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
                // Without the line's ordinal, which changes as other processes lock files.
                .map(|l| l.split_once(':').map_or(l, |(_, lock)| lock).to_owned())
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

    #[cfg(target_os = "linux")]
    #[test]
    fn telling_the_logs_length_keeps_sqlites_locks_on_the_index_and_the_file() {
        use std::os::unix::fs::MetadataExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite3");
        let mut store = SqliteStore::open(&path, false, Duration::from_secs(5)).unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        store.write(deadline, |tx, _| tx.cursor()).unwrap();
        let inodes = [
            std::fs::metadata(&path).unwrap().ino(),
            std::fs::metadata(sibling(&path, "-shm")).unwrap().ino(),
        ];
        let posix_locks = || -> Vec<String> {
            let pid = format!(" {} ", std::process::id());
            std::fs::read_to_string("/proc/locks")
                .unwrap()
                .lines()
                .filter(|l| l.contains("POSIX") && l.contains(&pid))
                .filter(|l| inodes.iter().any(|ino| l.contains(&format!(":{ino} "))))
                .map(|l| l.split_once(':').map_or(l, |(_, lock)| lock).to_owned())
                .collect()
        };
        let held = posix_locks();
        assert!(
            !held.is_empty(),
            "SQLite holds a lock on its index while open"
        );
        assert!(wal_longer_than(&path, 0), "the log holds a frame");
        assert!(!wal_longer_than(&path, 10_000));
        assert_eq!(
            posix_locks(),
            held,
            "reading the log dropped SQLite's locks"
        );
    }
}
