//! Real multi-process tests: several OS processes share one registry file.
//!
//! # How the worker processes are made
//!
//! A worker is this very test binary (`std::env::current_exe()`), run again as
//! `<binary> processes::worker_entry --exact --nocapture` with [`MODE`] set in its environment. The test
//! `worker_entry` returns at once when [`MODE`] is absent, so in a normal run it is an empty
//! test; in a worker it opens the registry named by the environment and plays its part. This
//! works the same under `cargo test` and `cargo nextest run`, since both run a libtest binary.
//!
//! # How workers and the test talk
//!
//! A worker writes protocol lines `@pd <message>` to its stdout (libtest's own output around
//! them is ignored) and reads its stdin: a `go` line to start, or end-of-file to let go of
//! what it holds. A thread per worker forwards the protocol lines to a channel, and the test
//! waits on that channel with a deadline, so every wait is bounded and a stuck worker fails
//! the test with its stderr in the message instead of hanging it. Nothing here sleeps to let
//! another process "probably" get somewhere. A worker whose test dies gets end-of-file on
//! stdin and exits, and [`Worker`]'s `Drop` kills and reaps it, so no stray process survives
//! a failing test.
//!
//! # Ports
//!
//! This file owns the block 24000-24999 (see `common/mod.rs`); each test uses its own
//! part of it, so that tests running at the same time never probe each other's ports.
//! Two runs of this file at once (`cargo test` and `cargo nextest run` side by side, or two
//! checkouts on one host) would still share those ports through different registries, and
//! real binds would then fail for reasons that are no bug; so each test first takes a
//! host-wide lock on its part of the block ([`lock_ports`]), and such runs take turns.
//!
//! The file is Unix-only: it kills workers with `SIGKILL`, reads `CLOCK_MONOTONIC` and forks.
#![cfg(unix)]

use crate::common;
use crate::common::workers::parse_held;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::workers::{self, parse_range, say, var, wait_for_eof, Worker, MODE, RANGE, REGISTRY};
use portdaddy::{Error, PortDaddy, PortGuard};

/// The directory in which a `create` worker opens its registries.
const DIR: &str = "PORTDADDY_PROCESSES_DIR";
/// A `churn` worker's number.
const ID: &str = "PORTDADDY_PROCESSES_ID";
/// How many acquire/release rounds a `churn` worker makes, or registries a `create` worker
/// opens.
const ROUNDS: &str = "PORTDADDY_PROCESSES_ROUNDS";
/// The directory of a `churn` worker's per-port marker files.
const MARKERS: &str = "PORTDADDY_PROCESSES_MARKERS";
/// The lease name of a `hold` worker.
const NAME: &str = "PORTDADDY_PROCESSES_NAME";
/// Whether a `hold` worker also binds a listener on its port (`1`) or not (`0`).
const LISTEN: &str = "PORTDADDY_PROCESSES_LISTEN";

/// The longest any single wait on a worker may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// 1. Many processes acquire and release concurrently on a small range.
// ---------------------------------------------------------------------------------------------

const CHURN_RANGE: RangeInclusive<u16> = 24000..=24007;
const CHURN_WORKERS: usize = 6;
const CHURN_ROUNDS: usize = 40;

/// Six processes each take and release a port 40 times from a range of 8, holding a real
/// listener on it. No two holds of one port may overlap and every bind must succeed.
///
/// Overlap is detected two ways (see [`churn_worker`]):
///
/// - **Marker files**, no clock needed: right after `acquire` returns, the worker creates
///   `markers/<port>` with `O_CREAT | O_EXCL`, and removes it right before dropping the guard.
///   `O_EXCL` creation is atomic, so if two holds of a port overlap while both markers would
///   exist, the later creation fails and is reported.
/// - **Intervals on `CLOCK_MONOTONIC`**: the worker reads the clock after `acquire` returns
///   (start) and before the guard drops (end). A correct registry commits the lease before
///   `acquire` returns and deletes it only inside the drop, and the next claim of the port
///   commits after that delete, so for two holds A then B of one port,
///   `A.end < delete(A) < claim(B) < B.start` in real time. On Linux (and macOS)
///   `CLOCK_MONOTONIC` is one clock for the whole system, not per process (unlike what
///   `Instant` promises), so readings from different workers compare; unlike `SystemTime` it
///   never jumps. Any `B.start <= A.end` is an overlap.
///
/// The worker holds the lease for a moment *without* a socket before binding and after
/// closing the listener: there only the registry protects the port (while the listener is
/// bound, the bind probe alone would keep the port from others and hide a registry bug).
#[test]
fn six_processes_share_a_small_range_without_collisions() {
    let _ports = lock_ports(&CHURN_RANGE);
    let (dir, path) = common::temp_registry();
    let markers = dir.path().join("markers");
    std::fs::create_dir(&markers).expect("create the marker directory");
    // Created here, so that this test is about claims; creation races have their own test.
    let registry = open(&path, &CHURN_RANGE);

    let mut workers: Vec<Worker> = (0..CHURN_WORKERS)
        .map(|id| {
            Worker::spawn(
                format!("churn worker {id}"),
                "churn",
                &path,
                &CHURN_RANGE,
                &[
                    (ID, id.to_string()),
                    (ROUNDS, CHURN_ROUNDS.to_string()),
                    (MARKERS, markers.display().to_string()),
                ],
            )
        })
        .collect();

    // Start line: every worker has opened the registry before any of them claims.
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

    let deadline = Instant::now() + DEADLINE;
    let mut holds = Vec::new();
    let mut exhausted = 0u64;
    for (id, worker) in workers.iter_mut().enumerate() {
        let (lines, status) = worker.finish(deadline);
        assert!(
            status.success(),
            "{} failed ({status}); stderr:\n{}",
            worker.label,
            worker.stderr()
        );
        let mut done = false;
        for line in lines {
            let fields: Vec<&str> = line.split(' ').collect();
            match fields[..] {
                ["HOLD", port, start, end, marker, bind] => holds.push(Hold {
                    worker: id,
                    port: port.parse().expect("port"),
                    start: start.parse().expect("start"),
                    end: end.parse().expect("end"),
                    marker_ok: marker == "1",
                    bind: bind.to_owned(),
                }),
                ["DONE", n] => {
                    exhausted += n.parse::<u64>().expect("exhausted count");
                    done = true;
                }
                _ => panic!("{}: unexpected line {line:?}", worker.label),
            }
        }
        assert!(done, "{} exited without reporting DONE", worker.label);
    }
    // Exhaustion is allowed (a port of the range may be bound by someone else for a moment);
    // it is reported with the captured output, not asserted.
    eprintln!(
        "{} holds, {exhausted} acquire attempts met Error::Exhausted",
        holds.len()
    );

    assert_eq!(
        holds.len(),
        CHURN_WORKERS * CHURN_ROUNDS,
        "every round must report its hold"
    );
    for h in &holds {
        assert!(
            CHURN_RANGE.contains(&h.port),
            "port {} is outside the range",
            h.port
        );
        assert!(h.start <= h.end, "hold {h:?} ends before it starts");
    }

    let bind_failures: Vec<&Hold> = holds.iter().filter(|h| h.bind != "ok").collect();
    assert!(
        bind_failures.is_empty(),
        "binding a leased port failed: {bind_failures:#?}\nthe workers saw:\n{}",
        workers.iter().map(Worker::stderr).collect::<String>()
    );

    let collisions: Vec<&Hold> = holds.iter().filter(|h| !h.marker_ok).collect();
    assert!(
        collisions.is_empty(),
        "a port was handed out while its holder had it: {collisions:#?}"
    );

    let mut by_port: BTreeMap<u16, Vec<&Hold>> = BTreeMap::new();
    for h in &holds {
        by_port.entry(h.port).or_default().push(h);
    }
    let mut overlaps = Vec::new();
    for port_holds in by_port.values_mut() {
        port_holds.sort_by_key(|h| h.start);
        for pair in port_holds.windows(2) {
            if pair[1].start <= pair[0].end {
                overlaps.push((pair[0], pair[1]));
            }
        }
    }
    assert!(
        overlaps.is_empty(),
        "overlapping holds of one port: {overlaps:#?}"
    );

    // The test proves something only if processes really competed for the same ports.
    let shared = by_port
        .values()
        .filter(|hs| hs.iter().map(|h| h.worker).collect::<BTreeSet<_>>().len() > 1)
        .count();
    assert!(
        shared > 0,
        "no port was used by two workers; the test exercised nothing: {by_port:?}"
    );
    assert!(
        max_simultaneous(&holds) >= 2,
        "the workers never held ports at the same time; the test exercised nothing"
    );

    // Every guard was dropped before its process exited: nothing is left behind.
    let left = registry.list().expect("list");
    assert!(
        left.is_empty(),
        "leases left after every worker released: {left:#?}"
    );
}

/// One hold of a port by a churn worker, as it reported it.
#[derive(Debug)]
struct Hold {
    worker: usize,
    port: u16,
    start: u64,
    end: u64,
    marker_ok: bool,
    bind: String,
}

/// The largest number of holds (of any ports) in progress at one instant.
fn max_simultaneous(holds: &[Hold]) -> usize {
    // A start sorts before an end at the same instant, which only overcounts ties.
    let mut events: Vec<(u64, i32)> = holds
        .iter()
        .flat_map(|h| [(h.start, 1), (h.end, -1)])
        .collect();
    events.sort_by_key(|&(t, delta)| (t, -delta));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        max = max.max(now);
    }
    usize::try_from(max).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// 2. Leases of SIGKILLed holders are reclaimed; a live holder's lease never is.
// ---------------------------------------------------------------------------------------------

/// One live holder plus [`VICTIMS`] holders to kill: the range is exactly their ports.
const KILL_RANGE: RangeInclusive<u16> = 24100..=24103;
const VICTIMS: usize = 3;

/// Four processes fill a range of four ports. Three of them are killed with `SIGKILL` (no
/// destructor runs); a fresh handle must then get exactly their three ports back, while the
/// fourth holder, alive all along, keeps its lease and its port is never handed out.
///
/// The live holder binds no listener, so only its lease (not the bind probe) protects its
/// port: a registry that reaped a live lease would hand that port out and fail here.
#[test]
fn sigkilled_holders_ports_are_reclaimed_but_a_live_holders_port_is_not() {
    let _ports = lock_ports(&KILL_RANGE);
    let (_dir, path) = common::temp_registry();
    let deadline = Instant::now() + DEADLINE;

    // The live holder takes its port first, then the victims take the rest.
    let mut live = Worker::spawn(
        "live holder",
        "hold",
        &path,
        &KILL_RANGE,
        &[(NAME, "live".into()), (LISTEN, "0".into())],
    );
    let (live_port, live_pid) = parse_held(&live.expect_line("HELD", deadline));
    assert_eq!(live_pid, live.pid());

    let mut victims: Vec<Worker> = (0..VICTIMS)
        .map(|i| {
            Worker::spawn(
                format!("victim {i}"),
                "hold",
                &path,
                &KILL_RANGE,
                &[(NAME, format!("victim-{i}")), (LISTEN, "1".into())],
            )
        })
        .collect();
    let mut victim_ports = BTreeSet::new();
    for victim in &victims {
        let (port, pid) = parse_held(&victim.expect_line("HELD", deadline));
        assert_eq!(pid, victim.pid());
        victim_ports.insert(port);
    }
    assert_eq!(
        victim_ports.len(),
        VICTIMS,
        "victims got duplicate ports: {victim_ports:?}"
    );
    assert!(
        !victim_ports.contains(&live_port),
        "a victim got the live holder's port"
    );

    let registry = open(&path, &KILL_RANGE);
    let before = registry.list().expect("list");
    let expected: BTreeMap<u16, u32> = std::iter::once((live_port, live.pid()))
        .chain(victims.iter().map(|v| (port_of(&before, v.pid()), v.pid())))
        .collect();
    let listed: BTreeMap<u16, u32> = before
        .iter()
        .map(|l| (l.port(), l.pid().expect("owned lease")))
        .collect();
    assert_eq!(listed, expected, "listing before the kill: {before:#?}");
    assert_eq!(
        listed.keys().copied().collect::<Vec<_>>(),
        KILL_RANGE.collect::<Vec<_>>()
    );
    let live_lease = before
        .iter()
        .find(|l| l.port() == live_port)
        .expect("live lease")
        .clone();

    // Everyone is alive: nothing may be reclaimed.
    match registry.acquire("intruder") {
        Err(Error::Exhausted { held, .. }) => assert_eq!(held, VICTIMS + 1),
        other => panic!("a full range of live holders must be exhausted, got {other:?}"),
    }

    for victim in &mut victims {
        let status = victim.kill();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{} was not killed by SIGKILL",
            victim.label
        );
    }

    // Listing is a plain read: the dead holders' leases stay until a claim needs them.
    let after_kill = registry.list().expect("list");
    assert_eq!(after_kill, before, "listing changed though nobody claimed");

    // A handle opened after the kill gets exactly the dead holders' ports.
    let reclaimer = open(&path, &KILL_RANGE);
    let guards: Vec<_> = (0..VICTIMS)
        .map(|i| {
            reclaimer
                .acquire(&format!("reclaimer-{i}"))
                .unwrap_or_else(|e| {
                    panic!(
                        "claim {i} after the kill failed: {e}; {}",
                        sockets_on(&KILL_RANGE)
                    )
                })
        })
        .collect();
    let reclaimed: BTreeSet<u16> = guards.iter().map(|g| g.port()).collect();
    assert_eq!(
        reclaimed, victim_ports,
        "the reclaimed ports must be the killed holders' ports"
    );
    match reclaimer.acquire("one-too-many") {
        Err(Error::Exhausted { held, .. }) => assert_eq!(held, VICTIMS + 1),
        Ok(guard) => panic!("the live holder's port {} was handed out", guard.port()),
        Err(e) => panic!("expected Exhausted, got {e}; {}", sockets_on(&KILL_RANGE)),
    }

    let during = registry.list().expect("list");
    assert_eq!(during.len(), VICTIMS + 1, "{during:#?}");
    assert!(
        during.contains(&live_lease),
        "the live holder's lease changed: {during:#?}"
    );
    let me = std::process::id();
    for port in &victim_ports {
        let lease = during
            .iter()
            .find(|l| l.port() == *port)
            .expect("reclaimed lease");
        assert_eq!(
            lease.pid(),
            Some(me),
            "port {port} must now be leased by this process"
        );
    }

    // Now the live holder dies too; its lease is reclaimable, and ours go when dropped.
    let status = live.kill();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    drop(guards);
    assert_eq!(
        registry.list().expect("list"),
        vec![live_lease],
        "only the dead live holder's lease is left"
    );
    assert_eq!(
        registry.reap().expect("reap"),
        1,
        "the killed live holder's lease must be reaped"
    );
    assert!(registry.list().expect("list").is_empty());
}

/// The port that `pid` holds in `leases`.
fn port_of(leases: &[portdaddy::Lease], pid: u32) -> u16 {
    leases
        .iter()
        .find(|l| l.pid() == Some(pid))
        .unwrap_or_else(|| panic!("no lease of pid {pid} in {leases:#?}"))
        .port()
}

// ---------------------------------------------------------------------------------------------
// 3. A guard dropped in a forked child does not release the parent's lease.
// ---------------------------------------------------------------------------------------------

const FORK_RANGE: RangeInclusive<u16> = 24200..=24201;

/// A worker takes a lease, forks, and the child tries to release and to keep its copy of the
/// guard (both refused), drops it and `_exit`s.
/// The lease must still be listed, owned by the worker, and its port must stay taken.
///
/// The fork happens in a worker process rather than in this multi-threaded test binary, whose
/// other tests may hold locks at the moment of the fork.
#[test]
fn a_guard_dropped_released_or_kept_in_a_forked_child_keeps_the_parents_lease() {
    let _ports = lock_ports(&FORK_RANGE);
    let (_dir, path) = common::temp_registry();
    let deadline = Instant::now() + DEADLINE;
    let mut worker = Worker::spawn("fork worker", "fork", &path, &FORK_RANGE, &[]);
    let line = worker.expect_line("FORKED", deadline);
    let (port, id, child_status) = match line.split(' ').collect::<Vec<_>>()[..] {
        ["FORKED", port, id, status] => (
            port.parse::<u16>().expect("port"),
            id.parse::<u64>().expect("lease id"),
            status.to_owned(),
        ),
        _ => panic!("expected FORKED <port> <id> <status>, got {line:?}"),
    };
    assert_eq!(
        child_status, "exited-0",
        "the forked child's release or keep was not refused with ForkedHandle (codes: 1 \
         released, 2 other error, 3 no guard back, 4 kept, 5 other error on keep)"
    );

    let registry = open(&path, &FORK_RANGE);
    let leases = registry.list().expect("list");
    assert!(
        leases.iter().any(|l| (l.port(), l.id()) == (port, id)),
        "the guard dropped in the forked child released the parent's lease {id} on port {port}; \
         leases now: {leases:#?}"
    );
    assert_eq!(leases.len(), 1, "{leases:#?}");
    assert_eq!(
        leases[0].pid(),
        Some(worker.pid()),
        "the lease must still belong to the parent"
    );

    // The port is still taken: a claim gets the other port of the range.
    let other = registry.acquire("outer").expect("acquire the other port");
    assert_ne!(other.port(), port, "the parent's port was handed out again");
    drop(other);

    // The parent's own guard still releases it.
    worker.close_stdin();
    let (lines, status) = worker.finish(deadline);
    assert!(
        status.success(),
        "fork worker failed ({status}); stderr:\n{}",
        worker.stderr()
    );
    assert_eq!(lines, ["RELEASED"]);
    assert!(registry.list().expect("list").is_empty());
}

// ---------------------------------------------------------------------------------------------
// 4. Processes that create one registry at the same moment all open it.
// ---------------------------------------------------------------------------------------------

/// The range of the registries that [`processes_creating_a_registry_at_once_all_open_it`]
/// creates. It leases one port in each, probing it with a bind.
const CREATE_RANGE: RangeInclusive<u16> = 24300..=24309;
const CREATE_WORKERS: usize = 6;
const CREATE_REGISTRIES: usize = 50;

/// Six processes open the same not-yet-existing registry files at the same moment (50
/// files, one after the other, in lockstep); every open, and a claim on the opened handle,
/// must succeed.
///
/// This guards a race that once failed almost every run: when the file checks ran before the
/// registry lock, a process opening a registry that another was still creating (the file
/// exists, `application_id` is still 0, and SQLite has a `-journal` beside it during the switch
/// to WAL) took it for another application's database and refused it with `Error::Corrupt`.
#[test]
fn processes_creating_a_registry_at_once_all_open_it() {
    let _ports = lock_ports(&CREATE_RANGE);
    let dir = tempfile::tempdir().expect("create a temp dir");
    let mut workers: Vec<Worker> = (0..CREATE_WORKERS)
        .map(|id| {
            Worker::spawn(
                format!("create worker {id}"),
                "create",
                dir.path(),
                &CREATE_RANGE,
                &[
                    (DIR, dir.path().display().to_string()),
                    (ROUNDS, CREATE_REGISTRIES.to_string()),
                ],
            )
        })
        .collect();
    let deadline = Instant::now() + DEADLINE;
    for worker in &workers {
        let line = worker.expect_line("READY", deadline);
        assert_eq!(line, "READY", "{}", worker.label);
    }
    for worker in &mut workers {
        worker.send("go");
    }
    let mut failures = Vec::new();
    for worker in &mut workers {
        let (lines, status) = worker.finish(deadline);
        assert!(
            status.success(),
            "{} failed ({status}); stderr:\n{}",
            worker.label,
            worker.stderr()
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some("DONE"),
            "{}",
            worker.label
        );
        assert_eq!(
            lines.len(),
            CREATE_REGISTRIES + 1,
            "{}: {lines:?}",
            worker.label
        );
        for line in &lines[..CREATE_REGISTRIES] {
            if !line.ends_with(" ok") {
                failures.push(format!("{}: {line}", worker.label));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} concurrent opens failed:\n{}",
        failures.len(),
        CREATE_WORKERS * CREATE_REGISTRIES,
        failures.join("\n")
    );
    for n in 0..CREATE_REGISTRIES {
        let registry = open(&dir.path().join(format!("{n}.sqlite3")), &CREATE_RANGE);
        let leases = registry.list().expect("list");
        assert!(
            leases.is_empty(),
            "registry {n} kept leases of exited workers: {leases:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The worker side.
// ---------------------------------------------------------------------------------------------

/// The entry point of worker processes; an empty test in a normal run.
#[test]
fn worker_entry() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    if mode == "create" {
        return create_worker();
    }
    let range = parse_range(&var(RANGE));
    let registry = open(Path::new(&var(REGISTRY)), &range);
    match mode.as_str() {
        "churn" => churn_worker(&registry),
        "hold" => hold_worker(&registry),
        "fork" => fork_worker(&registry),
        other => panic!("unknown worker mode {other:?}"),
    }
}

/// Waits for `go`, then takes and releases a port [`ROUNDS`] times; reports each hold as
/// `HOLD <port> <start_ns> <end_ns> <marker 1|0> <bind ok|error kind>`, then
/// `DONE <times Exhausted was met>`.
fn churn_worker(registry: &PortDaddy) {
    let id: usize = var(ID).parse().expect("worker id");
    let rounds: usize = var(ROUNDS).parse().expect("rounds");
    let markers = PathBuf::from(var(MARKERS));
    say("READY");
    let mut line = String::new();
    io::stdin().read_line(&mut line).expect("read the go line");
    assert_eq!(line.trim_end(), "go", "worker {id}: expected the go line");

    // A moment of holding the lease without a socket, where only the registry protects it.
    const BARE: Duration = Duration::from_micros(200);
    // How long the listener stays bound.
    const LISTENING: Duration = Duration::from_micros(300);

    let mut report = Vec::with_capacity(rounds);
    let mut exhausted = 0u64;
    for round in 0..rounds {
        // Even workers all use one name, so they compete for its remembered port; odd ones
        // use a fresh name each round, so they search the range.
        let name = if id.is_multiple_of(2) {
            "churn".to_owned()
        } else {
            format!("churn-{id}-{round}")
        };
        let give_up = Instant::now() + DEADLINE;
        let guard = loop {
            match registry.acquire(&name) {
                Ok(guard) => break guard,
                Err(Error::Exhausted { .. }) if Instant::now() < give_up => {
                    exhausted += 1;
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("worker {id}: acquire in round {round} failed: {e}"),
            }
        };
        let start = monotonic_ns();
        let port = guard.port();
        assert_eq!(
            guard.lease().pid(),
            Some(std::process::id()),
            "the lease must name this process"
        );

        let marker = markers.join(port.to_string());
        let marker_ok = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
        {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => panic!("worker {id}: create {}: {e}", marker.display()),
        };
        thread::sleep(BARE);
        let bind = match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(listener) => {
                thread::sleep(LISTENING);
                drop(listener);
                "ok".to_owned()
            }
            Err(e) => {
                eprintln!(
                    "worker {id}: bind {port}: {e}; {}",
                    sockets_on(&(port..=port))
                );
                format!("{:?}", e.kind())
            }
        };
        thread::sleep(BARE);
        if marker_ok {
            std::fs::remove_file(&marker).expect("remove the marker");
        }
        let end = monotonic_ns();
        drop(guard);
        report.push(format!(
            "HOLD {port} {start} {end} {} {bind}",
            u8::from(marker_ok)
        ));
    }
    for line in report {
        say(&line);
    }
    say(&format!("DONE {exhausted}"));
}

/// Waits for `go`, then opens the registries `0.sqlite3`, `1.sqlite3`, … ([`ROUNDS`] of them)
/// in [`DIR`], in that order, as every other `create` worker does at the same time; reports
/// `OPENED <n> ok` or `OPENED <n> <error>` for each, then `DONE`.
fn create_worker() {
    let dir = PathBuf::from(var(DIR));
    let count: usize = var(ROUNDS).parse().expect("registry count");
    let range = parse_range(&var(RANGE));
    say("READY");
    let mut line = String::new();
    io::stdin().read_line(&mut line).expect("read the go line");
    assert_eq!(line.trim_end(), "go", "expected the go line");
    let mut report = Vec::with_capacity(count);
    for n in 0..count {
        let path = dir.join(format!("{n}.sqlite3"));
        let result = PortDaddy::builder().path(&path).range(range.clone()).open();
        // Use the handle, so that a registry that opened half-made fails here too.
        let outcome = result.and_then(|registry| registry.acquire("created").map(drop));
        report.push(match outcome {
            Ok(()) => format!("OPENED {n} ok"),
            Err(e) => format!("OPENED {n} {}", e.to_string().replace('\n', " ")),
        });
    }
    for line in report {
        say(&line);
    }
    say("DONE");
}

/// Takes a port under [`NAME`] (binding a listener on it if [`LISTEN`] is `1`), reports
/// `HELD <port> <pid>`, and holds it until stdin reaches end-of-file; then releases it and
/// reports `RELEASED`.
fn hold_worker(registry: &PortDaddy) {
    let name = var(NAME);
    let guard = registry.acquire(&name).expect("hold worker: acquire");
    let listener = (var(LISTEN) == "1").then(|| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, guard.port())).unwrap_or_else(|e| {
            let port = guard.port();
            panic!(
                "bind the leased port {port}: {e}; {}",
                sockets_on(&(port..=port))
            )
        })
    });
    say(&format!("HELD {} {}", guard.port(), std::process::id()));
    wait_for_eof();
    drop(listener);
    drop(guard);
    say("RELEASED");
}

/// Takes a port, forks; the child drops the guard and `_exit(0)`s. Reports
/// `FORKED <port> <lease id> <child status>`, holds the lease until stdin reaches end-of-file,
/// then releases it and reports `RELEASED`.
fn fork_worker(registry: &PortDaddy) {
    let guard = registry.acquire("forked").expect("fork worker: acquire");
    let (port, id) = (guard.port(), guard.lease().id());
    // SAFETY: this process runs libtest's main thread, parked waiting for this test, and this
    // thread; nothing holds a lock that the child needs. The child only drops the guard (which
    // must notice that it is in another process and do nothing) and leaves with `_exit`, which
    // runs no destructors or exit handlers.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // An explicit release and a keep in the child are refused (the handle belongs to
        // the parent) and hand the guard back; the drop then does nothing. Exit code 0 means
        // all of that happened.
        let code = match guard.release() {
            Ok(()) => 1,
            Err(e) if !matches!(e.error(), Error::ForkedHandle { .. }) => 2,
            Err(e) => match e.into_guard().map(PortGuard::keep) {
                None => 3,
                Some(Ok(_)) => 4,
                Some(Err(e)) if !matches!(e.error(), Error::ForkedHandle { .. }) => 5,
                Some(Err(e)) => {
                    drop(e);
                    0
                }
            },
        };
        // SAFETY: ends the child without touching anything shared with the parent.
        unsafe { libc::_exit(code) }
    }
    assert!(pid > 0, "fork failed: {}", io::Error::last_os_error());
    let status = wait_child(pid);
    say(&format!("FORKED {port} {id} {status}"));
    wait_for_eof();
    drop(guard);
    say("RELEASED");
}

/// Waits at most [`DEADLINE`] for the forked child `pid`, killing it if it hangs; describes
/// how it ended: `exited-<code>`, `signal-<n>` or `hung`.
fn wait_child(pid: libc::pid_t) -> String {
    let give_up = Instant::now() + DEADLINE;
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(reaped >= 0, "waitpid: {}", io::Error::last_os_error());
        if reaped == pid {
            break;
        }
        if Instant::now() >= give_up {
            // SAFETY: plain syscalls on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return "hung".into();
        }
        thread::sleep(Duration::from_millis(1));
    }
    if libc::WIFEXITED(status) {
        format!("exited-{}", libc::WEXITSTATUS(status))
    } else {
        format!("signal-{}", libc::WTERMSIG(status))
    }
}

/// Opens the file registry at `path` with the default (real) port and process probes.
fn open(path: &Path, range: &RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(range.clone())
        .open()
        .unwrap_or_else(|e| panic!("open the registry at {}: {e}", path.display()))
}

/// Nanoseconds on `CLOCK_MONOTONIC`, one clock shared by every process of the host.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", io::Error::last_os_error());
    let secs = u64::try_from(ts.tv_sec).expect("monotonic seconds");
    let nanos = u64::try_from(ts.tv_nsec).expect("monotonic nanoseconds");
    secs * 1_000_000_000 + nanos
}

/// For failure messages: the TCP sockets on ports of `range` and the processes that have them,
/// read from `/proc` (Linux only; elsewhere this says nothing useful).
fn sockets_on(range: &RangeInclusive<u16>) -> String {
    // inode -> description of the socket
    let mut sockets = BTreeMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(1).and_then(|a| a.rsplit(':').next());
            let Some(port) = port.and_then(|h| u16::from_str_radix(h, 16).ok()) else {
                continue;
            };
            if range.contains(&port) && fields.len() > 9 {
                let (state, inode) = (fields[3], fields[9]);
                sockets.insert(
                    inode.to_owned(),
                    format!("{table} port {port} state {state}"),
                );
            }
        }
    }
    if sockets.is_empty() {
        return format!("no TCP socket on {range:?} in /proc/net/tcp*");
    }
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let fds = std::fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten();
        for fd in fds {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy().into_owned();
            let inode = link
                .strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'));
            if let Some(inode) = inode.filter(|i| sockets.contains_key(*i)) {
                let cmd = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
                let who = format!("pid {pid} ({})", cmd.replace('\0', " ").trim_end());
                owners.entry(inode.to_owned()).or_default().push(who);
            }
        }
    }
    let described: Vec<String> = sockets
        .iter()
        .map(|(inode, socket)| match owners.get(inode) {
            Some(who) => format!("{socket} held by {}", who.join(", ")),
            None => format!("{socket} (inode {inode}, no process found)"),
        })
        .collect();
    format!("sockets: [{}]", described.join("; "))
}

// ---------------------------------------------------------------------------------------------
// The test side: a worker process and its pipes.
// ---------------------------------------------------------------------------------------------

/// The host-wide lock on `range` (see [`workers::lock_ports`]).
fn lock_ports(range: &RangeInclusive<u16>) -> std::fs::File {
    workers::lock_ports(range, DEADLINE)
}
