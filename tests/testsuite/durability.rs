//! What a commit wrote survives the process that wrote it, now that no connection
//! checkpoints when it closes: the write-ahead log and its index stay beside the registry,
//! after a process killed with `SIGKILL` right after its commit as after one that exited
//! normally, and the next process finds every lease. An open that finds a long log copies
//! it into the file, so that what a fresh process reads stays short.

use crate::common;
use crate::common::sibling;

use std::ops::RangeInclusive;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::all_free;
use common::workers::{parse_range, say, var, wait_for_eof, Worker, MODE, RANGE, REGISTRY};
use portdaddy::{Lease, PortDaddy};

const PORTS: RangeInclusive<u16> = 32950..=32999;

/// The length (in bytes) past which an open folds the log into the file, as the store
/// sets it: 64 frames of a 4 KiB page and its 24-byte header, after the log's 32-byte header.
const WAL_TRIM_BYTES: u64 = 64 * (4096 + 24) + 32;

fn open_at(path: &Path, range: &RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(range.clone())
        .port_probe(all_free)
        .lock_timeout(Duration::from_secs(10))
        .open()
        .expect("open the registry")
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The checkpoint sequence number in a write-ahead log's header (bytes 12-15, big-endian),
/// which SQLite increments each time it starts the log over.
fn checkpoint_sequence(wal: &Path) -> u32 {
    let header = std::fs::read(wal).expect("read the log");
    u32::from_be_bytes(header[12..16].try_into().expect("a log header"))
}

fn lease<'a>(leases: &'a [Lease], name: &str) -> &'a Lease {
    leases
        .iter()
        .find(|l| l.name() == name)
        .unwrap_or_else(|| panic!("no lease named {name:?} in {leases:?}"))
}

/// Starts a `commit` worker on `path` and waits for its `COMMITTED` line: the ports of its
/// detached lease and of the lease it holds.
fn committed_worker(path: &Path) -> (Worker, u16, u16) {
    let worker = Worker::spawn("committer", "commit", path, &PORTS, &[]);
    let line = worker.expect_line("COMMITTED", deadline());
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("COMMITTED"), "{line}");
    let mut port = || words.next().and_then(|p| p.parse().ok()).expect(&line);
    let (kept, held) = (port(), port());
    (worker, kept, held)
}

/// Asserts that the registry at `path` passes SQLite's own check. Read-only, so that the
/// connection leaves the log as it is.
fn assert_intact(path: &Path) {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn a_lease_committed_just_before_a_sigkill_is_kept() {
    let (_dir, path) = common::temp_registry();
    let (mut worker, kept, held) = committed_worker(&path);
    let pid = worker.pid();
    let status = worker.kill();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // Nothing closed the log: the leases are in it, not yet in the file.
    assert!(
        len(&sibling(&path, "-wal")) > 0,
        "the killed process left no write-ahead log"
    );
    // This process had no connection: it rebuilds the log's index, as any fresh process.
    let registry = open_at(&path, &PORTS);
    let leases = registry.list().unwrap();
    let detached = lease(&leases, "kept");
    assert_eq!((detached.port(), detached.is_detached()), (kept, true));
    let owned = lease(&leases, "held");
    assert_eq!((owned.port(), owned.pid()), (held, Some(pid)));
    drop(registry);
    assert_intact(&path);
}

#[test]
fn a_process_that_exits_leaves_the_log_and_every_lease() {
    let (_dir, path) = common::temp_registry();
    let (mut worker, kept, _) = committed_worker(&path);
    worker.close_stdin();
    let (lines, status) = worker.finish(deadline());
    assert!(status.success(), "the worker failed: {status}");
    assert_eq!(lines, ["RELEASED"]);
    for suffix in ["-wal", "-shm"] {
        assert!(
            sibling(&path, suffix).exists(),
            "the last process to close the registry removed its {suffix}"
        );
    }
    let registry = open_at(&path, &PORTS);
    let leases = registry.list().unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(lease(&leases, "kept").port(), kept);
    drop(registry);
    assert_intact(&path);
}

#[test]
fn an_open_folds_a_long_log_into_the_file() {
    let (_dir, path) = common::temp_registry();
    let wal = sibling(&path, "-wal");
    let kept = {
        let registry = open_at(&path, &PORTS);
        let kept = registry.acquire("kept").unwrap().keep().unwrap();
        // Two pages a commit: far past the length an open folds.
        for _ in 0..60 {
            drop(registry.acquire("churn").unwrap());
        }
        kept
    };
    let long = len(&wal);
    assert!(long > WAL_TRIM_BYTES, "the log is only {long} bytes long");
    let sequence_before = checkpoint_sequence(&wal);
    // A new registry's file holds its whole schema from the start, so the copy changes the
    // file's pages rather than its length.
    let file_before = std::fs::read(&path).unwrap();
    let registry = open_at(&path, &PORTS);
    assert!(
        std::fs::read(&path).unwrap() != file_before,
        "the open copied nothing into the file"
    );
    // The next commit starts the log over from its first frame, in place: the log's header
    // counts one more restart, and the file is not cut short (a log that had to grow again
    // page by page would cost every commit a block allocation).
    drop(registry.acquire("churn").unwrap());
    assert_eq!(
        checkpoint_sequence(&wal),
        sequence_before.wrapping_add(1),
        "the log was not started over"
    );
    assert_eq!(len(&wal), long, "the log was cut short");
    let leases = registry.list().unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(lease(&leases, "kept").port(), kept.port());
    drop(registry);
    assert_intact(&path);
}

/// Worker processes started by the tests above.
#[test]
fn worker_entry() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let path = std::path::PathBuf::from(var(REGISTRY));
    let range = parse_range(&var(RANGE));
    match mode.as_str() {
        "commit" => commit_worker(&open_at(&path, &range)),
        other => panic!("unknown worker mode {other:?}"),
    }
}

/// Leases a port detached (`kept`) and one it holds (`held`), reports `COMMITTED <kept>
/// <held>`, then holds until stdin ends, releases `held` and reports `RELEASED`.
fn commit_worker(registry: &PortDaddy) {
    let kept = registry.acquire("kept").expect("acquire").keep().unwrap();
    let held = registry.acquire("held").expect("acquire");
    say(&format!("COMMITTED {} {}", kept.port(), held.port()));
    wait_for_eof();
    drop(held);
    say("RELEASED");
}
