//! The edges of what a host, a clock or a caller can do to a claim: TTLs below the
//! registry's resolution, blocks that find no run, hostile text in errors, forks in the
//! middle of a claim, signals during the lock wait, running out of file descriptors, and
//! clocks that jump.
//!
//! Ports 32300-32399 belong to this file (see `common`).

mod common;

use std::time::Duration;

use common::{all_free, temp_registry, FakeClock, FakeProcesses};
use portdaddy::{Error, PortDaddy, Request};

/// A file registry over `range` whose probe says every port is free, telling time by `clock`.
fn file_at(
    path: &std::path::Path,
    range: std::ops::RangeInclusive<u16>,
    clock: &FakeClock,
) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(range)
        .port_probe(all_free)
        .clock(clock.as_fn())
        .open()
        .expect("open")
}

// ---------------------------------------------------------------------------------------
// TTLs and the registry's resolution

#[test]
fn a_ttl_below_one_millisecond_is_refused() {
    let (_dir, path) = temp_registry();
    let registry = file_at(&path, 32300..=32309, &FakeClock::new());
    let err = registry
        .acquire_with(&Request::new("short").ttl(Duration::from_micros(500)))
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidRequest { reason } if reason.contains("1ms")),
        "{err}"
    );
    assert!(registry.list().unwrap().is_empty(), "nothing was leased");
}

#[test]
fn a_one_millisecond_ttl_does_not_expire_at_once() {
    let (_dir, path) = temp_registry();
    // A clock late in a millisecond: the stored start is rounded down by almost 1 ms.
    let clock = FakeClock::new();
    clock.advance(Duration::from_micros(999));
    let registry = file_at(&path, 32300..=32309, &clock);
    let lease = registry
        .acquire_with(&Request::new("short").ttl(Duration::from_millis(1)))
        .unwrap()
        .keep()
        .unwrap();
    let expires = lease.expires_at().expect("a TTL lease expires");
    assert!(expires > clock.as_fn()(), "expired at once: {expires:?}");
    assert_eq!(
        expires.duration_since(lease.acquired_at()).unwrap(),
        Duration::from_millis(1)
    );
    assert_eq!(registry.reap().unwrap(), 0, "expired at once");
    assert_eq!(registry.list().unwrap(), [lease.clone()]);
    clock.advance(Duration::from_millis(1));
    assert_eq!(registry.reap().unwrap(), 1, "expired once its TTL passed");
}

#[test]
fn a_ttl_with_a_fraction_of_a_millisecond_is_rounded_up() {
    let (_dir, path) = temp_registry();
    let registry = file_at(&path, 32300..=32309, &FakeClock::new());
    let lease = registry
        .acquire_with(&Request::new("frac").ttl(Duration::from_micros(1500)))
        .unwrap()
        .keep()
        .unwrap();
    let ttl = lease.expires_at().unwrap().duration_since(lease.acquired_at());
    assert_eq!(ttl.unwrap(), Duration::from_millis(2));
}

// ---------------------------------------------------------------------------------------
// What Exhausted says for a block

#[test]
fn a_block_without_a_free_run_says_so_and_counts_only_live_holders() {
    let (_dir, path) = temp_registry();
    let registry = file_at(&path, 32300..=32309, &FakeClock::new());
    // Three live holders leave runs of at most two free ports.
    let _held: Vec<_> = [32302, 32305, 32308]
        .into_iter()
        .map(|p| registry.acquire_with(&Request::new("x").require(p)).unwrap())
        .collect();
    let err = registry
        .acquire_with(&Request::new("raft").block(4))
        .unwrap_err();
    match &err {
        Error::Exhausted {
            range,
            held,
            block_len,
        } => assert_eq!((range.start(), *held, *block_len), (32300, 3, 4)),
        other => panic!("expected Exhausted, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("no 4 consecutive free ports in 32300-32309")
            && text.contains("3 of its 10 ports"),
        "{text}"
    );
    assert!(!text.contains("no free port"), "{text}");
}

#[test]
fn a_taken_preferred_block_longer_than_the_range_does_not_count_dead_holders() {
    let (_dir, path) = temp_registry();
    let procs = FakeProcesses::default();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(32300..=32302)
        .port_probe(all_free)
        .process_probe(procs.probe())
        .open()
        .unwrap();
    // A dead holder in the range, and a live one on the preferred block outside it.
    let dead = procs.spawn(4_000_001);
    // Left behind as by a crash: the guard's drop never runs.
    std::mem::forget(
        registry
            .acquire_with(&Request::new("gone").require(32300).owner(dead.clone()))
            .unwrap(),
    );
    procs.kill(&dead);
    let _live = registry
        .acquire_with(&Request::new("live").require(32310))
        .unwrap();
    let err = registry
        .acquire_with(&Request::new("raft").block(4).preferred(32310))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Exhausted {
                held: 0,
                block_len: 4,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("preferred block is taken") && text.contains("does not fit"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// Hostile text in errors

#[test]
fn an_error_shows_a_hostile_path_escaped() {
    let (dir, _) = temp_registry();
    // A file where the registry's directory should be: opening fails and names the path.
    let evil = dir.path().join("x\u{1b}[2J\u{202e}txt.\n");
    std::fs::write(&evil, b"").unwrap();
    let err = PortDaddy::open(evil.join("registry.sqlite3")).unwrap_err();
    let text = err.to_string();
    assert!(
        !text
            .chars()
            .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
        "{text:?}"
    );
    assert!(text.contains(r"x\u{1b}[2J\u{202e}txt.\n"), "{text:?}");
}

#[cfg(feature = "cli")]
mod command {
    use std::process::{Command, Output, Stdio};

    pub const RANGE: &str = "32300-32399";

    pub fn portdaddy(db: &std::path::Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portdaddy"));
        cmd.args(args)
            .env("PORTDADDY_DB", db)
            .env("PORTDADDY_RANGE", RANGE)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null());
        cmd
    }

    pub fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    pub fn run(db: &std::path::Path, args: &[&str]) -> Output {
        portdaddy(db, args).output().expect("run portdaddy")
    }
}

#[cfg(feature = "cli")]
#[test]
fn the_command_refuses_a_ttl_under_one_second() {
    let (_dir, path) = temp_registry();
    for ttl in ["1ms", "999ms", "500us"] {
        let out = command::run(&path, &["acquire", "short", "--ttl", ttl]);
        let stderr = command::text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {stderr}");
        assert!(stderr.contains("at least 1s"), "--ttl {ttl}: {stderr}");
    }
    let out = command::run(&path, &["acquire", "ok", "--ttl", "1s"]);
    assert!(out.status.success(), "{}", command::text(&out.stderr));
}
