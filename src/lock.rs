//! The registry's write lock: an exclusive `flock` on a file beside the registry, with a
//! bounded wait that does not starve anyone.
//!
//! Every write transaction runs under this lock, so SQLite's own busy handler (which sleeps
//! 1, 2, 5, 10, … ms between retries and lets a busy writer starve the others) never has to
//! wait for a writer. The first attempt is a non-blocking `flock`. When it fails, a helper
//! thread that owns a second open file description blocks in the kernel's `flock` queue, so
//! the lock is taken the moment it is free, and the caller waits on a channel with the
//! timeout. If the timeout passes first, the helper drops the lock as soon as it gets it.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use fd_lock::{RwLock, RwLockWriteGuard};

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
    fast: RwLock<File>,
    waiter: Option<Waiter>,
    generation: u64,
}

/// A helper thread that blocks in `flock` on its own file description.
struct Waiter {
    requests: Sender<Message>,
    granted: Receiver<u64>,
    thread: std::thread::JoinHandle<()>,
}

pub(crate) enum Message {
    Lock(u64),
    Unlock(u64),
}

/// Proof that the lock is held; unlocks on drop.
pub(crate) enum Held<'a> {
    Fast(#[allow(dead_code)] RwLockWriteGuard<'a, File>),
    Waiter(&'a Sender<Message>, u64),
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Held::Waiter(requests, generation) = self {
            // If the helper is gone its lock went with it.
            let _ = requests.send(Message::Unlock(*generation));
        }
    }
}

impl FileLock {
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            fast: RwLock::new(open_lock_file(path)?),
            waiter: None,
            generation: 0,
        })
    }

    /// Takes the lock, waiting until `deadline` at most; `Ok(None)` when it passed.
    pub(crate) fn lock(&mut self, deadline: Deadline) -> io::Result<Option<Held<'_>>> {
        // Disjoint field borrows let the fast path return its guard while the slow path
        // uses the other fields.
        let Self {
            path,
            fast,
            waiter,
            generation,
        } = self;
        match fast.try_write() {
            Ok(guard) => Ok(Some(Held::Fast(guard))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(path, waiter, generation, deadline)
            }
            Err(e) => Err(e),
        }
    }
}

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
            Ok(g) if g == generation => return Ok(Some(Held::Waiter(&waiter.requests, g))),
            Ok(_stale) => continue,
            Err(RecvTimeoutError::Timeout) => {
                let _ = waiter.requests.send(Message::Unlock(generation));
                return Ok(None);
            }
            // The helper ended (its flock failed); the next call starts a new one.
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
        let mut lock = RwLock::new(open_lock_file(path)?);
        let (requests, inbox) = mpsc::channel::<Message>();
        let (grant, granted) = mpsc::channel::<u64>();
        let thread = std::thread::Builder::new().name("portdaddy-lock".into()).spawn(move || {
            // Ends when the owning FileLock is dropped.
            while let Ok(message) = inbox.recv() {
                let Message::Lock(generation) = message else { continue };
                let guard = match lock.write() {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::warn!(error = %e, "blocking flock on the registry lock failed");
                        break;
                    }
                };
                if grant.send(generation).is_err() {
                    break;
                }
                // Hold until this generation is unlocked (by its holder or by its timeout).
                while let Ok(message) = inbox.recv() {
                    if matches!(message, Message::Unlock(g) if g == generation) {
                        break;
                    }
                }
                drop(guard);
            }
        })?;
        Ok(Self {
            requests,
            granted,
            thread,
        })
    }
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
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

    #[test]
    fn an_unrepresentable_timeout_means_no_limit() {
        let deadline = Deadline::after(Duration::MAX);
        assert_eq!(deadline.remaining(), None);
        let dir = tempfile::tempdir().unwrap();
        let mut a = FileLock::open(&dir.path().join("r.lock")).unwrap();
        assert!(a.lock(deadline).unwrap().is_some());
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
