//! Promises of the public API beyond single calls: the handle and the guard are unwind safe,
//! and a panic inside a call leaves the registry as it was.
//!
//! Ports 32650-32699 (see `tests/common/mod.rs`); the probes here are closures, so no port
//! is bound.
use crate::common;

use std::ops::RangeInclusive;
use std::panic::{catch_unwind, RefUnwindSafe, UnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portdaddy::{Lease, PortDaddy, PortGuard, Protocol, Request};

const RANGE: RangeInclusive<u16> = 32650..=32669;

#[test]
fn handles_and_guards_are_unwind_safe_send_and_sync() {
    fn check<T: Send + Sync + UnwindSafe + RefUnwindSafe>() {}
    check::<PortDaddy>();
    check::<PortGuard>();
    check::<Lease>();
    check::<Request>();
}

/// A port probe that says every port is free until it has answered `calls` times, and then
/// panics; `disarm` makes it answer for ever.
#[derive(Clone)]
struct PanickingProbe(Arc<AtomicUsize>);

impl PanickingProbe {
    fn new() -> Self {
        Self(Arc::new(AtomicUsize::new(usize::MAX)))
    }

    fn panic_after(&self, calls: usize) {
        self.0.store(calls, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.0.store(usize::MAX, Ordering::SeqCst);
    }

    fn probe(&self) -> impl Fn(u16, Protocol) -> bool + Send + Sync + 'static {
        let left = Arc::clone(&self.0);
        move |port, _| {
            let before = left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n != usize::MAX).then(|| n.saturating_sub(1))
                })
                .unwrap_or(usize::MAX);
            assert!(before != 0, "the port probe panics at port {port}");
            true
        }
    }
}

/// Panics inside the third claim of a batch, under `catch_unwind` around the handle as it is
/// (no `AssertUnwindSafe`), and checks that the batch left nothing behind, that a guard
/// taken before is untouched, and that the handle goes on working.
fn a_panic_in_a_batch_leaves_nothing(registry: &PortDaddy, probe: &PanickingProbe) {
    let kept = registry.acquire("kept").unwrap();
    let before = registry.list().unwrap();
    let stats = registry.stats().unwrap();

    probe.panic_after(2);
    let unwound = catch_unwind(|| registry.acquire_many(&["a", "b", "c"]));
    assert!(unwound.is_err(), "the probe did not panic: {unwound:?}");

    probe.disarm();
    assert_eq!(
        registry.list().unwrap(),
        before,
        "the batch left leases behind"
    );
    assert_eq!(registry.stats().unwrap().acquired, stats.acquired);
    let batch = registry.acquire_many(&["a", "b", "c"]).unwrap();
    assert_eq!(registry.list().unwrap().len(), 4);
    let guard_ports: Vec<u16> = batch.iter().map(PortGuard::port).collect();
    assert!(!guard_ports.contains(&kept.port()), "{guard_ports:?}");
    drop(batch);
    kept.release().unwrap();
    assert!(registry.list().unwrap().is_empty());
}

#[test]
fn a_panicking_probe_leaves_an_in_memory_registry_as_it_was() {
    let probe = PanickingProbe::new();
    let registry = PortDaddy::builder()
        .in_memory()
        .range(RANGE)
        .port_probe(probe.probe())
        .open()
        .unwrap();
    a_panic_in_a_batch_leaves_nothing(&registry, &probe);
}

#[cfg(unix)]
#[test]
fn a_panicking_probe_leaves_a_file_registry_as_it_was_and_unlocked() {
    use common::workers::Worker;

    let (_dir, path) = common::temp_registry();
    let probe = PanickingProbe::new();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(RANGE)
        .port_probe(probe.probe())
        .open()
        .unwrap();
    a_panic_in_a_batch_leaves_nothing(&registry, &probe);

    // Once more, and then another process claims while this handle, which unwound out of
    // a transaction, stays open: the registry's lock must have been let go.
    let kept = registry.acquire("kept").unwrap();
    probe.panic_after(0);
    assert!(catch_unwind(|| registry.acquire("lost")).is_err());
    let mut worker = Worker::spawn("claimer", "claim", &path, &RANGE, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = worker.expect_line("CLAIMED", deadline);
    let port: u16 = line
        .strip_prefix("CLAIMED ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert_ne!(port, kept.port());
    worker.close_stdin();
    let (_, status) = worker.finish(deadline);
    assert!(status.success(), "{status}: {}", worker.stderr());
    probe.disarm();
    assert_eq!(registry.list().unwrap(), std::slice::from_ref(kept.lease()));
}

/// The entry point of the worker processes: `claim` opens the registry, takes one port,
/// reports `CLAIMED <port>` (or panics with the error) and holds it until stdin closes.
#[cfg(unix)]
#[test]
fn worker_entry() {
    use common::workers::{parse_range, say, var, wait_for_eof, MODE, RANGE, REGISTRY};

    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    assert_eq!(mode, "claim", "unknown worker mode");
    let registry = PortDaddy::builder()
        .path(var(REGISTRY))
        .range(parse_range(&var(RANGE)))
        .port_probe(common::all_free)
        .lock_timeout(Duration::from_secs(10))
        .open()
        .unwrap_or_else(|e| panic!("open: {}", common::chain(&e)));
    let guard = registry
        .acquire("claimer")
        .unwrap_or_else(|e| panic!("acquire: {}", common::chain(&e)));
    say(&format!("CLAIMED {}", guard.port()));
    wait_for_eof();
}

#[cfg(feature = "serde")]
#[test]
fn leases_and_ranges_round_trip_through_serde_and_ranges_are_checked() {
    use portdaddy::PortRange;

    let registry = common::memory(RANGE);
    let lease = registry.acquire("web").unwrap().keep().unwrap();
    let json = serde_json::to_string(&lease).unwrap();
    assert_eq!(serde_json::from_str::<Lease>(&json).unwrap(), lease);

    let range = PortRange::new(32650, 32699).unwrap();
    let json = serde_json::to_string(&range).unwrap();
    assert_eq!(json, r#"{"start":32650,"end":32699}"#);
    assert_eq!(serde_json::from_str::<PortRange>(&json).unwrap(), range);
    let reversed = serde_json::from_str::<PortRange>(r#"{"start":32699,"end":32650}"#);
    assert!(reversed.is_err(), "{reversed:?}");
}
