//! The 0.1 format policy and open sequence attacked as a hostile host and a careful user
//! would: `min_reader_version` markers of every SQLite type, `meta` tables a newer version
//! rebuilt, schema changes a newer version may make beside ours (triggers, indexes, columns
//! without defaults), and refusals that must leave the registry byte for byte as it was even
//! with a write-ahead log pending.
//!
//! Ports 33100-33149 belong to this file (see `common`); no test here binds one.

use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{all_free, sibling, temp_registry};
use portdaddy::{Error, PortDaddy, PortRange, Status};

const FIRST: u16 = 33100;
const LAST: u16 = 33149;

fn open_at(path: &Path) -> portdaddy::Result<PortDaddy> {
    PortDaddy::builder()
        .path(path)
        .range(FIRST..=LAST)
        .port_probe(all_free)
        .lock_timeout(Duration::from_secs(20))
        .open()
}

/// Every file in `dir` with its bytes (directories as empty).
fn snapshot(dir: &Path) -> BTreeMap<OsString, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = if e.file_type().unwrap().is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            (e.file_name(), bytes)
        })
        .collect()
}

/// A registry made by this build with one lease kept, alone in a fresh directory.
fn registry() -> (tempfile::TempDir, PathBuf) {
    let (dir, path) = temp_registry();
    open_at(&path)
        .unwrap()
        .acquire("api")
        .unwrap()
        .keep()
        .unwrap();
    for suffix in [".lock", ".owners"] {
        let side = sibling(&path, suffix);
        let _ = std::fs::remove_file(&side);
        let _ = std::fs::remove_dir_all(&side);
    }
    (dir, path)
}

/// Rebuilds `meta` as a newer version might, with a `value` column of any type, and puts
/// `marker` (SQL text) in as `min_reader_version`.
fn rebuild_meta_with_marker(path: &Path, marker: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE meta_new (key TEXT PRIMARY KEY, value ANY, note TEXT) STRICT, WITHOUT ROWID;
         INSERT INTO meta_new (key, value) SELECT key, value FROM meta;
         DROP TABLE meta;
         ALTER TABLE meta_new RENAME TO meta;
         INSERT INTO meta (key, value) VALUES ('min_reader_version', {marker});
         COMMIT;"
    ))
    .unwrap();
}

/// What a refused registry's directory must look like afterwards: the same files, with the
/// same bytes, apart from the `-shm` index any reader of a write-ahead log updates.
fn persistent(dir: &Path) -> BTreeMap<OsString, Vec<u8>> {
    let mut files = snapshot(dir);
    files.retain(|name, _| !name.to_string_lossy().ends_with("-shm"));
    files
}

/// The `schema version` check of `diagnose`, and whether it judged stale leases.
fn diagnosed(path: &Path) -> (Option<(Status, String)>, bool) {
    let d = PortDaddy::diagnose(path, PortRange::new(FIRST, LAST).unwrap());
    (
        d.check("schema version")
            .map(|c| (c.status, c.detail.clone())),
        d.check("stale leases").is_some(),
    )
}

#[test]
fn a_marker_demanding_more_in_any_sqlite_type_is_refused_untouched() {
    // A newer version that rebuilt `meta` may store the marker as text or a real number, or
    // as something that names no generation at all: each is refused, as the integer is.
    for (marker, required) in [
        ("'2'", 2),
        ("' 2 '", 2),
        ("2.0", 2),
        ("1.5", 2),
        ("4294967296", u32::MAX),
        ("NULL", u32::MAX),
        ("'two'", u32::MAX),
        ("x'02'", u32::MAX),
    ] {
        let (dir, path) = registry();
        rebuild_meta_with_marker(&path, marker);
        let before = snapshot(dir.path());
        let err = open_at(&path).unwrap_err();
        assert!(
            matches!(&err, Error::SchemaTooNew { required: r, supported: 1, .. } if *r == required),
            "marker {marker}: {err:?}"
        );
        assert!(err.is_registry_unusable(), "{err:?}");
        assert_eq!(err.path(), Some(path.as_path()));
        assert_eq!(
            snapshot(dir.path()),
            before,
            "marker {marker}: the registry or its directory changed"
        );
        let (schema, judged) = diagnosed(&path);
        let (status, detail) = schema.expect("a schema check");
        assert_eq!(status, Status::Fail, "marker {marker}: {detail}");
        assert!(detail.contains("min_reader_version"), "{detail}");
        assert!(!judged, "marker {marker}: leases judged by unknown rules");
        assert_eq!(snapshot(dir.path()), before);
    }
}

#[test]
fn a_marker_demanding_no_more_in_any_sqlite_type_is_used() {
    for marker in ["'1'", "1.0", "-1", "0"] {
        let (_dir, path) = registry();
        rebuild_meta_with_marker(&path, marker);
        let registry = open_at(&path).unwrap_or_else(|e| panic!("marker {marker}: {e:?}"));
        registry.acquire("more").unwrap().release().unwrap();
        let (schema, judged) = diagnosed(&path);
        assert_eq!(schema.map(|(s, _)| s), Some(Status::Ok), "marker {marker}");
        assert!(judged);
    }
}

#[test]
fn a_registry_without_its_meta_table_is_failed_by_diagnose_as_by_open() {
    let (dir, path) = registry();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("DROP TABLE meta").unwrap();
    drop(conn);
    let before = std::fs::read(&path).unwrap();
    let err = open_at(&path).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    let d = PortDaddy::diagnose(&path, PortRange::new(FIRST, LAST).unwrap());
    assert!(
        d.check("schema version")
            .is_none_or(|c| c.status == Status::Fail),
        "{d}"
    );
    assert!(d.check("stale leases").is_none(), "{d}");
    assert!(
        d.checks
            .iter()
            .any(|c| c.status == Status::Fail && c.detail.contains("missing")),
        "{d}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    drop(dir);
}

/// Writes `min_reader_version` 2 as a newer version would, leaving the write in the `-wal`
/// (a crash before any checkpoint); with `shm` false the `-shm` index is gone too.
fn mark_in_pending_wal(path: &Path, shm: bool) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )
    .unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.execute_batch("INSERT INTO meta (key, value) VALUES ('min_reader_version', 2)")
        .unwrap();
    drop(conn);
    assert!(sibling(path, "-wal").exists());
    if !shm {
        std::fs::remove_file(sibling(path, "-shm")).unwrap();
    }
}

#[test]
fn a_marker_still_in_the_wal_is_refused_without_a_checkpoint() {
    for shm in [true, false] {
        let (dir, path) = registry();
        mark_in_pending_wal(&path, shm);
        let before = persistent(dir.path());
        let err = open_at(&path).unwrap_err();
        assert!(
            matches!(err, Error::SchemaTooNew { required: 2, .. }),
            "{err:?}"
        );
        assert_eq!(
            persistent(dir.path()),
            before,
            "the file, its -wal or the files beside them changed (shm {shm})"
        );
        let (schema, judged) = diagnosed(&path);
        assert_eq!(schema.map(|(s, _)| s), Some(Status::Fail));
        assert!(!judged);
        assert_eq!(persistent(dir.path()), before);
    }
}

#[test]
fn a_column_added_without_a_default_fails_claims_with_a_typed_error_and_changes_nothing() {
    let (_dir, path) = registry();
    // SQLite refuses `ADD COLUMN … NOT NULL` without a default; a newer version that wants
    // one rebuilds the table. That is no additive change: this version's claims fail, each
    // with a typed error, and nothing is written.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('leases') ORDER BY cid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let defs: Vec<String> = columns
        .iter()
        .map(|c| match c.as_str() {
            "port" => "port INTEGER PRIMARY KEY".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE leases_new ({}, newer_must INTEGER NOT NULL);
         INSERT INTO leases_new SELECT *, 7 FROM leases;
         DROP TABLE leases;
         ALTER TABLE leases_new RENAME TO leases;
         COMMIT;",
        defs.join(", ")
    ))
    .unwrap();
    drop(conn);
    let registry = open_at(&path).unwrap();
    let before = registry.list().unwrap();
    let err = registry.acquire("new").unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err:?}");
    assert!(err.is_registry_unusable());
    assert!(common::chain(&err).contains("newer_must"), "{err}");
    assert_eq!(
        registry.list().unwrap(),
        before,
        "a claim left something behind"
    );
    assert_eq!(common::integrity_check(&path), "ok");
}

#[test]
fn triggers_indexes_and_views_a_newer_version_added_run_with_our_writes() {
    let (_dir, path) = registry();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE newer_audit (port INTEGER, what TEXT);
         CREATE TRIGGER newer_in AFTER INSERT ON leases
             BEGIN INSERT INTO newer_audit VALUES (new.port, 'in'); END;
         CREATE TRIGGER newer_out AFTER DELETE ON leases
             BEGIN INSERT INTO newer_audit VALUES (old.port, 'out'); END;
         CREATE INDEX newer_by_name ON leases (name);
         CREATE VIEW newer_view AS SELECT port FROM leases;",
    )
    .unwrap();
    drop(conn);
    let registry = open_at(&path).unwrap();
    let port = registry.acquire("t").unwrap().port();
    registry.acquire("t").unwrap().release().unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let audit: Vec<(i64, String)> = conn
        .prepare("SELECT port, what FROM newer_audit ORDER BY rowid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let p = i64::from(port);
    assert_eq!(
        audit,
        [
            (p, "in".into()),
            (p, "out".into()),
            (p, "in".into()),
            (p, "out".into())
        ]
    );
    // A trigger that refuses our insert makes the claim fail, typed, with nothing written.
    conn.execute_batch(
        "CREATE TRIGGER newer_no BEFORE INSERT ON leases
             BEGIN SELECT RAISE(ABORT, 'refused by a newer version'); END;",
    )
    .unwrap();
    drop(conn);
    let err = registry.acquire("u").unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err:?}");
    assert!(common::chain(&err).contains("refused by a newer version"));
    assert_eq!(registry.list().unwrap().len(), 1, "only the kept lease");
}

#[test]
fn user_versions_no_version_writes_are_refused_untouched_and_higher_ones_used() {
    for (version, marker, refused) in [
        (-1i64, false, true),
        (-1, true, true),
        (i64::from(i32::MAX), false, false),
        (i64::from(i32::MAX), true, true),
    ] {
        let (_dir, path) = registry();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", version).unwrap();
        if marker {
            conn.execute_batch("INSERT INTO meta (key, value) VALUES ('min_reader_version', 2)")
                .unwrap();
        }
        drop(conn);
        let before = std::fs::read(&path).unwrap();
        match open_at(&path) {
            Ok(registry) => {
                assert!(!refused, "{version} {marker}");
                registry.acquire("x").unwrap().release().unwrap();
                drop(registry);
                let conn = rusqlite::Connection::open(&path).unwrap();
                let kept: i64 = conn
                    .pragma_query_value(None, "user_version", |r| r.get(0))
                    .unwrap();
                assert_eq!(kept, version, "the user_version was lowered");
            }
            Err(e) => {
                assert!(refused, "{version} {marker}: {e:?}");
                assert!(
                    matches!(e, Error::Corrupt { .. } | Error::SchemaTooNew { .. }),
                    "{e:?}"
                );
                assert_eq!(std::fs::read(&path).unwrap(), before);
            }
        }
    }
}

/// The marker is read once per open (not per claim, which keeps the claim's statements as
/// they are): a handle opened before a newer version raised it goes on until it is opened
/// again, as the format policy says; every open after refuses.
#[test]
fn a_marker_raised_under_an_open_handle_binds_the_next_open() {
    let (_dir, path) = registry();
    let held = open_at(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("INSERT INTO meta (key, value) VALUES ('min_reader_version', 2)")
        .unwrap();
    drop(conn);
    let lease = held.acquire("still").unwrap();
    let err = open_at(&path).unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { required: 2, .. }),
        "{err:?}"
    );
    lease.release().unwrap();
    assert_eq!(
        held.list().unwrap().len(),
        1,
        "the kept lease of `registry()`"
    );
}

/// A file registry over this file's ports whose clock panics once `panicking` is set.
fn with_panicking_clock(
    path: &Path,
    panicking: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> PortDaddy {
    let flag = panicking.clone();
    PortDaddy::builder()
        .path(path)
        .range(FIRST..=LAST)
        .port_probe(all_free)
        .clock(move || {
            assert!(
                !flag.load(std::sync::atomic::Ordering::SeqCst),
                "the caller's clock panics"
            );
            std::time::SystemTime::now()
        })
        .open()
        .unwrap()
}

/// A guard's `Drop` never panics, even when the caller's clock panics in it: the panic is
/// caught and logged, and the lease is left to be reclaimed when the process exits.
#[test]
fn a_guard_dropped_while_the_clock_panics_does_not_panic() {
    let (_dir, path) = temp_registry();
    let panicking = common::flag(false);
    let registry = with_panicking_clock(&path, &panicking);
    let guard = registry.acquire("dropped").unwrap();
    panicking.store(true, std::sync::atomic::Ordering::SeqCst);
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(guard)));
    assert!(dropped.is_ok(), "the guard's Drop panicked");
    panicking.store(false, std::sync::atomic::Ordering::SeqCst);
    let names: Vec<String> = registry
        .list()
        .unwrap()
        .iter()
        .map(|l| l.name().to_owned())
        .collect();
    assert_eq!(
        names,
        ["dropped"],
        "the release's transaction was not rolled back"
    );
    // The handle goes on working.
    registry.acquire("after").unwrap().release().unwrap();
}

/// A guard dropped while a panic unwinds, with a clock that panics too, must not abort the
/// process (a panic in `Drop` during unwinding does): the unwinding panic reaches the caller.
#[test]
fn a_guard_dropped_in_unwinding_with_a_panicking_clock_does_not_abort() {
    let (_dir, path) = temp_registry();
    let panicking = common::flag(false);
    let registry = with_panicking_clock(&path, &panicking);
    let guard = registry.acquire("unwound").unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _guard = guard;
        panicking.store(true, std::sync::atomic::Ordering::SeqCst);
        panic!("the caller's own panic");
    }));
    let payload = caught.unwrap_err();
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"the caller's own panic")
    );
}

/// In a directory others may write (sticky, as `/tmp`), the open makes the `-wal`, `-shm` and
/// `-journal` itself before SQLite opens them; a registry refused as too new must still be
/// left with no file beside it that was not there.
#[cfg(unix)]
#[test]
fn a_registry_needing_a_newer_reader_in_a_sticky_directory_gets_no_files_beside_it() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, path) = registry();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("INSERT INTO meta (key, value) VALUES ('min_reader_version', 2)")
        .unwrap();
    drop(conn);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let before = snapshot(dir.path());
    let err = open_at(&path).unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { .. }), "{err:?}");
    assert_eq!(
        snapshot(dir.path()).keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "files were left beside the refused registry"
    );
    assert_eq!(snapshot(dir.path()), before);
}
