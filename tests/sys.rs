//! The platform layer as other processes see it: the kind of lock a handle holds on its
//! owner lock file, and which user a process counts as itself. Section 24 of
//! `RELIABILITY.md` says what holds.
//!
//! # Ports
//!
//! This file owns 32700-32749 (see `tests/common/mod.rs`); its tests probe no port (the
//! port probe says every port is free), so they need no host-wide lock.
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::all_free;
use portdaddy::PortDaddy;

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
