//! Process identity from the operating system, and the default [`ProcessProbe`].
//!
//! An owner is (pid, start time, boot id). On Linux the start time is field 22 of
//! `/proc/<pid>/stat` (clock ticks since boot) and the boot id is
//! `/proc/sys/kernel/random/boot_id`; one small file read answers a liveness question. Elsewhere
//! `sysinfo` gives the start time in seconds since the epoch, which already differs across
//! boots, so the boot id is left empty there.
//!
//! Only positive evidence makes an owner dead: `kill(pid, 0)` answering "no such process", a
//! zombie, a start time that differs when both were read through the same clock (the same
//! time namespace: Linux shifts the start times a process reads by its time namespace's
//! boot-time offset), or two boot ids that are both known and differ. What cannot be read or
//! compared (a boot id a sandbox hides, a `/proc` entry that `hidepid` hides, a `/proc` of
//! another PID namespace) keeps the owner alive.

use std::sync::{Mutex, OnceLock};

use super::ProcessProbe;
use crate::error::{Error, Result};
use crate::lease::Owner;

/// The default [`ProcessProbe`]: asks the operating system whether the owner's pid runs with
/// the recorded start time in the current boot.
///
/// A reused pid (same pid, other start time), a lease from an earlier boot, and a zombie
/// (killed but not yet waited for) all count as dead. A process that exists but cannot be
/// inspected counts as alive, and so does one whose start time or boot cannot be compared
/// with the recorded ones (see [`Owner`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemProcessProbe;

impl ProcessProbe for SystemProcessProbe {
    fn is_alive(&self, owner: &Owner) -> bool {
        let me = match cached_owner() {
            Some(me) => Some(std::borrow::Cow::Borrowed(me)),
            None => current_owner().ok().map(std::borrow::Cow::Owned),
        };
        let me = me.as_deref();
        if let Some(me) = me.filter(|me| me.pid() == owner.pid()) {
            // This very pid: the owner is this process, or one that had the pid before.
            let state = ProcState::Running {
                start_time: me.start_time(),
            };
            return judge(owner, Some(me), state);
        }
        judge(owner, me, state_of(owner.pid()))
    }
}

/// Whether `owner` lives, given what the system says about its pid (`state`) and the
/// identity of the asking process (`me`, if known).
fn judge(owner: &Owner, me: Option<&Owner>, state: ProcState) -> bool {
    if me.is_some_and(|me| boots_differ(owner, me)) {
        return false;
    }
    match state {
        ProcState::Running { start_time } => {
            start_time == owner.start_time() || !same_clock(owner, me)
        }
        ProcState::Gone => false,
        ProcState::Unknown => true,
    }
}

/// Whether both boot ids are known and differ; an empty one (unreadable) cannot tell.
fn boots_differ(owner: &Owner, me: &Owner) -> bool {
    !owner.boot_id().is_empty() && !me.boot_id().is_empty() && owner.boot_id() != me.boot_id()
}

/// Whether a start time read here compares with the recorded one: both read through the
/// same time namespace, or the owner recorded none (as leases written before it was
/// recorded), which is compared as before.
fn same_clock(owner: &Owner, me: Option<&Owner>) -> bool {
    match (owner.time_namespace(), me.and_then(Owner::time_namespace)) {
        (None, _) => true,
        (Some(theirs), Some(ours)) => theirs == ours,
        (Some(_), None) => false,
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
    match self_state() {
        ProcState::Running { start_time } => Ok(recorded_here(pid, start_time, None)),
        ProcState::Gone => Err(Error::NoSuchProcess { pid }),
        ProcState::Unknown => Err(Error::ProcessUnreadable { pid }),
    }
}

/// The identity of the running process `pid`.
pub(crate) fn owner_of(pid: u32) -> Result<Owner> {
    match state_of(pid) {
        // The pid was given in this process's namespace, so that is where it is meaningful.
        ProcState::Running { start_time } => {
            let parents = current_owner()
                .ok()
                .and_then(|me| me.namespace_parents().map(<[u64]>::to_vec));
            Ok(recorded_here(pid, start_time, Some(parents)))
        }
        ProcState::Gone => Err(Error::NoSuchProcess { pid }),
        ProcState::Unknown => Err(Error::ProcessUnreadable { pid }),
    }
}

/// An owner whose pid and start time were read by this process: in this process's PID
/// namespace, through its time namespace, in this boot. `parents` are the PID namespaces
/// above this one, if already known.
fn recorded_here(pid: u32, start_time: u64, parents: Option<Option<Vec<u64>>>) -> Owner {
    Owner::new(pid, start_time, boot_id())
        .in_namespace(super::owner_lock::pid_namespace())
        .in_time_namespace(time_namespace())
        .with_namespace_parents(parents.unwrap_or_else(pid_namespace_parents))
}

/// The time namespace of the calling process: the inode number of `/proc/self/ns/time`.
use crate::sys::time_namespace;

/// The PID namespaces above this process's, nearest first, as far as the kernel lets this
/// process see.
use crate::sys::pid_namespace_parents;

/// How this process may use `/proc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcView {
    /// The `/proc` of this process's PID namespace: `/proc/<pid>` names the process `pid`.
    Ours,
    /// The `/proc` of another PID namespace (a container that mounted the host's): its
    /// `/proc/<pid>` names some other process.
    Foreign,
    /// No `/proc` at all.
    Missing,
}

/// What `/proc` is to this process, found once per pid (a forked child into a new PID
/// namespace looks again).
fn proc_view() -> ProcView {
    static CACHE: Mutex<Option<(u32, ProcView)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, view)) = cache.filter(|(p, _)| *p == pid) {
        return view;
    }
    let view = match std::fs::read_link("/proc/self") {
        Ok(link) if link.to_str() == Some(pid.to_string().as_str()) => ProcView::Ours,
        Ok(_) => ProcView::Foreign,
        Err(_) if std::path::Path::new("/proc/self/stat").exists() => ProcView::Foreign,
        Err(_) => ProcView::Missing,
    };
    *cache = Some((pid, view));
    view
}

/// What `kill(pid, 0)` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// The pid exists (0 or `EPERM`), maybe as a zombie.
    Exists,
    /// `ESRCH`: no such process.
    NoSuch,
    /// Not asked: a pid that `kill` would take for a process group (0, or above `i32::MAX`),
    /// or an answer that says nothing.
    NotAsked,
}

fn kill_says(pid: u32) -> Kill {
    match crate::sys::pid_exists(pid) {
        Some(true) => Kill::Exists,
        Some(false) => Kill::NoSuch,
        None => Kill::NotAsked,
    }
}

/// The state of a pid from what `kill` said and what reading `/proc/<pid>/stat` gave (`None`
/// when `/proc` is not this namespace's and was not read). Only `ESRCH` from `kill`, a
/// zombie, or a missing `/proc` entry of a pid that `kill` could not be asked about is
/// "gone"; an entry that is missing or unreadable while the pid exists (`hidepid`, a process
/// that is not dumpable) cannot tell.
fn from_evidence(kill: Kill, stat: Option<std::io::Result<&str>>) -> ProcState {
    if kill == Kill::NoSuch {
        return ProcState::Gone;
    }
    match stat {
        None => ProcState::Unknown,
        Some(Ok(stat)) => parse_stat(stat).unwrap_or(ProcState::Unknown),
        Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound && kill == Kill::NotAsked => {
            ProcState::Gone
        }
        Some(Err(_)) => ProcState::Unknown,
    }
}

fn state_of(pid: u32) -> ProcState {
    if !crate::sys::PROCFS {
        return portable_state_of(pid);
    }
    // `kill(pid, 0)` answers "no such process" for a fraction of the cost of reading
    // `/proc`; only a pid that exists needs its start time read.
    let kill = kill_says(pid);
    if kill == Kill::NoSuch {
        return ProcState::Gone;
    }
    match proc_view() {
        ProcView::Ours => {}
        ProcView::Foreign => return from_evidence(kill, None),
        // No /proc at all: the portable query where there is one, else what `kill` said.
        ProcView::Missing => return portable_state_of(pid),
    }
    let read = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    match from_evidence(kill, Some(read.as_deref().map_err(|e| e.kind().into()))) {
        ProcState::Gone => match read {
            Ok(stat) => still_exiting(pid, &stat).unwrap_or(ProcState::Gone),
            Err(_) => ProcState::Gone,
        },
        // Hidden or unreadable: unless it exited meanwhile, it cannot tell.
        ProcState::Unknown if read.is_err() && kill_says(pid) == Kill::NoSuch => ProcState::Gone,
        other => other,
    }
}

/// The state of the calling process.
fn self_state() -> ProcState {
    if !crate::sys::PROCFS {
        return state_of(std::process::id());
    }
    match std::fs::read_to_string("/proc/self/stat") {
        Ok(stat) => parse_stat(&stat).unwrap_or(ProcState::Unknown),
        Err(_) => state_of(std::process::id()),
    }
}

/// What this process can see of the PID namespace `namespace` through `/proc`.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A process of the namespace has the pid asked about; its state.
    Found(ProcState),
    /// No process of the namespace has that pid. `any` says whether the namespace has
    /// processes at all; `complete` whether this process saw every process of the host
    /// (root, or a `/proc` without `hidepid`, and every entry readable).
    NotFound { any: bool, complete: bool },
}

/// Looks for the process whose pid in the PID namespace `namespace` is `pid`, among the
/// processes this process can see (those of its own namespace and the ones below it): the
/// namespace of each is `/proc/<p>/ns/pid`, its pid there the last field of `NSpid:` in
/// `/proc/<p>/status`. A scan of `/proc`: only for the rare owner of another namespace
/// recorded without a lock file.
fn seek_in_namespace(namespace: u64, pid: u32) -> Seen {
    if !crate::sys::PROCFS {
        return Seen::NotFound {
            any: false,
            complete: false,
        };
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Seen::NotFound {
            any: false,
            complete: false,
        };
    };
    let mut complete = proc_view() == ProcView::Ours && sees_every_process();
    let mut any = false;
    for entry in entries {
        let Ok(entry) = entry else {
            complete = false;
            continue;
        };
        let name = entry.file_name();
        let Some(p) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let base = entry.path();
        match std::fs::metadata(base.join("ns/pid")) {
            Ok(meta) if crate::sys::file_id(&meta).map(|(_, ino)| ino) == Some(namespace) => {}
            Ok(_) => continue,
            // Exited since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => {
                complete = false;
                continue;
            }
        }
        any = true;
        let Ok(status) = std::fs::read_to_string(base.join("status")) else {
            complete = false;
            continue;
        };
        let inner = status
            .lines()
            .find_map(|line| line.strip_prefix("NSpid:"))
            .and_then(|pids| pids.split_ascii_whitespace().last())
            .and_then(|last| last.parse::<u32>().ok());
        if inner != Some(pid) {
            continue;
        }
        let state = match std::fs::read_to_string(base.join("stat")) {
            Ok(stat) => match parse_stat(&stat) {
                Some(ProcState::Gone) => p
                    .parse()
                    .ok()
                    .and_then(|host_pid| still_exiting(host_pid, &stat))
                    .unwrap_or(ProcState::Gone),
                other => other.unwrap_or(ProcState::Unknown),
            },
            Err(_) => ProcState::Unknown,
        };
        return Seen::Found(state);
    }
    Seen::NotFound { any, complete }
}

/// Whether nothing hides processes from this process in `/proc`: it is root, or `/proc` is
/// mounted without `hidepid`. Found once per process.
fn sees_every_process() -> bool {
    static SEES: OnceLock<bool> = OnceLock::new();
    *SEES.get_or_init(|| {
        if crate::sys::euid() == Some(0) {
            return true;
        }
        std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|info| proc_hides_processes(&info).map(|hides| !hides))
            .unwrap_or(false)
    })
}

/// Whether the `/proc` that `mountinfo` shows on top hides processes (`hidepid` other than
/// 0 or `off`); `None` if no `/proc` mount is listed.
fn proc_hides_processes(mountinfo: &str) -> Option<bool> {
    let line = mountinfo
        .lines()
        .rev()
        .find(|line| line.split(' ').nth(4) == Some("/proc"))?;
    let (_, after) = line.split_once(" - ")?;
    let options = after.split(' ').nth(2).unwrap_or_default();
    Some(options.split(',').any(|option| {
        option
            .strip_prefix("hidepid=")
            .is_some_and(|value| !matches!(value, "0" | "off"))
    }))
}

/// The owner of another PID namespace, recorded without a lock file: judged from here by
/// the processes of its namespace this process can see. Dead only on positive evidence: its
/// pid runs there with another start time (read through the same clock), or it is missing
/// from a namespace that this process sees whole (it has seen processes of it, or the owner
/// recorded this process's namespace among its namespace's ancestors).
pub(crate) fn foreign_owner_alive(owner: &Owner, our_namespace: Option<u64>) -> bool {
    let Some(namespace) = owner.pid_namespace() else {
        return true;
    };
    let me = current_owner().ok();
    if me.as_ref().is_some_and(|me| boots_differ(owner, me)) {
        return false;
    }
    match seek_in_namespace(namespace, owner.pid()) {
        Seen::Found(state) => judge(owner, me.as_ref(), state),
        Seen::NotFound { any, complete } => {
            let below_us = any
                || our_namespace.is_some_and(|ours| {
                    owner
                        .namespace_parents()
                        .is_some_and(|parents| parents.contains(&ours))
                });
            !(complete && below_us)
        }
    }
}

/// A zombie whose other threads are still on their way out: the main thread of a killed
/// multi-threaded process turns into a zombie first, and the process's files and sockets are
/// closed only when its last thread exits. Until then it still holds its ports.
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

fn boot_id() -> String {
    if !crate::sys::PROCFS {
        return String::new();
    }
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
    .clone()
}

/// What the portable process query says of `pid` (see `sys::process_state`), where there is
/// no `/proc` to read; where it cannot be asked, what `kill` says.
fn portable_state_of(pid: u32) -> ProcState {
    match crate::sys::process_state(pid) {
        Some(Some(start_time)) => ProcState::Running { start_time },
        Some(None) => ProcState::Gone,
        None => from_evidence(kill_says(pid), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(start_time: u64) -> ProcState {
        ProcState::Running { start_time }
    }

    #[test]
    fn only_positive_evidence_makes_an_owner_dead() {
        let me = Owner::new(1, 10, "boot-a").in_time_namespace(Some(100));
        let owner = |boot: &str, time_ns| Owner::new(2, 50, boot).in_time_namespace(time_ns);
        // Same clock, same boot: the start time decides.
        assert!(judge(&owner("boot-a", Some(100)), Some(&me), running(50)));
        assert!(!judge(&owner("boot-a", Some(100)), Some(&me), running(51)));
        // Another time namespace read the start time: not comparable, so alive.
        assert!(judge(&owner("boot-a", Some(200)), Some(&me), running(51)));
        // Recorded before time namespaces were: compared as before.
        assert!(!judge(&owner("boot-a", None), Some(&me), running(51)));
        // Our own time namespace unknown: a recorded one cannot be compared.
        let blind = Owner::new(1, 10, "boot-a");
        assert!(judge(
            &owner("boot-a", Some(100)),
            Some(&blind),
            running(51)
        ));
        // Boots: both known and different is dead; an unknown one on either side tells
        // nothing, and the start time still decides.
        assert!(!judge(&owner("boot-b", Some(100)), Some(&me), running(50)));
        assert!(judge(&owner("", Some(100)), Some(&me), running(50)));
        assert!(!judge(&owner("", Some(100)), Some(&me), running(51)));
        let no_boot = Owner::new(1, 10, "").in_time_namespace(Some(100));
        assert!(judge(
            &owner("boot-b", Some(100)),
            Some(&no_boot),
            running(50)
        ));
        // The pid: gone is dead, unknown is alive.
        assert!(!judge(
            &owner("boot-a", Some(100)),
            Some(&me),
            ProcState::Gone
        ));
        assert!(judge(
            &owner("boot-a", Some(100)),
            Some(&me),
            ProcState::Unknown
        ));
        assert!(judge(&owner("boot-a", Some(100)), None, ProcState::Unknown));
    }

    #[test]
    fn only_esrch_or_a_missing_entry_kill_cannot_check_makes_a_pid_gone() {
        use std::io::{Error as IoError, ErrorKind};
        let stat = "42 (x) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 777 1000 10";
        let missing = || Some(Err(IoError::from(ErrorKind::NotFound)));
        let denied = || Some(Err(IoError::from(ErrorKind::PermissionDenied)));
        assert_eq!(from_evidence(Kill::NoSuch, Some(Ok(stat))), ProcState::Gone);
        assert_eq!(from_evidence(Kill::Exists, Some(Ok(stat))), running(777));
        // hidepid, or a process that is not dumpable: hidden while it exists.
        assert_eq!(from_evidence(Kill::Exists, missing()), ProcState::Unknown);
        assert_eq!(from_evidence(Kill::Exists, denied()), ProcState::Unknown);
        assert_eq!(from_evidence(Kill::NotAsked, missing()), ProcState::Gone);
        assert_eq!(from_evidence(Kill::NotAsked, denied()), ProcState::Unknown);
        // A /proc of another PID namespace is not read: kill alone decides.
        assert_eq!(from_evidence(Kill::Exists, None), ProcState::Unknown);
        assert_eq!(from_evidence(Kill::NoSuch, None), ProcState::Gone);
    }

    #[test]
    fn hidepid_is_read_from_the_proc_mounted_on_top() {
        let plain = "22 1 0:21 / /proc rw,relatime shared:12 - proc proc rw\n";
        let hidden = "40 22 0:50 / /proc rw,relatime - proc proc rw,hidepid=invisible\n";
        let off = "41 22 0:51 / /proc rw - proc proc rw,hidepid=0\n";
        assert_eq!(proc_hides_processes(plain), Some(false));
        assert_eq!(
            proc_hides_processes(&format!("{plain}{hidden}")),
            Some(true)
        );
        assert_eq!(proc_hides_processes(&format!("{hidden}{off}")), Some(false));
        assert_eq!(
            proc_hides_processes("1 0 0:1 / / rw - ext4 /dev/x rw\n"),
            None
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_records_its_namespaces_and_reads_its_own_proc() {
        let me = current_owner().unwrap();
        assert!(me.time_namespace().is_some());
        assert!(me.namespace_parents().is_some());
        assert_eq!(proc_view(), ProcView::Ours);
        // This process is found in its own namespace by its pid there.
        let ns = me.pid_namespace().unwrap();
        assert!(matches!(
            seek_in_namespace(ns, me.pid()),
            Seen::Found(ProcState::Running { .. })
        ));
        assert!(matches!(
            seek_in_namespace(ns, u32::MAX - 7),
            Seen::NotFound { any: true, .. }
        ));
    }

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
