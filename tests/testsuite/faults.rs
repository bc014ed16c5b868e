//! Faults injected for real into processes that share a registry: `SIGKILL` at random moments
//! (while claiming, opening or migrating), a process stopped while it holds the write lock, a
//! file size limit that makes writes fail, a registry of the first schema opened while others
//! claim, owners in other PID namespaces, and a directory its user may only read. The
//! sections are numbered as the faults in `RELIABILITY.md`, which says what the registry
//! promises under each.
//!
//! # Workers
//!
//! As in `processes.rs`, a worker is this test binary run again as
//! `<binary> faults::worker_entry --exact --nocapture` with [`MODE`] set; it talks through `@pd` lines
//! on stdout and reads stdin (a line, or end-of-file to finish). Every wait on a worker is
//! bounded by [`DEADLINE`], and [`Worker`]'s `Drop` kills and reaps it.
//!
//! # Ports
//!
//! This file owns 26500-26899 (see `common/mod.rs`), each test its own part, and each
//! test first takes a host-wide lock on its part ([`lock_ports`]) so that two runs of this
//! file on one host take turns instead of binding each other's ports.
#![cfg(unix)]

use crate::common;
use crate::common::workers::parse_held;
use crate::common::{in_new_pid_namespace, integrity_check};
use crate::common::{open_probing, open_unprobed};

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self};
use std::thread;
use std::time::{Duration, Instant};

use common::all_free;
use common::workers::{
    self, parse_range, read_line, say, var, wait_for_eof, Worker, MODE, RANGE, REGISTRY,
};
use portdaddy::{Error, Owner, PortDaddy, ProcessProbe, SystemProcessProbe};

/// A worker's number, for its lease names.
const ID: &str = "PORTDADDY_FAULTS_ID";

/// The longest any single wait on a worker may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL at random moments, hundreds of times.
// ---------------------------------------------------------------------------------------------

const CRASH_RANGE: RangeInclusive<u16> = 26500..=26509;
const CRASH_ROUNDS: usize = 30;
const CRASH_WORKERS: usize = 8;
/// The longest a churn worker runs before it is killed.
const CRASH_MAX_LIFE: Duration = Duration::from_millis(60);

/// Rounds of eight processes that claim, bind and release ports of a range of ten as fast as
/// they can, each killed with `SIGKILL` at a random moment of its run, and a ninth killed
/// while it starts and opens the registry (270 kills in all), while a steady holder keeps one
/// lease through every round.
///
/// The churn workers probe no port (their port probe says every port is free), so only the
/// registry keeps them apart; each binds a real listener on every port it gets, and a bind
/// that fails means the registry handed out a port that a live process held. After each
/// round, with every churn worker dead:
///
/// - `PRAGMA integrity_check` on the file, before any handle touches it, says `ok`;
/// - every lease but the steady holder's belongs to a dead process, and a fresh process
///   reaps exactly those and then gets every other port of the range;
/// - a handle that probes ports for real then gets every other port too, and no more: the
///   steady holder's port is never handed out.
#[test]
fn processes_killed_at_random_moments_never_corrupt_or_double_book() {
    let _ports = lock_ports(&CRASH_RANGE);
    let (_dir, path) = common::temp_registry();
    let mut steady = Worker::spawn("steady holder", "hold", &path, &CRASH_RANGE, &[]);
    let (steady_port, steady_pid) = parse_held(&steady.expect_line("HELD", deadline()));
    assert_eq!(steady_pid, steady.pid());
    let mut rng = XorShift::new(0x5eed_cafe);
    let (mut kills, mut reaped, mut leftover_rounds, mut ops) = (0usize, 0, 0, 0);
    for round in 0..CRASH_ROUNDS {
        let mut workers: Vec<Worker> = (0..CRASH_WORKERS)
            .map(|id| {
                Worker::spawn(
                    format!("round {round} churn worker {id}"),
                    "churn",
                    &path,
                    &CRASH_RANGE,
                    &[(ID, id.to_string())],
                )
            })
            .collect();
        // One more is killed while it starts and opens the registry (under the file lock).
        let mut opener = Worker::spawn(
            format!("round {round} opener"),
            "churn",
            &path,
            &CRASH_RANGE,
            &[(ID, "opener".into())],
        );
        thread::sleep(rng.below(CRASH_MAX_LIFE / 4));
        let status = opener.kill();
        assert!(
            status.signal() == Some(libc::SIGKILL),
            "the opener ended before it was killed ({status}); stderr:\n{}",
            opener.stderr()
        );
        kills += 1;
        for worker in &workers {
            assert_eq!(
                worker.expect_line("GO", deadline()),
                "GO",
                "{}",
                worker.label
            );
        }
        let started = Instant::now();
        // Each worker dies at its own random moment, while the others keep working.
        let mut schedule: Vec<(Duration, usize)> = (0..CRASH_WORKERS)
            .map(|i| (rng.below(CRASH_MAX_LIFE), i))
            .collect();
        schedule.sort();
        for (at, i) in schedule {
            if let Some(wait) = at.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
            let status = workers[i].kill();
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "{} ended before it was killed ({status}); stderr:\n{}",
                workers[i].label,
                workers[i].stderr()
            );
            kills += 1;
        }
        let mut anomalies = Vec::new();
        for worker in &workers {
            anomalies.extend(
                worker
                    .drain(deadline())
                    .into_iter()
                    .filter(|l| match l.strip_prefix("OPS ") {
                        Some(n) => {
                            ops += n.parse::<usize>().map_or(0, |_| 16);
                            false
                        }
                        None => l != "GO",
                    })
                    .map(|l| format!("{}: {l}", worker.label)),
            );
        }
        assert!(
            anomalies.is_empty(),
            "round {round}: a port was handed out while a live process held it:\n{}",
            anomalies.join("\n")
        );

        assert_eq!(
            integrity_check(&path),
            "ok",
            "round {round}: the file is damaged"
        );
        let registry = open_probing(&path, &CRASH_RANGE);
        let leases = registry.list().expect("list");
        let dead: Vec<_> = leases.iter().filter(|l| l.port() != steady_port).collect();
        for lease in &dead {
            let owner = lease.owner().expect("churn workers take owned leases");
            assert!(
                !SystemProcessProbe.is_alive(owner),
                "round {round}: {lease:?} belongs to a live process"
            );
        }
        let steady_lease = leases
            .iter()
            .find(|l| l.port() == steady_port)
            .unwrap_or_else(|| panic!("round {round}: the steady holder's lease is gone"));
        assert_eq!(steady_lease.pid(), Some(steady_pid));
        // A fresh process reclaims exactly the dead leases and gets every other port.
        let mut fresh = Worker::spawn(
            format!("round {round} fresh process"),
            "sweep",
            &path,
            &CRASH_RANGE,
            &[],
        );
        let (lines, status) = fresh.finish(deadline());
        assert!(status.success(), "{status}; stderr:\n{}", fresh.stderr());
        let others = CRASH_RANGE.count() - 1;
        assert_eq!(
            lines,
            [format!("REAPED {}", dead.len()), format!("GOT {others}")],
            "round {round}: the fresh process did not reap exactly {dead:?} or fill the range"
        );
        reaped += dead.len();
        leftover_rounds += usize::from(!dead.is_empty());
        assert_eq!(registry.list().expect("list"), vec![steady_lease.clone()]);

        // And so does a handle that probes the ports for real: every socket of the dead is gone.
        let names: Vec<String> = (0..others).map(|i| format!("fresh-{i}")).collect();
        let guards = registry
            .acquire_many(&names)
            .unwrap_or_else(|e| panic!("round {round}: a fresh handle cannot fill the range: {e}"));
        let got: BTreeSet<u16> = guards.iter().map(|g| g.port()).collect();
        let expected: BTreeSet<u16> = CRASH_RANGE.filter(|p| *p != steady_port).collect();
        assert_eq!(got, expected, "round {round}");
        match registry.acquire("one-too-many") {
            Err(Error::Exhausted { held, .. }) => assert_eq!(held, others + 1),
            other => panic!("round {round}: expected Exhausted, got {other:?}"),
        }
        drop(guards);
    }
    // The lock files of the killed workers are gone once a new handle has swept them: left are
    // the steady holder's and the new handle's.
    let last = open_probing(&path, &CRASH_RANGE);
    let mut owners = path.as_os_str().to_owned();
    owners.push(".owners");
    let files = std::fs::read_dir(&owners)
        .expect("the owner lock files")
        .count();
    assert_eq!(
        files, 2,
        "owner lock files of dead processes were left behind"
    );
    drop(last);
    steady.close_stdin();
    let (lines, status) = steady.finish(deadline());
    assert!(
        status.success(),
        "steady holder: {status}\n{}",
        steady.stderr()
    );
    assert_eq!(lines, ["RELEASED"]);
    eprintln!(
        "{kills} kills in {CRASH_ROUNDS} rounds after at least {ops} claims; {reaped} leases of killed processes reaped \
         afterwards, in {leftover_rounds} rounds"
    );
}

/// Claims and releases for ever: single claims and pairs, binding every port it gets, and
/// reporting `DUP <port> <error>` when a bind fails. Says `GO` once the registry is open.
fn churn_worker(registry: &PortDaddy) {
    let id = var(ID);
    say("GO");
    let mut n = 0u64;
    loop {
        n += 1;
        if n.is_multiple_of(16) {
            say(&format!("OPS {n}"));
        }
        let names = if n.is_multiple_of(3) {
            vec![format!("w{id}-a"), format!("w{id}-b")]
        } else {
            vec![format!("w{id}-{}", n % 4)]
        };
        let guards = match registry.acquire_many(&names) {
            Ok(guards) => guards,
            Err(Error::Exhausted { .. }) => continue,
            Err(e) => panic!("churn worker: {e}"),
        };
        let listeners: Vec<_> = guards
            .iter()
            .filter_map(
                |g| match TcpListener::bind((Ipv4Addr::LOCALHOST, g.port())) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        say(&format!("DUP {} {e}", g.port()));
                        None
                    }
                },
            )
            .collect();
        // Hold the ports for a moment, as a server would, so that a port handed out twice
        // meets its live holder's listener.
        thread::sleep(Duration::from_micros(500));
        drop(listeners);
        drop(guards);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A process stopped while it holds the write lock.
// ---------------------------------------------------------------------------------------------

const STALL_RANGE: RangeInclusive<u16> = 26600..=26609;

/// How long the stalled claim waits before it gives up.
const STALL_TIMEOUT: Duration = Duration::from_millis(300);

/// Another process takes the registry's file lock and is stopped with `SIGSTOP`: a claim fails
/// with `Error::LockTimeout` naming the registry after the configured wait; a claim that
/// waits longer, seen blocked behind the stopped process, completes once the process is
/// continued (`SIGCONT`) and lets go.
#[test]
fn a_stopped_process_holding_the_file_lock_times_out_claims_until_it_continues() {
    stalled_lock_holder("flock");
}

/// The same with an open SQLite write transaction (`BEGIN IMMEDIATE`) instead of the file
/// lock, as a tool such as the `sqlite3` shell would hold it.
#[test]
fn a_stopped_process_in_a_write_transaction_times_out_claims_until_it_continues() {
    stalled_lock_holder("sqlite");
}

fn stalled_lock_holder(how: &str) {
    let _ports = lock_ports(&STALL_RANGE);
    let (_dir, path) = common::temp_registry();
    let with_timeout = |timeout| {
        PortDaddy::builder()
            .path(&path)
            .range(STALL_RANGE)
            .port_probe(all_free)
            .lock_timeout(timeout)
            .open()
            .expect("open")
    };
    let impatient = with_timeout(STALL_TIMEOUT);
    let patient = with_timeout(DEADLINE);

    let mut holder = Worker::spawn(
        "lock holder",
        "stall",
        &path,
        &STALL_RANGE,
        &[(HOW, how.into())],
    );
    assert_eq!(holder.expect_line("LOCKED", deadline()), "LOCKED");
    holder.signal(libc::SIGSTOP);
    wait_for_state(holder.pid(), 'T');

    let started = Instant::now();
    match impatient.acquire("impatient") {
        Err(err @ Error::LockTimeout { .. }) => {
            let Error::LockTimeout {
                path: p, waited, ..
            } = &err
            else {
                unreachable!()
            };
            assert_eq!(p, &path);
            assert!(*waited >= STALL_TIMEOUT, "reported wait {waited:?}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        other => panic!("expected LockTimeout while the holder is stopped, got {other:?}"),
    }
    assert!(started.elapsed() >= STALL_TIMEOUT);

    // A patient claim queues behind the stopped holder, and gets its port once it lets go.
    let known_threads = thread_ids();
    let (sender, result) = mpsc::channel();
    let (tid_sender, tid) = mpsc::channel();
    let waiter = thread::spawn(move || {
        // SAFETY: gettid has no preconditions and cannot fail.
        let _ = tid_sender.send(unsafe { libc::gettid() });
        // The lease is kept so that its port stays taken for the claim below.
        let _ = sender.send(
            patient
                .acquire("patient")
                .and_then(|g| Ok(g.keep()?.port())),
        );
    });
    let patient_tid = u32::try_from(tid.recv_timeout(DEADLINE).expect("the claim's thread id"))
        .expect("a thread id");
    // Only once the claim is seen waiting on the stopped holder is the holder continued:
    // queued in the kernel for the file lock (on a thread that the claim starts, or its own),
    // or sleeping in SQLite's busy handler between attempts at the write transaction.
    match how {
        "flock" => wait_for_thread_blocked_in(|t| !known_threads.contains(&t), &[libc::SYS_flock]),
        _ => wait_for_thread_blocked_in(
            |t| t == patient_tid,
            &[libc::SYS_nanosleep, libc::SYS_clock_nanosleep],
        ),
    }
    assert_eq!(
        result.try_recv().err(),
        Some(mpsc::TryRecvError::Empty),
        "the patient claim finished while the holder was stopped"
    );
    // Still stopped: nothing but the signal below lets it go.
    wait_for_state(holder.pid(), 'T');
    holder.signal(libc::SIGCONT);
    holder.close_stdin();
    let (lines, status) = holder.finish(deadline());
    assert!(status.success(), "{status}; stderr:\n{}", holder.stderr());
    assert_eq!(lines, ["RELEASED"]);
    let port = result
        .recv_timeout(DEADLINE)
        .expect("the patient claim never finished")
        .expect("the patient claim failed after the holder let go");
    waiter.join().unwrap();
    assert!(STALL_RANGE.contains(&port));
    let guard = impatient
        .acquire("impatient")
        .expect("a claim after the holder let go");
    assert_ne!(guard.port(), port, "the patient claim's port is still held");
}

/// How a `stall` worker holds the registry: `flock` or `sqlite`.
const HOW: &str = "PORTDADDY_FAULTS_HOW";

/// Holds the registry's file lock, or an SQLite write transaction on it, reports `LOCKED`,
/// and lets go when stdin ends, reporting `RELEASED`.
fn stall_worker(path: &Path) {
    match var(HOW).as_str() {
        "flock" => {
            let mut lock_path = path.as_os_str().to_owned();
            lock_path.push(".lock");
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&lock_path)
                .expect("open the lock file");
            let mut lock = fd_lock::RwLock::new(file);
            let held = lock.write().expect("flock the lock file");
            say("LOCKED");
            wait_for_eof();
            drop(held);
        }
        "sqlite" => {
            let conn = rusqlite::Connection::open(path).expect("open with SQLite");
            conn.execute_batch("BEGIN IMMEDIATE; DELETE FROM meta WHERE key = 'nothing';")
                .expect("begin a write transaction");
            say("LOCKED");
            wait_for_eof();
            conn.execute_batch("COMMIT").expect("commit");
        }
        other => panic!("unknown way to hold the lock: {other}"),
    }
    say("RELEASED");
}

/// Waits (bounded) until `/proc/<pid>/stat` shows the process in `state` (`T`: stopped).
fn wait_for_state(pid: u32, state: char) {
    let give_up = deadline();
    let stat = format!("/proc/{pid}/stat");
    loop {
        let text = std::fs::read_to_string(&stat).unwrap_or_default();
        let now = text
            .rfind(')')
            .and_then(|i| text[i + 1..].split_whitespace().next());
        if now == Some(state.encode_utf8(&mut [0; 4])) {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "process {pid} never reached state {state}: {text}"
        );
        thread::yield_now();
    }
}

/// The ids of this process's threads.
fn thread_ids() -> BTreeSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .expect("list /proc/self/task")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Waits (bounded) until a thread of this process that `candidate` accepts (by id) is
/// blocked in one of `syscalls`, as `/proc/self/task/<tid>/syscall` shows.
fn wait_for_thread_blocked_in(candidate: impl Fn(u32) -> bool, syscalls: &[libc::c_long]) {
    let give_up = deadline();
    loop {
        for tid in thread_ids().into_iter().filter(|t| candidate(*t)) {
            let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
                .unwrap_or_default();
            // `<number> <arguments…>` while in a system call, `running` or `-1 …` otherwise.
            let number = text.split_whitespace().next().and_then(|n| n.parse().ok());
            if number.is_some_and(|n: libc::c_long| syscalls.contains(&n)) {
                return;
            }
        }
        assert!(
            Instant::now() < give_up,
            "no thread of the claim was ever blocked in system call {syscalls:?}"
        );
        thread::yield_now();
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Writes that fail: a file size limit stands in for a full disk.
// ---------------------------------------------------------------------------------------------

const FULL_RANGE: RangeInclusive<u16> = 26610..=26699;

/// The file size limit of the filling worker: a little more than the registry it starts with.
const FULL_LIMIT: u64 = 96 * 1024;

/// A process whose file size is limited (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored, as a full
/// disk would refuse writes) claims and keeps ports until a write fails. The failure is a
/// typed error naming the registry, the file stays intact with every lease that was
/// confirmed, and once the limit is lifted the same handle claims again.
#[test]
fn a_write_that_fails_for_lack_of_space_is_a_typed_error_and_leaves_the_registry_intact() {
    let _ports = lock_ports(&FULL_RANGE);
    let (_dir, path) = common::temp_registry();
    drop(open_unprobed(&path, &FULL_RANGE));
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size < FULL_LIMIT / 2, "a new registry of {size} bytes");

    let mut filler = Worker::spawn_with("filler", "fill", &path, &FULL_RANGE, &[], |command| {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: FULL_LIMIT as libc::rlim_t,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let failed = filler.expect_line("FAILED", deadline());
    let recovered = filler.expect_line("RECOVERED", deadline());
    filler.close_stdin();
    let (lines, status) = filler.finish(deadline());
    assert!(status.success(), "{status}; stderr:\n{}", filler.stderr());
    assert!(lines.is_empty(), "{lines:?}");
    eprintln!("{failed}\n{recovered}");

    let fields: Vec<&str> = failed.splitn(5, ' ').collect();
    let ["FAILED", kept_before, _step, variant, message] = fields[..] else {
        panic!("expected FAILED <kept> <step> <variant> <message>, got {failed:?}");
    };
    assert!(
        kept_before.parse::<usize>().unwrap() > 0,
        "not one claim fitted under the limit"
    );
    assert_eq!(variant, "Registry", "{failed}");
    assert!(message.contains(&path.display().to_string()), "{message}");

    assert_eq!(integrity_check(&path), "ok");
    let registry = open_unprobed(&path, &FULL_RANGE);
    let leases = registry.list().expect("list");
    let (kept, recovered_port) = match recovered.split(' ').collect::<Vec<_>>()[..] {
        ["RECOVERED", kept, port] => (kept.parse::<usize>().unwrap(), port.parse::<u16>().unwrap()),
        _ => panic!("expected RECOVERED <kept> <port>, got {recovered:?}"),
    };
    assert_eq!(
        leases.len(),
        kept + 1,
        "every confirmed lease and the one after recovery, nothing else: {leases:#?}"
    );
    assert!(leases.iter().any(|l| l.port() == recovered_port));
    assert!(leases.iter().all(|l| l.is_detached()), "{leases:#?}");
    let ports: BTreeSet<u16> = leases.iter().map(|l| l.port()).collect();
    assert_eq!(ports.len(), leases.len(), "two leases share a port");
}

/// Keeps claiming and detaching ports (long names, so that the file grows) until a write
/// fails; reports `FAILED <leases kept> <step> <variant> <message>`, lifts its file size
/// limit, finishes on the same handle what failed (a detach is retried on the guard that the
/// error handed back) and reports `RECOVERED <leases kept> <port of one more claim>`; exits at
/// end of stdin.
fn fill_worker(registry: &PortDaddy) {
    let mut kept = 0usize;
    let (err, _step, pending) = loop {
        assert!(kept < 10_000, "the file size limit never stopped a write");
        let guard = match registry.acquire(&format!("{kept:0>128}")) {
            Ok(guard) => guard,
            Err(e) => break (Some(e), "acquire", None),
        };
        match guard.keep() {
            Ok(_) => kept += 1,
            Err(e) => {
                let shown = format!("{:?}|{}", e.error(), e.error());
                let guard = e
                    .into_guard()
                    .expect("a failed detach hands the guard back");
                let (debug, display) = shown.split_once('|').unwrap();
                let variant = debug.split([' ', '{', '(']).next().unwrap_or_default();
                say(&format!("FAILED {kept} keep {variant} {display}"));
                break (None, "keep", Some(guard));
            }
        }
    };
    if let Some(err) = err {
        let variant = format!("{err:?}");
        let variant = variant.split([' ', '{', '(']).next().unwrap_or_default();
        say(&format!("FAILED {kept} acquire {variant} {err}"));
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer.
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &unlimited) },
        0
    );
    if let Some(guard) = pending {
        guard
            .keep()
            .unwrap_or_else(|e| panic!("detach again once space returned: {e}"));
        kept += 1;
    }
    let lease = registry
        .acquire("after the limit")
        .and_then(|g| Ok(g.keep()?))
        .unwrap_or_else(|e| panic!("a claim once space returned: {e}"));
    say(&format!("RECOVERED {kept} {}", lease.port()));
    wait_for_eof();
}

// ---------------------------------------------------------------------------------------------
// 6. A registry of the first schema, opened by this build while others claim or are killed.
// ---------------------------------------------------------------------------------------------

const MIXED_RANGE: RangeInclusive<u16> = 26700..=26799;
const MIXED_WORKERS: usize = 4;
const MIXED_CLAIMS: usize = 25;

/// A registry written by the first schema, with leases of a live owner, detached leases and
/// remembered names, is opened by four processes at once that claim as soon as they have it
/// open. Whichever migrates it, every lease and every remembered name survives: the live
/// owner's leases are unchanged and never handed out, the detached leases are still there,
/// and each remembered name gets its port back.
#[test]
fn a_first_schema_registry_keeps_its_leases_and_names_while_others_claim() {
    let _ports = lock_ports(&MIXED_RANGE);
    let (_dir, path) = common::temp_registry();
    write_first_schema_registry(&path);
    let before = leases_by_sql(&path);
    assert_eq!(before.len(), 6);

    let mut workers: Vec<Worker> = (0..MIXED_WORKERS)
        .map(|id| {
            Worker::spawn(
                format!("claimer {id}"),
                "claim",
                &path,
                &MIXED_RANGE,
                &[(ID, id.to_string())],
            )
        })
        .collect();
    for worker in &workers {
        assert_eq!(worker.expect_line("READY", deadline()), "READY");
    }
    for worker in &mut workers {
        worker.send("go");
    }
    let mut claimed = BTreeMap::new();
    for worker in &mut workers {
        let (lines, status) = worker.finish(deadline());
        assert!(
            status.success(),
            "{}: {status}\n{}",
            worker.label,
            worker.stderr()
        );
        let (announced, claims) = lines.split_at(lines.len().min(2));
        assert_eq!(announced, ["OPENING", "OPENED"], "{}", worker.label);
        for line in claims {
            let port: u16 = line
                .strip_prefix("GOT ")
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{}: {line:?}", worker.label));
            *claimed.entry(port).or_insert(0usize) += 1;
        }
    }
    assert_eq!(
        claimed.values().sum::<usize>(),
        MIXED_WORKERS * MIXED_CLAIMS
    );
    for port in 26700..=26705u16 {
        assert!(
            !claimed.contains_key(&port),
            "port {port} of a surviving lease was handed out: {claimed:?}"
        );
    }

    let after = leases_by_sql(&path);
    assert_eq!(after, before, "leases changed across the migration");
    let registry = open_unprobed(&path, &MIXED_RANGE);
    assert_eq!(registry.list().unwrap().len(), 6);
    for i in 0..5u16 {
        let guard = registry.acquire(&format!("sticky-{i}")).unwrap();
        assert_eq!(
            (guard.port(), guard.choice()),
            (26790 + i, portdaddy::Choice::Remembered),
            "sticky-{i} lost its port"
        );
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert!(version >= 1, "user_version {version}");
}

const MIGRATE_KILLS: usize = 24;
/// The most kills, when the planned ones did not all land on one side of the commit.
const MIGRATE_MAX_KILLS: usize = 4 * MIGRATE_KILLS;
/// Opens timed, unkilled, before the kills, to learn how long an open with its migration takes.
const MIGRATE_CALIBRATIONS: usize = 3;

/// A process that opens a registry of the first schema, and so migrates it, is killed at a
/// random moment, again and again on fresh copies: each time the file is intact, of the first
/// schema or of the current one (never in between), with every lease as it was, and the next
/// process opens it and finds every lease and name.
///
/// The kill is timed from the worker's `OPENING` line, sent just before it opens, at a random
/// moment within the longest time an open took in unkilled runs first. Each kill is classed
/// by what can be seen of it: the schema version the next opener finds (the current one: the
/// migration had committed) and whether the worker held the registry's file lock just before
/// the kill (with the first schema still found: it was killed while it held the lock for the
/// open, before its migration committed). At least one kill must land in each of these two
/// classes, so that the kills span the migration; else the test fails, after up to
/// [`MIGRATE_MAX_KILLS`] rounds with the window adjusted.
#[test]
fn a_process_killed_while_it_migrates_leaves_the_old_schema_or_the_new_one_whole() {
    let _ports = lock_ports(&MIXED_RANGE);
    let current = {
        let (_dir, path) = common::temp_registry();
        drop(open_unprobed(&path, &MIXED_RANGE));
        user_version(&path)
    };
    assert!(
        current > 1,
        "no migration to interrupt: schema version {current}"
    );
    let mut took = Duration::ZERO;
    for round in 0..MIGRATE_CALIBRATIONS {
        let (_dir, path) = common::temp_registry();
        write_first_schema_registry(&path);
        let mut opener = Worker::spawn(
            format!("timed opener {round}"),
            "claim",
            &path,
            &MIXED_RANGE,
            &[(ID, format!("timed-{round}"))],
        );
        assert_eq!(opener.expect_line("READY", deadline()), "READY");
        opener.send("go");
        assert_eq!(opener.expect_line("OPENING", deadline()), "OPENING");
        let opening = Instant::now();
        assert_eq!(opener.expect_line("OPENED", deadline()), "OPENED");
        took = took.max(opening.elapsed());
        let (_, status) = opener.finish(deadline());
        assert!(status.success(), "{status}; stderr:\n{}", opener.stderr());
        assert_eq!(user_version(&path), current);
    }
    let mut window = took;

    let mut rng = XorShift::new(0x6d16_7a7e);
    let (mut before_lock, mut inside_open, mut after_commit) = (0usize, 0usize, 0usize);
    let mut round = 0;
    while round < MIGRATE_KILLS
        || (round < MIGRATE_MAX_KILLS && (inside_open == 0 || after_commit == 0))
    {
        // Past the planned rounds, on a machine much slower or faster than while it was
        // timed, the window widens while no kill has landed after the migration, and
        // narrows while none has landed inside the open.
        if round >= MIGRATE_KILLS {
            window = if after_commit == 0 {
                window * 3 / 2
            } else {
                window / 2
            };
        }
        let (dir, path) = common::temp_registry();
        let lock_file = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("registry.sqlite3.lock");
        write_first_schema_registry(&path);
        let before = leases_by_sql(&path);
        let mut migrator = Worker::spawn(
            format!("migrator {round}"),
            "claim",
            &path,
            &MIXED_RANGE,
            &[(ID, round.to_string())],
        );
        assert_eq!(migrator.expect_line("READY", deadline()), "READY");
        migrator.send("go");
        assert_eq!(migrator.expect_line("OPENING", deadline()), "OPENING");
        thread::sleep(rng.below(window));
        let held_lock = holds_flock(migrator.pid(), &lock_file);
        migrator.kill();

        assert_eq!(integrity_check(&path), "ok", "round {round}");
        let version = user_version(&path);
        assert!(
            version == 1 || version == current,
            "round {round}: schema version {version}, neither 1 nor {current}"
        );
        match (version == current, held_lock) {
            (true, _) => after_commit += 1,
            (false, true) => inside_open += 1,
            (false, false) => before_lock += 1,
        }
        assert_eq!(
            leases_by_sql(&path),
            before,
            "round {round}: leases changed"
        );
        let registry = open_unprobed(&path, &MIXED_RANGE);
        assert_eq!(user_version(&path), current);
        let names: BTreeSet<String> = registry
            .list()
            .unwrap()
            .iter()
            .map(|l| l.name().to_owned())
            .collect();
        for name in ["live-0", "live-3", "kept-0", "kept-1"] {
            assert!(
                names.contains(name),
                "round {round}: {name} lost: {names:?}"
            );
        }
        let guard = registry.acquire("sticky-2").unwrap();
        assert_eq!(guard.port(), 26792, "round {round}: sticky-2 lost its port");
        round += 1;
    }
    let found = format!(
        "an open took up to {took:?}; of {round} kills (the last within {window:?} of its start), \
         {before_lock} landed before it held the file lock, {inside_open} while it held the \
         lock before its migration committed, {after_commit} after the migration committed"
    );
    eprintln!("{found}");
    assert!(
        inside_open > 0 && after_commit > 0,
        "the kills did not span the migration: {found}"
    );
}

/// Whether process `pid` holds a `flock` on the file at `path` (canonical): one of its
/// descriptors is open on that file, and its `/proc/<pid>/fdinfo` lists a granted lock (a
/// waiting one is marked `->`).
fn holds_flock(pid: u32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| target == path)
            && std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .is_ok_and(|info| {
                info.lines()
                    .any(|l| l.starts_with("lock:") && l.contains(" FLOCK ") && !l.contains("->"))
            })
    })
}

/// `PRAGMA user_version` of the file at `path`.
fn user_version(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// Writes a registry of the first schema at `path`, as the first release would have left it:
/// leases 1000-1003 of this (live) process on 26700-26703, detached leases 2000-2001 on
/// 26704-26705, and the names `sticky-0` to `sticky-4` remembering 26790-26794.
fn write_first_schema_registry(path: &Path) {
    let me = Owner::current().unwrap();
    let at = 1_700_000_000_000i64;
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
    conn.execute_batch(common::SCHEMA_V1).unwrap();
    conn.execute_batch("PRAGMA application_id = 1349796985; PRAGMA user_version = 1;")
        .unwrap();
    let mut insert = conn
        .prepare(
            "INSERT INTO leases (id, port, name, protocol, owner_pid, owner_start, owner_boot,
                                 acquired_at, expires_at)
             VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, ?7, NULL)",
        )
        .unwrap();
    for i in 0..4u16 {
        insert
            .execute(rusqlite::params![
                1000 + i64::from(i),
                26700 + i,
                format!("live-{i}"),
                me.pid(),
                me.start_time() as i64,
                me.boot_id(),
                at,
            ])
            .unwrap();
    }
    for i in 0..2u16 {
        insert
            .execute(rusqlite::params![
                2000 + i64::from(i),
                26704 + i,
                format!("kept-{i}"),
                None::<i64>,
                None::<i64>,
                None::<String>,
                at,
            ])
            .unwrap();
    }
    for i in 0..5u16 {
        conn.execute(
            "INSERT INTO names (name, port, used_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![format!("sticky-{i}"), 26790 + i, at],
        )
        .unwrap();
    }
}

/// The original columns of every lease, read with plain SQL, by id.
fn leases_by_sql(path: &Path) -> BTreeMap<i64, String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT id, port, name, protocol, owner_pid, owner_start, owner_boot, acquired_at,
                    expires_at FROM leases WHERE id < 10000",
        )
        .unwrap();
    stmt.query_map([], |r| {
        let row: Vec<rusqlite::types::Value> =
            (0..9).map(|i| r.get(i)).collect::<Result<_, _>>()?;
        Ok((r.get::<_, i64>(0)?, format!("{row:?}")))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Says `READY`, waits for a line, says `OPENING`, opens the registry and says `OPENED`, then
/// claims [`MIXED_CLAIMS`] times, reporting `GOT <port>` for each.
fn claim_worker(path: &Path, range: &RangeInclusive<u16>) {
    let id = var(ID);
    say("READY");
    read_line().expect("a go line");
    say("OPENING");
    let registry = open_unprobed(path, range);
    say("OPENED");
    for n in 0..MIXED_CLAIMS {
        let guard = registry
            .acquire(&format!("claimer-{id}-{}", n % 3))
            .unwrap_or_else(|e| panic!("claim {n}: {e}"));
        say(&format!("GOT {}", guard.port()));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Owners in another PID namespace.
// ---------------------------------------------------------------------------------------------

const NS_RANGE: RangeInclusive<u16> = 26800..=26803;

/// A process in a PID namespace of its own (`unshare --pid --fork --mount-proc`, as a
/// container runs) and processes of the host share one registry. Pids mean nothing across
/// the namespace boundary, so each side must neither reap the other's live leases nor hand
/// out their ports; once the namespaced owner is killed, the host reclaims its lease.
///
/// Skipped, with the reason printed, where `unshare` is missing or not permitted.
#[test]
fn owners_in_another_pid_namespace_keep_their_leases_until_they_die() {
    if let Err(why) = unshare_works() {
        println!("skipped: cannot make a PID namespace here: {why}");
        return;
    }
    let _ports = lock_ports(&NS_RANGE);
    let (_dir, path) = common::temp_registry();
    let host = PortDaddy::builder()
        .path(&path)
        .range(NS_RANGE)
        .port_probe(all_free)
        .open()
        .expect("open");
    let host_guard = host.acquire("host").expect("a host lease");

    let mut inside = Worker::spawn_with(
        "namespaced holder",
        "hold",
        &path,
        &NS_RANGE,
        &[(LISTEN, "0".into())],
        in_new_pid_namespace,
    );
    let (inside_port, inside_pid) = parse_held(&inside.expect_line("HELD", deadline()));
    assert_ne!(inside_port, host_guard.port());
    assert_ne!(
        inside_pid,
        inside.pid(),
        "the holder did not run in a PID namespace of its own"
    );

    // Inside the namespace, the host's lease is not dead.
    let mut sweeper = Worker::spawn_with(
        "namespaced sweeper",
        "sweep",
        &path,
        &NS_RANGE,
        &[],
        in_new_pid_namespace,
    );
    let (lines, status) = sweeper.finish(deadline());
    assert!(status.success(), "{status}; stderr:\n{}", sweeper.stderr());
    assert_eq!(
        lines,
        ["REAPED 0", "GOT 2"],
        "a process in another PID namespace reaped or took the host's or the holder's lease"
    );

    // On the host, the namespaced holder's lease is not dead either.
    assert_eq!(
        host.reap().expect("reap"),
        0,
        "the host reaped a live lease"
    );
    let others = host.acquire_many(&["a", "b"]).expect("the two free ports");
    let mut taken: Vec<u16> = others.iter().map(|g| g.port()).collect();
    taken.extend([host_guard.port(), inside_port]);
    taken.sort_unstable();
    assert_eq!(taken, NS_RANGE.collect::<Vec<_>>());
    assert!(
        matches!(host.acquire("c"), Err(Error::Exhausted { .. })),
        "the namespaced holder's port was handed out"
    );
    drop(others);

    // Killed, the namespaced holder's lease is reclaimed by the host.
    let status = inside.kill();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let give_up = deadline();
    let mut reaped = 0;
    while reaped == 0 {
        // `unshare` passes the kill on to the holder; it dies a moment later.
        assert!(
            Instant::now() < give_up,
            "the killed holder's lease was never reaped"
        );
        reaped = host.reap().expect("reap");
        thread::yield_now();
    }
    assert_eq!(reaped, 1);
    let leases = host.list().unwrap();
    assert_eq!(leases.len(), 1, "{leases:#?}");
    assert_eq!(leases[0].port(), host_guard.port());
}

/// A pid that the system has handed to a new process (same pid, another start time) is no
/// longer the owner, and neither is a pid recorded under an earlier boot: a second handle on
/// the file reclaims both leases, while the lease of the process that now runs under that
/// pid stays. The process table is a fake probe here; `api.rs` and the unit tests of
/// `src/probe/system.rs` check the same against the real system.
#[test]
fn a_reused_pid_or_an_earlier_boot_in_a_shared_file_is_a_dead_owner() {
    let (_dir, path) = common::temp_registry();
    let range = 26804..=26806;
    let now_running = Owner::new(4_000_001, 2, "this-boot");
    let table = now_running.clone();
    let open = || {
        let table = table.clone();
        PortDaddy::builder()
            .path(&path)
            .range(range.clone())
            .port_probe(all_free)
            .process_probe(move |o: &Owner| *o == table)
            .open()
            .expect("open")
    };
    let writer = open();
    for (name, owner) in [
        ("reused pid", Owner::new(4_000_001, 1, "this-boot")),
        ("earlier boot", Owner::new(4_000_001, 2, "an-earlier-boot")),
        ("running", now_running),
    ] {
        let request = portdaddy::Request::new(name).owner(owner);
        std::mem::forget(writer.acquire_with(&request).expect("a lease"));
    }
    drop(writer);
    let reader = open();
    let guards = reader
        .acquire_many(&["x", "y"])
        .expect("the dead owners' two ports");
    assert_eq!(guards.len(), 2);
    let left: Vec<String> = reader
        .list()
        .unwrap()
        .iter()
        .filter(|l| !["x", "y"].contains(&l.name()))
        .map(|l| l.name().to_owned())
        .collect();
    assert_eq!(left, ["running"]);
}

/// Whether `unshare --pid --fork --mount-proc` runs here.
fn unshare_works() -> Result<(), String> {
    let output = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGKILL",
            "true",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("unshare: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "unshare {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Reaps, reports `REAPED <n>`, then claims every port it can and reports `GOT <n>`.
fn sweep_worker(registry: &PortDaddy) {
    say(&format!("REAPED {}", registry.reap().expect("reap")));
    let mut guards = Vec::new();
    while let Ok(guard) = registry.acquire("sweep") {
        guards.push(guard);
    }
    say(&format!("GOT {}", guards.len()));
}

// ---------------------------------------------------------------------------------------------
// 3. A registry in a directory its user may not write.
// ---------------------------------------------------------------------------------------------

/// The user that the read-only test runs its worker as (`nobody` on most systems).
const NOBODY: u32 = 65534;

/// In a directory that its user may only read (`0555`), a new registry cannot be made and an
/// existing one cannot be used: both give `Error::Open` naming the registry, leave the
/// existing file as it was, and create nothing. The worker runs as an unprivileged user, since
/// root writes anywhere; the test is skipped, with the reason printed, where it cannot switch.
#[test]
fn a_read_only_directory_gives_an_open_error_and_is_left_alone() {
    use std::os::unix::fs::{chown, PermissionsExt};
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root to run a worker as another user");
        return;
    }
    let mut probe = Command::new(std::env::current_exe().unwrap());
    probe
        .arg("--list")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    as_nobody(&mut probe);
    match probe.status() {
        Ok(status) if status.success() => {}
        outcome => {
            println!("skipped: the test binary cannot run as uid {NOBODY} here: {outcome:?}");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("read-only");
    std::fs::create_dir(&dir).unwrap();
    let existing = dir.join("existing.sqlite3");
    {
        let registry = open_unprobed(&existing, &FULL_RANGE);
        registry.acquire("kept").unwrap().keep().unwrap();
    }
    // Without its `-wal` and `-shm`, which an open would have to create: with them, the
    // registry is usable in a directory that is not.
    common::fold_wal(&existing);
    for entry in std::fs::read_dir(&dir).unwrap() {
        chown(entry.unwrap().path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let before_entries = names_in(&dir);
    let before_bytes = std::fs::read(&existing).unwrap();

    for path in [dir.join("new.sqlite3"), existing.clone()] {
        let mut worker = Worker::spawn_with(
            "read-only opener",
            "open",
            &path,
            &FULL_RANGE,
            &[],
            as_nobody,
        );
        let (lines, status) = worker.finish(deadline());
        assert!(status.success(), "{status}; stderr:\n{}", worker.stderr());
        let line = lines.join("\n");
        assert!(
            line.starts_with("ERR Open "),
            "{}: expected Error::Open, got {line}",
            path.display()
        );
        assert!(line.contains(&path.display().to_string()), "{line}");
        assert_eq!(names_in(&dir), before_entries, "files appeared or went");
        assert_eq!(std::fs::read(&existing).unwrap(), before_bytes);
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Makes `command` run as [`NOBODY`], without supplementary groups.
fn as_nobody(command: &mut Command) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn names_in(dir: &Path) -> BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect()
}

/// Opens the registry, claims and lists; reports `OK` or `ERR <variant> <message>`.
fn open_worker(path: &Path, range: &RangeInclusive<u16>) {
    let result = PortDaddy::builder()
        .path(path)
        .range(range.clone())
        .port_probe(all_free)
        .open()
        .and_then(|registry| {
            registry.list()?;
            registry.acquire("read-only").map(drop)
        });
    match result {
        Ok(()) => say("OK"),
        Err(e) => {
            let variant = format!("{e:?}");
            let variant = variant.split([' ', '{', '(']).next().unwrap_or_default();
            say(&format!("ERR {variant} {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Worker entry
// ---------------------------------------------------------------------------------------------

/// Not a test of its own: the entry point of worker processes (see the module docs).
#[test]
fn worker_entry() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let path = PathBuf::from(var(REGISTRY));
    let range = parse_range(&var(RANGE));
    match mode.as_str() {
        "churn" => churn_worker(&open_unprobed(&path, &range)),
        "hold" => hold_worker(&open_unprobed(&path, &range)),
        "stall" => stall_worker(&path),
        "open" => open_worker(&path, &range),
        "sweep" => sweep_worker(&open_unprobed(&path, &range)),
        "fill" => fill_worker(&open_unprobed(&path, &range)),
        "claim" => claim_worker(&path, &range),
        other => panic!("unknown worker mode {other:?}"),
    }
}

/// Whether a `hold` worker binds a listener on its port (`1`, the default) or not (`0`).
const LISTEN: &str = "PORTDADDY_FAULTS_LISTEN";

/// Takes one port and binds a listener on it (unless [`LISTEN`] is `0`), reports
/// `HELD <port> <pid>`, holds both until stdin ends, releases them and reports `RELEASED`.
fn hold_worker(registry: &PortDaddy) {
    let guard = registry.acquire("steady").expect("hold worker: acquire");
    let listener = (std::env::var(LISTEN).as_deref() != Ok("0")).then(|| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, guard.port()))
            .unwrap_or_else(|e| panic!("hold worker: bind {}: {e}", guard.port()))
    });
    say(&format!("HELD {} {}", guard.port(), std::process::id()));
    wait_for_eof();
    drop(listener);
    drop(guard);
    say("RELEASED");
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

/// A small deterministic generator, so that a failing schedule can be replayed.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration in `0..max`.
    fn below(&mut self, max: Duration) -> Duration {
        let nanos = u64::try_from(max.as_nanos()).expect("a short duration");
        Duration::from_nanos(self.next() % nanos.max(1))
    }
}

/// The host-wide lock on `range` (see [`workers::lock_ports`]).
fn lock_ports(range: &RangeInclusive<u16>) -> std::fs::File {
    workers::lock_ports(range, DEADLINE)
}
