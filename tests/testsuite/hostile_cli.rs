//! Hostile names through the `portdaddy` command: invalid UTF-8, escape sequences, the
//! longest argument the kernel passes, SQL syntax; and names that only a damaged or hostile registry can hold, shown by
//! `list`. Every error is one line without raw control characters, and no output of the
//! command ever carries a raw control character taken from a name.
//!
//! And every signal a supervisor or a person may send to `portdaddy run`: passed on to the
//! command, while `run` holds the command's port until it exits.
//!
//! Ports 26950-26999 and 32560-32569 belong to this file (see `common`).
#![cfg(unix)]

use crate::common::cli::CliRegistry;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const RANGE: &str = "26950-26999";

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

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", lossy(&out.stderr));
        lossy(&out.stdout)
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Control characters other than the newline that ends each line, and the characters that
/// reorder text.
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| {
            (c.is_control() && *c != '\n')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}

/// Asserts a usage error (exit code 2): one short line on stderr naming the problem, with no
/// raw control character, and nothing on stdout.
fn assert_refused(out: &Output, what: &str) {
    assert_refused_with(out, 2, what);
}

/// Asserts a usage error as `assert_refused`, with exit code `code` (125 for `run`).
fn assert_refused_with(out: &Output, code: i32, what: &str) {
    let stderr = lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{what}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
    assert!(
        stderr.len() < 1000,
        "{what}: a {}-byte message",
        stderr.len()
    );
    assert!(
        raw_controls(&stderr).is_empty(),
        "{what}: raw control characters in {stderr:?}"
    );
    assert!(out.stdout.is_empty(), "{what}: {}", lossy(&out.stdout));
}

#[test]
fn a_name_that_is_not_utf8_is_a_usage_error() {
    let f = Fixture::new();
    let name = OsStr::from_bytes(b"caf\xe9\xff\x1b[2J");
    let out = f.run(&[OsStr::new("acquire"), name]);
    assert_refused(&out, "invalid UTF-8");
    assert!(f.ok(&["list", "--all", "--json"]).trim() == "[]");
}

#[test]
fn names_with_escape_sequences_or_the_longest_argument_are_usage_errors() {
    let f = Fixture::new();
    // The longest single argument Linux passes to a program (MAX_ARG_STRLEN, NUL included).
    let long = "x".repeat(128 * 1024 - 1);
    let escapes = "\u{1b}[2J".repeat(1000);
    for (what, name) in [
        ("CSI", "\u{1b}[31mred"),
        ("OSC title", "\u{1b}]0;owned\u{7}"),
        ("C1 CSI", "\u{9b}2J"),
        ("carriage return", "ok\rFAKE"),
        ("bidi override", "abc\u{202e}fed"),
        ("128 KiB", long.as_str()),
        ("a thousand escapes", escapes.as_str()),
    ] {
        assert_refused(&f.run(&["acquire", name]), what);
        assert_refused_with(&f.run(&["run", name, "--", "true"]), 125, what);
    }
    assert_eq!(f.ok(&["list", "--all", "--json"]).trim(), "[]");
}

#[test]
fn names_with_sql_syntax_are_listed_verbatim() {
    let f = Fixture::new();
    let names = ["'; DROP TABLE leases; --", "%", "a_b", "\"quoted\""];
    for name in names {
        f.ok(&["acquire", name, "--ttl", "1h"]);
    }
    let table = f.ok(&["list"]);
    for name in names {
        assert!(table.contains(name), "{name:?} missing from\n{table}");
    }
    let json: serde_json::Value = serde_json::from_str(&f.ok(&["list", "--json"])).unwrap();
    let listed: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), names.len());
    for name in names {
        assert!(listed.contains(&name), "{name:?} missing from {listed:?}");
    }
}

/// Names that the library refuses can still be in a registry that someone wrote by hand;
/// the table shows them escaped and the JSON escapes them as JSON does.
#[test]
fn list_never_prints_raw_control_characters_from_the_registry() {
    let f = Fixture::new();
    let hostile = [
        "\u{9b}2J",
        "bell\u{7}",
        "cr\rover",
        "nul\0byte",
        "del\u{7f}",
        "\u{2066}isolate",
        "\u{1b}]8;;http://x\u{1b}\\link",
    ];
    for _ in hostile {
        f.ok(&["acquire", "placeholder", "--ttl", "1h"]);
    }
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM leases ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (id, name) in ids.iter().zip(hostile) {
        conn.execute(
            "UPDATE leases SET name = ?1 WHERE id = ?2",
            rusqlite::params![name, id],
        )
        .unwrap();
    }
    drop(conn);
    for args in [&["list"][..], &["list", "--all"], &["list", "--json"]] {
        let out = f.ok(args);
        assert!(
            raw_controls(&out).is_empty(),
            "{args:?} printed raw control characters: {out:?}"
        );
        let lines = if args.contains(&"--json") {
            1
        } else {
            hostile.len() + 1
        };
        assert_eq!(
            out.lines().count(),
            lines,
            "{args:?}: a name broke a line: {out}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(&f.ok(&["list", "--json"])).unwrap();
    let mut listed: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    let mut expected = hostile.to_vec();
    expected.sort_unstable();
    assert_eq!(listed, expected, "JSON carries the names exactly");
}

/// Times before 1970 and after 9999 come from a registry written by hand or by a clock gone
/// wild; `list` shows them, and the JSON writes them too (null would mean "no expiry").
#[test]
fn list_shows_times_before_1970_and_after_9999() {
    let f = Fixture::new();
    f.ok(&["acquire", "early", "--ttl", "1h"]);
    f.ok(&["acquire", "late", "--ttl", "1h"]);
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    // 1969-12-31T23:59:59Z, and a day in the year 10000.
    conn.execute(
        "UPDATE leases SET acquired_at = -1000 WHERE name = 'early'",
        [],
    )
    .unwrap();
    conn.execute(
        "UPDATE leases SET expires_at = 253402387200000 WHERE name = 'late'",
        [],
    )
    .unwrap();
    drop(conn);
    let table = f.ok(&["list", "--all"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&f.ok(&["list", "--all", "--json"])).unwrap();
    let lease = |name: &str| {
        json.as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {json}"))
            .clone()
    };
    assert_eq!(
        lease("early")["acquired_at"],
        "1969-12-31T23:59:59Z",
        "{json}"
    );
    assert!(lease("early")["expires_at"].is_string(), "{json}");
    assert_eq!(
        lease("late")["expires_at"],
        "+10000-01-02T00:00:00Z",
        "{json}"
    );
    assert!(lease("late")["acquired_at"].is_string(), "{json}");
}

/// Set in the environment of [`bind_and_wait_entry`] to make it bind `$PORT` and wait.
const BIND_AND_WAIT: &str = "PORTDADDY_HOSTILE_CLI_BIND_AND_WAIT";

/// A command for `run`: binds `127.0.0.1:$PORT`, prints `BOUND <pid>`, and holds the port
/// until its stdin ends. Does nothing unless [`BIND_AND_WAIT`] is set.
#[test]
fn bind_and_wait_entry() {
    use std::io::{Read, Write};
    if std::env::var_os(BIND_AND_WAIT).is_none() {
        return;
    }
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "\nBOUND {}", std::process::id()).unwrap();
    out.flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// `portdaddy run` killed with SIGKILL: the lease follows the command. While the command
/// still runs, the lease is live (`reap` leaves it, another claim on a one-port range is
/// exhausted, `list` shows it); once the command has exited, the port is reclaimed.
#[test]
fn a_killed_run_leaves_the_lease_to_its_command_until_it_exits() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    const ONE_PORT: &str = "26999-26999";
    let fixture = Fixture::new();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_portdaddy"))
            .args(args)
            .env("PORTDADDY_DB", &fixture.db)
            .env("PORTDADDY_RANGE", ONE_PORT)
            .stdin(Stdio::null())
            .output()
            .expect("run portdaddy")
    };
    let mut run = Command::new(env!("CARGO_BIN_EXE_portdaddy"))
        .args(["run", "svc", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            &sibling_test!("bind_and_wait_entry"),
            "--exact",
            "--nocapture",
        ])
        .env("PORTDADDY_DB", &fixture.db)
        .env("PORTDADDY_RANGE", ONE_PORT)
        .env(BIND_AND_WAIT, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn portdaddy run");
    let stdin = run.stdin.take();
    let stdout = run.stdout.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let command_pid: i32 = loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the command never bound its port");
        if let Some(pid) = line.strip_prefix("BOUND ") {
            break pid.parse().unwrap();
        }
    };
    // Kill portdaddy itself; the command goes on.
    run.kill().unwrap();
    run.wait().unwrap();
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: a plain syscall on the command this test started.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
            }
        }
    }
    let _command = KillOnDrop(command_pid);

    let reap = cli(&["reap"]);
    assert_eq!(lossy(&reap.stdout), "reaped 0\n", "{}", lossy(&reap.stderr));
    let other = cli(&["acquire", "other"]);
    assert_eq!(other.status.code(), Some(3), "{}", lossy(&other.stdout));
    let list = lossy(&cli(&["list"]).stdout);
    assert!(list.contains("svc") && list.contains("26999"), "{list}");

    // The command exits (its stdin ends); the port is reclaimed.
    drop(stdin);
    // Gone, or a zombie (orphans may stay one) whose threads have all exited: its files,
    // the lock among them, are closed by then.
    let exited = || {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{command_pid}/stat")) else {
            return true;
        };
        let threads = std::fs::read_to_string(format!("/proc/{command_pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|n| n.trim().parse::<u32>().ok())
            })
            .unwrap_or(0);
        stat[stat.rfind(')').unwrap() + 1..]
            .trim_start()
            .starts_with('Z')
            && threads <= 1
    };
    while !exited() {
        assert!(Instant::now() < deadline, "the command never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let other = cli(&["acquire", "other"]);
    assert!(other.status.success(), "{}", lossy(&other.stderr));
    assert_eq!(lossy(&other.stdout), "26999\n");
}

/// `portdaddy run svc -- sh -c …` whose command traps one signal, reports each one on a
/// line of its own, and runs until the file `stop` appears.
struct Supervised {
    /// The process the test started: `portdaddy run`, or a shell that runs it.
    child: std::process::Child,
    /// The pid of `portdaddy run`.
    run: i32,
    /// The command's pid.
    command: i32,
    lines: std::sync::mpsc::Receiver<String>,
    stop: PathBuf,
}

/// How long any one step may take before the test fails.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

impl Supervised {
    /// Starts the command trapping `signal` and waits until it reports `ready`. `run` gets
    /// a process group of its own, so that it is never in a terminal's foreground: the
    /// command then has a group of its own too, and gets each signal only through `run`.
    fn start(f: &Fixture, signal: i32) -> Self {
        use std::os::unix::process::CommandExt;
        let supervised = Self::start_with(f, signal, |mut run| {
            run.process_group(0);
            run
        });
        assert_eq!(supervised.run, supervised.child.id() as i32);
        supervised
    }

    /// Starts the command trapping `signal` through the command `launch` makes of the
    /// `portdaddy run` command, and waits until the command reports `ready`.
    fn start_with(f: &Fixture, signal: i32, launch: impl FnOnce(Command) -> Command) -> Self {
        use std::io::BufRead;
        let stop = f.db.with_file_name("stop");
        let script = format!(
            "trap 'echo got-{signal}' {signal}; echo \"ready $$ $PPID\"; \
             while [ ! -e \"$STOP\" ]; do sleep 0.05; done; echo stopping; exit 7"
        );
        let mut run = Command::new(env!("CARGO_BIN_EXE_portdaddy"));
        run.args(["run", "svc", "--", "sh", "-c", &script])
            .env("PORTDADDY_DB", &f.db)
            .env("PORTDADDY_RANGE", RANGE)
            .env("STOP", &stop)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = launch(run).spawn().expect("start portdaddy run");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                if tx.send(line.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        let mut supervised = Self {
            child,
            run: 0,
            command: 0,
            lines,
            stop,
        };
        let ready = supervised.next_line();
        let pids: Vec<i32> = ready
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("{ready:?}"))
            .split(' ')
            .map(|p| p.parse().unwrap())
            .collect();
        (supervised.command, supervised.run) = (pids[0], pids[1]);
        supervised
    }

    fn pid(&self) -> i32 {
        self.run
    }

    /// The next line from the command; fails at once if `run` has exited meanwhile.
    fn next_line(&mut self) -> String {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            match self
                .lines
                .recv_timeout(std::time::Duration::from_millis(20))
            {
                Ok(line) => return line,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => panic!("no more lines from the command: {e}"),
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("portdaddy run ended ({status}) while its command runs");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no line from the command"
            );
        }
    }

    /// Sends `signal` to the `run` process.
    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory effects.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Waits until `run` is stopped (`stopped`) or no longer stopped.
    fn wait_stopped(&self, stopped: bool) {
        wait_stopped(self.run, stopped);
    }

    /// Asserts that `run` still runs and that its lease is listed as live and its own.
    fn assert_holding(&mut self, f: &Fixture, what: &str) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{what}: portdaddy run exited while its command runs"
        );
        let listed: serde_json::Value = serde_json::from_str(&f.ok(&["list", "--json"])).unwrap();
        let leases = listed.as_array().unwrap();
        assert_eq!(leases.len(), 1, "{what}: {listed}");
        assert_eq!(leases[0]["name"], "svc", "{what}: {listed}");
        assert_eq!(leases[0]["state"], "live", "{what}: {listed}");
        assert_eq!(leases[0]["pid"], self.pid(), "{what}: {listed}");
    }

    /// Lets the command end, and asserts that `run` passes its exit code on, that nothing
    /// more came out of the command, and that the lease is gone.
    fn finish(mut self, f: &Fixture, what: &str) {
        std::fs::write(&self.stop, b"").unwrap();
        let deadline = std::time::Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: portdaddy run did not exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(7), "{what}: the command's exit code");
        let mut rest = Vec::new();
        loop {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(line) => rest.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("{what}: the output did not end ({e}); so far {rest:?}"),
            }
        }
        assert_eq!(rest, ["stopping"], "{what}: the signal came once");
        assert_eq!(
            f.ok(&["list", "--all", "--json"]).trim(),
            "[]",
            "{what}: released once the command exited"
        );
    }
}

/// The state letter of process `pid` in /proc/PID/stat (R, S, T, Z, …).
fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    after_name.trim_start().chars().next().unwrap()
}

/// Waits until process `pid` is stopped (`stopped`) or no longer stopped.
///
/// A shell that `vfork`s (dash does, for every external command) and whose child the stop
/// signal caught before its `exec` cannot stop itself: it waits for that child, in state D,
/// until the job is continued. Held back by a stopped child like that, it counts as stopped.
fn wait_stopped(pid: i32, stopped: bool) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while is_stopped(pid) != stopped {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} is still in state {}",
            state(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether `pid` is stopped, or waits in `vfork` (state D) for a child that is stopped.
fn is_stopped(pid: i32) -> bool {
    match state(pid) {
        'T' => true,
        'D' => stopped_children(pid),
        _ => false,
    }
}

/// Whether some child of `pid` is stopped.
fn stopped_children(pid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        let Some(close) = stat.rfind(')') else {
            return false;
        };
        let mut fields = stat[close + 1..].split_ascii_whitespace();
        let state = fields.next();
        let parent = fields.next().and_then(|p| p.parse::<i32>().ok());
        state == Some("T") && parent == Some(pid)
    })
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // Ends a command left running by a failed assertion, even one orphaned by `run`.
        let _ = std::fs::write(&self.stop, b"");
        if std::thread::panicking() {
            for pid in [self.run, self.command] {
                if pid > 0 {
                    // SAFETY: kill has no memory effects.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A supervisor that keeps signalling `portdaddy run` while its command exits: `run`
/// must outlive the burst long enough to release the lease and exit with the command's code.
/// (The self-pipe that carried signals to the forwarding thread was closed before the
/// handlers went, and a signal in between raised `SIGPIPE` in `run`, which killed it with the
/// lease still recorded.) Each round ends the command while signals are sent to `run` as fast
/// as the test can send them, until it has exited.
#[test]
fn run_whose_command_exits_during_a_burst_of_signals_exits_with_its_code_and_releases() {
    use std::io::{BufRead, BufReader};
    let f = Fixture::new();
    let burst = [
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGWINCH,
    ];
    for round in 0..30 {
        let mut run = Command::new(env!("CARGO_BIN_EXE_portdaddy"))
            .args(["run", "burst", "--", "sh", "-c"])
            .arg("trap '' TERM USR1 HUP INT WINCH; echo go; read line; exit 3")
            .env("PORTDADDY_DB", &f.db)
            .env("PORTDADDY_RANGE", "32560-32569")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run portdaddy run");
        let mut go = String::new();
        BufReader::new(run.stdout.take().unwrap())
            .read_line(&mut go)
            .unwrap();
        assert_eq!(go, "go\n", "round {round}: the command started");
        // The command has the lease's port in its environment by now, and traps the burst.
        drop(run.stdin.take());
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut sent = 0usize;
        let status = loop {
            if let Some(status) = run.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "round {round}: run did not exit"
            );
            // SAFETY: kill has no memory effects; `run` is not reaped yet, so its pid is its own.
            unsafe { libc::kill(run.id() as i32, burst[sent % burst.len()]) };
            sent += 1;
        };
        assert_eq!(
            status.code(),
            Some(3),
            "round {round}: run ended with {status} after {sent} signals, not with its \
             command's code"
        );
        let left = f.ok(&["list", "--json"]);
        assert_eq!(
            left.trim(),
            "[]",
            "round {round}: run left its lease behind"
        );
    }
}

/// Sends `signal` to `portdaddy run` while its command traps it and keeps running: the
/// command gets it once, `run` lives on and holds the lease, and releases it only once the
/// command has exited.
fn run_passes_on(signal: i32) {
    let f = Fixture::new();
    let mut run = Supervised::start(&f, signal);
    let what = format!("signal {signal}");
    run.signal(signal);
    assert_eq!(run.next_line(), format!("got-{signal}"), "{what}");
    run.assert_holding(&f, &what);
    run.finish(&f, &what);
}

#[test]
fn run_passes_sighup_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGHUP);
}

#[test]
fn run_passes_sigint_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGINT);
}

#[test]
fn run_passes_sigquit_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGQUIT);
}

#[test]
fn run_passes_sigterm_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGTERM);
}

#[test]
fn run_passes_sigusr1_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGUSR1);
}

#[test]
fn run_passes_sigusr2_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGUSR2);
}

#[test]
fn run_passes_sigalrm_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGALRM);
}

#[test]
fn run_passes_sigwinch_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGWINCH);
}

#[test]
fn run_passes_sigvtalrm_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGVTALRM);
}

#[test]
fn run_passes_sigprof_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGPROF);
}

#[test]
fn run_passes_sigurg_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGURG);
}

#[test]
fn run_passes_sigio_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGIO);
}

#[test]
fn run_passes_sigxcpu_sent_by_a_process_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGXCPU);
}

#[test]
fn run_passes_sigxfsz_sent_by_a_process_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGXFSZ);
}

#[cfg(target_os = "linux")]
#[test]
fn run_passes_sigpwr_on_and_holds_the_port_until_the_command_exits() {
    run_passes_on(libc::SIGPWR);
}

#[cfg(target_os = "linux")]
#[test]
fn run_passes_the_first_and_last_real_time_signals_on_and_holds_the_port() {
    run_passes_on(libc::SIGRTMIN());
    run_passes_on(libc::SIGRTMAX());
}

/// Outside the terminal's foreground the command has a process group of its own, and
/// `run` passes SIGCONT on too.
#[test]
fn run_passes_sigcont_on_outside_the_foreground_and_holds_the_port() {
    run_passes_on(libc::SIGCONT);
}

/// The job-control stop keeps its default action, so that Ctrl-Z stops a foreground `run`
/// together with its command. Outside the foreground, a SIGTSTP sent to `run` stops `run`
/// alone: the command runs on and keeps its port, and the SIGCONT that continues `run` is
/// passed on.
#[test]
fn run_stops_on_sigtstp_and_its_command_keeps_the_port_until_it_exits() {
    let f = Fixture::new();
    let mut run = Supervised::start(&f, libc::SIGCONT);
    run.signal(libc::SIGTSTP);
    run.wait_stopped(true);
    run.assert_holding(&f, "stopped");
    run.signal(libc::SIGCONT);
    run.wait_stopped(false);
    assert_eq!(run.next_line(), format!("got-{}", libc::SIGCONT));
    run.assert_holding(&f, "continued");
    run.finish(&f, "SIGTSTP");
}

/// A pseudo-terminal: its master side, and the path of its slave side.
#[cfg(target_os = "linux")]
fn open_pty() -> std::io::Result<(std::fs::File, std::ffi::CString)> {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt only opens a descriptor.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `master` was just opened and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt and unlockpt take an open master descriptor; ptsname_r writes at most
    // `name.len()` bytes, NUL included.
    let rc = unsafe {
        if libc::grantpt(master) != 0 || libc::unlockpt(master) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::ptsname_r(master, name.as_mut_ptr(), name.len())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_owned();
    Ok((file, slave))
}

/// In a terminal, `portdaddy run` is a foreground job of an interactive shell, and its
/// command shares its process group: Ctrl-Z stops both (the shell sees the job stopped),
/// `fg` continues both, and Ctrl-C reaches the command while `run` lives on with the lease.
#[cfg(target_os = "linux")]
#[test]
fn run_in_a_terminal_stops_with_its_command_on_ctrl_z_and_ctrl_c_reaches_the_command() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let f = Fixture::new();
    let (mut terminal, slave) = match open_pty() {
        Ok(pty) => pty,
        Err(e) => {
            println!("skipped: no pseudo-terminal: {e}");
            return;
        }
    };
    if Command::new("bash").arg("-c").arg("true").status().is_err() {
        println!("skipped: no bash to act as the terminal's shell");
        return;
    }
    let mut run = Supervised::start_with(&f, libc::SIGINT, |run| {
        // The terminal's interactive shell: `run` is a foreground job in a group of its own.
        let mut shell = Command::new("bash");
        shell
            .args(["--norc", "--noprofile", "-i", "-c"])
            .arg("\"$@\"; echo \"stopped $?\"; read _; fg >/dev/null")
            .arg("bash")
            .arg(run.get_program())
            .args(run.get_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (key, value) in run.get_envs() {
            if let Some(value) = value {
                shell.env(key, value);
            }
        }
        // SAFETY: setsid, open, ioctl, dup2 and close are async-signal-safe, and the
        // closure only reads the path it owns.
        unsafe {
            shell.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A session leader opening a terminal makes it its controlling terminal.
                let tty = libc::open(slave.as_ptr(), libc::O_RDWR);
                if tty < 0 || libc::ioctl(tty, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::dup2(tty, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(tty);
                Ok(())
            });
        }
        shell
    });
    assert_ne!(run.run, run.child.id() as i32, "run is the shell's job");
    // Ctrl-Z.
    terminal.write_all(b"\x1a").unwrap();
    assert_eq!(run.next_line(), format!("stopped {}", 128 + libc::SIGTSTP));
    wait_stopped(run.run, true);
    wait_stopped(run.command, true);
    run.assert_holding(&f, "stopped by Ctrl-Z");
    // `fg`.
    terminal.write_all(b"\n").unwrap();
    wait_stopped(run.run, false);
    wait_stopped(run.command, false);
    // Ctrl-C: the kernel signals the whole foreground group; `run` catches it and lives on.
    terminal.write_all(b"\x03").unwrap();
    assert_eq!(run.next_line(), format!("got-{}", libc::SIGINT));
    run.assert_holding(&f, "after Ctrl-C");
    run.finish(&f, "in a terminal");
}

/// Under `nohup`, or a supervisor that ignores some signals for its children, a signal that
/// arrives ignored stays ignored for `run` and for its command, whichever it is.
#[test]
fn run_leaves_any_signal_that_arrives_ignored_ignored_for_itself_and_the_command() {
    use std::os::unix::process::CommandExt;
    let f = Fixture::new();
    let ignored = [
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGTERM,
        libc::SIGPROF,
    ];
    let script: String = ignored
        .iter()
        .map(|s| format!("kill -{s} $$; kill -{s} $PPID; "))
        .chain(std::iter::once("echo survived".to_owned()))
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portdaddy"));
    cmd.args(["run", "svc", "--", "sh", "-c", &script])
        .env("PORTDADDY_DB", &f.db)
        .env("PORTDADDY_RANGE", RANGE)
        .stdin(Stdio::null())
        .process_group(0);
    // SAFETY: signal() is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(move || {
            for signal in ignored {
                libc::signal(signal, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", lossy(&out.stderr));
    assert_eq!(lossy(&out.stdout), "survived\n");
    assert_eq!(f.ok(&["list", "--all", "--json"]).trim(), "[]");
}

/// `portdaddy run` killed with SIGKILL leaves its lease to its command, which holds run's
/// owner lock file; a `reap` that runs out of file descriptors can open the registry but not
/// that lock file, and must not take the owner for dead because run's own pid is gone: the
/// lease stays live for every limit, and is reclaimed once the command has exited.
#[test]
fn a_reap_out_of_descriptors_leaves_the_lease_of_a_killed_runs_command() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};
    // Ports of this test (nothing else binds them): `run` probes by binding.
    const PORTS: &str = "32400-32449";
    let fixture = Fixture::new();
    let cli = |args: &[&str], limit: Option<libc::rlim_t>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_portdaddy"));
        command
            .args(args)
            .env("PORTDADDY_DB", &fixture.db)
            .env("PORTDADDY_RANGE", PORTS)
            .stdin(Stdio::null());
        if let Some(limit) = limit {
            // SAFETY: setrlimit is async-signal-safe and only changes the child.
            unsafe {
                command.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command.output().expect("run portdaddy")
    };
    let mut run = Command::new(env!("CARGO_BIN_EXE_portdaddy"))
        .args([
            "run",
            "svc",
            "--",
            "sh",
            "-c",
            "echo READY $$; exec sleep 600",
        ])
        .env("PORTDADDY_DB", &fixture.db)
        .env("PORTDADDY_RANGE", PORTS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn portdaddy run");
    let mut stdout = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("the command's first line");
    let command_pid: i32 = line
        .trim()
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("the command said {line:?}"))
        .parse()
        .unwrap();
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: a plain syscall on the command this test started.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
            }
        }
    }
    let command = KillOnDrop(command_pid);
    run.kill().unwrap();
    run.wait().unwrap();
    let live = || {
        let list = lossy(&cli(&["list", "--all"], None).stdout);
        list.lines()
            .any(|l| l.contains("svc") && l.ends_with("live"))
    };
    assert!(
        live(),
        "the command's lease is not live after run was killed"
    );

    // Every limit from one that cannot even open the registry to one that can do all.
    let mut opened = 0;
    for limit in 3..=24 {
        let reap = cli(&["reap"], Some(limit));
        if reap.status.success() {
            opened += 1;
        }
        assert!(
            live(),
            "reap with {limit} descriptors reclaimed the lease of a running command: {}{}",
            lossy(&reap.stdout),
            lossy(&reap.stderr)
        );
    }
    assert!(opened > 0, "no reap could open the registry");

    // Once the command has exited, the lease is reclaimed.
    drop(command);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reap = lossy(&cli(&["reap"], None).stdout);
        if reap == "reaped 1\n" {
            break;
        }
        assert_eq!(reap, "reaped 0\n");
        assert!(Instant::now() < deadline, "the lease was never reclaimed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!live());
}
