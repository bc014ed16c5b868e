//! Creating a registry, and opening one cheaply, on a hostile host: files put at the
//! registry's path at the worst moments, files that power loss or a crash could leave, and
//! many creators at once, some of them killed.
//!
//! # Stopping a process at a named point
//!
//! A worker is held in a system call on the registry's path with `strace -P <path> -e
//! inject=openat:delay_exit=…:when=N` (the `N`th `openat` of that path, held right after it
//! returned) until the test kills `strace`, which lets it go on. Where `strace` is missing
//! those tests skip.
//!
//! # Workers
//!
//! A worker is this binary run again with `create_attack::worker_entry` selected (see
//! `common::workers`): it says `PID <pid>`, waits for a line on stdin, opens the registry,
//! leases one port and keeps it, and says `PORT <port>` or `ERR <variant> <message>`.
//!
//! # Ports
//!
//! This file owns 33350-33399 (see `common/mod.rs`); the port probe says every port is
//! free, so that only the registry keeps the workers apart, and no port is bound.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::ops::RangeInclusive;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use portdaddy::Error;

use crate::common;
use crate::common::held::{
    create_and_say, deadline, expect_pid, in_syscall, names_in, on_small_tmpfs, small_tmpfs_dir,
    started, strace, under_strace, wait_until, DEADLINE, NOBODY,
};
use crate::common::workers::{parse_range, say, var, Worker, MODE, RANGE, REGISTRY};

const RANGE_USED: RangeInclusive<u16> = 33350..=33399;

// ---------------------------------------------------------------------------------------------
// A file put at the path while a creator holds the lock
// ---------------------------------------------------------------------------------------------

/// A database of another program, in rollback mode with a hot journal, put at the path
/// after the creator checked it under the lock and found nothing, and before it creates the
/// registry: it is checked before SQLite opens it (which would roll the journal back into
/// it), refused, and left exactly as it was, journal and all.
#[test]
fn a_foreign_database_put_at_the_path_after_the_check_is_refused_and_left_as_it_was() {
    let Some(strace) = strace() else { return };
    let (dir, path) = common::temp_registry();
    let (foreign, journal) = foreign_database_with_hot_journal(dir.path());
    let (foreign_bytes, journal_bytes) = (fs::read(&foreign).unwrap(), fs::read(&journal).unwrap());
    let log = dir.path().join("strace.log");
    // The second `openat` of the path is the check under the lock (the first is the one
    // before the lock): held right after it found nothing.
    let mut creator = spawn_creator("creator", &path, |c| {
        hold_at_open_of(c, &strace, &path, 2, &log)
    });
    let _pid = expect_pid(&creator);
    creator.send("go");
    wait_until("the creator is held after its check under the lock", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("DELAYED"))
    });
    fs::rename(&journal, common::sibling(&path, "-journal")).unwrap();
    fs::rename(&foreign, &path).unwrap();
    // Killing strace lets the creator go on.
    creator.signal(libc::SIGKILL);
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Corrupt "), "{result}");
    assert!(result.contains("another application"), "{result}");
    assert!(
        fs::read(&path).unwrap() == foreign_bytes,
        "the foreign database was changed (its journal rolled back into it)"
    );
    assert!(
        fs::read(common::sibling(&path, "-journal")).unwrap() == journal_bytes,
        "the foreign database's journal was changed"
    );
}

/// In a sticky directory open to every user (as `/tmp`), another user puts a file that
/// looks like a registry of ours at the path while the creator is about to link its own:
/// that file wins the link, is refused as another user's before SQLite opens it, and is
/// left exactly as it was, with nothing of the creator's beside it but its lock file.
#[test]
fn another_users_file_put_at_the_path_in_a_sticky_directory_before_the_link_is_refused() {
    let Some(strace) = strace() else { return };
    if !common::is_root() {
        println!("skipped: needs root to give a file to another user");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sticky");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let path = dir.join("registry.sqlite3");
    let (_image_dir, image) = common::temp_registry();
    drop(common::open_unprobed(&image, &RANGE_USED));
    let planted = tmp.path().join("planted");
    fs::copy(&image, &planted).unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&planted, Some(NOBODY), Some(NOBODY)).unwrap();
    let bytes = fs::read(&planted).unwrap();

    let mut creator = spawn_creator("creator", &path, |c| hold_before_link(c, &strace));
    let pid = expect_pid(&creator);
    creator.send("go");
    wait_until("the creator is held before its link", || {
        in_syscall(pid, libc::SYS_linkat)
    });
    fs::rename(&planted, &path).unwrap();
    creator.signal(libc::SIGKILL);
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Refused "), "{result}");
    assert!(result.contains("belongs to"), "{result}");
    assert!(
        fs::read(&path).unwrap() == bytes,
        "the planted file changed"
    );
    assert_eq!(fs::metadata(&path).unwrap().uid(), NOBODY);
    assert_eq!(
        names_in(&dir),
        BTreeSet::from(["registry.sqlite3".into(), "registry.sqlite3.lock".into()])
    );
}

/// Where no link or rename can put a named file in place without replacing (`renameat2`
/// fails with `EINVAL`, `linkat` with `EPERM`), the registry is created empty in place; a
/// database of another program with a hot journal put at the path meanwhile (here while the
/// creator is held in its failed `linkat`) is checked before SQLite opens it: refused, and
/// left exactly as it was with its journal.
#[test]
fn a_foreign_database_put_at_the_path_before_an_in_place_creation_is_refused_and_left() {
    let Some(strace) = strace() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.sqlite3");
    let spare = tempfile::tempdir().unwrap();
    let (foreign, journal) = foreign_database_with_hot_journal(spare.path());
    let (foreign_bytes, journal_bytes) = (fs::read(&foreign).unwrap(), fs::read(&journal).unwrap());
    let log = spare.path().join("strace.log");
    let mut creator = spawn_creator("creator", &path, |c| {
        without_naming_but_by_link(
            c,
            &strace,
            dir.path(),
            &path,
            &log,
            "inject=linkat:error=EPERM:delay_exit=3600000000",
        );
    });
    expect_pid(&creator);
    creator.send("go");
    wait_until("the creator is held in its failed link", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("linkat") && l.contains("DELAYED"))
    });
    fs::rename(&journal, common::sibling(&path, "-journal")).unwrap();
    fs::rename(&foreign, &path).unwrap();
    creator.signal(libc::SIGKILL);
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Corrupt "), "{result}");
    assert!(
        fs::read(&path).unwrap() == foreign_bytes,
        "the foreign database was changed (its journal rolled back into it)"
    );
    assert!(fs::read(common::sibling(&path, "-journal")).unwrap() == journal_bytes);
}

/// A database of another program (no application id) and a copy of its rollback journal
/// taken in the middle of a transaction that changed the file: a hot journal, which SQLite
/// rolls back into the file when it next opens it. Returns the two files, in `dir`.
fn foreign_database_with_hot_journal(dir: &Path) -> (PathBuf, PathBuf) {
    let work = dir.join("work.db");
    let conn = rusqlite::Connection::open(&work).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = DELETE; PRAGMA cache_size = 1;
         CREATE TABLE notes (body TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
         INSERT INTO notes SELECT printf('%0500d', i) FROM n;",
    )
    .unwrap();
    // A transaction larger than the cache writes into the file before it commits.
    conn.execute_batch("BEGIN; UPDATE notes SET body = upper(body) || 'x';")
        .unwrap();
    let (foreign, journal) = (dir.join("foreign.db"), dir.join("foreign.db-journal"));
    fs::copy(&work, &foreign).unwrap();
    fs::copy(common::sibling(&work, "-journal"), &journal).unwrap();
    conn.execute_batch("ROLLBACK").unwrap();
    drop(conn);
    // What makes the test able to fail: plain SQLite opening the pair changes the file.
    let (probe, probe_journal) = (dir.join("probe.db"), dir.join("probe.db-journal"));
    fs::copy(&foreign, &probe).unwrap();
    fs::copy(&journal, &probe_journal).unwrap();
    let conn = rusqlite::Connection::open(&probe).unwrap();
    conn.query_row("SELECT count(*) FROM notes", [], |r| r.get::<_, i64>(0))
        .unwrap();
    drop(conn);
    assert!(
        fs::read(&probe).unwrap() != fs::read(&foreign).unwrap(),
        "the journal is not hot: SQLite left the file as it was"
    );
    for file in [work, probe] {
        fs::remove_file(file).unwrap();
    }
    (foreign, journal)
}

// ---------------------------------------------------------------------------------------------
// A creation through a named file (no unnamed files on the filesystem)
// ---------------------------------------------------------------------------------------------

/// Another registry whose name is this one's followed by `.~` and six letters or digits (as
/// `ports.db.~abc123` is `ports.db` followed by `.~abc123`) looks like what a creation through
/// a named file leaves when it is killed: creating this registry through a named file (as
/// on a filesystem without `O_TMPFILE`, which `strace` makes this one) leaves that registry,
/// and its leases, as they were.
#[test]
fn a_named_creation_leaves_another_registry_whose_name_extends_this_one_alone() {
    let Some(strace) = strace() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ports.db");
    let nightly = dir.path().join("ports.db.~abc123");
    let other = common::open_unprobed(&nightly, &RANGE_USED);
    let held = other.acquire("nightly").unwrap().keep().unwrap().port();
    drop(other);
    let log = dir.path().join("strace.log");
    let mut creator = spawn_creator("creator", &path, |c| {
        without_unnamed_files(c, &strace, dir.path(), &log)
    });
    expect_pid(&creator);
    creator.send("go");
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("PORT "), "{result}");
    assert!(
        fs::read_to_string(&log).unwrap().contains("INJECTED"),
        "the creation did not go through a named file"
    );
    assert_whole(&path);
    assert!(nightly.exists(), "the other registry was removed");
    let other = common::open_unprobed(&nightly, &RANGE_USED);
    let listed: Vec<u16> = other.list().unwrap().iter().map(|l| l.port()).collect();
    assert_eq!(listed, [held], "the other registry lost its lease");
}

/// What a creator killed after writing its named file leaves is still removed by the next
/// creation through a named file, and nothing else of our naming pattern is.
#[test]
fn a_named_creation_still_removes_what_a_killed_one_left() {
    let Some(strace) = strace() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.sqlite3");
    // What a creator killed after its sync and before its rename leaves: the whole image,
    // mode 0600, and nothing beside it.
    let (_image_dir, image) = common::temp_registry();
    drop(common::open_unprobed(&image, &RANGE_USED));
    let whole = fs::read(&image).unwrap();
    let left = [
        common::sibling(&path, ".~killd1"),
        common::sibling(&path, ".~killd2"),
    ];
    for (file, len) in left.iter().zip([whole.len(), 4096]) {
        fs::write(file, &whole[..len]).unwrap();
        fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let log = dir.path().join("strace.log");
    let mut creator = spawn_creator("creator", &path, |c| {
        without_unnamed_files(c, &strace, dir.path(), &log)
    });
    expect_pid(&creator);
    creator.send("go");
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("PORT "), "{result}");
    assert!(fs::read_to_string(&log).unwrap().contains("INJECTED"));
    assert_whole(&path);
    for file in &left {
        assert!(!file.exists(), "{} was left", file.display());
    }
}

/// Where a rename cannot refuse to replace (`EINVAL` from `renameat2`, as on NFS), the named
/// file is put in place by a hard link and an unlink. A creator killed between the two
/// leaves the registry with a second name of our pattern: the next open removes that name
/// and uses the registry, where it used to refuse it for good for its two links. A second
/// name of any other pattern is still refused, and left.
#[test]
fn a_creator_killed_between_its_link_and_its_unlink_leaves_a_registry_the_next_uses() {
    let Some(strace) = strace() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.sqlite3");
    let log = dir.path().join("strace.log");
    let mut creator = spawn_creator("creator", &path, |c| {
        // The third `openat` of the directory or the registry is the one with `O_TMPFILE`
        // (after the registry's check before the lock and under it).
        without_naming_but_by_link(
            c,
            &strace,
            dir.path(),
            &path,
            &log,
            "inject=linkat:delay_exit=3600000000",
        );
    });
    let pid = expect_pid(&creator);
    creator.send("go");
    wait_until("the creator has linked its file", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("linkat") && l.contains("DELAYED"))
    });
    let names: Vec<_> = names_in(dir.path())
        .into_iter()
        .filter(|n| n.to_string_lossy().starts_with("registry.sqlite3.~"))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // SAFETY: a plain syscall on a process this test started.
    unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGKILL) };
    creator.kill();
    assert_eq!(
        fs::metadata(&path).unwrap().nlink(),
        2,
        "the state to recover from"
    );

    let registry = common::open_unprobed(&path, &RANGE_USED);
    let port = registry.acquire("after").unwrap().port();
    assert!(RANGE_USED.contains(&port));
    drop(registry);
    assert_eq!(fs::metadata(&path).unwrap().nlink(), 1);
    assert!(
        !dir.path().join(&names[0]).exists(),
        "the second name stayed"
    );
    assert_whole(&path);

    // Any other second name is a registry reached by two names: refused, and left.
    let backup = dir.path().join("registry.sqlite3.backup");
    fs::hard_link(&path, &backup).unwrap();
    let Err(err) = portdaddy::PortDaddy::builder()
        .path(&path)
        .range(RANGE_USED)
        .port_probe(common::all_free)
        .open()
    else {
        panic!("a registry with two names opened");
    };
    assert!(matches!(err, Error::Refused { .. }), "{err:?}");
    assert!(backup.exists());
}

// ---------------------------------------------------------------------------------------------
// What a crash or a power loss can leave at the path
// ---------------------------------------------------------------------------------------------

/// A registry cut short (as a filesystem without ordered data could leave a file whose
/// size reached the disk before its pages), its header saying WAL mode: refused as corrupt,
/// left byte-identical, and SQLite makes no log or index beside it.
#[test]
fn a_registry_cut_short_at_the_path_is_corrupt_and_left_exactly_as_it_was() {
    let (_whole_dir, whole) = common::temp_registry();
    drop(common::open_unprobed(&whole, &RANGE_USED));
    common::fold_wal(&whole);
    let image = fs::read(&whole).unwrap();
    assert_eq!((image[18], image[19]), (2, 2), "WAL mode in the header");
    for len in [100, 4096, image.len() - 4096] {
        let (dir, path) = common::temp_registry();
        fs::write(&path, &image[..len]).unwrap();
        let err = portdaddy::PortDaddy::builder()
            .path(&path)
            .range(RANGE_USED)
            .port_probe(common::all_free)
            .open()
            .err()
            .unwrap_or_else(|| panic!("{len} bytes: opened"));
        assert!(matches!(err, Error::Corrupt { .. }), "{len} bytes: {err:?}");
        assert!(err.is_registry_unusable(), "{len} bytes: {err:?}");
        assert_eq!(fs::read(&path).unwrap(), &image[..len], "{len} bytes");
        let left: Vec<_> = names_in(dir.path())
            .into_iter()
            .filter(|n| n != "registry.sqlite3" && n != "registry.sqlite3.lock")
            .collect();
        assert!(left.is_empty(), "{len} bytes: {left:?} left beside it");
    }
}

/// A brand-new registry whose log's first commit was made without a sync, after a power
/// loss that kept the log's frames but not its header (garbage there), with or without the
/// index beside it: the next open ignores the log, starts it over, and the registry is
/// usable and intact.
#[test]
fn a_new_registry_whose_log_header_is_garbage_is_used_and_stays_intact() {
    for keep_index in [false, true] {
        let (_dir, path) = common::temp_registry();
        drop(common::open_unprobed(&path, &RANGE_USED));
        let wal = common::sibling(&path, "-wal");
        let mut log = fs::read(&wal).unwrap();
        assert!(log.len() > 32, "the first commit is in the log");
        log[..32].copy_from_slice(&[0xa5; 32]);
        fs::write(&wal, &log).unwrap();
        if !keep_index {
            fs::remove_file(common::sibling(&path, "-shm")).unwrap();
        }
        let registry = common::open_unprobed(&path, &RANGE_USED);
        let first = registry.acquire("after").unwrap().keep().unwrap();
        let second = registry.acquire("next").unwrap();
        assert_ne!(first.port(), second.port(), "index kept: {keep_index}");
        drop(second);
        drop(registry);
        assert_eq!(
            common::integrity_check(&path),
            "ok",
            "index kept: {keep_index}"
        );
        let again = common::open_unprobed(&path, &RANGE_USED);
        let held: Vec<u16> = again.list().unwrap().iter().map(|l| l.port()).collect();
        assert_eq!(held, [first.port()], "index kept: {keep_index}");
    }
}

// ---------------------------------------------------------------------------------------------
// The cheaper open: what the header says, and what SQLite makes of the file
// ---------------------------------------------------------------------------------------------

/// A registry of ours in rollback-journal mode whose switch to WAL mode was cut short: its
/// header says WAL already, but a hot journal beside it holds the page 1 from before, which
/// SQLite rolls back as it first reads the file. The open does not trust the header then,
/// and switches the registry to WAL mode as any open of a rollback-mode registry does.
#[test]
fn a_header_saying_wal_beside_a_hot_journal_does_not_skip_the_switch_to_wal() {
    let (_dir, path) = common::temp_registry();
    let registry = common::open_unprobed(&path, &RANGE_USED);
    let kept = registry.acquire("kept").unwrap().keep().unwrap().port();
    drop(registry);
    common::fold_wal(&path);
    let journal = common::sibling(&path, "-journal");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
    }
    let before = fs::read(&path).unwrap();
    assert_eq!((before[18], before[19]), (1, 1), "rollback mode");
    // The journal of a transaction that wrote page 1, taken before it ended.
    let hot = {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA synchronous = OFF; BEGIN IMMEDIATE;
             UPDATE leases SET name = name; PRAGMA user_version = 1;",
        )
        .unwrap();
        let hot = fs::read(&journal).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        hot
    };
    // The file as a switch to WAL mode cut short leaves it: the header says WAL.
    let mut file = before;
    file[18] = 2;
    file[19] = 2;
    fs::write(&path, &file).unwrap();
    fs::write(&journal, &hot).unwrap();

    let registry = common::open_unprobed(&path, &RANGE_USED);
    let header = fs::read(&path).unwrap();
    assert_eq!(
        (header[18], header[19]),
        (2, 2),
        "the registry was left in rollback-journal mode"
    );
    assert!(!journal.exists(), "the hot journal was not rolled back");
    let listed: Vec<u16> = registry.list().unwrap().iter().map(|l| l.port()).collect();
    assert_eq!(listed, [kept]);
    assert_ne!(registry.acquire("next").unwrap().port(), kept);
    drop(registry);
    assert_eq!(common::integrity_check(&path), "ok");
}

// ---------------------------------------------------------------------------------------------
// Many creators at once, some killed; creators short of descriptors
// ---------------------------------------------------------------------------------------------

/// Sixteen processes creating one registry at once, every fourth killed with `SIGKILL` at
/// some point of its open or claim: one whole registry, every port handed out once, and no
/// file of a creation left beside it.
#[test]
fn sixteen_creators_at_once_some_killed_leave_one_whole_registry_and_distinct_ports() {
    let (dir, path) = common::temp_registry();
    let mut creators: Vec<Worker> = (0..16)
        .map(|i| spawn_creator(format!("creator {i}"), &path, |_| {}))
        .collect();
    for creator in &creators {
        expect_pid(creator);
    }
    for creator in &mut creators {
        creator.send("go");
    }
    // At once, while they open, wait for the lock, create, or claim.
    for creator in creators.iter_mut().skip(3).step_by(4) {
        creator.signal(libc::SIGKILL);
    }
    let mut ports = Vec::new();
    for (i, creator) in creators.iter_mut().enumerate() {
        if i % 4 == 3 {
            let _ = creator.finish(deadline());
            continue;
        }
        let line = creator.expect_line("a result", deadline());
        let port: u16 = line
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{}: {line}", creator.label));
        ports.push(port);
    }
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port twice: {ports:?}");
    assert_whole(&path);
    let allowed = [
        "registry.sqlite3",
        "registry.sqlite3-wal",
        "registry.sqlite3-shm",
        "registry.sqlite3.lock",
        "registry.sqlite3.owners",
    ];
    let left: Vec<_> = names_in(dir.path())
        .into_iter()
        .filter(|n| !allowed.iter().any(|a| n == a))
        .collect();
    assert!(left.is_empty(), "left beside the registry: {left:?}");
}

/// A filesystem with room for the new registry's image but not for the index of its log
/// (`-shm`), which SQLite reports as a "disk I/O error": the error says what is missing, and
/// the registry is left whole.
#[test]
fn a_filesystem_full_after_the_image_names_the_missing_room_and_leaves_a_whole_registry() {
    let Some((_tmp, dir, path)) = small_tmpfs_dir() else {
        return;
    };
    let mut creator = spawn_creator(
        "creator on a small tmpfs",
        &path,
        on_small_tmpfs(SMALL_TMPFS, &dir),
    );
    if !started(&creator) {
        return;
    }
    creator.send("go");
    let result = creator.expect_line("a result", deadline());
    assert!(result.starts_with("ERR Open "), "{result}");
    assert!(result.contains("(-shm)"), "{result}");
    assert!(result.contains("may be full"), "{result}");
    assert_eq!(creator.expect_line("WHOLE", deadline()), "WHOLE");
}

/// A creator with few descriptors left fails with `Error::OutOfDescriptors` naming the
/// registry, never a panic; what it leaves at the path is nothing or a whole registry, which
/// the next process uses.
#[test]
fn a_creator_short_of_descriptors_fails_cleanly_and_leaves_nothing_or_a_whole_registry() {
    let mut failed = 0;
    for limit in 3..=16 {
        let (dir, path) = common::temp_registry();
        let mut creator = spawn_creator(format!("creator with {limit} descriptors"), &path, |c| {
            with_descriptor_limit(c, limit)
        });
        let Ok(first) = creator.lines.recv_timeout(DEADLINE) else {
            // Too few for the test harness itself to start.
            continue;
        };
        assert!(first.starts_with("PID "), "{limit}: {first}");
        creator.send("go");
        let result = creator.expect_line("a result", deadline());
        println!("{limit} descriptors: {result}");
        let (_, status) = creator.finish(deadline());
        assert!(
            status.success(),
            "{limit}: {status}; {}",
            creator.last_words()
        );
        if !result.starts_with("PORT ") {
            failed += 1;
            assert!(
                result.starts_with("ERR OutOfDescriptors "),
                "{limit}: {result}"
            );
            assert!(
                result.contains(&path.display().to_string()),
                "{limit}: {result}"
            );
        }
        let left: Vec<_> = names_in(dir.path())
            .into_iter()
            .filter(|n| n.to_string_lossy().starts_with("registry.sqlite3.~"))
            .collect();
        assert!(left.is_empty(), "{limit}: {left:?}");
        if path.exists() {
            assert_whole(&path);
        }
        let registry = common::open_unprobed(&path, &RANGE_USED);
        drop(registry.acquire("next").unwrap());
    }
    if failed == 0 {
        println!("skipped: no limit made a creator fail; the harness needs more descriptors");
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
        "create" => create_worker(&path, &range),
        other => panic!("unknown worker mode {other:?}"),
    }
}

/// Creates or uses the registry as `held::create_and_say` does; on a small tmpfs it then says
/// whether the file at the path is a whole registry: `WHOLE` or `NOT WHOLE`.
fn create_worker(path: &Path, range: &RangeInclusive<u16>) {
    let Some(small) = create_and_say(path, range, SMALL_TMPFS, "40k") else {
        return;
    };
    if small.is_some() {
        // Read as an immutable file, which needs no index beside it (there is no room).
        let immutable = format!("file:{}?immutable=1", path.display());
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let whole = fs::read(path).is_ok_and(|bytes| bytes.len() == 28672)
            && rusqlite::Connection::open_with_flags(immutable, flags).is_ok_and(|conn| {
                conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
                    .is_ok_and(|check| check == "ok")
                    && conn
                        .query_row("SELECT count(*) FROM leases", [], |r| r.get::<_, i64>(0))
                        .is_ok()
            });
        say(if whole { "WHOLE" } else { "NOT WHOLE" });
    }
}

/// Where a worker mounts a 40 KiB tmpfs first, in its own mount namespace: room for the
/// new registry's image (28 KiB) but not for the index of its log.
const SMALL_TMPFS: &str = "PORTDADDY_CREATE_ATTACK_SMALL_TMPFS";

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

/// The registry at `path` is whole: WAL mode in its header, intact, ours, and at the schema
/// version this build gives a new registry.
fn assert_whole(path: &Path) {
    let header = fs::read(path).unwrap();
    assert!(header.len() >= 100, "{} bytes", header.len());
    assert_eq!((header[18], header[19]), (2, 2), "WAL mode in the header");
    assert_eq!(common::integrity_check(path), "ok");
    let conn = rusqlite::Connection::open(path).unwrap();
    let pragma = |name: &str| -> i64 { conn.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
    assert_eq!(pragma("application_id"), 0x5074_4479, "ours");
    let (_dir, fresh) = common::temp_registry();
    drop(common::open_unprobed(&fresh, &RANGE_USED));
    let current: i64 = rusqlite::Connection::open(&fresh)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(pragma("user_version"), current);
}

/// Makes `command` run with at most `limit` open descriptors (`RLIMIT_NOFILE`).
fn with_descriptor_limit(command: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only an async-signal-safe call between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `command` under `strace`, which fails its first `openat` of the directory `dir`
/// (the one with `O_TMPFILE`) with `EOPNOTSUPP`, as on a filesystem without unnamed files,
/// and writes what it traced to `log`.
fn without_unnamed_files(command: &mut Command, strace: &Path, dir: &Path, log: &Path) {
    let args = [
        "-P".as_ref(),
        dir.as_os_str(),
        "-e".as_ref(),
        "trace=openat".as_ref(),
        "-e".as_ref(),
        "inject=openat:error=EOPNOTSUPP:when=1".as_ref(),
    ];
    under_strace::<&OsStr>(command, strace, Some(log), args);
}

/// Runs `command` under `strace` on a filesystem, as it were, with neither unnamed files nor
/// a rename that refuses to replace: its third `openat` of `dir` or `path` (the one with
/// `O_TMPFILE`) fails with `EOPNOTSUPP`, every `renameat2` with `EINVAL`, and `linkat`
/// does what `link` says (`inject=linkat:…`); what it traced goes to `log`.
fn without_naming_but_by_link(
    command: &mut Command,
    strace: &Path,
    dir: &Path,
    path: &Path,
    log: &Path,
    link: &str,
) {
    let args = [
        "-P".as_ref(),
        dir.as_os_str(),
        "-P".as_ref(),
        path.as_os_str(),
        "-e".as_ref(),
        "trace=openat,renameat2,linkat".as_ref(),
        "-e".as_ref(),
        "inject=openat:error=EOPNOTSUPP:when=3".as_ref(),
        "-e".as_ref(),
        "inject=renameat2:error=EINVAL".as_ref(),
        "-e".as_ref(),
        OsStr::new(link),
    ];
    under_strace::<&OsStr>(command, strace, Some(log), args);
}

/// Runs `command` under `strace`, which holds each thread that calls `linkat` for an hour
/// before the call.
fn hold_before_link(command: &mut Command, strace: &Path) {
    let args = [
        "-e",
        "trace=linkat",
        "-e",
        "inject=linkat:delay_enter=3600000000",
    ];
    under_strace(command, strace, None, args);
}

/// Runs `command` under `strace`, which holds the thread making the `nth` `openat` of
/// `path` for an hour right after the call returned, and writes what it traced to `log`
/// (the held call is marked `DELAYED` there as soon as it is held).
fn hold_at_open_of(command: &mut Command, strace: &Path, path: &Path, nth: u32, log: &Path) {
    let inject = OsString::from(format!("inject=openat:delay_exit=3600000000:when={nth}"));
    let args = [
        "-P".as_ref(),
        path.as_os_str(),
        "-e".as_ref(),
        "trace=openat".as_ref(),
        "-e".as_ref(),
        inject.as_os_str(),
    ];
    under_strace::<&OsStr>(command, strace, Some(log), args);
}
