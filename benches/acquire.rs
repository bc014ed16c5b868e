//! What a claim costs, beside the baselines a user would otherwise reach for:
//! `portpicker::pick_unused_port()` and binding port 0. Every group runs in one process, so
//! the ratios between them are measured under the same load.
//!
//! ```text
//! cargo bench --bench acquire
//! ```
//!
//! Registries are temporary files (or in memory); the benches that bind real ports use
//! ranges of their own (40000-59999), away from the ports the tests bind.

use std::hint::black_box;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use portdaddy::{PortDaddy, PortGuard, Protocol, Request};

/// The range of the pair benches.
const PAIR_RANGE: RangeInclusive<u16> = 40000..=40999;

/// A file registry over `range` in a fresh temporary directory.
fn file_registry(range: RangeInclusive<u16>) -> (tempfile::TempDir, PortDaddy) {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = PortDaddy::builder()
        .path(dir.path().join("registry.sqlite3"))
        .range(range)
        .open()
        .expect("open registry");
    (dir, registry)
}

/// Leases `ports` (live, owned by this process) through a second handle on the same file
/// whose probe binds nothing, so that filling a registry neither depends on nor disturbs the
/// host's ports.
fn hold(registry: &PortDaddy, range: RangeInclusive<u16>, ports: &[u16]) -> Vec<PortGuard> {
    let filler = PortDaddy::builder()
        .path(registry.path().expect("a file registry"))
        .range(range)
        .port_probe(|_: u16, _: Protocol| true)
        .open()
        .expect("open filler");
    let requests: Vec<Request> = ports
        .iter()
        .map(|&port| Request::new("held").require(port))
        .collect();
    filler.acquire_many_with(&requests).expect("fill")
}

fn pairs(c: &mut Criterion) {
    let mut group = c.benchmark_group("pair");

    let (_dir, file) = file_registry(PAIR_RANGE);
    group.bench_function("file registry acquire+release", |b| {
        b.iter(|| black_box(file.acquire("bench").expect("acquire").port()))
    });

    let memory = PortDaddy::builder()
        .in_memory()
        .range(PAIR_RANGE)
        .open()
        .expect("open in memory");
    group.bench_function("in-memory acquire+release", |b| {
        b.iter(|| black_box(memory.acquire("bench").expect("acquire").port()))
    });

    group.bench_function("baseline portpicker::pick_unused_port", |b| {
        b.iter(|| black_box(portpicker::pick_unused_port()))
    });

    group.bench_function("baseline bind 127.0.0.1:0 then close", |b| {
        b.iter(|| {
            let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
            black_box(listener.local_addr().expect("addr").port())
        })
    });

    // What any design with a shared SQLite file and a bind probe pays at least: a pair is
    // two write transactions (the claim, the release) and one probe.
    let (_floor_dir, conn) = bare_wal_file();
    let mut id = 0_i64;
    group.bench_function("floor: two one-row write transactions on a WAL file", |b| {
        b.iter(|| {
            id += 1;
            write_one(&conn, "INSERT INTO t (id, v) VALUES (?1, 'x')", id);
            write_one(&conn, "DELETE FROM t WHERE id = ?1", id);
        })
    });
    group.bench_function("floor: the bind probe of one TCP port", |b| {
        let probe = portdaddy::BindProbe;
        let mut port = *PAIR_RANGE.start();
        b.iter(|| {
            port = if port == *PAIR_RANGE.end() {
                *PAIR_RANGE.start()
            } else {
                port + 1
            };
            black_box(portdaddy::PortProbe::is_free(&probe, port, Protocol::Tcp))
        })
    });
    group.finish();
}

/// A bare SQLite file set up as the registry sets up its own (WAL, `synchronous=NORMAL`),
/// holding one table.
fn bare_wal_file() -> (tempfile::TempDir, rusqlite::Connection) {
    let dir = tempfile::tempdir().expect("temp dir");
    let conn = rusqlite::Connection::open(dir.path().join("bare.sqlite3")).expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);",
    )
    .expect("set up");
    (dir, conn)
}

/// One write transaction (`BEGIN IMMEDIATE`, as the registry's are) of one statement.
fn write_one(conn: &rusqlite::Connection, sql: &str, id: i64) {
    conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
    conn.prepare_cached(sql)
        .expect("prepare")
        .execute([id])
        .expect("write");
    conn.execute_batch("COMMIT").expect("commit");
}

/// The time `iters` calls of `f` take, each result dropped outside the measured time.
fn timed_apart<T>(iters: u64, mut f: impl FnMut() -> T) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        let value = f();
        total += start.elapsed();
        drop(black_box(value));
    }
    total
}

fn parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("file registry");
    let (_dir, file) = file_registry(PAIR_RANGE);

    // The guard is released after each acquire, outside the measured time, so that every
    // acquire meets the same registry.
    group.bench_function("acquire", |b| {
        b.iter_custom(|iters| timed_apart(iters, || file.acquire("bench").expect("acquire")))
    });

    group.bench_function("release", |b| {
        b.iter_batched(
            || file.acquire("bench").expect("acquire"),
            |guard| guard.release().expect("release"),
            BatchSize::PerIteration,
        )
    });

    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    group.bench_function("acquire_many of 8", |b| {
        b.iter_custom(|iters| {
            timed_apart(iters, || file.acquire_many(&names).expect("acquire_many"))
        })
    });
    group.bench_function("acquire_many of 8, then release each", |b| {
        b.iter(|| black_box(file.acquire_many(&names).expect("acquire_many").len()))
    });

    let (_list_dir, listed) = file_registry(41000..=42999);
    let ports: Vec<u16> = (41000..42000).collect();
    let _held = hold(&listed, 41000..=42999, &ports);
    group.bench_function("list with 1,000 leases", |b| {
        b.iter(|| black_box(listed.list().expect("list").len()))
    });
    group.finish();
}

/// A claim that has to search the range, among 0 to 10,000 live leases.
///
/// The claimed name's remembered port is held by a live lease of the same name (a second
/// instance of a service), so every claim searches from the cursor and the names table
/// stays as it is; the port probe binds for real.
fn searches(c: &mut Criterion) {
    let mut group = c.benchmark_group("searched acquire+release");

    // (label, range, leased ports, the port of the instance that stays).
    let spread_range = 40000..=59999;
    let every = |step: usize| -> Vec<u16> { spread_range.clone().step_by(step).collect() };
    let cases: Vec<(&str, RangeInclusive<u16>, Vec<u16>, u16)> = vec![
        ("0 leases", spread_range.clone(), Vec::new(), 40001),
        (
            "1,000 spread leases",
            spread_range.clone(),
            every(20),
            40001,
        ),
        (
            "10,000 spread leases",
            spread_range.clone(),
            every(2),
            40001,
        ),
        // One free port after a block of 10,000: after each claim the cursor wraps to the
        // start of the block, so every search crosses it.
        (
            "10,000 dense leases",
            40000..=50001,
            (40000..50000).collect(),
            50001,
        ),
    ];
    for (label, range, ports, instance) in cases {
        let (_dir, registry) = file_registry(range.clone());
        let _held = hold(&registry, range.clone(), &ports);
        let _first = registry
            .acquire_with(&Request::new("svc").require(instance))
            .expect("first instance");
        group.bench_function(label, |b| {
            b.iter(|| {
                let guard = registry.acquire("svc").expect("acquire");
                assert_ne!(guard.port(), instance);
                black_box(guard.port())
            })
        });
    }
    group.finish();
}

/// The number of ports the long-lived registry of [`new_names`] remembers, each for a name.
const REMEMBERED: u16 = 14_000;

/// The range of [`new_names`]: exactly [`REMEMBERED`] ports.
const NAMES_RANGE: RangeInclusive<u16> = 42000..=(42000 + REMEMBERED - 1);

/// A fresh registry stays fresh for this many new names, then the bench opens another one.
const FRESH_NAMES: u64 = 1_000;

/// Acquire and release of a name the registry has never seen, as every test of a long-lived
/// per-user registry does the first time it runs: on a fresh registry, and on one where
/// every port of the range is remembered by some name (14,000 tests that each named their
/// port once). The port probe binds for real; filling uses a probe that binds nothing.
///
/// ```text
/// cargo bench --bench acquire -- 'new names'
/// ```
fn new_names(c: &mut Criterion) {
    let mut group = c.benchmark_group("new names");
    let mut serial = 0u64;
    let mut next_name = move || {
        serial += 1;
        format!("new-{serial}")
    };

    // A fresh registry each `FRESH_NAMES` names, opened outside the measured time.
    let mut fresh: Option<(tempfile::TempDir, PortDaddy, u64)> = None;
    group.bench_function("fresh registry acquire+release", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if fresh
                    .as_ref()
                    .is_none_or(|(_, _, used)| *used >= FRESH_NAMES)
                {
                    let (dir, registry) = file_registry(NAMES_RANGE);
                    fresh = Some((dir, registry, 0));
                }
                let (_, registry, used) = fresh.as_mut().expect("a fresh registry");
                *used += 1;
                let name = next_name();
                let start = Instant::now();
                black_box(registry.acquire(&name).expect("acquire").port());
                total += start.elapsed();
            }
            total
        })
    });

    let (_dir, long_lived) = file_registry(NAMES_RANGE);
    remember_every_port(&long_lived);
    group.bench_function("14,000 remembered ports acquire+release", |b| {
        b.iter(|| black_box(long_lived.acquire(&next_name()).expect("acquire").port()))
    });
    group.finish();
}

/// Makes a name remember each port of [`NAMES_RANGE`], through a second handle whose probe
/// binds nothing; the leases are released again.
fn remember_every_port(registry: &PortDaddy) {
    let filler = PortDaddy::builder()
        .path(registry.path().expect("a file registry"))
        .range(NAMES_RANGE)
        .port_probe(|_: u16, _: Protocol| true)
        .open()
        .expect("open filler");
    let names: Vec<String> = (0..REMEMBERED).map(|i| format!("old-{i:05}")).collect();
    for chunk in names.chunks(1000) {
        drop(filler.acquire_many(chunk).expect("fill"));
    }
}

criterion_group!(benches, pairs, parts, searches, new_names);
criterion_main!(benches);
