//! The `portdaddy` command pointed at a temporary registry, for the command's tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A temporary registry (removed on drop) and the command pointed at it over `range`.
pub struct CliRegistry {
    dir: tempfile::TempDir,
    /// The registry file.
    pub db: PathBuf,
    range: &'static str,
}

impl CliRegistry {
    /// A registry in a new temporary directory; the commands claim from `range`
    /// (`START-END`, a block of the calling test file's own).
    pub fn new(range: &'static str) -> Self {
        let (dir, db) = super::temp_registry();
        Self { dir, db, range }
    }

    /// The temporary directory the registry is in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `portdaddy ARGS` on this registry and range, with no stdin and backtraces on (a panic
    /// would then fail the one-line checks).
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portdaddy"));
        cmd.args(args)
            .env("PORTDADDY_DB", &self.db)
            .env("PORTDADDY_RANGE", self.range)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `portdaddy ARGS` to its end.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command(args).output().expect("run portdaddy")
    }
}

/// Output as text, invalid UTF-8 replaced.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The one line a failed command prints, after checking there is exactly one and that it
/// has the documented prefix, and that the exit code is `code`.
pub fn error_line(out: &Output, code: i32) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, no backtrace: {stderr}");
    assert!(lines[0].starts_with("portdaddy: error: "), "{stderr}");
    lines[0].to_owned()
}
