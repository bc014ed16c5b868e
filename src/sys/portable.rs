//! The portable process query, through `sysinfo`, for systems without Linux's `/proc`. Not
//! compiled on Linux, which reads `/proc` itself (and where `sysinfo` would read the same
//! files), so that Linux builds compile no `sysinfo`.

use std::sync::{Mutex, OnceLock};

use sysinfo::{Pid, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System};

/// What the system says of `pid`: `Some(Some(start))` for a process running since `start`
/// (seconds since the epoch), `Some(None)` for no such process (or a zombie), `None` where
/// it cannot be asked.
pub(crate) fn process_state(pid: u32) -> Option<Option<u64>> {
    static SYSTEM: OnceLock<Option<Mutex<System>>> = OnceLock::new();
    let system = SYSTEM.get_or_init(|| System::new().ok().map(Mutex::new));
    let mut system = system.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
    let pid = Pid::from_u32(pid);
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing(),
    );
    Some(match system.process(pid) {
        Some(p) if matches!(p.status(), ProcessStatus::Zombie | ProcessStatus::Dead) => None,
        Some(p) => Some(p.start_time()),
        None => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_itself_and_not_a_missing_pid() {
        assert!(matches!(process_state(std::process::id()), Some(Some(_))));
        assert_eq!(process_state(u32::MAX - 7), Some(None));
    }
}
