//! Owner identity across PID namespaces: a lock file per process, and the liveness check
//! that uses it.
//!
//! A pid is meaningful only in its PID namespace; a container's pid 1 is not the host's, and
//! the host's pids do not exist in the container. So every handle on a file registry takes,
//! once when it opens, an exclusive `flock` on a file of its own in `<registry>.owners/`
//! (named after its namespace, pid, start time and a random tag) and records the file's name
//! with the leases it writes. The kernel drops the lock when the process dies, however it
//! dies, and every process that sees the registry file sees that directory too.
//!
//! Liveness ([`Liveness`]) is then decided like this:
//!
//! - an owner whose pid is meaningful here (same namespace, or none recorded, as in leases
//!   written before namespaces were recorded) is asked about as before, by pid: cheap and
//!   exact;
//! - an owner from another namespace that holds a lock file is alive while the file is
//!   locked; an unlocked or missing file means it is dead (the file is removed then);
//! - an owner from another namespace without a lock file (named with `Request::owner`) is
//!   taken for alive: it is judged from its own namespace, by pid.
//!
//! A handle removes its file when it closes (its leases are released by then, since every
//! guard keeps its handle open). Files of crashed processes are removed by the first process
//! that finds them unlocked: a check of their owner, or the sweep that every new handle makes
//! of the directory before it adds its own file. A file that a sweep finds in the instant
//! between its creation and its locking is noticed by its creator (the sweep holds the lock,
//! or has removed the file), which starts over with a new one.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ProcessProbe;
use crate::lease::Owner;

/// The PID namespace of the calling process, where the system has such a thing.
#[cfg(target_os = "linux")]
pub(crate) fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn pid_namespace() -> Option<u64> {
    None
}

/// The directory of owner lock files beside the registry at `registry`.
pub(crate) fn owners_dir(registry: &Path) -> PathBuf {
    let mut name = registry.as_os_str().to_owned();
    name.push(".owners");
    PathBuf::from(name)
}

/// The lock file this process holds while a handle on the registry is open.
#[derive(Debug)]
pub(crate) struct OwnerLock {
    path: PathBuf,
    name: String,
    /// Held (locked) for as long as the handle lives.
    _file: File,
    /// The process that took it: a forked child must not remove its parent's file.
    creator: u32,
}

impl OwnerLock {
    /// Removes the files of owners that died without closing their handles, then creates and
    /// locks a new lock file for `owner` in `dir` (created `0700` if missing).
    pub(crate) fn take(dir: &Path, owner: &Owner) -> io::Result<Self> {
        create_private_dir(dir)?;
        sweep(dir);
        loop {
            let tag = crate::lease::new_lease_id();
            let name = format!(
                "{}-{}-{}-{tag:x}",
                owner.pid_namespace().unwrap_or(0),
                owner.pid(),
                owner.start_time()
            );
            let path = dir.join(&name);
            let mut options = OpenOptions::new();
            options.read(true).write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file = options.open(&path)?;
            match try_lock(&file) {
                Ok(()) => {}
                // Another process's sweep holds it for a moment, and removes it: start again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    let _ = fs::remove_file(&path);
                    return Err(e);
                }
            }
            // Another process's sweep may have found the file before it was locked, and
            // removed it: then this lock guards nothing that others can see. Start again.
            if !still_linked(&path, &file) {
                continue;
            }
            return Ok(Self {
                path,
                name,
                _file: file,
                creator: std::process::id(),
            });
        }
    }

    /// The file's name, as recorded with the leases.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether the lock file is still where others look for it (one `fstat`: a removed file
    /// has no links left). When it was removed (a temp cleaner, or the directory removed with
    /// the registry), others take its owner for dead: the handle must take a new one.
    pub(crate) fn is_in_place(&self) -> bool {
        !matches!(crate::lock::is_unlinked(&self._file), Ok(true))
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        if std::process::id() != self.creator {
            return;
        }
        // Removed while still locked, so that nobody takes a half-removed file for dead.
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "could not remove the owner lock file");
            }
        }
    }
}

/// Removes every lock file in `dir` that nobody holds.
fn sweep(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if let Some(name) = entry.file_name().to_str().filter(|n| is_lock_name(n)) {
            lock_holder_alive(dir, name, true);
        }
    }
}

/// Whether `path` still names the file that `file` has open.
fn still_linked(path: &Path, file: &File) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (fs::metadata(path), file.metadata()) {
            (Ok(named), Ok(open)) => named.dev() == open.dev() && named.ino() == open.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        path.exists()
    }
}

/// Creates `dir` with mode `0700`, or accepts it if it is already a real directory of ours:
/// never a symbolic link, which could lead the lock files somewhere chosen by someone else.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        other => return other,
    }
    let meta = fs::symlink_metadata(dir)?;
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing {}: {why}; remove it", dir.display()),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link");
    }
    if !meta.is_dir() {
        return refuse("it is not a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if meta.uid() != unsafe { libc::geteuid() } {
            return refuse("it belongs to another user");
        }
    }
    Ok(())
}

/// An exclusive lock without waiting.
fn try_lock(file: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor that `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(())
    }
}

/// A lock file name as this module writes it: anything else (a path, `..`) read from a
/// damaged or hostile registry is never opened.
fn is_lock_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 96 && name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Whether the owner of the lock file `name` in `dir` still runs.
fn lock_holder_alive(dir: &Path, name: &str, tidy: bool) -> bool {
    if !is_lock_name(name) {
        return true;
    }
    let path = dir.join(name);
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        Err(_) => return true,
    };
    match try_lock(&file) {
        Ok(()) => {
            // Nobody holds it: its owner is gone. Tidy up while holding it.
            if tidy {
                let _ = fs::remove_file(&path);
            }
            false
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
        Err(_) => true,
    }
}

/// The process probe a registry handle uses: the configured probe for owners whose pid means
/// something here, the owners' lock files for the others.
pub(crate) struct Liveness {
    pub(crate) inner: Arc<dyn ProcessProbe>,
    /// This process's PID namespace.
    pub(crate) namespace: Option<u64>,
    /// Where the owner lock files are, for a file registry.
    pub(crate) owners: Option<PathBuf>,
    /// Whether the lock files of dead owners are removed when found (not while diagnosing,
    /// which changes nothing).
    pub(crate) tidy: bool,
}

impl ProcessProbe for Liveness {
    fn is_alive(&self, owner: &Owner) -> bool {
        let foreign = matches!(
            (owner.pid_namespace(), self.namespace),
            (Some(theirs), Some(ours)) if theirs != ours
        );
        if !foreign {
            let alive = self.inner.is_alive(owner);
            if let (false, Some(name), Some(dir)) = (alive, owner.lock_name(), &self.owners) {
                // Dead by pid: its lock file, if still there, is unlocked; tidy it away.
                lock_holder_alive(dir, name, self.tidy);
            }
            return alive;
        }
        if let Ok(me) = super::system::current_owner() {
            if owner.boot_id() != me.boot_id() {
                return false;
            }
        }
        match (owner.lock_name(), &self.owners) {
            (Some(name), Some(dir)) => lock_holder_alive(dir, name, self.tidy),
            // Judged by pid from its own namespace.
            _ => true,
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn owner(namespace: u64, lock: Option<String>) -> Owner {
        let me = super::super::system::current_owner().unwrap();
        Owner::new(4_000_000, 1, me.boot_id())
            .in_namespace(Some(namespace))
            .with_lock(lock)
    }

    fn liveness(dir: &Path) -> Liveness {
        Liveness {
            inner: Arc::new(|_: &Owner| panic!("the pid probe must not be asked")),
            namespace: Some(1),
            owners: Some(dir.to_owned()),
            tidy: true,
        }
    }

    #[test]
    fn a_held_lock_is_alive_and_a_released_one_dead_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r.owners");
        let holder = OwnerLock::take(&dir, &owner(2, None)).unwrap();
        let name = holder.name().to_owned();
        let probe = liveness(&dir);
        assert!(probe.is_alive(&owner(2, Some(name.clone()))));
        // A lock taken by another open file description, as another process would.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(&name))
            .unwrap();
        assert_eq!(
            try_lock(&file).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(holder);
        assert!(
            !dir.join(&name).exists(),
            "a closed handle removes its file"
        );
        assert!(!probe.is_alive(&owner(2, Some(name))));
    }

    #[test]
    fn a_new_handle_sweeps_away_unlocked_files_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r.owners");
        let live = OwnerLock::take(&dir, &owner(2, None)).unwrap();
        fs::write(dir.join("2-9-9-dead"), b"").unwrap();
        let other = OwnerLock::take(&dir, &owner(2, None)).unwrap();
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected = vec![live.name().to_owned(), other.name().to_owned()];
        expected.sort();
        assert_eq!(left, expected);
    }

    #[test]
    fn a_symlink_or_a_file_in_place_of_the_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let link = tmp.path().join("r.owners");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let err = OwnerLock::take(&link, &owner(2, None)).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
        let file = tmp.path().join("f.owners");
        fs::write(&file, b"").unwrap();
        let err = OwnerLock::take(&file, &owner(2, None)).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn an_unlocked_file_is_dead_and_tidied_away() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r.owners");
        create_private_dir(&dir).unwrap();
        fs::write(dir.join("7-1-1-ab"), b"").unwrap();
        assert!(!liveness(&dir).is_alive(&owner(7, Some("7-1-1-ab".into()))));
        assert!(!dir.join("7-1-1-ab").exists());
    }

    #[test]
    fn a_foreign_owner_without_a_lock_or_with_a_strange_name_counts_as_alive() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r.owners");
        let probe = liveness(&dir);
        assert!(probe.is_alive(&owner(2, None)));
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        assert!(probe.is_alive(&owner(2, Some("../victim".into()))));
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn an_owner_of_another_boot_is_dead_without_asking() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = liveness(tmp.path());
        let stale = Owner::new(1, 1, "an-earlier-boot").in_namespace(Some(2));
        assert!(!probe.is_alive(&stale));
    }

    #[test]
    fn owners_of_this_namespace_or_none_go_to_the_configured_probe() {
        let probe = Liveness {
            inner: Arc::new(|o: &Owner| o.pid() == 10),
            namespace: Some(1),
            owners: None,
            tidy: true,
        };
        assert!(probe.is_alive(&Owner::new(10, 1, "b").in_namespace(Some(1))));
        assert!(!probe.is_alive(&Owner::new(11, 1, "b").in_namespace(Some(1))));
        assert!(probe.is_alive(&Owner::new(10, 1, "b")));
    }
}
