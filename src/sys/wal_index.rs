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
//! the same file. Only files of SQLite's built-in `unix` VFS are swapped: its tables are
//! static, so a copy made once serves every file for the life of the process.

use std::ffi::{c_int, c_void, CStr};
use std::io;
use std::ptr;
use std::sync::OnceLock;

use rusqlite::{ffi, Connection};

type Methods = ffi::sqlite3_io_methods;

/// A copy of SQLite's table of methods whose `xShmMap` is [`map_allocated`], and the table
/// it copies. `methods` comes first, so that the file's `pMethods`, which points to it,
/// points to the whole: the callback finds SQLite's table there, with no lookup.
#[repr(C)]
struct Allocating {
    methods: Methods,
    original: *const Methods,
}

/// The copy, leaked once and never written after.
struct Copy(&'static Allocating);

// SAFETY: the copy and SQLite's table it points to live as long as the process and are
// never written.
unsafe impl Send for Copy {}
unsafe impl Sync for Copy {}

/// Made from the first table met with an `xShmMap`: on Linux, the `unix` VFS gives every
/// file that may have an index the same one.
static COPY: OnceLock<Copy> = OnceLock::new();

/// Has every region of the `-shm` index that `conn` maps allocated before SQLite writes to
/// it (see the module). Called once the connection is open, before its first statement.
/// `false` where the connection is left as it was (logged): its database is no file of the
/// `unix` VFS with an index (an in-memory one, one opened `immutable`).
pub(crate) fn allocate_wal_index(conn: &Connection) -> bool {
    // SAFETY: the handle is open for as long as `conn`.
    let db = unsafe { conn.handle() };
    let mut vfs: *mut ffi::sqlite3_vfs = ptr::null_mut();
    let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
    // SAFETY: each file control writes one pointer (or leaves it null) for the database
    // "main"; the VFS and the file live as long as the connection.
    let found = unsafe {
        ffi::sqlite3_file_control(
            db,
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_VFS_POINTER,
            (&raw mut vfs).cast(),
        ) == ffi::SQLITE_OK
            && ffi::sqlite3_file_control(
                db,
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_FILE_POINTER,
                (&raw mut file).cast(),
            ) == ffi::SQLITE_OK
    };
    // SAFETY: a VFS's name is a C string that lives as long as the VFS.
    let unix = found
        && !vfs.is_null()
        && !file.is_null()
        && unsafe { !(*vfs).zName.is_null() && CStr::from_ptr((*vfs).zName) == c"unix" };
    if !unix {
        tracing::debug!(
            "the index of the log is mapped as SQLite maps it: no file of the unix VFS"
        );
        return false;
    }
    // SAFETY: SQLite's file of the open database; its table is only read here.
    let methods = unsafe { (*file).pMethods };
    match allocating(methods) {
        Some(copy) => {
            if !ptr::eq(methods, copy) {
                // SAFETY: the connection is this thread's and runs nothing meanwhile; the
                // copy calls SQLite's own methods for everything, `xShmMap` included.
                unsafe { (*file).pMethods = copy };
            }
            true
        }
        None => {
            tracing::debug!(
                "the index of the log is mapped as SQLite maps it: the file's \
                             methods have no map of their own"
            );
            false
        }
    }
}

/// The copy of `methods` (made the first time), or `methods` itself when it is the copy;
/// `None` for a table with no `xShmMap`, or another table than the one copied.
fn allocating(methods: *const Methods) -> Option<*const Methods> {
    if methods.is_null() {
        return None;
    }
    let is_copy = |copy: &Copy| ptr::eq(methods, &copy.0.methods);
    if COPY.get().is_some_and(is_copy) {
        return Some(methods);
    }
    // SAFETY: the `unix` VFS's tables are static.
    let table = unsafe { *methods };
    if table.iVersion < 2 || table.xShmMap.is_none() {
        return None;
    }
    let copy = COPY.get_or_init(|| {
        let mut copied = table;
        copied.xShmMap = Some(map_allocated);
        Copy(Box::leak(Box::new(Allocating {
            methods: copied,
            original: methods,
        })))
    });
    ptr::eq(copy.0.original, methods).then_some(ptr::from_ref(&copy.0.methods))
}

/// `xShmMap` of the copy: SQLite's own, then the region it mapped populated for writing.
/// The map fails with `SQLITE_IOERR_SHMSIZE`, and hands SQLite no address, where the blocks
/// cannot be had: SQLite keeps the address it is given and stores into it the next time
/// without asking again, so it must ask again.
unsafe extern "C" fn map_allocated(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    mapped: *mut *mut c_void,
) -> c_int {
    // Never unwinds (a panic here would abort the process): every case is a return.
    // SAFETY: SQLite calls this through the file's table, which is the copy's first field.
    let original = unsafe { (*(*file).pMethods.cast::<Allocating>()).original };
    // SAFETY: SQLite's table, static.
    let Some(map) = (unsafe { (*original).xShmMap }) else {
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
        Ok(()) => rc,
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::FAULT.raw_os_error()) => {
            tracing::debug!(region, %error,
                "no block for a region of the index of the log: the map fails");
            // SAFETY: as above; SQLite keeps its own record of the map, unmapped later.
            unsafe { *mapped = ptr::null_mut() };
            ffi::SQLITE_IOERR_SHMSIZE
        }
        // No evidence (a kernel before 5.14, a region that does not start a page where
        // pages are larger than a region): SQLite's own extension is all there is.
        Err(error) => {
            tracing::debug!(region, %error,
                "a region of the index of the log is mapped as SQLite maps it");
            rc
        }
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
    use std::cell::Cell;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    thread_local! {
        /// What [`sqlite_map`] hands out: the region a test mapped.
        static REGION: Cell<*mut c_void> = const { Cell::new(ptr::null_mut()) };
    }

    /// Stands in for SQLite's `xShmMap`: hands out the test's region.
    unsafe extern "C" fn sqlite_map(
        _file: *mut ffi::sqlite3_file,
        _region: c_int,
        _size: c_int,
        _extend: c_int,
        mapped: *mut *mut c_void,
    ) -> c_int {
        // SAFETY: `mapped` is the test's own pointer.
        unsafe { *mapped = REGION.get() };
        ffi::SQLITE_OK
    }

    const REGION_LEN: usize = 32 * 1024;

    /// Maps `REGION_LEN` bytes of the file at `path` shared and writable, as SQLite maps a
    /// region of the index, and calls [`map_allocated`] as SQLite would, through a copy of a
    /// table whose `xShmMap` is [`sqlite_map`]: its result and the address it hands out.
    fn map_through_copy(path: &std::path::Path) -> (c_int, *mut c_void) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        // SAFETY: a fresh shared map of the test's own file, never unmapped (the test ends).
        let start = unsafe {
            rustix::mm::mmap(
                ptr::null_mut(),
                REGION_LEN,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )
        }
        .unwrap();
        REGION.set(start);
        // SAFETY: a table of SQLite's layout, all null but the map.
        let mut sqlite: Methods = unsafe { std::mem::zeroed() };
        sqlite.iVersion = 3;
        sqlite.xShmMap = Some(sqlite_map);
        let sqlite: &'static Methods = Box::leak(Box::new(sqlite));
        let mut copied = *sqlite;
        copied.xShmMap = Some(map_allocated);
        let copy: &'static Allocating = Box::leak(Box::new(Allocating {
            methods: copied,
            original: sqlite,
        }));
        let mut db_file = ffi::sqlite3_file {
            pMethods: &copy.methods,
        };
        let mut mapped = ptr::null_mut();
        // SAFETY: a file whose table is the copy, as SQLite calls it.
        let rc =
            unsafe { map_allocated(&raw mut db_file, 0, REGION_LEN as c_int, 1, &raw mut mapped) };
        (rc, mapped)
    }

    #[test]
    fn a_region_of_holes_has_every_block_once_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(REGION_LEN as u64)
            .unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().blocks(),
            0,
            "the test needs a file system that leaves a file made longer with holes"
        );
        let (rc, mapped) = map_through_copy(&path);
        assert_eq!(rc, ffi::SQLITE_OK);
        assert_eq!(mapped, REGION.get());
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated >= REGION_LEN as u64,
            "{allocated} bytes allocated"
        );
        // Populating stores nothing.
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    }

    /// A region where a store would raise `SIGBUS` (here: past the end of its file) fails
    /// the map, and SQLite is handed no address, so that it asks again next time instead of
    /// storing into the region.
    #[test]
    fn a_region_that_cannot_have_its_blocks_fails_the_map_and_hands_out_no_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        std::fs::File::create(&path).unwrap();
        let (rc, mapped) = map_through_copy(&path);
        assert_eq!(rc, ffi::SQLITE_IOERR_SHMSIZE);
        assert!(mapped.is_null());
    }

    #[test]
    fn a_file_connection_gets_the_copy_once_and_works_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite3");
        let conn = Connection::open(&path).unwrap();
        assert!(allocate_wal_index(&conn));
        let table = |conn: &Connection| {
            let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
            // SAFETY: as in `allocate_wal_index`.
            unsafe {
                ffi::sqlite3_file_control(
                    conn.handle(),
                    c"main".as_ptr(),
                    ffi::SQLITE_FCNTL_FILE_POINTER,
                    (&raw mut file).cast(),
                );
                (*file).pMethods
            }
        };
        let copy = table(&conn);
        assert!(ptr::eq(copy, &COPY.get().unwrap().0.methods));
        // Once is enough: a second call finds the copy in place.
        assert!(allocate_wal_index(&conn));
        assert_eq!(table(&conn), copy);
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE t (x INTEGER);
             INSERT INTO t VALUES (1);",
        )
        .unwrap();
        // A second connection in the process gets the same copy.
        let other = Connection::open(&path).unwrap();
        assert!(allocate_wal_index(&other));
        assert_eq!(table(&other), copy);
        let n: i64 = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn an_in_memory_connection_is_left_as_it_was() {
        let conn = Connection::open_in_memory().unwrap();
        assert!(!allocate_wal_index(&conn));
    }
}
