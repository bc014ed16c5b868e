//! Bad input: malformed names, requests and ranges, unusable registry paths, and files at the
//! registry path that are not registries. Each must give a typed [`Error`] (never a panic)
//! whose message is one line, names the registry path where there is one, and says what to
//! do; a file that cannot be used must be left byte for byte as it was.
//!
//! Ports 23500-23999 belong to this file (see `common`).
//!
//! Foreign and damaged SQLite files are made with `rusqlite`: it is a normal dependency of the
//! crate, and integration tests link every normal dependency, so it can be named here (with
//! its bundled SQLite; the `sqlite3` command is not needed). A registry "from the future" is a
//! real registry whose `meta` row `min_reader_version` demands a newer reader.
//!
//! What may appear beside a refused file depends on where the open sequence (see
//! `src/store/sqlite/mod.rs`) refused it:
//! - before SQLite sees the file (a directory, not SQLite at all): nothing at all;
//! - after SQLite looked (foreign, truncated, future schema): the lock file `<registry>.lock`
//!   (created in step 2), but no `-wal`, `-shm` or `-journal`; an existing `-wal` or
//!   `-journal` must be neither changed nor deleted, and for a file that came with a pending
//!   `-wal` a `-shm` index is tolerated (SQLite cannot read such a file without one).

use crate::common;
#[cfg(unix)]
use crate::common::is_root;
use crate::common::sibling;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{all_free, memory, temp_registry};
use portdaddy::{Error, PortDaddy, PortRange, Request, MAX_NAME_LEN};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The range every registry of this file uses.
const FIRST: u16 = 23500;
const LAST: u16 = 23999;

/// Offsets in the SQLite header (<https://www.sqlite.org/fileformat.html#the_database_header>).
const PAGE_SIZE_OFFSET: usize = 16;
const USER_VERSION_OFFSET: usize = 60;
const APPLICATION_ID_OFFSET: usize = 68;

/// portdaddy's `application_id`, ASCII "PtDy".
const PORTDADDY_APP_ID: [u8; 4] = *b"PtDy";

/// Opens a file registry at `path` over this file's ports, probing no real port.
fn open_at(path: &Path) -> portdaddy::Result<PortDaddy> {
    PortDaddy::builder()
        .path(path)
        .range(FIRST..=LAST)
        .port_probe(all_free)
        .lock_timeout(Duration::from_secs(5))
        .open()
}

/// The error of an open that must fail.
fn open_err(path: &Path) -> Error {
    match open_at(path) {
        Ok(registry) => panic!("{} opened as a registry: {registry:?}", path.display()),
        Err(e) => e,
    }
}

fn entries(dir: &Path) -> BTreeSet<OsString> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").file_name())
        .collect()
}

/// A file's bytes and the names beside it, taken before an open that must refuse it.
struct Before {
    bytes: Vec<u8>,
    entries: BTreeSet<OsString>,
    /// The other regular files of the directory, such as a `-wal` or `-journal`, and their bytes.
    siblings: Vec<(OsString, Vec<u8>)>,
}

fn snapshot(path: &Path) -> Before {
    let dir = path.parent().expect("a parent directory");
    let entries = entries(dir);
    let siblings = entries
        .iter()
        .filter(|name| dir.join(name) != path && dir.join(name).is_file())
        .map(|name| (name.clone(), fs::read(dir.join(name)).unwrap()))
        .collect();
    Before {
        bytes: fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
        entries,
        siblings,
    }
}

/// What a refused open may leave beside the file.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Beside {
    /// Nothing: the file was refused before SQLite or the lock file were touched.
    Nothing,
    /// At most the lock file `<registry>.lock`; never `-wal`, `-shm` or `-journal`.
    LockFileOnly,
    /// The lock file and a `-shm` index: for a file that came with a pending `-wal`, which
    /// SQLite cannot even read without building that index.
    LockFileAndShm,
}

/// Asserts that `path` is byte for byte as before, that no file beside it (its `-wal` or
/// `-journal` included) was removed or changed, and that nothing but what `beside` allows
/// appeared next to it. Reports every problem at once.
fn assert_untouched(path: &Path, before: &Before, beside: Beside) {
    let mut problems = Vec::new();
    let now = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    if now != before.bytes {
        problems.push(format!(
            "the file was modified ({} bytes before, {} after, first difference at byte {})",
            before.bytes.len(),
            now.len(),
            first_difference(&before.bytes, &now).unwrap_or(0),
        ));
    }
    let dir = path.parent().unwrap();
    let after = entries(dir);
    for (name, bytes) in &before.siblings {
        match fs::read(dir.join(name)) {
            Err(_) => problems.push(format!("{name:?} beside it was deleted")),
            Ok(now) if now != *bytes => problems.push(format!("{name:?} beside it was modified")),
            Ok(_) => {}
        }
    }
    let allowed = |name: &OsString| {
        let name = name.to_string_lossy();
        let file = path.file_name().unwrap().to_string_lossy();
        match beside {
            Beside::Nothing => false,
            Beside::LockFileOnly => name == format!("{file}.lock"),
            Beside::LockFileAndShm => {
                name == format!("{file}.lock") || name == format!("{file}-shm")
            }
        }
    };
    let new: Vec<_> = after
        .difference(&before.entries)
        .filter(|n| !allowed(n))
        .collect();
    if !new.is_empty() {
        problems.push(format!("{new:?} appeared beside it (allowed: {beside:?})"));
    }
    assert!(
        problems.is_empty(),
        "a refused open did not leave {} alone: {}",
        path.display(),
        problems.join("; ")
    );
}

/// Where two byte strings first differ (the shorter length when one is a prefix).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Asserts that the message is one line of reasonable length, names `path` if given, and
/// contains `advice` (what to do, or the precise reason).
fn assert_message(err: &Error, path: Option<&Path>, advice: &str) {
    let text = err.to_string();
    assert!(
        !text.contains(['\n', '\r']),
        "the message spans several lines: {text:?}"
    );
    let path_len = path.map_or(0, |p| p.as_os_str().len());
    assert!(
        text.len() <= 400 + path_len,
        "the message is {} bytes long: {text:?}",
        text.len()
    );
    if let Some(path) = path {
        let shown = path.display().to_string();
        assert!(
            text.contains(&shown),
            "the message does not name the path {shown:?}: {text:?}"
        );
    }
    assert!(
        text.contains(advice),
        "the message does not say {advice:?}: {text:?}"
    );
}

/// Asserts an `Error::Open` for `path` that says why: what portdaddy found wrong in its
/// message, or a lower-level cause, which it returns as its source and does not repeat in
/// its message.
fn assert_open_error(err: &Error, path: &Path) {
    let Error::Open {
        path: reported,
        reason,
        ..
    } = err
    else {
        panic!("expected Error::Open for {}, got {err:?}", path.display());
    };
    assert_eq!(reported, path);
    assert_eq!(err.path(), Some(path));
    assert!(err.is_registry_unusable(), "{err:?}");
    assert_message(err, Some(path), "cannot open the port registry");
    let text = err.to_string();
    match std::error::Error::source(err) {
        Some(source) => {
            let cause = source.to_string();
            assert!(
                !text.contains(&cause),
                "{text:?} repeats its cause {cause:?}"
            );
            assert_eq!(common::chain(err), format!("{text}: {cause}"));
        }
        None => {
            let reason = reason
                .as_deref()
                .expect("Error::Open says why: a reason or a cause");
            assert!(text.ends_with(reason), "{text:?} does not say {reason:?}");
        }
    }
}

/// Asserts an `Error::Corrupt` for `path`, whose message says the file was left alone and
/// what to do.
fn assert_corrupt(err: &Error, path: &Path) {
    let Error::Corrupt {
        path: reported,
        detail,
        ..
    } = err
    else {
        panic!(
            "expected Error::Corrupt for {}, got {err:?}",
            path.display()
        );
    };
    assert_eq!(reported, path);
    assert!(!detail.is_empty());
    assert_message(err, Some(path), "move it away or set PORTDADDY_DB");
    assert!(err.to_string().contains("left untouched"), "{err}");
}

/// A deterministic pseudo-random byte string (xorshift), never starting like an SQLite file.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    bytes[0] = 0xFF;
    bytes
}

/// Makes a real registry at `path` with detached leases and remembered names, closes every
/// handle, folds the WAL into the file and returns its bytes.
fn make_registry(path: &Path) -> Vec<u8> {
    {
        let registry = open_at(path).expect("open a new registry");
        for name in ["api", "web", "db", "cache"] {
            registry.acquire(name).unwrap().keep().unwrap();
        }
        // Names remembered without a lease.
        let released = registry.acquire_many(&["queue", "ünïcødé"]).unwrap();
        drop(released);
        assert_eq!(registry.list().unwrap().len(), 4);
    }
    common::fold_wal(path);
    let bytes = fs::read(path).unwrap();
    assert_eq!(&bytes[..16], b"SQLite format 3\0");
    assert_eq!(
        bytes[APPLICATION_ID_OFFSET..APPLICATION_ID_OFFSET + 4],
        PORTDADDY_APP_ID
    );
    bytes
}

/// A fresh directory holding `bytes` as `registry.sqlite3`.
fn registry_file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let (dir, path) = temp_registry();
    fs::write(&path, bytes).unwrap();
    (dir, path)
}

// ---------------------------------------------------------------------------------------------
// Names and requests
// ---------------------------------------------------------------------------------------------

/// An in-memory registry and a file registry, to check that both backends refuse alike.
fn both_backends() -> (tempfile::TempDir, Vec<PortDaddy>) {
    let (dir, path) = temp_registry();
    let file = open_at(&path).expect("open a file registry");
    (dir, vec![memory(FIRST..=LAST), file])
}

fn assert_invalid_name(registry: &PortDaddy, name: &str, advice: &str) -> Error {
    let err = match registry.acquire(name) {
        Ok(guard) => panic!("{name:?} was accepted: {guard:?}"),
        Err(e) => e,
    };
    let Error::InvalidName {
        name: shown,
        reason,
        ..
    } = &err
    else {
        panic!("expected Error::InvalidName for {name:?}, got {err:?}");
    };
    assert!(!reason.is_empty());
    assert!(
        shown.starts_with('"'),
        "the name is quoted in the message: {shown}"
    );
    assert_message(&err, None, advice);
    // Control characters are escaped, so a name cannot break or colour a terminal line.
    assert!(
        !err.to_string().chars().any(char::is_control),
        "raw control characters in {:?}",
        err.to_string()
    );
    assert!(
        registry.list().unwrap().is_empty(),
        "an invalid name leased a port"
    );
    err
}

#[test]
fn an_empty_name_is_invalid() {
    let (_dir, registries) = both_backends();
    for registry in &registries {
        let err = assert_invalid_name(registry, "", "must not be empty");
        assert!(err.to_string().contains("\"\""), "{err}");
    }
}

#[test]
fn a_name_over_128_bytes_is_invalid_and_128_bytes_is_fine() {
    assert_eq!(MAX_NAME_LEN, 128);
    let (_dir, registries) = both_backends();
    for registry in &registries {
        assert_invalid_name(registry, &"x".repeat(129), "at most 128 bytes");
        // Bytes count, not characters: 65 two-byte characters are 130 bytes.
        assert_invalid_name(registry, &"é".repeat(65), "at most 128 bytes");
        assert_invalid_name(
            registry,
            &format!("a{}", "é".repeat(64)),
            "at most 128 bytes",
        );
        for ok in ["x".repeat(128), "é".repeat(64)] {
            let guard = registry
                .acquire(&ok)
                .unwrap_or_else(|e| panic!("{} bytes refused: {e}", ok.len()));
            assert_eq!(guard.name(), ok);
        }
    }
}

#[test]
fn a_one_megabyte_name_gives_a_short_message() {
    let (_dir, registries) = both_backends();
    let huge = "y".repeat(1 << 20);
    for registry in &registries {
        let err = assert_invalid_name(registry, &huge, "at most 128 bytes");
        let text = err.to_string();
        assert!(text.len() < 200, "{} bytes: {text}", text.len());
        assert!(
            text.contains("1048576 bytes"),
            "the message gives the real length: {text}"
        );
    }
}

#[test]
fn names_with_control_characters_are_invalid() {
    let (_dir, registries) = both_backends();
    let bad = [
        "line\nbreak",
        "carriage\rreturn",
        "nul\0byte",
        "\u{1b}[31mred\u{1b}[0m",
        "\u{1b}]0;title\u{7}",
        "tab\there",
        "delete\u{7f}",
        "next-line\u{85}",
        "\n",
    ];
    for registry in &registries {
        for name in bad {
            assert_invalid_name(registry, name, "must not contain control characters");
        }
    }
}

#[test]
fn a_bad_name_in_a_batch_leases_nothing() {
    let (_dir, registries) = both_backends();
    for registry in &registries {
        let err = registry
            .acquire_many(&["fine", "also-fine", "bad\nname"])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
        assert!(
            registry.list().unwrap().is_empty(),
            "the batch leased ports before failing"
        );
    }
}

#[test]
fn a_unicode_name_works_and_is_remembered() {
    let (_dir, path) = temp_registry();
    let name = "ünïcødé service #2 🚀 日本語 ∑";
    let port = {
        let registry = open_at(&path).unwrap();
        let guard = registry.acquire(name).unwrap();
        assert_eq!(guard.name(), name);
        let listed = registry.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name(), name);
        guard.port()
    };
    // Stored and read back exactly: the reopened registry gives the name its port again.
    let registry = open_at(&path).unwrap();
    let _other = registry.acquire("someone-else").unwrap();
    assert_eq!(registry.acquire(name).unwrap().port(), port);
}

fn assert_invalid_request(registry: &PortDaddy, request: Request, advice: &str) {
    let err = match registry.acquire_with(&request) {
        Ok(guard) => panic!("{request:?} was accepted: {guard:?}"),
        Err(e) => e,
    };
    assert!(
        matches!(err, Error::InvalidRequest { .. }),
        "{request:?}: expected InvalidRequest, got {err:?}"
    );
    assert_message(&err, None, advice);
    assert!(registry.list().unwrap().is_empty());
}

#[test]
fn port_zero_and_a_zero_ttl_are_invalid_requests() {
    let (_dir, registries) = both_backends();
    for registry in &registries {
        assert_invalid_request(
            registry,
            Request::new("a").preferred(0),
            "leave the preference out",
        );
        assert_invalid_request(
            registry,
            Request::new("a").require(0),
            "leave the preference out",
        );
        assert_invalid_request(
            registry,
            Request::new("a").ttl(Duration::ZERO),
            "give a positive TTL",
        );
        // A batch with one bad request leases nothing.
        let batch = [Request::new("ok"), Request::new("b").ttl(Duration::ZERO)];
        let err = registry.acquire_many_with(&batch).unwrap_err();
        assert!(matches!(err, Error::InvalidRequest { .. }), "{err:?}");
        assert!(registry.list().unwrap().is_empty());
        // Below the registry's resolution of 1 ms a TTL would expire at once; 1 ms is fine.
        assert_invalid_request(
            registry,
            Request::new("a").ttl(Duration::from_nanos(1)),
            "at least 1ms",
        );
        let _guard = registry
            .acquire_with(&Request::new("a").ttl(Duration::from_millis(1)))
            .unwrap();
    }
}

#[test]
fn requiring_a_reserved_port_is_refused_with_the_reason() {
    let registry = PortDaddy::builder()
        .in_memory()
        .range(FIRST..=LAST)
        .reserve([23510])
        .port_probe(all_free)
        .open()
        .unwrap();
    let err = registry
        .acquire_with(&Request::new("a").require(23510))
        .unwrap_err();
    let Error::PortUnavailable { port, .. } = &err else {
        panic!("expected PortUnavailable, got {err:?}")
    };
    assert_eq!(*port, 23510);
    assert_message(&err, None, "reserved");
    // Preferring it merely falls back to another port.
    assert_ne!(
        registry
            .acquire_with(&Request::new("a").preferred(23510))
            .unwrap()
            .port(),
        23510
    );
}

// ---------------------------------------------------------------------------------------------
// Ranges
// ---------------------------------------------------------------------------------------------

/// Opens a file registry over `start..=end` at a path that does not exist yet, expecting
/// `InvalidRange`, and checks that nothing was created.
fn assert_invalid_range(start: u16, end: u16, reserved: &[u16], advice: &str) {
    let (dir, path) = temp_registry();
    let result = PortDaddy::builder()
        .path(&path)
        .range(start..=end)
        .reserve(reserved.iter().copied())
        .open();
    let err = match result {
        Ok(registry) => panic!("{start}-{end} reserving {reserved:?} was accepted: {registry:?}"),
        Err(e) => e,
    };
    let Error::InvalidRange {
        start: s, end: e, ..
    } = &err
    else {
        panic!("{start}-{end}: expected InvalidRange, got {err:?}");
    };
    assert_eq!(
        (*s, *e),
        (start, end),
        "the error gives the range as passed"
    );
    assert_message(&err, None, advice);
    assert!(err.to_string().contains(&format!("{start}-{end}")), "{err}");
    assert!(
        entries(dir.path()).is_empty(),
        "an invalid range still created files: {:?}",
        entries(dir.path())
    );
    // The in-memory registry refuses it the same way.
    let memory = PortDaddy::builder()
        .in_memory()
        .range(start..=end)
        .reserve(reserved.iter().copied())
        .open();
    assert!(
        matches!(memory, Err(Error::InvalidRange { .. })),
        "{memory:?}"
    );
}

#[test]
fn a_reversed_range_is_invalid() {
    assert_invalid_range(LAST, FIRST, &[], "give the lower port first");
    assert_invalid_range(FIRST + 1, FIRST, &[], "give the lower port first");
    assert!(matches!(
        PortRange::new(LAST, FIRST),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        PortRange::try_from(std::ops::RangeInclusive::new(LAST, FIRST)),
        Err(Error::InvalidRange { .. })
    ));
}

#[test]
fn a_range_starting_at_port_zero_is_invalid() {
    assert_invalid_range(0, FIRST, &[], "start at 1");
    assert_invalid_range(0, 0, &[], "start at 1");
    assert!(matches!(
        PortRange::new(0, FIRST),
        Err(Error::InvalidRange { .. })
    ));
}

#[test]
fn a_range_made_only_of_reserved_ports_is_invalid() {
    assert_invalid_range(
        FIRST,
        FIRST + 2,
        &[FIRST, FIRST + 1, FIRST + 2],
        "widen the range or reserve fewer",
    );
    assert_invalid_range(
        FIRST,
        FIRST,
        &[FIRST, FIRST + 7],
        "widen the range or reserve fewer",
    );
    // One unreserved port is enough, and it is the one handed out.
    let registry = PortDaddy::builder()
        .in_memory()
        .range(FIRST..=FIRST + 2)
        .reserve([FIRST, FIRST + 2])
        .port_probe(all_free)
        .open()
        .unwrap();
    assert_eq!(registry.acquire("only").unwrap().port(), FIRST + 1);
}

// ---------------------------------------------------------------------------------------------
// Registry paths
// ---------------------------------------------------------------------------------------------

#[test]
fn a_directory_as_the_registry_path_is_an_open_error() {
    let (dir, path) = temp_registry();
    fs::create_dir(&path).unwrap();
    fs::write(path.join("keep.txt"), b"mine").unwrap();
    let err = open_err(&path);
    assert_open_error(&err, &path);
    let said = err.to_string();
    assert!(said.contains("give a file path"), "{said}");
    assert_eq!(
        entries(dir.path()),
        BTreeSet::from([OsString::from("registry.sqlite3")]),
        "files were created beside the directory"
    );
    assert_eq!(
        entries(&path),
        BTreeSet::from([OsString::from("keep.txt")]),
        "files were created inside the directory"
    );
}

#[test]
fn a_path_below_a_regular_file_is_an_open_error() {
    let (dir, _) = temp_registry();
    let file = dir.path().join("plain.txt");
    fs::write(&file, b"not a directory").unwrap();
    let path = file.join("registry.sqlite3");
    let err = open_err(&path);
    assert_open_error(&err, &path);
    assert_eq!(fs::read(&file).unwrap(), b"not a directory");
    assert_eq!(
        entries(dir.path()),
        BTreeSet::from([OsString::from("plain.txt")])
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_path_where_even_root_cannot_create_files_is_an_open_error() {
    // /proc refuses new directories and files to everyone, root included.
    for path in [
        "/proc/portdaddy-test/registry.sqlite3",
        "/proc/self/registry.sqlite3",
    ] {
        let path = Path::new(path);
        let err = open_err(path);
        assert_open_error(&err, path);
        assert!(!path.exists() && !sibling(path, ".lock").exists());
    }
}

#[test]
fn an_empty_path_is_an_open_error() {
    let err = open_err(Path::new(""));
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    let said = err.to_string();
    assert!(said.contains("names no file"), "{said}");
    // Refused before anything was created: a lock file for "" would land in the working
    // directory.
    assert!(
        !Path::new(".lock").exists(),
        "a lock file appeared in the working directory"
    );
    assert!(!err.to_string().contains('\n'));
}

#[cfg(unix)]
#[test]
fn a_path_with_a_nul_byte_is_an_open_error() {
    let (dir, _) = temp_registry();
    let path = dir.path().join("regi\0stry.sqlite3");
    let err = open_err(&path);
    assert!(
        matches!(&err, Error::Open { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert!(std::error::Error::source(&err).is_some());
    assert!(entries(dir.path()).is_empty());
}

#[cfg(unix)]
#[test]
fn a_dangling_symlink_is_an_open_error() {
    let (dir, path) = temp_registry();
    std::os::unix::fs::symlink(dir.path().join("nowhere/registry.sqlite3"), &path).unwrap();
    let err = open_err(&path);
    assert_open_error(&err, &path);
    assert!(
        !dir.path().join("nowhere").exists(),
        "the symlink's target directory was created"
    );
}

#[cfg(unix)]
#[test]
fn a_unix_socket_at_the_registry_path_is_an_open_error() {
    let (_dir, path) = temp_registry();
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let err = open_err(&path);
    assert_open_error(&err, &path);
}

#[cfg(unix)]
#[test]
fn a_fifo_at_the_registry_path_is_refused_without_hanging() {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::mpsc;

    let (_dir, path) = temp_registry();
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");

    let (tx, rx) = mpsc::channel();
    let opener = {
        let path = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(open_at(&path).map(drop));
        })
    };
    let outcome = match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(result) => Some(result),
        Err(_) => {
            // The open is stuck reading the FIFO. Feed it non-SQLite bytes so that the thread
            // finishes instead of leaking, then report the hang.
            let mut writer = fs::OpenOptions::new().write(true).open(&path).unwrap();
            writer
                .write_all(b"unblock: this is not an SQLite database")
                .unwrap();
            drop(writer);
            let _ = rx.recv_timeout(Duration::from_secs(10));
            None
        }
    };
    opener.join().expect("the opening thread panicked");
    let result = outcome.unwrap_or_else(|| {
        panic!(
            "PortDaddy::open on a FIFO at {} blocked for over 2 s: it reads the FIFO waiting for \
             a writer instead of refusing a path that is not a regular file",
            path.display()
        )
    });
    let err = result.expect_err("a FIFO is not a registry");
    assert!(
        matches!(err, Error::Open { .. } | Error::Corrupt { .. }),
        "{err:?}"
    );
    assert_message(&err, Some(&path), "");
}

#[cfg(unix)]
#[test]
fn a_directory_we_may_not_write_is_an_open_error() {
    use std::os::unix::fs::PermissionsExt;
    if is_root() {
        println!("skipped: running as root, which may create files in a 0o500 directory");
        return;
    }
    let (dir, _) = temp_registry();
    let locked = dir.path().join("locked");
    fs::create_dir(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).unwrap();
    let path = locked.join("registry.sqlite3");
    let err = open_err(&path);
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
    assert_open_error(&err, &path);
    assert!(entries(&locked).is_empty());
}

#[cfg(unix)]
#[test]
fn a_registry_file_we_may_not_read_or_write_is_an_open_error() {
    use std::os::unix::fs::PermissionsExt;
    if is_root() {
        println!("skipped: running as root, which reads and writes a 0o000 or 0o400 file anyway");
        return;
    }
    for mode in [0o000, 0o400, 0o200] {
        let (_dir, path) = temp_registry();
        make_registry(&path);
        let before = snapshot(&path);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = open_err(&path);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_open_error(&err, &path);
        assert_untouched(&path, &before, Beside::Nothing);
    }
}

// ---------------------------------------------------------------------------------------------
// Files that are not (usable) registries
// ---------------------------------------------------------------------------------------------

#[test]
fn random_bytes_are_corrupt_and_left_untouched() {
    for bytes in [noise(8192), noise(3), noise(100)] {
        let (_dir, path) = registry_file_with(&bytes);
        let before = snapshot(&path);
        let err = open_err(&path);
        assert_corrupt(&err, &path);
        assert_untouched(&path, &before, Beside::Nothing);
    }
}

#[test]
fn a_text_file_is_corrupt_and_left_untouched() {
    let texts: [&[u8]; 3] = [
        b"# my notes\nport = 8080\n",
        b"SQLite",
        b"SQLite format 2\0 and more text",
    ];
    for text in texts {
        let (_dir, path) = registry_file_with(text);
        let before = snapshot(&path);
        let err = open_err(&path);
        assert_corrupt(&err, &path);
        assert!(err.to_string().contains("not an SQLite database"), "{err}");
        assert_untouched(&path, &before, Beside::Nothing);
    }
}

#[test]
fn the_sqlite_magic_alone_is_corrupt_and_left_untouched() {
    let (_dir, path) = registry_file_with(b"SQLite format 3\0");
    let before = snapshot(&path);
    let err = open_err(&path);
    assert_corrupt(&err, &path);
    assert_untouched(&path, &before, Beside::LockFileOnly);
}

/// Creates an SQLite database of another application at `path` with `setup`, closing it.
fn foreign_database(path: &Path, setup: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(setup).unwrap();
    conn.close().map_err(|(_, e)| e).unwrap();
}

#[test]
fn another_applications_database_is_corrupt_and_left_untouched() {
    let cases = [
        (
            "rollback journal, application_id set",
            "PRAGMA application_id = 1234; PRAGMA user_version = 7;
             CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('theirs');",
        ),
        (
            "rollback journal, no application_id",
            "CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('theirs');",
        ),
        ("no tables, only a user_version", "PRAGMA user_version = 3;"),
        (
            "WAL mode",
            "PRAGMA journal_mode = WAL; PRAGMA application_id = 1234;
             CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('theirs');",
        ),
    ];
    for (what, setup) in cases {
        let (_dir, path) = temp_registry();
        foreign_database(&path, setup);
        let before = snapshot(&path);
        let err = open_err(&path);
        assert!(matches!(err, Error::Corrupt { .. }), "{what}: {err:?}");
        assert_corrupt(&err, &path);
        assert!(
            err.to_string().contains("another application"),
            "{what}: {err}"
        );
        assert_untouched(&path, &before, Beside::LockFileOnly);
    }
}

#[test]
fn another_applications_database_with_a_pending_wal_is_left_untouched() {
    // Another application's WAL database whose last commits are still in `-wal` (it crashed,
    // or was copied while open). Reading it is fine; checkpointing that WAL into the file
    // and deleting it when our connection closes is not.
    let (src_dir, src) = temp_registry();
    let conn = rusqlite::Connection::open(&src).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; PRAGMA application_id = 1234;
         CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('theirs');",
    )
    .unwrap();
    let (_dir, path) = temp_registry();
    fs::copy(&src, &path).unwrap();
    fs::copy(sibling(&src, "-wal"), sibling(&path, "-wal")).unwrap();
    drop(conn);
    drop(src_dir);

    let before = snapshot(&path);
    let err = open_err(&path);
    assert_corrupt(&err, &path);
    assert_untouched(&path, &before, Beside::LockFileAndShm);
}

#[test]
fn another_applications_database_with_a_hot_journal_is_left_untouched() {
    // Another application crashed in the middle of a rollback-journal transaction that had
    // already spilled pages into the file: the `-journal` is hot. Rolling it back is that
    // application's business; a refused open must not do it.
    let (src_dir, src) = temp_registry();
    let conn = rusqlite::Connection::open(&src).unwrap();
    conn.execute_batch(
        "PRAGMA application_id = 1234; CREATE TABLE notes (body BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)
         INSERT INTO notes SELECT zeroblob(400) FROM n;
         PRAGMA cache_size = 1; BEGIN; UPDATE notes SET body = randomblob(400);",
    )
    .unwrap();
    let (_dir, path) = temp_registry();
    fs::copy(&src, &path).unwrap();
    fs::copy(sibling(&src, "-journal"), sibling(&path, "-journal")).unwrap();
    drop(conn);
    drop(src_dir);

    let before = snapshot(&path);
    let err = open_err(&path);
    assert_corrupt(&err, &path);
    assert_untouched(&path, &before, Beside::LockFileOnly);
}

#[test]
fn a_truncated_registry_is_corrupt_and_left_untouched() {
    let (_src_dir, src) = temp_registry();
    let full = make_registry(&src);
    let page = match u16::from_be_bytes([full[PAGE_SIZE_OFFSET], full[PAGE_SIZE_OFFSET + 1]]) {
        1 => 65536,
        n => usize::from(n),
    };
    let len = full.len();
    assert!(
        len > 4096 && len.is_multiple_of(page),
        "a registry of {len} bytes with {page}-byte pages"
    );
    let mut offsets = vec![10, 50, 100, 4096, len / 2, len - page, len - 1];
    offsets.sort_unstable();
    offsets.dedup();

    let mut observed = Vec::new();
    for at in offsets {
        let (_dir, path) = registry_file_with(&full[..at]);
        let before = snapshot(&path);
        match open_at(&path) {
            Err(err) => {
                observed.push(format!("{at}: Corrupt ({err})"));
                assert_corrupt(&err, &path);
                // Below the 16-byte magic the file is refused before SQLite opens it.
                let beside = if at < 16 {
                    Beside::Nothing
                } else {
                    Beside::LockFileOnly
                };
                assert_untouched(&path, &before, beside);
            }
            Ok(registry) => {
                // Only acceptable if no page is missing and SQLite really reads everything.
                observed.push(format!("{at}: opened and works"));
                assert!(
                    at > len - page,
                    "truncated at {at} of {len} bytes (whole pages missing) but opened: {registry:?}"
                );
                let leases = registry
                    .list()
                    .unwrap_or_else(|e| panic!("truncated at {at}: list: {e}"));
                assert_eq!(leases.len(), 4, "truncated at {at}: leases lost");
                let _guard = registry
                    .acquire("after-truncation")
                    .unwrap_or_else(|e| panic!("truncated at {at}: {e}"));
            }
        }
    }
    println!(
        "registry of {len} bytes truncated at:\n  {}",
        observed.join("\n  ")
    );
}

/// Marks the registry at `path` as needing a reader of format generation `generation`, as a
/// newer portdaddy whose change alters how ports or owners are judged would.
fn demand_reader(conn: &rusqlite::Connection, generation: i64) {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('min_reader_version', ?1)",
        [generation],
    )
    .unwrap();
}

#[test]
fn a_registry_from_the_future_is_refused_and_left_untouched() {
    let (_src_dir, src) = temp_registry();
    make_registry(&src);
    demand_reader(&rusqlite::Connection::open(&src).unwrap(), 2);
    let (_dir, path) = registry_file_with(&fs::read(&src).unwrap());
    let before = snapshot(&path);
    let err = open_err(&path);
    let Error::SchemaTooNew {
        path: reported,
        required,
        supported,
        ..
    } = &err
    else {
        panic!("expected SchemaTooNew, got {err:?}");
    };
    assert_eq!(reported, &path);
    assert_eq!(*required, 2);
    assert_eq!(*supported, 1);
    assert!(std::error::Error::source(&err).is_none());
    assert_message(
        &err,
        Some(&path),
        "upgrade portdaddy in this project, or set PORTDADDY_DB to use another registry",
    );
    assert!(err.to_string().contains("min_reader_version"), "{err}");
    assert_untouched(&path, &before, Beside::LockFileOnly);
}

#[test]
fn a_registry_from_the_future_with_a_pending_wal_is_left_untouched() {
    // A newer portdaddy marked it and died before its WAL was checkpointed.
    let (_src_dir, src) = temp_registry();
    make_registry(&src);
    let conn = rusqlite::Connection::open(&src).unwrap();
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")
        .unwrap();
    demand_reader(&conn, 999);
    let (_dir, path) = temp_registry();
    fs::copy(&src, &path).unwrap();
    fs::copy(sibling(&src, "-wal"), sibling(&path, "-wal")).unwrap();
    drop(conn);

    let before = snapshot(&path);
    let err = open_err(&path);
    assert!(
        matches!(err, Error::SchemaTooNew { required: 999, .. }),
        "{err:?}"
    );
    assert_untouched(&path, &before, Beside::LockFileAndShm);
}

#[test]
fn a_negative_user_version_is_refused_and_left_untouched() {
    // user_version is a signed 32-bit integer; -1 is no schema portdaddy ever wrote.
    let (_src_dir, src) = temp_registry();
    let mut bytes = make_registry(&src);
    bytes[USER_VERSION_OFFSET..USER_VERSION_OFFSET + 4].copy_from_slice(&(-1i32).to_be_bytes());
    let (_dir, path) = registry_file_with(&bytes);
    let before = snapshot(&path);
    let err = open_err(&path);
    assert!(
        matches!(err, Error::SchemaTooNew { .. } | Error::Corrupt { .. }),
        "{err:?}"
    );
    println!("user_version -1 gives: {err}");
    assert_message(&err, Some(&path), "");
    assert_untouched(&path, &before, Beside::LockFileOnly);
}

#[test]
fn a_registry_missing_a_table_gives_a_typed_error_naming_the_path() {
    let (_dir, path) = temp_registry();
    make_registry(&path);
    foreign_database(&path, "DROP TABLE leases;");
    let err = match open_at(&path) {
        Err(err) => err,
        Ok(registry) => registry
            .acquire("a")
            .expect_err("a registry without its leases table worked"),
    };
    println!("a registry without its leases table gives: {err:?}");
    assert!(
        matches!(err, Error::Corrupt { .. } | Error::Registry { .. }),
        "{err:?}"
    );
    assert_message(&err, Some(&path), "");
}

#[test]
fn a_zero_length_file_is_initialised_as_a_new_registry() {
    let (_dir, path) = temp_registry();
    fs::File::create(&path).unwrap();
    let port = {
        let registry = open_at(&path).expect("an empty file is a new registry");
        let lease = registry.acquire("first").unwrap().keep().unwrap();
        assert_eq!(registry.list().unwrap().len(), 1);
        lease.port()
    };
    common::fold_wal(&path);
    let bytes = fs::read(&path).unwrap();
    assert_eq!(&bytes[..16], b"SQLite format 3\0");
    assert_eq!(
        bytes[APPLICATION_ID_OFFSET..APPLICATION_ID_OFFSET + 4],
        PORTDADDY_APP_ID
    );
    let registry = open_at(&path).unwrap();
    let leases = registry.list().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].name(), leases[0].port()), ("first", port));
}

#[test]
fn an_empty_sqlite_database_is_initialised_as_a_new_registry() {
    // No tables, no application_id, no user_version: as good as new (open sequence, step 3).
    let (_dir, path) = temp_registry();
    foreign_database(&path, "CREATE TABLE t (x); DROP TABLE t; VACUUM;");
    assert!(fs::metadata(&path).unwrap().len() > 0);
    let registry = open_at(&path).expect("an empty SQLite database is a new registry");
    let guard = registry.acquire("first").unwrap();
    assert!((FIRST..=LAST).contains(&guard.port()));
}
