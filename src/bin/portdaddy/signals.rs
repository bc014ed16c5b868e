//! Signals: passing them on to the child of `run`, and what a closed pipe does.

use std::io;
use std::process::{Command, ExitStatus};

/// Lets `portdaddy list | head -1` end quietly instead of failing on a closed pipe: the
/// default action of `SIGPIPE`, which Rust programs ignore unless told otherwise.
pub fn restore_sigpipe() {
    crate::sys::restore_sigpipe();
}

/// Makes a write to a closed pipe fail with `EPIPE` instead of killing the process, for a
/// command that must undo its work when its output is lost (`acquire`).
pub fn report_closed_pipes() {
    crate::sys::ignore_sigpipe();
}

/// How the child of `run` ended.
pub enum Ended {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// The signals `run` passes on to its command: every signal that can be caught, except
///
/// - those the kernel raises for a fault of portdaddy itself (`SIGSEGV`, `SIGBUS`, `SIGILL`,
///   `SIGFPE`, `SIGTRAP`, `SIGSYS`): a handler would return to the faulting instruction;
///   and `SIGABRT`, with which portdaddy itself aborts;
/// - those about portdaddy's own child and output (`SIGCHLD`, `SIGPIPE`);
/// - the job-control stops `SIGTSTP`, `SIGTTIN` and `SIGTTOU`, which keep their default
///   action: in the terminal's foreground the command shares portdaddy's process group, and
///   Ctrl-Z (or a read from the terminal in the background) stops the whole group, portdaddy
///   with it, so the shell sees the job stopped and `fg` continues both. Caught, they would
///   stop the command but not portdaddy, and the shell would wait for ever; stopping itself
///   by hand (`SIGSTOP`, as dumb-init does) would also stop an orphaned process group, which
///   the kernel spares from these signals because nobody is left to continue it;
/// - `SIGCONT`, which is added only when the command runs in a process group of its own:
///   while it shares portdaddy's group, whatever continues portdaddy's job (`fg`, `bg`,
///   `kill -CONT -PGID`) signals that group, the command included.
///
/// What is left: `SIGHUP`, `SIGINT`, `SIGQUIT`, `SIGTERM`, `SIGUSR1`, `SIGUSR2`, `SIGALRM`,
/// `SIGWINCH`, `SIGVTALRM`, `SIGPROF`, `SIGURG`, `SIGIO`, `SIGXCPU`, `SIGXFSZ`, and where the
/// platform has them `SIGPWR`, `SIGINFO` and the real-time signals. Most of them would kill
/// portdaddy by default, orphaning the command and ending its leases while it runs.
#[cfg(unix)]
fn forwarded() -> Vec<i32> {
    crate::sys::forwarded()
}

/// Whether a signal portdaddy received goes on to its command.
///
/// `kernel`: the kernel raised it (`SI_KERNEL`); `sender`: the process that sent it, where
/// known. `me` is this process.
#[cfg(unix)]
fn passes_on(signal: i32, kernel: bool, sender: Option<i32>, own_group: bool, me: i32) -> bool {
    // In our group, a signal the kernel raised for the terminal (Ctrl-C, Ctrl-\, a hang-up,
    // a resized window) went to the whole foreground group, the command included: passing
    // it on would deliver it twice. Signals sent by a process with kill(2) reach only us.
    if kernel && !own_group {
        return false;
    }
    // The CPU-time and file-size limits are about portdaddy's own use: the kernel sends
    // SIGXCPU as itself and SIGXFSZ as if portdaddy had sent it, to portdaddy alone.
    // Caught, SIGXFSZ leaves the write failing with EFBIG, which is reported.
    let own = kernel || sender == Some(me);
    use signal_hook::consts::{SIGXCPU, SIGXFSZ};
    !(own && matches!(signal, SIGXCPU | SIGXFSZ))
}

/// Why the command of `run` did not run to its end.
#[derive(Debug)]
pub enum NotRun {
    /// The program does not exist.
    NotFound(io::Error),
    /// The program exists but cannot be executed: not executable, a directory, not a
    /// format the system runs, not permitted.
    CannotExecute(io::Error),
    /// portdaddy itself failed, to start the command (out of processes, memory or file
    /// descriptors) or to wait for it.
    Failed(io::Error),
}

impl NotRun {
    /// Sorts an error of `Command::spawn`.
    fn of_spawn(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::NotFound {
            NotRun::NotFound(error)
        } else if crate::sys::cannot_execute(&error) {
            NotRun::CannotExecute(error)
        } else {
            NotRun::Failed(error)
        }
    }
}

/// Spawns `command`, passes on to it the signals this process receives while it runs (see
/// `forwarded`), and waits for it to end.
#[cfg(unix)]
pub fn run_forwarding(command: &mut Command) -> Result<Ended, NotRun> {
    use signal_hook::iterator::exfiltrator::WithOrigin;
    use signal_hook::iterator::SignalsInfo;
    use signal_hook::low_level::siginfo::Cause;

    // Installed before the spawn, so that no signal sent meanwhile kills this process and
    // orphans the child. The child gets default handlers back when it executes. A signal
    // that arrived ignored (`nohup`, `&` in a script) is left ignored, for this process and
    // for the child, which inherits the ignoring.
    let unignored = |s: &i32| !crate::sys::is_ignored(*s);
    let mut signals = SignalsInfo::<WithOrigin>::new(forwarded().into_iter().filter(unignored))
        .map_err(NotRun::Failed)?;
    let handle = signals.handle();
    // In the terminal's foreground process group the child stays in ours, so that Ctrl-C,
    // Ctrl-Z and reading the terminal work for it as for any command. Elsewhere (a script's
    // background job, `timeout`, a CI runner, no terminal at all) whoever signals our whole
    // group would reach the child directly and again through us: there the child gets a
    // group of its own, and every signal reaches it through us alone, SIGCONT too.
    let own_group = !crate::sys::in_foreground();
    if own_group {
        crate::sys::own_process_group(command);
        if unignored(&signal_hook::consts::SIGCONT) {
            signals
                .add_signal(signal_hook::consts::SIGCONT)
                .map_err(NotRun::Failed)?;
        }
    }
    let mut child = command.spawn().map_err(NotRun::of_spawn)?;
    // The forwarding thread closes the read end of signal-hook's self-pipe when it stops,
    // while the handlers stay installed until `signals` and `handle` are both gone; a signal
    // in between is written into a pipe without a reader. With SIGPIPE's default action that
    // would kill this process before it released the command's leases. The command was
    // spawned with the default action, and `run` writes nothing to a pipe it must die on.
    report_closed_pipes();
    let pid = child.id();
    let me = std::process::id() as i32;
    let forwarder = std::thread::spawn(move || {
        for origin in signals.forever() {
            let kernel = origin.cause == Cause::Kernel;
            let sender = origin.process.map(|p| p.pid);
            if !passes_on(origin.signal, kernel, sender, own_group, me) {
                continue;
            }
            // The child is not reaped before this thread has stopped (see below), so the
            // pid still names it. A signal that cannot be sent is not the command's failure.
            let _ = crate::sys::send_signal(pid, origin.signal);
        }
    });
    let waited = crate::sys::wait_without_reaping(pid);
    // Stop forwarding while the exited child still holds its pid, so that no signal can
    // reach another process that reuses the pid.
    handle.close();
    let _ = forwarder.join();
    waited.map_err(NotRun::Failed)?;
    Ok(ended(child.wait().map_err(NotRun::Failed)?))
}

/// Spawns `command` and waits for it; this platform has no signals to pass on.
#[cfg(not(unix))]
pub fn run_forwarding(command: &mut Command) -> Result<Ended, NotRun> {
    let mut child = command.spawn().map_err(NotRun::of_spawn)?;
    Ok(ended(child.wait().map_err(NotRun::Failed)?))
}

fn ended(status: ExitStatus) -> Ended {
    if let Some(signal) = crate::sys::signal_of(status) {
        return Ended::Signal(signal);
    }
    Ended::Code(status.code().unwrap_or(1))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    const ME: i32 = 4242;

    #[test]
    fn signals_sent_by_another_process_are_passed_on_in_either_group() {
        for own_group in [false, true] {
            for signal in forwarded() {
                assert!(
                    passes_on(signal, false, Some(7), own_group, ME),
                    "{signal} (own group: {own_group})"
                );
            }
        }
    }

    #[test]
    fn kernel_signals_are_passed_on_only_to_a_command_with_a_group_of_its_own() {
        for signal in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
            signal_hook::consts::SIGWINCH,
            signal_hook::consts::SIGQUIT,
        ] {
            assert!(!passes_on(signal, true, None, false, ME), "{signal}");
            assert!(passes_on(signal, true, None, true, ME), "{signal}");
        }
    }

    #[test]
    fn limits_portdaddy_itself_exceeds_are_not_passed_on() {
        for own_group in [false, true] {
            // SIGXCPU comes from the kernel, SIGXFSZ as if sent by this process.
            assert!(!passes_on(
                signal_hook::consts::SIGXCPU,
                true,
                None,
                own_group,
                ME
            ));
            assert!(!passes_on(
                signal_hook::consts::SIGXFSZ,
                false,
                Some(ME),
                own_group,
                ME
            ));
            assert!(!passes_on(
                signal_hook::consts::SIGXFSZ,
                true,
                None,
                own_group,
                ME
            ));
            // Sent by someone else, they are for the command.
            assert!(passes_on(
                signal_hook::consts::SIGXCPU,
                false,
                Some(7),
                own_group,
                ME
            ));
            assert!(passes_on(
                signal_hook::consts::SIGXFSZ,
                false,
                Some(7),
                own_group,
                ME
            ));
        }
    }

    #[test]
    fn faults_job_control_stops_and_the_child_signal_are_not_caught() {
        let caught = forwarded();
        for signal in [
            signal_hook::consts::SIGSEGV,
            signal_hook::consts::SIGBUS,
            signal_hook::consts::SIGILL,
            signal_hook::consts::SIGFPE,
            signal_hook::consts::SIGTRAP,
            signal_hook::consts::SIGSYS,
            signal_hook::consts::SIGABRT,
            signal_hook::consts::SIGCHLD,
            signal_hook::consts::SIGPIPE,
            signal_hook::consts::SIGTSTP,
            signal_hook::consts::SIGTTIN,
            signal_hook::consts::SIGTTOU,
            signal_hook::consts::SIGCONT,
            signal_hook::consts::SIGKILL,
            signal_hook::consts::SIGSTOP,
        ] {
            assert!(!caught.contains(&signal), "{signal}");
        }
        for signal in caught {
            assert!(
                !signal_hook::consts::FORBIDDEN.contains(&signal),
                "{signal} cannot be registered"
            );
        }
    }
}
