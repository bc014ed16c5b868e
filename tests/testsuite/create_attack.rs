//! Creating a registry, and opening one cheaply, on a hostile host: files put at the
//! registry's path at the worst moments, files that power loss or a crash could leave, and
//! many creators at once, some of them killed.
//!
//! # Stopping a process at a named point
//!
//! A worker is held in a system call on the registry's path with `strace -P <path> -e
//! inject=openat:delay_exit=…:when=N` (the `N`th `openat` of that path, held right after it
//! returned) until the test kills `strace`, which lets it go on. Where `strace` is missing
//! those tests skip.
//!
//! # Workers
//!
//! A worker is this binary run again with `create_attack::worker_entry` selected (see
//! `common::workers`): it says `PID <pid>`, waits for a line on stdin, opens the registry,
//! leases one port and keeps it, and says `PORT <port>` or `ERR <variant> <message>`.
//!
//! # Ports
//!
//! This file owns 33350-33399 (see `common/mod.rs`); the port probe says every port is
//! free, so that only the registry keeps the workers apart, and no port is bound.

use std::fs;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;
use crate::common::workers::{parse_range, read_line, say, var, Worker, MODE, RANGE, REGISTRY};

const RANGE_USED: RangeInclusive<u16> = 33350..=33399;

/// How long any wait on a worker or a condition may take.
const DEADLINE: Duration = Duration::from_secs(60);

fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

// ---------------------------------------------------------------------------------------------
// A file put at the path while a creator holds the lock
// ---------------------------------------------------------------------------------------------

/// A database of another program, in rollback mode with a hot journal, put at the path
/// after the creator checked it under the lock and found nothing, and before it creates the
/// registry: it is checked before SQLite opens it (which would roll the journal back into
/// it), refused, and left exactly as it was, journal and all.
#[test]
fn a_foreign_database_put_at_the_path_after_the_check_is_refused_and_left_as_it_was() {
    let Some(strace) = strace() else { return };
    let (dir, path) = common::temp_registry();
    let (foreign, journal) = foreign_database_with_hot_journal(dir.path());
    let (foreign_bytes, journal_bytes) = (fs::read(&foreign).unwrap(), fs::read(&journal).unwrap());
    let log = dir.path().join("strace.log");
    // The second `openat` of the path is the check under the lock (the first is the one
    // before the lock): held right after it found nothing.
    let mut creator = spawn_creator("creator", &path, |c| {
        hold_at_open_of(c, &strace, &path, 2, &log)
    });
    let _pid = expect_pid(&creator);
    creator.send("go");
    wait_until("the creator is held after its check under the lock", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("DELAYED"))
    });
    fs::rename(&journal, common::sibling(&path, "-journal")).unwrap();
    fs::rename(&foreign, &path).unwrap();
    // Killing strace lets the creator go on.
    creator.signal(libc::SIGKILL);
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Corrupt "), "{result}");
    assert!(result.contains("another application"), "{result}");
    assert!(
        fs::read(&path).unwrap() == foreign_bytes,
        "the foreign database was changed (its journal rolled back into it)"
    );
    assert!(
        fs::read(common::sibling(&path, "-journal")).unwrap() == journal_bytes,
        "the foreign database's journal was changed"
    );
}

/// A database of another program (no application id) and a copy of its rollback journal
/// taken in the middle of a transaction that changed the file: a hot journal, which SQLite
/// rolls back into the file when it next opens it. Returns the two files, in `dir`.
fn foreign_database_with_hot_journal(dir: &Path) -> (PathBuf, PathBuf) {
    let work = dir.join("work.db");
    let conn = rusqlite::Connection::open(&work).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = DELETE; PRAGMA cache_size = 1;
         CREATE TABLE notes (body TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
         INSERT INTO notes SELECT printf('%0500d', i) FROM n;",
    )
    .unwrap();
    // A transaction larger than the cache writes into the file before it commits.
    conn.execute_batch("BEGIN; UPDATE notes SET body = upper(body) || 'x';")
        .unwrap();
    let (foreign, journal) = (dir.join("foreign.db"), dir.join("foreign.db-journal"));
    fs::copy(&work, &foreign).unwrap();
    fs::copy(common::sibling(&work, "-journal"), &journal).unwrap();
    conn.execute_batch("ROLLBACK").unwrap();
    drop(conn);
    // What makes the test able to fail: plain SQLite opening the pair changes the file.
    let (probe, probe_journal) = (dir.join("probe.db"), dir.join("probe.db-journal"));
    fs::copy(&foreign, &probe).unwrap();
    fs::copy(&journal, &probe_journal).unwrap();
    let conn = rusqlite::Connection::open(&probe).unwrap();
    conn.query_row("SELECT count(*) FROM notes", [], |r| r.get::<_, i64>(0))
        .unwrap();
    drop(conn);
    assert!(
        fs::read(&probe).unwrap() != fs::read(&foreign).unwrap(),
        "the journal is not hot: SQLite left the file as it was"
    );
    for file in [work, probe] {
        fs::remove_file(file).unwrap();
    }
    (foreign, journal)
}

// ---------------------------------------------------------------------------------------------
// Worker entry
// ---------------------------------------------------------------------------------------------

/// Not a test of its own: the entry point of worker processes (see the module docs).
#[test]
fn worker_entry() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let path = PathBuf::from(var(REGISTRY));
    let range = parse_range(&var(RANGE));
    match mode.as_str() {
        "create" => create_worker(&path, &range),
        other => panic!("unknown worker mode {other:?}"),
    }
}

/// Says `PID <pid>`, waits for a line, opens the registry, leases a port and keeps it:
/// `PORT <port>`, or `ERR <variant> <message>`.
fn create_worker(path: &Path, range: &RangeInclusive<u16>) {
    say(&format!("PID {}", std::process::id()));
    if read_line().is_none() {
        return;
    }
    let result = portdaddy::PortDaddy::builder()
        .path(path)
        .range(range.clone())
        .port_probe(common::all_free)
        .open()
        .and_then(|registry| Ok(registry.acquire("created")?.keep()?.port()));
    match result {
        Ok(port) => say(&format!("PORT {port}")),
        Err(e) => {
            let variant = format!("{e:?}");
            let variant = variant.split([' ', '{', '(']).next().unwrap_or_default();
            say(&format!("ERR {variant} {}", common::chain(&e)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn spawn_creator(
    label: impl Into<String>,
    path: &Path,
    adjust: impl FnOnce(&mut Command),
) -> Worker {
    Worker::spawn_with(label, "create", path, &RANGE_USED, &[], adjust)
}

fn expect_pid(worker: &Worker) -> u32 {
    let line = worker.expect_line("PID", deadline());
    line.strip_prefix("PID ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{}: expected PID <pid>, got {line:?}", worker.label))
}

/// Polls `condition` until it holds, failing the test at the deadline.
#[track_caller]
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let give_up = deadline();
    while !condition() {
        assert!(Instant::now() < give_up, "{what}: not before the deadline");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The path of `strace`, or `None` (with the skip printed) where it is not installed.
fn strace() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("strace"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        println!("skipped: strace is not installed, and it holds the creator at a step");
    }
    found
}

/// Runs `command` under `strace`, which holds the thread making the `nth` `openat` of
/// `path` for an hour right after the call returned, and writes what it traced to `log`
/// (the held call is marked `DELAYED` there as soon as it is held).
fn hold_at_open_of(command: &mut Command, strace: &Path, path: &Path, nth: u32, log: &Path) {
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let mut wrapped = Command::new(strace);
    wrapped
        .args(["-f", "-qq", "-o"])
        .arg(log)
        .arg("-P")
        .arg(path)
        .args(["-e", "trace=openat", "-e"])
        .arg(format!("inject=openat:delay_exit=3600000000:when={nth}"))
        .arg("--")
        .arg(program)
        .args(args);
    *command = wrapped;
}
