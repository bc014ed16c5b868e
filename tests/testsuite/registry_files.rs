//! The registry's files on a hostile host: one registry means one lock and one owners
//! directory however it is reached (a symbolic link, a linked or bind-mounted directory), a
//! file reached by other names too (a second hard link, a single-file bind mount) is refused,
//! and so is every file or directory another user could have planted or may change. Nothing
//! refused is changed, and nothing is created through a planted link.
//!
//! Most tests need root (to add a user with `useradd`, to mount in `unshare -m`), as in CI;
//! they print `skipped: <reason>` where the system refuses.
//!
//! Ports 32100-32199 belong to this file (see `common`); nothing here binds them, since every
//! registry's port probe says every port is free.

#![cfg(unix)]

use crate::common;
use crate::common::users::TestUser;
use crate::common::{in_new_pid_namespace, is_root, sibling};

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::all_free;
use common::workers::{say, var, wait_for_eof, Worker, MODE, RANGE, REGISTRY};
use portdaddy::{Error, PortDaddy};

const FIRST: u16 = 32100;
const LAST: u16 = 32199;
const RANGE_ALL: std::ops::RangeInclusive<u16> = FIRST..=LAST;

/// How many ports each worker holds at once.
const HELD: usize = 40;

fn open_at(path: &Path) -> portdaddy::Result<PortDaddy> {
    PortDaddy::builder()
        .path(path)
        .range(RANGE_ALL)
        .port_probe(all_free)
        .lock_timeout(Duration::from_secs(10))
        .open()
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

// ---------------------------------------------------------------------------------------------
// Helpers: another user, a sticky directory, snapshots of a tree
// ---------------------------------------------------------------------------------------------

/// A user made for one test, removed when dropped.
fn other_user() -> Option<TestUser> {
    TestUser::add("pdf", "add a user")
}

/// A temporary directory that every user may enter, holding `shared`: mode `1777`, as `/tmp`.
fn sticky_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    (tmp, shared)
}

/// What a tree holds: for each path, its kind, owner, mode and contents (or link target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut seen = BTreeMap::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link to {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                todo.push(path.clone());
                "dir".to_owned()
            } else {
                format!("file {:?}", fs::read(&path).unwrap())
            };
            let line = format!("{what} uid {} mode {:o}", meta.uid(), meta.mode());
            seen.insert(path, line);
        }
    }
    seen
}

/// Asserts a refusal of `file`, whose message names it and says `why`.
fn assert_refused(err: &Error, file: &Path, why: &str) {
    let Error::Refused { file: refused, .. } = err else {
        panic!(
            "expected Error::Refused for {}, got {err:?}",
            file.display()
        );
    };
    assert_eq!(refused, file, "{err}");
    let text = err.to_string();
    assert!(text.contains(&file.display().to_string()), "{text}");
    assert!(text.contains(why), "expected {why:?} in: {text}");
    assert!(text.contains("it was left as it was"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Files planted by another user
// ---------------------------------------------------------------------------------------------

/// A symbolic link that another user planted at the registry path, pointing at a file of
/// ours or at nothing, or on the way to it (to a directory), is not followed: refused, naming
/// the link and its owner, the target byte for byte as it was, nothing created at a missing
/// target or in a linked directory.
#[test]
fn a_registry_symlink_planted_by_another_user_is_refused_and_its_target_untouched() {
    let Some(user) = other_user() else { return };
    let (tmp, shared) = sticky_dir();
    let victim = tmp.path().join("victim");
    fs::write(&victim, b"precious bytes").unwrap();
    let missing = tmp.path().join("missing");
    for (name, target) in [("reg-a.sqlite3", &victim), ("reg-b.sqlite3", &missing)] {
        user.run(&shared, &format!("ln -s '{}' {name}", target.display()));
        let path = shared.join(name);
        let before = snapshot(tmp.path());
        let err = open_at(&path).expect_err("a planted link must be refused");
        assert_refused(&err, &path, &format!("user {}", user.name));
        assert_eq!(snapshot(tmp.path()), before, "{name}: something changed");
        assert_eq!(fs::read(&victim).unwrap(), b"precious bytes");
        assert!(!missing.exists(), "{name}: the link's target was created");
    }
    // A link of theirs to a directory, anywhere on the path, is not followed either.
    let victim_dir = tmp.path().join("victim-dir");
    fs::create_dir(&victim_dir).unwrap();
    user.run(
        &shared,
        &format!("ln -s '{}' dir-link", victim_dir.display()),
    );
    let link = shared.join("dir-link");
    let err = open_at(&link.join("reg.sqlite3")).expect_err("a planted directory link");
    assert_refused(&err, &link, &format!("user {}", user.name));
    assert_eq!(
        fs::read_dir(&victim_dir).unwrap().count(),
        0,
        "created through the link"
    );
}

/// A symbolic link that another user planted at the lock file, SQLite's `-wal`, `-shm` or
/// `-journal`, or the owners directory is refused before anything is opened through it:
/// nothing is created at its target and nothing changes.
#[test]
fn side_file_symlinks_planted_by_another_user_are_refused_and_nothing_is_created_through_them() {
    let Some(user) = other_user() else { return };
    for suffix in [".lock", "-wal", "-shm", "-journal", ".owners"] {
        let (tmp, shared) = sticky_dir();
        let path = shared.join("reg.sqlite3");
        let target = tmp.path().join("target");
        let planted = sibling(&path, suffix);
        user.run(
            &shared,
            &format!("ln -s '{}' '{}'", target.display(), planted.display()),
        );
        let before = snapshot(tmp.path());
        let err = open_at(&path).expect_err("a planted link must be refused");
        assert_refused(&err, &planted, "symbolic link");
        assert_eq!(snapshot(tmp.path()), before, "{suffix}: something changed");
        assert!(!target.exists(), "{suffix}: created through the link");
    }
}

/// A registry file another user created, even one that everybody may write (`0666`), is
/// refused with its owner named, and left as it was.
#[test]
fn a_registry_file_of_another_user_is_refused_even_when_everybody_may_write_it() {
    let Some(user) = other_user() else { return };
    let (tmp, shared) = sticky_dir();
    for mode in ["666", "644", "600"] {
        let name = format!("reg-{mode}.sqlite3");
        user.run(&shared, &format!(": > {name} && chmod {mode} {name}"));
        let path = shared.join(&name);
        let before = snapshot(tmp.path());
        let err = open_at(&path).expect_err("another user's registry must be refused");
        assert_refused(&err, &path, &format!("belongs to user {}", user.name));
        assert_eq!(
            snapshot(tmp.path()),
            before,
            "mode {mode}: something changed"
        );
    }
}

/// A lock file, side file or owners directory of another user beside a registry of ours is
/// refused with its owner named, and the registry is left as it was.
#[test]
fn side_files_of_another_user_are_refused() {
    let Some(user) = other_user() else { return };
    for (suffix, plant) in [
        (".lock", ": > NAME && chmod 600 NAME"),
        ("-wal", ": > NAME && chmod 600 NAME"),
        ("-shm", ": > NAME && chmod 666 NAME"),
        ("-journal", ": > NAME && chmod 600 NAME"),
        (".owners", "mkdir -m 700 NAME"),
    ] {
        let (tmp, shared) = sticky_dir();
        let path = shared.join("reg.sqlite3");
        drop(open_at(&path).expect("a registry of ours"));
        let planted = sibling(&path, suffix);
        // A lock file or owners directory of ours is already there: plant in their place.
        let _ = fs::remove_file(&planted);
        let _ = fs::remove_dir_all(&planted);
        user.run(
            &shared,
            &plant.replace("NAME", &format!("'{}'", planted.display())),
        );
        let before = snapshot(tmp.path());
        let err = open_at(&path).expect_err("another user's side file must be refused");
        assert_refused(&err, &planted, &format!("belongs to user {}", user.name));
        assert_eq!(snapshot(tmp.path()), before, "{suffix}: something changed");
    }
}

/// A registry file of ours that group or others may write is refused, and its mode is left
/// as it was (not silently fixed).
#[test]
fn a_registry_file_others_may_write_is_refused_and_its_mode_kept() {
    let (tmp, path) = common::temp_registry();
    drop(open_at(&path).unwrap());
    for mode in [0o666, 0o620] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let before = snapshot(tmp.path());
        let err = open_at(&path).expect_err("a writable registry must be refused");
        assert_refused(&err, &path, "can write to it");
        assert_eq!(snapshot(tmp.path()), before);
    }
}

/// A registry directory that group or others may write without the sticky bit is refused
/// (and `diagnose` says so): they could replace its files. With the sticky bit (as `/tmp`)
/// it is used.
#[test]
fn a_directory_others_may_write_is_refused_unless_sticky() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("open");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let path = dir.join("reg.sqlite3");
    let err = open_at(&path).expect_err("an open directory must be refused");
    assert_refused(&err, &dir, "no sticky bit");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "files were created");
    let range = portdaddy::PortRange::new(FIRST, LAST).unwrap();
    let diagnosis = PortDaddy::diagnose(&path, range);
    let check = diagnosis
        .check("directory permissions")
        .expect("a directory check");
    assert_eq!(check.status, portdaddy::Status::Fail, "{diagnosis}");
    assert!(check.detail.contains("no sticky bit"), "{diagnosis}");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let registry = open_at(&path).expect("a sticky directory is fine");
    drop(registry.acquire("web").unwrap());
}

/// In a sticky directory that everybody may write, the registry's files are made `0600`
/// and ours, SQLite's `-wal` and `-shm` included.
#[test]
fn a_registry_in_a_sticky_directory_keeps_its_files_private() {
    let (_tmp, shared) = sticky_dir();
    let path = shared.join("reg.sqlite3");
    let registry = open_at(&path).unwrap();
    let _guard = registry.acquire("web").unwrap();
    for suffix in ["", ".lock", "-wal", "-shm"] {
        let file = sibling(&path, suffix);
        let meta =
            fs::symlink_metadata(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(meta.is_file(), "{}", file.display());
        assert_eq!(meta.mode() & 0o777, 0o600, "{}", file.display());
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    }
}

/// Another application's database in a sticky directory is refused as before, and the side
/// files created for it before SQLite opened it are gone again: the directory is as it was.
#[test]
fn a_foreign_database_in_a_sticky_directory_is_refused_and_nothing_is_left_beside_it() {
    let (tmp, shared) = sticky_dir();
    let path = shared.join("other.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let before = snapshot(tmp.path());
    let err = open_at(&path).expect_err("another application's database");
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    let mut after = snapshot(tmp.path());
    // The lock file stays, as beside any refused file.
    after.remove(&sibling(&path, ".lock"));
    assert_eq!(after, before);
}

// ---------------------------------------------------------------------------------------------
// Root with another user's environment
// ---------------------------------------------------------------------------------------------

/// Set in the child of [`default_path_child`].
const CHILD: &str = "PORTDADDY_FILES_CHILD";

/// Not a test of its own: in the child of [`default_path_child`], opens the default registry
/// and prints `@pd ok <path>` or `@pd err <error>`.
#[test]
fn default_path_entry() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    match PortDaddy::builder().port_probe(all_free).open() {
        Ok(registry) => say(&format!("ok {}", registry.path().unwrap().display())),
        Err(Error::Refused { file, .. }) => say(&format!("refused {}", file.display())),
        Err(e) => say(&format!("err {e}")),
    }
}

/// Runs [`default_path_entry`] in a child with only `env`, and returns its `@pd` line.
fn default_path_child(env: &[(&str, &Path)]) -> String {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            &sibling_test!("default_path_entry"),
            "--exact",
            "--nocapture",
        ])
        .env_clear()
        .env(CHILD, "1");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("@pd "))
        .unwrap_or_else(|| panic!("no @pd line in {stdout}"))
        .to_owned()
}

/// Root running with another user's `HOME` (as `sudo -E` does) creates no directory in that
/// home, which would lock its owner out of it: the open is refused, naming the home.
#[test]
fn root_with_another_users_home_creates_nothing_there() {
    let Some(user) = other_user() else { return };
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home = tmp.path().join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(user.uid), None).unwrap();
    let state = tmp.path().join("state");
    fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(user.uid), None).unwrap();
    for (var, dir) in [("HOME", &home), ("XDG_STATE_HOME", &state)] {
        let line = default_path_child(&[(var, dir)]);
        assert_eq!(line, format!("refused {}", dir.display()), "{var}");
        assert_eq!(
            fs::read_dir(dir).unwrap().count(),
            0,
            "{var}: something was created in {}",
            dir.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// One registry, however it is reached
// ---------------------------------------------------------------------------------------------

/// A registry file with a second hard link is refused by both names (each would get a lock
/// of its own), with advice to share the directory; both are left as they were, and
/// `diagnose` reports the same failure.
#[test]
fn a_registry_with_a_second_hard_link_is_refused_by_both_names() {
    let (tmp, path) = common::temp_registry();
    drop(open_at(&path).unwrap().acquire("web").unwrap());
    let other = tmp.path().join("other.sqlite3");
    fs::hard_link(&path, &other).unwrap();
    let before = snapshot(tmp.path());
    for name in [&path, &other] {
        let err = open_at(name).expect_err("a hard-linked registry must be refused");
        assert_refused(&err, name, "2 hard links");
        assert!(err.to_string().contains("share the directory"), "{err}");
        assert_eq!(snapshot(tmp.path()), before, "{}", name.display());
    }
    assert!(!sibling(&other, ".lock").exists());
    // The diagnosis says the same, and changes nothing either.
    let range = portdaddy::PortRange::new(FIRST, LAST).unwrap();
    let diagnosis = PortDaddy::diagnose(&other, range);
    let check = diagnosis.check("file permissions").expect("a file check");
    assert_eq!(check.status, portdaddy::Status::Fail, "{diagnosis}");
    assert!(check.detail.contains("hard links"), "{diagnosis}");
    assert_eq!(snapshot(tmp.path()), before);
}

/// A registry name with no room for the side files' suffixes (248 to 255 bytes: `-journal`
/// would pass the 255-byte limit) is refused up front, and nothing is created.
#[test]
fn a_name_too_long_for_the_side_files_is_refused_before_anything_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    for len in 248..=255 {
        let path = tmp.path().join("r".repeat(len));
        let err = open_at(&path).expect_err("a name too long must be refused");
        assert_refused(&err, &path, "255-byte limit");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "{len} bytes");
    }
    let fits = tmp.path().join("r".repeat(247));
    drop(open_at(&fits).expect("247 bytes leave room").acquire("web"));
}

/// Not a test of its own: a worker holding [`HELD`] ports of the registry at its path.
#[test]
fn worker_entry() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    if mode == "visit" {
        return visit();
    }
    assert_eq!(mode, "hold", "unknown worker mode");
    let _ = var(RANGE);
    let registry = open_at(Path::new(&var(REGISTRY))).expect("open the registry");
    say("READY");
    assert_eq!(common::workers::read_line().as_deref(), Some("go"));
    let guards: Vec<_> = (0..HELD)
        .map(|i| {
            registry
                .acquire(&format!("w{}-{i}", std::process::id()))
                .unwrap()
        })
        .collect();
    let ports: Vec<String> = guards.iter().map(|g| g.port().to_string()).collect();
    say(&format!("PORTS {}", ports.join(" ")));
    wait_for_eof();
}

/// Two processes, one on each path, hold ports at the same time: no port is held twice, the
/// registry has one lock file and one owners directory (beside `real`), holding one owner
/// file per process.
fn two_paths_are_one_registry(first: &Path, second: &Path, real: &Path) {
    let mut workers: Vec<Worker> = [first, second]
        .iter()
        .enumerate()
        .map(|(i, path)| Worker::spawn(format!("holder {i}"), "hold", path, &RANGE_ALL, &[]))
        .collect();
    for worker in &workers {
        assert_eq!(worker.expect_line("READY", deadline()), "READY");
    }
    for worker in &mut workers {
        worker.send("go");
    }
    let mut seen = BTreeSet::new();
    for worker in &workers {
        let line = worker.expect_line("PORTS", deadline());
        let ports = line.strip_prefix("PORTS ").expect("a PORTS line");
        for port in ports.split(' ') {
            assert!(seen.insert(port.to_owned()), "port {port} held twice");
        }
    }
    assert_eq!(seen.len(), 2 * HELD);
    let owners: Vec<_> = fs::read_dir(sibling(real, ".owners"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(owners.len(), 2, "one owners directory for both: {owners:?}");
    // Whatever lock file or owners directory a path shows is the real file's.
    let id = |p: &Path| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    for path in [first, second] {
        for suffix in [".lock", ".owners"] {
            let seen = sibling(path, suffix);
            if seen.exists() {
                assert_eq!(id(&seen), id(&sibling(real, suffix)), "{}", seen.display());
            }
        }
    }
    for worker in &mut workers {
        worker.close_stdin();
        let (_, status) = worker.finish(deadline());
        assert!(status.success(), "{}: {status}", worker.label);
    }
}

/// A registry reached through a symbolic link to the file (ours) and by its real path is one
/// registry: the lock file and owners directory are the real file's, none beside the link.
#[test]
fn a_registry_reached_through_a_file_symlink_is_one_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let real_dir = tmp.path().join("real");
    let link_dir = tmp.path().join("links");
    fs::create_dir(&real_dir).unwrap();
    fs::create_dir(&link_dir).unwrap();
    let real = real_dir.join("reg.sqlite3");
    let link = link_dir.join("link.sqlite3");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    two_paths_are_one_registry(&link, &real, &real);
    for suffix in [".lock", ".owners", "-wal", "-shm"] {
        assert!(
            !sibling(&link, suffix).exists(),
            "a {suffix} beside the link"
        );
    }
}

/// A registry reached through a symbolic link to its directory and by its real path is one
/// registry.
#[test]
fn a_registry_reached_through_a_directory_symlink_is_one_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let real_dir = tmp.path().join("real");
    fs::create_dir(&real_dir).unwrap();
    std::os::unix::fs::symlink(&real_dir, tmp.path().join("link")).unwrap();
    let real = real_dir.join("reg.sqlite3");
    two_paths_are_one_registry(&tmp.path().join("link/reg.sqlite3"), &real, &real);
}

/// Set in the child that [`in_mount_namespace`] starts.
const MOUNT_CHILD: &str = "PORTDADDY_FILES_MOUNT_CHILD";

/// Runs the test `entry` of this binary in a new mount namespace in which `source` is
/// bind-mounted on `target`; `false` (with the reason printed) where the system refuses.
fn in_mount_namespace(entry: &str, source: &Path, target: &Path, env: &[(&str, &Path)]) -> bool {
    if !is_root() {
        println!("skipped: needs root to mount in a new mount namespace");
        return false;
    }
    let probe = Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        other => {
            println!("skipped: unshare -m is refused here: {other:?}");
            return false;
        }
    }
    let exe = std::env::current_exe().unwrap();
    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$2\" && exec \"$3\" \"$4\" --exact --nocapture")
        .arg("sh")
        .arg(source)
        .arg(target)
        .arg(&exe)
        .arg(sibling_test!(entry))
        .env(MOUNT_CHILD, "1");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{entry} in a mount namespace failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("@pd passed"),
        "{entry} did not run its checks: {stdout}"
    );
    true
}

/// A registry file bind-mounted on its own (as `docker run -v file:file` does) is refused
/// where it is mounted, with advice to share the directory, and left as it was.
#[test]
fn a_registry_file_bind_mounted_on_its_own_is_refused() {
    let (tmp, path) = common::temp_registry();
    drop(open_at(&path).unwrap().acquire("web").unwrap());
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let target = elsewhere.join("reg.sqlite3");
    fs::write(&target, b"").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    let before = fs::read(&path).unwrap();
    if !in_mount_namespace(
        "file_mount_entry",
        &path,
        &target,
        &[("PD_TARGET", &target)],
    ) {
        return;
    }
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        1,
        "files beside the mount"
    );
}

/// Not a test of its own: in the mount namespace of
/// [`a_registry_file_bind_mounted_on_its_own_is_refused`].
#[test]
fn file_mount_entry() {
    if std::env::var_os(MOUNT_CHILD).is_none() {
        return;
    }
    let target = PathBuf::from(std::env::var_os("PD_TARGET").unwrap());
    let before = fs::read(&target).unwrap();
    let err = open_at(&target).expect_err("a file mounted on its own must be refused");
    assert_refused(&err, &target, "mounted on its own");
    assert!(err.to_string().contains("share the directory"), "{err}");
    assert_eq!(fs::read(&target).unwrap(), before);
    assert!(!sibling(&target, ".lock").exists());
    say("passed");
}

/// A registry reached through a bind-mounted directory and by its own path is one registry:
/// the directory keeps the side files together.
#[test]
fn a_registry_reached_through_a_bind_mounted_directory_is_one_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let real_dir = tmp.path().join("real");
    let mount = tmp.path().join("mount");
    fs::create_dir(&real_dir).unwrap();
    fs::create_dir(&mount).unwrap();
    in_mount_namespace(
        "dir_mount_entry",
        &real_dir,
        &mount,
        &[("PD_REAL", &real_dir), ("PD_MOUNT", &mount)],
    );
}

/// Not a test of its own: in the mount namespace of
/// [`a_registry_reached_through_a_bind_mounted_directory_is_one_registry`].
#[test]
fn dir_mount_entry() {
    if std::env::var_os(MOUNT_CHILD).is_none() {
        return;
    }
    let real = PathBuf::from(std::env::var_os("PD_REAL").unwrap()).join("reg.sqlite3");
    let mounted = PathBuf::from(std::env::var_os("PD_MOUNT").unwrap()).join("reg.sqlite3");
    two_paths_are_one_registry(&mounted, &real, &real);
    say("passed");
}

/// An owner in a PID namespace of its own that opened the registry through a symbolic link
/// keeps its lock file beside the real file, where the host, which opened the real path,
/// looks: the host neither reaps its leases nor hands out its ports.
#[test]
fn an_owner_in_another_pid_namespace_on_a_symlink_keeps_its_ports() {
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        other => {
            println!("skipped: cannot make a PID namespace here: {other:?}");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("reg.sqlite3");
    let link = tmp.path().join("link.sqlite3");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let host = open_at(&real).unwrap();
    let mut holder = Worker::spawn_with(
        "namespaced holder",
        "hold",
        &link,
        &RANGE_ALL,
        &[],
        in_new_pid_namespace,
    );
    assert_eq!(holder.expect_line("READY", deadline()), "READY");
    holder.send("go");
    let line = holder.expect_line("PORTS", deadline());
    let held: BTreeSet<u16> = line
        .strip_prefix("PORTS ")
        .expect("a PORTS line")
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(held.len(), HELD);
    assert_eq!(host.reap().unwrap(), 0, "the host reaped a live lease");
    let mut guards = Vec::new();
    loop {
        match host.acquire("host") {
            Ok(guard) => {
                assert!(
                    !held.contains(&guard.port()),
                    "the host got port {}, held in the other namespace",
                    guard.port()
                );
                guards.push(guard);
            }
            Err(Error::Exhausted { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(guards.len(), RANGE_ALL.len() - HELD);
    holder.close_stdin();
    let (_, status) = holder.finish(deadline());
    assert!(status.success(), "{status}; stderr:\n{}", holder.stderr());
}

// ---------------------------------------------------------------------------------------------
// Two handles on one registry in one process

/// The ports of the test below, probed as free without binding them.
const VISIT_RANGE: std::ops::RangeInclusive<u16> = 32450..=32499;

fn open_in_visit_range(path: &Path) -> portdaddy::Result<PortDaddy> {
    PortDaddy::builder()
        .path(path)
        .range(VISIT_RANGE)
        .port_probe(all_free)
        .lock_timeout(Duration::from_secs(10))
        .open()
}

/// A worker that opens the registry, asks for the port `PREFERRED` and says which port it
/// got.
fn visit() {
    let registry = open_in_visit_range(Path::new(&var(REGISTRY))).expect("open the registry");
    let preferred: u16 = var("PREFERRED").parse().unwrap();
    let guard = registry
        .acquire_with(&portdaddy::Request::new("visitor").preferred(preferred))
        .unwrap();
    say(&format!("GOT {}", guard.port()));
}

/// Runs a [`visit`] worker asking for `preferred`; the port it got.
fn visitor_gets(path: &Path, preferred: u16) -> u16 {
    let extra = [("PREFERRED", preferred.to_string())];
    let mut worker = Worker::spawn("visitor", "visit", path, &VISIT_RANGE, &extra);
    let line = worker.expect_line("GOT", deadline());
    let (_, status) = worker.finish(deadline());
    assert!(status.success(), "visitor: {status}: {}", worker.stderr());
    line.strip_prefix("GOT ").unwrap().parse().unwrap()
}

/// Reads the registry as any other SQLite client would (the `sqlite3` shell, a backup
/// script): when it closes its connection and finds itself the last user of the database,
/// it checkpoints it and removes its `-wal` and `-shm` files. `None` when the shell is not
/// installed.
fn read_with_sqlite_shell(path: &Path) -> Option<String> {
    let out = Command::new("sqlite3")
        .arg(path)
        .arg("SELECT count(*) FROM leases;")
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "sqlite3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap().trim().to_owned())
}

/// SQLite locks its files with POSIX locks, which a process loses on every descriptor of a
/// file when it closes any one of them. A second handle opened in a process that has one
/// open must not drop the first one's locks: another client would then take itself for the
/// last user of the registry, remove the write-ahead log under the first handle, and the
/// first handle would go on writing leases that no other process sees.
#[test]
fn a_second_handle_in_one_process_keeps_the_first_ones_leases_visible_to_others() {
    let (_dir, path) = common::temp_registry();
    let first = open_in_visit_range(&path).unwrap();
    let held = first.acquire("first").unwrap();
    let second = open_in_visit_range(&path).unwrap();
    drop(open_in_visit_range(&path).unwrap());
    // Another client opens and closes the registry.
    let Some(count) = read_with_sqlite_shell(&path) else {
        println!("skipped: the sqlite3 shell is not installed");
        return;
    };
    assert_eq!(count, "1");
    // What the first handle leases now must be seen by every other process.
    let later = first.acquire("later").unwrap();
    let got = visitor_gets(&path, later.port());
    assert_ne!(
        got,
        later.port(),
        "another process was given port {got}, which this process holds"
    );
    assert!(
        sibling(&path, "-wal").exists() && sibling(&path, "-shm").exists(),
        "another client removed the write-ahead log while this process uses it"
    );
    drop((held, later, second));
}

// ---------------------------------------------------------------------------------------------
// Files planted while the registry opens

/// A rollback journal of one page: rolled back, it writes `page` at page `pgno` of a database
/// of `pages` pages of `page_size` bytes (SQLite's journal format: a header padded to a
/// 512-byte sector, then page number, page, checksum).
fn hot_journal(pgno: u32, page: &[u8], pages: u32, page_size: u32) -> Vec<u8> {
    const NONCE: u32 = 0x1234_5678;
    let mut journal = vec![0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];
    for field in [1, NONCE, pages, 512, page_size] {
        journal.extend_from_slice(&u32::to_be_bytes(field));
    }
    journal.resize(512, 0);
    journal.extend_from_slice(&pgno.to_be_bytes());
    journal.extend_from_slice(page);
    let mut checksum = NONCE;
    let mut i = page_size as isize - 200;
    while i > 0 {
        checksum = checksum.wrapping_add(u32::from(page[i as usize]));
        i -= 200;
    }
    journal.extend_from_slice(&checksum.to_be_bytes());
    journal
}

/// Writes a registry's write-ahead log into its file and removes it, as the last process
/// to close it does; the registry's page size, page count and the root page of its leases.
fn checkpoint(path: &Path) -> (u32, u32, u32) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let get = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, u32>(0)).unwrap();
    let shape = (
        get("PRAGMA page_size"),
        get("PRAGMA page_count"),
        get("SELECT rootpage FROM sqlite_schema WHERE name = 'leases'"),
    );
    conn.close().unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = fs::remove_file(sibling(path, suffix));
    }
    shape
}

/// Another user who plants a rollback journal beside a registry in a sticky directory the
/// moment it is opened (after its files were checked, before SQLite first reads it) gets
/// nothing written into it: SQLite would roll the journal back into the registry, here
/// emptying the table of leases. The open is held at that moment by a POSIX lock on the
/// registry that SQLite waits for, taken before and released once the journal is planted.
#[test]
fn a_journal_planted_while_the_registry_opens_is_never_rolled_back_into_it() {
    let Some(user) = other_user() else {
        return;
    };
    let (tmp, shared) = sticky_dir();
    // A page of an empty table of leases, from a registry without leases.
    let empty = tmp.path().join("empty.sqlite3");
    drop(open_in_visit_range(&empty).unwrap());
    let (page_size, _, empty_root) = checkpoint(&empty);
    let bytes = fs::read(&empty).unwrap();
    let at = (empty_root - 1) as usize * page_size as usize;
    let empty_page = bytes[at..at + page_size as usize].to_vec();

    let path = shared.join("reg.sqlite3");
    let registry = open_in_visit_range(&path).unwrap();
    let lease = registry
        .acquire_with(&portdaddy::Request::new("web").ttl(Duration::from_secs(3600)))
        .unwrap()
        .keep()
        .unwrap();
    drop(registry);
    let (size, pages, root) = checkpoint(&path);
    assert_eq!(
        (size, root),
        (page_size, empty_root),
        "registries differ in shape"
    );
    let planted = tmp.path().join("journal");
    fs::write(&planted, hot_journal(root, &empty_page, pages, page_size)).unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o644)).unwrap();

    // SQLite's shared lock on the registry waits while a write lock holds its pending byte.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let lock = |kind: libc::c_short| {
        // SAFETY: an all-zero flock is a valid value; the fields are set below.
        let mut region: libc::flock = unsafe { std::mem::zeroed() };
        region.l_type = kind;
        region.l_whence = libc::SEEK_SET as libc::c_short;
        region.l_start = 0x4000_0000;
        region.l_len = 1;
        // SAFETY: F_SETLK on a descriptor `file` keeps open, with a valid flock.
        let rc = unsafe {
            use std::os::fd::AsRawFd;
            libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &region)
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    };
    lock(libc::F_WRLCK as libc::c_short);
    let opener = Command::new(env!("CARGO_BIN_EXE_portdaddy"))
        .arg("--db")
        .arg(&path)
        .arg("list")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The opener creates the `-wal` once the files are checked, just before SQLite opens.
    let until = deadline();
    while !sibling(&path, "-wal").exists() {
        assert!(
            Instant::now() < until,
            "the opener never got past its checks"
        );
        std::thread::yield_now();
    }
    user.run(
        &shared,
        &format!(
            "cp {} reg.sqlite3-journal 2>/dev/null || true",
            planted.display()
        ),
    );
    lock(libc::F_UNLCK as libc::c_short);
    drop(file);
    let out = opener.wait_with_output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(&lease.port().to_string()),
        "the registry lost its lease ({}): {listed}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !sibling(&path, "-journal").exists(),
        "a rollback journal was left beside the registry"
    );
    let registry = open_in_visit_range(&path).unwrap();
    assert_eq!(registry.list().unwrap(), vec![lease]);
}

/// A registry below a directory that another user may change (theirs, or one they may
/// write without a sticky bit) is refused, naming that directory, and nothing is created:
/// they could rename the registry's directory and put one of their own in its place, whose
/// lock files would then be the ones opened. Below a sticky directory such as `/tmp` it is
/// used.
#[test]
fn a_registry_below_a_directory_another_user_may_change_is_refused() {
    let Some(user) = other_user() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let above = tmp.path().join("above");
    let dir = above.join("ours");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("reg.sqlite3");
    let chown = |uid: u32| {
        let c_path = std::ffi::CString::new(above.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::chown(c_path.as_ptr(), uid, u32::MAX) }, 0);
    };
    chown(user.uid);
    let before = snapshot(tmp.path());
    let err = open_at(&path).expect_err("a directory of another user above the registry");
    assert_refused(&err, &above, "belongs to");
    assert_eq!(snapshot(tmp.path()), before);

    chown(0);
    fs::set_permissions(&above, fs::Permissions::from_mode(0o775)).unwrap();
    let before = snapshot(tmp.path());
    let err = open_at(&path).expect_err("a directory others may write above the registry");
    assert_refused(&err, &above, "can write to this directory");
    assert_eq!(snapshot(tmp.path()), before);

    fs::set_permissions(&above, fs::Permissions::from_mode(0o1777)).unwrap();
    open_at(&path).expect("below a sticky directory");
}
