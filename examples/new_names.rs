//! What a name the registry has never seen costs on a long-lived registry, beside the same
//! on a fresh one: the two interleaved, round by round, in one process.
//!
//! ```text
//! cargo run --release --example new_names -- --rounds 10 --claims 350
//! ```
//!
//! The long-lived registry remembers each port of its range (42000-55999, 14,000 ports) for
//! some name, as a per-user registry does once tests have named their ports after themselves
//! for long enough; it is filled once, through a handle whose probe binds nothing. Each round
//! then times `--claims` acquire+release pairs of new names on a fresh registry (a new file
//! each round, opened outside the timing) and as many on the long-lived one, A B A B …. The
//! port probe binds for real; the ports are those of the benches (40000-59999).
//!
//! It prints each round's mean time per pair and, at the end, the median of the rounds and
//! the ratio of all the long-lived pairs' time to all the fresh ones' (which counts the rare
//! claim that forgets old memories at its full cost: keep `rounds × claims` at or above a
//! quarter of the range, 3,500, so that at least one does).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use portdaddy::{PortDaddy, Protocol};

const FIRST: u16 = 42000;
const REMEMBERED: u16 = 14_000;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("new_names: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let (mut rounds, mut claims) = (10usize, 350usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number: usize = value
            .parse()
            .map_err(|_| format!("{flag} wants a number, got {value:?}"))?;
        match flag.as_str() {
            "--rounds" => rounds = number,
            "--claims" => claims = number,
            _ => {
                return Err(format!(
                    "unknown option {flag:?}; use --rounds N --claims N"
                ))
            }
        }
    }
    if rounds == 0 || claims == 0 {
        return Err("--rounds and --claims must be at least 1".into());
    }
    let range = FIRST..=FIRST + (REMEMBERED - 1);
    let open = |path: &std::path::Path| {
        PortDaddy::builder()
            .path(path)
            .range(range.clone())
            .open()
            .map_err(|e| e.to_string())
    };

    let long_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let long_path = long_dir.path().join("registry.sqlite3");
    let long_lived = open(&long_path)?;
    let filler = PortDaddy::builder()
        .path(&long_path)
        .range(range.clone())
        .port_probe(|_: u16, _: Protocol| true)
        .open()
        .map_err(|e| e.to_string())?;
    let names: Vec<String> = (0..REMEMBERED).map(|i| format!("old-{i:05}")).collect();
    for chunk in names.chunks(1000) {
        drop(filler.acquire_many(chunk).map_err(|e| e.to_string())?);
    }
    drop(filler);

    let mut serial = 0u64;
    let mut pairs = |registry: &PortDaddy| -> Result<Duration, String> {
        let start = Instant::now();
        for _ in 0..claims {
            serial += 1;
            let guard = registry
                .acquire(&format!("new-{serial}"))
                .map_err(|e| e.to_string())?;
            drop(guard);
        }
        Ok(start.elapsed())
    };
    let per_pair = |d: Duration| d.as_secs_f64() * 1e6 / claims as f64;

    let (mut fresh_times, mut long_times) = (Vec::new(), Vec::new());
    println!("round  fresh µs/pair  long-lived µs/pair  ratio");
    for round in 1..=rounds {
        let fresh_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let fresh = open(&fresh_dir.path().join("registry.sqlite3"))?;
        let a = pairs(&fresh)?;
        let b = pairs(&long_lived)?;
        println!(
            "{round:>5}  {:>13.1}  {:>18.1}  {:>5.2}",
            per_pair(a),
            per_pair(b),
            b.as_secs_f64() / a.as_secs_f64()
        );
        fresh_times.push(a);
        long_times.push(b);
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        per_pair(times[times.len() / 2])
    };
    let total = |times: &[Duration]| times.iter().sum::<Duration>();
    let ratio = total(&long_times).as_secs_f64() / total(&fresh_times).as_secs_f64();
    let (fresh_median, long_median) = (median(&mut fresh_times), median(&mut long_times));
    println!(
        "median µs/pair: fresh {fresh_median:.1}, long-lived {long_median:.1} ({:.2}×); \
         all pairs: long-lived ÷ fresh = {ratio:.2}×",
        long_median / fresh_median
    );
    Ok(())
}
