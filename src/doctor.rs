//! [`Diagnosis`]: what `PortDaddy::diagnose` finds in a registry without changing it.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::builder::{Settings, DEFAULT_LOCK_TIMEOUT};
use crate::error::Chain;
use crate::lease::{LeaseState, Owner};
use crate::policy::Env;
use crate::probe::owner_lock::{owners_dir, Liveness};
use crate::range::PortRange;
use crate::store::{sqlite, Tally};

/// How one check of a [`Diagnosis`] came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum Status {
    /// As it should be.
    Ok,
    /// Works, but deserves a look.
    Warn,
    /// The registry cannot be used as it is.
    Fail,
}

impl Status {
    /// `ok`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One finding of a [`Diagnosis`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Check {
    /// What was checked: `registry path`, `directory permissions`, `file permissions`,
    /// `schema version`, `journal mode`, `integrity`, `port range` or `stale leases`.
    pub topic: &'static str,
    /// How it came out.
    pub status: Status,
    /// What was found, and what to do about it when it is not `ok`.
    pub detail: String,
}

/// What [`PortDaddy::diagnose`](crate::PortDaddy::diagnose) found: one [`Check`] per topic,
/// in a fixed order, plus the facts behind them.
///
/// ```
/// use portdaddy::{PortDaddy, PortRange, Status};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("ports.sqlite3");
/// drop(PortDaddy::open(&path)?.acquire("api")?);
/// let diagnosis = PortDaddy::diagnose(&path, PortRange::new(21000, 21999)?);
/// assert!(!diagnosis.has_failures(), "{diagnosis}");
/// assert_eq!(diagnosis.journal_mode.as_deref(), Some("wal"));
/// assert_eq!(diagnosis.schema_found, Some(diagnosis.schema_supported));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Diagnosis {
    /// The registry path that was examined.
    pub path: PathBuf,
    /// The findings, one per topic that could be checked.
    pub checks: Vec<Check>,
    /// The schema version found in the file, if it could be read.
    pub schema_found: Option<u32>,
    /// The newest schema version this build of portdaddy understands. A newer one in the
    /// file is fine (newer versions only add to the format); only a registry marked as
    /// needing a newer reader (`min_reader_version`) fails the `schema version` check.
    pub schema_supported: u32,
    /// The journal mode of the file (`wal` for a registry in use), if it could be read.
    pub journal_mode: Option<String>,
}

impl Diagnosis {
    /// Whether any check failed.
    pub fn has_failures(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// The check of `topic`, if it was made.
    pub fn check(&self, topic: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.topic == topic)
    }

    fn push(&mut self, topic: &'static str, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            topic,
            status,
            detail: detail.into(),
        });
    }
}

impl fmt::Display for Diagnosis {
    /// One line per check: `status topic: detail`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(f, "{:<4} {}: {}", check.status, check.topic, check.detail)?;
        }
        Ok(())
    }
}

/// Runs every check on the registry at `path` and the range `range`.
pub(crate) fn diagnose(path: &Path, range: PortRange) -> Diagnosis {
    let mut d = Diagnosis {
        path: path.to_owned(),
        checks: Vec::new(),
        schema_found: None,
        schema_supported: sqlite::schema_supported(),
        journal_mode: None,
    };
    let exists = check_path(&mut d, path);
    if exists {
        check_file(&mut d, path);
    }
    check_range(&mut d, range);
    if exists {
        check_contents(&mut d, path);
    }
    d
}

/// The path itself and its directory; whether a file is there to examine further.
fn check_path(d: &mut Diagnosis, path: &Path) -> bool {
    use Status::{Fail, Ok, Warn};
    let shown = path.display();
    if path.file_name().is_none() || path.is_dir() {
        d.push(
            "registry path",
            Fail,
            format!("{shown} names no file; give the path of a registry file"),
        );
        return false;
    }
    let exists = match std::fs::symlink_metadata(path) {
        Result::Ok(meta) if meta.is_file() => {
            d.push("registry path", Ok, format!("{shown}"));
            true
        }
        Result::Ok(meta) if meta.file_type().is_symlink() && path.is_file() => {
            d.push("registry path", Ok, format!("{shown} (a symbolic link)"));
            true
        }
        Result::Ok(_) => {
            d.push(
                "registry path",
                Fail,
                format!("{shown} is not a regular file; move it away or use another path"),
            );
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            d.push(
                "registry path",
                Warn,
                format!("{shown} does not exist yet; it is created on first use"),
            );
            false
        }
        Err(e) => {
            d.push("registry path", Fail, format!("{shown}: {e}"));
            false
        }
    };
    let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => dir.to_owned(),
        None => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        Result::Ok(meta) if meta.is_dir() => {
            // What an open would refuse: a directory of another user, or one that others
            // may write without the sticky bit.
            let (status, detail) = match crate::paths::check_registry_dir(path, &dir, &meta) {
                Result::Ok(()) => permissions(&dir, &meta, 0o700),
                Err(refusal) => (Fail, refusal.to_string()),
            };
            d.push("directory permissions", status, detail);
        }
        Result::Ok(_) => d.push(
            "directory permissions",
            Fail,
            format!("{} is not a directory", dir.display()),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => d.push(
            "directory permissions",
            Warn,
            format!(
                "{} does not exist yet; it is created (mode 0700) on first use",
                dir.display()
            ),
        ),
        Err(e) => d.push(
            "directory permissions",
            Fail,
            format!("{}: {e}", dir.display()),
        ),
    }
    exists
}

fn check_file(d: &mut Diagnosis, path: &Path) {
    // What an open would refuse (a link, file or directory another user planted or may
    // change, a second hard link, a file mounted on its own), without creating anything.
    let refused = crate::paths::resolve(path)
        .and_then(|real| crate::paths::check_files(path, &real))
        .err();
    if let Some(refusal) = refused {
        d.push("file permissions", Status::Fail, refusal.to_string());
        return;
    }
    match std::fs::metadata(path) {
        Result::Ok(meta) => {
            let (status, detail) = permissions(path, &meta, 0o600);
            d.push("file permissions", status, detail);
        }
        Err(e) => d.push(
            "file permissions",
            Status::Fail,
            format!("{}: {e}", path.display()),
        ),
    }
}

/// Whether this user can read and write `path`, and whether others can too (where the
/// platform has modes).
fn permissions(path: &Path, meta: &std::fs::Metadata, wanted: u32) -> (Status, String) {
    let shown = path.display();
    let Some(mode) = crate::sys::mode(meta) else {
        return if crate::sys::can_read_write(path, meta.is_dir()) {
            (Status::Ok, format!("{shown} is writable"))
        } else {
            (Status::Fail, format!("{shown} is read-only"))
        };
    };
    if !crate::sys::can_read_write(path, meta.is_dir()) {
        return (
            Status::Fail,
            format!("{shown} (mode {mode:04o}) cannot be read and written by this user"),
        );
    }
    if mode & 0o077 != 0 {
        return (
            Status::Warn,
            format!(
                "{shown} has mode {mode:04o}: other users can reach it, and anyone who can \
                 write the registry can free any port in it; portdaddy creates it {wanted:04o}"
            ),
        );
    }
    (Status::Ok, format!("{shown} has mode {mode:04o}"))
}

fn check_range(d: &mut Diagnosis, range: PortRange) {
    let ephemeral = PortRange::ephemeral();
    if range.overlaps(&ephemeral) {
        d.push(
            "port range",
            Status::Warn,
            format!(
                "{range} overlaps the ephemeral range {ephemeral}, from which the kernel takes \
                 ports for outgoing connections at any moment; choose a range outside it"
            ),
        );
    } else {
        d.push(
            "port range",
            Status::Ok,
            format!("{range} lies outside the ephemeral range {ephemeral}"),
        );
    }
}

/// Schema, journal mode, integrity and stale leases, read through a read-only connection.
fn check_contents(d: &mut Diagnosis, path: &Path) {
    use Status::{Fail, Ok, Warn};
    let found = match sqlite::examine(path, DEFAULT_LOCK_TIMEOUT) {
        Result::Ok(found) => found,
        Err(error) => {
            d.push("integrity", Fail, Chain(&error).to_string());
            return;
        }
    };
    let supported = d.schema_supported;
    d.schema_found = Some(found.schema_found);
    d.journal_mode = Some(found.journal_mode.to_lowercase());
    let (status, detail) = match found.schema_found {
        0 => (
            Warn,
            "the registry is empty; it is set up on first use".to_owned(),
        ),
        _ if found.too_new.is_some() => (
            Fail,
            found
                .too_new
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        ),
        v if v == supported => (Ok, format!("{v} (this build understands {supported})")),
        v if v < supported => (
            Warn,
            format!("{v}, older than {supported}; it is upgraded on the next use"),
        ),
        // A newer version only added to it: this one goes on using it (see the README's
        // "Registry format").
        v => (
            Ok,
            format!(
                "{v}, written by a newer portdaddy than this build ({supported}); it only \
                 added to the format, and this version keeps working with it"
            ),
        ),
    };
    d.push("schema version", status, detail);
    let mode = d.journal_mode.clone().unwrap_or_default();
    if mode == "wal" {
        d.push("journal mode", Ok, "wal");
    } else if found.schema_found == 0 {
        d.push(
            "journal mode",
            Warn,
            format!("{mode}; the registry switches to wal on first use"),
        );
    } else {
        d.push(
            "journal mode",
            Warn,
            format!(
                "{mode} instead of wal: is the registry on a network filesystem? Keep it on a \
                 local disk"
            ),
        );
    }
    match found.integrity {
        Result::Ok(()) => d.push("integrity", Ok, "integrity_check passed"),
        Err(problem) => d.push(
            "integrity",
            Fail,
            format!(
                "integrity_check failed: {problem}; move the file away (it is only a cache of \
                 leases) or set PORTDADDY_DB to another path"
            ),
        ),
    }
    match found.leases {
        None => {}
        Some(Err(error)) => d.push("stale leases", Fail, Chain(&error).to_string()),
        Some(Result::Ok(leases)) => {
            let settings = Settings::defaults();
            let me = Owner::current().unwrap_or_else(|_| Owner::new(0, 0, ""));
            // Judged as a claim would judge them, owners of other PID namespaces by their lock
            // files (beside the real file, where every handle keeps them) included; but
            // nothing is removed.
            let owners =
                owners_dir(&crate::paths::resolve(path).unwrap_or_else(|_| path.to_owned()));
            let liveness = Liveness::new(settings.processes.clone(), &me, Some(owners)).read_only();
            let tally = Tally::default();
            let env = Env::new(&settings, &liveness, &me, &tally);
            let stale = leases.iter().filter(|l| !env.state(l).holds_port()).count();
            let dead = leases
                .iter()
                .filter(|l| env.state(l) == LeaseState::Dead)
                .count();
            if stale == 0 {
                d.push(
                    "stale leases",
                    Ok,
                    format!("none among {} leases", leases.len()),
                );
            } else {
                d.push(
                    "stale leases",
                    Warn,
                    format!(
                        "{stale} of {} leases are stale ({dead} with a dead owner, {} expired); \
                         they are reclaimed when needed, or now by `portdaddy reap`",
                        leases.len(),
                        stale - dead
                    ),
                );
            }
        }
    }
}
