//! Blocks of consecutive ports ([`Request::block`]): one lease, every port probed, all
//! released together.
//!
//! Ports 30000-30499 belong to this file (see `common`).

use crate::common;

use std::net::{Ipv4Addr, TcpListener};

use common::{all_free, memory, memory_with, temp_registry, FakeProcesses};
use portdaddy::{Choice, Error, PortDaddy, Request};

/// The same registry over `range` in memory and in a fresh file, for tests that must hold
/// for both backends.
fn both(range: std::ops::RangeInclusive<u16>) -> Vec<(PortDaddy, Option<tempfile::TempDir>)> {
    let (dir, path) = temp_registry();
    let file = PortDaddy::builder()
        .path(path)
        .range(range.clone())
        .port_probe(all_free)
        .open()
        .unwrap();
    vec![(memory(range), None), (file, Some(dir))]
}

#[test]
fn a_block_holds_consecutive_ports_in_one_lease() {
    for (registry, _dir) in both(30000..=30009) {
        let guard = registry
            .acquire_with(&Request::new("raft").block(3))
            .unwrap();
        assert_eq!(guard.ports().collect::<Vec<_>>(), [30000, 30001, 30002]);
        let leases = registry.list().unwrap();
        assert_eq!(leases.len(), 1, "one lease for the whole block");
        assert_eq!(leases[0].block_len(), 3);
        assert_eq!(leases[0].ports(), 30000..=30002);
    }
}

#[test]
fn no_other_claim_gets_a_port_inside_a_block() {
    for (registry, _dir) in both(30010..=30015) {
        let block = registry.acquire_with(&Request::new("b").block(4)).unwrap();
        let singles: Vec<_> = (0..2).map(|_| registry.acquire("s").unwrap()).collect();
        for single in &singles {
            assert!(
                !block.ports().contains(&single.port()),
                "{single:?} in {block:?}"
            );
        }
        assert!(
            matches!(registry.acquire("s"), Err(Error::Exhausted { held: 6, .. })),
            "held counts the ports of the block and the two single ports"
        );
        for port in block.ports() {
            assert!(
                matches!(
                    registry.acquire_with(&Request::new("x").require(port)),
                    Err(Error::PortUnavailable { port: p, .. }) if p == port
                ),
                "port {port} of the block must be refused"
            );
        }
    }
}

#[test]
fn a_block_skips_runs_broken_by_a_lease_or_a_reserved_port() {
    let registry = PortDaddy::builder()
        .in_memory()
        .range(30020..=30029)
        .reserve([30025])
        .port_probe(all_free)
        .open()
        .unwrap();
    let _in_the_way = registry
        .acquire_with(&Request::new("x").require(30022))
        .unwrap();
    let block = registry.acquire_with(&Request::new("b").block(3)).unwrap();
    assert_eq!(block.ports(), 30026..=30028);
}

#[test]
fn a_block_skips_a_port_that_a_foreign_program_holds() {
    let foreign = TcpListener::bind((Ipv4Addr::LOCALHOST, 30031)).expect("30031 free for the test");
    let (_dir, path) = temp_registry();
    let registry = PortDaddy::builder()
        .path(path)
        .range(30030..=30039)
        .open()
        .unwrap();
    let block = registry.acquire_with(&Request::new("b").block(2)).unwrap();
    assert_eq!(block.ports(), 30032..=30033);
    drop(foreign);
}

#[test]
fn every_port_of_a_block_is_released_together() {
    for (registry, _dir) in both(30040..=30043) {
        let block = registry.acquire_with(&Request::new("b").block(4)).unwrap();
        drop(block);
        assert!(registry.list().unwrap().is_empty());
        let again: Vec<_> = (0..4).map(|_| registry.acquire("s").unwrap()).collect();
        assert_eq!(again.len(), 4, "all four ports are free again");
    }
}

#[test]
fn releasing_any_port_of_a_block_releases_the_whole_block() {
    for (registry, _dir) in both(30044..=30049) {
        let block = registry.acquire_with(&Request::new("b").block(3)).unwrap();
        assert!(registry.release_port(block.port() + 2).unwrap());
        assert!(registry.list().unwrap().is_empty());
        assert!(
            !registry.release_port(block.port() + 1).unwrap(),
            "nothing left"
        );
    }
}

#[test]
fn a_preferred_block_is_granted_whole_or_not_at_all() {
    for (registry, _dir) in both(30050..=30059) {
        let _taken = registry
            .acquire_with(&Request::new("x").require(30053))
            .unwrap();
        let free = registry
            .acquire_with(&Request::new("a").block(3).preferred(30050))
            .unwrap();
        assert_eq!(
            (free.ports(), free.choice()),
            (30050..=30052, Choice::Preferred)
        );
        let moved = registry
            .acquire_with(&Request::new("b").block(3).preferred(30052))
            .unwrap();
        assert_eq!(moved.choice(), Choice::Searched);
        assert!(!moved.ports().contains(&30053));
        let err = registry
            .acquire_with(&Request::new("c").block(2).require(30052))
            .unwrap_err();
        assert!(
            matches!(err, Error::PortUnavailable { port: 30052, .. }),
            "{err}"
        );
    }
}

#[test]
fn a_required_block_names_the_first_port_that_is_taken() {
    let registry = memory(30060..=30069);
    let _taken = registry
        .acquire_with(&Request::new("x").require(30062))
        .unwrap();
    let err = registry
        .acquire_with(&Request::new("c").block(4).require(30060))
        .unwrap_err();
    assert!(
        matches!(&err, Error::PortUnavailable { port: 30062, reason, .. } if reason.contains("\"x\"")),
        "{err}"
    );
    assert_eq!(registry.list().unwrap().len(), 1, "nothing else was leased");
}

#[test]
fn a_name_gets_its_block_back() {
    for (registry, _dir) in both(30070..=30089) {
        let first = registry
            .acquire_with(&Request::new("cluster").block(3))
            .unwrap();
        let ports = first.ports();
        drop(first);
        let _other = registry
            .acquire_with(&Request::new("other").block(3))
            .unwrap();
        let again = registry
            .acquire_with(&Request::new("cluster").block(3))
            .unwrap();
        assert_eq!((again.ports(), again.choice()), (ports, Choice::Remembered));
    }
}

#[test]
fn a_dead_owners_block_is_reclaimed_when_the_range_is_full() {
    let procs = FakeProcesses::default();
    let registry = memory_with(30090..=30093, &procs);
    let owner = procs.spawn(4_000_001);
    let block = registry
        .acquire_with(&Request::new("b").block(4).owner(owner.clone()))
        .unwrap();
    std::mem::forget(block); // its process "crashes"
    assert!(matches!(
        registry.acquire("s"),
        Err(Error::Exhausted { .. })
    ));
    procs.kill(&owner);
    let after: Vec<_> = (0..4).map(|_| registry.acquire("s").unwrap()).collect();
    assert_eq!(after.len(), 4);
}

#[test]
fn a_block_is_kept_across_reopening_the_file() {
    let (_dir, path) = temp_registry();
    let open = || {
        PortDaddy::builder()
            .path(&path)
            .range(30100..=30109)
            .port_probe(all_free)
            .open()
            .unwrap()
    };
    let lease = open()
        .acquire_with(&Request::new("b").block(5))
        .unwrap()
        .keep()
        .unwrap();
    let reopened = open();
    assert_eq!(reopened.list().unwrap(), std::slice::from_ref(&lease));
    assert_eq!(lease.ports(), 30100..=30104);
    let next = reopened.acquire("s").unwrap();
    assert!(!lease.ports().contains(&next.port()));
}

#[test]
fn a_searched_block_lies_inside_the_range_and_wraps_around() {
    let registry = memory(30110..=30116);
    let a = registry.acquire_with(&Request::new("a").block(3)).unwrap();
    let b = registry.acquire_with(&Request::new("b").block(3)).unwrap();
    assert_eq!((a.ports(), b.ports()), (30110..=30112, 30113..=30115));
    drop(a);
    // Only 30116 is left past the cursor: the search wraps to the start.
    let c = registry.acquire_with(&Request::new("c").block(3)).unwrap();
    assert_eq!(c.ports(), 30110..=30112);
}

#[test]
fn impossible_blocks_are_invalid_requests() {
    let registry = memory(30120..=30123);
    for (request, needle) in [
        (Request::new("z").block(0), "at least 1"),
        (Request::new("z").block(5), "does not fit in the range"),
        (
            Request::new("z").block(3).preferred(65534),
            "past port 65535",
        ),
    ] {
        match registry.acquire_with(&request) {
            Err(Error::InvalidRequest { reason, .. }) => {
                assert!(reason.contains(needle), "{reason:?} should say {needle:?}")
            }
            other => panic!("{request:?} gave {other:?}"),
        }
    }
    let edge = registry
        .acquire_with(&Request::new("edge").block(2).require(65534))
        .unwrap();
    assert_eq!(edge.ports(), 65534..=65535);
}

#[test]
fn a_detached_block_over_a_port_reserved_since_is_not_taken_over() {
    let (_dir, path) = temp_registry();
    let open = |reserved: &[u16]| {
        PortDaddy::builder()
            .path(&path)
            .range(30130..=30139)
            .reserve(reserved.iter().copied())
            .port_probe(all_free)
            .open()
            .unwrap()
    };
    let build = || {
        Request::new("build")
            .block(2)
            .ttl(std::time::Duration::from_secs(600))
            .reuse_detached()
    };
    let kept = open(&[]).acquire_with(&build()).unwrap().keep().unwrap();
    let registry = open(&[kept.port() + 1]);
    let again = registry.acquire_with(&build()).unwrap();
    assert!(
        !again.ports().contains(&(kept.port() + 1)),
        "{again:?} holds a reserved port"
    );
    assert!(
        registry.list().unwrap().contains(&kept),
        "the old lease stays"
    );
}
