//! Signals: passing them on to the child of `run`, and dying quietly on a closed pipe.

use std::io;
use std::process::{Command, ExitStatus};

/// Lets `portdaddy list | head -1` end quietly instead of failing on a closed pipe: the
/// default action of `SIGPIPE`, which Rust programs ignore unless told otherwise.
pub fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// How the child of `run` ended.
pub enum Ended {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// Spawns `command`, passes on to it the signals this process receives while it runs, and
/// waits for it to end.
#[cfg(unix)]
pub fn run_forwarding(command: &mut Command) -> io::Result<Ended> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    use signal_hook::iterator::exfiltrator::WithOrigin;
    use signal_hook::iterator::SignalsInfo;
    use signal_hook::low_level::siginfo::Cause;

    // Installed before the spawn, so that no signal sent meanwhile kills this process and
    // orphans the child. The child gets default handlers back when it executes. A signal
    // that arrived ignored (`nohup`, `&` in a script) is left ignored, for this process and
    // for the child, which inherits the ignoring.
    let wanted = [SIGINT, SIGTERM, SIGHUP, SIGQUIT];
    let handled: Vec<i32> = wanted.into_iter().filter(|&s| !is_ignored(s)).collect();
    let mut signals = SignalsInfo::<WithOrigin>::new(handled)?;
    let handle = signals.handle();
    // In the terminal's foreground process group the child stays in ours, so that Ctrl-C,
    // Ctrl-Z and reading the terminal work for it as for any command. Elsewhere (a script's
    // background job, `timeout`, a CI runner, no terminal at all) whoever signals our whole
    // group would reach the child directly and again through us: there the child gets a
    // group of its own, and every signal reaches it through us alone.
    let own_group = !in_foreground();
    if own_group {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let mut child = command.spawn()?;
    let pid = child.id() as libc::pid_t;
    let forwarder = std::thread::spawn(move || {
        for origin in signals.forever() {
            // In our group, a signal the kernel raised itself (Ctrl-C, a hang-up at the
            // terminal) went to the whole foreground group, the child included: passing it
            // on would deliver it twice. Signals sent by a process (`kill`) reach only us.
            if origin.cause == Cause::Kernel && !own_group {
                continue;
            }
            // SAFETY: kill has no memory effects; the child is not reaped before this
            // thread has stopped (see below), so the pid still names it.
            unsafe {
                libc::kill(pid, origin.signal);
            }
        }
    });
    let waited = wait_without_reaping(pid);
    // Stop forwarding while the exited child still holds its pid, so that no signal can
    // reach another process that reuses the pid.
    handle.close();
    let _ = forwarder.join();
    waited?;
    Ok(ended(child.wait()?))
}

/// Whether this process is in the foreground process group of its controlling terminal;
/// false without a controlling terminal.
#[cfg(unix)]
fn in_foreground() -> bool {
    // SAFETY: a constant, NUL-terminated path; the descriptor is closed below.
    let tty = unsafe {
        libc::open(
            c"/dev/tty".as_ptr(),
            libc::O_RDONLY | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if tty < 0 {
        return false;
    }
    // SAFETY: `tty` is an open descriptor of this function's own.
    let foreground = unsafe { libc::tcgetpgrp(tty) };
    // SAFETY: getpgrp cannot fail; close takes the descriptor opened above.
    unsafe {
        let ours = libc::getpgrp();
        libc::close(tty);
        foreground == ours
    }
}

/// Whether `signal` is ignored (`SIG_IGN`) in this process now.
#[cfg(unix)]
fn is_ignored(signal: libc::c_int) -> bool {
    // SAFETY: an all-zero sigaction is a valid value for sigaction to fill in.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `current`.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &mut current) };
    rc == 0 && current.sa_sigaction == libc::SIG_IGN
}

/// Waits until the child `pid` has exited but leaves it unreaped (a zombie), so its pid is
/// not reused before the forwarding has stopped.
#[cfg(unix)]
fn wait_without_reaping(pid: libc::pid_t) -> io::Result<()> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Spawns `command` and waits for it; this platform has no signals to pass on.
#[cfg(not(unix))]
pub fn run_forwarding(command: &mut Command) -> io::Result<Ended> {
    let mut child = command.spawn()?;
    Ok(ended(child.wait()?))
}

fn ended(status: ExitStatus) -> Ended {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return Ended::Signal(signal);
        }
    }
    Ended::Code(status.code().unwrap_or(1))
}
