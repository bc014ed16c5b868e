//! Process identity from the operating system, and the default [`ProcessProbe`].
//!
//! An owner is (pid, start time, boot id). On Linux the start time is field 22 of
//! `/proc/<pid>/stat` (clock ticks since boot) and the boot id is
//! `/proc/sys/kernel/random/boot_id`; one small file read answers a liveness question. Elsewhere
//! `sysinfo` gives the start time in seconds since the epoch, which already differs across
//! boots, so the boot id is left empty there.

use std::sync::{Mutex, OnceLock};

use super::ProcessProbe;
use crate::error::{Error, Result};
use crate::lease::Owner;

/// The default [`ProcessProbe`]: asks the operating system whether the owner's pid runs with
/// the recorded start time in the current boot.
///
/// A reused pid (same pid, other start time), a lease from an earlier boot, and a zombie
/// (killed but not yet waited for) all count as dead. A process that exists but cannot be
/// inspected counts as alive.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemProcessProbe;

impl ProcessProbe for SystemProcessProbe {
    fn is_alive(&self, owner: &Owner) -> bool {
        let me = match cached_owner() {
            Some(me) => Some(std::borrow::Cow::Borrowed(me)),
            None => current_owner().ok().map(std::borrow::Cow::Owned),
        };
        if let Some(me) = me {
            if owner.boot_id() != me.boot_id() {
                return false;
            }
            if owner.pid() == me.pid() {
                return owner.start_time() == me.start_time();
            }
        }
        match state_of(owner.pid()) {
            ProcState::Running { start_time } => start_time == owner.start_time(),
            ProcState::Gone => false,
            ProcState::Unknown => true,
        }
    }
}

/// What the system says about one pid.
#[derive(Debug, PartialEq, Eq)]
enum ProcState {
    Running {
        start_time: u64,
    },
    /// No such process, or a zombie.
    Gone,
    /// The process may exist, but cannot be inspected.
    Unknown,
}

/// The identity of the process that first asked, without a lock or a copy; `None` in a
/// forked child of that process, or if it could not be read.
fn cached_owner() -> Option<&'static Owner> {
    static FIRST: OnceLock<Option<Owner>> = OnceLock::new();
    let pid = std::process::id();
    FIRST
        .get_or_init(|| self_owner().ok())
        .as_ref()
        .filter(|owner| owner.pid() == pid)
}

/// The owner identity of this process, computed once per pid (a forked child computes anew).
pub(crate) fn current_owner() -> Result<Owner> {
    if let Some(owner) = cached_owner() {
        return Ok(owner.clone());
    }
    static CACHE: Mutex<Option<Owner>> = Mutex::new(None);
    let pid = std::process::id();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(owner) = cache.as_ref().filter(|o| o.pid() == pid) {
        return Ok(owner.clone());
    }
    let owner = self_owner()?;
    *cache = Some(owner.clone());
    Ok(owner)
}

/// The identity of the calling process, read from `/proc/self` rather than `/proc/<pid>`: in
/// a PID namespace whose `/proc` is the host's, `<pid>` would name another process.
fn self_owner() -> Result<Owner> {
    let pid = std::process::id();
    let owner = match self_state() {
        ProcState::Running { start_time } => Owner::new(pid, start_time, boot_id()),
        ProcState::Gone => return Err(Error::NoSuchProcess { pid }),
        ProcState::Unknown => return Err(Error::ProcessUnreadable { pid }),
    };
    Ok(owner.in_namespace(super::owner_lock::pid_namespace()))
}

/// The identity of the running process `pid`.
pub(crate) fn owner_of(pid: u32) -> Result<Owner> {
    match state_of(pid) {
        // The pid was given in this process's namespace, so that is where it is meaningful.
        ProcState::Running { start_time } => {
            Ok(Owner::new(pid, start_time, boot_id())
                .in_namespace(super::owner_lock::pid_namespace()))
        }
        ProcState::Gone => Err(Error::NoSuchProcess { pid }),
        ProcState::Unknown => Err(Error::ProcessUnreadable { pid }),
    }
}

#[cfg(target_os = "linux")]
fn state_of(pid: u32) -> ProcState {
    // `kill(pid, 0)` answers "no such process" for a fraction of the cost of reading
    // `/proc`; only a pid that exists needs its start time read. (Pids that `kill` would take
    // for a process group, 0 and above `i32::MAX`, go straight to `/proc`.)
    if let Ok(signed) = i32::try_from(pid) {
        // SAFETY: signal 0 sends nothing; it only checks that the pid exists.
        if signed > 0
            && unsafe { libc::kill(signed, 0) } == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        {
            return ProcState::Gone;
        }
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match parse_stat(&stat) {
            Some(ProcState::Gone) => still_exiting(pid, &stat).unwrap_or(ProcState::Gone),
            other => other.unwrap_or(ProcState::Unknown),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ProcState::Gone,
        // No /proc at all: fall back to the portable query.
        Err(_) if !std::path::Path::new("/proc/self/stat").exists() => portable::state_of(pid),
        Err(_) => ProcState::Unknown,
    }
}

#[cfg(not(target_os = "linux"))]
fn state_of(pid: u32) -> ProcState {
    portable::state_of(pid)
}

/// The state of the calling process.
#[cfg(target_os = "linux")]
fn self_state() -> ProcState {
    match std::fs::read_to_string("/proc/self/stat") {
        Ok(stat) => parse_stat(&stat).unwrap_or(ProcState::Unknown),
        Err(_) => state_of(std::process::id()),
    }
}

#[cfg(not(target_os = "linux"))]
fn self_state() -> ProcState {
    state_of(std::process::id())
}

/// A zombie whose other threads are still on their way out: the main thread of a killed
/// multi-threaded process turns into a zombie first, and the process's files and sockets are
/// closed only when its last thread exits. Until then it still holds its ports.
#[cfg(target_os = "linux")]
fn still_exiting(pid: u32, stat: &str) -> Option<ProcState> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let threads: u32 = status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()?;
    if threads <= 1 {
        return None;
    }
    let rest = &stat[stat.rfind(')')? + 1..];
    let start_time = rest.split_ascii_whitespace().nth(19)?.parse().ok()?;
    Some(ProcState::Running { start_time })
}

/// Parses `/proc/<pid>/stat`: the state is the first field after the parenthesised command
/// name (which may itself hold spaces and parentheses), the start time the 20th.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_stat(stat: &str) -> Option<ProcState> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return Some(ProcState::Gone);
    }
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcState::Running { start_time })
}

#[cfg(target_os = "linux")]
fn boot_id() -> String {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
    .clone()
}

#[cfg(not(target_os = "linux"))]
fn boot_id() -> String {
    String::new()
}

/// The `sysinfo` query, for systems without `/proc`.
#[cfg_attr(target_os = "linux", allow(dead_code))]
mod portable {
    use std::sync::{Mutex, OnceLock};

    use sysinfo::{Pid, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System};

    use super::ProcState;

    pub(super) fn state_of(pid: u32) -> ProcState {
        static SYSTEM: OnceLock<Option<Mutex<System>>> = OnceLock::new();
        let Some(system) = SYSTEM.get_or_init(|| System::new().ok().map(Mutex::new)) else {
            return ProcState::Unknown;
        };
        let mut system = system.lock().unwrap_or_else(|p| p.into_inner());
        let pid = Pid::from_u32(pid);
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing(),
        );
        match system.process(pid) {
            Some(p) if matches!(p.status(), ProcessStatus::Zombie | ProcessStatus::Dead) => {
                ProcState::Gone
            }
            Some(p) => ProcState::Running {
                start_time: p.start_time(),
            },
            None => ProcState::Gone,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn sees_itself_and_not_a_missing_pid() {
            assert!(matches!(
                state_of(std::process::id()),
                ProcState::Running { .. }
            ));
            assert_eq!(state_of(u32::MAX - 7), ProcState::Gone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 777 1000 10";
        assert_eq!(
            parse_stat(stat),
            Some(ProcState::Running { start_time: 777 })
        );
        let zombie = "42 (z) Z 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 777 0 0";
        assert_eq!(parse_stat(zombie), Some(ProcState::Gone));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = current_owner().unwrap();
        assert!(SystemProcessProbe.is_alive(&me));
        let reused = Owner::new(me.pid(), me.start_time() + 1, me.boot_id());
        assert!(!SystemProcessProbe.is_alive(&reused));
        let other_boot = Owner::new(me.pid(), me.start_time(), "another-boot");
        assert!(!SystemProcessProbe.is_alive(&other_boot));
    }

    #[test]
    fn a_missing_pid_is_dead() {
        let ghost = Owner::new(u32::MAX - 7, 1, boot_id());
        assert!(!SystemProcessProbe.is_alive(&ghost));
        assert!(matches!(
            owner_of(u32::MAX - 7),
            Err(Error::NoSuchProcess { .. })
        ));
    }

    /// A child that sleeps until killed, and its identity.
    #[cfg(unix)]
    fn sleeping_child() -> (std::process::Child, Owner) {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let owner = owner_of(child.id()).unwrap();
        (child, owner)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_killed_child_not_yet_waited_for_is_dead() {
        let (mut child, owner) = sleeping_child();
        child.kill().unwrap();
        // The kernel turns the child into a zombie asynchronously: watch /proc until it is
        // one, without reaping it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let stat = format!("/proc/{}/stat", child.id());
        while !std::fs::read_to_string(&stat).unwrap().contains(") Z ") {
            assert!(
                std::time::Instant::now() < deadline,
                "child never became a zombie"
            );
            std::thread::yield_now();
        }
        assert!(
            !SystemProcessProbe.is_alive(&owner),
            "a zombie holds no ports"
        );
        child.wait().unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_waited_child_is_dead_and_a_running_one_alive() {
        let (mut child, owner) = sleeping_child();
        assert!(SystemProcessProbe.is_alive(&owner));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!SystemProcessProbe.is_alive(&owner));
    }
}
