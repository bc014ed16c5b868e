//! What a newcomer meets first in the command: `run`'s exit codes, which keep 125, 126 and
//! 127 for `run` itself as env(1) and timeout(1) do, and the documented way to hand `$PORT`
//! to a command.
//!
//! Ports 32750-32799 belong to this file (see `common`): every command gets
//! `PORTDADDY_RANGE` inside that block, and tests that need a full range use one port of
//! their own in it.

use crate::common;
use crate::common::cli::{text, CliRegistry};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

const RANGE: &str = "32750-32799";

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
        text(&out.stdout)
    }

    /// Every lease in the registry, the ended ones too.
    fn leases(&self) -> Vec<Value> {
        match serde_json::from_str(&self.ok(&["list", "--all", "--json"])).unwrap() {
            Value::Array(items) => items,
            other => panic!("not an array: {other}"),
        }
    }

    /// How many leases the registry has ever handed out.
    fn acquired(&self) -> u64 {
        let stats: Value = serde_json::from_str(&self.ok(&["stats", "--json"])).unwrap();
        stats["acquired"].as_u64().unwrap()
    }

    /// A path in the fixture's directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// The one line a failed `run` prints, after checking there is exactly one with the
/// documented prefix, that the exit code is `code`, and that nothing went to stdout.
fn error_line(out: &Output, code: i32) -> String {
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    common::cli::error_line(out, code)
}

#[test]
fn a_usage_error_of_run_exits_125_and_leases_nothing() {
    let f = Fixture::new();
    let cases: &[(&[&str], &str)] = &[
        (&["run"], "NAME"),
        (&["run", "api"], "CMD"),
        (&["run", "--bogus", "api", "--", "true"], "--bogus"),
        (&["run", "--preferred", "0", "api", "--", "true"], "0"),
        (&["run", "--preferred", "http", "api", "--", "true"], "http"),
        (
            &["--range", "32799-32750", "run", "api", "--", "true"],
            "32799",
        ),
        (
            &["run", "api", "--range", "nonsense", "--", "true"],
            "nonsense",
        ),
        (
            &[
                "run",
                "api",
                "--preferred",
                "32750",
                "--preferred",
                "32751",
                "--",
                "true",
            ],
            "2 preferred ports for 1 names",
        ),
        (&["run", "web-1", "web_1", "--", "true"], "PORT_WEB_1"),
        (&["run", "bad\tname", "--", "true"], "invalid lease name"),
    ];
    for (args, needle) in cases {
        let line = error_line(&f.run(args), 125);
        assert!(line.contains(needle), "{args:?}: {line}");
    }
    assert!(f.leases().is_empty());
    assert_eq!(f.acquired(), 0, "nothing was ever leased");
}

#[test]
fn a_usage_error_of_run_points_to_the_help_of_run() {
    let f = Fixture::new();
    let line = error_line(&f.run(&["run", "--bogus", "api", "--", "true"]), 125);
    assert!(line.contains("`portdaddy run --help`"), "{line}");
}

#[test]
fn a_usage_error_of_another_command_still_exits_2() {
    let f = Fixture::new();
    for args in [
        &["frobnicate"][..],
        &["acquire"],
        &["acquire", "a", "--preferred", "0"],
        &["--range", "32799-32750", "list"],
        // `run` as a name is not the `run` command.
        &["acquire", "run", "--bogus"],
    ] {
        error_line(&f.run(args), 2);
    }
}

#[test]
fn run_on_a_corrupt_registry_exits_125_leaves_the_file_as_it_was_and_runs_nothing() {
    let f = Fixture::new();
    let foreign = f.path("foreign.sqlite3");
    let content = b"SQLite format 3\0 but not really a database".repeat(100);
    std::fs::write(&foreign, &content).unwrap();
    let marker = f.path("ran");
    let script = format!("touch '{}'", path_str(&marker));
    let out = f.run(&[
        "--db",
        path_str(&foreign),
        "run",
        "api",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let line = error_line(&out, 125);
    assert!(line.contains(path_str(&foreign)), "{line}");
    assert_eq!(std::fs::read(&foreign).unwrap(), content, "left as it was");
    assert!(!marker.exists(), "the command ran");
}

#[test]
fn run_on_an_exhausted_range_exits_125_and_runs_nothing() {
    let f = Fixture::new();
    f.ok(&["acquire", "holder", "--ttl", "1h", "--range", "32760-32760"]);
    let marker = f.path("ran");
    let script = format!("touch '{}'", path_str(&marker));
    let out = f.run(&[
        "run",
        "api",
        "--range",
        "32760-32760",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let line = error_line(&out, 125);
    assert!(line.contains("32760-32760"), "{line}");
    assert!(!marker.exists(), "the command ran");
    let leases = f.leases();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0]["name"], "holder");
}

#[test]
fn run_exits_126_for_a_file_that_is_not_executable_and_releases() {
    let f = Fixture::new();
    let file = f.path("script.sh");
    std::fs::write(&file, "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let line = error_line(&f.run(&["run", "api", "--", path_str(&file)]), 126);
    assert!(line.contains(path_str(&file)), "{line}");
    assert!(f.leases().is_empty(), "released");
    assert_eq!(f.acquired(), 1);
}

#[test]
fn run_exits_126_for_a_directory_and_releases() {
    let f = Fixture::new();
    let dir = f.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let line = error_line(&f.run(&["run", "api", "--", path_str(&dir)]), 126);
    assert!(line.contains(path_str(&dir)), "{line}");
    assert!(f.leases().is_empty(), "released");
}

#[test]
fn run_exits_127_for_a_missing_program_and_releases() {
    let f = Fixture::new();
    let missing = f.path("no-such-program");
    for program in [path_str(&missing), "portdaddy-test-no-such-program"] {
        let line = error_line(&f.run(&["run", "api", "--", program]), 127);
        assert!(line.contains(program), "{line}");
    }
    assert!(f.leases().is_empty(), "released");
    assert_eq!(f.acquired(), 2);
}

#[test]
fn run_passes_on_the_commands_own_exit_codes_2_and_125() {
    let f = Fixture::new();
    for code in [2, 125, 126, 127] {
        let out = f.run(&["run", "api", "--", "sh", "-c", &format!("exit {code}")]);
        assert_eq!(out.status.code(), Some(code), "{}", text(&out.stderr));
        // The command's code, not a failure of portdaddy: it printed nothing.
        assert!(out.stderr.is_empty(), "{code}: {}", text(&out.stderr));
    }
    assert!(f.leases().is_empty());
}

#[test]
fn run_exits_128_plus_15_when_sigterm_kills_the_command() {
    let f = Fixture::new();
    let out = f.run(&["run", "api", "--", "sh", "-c", "kill -TERM $$; sleep 60"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    assert!(f.leases().is_empty());
}

/// README's and `run --help`'s form, `run web -- sh -c 'exec python3 -m http.server "$PORT"'`,
/// with a command that prints its argument instead of serving on it.
#[test]
fn the_documented_sh_c_form_hands_the_leased_port_to_the_command() {
    let f = Fixture::new();
    let out = f.ok(&[
        "run",
        "web",
        "--",
        "sh",
        "-c",
        "exec printf '%s\\n' \"$PORT\"",
    ]);
    let port: u16 = out
        .trim_end()
        .parse()
        .unwrap_or_else(|_| panic!("not a port: {out:?}"));
    // The name gets its last port back: the port the command got was the lease's. Through
    // a probe that binds nothing, so that another test binding that port meanwhile (the
    // module's tests share one block) cannot send the name elsewhere.
    let registry = common::open_unprobed(&f.db, &(32750..=32799));
    assert_eq!(registry.acquire("web").unwrap().port(), port);
}

/// Without `sh -c`, nothing expands `$PORT`: the command gets the text.
#[test]
fn without_sh_c_the_command_gets_the_literal_text_port() {
    let f = Fixture::new();
    assert_eq!(
        f.ok(&["run", "web", "--", "printf", "%s\\n", "$PORT"]),
        "$PORT\n"
    );
}

#[test]
fn run_help_gives_the_exit_codes_and_the_sh_c_form() {
    let f = Fixture::new();
    let help = f.ok(&["run", "--help"]);
    for needle in [
        "125",
        "126",
        "127",
        "128+N",
        "sh -c 'exec python3 -m http.server \"$PORT\"'",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}
