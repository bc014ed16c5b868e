//! The platform layer as other processes see it: the kind of lock a handle holds on its
//! owner lock file, and which user a process counts as itself. Section 27 of
//! `RELIABILITY.md` says what holds.
//!
//! # Ports
//!
//! This file owns 32700-32749 (see `common`); its tests probe no port (the port probe says
//! every port is free), so they need no host-wide lock.
#![cfg(unix)]

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::all_free;
use common::workers::say;
use portdaddy::PortDaddy;

/// Set in a child that runs [`setuid_entry`].
const CHILD: &str = "PORTDADDY_SYS_CHILD";

/// The one owner lock file in `owners`.
fn only_lock_file(owners: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(owners)
        .expect("the owners directory")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

/// Runs `flock -n -E 75 FILE true` in another process: `Some(true)` if it got the lock,
/// `Some(false)` if someone holds it, `None` (printed) without a usable `flock(1)`.
fn flock_from_another_process(file: &Path) -> Option<bool> {
    match Command::new("flock")
        .args(["-n", "-E", "75"])
        .arg(file)
        .arg("true")
        .output()
    {
        Ok(out) if out.status.success() => Some(true),
        Ok(out) if out.status.code() == Some(75) => Some(false),
        other => {
            println!("skipped: flock(1) cannot be run: {other:?}");
            None
        }
    }
}

/// A handle's owner lock is an `flock`, the kind earlier versions took: another process
/// that takes an `flock` on the file (as an older build's sweep or liveness check would)
/// cannot while the handle is open, and could once it let go.
#[test]
fn the_owner_lock_excludes_an_flock_of_another_process() {
    let (_dir, path) = common::temp_registry();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(32700..=32709)
        .port_probe(all_free)
        .open()
        .unwrap();
    let guard = registry.acquire("web").unwrap();
    let owners = PathBuf::from(format!("{}.owners", path.display()));
    let file = only_lock_file(&owners);
    let Some(free) = flock_from_another_process(&file) else {
        return;
    };
    assert!(!free, "another process took the lock of an open handle");
    drop(guard);
    drop(registry);
    assert!(!file.exists(), "a closed handle removes its lock file");
}

/// A user made for one test, removed when dropped (also when the test fails), with the
/// shared temp directory of registries it got.
struct TempUser {
    user: common::users::TestUser,
}

impl TempUser {
    /// Adds a fresh user, or `None` (with the reason printed) where that is not possible.
    fn add() -> Option<Self> {
        let user = common::users::TestUser::add("pds", "add a user and make a setuid program")?;
        Some(Self { user })
    }

    /// The directory of registries of this user in the shared temp directory.
    fn shared_dir(&self) -> PathBuf {
        Path::new("/tmp").join(format!("portdaddy-{}", self.user.uid))
    }
}

impl Drop for TempUser {
    /// Removes the user's directories before the user (dropped after this).
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let _ = fs::remove_dir_all(self.shared_dir());
        // A build that named the directory after the real uid (root's) made this one.
        let real = Path::new("/tmp/portdaddy-0");
        if fs::symlink_metadata(real).is_ok_and(|m| m.uid() == self.user.uid) {
            let _ = fs::remove_dir_all(real);
        }
    }
}

/// Not a test of its own: in the setuid child of
/// [`a_setuid_process_uses_the_registry_of_its_effective_user`], prints its real and
/// effective uid (`@pd ids R E`), then opens the default registry, takes a port and prints
/// `@pd ok <path>` or `@pd err <error>`.
#[test]
fn setuid_entry() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let real = rustix::process::getuid().as_raw();
    let effective = rustix::process::geteuid().as_raw();
    say(&format!("ids {real} {effective}"));
    let opened = PortDaddy::builder()
        .range(32710..=32719)
        .port_probe(all_free)
        .open()
        .and_then(|registry| {
            let _guard = registry.acquire("web")?;
            Ok(registry)
        });
    match opened {
        Ok(registry) => say(&format!("ok {}", registry.path().unwrap().display())),
        Err(e) => say(&format!("err {e}")),
    }
}

/// One uid rule: a process whose real and effective users differ (a setuid program, run by
/// root) counts as its effective user, the one its files are created as. With no `HOME` or
/// `XDG_STATE_HOME` it uses, and accepts, `/tmp/portdaddy-<effective uid>`, which it
/// created; it used to name the directory after the real uid and refuse the one it made as
/// "another user's".
#[test]
fn a_setuid_process_uses_the_registry_of_its_effective_user() {
    let Some(user) = TempUser::add() else { return };
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let program = tmp.path().join("probe");
    fs::copy(std::env::current_exe().unwrap(), &program).unwrap();
    std::os::unix::fs::chown(&program, Some(user.user.uid), None).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o4755)).unwrap();
    let output = Command::new(&program)
        .args([&sibling_test!("setuid_entry"), "--exact", "--nocapture"])
        .env_clear()
        .env(CHILD, "1")
        .output()
        .expect("run the setuid child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("@pd "))
        .collect();
    assert!(output.status.success(), "child failed: {stdout}");
    if lines.first() != Some(&format!("ids 0 {}", user.user.uid).as_str()) {
        println!("skipped: the setuid bit took no effect here (nosuid mount?): {lines:?}");
        return;
    }
    let registry = user.shared_dir().join("registry.sqlite3");
    assert_eq!(
        lines.get(1).copied(),
        Some(format!("ok {}", registry.display()).as_str()),
        "{stdout}"
    );
    use std::os::unix::fs::MetadataExt;
    let dir = fs::symlink_metadata(user.shared_dir()).unwrap();
    assert_eq!(
        dir.uid(),
        user.user.uid,
        "the directory is the effective user's"
    );
    assert_eq!(dir.mode() & 0o777, 0o700);
}
