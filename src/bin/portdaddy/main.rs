//! `portdaddy`: the port registry for shell scripts, CI jobs and programs in any language.
//!
//! Every command opens the same registry as the library (`--db`, else `$PORTDADDY_DB`, else
//! the per-user default) and works through the library's public API only.

mod commands;
mod exit;
mod output;
mod signals;
mod sys;
// The library's escaping, compiled here too: one rule for what the library's errors and the
// command's output show.
#[path = "../../text.rs"]
mod text;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use portdaddy::PortRange;

/// What `--help` says about exit codes and the environment.
const AFTER_HELP: &str = "\
Exit codes:
  0  success (for `run`: the command's own exit code is passed on)
  1  nothing matched (`release`, `who`), a check failed (`doctor`), or nothing listened
     before the timeout (`wait`)
  2  usage error: unknown command or flag, a bad port, duration or range, an invalid name,
     a --pid that is not running, `acquire` by init without --pid or --ttl
  3  no free port left in the range: run `portdaddy reap` or widen the range
  4  the registry cannot be used: it cannot be opened or created, is not a portdaddy
     registry, is damaged or too new, or stays locked
  5  the output cannot be written (`acquire` then releases the lease), another process
     took the lease or the port while the command ran, or the process or host is out of
     file descriptors (to open the registry or probe ports) or of memory (to probe); also
     any other failure
  `run` exits with its command's exit code, 128+N when signal N killed the command, 125
  when `run` itself fails (any of 2-5 above), 126 when the command cannot be executed and
  127 when it is not found: see `portdaddy run --help`.

Environment:
  PORTDADDY_DB     the registry file when --db is not given
  PORTDADDY_RANGE  the port range when --range is not given";

/// What `run --help` says after the options: examples and exit codes.
const RUN_AFTER_HELP: &str = "\
Examples:
  portdaddy run api web -- npm run dev
  portdaddy run web -- sh -c 'exec python3 -m http.server \"$PORT\"'
The command and its arguments are passed on as they are, with no shell in between:
`$PORT` written among them stays the text $PORT, so let `sh -c` expand it, as above.

Exit codes (those of env(1) and timeout(1)):
  125    `run` itself failed before the command started: a usage error, the registry
         cannot be used, no free port in the range; or it failed to start or wait for the
         command (out of processes or memory)
  126    the command was found but cannot be executed: not executable, a directory, not
         permitted
  127    the command was not found
  128+N  signal N killed the command
  other  the command's own exit code
A command that itself exits with 125, 126 or 127 cannot be told from a failure of `run`
by the code alone: `run`'s own failures print one line starting `portdaddy: error:` on
stderr. An executable file without a `#!` line is run by /bin/sh on Linux with glibc;
where the system refuses it instead, the code is 126.";

/// Hands out TCP/UDP ports that nothing else on this host uses, from a registry shared with
/// every Rust program, script and CI job that uses portdaddy.
#[derive(Debug, Parser)]
#[command(name = "portdaddy", version, after_help = AFTER_HELP, max_term_width = 100)]
struct Cli {
    /// The registry file [default: $PORTDADDY_DB, else the per-user state directory].
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,

    /// The range automatic choices come from, as START-END [default: $PORTDADDY_RANGE, else
    /// the largest block from 15000 up outside the kernel's ephemeral range].
    #[arg(long, global = true, value_name = "START-END", value_parser = parse_range)]
    range: Option<PortRange>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
// A call is a process of its own, often one per port: only the subcommand given has its
// arguments built before parsing (help and completions build them all).
#[command(defer = true)]
enum Command {
    /// Leases a port and prints it. The lease belongs to the calling process (the shell or
    /// script that runs this command), or to --pid, and ends when that process exits.
    ///
    /// Without --pid or --ttl, a caller that is init (pid 1: an orphaned command, systemd, a
    /// container's init) or outside this PID namespace (pid 0: `docker exec`) is refused,
    /// since the lease would never end.
    ///
    /// A port that cannot be printed (stdout closed, a full disk, a pipe whose reader has
    /// gone) is released again, with exit code 5.
    #[command(after_help = "Example: PG_PORT=$(portdaddy acquire postgres)")]
    Acquire {
        /// A label for the port: shown in listings, and the name gets its last port back.
        name: String,
        /// Ask for this port; another is chosen if it is taken.
        #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        preferred: Option<u16>,
        /// Make a detached lease that lasts this long (30s, 10m, 2h, 1d; at least 1s),
        /// whatever process runs; end it early with `portdaddy release`.
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl, conflicts_with = "pid")]
        ttl: Option<Duration>,
        /// The process the lease belongs to [default: the parent process].
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
        /// Check the port is free for UDP instead of TCP.
        #[arg(long)]
        udp: bool,
        /// Lease N consecutive ports in one lease and print the first; the others are the
        /// next N-1 ports.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..))]
        block: u16,
        /// Print a JSON object instead of the port alone.
        #[arg(long)]
        json: bool,
    },
    /// Releases the lease on a port, or every lease of a name, whoever holds it.
    #[command(after_help = "Example: portdaddy release \"$PG_PORT\"")]
    Release {
        /// A port number, or a name.
        target: String,
        /// Take TARGET as a name even if it is a number.
        #[arg(long)]
        name: bool,
    },
    /// Lists the leases, oldest first.
    #[command(after_help = "Example: portdaddy list --all --json")]
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Also show leases whose owner has died or whose expiry has passed.
        #[arg(long)]
        all: bool,
    },
    /// Leases one port per name, runs a command with them in its environment, and releases
    /// them when it exits.
    ///
    /// `PORT` is the first port and `PORT_<NAME>` each name's port (NAME upper-cased, every
    /// character but ASCII letters and digits as `_`). Every signal portdaddy can catch is
    /// passed on to the command (SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM,
    /// SIGWINCH and the rest); those the terminal sends (Ctrl-C) reach the command directly.
    /// SIGCHLD, SIGPIPE and faults are not passed on, nor are the job-control stops: Ctrl-Z
    /// stops portdaddy and the command together. Outside the terminal's foreground (a
    /// background job, `timeout`, CI) the command runs in a process group of its own, so a
    /// signal sent to portdaddy's whole group reaches it once, passed on. A signal ignored
    /// when portdaddy starts (`nohup`) stays ignored, for the command too. The exit code is
    /// the command's, or 128+N when signal N killed it; 125, 126 and 127 say that the
    /// command did not run (see below).
    ///
    /// The leases follow the command: if portdaddy itself is killed (SIGKILL, the OOM
    /// killer), they stay live while the command (or a process it started that kept its
    /// descriptors) still runs, and are reclaimed once they have all exited.
    #[command(after_help = RUN_AFTER_HELP)]
    Run {
        /// The names to lease a port for.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Ask for this port for the first name; repeat for the following names.
        #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        preferred: Vec<u16>,
        /// The command to run, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Reserves ports for every user of the registry, or lists the reserved ranges when no
    /// port is given.
    ///
    /// No claim of any process that uses the registry hands out a reserved port, not even as
    /// a preferred port; a request that requires one fails. Reserving a port that a lease
    /// holds is allowed: a note names the lease, which keeps its port until it is released;
    /// then the port is not handed out again. Ranges that overlap or touch are kept as one.
    /// portdaddy versions that do not know reserved ranges (registry schema before 6) do not
    /// honour them.
    #[command(after_help = "Example: portdaddy reserve 8080 5432 9000-9099")]
    Reserve {
        /// The ports to reserve: a port, or a range START-END (both included).
        #[arg(value_name = "PORT|START-END", value_parser = parse_ports)]
        ports: Vec<PortRange>,
        /// List the reserved ranges as a JSON array of {"start", "end"} objects.
        #[arg(long, conflicts_with = "ports")]
        json: bool,
    },
    /// Stops reserving ports: they are handed out again. Freeing part of a reserved range
    /// leaves the rest of it reserved; freeing a port that is not reserved changes nothing
    /// and says so.
    #[command(after_help = "Example: portdaddy unreserve 9050-9059")]
    Unreserve {
        /// The ports to free: a port, or a range START-END (both included).
        #[arg(required = true, value_name = "PORT|START-END", value_parser = parse_ports)]
        ports: Vec<PortRange>,
    },
    /// Reclaims the leases whose owner has died or whose expiry has passed; prints how many.
    #[command(after_help = "Example: portdaddy reap")]
    Reap,
    /// Prints the counters kept in the registry and the number of leases by state; also for
    /// Prometheus.
    #[command(after_help = "Example, for node_exporter's textfile collector:\n  \
        portdaddy stats --format prometheus > /var/lib/node_exporter/portdaddy.prom.$$ && \
        mv /var/lib/node_exporter/portdaddy.prom.$$ /var/lib/node_exporter/portdaddy.prom")]
    Stats {
        /// The output format: `text` (a line per counter), `json` (one object), or
        /// `prometheus` (the Prometheus text exposition format: `portdaddy_*_total` counters
        /// and the `portdaddy_leases` gauge by state, labelled with the registry path).
        #[arg(long, value_enum, default_value_t = StatsFormat::Text, conflicts_with = "json")]
        format: StatsFormat,
        /// Print a JSON object: the same as `--format json`.
        #[arg(long)]
        json: bool,
    },
    /// Waits until something listens on PORT; exits 1 if nothing does before the timeout.
    ///
    /// Exits 0 once a TCP connection to 127.0.0.1 or ::1 is accepted, or on Linux goes
    /// unanswered to a listener whose accept queue is full (with --udp: once a UDP socket is
    /// bound on the port), and 1 once the timeout has passed. Checks at once, then
    /// after pauses that double from 1 ms to 100 ms.
    ///
    /// The TCP server sees one connection that is closed at once. For UDP, which has no
    /// connection to accept, "listening" means a UDP socket is bound on the port on any
    /// address: on Linux read from /proc/net/udp and /proc/net/udp6, elsewhere found by a
    /// bind of the port that fails with "address in use".
    #[command(
        after_help = "Example: python3 -m http.server 8080 & portdaddy wait 8080 && curl localhost:8080"
    )]
    Wait {
        /// The port to wait for.
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
        /// How long to wait at most (500ms, 30s, 2m; 0 checks once).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
        timeout: Duration,
        /// Wait for a UDP socket instead of a TCP listener.
        #[arg(long)]
        udp: bool,
    },
    /// Shows who holds PORT: its lease in the registry, and the processes bound on it.
    ///
    /// The lease: name, owner pid, state, age. The processes: each with a listening TCP
    /// socket or a UDP socket bound on the port, by pid and command.
    ///
    /// A socket whose process cannot be read (another user's, or /proc mounted with hidepid)
    /// is shown as a process we cannot see. The processes are found in Linux's /proc; on
    /// other systems the command says it cannot tell. Exits 0 if a lease or a process was
    /// found, and 1 if neither was.
    #[command(after_help = "Example: portdaddy who 8080")]
    Who {
        /// The port to look at.
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
        /// Print a JSON object: `port`, `lease` (as in `list --json`, or null) and `processes`
        /// (each `pid` (null: cannot be seen), `command`, `protocol`; null if the system
        /// cannot tell).
        #[arg(long)]
        json: bool,
    },
    /// Checks the registry and the setup without changing anything; one line per check.
    #[command(after_help = "Example: portdaddy doctor --json")]
    Doctor {
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Prints shell completions.
    #[command(
        after_help = "Example: portdaddy completions bash > ~/.local/share/bash-completion/completions/portdaddy"
    )]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

pub(crate) fn parse_range(text: &str) -> Result<PortRange, String> {
    let (start, end) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not a range; write START-END, e.g. 26000-26499"))?;
    PortRange::new(port_number(start)?, port_number(end)?).map_err(|e| e.to_string())
}

/// A port number, blanks around it allowed; 0 is left for `PortRange::new` to refuse, with
/// its reason.
fn port_number(text: &str) -> Result<u16, String> {
    text.trim()
        .parse::<u16>()
        .map_err(|_| format!("{text:?} is not a port number (1-65535)"))
}

/// The formats of `portdaddy stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StatsFormat {
    /// A line per counter.
    Text,
    /// One JSON object.
    Json,
    /// The Prometheus text exposition format.
    Prometheus,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 500ms, 30s or 2m"))
}

/// A port (`8080`) as a range of one port, or a range (`9000-9099`).
pub(crate) fn parse_ports(text: &str) -> Result<PortRange, String> {
    if text.contains('-') {
        return parse_range(text);
    }
    let port = port_number(text)
        .ok()
        .filter(|&port| port > 0)
        .ok_or_else(|| format!("{text:?} is not a port number (1-65535) nor a range START-END"))?;
    PortRange::new(port, port).map_err(|e| e.to_string())
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 30s, 10m, 2h or 1d"))?;
    if ttl.is_zero() {
        return Err("a TTL must be longer than zero".into());
    }
    // The lease is detached and its port handed to a script: a shorter TTL would let it
    // expire before the script could start a server on the port.
    if ttl < Duration::from_secs(1) {
        return Err(format!(
            "a TTL of {text} would expire before the port could be used; give at least 1s"
        ));
    }
    // Times past the year 9999 cannot be written as RFC 3339, and nobody needs one.
    let last = std::time::UNIX_EPOCH + output::LATEST;
    match std::time::SystemTime::now().checked_add(ttl) {
        Some(end) if end <= last => Ok(ttl),
        _ => Err(format!(
            "a TTL of {text} ends after the year 9999; give a shorter one, e.g. 1d or 30d"
        )),
    }
}

/// Whether the command line names the `run` subcommand, read as leniently as clap can: for a
/// command line clap refused.
fn names_run() -> bool {
    use clap::CommandFactory;
    Cli::command()
        .ignore_errors(true)
        .try_get_matches()
        .is_ok_and(|m| m.subcommand_name() == Some("run"))
}

fn main() -> ExitCode {
    signals::restore_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit::usage(e, names_run()),
    };
    match commands::run(cli) {
        Ok(code) => code,
        Err(failure) => failure.report(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn ports_and_ranges_parse_alike_and_refuse_port_0_naming_it() {
        use super::{parse_ports, parse_range};
        let range = |a, b| portdaddy::PortRange::new(a, b).unwrap();
        assert_eq!(parse_ports(" 8080 "), Ok(range(8080, 8080)));
        assert_eq!(parse_ports("9000-9099"), Ok(range(9000, 9099)));
        assert_eq!(parse_range("9000 - 9099"), Ok(range(9000, 9099)));
        let typo = parse_ports("80a").unwrap_err();
        assert!(typo.contains("\"80a\" is not a port number") && typo.contains("nor a range"));
        assert!(parse_ports("0")
            .unwrap_err()
            .contains("\"0\" is not a port number"));
        assert!(parse_range("0-10")
            .unwrap_err()
            .contains("port 0 is not a port"));
        assert!(parse_range("1-x")
            .unwrap_err()
            .contains("\"x\" is not a port number"));
    }

    #[test]
    fn every_command_shows_an_example_in_its_help() {
        let cli = super::Cli::command();
        let without: Vec<&str> = cli
            .get_subcommands()
            .filter(|c| {
                !c.get_after_help()
                    .is_some_and(|h| h.to_string().contains("Example"))
            })
            .map(|c| c.get_name())
            .collect();
        assert!(without.is_empty(), "no example in --help: {without:?}");
    }
}
