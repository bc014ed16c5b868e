//! For tests that run a worker under `strace` to hold it at a system call, or in a mount
//! namespace of its own, and look at what it left in a directory.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::workers::Worker;

/// How long any wait on a worker or a condition may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A uid that no file of the tests belongs to (`nobody` on most systems).
pub const NOBODY: u32 = 65534;

pub fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

/// Polls `condition` until it holds, failing the test at the deadline.
#[track_caller]
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let give_up = deadline();
    while !condition() {
        assert!(Instant::now() < give_up, "{what}: not before the deadline");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The names in `dir`.
pub fn names_in(dir: &Path) -> BTreeSet<OsString> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect()
}

/// The pid of a worker's `PID <pid>` line.
pub fn expect_pid(worker: &Worker) -> u32 {
    let line = worker.expect_line("PID", deadline());
    line.strip_prefix("PID ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{}: expected PID <pid>, got {line:?}", worker.label))
}

/// Whether a thread of process `pid` is in (or stopped at) system call `nr`.
pub fn in_syscall(pid: u32, nr: libc::c_long) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        fs::read_to_string(task.path().join("syscall")).is_ok_and(|s| {
            s.split(' ')
                .next()
                .and_then(|n| n.trim().parse::<libc::c_long>().ok())
                == Some(nr)
        })
    })
}

/// Runs `command` in a mount namespace of its own (`unshare -m`), whose mounts go with it.
pub fn in_new_mount_namespace(command: &mut Command) {
    super::run_through(command, "unshare", ["-m", "--propagation", "private"]);
}

/// A directory for a small tmpfs that a worker mounts over it (see [`create_and_say`]), in a
/// temporary directory, and the registry path in it; `None`, saying so, where this process
/// is not root and so cannot mount one.
pub fn small_tmpfs_dir() -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
    if !super::is_root() {
        println!("skipped: needs root to mount a small tmpfs");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("small");
    fs::create_dir(&dir).unwrap();
    let path = dir.join("registry.sqlite3");
    Some((tmp, dir, path))
}

/// What makes a worker of [`create_and_say`] mount its small tmpfs at `dir` first, in a mount
/// namespace of its own: `small_tmpfs` is the worker's variable that names the directory.
pub fn on_small_tmpfs<'a>(small_tmpfs: &'a str, dir: &'a Path) -> impl FnOnce(&mut Command) + 'a {
    move |command| {
        in_new_mount_namespace(command);
        command.env(small_tmpfs, dir);
    }
}

/// Whether a worker of [`create_and_say`] started: its first line is `PID <pid>`. `false`,
/// saying why, when it could not mount its tmpfs (`SKIP …`).
pub fn started(worker: &Worker) -> bool {
    let first = worker
        .lines
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| "nothing".into());
    if let Some(why) = first.strip_prefix("SKIP ") {
        println!("skipped: {why}");
        return false;
    }
    assert!(first.starts_with("PID "), "{first}");
    true
}

/// Runs `command` under `strace` (found by [`strace`]) with `args`, following its threads
/// and children, writing what it traces to `log` (or nowhere).
pub fn under_strace<S: AsRef<OsStr>>(
    command: &mut Command,
    strace: &Path,
    log: Option<&Path>,
    args: impl IntoIterator<Item = S>,
) {
    let log = log.map_or_else(|| OsString::from("/dev/null"), |l| l.as_os_str().to_owned());
    let mut all: Vec<OsString> = ["-f", "-qq", "-o"].iter().map(OsString::from).collect();
    all.push(log);
    all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    super::run_through(command, strace, all);
}

/// The path of `strace`, or `None` (with the skip printed) where it is not installed or
/// cannot trace here (no `ptrace` in a container, say).
pub fn strace() -> Option<PathBuf> {
    let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("strace"))
            .find(|p| p.is_file())
    }) else {
        println!("skipped: strace is not installed, and it holds the worker at a step");
        return None;
    };
    let traces = Command::new(&found)
        .args(["-o", "/dev/null", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !traces {
        println!("skipped: strace cannot trace a process here, and it holds the worker");
        return None;
    }
    Some(found)
}

/// The body of a creating worker: mounts a tmpfs of `tmpfs_size` at the directory named by
/// the environment variable `small_tmpfs` if it is set (saying `SKIP …` and returning
/// `None` where that fails), says `PID <pid>`, waits for a line, opens the registry at
/// `path` (a probe that binds nothing), leases a port and keeps it: `PORT <port>`, or
/// `ERR <variant> <message>`. Returns the tmpfs directory, if any, for the caller to report
/// on, or `None` also when the parent went away before its line.
pub fn create_and_say(
    path: &Path,
    range: &std::ops::RangeInclusive<u16>,
    small_tmpfs: &str,
    tmpfs_size: &str,
) -> Option<Option<PathBuf>> {
    use super::workers::{read_line, say};
    let small = std::env::var_os(small_tmpfs).map(PathBuf::from);
    if let Some(dir) = &small {
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={tmpfs_size}"))
            .arg("tmpfs")
            .arg(dir)
            .status();
        if !mounted.as_ref().is_ok_and(|s| s.success()) {
            say(&format!("SKIP cannot mount a tmpfs: {mounted:?}"));
            return None;
        }
    }
    say(&format!("PID {}", std::process::id()));
    read_line()?;
    let result = portdaddy::PortDaddy::builder()
        .path(path)
        .range(range.clone())
        .port_probe(super::all_free)
        .open()
        .and_then(|registry| Ok(registry.acquire("created")?.keep()?.port()));
    match result {
        Ok(port) => say(&format!("PORT {port}")),
        Err(e) => {
            let variant = format!("{e:?}");
            let variant = variant.split([' ', '{', '(']).next().unwrap_or_default();
            say(&format!("ERR {variant} {}", super::chain(&e)));
        }
    }
    Some(small)
}
