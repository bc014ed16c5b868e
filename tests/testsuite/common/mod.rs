//! Helpers shared by the integration tests.
//!
//! Tests that bind real ports use a block of ports of their own, so that test files running
//! at the same time (nextest runs each test in its own process) never probe each other's
//! ports:
//!
//! | file                | ports         |
//! |---------------------|---------------|
//! | api.rs              | 23000-23499   |
//! | logging.rs          | 23000-23499, shared with api.rs; binds and probes no port |
//! | bad_input.rs        | 23500-23999   |
//! | processes.rs        | 24000-24999   |
//! | model.rs            | 25000-25499   |
//! | cli.rs              | 26000-26499, 32530-32549 |
//! | faults.rs           | 26500-26899   |
//! | hostile.rs          | 26900-26949   |
//! | hostile_cli.rs      | 26950-26999, 32400-32449, 32560-32569 |
//! | inspection.rs       | 27000-27499   |
//! | examples/load.rs    | 28000-29999   |
//! | blocks.rs           | 30000-30499   |
//! | handover.rs         | 30500-30999   |
//! | nextest_fixture.rs  | 31000-31499 (and `examples/nextest_fixture.rs`) |
//! | examples/soak.rs    | 31500-31999 (not run in CI) |
//! | liveness.rs         | 32000-32099   |
//! | registry_files.rs   | 32100-32199, 32450-32499 |
//! | replaced.rs         | 32200-32299, 32500-32529 |
//! | limits.rs           | 32300-32399   |
//! | format.rs           | 32600-32649; binds and probes no port |
//! | api_freeze.rs       | 32650-32699   |
//! | sys.rs              | 32700-32749   |
//! | cli_first.rs        | 32750-32799   |
//! | reserved.rs         | 32800-32849   |
//! | cli_tools.rs        | 32850-32949   |
//! | durability.rs       | 32950-32999   |
//! | claim_speed.rs      | 33000-33099   |
//! | freeze_attack.rs    | 33100-33149; binds and probes no port |
//! | daily_attack.rs     | 33150-33199   |
//! | creation.rs         | 33200-33249; binds and probes no port |
//! | open_cost.rs        | 33250-33299   |
//! | contention.rs       | 33300-33349; binds and probes no port |
//! | create_attack.rs    | 33350-33399; binds and probes no port |
//! | small_blocks.rs     | 33400-33449   |
//! | default_registry.rs | the default range (15000-32767 on a stock Linux); one port |
//! | other examples      | the default range (15000-32767 on a stock Linux), in temp registries or the per-user default one; CI runs them before the tests |
//! | benches             | 40000-59999 (and `examples/new_names.rs`: 42000-55999; not run in CI) |
#![allow(dead_code)]

/// The full name of the test `$name` in the calling module, as the test harness selects it
/// (`registry_files::default_path_entry`), for running this binary again with that one test.
macro_rules! sibling_test {
    ($name:expr) => {
        format!(
            "{}::{}",
            module_path!()
                .split_once("::")
                .map_or(module_path!(), |(_, module)| module),
            $name
        )
    };
}

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(target_os = "linux")]
pub mod held;
#[cfg(unix)]
pub mod users;
#[cfg(unix)]
pub mod workers;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use portdaddy::{Owner, PortDaddy};

/// A registry path in a fresh temporary directory (removed when the `TempDir` drops).
pub fn temp_registry() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let path = dir.path().join("registry.sqlite3");
    (dir, path)
}

/// `error`'s message followed by each of its causes, `msg: cause: cause`, as an error-chain
/// printer shows it: the library's messages do not repeat their causes.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A port probe that says every port is free (for tests that never bind).
pub fn all_free(_port: u16, _protocol: portdaddy::Protocol) -> bool {
    true
}

/// A clock that only moves when told to.
#[derive(Clone)]
pub struct FakeClock(Arc<Mutex<SystemTime>>);

impl FakeClock {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )))
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }

    pub fn as_fn(&self) -> impl Fn() -> SystemTime + Send + Sync + 'static {
        let inner = self.0.clone();
        move || *inner.lock().unwrap()
    }
}

/// A fake process table: owners are alive until killed.
#[derive(Clone, Default)]
pub struct FakeProcesses(Arc<Mutex<Vec<Owner>>>);

impl FakeProcesses {
    /// A new fake process with a pid no real process has.
    pub fn spawn(&self, pid: u32) -> Owner {
        let owner = Owner::new(pid, 1000 + u64::from(pid), "fake-boot");
        self.0.lock().unwrap().push(owner.clone());
        owner
    }

    pub fn kill(&self, owner: &Owner) {
        self.0.lock().unwrap().retain(|o| o != owner);
    }

    pub fn probe(&self) -> impl Fn(&Owner) -> bool + Send + Sync + 'static {
        let table = self.0.clone();
        move |owner: &Owner| table.lock().unwrap().contains(owner)
    }
}

/// A switch a test flips to make a probe answer differently.
pub fn flag(initial: bool) -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(initial))
}

pub fn get(flag: &AtomicBool) -> bool {
    flag.load(Ordering::SeqCst)
}

/// An in-memory registry over `range` whose port probe says every port is free.
pub fn memory(range: std::ops::RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .in_memory()
        .range(range)
        .port_probe(all_free)
        .open()
        .expect("open")
}

/// An in-memory registry over `range` whose owners live and die in `procs`, and whose port
/// probe says every port is free.
pub fn memory_with(range: std::ops::RangeInclusive<u16>, procs: &FakeProcesses) -> PortDaddy {
    PortDaddy::builder()
        .in_memory()
        .range(range)
        .port_probe(all_free)
        .process_probe(procs.probe())
        .open()
        .expect("open")
}

/// An in-memory registry over `range` that tells time by `clock`, and whose port probe says
/// every port is free.
pub fn memory_at(range: std::ops::RangeInclusive<u16>, clock: &FakeClock) -> PortDaddy {
    PortDaddy::builder()
        .in_memory()
        .range(range)
        .port_probe(all_free)
        .clock(clock.as_fn())
        .open()
        .expect("open")
}

/// `<path><suffix>`, as SQLite and portdaddy name the files beside a registry (`-wal`,
/// `-shm`, `.lock`, `.owners`).
pub fn sibling(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Runs `f` with a subscriber for this thread only and returns what it logged at `level`
/// and above, without colours.
pub fn logs_at(level: tracing::Level, f: impl FnOnce()) -> String {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Arc::default());
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(level)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = sink.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

/// Waits until the file clock of the directory holding `path` has moved past the last change
/// of `path` (its `ctime`): a file written beside it from then on gets a later time, as it
/// would not within one tick of a coarse clock (Linux before 6.13). Writes a scratch file
/// beside `path` until its time is later, and removes it. Panics after 5 seconds.
#[cfg(unix)]
pub fn wait_for_file_clock_past(path: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let changed = |p: &std::path::Path| {
        let meta = std::fs::metadata(p).unwrap();
        (meta.ctime(), meta.ctime_nsec())
    };
    let last = changed(path);
    let scratch = sibling(path, ".clock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        std::fs::write(&scratch, b"tick").unwrap();
        if changed(&scratch) > last {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the file clock did not move past {last:?} in 5 s"
        );
    }
    std::fs::remove_file(&scratch).unwrap();
}

/// Copies the write-ahead log of the registry at `path` into its file and removes `-wal` and
/// `-shm`, as a plain SQLite client closing last does (portdaddy's connections leave them
/// in place): for tests that need every lease in the file itself. No handle may be open.
pub fn fold_wal(path: &std::path::Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    conn.close().unwrap();
    assert!(
        !sibling(path, "-wal").exists(),
        "the write-ahead log is still there"
    );
}

/// Whether this process runs as root, which ignores permission bits.
#[cfg(unix)]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `PRAGMA integrity_check` of the file at `path`, opened by plain SQLite: `"ok"` when intact.
pub fn integrity_check(path: &std::path::Path) -> String {
    let conn = rusqlite::Connection::open(path).expect("open with SQLite");
    let rows: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows.join("; ")
}

/// The first schema, as the first release wrote it (migration 1; migrations are append-only,
/// so this text never changes). Pinned here rather than taken from the crate: a test of an
/// old format must not be built by the code it tests.
pub const SCHEMA_V1: &str = "CREATE TABLE leases (
        id          INTEGER PRIMARY KEY,
        port        INTEGER NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
        name        TEXT    NOT NULL,
        protocol    INTEGER NOT NULL,
        owner_pid   INTEGER,
        owner_start INTEGER,
        owner_boot  TEXT,
        acquired_at INTEGER NOT NULL,
        expires_at  INTEGER
    ) STRICT;
    CREATE TABLE names (
        name    TEXT PRIMARY KEY,
        port    INTEGER NOT NULL,
        used_at INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX names_port ON names (port);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;";

/// Makes `command` run its program through `wrapper`: `wrapper ARGS… -- PROGRAM ITS-ARGS…`.
pub fn run_through<S: AsRef<std::ffi::OsStr>>(
    command: &mut std::process::Command,
    wrapper: impl AsRef<std::ffi::OsStr>,
    args: impl IntoIterator<Item = S>,
) {
    let program = command.get_program().to_owned();
    let own: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let mut wrapped = std::process::Command::new(wrapper);
    wrapped.args(args).arg("--").arg(program).args(own);
    *command = wrapped;
}

/// Makes `command` run its program in a new PID namespace (with its own `/proc`) as the
/// namespace's first process; killing `unshare` kills it.
pub fn in_new_pid_namespace(command: &mut std::process::Command) {
    run_through(
        command,
        "unshare",
        ["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"],
    );
}

/// Kills the process with this pid (one the test started) when dropped.
#[cfg(unix)]
pub struct KillOnDrop(pub u32);

#[cfg(unix)]
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: a plain syscall; the pid is one this test started.
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Opens the registry at `path` over `range` with the real port and process probes.
pub fn open_probing(path: &std::path::Path, range: &std::ops::RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(range.clone())
        .open()
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Opens the registry at `path` over `range` with a port probe that says every port is free,
/// so that only the registry keeps its users apart.
pub fn open_unprobed(path: &std::path::Path, range: &std::ops::RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(range.clone())
        .port_probe(all_free)
        .open()
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}
