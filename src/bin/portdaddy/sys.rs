//! The command's platform code: the system calls of signal handling, of the terminal and of
//! standard output, and every `unsafe` block of the command, each with its `SAFETY:` note.
//! System calls go through rustix; what it does not cover (signal dispositions, the
//! real-time signal numbers) through `libc`. Elsewhere than on Unix each function gives the
//! answer that changes nothing.

use std::io;
use std::process::ExitStatus;

/// Sets `SIGPIPE` back to its default action: a write to a closed pipe ends the process.
pub fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Ignores `SIGPIPE`: a write to a closed pipe fails with `EPIPE`.
pub fn ignore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: ignoring a signal touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// The signals of this platform that `run` passes on (see `signals::forwarded` for which
/// and why).
#[cfg(unix)]
pub fn forwarded() -> Vec<i32> {
    use signal_hook::consts::signal::*;
    let mut signals = vec![
        SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM, SIGWINCH, SIGVTALRM, SIGPROF,
        SIGURG, SIGXCPU, SIGXFSZ,
    ];
    #[cfg(not(target_os = "haiku"))]
    signals.push(SIGIO);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        signals.push(libc::SIGPWR);
        signals.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    }
    #[cfg(any(
        target_os = "freebsd",
        target_os = "dragonfly",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "macos"
    ))]
    signals.push(SIGINFO);
    signals
}

/// Sends `signal`, a number the kernel delivered to this process, to the process `pid`.
#[cfg(unix)]
pub fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `signal` is a number this process received as a signal (through
    // signal-hook), so it names a signal the kernel knows, real-time ones included; rustix
    // asks only that, and a signal that libc keeps for itself is never caught and so never
    // passed on.
    let signal = unsafe { rustix::process::Signal::from_raw_unchecked(signal) };
    Ok(rustix::process::kill_process(pid, signal)?)
}

/// Whether this process is in the foreground process group of its controlling terminal;
/// false without a controlling terminal.
#[cfg(unix)]
pub fn in_foreground() -> bool {
    use rustix::fs::{Mode, OFlags};
    let Ok(tty) = rustix::fs::open(
        "/dev/tty",
        OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    rustix::termios::tcgetpgrp(&tty).is_ok_and(|group| group == rustix::process::getpgrp())
}

/// Whether `signal` is ignored (`SIG_IGN`) in this process now.
#[cfg(unix)]
pub fn is_ignored(signal: i32) -> bool {
    // SAFETY: an all-zero sigaction is a valid value for sigaction to fill in.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `current`.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &mut current) };
    rc == 0 && current.sa_sigaction == libc::SIG_IGN
}

/// Waits until the child `pid` has exited but leaves it unreaped (a zombie), so its pid is
/// not reused before the forwarding has stopped.
#[cfg(unix)]
pub fn wait_without_reaping(pid: u32) -> io::Result<()> {
    use rustix::process::{Pid, WaitId, WaitIdOptions};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        match rustix::process::waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Puts the process `command` starts in a process group of its own.
#[cfg(unix)]
pub fn own_process_group(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
}

/// Whether `error`, from starting a program, says that the program exists but cannot be
/// executed (env(1)'s exit code 126): not executable or not permitted, a directory, not a
/// format the system runs, busy being written, a path or argument list too long. Not for
/// a program that is not found, nor for a failure to create the process.
pub fn cannot_execute(error: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        use rustix::io::Errno;
        matches!(
            Errno::from_io_error(error),
            Some(
                Errno::ACCESS
                    | Errno::PERM
                    | Errno::NOEXEC
                    | Errno::ISDIR
                    | Errno::NOTDIR
                    | Errno::LOOP
                    | Errno::TXTBSY
                    | Errno::TOOBIG
                    | Errno::NAMETOOLONG
            )
        )
    }
    #[cfg(not(unix))]
    {
        use std::io::ErrorKind;
        matches!(
            error.kind(),
            ErrorKind::PermissionDenied
                | ErrorKind::IsADirectory
                | ErrorKind::NotADirectory
                | ErrorKind::FilesystemLoop
                | ErrorKind::ExecutableFileBusy
                | ErrorKind::ArgumentListTooLong
                | ErrorKind::InvalidFilename
        )
    }
}

/// The signal that ended a process, if one did.
pub fn signal_of(status: ExitStatus) -> Option<i32> {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status.signal()
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        None
    }
}

/// The pid of the process that started this one, where the platform says.
pub fn parent_pid() -> Option<u32> {
    #[cfg(unix)]
    {
        Some(std::os::unix::process::parent_id())
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Whether standard output was closed when the process started, as recorded before Rust's
/// runtime replaced it (see `output::stdout_closed_at_start`). Not known (false) elsewhere
/// than on Linux.
pub fn stdout_closed_at_start() -> bool {
    #[cfg(target_os = "linux")]
    {
        STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(target_os = "linux")]
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Run by the loader before Rust's runtime starts (and before it replaces a closed stdout).
// SAFETY (of the section): `.init_array` holds pointers to functions that take no argument
// and return nothing, which this is; it runs before `main`, and touches only an atomic.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static RECORD_STDOUT: extern "C" fn() = {
    extern "C" fn record_stdout() {
        // SAFETY: the descriptor is only borrowed for one F_GETFD, which reads its flags and
        // fails (EBADF) exactly when it is not open.
        let stdout = unsafe { std::os::fd::BorrowedFd::borrow_raw(1) };
        let closed = rustix::io::fcntl_getfd(stdout).is_err();
        STDOUT_CLOSED.store(closed, std::sync::atomic::Ordering::Relaxed);
    }
    record_stdout
};

/// Writes `bytes` to standard output, failing if they cannot be written: on Unix to
/// descriptor 1 directly (see `commands::write_stdout` for why).
pub fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: descriptor 1 is open (the runtime opens /dev/null in place of a closed
        // one before `main`), and `ManuallyDrop` never closes it: the `File` only borrows it
        // for these writes.
        let out = unsafe { std::fs::File::from_raw_fd(1) };
        std::mem::ManuallyDrop::new(out).write_all(bytes)
    }
    #[cfg(not(unix))]
    {
        let mut out = io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush())
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A real-time signal (which rustix names only through `from_raw_unchecked`) reaches the
    /// child, which it ends by default; the wait leaves the child to be reaped, with the
    /// signal in its status.
    #[test]
    fn a_real_time_signal_reaches_the_child_and_its_status_says_so() {
        let signal = forwarded().into_iter().max().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        send_signal(child.id(), signal).unwrap();
        wait_without_reaping(child.id()).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(signal_of(status), Some(signal));
    }

    /// Ends with SIGPIPE ignored, as Rust's runtime leaves it for the other tests.
    #[test]
    fn the_sigpipe_disposition_is_set_and_seen() {
        restore_sigpipe();
        assert!(!is_ignored(signal_hook::consts::SIGPIPE));
        ignore_sigpipe();
        assert!(is_ignored(signal_hook::consts::SIGPIPE));
    }
}
