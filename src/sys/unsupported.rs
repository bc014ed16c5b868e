//! Every platform without a Unix implementation: the same functions, each giving the answer
//! that keeps the rest safe where it cannot ask the system. No uids, no modes, no file
//! identities (so no check that needs them refuses anything), no process evidence (so the
//! liveness rule keeps every lease it cannot judge by its lock file).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// No user ids here.
pub(crate) fn euid() -> Option<u32> {
    None
}

/// The user's part of the name of the directory of registries in the shared temp directory.
pub(crate) fn user_tag() -> String {
    std::env::var("USERNAME").unwrap_or_else(|_| "user".into())
}

/// Not known here.
pub(crate) fn owner(_: &fs::Metadata) -> Option<u32> {
    None
}

/// Not known here.
pub(crate) fn mode(_: &fs::Metadata) -> Option<u32> {
    None
}

/// Not known here.
pub(crate) fn links(_: &fs::Metadata) -> Option<u64> {
    None
}

/// Not known here.
pub(crate) fn file_id(_: &fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// Not known here.
pub(crate) fn change_times(_: &fs::Metadata) -> Option<[i64; 4]> {
    None
}

/// Not done here: without file times nothing would read it.
pub(crate) fn touch(_: &File) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Cannot be told here: a file counts as still linked.
pub(crate) fn is_unlinked(_: &File) -> io::Result<bool> {
    Ok(false)
}

/// Tells whether the file at a path was deleted since: here, only whether the path still
/// names something.
#[derive(Debug)]
pub(crate) struct Anchor {
    path: PathBuf,
}

impl Anchor {
    /// Anchors the file `path` names now.
    pub(crate) fn at(path: &Path) -> io::Result<Self> {
        fs::metadata(path)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Whether nothing is at the anchored path any more.
    pub(crate) fn is_gone(&self) -> io::Result<bool> {
        match fs::metadata(&self.path) {
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    }
}

/// No modes here: the file gets the platform's default access.
pub(crate) fn private_file(_: &mut OpenOptions) {}

/// No modes here: the directory gets the platform's default access.
pub(crate) fn private_dir(_: &mut DirBuilder) {}

/// No unnamed files here: `ErrorKind::Unsupported`.
pub(crate) fn create_unnamed(_dir: &Path) -> io::Result<File> {
    Err(io::ErrorKind::Unsupported.into())
}

/// No unnamed files here: `ErrorKind::Unsupported`.
pub(crate) fn link_unnamed(_file: &File, _to: &Path) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// No rename that refuses to replace here: `ErrorKind::Unsupported`, and nothing changes.
pub(crate) fn rename_no_replace(_from: &Path, _to: &Path) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// No such flags here.
pub(crate) fn open_flags(_: &mut OpenOptions, _no_follow: bool, _non_blocking: bool) {}

/// Never: links are not refused by the open here.
pub(crate) fn is_link_refused(_: &io::Error) -> bool {
    false
}

/// Not told apart here.
pub(crate) fn is_out_of_descriptors(_: &io::Error) -> bool {
    false
}

/// Not told apart here.
pub(crate) fn is_host_out_of_descriptors(_: &io::Error) -> bool {
    false
}

/// Not told apart here.
pub(crate) fn is_out_of_buffers(_: &io::Error) -> bool {
    false
}

/// No file to try opening here.
pub(crate) const NULL_DEVICE: Option<&str> = None;

/// No Linux `/proc` here: processes are asked of the portable process query.
pub(crate) const PROCFS: bool = false;

/// No evidence here.
pub(crate) fn pid_exists(_: u32) -> Option<bool> {
    None
}

/// No PID namespaces here.
pub(crate) fn pid_namespace() -> Option<u64> {
    None
}

/// No time namespaces here.
pub(crate) fn time_namespace() -> Option<u64> {
    None
}

/// No PID namespaces here.
pub(crate) fn pid_namespace_parents() -> Option<Vec<u64>> {
    None
}

/// Cannot be told here.
pub(crate) fn is_mount_root(_: &Path) -> bool {
    false
}

/// Whether the file is not read-only: all that can be asked here.
pub(crate) fn can_read_write(path: &Path, _is_dir: bool) -> bool {
    fs::metadata(path).is_ok_and(|meta| !meta.permissions().readonly())
}

/// Not asked here: the IPv4 addresses are bound one by one.
pub(crate) fn is_dual_stack<S>(_: &S) -> bool {
    false
}

/// A descriptor cannot be handed to a command here.
pub(crate) fn keep_open_across_exec<K: Send + Sync + 'static>(
    _: &mut Command,
    _: File,
    _: K,
) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "handing an open file to a command is not supported on this platform",
    ))
}

/// No fork here to watch: a child is told from its parent by its pid.
pub(crate) const WATCHES_FORKS: bool = false;

/// No fork here.
pub(crate) fn on_fork_child(_: extern "C" fn()) -> bool {
    false
}

/// Cannot be told here.
pub(crate) fn udp_port_bound(_: u16) -> Option<bool> {
    None
}

/// Cannot be told here.
pub(crate) fn tcp_loopback_listening(_: u16) -> Option<bool> {
    None
}

/// Cannot be told here.
pub(crate) fn socket_holders(_: u16) -> Option<Vec<super::SocketOwner>> {
    None
}

/// Not known here.
pub(crate) fn ephemeral_port_range() -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_claims_nothing_it_cannot_know() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let file = File::create(&path).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(
            (euid(), owner(&meta), mode(&meta), file_id(&meta)),
            (None, None, None, None)
        );
        // No evidence that a process is gone: the liveness rule keeps its leases.
        assert_eq!(pid_exists(u32::MAX - 7), None);
        // No claim about who holds a port, or whether a UDP socket is bound on it.
        assert_eq!(socket_holders(80), None);
        assert_eq!(udp_port_bound(80), None);
        assert_eq!(tcp_loopback_listening(80), None);
        assert!(!is_unlinked(&file).unwrap());
        let anchor = Anchor::at(&path).unwrap();
        assert!(!anchor.is_gone().unwrap());
        fs::remove_file(&path).unwrap();
        assert!(anchor.is_gone().unwrap());
        let error = keep_open_across_exec(&mut Command::new("true"), file, ()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
    }
}
