//! Worker processes, for the tests that need real processes (`processes.rs`, `faults.rs`).
//!
//! A test starts its own binary again with only the test [`WORKER_TEST`] of its own file
//! selected (`processes::worker_entry` for a worker started from `processes.rs`) and the
//! worker's mode, registry and range in the environment; that test function dispatches on
//! the mode. The two sides talk in lines: the test writes to the worker's stdin, the worker
//! answers with [`say`], whose lines carry [`PREFIX`] so that they stand apart from what
//! libtest prints.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::ops::RangeInclusive;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The test that a worker process runs.
pub const WORKER_TEST: &str = "worker_entry";
/// Selects worker mode, and the worker's part.
pub const MODE: &str = "PORTDADDY_TEST_WORKER";
/// The registry file a worker opens.
pub const REGISTRY: &str = "PORTDADDY_TEST_REGISTRY";
/// The registry range a worker uses, as `start-end`.
pub const RANGE: &str = "PORTDADDY_TEST_RANGE";
/// Marks a protocol line on a worker's stdout.
pub const PREFIX: &str = "@pd ";

/// Writes one protocol line to stdout.
pub fn say(message: &str) {
    let mut out = io::stdout().lock();
    // A leading newline keeps the line apart from anything libtest printed before it.
    writeln!(out, "\n{PREFIX}{message}")
        .and_then(|()| out.flush())
        .expect("write to stdout");
}

/// Blocks until stdin is closed: by the test, or by the death of the test's process.
pub fn wait_for_eof() {
    io::stdin()
        .read_to_end(&mut Vec::new())
        .expect("read stdin");
}

/// Blocks until the next line on stdin; `None` at end-of-file.
pub fn read_line() -> Option<String> {
    let mut line = String::new();
    match io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end().to_owned()),
    }
}

/// A worker's environment variable.
pub fn var(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("worker: {key} is not set"))
}

pub fn parse_range(text: &str) -> RangeInclusive<u16> {
    let (start, end) = text.split_once('-').expect("range as start-end");
    start.parse().expect("range start")..=end.parse().expect("range end")
}

/// Takes the host-wide lock on `range`, held until the returned file is dropped, so that
/// another run of the same tests on the host does not bind these ports meanwhile. Waits at
/// most `wait`.
pub fn lock_ports(range: &RangeInclusive<u16>, wait: Duration) -> File {
    let path = std::env::temp_dir().join(format!(
        "portdaddy-tests-ports-{}-{}.lock",
        range.start(),
        range.end()
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .or_else(|_| File::open(&path)) // made by another user: reading is enough to flock
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let give_up = Instant::now() + wait;
    loop {
        // SAFETY: `flock` on an open descriptor; the lock goes when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return file;
        }
        let error = io::Error::last_os_error();
        assert_eq!(
            error.raw_os_error(),
            Some(libc::EWOULDBLOCK),
            "flock {}: {error}",
            path.display()
        );
        assert!(
            Instant::now() < give_up,
            "another run of these tests held {} for {wait:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A worker process; killed and reaped on drop if it still runs.
pub struct Worker {
    /// Names the worker in failure messages.
    pub label: String,
    pub child: Child,
    stdin: Option<ChildStdin>,
    /// The protocol lines the worker writes, without [`PREFIX`].
    pub lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: thread::JoinHandle<()>,
}

impl Worker {
    /// Starts this test binary as a worker in `mode` on the registry at `path`.
    #[track_caller]
    pub fn spawn(
        label: impl Into<String>,
        mode: &str,
        path: &Path,
        range: &RangeInclusive<u16>,
        extra: &[(&str, String)],
    ) -> Self {
        Self::spawn_with(label, mode, path, range, extra, |_| {})
    }

    /// As [`spawn`](Self::spawn), letting `adjust` change the command first.
    #[track_caller]
    pub fn spawn_with(
        label: impl Into<String>,
        mode: &str,
        path: &Path,
        range: &RangeInclusive<u16>,
        extra: &[(&str, String)],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        let label = label.into();
        // The worker test of the file that starts the worker: each file dispatches its own modes.
        let caller = Path::new(std::panic::Location::caller().file());
        let module = caller
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a test file");
        let exe = std::env::current_exe().expect("locate the test binary");
        let mut command = Command::new(exe);
        command.args([
            &format!("{module}::{WORKER_TEST}"),
            "--exact",
            "--nocapture",
        ]);
        adjust(&mut command);
        command
            .env(MODE, mode)
            .env(REGISTRY, path)
            .env(RANGE, format!("{}-{}", range.start(), range.end()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in extra {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(at) = line.find(PREFIX) {
                    let _ = sender.send(line[at + PREFIX.len()..].to_owned());
                }
            }
        });
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_thread = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr_pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdin = child.stdin.take();
        Self {
            label,
            child,
            stdin,
            lines,
            stderr,
            stderr_thread,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the worker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything a worker that has closed its stdout wrote to stderr: waits (a few seconds at
    /// most) until its stderr is closed too.
    pub fn last_words(&self) -> String {
        let give_up = Instant::now() + Duration::from_secs(5);
        while !self.stderr_thread.is_finished() && Instant::now() < give_up {
            thread::yield_now();
        }
        self.stderr()
    }

    /// The next protocol line, waiting until `deadline` at most.
    pub fn expect_line(&self, what: &str, deadline: Instant) -> String {
        match self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => panic!(
                "{}: no {what} line before the deadline; stderr:\n{}",
                self.label,
                self.stderr()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "{}: exited before sending {what}; stderr:\n{}",
                self.label,
                self.last_words()
            ),
        }
    }

    /// The protocol lines of a worker that has ended, up to the end of its stdout.
    pub fn drain(&self, give_up: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self
                .lines
                .recv_timeout(give_up.saturating_duration_since(Instant::now()))
            {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => return lines,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: stdout stayed open after it ended", self.label)
                }
            }
        }
    }

    /// Writes a line to the worker's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to a worker");
    }

    /// Closes the worker's stdin: it finishes what it does and exits.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Collects the remaining protocol lines until the worker closes its stdout, then reaps it.
    pub fn finish(&mut self, deadline: Instant) -> (Vec<String>, ExitStatus) {
        let mut lines = Vec::new();
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: did not finish before the deadline; lines so far {lines:?}; stderr:\n{}",
                    self.label,
                    self.stderr()
                ),
            }
        }
        let status = self.child.wait().expect("reap a worker");
        (lines, status)
    }

    /// Sends `signal` to the worker.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("a pid");
        // SAFETY: a plain syscall on our own child, which has not been reaped.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// Kills the worker with `SIGKILL` and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("kill a worker");
        self.child.wait().expect("reap a worker")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Parses a worker's `HELD <port> <pid>` line.
pub fn parse_held(line: &str) -> (u16, u32) {
    match line.split(' ').collect::<Vec<_>>()[..] {
        ["HELD", port, pid] => (port.parse().expect("port"), pid.parse().expect("pid")),
        _ => panic!("expected HELD <port> <pid>, got {line:?}"),
    }
}
