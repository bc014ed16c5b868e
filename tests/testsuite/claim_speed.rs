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
    // old-1 was forgotten together with old-0, though no claim took its port: it is
    // searched for again (and finds its old port, the first one nobody remembers).
    let old1 = other.acquire("old-1").expect("old-1 again");
    assert_eq!((old1.port(), old1.choice()), (33001, Choice::Searched));
    drop(old1);
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

/// The range of the cross-process test: 16 ports of this module's block, remembered by
/// `old-15` down to `old-00` in port order (so the oldest memories sit at the top).
#[cfg(unix)]
const SHARED_RANGE: std::ops::RangeInclusive<u16> = 33010..=33025;
/// The worker's number, which its new names carry.
#[cfg(unix)]
const ID: &str = "PORTDADDY_CLAIM_SPEED_ID";
/// Worker processes.
#[cfg(unix)]
const WORKERS: usize = 4;
/// New names each worker claims and holds.
#[cfg(unix)]
const NAMES_EACH: usize = 3;

/// Processes that claim new names at once on a registry whose every port is remembered
/// forget the same memories as one process would, the oldest, and never hand out a port
/// twice: the 12 new names end on the ports of the 12 memories used longest ago (not on
/// the 12 ports next-fit would lend out without forgetting), and the 4 most recent memories
/// stay.
#[cfg(unix)]
#[test]
fn processes_claiming_new_names_at_once_forget_only_the_oldest_memories() {
    use std::time::Instant;

    use crate::common::workers::Worker;

    let (_dir, path) = common::temp_registry();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(SHARED_RANGE)
        .port_probe(common::all_free)
        .open()
        .expect("open the registry");
    let names: Vec<String> = (0..16).rev().map(|i| format!("old-{i:02}")).collect();
    // One transaction: one `used_at` for all, so the order of use is the order of names:
    // old-00, on the last port, is the oldest.
    drop(registry.acquire_many(&names).expect("fill"));

    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|id| {
            Worker::spawn(
                format!("claim worker {id}"),
                "claim",
                &path,
                &SHARED_RANGE,
                &[(ID, id.to_string())],
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for worker in &workers {
        assert_eq!(worker.expect_line("READY", deadline), "READY");
    }
    for worker in &mut workers {
        worker.send("go");
    }
    let mut held = Vec::new();
    for worker in &workers {
        let line = worker.expect_line("HELD", deadline);
        let ports = line
            .strip_prefix("HELD ")
            .unwrap_or_else(|| panic!("{}: {line} ({})", worker.label, worker.stderr()));
        held.extend(ports.split(' ').map(|p| p.parse::<u16>().expect("a port")));
    }
    held.sort_unstable();
    let oldest: Vec<u16> = (33014..=33025).collect();
    assert_eq!(
        held, oldest,
        "the 12 new names hold the ports of the 12 oldest memories"
    );
    for i in 12..16u16 {
        let guard = registry
            .acquire(&format!("old-{i:02}"))
            .expect("a recent name");
        assert_eq!(
            (guard.port(), guard.choice()),
            (33025 - i, Choice::Remembered),
            "old-{i:02} was among the most recently used and kept its port"
        );
    }
    drop(workers);
}

/// The entry point of worker processes; an empty test in a normal run.
#[cfg(unix)]
#[test]
fn worker_entry() {
    use crate::common::workers::{parse_range, say, var, wait_for_eof, MODE, RANGE, REGISTRY};

    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    assert_eq!(mode, "claim", "unknown worker mode");
    let registry = PortDaddy::builder()
        .path(var(REGISTRY))
        .range(parse_range(&var(RANGE)))
        .port_probe(common::all_free)
        .open()
        .expect("worker: open the registry");
    let id = var(ID);
    say("READY");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .expect("read the go line");
    let guards: Vec<_> = (0..NAMES_EACH)
        .map(|k| {
            registry
                .acquire(&format!("new-{id}-{k}"))
                .expect("claim a new name")
        })
        .collect();
    let ports: Vec<String> = guards.iter().map(|g| g.port().to_string()).collect();
    say(&format!("HELD {}", ports.join(" ")));
    wait_for_eof();
    drop(guards);
}
