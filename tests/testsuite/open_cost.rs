//! What an open skips on a registry that needs nothing, and that each step it skips still
//! runs where the file needs it: a registry switched to a rollback journal is switched back
//! to WAL, one of an older schema is migrated, one missing a table of ours is refused and left
//! as it was, and one that needs nothing is opened without a write to the file or its log.
//! (A registry marked as needing a newer reader is refused and left byte for byte as it was:
//! `format::a_registry_needing_a_newer_reader_is_refused_and_left_byte_identical`.)
//!
//! Ports 33250-33299 belong to this file (see `common`).

use crate::common;

use std::fs;
use std::path::Path;

use common::{fold_wal, open_probing, sibling, temp_registry};
use portdaddy::{Error, PortDaddy, PortRange};

const FIRST: u16 = 33250;
const LAST: u16 = 33299;

/// The `user_version` this build writes.
fn schema_of_this_build() -> u32 {
    PortDaddy::diagnose(
        "/nonexistent/portdaddy-open-cost",
        PortRange::new(FIRST, LAST).unwrap(),
    )
    .schema_supported
}

/// The file format's read and write versions (header bytes 18 and 19): 2 in WAL mode, 1 with
/// a rollback journal.
fn format_versions(path: &Path) -> (u8, u8) {
    let header = fs::read(path).unwrap();
    (header[18], header[19])
}

/// Reads one pragma of the registry through plain SQLite.
fn pragma<T: rusqlite::types::FromSql>(path: &Path, name: &str) -> T {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_query_value(None, name, |r| r.get(0)).unwrap()
}

/// The leases' ports and names, sorted.
fn leases(registry: &PortDaddy) -> Vec<(u16, String)> {
    let mut leases: Vec<_> = registry
        .list()
        .unwrap()
        .into_iter()
        .map(|l| (l.port(), l.name().to_owned()))
        .collect();
    leases.sort();
    leases
}

/// A registry of this build at `path`, holding one lease of this process (`kept`) on a port
/// of `range`, with no handle left open.
fn registry_with_a_lease(path: &Path, range: &std::ops::RangeInclusive<u16>) -> (u16, String) {
    let registry = open_probing(path, range);
    let lease = registry.acquire("kept").unwrap().keep().unwrap();
    (lease.port(), lease.name().to_owned())
}

#[test]
fn a_registry_switched_to_a_rollback_journal_is_switched_back_to_wal_and_keeps_its_leases() {
    let (_dir, path) = temp_registry();
    let range = FIRST..=FIRST + 9;
    let kept = registry_with_a_lease(&path, &range);
    // As another SQLite client may leave it: every commit in the file, no log.
    fold_wal(&path);
    let mode: String = {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
            .unwrap()
    };
    assert_eq!(mode, "delete");
    assert_eq!(
        format_versions(&path),
        (1, 1),
        "the file is in rollback mode"
    );

    let registry = open_probing(&path, &range);
    assert_eq!(
        format_versions(&path),
        (2, 2),
        "the open switched it to WAL"
    );
    assert_eq!(leases(&registry), vec![kept.clone()]);
    let other = registry.acquire("other").unwrap();
    assert_ne!(other.port(), kept.0);
    assert!(sibling(&path, "-wal").exists(), "the claim wrote no log");
    other.release().unwrap();
    drop(registry);
    assert_eq!(pragma::<String>(&path, "journal_mode"), "wal");
}

#[test]
fn a_registry_of_the_first_schema_is_still_migrated_at_open() {
    let (_dir, path) = temp_registry();
    let range = FIRST + 10..=FIRST + 19;
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
        conn.execute_batch(common::SCHEMA_V1).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA application_id = 1349796985; PRAGMA user_version = 1;
             INSERT INTO leases (id, port, name, protocol, acquired_at)
                 VALUES (7, {}, 'detached', 1, 1700000000000);
             INSERT INTO names (name, port, used_at) VALUES ('sticky', {}, 1700000000000);",
            FIRST + 10,
            FIRST + 11
        ))
        .unwrap();
    }
    assert_eq!(pragma::<u32>(&path, "user_version"), 1);

    let registry = open_probing(&path, &range);
    assert_eq!(
        pragma::<u32>(&path, "user_version"),
        schema_of_this_build(),
        "the open did not migrate the registry"
    );
    assert_eq!(leases(&registry), vec![(FIRST + 10, "detached".to_owned())]);
    // The remembered name gets its port back, and the detached lease's port is not handed out.
    let sticky = registry.acquire("sticky").unwrap();
    assert_eq!(sticky.port(), FIRST + 11);
    let next = registry.acquire("next").unwrap();
    assert_ne!(next.port(), FIRST + 10);
    // Migration 6 made the table of reserved ports, which a reservation writes.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let reserved: i64 = conn
        .query_row("SELECT count(*) FROM reserved", [], |r| r.get(0))
        .unwrap();
    assert_eq!(reserved, 0);
}

#[test]
fn a_registry_missing_a_table_of_ours_is_refused_and_left_as_it_was() {
    let cases = [
        ("names dropped", "DROP TABLE names;"),
        ("leases dropped", "DROP TABLE leases;"),
        (
            "meta a view",
            "ALTER TABLE meta RENAME TO meta_before;
             CREATE VIEW meta AS SELECT key, value FROM meta_before;",
        ),
        ("meta dropped", "DROP TABLE meta;"),
    ];
    for (what, change) in cases {
        let (_dir, path) = temp_registry();
        let range = FIRST + 20..=FIRST + 29;
        registry_with_a_lease(&path, &range);
        fold_wal(&path);
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(change).unwrap();
        }
        fold_wal(&path);
        let before = fs::read(&path).unwrap();

        let err = PortDaddy::builder()
            .path(&path)
            .range(range)
            .open()
            .unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { detail, .. } if detail.contains("tables of the registry are missing")),
            "{what}: {err:?}"
        );
        assert_eq!(fs::read(&path).unwrap(), before, "{what}: the file changed");
        let wal = fs::metadata(sibling(&path, "-wal")).map_or(0, |m| m.len());
        assert_eq!(wal, 0, "{what}: something was written to the log");
    }
}

/// The skipped WAL switch and migration wrote nothing before either (an empty migration
/// commits no page), so this guards against an open that starts writing, not the statements
/// it saves; BENCHMARKS.md counts those (instructions and system calls of a fresh process).
#[test]
fn a_registry_that_needs_nothing_is_opened_without_a_write_to_the_file_or_its_log() {
    let (_dir, path) = temp_registry();
    let range = FIRST + 30..=FIRST + 39;
    let kept = registry_with_a_lease(&path, &range);
    let file = fs::read(&path).unwrap();
    let wal = fs::read(sibling(&path, "-wal")).unwrap();
    assert!(!wal.is_empty(), "the lease is in the log");

    let registry = open_probing(&path, &range);
    assert_eq!(leases(&registry), vec![kept]);
    assert_eq!(fs::read(&path).unwrap(), file, "the open wrote the file");
    assert_eq!(
        fs::read(sibling(&path, "-wal")).unwrap(),
        wal,
        "the open wrote the log"
    );
}

/// What opening the registry at `path` logged at `DEBUG`, with the handle or the error.
fn open_logged(
    path: &Path,
    range: &std::ops::RangeInclusive<u16>,
) -> (String, Result<PortDaddy, Error>) {
    let mut opened = None;
    let logs = common::logs_at(tracing::Level::DEBUG, || {
        opened = Some(PortDaddy::builder().path(path).range(range.clone()).open());
    });
    (logs, opened.expect("the open ran"))
}

/// The first page of the table or index `name` of the registry at `path` (folded, so that
/// the page is in the file itself), read through plain SQLite.
fn root_page(path: &Path, name: &str) -> u64 {
    let page: i64 = rusqlite::Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT rootpage FROM sqlite_schema WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .unwrap();
    u64::try_from(page).unwrap()
}

/// Makes page `page` of the file at `path` no b-tree page at all (its type byte 1), written
/// in place as a stray write would; the file's bytes after.
fn spoil_page(path: &Path, page: u64) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start((page - 1) * 4096)).unwrap();
    file.write_all(&[0x01]).unwrap();
    drop(file);
    fs::read(path).unwrap()
}

/// Writes into the lock file of the registry at `path` a record of the file as it is now,
/// as an open that checked it would; the file's metadata.
#[cfg(unix)]
fn forge_record(path: &Path) -> fs::Metadata {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).unwrap();
    let record = format!(
        "portdaddy-checked 1 {} {} {} {} {} {} {}\n",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    fs::write(sibling(path, ".lock"), record).unwrap();
    meta
}

/// What an open logs when it does not check the file's integrity again, and when it does.
const NOT_CHECKED: &str = "not checked again";
const CHECKED: &str = "checking the integrity of the registry file in full";

#[cfg(unix)]
#[test]
fn a_registry_as_its_last_check_left_it_is_not_checked_again() {
    let (_dir, path) = temp_registry();
    let range = FIRST + 40..=FIRST + 42;
    let kept = registry_with_a_lease(&path, &range);
    // A file that changed in the tick in which a check began is not recorded (a write in
    // that tick would not show): once the file clock has moved on, a check records it.
    common::wait_for_file_clock_past(&path);
    drop(open_probing(&path, &range));
    let record = fs::read_to_string(sibling(&path, ".lock")).unwrap();
    assert!(
        record.starts_with("portdaddy-checked 1 "),
        "the lock file records the check: {record:?}"
    );

    let (logs, opened) = open_logged(&path, &range);
    assert_eq!(leases(&opened.unwrap()), vec![kept]);
    assert!(logs.contains(NOT_CHECKED), "{logs}");
    assert!(!logs.contains(CHECKED), "{logs}");
}

#[test]
fn a_registry_written_since_its_last_check_is_checked_in_full_and_refused_when_damaged() {
    let (_dir, path) = temp_registry();
    let range = FIRST + 43..=FIRST + 45;
    registry_with_a_lease(&path, &range);
    // Another SQLite client writes the file: every commit copied into it.
    fold_wal(&path);
    let index_page = root_page(&path, "names_port");
    let (logs, opened) = open_logged(&path, &range);
    drop(opened.unwrap());
    assert!(logs.contains(CHECKED), "the file was written: {logs}");

    // Damage that neither an open nor a claim reads: the page of an index that only the
    // full check walks.
    let damaged = spoil_page(&path, index_page);
    let (logs, opened) = open_logged(&path, &range);
    assert!(logs.contains(CHECKED), "{logs}");
    match opened {
        Err(Error::Corrupt { detail, .. }) => {
            assert!(detail.contains("integrity check failed"), "{detail}");
        }
        Err(other) => panic!("expected Error::Corrupt, got {other}"),
        Ok(_) => panic!("a damaged registry was opened"),
    }
    assert_eq!(fs::read(&path).unwrap(), damaged, "left as it was");
}

#[cfg(unix)]
#[test]
fn what_is_not_a_record_in_the_lock_file_is_no_record_and_left_as_it_was() {
    let (_dir, path) = temp_registry();
    let range = FIRST + 46..=FIRST + 48;
    let kept = registry_with_a_lease(&path, &range);
    common::wait_for_file_clock_past(&path);
    drop(open_probing(&path, &range));
    let lock = sibling(&path, ".lock");
    let record = fs::read_to_string(&lock).unwrap();
    assert!(record.starts_with("portdaddy-checked 1 "), "{record:?}");
    for garbage in [
        b"\x00\xffnot a record at all".to_vec(),
        record.replace("portdaddy", "someone").into_bytes(),
        vec![b'7'; 4096],
    ] {
        fs::write(&lock, &garbage).unwrap();
        for _ in 0..2 {
            let (logs, opened) = open_logged(&path, &range);
            assert_eq!(leases(&opened.unwrap()), vec![kept.clone()]);
            assert!(logs.contains(CHECKED), "{logs}");
            assert_eq!(fs::read(&lock).unwrap(), garbage, "not ours to write over");
        }
    }
    // A record of another version of the format is ours: written over with this one's.
    fs::write(&lock, record.replace("checked 1", "checked 9")).unwrap();
    let (logs, opened) = open_logged(&path, &range);
    drop(opened.unwrap());
    assert!(logs.contains(CHECKED), "{logs}");
    assert_eq!(fs::read_to_string(&lock).unwrap(), record);
}

/// Damage that no write reports (the disk's own, or a disk image put back) leaves the file's
/// times as they were. Made here by writing the damage, then a record that matches the file
/// as it is now, written after its last change.
#[cfg(unix)]
#[test]
fn damage_to_the_leases_that_the_record_cannot_see_is_still_refused() {
    let (_dir, path) = temp_registry();
    let range = FIRST + 49..=FIRST + 49;
    registry_with_a_lease(&path, &range);
    fold_wal(&path);
    let leases_page = root_page(&path, "leases");
    drop(open_probing(&path, &range));
    let damaged = spoil_page(&path, leases_page);
    common::wait_for_file_clock_past(&path);
    forge_record(&path);

    let (logs, opened) = open_logged(&path, &range);
    assert!(logs.contains(NOT_CHECKED), "the record counts: {logs}");
    match opened {
        Err(Error::Corrupt { detail, .. }) => {
            assert!(detail.contains("integrity check failed"), "{detail}");
        }
        Err(other) => panic!("expected Error::Corrupt, got {other}"),
        Ok(_) => panic!("a registry with damaged leases was opened"),
    }
    assert_eq!(fs::read(&path).unwrap(), damaged, "left as it was");
}

/// A record written in the tick of the file's last change does not count: a write in that
/// tick of a coarse file clock (one second on some file systems) would not have moved the
/// file's times. Made here by giving the lock file, once the record is in it, the very time
/// of the file's last change, after damage the record cannot see.
#[cfg(unix)]
#[test]
fn a_record_no_later_than_the_files_last_change_does_not_count() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, path) = temp_registry();
    let range = FIRST + 49..=FIRST + 49;
    drop(common::open_unprobed(&path, &range));
    fold_wal(&path);
    let index_page = root_page(&path, "names_port");
    drop(common::open_unprobed(&path, &range));
    let damaged = spoil_page(&path, index_page);
    let meta = forge_record(&path);
    let changed = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(meta.ctime()).unwrap(),
            u32::try_from(meta.ctime_nsec()).unwrap(),
        );
    fs::File::options()
        .write(true)
        .open(sibling(&path, ".lock"))
        .unwrap()
        .set_modified(changed)
        .unwrap();

    let mut opened = None;
    let logs = common::logs_at(tracing::Level::DEBUG, || {
        opened = Some(
            PortDaddy::builder()
                .path(&path)
                .range(range.clone())
                .port_probe(common::all_free)
                .open(),
        );
    });
    assert!(logs.contains(CHECKED), "{logs}");
    match opened.expect("the open ran") {
        Err(Error::Corrupt { .. }) => {}
        Err(other) => panic!("expected Error::Corrupt, got {other}"),
        Ok(_) => panic!("a damaged registry was opened on a record too recent to count"),
    }
    assert_eq!(fs::read(&path).unwrap(), damaged, "left as it was");
}

/// A registry refused for needing a newer reader is left as this open found it, and so is
/// the record a newer version keeps in its lock file: the integrity check, and the record's
/// removal before it, come only once the file is known to be one this build may use.
#[test]
fn the_lock_file_beside_a_registry_for_newer_versions_is_left_as_it_was() {
    let (_dir, path) = temp_registry();
    let range = FIRST + 49..=FIRST + 49;
    drop(common::open_unprobed(&path, &range));
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("INSERT INTO meta (key, value) VALUES ('min_reader_version', 2);")
            .unwrap();
    }
    let lock = sibling(&path, ".lock");
    fs::write(&lock, "portdaddy-checked 2 a record of a newer version\n").unwrap();
    let before = (
        fs::read(&lock).unwrap(),
        fs::metadata(&lock).unwrap().modified().unwrap(),
    );
    let file = fs::read(&path).unwrap();

    let err = PortDaddy::builder()
        .path(&path)
        .range(range)
        .port_probe(common::all_free)
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { .. }), "{err}");
    let after = (
        fs::read(&lock).unwrap(),
        fs::metadata(&lock).unwrap().modified().unwrap(),
    );
    assert_eq!(after, before, "the lock file was written");
    assert_eq!(fs::read(&path).unwrap(), file);
}
