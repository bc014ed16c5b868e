//! Hostile names through the `portdaddy` command: invalid UTF-8, escape sequences, the
//! longest argument the kernel passes, SQL syntax; and names that only a damaged or hostile registry can hold, shown by
//! `list`. Every error is one line without raw control characters, and no output of the
//! command ever carries a raw control character taken from a name.
//!
//! Ports 26950-26999 belong to this file (see `common`).
#![cfg(unix)]

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const RANGE: &str = "26950-26999";

struct Fixture {
    _dir: tempfile::TempDir,
    db: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let (dir, db) = common::temp_registry();
        Self { _dir: dir, db }
    }

    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_portdaddy"))
            .args(args)
            .env("PORTDADDY_DB", &self.db)
            .env("PORTDADDY_RANGE", RANGE)
            .stdin(Stdio::null())
            .output()
            .expect("run portdaddy")
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
    let stderr = lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
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
        assert_refused(&f.run(&["run", name, "--", "true"]), what);
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
