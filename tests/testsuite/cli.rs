//! The `portdaddy` command, run as a real process against temporary registries.
//!
//! Ports 26000-26499 belong to this file (see `common`): every command gets
//! `PORTDADDY_RANGE` inside that block, and tests that need a full range use one port of
//! their own in it.

use crate::common::cli::{error_line, text, CliRegistry};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use portdaddy::{Error, PortDaddy};
use serde_json::Value;

const RANGE: &str = "26000-26499";

/// A temporary registry and the command pointed at it.
struct Fixture(CliRegistry);

impl std::ops::Deref for Fixture {
    type Target = CliRegistry;
    fn deref(&self) -> &CliRegistry {
        &self.0
    }
}

impl Fixture {
    fn new() -> Self {
        Self(CliRegistry::new(RANGE))
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// The same registry through the library.
    fn library(&self, range: std::ops::RangeInclusive<u16>) -> PortDaddy {
        PortDaddy::builder()
            .path(&self.db)
            .range(range)
            .open()
            .unwrap()
    }

    fn list_json(&self) -> Vec<Value> {
        match serde_json::from_str(&self.ok(&["list", "--all", "--json"])).unwrap() {
            Value::Array(items) => items,
            other => panic!("not an array: {other}"),
        }
    }
}

fn port_of(stdout: &str) -> u16 {
    assert!(
        stdout.ends_with('\n') && stdout.lines().count() == 1,
        "{stdout:?}"
    );
    stdout
        .trim_end()
        .parse()
        .unwrap_or_else(|_| panic!("{stdout:?}"))
}

/// A child that sleeps until killed; killed and reaped when dropped.
struct Sleeper(Child);

impl Sleeper {
    fn spawn() -> Self {
        Self(Command::new("sleep").arg("600").spawn().unwrap())
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the system clock has moved past `t` by a few milliseconds, so that the next
/// lease is stamped later than the last (leases are stamped in milliseconds).
fn clock_past(t: SystemTime) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while SystemTime::now() < t + Duration::from_millis(3) {
        assert!(Instant::now() < deadline, "the clock does not move");
        std::thread::yield_now();
    }
}

#[test]
fn acquire_prints_the_port_alone_and_the_lease_belongs_to_the_caller() {
    let f = Fixture::new();
    let port = port_of(&f.ok(&["acquire", "api"]));
    assert!((26000..=26499).contains(&port));
    let leases = f.library(26000..=26499).list().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].port(), port);
    assert_eq!(leases[0].name(), "api");
    // The command has exited; the lease lives on with the process that ran it: this test.
    assert_eq!(leases[0].pid(), Some(std::process::id()));
    assert_eq!(
        f.library(26000..=26499).state_of(&leases[0]),
        portdaddy::LeaseState::Live
    );
}

/// Runs `sh -c` with a script that stores `$(<substitution>)` as the port, prints its own
/// pid and that port, and waits for a line on stdin; checks that the lease on `port` belongs
/// to the script while it runs and is reclaimed after it exits.
fn lease_belongs_to_the_script(substitution: &str, port: u16) {
    use std::io::Write;
    let f = Fixture::new();
    let script = format!("port=$({substitution}); echo \"$$ $port\"; read _");
    let mut sh = Command::new("sh")
        .args(["-c", &script])
        .env("PORTDADDY_DB", &f.db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(sh.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let (pid, printed) = line.trim().split_once(' ').unwrap();
    assert_eq!(pid, sh.id().to_string());
    assert_eq!(printed, port.to_string());
    let registry = f.library(port..=port);
    assert_eq!(registry.list().unwrap()[0].pid(), Some(sh.id()));
    // Whatever subshell ran the command has exited, the script has not: the lease holds.
    assert!(matches!(
        registry.acquire("other"),
        Err(Error::Exhausted { .. })
    ));
    // The script ends: its lease is reclaimed by the next claim that needs the port.
    sh.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(sh.wait().unwrap().success());
    assert_eq!(registry.acquire("other").unwrap().port(), port);
}

#[test]
fn acquire_in_a_command_substitution_belongs_to_the_script_until_it_exits() {
    let bin = env!("CARGO_BIN_EXE_portdaddy");
    lease_belongs_to_the_script(&format!("'{bin}' acquire web --range 26060-26060"), 26060);
}

/// In a pipeline inside `$(…)` the parent is a subshell that exits at once; `--pid $$`
/// gives the lease to the script, as README advises.
#[test]
fn acquire_in_a_substituted_pipeline_belongs_to_the_script_with_pid() {
    let bin = env!("CARGO_BIN_EXE_portdaddy");
    lease_belongs_to_the_script(
        &format!("'{bin}' acquire web --range 26061-26061 --pid $$ | tr -d '\\n'"),
        26061,
    );
}

#[test]
fn acquire_for_udp_checks_and_records_udp() {
    let f = Fixture::new();
    let value: Value = serde_json::from_str(&f.ok(&["acquire", "dns", "--udp", "--json"])).unwrap();
    assert_eq!(value["protocol"], "udp");
    assert_eq!(f.list_json()[0]["protocol"], "udp");
}

#[test]
fn acquire_json_prints_an_object_with_port_name_and_pid() {
    let f = Fixture::new();
    let out = f.ok(&["acquire", "db", "--json", "--preferred", "26042"]);
    let value: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value["port"], 26042);
    assert_eq!(value["name"], "db");
    assert_eq!(value["pid"], std::process::id());
    assert_eq!(value["state"], "live");
}

#[test]
fn a_port_acquired_for_a_sleeping_process_is_held_while_it_lives_and_reclaimed_after() {
    let f = Fixture::new();
    let mut sleeper = Sleeper::spawn();
    let out = f.ok(&[
        "acquire",
        "svc",
        "--pid",
        &sleeper.pid(),
        "--range",
        "26010-26010",
    ]);
    assert_eq!(port_of(&out), 26010);
    let registry = f.library(26010..=26010);
    for _ in 0..3 {
        assert!(
            matches!(registry.acquire("other"), Err(Error::Exhausted { .. })),
            "the library must not hand out a port whose owner lives"
        );
    }
    sleeper.kill();
    let guard = registry.acquire("other").unwrap();
    assert_eq!(guard.port(), 26010, "reclaimed once its owner died");
}

#[test]
fn acquire_refuses_a_ttl_that_ends_after_the_year_9999() {
    let f = Fixture::new();
    for ttl in ["10000y", "8000y", "584542046090y"] {
        let line = error_line(&f.run(&["acquire", "far", "--ttl", ttl, "--json"]), 2);
        assert!(line.contains("9999"), "{ttl}: {line}");
    }
    assert!(f.list_json().is_empty(), "nothing was leased");
    // The longest TTL that ends before then is still fine.
    f.ok(&["acquire", "near", "--ttl", "7000y", "--json"]);
}

#[test]
fn acquire_with_a_ttl_makes_a_detached_lease() {
    let f = Fixture::new();
    let port = port_of(&f.ok(&["acquire", "build", "--ttl", "2h"]));
    let items = f.list_json();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["port"], port);
    assert_eq!(items[0]["pid"], Value::Null);
    assert_eq!(items[0]["state"], "detached");
    assert!(items[0]["expires_at"].is_string());
    let lease = &f.library(26000..=26499).list().unwrap()[0];
    let ttl = lease
        .expires_at()
        .unwrap()
        .duration_since(lease.acquired_at());
    assert_eq!(ttl.unwrap(), Duration::from_secs(7200));
}

#[test]
fn acquire_for_a_pid_that_does_not_run_is_a_usage_error_naming_the_pid() {
    let f = Fixture::new();
    let line = error_line(&f.run(&["acquire", "x", "--pid", "4000000000"]), 2);
    assert!(
        line.contains("4000000000") && line.contains("--pid"),
        "{line}"
    );
    assert!(
        !f.db.exists(),
        "no registry was created for a refused request"
    );
}

#[test]
fn processes_acquiring_at_once_get_distinct_ports_and_every_claim_is_counted() {
    let f = Fixture::new();
    let children: Vec<Child> = (0..8)
        .map(|i| {
            f.command(&["acquire", &format!("worker-{i}"), "--ttl", "1h"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ports = std::collections::HashSet::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        ports.insert(port_of(&text(&out.stdout)));
    }
    assert_eq!(ports.len(), 8, "{ports:?}");
    let stats: Value = serde_json::from_str(&f.ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["acquired"], 8, "no count was lost: {stats}");
    assert_eq!(stats["detached"], 8, "{stats}");
}

#[test]
fn release_by_port_or_by_name_says_what_it_released() {
    let f = Fixture::new();
    let a = port_of(&f.ok(&["acquire", "a", "--ttl", "1h"]));
    let b1 = port_of(&f.ok(&["acquire", "b"]));
    let b2 = port_of(&f.ok(&["acquire", "b"]));
    assert_eq!(
        f.ok(&["release", &a.to_string()]),
        format!("released port {a} (a, detached)\n")
    );
    let me = std::process::id();
    let out = f.ok(&["release", "b"]);
    assert!(
        out.contains(&format!("released port {b1} (b, pid {me})\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!("released port {b2} (b, pid {me})\n")),
        "{out}"
    );
    assert_eq!(out.lines().count(), 2);
    assert!(f.list_json().is_empty());
}

#[test]
fn release_of_nothing_exits_1() {
    let f = Fixture::new();
    f.ok(&["acquire", "kept", "--ttl", "1h"]);
    let line = error_line(&f.run(&["release", "26499"]), 1);
    assert!(line.contains("no lease on port 26499"), "{line}");
    let line = error_line(&f.run(&["release", "nobody"]), 1);
    assert!(line.contains("nobody"), "{line}");
    assert_eq!(f.list_json().len(), 1, "the other lease is untouched");
}

#[test]
fn release_takes_a_number_as_a_name_when_asked() {
    let f = Fixture::new();
    let port = port_of(&f.ok(&["acquire", "8080", "--ttl", "1h"]));
    error_line(&f.run(&["release", "8080"]), 1);
    assert!(f
        .ok(&["release", "--name", "8080"])
        .starts_with(&format!("released port {port} ")));
}

#[test]
fn list_shows_an_aligned_table_newest_last_and_hides_stale_leases_unless_all() {
    let f = Fixture::new();
    let mut sleeper = Sleeper::spawn();
    f.ok(&["acquire", "a-rather-long-name", "--ttl", "10m"]);
    let t = SystemTime::now();
    clock_past(t);
    f.ok(&["acquire", "gone", "--pid", &sleeper.pid()]);
    clock_past(SystemTime::now());
    f.ok(&["acquire", "db"]);
    sleeper.kill();

    let table = f.ok(&["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "header and two live leases:\n{table}");
    let header = lines[0];
    assert!(header.starts_with("PORT"), "{table}");
    assert!(lines[1].contains("a-rather-long-name") && lines[1].contains("detached"));
    assert!(
        lines[2].contains(" db ") && lines[2].ends_with("live"),
        "newest last:\n{table}"
    );
    for column in ["NAME", "PID", "AGE", "EXPIRES", "STATE"] {
        let at = header.find(column).unwrap();
        for row in &lines[1..] {
            let (before, after) = row.split_at(at);
            assert!(
                before.ends_with("  ") && !after.starts_with(' '),
                "{column} is not aligned:\n{table}"
            );
        }
    }

    let all = f.ok(&["list", "--all"]);
    let rows: Vec<&str> = all.lines().collect();
    assert_eq!(rows.len(), 4, "{all}");
    assert!(
        rows[2].contains("gone") && rows[2].ends_with("dead"),
        "{all}"
    );
}

#[test]
fn acquire_block_leases_consecutive_ports_and_prints_the_first() {
    let f = Fixture::new();
    let first = port_of(&f.ok(&["acquire", "raft", "--block", "3", "--range", "26070-26079"]));
    let leases = f.library(26070..=26079).list().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].ports(), first..=first + 2);
    let line = error_line(&f.run(&["acquire", "raft", "--block", "0"]), 2);
    assert!(line.contains("--block"), "{line}");
}

#[test]
fn a_block_of_ports_is_listed_as_a_range_and_released_by_any_of_its_ports() {
    let f = Fixture::new();
    let lease = f
        .library(26050..=26059)
        .acquire_with(&portdaddy::Request::new("grpc").block(3))
        .unwrap()
        .keep()
        .unwrap();
    let (first, last) = (lease.port(), lease.port() + 2);
    let table = f.ok(&["list"]);
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with(&format!("{first}-{last} ")),
        "{table}"
    );
    assert_eq!(f.list_json()[0]["block_len"], 3);
    assert_eq!(
        f.ok(&["release", &(first + 1).to_string()]),
        format!("released ports {first}-{last} (grpc, detached)\n")
    );
    assert!(f.list_json().is_empty());
}

#[test]
fn list_json_is_an_array_of_objects_with_port_name_and_pid() {
    let f = Fixture::new();
    assert_eq!(f.ok(&["list", "--json"]), "[]\n");
    let port = port_of(&f.ok(&["acquire", "web"]));
    let items = f.list_json();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["port"], port);
    assert_eq!(items[0]["name"], "web");
    assert_eq!(items[0]["pid"], std::process::id());
}

#[test]
fn list_escapes_control_characters_that_others_wrote_into_the_registry() {
    let f = Fixture::new();
    f.ok(&["acquire", "plain", "--ttl", "1h"]);
    // The library refuses such names; a damaged or hostile registry may still hold one.
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    conn.execute(
        "UPDATE leases SET name = ?1",
        ["evil\u{1b}[2J\nname\u{202e}"],
    )
    .unwrap();
    drop(conn);
    let table = f.ok(&["list"]);
    assert!(
        !table.contains('\u{1b}') && !table.contains('\u{202e}'),
        "{table:?}"
    );
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(table.contains("evil\\u{1b}[2J\\nname\\u{202e}"), "{table}");
}

#[test]
fn run_passes_port_and_a_port_per_name_and_exits_with_the_command_code() {
    let f = Fixture::new();
    let out = f.run(&[
        "run",
        "api",
        "web-ui",
        "--",
        "sh",
        "-c",
        "echo \"$PORT $PORT_API $PORT_WEB_UI\"; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let ports: Vec<u16> = printed
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(ports.len(), 3, "{printed}");
    assert_eq!(ports[0], ports[1], "PORT is the first name's port");
    assert_ne!(ports[1], ports[2]);
    assert!(ports.iter().all(|p| (26000..=26499).contains(p)));
    assert!(
        f.list_json().is_empty(),
        "released after the command exited"
    );
    let stats: Value = serde_json::from_str(&f.ok(&["stats", "--json"])).unwrap();
    assert_eq!(
        (stats["acquired"].as_u64(), stats["released"].as_u64()),
        (Some(2), Some(2))
    );
}

#[test]
fn run_exits_128_plus_the_signal_and_releases_when_the_command_is_killed() {
    let f = Fixture::new();
    let out = f.run(&["run", "api", "--", "sh", "-c", "echo $PORT; kill -9 $$"]);
    assert_eq!(out.status.code(), Some(128 + 9), "{}", text(&out.stderr));
    port_of(&text(&out.stdout));
    assert!(f.list_json().is_empty());
}

/// Under `nohup portdaddy run … &` SIGHUP (and, in the background, SIGINT) arrives ignored:
/// portdaddy and the command must both keep ignoring it.
#[test]
fn run_leaves_ignored_signals_ignored_for_itself_and_the_command() {
    use std::os::unix::process::CommandExt;
    let f = Fixture::new();
    let mut cmd = f.command(&[
        "run",
        "api",
        "--",
        "sh",
        "-c",
        "kill -HUP $$; kill -INT $$; kill -HUP $PPID; kill -INT $PPID; echo survived",
    ]);
    // SAFETY: signal() is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "survived\n");
    assert!(f.list_json().is_empty());
}

#[test]
fn run_reports_a_command_that_does_not_exist_with_127_and_releases() {
    let f = Fixture::new();
    let line = error_line(&f.run(&["run", "api", "--", "/nonexistent/cmd"]), 127);
    assert!(line.contains("/nonexistent/cmd"), "{line}");
    assert!(f.list_json().is_empty());
}

/// Starts `portdaddy run api -- sh -c SCRIPT` and waits until the script printed `ready`.
fn start_run(f: &Fixture, script: &str) -> (Child, mpsc::Receiver<String>) {
    start(f.command(&["run", "api", "--", "sh", "-c", script]))
}

/// Starts `portdaddy run` and waits for the command to print `ready`.
fn start(mut cmd: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the script started");
    assert_eq!(line, "ready");
    (child, rx)
}

/// Every line still to come from the command, up to the end of its output: the reader
/// thread may not have passed the last lines on yet when `run` has exited.
fn rest_of(rx: &mpsc::Receiver<String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => return lines,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the output did not end; so far: {lines:?}")
            }
        }
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait_bounded(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "portdaddy run did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn run_passes_sigterm_and_sigint_on_to_the_command() {
    let f = Fixture::new();
    for (sig, name) in [(libc::SIGTERM, "TERM"), (libc::SIGINT, "INT")] {
        let script = format!(
            "trap 'echo got-{name}; exit 42' {name}; echo ready; while :; do sleep 0.05; done"
        );
        let (mut child, rx) = start_run(&f, &script);
        signal(&child, sig);
        let status = wait_bounded(&mut child);
        assert_eq!(
            status.code(),
            Some(42),
            "{name}: the command trapped it and exited"
        );
        let rest = rest_of(&rx);
        assert_eq!(rest, [format!("got-{name}")]);
        assert!(f.list_json().is_empty(), "{name}: released");
    }
}

/// `timeout`, `kill -TERM -PGID` and CI runners signal a whole process group. Outside the
/// terminal's foreground group the command runs in a group of its own, so such a signal
/// reaches it once, passed on by portdaddy, not twice.
#[test]
fn run_outside_the_foreground_passes_a_group_signal_on_once() {
    use std::os::unix::process::CommandExt;
    let f = Fixture::new();
    // Field 5 of /proc/PID/stat is the process group.
    let script = "trap 'echo got-INT' INT; trap 'echo got-TERM; exit 42' TERM; \
                  echo ready; cut -d' ' -f5 /proc/$$/stat; echo $$; \
                  while :; do sleep 0.05; done";
    let mut cmd = f.command(&["run", "api", "--", "sh", "-c", script]);
    // A group of its own: never the terminal's foreground group.
    cmd.process_group(0);
    let (mut child, rx) = start(cmd);
    let next = || rx.recv_timeout(Duration::from_secs(30)).expect("a line");
    let (group, shell) = (next(), next());
    assert_eq!(group, shell, "the command leads a process group of its own");
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) }, 0);
    assert_eq!(next(), "got-INT");
    signal(&child, libc::SIGTERM);
    let status = wait_bounded(&mut child);
    assert_eq!(
        status.code(),
        Some(42),
        "the command trapped SIGTERM and exited"
    );
    assert_eq!(rest_of(&rx), ["got-TERM"], "SIGINT arrived once");
    assert!(f.list_json().is_empty());
}

#[test]
fn run_exits_128_plus_the_signal_that_killed_the_command() {
    let f = Fixture::new();
    let (mut child, _rx) = start_run(&f, "echo ready; exec sleep 600");
    signal(&child, libc::SIGTERM);
    let status = wait_bounded(&mut child);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(f.list_json().is_empty());
}

#[test]
fn run_refuses_names_that_would_share_a_variable() {
    let f = Fixture::new();
    let line = error_line(&f.run(&["run", "web-1", "web_1", "--", "true"]), 125);
    assert!(line.contains("PORT_WEB_1"), "{line}");
    assert!(f.list_json().is_empty());
}

#[test]
fn reap_prints_how_many_leases_it_reclaimed() {
    let f = Fixture::new();
    let mut sleeper = Sleeper::spawn();
    f.ok(&["acquire", "orphan", "--pid", &sleeper.pid()]);
    f.ok(&["acquire", "alive"]);
    sleeper.kill();
    assert_eq!(f.ok(&["reap"]), "reaped 1\n");
    assert_eq!(f.ok(&["reap"]), "reaped 0\n");
    assert_eq!(f.list_json().len(), 1);
}

#[test]
fn stats_persist_in_the_registry_across_invocations() {
    let f = Fixture::new();
    f.ok(&["acquire", "a", "--ttl", "1h", "--range", "26020-26020"]);
    error_line(&f.run(&["acquire", "b", "--range", "26020-26020"]), 3);
    f.ok(&["acquire", "c"]);
    f.ok(&["release", "c"]);
    let stats: Value = serde_json::from_str(&f.ok(&["stats", "--json"])).unwrap();
    for (key, want) in [
        ("acquired", 2),
        ("released", 1),
        ("reaped", 0),
        ("exhausted", 1),
        ("errors", 0),
        ("live", 0),
        ("detached", 1),
    ] {
        assert_eq!(stats[key], want, "{key}: {stats}");
    }
    let table = f.ok(&["stats"]);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().eq(["exhausted", "1"])),
        "{table}"
    );
}

#[test]
fn an_exhausted_range_exits_3_with_the_live_count_and_a_hint() {
    let f = Fixture::new();
    f.ok(&["acquire", "a", "--range", "26030-26030"]);
    let line = error_line(&f.run(&["acquire", "b", "--range", "26030-26030"]), 3);
    assert!(line.contains("26030-26030"), "{line}");
    assert!(
        line.contains("portdaddy reap") && line.contains("1 ports"),
        "{line}"
    );
}

#[test]
fn doctor_passes_a_healthy_registry() {
    let f = Fixture::new();
    f.ok(&["acquire", "a", "--ttl", "1h"]);
    let out = f.run(&["doctor"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let report = text(&out.stdout);
    for topic in [
        "registry path",
        "file permissions",
        "integrity",
        "schema version",
        "journal mode",
        "port range",
        "stale leases",
    ] {
        let line = report
            .lines()
            .find(|l| l.contains(&format!("{topic}:")))
            .unwrap_or_else(|| panic!("no {topic} line:\n{report}"));
        assert!(
            line.starts_with("ok ") || line.starts_with("warn "),
            "{line}"
        );
    }
    let json: Value = serde_json::from_str(&f.ok(&["doctor", "--json"])).unwrap();
    assert_eq!(json["ok"], true);
    assert_eq!(json["journal_mode"], "wal");
}

#[test]
fn doctor_fails_a_file_that_is_no_registry_and_leaves_it_untouched() {
    let f = Fixture::new();
    std::fs::write(&f.db, b"definitely not sqlite").unwrap();
    let out = f.run(&["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    assert!(report.lines().any(|l| l.starts_with("fail ")), "{report}");
    assert_eq!(std::fs::read(&f.db).unwrap(), b"definitely not sqlite");
    assert!(!Path::new(&format!("{}.lock", f.db.display())).exists());
}

#[test]
fn completions_are_printed_for_each_shell() {
    let f = Fixture::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = f.ok(&["completions", shell]);
        assert!(
            script.contains("portdaddy") && script.contains("acquire"),
            "{shell}"
        );
    }
    error_line(&f.run(&["completions", "tcsh"]), 2);
}

#[test]
fn help_documents_the_exit_codes() {
    let f = Fixture::new();
    let help = f.ok(&["--help"]);
    assert!(help.contains("Exit codes:"), "{help}");
    for code in [
        "1  nothing matched",
        "2  usage error",
        "3  no free port",
        "4  the registry",
        "5  the output cannot be written",
    ] {
        assert!(help.contains(code), "{code}: {help}");
    }
}

/// Exit code 1 means "nothing matched" or "a check failed" only: a script may take it as an
/// answer. Output that cannot be written is a failure of its own.
#[cfg(target_os = "linux")]
#[test]
fn output_that_cannot_be_written_exits_5_not_1() {
    let f = Fixture::new();
    f.ok(&["acquire", "a", "--ttl", "1h"]);
    for args in [&["list"][..], &["list", "--json"], &["stats"]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = f.command(args).stdout(full).output().unwrap();
        let line = error_line(&out, 5);
        assert!(line.contains("cannot write"), "{args:?}: {line}");
    }
}

#[test]
fn an_empty_range_variable_is_ignored_and_a_bad_one_is_a_usage_error() {
    let f = Fixture::new();
    let out = f
        .command(&["list"])
        .env("PORTDADDY_RANGE", "")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = f
        .command(&["list"])
        .env("PORTDADDY_RANGE", "9-1")
        .output()
        .unwrap();
    assert!(error_line(&out, 2).contains("PORTDADDY_RANGE"));
}

#[test]
fn bad_input_gives_the_documented_exit_code_and_one_line() {
    let f = Fixture::new();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["frobnicate"], 2, "frobnicate"),
        (&["acquire", "a", "--preferred", "70000"], 2, "70000"),
        (&["acquire", "a", "--preferred", "http"], 2, "http"),
        (&["acquire", "a", "--preferred", "0"], 2, "0"),
        (&["release", "99999"], 2, "99999"),
        (&["acquire", "a", "--ttl", "5 fortnights"], 2, "fortnights"),
        (&["acquire", "a", "--ttl", "0s"], 2, "TTL"),
        (&["acquire", "a", "--ttl", "1h", "--pid", "1"], 2, "--pid"),
        (&["acquire", "a\tb"], 2, "invalid lease name"),
        (&["list", "--range", "26100-26000"], 2, "26100"),
        (&["run", "api"], 125, "CMD"),
        (
            &["list", "--db", "/dev/null/registry.sqlite3"],
            4,
            "/dev/null/registry.sqlite3",
        ),
    ];
    for (args, code, needle) in cases {
        let line = error_line(&f.run(args), *code);
        assert!(line.contains(needle), "{args:?}: {line}");
    }
    // A directory given as the registry, and a file that is not one.
    let dir = f.db.parent().unwrap().to_string_lossy().into_owned();
    error_line(&f.run(&["list", "--db", &dir]), 4);
    let foreign = f.db.with_file_name("foreign");
    std::fs::write(&foreign, b"not a database").unwrap();
    let line = error_line(&f.run(&["list", "--db", &foreign.to_string_lossy()]), 4);
    assert!(line.contains("hint:"), "{line}");
}

/// The ways `acquire` is asked for with the lease kept for the caller: owned by the caller,
/// detached with a TTL, a block, and each as JSON.
const ACQUIRES: &[&[&str]] = &[
    &["acquire", "unseen"],
    &["acquire", "unseen", "--json"],
    &["acquire", "unseen", "--ttl", "1h"],
    &["acquire", "unseen", "--ttl", "1h", "--json"],
    &["acquire", "unseen", "--block", "3"],
];

/// Asserts that the registry holds no lease, and that every lease counted as acquired was
/// counted as released too: `acquire`s that took `acquired` leases gave them all back.
fn assert_nothing_kept(f: &Fixture, acquired: u64, what: &str) {
    assert_eq!(
        f.list_json(),
        Vec::<Value>::new(),
        "{what}: a lease was kept"
    );
    let stats: Value = serde_json::from_str(&f.ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["acquired"], acquired, "{what}: {stats}");
    assert_eq!(stats["released"], acquired, "{what}: {stats}");
}

/// `portdaddy acquire >&-`: the caller would never see the port. Nothing is leased.
#[cfg(target_os = "linux")]
#[test]
fn acquire_with_stdout_closed_fails_and_leases_nothing() {
    let f = Fixture::new();
    for args in ACQUIRES {
        let out = Command::new("sh")
            .arg("-c")
            .arg("exec \"$@\" >&-")
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_portdaddy"))
            .args(*args)
            .env("PORTDADDY_DB", &f.db)
            .env("PORTDADDY_RANGE", RANGE)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let line = error_line(&out, 5);
        assert!(line.contains("stdout is closed"), "{args:?}: {line}");
        assert_nothing_kept(&f, 0, &format!("{args:?}"));
    }
}

/// `portdaddy acquire >/dev/full`: the port cannot be written. The lease is released.
#[cfg(target_os = "linux")]
#[test]
fn acquire_whose_output_cannot_be_written_fails_and_releases_the_lease() {
    let f = Fixture::new();
    for (i, args) in ACQUIRES.iter().enumerate() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = f.command(args).stdout(full).output().unwrap();
        let line = error_line(&out, 5);
        assert!(
            line.contains("cannot write the output") && line.contains("was released"),
            "{args:?}: {line}"
        );
        assert_nothing_kept(&f, i as u64 + 1, &format!("{args:?}"));
    }
}

/// `portdaddy acquire 1</dev/null`, or stdout a directory: a descriptor that is open but
/// cannot be written. The write fails with `EBADF`, which Rust's standard output takes for
/// a closed stdout and drops silently; the port was never seen, so the lease is released
/// and the command fails.
#[cfg(unix)]
#[test]
fn acquire_whose_stdout_is_open_only_for_reading_fails_and_releases_the_lease() {
    let f = Fixture::new();
    let mut acquired = 0;
    for unwritable in ["/dev/null", "/"] {
        for args in ACQUIRES {
            let stdout = std::fs::File::open(unwritable).unwrap();
            let out = f
                .command(args)
                .env("PORTDADDY_RANGE", "32530-32549")
                .stdout(stdout)
                .output()
                .unwrap();
            acquired += 1;
            let what = format!("{args:?} with stdout {unwritable} open for reading");
            assert_eq!(out.status.code(), Some(5), "{what}: {}", text(&out.stderr));
            let line = error_line(&out, 5);
            assert!(
                line.contains("cannot write the output") && line.contains("was released"),
                "{what}: {line}"
            );
            assert_nothing_kept(&f, acquired, &what);
        }
    }
}

/// `portdaddy acquire | true` where `true` has exited before the port is written: made
/// certain with a pipe whose read end is closed before `acquire` starts. `acquire` is not
/// killed by SIGPIPE before it can release: it fails and releases the lease.
#[test]
fn acquire_into_a_pipe_without_reader_fails_and_releases_the_lease() {
    let f = Fixture::new();
    for (i, args) in ACQUIRES.iter().enumerate() {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = f.command(args).stdout(writer).output().unwrap();
        let line = error_line(&out, 5);
        assert!(
            line.contains("cannot write the output") && line.contains("was released"),
            "{args:?}: {line}"
        );
        assert_nothing_kept(&f, i as u64 + 1, &format!("{args:?}"));
    }
}

/// `portdaddy list | head -1` is not an error: `list` ends quietly on a pipe whose reader has
/// gone, by the default action of SIGPIPE, and changes nothing.
#[cfg(unix)]
#[test]
fn list_into_a_pipe_without_reader_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let f = Fixture::new();
    f.ok(&["acquire", "kept", "--ttl", "1h"]);
    for args in [&["list"][..], &["list", "--json"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = f.command(args).stdout(writer).output().unwrap();
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{args:?}");
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
    }
    assert_eq!(f.list_json().len(), 1, "the lease is untouched");
}

/// With stderr gone as well, the error cannot be told: the exit code still is, and the
/// lease is still released (no panic for the line that cannot be written).
#[test]
fn acquire_with_stdout_and_stderr_into_pipes_without_reader_exits_5_and_releases() {
    let f = Fixture::new();
    let (out_reader, out_writer) = std::io::pipe().unwrap();
    let (err_reader, err_writer) = std::io::pipe().unwrap();
    drop((out_reader, err_reader));
    let status = f
        .command(&["acquire", "unseen"])
        .stdout(out_writer)
        .stderr(err_writer)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(5), "{status}");
    assert_nothing_kept(&f, 1, "stdout and stderr gone");
}
