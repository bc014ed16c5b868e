//! What a claim and a release cost other processes: the pages each transaction writes to
//! the write-ahead log. Every page is a frame of the log, written and checksummed at commit
//! while the registry's lock is held, and copied into the file at the next checkpoint (two
//! `fsync`s, also under the lock), so the pages per transaction set both how long the lock
//! is held and how often a checkpoint stalls every waiting process (see the `tx` module of
//! the SQLite store, "What a transaction writes").

use std::path::{Path, PathBuf};

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
fn a_claim_of_a_names_own_port_and_its_release_write_two_pages_each() {
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
    // The lease's page and the counters' page (`meta`), nothing else: the name's memory is
    // written again only once a day, and the search cursor only by a search.
    assert_eq!(claimed - before, 2, "pages written by the claim");
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
