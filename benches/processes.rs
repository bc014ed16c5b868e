//! What users pay for a whole process, timed from outside: start, open the registry, claim,
//! release, exit. Each figure is a ratio against a baseline measured in the same run,
//! interleaved with it (A B A B …), so that the load of a shared machine falls on both.
//!
//! ```text
//! cargo bench --bench processes               # per process and command line (a minute or two)
//! cargo bench --bench processes -- --build    # and the cold build (a few minutes more)
//! ```
//!
//! Options: `--runs N` (default 7) batches of `--batch N` (default 50) processes in a row for
//! each program; the figure is the median over the runs of a batch's mean. `--build-runs N`
//! (default 1) clean builds of each scratch crate for `--build`. `--config KEY=VALUE`
//! (repeatable) is passed to cargo for the build of the crate with portdaddy only, to weigh
//! what a user's own profile settings trade between the build and each test, e.g.
//! `--config profile.dev.package.libsqlite3-sys.opt-level=2`.
//!
//! - *per process*: `examples/one_claim.rs` (calls `portdaddy::acquire` once and drops the
//!   guard) ÷ `examples/one_pick.rs` (calls `portpicker::pick_unused_port()` once), both on a
//!   registry that exists; and beside it the floor of any design that keeps its leases in a
//!   shared SQLite file and probes the port: `examples/one_sqlite.rs` (opens such a file,
//!   binds one port, and commits one one-row insert and one delete) ÷ `one_pick`.
//! - *new registry*: `one_claim` where the registry does not exist yet (a new path for each
//!   process) ÷ `one_claim` where it does.
//! - *long-lived registry*: `one_claim` on a registry whose names remember each of 14,000
//!   ports (42000-55999, as a per-user registry does once tests have named their ports for
//!   long enough; filled once, before timing) ÷ `one_claim` on the registry that exists.
//! - *command line*: `portdaddy acquire NAME` and `portdaddy release NAME`, each minus
//!   `/bin/true`; and beside them `one_sqlite` minus `/bin/true`, the floor of a command that
//!   would do nothing but that.
//! - *cold build* (`--build`): `cargo build --tests --offline` of a new crate with portdaddy
//!   as a dev-dependency ÷ the same crate with portpicker instead, each with a clean target
//!   directory and this repository's `Cargo.lock`, so that both use the versions it pins;
//!   and beside them the floor of any crate built on bundled SQLite: the same crate with only
//!   `rusqlite` (feature `bundled`) as its dev-dependency.
//! - *test process* (`--build`): the test those builds made, run as nextest runs each test
//!   (`<test binary> --exact port`, a process of its own) with the dev profile they were
//!   built with, portdaddy's ÷ portpicker's: what a test that takes a port pays in a crate
//!   that uses either, unoptimised as a test build is. Timed as the whole processes are,
//!   after the last builds.
//!
//! It first builds what it runs (`cargo build --release --features cli --example one_claim
//! --example one_pick --example one_sqlite --bin portdaddy`). The claims come from ports
//! 40000-59999, as the other benches' do; the registries live in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const RANGE: &str = "40000-59999";

struct Options {
    runs: usize,
    batch: usize,
    build: bool,
    build_runs: usize,
    /// `--config` arguments for cargo, for the scratch crate with portdaddy.
    configs: Vec<String>,
}

fn options() -> Options {
    let mut options = Options {
        runs: 7,
        batch: 50,
        build: false,
        build_runs: 1,
        configs: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |what: &str| -> usize {
            args.next()
                .and_then(|n| n.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| panic!("{what} takes a positive number"))
        };
        match arg.as_str() {
            "--runs" => options.runs = number("--runs"),
            "--batch" => options.batch = number("--batch"),
            "--build-runs" => options.build_runs = number("--build-runs"),
            "--build" => options.build = true,
            "--config" => options.configs.push(
                args.next()
                    .unwrap_or_else(|| panic!("--config takes KEY=VALUE, as cargo's does")),
            ),
            // What `cargo bench` passes to every bench.
            "--bench" => {}
            other => panic!("unknown option {other:?}; see benches/processes.rs"),
        }
    }
    options
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// Runs `command` to completion with its output discarded; how long that took.
fn time(command: &mut Command) -> Duration {
    let start = Instant::now();
    let status = command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let took = start.elapsed();
    assert!(status.success(), "{command:?} failed: {status}");
    took
}

/// The directory `cargo build --release` puts its binaries in: the one this bench runs from.
fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/processes-<hash>
    exe.parent().and_then(Path::parent).unwrap().to_owned()
}

fn build_programs() {
    let status = cargo()
        .current_dir(MANIFEST_DIR)
        .args(["build", "--release", "--features", "cli"])
        .args(["--example", "one_claim", "--example", "one_pick"])
        .args(["--example", "one_sqlite"])
        .args(["--bin", "portdaddy"])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build failed");
}

// Where `processes` lists its programs, for the figures that compare them.
const PICK: usize = 0;
const CLAIM: usize = 1;
const NEW: usize = 2;
const LONG_LIVED: usize = 3;
const TRUE: usize = 4;
const FLOOR: usize = 5;
const ACQUIRE: usize = 6;
const RELEASE: usize = 7;

/// A program measured: its name and how to start one process of it (`i` numbers the
/// processes of the run, for programs that need a new registry each time).
struct Program<'a> {
    name: &'a str,
    command: Box<dyn Fn(usize) -> Command + 'a>,
}

fn processes(options: &Options) {
    build_programs();
    let bin = release_dir();
    let dir = tempfile::tempdir().unwrap();
    let warm = dir.path().join("warm.sqlite3");
    let floor_db = dir.path().join("floor.sqlite3");
    let long_lived = dir.path().join("long-lived.sqlite3");
    fill_long_lived(&long_lived);
    let fresh = dir.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let one_claim = bin.join("examples").join("one_claim");
    let floor = || {
        let mut c = Command::new(bin.join("examples").join("one_sqlite"));
        c.arg(&floor_db);
        c
    };
    let claim = |db: &Path| {
        let mut c = Command::new(&one_claim);
        c.env("PORTDADDY_DB", db).env("PORTDADDY_RANGE", RANGE);
        c
    };
    let cli = |verb: &str| {
        let mut c = Command::new(bin.join("portdaddy"));
        c.arg("--db")
            .arg(&warm)
            .args(["--range", RANGE, verb, "bench-cli"]);
        c
    };
    let programs = [
        Program {
            name: "one_pick (portpicker)",
            command: Box::new(|_| Command::new(bin.join("examples").join("one_pick"))),
        },
        Program {
            name: "one_claim, registry exists",
            command: Box::new(|_| claim(&warm)),
        },
        Program {
            name: "one_claim, new registry",
            command: Box::new(|i| claim(&fresh.join(format!("r{i}.sqlite3")))),
        },
        Program {
            name: "one_claim, long-lived",
            command: Box::new(|_| claim(&long_lived)),
        },
        Program {
            name: "/bin/true",
            command: Box::new(|_| Command::new("/bin/true")),
        },
        Program {
            name: "one_sqlite (floor)",
            command: Box::new(|_| floor()),
        },
        Program {
            name: "portdaddy acquire",
            command: Box::new(|_| cli("acquire")),
        },
        Program {
            name: "portdaddy release",
            command: Box::new(|_| cli("release")),
        },
    ];
    // The registry that exists, and the floor's file: created, and a claim made once on each,
    // before timing.
    time(&mut claim(&warm));
    time(&mut floor());
    time(&mut claim(&long_lived));
    let load_before = load_average();
    let mut means: Vec<Vec<Duration>> = vec![Vec::new(); programs.len()];
    let mut serial = 0;
    for _ in 0..options.runs {
        // One batch of each program in turn, so that each run's batches share its load.
        // The command's acquire and release alternate within their batches.
        for (p, program) in programs.iter().enumerate() {
            if program.name.starts_with("portdaddy") {
                continue;
            }
            let mut total = Duration::ZERO;
            for _ in 0..options.batch {
                serial += 1;
                total += time(&mut (program.command)(serial));
            }
            means[p].push(total / options.batch as u32);
        }
        let (mut acquire, mut release) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..options.batch {
            acquire += time(&mut (programs[ACQUIRE].command)(0));
            release += time(&mut (programs[RELEASE].command)(0));
        }
        means[ACQUIRE].push(acquire / options.batch as u32);
        means[RELEASE].push(release / options.batch as u32);
    }
    let load_after = load_average();
    let medians: Vec<Duration> = means.into_iter().map(median).collect();
    println!(
        "\nwhole processes: {} runs of {} in a row each, median of the runs' means; \
         load average {load_before} before, {load_after} after",
        options.runs, options.batch
    );
    for (program, m) in programs.iter().zip(&medians) {
        println!("  {:<28} {:>9.3} ms", program.name, ms(*m));
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "per process: one_claim ÷ one_pick = {:.2}×; the floor, one_sqlite ÷ one_pick = {:.2}×",
        ratio(medians[CLAIM], medians[PICK]),
        ratio(medians[FLOOR], medians[PICK])
    );
    println!(
        "new registry: one_claim on a new registry ÷ on one that exists = {:.2}×",
        ratio(medians[NEW], medians[CLAIM])
    );
    println!(
        "long-lived registry: one_claim where 14,000 ports are remembered ÷ on the registry \
         that exists = {:.2}×",
        ratio(medians[LONG_LIVED], medians[CLAIM])
    );
    println!(
        "command line: acquire − /bin/true = {:.3} ms, release − /bin/true = {:.3} ms; the \
         floor, one_sqlite − /bin/true = {:.3} ms",
        ms(medians[ACQUIRE].saturating_sub(medians[TRUE])),
        ms(medians[RELEASE].saturating_sub(medians[TRUE])),
        ms(medians[FLOOR].saturating_sub(medians[TRUE])),
    );
}

/// A registry at `path` whose names remember each port of 42000-55999, filled through a
/// handle whose probe binds nothing; no lease is left in it.
fn fill_long_lived(path: &Path) {
    let filler = portdaddy::PortDaddy::builder()
        .path(path)
        .range(42000..=55999)
        .port_probe(|_: u16, _: portdaddy::Protocol| true)
        .open()
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let names: Vec<String> = (0..14_000).map(|i| format!("old-{i:05}")).collect();
    for chunk in names.chunks(1000) {
        drop(
            filler
                .acquire_many(chunk)
                .expect("fill the long-lived registry"),
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Writes a scratch crate at `dir` whose tests depend on `dependency` (a `Cargo.toml`
/// dependency line) and use it through `use_it` (a statement).
fn scratch_crate(dir: &Path, dependency: &str, use_it: &str) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"scratch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dev-dependencies]\n{dependency}\n\n[workspace]\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("src").join("lib.rs"), "").unwrap();
    std::fs::write(
        dir.join("tests").join("port.rs"),
        format!("#[test]\nfn port() {{\n    {use_it}\n}}\n"),
    )
    .unwrap();
    std::fs::copy(
        Path::new(MANIFEST_DIR).join("Cargo.lock"),
        dir.join("Cargo.lock"),
    )
    .unwrap();
}

/// A clean `cargo build --tests` of the scratch crate at `dir`, with `configs` as cargo
/// `--config` arguments; how long it took. What it built stays until the next build of the
/// crate (see [`test_binary`]).
fn cold_build(dir: &Path, configs: &[String]) -> Duration {
    let target = dir.join("target");
    let _ = std::fs::remove_dir_all(&target);
    let mut command = cargo();
    command
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--tests", "--offline", "--quiet"]);
    for config in configs {
        command.args(["--config", config]);
    }
    time(&mut command)
}

/// The test binary of `tests/port.rs` that the last [`cold_build`] of the scratch crate at
/// `dir` made (`target/debug/deps/port-<hash>`).
fn test_binary(dir: &Path) -> PathBuf {
    let deps = dir.join("target").join("debug").join("deps");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&deps)
        .unwrap_or_else(|e| panic!("read {}: {e}", deps.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("port-") && !n.contains('.'))
        })
        .collect();
    assert_eq!(found.len(), 1, "one test binary in {}", deps.display());
    found.pop().unwrap()
}

fn builds(options: &Options) {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs, floor) = (
        dir.path().join("with-portdaddy"),
        dir.path().join("with-portpicker"),
        dir.path().join("with-rusqlite"),
    );
    scratch_crate(
        &ours,
        &format!("portdaddy = {{ path = {MANIFEST_DIR:?} }}"),
        "let _ = portdaddy::acquire(\"port\");",
    );
    scratch_crate(
        &theirs,
        "portpicker = \"0.1\"",
        "let _ = portpicker::pick_unused_port();",
    );
    // The floor of any crate that keeps its state in bundled SQLite: the same rusqlite, with
    // the feature portdaddy asks for, and nothing else.
    scratch_crate(
        &floor,
        "rusqlite = { version = \"0.41\", features = [\"bundled\"] }",
        "let _ = rusqlite::Connection::open_in_memory();",
    );
    let load_before = load_average();
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..options.build_runs {
        b.push(cold_build(&theirs, &[]));
        a.push(cold_build(&ours, &options.configs));
        c.push(cold_build(&floor, &[]));
    }
    let load_after = load_average();
    let (a, b, c) = (median(a), median(b), median(c));
    println!(
        "\ncold `cargo build --tests`: {} run(s) each, median; load average {load_before} \
         before, {load_after} after",
        options.build_runs
    );
    for config in &options.configs {
        println!("  (the crate with portdaddy built with --config {config})");
    }
    println!("  with portdaddy         {:>7.1} s", a.as_secs_f64());
    println!("  with portpicker        {:>7.1} s", b.as_secs_f64());
    println!("  with rusqlite (bundled) {:>6.1} s", c.as_secs_f64());
    println!(
        "cold build: portdaddy ÷ portpicker = {:.2}×; the floor, rusqlite (bundled) alone ÷ \
         portpicker = {:.2}×",
        a.as_secs_f64() / b.as_secs_f64(),
        c.as_secs_f64() / b.as_secs_f64()
    );
    test_processes(
        options,
        &test_binary(&ours),
        &test_binary(&theirs),
        dir.path(),
    );
}

/// Times the scratch crates' tests as nextest runs them, one process per test, portdaddy's
/// and portpicker's batches in turn.
fn test_processes(options: &Options, ours: &Path, theirs: &Path, dir: &Path) {
    let db = dir.join("tests.sqlite3");
    let run = |binary: &Path| {
        let mut c = Command::new(binary);
        c.args(["--exact", "port"])
            .env("PORTDADDY_DB", &db)
            .env("PORTDADDY_RANGE", RANGE);
        c
    };
    // The registry is created, and its claim made once, before timing.
    time(&mut run(ours));
    let load_before = load_average();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..options.runs {
        for (binary, means) in [(theirs, &mut b), (ours, &mut a)] {
            let mut total = Duration::ZERO;
            for _ in 0..options.batch {
                total += time(&mut run(binary));
            }
            means.push(total / options.batch as u32);
        }
    }
    let load_after = load_average();
    let (a, b) = (median(a), median(b));
    println!(
        "\ntest processes (dev profile, `<test binary> --exact port`): {} runs of {} in a row \
         each, median of the runs' means; load average {load_before} before, {load_after} after",
        options.runs, options.batch
    );
    println!("  with portdaddy         {:>9.3} ms", ms(a));
    println!("  with portpicker        {:>9.3} ms", ms(b));
    println!(
        "test process: portdaddy's ÷ portpicker's = {:.2}×",
        a.as_secs_f64() / b.as_secs_f64()
    );
}

fn main() {
    let options = options();
    processes(&options);
    if options.build {
        builds(&options);
    }
}
