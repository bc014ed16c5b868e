//! The edges of what a host, a clock or a caller can do to a claim: TTLs below the
//! registry's resolution, blocks that find no run, hostile text in errors, forks in the
//! middle of a claim, signals during the lock wait, running out of file descriptors, and
//! clocks that jump.
//!
//! Ports 32300-32399 belong to this file (see `common`).

use crate::common;

use std::time::Duration;

use common::{all_free, temp_registry, FakeClock, FakeProcesses};
use portdaddy::{Error, PortDaddy, Request};

/// A file registry over `range` whose probe says every port is free, telling time by `clock`.
fn file_at(
    path: &std::path::Path,
    range: std::ops::RangeInclusive<u16>,
    clock: &FakeClock,
) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(range)
        .port_probe(all_free)
        .clock(clock.as_fn())
        .open()
        .expect("open")
}

// ---------------------------------------------------------------------------------------
// TTLs and the registry's resolution

#[test]
fn a_ttl_below_one_millisecond_is_refused() {
    let (_dir, path) = temp_registry();
    let registry = file_at(&path, 32300..=32309, &FakeClock::new());
    let err = registry
        .acquire_with(&Request::new("short").ttl(Duration::from_micros(500)))
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidRequest { reason, .. } if reason.contains("1ms")),
        "{err}"
    );
    assert!(registry.list().unwrap().is_empty(), "nothing was leased");
}

#[test]
fn a_one_millisecond_ttl_does_not_expire_at_once() {
    let (_dir, path) = temp_registry();
    // A clock late in a millisecond: the stored start is rounded down by almost 1 ms.
    let clock = FakeClock::new();
    clock.advance(Duration::from_micros(999));
    let registry = file_at(&path, 32300..=32309, &clock);
    let lease = registry
        .acquire_with(&Request::new("short").ttl(Duration::from_millis(1)))
        .unwrap()
        .keep()
        .unwrap();
    let expires = lease.expires_at().expect("a TTL lease expires");
    assert!(expires > clock.as_fn()(), "expired at once: {expires:?}");
    assert_eq!(
        expires.duration_since(lease.acquired_at()).unwrap(),
        Duration::from_millis(1)
    );
    assert_eq!(registry.reap().unwrap(), 0, "expired at once");
    assert_eq!(registry.list().unwrap(), std::slice::from_ref(&lease));
    clock.advance(Duration::from_millis(1));
    assert_eq!(registry.reap().unwrap(), 1, "expired once its TTL passed");
}

#[test]
fn a_ttl_with_a_fraction_of_a_millisecond_is_rounded_up() {
    let (_dir, path) = temp_registry();
    let registry = file_at(&path, 32300..=32309, &FakeClock::new());
    let lease = registry
        .acquire_with(&Request::new("frac").ttl(Duration::from_micros(1500)))
        .unwrap()
        .keep()
        .unwrap();
    let ttl = lease
        .expires_at()
        .unwrap()
        .duration_since(lease.acquired_at());
    assert_eq!(ttl.unwrap(), Duration::from_millis(2));
}

// ---------------------------------------------------------------------------------------
// What Exhausted says for a block

#[test]
fn a_block_without_a_free_run_says_so_and_counts_only_live_holders() {
    let (_dir, path) = temp_registry();
    let registry = file_at(&path, 32300..=32309, &FakeClock::new());
    // Three live holders leave runs of at most two free ports.
    let _held: Vec<_> = [32302, 32305, 32308]
        .into_iter()
        .map(|p| {
            registry
                .acquire_with(&Request::new("x").require(p))
                .unwrap()
        })
        .collect();
    let err = registry
        .acquire_with(&Request::new("raft").block(4))
        .unwrap_err();
    match &err {
        Error::Exhausted {
            range,
            held,
            block_len,
            ..
        } => assert_eq!((range.start(), *held, *block_len), (32300, 3, 4)),
        other => panic!("expected Exhausted, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("no 4 consecutive free ports in 32300-32309")
            && text.contains("3 of its 10 ports"),
        "{text}"
    );
    assert!(!text.contains("no free port"), "{text}");
}

#[test]
fn a_taken_preferred_block_longer_than_the_range_does_not_count_dead_holders() {
    let (_dir, path) = temp_registry();
    let procs = FakeProcesses::default();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(32300..=32302)
        .port_probe(all_free)
        .process_probe(procs.probe())
        .open()
        .unwrap();
    // A dead holder in the range, and a live one on the preferred block outside it.
    let dead = procs.spawn(4_000_001);
    // Left behind as by a crash: the guard's drop never runs.
    std::mem::forget(
        registry
            .acquire_with(&Request::new("gone").require(32300).owner(dead.clone()))
            .unwrap(),
    );
    procs.kill(&dead);
    let _live = registry
        .acquire_with(&Request::new("live").require(32310))
        .unwrap();
    let err = registry
        .acquire_with(&Request::new("raft").block(4).preferred(32310))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Exhausted {
                held: 0,
                block_len: 4,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("preferred block is taken") && text.contains("does not fit"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// Hostile text in errors

#[test]
fn an_error_shows_a_hostile_path_escaped() {
    let (dir, _) = temp_registry();
    // A file where the registry's directory should be: opening fails and names the path.
    let evil = dir.path().join("x\u{1b}[2J\u{202e}txt.\n");
    std::fs::write(&evil, b"").unwrap();
    let err = PortDaddy::open(evil.join("registry.sqlite3")).unwrap_err();
    let text = err.to_string();
    assert!(
        !text
            .chars()
            .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
        "{text:?}"
    );
    assert!(text.contains(r"x\u{1b}[2J\u{202e}txt.\n"), "{text:?}");
}

#[cfg(feature = "cli")]
mod command {
    use std::process::{Command, Output, Stdio};

    pub const RANGE: &str = "32300-32399";

    pub fn portdaddy(db: &std::path::Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portdaddy"));
        cmd.args(args)
            .env("PORTDADDY_DB", db)
            .env("PORTDADDY_RANGE", RANGE)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null());
        cmd
    }

    pub fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    pub fn run(db: &std::path::Path, args: &[&str]) -> Output {
        portdaddy(db, args).output().expect("run portdaddy")
    }
}

#[cfg(feature = "cli")]
#[test]
fn the_command_refuses_a_ttl_under_one_second() {
    let (_dir, path) = temp_registry();
    for ttl in ["1ms", "999ms", "500us"] {
        let out = command::run(&path, &["acquire", "short", "--ttl", ttl]);
        let stderr = command::text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {stderr}");
        assert!(stderr.contains("at least 1s"), "--ttl {ttl}: {stderr}");
    }
    let out = command::run(&path, &["acquire", "ok", "--ttl", "1s"]);
    assert!(out.status.success(), "{}", command::text(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// Signals during the lock wait

#[cfg(target_os = "linux")]
mod interrupted {
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;

    static CAUGHT: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn count(_: libc::c_int) {
        CAUGHT.fetch_add(1, Ordering::SeqCst);
    }

    /// Installs a handler for SIGUSR1 *without* `SA_RESTART`, so that a blocking call the
    /// signal lands in fails with `EINTR` instead of going on.
    fn catch_sigusr1_without_restart() {
        // SAFETY: the sigaction struct is zeroed (no flags, empty mask) and then given a
        // handler that only touches an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = count as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&raw mut action.sa_mask);
            action.sa_flags = 0;
            assert_eq!(
                libc::sigaction(libc::SIGUSR1, &raw const action, std::ptr::null_mut()),
                0
            );
        }
    }

    /// Whether some open file description waits in the kernel's queue for the lock on
    /// inode `ino` (`/proc/locks` marks waiters with `->`).
    fn someone_waits_for(ino: u64) -> bool {
        let id = format!(":{ino} ");
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|line| line.contains("->") && line.contains(&id))
    }

    /// The threads of this process named `names` (by `/proc/self/task/*/comm`).
    fn threads_named(names: &[&str]) -> Vec<libc::pid_t> {
        let mut tids = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if names.contains(&comm.trim_end()) {
                tids.push(entry.file_name().to_string_lossy().parse().unwrap());
            }
        }
        tids
    }

    fn signal_thread(tid: libc::pid_t) {
        // SAFETY: tgkill with this process's id, one of its thread ids and a signal that
        // has a handler; a thread that has exited meanwhile only gives ESRCH.
        unsafe {
            libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1);
        }
    }

    fn wait_for(what: &str, deadline: Instant, mut done: impl FnMut() -> bool) {
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    /// Holds the registry's lock from another open file description, starts a claim that
    /// waits for it, hits the waiting threads with SIGUSR1 again and again while they wait,
    /// then releases: the claim must succeed.
    fn claim_survives_signals_while_waiting(lock_timeout: Duration) {
        catch_sigusr1_without_restart();
        let (_dir, path) = temp_registry();
        let registry = PortDaddy::builder()
            .path(&path)
            .range(32310..=32319)
            .port_probe(all_free)
            .lock_timeout(lock_timeout)
            .open()
            .unwrap();
        let lock_path = {
            let mut name = path.clone().into_os_string();
            name.push(".lock");
            std::path::PathBuf::from(name)
        };
        // Creates the lock file.
        drop(registry.acquire("warm-up").unwrap());
        let holder = File::options()
            .read(true)
            .write(true)
            .open(&lock_path)
            .unwrap();
        let ino = holder.metadata().unwrap().ino();
        holder.lock().unwrap();

        let (done_tx, done) = mpsc::channel();
        let claimer = std::thread::Builder::new()
            .name("patient-claim".into())
            .spawn({
                let registry = registry.clone();
                move || done_tx.send(registry.acquire("patient")).unwrap()
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        for _ in 0..30 {
            // Signal only while the claim is queued for the lock.
            wait_for("the claim to wait for the lock", deadline, || {
                someone_waits_for(ino)
            });
            let before = CAUGHT.load(Ordering::SeqCst);
            let targets = threads_named(&["portdaddy-lock", "patient-claim"]);
            assert!(!targets.is_empty());
            for tid in &targets {
                signal_thread(*tid);
            }
            wait_for("the signals to be handled", deadline, || {
                CAUGHT.load(Ordering::SeqCst) >= before + targets.len()
            });
            assert!(
                done.try_recv().is_err(),
                "the claim ended while the lock was held"
            );
        }
        holder.unlock().unwrap();
        let result = done
            .recv_timeout(Duration::from_secs(10))
            .expect("the claim returned once the lock was free");
        let guard = result.expect("the interrupted claim succeeds");
        assert!((32310..=32319).contains(&guard.port()));
        claimer.join().unwrap();
    }

    #[test]
    fn a_signal_without_sa_restart_does_not_end_a_bounded_lock_wait() {
        claim_survives_signals_while_waiting(Duration::from_secs(30));
    }

    #[test]
    fn a_signal_without_sa_restart_does_not_end_an_unbounded_lock_wait() {
        claim_survives_signals_while_waiting(Duration::MAX);
    }
}

// ---------------------------------------------------------------------------------------
// Out of file descriptors

/// The worker processes of this file (see `common::workers`).
#[cfg(unix)]
#[test]
fn worker_entry() {
    use common::workers::{parse_range, var, MODE, RANGE, REGISTRY};
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let path = std::path::PathBuf::from(var(REGISTRY));
    let range = parse_range(&var(RANGE));
    match mode.as_str() {
        "no-fds" => descriptors::starved_worker(&path, range),
        other => panic!("unknown worker mode {other:?}"),
    }
}

#[cfg(unix)]
mod descriptors {
    use std::fs::File;
    use std::time::{Duration, Instant};

    use common::workers::{say, Worker};

    use super::*;

    /// The soft limit on open files of this process.
    fn soft_limit() -> libc::rlimit {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the live struct it is given.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) },
            0
        );
        limit
    }

    fn set_limit(limit: &libc::rlimit) {
        // SAFETY: setrlimit reads one live rlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) }, 0);
    }

    /// Lowers the soft limit on open files to what is open now and fills any free slot
    /// below it, so that no new descriptor can be created; the fillers are returned to be
    /// closed later.
    fn use_up_descriptors() -> Vec<File> {
        let highest = std::fs::read_dir("/proc/self/fd")
            .expect("list open descriptors")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .expect("some descriptor is open");
        let mut limit = soft_limit();
        limit.rlim_cur = highest as libc::rlim_t + 1;
        set_limit(&limit);
        let mut fillers = Vec::new();
        loop {
            match File::open("/dev/null") {
                Ok(f) => fillers.push(f),
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => return fillers,
                Err(e) => panic!("open /dev/null: {e}"),
            }
        }
    }

    /// Uses up every descriptor as [`use_up_descriptors`] does, then allows `free` more.
    fn leave_free(free: u64) -> Vec<File> {
        let fillers = use_up_descriptors();
        let mut limit = soft_limit();
        limit.rlim_cur += free as libc::rlim_t;
        set_limit(&limit);
        fillers
    }

    /// The most descriptors the worker leaves free, one step at a time from none: enough
    /// for a new handle to open the registry (the lock file, the database, its `-wal` and
    /// `-shm`, an owner lock file) and to probe.
    pub const MOST_FREE: u64 = 12;

    /// How a step went: `ok`, or the variant of the error and its text.
    fn outcome<T>(result: &portdaddy::Result<T>) -> String {
        match result {
            Ok(_) => "ok".into(),
            Err(e @ Error::OutOfDescriptors { .. }) => format!("fds {e}"),
            Err(e @ Error::Probe { .. }) => format!("probe {e}"),
            Err(e @ Error::Exhausted { .. }) => format!("exhausted {e}"),
            Err(e) => format!("other {e:?}"),
        }
    }

    /// With no descriptor free, opens a registry before anything else: reports `FIRST
    /// <outcome>`. Then opens the registry with the real port probe, takes one port, uses up
    /// every descriptor the process may have and claims again: reports `RESULT <variant>
    /// <text>`.
    /// Then, leaving 0 to [`MOST_FREE`] descriptors free, claims with the open handle and,
    /// apart, opens a new handle and claims with it: reports each step as
    /// `STEP <free> <claim|open> <outcome>`. Then reports how many claims the registry
    /// counted as exhausted, and whether a claim works once descriptors are free again.
    pub fn starved_worker(path: &std::path::Path, range: std::ops::RangeInclusive<u16>) {
        let open = || {
            PortDaddy::builder()
                .path(path)
                .range(range.clone())
                .lock_timeout(Duration::from_secs(30))
                .open()
        };
        let before = soft_limit();
        // Before this process has opened anything or read its own identity.
        let fillers = leave_free(0);
        let first = open();
        set_limit(&before);
        drop(fillers);
        say(&format!("FIRST {}", outcome(&first)));
        drop(first);
        let registry = open().expect("worker: open");
        drop(registry.acquire("warm-up").expect("worker: first claim"));
        let fillers = use_up_descriptors();
        let result = registry.acquire("starved");
        set_limit(&before);
        drop(fillers);
        let line = match &result {
            Ok(guard) => format!("RESULT ok {}", guard.port()),
            Err(e @ Error::Probe { .. }) => format!("RESULT probe {e}"),
            Err(e @ Error::Exhausted { .. }) => format!("RESULT exhausted {e}"),
            Err(e) => format!("RESULT other {e:?}"),
        };
        drop(result);
        say(&line);
        for free in 0..=MOST_FREE {
            let fillers = leave_free(free);
            let claimed = registry.acquire(&format!("old-{free}"));
            set_limit(&before);
            drop(fillers);
            say(&format!("STEP {free} claim {}", outcome(&claimed)));
            drop(claimed);

            let fillers = leave_free(free);
            let opened =
                open().and_then(|new| new.acquire(&format!("new-{free}")).map(|g| (new, g)));
            set_limit(&before);
            drop(fillers);
            say(&format!("STEP {free} open {}", outcome(&opened)));
            drop(opened);
        }
        say(&format!(
            "EXHAUSTED {}",
            registry.stats().expect("worker: stats").exhausted
        ));
        match registry.acquire("fed") {
            Ok(_) => say("AFTER ok"),
            Err(e) => say(&format!("AFTER {e}")),
        }
    }

    /// Out of descriptors, whether with a handle already open or opening a new one, a claim
    /// either works or fails naming the cause (`EMFILE`), with every number of descriptors
    /// left free from none up; it never reports a full range or an unusable registry.
    #[test]
    fn out_of_descriptors_a_claim_reports_the_cause_not_a_full_range() {
        let (_dir, path) = temp_registry();
        let range = 32320..=32329;
        let mut worker = Worker::spawn("starved", "no-fds", &path, &range, &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = worker.expect_line("FIRST", deadline);
        eprintln!("{first}");
        assert!(
            first.starts_with("FIRST fds ") && first.contains("too many open files (EMFILE: "),
            "the first open, with no descriptor free: {first}"
        );
        let result = worker.expect_line("RESULT", deadline);
        assert!(
            result.starts_with("RESULT probe ")
                && result.contains("too many open files (EMFILE: ")
                && result.contains("os error 24")
                && result.contains("ulimit -n"),
            "{result}"
        );
        let mut opens_refused = 0;
        for free in 0..=MOST_FREE {
            for step in ["claim", "open"] {
                let line = worker.expect_line("STEP", deadline);
                let outcome = line
                    .strip_prefix(&format!("STEP {free} {step} "))
                    .unwrap_or_else(|| panic!("expected step {free} {step}: {line}"));
                eprintln!("{free} free, {step}: {outcome}");
                if outcome == "ok" {
                    continue;
                }
                assert!(
                    free < MOST_FREE,
                    "{MOST_FREE} free, {step} failed: {outcome}"
                );
                assert!(
                    outcome.starts_with("fds ") || outcome.starts_with("probe "),
                    "{free} free, {step}: {outcome}"
                );
                assert!(
                    outcome.contains("too many open files (EMFILE: ")
                        && outcome.contains("ulimit -n"),
                    "{free} free, {step}: the cause is not named: {outcome}"
                );
                if step == "open" && outcome.starts_with("fds ") {
                    opens_refused += 1;
                }
                if outcome.starts_with("fds ") {
                    assert!(outcome.contains("the registry itself is fine"), "{outcome}");
                }
            }
        }
        assert!(
            opens_refused > 0,
            "no limit kept a new handle from opening the registry"
        );
        assert_eq!(worker.expect_line("EXHAUSTED", deadline), "EXHAUSTED 0");
        assert_eq!(worker.expect_line("AFTER", deadline), "AFTER ok");
        let (_, status) = worker.finish(deadline);
        assert!(status.success(), "{}", worker.last_words());
    }
}

/// The command under a limit of `n` open files, for every `n` from 0 up until it succeeds
/// three times in a row: it succeeds, or exits with 5 naming the cause (`EMFILE`, and what
/// to do), whichever step ran out (the registry's lock file, the database, SQLite's `-wal`
/// or `-shm`, the owner lock file, the port probe); never with 3 (no free port) or 4 (an
/// unusable registry).
///
/// One exception, which no code of ours can change: under the lowest limits the program
/// never starts. `portdaddy` is dynamically linked, and before its first instruction runs
/// the dynamic loader must open its shared libraries (`libgcc_s`, `libc`, …); with no
/// descriptor free beside stdin, stdout and stderr, the loader cannot, prints
/// "error while loading shared libraries: …: cannot open shared object file: Error 24"
/// (24 is `EMFILE`) and exits with 127 itself. So for those limits the test asserts
/// exactly that: exit 127 with the loader's message naming errno 24, only below every
/// limit at which the program ran.
#[cfg(all(unix, feature = "cli"))]
#[test]
fn out_of_descriptors_the_command_exits_5_naming_the_cause_never_3() {
    use std::os::unix::process::CommandExt;

    let (_dir, path) = temp_registry();
    // Create the registry unhindered first.
    let first = command::run(&path, &["acquire", "setup", "--ttl", "1h"]);
    assert!(first.status.success(), "{}", command::text(&first.stderr));
    let mut loader_failures = 0;
    let mut named = Vec::new();
    let mut successes_in_a_row = 0;
    let mut n = 0u64;
    while successes_in_a_row < 3 {
        assert!(
            n <= 256,
            "the command never succeeded three times in a row up to {n}"
        );
        let mut cmd = command::portdaddy(&path, &["acquire", "starved", "--ttl", "1h"]);
        // SAFETY: between fork and exec the closure only calls setrlimit, which is
        // async-signal-safe, on a value on its own stack.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: n as libc::rlim_t,
                    rlim_max: n as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().expect("run portdaddy");
        let stderr = command::text(&out.stderr);
        let code = out.status.code();
        eprintln!("limit {n}: exit {code:?}: {}", stderr.trim_end());
        match code {
            Some(127) => {
                assert!(
                    stderr.contains("error while loading shared libraries")
                        && (stderr.contains("Error 24") || stderr.contains("Too many open files")),
                    "limit {n}: exit 127 but not the loader out of descriptors: {stderr}"
                );
                assert!(
                    named.is_empty() && successes_in_a_row == 0,
                    "limit {n}: the loader failed above a limit at which portdaddy ran"
                );
                loader_failures += 1;
            }
            Some(5) => {
                assert!(
                    stderr.contains("too many open files (EMFILE: ")
                        && stderr.contains("os error 24")
                        && stderr.contains("ulimit -n"),
                    "limit {n}: exit 5 without naming the cause: {stderr}"
                );
                named.push(n);
                successes_in_a_row = 0;
            }
            Some(0) => {
                let port: u16 = command::text(&out.stdout)
                    .trim()
                    .parse()
                    .expect("the port on stdout");
                let release = command::run(&path, &["release", &port.to_string()]);
                assert!(release.status.success(), "{}", command::text(&release.stderr));
                successes_in_a_row += 1;
            }
            _ => panic!("limit {n}: exit {code:?} (3 would be a full range, 4 an unusable registry): {stderr}"),
        }
        n += 1;
    }
    eprintln!("loader failed under {loader_failures} limits; cause named under {named:?}");
    assert!(
        !named.is_empty(),
        "no limit made portdaddy itself run out of descriptors"
    );
}

// ---------------------------------------------------------------------------------------
// fork while another thread is inside a claim

/// A multi-threaded process whose claiming thread runs claims without pause forks eight
/// children; each child calls `portdaddy::acquire` and opens a new handle with a 30 s lock
/// timeout, and must get `Error::ForkedHandle` from both at once (well within 10 s), while
/// the parent's claims go on.
#[cfg(target_os = "linux")]
#[test]
fn forked_children_of_a_claiming_process_fail_at_once_and_never_block_it() {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    const CHILDREN: usize = 8;
    let (_dir, path) = temp_registry();
    // The default registry of `portdaddy::acquire` in the children is this one too.
    std::env::set_var(portdaddy::ENV_VAR, &path);
    let open = {
        let path = path.clone();
        move |range: std::ops::RangeInclusive<u16>| {
            PortDaddy::builder()
                .path(&path)
                .range(range)
                .lock_timeout(Duration::from_secs(30))
                .open()
        }
    };
    let registry = open(32340..=32349).unwrap();
    let claims = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let claimer = std::thread::spawn({
        let (registry, claims, stop) = (registry.clone(), claims.clone(), stop.clone());
        move || -> Result<(), Error> {
            while !stop.load(Ordering::SeqCst) {
                drop(registry.acquire("parent")?);
                claims.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
    });
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read_fd, write_fd) = (fds[0], fds[1]);

    /// Kills and reaps the children still listed, should the test fail before they exit.
    struct Children(Vec<libc::pid_t>);
    impl Drop for Children {
        fn drop(&mut self) {
            for pid in self.0.drain(..) {
                let mut status = 0;
                // SAFETY: plain syscalls on our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
            }
        }
    }
    let mut children = Vec::new();
    let mut cleanup = Children(Vec::new());
    let started = Instant::now();
    for i in 0..CHILDREN {
        // Fork while the claimer is busy: wait for it to start one more claim.
        let seen = claims.load(Ordering::SeqCst);
        while claims.load(Ordering::SeqCst) == seen {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the claimer stalled"
            );
            std::thread::yield_now();
        }
        // SAFETY: the child does only what the test is about (two portdaddy calls, one
        // write to a pipe) and leaves with `_exit`, running no destructors.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let verdict = |r: Result<portdaddy::PortGuard, Error>| match r {
                Err(Error::ForkedHandle { .. }) => b'F',
                Ok(_) => b'O',
                Err(_) => b'E',
            };
            let by_acquire = verdict(portdaddy::acquire("child"));
            let by_handle = verdict(open(32350..=32359).and_then(|r| r.acquire("child")));
            let report = [i as u8, by_acquire, by_handle];
            // SAFETY: writes three bytes (less than PIPE_BUF: one atomic write) from a live
            // array, then ends the child at once.
            unsafe {
                libc::write(write_fd, report.as_ptr().cast(), report.len());
                libc::_exit(0);
            }
        }
        assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
        children.push((pid, Instant::now()));
        cleanup.0.push(pid);
    }
    // SAFETY: the parent's copy of the write end is no longer needed; the read end becomes
    // a File owned here.
    let mut reports = unsafe {
        libc::close(write_fd);
        std::fs::File::from_raw_fd(read_fd)
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut report = [0u8; 3];
        while reports.read_exact(&mut report).is_ok() {
            let _ = tx.send(report);
        }
    });
    let mut answered = [false; CHILDREN];
    for _ in 0..CHILDREN {
        let report = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every child reports within 10 s");
        let (i, by_acquire, by_handle) = (usize::from(report[0]), report[1], report[2]);
        assert!(
            children[i].1.elapsed() < Duration::from_secs(10),
            "child {i} took {:?}",
            children[i].1.elapsed()
        );
        assert_eq!(
            (by_acquire as char, by_handle as char),
            ('F', 'F'),
            "child {i}: acquire and a new handle must fail with ForkedHandle"
        );
        answered[i] = true;
    }
    assert!(answered.iter().all(|a| *a));
    for (pid, _) in &children {
        let mut status = 0;
        // SAFETY: reaps our own child, which has reported and exits.
        assert_eq!(unsafe { libc::waitpid(*pid, &mut status, 0) }, *pid);
        cleanup.0.retain(|p| p != pid);
    }
    // The parent was never blocked: its claims go on.
    let after = claims.load(Ordering::SeqCst);
    let give_up = Instant::now() + Duration::from_secs(10);
    while claims.load(Ordering::SeqCst) < after + 20 {
        assert!(Instant::now() < give_up, "the parent's claims stalled");
        std::thread::yield_now();
    }
    stop.store(true, Ordering::SeqCst);
    claimer
        .join()
        .unwrap()
        .expect("every claim of the parent succeeded");
}

// ---------------------------------------------------------------------------------------
// Clocks that were wrong when a lease was stamped

mod clocks {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR: Duration = Duration::from_secs(3600);

    /// A file registry on `path` whose clock is `offset` ahead of `clock`.
    fn ahead(path: &std::path::Path, clock: &FakeClock, offset: Duration) -> PortDaddy {
        let now = clock.as_fn();
        PortDaddy::builder()
            .path(path)
            .range(32360..=32369)
            .port_probe(all_free)
            .clock(move || now() + offset)
            .open()
            .unwrap()
    }

    #[test]
    fn a_ttl_lease_stamped_by_a_clock_far_ahead_lives_its_ttl_from_when_a_reap_meets_it() {
        let (_dir, path) = temp_registry();
        let clock = FakeClock::new();
        // A machine whose clock was 1000 days ahead until NTP corrected it.
        let wrong = ahead(&path, &clock, 1000 * DAY);
        let right = file_at(&path, 32360..=32369, &clock);
        let stamped = wrong
            .acquire_with(&Request::new("job").ttl(HOUR))
            .unwrap()
            .keep()
            .unwrap();
        let now = clock.as_fn()();
        assert!(stamped.acquired_at() > now + 999 * DAY);

        assert_eq!(
            right.reap().unwrap(),
            0,
            "not expired: its TTL has not passed"
        );
        let listed = right.list().unwrap();
        assert_eq!(listed.len(), 1);
        let lease = &listed[0];
        assert_eq!(lease.id(), stamped.id());
        assert!(
            lease.acquired_at() <= now && now - Duration::from_millis(1) < lease.acquired_at(),
            "started again now: {:?}",
            lease.acquired_at()
        );
        assert_eq!(
            lease
                .expires_at()
                .unwrap()
                .duration_since(lease.acquired_at())
                .unwrap(),
            HOUR,
            "kept its TTL"
        );
        clock.advance(HOUR - Duration::from_secs(1));
        assert_eq!(right.reap().unwrap(), 0);
        clock.advance(Duration::from_secs(2));
        assert_eq!(right.reap().unwrap(), 1, "expired an hour after it was met");
    }

    #[test]
    fn a_claim_that_meets_a_lease_stamped_ahead_clamps_it() {
        let (_dir, path) = temp_registry();
        let clock = FakeClock::new();
        let wrong = ahead(&path, &clock, 3650 * DAY);
        let right = file_at(&path, 32360..=32369, &clock);
        let _kept = wrong
            .acquire_with(&Request::new("job").require(32361).ttl(HOUR))
            .unwrap()
            .keep()
            .unwrap();
        // The claim meets the lease on its preferred port, finds it live, takes another port.
        let other = right
            .acquire_with(&Request::new("other").preferred(32361))
            .unwrap();
        assert_ne!(other.port(), 32361);
        let lease = right
            .list()
            .unwrap()
            .into_iter()
            .find(|l| l.port() == 32361)
            .unwrap();
        assert!(lease.acquired_at() <= clock.as_fn()(), "{lease:?}");
        clock.advance(HOUR);
        let guard = right
            .acquire_with(&Request::new("other").require(32361))
            .expect("the clamped lease expired after its TTL");
        assert_eq!(guard.port(), 32361);
    }

    #[test]
    fn a_lease_without_ttl_stamped_ahead_keeps_its_times() {
        let (_dir, path) = temp_registry();
        let clock = FakeClock::new();
        let wrong = ahead(&path, &clock, 10 * DAY);
        let right = file_at(&path, 32360..=32369, &clock);
        let guard = wrong.acquire("owned").unwrap();
        assert_eq!(right.reap().unwrap(), 0);
        assert_eq!(right.list().unwrap(), [guard.lease().clone()]);
    }

    #[test]
    fn a_lease_stamped_before_1970_keeps_its_real_times() {
        let (_dir, path) = temp_registry();
        let before_1970 = PortDaddy::builder()
            .path(&path)
            .range(32360..=32369)
            .port_probe(all_free)
            .clock(|| UNIX_EPOCH - 10 * DAY)
            .open()
            .unwrap();
        let lease = before_1970
            .acquire_with(&Request::new("old").ttl(HOUR))
            .unwrap()
            .keep()
            .unwrap();
        let listed = before_1970.list().unwrap().remove(0);
        assert_eq!(listed.acquired_at(), UNIX_EPOCH - 10 * DAY);
        assert_eq!(listed.expires_at(), Some(UNIX_EPOCH - 10 * DAY + HOUR));
        assert_eq!(listed, lease);
        // Judged by a clock in the present, its TTL has long passed.
        let now = file_at(&path, 32360..=32369, &FakeClock::new());
        assert!(SystemTime::now() > UNIX_EPOCH);
        assert_eq!(now.reap().unwrap(), 1);
    }

    #[cfg(feature = "cli")]
    #[test]
    fn the_command_lists_times_before_1970_instead_of_null() {
        let (_dir, path) = temp_registry();
        let before_1970 = PortDaddy::builder()
            .path(&path)
            .range(32360..=32369)
            .port_probe(all_free)
            // 1969-12-22T00:00:00Z
            .clock(|| UNIX_EPOCH - 10 * DAY)
            .open()
            .unwrap();
        before_1970
            .acquire_with(&Request::new("old").ttl(HOUR))
            .unwrap()
            .keep()
            .unwrap();
        let out = command::run(&path, &["list", "--all", "--json"]);
        assert!(out.status.success(), "{}", command::text(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json[0]["acquired_at"], "1969-12-22T00:00:00Z", "{json}");
        assert_eq!(json[0]["expires_at"], "1969-12-22T01:00:00Z", "{json}");
    }
}
