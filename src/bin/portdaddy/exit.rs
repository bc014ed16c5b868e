//! Exit codes, and the one line that tells a person what went wrong.

use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;

use portdaddy::Error;

use crate::output::escape;

/// Success.
pub const OK: u8 = 0;
/// Nothing matched, or a check failed.
pub const NOT_FOUND: u8 = 1;
/// Bad usage or bad input.
pub const USAGE: u8 = 2;
/// No free port in the range.
pub const EXHAUSTED: u8 = 3;
/// The registry cannot be used.
pub const REGISTRY: u8 = 4;
/// Anything else: the output cannot be written, or the lease or port was lost meanwhile.
pub const OTHER: u8 = 5;
/// `run` itself failed (a usage error, the registry, no free port, or the command could
/// not be started for a reason of portdaddy's own), as env(1) and timeout(1) exit with 125.
pub const RUN_FAILED: u8 = 125;
/// The command of `run` cannot be executed.
pub const CANNOT_EXECUTE: u8 = 126;
/// The command of `run` does not exist.
pub const NOT_FOUND_COMMAND: u8 = 127;

/// A command that failed: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    message: String,
    hint: Option<String>,
    code: u8,
}

impl Failure {
    pub fn new(code: u8, message: impl Display) -> Self {
        Self {
            message: message.to_string(),
            hint: None,
            code,
        }
    }

    pub fn hint(mut self, hint: impl Display) -> Self {
        self.hint = Some(hint.to_string());
        self
    }

    /// The failure as `run` reports it: its own failures exit with 125, so that every other
    /// code but 126 and 127 (the command cannot be executed, is not found) is the command's.
    pub fn of_run(mut self) -> Self {
        if self.code != CANNOT_EXECUTE && self.code != NOT_FOUND_COMMAND {
            self.code = RUN_FAILED;
        }
        self
    }

    /// The exit code.
    #[cfg(test)]
    pub fn code(&self) -> u8 {
        self.code
    }

    /// Prints the one line to stderr and gives the exit code. A stderr that cannot be
    /// written changes nothing: the exit code still tells.
    pub fn report(self) -> ExitCode {
        let line = format!("portdaddy: error: {}\n", escape(&self.to_string()));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        ExitCode::from(self.code)
    }
}

/// The line `report` prints, without its prefix.
impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// `error`'s message followed by each of its causes, `msg: cause: cause`: the library's
/// messages do not repeat their causes, which they return from `source()` instead.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let failure = Failure::new(code_of(&error), chain(&error));
        match &error {
            Error::Exhausted {
                range,
                held,
                block_len,
                ..
            } if *block_len > 1 => failure.hint(format!(
                "{held} ports of {range} are held by live leases; run `portdaddy reap` to \
                 reclaim dead ones, ask for a shorter --block, or widen the range with --range"
            )),
            Error::Exhausted {
                range, reserved, ..
            } if *reserved > 0 => failure.hint(format!(
                "{reserved} ports of {range} are reserved: `portdaddy reserve` lists the \
                 registry's reserved ranges and `portdaddy unreserve` frees them; or widen the \
                 range with --range"
            )),
            Error::Exhausted { range, held, .. } => failure.hint(format!(
                "{held} ports of {range} are held by live leases; run `portdaddy reap` to \
                 reclaim dead ones, or widen the range with --range"
            )),
            Error::NoSuchProcess { .. } | Error::ProcessUnreadable { .. } => failure.hint(
                "--pid must name a running process of this user; without --pid the lease \
                 belongs to the calling shell",
            ),
            Error::InvalidName { .. } => {
                failure.hint("a name is 1 to 128 bytes without control characters")
            }
            _ if error.is_registry_unusable() => failure.hint(
                "choose the registry file with --db or PORTDADDY_DB; `portdaddy doctor` checks it",
            ),
            _ => failure,
        }
    }
}

impl From<portdaddy::GuardError> for Failure {
    fn from(error: portdaddy::GuardError) -> Self {
        Error::from(error).into()
    }
}

/// The documented exit code for a library error.
pub fn code_of(error: &Error) -> u8 {
    match error {
        Error::Exhausted { .. } => EXHAUSTED,
        Error::InvalidName { .. }
        | Error::InvalidRange { .. }
        | Error::InvalidRequest { .. }
        | Error::NoSuchProcess { .. }
        | Error::ProcessUnreadable { .. } => USAGE,
        _ if error.is_registry_unusable() => REGISTRY,
        // The registry is fine, yet this command cannot use it: it stayed locked, or this
        // process is a forked child.
        Error::LockTimeout { .. } | Error::ForkedHandle { .. } => REGISTRY,
        // The registry is fine: the process or host is out of file descriptors.
        Error::OutOfDescriptors { .. } => OTHER,
        // Not "nothing matched": a script may take exit code 1 as an answer.
        _ => OTHER,
    }
}

/// Reports a command line clap refused: help and version as clap prints them, anything
/// else as one line with exit code 2, or 125 for the command line of `run` (`for_run`),
/// whose other codes are its command's.
pub fn usage(error: clap::Error, for_run: bool) -> ExitCode {
    use clap::error::ErrorKind;
    let code = if for_run { RUN_FAILED } else { USAGE };
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::from(OK)
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            ExitCode::from(code)
        }
        _ => {
            // clap's first paragraph says what is wrong (some errors list the missing
            // arguments on lines of their own); the usage after it is left to --help.
            let text = error.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            let message = if message.is_empty() {
                "invalid command line"
            } else {
                message
            };
            let help = if for_run {
                "portdaddy run --help"
            } else {
                "portdaddy --help"
            };
            Failure::new(code, message)
                .hint(format!("run `{help}` for usage"))
                .report()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use portdaddy::{PortDaddy, Request};

    fn registry() -> PortDaddy {
        PortDaddy::builder()
            .in_memory()
            .range(32650..=32659)
            .port_probe(|_, _| true)
            .open()
            .unwrap()
    }

    #[test]
    fn run_reports_its_own_failures_as_125_and_keeps_126_and_127() {
        for code in [NOT_FOUND, USAGE, EXHAUSTED, REGISTRY, OTHER, RUN_FAILED] {
            assert_eq!(
                Failure::new(code, "x").of_run().code(),
                RUN_FAILED,
                "{code}"
            );
        }
        for code in [CANNOT_EXECUTE, NOT_FOUND_COMMAND] {
            assert_eq!(Failure::new(code, "x").of_run().code(), code);
        }
    }

    #[test]
    fn a_lost_lease_or_port_is_not_reported_as_nothing_matched() {
        let registry = registry();
        let guard = registry.acquire("a").unwrap();
        assert!(registry.release_port(guard.port()).unwrap());
        let lost = Error::from(guard.keep().unwrap_err());
        assert!(matches!(lost, Error::LeaseLost { .. }), "{lost:?}");
        let held = registry.acquire("b").unwrap();
        let taken = registry
            .acquire_with(&Request::new("c").require(held.port()))
            .unwrap_err();
        assert!(matches!(taken, Error::PortUnavailable { .. }), "{taken:?}");
        assert_eq!(code_of(&lost), OTHER);
        assert_eq!(code_of(&taken), OTHER);
    }

    #[test]
    fn an_unusable_registry_is_reported_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let error = PortDaddy::open(blocker.join("r.sqlite3")).unwrap_err();
        assert!(matches!(error, Error::Open { .. }), "{error:?}");
        let cause = std::error::Error::source(&error).unwrap().to_string();
        let failure = Failure::from(error);
        assert_eq!(failure.code(), REGISTRY);
        let line = failure.to_string();
        assert!(
            line.starts_with("cannot open the port registry at "),
            "{line}"
        );
        assert!(line.contains(&format!(": {cause}")), "{line}");
        assert_eq!(line.matches(&cause).count(), 1, "{line}");
        assert!(line.contains("; hint: choose the registry file"), "{line}");
    }
}
