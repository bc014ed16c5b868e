//! Owner liveness on a hostile host, across real processes and real namespaces: a holder in
//! another time namespace, without a readable boot id, hidden by `hidepid`, or in a PID
//! namespace that has ended. A live owner is never taken for dead, and a dead one is
//! reclaimed once it is gone.
//!
//! Most tests need root (namespaces, mounts, another user); each is skipped, with the reason
//! printed, where the kernel or the system refuses. Ports 32000-32099 belong to this file
//! (see `common`); no test binds one, every registry's port probe says all are free.
#![cfg(target_os = "linux")]

use crate::common;
use crate::common::KillOnDrop;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::all_free;
use common::workers::{parse_range, say, var, wait_for_eof, Worker, MODE, RANGE, REGISTRY};
use portdaddy::{Error, Owner, PortDaddy, Request};

const DEADLINE: Duration = Duration::from_secs(30);

/// The holder's pid-judged leases (recorded without a lock file, with
/// `Request::owner(Owner::current())`): how many.
const BY_PID: &str = "PORTDADDY_LIVENESS_BY_PID";
/// Set to make the holder not dumpable (`prctl(PR_SET_DUMPABLE, 0)`).
const NOT_DUMPABLE: &str = "PORTDADDY_LIVENESS_NOT_DUMPABLE";
/// The pid whose `/proc` entry a claimant reports as hidden or not.
const LOOK_AT: &str = "PORTDADDY_LIVENESS_LOOK_AT";

/// The user the `hidepid` test runs its processes as (`nobody` on most systems).
const NOBODY: &str = "65534";

fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

fn open(path: &Path, range: std::ops::RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .path(path)
        .range(range)
        .port_probe(all_free)
        .open()
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------------------------

#[test]
fn worker_entry() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let path = PathBuf::from(var(REGISTRY));
    let range = parse_range(&var(RANGE));
    match mode.as_str() {
        "hold" => hold_worker(&path, range),
        "claim" => claim_worker(&path, range),
        "share" => share_worker(&path, range),
        other => panic!("unknown worker mode {other:?}"),
    }
}

/// Takes one lease by its handle (with a lock file) and [`BY_PID`] leases owned by its pid
/// alone, reports `HELD <pid>` and holds them until stdin ends.
fn hold_worker(path: &Path, range: std::ops::RangeInclusive<u16>) {
    if std::env::var_os(NOT_DUMPABLE).is_some() {
        // SAFETY: a plain prctl on this process.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
    let registry = open(path, range);
    let locked = registry.acquire("locked").expect("hold: a lease");
    let by_pid: usize = std::env::var(BY_PID).map_or(1, |n| n.parse().expect("a count"));
    let me = Owner::current().expect("hold: own identity");
    let pid_leases: Vec<_> = (0..by_pid)
        .map(|_| {
            registry
                .acquire_with(&Request::new("by-pid").owner(me.clone()))
                .expect("hold: a lease by pid")
        })
        .collect();
    say(&format!("HELD {}", std::process::id()));
    wait_for_eof();
    drop((locked, pid_leases));
}

/// Reports whether `/proc/<LOOK_AT>` is hidden (if asked), reaps (`REAPED <n>`), then takes
/// every port it can (`GOT <n>`).
fn claim_worker(path: &Path, range: std::ops::RangeInclusive<u16>) {
    if let Ok(pid) = std::env::var(LOOK_AT) {
        let hidden = !Path::new(&format!("/proc/{pid}/stat")).exists();
        say(&format!("HIDDEN {hidden}"));
    }
    let registry = open(path, range);
    say(&format!("REAPED {}", registry.reap().expect("claim: reap")));
    let mut guards = Vec::new();
    loop {
        match registry.acquire("claimant") {
            Ok(guard) => guards.push(guard),
            Err(Error::Exhausted { .. }) => break,
            Err(e) => panic!("claim: {e}"),
        }
    }
    say(&format!("GOT {}", guards.len()));
}

/// Takes one lease, starts `sleep` sharing its owner lock, reports `SHARED <sleep's pid>`
/// and waits to be killed.
fn share_worker(path: &Path, range: std::ops::RangeInclusive<u16>) {
    let registry = open(path, range);
    let guard = registry.acquire("shared").expect("share: a lease");
    let mut command = Command::new("sleep");
    command.arg("600").stdin(Stdio::null());
    registry
        .share_owner_lock(&mut command)
        .expect("share the owner lock");
    let mut child = command.spawn().expect("share: spawn sleep");
    say(&format!("SHARED {}", child.id()));
    wait_for_eof();
    drop(guard);
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs `program args` through the shell snippet `script` (which ends in `exec "$0" "$@"`)
/// inside `unshare <flags>`.
fn wrap(command: &mut Command, unshare: &[&str], script: Option<&str>) {
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let mut wrapped = Command::new("unshare");
    wrapped.args(unshare);
    if let Some(script) = script {
        wrapped.args(["sh", "-c", script]);
    }
    wrapped.arg(program).args(args);
    *command = wrapped;
}

/// Why `unshare <flags> [sh -c script] true` fails here, if it does.
fn refused(unshare: &[&str], script: Option<&str>) -> Option<String> {
    let mut command = Command::new("true");
    wrap(&mut command, unshare, script);
    match command.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "unshare {unshare:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("unshare: {e}")),
    }
}

const IN_TIME_NS: &[&str] = &[
    "-T",
    "--boottime",
    "100000",
    "--fork",
    "--kill-child=SIGKILL",
];
const IN_MOUNT_NS: &[&str] = &["-m", "--"];
const WITHOUT_BOOT_ID: &str =
    r#"mount --bind /dev/null /proc/sys/kernel/random/boot_id && exec "$0" "$@""#;
const IN_PID_NS: &[&str] = &["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"];

fn parse_held(line: &str) -> u32 {
    line.strip_prefix("HELD ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("expected HELD <pid>, got {line:?}"))
}

/// Runs a claimant to its end; its lines.
fn claim(
    label: &str,
    path: &Path,
    range: &std::ops::RangeInclusive<u16>,
    extra: &[(&str, String)],
    adjust: impl FnOnce(&mut Command),
) -> Vec<String> {
    let mut claimant = Worker::spawn_with(label, "claim", path, range, extra, adjust);
    let (lines, status) = claimant.finish(deadline());
    assert!(
        status.success(),
        "{label}: {status}; stderr:\n{}",
        claimant.stderr()
    );
    lines
}

/// Whether `pid` is gone for good: no such process, or a zombie whose threads have all
/// exited (its files, locks included, are closed by then). Orphans here may stay zombies.
fn is_gone(pid: &str) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let zombie = stat
        .rfind(')')
        .is_some_and(|at| stat[at + 1..].trim_start().starts_with('Z'));
    let threads = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        })
        .unwrap_or(0);
    zombie && threads <= 1
}

/// Waits until `condition` holds, failing after the deadline.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let give_up = deadline();
    while !condition() {
        assert!(Instant::now() < give_up, "{what} never happened");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The processes of the PID namespace `namespace` that are not gone.
fn live_in_namespace(namespace: u64) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| fs::metadata(format!("/proc/{p}/ns/pid")).is_ok_and(|m| m.ino() == namespace))
        .filter(|p| !is_gone(p))
        .collect()
}

/// A holder and claimants on one registry over `range`: the holder (placed by
/// `holder_adjust`) takes every port; claimants (placed by `claimant_adjust`) neither reap
/// nor take any while it runs, and reclaim every one once it has died.
fn holder_survives_then_is_reclaimed(
    range: std::ops::RangeInclusive<u16>,
    holder_adjust: fn(&mut Command),
    claimant_adjust: fn(&mut Command),
    check_owners: impl Fn(&[portdaddy::Lease]),
) {
    let (_dir, path) = common::temp_registry();
    let ports = range.clone().count();
    let mut holder = Worker::spawn_with(
        "holder",
        "hold",
        &path,
        &range,
        &[(BY_PID, (ports - 1).to_string())],
        holder_adjust,
    );
    let pid = parse_held(&holder.expect_line("HELD", deadline()));
    check_owners(&open(&path, range.clone()).list().unwrap());

    let lines = claim("claimant", &path, &range, &[], claimant_adjust);
    assert_eq!(
        lines,
        ["REAPED 0", "GOT 0"],
        "a claimant reaped or took a live holder's port"
    );

    holder.kill();
    wait_until("the holder's death", || is_gone(&pid.to_string()));
    let lines = claim("claimant", &path, &range, &[], claimant_adjust);
    assert_eq!(
        lines,
        [format!("REAPED {ports}"), format!("GOT {ports}")],
        "the dead holder's leases were not reclaimed"
    );
}

fn on_host(_: &mut Command) {}

// ---------------------------------------------------------------------------------------------
// Time namespaces
// ---------------------------------------------------------------------------------------------

fn in_time_namespace(command: &mut Command) {
    wrap(command, IN_TIME_NS, None);
}

/// The recorded owners' start times were read through another time namespace than the
/// host's: they say so.
fn recorded_in_another_time_namespace(leases: &[portdaddy::Lease]) {
    let host = Owner::current().unwrap().time_namespace();
    assert!(host.is_some());
    for lease in leases {
        let owner = lease.owner().unwrap();
        assert!(owner.time_namespace().is_some());
        assert_ne!(owner.time_namespace(), host, "{lease:?}");
    }
}

/// A holder inside `unshare -T --boottime 100000` reads start times 100000 s later than
/// the host does: a claimant on the host neither reaps its leases (by lock file and by pid)
/// nor takes its ports, and reclaims them once it has died.
#[test]
fn a_holder_in_another_time_namespace_keeps_its_ports_from_the_host() {
    if let Some(why) = refused(IN_TIME_NS, None) {
        println!("skipped: cannot make a time namespace here: {why}");
        return;
    }
    holder_survives_then_is_reclaimed(
        32000..=32001,
        in_time_namespace,
        on_host,
        recorded_in_another_time_namespace,
    );
}

/// The reverse: a claimant inside a time namespace neither reaps nor takes the ports of a
/// holder on the host, and reclaims them once it has died.
#[test]
fn a_claimant_in_another_time_namespace_keeps_off_the_hosts_ports() {
    if let Some(why) = refused(IN_TIME_NS, None) {
        println!("skipped: cannot make a time namespace here: {why}");
        return;
    }
    holder_survives_then_is_reclaimed(32002..=32003, on_host, in_time_namespace, |_| {});
}

// ---------------------------------------------------------------------------------------------
// Boot ids that cannot be read
// ---------------------------------------------------------------------------------------------

fn without_boot_id(command: &mut Command) {
    wrap(command, IN_MOUNT_NS, Some(WITHOUT_BOOT_ID));
}

/// A holder that cannot read its boot id records an empty one: its leases stay while it
/// runs and are reclaimed after it dies.
#[test]
fn an_owner_recorded_without_a_boot_id_lives_while_it_runs() {
    if let Some(why) = refused(IN_MOUNT_NS, Some(WITHOUT_BOOT_ID)) {
        println!("skipped: cannot hide the boot id here: {why}");
        return;
    }
    holder_survives_then_is_reclaimed(32010..=32011, without_boot_id, on_host, |leases| {
        assert_eq!(leases.len(), 2);
        for lease in leases {
            assert_eq!(lease.owner().unwrap().boot_id(), "", "{lease:?}");
        }
    });
}

/// A claimant that cannot read its own boot id neither reaps live leases nor keeps dead
/// ones forever.
#[test]
fn a_claimant_without_a_boot_id_judges_owners_by_what_it_can_read() {
    if let Some(why) = refused(IN_MOUNT_NS, Some(WITHOUT_BOOT_ID)) {
        println!("skipped: cannot hide the boot id here: {why}");
        return;
    }
    holder_survives_then_is_reclaimed(32012..=32013, on_host, without_boot_id, |leases| {
        assert!(leases
            .iter()
            .all(|l| !l.owner().unwrap().boot_id().is_empty()));
    });
}

// ---------------------------------------------------------------------------------------------
// hidepid
// ---------------------------------------------------------------------------------------------

const AS_NOBODY: &str = r#"exec setpriv --reuid=65534 --regid=65534 --clear-groups "$0" "$@""#;
const HIDEPID_AS_NOBODY: &str = concat!(
    r#"mount -t proc -o hidepid=2 proc /proc && "#,
    r#"exec setpriv --reuid=65534 --regid=65534 --clear-groups "$0" "$@""#
);

fn as_nobody(command: &mut Command) {
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let mut wrapped = Command::new("sh");
    wrapped.args(["-c", AS_NOBODY]).arg(program).args(args);
    *command = wrapped;
}

fn hidepid_as_nobody(command: &mut Command) {
    wrap(command, IN_MOUNT_NS, Some(HIDEPID_AS_NOBODY));
}

/// With `/proc` mounted `hidepid=2`, a holder that is not dumpable is hidden from `/proc`
/// even for its own user, while `kill(pid, 0)` still finds it. A claimant of that user keeps
/// off its lease recorded by pid alone, and reclaims it once the holder has died.
#[test]
fn a_holder_hidden_by_hidepid_keeps_its_lease() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root to mount /proc and switch users");
        return;
    }
    if let Some(why) = refused(IN_MOUNT_NS, Some(HIDEPID_AS_NOBODY)) {
        println!("skipped: cannot mount a hidepid /proc as uid {NOBODY} here: {why}");
        return;
    }
    let mut probe = Command::new(std::env::current_exe().unwrap());
    probe
        .arg("--list")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    as_nobody(&mut probe);
    if !probe.status().is_ok_and(|s| s.success()) {
        println!("skipped: the test binary cannot run as uid {NOBODY} here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let path = dir.path().join("registry.sqlite3");
    let range = 32020..=32021;
    let mut holder = Worker::spawn_with(
        "hidden holder",
        "hold",
        &path,
        &range,
        &[(BY_PID, "1".into()), (NOT_DUMPABLE, "1".into())],
        as_nobody,
    );
    let pid = parse_held(&holder.expect_line("HELD", deadline()));
    let look = [(LOOK_AT, pid.to_string())];

    let lines = claim("hidepid claimant", &path, &range, &look, hidepid_as_nobody);
    assert_eq!(
        lines,
        ["HIDDEN true", "REAPED 0", "GOT 0"],
        "the holder was not hidden, or its live lease was reaped or taken"
    );

    holder.kill();
    wait_until("the holder's death", || is_gone(&pid.to_string()));
    let lines = claim("hidepid claimant", &path, &range, &look, hidepid_as_nobody);
    assert_eq!(lines, ["HIDDEN true", "REAPED 2", "GOT 2"]);
}

// ---------------------------------------------------------------------------------------------
// PID namespaces that end
// ---------------------------------------------------------------------------------------------

fn in_pid_namespace(command: &mut Command) {
    wrap(command, IN_PID_NS, None);
}

/// Leases taken inside `unshare --pid --fork --mount-proc` for a process there, without a
/// lock file, are kept from the host while the namespace lives, and reclaimed by the host
/// once it has ended: by a claim that needs the port, and by `reap`; `doctor` reports them
/// stale. A sibling PID namespace, which cannot see the ended one, cannot tell and keeps
/// them.
#[test]
fn leases_of_an_ended_pid_namespace_are_reclaimed_from_the_host() {
    if let Some(why) = refused(IN_PID_NS, None) {
        println!("skipped: cannot make a PID namespace here: {why}");
        return;
    }
    let (_dir, path) = common::temp_registry();
    let range = 32030..=32032;
    let mut holder = Worker::spawn_with(
        "namespaced holder",
        "hold",
        &path,
        &range,
        &[(BY_PID, "2".into())],
        in_pid_namespace,
    );
    holder.expect_line("HELD", deadline());
    let host = open(&path, range.clone());
    let leases = host.list().unwrap();
    assert_eq!(leases.len(), 3);
    let namespace = leases[0].owner().unwrap().pid_namespace().unwrap();
    assert_ne!(Some(namespace), Owner::current().unwrap().pid_namespace());
    let by_pid: Vec<u16> = leases
        .iter()
        .filter(|l| l.name() == "by-pid")
        .map(|l| l.port())
        .collect();

    assert_eq!(
        host.reap().unwrap(),
        0,
        "the host reaped a live namespace's lease"
    );
    assert!(matches!(host.acquire("host"), Err(Error::Exhausted { .. })));

    holder.kill();
    wait_until("the end of the namespace", || {
        live_in_namespace(namespace).is_empty()
    });
    // A sibling namespace cannot see the ended one: it reclaims the lease by lock file, and
    // keeps the two it cannot judge.
    let lines = claim("sibling", &path, &range, &[], in_pid_namespace);
    assert_eq!(lines, ["REAPED 1", "GOT 1"]);
    // `doctor` sees them as stale, without reclaiming them.
    let diagnosis = PortDaddy::diagnose(&path, portdaddy::PortRange::new(32030, 32032).unwrap());
    let stale = diagnosis
        .check("stale leases")
        .expect("a stale-lease check");
    assert_eq!(stale.status, portdaddy::Status::Warn, "{}", stale.detail);
    assert!(
        stale.detail.starts_with("2 of 2 leases"),
        "{}",
        stale.detail
    );
    // A claim that needs one of the pid-judged ports reclaims it.
    let needy = open(&path, by_pid[0]..=by_pid[0]);
    let guard = needy.acquire("needy").expect("the ended namespace's port");
    assert_eq!(guard.port(), by_pid[0]);
    // `reap` reclaims the other pid-judged lease.
    assert_eq!(host.reap().unwrap(), 1);
    assert_eq!(host.list().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// A shared owner lock
// ---------------------------------------------------------------------------------------------

/// `PortDaddy::share_owner_lock`: a command that inherits its owner lock keeps the leases
/// alive after the process that took them is killed, and they are reclaimed once the
/// command has exited too.
#[test]
fn a_shared_owner_lock_keeps_the_leases_while_the_command_runs() {
    let (_dir, path) = common::temp_registry();
    let range = 32040..=32040;
    let mut holder = Worker::spawn("sharing holder", "share", &path, &range, &[]);
    let line = holder.expect_line("SHARED", deadline());
    let sleeper = line
        .strip_prefix("SHARED ")
        .and_then(|pid| pid.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("expected SHARED <pid>, got {line:?}"));
    let _sleeper = KillOnDrop(sleeper);
    let holder_pid = holder.pid();
    holder.kill();
    wait_until("the holder's death", || is_gone(&holder_pid.to_string()));

    let host = open(&path, range.clone());
    assert_eq!(host.reap().unwrap(), 0, "the command's lease was reaped");
    assert!(matches!(
        host.acquire("other"),
        Err(Error::Exhausted { .. })
    ));
    let leases = host.list().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(host.state_of(&leases[0]), portdaddy::LeaseState::Live);

    drop(_sleeper);
    wait_until("the command's death", || is_gone(&sleeper.to_string()));
    assert_eq!(host.acquire("other").unwrap().port(), 32040);
}
