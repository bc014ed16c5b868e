//! Which process holds the file registries that are open now, so that a child made by
//! `fork` (without `exec`) can tell that it inherited them.
//!
//! SQLite's unix VFS keeps the lock state of each database file in process memory, shared by
//! every connection of the process to that file, and relies on `fcntl` locks that a child
//! does not inherit. A child of a process with an open connection inherits that memory as it
//! was at the fork: possibly mid-transaction, with a lock recorded as held that the child
//! does not hold, or with one of SQLite's mutexes locked by a thread the child does not
//! have. A connection the child opens to the same file shares that state and may wait for a
//! lock nobody will release (holding the registry's file lock meanwhile, so the parent
//! waits too), or take one it should not get. SQLite documents that connections must not
//! cross a fork. The only safe answer in such a child is to refuse at once.
//!
//! The state is one atomic word: the pid of the process that opened the registries, and how
//! many are open (or being opened). A child sees another pid in it (or, on Unix, was marked
//! by a `pthread_atfork` handler, which also covers a pid later reused by a descendant).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The opener's pid in the high 32 bits, the number of open registries in the low 32.
static OPEN: AtomicU64 = AtomicU64::new(0);
/// Set in a child created by `fork` while registries were open.
static INHERITED: AtomicBool = AtomicBool::new(false);

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

fn pack(pid: u32, count: u32) -> u64 {
    (u64::from(pid) << 32) | u64::from(count)
}

/// A file registry that is open (or being opened) in this process; counted until dropped.
#[derive(Debug)]
pub(crate) struct Opened {
    pid: u32,
}

/// Counts a file registry about to be opened.
///
/// # Errors
///
/// [`Error::ForkedHandle`] in a child made by `fork` from a process that had file registries
/// open: no SQLite connection can be used safely there.
pub(crate) fn opening() -> Result<Opened> {
    let me = std::process::id();
    watch_forks();
    let mut word = OPEN.load(Ordering::SeqCst);
    loop {
        let (pid, count) = unpack(word);
        if count > 0 && (pid != me || INHERITED.load(Ordering::SeqCst)) {
            return Err(Error::ForkedHandle {
                parent: pid,
                child: me,
            });
        }
        let next = pack(me, count.saturating_add(1));
        match OPEN.compare_exchange(word, next, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return Ok(Opened { pid: me }),
            Err(now) => word = now,
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        // In a forked child the count belongs to the parent: leave it. Where forks are
        // watched, the fork handler says whether this is such a child, without asking for
        // the pid again.
        if !crate::sys::WATCHES_FORKS && std::process::id() != self.pid {
            return;
        }
        if INHERITED.load(Ordering::SeqCst) {
            return;
        }
        let _ = OPEN.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |word| {
            let (pid, count) = unpack(word);
            (pid == self.pid && count > 0).then(|| pack(pid, count - 1))
        });
    }
}

/// Marks a child made by `fork` while registries were open, whatever its pid.
fn watch_forks() {
    extern "C" fn in_child() {
        // Only atomics: this runs in the child right after fork, where little is safe.
        if unpack(OPEN.load(Ordering::SeqCst)).1 > 0 {
            INHERITED.store(true, Ordering::SeqCst);
        }
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // `in_child` only touches atomics, as the handler must.
        if crate::sys::WATCHES_FORKS && !crate::sys::on_fork_child(in_child) {
            // The pid comparison still tells a child from its parent.
            tracing::debug!("pthread_atfork failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_and_down_in_the_opening_process() {
        let me = std::process::id();
        let a = opening().unwrap();
        let b = opening().unwrap();
        let (pid, count) = unpack(OPEN.load(Ordering::SeqCst));
        assert_eq!(pid, me);
        assert!(count >= 2);
        drop((a, b));
        assert!(unpack(OPEN.load(Ordering::SeqCst)).1 <= count - 2);
    }
}
