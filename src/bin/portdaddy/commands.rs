//! The commands, each over the library's public API.

use std::collections::HashMap;
use std::io::{self, IsTerminal};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::CommandFactory;
use portdaddy::{Lease, LeaseState, Owner, PortDaddy, PortRange, Protocol, Request, Status};
use serde_json::json;

use crate::exit::{self, Failure};
use crate::output::{self, escape};
use crate::signals::{self, Ended, NotRun};
use crate::{Cli, Command, StatsFormat};

type Outcome = Result<ExitCode, Failure>;

pub fn run(cli: Cli) -> Outcome {
    let for_run = matches!(cli.command, Command::Run { .. });
    let outcome = dispatch(cli);
    if for_run {
        // `run` keeps 125, 126 and 127 for itself, as env(1) and timeout(1) do: every
        // other exit code is its command's.
        return outcome.map_err(Failure::of_run);
    }
    outcome
}

fn dispatch(cli: Cli) -> Outcome {
    let Cli { db, range, command } = cli;
    let range = match range {
        Some(range) => Some(range),
        None => range_from_env()?,
    };
    let target = Target { db, range };
    match command {
        Command::Acquire {
            name,
            preferred,
            ttl,
            pid,
            udp,
            block,
            json,
        } => {
            let mut request = Request::new(name).block(block);
            if let Some(port) = preferred {
                request = request.preferred(port);
            }
            if udp {
                request = request.protocol(Protocol::Udp);
            }
            acquire(&target, request, ttl, pid, json)
        }
        Command::Release { target: what, name } => release(&target, &what, name),
        Command::List { json, all } => list(&target, json, all),
        Command::Run {
            names,
            preferred,
            command,
        } => run_command(&target, &names, &preferred, &command),
        Command::Reserve { ports, json } if ports.is_empty() => list_reserved(&target, json),
        Command::Reserve { ports, .. } => reserve(&target, &ports),
        Command::Unreserve { ports } => unreserve(&target, &ports),
        Command::Reap => {
            let reaped = target.open()?.reap()?;
            print(format_args!("reaped {reaped}\n"))
        }
        Command::Stats { format, json } => {
            stats(&target, if json { StatsFormat::Json } else { format })
        }
        Command::Wait { port, timeout, udp } => wait(port, timeout, udp),
        Command::Who { port, json } => who(&target, port, json),
        Command::Doctor { json } => doctor(&target, json),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "portdaddy", &mut out);
            write_out(&out)
        }
    }
}

/// `$PORTDADDY_RANGE`, unless unset or empty (as the library treats `$PORTDADDY_DB`).
fn range_from_env() -> Result<Option<PortRange>, Failure> {
    match std::env::var("PORTDADDY_RANGE") {
        Ok(text) if !text.is_empty() => crate::parse_range(&text)
            .map(Some)
            .map_err(|e| Failure::new(exit::USAGE, format!("PORTDADDY_RANGE: {e}"))),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Failure::new(
            exit::USAGE,
            "PORTDADDY_RANGE is not valid UTF-8; write START-END, e.g. 26000-26499",
        )),
    }
}

/// Which registry, over which range.
struct Target {
    db: Option<std::path::PathBuf>,
    range: Option<PortRange>,
}

impl Target {
    fn open(&self) -> Result<PortDaddy, Failure> {
        let mut builder = PortDaddy::builder();
        if let Some(db) = &self.db {
            builder = builder.path(db);
        }
        if let Some(range) = self.range {
            builder = builder.range(range.start()..=range.end());
        }
        Ok(builder.open()?)
    }

    fn path(&self) -> std::path::PathBuf {
        self.db.clone().unwrap_or_else(PortDaddy::default_path)
    }
}

fn acquire(
    target: &Target,
    request: Request,
    ttl: Option<std::time::Duration>,
    pid: Option<u32>,
    json: bool,
) -> Outcome {
    /// Who keeps the lease once the command has exited.
    enum Holder {
        Ttl(std::time::Duration),
        Owner(Owner),
    }
    // Found first: a --pid that does not run must not even create a registry.
    let holder = match (ttl, pid) {
        (Some(ttl), _) => Holder::Ttl(ttl),
        (None, Some(pid)) => Holder::Owner(Owner::of_pid(pid)?),
        (None, None) => Holder::Owner(parent()?),
    };
    // The port reaches the caller through the output alone: a lease whose port nobody saw
    // would be held for nothing, for as long as its owner lives. So nothing is taken when
    // there is nowhere to print, and what was taken is released when printing fails.
    if output::stdout_closed_at_start() {
        return Err(Failure::new(
            exit::OTHER,
            "cannot write the output: stdout is closed; no port was leased",
        )
        .hint("to discard the port, redirect it to /dev/null instead of closing stdout"));
    }
    // A reader that has gone must not kill this process before it has released the lease.
    signals::report_closed_pipes();
    let registry = target.open()?;
    // How the port was chosen and, if a preferred port went elsewhere, who holds that one:
    // looked up only then, and only for --json, after the claim.
    let chosen = |guard: &portdaddy::PortGuard| {
        let holders = if json {
            guard.preferred_port_holders().filter(|h| !h.is_empty())
        } else {
            None
        };
        (guard.choice(), holders)
    };
    let (lease, (choice, preferred_holders)) = match holder {
        Holder::Ttl(ttl) => {
            let guard = registry.acquire_with(&request.ttl(ttl))?;
            let chosen = chosen(&guard);
            (guard.keep()?, chosen)
        }
        // The command exits at once: the lease must belong to whoever asked for it.
        Holder::Owner(owner) => {
            let guard = registry.acquire_with(&request.owner(owner))?;
            let chosen = chosen(&guard);
            (guard.into_lease(), chosen)
        }
    };
    let text = if json {
        let state = registry.state_of(&lease);
        let mut value = output::lease_json(&lease, state, SystemTime::now());
        value["choice"] = json!(choice.as_str());
        if let Some(holders) = preferred_holders {
            value["preferred_held_by"] =
                json!(holders.iter().map(output::holder_json).collect::<Vec<_>>());
        }
        format!("{}\n", output::json_text(&value))
    } else {
        format!("{}\n", lease.port())
    };
    match write_stdout(text.as_bytes()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => Err(unseen(&registry, &lease, &error)),
    }
}

/// Releases `lease`, whose port could not be written (`error`), and says so.
fn unseen(registry: &PortDaddy, lease: &Lease, error: &io::Error) -> Failure {
    let what = output::ports_phrase(lease);
    match registry.release_lease(lease) {
        Ok(_) => Failure::new(
            exit::OTHER,
            format!("cannot write the output: {error}; the lease on {what} was released"),
        ),
        Err(e) => Failure::new(
            exit::OTHER,
            format!(
                "cannot write the output: {error}; the lease on {what} cannot be released \
                 either: {}",
                exit::chain(&e)
            ),
        )
        .hint(format!(
            "`portdaddy release {}` frees it once the registry can be used",
            lease.port()
        )),
    }
}

/// The process that ran this command.
fn parent() -> Result<Owner, Failure> {
    match crate::sys::parent_pid() {
        Some(ppid) => owner_for_parent(ppid),
        None => Err(Failure::new(
            exit::USAGE,
            "the parent process cannot be found on this platform",
        )
        .hint("give the owner with --pid, or a --ttl for a detached lease")),
    }
}

/// The owner of a lease asked for by the process `ppid`, the parent of this command.
///
/// A parent pid of 0 (the parent lives outside this PID namespace, as under `docker exec`)
/// or 1 (init: this command was orphaned, or started by systemd or a container's init) names
/// no process that ends when the caller is done: the lease would never end, or would fail
/// with a puzzling error. Both are refused; `--pid 1` still says so on purpose.
fn owner_for_parent(ppid: u32) -> Result<Owner, Failure> {
    if ppid <= 1 {
        return Err(Failure::new(
            exit::USAGE,
            format!("the parent process (pid {ppid}) cannot own the lease: it would never end"),
        )
        .hint(
            "give --pid or --ttl: --pid $$ for the calling shell, or --ttl 1h for a \
             detached lease",
        ));
    }
    Ok(Owner::of_pid(ppid)?)
}

fn release(target: &Target, what: &str, as_name: bool) -> Outcome {
    let registry = target.open()?;
    let port = if as_name { None } else { parse_port(what)? };
    let released: Vec<Lease> = match port {
        Some(port) => {
            let lease = registry
                .list()?
                .into_iter()
                .find(|l| l.ports().contains(&port));
            match lease {
                // Exactly the lease that was listed, in case the port changed hands since.
                Some(lease) if registry.release_lease(&lease)? => vec![lease],
                _ => Vec::new(),
            }
        }
        None => registry.release_name(what)?,
    };
    if released.is_empty() {
        let what = match port {
            Some(port) => format!("no lease on port {port}"),
            None => format!("no lease named {:?}", what),
        };
        return Err(Failure::new(exit::NOT_FOUND, what).hint("`portdaddy list` shows the leases"));
    }
    let mut text = String::new();
    for lease in &released {
        let holder = lease
            .pid()
            .map_or_else(|| "detached".to_owned(), |p| format!("pid {p}"));
        text.push_str(&format!(
            "released {} ({}, {holder})\n",
            output::ports_phrase(lease),
            escape(lease.name())
        ));
    }
    print(format_args!("{text}"))
}

/// A port if `text` is a number; a name otherwise.
fn parse_port(text: &str) -> Result<Option<u16>, Failure> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(Failure::new(
            exit::USAGE,
            format!("{text} is not a port number (1-65535)"),
        )
        .hint("to release a name made of digits, add --name")),
    }
}

fn list(target: &Target, json: bool, all: bool) -> Outcome {
    let registry = target.open()?;
    let now = SystemTime::now();
    let leases: Vec<(Lease, LeaseState)> = registry
        .list()?
        .into_iter()
        .map(|l| {
            let state = registry.state_of(&l);
            (l, state)
        })
        .filter(|(_, state)| all || state.holds_port())
        .collect();
    if json {
        let values: Vec<_> = leases
            .iter()
            .map(|(l, s)| output::lease_json(l, *s, now))
            .collect();
        return print(format_args!(
            "{}\n",
            output::json_text(&serde_json::Value::Array(values))
        ));
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|(l, s)| output::lease_row(l, *s, now))
        .collect();
    print_table(output::LEASE_HEADER, &rows)
}

/// Prints `rows` under `header`. With no rows, a terminal gets the header alone, which says
/// the table is empty; a script reading a pipe gets no output, as it always did.
fn print_table(header: &[&str], rows: &[Vec<String>]) -> Outcome {
    if rows.is_empty() && !io::stdout().is_terminal() {
        return Ok(ExitCode::SUCCESS);
    }
    print(format_args!("{}", output::table(header, rows)))
}

/// `20000`, or `20000-20009`: a range as the commands print it.
fn span(range: PortRange) -> String {
    output::span(range.start(), range.end())
}

/// Reserves each range, and notes the leases that hold a port of it.
fn reserve(target: &Target, ranges: &[PortRange]) -> Outcome {
    let registry = target.open()?;
    let mut text = String::new();
    for &range in ranges {
        let held = registry.reserve_ports(range)?;
        text.push_str(&format!("reserved {}\n", span(range)));
        for lease in held {
            let holder = lease
                .pid()
                .map_or_else(|| "detached".to_owned(), |p| format!("pid {p}"));
            eprintln!(
                "portdaddy: note: {} is leased ({}, {holder}); the lease keeps it, and it is \
                 not handed out again once released",
                output::ports_phrase(&lease),
                escape(lease.name())
            );
        }
    }
    print(format_args!("{text}"))
}

/// Frees each range, saying which parts of it were reserved.
fn unreserve(target: &Target, ranges: &[PortRange]) -> Outcome {
    let registry = target.open()?;
    let mut text = String::new();
    for &range in ranges {
        let freed = registry.unreserve_ports(range)?;
        if freed.is_empty() {
            text.push_str(&if range.len() == 1 {
                format!(
                    "port {range_text} was not reserved\n",
                    range_text = span(range)
                )
            } else {
                format!("no port of {range} was reserved\n")
            });
        }
        for part in freed {
            text.push_str(&format!("unreserved {}\n", span(part)));
        }
    }
    print(format_args!("{text}"))
}

/// The reserved ranges: a table (only its header when there are none, on a terminal), or
/// JSON.
fn list_reserved(target: &Target, json: bool) -> Outcome {
    let ranges = target.open()?.reserved_ports()?;
    if json {
        let value = serde_json::to_value(&ranges).map_err(|e| Failure::new(exit::OTHER, e))?;
        return print(format_args!("{}\n", output::json_text(&value)));
    }
    let rows: Vec<Vec<String>> = ranges
        .iter()
        .map(|r| vec![span(*r), r.len().to_string()])
        .collect();
    print_table(&["RESERVED", "PORTS"], &rows)
}

/// `PORT_<NAME>`: the name upper-cased, every character but ASCII letters and digits as `_`.
pub fn env_name(name: &str) -> String {
    let mut var = String::from("PORT_");
    var.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    var
}

fn run_command(
    target: &Target,
    names: &[String],
    preferred: &[u16],
    command: &[std::ffi::OsString],
) -> Outcome {
    if preferred.len() > names.len() {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{} preferred ports for {} names",
                preferred.len(),
                names.len()
            ),
        )
        .hint("give at most one --preferred per name, in the order of the names"));
    }
    let mut vars: HashMap<String, &str> = HashMap::new();
    for name in names {
        if let Some(other) = vars.insert(env_name(name), name) {
            return Err(Failure::new(
                exit::USAGE,
                format!(
                    "the names {:?} and {:?} would both set {}",
                    other,
                    name,
                    env_name(name)
                ),
            )
            .hint("give each port a name of its own"));
        }
    }
    let requests: Vec<Request> = names
        .iter()
        .enumerate()
        .map(|(i, name)| match preferred.get(i) {
            Some(&port) => Request::new(name.as_str()).preferred(port),
            None => Request::new(name.as_str()),
        })
        .collect();
    let (program, args) = command.split_first().ok_or_else(|| {
        Failure::new(exit::USAGE, "no command given").hint("write the command after `--`")
    })?;
    let registry = target.open()?;
    let guards = registry.acquire_many_with(&requests)?;
    let mut child = std::process::Command::new(program);
    child.args(args);
    child.env("PORT", guards[0].port().to_string());
    for guard in &guards {
        child.env(env_name(guard.name()), guard.port().to_string());
    }
    // The leases follow the command: it holds our owner lock too, so they stay alive while
    // it runs even if this process is killed.
    registry.share_owner_lock(&mut child)?;
    let ended = signals::run_forwarding(&mut child);
    // Released before the exit status is passed on: the ports are free once we exit.
    for guard in guards {
        let port = guard.port();
        if let Err(e) = guard.release() {
            eprintln!(
                "portdaddy: warning: could not release port {port}: {}; it is reclaimed \
                 now that portdaddy exits",
                escape(&exit::chain(&e))
            );
        }
    }
    match ended {
        Ok(Ended::Code(code)) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Ok(Ended::Signal(signal)) => Ok(ExitCode::from((128 + signal).clamp(0, 255) as u8)),
        Err(NotRun::NotFound(e)) => Err(Failure::new(
            exit::NOT_FOUND_COMMAND,
            format!("cannot run {:?}: {e}", program.to_string_lossy()),
        )),
        Err(NotRun::CannotExecute(e)) => Err(Failure::new(
            exit::CANNOT_EXECUTE,
            format!("cannot run {:?}: {e}", program.to_string_lossy()),
        )),
        Err(NotRun::Failed(e)) => Err(Failure::new(
            exit::RUN_FAILED,
            format!("while running {:?}: {e}", program.to_string_lossy()),
        )),
    }
}

fn stats(target: &Target, format: StatsFormat) -> Outcome {
    let stats = target.open()?.stats()?;
    if format == StatsFormat::Json {
        let value = serde_json::to_value(stats).map_err(|e| Failure::new(exit::REGISTRY, e))?;
        return print(format_args!("{}\n", output::json_text(&value)));
    }
    if format == StatsFormat::Prometheus {
        let path = target.path();
        return print(format_args!("{}", output::prometheus(&stats, &path)));
    }
    let rows: Vec<Vec<String>> = [
        ("acquired", stats.acquired),
        ("released", stats.released),
        ("reaped", stats.reaped),
        ("exhausted", stats.exhausted),
        ("errors", stats.errors),
        ("live", stats.live),
        ("detached", stats.detached),
        ("stale", stats.stale),
    ]
    .iter()
    .map(|(k, v)| vec![(*k).to_owned(), v.to_string()])
    .collect();
    let text = output::table(&["COUNTER", "VALUE"], &rows);
    // The header helps nobody here: the names say what the numbers are.
    let body: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
    print(format_args!("{body}"))
}

fn wait(port: u16, timeout: std::time::Duration, udp: bool) -> Outcome {
    let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
    match portdaddy::wait_until_listening(port, protocol, timeout) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error @ portdaddy::Error::NotListening { .. }) => {
            Err(Failure::new(exit::NOT_FOUND, error))
        }
        Err(error) => Err(error.into()),
    }
}

fn who(target: &Target, port: u16, json: bool) -> Outcome {
    let registry = target.open()?;
    let now = SystemTime::now();
    let lease = registry
        .list()?
        .into_iter()
        .find(|l| l.ports().contains(&port))
        .map(|l| {
            let state = registry.state_of(&l);
            (l, state)
        });
    let holders = portdaddy::socket_holders(port);
    let found = lease.is_some() || holders.as_ref().is_some_and(|h| !h.is_empty());
    let text = if json {
        let value = json!({
            "port": port,
            "lease": lease.as_ref().map(|(l, s)| output::lease_json(l, *s, now)),
            "processes": holders
                .as_ref()
                .map(|h| h.iter().map(output::holder_json).collect::<Vec<_>>()),
        });
        format!("{}\n", output::json_text(&value))
    } else {
        output::who_text(port, lease.as_ref(), holders.as_deref(), now)
    };
    write_out(text.as_bytes())?;
    Ok(ExitCode::from(if found {
        exit::OK
    } else {
        exit::NOT_FOUND
    }))
}

fn doctor(target: &Target, json: bool) -> Outcome {
    let path = target.path();
    let range = target.range.unwrap_or_else(PortRange::default_for_host);
    let diagnosis = PortDaddy::diagnose(&path, range);
    if json {
        let value = json!({
            "path": path.to_string_lossy(),
            "ok": !diagnosis.has_failures(),
            "schema_found": diagnosis.schema_found,
            "schema_supported": diagnosis.schema_supported,
            "journal_mode": diagnosis.journal_mode,
            "checks": diagnosis.checks,
        });
        print(format_args!("{}\n", output::json_text(&value)))?;
    } else {
        let text: String = diagnosis
            .checks
            .iter()
            .map(|c| {
                let status = match c.status {
                    Status::Ok => "ok",
                    Status::Warn => "warn",
                    _ => "fail",
                };
                format!("{status:<4}  {}: {}\n", c.topic, escape(&c.detail))
            })
            .collect();
        print(format_args!("{text}"))?;
    }
    Ok(ExitCode::from(if diagnosis.has_failures() {
        exit::NOT_FOUND
    } else {
        exit::OK
    }))
}

fn print(args: std::fmt::Arguments<'_>) -> Outcome {
    write_out(args.to_string().as_bytes())
}

/// Writes to stdout; a closed pipe ends the output quietly, other failures are reported.
fn write_out(bytes: &[u8]) -> Outcome {
    match write_stdout(bytes) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(Failure::new(
            exit::OTHER,
            format!("cannot write the output: {e}"),
        )),
    }
}

/// Writes `bytes` to standard output, failing if they cannot be written.
///
/// On Unix the bytes are written to descriptor 1 directly rather than through
/// `io::stdout()`, which takes `EBADF` for a closed stdout and reports success: a stdout
/// that is open but not for writing (`1</dev/null`, a directory) would swallow the output,
/// and `acquire` would keep a lease whose port nobody saw. (A stdout closed at start is
/// told apart before: see `output::stdout_closed_at_start`.)
fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    crate::sys::write_stdout(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_pid_of_0_or_1_is_refused_with_a_hint_for_pid_or_ttl() {
        for ppid in [0, 1] {
            let failure = owner_for_parent(ppid).unwrap_err();
            assert_eq!(failure.code(), exit::USAGE, "pid {ppid}");
            let text = failure.to_string();
            assert!(text.contains(&format!("pid {ppid}")), "{text}");
            assert!(text.contains("give --pid or --ttl"), "{text}");
        }
    }

    #[test]
    fn a_running_parent_owns_the_lease() {
        let me = std::process::id();
        let owner = owner_for_parent(me).unwrap();
        assert_eq!(owner.pid(), me);
    }
}
