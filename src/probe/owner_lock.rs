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
//! Liveness ([`Liveness`]) is then decided like this, on positive evidence only:
//!
//! - an owner with a lock file is alive while the file is locked, whatever its pid, start
//!   time or boot says, and dead once the file is there and free (the file is removed then).
//!   The lock belongs to the open file description, so a process that hands its descriptor
//!   on to a command (`portdaddy run`) keeps its leases alive while the command runs;
//! - an owner whose file is there but cannot be opened or locked (out of descriptors, say)
//!   is alive: the lock may be held, by a command its owner handed it to even when the
//!   owner's pid is gone;
//! - an owner without one, or whose file is missing, is judged by pid
//!   when its pid is meaningful here (same namespace, or none recorded, as in leases written
//!   before namespaces were recorded): cheap and exact;
//! - an owner from another namespace whose lock file is missing is dead (it closed its
//!   handle, or a sweep found the file free); one recorded without a lock file (named with
//!   `Request::owner`) is looked for among the processes of its namespace that this process
//!   can see, and kept unless it is positively gone (see `system::foreign_owner_alive`).
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
pub(crate) use crate::sys::pid_namespace;

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
    /// The file's device and inode, to tell whether the path still names it, where the
    /// platform has them.
    id: Option<(u64, u64)>,
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
            crate::sys::private_file(&mut options);
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
            let id = crate::sys::file_id(&file.metadata()?);
            return Ok(Self {
                path,
                name,
                _file: file,
                id,
                creator: std::process::id(),
            });
        }
    }

    /// The file's name, as recorded with the leases.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether the lock file is still where others look for it: the path names the file
    /// this handle holds (one `stat` and one `fstat`). When it was removed (a temp cleaner,
    /// or the directory removed with the registry) or moved away (the file, or the owners
    /// directory, renamed), others take its owner for dead: the handle must take a new one.
    /// A path that cannot be examined for another reason is no evidence, and keeps the file.
    pub(crate) fn is_in_place(&self) -> bool {
        // One path lookup: while this handle holds the file open its inode cannot be reused,
        // so the path names it exactly when it shows the same device and inode (a file
        // removed, or moved aside, leaves nothing or another file there). Where files have
        // no identity, nothing tells, and the file is kept.
        let Some(id) = self.id else {
            return true;
        };
        match fs::metadata(&self.path) {
            Ok(named) => crate::sys::file_id(&named) == Some(id),
            // Nothing, or no directory, at the path: the file was moved away. Unless the
            // registry's own directory went with it, still linked (the registry was moved
            // away whole): there is no directory beside it to take a new file in, and no
            // one judges its leases by that path. A file deleted with its directory is
            // not in place either way.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                !matches!(crate::lock::is_unlinked(&self._file), Ok(true))
                    && self.registry_dir_moved()
            }
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => false,
            Err(_) => true,
        }
    }

    /// Whether the directory that holds the owners directory is missing from its path:
    /// then the registry was moved away with its directory (it is not deleted, or its
    /// store would have opened a new one, creating the directory, before this is asked).
    fn registry_dir_moved(&self) -> bool {
        let Some(registry_dir) = self.path.parent().and_then(Path::parent) else {
            return false;
        };
        matches!(fs::symlink_metadata(registry_dir), Err(e) if e.kind() == io::ErrorKind::NotFound)
    }

    /// A new descriptor of the locked file description, which shares its lock (and keeps
    /// it while any process has it open), to pass on to a command.
    pub(crate) fn share(&self) -> io::Result<File> {
        self._file.try_clone()
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
    match (fs::metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => match crate::sys::file_id(&open) {
            Some(id) => crate::sys::file_id(&named) == Some(id),
            // Where files have no identity, that the path names something is all there is.
            None => true,
        },
        _ => false,
    }
}

/// Creates `dir` with mode `0700`, or accepts it if it is already a real directory of ours
/// that nobody else may write: never a symbolic link, which could lead the lock files
/// somewhere chosen by someone else.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    crate::sys::private_dir(&mut builder);
    match builder.create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        other => return other,
    }
    let meta = fs::symlink_metadata(dir)?;
    let refuse = |why: &str| Err(crate::lock::refuse(dir, why));
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link");
    }
    if !meta.is_dir() {
        return refuse("it is not a directory");
    }
    if crate::sys::owner(&meta).is_some_and(|owner| Some(owner) != crate::sys::euid()) {
        return refuse("it belongs to another user");
    }
    // Others could plant or remove lock files there: a dead owner made to look alive, or a
    // live one dead.
    if crate::sys::mode(&meta).is_some_and(|mode| mode & 0o022 != 0) {
        return refuse("group or other users can write to it");
    }
    Ok(())
}

/// An exclusive lock without waiting; `WouldBlock` when someone holds it.
///
/// std's lock, which on Linux (and the BSDs and macOS) is `flock(LOCK_EX | LOCK_NB)`, the
/// same lock as the registry's lock file and the one earlier versions took here: it belongs
/// to the open file description, so a descriptor handed to a command shares it. On Windows
/// it is `LockFileEx`: there too a held file is never taken for free by a sweep.
fn try_lock(file: &File) -> io::Result<()> {
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => io::ErrorKind::WouldBlock.into(),
        std::fs::TryLockError::Error(e) => e,
    })
}

/// A lock file name as this module writes it: anything else (a path, `..`) read from a
/// damaged or hostile registry is never opened.
fn is_lock_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 96 && name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// What an owner's lock file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LockState {
    /// Someone holds it: the owner, or a process it handed the descriptor to, runs.
    Held,
    /// It is there and nobody holds it: the owner is gone.
    Free,
    /// It is not there: the owner closed its handle, or a sweep removed its free file.
    Missing,
    /// It cannot be opened or locked (out of descriptors, another user's file): no evidence,
    /// and someone may hold it.
    Unreadable,
    /// The recorded name is none this module writes (a damaged registry): it names no file.
    Invalid,
}

/// What the lock file `name` in `dir` says; a free one is removed when `tidy`.
fn lock_state(dir: &Path, name: &str, tidy: bool) -> LockState {
    if !is_lock_name(name) {
        return LockState::Invalid;
    }
    let path = dir.join(name);
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return LockState::Missing,
        Err(_) => return LockState::Unreadable,
    };
    match try_lock(&file) {
        Ok(()) => {
            // Nobody holds it: its owner is gone. Tidy up while holding it.
            if tidy {
                let _ = fs::remove_file(&path);
            }
            LockState::Free
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => LockState::Held,
        Err(_) => LockState::Unreadable,
    }
}

/// Whether the owner of the lock file `name` in `dir` still runs, for the sweep: anything
/// but a free file counts as alive.
fn lock_holder_alive(dir: &Path, name: &str, tidy: bool) -> bool {
    lock_state(dir, name, tidy) != LockState::Free
}

/// The process probe a registry handle uses: the owners' lock files first, then the
/// configured probe for owners whose pid means something here, and a look at their
/// namespace's processes for the others.
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

impl Liveness {
    /// Judges owners for `me`'s PID namespace: by the lock files in `owners` (a file
    /// registry's owners directory), then by `inner`. The lock files of dead owners are
    /// removed when found.
    pub(crate) fn new(inner: Arc<dyn ProcessProbe>, me: &Owner, owners: Option<PathBuf>) -> Self {
        Self {
            inner,
            namespace: me.pid_namespace(),
            owners,
            tidy: true,
        }
    }

    /// As it is, but leaving the lock files of dead owners in place (to change nothing).
    pub(crate) fn read_only(self) -> Self {
        Self {
            tidy: false,
            ..self
        }
    }
}

impl ProcessProbe for Liveness {
    fn is_alive(&self, owner: &Owner) -> bool {
        let lock = match (owner.lock_name(), &self.owners) {
            (Some(name), Some(dir)) => Some(lock_state(dir, name, self.tidy)),
            _ => None,
        };
        let foreign = matches!(
            (owner.pid_namespace(), self.namespace),
            (Some(theirs), Some(ours)) if theirs != ours
        );
        decide(lock, foreign, || {
            if foreign {
                super::system::foreign_owner_alive(owner, self.namespace)
            } else {
                self.inner.is_alive(owner)
            }
        })
    }
}

/// The liveness rule: the lock file first (held is alive, free is dead); without that
/// evidence, the pid's (`by_pid`: the configured probe in this namespace, a look at the
/// owner's namespace from another); except that across namespaces a missing file means
/// its owner closed its handle. A file that is there but cannot be read cannot tell, and
/// keeps its owner: it may be held by a command its owner handed it to, whatever the pid.
fn decide(lock: Option<LockState>, foreign: bool, by_pid: impl FnOnce() -> bool) -> bool {
    match (lock, foreign) {
        (Some(LockState::Held), _) => true,
        (Some(LockState::Free), _) => false,
        (Some(LockState::Unreadable), _) => true,
        (None, _) | (Some(LockState::Missing | LockState::Invalid), false) => by_pid(),
        (Some(LockState::Missing), true) => false,
        (Some(LockState::Invalid), true) => true,
    }
}

#[cfg(test)]
mod any_platform_tests {
    use super::*;

    /// On every platform: a lock file held through another open file (another process, or
    /// a descriptor handed to a command) is held, and free once that file is closed.
    #[test]
    fn a_lock_held_through_another_open_file_is_held_until_it_is_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let name = "0-1-2-ab";
        let path = tmp.path().join(name);
        let holder = File::create(&path).unwrap();
        try_lock(&holder).unwrap();
        let other = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(
            try_lock(&other).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(lock_state(tmp.path(), name, true), LockState::Held);
        assert!(path.exists(), "a held file is never removed");
        drop(holder);
        assert_eq!(lock_state(tmp.path(), name, true), LockState::Free);
        assert!(!path.exists(), "a free file is removed");
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

    /// The lock is `flock`'s, as the registry's lock file and earlier versions take it: an
    /// `flock` through another open file description excludes it, both ways (a POSIX or an
    /// OFD lock would not conflict with it).
    #[test]
    fn the_owner_lock_is_an_flock() {
        use rustix::fs::{flock, FlockOperation};
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let ours = File::create(&path).unwrap();
        let theirs = File::open(&path).unwrap();
        flock(&theirs, FlockOperation::NonBlockingLockExclusive).unwrap();
        assert_eq!(
            try_lock(&ours).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        flock(&theirs, FlockOperation::Unlock).unwrap();
        try_lock(&ours).unwrap();
        assert!(flock(&theirs, FlockOperation::NonBlockingLockExclusive).is_err());
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
    fn an_owners_directory_others_may_write_is_refused_and_left_as_it_was() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r.owners");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        let err = OwnerLock::take(&dir, &owner(2, None)).unwrap_err();
        assert!(err.to_string().contains("can write to it"), "{err}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o770);
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
    fn the_lock_file_decides_first_and_a_missing_one_falls_back_as_documented() {
        use LockState::*;
        let never = || panic!("the pid must not be asked");
        for foreign in [false, true] {
            assert!(decide(Some(Held), foreign, never));
            assert!(!decide(Some(Free), foreign, never));
            assert!(decide(None, foreign, || true));
            assert!(!decide(None, foreign, || false));
        }
        // In this namespace, a missing file or a strange name leaves it to the pid.
        assert!(decide(Some(Missing), false, || true));
        assert!(!decide(Some(Missing), false, || false));
        assert!(!decide(Some(Invalid), false, || false));
        // A file that cannot be read may be held by whoever the owner handed it to, even
        // when the owner's own pid is gone.
        assert!(decide(Some(Unreadable), false, never));
        // Across namespaces the pid means nothing: missing is a closed handle, a strange
        // name cannot tell.
        assert!(!decide(Some(Missing), true, never));
        assert!(decide(Some(Unreadable), true, never));
        assert!(decide(Some(Invalid), true, never));
    }

    #[test]
    fn a_held_lock_keeps_an_owner_of_this_namespace_that_its_pid_calls_dead() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r.owners");
        let holder = OwnerLock::take(&dir, &owner(1, None)).unwrap();
        let probe = Liveness {
            inner: Arc::new(|_: &Owner| false),
            ..liveness(&dir)
        };
        let held = owner(1, Some(holder.name().to_owned()));
        assert!(
            probe.is_alive(&held),
            "a held lock is alive, whatever the pid says"
        );
        drop(holder);
        assert!(!probe.is_alive(&held));
        // A free file is dead even when the pid looks alive.
        fs::write(dir.join("1-5-5-ab"), b"").unwrap();
        let alive_by_pid = Liveness {
            inner: Arc::new(|_: &Owner| true),
            ..liveness(&dir)
        };
        assert!(!alive_by_pid.is_alive(&owner(1, Some("1-5-5-ab".into()))));
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
