//! A soak test with random kills: worker processes claim, bind and release ports of one
//! registry without pause while the parent kills one of them with `SIGKILL` at random moments
//! and starts a new one in its place. Not part of CI; run it by hand:
//!
//! ```text
//! cargo run --release --example soak -- --seconds 600
//! ```
//!
//! Options: `--seconds N` (default 600), `--procs N` workers at a time (default 8),
//! `--range A-B` (default 31500-31515, in the soak's own block 31500-31999, which no test of
//! this crate uses), `--kill-every-ms N`, the mean pause between kills (default 200),
//! `--seed N` for the kill schedule.
//!
//! Workers probe no port (their port probe says every port is free), so only the registry
//! keeps them apart, and each binds `127.0.0.1:<port>` on every port it gets: a bind that
//! fails means a port was handed out while a live process held it. Every few seconds the
//! parent checks the file with `PRAGMA integrity_check` and reaps. At the end it kills every
//! worker, checks the file once more, reaps, and claims the whole range with a fresh handle.
//!
//! It prints the operations done, kills, reaps and every anomaly, and exits non-zero if
//! there was any anomaly.

#[cfg(unix)]
fn main() -> std::process::ExitCode {
    soak::main()
}

#[cfg(not(unix))]
fn main() {
    eprintln!("soak: needs a Unix system (it kills its workers with SIGKILL)");
}

#[cfg(unix)]
mod soak {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{Ipv4Addr, TcpListener};
    use std::os::unix::process::ExitStatusExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitCode, Stdio};
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::thread;
    use std::time::{Duration, Instant};

    use portdaddy::{Error, PortDaddy, Protocol};

    struct Options {
        seconds: u64,
        procs: usize,
        range: (u16, u16),
        kill_every: Duration,
        seed: u64,
        worker: Option<(usize, PathBuf)>,
    }

    pub fn main() -> ExitCode {
        let options = match parse(std::env::args().skip(1)) {
            Ok(options) => options,
            Err(message) => {
                eprintln!("soak: {message}");
                eprintln!(
                    "usage: soak [--seconds N] [--procs N] [--range A-B] [--kill-every-ms N] \
                     [--seed N]"
                );
                return ExitCode::from(2);
            }
        };
        match &options.worker {
            Some((id, registry)) => worker(&options, *id, registry),
            None => parent(&options),
        }
    }

    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut options = Options {
            seconds: 600,
            procs: 8,
            range: (31500, 31515),
            kill_every: Duration::from_millis(200),
            seed: 0x50ac_0001,
            worker: None,
        };
        let mut worker = None;
        let mut registry = None;
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or(format!("{flag} needs a value"));
            let number = |text: String| {
                text.parse::<u64>()
                    .map_err(|_| format!("{flag} wants a number, got {text:?}"))
            };
            match flag.as_str() {
                "--seconds" => options.seconds = number(value()?)?,
                "--procs" => options.procs = number(value()?)?.max(1) as usize,
                "--kill-every-ms" => {
                    options.kill_every = Duration::from_millis(number(value()?)?.max(1))
                }
                "--seed" => options.seed = number(value()?)?,
                "--range" => {
                    let text = value()?;
                    let bad = || format!("--range wants A-B (ports), got {text:?}");
                    let (a, b) = text.split_once('-').ok_or_else(bad)?;
                    options.range = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                }
                "--worker" => worker = Some(number(value()?)? as usize),
                "--registry" => registry = Some(PathBuf::from(value()?)),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if let (Some(id), Some(registry)) = (worker, registry) {
            options.worker = Some((id, registry));
        }
        Ok(options)
    }

    fn open(registry: &Path, options: &Options, probe_ports: bool) -> portdaddy::Result<PortDaddy> {
        let builder = PortDaddy::builder()
            .path(registry)
            .range(options.range.0..=options.range.1);
        if probe_ports {
            builder.open()
        } else {
            builder.port_probe(|_: u16, _: Protocol| true).open()
        }
    }

    /// Claims, binds and releases for ever; prints `OPS <n>` every 64 claims and `DUP`/`ERR`
    /// lines for anomalies.
    fn worker(options: &Options, id: usize, registry: &Path) -> ExitCode {
        let registry = match open(registry, options, false) {
            Ok(registry) => registry,
            Err(e) => {
                println!("ERR open: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut out = std::io::stdout();
        let mut n = 0u64;
        loop {
            n += 1;
            let names = if n.is_multiple_of(5) {
                vec![format!("soak-{id}-a"), format!("soak-{id}-b")]
            } else {
                vec![format!("soak-{id}-{}", n % 3)]
            };
            let guards = match registry.acquire_many(&names) {
                Ok(guards) => guards,
                Err(Error::Exhausted { .. }) => continue,
                Err(e) => {
                    let _ = writeln!(out, "ERR {e}");
                    continue;
                }
            };
            let listeners: Vec<_> = guards
                .iter()
                .filter_map(
                    |g| match TcpListener::bind((Ipv4Addr::LOCALHOST, g.port())) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            let _ = writeln!(out, "DUP {} {e}", g.port());
                            None
                        }
                    },
                )
                .collect();
            thread::sleep(Duration::from_micros(300));
            drop(listeners);
            drop(guards);
            if n.is_multiple_of(64) {
                let _ = writeln!(out, "OPS 64");
            }
        }
    }

    enum Report {
        Ops(u64),
        Anomaly(String),
    }

    struct Running {
        child: Child,
        label: String,
    }

    fn spawn(
        options: &Options,
        id: usize,
        registry: &Path,
        reports: &Sender<Report>,
    ) -> Result<Running, String> {
        let exe = std::env::current_exe().map_err(|e| format!("locate this program: {e}"))?;
        let (a, b) = options.range;
        let mut child = Command::new(exe)
            .args(["--worker", &id.to_string(), "--registry"])
            .arg(registry)
            .args(["--range", &format!("{a}-{b}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start a worker: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let label = format!("worker {id} (pid {})", child.id());
        let sender = reports.clone();
        let who = label.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let report = match line.strip_prefix("OPS ") {
                    Some(n) => Report::Ops(n.parse().unwrap_or(0)),
                    None => Report::Anomaly(format!("{who}: {line}")),
                };
                if sender.send(report).is_err() {
                    break;
                }
            }
        });
        Ok(Running { child, label })
    }

    fn parent(options: &Options) -> ExitCode {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => {
                eprintln!("soak: make a temporary directory: {e}");
                return ExitCode::FAILURE;
            }
        };
        let registry = dir.path().join("soak.sqlite3");
        let checker = match open(&registry, options, true) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("soak: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (reports, inbox): (Sender<Report>, Receiver<Report>) = mpsc::channel();
        let mut workers = Vec::new();
        let mut next_id = 0;
        let mut anomalies: Vec<String> = Vec::new();
        for _ in 0..options.procs {
            match spawn(options, next_id, &registry, &reports) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    eprintln!("soak: {e}");
                    return ExitCode::FAILURE;
                }
            }
            next_id += 1;
        }
        let mut rng = options.seed | 1;
        let mut random = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut ops, mut kills, mut reaped, mut checks) = (0u64, 0u64, 0usize, 0u64);
        let started = Instant::now();
        let end = started + Duration::from_secs(options.seconds);
        let mut next_check = started + Duration::from_secs(5);
        let mut last_line = started;
        eprintln!(
            "soak: {} workers on {}-{} for {} s, registry {}",
            options.procs,
            options.range.0,
            options.range.1,
            options.seconds,
            registry.display()
        );
        while Instant::now() < end {
            let mean = options.kill_every.as_micros() as u64;
            let pause = Duration::from_micros(random() % (2 * mean).max(1));
            thread::sleep(pause.min(end.saturating_duration_since(Instant::now())));
            // A worker that ended by itself is an anomaly; a running one may be killed.
            let victim = (random() % workers.len() as u64) as usize;
            let w = &mut workers[victim];
            match w.child.try_wait() {
                Ok(Some(status)) => {
                    anomalies.push(format!("{} ended by itself: {status}", w.label))
                }
                _ => {
                    let _ = w.child.kill();
                    match w.child.wait() {
                        Ok(status) if status.signal() == Some(libc::SIGKILL) => kills += 1,
                        Ok(status) => {
                            anomalies.push(format!("{} ended by itself: {status}", w.label))
                        }
                        Err(e) => anomalies.push(format!("{}: wait: {e}", w.label)),
                    }
                }
            }
            match spawn(options, next_id, &registry, &reports) {
                Ok(new) => workers[victim] = new,
                Err(e) => anomalies.push(e),
            }
            next_id += 1;
            while let Ok(report) = inbox.try_recv() {
                match report {
                    Report::Ops(n) => ops += n,
                    Report::Anomaly(a) => anomalies.push(a),
                }
            }
            if Instant::now() >= next_check {
                next_check += Duration::from_secs(5);
                checks += 1;
                match integrity_check(&registry) {
                    Ok(check) if check == "ok" => {}
                    Ok(check) => anomalies.push(format!("integrity_check: {check}")),
                    Err(e) => anomalies.push(format!("integrity_check: {e}")),
                }
                match checker.reap() {
                    Ok(n) => reaped += n,
                    Err(e) => anomalies.push(format!("reap: {e}")),
                }
            }
            if last_line.elapsed() >= Duration::from_secs(30) {
                last_line = Instant::now();
                eprintln!(
                    "soak: {:>4} s: {ops} claims, {kills} kills, {reaped} reaped, {} anomalies",
                    started.elapsed().as_secs(),
                    anomalies.len()
                );
            }
        }
        for w in &mut workers {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        drop(reports);
        for report in inbox.iter() {
            match report {
                Report::Ops(n) => ops += n,
                Report::Anomaly(a) => anomalies.push(a),
            }
        }
        checks += 1;
        match integrity_check(&registry) {
            Ok(check) if check == "ok" => {}
            Ok(check) => anomalies.push(format!("final integrity_check: {check}")),
            Err(e) => anomalies.push(format!("final integrity_check: {e}")),
        }
        match checker.reap() {
            Ok(n) => reaped += n,
            Err(e) => anomalies.push(format!("final reap: {e}")),
        }
        match checker.list() {
            Ok(left) if left.is_empty() => {}
            Ok(left) => anomalies.push(format!("{} leases left after the final reap", left.len())),
            Err(e) => anomalies.push(format!("final list: {e}")),
        }
        let size = usize::from(options.range.1 - options.range.0) + 1;
        let names: Vec<String> = (0..size).map(|i| format!("final-{i}")).collect();
        if let Err(e) = checker.acquire_many(&names) {
            anomalies.push(format!(
                "a fresh handle could not claim the whole range: {e}"
            ));
        }
        println!(
            "soak: {} s, {} workers: {ops} claims (counted in steps of 64), {kills} kills, \
             {reaped} leases reaped by the checker, {checks} integrity checks, {} anomalies",
            started.elapsed().as_secs(),
            options.procs,
            anomalies.len()
        );
        for anomaly in &anomalies {
            println!("  anomaly: {anomaly}");
        }
        if anomalies.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    fn integrity_check(path: &Path) -> Result<String, rusqlite::Error> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
    }
}
