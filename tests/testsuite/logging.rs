//! What the library reports through `tracing` instead of failing or printing.
//!
//! Ports 23000-23499 are shared with `api.rs`; these tests probe no real port.

use crate::common;

use std::time::Duration;

use common::{all_free, memory_with, temp_registry, FakeProcesses};
use portdaddy::{PortDaddy, PortRange, Request};

/// What `f` logged at `INFO` and above.
fn logs_of(f: impl FnOnce()) -> String {
    common::logs_at(tracing::Level::INFO, f)
}

#[test]
fn a_range_overlapping_the_ephemeral_range_is_logged_as_a_warning() {
    let eph = PortRange::ephemeral();
    let logs = logs_of(|| {
        let opened = PortDaddy::builder()
            .in_memory()
            .range(eph.start()..=eph.end())
            .port_probe(all_free)
            .open();
        assert!(opened.is_ok());
    });
    assert!(
        logs.contains("WARN") && logs.contains("ephemeral"),
        "{logs}"
    );
}

#[test]
fn a_range_outside_the_ephemeral_range_is_not_warned_about() {
    let logs = logs_of(|| {
        let range = PortDaddy::builder().in_memory().open().unwrap().range();
        let eph = PortRange::ephemeral();
        if !range.overlaps(&eph) {
            PortDaddy::builder()
                .in_memory()
                .range(range.start()..=range.end())
                .open()
                .unwrap();
        }
    });
    assert!(!logs.contains("WARN"), "{logs}");
}

#[cfg(unix)]
#[test]
fn a_release_that_fails_in_drop_is_logged_and_does_not_panic() {
    use std::os::fd::AsRawFd;

    let (_dir, path) = temp_registry();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(23000..=23009)
        .port_probe(all_free)
        .lock_timeout(Duration::from_millis(50))
        .open()
        .unwrap();
    let guard = registry.acquire("held").unwrap();
    let port = guard.port();

    // Another process holds the registry's write lock, so the release cannot happen.
    let lock = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path.with_extension("sqlite3.lock"))
        .unwrap();
    // SAFETY: flock on a valid descriptor that this test owns.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let logs = logs_of(|| drop(guard));
    assert!(
        logs.contains("WARN") && logs.contains("could not release"),
        "{logs}"
    );
    drop(lock);

    // The lease is still there, owned by this live process; freeing it by port works.
    assert!(registry.list().unwrap().iter().any(|l| l.port() == port));
    assert!(registry.release_port(port).unwrap());
}

#[test]
fn a_reclaimed_lease_is_logged_at_info() {
    let procs = FakeProcesses::default();
    let registry = memory_with(23000..=23000, &procs);
    let owner = procs.spawn(1_000_010);
    std::mem::forget(
        registry
            .acquire_with(&Request::new("crashed").owner(owner.clone()))
            .unwrap(),
    );
    procs.kill(&owner);
    let logs = logs_of(|| {
        let _guard = registry.acquire("next").unwrap();
    });
    assert!(
        logs.contains("INFO") && logs.contains("reclaimed") && logs.contains("crashed"),
        "{logs}"
    );
}
