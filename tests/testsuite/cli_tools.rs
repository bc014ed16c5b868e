//! The command's tools for everyday work: `wait` for a server, `who` holds a port, `stats` for
//! Prometheus, how `acquire` chose, and an empty `list` on a terminal; and the library's
//! [`portdaddy::wait_until_listening`] and the holder named in `PortUnavailable`.
//!
//! Ports 32850-32949 belong to this file (see `common`): servers are real processes (this
//! binary run again as a worker) bound on ports of 32850-32899, one port per test, and every
//! command gets `PORTDADDY_RANGE` 32900-32949.

use crate::common;
use crate::common::cli::{error_line, text, CliRegistry};

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::workers::{say, var, Worker};
use portdaddy::{Error, PortDaddy, Protocol, Request};
use serde_json::Value;

const RANGE: &str = "32900-32949";
const LEASE_RANGE: std::ops::RangeInclusive<u16> = 32900..=32949;
/// Where a worker binds: the port, and `tcp` or `udp`.
const PORT: &str = "PORTDADDY_TEST_TOOLS_PORT";
const PROTO: &str = "PORTDADDY_TEST_TOOLS_PROTO";

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

    fn json(&self, args: &[&str]) -> Value {
        let stdout = self.ok(args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }
}

/// A server in a process of its own: this binary run again, bound on `port` when told
/// `bind` (TCP: it then accepts connections and reports each as `ACCEPTED`).
fn server(label: &str, port: u16, protocol: &str) -> Worker {
    let (dir, db) = common::temp_registry();
    let worker = Worker::spawn(
        label,
        "server",
        &db,
        &LEASE_RANGE,
        &[(PORT, port.to_string()), (PROTO, protocol.to_owned())],
    );
    // The worker opens no registry; the directory may go.
    drop(dir);
    worker
}

/// A server told to bind, once it reports it listens.
fn listening_server(label: &str, port: u16, protocol: &str) -> Worker {
    let mut worker = server(label, port, protocol);
    worker.expect_line("READY", deadline());
    worker.send("bind");
    let line = worker.expect_line("LISTENING", deadline());
    assert_eq!(line, "LISTENING", "{}", worker.stderr());
    worker
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

#[test]
fn worker_entry() {
    let Ok(mode) = std::env::var(common::workers::MODE) else {
        return;
    };
    assert_eq!(mode, "server", "unknown worker mode");
    let port: u16 = var(PORT).parse().expect("port");
    say("READY");
    assert_eq!(common::workers::read_line().as_deref(), Some("bind"));
    if var(PROTO) == "udp" {
        let _socket = UdpSocket::bind(("127.0.0.1", port)).expect("bind udp");
        say("LISTENING");
        common::workers::wait_for_eof();
        return;
    }
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind tcp");
    say("LISTENING");
    // Until the test closes stdin, which ends this process (killed on drop otherwise).
    std::thread::spawn(|| {
        common::workers::wait_for_eof();
        std::process::exit(0);
    });
    for stream in listener.incoming() {
        drop(stream);
        say("ACCEPTED");
    }
}

/// Reaps `child` if it ends before `deadline`; kills it otherwise and fails.
fn finish(mut child: Child, what: &str) -> Output {
    let give_up = deadline();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > give_up {
            let _ = child.kill();
            panic!("{what} did not end before the deadline");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn wait_returns_once_a_server_that_starts_late_listens() {
    let port = 32850;
    let fixture = Fixture::new();
    let mut server = server("late server", port, "tcp");
    server.expect_line("READY", deadline());
    let wait = fixture
        .command(&["wait", &port.to_string(), "--timeout", "60s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wait");
    // Let `wait` poll a refused port for a while first; the checks below hold however long.
    std::thread::sleep(Duration::from_millis(200));
    let mut wait = wait;
    assert!(
        wait.try_wait().unwrap().is_none(),
        "wait returned before anything listened on port {port}"
    );
    server.send("bind");
    assert_eq!(server.expect_line("LISTENING", deadline()), "LISTENING");
    let out = finish(wait, "wait");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    // What it saw was this server: its connection reached it.
    assert_eq!(server.expect_line("ACCEPTED", deadline()), "ACCEPTED");
}

#[test]
fn wait_udp_returns_once_a_udp_socket_is_bound_late() {
    let port = 32851;
    let fixture = Fixture::new();
    let mut server = server("late udp server", port, "udp");
    server.expect_line("READY", deadline());
    let mut wait = fixture
        .command(&["wait", &port.to_string(), "--udp", "--timeout", "60s"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wait");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        wait.try_wait().unwrap().is_none(),
        "wait --udp returned before a socket was bound on port {port}"
    );
    server.send("bind");
    assert_eq!(server.expect_line("LISTENING", deadline()), "LISTENING");
    let out = finish(wait, "wait --udp");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn wait_exits_1_naming_the_port_once_the_timeout_has_passed() {
    let port = 32852;
    let fixture = Fixture::new();
    let started = Instant::now();
    let out = fixture.run(&["wait", &port.to_string(), "--timeout", "300ms"]);
    let line = error_line(&out, 1);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "gave up early"
    );
    assert!(
        line.contains(&format!("nothing listens on port {port}")),
        "{line}"
    );
    // How long it waited, in whole milliseconds: at least the timeout.
    let waited = line
        .split_once("after waiting ")
        .and_then(|(_, rest)| rest.split_once("ms"))
        .and_then(|(ms, _)| ms.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no wait in milliseconds: {line}"));
    assert!(waited >= 300, "{line}");
}

#[test]
fn wait_refuses_bad_input_as_a_usage_error() {
    let fixture = Fixture::new();
    for (args, says) in [
        (&["wait", "0"][..], "0"),
        (&["wait", "65536"][..], "65536"),
        (&["wait", "http"][..], "http"),
        (
            &["wait", "32853", "--timeout", "soon"][..],
            "\"soon\" is not a duration",
        ),
        (&["wait", "32853", "--timeout=-1s"][..], "-1s"),
        (&["wait"][..], "PORT"),
    ] {
        let line = error_line(&fixture.run(args), 2);
        assert!(line.contains(says), "{args:?}: {line}");
    }
}

#[test]
fn library_wait_until_listening_returns_for_a_late_server_and_times_out_without_one() {
    let port = 32854;
    let mut server = server("late server", port, "tcp");
    server.expect_line("READY", deadline());
    let error = portdaddy::wait_until_listening(port, Protocol::Tcp, Duration::from_millis(50))
        .unwrap_err();
    match &error {
        Error::NotListening {
            port: p,
            protocol,
            waited,
            ..
        } => {
            assert_eq!((*p, *protocol), (port, Protocol::Tcp));
            assert!(*waited >= Duration::from_millis(50), "{waited:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!error.is_registry_unusable() && error.path().is_none());
    server.send("bind");
    server.expect_line("LISTENING", deadline());
    portdaddy::wait_until_listening(port, Protocol::Tcp, Duration::from_secs(30)).unwrap();
    assert_eq!(server.expect_line("ACCEPTED", deadline()), "ACCEPTED");
}

#[test]
fn who_names_the_pid_and_command_of_a_foreign_listener() {
    let port = 32860;
    let fixture = Fixture::new();
    let server = listening_server("foreign listener", port, "tcp");
    let pid = server.pid();
    let out = fixture.run(&["who", &port.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("lease: none on port {port}")),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
        .unwrap_or_else(|| panic!("no row for pid {pid}: {stdout}"));
    assert!(row.contains("tcp"), "{row}");
    assert!(
        row.contains("cli_tools::worker_entry"),
        "the command line: {row}"
    );

    let value = fixture.json(&["who", &port.to_string(), "--json"]);
    assert_eq!(value["port"], port);
    assert!(value["lease"].is_null(), "{value}");
    let processes = value["processes"].as_array().expect("processes");
    let me = processes
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("{value}"));
    assert_eq!(me["protocol"], "tcp");
    assert!(me["command"]
        .as_str()
        .unwrap()
        .contains("cli_tools::worker_entry"));
}

#[test]
fn who_names_a_udp_socket_too() {
    let port = 32861;
    let fixture = Fixture::new();
    let server = listening_server("udp listener", port, "udp");
    let value = fixture.json(&["who", &port.to_string(), "--json"]);
    let processes = value["processes"].as_array().expect("processes");
    assert!(
        processes
            .iter()
            .any(|p| p["pid"] == server.pid() && p["protocol"] == "udp"),
        "{value}"
    );
}

/// A child that sleeps until killed; killed and reaped when dropped.
struct Sleeper(Child);

impl Sleeper {
    fn spawn() -> Self {
        Self(Command::new("sleep").arg("600").spawn().unwrap())
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn who_shows_a_lease_without_a_listener() {
    let port = 32910;
    let fixture = Fixture::new();
    let owner = Sleeper::spawn();
    let pid = owner.0.id().to_string();
    fixture.ok(&[
        "acquire",
        "db-main",
        "--preferred",
        &port.to_string(),
        "--pid",
        &pid,
    ]);
    let stdout = fixture.ok(&["who", &port.to_string()]);
    assert!(
        stdout.contains(&format!(
            "lease: db-main on port {port} (pid {pid}, live, age"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "processes: none with a listening TCP socket or a UDP socket on port {port}"
        )),
        "{stdout}"
    );
    let value = fixture.json(&["who", &port.to_string(), "--json"]);
    assert_eq!(value["lease"]["name"], "db-main");
    assert_eq!(value["lease"]["pid"].to_string(), pid);
    assert_eq!(value["lease"]["state"], "live");
    assert_eq!(value["processes"], Value::Array(Vec::new()));
}

#[test]
fn who_with_neither_lease_nor_process_says_so_and_exits_1() {
    let port = 32862;
    let fixture = Fixture::new();
    let out = fixture.run(&["who", &port.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("lease: none on port {port}")),
        "{stdout}"
    );
    assert!(stdout.contains("processes: none"), "{stdout}");
    let out = fixture.run(&["who", &port.to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(value["lease"].is_null(), "{value}");
    assert_eq!(value["processes"], Value::Array(Vec::new()));
    let line = error_line(&fixture.run(&["who", "0"]), 2);
    assert!(line.contains('0'), "{line}");
}

#[test]
fn who_reports_a_process_it_cannot_see_rather_than_none() {
    if !common::is_root() {
        println!("skipped: needs root to run `who` as another user");
        return;
    }
    let port = 32863;
    // Owned by root, so `nobody` cannot read its descriptors.
    let _server = listening_server("root's listener", port, "tcp");
    let dir = tempfile::tempdir().unwrap();
    let mut perms = std::fs::metadata(dir.path()).unwrap().permissions();
    // Sticky, as /tmp: the registry refuses a directory others could replace its files in.
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o1777);
    std::fs::set_permissions(dir.path(), perms).unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_portdaddy")])
        .args(["who", &port.to_string(), "--json"])
        .env("PORTDADDY_DB", dir.path().join("r.sqlite3"))
        .env("PORTDADDY_RANGE", RANGE)
        .stdin(Stdio::null())
        .output()
        .expect("runuser");
    let stderr = text(&out.stderr);
    if out.status.code() != Some(0)
        && (stderr.contains("runuser") || stderr.contains("Permission denied"))
    {
        println!("skipped: cannot run the command as nobody: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    let processes = value["processes"].as_array().expect("processes");
    assert!(
        processes
            .iter()
            .any(|p| p["pid"].is_null() && p["protocol"] == "tcp"),
        "a socket whose process cannot be seen is listed: {value}"
    );
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_portdaddy")])
        .args(["who", &port.to_string()])
        .env("PORTDADDY_DB", dir.path().join("r.sqlite3"))
        .env("PORTDADDY_RANGE", RANGE)
        .stdin(Stdio::null())
        .output()
        .expect("runuser");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("a process we cannot see"), "{stdout}");
}

#[test]
fn a_required_port_a_foreign_process_holds_names_it_in_the_error() {
    let port = 32870;
    let server = listening_server("foreign listener", port, "tcp");
    let (_dir, db) = common::temp_registry();
    let registry = PortDaddy::builder()
        .path(&db)
        .range(LEASE_RANGE)
        .open()
        .unwrap();
    let error = registry
        .acquire_with(&Request::new("api").require(port))
        .unwrap_err();
    match &error {
        Error::PortUnavailable {
            port: p, reason, ..
        } => {
            assert_eq!(*p, port);
            assert!(
                reason.contains(&format!("pid {}", server.pid())),
                "{reason}"
            );
            assert!(reason.contains("cli_tools::worker_entry"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn acquire_json_says_how_the_port_was_chosen_and_who_holds_the_preferred_one() {
    let fixture = Fixture::new();
    let owner = Sleeper::spawn();
    let pid = owner.0.id().to_string();
    let first = fixture.json(&[
        "acquire",
        "web",
        "--preferred",
        "32920",
        "--pid",
        &pid,
        "--json",
    ]);
    assert_eq!(
        (first["port"].clone(), first["choice"].clone()),
        (32920.into(), "preferred".into())
    );
    assert!(first.get("preferred_held_by").is_none(), "{first}");
    fixture.ok(&["release", "32920"]);
    let again = fixture.json(&["acquire", "web", "--pid", &pid, "--json"]);
    assert_eq!(
        (again["port"].clone(), again["choice"].clone()),
        (32920.into(), "remembered".into())
    );
    let other = fixture.json(&["acquire", "other", "--pid", &pid, "--json"]);
    assert_eq!(other["choice"], "searched");
    // Preferred, but leased in the registry: no process to name.
    let leased = fixture.json(&[
        "acquire",
        "third",
        "--preferred",
        "32920",
        "--pid",
        &pid,
        "--json",
    ]);
    assert_eq!(leased["choice"], "searched", "{leased}");
    assert!(leased.get("preferred_held_by").is_none(), "{leased}");

    // A preferred port outside the range that a foreign process holds: searched instead,
    // and the holder is named.
    let port = 32871;
    let server = listening_server("foreign listener", port, "tcp");
    let value = fixture.json(&[
        "acquire",
        "api",
        "--preferred",
        &port.to_string(),
        "--pid",
        &pid,
        "--json",
    ]);
    assert_eq!(value["choice"], "searched", "{value}");
    assert_ne!(value["port"], port);
    let holders = value["preferred_held_by"].as_array().expect("holders");
    assert!(holders.iter().any(|h| h["pid"] == server.pid()), "{value}");
}

#[test]
fn an_empty_list_prints_its_header_on_a_terminal_and_nothing_to_a_pipe() {
    let fixture = Fixture::new();
    assert_eq!(fixture.ok(&["list"]), "", "a pipe gets nothing, as before");
    // `script` gives the command a terminal.
    let inner = format!(
        "PORTDADDY_DB='{}' PORTDADDY_RANGE={RANGE} '{}' list",
        fixture.db.display(),
        env!("CARGO_BIN_EXE_portdaddy")
    );
    let out = match Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            println!("skipped: `script` cannot be run to give a terminal: {e}");
            return;
        }
    };
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.trim_end(),
        "PORT  PROTO  NAME  PID  AGE  EXPIRES  STATE",
        "{stdout:?}"
    );
}

/// Parses `exposition` with the Prometheus project's reference Python parser; each sample
/// as a JSON array `[type, name, {labels}, value]`.
fn parse_with_prometheus_client(exposition: &str) -> Vec<Value> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(json.dumps([family.type, s.name, s.labels, s.value]))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (CI installs prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the reference parser refused the output (`pip install prometheus-client`?): {}\n{exposition}",
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn stats_in_prometheus_format_reads_back_with_the_reference_parser() {
    // A registry path with every character a label value escapes.
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("a\"b\\c\nd");
    std::fs::create_dir(&odd).unwrap();
    let db = odd.join("r.sqlite3");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_portdaddy"))
            .args(args)
            .env("PORTDADDY_DB", &db)
            .env("PORTDADDY_RANGE", RANGE)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let owner = Sleeper::spawn();
    let pid = owner.0.id().to_string();
    for name in ["a", "b"] {
        assert!(run(&["acquire", name, "--pid", &pid]).status.success());
    }
    assert!(run(&["acquire", "c", "--ttl", "1h"]).status.success());
    assert!(run(&["release", "a", "--name"]).status.success());
    let out = run(&["stats", "--format", "prometheus"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exposition = text(&out.stdout);
    let path = db.to_str().unwrap();
    let samples = parse_with_prometheus_client(&exposition);
    let has = |kind: &str, name: &str, labels: Value, value: u32| {
        let found = samples.iter().any(|s| {
            s[0] == kind && s[1] == name && s[2] == labels && s[3].as_f64() == Some(value.into())
        });
        assert!(found, "{kind} {name} {labels} {value} not in {samples:#?}");
    };
    let expect = |kind: &str, name: &str, value: u32| {
        has(kind, name, serde_json::json!({ "registry": path }), value);
    };
    expect("counter", "portdaddy_leases_acquired_total", 3);
    expect("counter", "portdaddy_leases_released_total", 1);
    expect("counter", "portdaddy_leases_reaped_total", 0);
    expect("counter", "portdaddy_claims_exhausted_total", 0);
    expect("counter", "portdaddy_claims_failed_total", 0);
    let gauge = |state: &str, value: u32| {
        let labels = serde_json::json!({ "registry": path, "state": state });
        has("gauge", "portdaddy_leases", labels, value);
    };
    gauge("live", 1);
    gauge("detached", 1);
    gauge("stale", 0);
    assert_eq!(samples.len(), 8, "{samples:#?}");

    // `--json` still works, and says the same.
    let out = run(&["stats", "--json"]);
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (value["acquired"].clone(), value["live"].clone()),
        (3.into(), 1.into())
    );
    let same: Value = serde_json::from_slice(&run(&["stats", "--format", "json"]).stdout).unwrap();
    assert_eq!(value, same);
    let line = error_line(&run(&["stats", "--format", "xml"]), 2);
    assert!(line.contains("xml"), "{line}");
}

#[test]
fn a_guard_names_who_holds_its_preferred_port_when_it_got_another() {
    let port = 32872;
    let server = listening_server("foreign listener", port, "tcp");
    let (_dir, db) = common::temp_registry();
    let registry = PortDaddy::builder()
        .path(&db)
        .range(LEASE_RANGE)
        .open()
        .unwrap();
    let guard = registry
        .acquire_with(&Request::new("api").preferred(port))
        .unwrap();
    assert_ne!(guard.port(), port);
    let holders = guard.preferred_port_holders().expect("Linux can tell");
    assert!(
        holders
            .iter()
            .any(|h| h.pid == Some(server.pid()) && h.protocol == Protocol::Tcp),
        "{holders:?}"
    );
    // A preferred port that was given has nothing to explain.
    let free = registry
        .acquire_with(&Request::new("web").preferred(32873))
        .unwrap();
    assert_eq!(free.port(), 32873);
    assert_eq!(free.preferred_port_holders(), None);
}
