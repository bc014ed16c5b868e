//! The behaviours the crate promises, one test each, through the public API.
//!
//! Ports 23000-23499 belong to this file (see `common`).

use crate::common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use common::{all_free, memory, memory_at, memory_with, temp_registry, FakeClock, FakeProcesses};
use portdaddy::{Choice, Error, Lease, Owner, PortDaddy, PortGuard, Protocol, Request};

fn file(path: &std::path::Path, range: std::ops::RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(range)
        .port_probe(all_free)
        .open()
        .unwrap()
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PortDaddy>();
    check::<PortGuard>();
    check::<Lease>();
    check::<Request>();
    check::<Error>();
    check::<portdaddy::GuardError>();
}

#[test]
fn sticky_name_gets_its_last_port_back_after_release() {
    let registry = memory(23000..=23099);
    let first = registry.acquire("db").unwrap();
    let port = first.port();
    let other = registry.acquire("cache").unwrap();
    drop(first);
    let again = registry.acquire("db").unwrap();
    assert_eq!(again.port(), port);
    assert_eq!(again.choice(), Choice::Remembered);
    assert_ne!(other.port(), port);
}

#[test]
fn sticky_name_survives_reopening_the_file_registry() {
    let (_dir, path) = temp_registry();
    let port = {
        let registry = file(&path, 23000..=23099);
        let _noise = registry.acquire("first").unwrap();
        registry.acquire("api").unwrap().port()
    };
    let registry = file(&path, 23000..=23099);
    let _between = registry.acquire("someone-else").unwrap();
    assert_eq!(registry.acquire("api").unwrap().port(), port);
}

#[test]
fn new_names_avoid_ports_other_names_remember() {
    let registry = memory(23000..=23002);
    let a = registry.acquire("a").unwrap().port();
    let b = registry.acquire("b").unwrap().port();
    // "c" gets the one port nobody remembers, although a's and b's ports are free.
    let c = registry.acquire("c").unwrap().port();
    assert_eq!(HashSet::from([a, b, c]).len(), 3);
    assert_eq!(registry.acquire("a").unwrap().port(), a);
}

#[test]
fn a_full_range_lends_out_remembered_ports() {
    let registry = memory(23000..=23001);
    let _ = registry.acquire("a").unwrap();
    let _ = registry.acquire("b").unwrap();
    let c = registry
        .acquire("c")
        .expect("remembered but free ports are still usable");
    assert!((23000..=23001).contains(&c.port()));
}

#[test]
fn two_holders_of_one_name_get_two_ports_and_the_first_keeps_its_memory() {
    let registry = memory(23000..=23099);
    let first = registry.acquire("web").unwrap();
    let second = registry.acquire("web").unwrap();
    assert_ne!(first.port(), second.port());
    let home = first.port();
    drop((first, second));
    assert_eq!(registry.acquire("web").unwrap().port(), home);
}

#[test]
fn preferred_port_is_granted_when_free() {
    let registry = memory(23000..=23099);
    let guard = registry
        .acquire_with(&Request::new("x").preferred(23050))
        .unwrap();
    assert_eq!((guard.port(), guard.choice()), (23050, Choice::Preferred));
}

#[test]
fn preferred_port_outside_the_range_is_granted_when_free() {
    let registry = memory(23000..=23009);
    let guard = registry
        .acquire_with(&Request::new("x").preferred(23400))
        .unwrap();
    assert_eq!(guard.port(), 23400);
}

#[test]
fn preferred_port_falls_back_to_the_normal_choice_when_taken() {
    let registry = memory(23000..=23099);
    let holder = registry
        .acquire_with(&Request::new("x").preferred(23050))
        .unwrap();
    let guard = registry
        .acquire_with(&Request::new("y").preferred(23050))
        .unwrap();
    assert_ne!(guard.port(), holder.port());
    assert_eq!(guard.choice(), Choice::Searched);
}

#[test]
fn required_port_fails_with_a_typed_error_when_taken() {
    let registry = memory(23000..=23099);
    let _holder = registry
        .acquire_with(&Request::new("x").require(23050))
        .unwrap();
    match registry.acquire_with(&Request::new("y").require(23050)) {
        Err(Error::PortUnavailable {
            port: 23050,
            reason,
            ..
        }) => {
            assert!(reason.contains("\"x\""), "{reason}")
        }
        other => panic!("expected PortUnavailable, got {other:?}"),
    }
}

#[test]
fn reserved_ports_are_never_handed_out_even_when_preferred() {
    let registry = PortDaddy::builder()
        .in_memory()
        .range(23000..=23002)
        .reserve([23000, 23001])
        .port_probe(all_free)
        .open()
        .unwrap();
    let guard = registry
        .acquire_with(&Request::new("x").preferred(23000))
        .unwrap();
    assert_eq!(guard.port(), 23002);
    assert!(matches!(
        registry.acquire("y"),
        Err(Error::Exhausted { .. })
    ));
}

#[test]
fn a_port_with_a_foreign_tcp_listener_is_skipped() {
    for ip in [Ipv4Addr::LOCALHOST, Ipv4Addr::UNSPECIFIED] {
        let listener = TcpListener::bind((ip, 23100)).expect("port 23100 free for the test");
        let registry = PortDaddy::builder()
            .in_memory()
            .range(23100..=23101)
            .open()
            .unwrap();
        assert_eq!(
            registry.acquire("svc").unwrap().port(),
            23101,
            "listener on {ip}"
        );
        drop(listener);
    }
}

#[test]
fn a_port_with_a_foreign_ipv6_listener_is_skipped() {
    let Ok(listener) = TcpListener::bind(("::", 23110)) else {
        eprintln!("skipped: this host has no IPv6");
        return;
    };
    let registry = PortDaddy::builder()
        .in_memory()
        .range(23110..=23111)
        .open()
        .unwrap();
    assert_eq!(registry.acquire("svc").unwrap().port(), 23111);
    drop(listener);
}

#[test]
fn a_foreign_udp_socket_blocks_udp_requests_only() {
    let _socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 23120)).unwrap();
    let registry = PortDaddy::builder()
        .in_memory()
        .range(23120..=23121)
        .open()
        .unwrap();
    let udp = registry
        .acquire_with(&Request::new("u").protocol(Protocol::Udp))
        .unwrap();
    assert_eq!(udp.port(), 23121);
    let both = registry.acquire_with(&Request::new("b").require(23120).protocol(Protocol::Both));
    assert!(matches!(
        both,
        Err(Error::PortUnavailable { port: 23120, .. })
    ));
    let tcp = registry
        .acquire_with(&Request::new("t").protocol(Protocol::Tcp))
        .unwrap();
    assert_eq!(tcp.port(), 23120, "a UDP socket does not block TCP");
}

#[test]
fn a_dead_owners_lease_is_reclaimed_when_the_range_is_full() {
    let procs = FakeProcesses::default();
    let registry = memory_with(23000..=23001, &procs);
    let alive = procs.spawn(1_000_001);
    let doomed = procs.spawn(1_000_002);
    let kept = registry
        .acquire_with(&Request::new("a").owner(alive))
        .unwrap();
    let lost = registry
        .acquire_with(&Request::new("b").owner(doomed.clone()))
        .unwrap();
    let lost_port = lost.port();
    std::mem::forget(lost); // a killed process runs no destructor
    assert!(matches!(
        registry.acquire("c"),
        Err(Error::Exhausted { held: 2, .. })
    ));
    procs.kill(&doomed);
    let reused = registry
        .acquire("c")
        .expect("the dead owner's port is reclaimed");
    assert_eq!(reused.port(), lost_port);
    assert!(registry
        .list()
        .unwrap()
        .iter()
        .any(|l| l.port() == kept.port()));
}

#[test]
fn a_dead_owners_lease_is_reclaimed_for_its_sticky_name() {
    let procs = FakeProcesses::default();
    let registry = memory_with(23000..=23099, &procs);
    let server = procs.spawn(1_000_003);
    let first = registry
        .acquire_with(&Request::new("dev").owner(server.clone()))
        .unwrap();
    let port = first.port();
    std::mem::forget(first);
    procs.kill(&server);
    let restarted = registry.acquire("dev").unwrap();
    assert_eq!(
        (restarted.port(), restarted.choice()),
        (port, Choice::Remembered)
    );
}

#[test]
fn a_reused_pid_with_another_start_time_counts_as_dead() {
    let me = Owner::current().unwrap();
    let impostor = Owner::new(me.pid(), me.start_time() + 1, me.boot_id());
    let registry = memory(23000..=23000);
    let stale = registry
        .acquire_with(&Request::new("old").owner(impostor))
        .unwrap();
    std::mem::forget(stale);
    assert_eq!(registry.acquire("new").unwrap().port(), 23000);
}

#[test]
fn a_lease_from_another_boot_counts_as_dead() {
    let me = Owner::current().unwrap();
    let earlier = Owner::new(me.pid(), me.start_time(), "some-earlier-boot");
    let registry = memory(23000..=23000);
    std::mem::forget(
        registry
            .acquire_with(&Request::new("old").owner(earlier))
            .unwrap(),
    );
    assert_eq!(registry.reap().unwrap(), 1);
}

#[test]
fn live_owners_leases_are_never_reaped() {
    let procs = FakeProcesses::default();
    let registry = memory_with(23000..=23009, &procs);
    let live = procs.spawn(1_000_004);
    let guards: Vec<_> = (0..5)
        .map(|i| {
            registry
                .acquire_with(&Request::new(format!("s{i}")).owner(live.clone()))
                .unwrap()
        })
        .collect();
    let mine = registry.acquire("mine").unwrap();
    assert_eq!(registry.reap().unwrap(), 0);
    assert_eq!(registry.list().unwrap().len(), guards.len() + 1);
    drop(mine);
}

#[test]
fn an_expired_lease_is_reclaimed_even_while_its_owner_lives() {
    let clock = FakeClock::new();
    let registry = memory_at(23000..=23000, &clock);
    let short = registry
        .acquire_with(&Request::new("short").ttl(Duration::from_secs(60)))
        .unwrap();
    assert!(matches!(
        registry.acquire("next"),
        Err(Error::Exhausted { .. })
    ));
    clock.advance(Duration::from_secs(61));
    let next = registry.acquire("next").unwrap();
    assert_eq!(next.port(), short.port());
    drop(short); // its lease is gone: dropping must not delete `next`'s lease
    assert_eq!(registry.list().unwrap().len(), 1);
    assert_eq!(registry.list().unwrap()[0].name(), "next");
}

#[test]
fn keep_detaches_the_lease_so_it_outlives_the_guard() {
    let (_dir, path) = temp_registry();
    let registry = file(&path, 23000..=23099);
    let lease = registry
        .acquire_with(&Request::new("build").ttl(Duration::from_secs(3600)))
        .unwrap()
        .keep()
        .unwrap();
    assert_eq!(lease.pid(), None);
    assert!(lease.expires_at().is_some());
    let reopened = file(&path, 23000..=23099);
    let listed = reopened.list().unwrap();
    assert_eq!(listed, vec![lease.clone()]);
    assert_eq!(
        reopened.reap().unwrap(),
        0,
        "a detached lease without expiry passed stays"
    );
    assert!(reopened.release_port(lease.port()).unwrap());
    assert!(reopened.list().unwrap().is_empty());
}

#[test]
fn a_kept_lease_comes_back_to_its_name_next_time() {
    let registry = memory(23000..=23099);
    let port = registry.acquire("build.rs").unwrap().keep().unwrap().port();
    assert!(registry.release_port(port).unwrap());
    assert_eq!(registry.acquire("build.rs").unwrap().port(), port);
}

#[test]
fn dropping_a_guard_removes_exactly_its_own_lease() {
    let registry = memory(23000..=23000);
    let old = registry.acquire("a").unwrap();
    assert!(registry.release_port(old.port()).unwrap()); // released by port from elsewhere
    let new = registry.acquire("b").unwrap();
    assert_eq!(new.port(), old.port());
    drop(old);
    assert_eq!(
        registry.list().unwrap().len(),
        1,
        "the new holder's lease survives"
    );
    assert!(matches!(new.keep(), Ok(l) if l.name() == "b"));
}

#[test]
fn keep_of_a_lost_lease_reports_it() {
    let registry = memory(23000..=23000);
    let guard = registry.acquire("a").unwrap();
    registry.release_port(guard.port()).unwrap();
    let err = guard.keep().unwrap_err();
    assert!(matches!(err.error(), Error::LeaseLost { port: 23000, .. }));
    assert!(
        err.into_guard().is_none(),
        "a lost lease has no guard to give back"
    );
}

#[test]
fn explicit_release_frees_the_port_and_tolerates_a_lost_lease() {
    let registry = memory(23000..=23000);
    let guard = registry.acquire("a").unwrap();
    guard.release().unwrap();
    assert!(registry.list().unwrap().is_empty());
    let guard = registry.acquire("a").unwrap();
    registry.release_port(guard.port()).unwrap();
    guard.release().unwrap();
}

#[test]
fn acquire_many_gives_distinct_ports() {
    let registry = memory(23000..=23007);
    let guards = registry
        .acquire_many(&["a", "b", "c", "d", "e", "f", "g", "h"])
        .unwrap();
    let ports: HashSet<u16> = guards.iter().map(PortGuard::port).collect();
    assert_eq!(ports.len(), 8);
}

#[test]
fn acquire_many_is_all_or_nothing() {
    for registry in [memory(23000..=23001), {
        let (dir, path) = temp_registry();
        std::mem::forget(dir);
        file(&path, 23000..=23001)
    }] {
        let err = registry.acquire_many(&["a", "b", "c"]).unwrap_err();
        assert!(matches!(err, Error::Exhausted { .. }), "{err}");
        assert!(
            registry.list().unwrap().is_empty(),
            "no port may stay leased"
        );
        let bad = registry.acquire_many(&["a", ""]).unwrap_err();
        assert!(matches!(bad, Error::InvalidName { .. }));
        assert!(registry.list().unwrap().is_empty());
        assert_eq!(registry.acquire_many(&["a", "b"]).unwrap().len(), 2);
    }
}

#[test]
fn exhausted_names_the_range_and_how_many_are_held() {
    let registry = memory(23000..=23001);
    let _a = registry.acquire("a").unwrap();
    let _b = registry.acquire("b").unwrap();
    let err = registry.acquire("c").unwrap_err();
    match &err {
        Error::Exhausted { range, held, .. } => {
            assert_eq!((range.start(), range.end(), *held), (23000, 23001, 2));
        }
        other => panic!("expected Exhausted, got {other:?}"),
    }
    assert!(err.to_string().contains("23000-23001"), "{err}");
}

#[test]
fn in_process_handles_share_one_registry() {
    let a = PortDaddy::in_process().acquire("shared-a").unwrap();
    let listed = PortDaddy::in_process().list().unwrap();
    assert!(listed.iter().any(|l| l.port() == a.port()));
    assert!(PortDaddy::in_process().path().is_none());
}

#[test]
fn separate_in_memory_registries_are_independent() {
    let a = memory(23000..=23000);
    let b = memory(23000..=23000);
    assert_eq!(
        a.acquire("x").unwrap().port(),
        b.acquire("x").unwrap().port()
    );
}

fn threads_never_share_a_port(registry: PortDaddy) {
    let registry = Arc::new(registry);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let registry = registry.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for i in 0..50 {
                    let guard = loop {
                        match registry.acquire(&format!("t{t}-{}", i % 3)) {
                            Ok(guard) => break guard,
                            Err(Error::Exhausted { .. }) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    };
                    let held: Vec<u16> = registry.list().unwrap().iter().map(Lease::port).collect();
                    let unique: HashSet<u16> = held.iter().copied().collect();
                    assert_eq!(held.len(), unique.len(), "a port is leased twice: {held:?}");
                    seen.push(guard.port());
                }
                seen
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().len(), 50);
    }
    assert!(registry.list().unwrap().is_empty());
}

#[test]
fn threads_never_share_a_port_in_memory() {
    threads_never_share_a_port(memory(23200..=23211));
}

#[test]
fn threads_never_share_a_port_in_a_file_registry() {
    let (_dir, path) = temp_registry();
    threads_never_share_a_port(file(&path, 23200..=23211));
}

#[test]
fn threads_with_their_own_handles_never_share_a_port() {
    let (_dir, path) = temp_registry();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let registry = file(&path, 23300..=23305);
                (0..30)
                    .map(|_| loop {
                        match registry.acquire("x") {
                            Ok(guard) => break guard,
                            Err(Error::Exhausted { .. }) => std::thread::yield_now(),
                            Err(e) => panic!("{e}"),
                        }
                    })
                    .map(|g| {
                        // Each handle holds its port while another handle may claim.
                        let port = g.port();
                        std::thread::yield_now();
                        drop(g);
                        port
                    })
                    .count()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 30);
    }
}

#[cfg(unix)]
#[test]
fn the_registry_directory_and_file_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/sub/registry.sqlite3");
    let _guard = file(&path, 23000..=23009).acquire("x").unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("new")), 0o700);
    assert_eq!(mode(&dir.path().join("new/sub")), 0o700);
    assert_eq!(mode(&path), 0o600);
    let lock = dir.path().join("new/sub/registry.sqlite3.lock");
    assert_eq!(mode(&lock), 0o600);
}

#[test]
fn the_registry_is_in_wal_mode() {
    let (_dir, path) = temp_registry();
    let registry = file(&path, 23000..=23009);
    let _g = registry.acquire("x").unwrap();
    let header = std::fs::read(&path).unwrap();
    // Bytes 18 and 19 of an SQLite header are the write/read format versions: 2 means WAL.
    assert_eq!((header[18], header[19]), (2, 2));
}

#[test]
fn a_range_overlapping_the_ephemeral_range_is_allowed() {
    let eph = portdaddy::PortRange::ephemeral();
    let registry = PortDaddy::builder()
        .in_memory()
        .range(eph.start()..=eph.end())
        .port_probe(all_free)
        .open();
    assert!(registry.is_ok());
}

#[test]
fn the_default_range_avoids_the_ephemeral_range_and_privileged_ports() {
    let registry = PortDaddy::builder().in_memory().open().unwrap();
    let range = registry.range();
    assert!(range.start() >= 1024);
    let eph = portdaddy::PortRange::ephemeral();
    if eph.start() > 1024 + 1024 || eph.end() < 65535 - 1024 {
        assert!(!range.overlaps(&eph), "{range} overlaps {eph}");
    }
}

#[test]
fn a_lock_held_by_another_handle_times_out_with_the_path_named() {
    let (_dir, path) = temp_registry();
    let _registry = file(&path, 23000..=23009);
    let lock_path = path.with_extension("sqlite3.lock");
    let mut other = fd_lock_free::hold(&lock_path);
    let waiter = PortDaddy::builder()
        .path(&path)
        .range(23000..=23009)
        .port_probe(all_free)
        .lock_timeout(Duration::from_millis(100));
    match waiter.open() {
        Err(Error::LockTimeout {
            path: p, waited, ..
        }) => {
            assert_eq!(p, path);
            assert!(
                waited >= Duration::from_millis(100),
                "reported wait {waited:?}"
            );
        }
        other => panic!("expected LockTimeout, got {other:?}"),
    }
    other.release();
    assert!(file(&path, 23000..=23009).acquire("x").is_ok());
}

/// Holds the registry's lock file the way another process would, with a raw `flock`.
mod fd_lock_free {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    pub struct Hold(Option<File>);

    pub fn hold(path: &std::path::Path) -> Hold {
        let file = File::options().read(true).write(true).open(path).unwrap();
        // SAFETY: flock on a valid, owned descriptor.
        assert_eq!(
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        Hold(Some(file))
    }

    impl Hold {
        pub fn release(&mut self) {
            self.0 = None;
        }
    }
}

#[test]
fn reuse_detached_gives_a_build_script_the_same_port_every_build() {
    let (_dir, path) = temp_registry();
    let build = || {
        // Each build is a new process with a new handle; the server from the last build may
        // still be listening, so the port must not be probed away.
        let registry = PortDaddy::builder()
            .path(&path)
            .range(23400..=23499)
            .open()
            .unwrap();
        let request = Request::new("my-crate/server")
            .ttl(Duration::from_secs(3600))
            .reuse_detached();
        registry.acquire_with(&request).unwrap().keep().unwrap()
    };
    let first = build();
    let server = TcpListener::bind((Ipv4Addr::LOCALHOST, first.port())).unwrap();
    let second = build();
    assert_eq!(second.port(), first.port());
    assert_ne!(second.id(), first.id(), "the old lease was replaced");
    let registry = file(&path, 23400..=23499);
    assert_eq!(registry.list().unwrap(), vec![second.clone()]);
    drop(server);
    // Without the option a detached lease blocks its port like any other.
    let plain = registry.acquire("my-crate/server").unwrap();
    assert_ne!(plain.port(), first.port());
}

#[test]
fn a_ttl_too_large_to_store_is_a_typed_error_not_a_panic() {
    let (_dir, path) = temp_registry();
    for registry in [memory(23000..=23009), file(&path, 23000..=23009)] {
        let request = Request::new("forever").ttl(Duration::MAX);
        match registry.acquire_with(&request) {
            Err(Error::InvalidRequest { reason, .. }) => {
                assert!(reason.contains("TTL"), "{reason}")
            }
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
        assert!(registry.list().unwrap().is_empty());
    }
}

#[test]
fn an_unrepresentable_lock_timeout_means_waiting_without_limit() {
    let (_dir, path) = temp_registry();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(23000..=23009)
        .port_probe(all_free)
        .lock_timeout(Duration::MAX)
        .open()
        .unwrap();
    assert!(registry.acquire("x").is_ok());
}

#[test]
fn reuse_detached_never_overrides_a_required_port() {
    let registry = memory(23000..=23099);
    let kept = registry.acquire("build").unwrap().keep().unwrap();
    let other_port = if kept.port() == 23050 { 23051 } else { 23050 };
    let request = Request::new("build").require(other_port).reuse_detached();
    let guard = registry.acquire_with(&request).unwrap();
    assert_eq!(
        (guard.port(), guard.choice()),
        (other_port, Choice::Preferred)
    );
    assert!(
        registry.list().unwrap().contains(&kept),
        "the detached lease is untouched"
    );
}

#[test]
fn reuse_detached_needs_the_lease_to_cover_the_protocols_asked_for() {
    let registry = memory(23000..=23099);
    let kept = registry.acquire("svc").unwrap().keep().unwrap();
    let udp = Request::new("svc").protocol(Protocol::Udp).reuse_detached();
    let guard = registry.acquire_with(&udp).unwrap();
    assert_ne!(
        guard.port(),
        kept.port(),
        "a TCP-probed lease is not taken for UDP"
    );
}

#[test]
fn release_lease_never_frees_a_port_that_changed_hands() {
    let clock = FakeClock::new();
    let registry = memory_at(23000..=23000, &clock);
    let request = Request::new("build").ttl(Duration::from_secs(60));
    let old = registry.acquire_with(&request).unwrap().keep().unwrap();
    clock.advance(Duration::from_secs(61));
    let new = registry.acquire("next").unwrap();
    assert_eq!(new.port(), old.port());
    assert!(!registry.release_lease(&old).unwrap());
    assert_eq!(registry.list().unwrap(), vec![new.lease().clone()]);
}

#[cfg(unix)]
#[test]
fn threads_sharing_a_handle_each_give_up_when_their_own_timeout_ends() {
    let (_dir, path) = temp_registry();
    let timeout = Duration::from_millis(300);
    let registry = PortDaddy::builder()
        .path(&path)
        .range(23000..=23009)
        .port_probe(all_free)
        .lock_timeout(timeout)
        .open()
        .unwrap();
    let _outside = fd_lock_free::hold(&path.with_extension("sqlite3.lock"));
    // Four calls start together on one handle. Each must give up when *its* timeout ends,
    // not wait for the calls before it to time out in turn (which took 4x the timeout).
    let calls: Vec<(Duration, Duration)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let start = std::time::Instant::now();
                    match registry.acquire("x") {
                        Err(Error::LockTimeout { waited, .. }) => (waited, start.elapsed()),
                        other => panic!("expected LockTimeout, got {other:?}"),
                    }
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for &(waited, elapsed) in &calls {
        assert!(waited >= timeout, "gave up early: {calls:?}");
        assert!(waited <= elapsed, "reported more than it waited: {calls:?}");
        // Queued one after another, the last call took 4x the timeout; the margin is wide
        // enough for a busy machine.
        assert!(
            elapsed < timeout * 5 / 2,
            "waited past its timeout: {calls:?}"
        );
    }
}
