//! A load test across real processes: N workers hammer one registry file with
//! acquire/bind/release cycles, then the parent checks that no port was ever held twice.
//!
//! ```text
//! cargo run --release --example load -- --procs 8 --ops 2000
//! ```
//!
//! Options: `--procs N` (default 8), `--ops N` per worker (default 2000), `--range A-B`
//! (default 28000-29999), `--registry PATH` (default: a fresh temporary file), `--no-probe`
//! (the registry's port probe binds nothing: what the claims cost with the bind probe out of
//! the registry's lock altogether, an upper bound for any design that moves it out; the
//! workers' own binds still catch a port held twice), `--floor` (no portdaddy at all: the
//! floor of any design that keeps its leases in one shared SQLite file, see [`Floor`]).
//!
//! Each worker binds `127.0.0.1:<port>` for every port it gets (a second holder would fail
//! with "address in use") and appends one line per cycle to a file of its own:
//! `port acquired_ns released_ns acquire_latency_ns release_latency_ns`, the timestamps
//! taken after the acquire returned and before the release started, so they lie inside the
//! lease. The parent merges the files and looks for two intervals on one port that overlap.
//! It exits non-zero if any port was held twice, any bind failed, or any worker failed.

use std::collections::HashMap;
use std::fs::File;
use std::io::ErrorKind;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fd_lock::RwLock;
use portdaddy::{Error, PortDaddy, PortGuard};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

struct Options {
    procs: usize,
    ops: usize,
    range: (u16, u16),
    registry: Option<PathBuf>,
    no_probe: bool,
    floor: bool,
    worker: Option<(usize, PathBuf)>,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("load: {message}");
            eprintln!(
                "usage: load [--procs N] [--ops N] [--range A-B] [--registry PATH] \
                 [--no-probe | --floor]"
            );
            return ExitCode::from(2);
        }
    };
    let result = match &options.worker {
        Some((id, out)) => worker(&options, *id, out),
        None => parent(&options),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("load: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        procs: 8,
        ops: 2000,
        range: (28000, 29999),
        registry: None,
        no_probe: false,
        floor: false,
        worker: None,
    };
    let mut worker_id = None;
    let mut out = None;
    while let Some(flag) = args.next() {
        if flag == "--no-probe" {
            options.no_probe = true;
            continue;
        }
        if flag == "--floor" {
            options.floor = true;
            continue;
        }
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |text: String| {
            text.parse::<usize>()
                .map_err(|_| format!("{flag} wants a number, got {text:?}"))
        };
        match flag.as_str() {
            "--procs" => options.procs = number(value()?)?,
            "--ops" => options.ops = number(value()?)?,
            "--range" => {
                let text = value()?;
                let bad = || format!("--range wants A-B (ports), got {text:?}");
                let (a, b) = text.split_once('-').ok_or_else(bad)?;
                options.range = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            }
            "--registry" => options.registry = Some(PathBuf::from(value()?)),
            "--worker" => worker_id = Some(number(value()?)?),
            "--out" => out = Some(PathBuf::from(value()?)),
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    if options.procs == 0 || options.ops == 0 {
        return Err("--procs and --ops must be at least 1".into());
    }
    if options.no_probe && options.floor {
        return Err("--no-probe is an option of the registry, not of --floor".into());
    }
    // The floor's tables have no place in a registry: it keeps a file of its own.
    if options.floor && options.registry.is_some() && worker_id.is_none() {
        return Err("--floor keeps a temporary file of its own; drop --registry".into());
    }
    if options.range.0 > options.range.1 {
        return Err("--range wants A-B with A no greater than B".into());
    }
    if let (Some(id), Some(out)) = (worker_id, out) {
        options.worker = Some((id, out));
    }
    Ok(options)
}

fn epoch_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Why one acquire or release of a worker did not happen.
enum Failure {
    /// The lock was not had in time: counted apart, as a wait, not an error.
    LockWait,
    Other(String),
}

/// What a worker claims its ports from: the registry, or the floor.
trait Claims {
    /// A port held, until given back to `release`.
    type Held;
    fn acquire(&mut self) -> Result<Self::Held, Failure>;
    fn port(held: &Self::Held) -> u16;
    fn release(&mut self, held: Self::Held) -> Result<(), Failure>;
}

/// The registry, as users open it.
struct Registry {
    registry: PortDaddy,
    name: String,
}

impl Claims for Registry {
    type Held = PortGuard;

    fn acquire(&mut self) -> Result<PortGuard, Failure> {
        self.registry.acquire(&self.name).map_err(|e| match e {
            Error::LockTimeout { .. } => Failure::LockWait,
            e => Failure::Other(format!("acquire: {e}")),
        })
    }

    fn port(held: &PortGuard) -> u16 {
        held.port()
    }

    fn release(&mut self, held: PortGuard) -> Result<(), Failure> {
        held.release().map_err(|e| match e.error() {
            Error::LockTimeout { .. } => Failure::LockWait,
            _ => Failure::Other(format!("release: {}", e.error())),
        })
    }
}

/// The floor: the least any design pays that keeps its leases in one SQLite file shared by
/// processes and makes sure of a port by binding it, with nothing of portdaddy in it. The
/// file is set up as the registry is (write-ahead log, `synchronous=NORMAL`, SQLite's
/// automatic checkpoint, none on close); writers, the set-up among them, queue on a blocking
/// `flock` of a lock file beside it, as the registry's do. A claim is one transaction under
/// that lock: the next port after a cursor that no row holds and that binds on `[::]` (on
/// `0.0.0.0` where there is no IPv6; the probe, under the lock), one row inserted and the
/// cursor moved; a release deletes the row. No owners, names, reserved ports, expiry or
/// checks of the files.
struct Floor {
    conn: Connection,
    lock: RwLock<File>,
    range: (u16, u16),
}

impl Floor {
    const SCHEMA: &'static str = "
        PRAGMA journal_mode = WAL;
        CREATE TABLE IF NOT EXISTS leases (port INTEGER PRIMARY KEY, owner INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS cursor (next INTEGER NOT NULL);
        INSERT INTO cursor (next) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM cursor);";

    fn open(path: &Path, range: (u16, u16)) -> Result<Self, String> {
        let err = |e: rusqlite::Error| format!("{}: {e}", path.display());
        let conn = Connection::open(path).map_err(err)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(err)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(err)?;
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", Path::new(&lock_path).display()))?;
        let mut lock = RwLock::new(lock);
        {
            let _held = lock.write().map_err(|e| format!("lock: {e}"))?;
            conn.execute_batch(Self::SCHEMA).map_err(err)?;
        }
        Ok(Self { conn, lock, range })
    }

    /// Runs `f` in one write transaction under the lock.
    fn write<R>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<R>,
    ) -> Result<R, Failure> {
        let _held = self
            .lock
            .write()
            .map_err(|e| Failure::Other(format!("lock: {e}")))?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Failure::Other(e.to_string()))?;
        let out = f(&tx).map_err(|e| Failure::Other(e.to_string()))?;
        tx.commit().map_err(|e| Failure::Other(e.to_string()))?;
        Ok(out)
    }
}

impl Claims for Floor {
    type Held = u16;

    fn acquire(&mut self) -> Result<u16, Failure> {
        let (lo, hi) = self.range;
        let len = u32::from(hi - lo) + 1;
        let owner = std::process::id();
        let port = self.write(|tx| {
            let next: u32 = tx
                .prepare_cached("SELECT next FROM cursor")?
                .query_row([], |r| r.get(0))?;
            for step in 0..len {
                let port = lo + ((next + step) % len) as u16;
                let held = tx
                    .prepare_cached("SELECT 1 FROM leases WHERE port = ?1")?
                    .query_row([port], |_| Ok(()))
                    .optional()?
                    .is_some();
                if held || !binds(port) {
                    continue;
                }
                tx.prepare_cached("INSERT INTO leases (port, owner) VALUES (?1, ?2)")?
                    .execute((port, owner))?;
                tx.prepare_cached("UPDATE cursor SET next = ?1")?
                    .execute([(next + step + 1) % len])?;
                return Ok(Some(port));
            }
            Ok(None)
        })?;
        port.ok_or_else(|| Failure::Other("acquire: every port of the range is held".into()))
    }

    fn port(held: &u16) -> u16 {
        *held
    }

    fn release(&mut self, held: u16) -> Result<(), Failure> {
        self.write(|tx| {
            tx.prepare_cached("DELETE FROM leases WHERE port = ?1")?
                .execute([held])
        })
        .map(drop)
    }
}

/// Whether `port` binds on `[::]`, or on `0.0.0.0` where there is no IPv6.
fn binds(port: u16) -> bool {
    match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(e) if matches!(e.kind(), ErrorKind::AddrInUse | ErrorKind::PermissionDenied) => false,
        Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok(),
    }
}

/// One worker: open the registry (or the floor), wait for the start signal on stdin, run
/// the cycles.
fn worker(options: &Options, id: usize, out: &Path) -> Result<ExitCode, String> {
    let path = options
        .registry
        .as_ref()
        .ok_or("a worker needs --registry")?;
    if options.floor {
        let floor = Floor::open(path, options.range).map_err(|e| format!("worker {id}: {e}"))?;
        return cycles(floor, options, id, out);
    }
    let mut builder = PortDaddy::builder()
        .path(path)
        .range(options.range.0..=options.range.1);
    if options.no_probe {
        builder = builder.port_probe(|_: u16, _: portdaddy::Protocol| true);
    }
    let registry = builder.open().map_err(|e| format!("worker {id}: {e}"))?;
    let name = format!("worker-{id}");
    cycles(Registry { registry, name }, options, id, out)
}

/// The worker's cycles, timed, and written to `out` (see the top of this file).
fn cycles<C: Claims>(
    mut claims: C,
    options: &Options,
    id: usize,
    out: &Path,
) -> Result<ExitCode, String> {
    let mut file = BufWriter::new(File::create(out).map_err(|e| e.to_string())?);
    let mut go = [0u8; 1];
    std::io::stdin()
        .read_exact(&mut go)
        .map_err(|e| format!("worker {id}: no start signal: {e}"))?;
    let (mut lock_waits, mut bind_failures, mut errors) = (0u64, 0u64, 0u64);
    let started = epoch_nanos();
    for _ in 0..options.ops {
        let t0 = Instant::now();
        let held = match claims.acquire() {
            Ok(held) => held,
            Err(Failure::LockWait) => {
                lock_waits += 1;
                continue;
            }
            Err(Failure::Other(e)) => {
                eprintln!("worker {id}: {e}");
                errors += 1;
                continue;
            }
        };
        let acquire_latency = t0.elapsed();
        let acquired = epoch_nanos();
        let port = C::port(&held);
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(listener) => drop(listener),
            Err(e) => {
                eprintln!("worker {id}: bind 127.0.0.1:{port}: {e}");
                bind_failures += 1;
            }
        }
        let released = epoch_nanos();
        let t1 = Instant::now();
        match claims.release(held) {
            Ok(()) => {}
            Err(Failure::LockWait) => lock_waits += 1,
            Err(Failure::Other(e)) => {
                eprintln!("worker {id}: {e}");
                errors += 1;
            }
        }
        let release_latency = t1.elapsed();
        writeln!(
            file,
            "{port} {acquired} {released} {} {}",
            acquire_latency.as_nanos(),
            release_latency.as_nanos()
        )
        .map_err(|e| e.to_string())?;
    }
    let finished = epoch_nanos();
    writeln!(
        file,
        "end {started} {finished} {lock_waits} {bind_failures} {errors}"
    )
    .map_err(|e| e.to_string())?;
    file.flush().map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Totals {
    pairs: usize,
    acquire: Vec<u64>,
    release: Vec<u64>,
    intervals: HashMap<u16, Vec<Interval>>,
    lock_waits: u64,
    bind_failures: u64,
    errors: u64,
    first_start: Option<u128>,
    last_end: Option<u128>,
}

fn parent(options: &Options) -> Result<ExitCode, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let registry = options
        .registry
        .clone()
        .unwrap_or_else(|| dir.path().join("registry.sqlite3"));
    // Create the registry (or the floor's file) once, so the workers do not all create it
    // at the same moment.
    if options.floor {
        drop(Floor::open(&registry, options.range)?);
    } else {
        drop(
            PortDaddy::builder()
                .path(&registry)
                .range(options.range.0..=options.range.1)
                .open()
                .map_err(|e| e.to_string())?,
        );
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    for id in 0..options.procs {
        let out = dir.path().join(format!("worker-{id}.txt"));
        let child = Command::new(&exe)
            .args(["--worker", &id.to_string(), "--out"])
            .arg(&out)
            .arg("--registry")
            .arg(&registry)
            .args(["--ops", &options.ops.to_string()])
            .args(options.no_probe.then_some("--no-probe"))
            .args(options.floor.then_some("--floor"))
            .args([
                "--range",
                &format!("{}-{}", options.range.0, options.range.1),
            ])
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start worker {id}: {e}"))?;
        children.push((id, out, child));
    }
    // All workers are started (and have opened the registry or are about to): let them go.
    for (_, _, child) in &mut children {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"g");
        }
    }
    let mut totals = Totals::default();
    let mut failed_workers = 0;
    for (id, out, mut child) in children {
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            eprintln!("load: worker {id} ended with {status}");
            failed_workers += 1;
            continue;
        }
        read_worker(&out, &mut totals)?;
    }
    let overlaps = double_holds(&mut totals.intervals);
    let wall = match (totals.first_start, totals.last_end) {
        (Some(a), Some(b)) if b > a => Duration::from_nanos((b - a) as u64),
        _ => Duration::ZERO,
    };
    print_table(options, &mut totals, wall, overlaps.len());
    for (port, a, b) in overlaps.iter().take(10) {
        println!("double hold on port {port}: {a:?} and {b:?}");
    }
    let clean = overlaps.is_empty()
        && totals.bind_failures == 0
        && totals.errors == 0
        && failed_workers == 0;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn read_worker(out: &Path, totals: &mut Totals) -> Result<(), String> {
    let file = File::open(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let bad = || format!("{}: malformed line {line:?}", out.display());
        let num = |i: usize| -> Result<u128, String> {
            fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(bad)
        };
        if fields.first() == Some(&"end") {
            let (start, end) = (num(1)?, num(2)?);
            totals.first_start = Some(totals.first_start.map_or(start, |s| s.min(start)));
            totals.last_end = Some(totals.last_end.map_or(end, |e| e.max(end)));
            totals.lock_waits += num(3)? as u64;
            totals.bind_failures += num(4)? as u64;
            totals.errors += num(5)? as u64;
            continue;
        }
        let port = u16::try_from(num(0)?).map_err(|_| bad())?;
        totals
            .intervals
            .entry(port)
            .or_default()
            .push((num(1)?, num(2)?));
        totals.acquire.push(num(3)? as u64);
        totals.release.push(num(4)? as u64);
        totals.pairs += 1;
    }
    Ok(())
}

/// When a worker held a port: from after its acquire returned to before its release began,
/// in nanoseconds since the Unix epoch.
type Interval = (u128, u128);

/// Pairs of intervals on one port that overlap: the port was held twice at once.
fn double_holds(intervals: &mut HashMap<u16, Vec<Interval>>) -> Vec<(u16, Interval, Interval)> {
    let mut found = Vec::new();
    for (port, list) in intervals.iter_mut() {
        list.sort_unstable();
        let mut latest: Option<Interval> = None;
        for &interval in list.iter() {
            if let Some(prev) = latest {
                if interval.0 < prev.1 {
                    found.push((*port, prev, interval));
                }
            }
            if latest.is_none_or(|prev| interval.1 > prev.1) {
                latest = Some(interval);
            }
        }
    }
    found
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Duration::from_nanos(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn print_table(options: &Options, totals: &mut Totals, wall: Duration, overlaps: usize) {
    totals.acquire.sort_unstable();
    totals.release.sort_unstable();
    let per_sec = if wall.is_zero() {
        0.0
    } else {
        totals.pairs as f64 / wall.as_secs_f64()
    };
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    println!(
        "{} load: {} processes × {} acquire/bind/release cycles on one {} file{}",
        if options.floor { "floor" } else { "portdaddy" },
        options.procs,
        options.ops,
        if options.floor { "SQLite" } else { "registry" },
        if options.no_probe {
            ", port probe off"
        } else {
            ""
        }
    );
    println!();
    println!("| measure                    | value |");
    println!("|----------------------------|-------|");
    println!("| pairs completed            | {} |", totals.pairs);
    println!(
        "| wall time                  | {:.3} s |",
        wall.as_secs_f64()
    );
    println!("| total pairs/s              | {per_sec:.0} |");
    for (what, sorted) in [("acquire", &totals.acquire), ("release", &totals.release)] {
        println!(
            "| {what} p50 / p99 / max    | {} / {} / {} |",
            us(percentile(sorted, 50.0)),
            us(percentile(sorted, 99.0)),
            us(sorted
                .last()
                .map_or(Duration::ZERO, |&n| Duration::from_nanos(n)))
        );
    }
    println!("| lock-wait errors           | {} |", totals.lock_waits);
    println!("| other errors               | {} |", totals.errors);
    println!("| failed binds               | {} |", totals.bind_failures);
    println!("| ports held twice           | {overlaps} |");
}
