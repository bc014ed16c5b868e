//! A registry deleted or replaced while holders keep handles open: the registry file, its
//! whole directory, only the main file (its `-wal` and `-shm` left behind), or the owners
//! directory of lock files. Section 14 of `RELIABILITY.md` says what holds.
//!
//! Every test has a holder process keep a lease (with a listener bound on its port, unless
//! the test says otherwise), changes the files under it, lets a new process claim, then makes
//! the holder do one operation on command and checks that the holder's port is back in the
//! registry the path names, so that a claim which only the registry keeps apart (its port
//! probe says every port is free) cannot get it.
//!
//! # Workers
//!
//! As in `faults.rs`: this test binary run again as `<binary> replaced::worker_entry --exact
//! --nocapture` with [`MODE`] set, talking through `@pd` lines on stdout and reading commands
//! from stdin. Every wait on a worker is bounded by [`DEADLINE`].
//!
//! # Ports
//!
//! This file owns 32200-32299 and 32500-32529 (see `common/mod.rs`), each test its own part, locked
//! host-wide while it runs ([`lock_ports`]).
#![cfg(unix)]

use crate::common;
use crate::common::workers::parse_held;
use crate::common::{integrity_check, sibling, KillOnDrop};
use crate::common::{open_probing, open_unprobed};

use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::workers::{self, parse_range, read_line, say, var, Worker, MODE, RANGE, REGISTRY};
use portdaddy::{Error, PortDaddy};

/// The longest any single wait on a worker may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// Whether a holder binds a listener on its port (`1`, the default) or not (`0`).
const LISTEN: &str = "PORTDADDY_REPLACED_LISTEN";

/// What is removed under the holder.
#[derive(Clone, Copy, Debug)]
enum Removal {
    /// The registry file with its `-wal`, `-shm` and lock file (what `rm registry*` does).
    Registry,
    /// The directory the registry lives in, with everything in it.
    Directory,
    /// Only the registry file itself: its `-wal` and `-shm` stay behind.
    MainFile,
}

impl Removal {
    fn apply(self, path: &Path) {
        match self {
            Removal::Registry => {
                for suffix in ["", "-wal", "-shm", ".lock"] {
                    remove_if_there(&sibling(path, suffix));
                }
            }
            Removal::Directory => std::fs::remove_dir_all(path.parent().unwrap()).unwrap(),
            Removal::MainFile => std::fs::remove_file(path).unwrap(),
        }
    }
}

/// A registry path one directory below a fresh temporary directory, so that the test can
/// remove the registry's directory and the `TempDir` still cleans up.
fn registry_in_subdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("registry.sqlite3");
    (dir, path)
}

/// The holder keeps `port` with a listener bound; `removal` happens; a new process claims
/// from `port..=port + 1` and gets `port + 1` (the bind probe sees the holder's listener), not
/// a "disk I/O error"; the holder then does `op` (`list` or `reap`); afterwards the file the
/// path names holds the holder's lease again, a claim that probes nothing cannot get its port,
/// and the holder's release at the end removes it.
fn deleted_under_a_holder(removal: Removal, op: &str, ports: RangeInclusive<u16>) {
    let _ports = lock_ports(&ports);
    let (_dir, path) = registry_in_subdir();
    let port = *ports.start();
    let mut holder = Worker::spawn("holder", "hold", &path, &(port..=port), &[]);
    let (held, pid) = parse_held(&holder.expect_line("HELD", deadline()));
    assert_eq!((held, pid), (port, holder.pid()));

    removal.apply(&path);
    assert!(!path.exists(), "{removal:?} removed the registry file");

    // A new process opens the path: it must get a working registry, and the holder's port
    // only through the bind probe, which sees the holder's listener.
    let newcomer = open_probing(&path, &(port..=port + 1));
    let guard = newcomer
        .acquire("newcomer")
        .unwrap_or_else(|e| panic!("a new process after {removal:?}: {e}"));
    assert_eq!(
        guard.port(),
        port + 1,
        "the bind probe keeps the held port apart"
    );
    guard.release().unwrap();
    drop(newcomer);

    // The holder's next operation notices and records its lease in the new file.
    holder.send(op);
    let answer = holder.expect_line("an answer", deadline());
    assert!(answer.starts_with("OK"), "holder {op}: {answer}");

    let leases = open_unprobed(&path, &(port..=port)).list().unwrap();
    assert!(
        leases
            .iter()
            .any(|l| l.port() == port && l.pid() == Some(pid)),
        "the holder's lease is back in the registry the path names: {leases:?}"
    );
    let later = open_unprobed(&path, &(port..=port)).acquire("later");
    assert!(
        matches!(later, Err(Error::Exhausted { .. })),
        "a claim that only the registry keeps apart got the held port: {later:?}"
    );

    holder.close_stdin();
    let (lines, status) = holder.finish(deadline());
    assert!(
        status.success(),
        "holder: {status}; {}",
        holder.last_words()
    );
    assert_eq!(lines, ["RELEASED ok"]);
    let registry = open_unprobed(&path, &(port..=port));
    assert!(
        registry.list().unwrap().is_empty(),
        "the holder released its lease in the file the path names"
    );
    assert_eq!(integrity_check(&path), "ok");
}

#[test]
fn a_deleted_registry_gets_the_holders_lease_back_at_its_next_write() {
    deleted_under_a_holder(Removal::Registry, "reap", 32200..=32201);
}

#[test]
fn a_deleted_registry_gets_the_holders_lease_back_at_its_next_read() {
    deleted_under_a_holder(Removal::Registry, "list", 32210..=32211);
}

#[test]
fn a_deleted_registry_directory_gets_the_holders_lease_back() {
    deleted_under_a_holder(Removal::Directory, "reap", 32220..=32221);
}

#[test]
fn a_deleted_main_file_gives_new_processes_no_disk_io_error_and_the_holder_its_lease() {
    deleted_under_a_holder(Removal::MainFile, "reap", 32230..=32231);
}

/// Between the deletion and the holder's next operation nothing but the bind probe keeps the
/// holder's port apart. A holder that bound nothing loses its port to a claim in that window:
/// its next operation logs the loss and its release reports `Error::LeaseLost`, while the new
/// holder keeps the port.
#[test]
fn a_port_taken_before_the_holder_notices_is_reported_lost_to_it() {
    let ports = 32240..=32240;
    let _ports = lock_ports(&ports);
    let (_dir, path) = registry_in_subdir();
    let mut holder = Worker::spawn("holder", "hold", &path, &ports, &[(LISTEN, "0".into())]);
    let (port, _) = parse_held(&holder.expect_line("HELD", deadline()));

    Removal::Registry.apply(&path);
    let newcomer = open_unprobed(&path, &ports);
    let taken = newcomer
        .acquire("newcomer")
        .expect("the window lets a claim in");
    assert_eq!(taken.port(), port);

    holder.send("reap");
    let answer = holder.expect_line("an answer", deadline());
    assert!(answer.starts_with("OK"), "holder reap: {answer}");
    holder.close_stdin();
    let (lines, status) = holder.finish(deadline());
    assert!(
        status.success(),
        "holder: {status}; {}",
        holder.last_words()
    );
    assert_eq!(lines, ["RELEASED lost"]);
    assert!(
        holder.last_words().contains("lost a held lease"),
        "the loss is logged; stderr:\n{}",
        holder.last_words()
    );
    let leases = newcomer.list().unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].id(), taken.lease().id(), "the new holder kept it");
    drop(taken);
}

/// A lease that another process released (`release_port(port)`, `portdaddy release`) before the
/// registry was deleted is no longer the holder's: the port went to a new holder in the
/// same file. When the old holder notices the deletion first, it must not record the
/// released lease again in the new file and so take the port from its present holder.
#[test]
fn a_lease_released_by_another_before_the_deletion_is_not_recorded_again() {
    let ports = 32510..=32510;
    let _ports = lock_ports(&ports);
    let (_dir, path) = registry_in_subdir();
    let no_listener = [(LISTEN, "0".into())];
    let mut old = Worker::spawn("old holder", "hold", &path, &ports, &no_listener);
    let (port, _) = parse_held(&old.expect_line("HELD", deadline()));
    assert!(
        open_unprobed(&path, &ports).release_port(port).unwrap(),
        "another process releases the old holder's lease"
    );
    let mut new = Worker::spawn("new holder", "hold", &path, &ports, &no_listener);
    let (taken, new_pid) = parse_held(&new.expect_line("HELD", deadline()));
    assert_eq!(taken, port, "the released port went to the new holder");

    Removal::Registry.apply(&path);
    for holder in [&mut old, &mut new] {
        holder.send("reap");
        let answer = holder.expect_line("an answer", deadline());
        assert!(answer.starts_with("OK"), "{}: reap: {answer}", holder.label);
    }

    let leases = open_unprobed(&path, &ports).list().unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(
        leases[0].pid(),
        Some(new_pid),
        "the port is its present holder's, not the released lease's: {leases:?}"
    );
    for holder in [&mut new, &mut old] {
        holder.close_stdin();
        let (lines, status) = holder.finish(deadline());
        assert!(
            status.success(),
            "{}: {status}; {}",
            holder.label,
            holder.last_words()
        );
        assert_eq!(lines, ["RELEASED ok"], "{}", holder.label);
    }
}

/// Only `<registry>-shm` removed under a holder: new processes build a new index of the
/// write-ahead log and record leases through it, which the holder's old index does not
/// know. The holder must not write through its old index (its frames would overwrite
/// theirs), nor checkpoint with it when it closes (that would drop their leases from the
/// registry): the lease a new process took must still be there after the holder's next
/// operation, its release, and its exit.
#[test]
fn a_deleted_shm_under_a_holder_loses_no_lease_of_others() {
    let ports = 32520..=32521;
    let _ports = lock_ports(&ports);
    let (_dir, path) = registry_in_subdir();
    let mut holder = Worker::spawn("holder", "hold", &path, &ports, &[(LISTEN, "0".into())]);
    let (port, _) = parse_held(&holder.expect_line("HELD", deadline()));

    std::fs::remove_file(sibling(&path, "-shm")).unwrap();
    let newcomer = open_unprobed(&path, &ports);
    let kept = newcomer.acquire("newcomer").unwrap().keep().unwrap();
    assert_ne!(
        kept.port(),
        port,
        "the registry still knows the holder's lease"
    );
    drop(newcomer);

    holder.send("reap");
    let answer = holder.expect_line("an answer", deadline());
    holder.close_stdin();
    let (lines, status) = holder.finish(deadline());
    assert!(
        status.success(),
        "holder: {status}; {}",
        holder.last_words()
    );

    let registry = open_unprobed(&path, &ports);
    let leases = registry.list().unwrap();
    assert!(
        leases.contains(&kept),
        "the new process's lease was lost after the holder's {answer:?} and {lines:?}: \
         {leases:?}"
    );
    assert_eq!(integrity_check(&path), "ok");
}

/// The owners directory removed (a temp cleaner) while the holder runs: its lock file is
/// gone, so processes of other PID namespaces would take it for dead. Its next write takes a
/// new lock file and records its name with the lease.
#[test]
fn a_removed_owners_directory_is_retaken_at_the_holders_next_write() {
    let ports = 32250..=32250;
    let _ports = lock_ports(&ports);
    let (_dir, path) = registry_in_subdir();
    let mut holder = Worker::spawn("holder", "hold", &path, &ports, &[]);
    let (port, _) = parse_held(&holder.expect_line("HELD", deadline()));
    let owners = sibling(&path, ".owners");
    let before = owner_lock_of(&path, port);
    assert!(
        lock_is_held(&owners.join(&before)),
        "the holder holds {before}"
    );

    std::fs::remove_dir_all(&owners).unwrap();
    holder.send("reap");
    let answer = holder.expect_line("an answer", deadline());
    assert!(answer.starts_with("OK"), "holder reap: {answer}");

    let after = owner_lock_of(&path, port);
    assert_ne!(after, before, "the lease names the new lock file");
    assert!(
        lock_is_held(&owners.join(&after)),
        "the holder holds its new lock file {after}, where others look for it"
    );
    holder.close_stdin();
    let (lines, status) = holder.finish(deadline());
    assert!(
        status.success(),
        "holder: {status}; {}",
        holder.last_words()
    );
    assert_eq!(lines, ["RELEASED ok"]);
}

/// The owners directory, or the holder's lock file in it, renamed rather than removed (a
/// `mv` by hand, a cleaner that moves files aside): the lock file is still linked, but not
/// where others look for it, so processes of other PID namespaces would take the holder for
/// dead. Its next write takes a new lock file where others look, and records its name with
/// the lease.
fn renamed_under_a_holder(rename_directory: bool, ports: RangeInclusive<u16>) {
    let _ports = lock_ports(&ports);
    let (_dir, path) = registry_in_subdir();
    let mut holder = Worker::spawn("holder", "hold", &path, &ports, &[]);
    let (port, _) = parse_held(&holder.expect_line("HELD", deadline()));
    let owners = sibling(&path, ".owners");
    let before = owner_lock_of(&path, port);
    let aside = path.parent().unwrap().join("aside");
    if rename_directory {
        std::fs::rename(&owners, &aside).unwrap();
    } else {
        std::fs::rename(owners.join(&before), &aside).unwrap();
    }
    assert!(!owners.join(&before).exists(), "renamed away");

    holder.send("reap");
    let answer = holder.expect_line("an answer", deadline());
    assert!(answer.starts_with("OK"), "holder reap: {answer}");

    let after = owner_lock_of(&path, port);
    assert!(
        lock_is_held(&owners.join(&after)),
        "the holder's lease names {after}, which is not held where others look for it"
    );
    holder.close_stdin();
    let (lines, status) = holder.finish(deadline());
    assert!(
        status.success(),
        "holder: {status}; {}",
        holder.last_words()
    );
    assert_eq!(lines, ["RELEASED ok"]);
}

/// The registry moved away whole, with its directory (`mv`): as documented, the old handle
/// goes on using it under its new name. Its owner lock file is not where the old path leads
/// either, but there is no directory there to take a new one in, and nobody judges its
/// leases by that path: the handle keeps its lock file, and its writes go on working.
#[test]
fn a_registry_moved_away_with_its_directory_still_serves_its_old_handle() {
    let ports = 32502..=32502;
    let _ports = lock_ports(&ports);
    let (dir, path) = registry_in_subdir();
    let mut holder = Worker::spawn("holder", "hold", &path, &ports, &[(LISTEN, "0".into())]);
    let (port, _) = parse_held(&holder.expect_line("HELD", deadline()));
    let moved = dir.path().join("moved");
    std::fs::rename(path.parent().unwrap(), &moved).unwrap();
    let moved_path = moved.join(path.file_name().unwrap());

    holder.send("reap");
    let answer = holder.expect_line("an answer", deadline());
    assert!(answer.starts_with("OK"), "holder reap: {answer}");
    assert!(!path.exists(), "nothing was created at the old path");
    holder.close_stdin();
    let (lines, status) = holder.finish(deadline());
    assert!(
        status.success(),
        "holder: {status}; {}",
        holder.last_words()
    );
    assert_eq!(lines, ["RELEASED ok"]);
    let left = open_unprobed(&moved_path, &ports).list().unwrap();
    assert!(left.is_empty(), "released in the moved registry: {left:?}");
    let _ = port;
}

#[test]
fn a_renamed_owners_directory_is_retaken_at_the_holders_next_write() {
    renamed_under_a_holder(true, 32500..=32500);
}

#[test]
fn a_renamed_owner_lock_file_is_retaken_at_the_holders_next_write() {
    renamed_under_a_holder(false, 32501..=32501);
}

/// A command that shares the holder's owner lock (`PortDaddy::share_owner_lock`, as
/// `portdaddy run` does) after the owners directory was removed shares the new lock file
/// that the holder's lease names: the lease lives on after the holder is killed, while the
/// command runs, and is reclaimed once the command has exited too.
#[test]
fn a_command_sharing_the_owner_lock_after_the_owners_directory_went_keeps_the_lease() {
    let ports = 32270..=32270;
    let _ports = lock_ports(&ports);
    let (_dir, path) = registry_in_subdir();
    let mut holder = Worker::spawn("holder", "hold", &path, &ports, &[(LISTEN, "0".into())]);
    let (port, _) = parse_held(&holder.expect_line("HELD", deadline()));
    let owners = sibling(&path, ".owners");
    let before = owner_lock_of(&path, port);
    std::fs::remove_dir_all(&owners).unwrap();

    holder.send("share");
    let answer = holder.expect_line("an answer", deadline());
    let sleeper: u32 = answer
        .strip_prefix("OK ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("holder share: {answer}"));
    let sleeper = KillOnDrop(sleeper);
    let after = owner_lock_of(&path, port);
    assert_ne!(after, before, "the lease names a new lock file");
    holder.kill();

    let lock = owners.join(&after);
    assert!(
        lock_is_held(&lock),
        "the command holds {after}, where others look for it"
    );
    let host = open_unprobed(&path, &ports);
    assert_eq!(host.reap().unwrap(), 0, "the command's lease was reaped");
    let other = host.acquire("other");
    assert!(
        matches!(other, Err(Error::Exhausted { .. })),
        "the lease of a running command was taken: {other:?}"
    );

    drop(sleeper);
    let give_up = deadline();
    while lock_is_held(&lock) {
        assert!(Instant::now() < give_up, "the killed command kept the lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(host.acquire("other").unwrap().port(), port);
}

/// A handle that never noticed the replacement closes when its process ends: closing the
/// last connection on the deleted file must not checkpoint and delete `<path>-wal` and
/// `<path>-shm` by name, which are the new registry's files, in use by others.
#[test]
fn an_old_handle_closing_unaware_leaves_the_new_registrys_files_alone() {
    let ports = 32260..=32260;
    let _ports = lock_ports(&ports);
    let (_dir, path) = registry_in_subdir();
    let mut old = Worker::spawn("old handle", "open", &path, &ports, &[]);
    assert_eq!(old.expect_line("OPEN", deadline()), "OPEN");

    Removal::Registry.apply(&path);
    let newcomer = open_unprobed(&path, &ports);
    let guard = newcomer.acquire("newcomer").unwrap();
    let side_files = || {
        ["-wal", "-shm"].map(|suffix| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(sibling(&path, suffix))
                .map(|m| m.ino())
                .unwrap_or_else(|e| panic!("{suffix}: {e}"))
        })
    };
    let before = side_files();

    old.close_stdin();
    let (lines, status) = old.finish(deadline());
    assert!(
        status.success(),
        "old handle: {status}; {}",
        old.last_words()
    );
    assert_eq!(lines, ["CLOSED"]);
    assert_eq!(
        side_files(),
        before,
        "the old handle deleted or replaced the new registry's -wal or -shm"
    );
    assert_eq!(newcomer.list().unwrap(), [guard.lease().clone()]);
    drop(guard);
    drop(newcomer);
    assert_eq!(integrity_check(&path), "ok");
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
        "hold" => hold_worker(&open_unprobed(&path, &range)),
        "open" => {
            let registry = open_unprobed(&path, &range);
            say("OPEN");
            workers::wait_for_eof();
            drop(registry);
            say("CLOSED");
        }
        other => panic!("unknown worker mode {other:?}"),
    }
}

/// Takes one port and binds a listener on it (unless [`LISTEN`] is `0`), reports
/// `HELD <port> <pid>`, then runs commands from stdin (`list`, `reap`, and `share`, which
/// starts `sleep 600` sharing the owner lock and answers with its pid), answering `OK …` or
/// `ERR …` for each. At end-of-file it releases the lease and reports `RELEASED ok`,
/// `RELEASED lost` (`Error::LeaseLost`) or `RELEASED <error>`.
fn hold_worker(registry: &PortDaddy) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    let guard = registry.acquire("held").expect("hold worker: acquire");
    let listener = (std::env::var(LISTEN).as_deref() != Ok("0")).then(|| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, guard.port()))
            .unwrap_or_else(|e| panic!("hold worker: bind {}: {e}", guard.port()))
    });
    say(&format!("HELD {} {}", guard.port(), std::process::id()));
    let mut commands = Vec::new();
    while let Some(command) = read_line() {
        let answer = match command.as_str() {
            "list" => registry.list().map(|l| format!("OK {}", l.len())),
            "reap" => registry.reap().map(|n| format!("OK {n}")),
            "share" => {
                let mut command = std::process::Command::new("sleep");
                command.arg("600").stdin(std::process::Stdio::null());
                registry.share_owner_lock(&mut command).map(|()| {
                    let child = command.spawn().expect("hold worker: spawn sleep");
                    let pid = child.id();
                    commands.push(child);
                    format!("OK {pid}")
                })
            }
            other => panic!("unknown command {other:?}"),
        };
        say(&answer.unwrap_or_else(|e| format!("ERR {e}")));
    }
    drop(listener);
    for mut command in commands {
        let _ = command.kill();
        let _ = command.wait();
    }
    match guard.release() {
        Ok(()) => say("RELEASED ok"),
        Err(e) if matches!(e.error(), Error::LeaseLost { .. }) => say("RELEASED lost"),
        Err(e) => say(&format!("RELEASED {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

fn remove_if_there(path: &Path) {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            panic!("remove {}: {e}", path.display())
        }
        _ => {}
    }
}

/// The owner lock file recorded with the lease on `port`, read with plain SQL.
fn owner_lock_of(path: &Path, port: u16) -> String {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(
        "SELECT owner_lock FROM leases WHERE port = ?1",
        [port],
        |r| r.get(0),
    )
    .unwrap()
}

/// Whether some process holds the `flock` on `path`, as others judge an owner's lock file.
fn lock_is_held(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(e)) => panic!("flock {}: {e}", path.display()),
    }
}

/// The host-wide lock on `range` (see [`workers::lock_ports`]).
fn lock_ports(range: &RangeInclusive<u16>) -> std::fs::File {
    workers::lock_ports(range, DEADLINE)
}
