//! Hostile input that `bad_input.rs` does not already cover: damaged registry files
//! (a garbage `-wal`, random byte flips anywhere in a real registry), names built to confuse
//! SQL or a terminal, and directories prepared by someone else where the default path falls
//! back to the shared temp directory.
//!
//! Ports 26900-26949 belong to this file (see `common`); nothing here binds them, since every
//! registry's port probe says every port is free.

use crate::common;
use crate::common::sibling;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{all_free, temp_registry};
use portdaddy::{Error, PortDaddy};
use proptest::prelude::*;

const FIRST: u16 = 26900;
const LAST: u16 = 26949;

fn open_at(path: &Path) -> portdaddy::Result<PortDaddy> {
    PortDaddy::builder()
        .path(path)
        .range(FIRST..=LAST)
        .port_probe(all_free)
        .lock_timeout(Duration::from_secs(5))
        .open()
}

/// A real registry at `path` with detached leases, a lease of a dead owner and remembered
/// names; every handle closed and the WAL folded into the file. Returns the ports of
/// the detached leases, by name.
fn make_registry(path: &Path) -> Vec<(String, u16)> {
    let registry = open_at(path).expect("open a new registry");
    let kept: Vec<(String, u16)> = ["api", "web", "db"]
        .iter()
        .map(|name| {
            let lease = registry.acquire(name).unwrap().keep().unwrap();
            (name.to_string(), lease.port())
        })
        .collect();
    drop(registry.acquire_many(&["queue", "cache"]).unwrap());
    drop(registry);
    common::fold_wal(path);
    kept
}

// ---------------------------------------------------------------------------------------------
// Damaged files
// ---------------------------------------------------------------------------------------------

/// A `-wal` full of garbage beside an intact registry (left by a crash of the disk or a copy
/// tool, not by SQLite) fails SQLite's checksums, so SQLite ignores it: the registry opens
/// with every lease it had, works, and stays intact.
#[test]
fn a_garbage_wal_is_ignored_and_the_registry_keeps_its_leases() {
    for garbage in [
        vec![0u8; 4096],
        (0..70_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        b"not a write-ahead log".to_vec(),
    ] {
        let (_dir, path) = temp_registry();
        let kept = make_registry(&path);
        let before = fs::read(&path).unwrap();
        fs::write(sibling(&path, "-wal"), &garbage).unwrap();

        let registry = open_at(&path).expect("a registry with a garbage WAL opens");
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "opening changed the registry file"
        );
        let mut listed: Vec<(String, u16)> = registry
            .list()
            .unwrap()
            .iter()
            .map(|l| (l.name().to_owned(), l.port()))
            .collect();
        listed.sort();
        let mut expected = kept.clone();
        expected.sort();
        assert_eq!(listed, expected);
        let guard = registry.acquire("after").expect("a claim");
        assert!(kept.iter().all(|(_, p)| *p != guard.port()));
        drop(guard);
        drop(registry);

        let conn = rusqlite::Connection::open(&path).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
}

/// A real registry with its bytes flipped anywhere must never make `open`, `acquire`,
/// `list`, `reap` or `release` panic: each returns a value or a typed error. When `open`
/// refuses the file, the file is byte for byte as it was.
#[test]
fn flipped_bytes_in_a_registry_never_cause_a_panic() {
    let (_src_dir, src) = temp_registry();
    make_registry(&src);
    let original = fs::read(&src).unwrap();
    let len = original.len();
    let config = ProptestConfig {
        cases: 192,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(flips in prop::collection::vec((0..len, 1u8..=255), 1..8))| {
        let mut bytes = original.clone();
        for (at, mask) in &flips {
            bytes[*at] ^= mask;
        }
        let (_dir, path) = temp_registry();
        fs::write(&path, &bytes).unwrap();
        match open_at(&path) {
            Err(e) => {
                assert_typed(&e, &path);
                prop_assert_eq!(fs::read(&path).unwrap(), bytes, "a refused file was changed");
            }
            Ok(registry) => {
                for result in [
                    registry.acquire("flip").map(|g| g.port()),
                    registry.list().map(|l| l.len() as u16),
                    registry.reap().map(|n| n as u16),
                    registry.release_port(FIRST).map(u16::from),
                    registry.acquire_many(&["x", "y"]).map(|g| g.len() as u16),
                ] {
                    if let Err(e) = result {
                        assert_typed(&e, &path);
                    }
                }
            }
        }
    });
}

/// The same with the flips in a `-wal` that holds the registry's latest commits: SQLite
/// keeps the frames up to the first one that fails its checksum, and nothing panics.
#[test]
fn flipped_bytes_in_a_pending_wal_never_cause_a_panic() {
    let (_src_dir, src) = temp_registry();
    make_registry(&src);
    // A second handle's commits stay in the WAL while it is open: copy both files then.
    let writer = open_at(&src).unwrap();
    for name in ["w1", "w2", "w3"] {
        writer.acquire(name).unwrap().keep().unwrap();
    }
    let main = fs::read(&src).unwrap();
    let wal = fs::read(sibling(&src, "-wal")).unwrap();
    drop(writer);
    assert!(wal.len() > 32, "no pending WAL to damage");
    let len = wal.len();
    let config = ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(flips in prop::collection::vec((0..len, 1u8..=255), 1..8))| {
        let mut damaged = wal.clone();
        for (at, mask) in &flips {
            damaged[*at] ^= mask;
        }
        let (_dir, path) = temp_registry();
        fs::write(&path, &main).unwrap();
        fs::write(sibling(&path, "-wal"), &damaged).unwrap();
        match open_at(&path) {
            Err(e) => assert_typed(&e, &path),
            Ok(registry) => {
                let listed = registry.list();
                if let Err(e) = &listed {
                    assert_typed(e, &path);
                }
                for result in [
                    registry.acquire("flip").map(|g| g.port()),
                    registry.reap().map(|n| n as u16),
                ] {
                    if let Err(e) = result {
                        assert_typed(&e, &path);
                    }
                }
            }
        }
    });
}

/// Errors from a damaged file name the registry.
fn assert_typed(err: &Error, path: &Path) {
    let text = err.to_string();
    match err {
        Error::Corrupt { .. }
        | Error::Open { .. }
        | Error::Registry { .. }
        | Error::SchemaTooNew { .. } => {
            assert!(text.contains(&path.display().to_string()), "{text}");
        }
        Error::Exhausted { .. } | Error::LeaseLost { .. } => {}
        other => panic!("unexpected error for a damaged file: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile names
// ---------------------------------------------------------------------------------------------

/// Names made of SQL syntax, wildcards and quotes are plain labels: stored and listed
/// verbatim, remembered only for themselves, and the registry is unharmed.
#[test]
fn names_with_sql_metacharacters_are_stored_verbatim() {
    let (_dir, path) = temp_registry();
    let registry = open_at(&path).unwrap();
    let names = [
        "'; DROP TABLE leases; --",
        "\" OR 1=1 --",
        "%",
        "_",
        "a%",
        "ab",
        "back\\slash",
        "x'); DELETE FROM names; SELECT ('",
        "[31mnot an escape",
        "Robert'); DROP TABLE names;--",
    ];
    let mut ports = Vec::new();
    for name in names {
        let lease = registry.acquire(name).unwrap().keep().unwrap();
        assert_eq!(lease.name(), name);
        ports.push(lease.port());
    }
    let listed: Vec<String> = registry
        .list()
        .unwrap()
        .iter()
        .map(|l| l.name().to_owned())
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    expected.sort();
    assert_eq!(sorted, expected);
    for port in &ports {
        assert!(registry.release_port(*port).unwrap());
    }
    drop(registry);
    // Reopened: each name gets its own port back, and the wildcard names match nothing else.
    let registry = open_at(&path).unwrap();
    for (name, port) in names.iter().zip(&ports) {
        let guard = registry.acquire(name).unwrap();
        assert_eq!(
            guard.port(),
            *port,
            "{name:?} did not get its own port back"
        );
        guard.keep().unwrap();
    }
}

/// Terminal escape sequences and NUL are refused whole, with a message that contains no raw
/// control character; so is a megabyte of them.
#[test]
fn names_with_escape_sequences_or_nul_are_refused_and_printed_safely() {
    let (_dir, path) = temp_registry();
    let registry = open_at(&path).unwrap();
    let long = "\u{1b}[2J".repeat(250_000);
    for name in [
        "\u{1b}[31mred\u{1b}[0m",
        "\u{1b}]0;title\u{7}",
        "\u{9b}31m",
        "nul\0inside",
        "tab\tinside",
        "\r",
        long.as_str(),
    ] {
        match registry.acquire(name) {
            Err(err @ Error::InvalidName { .. }) => {
                let text = err.to_string();
                assert!(
                    !text.chars().any(char::is_control),
                    "raw control characters in {text:?}"
                );
                assert!(text.len() < 600, "a {}-byte message", text.len());
            }
            other => panic!("{name:?}: expected InvalidName, got {other:?}"),
        }
    }
    assert!(registry.list().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Other users
// ---------------------------------------------------------------------------------------------

/// Runs the test binary again as `<binary> <test> --exact` with `env` and no other
/// variables (so that the default path falls back to the temp directory), and returns what
/// the child printed on its `@pd` line.
#[cfg(unix)]
fn default_path_child(test: &str, env: &[(&str, &Path)]) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut command = std::process::Command::new(exe);
    command
        .args([&sibling_test!(test), "--exact", "--nocapture"])
        .env_clear()
        .env(CHILD, "1");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run the child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("@pd "))
        .unwrap_or_else(|| panic!("no @pd line in {stdout}"))
        .to_owned()
}

/// Set in the child of [`default_path_child`].
const CHILD: &str = "PORTDADDY_HOSTILE_CHILD";

/// Not a test of its own: in the child of [`default_path_child`], opens the default registry
/// (no `HOME`, `XDG_STATE_HOME` or `PORTDADDY_DB`: the shared temp directory) and prints
/// `@pd ok <path>` or `@pd err <error>`.
#[test]
fn default_path_entry() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    match PortDaddy::builder().port_probe(all_free).open() {
        Ok(registry) => println!("\n@pd ok {}", registry.path().unwrap().display()),
        Err(e) => println!("\n@pd err {}", common::chain(&e)),
    }
}

/// The `portdaddy-<uid>` directory in `tmp` that the default path falls back to.
#[cfg(unix)]
fn shared_dir(tmp: &Path) -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    tmp.join(format!("portdaddy-{}", unsafe { libc::getuid() }))
}

/// With no home and no state directory, the default registry lives in the shared temp
/// directory, in a directory created `0700` with a `0600` file.
#[cfg(unix)]
#[test]
fn the_shared_temp_fallback_creates_a_private_directory() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let line = default_path_child("default_path_entry", &[("TMPDIR", tmp.path())]);
    let dir = shared_dir(tmp.path());
    let file = dir.join("registry.sqlite3");
    assert_eq!(line, format!("ok {}", file.display()));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&file), 0o600);
}

/// Puts something at the shared directory's path before the registry is opened.
type Prepare = Box<dyn Fn(&Path)>;

/// A pre-existing `portdaddy-<uid>` that others may write, that is a symlink (to a directory
/// or to nowhere), or that another user owns, is refused with an error that says why and
/// names `PORTDADDY_DB`; nothing is created in it or through it.
#[cfg(unix)]
#[test]
fn a_prepared_shared_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mut cases: Vec<(&str, Prepare)> = vec![
        (
            "other users can write",
            Box::new(|dir: &Path| {
                fs::create_dir(dir).unwrap();
                fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
            }),
        ),
        (
            "other users can write",
            Box::new(|dir: &Path| {
                fs::create_dir(dir).unwrap();
                fs::set_permissions(dir, fs::Permissions::from_mode(0o770)).unwrap();
            }),
        ),
        (
            "symbolic link",
            Box::new(|dir: &Path| {
                let target = dir.with_file_name("attacker");
                fs::create_dir(&target).unwrap();
                std::os::unix::fs::symlink(&target, dir).unwrap();
            }),
        ),
        (
            "symbolic link",
            Box::new(|dir: &Path| {
                std::os::unix::fs::symlink(dir.with_file_name("nowhere"), dir).unwrap();
            }),
        ),
    ];
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        cases.push((
            "belongs to another user",
            Box::new(|dir: &Path| {
                fs::create_dir(dir).unwrap();
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
                std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
            }),
        ));
    } else {
        println!("not run: a directory of another user (needs root to chown)");
    }
    for (why, prepare) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = shared_dir(tmp.path());
        prepare(&dir);
        let line = default_path_child("default_path_entry", &[("TMPDIR", tmp.path())]);
        assert!(line.starts_with("err "), "{why}: opened: {line}");
        assert!(line.contains(why), "{why}: {line}");
        assert!(line.contains("PORTDADDY_DB"), "{why}: {line}");
        for place in [tmp.path().join("attacker"), dir.clone()] {
            if place.is_dir() {
                assert_eq!(
                    fs::read_dir(&place).unwrap().count(),
                    0,
                    "{why}: files were created in {}",
                    place.display()
                );
            }
        }
        assert!(!tmp.path().join("nowhere").exists(), "{why}");
    }
}

/// Inside a private `portdaddy-<uid>`, a registry file (or its lock file) that is a symbolic
/// link, that others may write, or that another user owns is refused the same way, and the
/// file a link points to is left alone.
#[cfg(unix)]
#[test]
fn a_prepared_file_in_the_shared_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mut cases: Vec<(&str, &str, Prepare)> = vec![
        (
            "registry.sqlite3",
            "symbolic link",
            Box::new(|file: &Path| {
                let target = file.parent().unwrap().with_file_name("attacker.sqlite3");
                fs::write(&target, b"").unwrap();
                std::os::unix::fs::symlink(&target, file).unwrap();
            }),
        ),
        (
            "registry.sqlite3",
            "symbolic link",
            Box::new(|file: &Path| {
                std::os::unix::fs::symlink(file.with_file_name("nowhere"), file).unwrap();
            }),
        ),
        (
            "registry.sqlite3",
            "other users can write",
            Box::new(|file: &Path| {
                fs::write(file, b"").unwrap();
                fs::set_permissions(file, fs::Permissions::from_mode(0o666)).unwrap();
            }),
        ),
        (
            "registry.sqlite3.lock",
            "symbolic link",
            Box::new(|file: &Path| {
                let target = file.parent().unwrap().with_file_name("attacker.lock");
                fs::write(&target, b"").unwrap();
                std::os::unix::fs::symlink(&target, file).unwrap();
            }),
        ),
    ];
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        cases.push((
            "registry.sqlite3",
            "belongs to another user",
            Box::new(|file: &Path| {
                fs::write(file, b"").unwrap();
                std::os::unix::fs::chown(file, Some(65534), Some(65534)).unwrap();
            }),
        ));
    } else {
        println!("not run: a file of another user (needs root to chown)");
    }
    for (name, why, prepare) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = shared_dir(tmp.path());
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        prepare(&dir.join(name));
        let before: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let line = default_path_child("default_path_entry", &[("TMPDIR", tmp.path())]);
        assert!(line.starts_with("err "), "{name} {why}: opened: {line}");
        assert!(line.contains(why), "{name} {why}: {line}");
        assert!(line.contains("PORTDADDY_DB"), "{name} {why}: {line}");
        let after: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(after, before, "{name} {why}: files were created");
        for target in ["attacker.sqlite3", "attacker.lock"] {
            let target = tmp.path().join(target);
            if target.exists() {
                assert_eq!(
                    fs::read(&target).unwrap(),
                    b"",
                    "{name} {why}: wrote through the link"
                );
            }
        }
        assert!(
            !dir.join("nowhere").exists(),
            "{name} {why}: created through the link"
        );
    }
}
