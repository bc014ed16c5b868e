//! A registry that does not exist yet is made whole before anyone can see it: built aside,
//! synced once, renamed into place without replacing anything (see `RELIABILITY.md`, "A new
//! registry"). These tests create registries from real processes, race them, kill them at
//! the worst moments, and create on a hostile host.
//!
//! # Stopping a process at a named point
//!
//! A creator is stopped where it gives its file the registry's name (`linkat` of its
//! unnamed file on Linux, `renameat2` of a named one elsewhere) with `strace -e
//! inject=linkat,renameat2:delay_enter=…` (before it) or `delay_exit=…` (right after it):
//! the process stays in the system call until the test kills it, or kills `strace`, which
//! lets it go on. Where `strace` is missing those tests skip.
//!
//! # Workers
//!
//! A worker is this binary run again with `creation::worker_entry` selected (see
//! `common::workers`): it says `PID <pid>`, waits for a line on stdin, opens the registry,
//! leases one port and keeps it, and says `PORT <port>` or `ERR <variant> <message>`.
//!
//! # Ports
//!
//! This file owns 33200-33249 (see `common/mod.rs`); the port probe says every port is
//! free, so that only the registry keeps the workers apart, and no port is bound.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::ops::RangeInclusive;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;
use crate::common::held::{
    create_and_say, deadline, expect_pid, in_syscall, names_in, on_small_tmpfs, small_tmpfs_dir,
    started, strace, under_strace, wait_until, DEADLINE, NOBODY,
};
use crate::common::workers::{parse_range, say, var, Worker, MODE, RANGE, REGISTRY};

const RANGE_USED: RangeInclusive<u16> = 33200..=33249;

// ---------------------------------------------------------------------------------------------
// A registry created by one process, and by several at once
// ---------------------------------------------------------------------------------------------

#[test]
fn a_registry_created_by_one_process_is_complete_and_usable_by_others() {
    let (_dir, path) = common::temp_registry();
    let mut creator = spawn_creator("creator", &path, |_| {});
    creator.send("go");
    let port = expect_port(&mut creator);
    assert_complete(&path);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(leftovers(&path), Vec::<OsString>::new());
    // Another process uses it: sees the creator's lease, and leases another port.
    let mut user = spawn_creator("user", &path, |_| {});
    user.send("go");
    let other = expect_port(&mut user);
    assert_ne!(port, other);
    let registry = common::open_unprobed(&path, &RANGE_USED);
    let ports: BTreeSet<u16> = registry.list().unwrap().iter().map(|l| l.port()).collect();
    assert_eq!(ports, BTreeSet::from([port, other]));
}

/// Creating a registry syncs one file once (the image, before it is named), and the first
/// claim on it syncs nothing: the log's first commit skips SQLite's header sync. A process
/// that uses the registry afterwards syncs nothing either.
#[test]
fn creating_a_registry_syncs_once_and_claiming_on_it_never() {
    let Some(strace) = strace() else { return };
    let (dir, path) = common::temp_registry();
    let syncs = |name: &str| {
        let log = dir.path().join(format!("{name}.syncs"));
        let mut worker = spawn_creator(name, &path, |c| trace_syncs(c, &strace, &log));
        worker.send("go");
        expect_port(&mut worker);
        drop(worker);
        // strace writes each call as it returns: the claim above has returned.
        fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("sync("))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let created = syncs("creator");
    assert_eq!(created.len(), 1, "{created:#?}");
    assert!(created[0].contains("fdatasync("), "{created:#?}");
    assert_eq!(syncs("user"), Vec::<String>::new());
    // Last: a plain SQLite connection folds the log and removes it as it closes.
    assert_complete(&path);
}

#[test]
fn processes_racing_to_create_one_registry_end_up_with_one_and_distinct_ports() {
    const RACERS: usize = 6;
    for round in 0..3 {
        let (_dir, path) = common::temp_registry();
        let mut racers: Vec<Worker> = (0..RACERS)
            .map(|i| spawn_creator(format!("racer {round}/{i}"), &path, |_| {}))
            .collect();
        for racer in &mut racers {
            racer.send("go");
        }
        let ports: BTreeSet<u16> = racers.iter_mut().map(expect_port).collect();
        assert_eq!(ports.len(), RACERS, "round {round}: a port given twice");
        assert_complete(&path);
        assert_eq!(leftovers(&path), Vec::<OsString>::new(), "round {round}");
        let registry = common::open_unprobed(&path, &RANGE_USED);
        let listed: BTreeSet<u16> = registry.list().unwrap().iter().map(|l| l.port()).collect();
        assert_eq!(
            listed, ports,
            "round {round}: one registry holds every lease"
        );
    }
}

/// An older version creates a registry under the same write lock: while it holds the lock,
/// a creator of this version waits and creates nothing, and then finds and uses what the
/// older one made (here an empty file, its first step, which an older version that died
/// leaves too).
#[test]
fn a_creator_waits_for_an_older_version_creating_under_the_lock_and_uses_its_file() {
    let (_dir, path) = common::temp_registry();
    let real = fs::canonicalize(path.parent().unwrap())
        .unwrap()
        .join("registry.sqlite3");
    let lock = {
        let mut options = fs::OpenOptions::new();
        options.read(true).write(true).create_new(true).mode(0o600);
        options.open(common::sibling(&real, ".lock")).unwrap()
    };
    lock.lock().unwrap();
    let mut creator = spawn_creator("creator", &path, |_| {});
    let pid = expect_pid(&creator);
    creator.send("go");
    wait_until("the creator waits for the lock", || {
        in_syscall(pid, libc::SYS_flock)
    });
    assert!(!path.exists(), "a registry appeared under another's lock");
    assert_eq!(leftovers(&path), Vec::<OsString>::new());
    // What an older version does first, under the lock.
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true).mode(0o600);
        options.open(&real).unwrap();
    }
    lock.unlock().unwrap();
    let port = expect_port(&mut creator);
    assert_complete(&path);
    let registry = common::open_unprobed(&path, &RANGE_USED);
    let listed: Vec<u16> = registry.list().unwrap().iter().map(|l| l.port()).collect();
    assert_eq!(listed, [port]);
}

// ---------------------------------------------------------------------------------------------
// Killed at the worst moments
// ---------------------------------------------------------------------------------------------

#[test]
fn a_creator_killed_before_its_rename_leaves_no_registry_and_the_next_cleans_up() {
    let Some(strace) = strace() else { return };
    let (_dir, path) = common::temp_registry();
    let (mut creator, pid) = stopped_at_rename(&path, &strace);
    // Its file, written and synced: unnamed (on Linux), or named and left behind.
    let left = leftovers(&path);
    assert!(left.len() <= 1, "{left:?}");
    kill(pid);
    // Then strace, which does not always notice.
    creator.kill();
    assert!(!path.exists(), "a registry appeared without the rename");
    assert_eq!(
        leftovers(&path),
        left,
        "a named file stays until the next creation"
    );
    let mut expected: BTreeSet<OsString> = left.iter().cloned().collect();
    expected.insert("registry.sqlite3.lock".into());
    assert_eq!(names_in(path.parent().unwrap()), expected);

    let mut next = spawn_creator("next", &path, |_| {});
    next.send("go");
    expect_port(&mut next);
    assert_complete(&path);
    assert_eq!(
        leftovers(&path),
        Vec::<OsString>::new(),
        "the next creation removes what the killed one left"
    );
}

#[test]
fn a_creator_killed_right_after_its_rename_leaves_a_complete_registry_for_the_next() {
    let Some(strace) = strace() else { return };
    let (_dir, path) = common::temp_registry();
    let mut creator = spawn_creator("creator", &path, |c| {
        stop_at_rename(c, &strace, "delay_exit")
    });
    let pid = expect_pid(&creator);
    creator.send("go");
    wait_until("the creator's rename is done", || path.exists());
    kill(pid);
    creator.kill();
    assert_complete(&path);
    assert_eq!(leftovers(&path), Vec::<OsString>::new());

    let mut next = spawn_creator("next", &path, |_| {});
    next.send("go");
    let port = expect_port(&mut next);
    let registry = common::open_unprobed(&path, &RANGE_USED);
    let listed: Vec<u16> = registry.list().unwrap().iter().map(|l| l.port()).collect();
    assert_eq!(listed, [port]);
}

// ---------------------------------------------------------------------------------------------
// A hostile host
// ---------------------------------------------------------------------------------------------

/// Files of our naming pattern that are not provably ours (a symbolic link, another user's
/// file, a file others may write) are neither followed nor removed; the registry is created
/// beside them, in a sticky directory open to every user as `/tmp` is. (On Linux the
/// registry is created through an unnamed file, which removes no leftovers at all; the
/// rules of the named way are held by `store::sqlite::create`'s unit tests.)
#[test]
fn planted_files_of_our_naming_pattern_are_left_alone_in_a_sticky_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sticky");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let path = dir.join("registry.sqlite3");
    let target = tmp.path().join("target");
    let link = common::sibling(&path, ".~link00");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let open_to_all = common::sibling(&path, ".~open00");
    fs::write(&open_to_all, b"planted").unwrap();
    fs::set_permissions(&open_to_all, fs::Permissions::from_mode(0o666)).unwrap();
    // Another user's file, where this process may give one away.
    let others = common::sibling(&path, ".~other0");
    if common::is_root() {
        fs::write(&others, b"planted").unwrap();
        fs::set_permissions(&others, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&others, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let before = leftovers(&path);
    assert_eq!(before.len(), if common::is_root() { 3 } else { 2 });

    let mut creator = spawn_creator("creator", &path, |_| {});
    creator.send("go");
    expect_port(&mut creator);
    assert_complete(&path);
    assert_eq!(leftovers(&path), before, "a planted file was removed");
    assert!(!target.exists(), "a planted link was followed");
    assert_eq!(fs::read(&open_to_all).unwrap(), b"planted");
    if common::is_root() {
        assert_eq!(fs::read(&others).unwrap(), b"planted");
    }
}

#[test]
fn creating_in_a_read_only_directory_is_an_open_error_and_leaves_nothing() {
    if !common::is_root() {
        println!("skipped: needs root to run a worker as another user");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("read-only");
    fs::create_dir(&dir).unwrap();
    let path = dir.join("registry.sqlite3");
    // The lock file is there (a registry deleted before, say), so that the open gets as far
    // as creating the registry.
    fs::write(common::sibling(&path, ".lock"), b"").unwrap();
    fs::set_permissions(
        common::sibling(&path, ".lock"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    for file in [dir.clone(), common::sibling(&path, ".lock")] {
        std::os::unix::fs::chown(&file, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
    let before = names_in(&dir);

    let mut creator = spawn_creator("read-only creator", &path, as_nobody);
    if creator
        .lines
        .recv_timeout(DEADLINE)
        .map_or(true, |l| !l.starts_with("PID "))
    {
        let (_, status) = creator.finish(deadline());
        println!("skipped: the test binary cannot run as uid {NOBODY} here: {status}");
        return;
    }
    creator.send("go");
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Open "), "{result}");
    assert!(result.contains(&path.display().to_string()), "{result}");
    assert!(result.contains("ermission denied"), "{result}");
    assert_eq!(names_in(&dir), before, "files appeared or went");
}

/// A filesystem with too little room for the new registry: a typed error, and nothing left
/// but the lock file. A small `tmpfs` mounted in a mount namespace of the worker's own.
#[test]
fn creating_on_a_full_filesystem_is_an_open_error_and_leaves_nothing() {
    let Some((_tmp, dir, path)) = small_tmpfs_dir() else {
        return;
    };
    let mut creator = spawn_creator(
        "creator on a full tmpfs",
        &path,
        on_small_tmpfs(SMALL_TMPFS, &dir),
    );
    if !started(&creator) {
        return;
    }
    creator.send("go");
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Open "), "{result}");
    assert!(result.contains("No space left"), "{result}");
    let listing = creator.expect_line("a listing", deadline());
    assert_eq!(listing, "LEFT registry.sqlite3.lock");
}

/// The registry's directory removed while the creator is about to rename its file into it:
/// a typed error, and nothing created anywhere.
#[test]
fn the_directory_removed_before_the_rename_is_an_open_error() {
    let Some(strace) = strace() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("going");
    fs::create_dir(&dir).unwrap();
    let path = dir.join("registry.sqlite3");
    let (creator, _) = stopped_at_rename(&path, &strace);
    fs::remove_dir_all(&dir).unwrap();
    // Killing strace lets the creator go on with its rename.
    creator.signal(libc::SIGKILL);
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Open "), "{result}");
    assert!(result.contains("No such file"), "{result}");
    assert!(!dir.exists(), "the directory came back");
    assert_eq!(names_in(tmp.path()), BTreeSet::new());
}

/// A file put at the registry's path by something that does not take the write lock, while
/// the creator is about to name its own: that file wins, is refused as what it is, and is
/// left exactly as it was; the creator leaves nothing of its own.
#[test]
fn a_file_planted_at_the_path_before_the_rename_wins_and_is_left_untouched() {
    let Some(strace) = strace() else { return };
    let (_dir, path) = common::temp_registry();
    let (creator, _) = stopped_at_rename(&path, &strace);
    fs::write(&path, b"planted, not a registry").unwrap();
    creator.signal(libc::SIGKILL);
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Corrupt "), "{result}");
    assert_eq!(fs::read(&path).unwrap(), b"planted, not a registry");
    assert_eq!(
        names_in(path.parent().unwrap()),
        BTreeSet::from(["registry.sqlite3".into(), "registry.sqlite3.lock".into()])
    );
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
        "create" => create_worker(&path, &range),
        other => panic!("unknown worker mode {other:?}"),
    }
}

/// Where a worker mounts a small tmpfs first, in its own mount namespace.
const SMALL_TMPFS: &str = "PORTDADDY_CREATION_SMALL_TMPFS";

/// Creates or uses the registry as `held::create_and_say` does; on a small tmpfs it then
/// lists what is left in the registry's directory: `LEFT <names>`.
fn create_worker(path: &Path, range: &RangeInclusive<u16>) {
    if let Some(Some(dir)) = create_and_say(path, range, SMALL_TMPFS, "8k") {
        let names: Vec<String> = names_in(&dir)
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        say(&format!("LEFT {}", names.join(" ")));
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn spawn_creator(
    label: impl Into<String>,
    path: &Path,
    adjust: impl FnOnce(&mut Command),
) -> Worker {
    Worker::spawn_with(label, "create", path, &RANGE_USED, &[], adjust)
}

/// The port of a worker's `PORT <port>` line, after its `PID` line; the worker then exits.
fn expect_port(worker: &mut Worker) -> u16 {
    let mut line = worker.expect_line("PORT", deadline());
    if line.starts_with("PID ") {
        line = worker.expect_line("PORT", deadline());
    }
    let port = line
        .strip_prefix("PORT ")
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{}: expected PORT <port>, got {line:?}; stderr:\n{}",
                worker.label,
                worker.stderr()
            )
        });
    let (_, status) = worker.finish(deadline());
    assert!(status.success(), "{}: {status}", worker.label);
    port
}

/// The registry at `path` is whole: SQLite's header says WAL mode, the database is intact,
/// and it carries our application id and the schema version of a registry made by an open.
fn assert_complete(path: &Path) {
    let header = fs::read(path).unwrap();
    assert!(header.len() >= 100, "{} bytes", header.len());
    assert_eq!(&header[..16], b"SQLite format 3\0");
    assert_eq!((header[18], header[19]), (2, 2), "WAL mode in the header");
    assert_eq!(common::integrity_check(path), "ok");
    let conn = rusqlite::Connection::open(path).unwrap();
    let pragma = |name: &str| -> i64 { conn.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
    assert_eq!(pragma("application_id"), 0x5074_4479, "ours");
    assert_eq!(pragma("user_version"), current_schema());
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'
             AND name IN ('leases', 'names', 'meta', 'reserved')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 4);
}

/// The schema version this build gives a registry, as an open of an empty file leaves it.
fn current_schema() -> i64 {
    let (_dir, path) = common::temp_registry();
    fs::write(&path, b"").unwrap();
    drop(common::open_unprobed(&path, &RANGE_USED));
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// The files of our naming pattern beside the registry at `path` (`<name>.~` and six
/// characters), sorted.
fn leftovers(path: &Path) -> Vec<OsString> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut found: Vec<OsString> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| {
            n.to_string_lossy()
                .strip_prefix(&format!("{name}.~"))
                .is_some_and(|rest| rest.len() == 6)
        })
        .collect();
    found.sort();
    found
}

fn kill(pid: u32) {
    // SAFETY: a plain syscall on a process this test started.
    unsafe {
        libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGKILL);
    }
}

/// A creator of the registry at `path`, let go and held by `strace` just before the step
/// that names the new registry (see [`stop_at_rename`]), with its pid.
#[track_caller]
fn stopped_at_rename(path: &Path, strace: &Path) -> (Worker, u32) {
    let mut creator = spawn_creator("creator", path, |c| {
        stop_at_rename(c, strace, "delay_enter")
    });
    let pid = expect_pid(&creator);
    creator.send("go");
    wait_until("the creator stops at its rename", || at_rename(pid));
    (creator, pid)
}

/// Whether a thread of process `pid` is at the step that names the new registry.
fn at_rename(pid: u32) -> bool {
    in_syscall(pid, libc::SYS_linkat) || in_syscall(pid, libc::SYS_renameat2)
}

/// Runs `command` under `strace`, which holds each thread that names a file by `linkat` or
/// `renameat2` there for an hour: before it (`delay_enter`) or right after it
/// (`delay_exit`).
fn stop_at_rename(command: &mut Command, strace: &Path, when: &str) {
    let inject = format!("inject=linkat,renameat2:{when}=3600000000");
    under_strace(
        command,
        strace,
        None,
        ["-e", "trace=linkat,renameat2", "-e", &inject],
    );
}

/// Runs `command` under `strace`, which writes every call that syncs a file to `log`.
fn trace_syncs(command: &mut Command, strace: &Path, log: &Path) {
    let syncs = "trace=fsync,fdatasync,syncfs,sync,sync_file_range,msync";
    under_strace(command, strace, Some(log), ["-e", syncs]);
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
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
