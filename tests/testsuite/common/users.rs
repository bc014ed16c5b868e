//! Users made for one test: added with `useradd`, removed with `userdel` when dropped (also
//! when the test fails).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A user made for one test with `useradd`, removed with `userdel` when dropped.
pub struct TestUser {
    /// The user's name.
    pub name: String,
    /// The user's uid.
    pub uid: u32,
}

impl TestUser {
    /// Adds a fresh user whose name starts with `prefix`, or `None` (with the reason
    /// printed) where that is not possible; `needs` says what root is needed for.
    pub fn add(prefix: &str, needs: &str) -> Option<Self> {
        if !super::is_root() {
            println!("skipped: needs root to {needs}");
            return None;
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let added = Command::new("useradd")
            .args(["-M", "-N", "-s", "/bin/sh", "-d", "/nonexistent", &name])
            .output();
        match added {
            Ok(out) if out.status.success() => {}
            other => {
                println!("skipped: useradd {name} failed: {other:?}");
                return None;
            }
        }
        // Removed on drop from here on, even if what follows fails.
        let mut user = Self {
            name,
            uid: u32::MAX,
        };
        let id = Command::new("id")
            .args(["-u", &user.name])
            .output()
            .expect("run id");
        user.uid = String::from_utf8_lossy(&id.stdout)
            .trim()
            .parse()
            .expect("a uid");
        Some(user)
    }

    /// Runs `script` with `sh -c` as this user, in `dir`; it must succeed.
    pub fn run(&self, dir: &Path, script: &str) {
        let out = Command::new("runuser")
            .args(["-u", &self.name, "--", "sh", "-c", script])
            .current_dir(dir)
            .output()
            .expect("run runuser");
        assert!(
            out.status.success(),
            "as {}: {script}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}
