//! Linux: every region of SQLite's index of the write-ahead log (`-shm`) that a connection
//! maps has its blocks allocated before SQLite stores anything in it.
//!
//! Every process maps the index and writes it through memory. SQLite makes room for a new
//! region by writing one byte at the end of each 4096-byte page of it: on a file system whose
//! blocks are smaller (ext4 makes 1 KiB blocks below 512 MB, XFS may), that allocates only
//! the last block of each page, and on a full file system the first store into one of the
//! holes kills the process with `SIGBUS`. So a connection's map of a region is populated for
//! writing as soon as SQLite has mapped it (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14),
//! which allocates every block or fails without a signal; a failure fails the map as SQLite's
//! own extension of the file fails on a full disk (`SQLITE_IOERR_SHMSIZE`), before anything
//! is stored in the region.
//!
//! SQLite has no hook there but a VFS of one's own. Rather than a whole VFS, the registry
//! file's table of methods (its `pMethods`, reached through `SQLITE_FCNTL_FILE_POINTER`) is
//! swapped, once the connection is open and before its first read, for a copy that differs
//! in `xShmMap` alone, which calls SQLite's own: every other method is SQLite's, called with
//! the same file.

use std::ffi::{c_int, c_void};
use std::io;
use std::ptr;
use std::sync::{Mutex, PoisonError};

use rusqlite::{ffi, Connection};

type Methods = ffi::sqlite3_io_methods;

/// Each of SQLite's tables of methods met so far, by address, with the copy of it whose
/// `xShmMap` is [`map_allocated`]. A handful at most: the default VFS has one table per kind
/// of locking (files opened `immutable` get another), and each is copied once, for the life
/// of the process.
static TABLES: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// Has every region of the `-shm` index that `conn` maps allocated before SQLite writes to
/// it (see the module). Called once the connection is open, before its first statement.
/// `false` where the connection's database is not a file with a map of its own (an
/// in-memory one): it is then left as it was.
pub(crate) fn allocate_wal_index(conn: &Connection) -> bool {
    let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
    // SAFETY: the handle is open for as long as `conn`; `SQLITE_FCNTL_FILE_POINTER` writes
    // one pointer to the `sqlite3_file` of the database "main" (or leaves it null).
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            (&raw mut file).cast(),
        )
    };
    if rc != ffi::SQLITE_OK || file.is_null() {
        return false;
    }
    // SAFETY: SQLite's file of the open database; its table is only read here.
    let methods = unsafe { (*file).pMethods };
    let Some(allocating) = allocating_table(methods) else {
        return false;
    };
    if !ptr::eq(methods, allocating) {
        // SAFETY: the connection is this thread's and runs nothing meanwhile; the copy
        // calls SQLite's own methods for everything, `xShmMap` included.
        unsafe { (*file).pMethods = allocating };
    }
    true
}

/// The copy of `methods` whose `xShmMap` is [`map_allocated`] (`methods` itself when it is
/// one): made the first time a table is met; `None` for a table without `xShmMap`.
fn allocating_table(methods: *const Methods) -> Option<*const Methods> {
    if methods.is_null() {
        return None;
    }
    let mut tables = TABLES.lock().unwrap_or_else(PoisonError::into_inner);
    let address = methods as usize;
    if let Some(&(_, copy)) = tables
        .iter()
        .find(|&&(original, copy)| original == address || copy == address)
    {
        return Some(copy as *const Methods);
    }
    // SAFETY: SQLite's tables of methods are static, valid for the life of the process.
    let mut copy = unsafe { *methods };
    if copy.iVersion < 2 || copy.xShmMap.is_none() {
        return None;
    }
    copy.xShmMap = Some(map_allocated);
    let copy: *const Methods = Box::leak(Box::new(copy));
    tables.push((address, copy as usize));
    Some(copy)
}

/// `xShmMap` of the copied tables: SQLite's own, then the region it mapped populated for
/// writing. The map fails with `SQLITE_IOERR_SHMSIZE`, and hands SQLite no pointer (so that
/// it asks again, rather than use the region, next time), where the blocks cannot be had.
unsafe extern "C" fn map_allocated(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    mapped: *mut *mut c_void,
) -> c_int {
    // Never unwinds (a panic here would abort the process): every case is a return.
    // SAFETY: SQLite calls this through the file's table, which is one of the copies.
    let copy = unsafe { (*file).pMethods } as usize;
    let original = TABLES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|&&(_, c)| c == copy)
        .map(|&(original, _)| original as *const Methods);
    // SAFETY: SQLite's table, valid for the life of the process.
    let Some(map) = original.and_then(|original| unsafe { (*original).xShmMap }) else {
        return ffi::SQLITE_IOERR_SHMMAP;
    };
    // SAFETY: the arguments SQLite passed, passed on as they came.
    let rc = unsafe { map(file, region, size, extend, mapped) };
    // `SQLITE_READONLY`: a read-only map, which nothing stores into.
    if rc != ffi::SQLITE_OK || mapped.is_null() {
        return rc;
    }
    // SAFETY: SQLite wrote the region's address, or null where it does not exist yet.
    let start = unsafe { *mapped };
    let Ok(len) = usize::try_from(size) else {
        return rc;
    };
    if start.is_null() {
        return rc;
    }
    match populate_for_writing(start, len) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::FAULT.raw_os_error()) => {
            // SAFETY: as above; SQLite keeps its own record of the map, unmapped later.
            unsafe { *mapped = ptr::null_mut() };
            ffi::SQLITE_IOERR_SHMSIZE
        }
        // Done; or no evidence (a kernel before 5.14, a map that is not writable, pages
        // larger than a region): SQLite's own extension is all there is, as before.
        _ => rc,
    }
}

/// Faults in `len` bytes from `start` for writing, as stores would, without storing:
/// `EFAULT` where a store would have raised `SIGBUS` (no block to be had).
fn populate_for_writing(start: *mut c_void, len: usize) -> io::Result<()> {
    loop {
        // SAFETY: `start..start + len` is a region SQLite mapped and keeps mapped while the
        // connection lives; populating changes no byte of it.
        match unsafe { rustix::mm::madvise(start, len, rustix::mm::Advice::LinuxPopulateWrite) } {
            Err(rustix::io::Errno::INTR) => continue,
            result => return result.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_connection_maps_its_index_allocated_and_works_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite3");
        let conn = Connection::open(&path).unwrap();
        assert!(allocate_wal_index(&conn));
        // Once is enough: a second call finds the table in place.
        assert!(allocate_wal_index(&conn));
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE t (x INTEGER);
             INSERT INTO t VALUES (1);",
        )
        .unwrap();
        // A second connection in the process shares the map; its own table is swapped too.
        let other = Connection::open(&path).unwrap();
        assert!(allocate_wal_index(&other));
        let n: i64 = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        let shm = std::fs::metadata(dir.path().join("a.sqlite3-shm")).unwrap();
        assert!(
            shm.len() >= 32 * 1024,
            "the index was mapped: {}",
            shm.len()
        );
    }

    #[test]
    fn an_in_memory_connection_is_left_as_it_was() {
        let conn = Connection::open_in_memory().unwrap();
        assert!(!allocate_wal_index(&conn));
    }

    #[test]
    fn populating_a_mapped_region_changes_no_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite3");
        let conn = Connection::open(&path).unwrap();
        assert!(allocate_wal_index(&conn));
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
            .unwrap();
        let before = std::fs::read(dir.path().join("a.sqlite3-shm")).unwrap();
        let again = Connection::open(&path).unwrap();
        assert!(allocate_wal_index(&again));
        let _: i64 = again
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        drop(again);
        let after = std::fs::read(dir.path().join("a.sqlite3-shm")).unwrap();
        // A reader may move its read mark (bytes 100..120 of the header); nothing else.
        assert_eq!(before.len(), after.len());
        assert_eq!(before[..96], after[..96]);
        assert_eq!(before[136..], after[136..]);
    }
}
