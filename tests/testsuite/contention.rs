//! What a claim and a release cost other processes: the pages each transaction writes to
//! the write-ahead log. Every page is a frame of the log, written and checksummed at commit
//! while the registry's lock is held, and copied into the file at the next checkpoint (two
//! `fsync`s, also under the lock), so the pages per transaction set both how long the lock
//! is held and how often a checkpoint stalls every waiting process (see the `tx` module of
//! the SQLite store, "What a transaction writes"). A claim leaves its count to the end of
//! its lease so as to write one page; the counting tests hold `stats` to counting every
//! claim once all the same (README "Registry format", schema 7).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use portdaddy::{Choice, PortDaddy};

use crate::common;

/// This module's block of ports; the tests here probe no port for real.
const RANGE: std::ops::RangeInclusive<u16> = 33300..=33349;

fn open(path: &Path) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(RANGE)
        .port_probe(common::all_free)
        .open()
        .expect("open the registry")
}

/// The write-ahead log beside `registry`.
fn wal(registry: &Path) -> PathBuf {
    let mut name = registry.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// How many frames the log holds, from its length: a 32-byte header (the page size at bytes
/// 8-11), then frames of a 24-byte header and a page. Only for a log that was never started
/// over, as a new registry's is until its first checkpoint (after 1,000 frames).
fn frames(registry: &Path) -> u64 {
    let log = std::fs::read(wal(registry)).expect("read the log");
    let page = u64::from(u32::from_be_bytes(log[8..12].try_into().unwrap()));
    (log.len() as u64 - 32) / (page + 24)
}

#[test]
fn a_claim_of_a_names_own_port_writes_one_page_and_its_release_two() {
    let (_dir, path) = common::temp_registry();
    let registry = open(&path);
    // The name remembers its port from now on.
    drop(registry.acquire("web").expect("first claim"));
    let before = frames(&path);
    let guard = registry.acquire("web").expect("claim again");
    assert_eq!(guard.choice(), Choice::Remembered);
    let claimed = frames(&path);
    drop(guard);
    let released = frames(&path);
    // The claim writes the lease's page alone: the name's memory is written again only once
    // a day, the search cursor only by a search, and the claim is counted when the lease
    // ends. The release writes the lease's page and the counters' page (`meta`).
    assert_eq!(claimed - before, 1, "pages written by the claim");
    assert_eq!(released - claimed, 2, "pages written by the release");
}

#[test]
fn a_new_names_claim_writes_its_lease_its_memory_and_the_cursor() {
    let (_dir, path) = common::temp_registry();
    let registry = open(&path);
    drop(registry.acquire("first").expect("first claim"));
    let before = frames(&path);
    let guard = registry.acquire("second").expect("a new name");
    assert_eq!(guard.choice(), Choice::Searched);
    let claimed = frames(&path);
    // The lease's page, the name's memory (the `names` table and its index by port), and
    // `meta`, which holds the search cursor and the counters together.
    assert_eq!(claimed - before, 4, "pages written by a new name's claim");
}

/// The counters as `stats` reads them: acquired, released, reaped.
fn counts(registry: &PortDaddy) -> [u64; 3] {
    let stats = registry.stats().expect("stats");
    [stats.acquired, stats.released, stats.reaped]
}

#[test]
fn every_handle_counts_each_claim_once_while_its_lease_lives_and_after_it_ends() {
    let (_dir, path) = common::temp_registry();
    let registry = open(&path);
    let other = open(&path);
    let held = registry.acquire("held").expect("claim");
    let kept = registry
        .acquire("kept")
        .expect("claim")
        .keep()
        .expect("keep");
    let released = registry.acquire("released").expect("claim");
    let many = registry.acquire_many(&["a", "b"]).expect("claim two");
    drop(released);
    // Another handle on the file, as another process has it, sees every claim once: the
    // live, detached and released ones alike.
    assert_eq!(counts(&other), [5, 1, 0]);
    assert_eq!(counts(&registry), [5, 1, 0]);
    // A lease ended by someone else counts its claim once, as one ended by its holder does.
    assert!(other.release_lease(&kept).expect("release the kept lease"));
    drop(many);
    assert_eq!(counts(&other), [5, 4, 0]);
    drop(held);
    assert_eq!(counts(&other), [5, 5, 0]);
    // A claim that fails writes no lease, and counts nothing as acquired.
    let required = other.acquire("taken").expect("claim");
    assert!(registry
        .acquire_with(&portdaddy::Request::new("x").require(required.port()))
        .is_err());
    assert_eq!(counts(&registry)[..2], [6, 5]);
}

#[test]
fn a_claim_that_takes_over_a_detached_lease_counts_both_claims() {
    let (_dir, path) = common::temp_registry();
    let registry = open(&path);
    let request = portdaddy::Request::new("build")
        .ttl(Duration::from_secs(3600))
        .reuse_detached();
    let first = registry.acquire_with(&request).expect("claim").keep();
    let again = registry.acquire_with(&request).expect("take it over");
    assert_eq!(again.port(), first.expect("keep").port());
    // The claim that ended the detached lease counted it, with nothing released.
    assert_eq!(counts(&open(&path)), [2, 0, 0]);
    drop(again);
    assert_eq!(counts(&open(&path)), [2, 1, 0]);
}

#[test]
fn a_lease_an_older_version_counted_at_its_claim_is_not_counted_again() {
    let (_dir, path) = common::temp_registry();
    let registry = open(&path);
    drop(registry.acquire("first").expect("claim"));
    assert_eq!(counts(&registry), [1, 1, 0]);
    // As a version before the mark writes a claim: the lease without `acquire_uncounted`,
    // and the counter bumped at once.
    let conn = rusqlite::Connection::open(&path).expect("open with SQLite");
    conn.execute_batch(
        "INSERT INTO leases (id, port, name, protocol, owner_pid, owner_start, owner_boot,
                             acquired_at, block_len)
         VALUES (7, 33349, 'old', 1, NULL, NULL, NULL, 0, 1);
         UPDATE meta SET value = value + 1 WHERE key = 'count.acquired';",
    )
    .expect("write as an older version");
    drop(conn);
    assert_eq!(counts(&registry), [2, 1, 0]);
    assert!(registry.release_port(33349).expect("release the old lease"));
    assert_eq!(counts(&registry), [2, 2, 0], "its claim was counted twice");
}

#[cfg(unix)]
#[test]
fn the_claims_of_a_process_killed_while_holding_are_counted_once_when_reaped() {
    use common::workers::Worker;
    let (_dir, path) = common::temp_registry();
    let registry = open(&path);
    let worker = Worker::spawn("holder", "hold", &path, &RANGE, &[]);
    worker.expect_line("HELD", Instant::now() + Duration::from_secs(60));
    // Its claims count for everyone while its leases live.
    assert_eq!(counts(&registry), [2, 0, 0]);
    // Killed with its leases held: they are reclaimed, and their claims stay counted once.
    drop(worker);
    assert_eq!(registry.reap().expect("reap"), 2);
    assert_eq!(counts(&registry), [2, 0, 2]);
}

/// Runs the part of a worker process that a test of this file started (see
/// `common::workers`).
#[cfg(unix)]
#[test]
fn worker_entry() {
    use common::workers::{
        parse_range, say, var, wait_for_eof, MODE, RANGE as RANGE_VAR, REGISTRY,
    };
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let path = PathBuf::from(var(REGISTRY));
    assert_eq!(parse_range(&var(RANGE_VAR)), RANGE);
    match mode.as_str() {
        // Holds two leases until killed (or until stdin ends).
        "hold" => {
            let registry = open(&path);
            let _held = registry
                .acquire_many(&["one", "two"])
                .expect("worker: claim");
            say("HELD");
            wait_for_eof();
        }
        other => panic!("unknown worker mode {other:?}"),
    }
}
