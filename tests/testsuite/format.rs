//! The registry format across versions: a registry that a newer portdaddy only added to is
//! used by this one without losing what the newer one wrote; one that a newer portdaddy marks
//! as needing a newer reader (`meta` row `min_reader_version`) is refused and left byte for
//! byte as it was; and an older and a newer version working on one registry at once never
//! hand out one port twice.
//!
//! "Newer" is simulated with raw SQL (rusqlite is a normal dependency of the crate, so tests
//! can name it): new tables, new columns with defaults, new `meta` rows, a higher
//! `user_version`, written as a newer version would.
//!
//! Ports 32600-32649 belong to this file (see `common`); no test here binds one.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{all_free, temp_registry};
use portdaddy::{Error, PortDaddy, PortRange, Request, Status};

const FIRST: u16 = 32600;
const LAST: u16 = 32649;

/// Opens the file registry at `path` over `range`, probing no real port.
fn open_at(path: &Path, range: std::ops::RangeInclusive<u16>) -> portdaddy::Result<PortDaddy> {
    PortDaddy::builder()
        .path(path)
        .range(range)
        .port_probe(all_free)
        .lock_timeout(Duration::from_secs(20))
        .open()
}

/// The `user_version` this build writes.
fn schema_of_this_build() -> u32 {
    PortDaddy::diagnose(
        "/nonexistent/portdaddy-format",
        PortRange::new(FIRST, LAST).unwrap(),
    )
    .schema_supported
}

/// Changes the registry at `path` as a newer version that only adds to the format would: a
/// new table with rows, a new column with a default on every table (set to other values on
/// the rows already there), new `meta` rows, and `user_version` one higher.
fn add_as_a_newer_version(path: &Path) -> u32 {
    let newer = schema_of_this_build() + 1;
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE newer_claims (
             seq    INTEGER PRIMARY KEY,
             port   INTEGER NOT NULL,
             worker TEXT    NOT NULL
         ) STRICT;
         INSERT INTO newer_claims (port, worker) VALUES (1, 'before'), (2, 'before');
         ALTER TABLE leases ADD COLUMN newer_note TEXT NOT NULL DEFAULT 'none';
         ALTER TABLE names ADD COLUMN newer_weight INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE meta ADD COLUMN newer_flag INTEGER NOT NULL DEFAULT 0;
         UPDATE leases SET newer_note = 'written by newer';
         UPDATE names SET newer_weight = 7;
         UPDATE meta SET newer_flag = 1;
         INSERT INTO meta (key, value, newer_flag) VALUES ('newer.setting', 42, 1);
         PRAGMA user_version = {newer};
         COMMIT;"
    ))
    .unwrap();
    newer
}

fn user_version(conn: &rusqlite::Connection) -> u32 {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_registry_a_newer_version_added_to_is_used_and_its_data_survives() {
    let (_dir, path) = temp_registry();
    let range = FIRST..=FIRST + 9;
    let (kept, remembered) = {
        let registry = open_at(&path, range.clone()).unwrap();
        let kept = registry
            .acquire_with(&Request::new("kept").ttl(Duration::from_secs(3600)))
            .unwrap()
            .keep()
            .unwrap();
        let remembered = registry.acquire("remembered").unwrap().port();
        (kept, remembered)
    };
    let newer = add_as_a_newer_version(&path);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let meta_before: Vec<String> = conn
        .prepare("SELECT key FROM meta WHERE newer_flag = 1 ORDER BY key")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(meta_before.iter().any(|k| k == "cursor"), "{meta_before:?}");

    let registry = open_at(&path, range.clone()).unwrap();
    let listed = registry.list().unwrap();
    assert_eq!(
        listed,
        std::slice::from_ref(&kept),
        "the newer registry's leases are listed"
    );
    // Claims, a remembered port, releases and a detach write every table this build knows.
    let fresh = registry.acquire("fresh").unwrap();
    assert_ne!(fresh.port(), kept.port());
    let again = registry.acquire("remembered").unwrap();
    assert_eq!(again.port(), remembered, "the name keeps its port");
    let detached = registry.acquire("detached").unwrap().keep().unwrap();
    fresh.release().unwrap();
    again.release().unwrap();
    assert!(registry.release_port(detached.port()).unwrap());
    assert!(registry.stats().unwrap().acquired >= 5);
    let d = PortDaddy::diagnose(&path, PortRange::new(FIRST, LAST).unwrap());
    assert!(!d.has_failures(), "{d}");
    assert_eq!(d.check("schema version").unwrap().status, Status::Ok, "{d}");
    assert_eq!(d.schema_found, Some(newer));
    drop(registry);

    // Everything the newer version wrote is still there.
    assert_eq!(user_version(&conn), newer, "user_version was lowered");
    let claims: Vec<(i64, String)> = conn
        .prepare("SELECT port, worker FROM newer_claims ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(claims, [(1, "before".into()), (2, "before".into())]);
    let note: String = conn
        .query_row(
            "SELECT newer_note FROM leases WHERE port = ?1",
            [kept.port()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(note, "written by newer");
    let weights: Vec<(String, i64)> = conn
        .prepare("SELECT name, newer_weight FROM names ORDER BY name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let weight = |name: &str| weights.iter().find(|(n, _)| n == name).map(|(_, w)| *w);
    assert_eq!(weight("kept"), Some(7), "{weights:?}");
    assert_eq!(
        weight("remembered"),
        Some(7),
        "a name this version used again kept the newer column: {weights:?}"
    );
    assert_eq!(weight("fresh"), Some(0), "new rows take the default");
    let meta_after: BTreeMap<String, (i64, i64)> = conn
        .prepare("SELECT key, value, newer_flag FROM meta")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(meta_after.get("newer.setting"), Some(&(42, 1)));
    for key in &meta_before {
        assert_eq!(
            meta_after.get(key).map(|(_, flag)| *flag),
            Some(1),
            "meta row {key} lost the newer column: {meta_after:?}"
        );
    }
}

/// The names in `dir`, and the bytes and modification time of `path`.
fn state(dir: &Path, path: &Path) -> (BTreeSet<OsString>, Vec<u8>, SystemTime) {
    let names = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let meta = std::fs::metadata(path).unwrap();
    (
        names,
        std::fs::read(path).unwrap(),
        meta.modified().unwrap(),
    )
}

/// A registry made by this build, marked by a "newer" version as needing format generation
/// 2, copied alone into a fresh directory (without the lock file and owners directory its
/// use left).
fn registry_needing_a_newer_reader() -> (tempfile::TempDir, PathBuf) {
    let (_src_dir, src) = temp_registry();
    {
        let registry = open_at(&src, FIRST + 10..=FIRST + 19).unwrap();
        registry.acquire("api").unwrap().keep().unwrap();
    }
    let newer = add_as_a_newer_version(&src);
    let conn = rusqlite::Connection::open(&src).unwrap();
    conn.execute_batch("INSERT INTO meta (key, value) VALUES ('min_reader_version', 2);")
        .unwrap();
    assert_eq!(user_version(&conn), newer);
    drop(conn);
    let (dir, path) = temp_registry();
    std::fs::copy(&src, &path).unwrap();
    (dir, path)
}

#[test]
fn a_registry_needing_a_newer_reader_is_refused_and_left_byte_identical() {
    let (dir, path) = registry_needing_a_newer_reader();
    let before = state(dir.path(), &path);
    let err = open_at(&path, FIRST + 10..=FIRST + 19).unwrap_err();
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
    assert_eq!((*required, *supported), (2, 1));
    let message = err.to_string();
    for part in [
        "min_reader_version",
        "upgrade portdaddy in this project",
        "PORTDADDY_DB",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
    assert_eq!(
        state(dir.path(), &path),
        before,
        "the file, its mtime or the files beside it changed"
    );

    // The examination reports it, and changes nothing either.
    let d = PortDaddy::diagnose(&path, PortRange::new(FIRST + 10, FIRST + 19).unwrap());
    let check = d.check("schema version").expect("a schema check");
    assert_eq!(check.status, Status::Fail, "{d}");
    assert!(check.detail.contains("min_reader_version"), "{d}");
    assert!(
        d.check("stale leases").is_none(),
        "leases judged by rules this version does not know: {d}"
    );
    assert_eq!(d.check("integrity").unwrap().status, Status::Ok, "{d}");
    assert_eq!(state(dir.path(), &path), before);
}

#[test]
fn a_registry_that_demands_this_generation_is_used() {
    let (_dir, path) = temp_registry();
    drop(open_at(&path, FIRST + 20..=FIRST + 29).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("INSERT INTO meta (key, value) VALUES ('min_reader_version', 1);")
        .unwrap();
    drop(conn);
    let registry = open_at(&path, FIRST + 20..=FIRST + 29).unwrap();
    registry.acquire("api").unwrap().release().unwrap();
}

/// A lease stamped in the future by a clock that was ahead is started again in place, so
/// that what a newer version added to its row stays.
#[test]
fn a_lease_started_again_after_a_clock_ahead_keeps_what_a_newer_version_added() {
    let (_dir, path) = temp_registry();
    let range = FIRST + 40..=FIRST + 49;
    let ahead = common::FakeClock::new();
    ahead.advance(Duration::from_secs(3600));
    let lease = PortDaddy::builder()
        .path(&path)
        .range(range.clone())
        .port_probe(all_free)
        .clock(ahead.as_fn())
        .open()
        .unwrap()
        .acquire_with(&Request::new("ahead").ttl(Duration::from_secs(600)))
        .unwrap()
        .keep()
        .unwrap();
    add_as_a_newer_version(&path);
    let now = common::FakeClock::new();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(range)
        .port_probe(all_free)
        .clock(now.as_fn())
        .open()
        .unwrap();
    assert_eq!(registry.reap().unwrap(), 0);
    let restarted = registry.list().unwrap();
    assert_eq!(restarted.len(), 1);
    assert!(
        restarted[0].acquired_at() < lease.acquired_at(),
        "the lease was not started again: {restarted:?}"
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let note: String = conn
        .query_row(
            "SELECT newer_note FROM leases WHERE port = ?1",
            [lease.port()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(note, "written by newer");
}

/// A request that cannot be claimed as asked is refused before the registry is locked or
/// touched: with the registry's lock held elsewhere it fails at once with its own error (not
/// `LockTimeout`), and the file, its `-wal`, what lies beside them and the counters stay as
/// they were.
#[test]
fn an_invalid_request_neither_takes_the_lock_nor_touches_the_registry() {
    let (dir, path) = temp_registry();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(FIRST + 34..=FIRST + 39)
        .port_probe(all_free)
        .lock_timeout(Duration::from_millis(300))
        .open()
        .unwrap();
    registry.acquire("first").unwrap().release().unwrap();
    let stats = registry.stats().unwrap();
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    let files = || (state(dir.path(), &path), state(dir.path(), &wal));
    let before = files();
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let lock = std::fs::File::open(PathBuf::from(lock)).unwrap();
    lock.try_lock().expect("take the registry's lock");

    let invalid = [
        Request::new(""),
        Request::new("bad\nname"),
        Request::new("x").ttl(Duration::ZERO),
        Request::new("x").require(0),
        Request::new("x").block(7),
        Request::new("x").preferred(65535).block(2),
    ];
    for request in &invalid {
        let err = registry.acquire_with(request).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidName { .. } | Error::InvalidRequest { .. }
            ),
            "{request:?}: {err:?}"
        );
        let batch = [Request::new("fine"), request.clone()];
        let err = registry.acquire_many_with(&batch).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidName { .. } | Error::InvalidRequest { .. }
            ),
            "batch with {request:?}: {err:?}"
        );
    }
    drop(lock);
    assert_eq!(files(), before, "the registry was touched");
    assert_eq!(
        registry.stats().unwrap(),
        stats,
        "an invalid request was counted"
    );
}

// ---------------------------------------------------------------------------------------------
// An older and a newer version on one registry at the same time.
// ---------------------------------------------------------------------------------------------

#[cfg(unix)]
mod together {
    use std::fs::OpenOptions;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use super::{add_as_a_newer_version, open_at, FIRST};
    use crate::common::temp_registry;
    use crate::common::workers::{parse_range, say, var, Worker, RANGE, REGISTRY};

    /// Four ports for four workers: each holds one port at a time, so no claim meets a full
    /// range, and every port passes from worker to worker.
    const RANGE_TOGETHER: std::ops::RangeInclusive<u16> = FIRST + 30..=FIRST + 33;
    const ROUNDS: usize = 25;
    const MARKERS: &str = "PORTDADDY_FORMAT_MARKERS";
    const DEADLINE: Duration = Duration::from_secs(60);

    /// Two workers use the registry as this version does; two as a newer version would: around
    /// each claim through the library they also write the newer version's data with raw SQL
    /// (a row in its own table, its column on the lease, a `meta` row of its own). While a
    /// worker holds a port it holds a marker file for it, created with `O_EXCL`: a port handed
    /// out twice at once shows as a marker that already exists.
    #[test]
    fn an_older_and_a_newer_version_at_once_never_hand_out_a_port_twice() {
        let (dir, path) = temp_registry();
        let markers = dir.path().join("markers");
        std::fs::create_dir(&markers).unwrap();
        drop(open_at(&path, RANGE_TOGETHER).unwrap());
        let newer = add_as_a_newer_version(&path);
        let mut workers: Vec<Worker> = ["older", "newer", "older", "newer"]
            .iter()
            .enumerate()
            .map(|(id, kind)| {
                Worker::spawn(
                    format!("{kind} worker {id}"),
                    kind,
                    &path,
                    &RANGE_TOGETHER,
                    &[(MARKERS, markers.display().to_string())],
                )
            })
            .collect();
        let deadline = Instant::now() + DEADLINE;
        for worker in &workers {
            assert_eq!(
                worker.expect_line("READY", deadline),
                "READY",
                "{}",
                worker.label
            );
        }
        for worker in &mut workers {
            worker.send("go");
        }
        let mut holds: Vec<(usize, u16)> = Vec::new();
        let mut most_held_at_once = 0;
        for (id, worker) in workers.iter_mut().enumerate() {
            let (lines, status) = worker.finish(deadline);
            assert!(
                status.success(),
                "{} failed ({status}); stderr:\n{}",
                worker.label,
                worker.stderr()
            );
            let mut rounds = 0;
            for line in lines {
                match line.split(' ').collect::<Vec<_>>()[..] {
                    ["HOLD", port, "1", held] => {
                        holds.push((id, port.parse().unwrap()));
                        most_held_at_once = most_held_at_once.max(held.parse().unwrap());
                    }
                    ["HOLD", port, _, _] => panic!(
                        "{}: port {port} was held by another worker at the same time",
                        worker.label
                    ),
                    ["DONE", n] => rounds = n.parse().unwrap(),
                    _ => panic!("{}: unexpected line {line:?}", worker.label),
                }
            }
            assert_eq!(rounds, ROUNDS, "{}", worker.label);
        }
        assert_eq!(holds.len(), 4 * ROUNDS);
        // The test proves something only if both kinds held the same ports.
        let shared = RANGE_TOGETHER
            .filter(|port| {
                let kinds: std::collections::BTreeSet<usize> = holds
                    .iter()
                    .filter(|(_, p)| p == port)
                    .map(|(id, _)| id % 2)
                    .collect();
                kinds.len() == 2
            })
            .count();
        assert!(shared > 0, "no port passed between the versions: {holds:?}");
        assert!(
            most_held_at_once >= 2,
            "the workers never held ports at the same time; the test exercised nothing"
        );

        // Every lease is released, and the newer version's data is all there.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(count("SELECT count(*) FROM leases"), 0);
        assert_eq!(
            count("SELECT count(*) FROM newer_claims WHERE worker <> 'before'"),
            2 * ROUNDS as i64
        );
        assert_eq!(
            count("SELECT value FROM meta WHERE key = 'newer.claims'"),
            2 * ROUNDS as i64
        );
        assert_eq!(super::user_version(&conn), newer);
    }

    /// A worker of [`an_older_and_a_newer_version_at_once_never_hand_out_a_port_twice`]:
    /// `older` or `newer`.
    pub(super) fn worker(kind: String) {
        let newer = match kind.as_str() {
            "older" => false,
            "newer" => true,
            other => panic!("unknown worker mode {other:?}"),
        };
        let path = PathBuf::from(var(REGISTRY));
        let registry = open_at(&path, parse_range(&var(RANGE))).unwrap();
        let raw = newer.then(|| {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.busy_timeout(DEADLINE).unwrap();
            conn
        });
        let markers = PathBuf::from(var(MARKERS));
        say("READY");
        assert_eq!(crate::common::workers::read_line().as_deref(), Some("go"));
        for round in 0..ROUNDS {
            if let Some(conn) = &raw {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('newer.claims', 1)
                     ON CONFLICT (key) DO UPDATE SET value = value + 1",
                    [],
                )
                .unwrap();
            }
            let guard = registry.acquire(&format!("{kind}-{round}")).unwrap();
            let port = guard.port();
            if let Some(conn) = &raw {
                let me = format!("{kind}-{}", std::process::id());
                let noted = conn
                    .execute(
                        "UPDATE leases SET newer_note = ?1 WHERE port = ?2",
                        rusqlite::params![me, port],
                    )
                    .unwrap();
                assert_eq!(noted, 1, "the lease on {port} is in the registry");
                conn.execute(
                    "INSERT INTO newer_claims (port, worker) VALUES (?1, ?2)",
                    rusqlite::params![port, me],
                )
                .unwrap();
            }
            let held_alone = hold_marker(&markers, port);
            // A moment of holding, longer than a claim takes, so that holds of different
            // workers overlap in time; how many ports are held meanwhile shows whether they did.
            std::thread::sleep(Duration::from_millis(3));
            let held_now = std::fs::read_dir(&markers).unwrap().count();
            if held_alone {
                std::fs::remove_file(markers.join(port.to_string())).unwrap();
            }
            guard.release().unwrap();
            say(&format!("HOLD {port} {} {held_now}", u8::from(held_alone)));
        }
        say(&format!("DONE {ROUNDS}"));
    }

    /// Creates the marker of `port`; whether it was not there (no one else held the port).
    fn hold_marker(markers: &Path, port: u16) -> bool {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(markers.join(port.to_string()))
        {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => panic!("create the marker of {port}: {e}"),
        }
    }
}

/// The entry point of worker processes; an empty test in a normal run.
#[cfg(unix)]
#[test]
fn worker_entry() {
    if let Ok(kind) = std::env::var(common::workers::MODE) {
        together::worker(kind);
    }
}

/// A handle whose owner lock file was removed names its new one on its leases: in place, so
/// that what a newer version added to those rows stays.
#[test]
fn a_lease_stamped_with_a_new_owner_lock_keeps_what_a_newer_version_added() {
    let (_dir, path) = temp_registry();
    let registry = open_at(&path, FIRST + 40..=FIRST + 49).unwrap();
    let guard = registry.acquire("held").unwrap();
    add_as_a_newer_version(&path);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE leases SET newer_note = 'kept' WHERE port = ?1",
        [guard.port()],
    )
    .unwrap();
    let row = |conn: &rusqlite::Connection| -> (String, String) {
        conn.query_row(
            "SELECT owner_lock, newer_note FROM leases WHERE port = ?1",
            [guard.port()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let (lock, _) = row(&conn);
    let mut owners = path.as_os_str().to_owned();
    owners.push(".owners");
    std::fs::remove_file(Path::new(&owners).join(&lock)).unwrap();
    registry.acquire("other").unwrap().release().unwrap();
    let (new_lock, note) = row(&conn);
    assert_ne!(new_lock, lock, "the lease names the new owner lock file");
    assert_eq!(note, "kept");
    guard.release().unwrap();
}
