//! Claims stay cheap on a long-lived registry: when every vacant port of the range is
//! remembered by some name, the memories used longest ago are forgotten, so that new names
//! find a port without walking the range each time (README "Sticky names").

use std::time::Duration;

use portdaddy::{Choice, PortDaddy};

use crate::common;

/// 8 ports of this module's block; the tests here probe no port for real.
const RANGE: std::ops::RangeInclusive<u16> = 33000..=33007;

fn open(path: &std::path::Path, clock: &common::FakeClock) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(RANGE)
        .port_probe(common::all_free)
        .clock(clock.as_fn())
        .open()
        .expect("open the registry")
}

#[test]
fn a_file_registry_forgets_the_memories_used_longest_ago_when_every_port_is_remembered() {
    let (_dir, path) = common::temp_registry();
    let clock = common::FakeClock::new();
    let registry = open(&path, &clock);
    for i in 0..8u16 {
        clock.advance(Duration::from_secs(1));
        let guard = registry.acquire(&format!("old-{i}")).expect("fill");
        assert_eq!(guard.port(), 33000 + i);
    }
    // Every port is remembered. A new name costs the two memories used longest ago (a
    // quarter of the range) and gets one of their ports.
    clock.advance(Duration::from_secs(1));
    let new = registry.acquire("new").expect("a new name");
    assert_eq!((new.port(), new.choice()), (33000, Choice::Searched));
    drop(new);
    // A second handle on the file, as another process would open it, sees the same memories.
    let other = open(&path, &clock);
    let newer = other.acquire("newer").expect("another new name");
    assert_eq!((newer.port(), newer.choice()), (33001, Choice::Searched));
    drop(newer);
    for i in 2..8u16 {
        let guard = other
            .acquire(&format!("old-{i}"))
            .expect("a remembered name");
        assert_eq!(
            (guard.port(), guard.choice()),
            (33000 + i, Choice::Remembered),
            "old-{i} was used recently enough to keep its port"
        );
    }
    // old-0 lost its memory; its port went to "new", which remembers it now.
    let new_again = other.acquire("new").expect("new again");
    assert_eq!(
        (new_again.port(), new_again.choice()),
        (33000, Choice::Remembered)
    );
    let old0 = other.acquire("old-0").expect("old-0 again");
    assert_eq!(old0.choice(), Choice::Searched);
}

#[test]
fn a_name_that_keeps_getting_its_port_is_not_the_one_forgotten() {
    let (_dir, path) = common::temp_registry();
    let clock = common::FakeClock::new();
    let registry = open(&path, &clock);
    for i in 0..8u16 {
        clock.advance(Duration::from_secs(1));
        drop(registry.acquire(&format!("old-{i}")).expect("fill"));
    }
    // old-0 is used again two days later: its use is recorded again, so it is now the most
    // recently used memory, and old-1 and old-2 are the ones a new name costs.
    clock.advance(Duration::from_secs(2 * 24 * 60 * 60));
    let again = registry.acquire("old-0").expect("old-0 again");
    assert_eq!((again.port(), again.choice()), (33000, Choice::Remembered));
    drop(again);
    let new = registry.acquire("new").expect("a new name");
    assert_eq!(new.port(), 33001);
    drop(new);
    let kept = registry.acquire("old-0").expect("old-0 once more");
    assert_eq!((kept.port(), kept.choice()), (33000, Choice::Remembered));
    let lost = registry.acquire("old-2").expect("old-2 again");
    assert_ne!(lost.choice(), Choice::Remembered, "old-2 was forgotten");
}
