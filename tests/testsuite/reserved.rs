//! Ports reserved for the whole registry: kept in the registry file, honoured by the claims
//! of every process and every handle, whenever it was opened; changed by the library and by
//! `portdaddy reserve` / `portdaddy unreserve`.
//!
//! Ports 32800-32849 belong to this file (see `common`): the tests that probe real ports use
//! them, and each test uses its own part.

use crate::common;

use std::ops::RangeInclusive;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{all_free, temp_registry};
use portdaddy::{Choice, Error, PortDaddy, PortRange, Request};

fn range(start: u16, end: u16) -> PortRange {
    PortRange::new(start, end).unwrap()
}

/// The registry at `path` over `ports`, probing real ports (all of this file's block).
fn open_real(path: &Path, ports: RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(ports)
        .lock_timeout(Duration::from_secs(20))
        .open()
        .unwrap()
}

#[test]
fn a_reservation_made_through_one_handle_is_honoured_by_a_handle_opened_before_it() {
    let (_dir, path) = temp_registry();
    let early = open_real(&path, 32800..=32804);
    // Opened and used before the reservation exists.
    drop(early.acquire("warm-up").unwrap());
    let other = open_real(&path, 32800..=32804);
    let overlapping = other.reserve_ports(range(32800, 32803)).unwrap();
    assert!(overlapping.is_empty(), "{overlapping:?}");
    let guard = early.acquire("svc").unwrap();
    assert_eq!(guard.port(), 32804, "the only port not reserved");
    assert_eq!(early.reserved_ports().unwrap(), [range(32800, 32803)]);
}

#[test]
fn a_required_reserved_port_fails_naming_the_reservation_and_a_preferred_one_falls_back() {
    let registry = PortDaddy::builder()
        .in_memory()
        .range(32805..=32809)
        .port_probe(all_free)
        .open()
        .unwrap();
    registry.reserve_ports(range(32805, 32806)).unwrap();
    let err = registry
        .acquire_with(&Request::new("db").require(32806))
        .unwrap_err();
    match &err {
        Error::PortUnavailable { port, reason, .. } => {
            assert_eq!(*port, 32806);
            assert!(reason.contains("32805-32806"), "names the range: {reason}");
            assert!(reason.contains("reserved"), "{reason}");
        }
        other => panic!("expected PortUnavailable, got {other:?}"),
    }
    let guard = registry
        .acquire_with(&Request::new("db").preferred(32805))
        .unwrap();
    assert_ne!(guard.choice(), Choice::Preferred);
    assert!((32807..=32809).contains(&guard.port()), "{}", guard.port());
    // A block that would run into the reserved range is refused as a whole too.
    let err = registry
        .acquire_with(&Request::new("blk").require(32804).block(2))
        .unwrap_err();
    assert!(
        matches!(err, Error::PortUnavailable { port: 32805, .. }),
        "{err:?}"
    );
}

#[test]
fn a_port_reserved_by_one_handle_alone_says_so_and_stays_free_for_others() {
    let (_dir, path) = temp_registry();
    let open = |reserve: &[u16]| {
        PortDaddy::builder()
            .path(&path)
            .range(32810..=32812)
            .port_probe(all_free)
            .reserve(reserve.iter().copied())
            .open()
            .unwrap()
    };
    let err = open(&[32810])
        .acquire_with(&Request::new("db").require(32810))
        .unwrap_err();
    match &err {
        Error::PortUnavailable { port, reason, .. } => {
            assert_eq!(*port, 32810);
            assert!(reason.contains("this handle"), "{reason}");
        }
        other => panic!("expected PortUnavailable, got {other:?}"),
    }
    assert!(open(&[]).reserved_ports().unwrap().is_empty());
    let guard = open(&[])
        .acquire_with(&Request::new("db").require(32810))
        .unwrap();
    assert_eq!(guard.port(), 32810);
}

#[test]
fn a_remembered_port_that_was_reserved_since_is_not_handed_back() {
    let registry = PortDaddy::builder()
        .in_memory()
        .range(32810..=32812)
        .port_probe(all_free)
        .open()
        .unwrap();
    let first = registry.acquire("api").unwrap().port();
    registry.reserve_ports(range(first, first)).unwrap();
    let again = registry.acquire("api").unwrap();
    assert_ne!(again.port(), first);
    assert_ne!(again.choice(), Choice::Remembered);
    // A detached lease on a port reserved since is not taken over either.
    let kept = registry.acquire("job").unwrap().keep().unwrap();
    registry
        .reserve_ports(range(kept.port(), kept.port()))
        .unwrap();
    let err = registry
        .acquire_with(&Request::new("job").reuse_detached())
        .unwrap_err();
    assert!(matches!(err, Error::Exhausted { .. }), "{err:?}");
}

#[test]
fn reserving_a_held_port_returns_the_lease_keeps_it_and_never_hands_the_port_out_again() {
    let (_dir, path) = temp_registry();
    let registry = open_real(&path, 32813..=32815);
    let held = registry
        .acquire_with(&Request::new("db").require(32814))
        .unwrap();
    let overlapping = registry.reserve_ports(range(32813, 32814)).unwrap();
    assert_eq!(overlapping, [held.lease().clone()]);
    assert_eq!(
        registry.list().unwrap(),
        [held.lease().clone()],
        "not revoked"
    );
    held.release().unwrap();
    let next = registry
        .acquire_with(&Request::new("db").preferred(32814))
        .unwrap();
    assert_eq!(next.port(), 32815);
    assert!(matches!(
        registry.acquire("more").unwrap_err(),
        Error::Exhausted { .. }
    ));
}

#[test]
fn a_search_skips_a_reserved_range_and_unreserving_hands_it_out_again() {
    let registry = PortDaddy::builder()
        .in_memory()
        .range(32816..=32821)
        .port_probe(all_free)
        .open()
        .unwrap();
    registry.reserve_ports(range(32816, 32818)).unwrap();
    registry.reserve_ports(range(32820, 32820)).unwrap();
    let ports: Vec<u16> = (0..2)
        .map(|i| {
            registry
                .acquire(&format!("s{i}"))
                .unwrap()
                .keep()
                .unwrap()
                .port()
        })
        .collect();
    assert_eq!(ports, [32819, 32821]);
    assert!(matches!(
        registry.acquire("full").unwrap_err(),
        Error::Exhausted { .. }
    ));
    assert_eq!(
        registry.unreserve_ports(range(32817, 32820)).unwrap(),
        [range(32817, 32818), range(32820, 32820)]
    );
    assert_eq!(registry.reserved_ports().unwrap(), [range(32816, 32816)]);
    assert!(registry
        .unreserve_ports(range(32817, 32817))
        .unwrap()
        .is_empty());
    let port = registry.acquire("again").unwrap().port();
    assert!([32817, 32818, 32820].contains(&port), "{port}");
}

#[test]
fn clones_of_an_in_memory_registry_share_its_reservations_and_others_do_not() {
    let registry = PortDaddy::builder()
        .in_memory()
        .range(32822..=32823)
        .port_probe(all_free)
        .open()
        .unwrap();
    let clone = registry.clone();
    clone.reserve_ports(range(32822, 32822)).unwrap();
    assert_eq!(registry.acquire("a").unwrap().port(), 32823);
    let separate = PortDaddy::builder()
        .in_memory()
        .range(32822..=32823)
        .port_probe(all_free)
        .open()
        .unwrap();
    assert!(separate.reserved_ports().unwrap().is_empty());
}

#[test]
fn a_registry_of_the_format_before_gains_the_table_without_locking_older_versions_out() {
    let (_dir, path) = temp_registry();
    let registry = open_real(&path, 32824..=32825);
    let lease = registry.acquire("kept").unwrap().keep().unwrap();
    drop(registry);
    // As the version before reserved ranges wrote it: schema 5, no table (nor the column
    // that schema 7 adds).
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE reserved; ALTER TABLE leases DROP COLUMN acquire_uncounted;
             PRAGMA user_version = 5;",
        )
        .unwrap();
    }
    let registry = open_real(&path, 32824..=32825);
    assert_eq!(registry.list().unwrap(), std::slice::from_ref(&lease));
    assert!(registry.reserved_ports().unwrap().is_empty());
    registry.reserve_ports(range(32824, 32825)).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7);
    // Older versions may go on using the registry: no reader is locked out.
    let marker: i64 = conn
        .query_row(
            "SELECT count(*) FROM meta WHERE key = 'min_reader_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(marker, 0);
    let rows: Vec<(u16, u16)> = conn
        .prepare("SELECT first_port, last_port FROM reserved")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows, [(32824, 32825)]);
}

/// A worker that opens the registry, says `OPEN`, then claims a port (preferring 32826)
/// for each `claim` line and says `PORT <port>`.
#[cfg(unix)]
#[test]
fn worker_entry() {
    use common::workers::{parse_range, read_line, say, var, MODE, RANGE, REGISTRY};
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    assert_eq!(mode, "claim", "unknown worker mode");
    let registry = open_real(Path::new(&var(REGISTRY)), parse_range(&var(RANGE)));
    say("OPEN");
    while let Some(line) = read_line() {
        assert_eq!(line, "claim");
        let guard = registry
            .acquire_with(&Request::new("svc").preferred(32826))
            .unwrap();
        say(&format!("PORT {}", guard.keep().unwrap().port()));
    }
}

#[cfg(unix)]
#[test]
fn a_reservation_made_in_one_process_is_honoured_by_another_process_opened_before() {
    let (_dir, path) = temp_registry();
    let ports = 32826..=32828;
    let mut worker = common::workers::Worker::spawn("claimer", "claim", &path, &ports, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    assert_eq!(worker.expect_line("OPEN", deadline), "OPEN");
    let here = open_real(&path, ports.clone());
    here.reserve_ports(range(32826, 32827)).unwrap();
    worker.send("claim");
    let line = worker.expect_line("PORT", deadline);
    assert_eq!(line, "PORT 32828", "{}", worker.stderr());
    worker.close_stdin();
    let (_, status) = worker.finish(deadline);
    assert!(status.success(), "{}", worker.stderr());
}

#[cfg(feature = "cli")]
mod cli {
    use super::*;

    use std::process::{Command, Output, Stdio};

    use serde_json::Value;

    fn portdaddy(db: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_portdaddy"))
            .args(args)
            .env("PORTDADDY_DB", db)
            .env("PORTDADDY_RANGE", "32829-32849")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn ok(db: &Path, args: &[&str]) -> (String, String) {
        let out = portdaddy(db, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        (text(&out.stdout), text(&out.stderr))
    }

    #[test]
    fn a_port_reserved_by_the_command_is_skipped_by_a_library_handle_opened_before() {
        let (_dir, path) = temp_registry();
        let handle = open_real(&path, 32829..=32831);
        drop(handle.acquire("warm-up").unwrap());
        let (out, err) = ok(&path, &["reserve", "32829", "32830"]);
        assert_eq!(out, "reserved 32829\nreserved 32830\n");
        assert!(err.is_empty(), "{err}");
        let guard = handle
            .acquire_with(&Request::new("svc").preferred(32829))
            .unwrap();
        assert_eq!(guard.port(), 32831);
        assert!(matches!(
            handle.acquire("more").unwrap_err(),
            Error::Exhausted { .. }
        ));
    }

    #[test]
    fn reserve_notes_the_lease_on_a_port_it_reserves_and_keeps_it() {
        let (_dir, path) = temp_registry();
        let (port, _) = ok(&path, &["acquire", "db", "--ttl", "10m"]);
        let port = port.trim();
        let (out, err) = ok(&path, &["reserve", port]);
        assert_eq!(out, format!("reserved {port}\n"));
        assert!(
            err.starts_with(&format!(
                "portdaddy: note: port {port} is leased (db, detached)"
            )),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        let (list, _) = ok(&path, &["list", "--json"]);
        assert!(list.contains(&format!("\"port\":{port}")), "{list}");
    }

    #[test]
    fn reserve_lists_merged_ranges_and_unreserve_splits_them_and_says_what_was_not_reserved() {
        let (_dir, path) = temp_registry();
        // Nothing reserved, not a terminal: nothing printed.
        assert_eq!(ok(&path, &["reserve"]).0, "");
        assert_eq!(ok(&path, &["reserve", "--json"]).0, "[]\n");
        ok(&path, &["reserve", "9000-9010", "9011", "8080"]);
        let (table, _) = ok(&path, &["reserve"]);
        assert_eq!(table, "RESERVED   PORTS\n8080       1\n9000-9011  12\n");
        let (out, _) = ok(&path, &["unreserve", "9005", "7000", "1-2", "8080-8090"]);
        assert_eq!(
            out,
            "unreserved 9005\nport 7000 was not reserved\nno port of 1-2 was reserved\n\
             unreserved 8080\n"
        );
        let (json, _) = ok(&path, &["reserve", "--json"]);
        let value: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            value,
            serde_json::json!([{"start": 9000, "end": 9004}, {"start": 9006, "end": 9011}])
        );
    }

    #[test]
    fn bad_ports_are_usage_errors_that_write_nothing() {
        let (dir, path) = temp_registry();
        let cases: &[&[&str]] = &[
            &["reserve", "0"],
            &["reserve", "0-5"],
            &["reserve", "10-5"],
            &["reserve", "70000"],
            &["reserve", "9000-70000"],
            &["reserve", "abc"],
            &["reserve", ""],
            &["reserve", "8080", "nope"],
            &["reserve", "8080", "--json"],
            &["unreserve"],
            &["unreserve", "5-"],
        ];
        for args in cases {
            let out = portdaddy(&path, args);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{args:?}: {}",
                text(&out.stderr)
            );
            let err = text(&out.stderr);
            assert!(err.starts_with("portdaddy: error: "), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert!(left.is_empty(), "{args:?} created {left:?}");
        }
    }
}
