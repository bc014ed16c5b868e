//! The registry's write lock: an exclusive file lock (`flock` on Unix) on a file beside the
//! registry, with a bounded wait that does not starve anyone.
//!
//! Every write transaction runs under this lock, so SQLite's own busy handler (which sleeps
//! 1, 2, 5, 10, … ms between retries and lets a busy writer starve the others) never has to
//! wait for a writer. The first attempt is a non-blocking lock. When it fails, a helper
//! thread that owns a second open file description blocks in the kernel's lock queue, so the
//! lock is taken the moment it is free, and the caller waits on a channel with the timeout.
//!
//! Whoever holds the lock unlocks it on its own thread when the transaction ends (a lock
//! belongs to the open file description, not to the thread that took it), so the lock is
//! free again before the call returns and the next call takes the non-blocking path. If the
//! timeout passes first, the caller tells the helper, which drops the lock as soon as it gets
//! it.
//!
//! The lock file may be deleted or replaced while a process has it open (a temp cleaner,
//! or someone removing the registry's directory): a process that locked the old inode and
//! one that locked the new file would then both believe they hold the lock. So after taking
//! the lock, [`FileLock::lock`] checks that the file it locked is still linked (one `fstat`
//! of the locked descriptor: a deleted or replaced file has no links left); if not, it opens
//! the file the path names now (creating it) and locks again.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When a call gives up waiting: fixed when the call starts, so every wait inside it (for
/// the handle, the file lock, SQLite) shares one bound.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    start: Instant,
    /// `None` when the timeout is too large to represent: wait for ever.
    end: Option<Instant>,
}

impl Deadline {
    pub(crate) fn after(timeout: Duration) -> Self {
        let start = Instant::now();
        Self {
            start,
            end: start.checked_add(timeout),
        }
    }

    /// Time left, or `None` for no limit.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.end
            .map(|end| end.saturating_duration_since(Instant::now()))
    }

    /// How long the call has waited so far.
    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// The lock file beside one registry, as used by one process.
pub(crate) struct FileLock {
    path: PathBuf,
    fast: File,
    waiter: Option<Waiter>,
    generation: u64,
}

/// Which file description a lock was taken on.
enum Taken {
    /// On `fast`.
    Fast,
    /// On the helper's file.
    Waiter,
}

/// A helper thread that blocks in the lock queue on its own file description.
struct Waiter {
    file: Arc<File>,
    requests: Sender<Message>,
    granted: Receiver<u64>,
    thread: std::thread::JoinHandle<()>,
}

/// What the owner of a [`Waiter`] asks of it. Messages are handled in order, so an
/// `Abandon(g)` always comes after the `Lock(g)` it refers to has been granted.
enum Message {
    /// Take the lock for generation `g` and report it on the `granted` channel.
    Lock(u64),
    /// The caller stopped waiting for the last generation it asked for: drop the lock taken
    /// for it.
    Abandon,
}

/// Proof that the lock is held; unlocks on drop.
pub(crate) struct Held<'a> {
    file: &'a File,
}

impl Held<'_> {
    /// The lock file, as locked: what is written in it is read and written under the lock.
    pub(crate) fn file(&self) -> &File {
        self.file
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.file.unlock() {
            // Closing the file releases it at the latest.
            tracing::warn!(%error, "could not unlock the registry lock file");
        }
    }
}

impl FileLock {
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            fast: open_lock_file(path)?,
            waiter: None,
            generation: 0,
        })
    }

    /// Takes the lock, waiting until `deadline` at most; `Ok(None)` when it passed.
    ///
    /// The lock is always taken on the file that the path names once it is held: if the
    /// file was deleted or replaced since it was opened, it is opened again (and created if
    /// missing) and locked again.
    pub(crate) fn lock(&mut self, deadline: Deadline) -> io::Result<Option<Held<'_>>> {
        loop {
            let Some(taken) = self.take(deadline)? else {
                return Ok(None);
            };
            let unlinked = is_unlinked(self.file_of(&taken));
            if matches!(unlinked, Ok(false)) {
                return Ok(Some(Held {
                    file: self.file_of(&taken),
                }));
            }
            // Locked a file that the path no longer names (or that cannot be checked): let
            // it go, and lock the one the path names now.
            drop(Held {
                file: self.file_of(&taken),
            });
            unlinked?;
            tracing::warn!(path = %self.path.display(),
                "the registry lock file was deleted or replaced; locking the file now there");
            self.fast = open_lock_file(&self.path)?;
            // The helper's file is the old one too; the next slow wait starts a new helper.
            self.waiter = None;
        }
    }

    /// The file description that `taken` took the lock on.
    fn file_of(&self, taken: &Taken) -> &File {
        match taken {
            Taken::Fast => &self.fast,
            Taken::Waiter => &self.waiter.as_ref().expect("a waiter took it").file,
        }
    }

    /// Takes the lock on whichever file description gets it, waiting until `deadline` at
    /// most.
    fn take(&mut self, deadline: Deadline) -> io::Result<Option<Taken>> {
        match self.fast.try_lock() {
            Ok(()) => Ok(Some(Taken::Fast)),
            Err(TryLockError::WouldBlock) if deadline.remaining().is_none() => {
                // No limit: wait in the kernel's queue on this thread.
                lock_blocking(&self.fast)?;
                Ok(Some(Taken::Fast))
            }
            Err(TryLockError::WouldBlock) => {
                let held = wait(&self.path, &mut self.waiter, &mut self.generation, deadline)?;
                // The lock stays taken: `lock` makes a new `Held` for it, or unlocks it.
                Ok(held.map(|held| {
                    std::mem::forget(held);
                    Taken::Waiter
                }))
            }
            Err(TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Whether the file `file` has open was deleted (it has no links left): it was removed, its
/// directory was, or another file was renamed over it. One `fstat`, without a path lookup.
/// A file renamed or moved elsewhere is still linked, and so goes unnoticed.
pub(crate) use crate::sys::is_unlinked;

/// Tells whether the file at a path, opened by someone else (SQLite), was deleted since,
/// without taking part in the file's locks (see [`crate::sys::Anchor`]).
pub(crate) use crate::sys::Anchor;

/// The slow path: let the helper thread queue in the kernel while this thread waits with a
/// timeout.
fn wait<'a>(
    path: &Path,
    slot: &'a mut Option<Waiter>,
    generation: &mut u64,
    deadline: Deadline,
) -> io::Result<Option<Held<'a>>> {
    if slot.as_ref().is_none_or(|w| w.thread.is_finished()) {
        *slot = Some(Waiter::spawn(path)?);
    }
    let waiter = slot.as_ref().expect("waiter was just set");
    *generation += 1;
    let generation = *generation;
    let gone = || io::Error::other("the lock helper thread stopped");
    waiter
        .requests
        .send(Message::Lock(generation))
        .map_err(|_| gone())?;
    loop {
        let received = match deadline.remaining() {
            Some(left) => waiter.granted.recv_timeout(left),
            None => waiter
                .granted
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(g) if g == generation => return Ok(Some(Held { file: &waiter.file })),
            // A grant for an earlier call that gave up; the helper has dropped or will
            // drop that lock.
            Ok(_stale) => continue,
            Err(RecvTimeoutError::Timeout) => {
                let _ = waiter.requests.send(Message::Abandon);
                return Ok(None);
            }
            // The helper ended (its lock call failed); the next call starts a new one.
            Err(RecvTimeoutError::Disconnected) => return Err(gone()),
        }
    }
}

impl std::fmt::Debug for FileLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLock")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Waiter {
    fn spawn(path: &Path) -> io::Result<Self> {
        let file = Arc::new(open_lock_file(path)?);
        let (requests, inbox) = mpsc::channel::<Message>();
        let (grant, granted) = mpsc::channel::<u64>();
        let mine = Arc::clone(&file);
        let thread = std::thread::Builder::new()
            .name("portdaddy-lock".into())
            .spawn(move || {
                // Ends when the owning FileLock is dropped; closing the file then releases
                // any lock still held.
                while let Ok(message) = inbox.recv() {
                    match message {
                        Message::Lock(generation) => {
                            if let Err(error) = lock_blocking(&mine) {
                                tracing::warn!(%error, "blocking lock on the registry lock file failed");
                                break;
                            }
                            // The caller unlocks through its own reference to the file.
                            if grant.send(generation).is_err() {
                                break;
                            }
                        }
                        Message::Abandon => {
                            if let Err(error) = mine.unlock() {
                                tracing::warn!(%error, "could not drop an abandoned registry lock");
                                break;
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            file,
            requests,
            granted,
            thread,
        })
    }
}

/// Waits in the kernel's queue until the lock is taken. A signal whose handler was installed
/// without `SA_RESTART` interrupts the wait (`EINTR`); that ends nothing, so wait again.
fn lock_blocking(file: &File) -> io::Result<()> {
    loop {
        match file.lock() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// A lock file that is not ours alone: the error inside the `io::Error` that
/// [`FileLock::open`] returns then.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The lock file.
    pub(crate) file: PathBuf,
    /// Why it cannot be used.
    pub(crate) reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refusing {}: {}", self.file.display(), self.reason)
    }
}

impl std::error::Error for Refusal {}

/// Opens (creating it `0600` if missing) the lock file, never through a symbolic link, and
/// only if it is a regular file of ours that nobody else may write: another user's file
/// there could be held locked by them for ever, or replaced.
fn open_lock_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    crate::sys::private_file(&mut options);
    crate::sys::open_flags(&mut options, true, false);
    let file = match options.open(path) {
        Ok(file) => file,
        Err(e) if crate::sys::is_link_refused(&e) => {
            return Err(refuse(
                path,
                "it is a symbolic link, which is never followed there",
            ));
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(refuse(path, "it is not a regular file"));
    }
    if let Some(owner) = crate::sys::owner(&meta).filter(|&o| Some(o) != crate::sys::euid()) {
        return Err(refuse(
            path,
            &format!("it belongs to another user (uid {owner})"),
        ));
    }
    if let Some(mode) = crate::sys::mode(&meta).filter(|m| m & 0o022 != 0) {
        return Err(refuse(
            path,
            &format!("group or other users can write to it (mode {mode:04o})"),
        ));
    }
    Ok(file)
}

/// An `io::Error` carrying a [`Refusal`] of the file at `path`, so that whoever maps it
/// into an [`Error`](crate::Error) can name it as [`Error::Refused`](crate::Error::Refused).
pub(crate) fn refuse(path: &Path, reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        Refusal {
            file: path.to_owned(),
            reason: reason.to_owned(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_handle_times_out_then_gets_the_lock_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        let mut a = FileLock::open(&path).unwrap();
        let mut b = FileLock::open(&path).unwrap();
        let held = a
            .lock(Deadline::after(Duration::from_secs(1)))
            .unwrap()
            .expect("free lock");
        assert!(b
            .lock(Deadline::after(Duration::from_millis(50)))
            .unwrap()
            .is_none());
        drop(held);
        let held_b = b.lock(Deadline::after(Duration::from_secs(5))).unwrap();
        assert!(held_b.is_some(), "released lock must be granted");
        drop(held_b);
        assert!(a
            .lock(Deadline::after(Duration::from_secs(5)))
            .unwrap()
            .is_some());
    }

    #[cfg(unix)]
    #[test]
    fn a_lock_file_that_is_a_link_or_others_may_write_is_refused_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let link = dir.path().join("link.lock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = FileLock::open(&link).unwrap_err();
        let refusal = err.get_ref().and_then(|e| e.downcast_ref::<Refusal>());
        assert!(refusal.is_some_and(|r| r.file == link), "{err:?}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!target.exists(), "the link's target was created");

        let open = dir.path().join("open.lock");
        std::fs::write(&open, b"").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = FileLock::open(&open).unwrap_err();
        assert!(err.to_string().contains("can write to it"), "{err}");
        let mode = std::fs::metadata(&open).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666, "the mode was changed");
    }

    #[test]
    fn an_unrepresentable_timeout_means_no_limit() {
        let deadline = Deadline::after(Duration::MAX);
        assert_eq!(deadline.remaining(), None);
        let dir = tempfile::tempdir().unwrap();
        let mut a = FileLock::open(&dir.path().join("r.lock")).unwrap();
        assert!(a.lock(deadline).unwrap().is_some());
    }

    /// Whether some open file description waits in the kernel's queue for the lock on the
    /// file with inode `ino` (`/proc/locks` lists waiters with a `->` mark).
    #[cfg(target_os = "linux")]
    fn someone_waits_for(ino: u64) -> bool {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        let id = format!(":{ino} ");
        locks
            .lines()
            .any(|line| line.contains("->") && line.contains(&id))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_lock_won_by_waiting_is_free_again_when_its_holder_drops_it() {
        use std::os::unix::fs::MetadataExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        let mut a = FileLock::open(&path).unwrap();
        let mut b = FileLock::open(&path).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        // The hand-over is a race when the unlock happens late, so repeat it.
        for _ in 0..50 {
            let held = a.lock(Deadline::after(Duration::from_secs(5))).unwrap();
            std::thread::scope(|s| {
                let waiting = s.spawn(|| {
                    let held_b = b.lock(Deadline::after(Duration::from_secs(30))).unwrap();
                    assert!(held_b.is_some());
                });
                // Release only once b's helper is queued, so b surely wins by waiting.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !someone_waits_for(ino) {
                    assert!(Instant::now() < deadline, "b never queued for the lock");
                    std::thread::yield_now();
                }
                drop(held);
                waiting.join().unwrap();
            });
            // b has dropped its lock: a zero timeout must find it free at once, with
            // nothing left to unlock it later.
            assert!(
                a.lock(Deadline::after(Duration::ZERO)).unwrap().is_some(),
                "the lock was still held after its holder returned"
            );
        }
    }

    #[test]
    fn a_wait_that_timed_out_leaves_the_lock_free_for_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        let mut a = FileLock::open(&path).unwrap();
        let mut b = FileLock::open(&path).unwrap();
        let mut c = FileLock::open(&path).unwrap();
        let held = a.lock(Deadline::after(Duration::from_secs(5))).unwrap();
        // b's helper queues for the lock, then b gives up.
        assert!(b
            .lock(Deadline::after(Duration::from_millis(20)))
            .unwrap()
            .is_none());
        drop(held);
        // b's helper may take the lock first, but must drop it again at once.
        assert!(c
            .lock(Deadline::after(Duration::from_secs(30)))
            .unwrap()
            .is_some());
    }

    #[cfg(unix)]
    #[test]
    fn two_handles_exclude_each_other_after_the_lock_file_is_deleted_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        let mut locks = [
            FileLock::open(&path).unwrap(),
            FileLock::open(&path).unwrap(),
        ];
        let short = || Deadline::after(Duration::from_millis(50));
        let long = || Deadline::after(Duration::from_secs(30));
        // Deleted, then replaced by another file; each time the one who locks first must
        // keep the other out, whichever of them notices the change.
        let changes: [fn(&Path); 2] = [
            |p| std::fs::remove_file(p).unwrap(),
            |p| {
                std::fs::remove_file(p).unwrap();
                std::fs::write(p, b"").unwrap();
            },
        ];
        for change in changes {
            for order in [[0, 1], [1, 0]] {
                let [first, second] = locks.get_disjoint_mut(order).unwrap();
                use std::os::unix::fs::MetadataExt;
                let inode = || std::fs::metadata(&path).map(|m| m.ino()).ok();
                let before = inode();
                change(&path);
                let held = first.lock(long()).unwrap().expect("a free lock");
                let now = inode();
                assert!(now.is_some() && now != before, "the path names a new file");
                assert!(
                    second.lock(short()).unwrap().is_none(),
                    "two handles held the lock at once after the lock file changed"
                );
                drop(held);
                let held = second.lock(long()).unwrap();
                assert!(held.is_some(), "the released lock must be granted");
                drop(held);
            }
        }
    }

    #[test]
    fn a_blocked_waiter_is_granted_when_the_holder_releases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        let mut a = FileLock::open(&path).unwrap();
        let held = a
            .lock(Deadline::after(Duration::from_secs(1)))
            .unwrap()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        let t = std::thread::spawn(move || {
            let mut b = FileLock::open(&p).unwrap();
            tx.send(()).unwrap();
            let granted = b
                .lock(Deadline::after(Duration::from_secs(30)))
                .unwrap()
                .is_some();
            granted
        });
        rx.recv().unwrap();
        drop(held);
        assert!(t.join().unwrap());
    }
}
