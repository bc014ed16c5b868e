//! The fixture of `examples/nextest_fixture.rs` in real tests: under `cargo nextest run`
//! every test below is a process of its own, under `cargo test` a thread; either way each
//! holds three bound ports and none collides with another's.
//!
//! Ports 31000-31499 belong to this file (see `common`).

#[path = "../examples/nextest_fixture.rs"]
#[allow(dead_code)]
mod fixture;

use fixture::TestPorts;

/// One test: three servers' ports, bound and answering.
fn three_servers() {
    let ports = TestPorts::bind(&["api", "db", "cache"]).expect("lease and bind three ports");
    let mut distinct = ports.ports();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);
    assert!(distinct.iter().all(|p| (31000..=31499).contains(p)));
    ports
        .round_trip()
        .expect("each port is served by its own socket");
}

macro_rules! tests {
    ($($name:ident)*) => { $( #[test] fn $name() { three_servers() } )* };
}

tests! {
    fixture_01 fixture_02 fixture_03 fixture_04 fixture_05 fixture_06
    fixture_07 fixture_08 fixture_09 fixture_10 fixture_11 fixture_12
}
