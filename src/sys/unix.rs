//! Unix, through rustix. What only Linux has is marked `cfg(target_os = "linux")` here, with
//! the conservative answer of other Unix systems beside it.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use rustix::fs::OFlags;
use rustix::io::Errno;

/// The effective user id: the one the kernel gives the files this process creates, and so
/// the one a file must belong to for this process to call it its own.
pub(crate) fn euid() -> Option<u32> {
    Some(rustix::process::geteuid().as_raw())
}

/// The user's part of the name of the directory of registries in the shared temp directory:
/// the effective user id, whose directory that is.
pub(crate) fn user_tag() -> String {
    rustix::process::geteuid().as_raw().to_string()
}

/// The user id that owns the file `meta` describes.
pub(crate) fn owner(meta: &fs::Metadata) -> Option<u32> {
    Some(meta.uid())
}

/// The permission bits (with set-id and sticky bits) of the file `meta` describes.
pub(crate) fn mode(meta: &fs::Metadata) -> Option<u32> {
    Some(meta.mode() & 0o7777)
}

/// How many names (hard links) the file `meta` describes has.
pub(crate) fn links(meta: &fs::Metadata) -> Option<u64> {
    Some(meta.nlink())
}

/// The (device, inode) of a file: equal for two names exactly when they name one file.
pub(crate) fn file_id(meta: &fs::Metadata) -> Option<(u64, u64)> {
    Some((meta.dev(), meta.ino()))
}

/// When a file's content and its inode last changed: `mtime` and `ctime`, each in seconds and
/// nanoseconds, as the file system's clock gave them (which may move only every few
/// milliseconds, or every second).
pub(crate) fn change_times(meta: &fs::Metadata) -> Option<[i64; 4]> {
    Some([
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    ])
}

/// Sets the modification time of `file` to now by the file system's own clock (`futimens`
/// with `UTIME_NOW`): the time a write at this moment would get.
pub(crate) fn touch(file: &File) -> io::Result<()> {
    use rustix::fs::{futimens, Timespec, Timestamps, UTIME_NOW, UTIME_OMIT};
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        },
    };
    Ok(futimens(file, &times)?)
}

/// Whether the file `file` has open was deleted (it has no links left). One `fstat`.
pub(crate) fn is_unlinked(file: &File) -> io::Result<bool> {
    Ok(rustix::fs::fstat(file)?.st_nlink == 0)
}

/// Tells whether the file at a path was deleted since, without taking part in its locks.
///
/// On Linux it holds an `O_PATH` descriptor of the file: closing it, unlike closing any
/// other descriptor of the file, does not drop this process's POSIX locks on the file (the
/// kernel skips that for `O_PATH`), and [`Anchor::is_gone`] asks it with one `fstat`.
/// Elsewhere it keeps the file's identity and compares it with the path's (one `stat`).
#[derive(Debug)]
pub(crate) struct Anchor {
    #[cfg(target_os = "linux")]
    file: File,
    #[cfg(not(target_os = "linux"))]
    path: std::path::PathBuf,
    #[cfg(not(target_os = "linux"))]
    id: (u64, u64),
}

impl Anchor {
    /// Anchors the file `path` names now.
    pub(crate) fn at(path: &Path) -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(OFlags::PATH.bits() as i32)
                .open(path)?;
            Ok(Self { file })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let meta = fs::metadata(path)?;
            Ok(Self {
                path: path.to_owned(),
                id: (meta.dev(), meta.ino()),
            })
        }
    }

    /// Whether the anchored file was deleted or (where that can be told) replaced.
    pub(crate) fn is_gone(&self) -> io::Result<bool> {
        #[cfg(target_os = "linux")]
        {
            is_unlinked(&self.file)
        }
        #[cfg(not(target_os = "linux"))]
        {
            match fs::metadata(&self.path) {
                Ok(meta) => Ok((meta.dev(), meta.ino()) != self.id),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
                Err(e) => Err(e),
            }
        }
    }
}

/// Makes `options` create the file with mode `0600`.
pub(crate) fn private_file(options: &mut OpenOptions) {
    options.mode(0o600);
}

/// Makes `builder` create the directory with mode `0700`.
pub(crate) fn private_dir(builder: &mut DirBuilder) {
    builder.mode(0o700);
}

/// Sets the open flags of `options`: `no_follow` refuses a symbolic link as the last
/// component (the open fails, see [`is_link_refused`]); `non_blocking` keeps a FIFO from
/// hanging the open or a read.
pub(crate) fn open_flags(options: &mut OpenOptions, no_follow: bool, non_blocking: bool) {
    let mut flags = OFlags::empty();
    flags.set(OFlags::NOFOLLOW, no_follow);
    flags.set(OFlags::NONBLOCK, non_blocking);
    options.custom_flags(flags.bits() as i32);
}

/// Renames `from` to `to` unless something is at `to` already (`ErrorKind::AlreadyExists`
/// then, and nothing changes): one atomic step, so that nobody ever sees `to` with two names,
/// as a hard link followed by an unlink would show it. Where the system or the filesystem
/// cannot rename without replacing, `ErrorKind::Unsupported`, and nothing changes.
pub(crate) fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_vendor = "apple"))]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            // A filesystem without the flag (`EINVAL` on Linux, `ENOTSUP` on macOS), or a
            // kernel without the call.
            Err(Errno::INVAL | Errno::NOSYS) => Err(io::ErrorKind::Unsupported.into()),
            Err(e) if e == Errno::NOTSUP || e == Errno::OPNOTSUPP => {
                Err(io::ErrorKind::Unsupported.into())
            }
            Err(e) => Err(e.into()),
        }
    }
    #[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
    {
        let _ = (from, to);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Creates an unnamed regular file in the directory `dir`, mode `0600`, open for writing:
/// no other process can see or open it, and it goes with its last descriptor unless
/// [`link_unnamed`] names it. Linux only (`O_TMPFILE`); `ErrorKind::Unsupported` where the
/// system or the directory's filesystem has no unnamed files.
pub(crate) fn create_unnamed(dir: &Path) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{openat, Mode, CWD};
        let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
        match openat(CWD, dir, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => Ok(File::from(fd)),
            // A kernel without `O_TMPFILE` (`EISDIR`), or a filesystem without it.
            Err(Errno::ISDIR | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                Err(io::ErrorKind::Unsupported.into())
            }
            Err(e) => Err(e.into()),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Names the unnamed file `file` (from [`create_unnamed`]) `to`, unless something is at `to`
/// already (`ErrorKind::AlreadyExists`, and nothing changes). Through `AT_EMPTY_PATH`, or
/// where this process may not use it (a kernel before 6.10 without `CAP_DAC_READ_SEARCH`),
/// through `/proc/self/fd`; `ErrorKind::Unsupported` where neither is possible.
pub(crate) fn link_unnamed(file: &File, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;

        use rustix::fs::{linkat, AtFlags, CWD};
        match linkat(file, "", CWD, to, AtFlags::EMPTY_PATH) {
            Ok(()) => return Ok(()),
            // `ENOENT` also where `AT_EMPTY_PATH` is not allowed to this process.
            Err(Errno::NOENT | Errno::PERM) => {}
            Err(e) => return Err(e.into()),
        }
        let by_proc = format!("/proc/self/fd/{}", file.as_raw_fd());
        match linkat(CWD, by_proc.as_str(), CWD, to, AtFlags::SYMLINK_FOLLOW) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) if !Path::new("/proc/self/fd").is_dir() => {
                Err(io::ErrorKind::Unsupported.into())
            }
            Err(e) => Err(e.into()),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, to);
        Err(io::ErrorKind::Unsupported.into())
    }
}

fn errno(error: &io::Error) -> Option<Errno> {
    Errno::from_io_error(error)
}

/// Whether an open with `no_follow` failed because the path is a symbolic link (`ELOOP`).
pub(crate) fn is_link_refused(error: &io::Error) -> bool {
    errno(error) == Some(Errno::LOOP)
}

/// Whether `error` says the process (`EMFILE`) or the host (`ENFILE`) has no file
/// descriptor left.
pub(crate) fn is_out_of_descriptors(error: &io::Error) -> bool {
    matches!(errno(error), Some(Errno::MFILE | Errno::NFILE))
}

/// Whether `error` says the host's file table is full (`ENFILE`).
pub(crate) fn is_host_out_of_descriptors(error: &io::Error) -> bool {
    errno(error) == Some(Errno::NFILE)
}

/// Whether `error` says the kernel lacks buffers or memory (`ENOBUFS`, `ENOMEM`).
pub(crate) fn is_out_of_buffers(error: &io::Error) -> bool {
    matches!(errno(error), Some(Errno::NOBUFS | Errno::NOMEM))
}

/// A file that any process can open, to see whether it can open descriptors now.
pub(crate) const NULL_DEVICE: Option<&str> = Some("/dev/null");

/// What `kill(pid, 0)` says of `pid`: `Some(true)` if it exists (maybe as a zombie; `EPERM`
/// counts), `Some(false)` for `ESRCH`, `None` when it was not asked (0, or a pid `kill`
/// would take for a process group) or the answer says nothing.
pub(crate) fn pid_exists(pid: u32) -> Option<bool> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    match rustix::process::test_kill_process(pid) {
        Ok(()) | Err(Errno::PERM) => Some(true),
        Err(Errno::SRCH) => Some(false),
        Err(_) => None,
    }
}

/// Whether the system has Linux's `/proc`: processes' states, start times and namespaces
/// are read there, and elsewhere asked of the portable process query.
pub(crate) const PROCFS: bool = cfg!(target_os = "linux");

/// Linux reads `/proc` instead of asking the portable query (`portable.rs`): when `/proc`
/// is missing, there is nobody else to ask.
#[cfg(target_os = "linux")]
pub(crate) fn process_state(_: u32) -> Option<Option<u64>> {
    None
}

/// The inode of `/proc/self/ns/<kind>`: which namespace of that kind this process is in.
#[cfg(target_os = "linux")]
fn namespace(kind: &str) -> Option<u64> {
    fs::metadata(format!("/proc/self/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

/// The PID namespace of the calling process, where the system has such a thing.
pub(crate) fn pid_namespace() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        namespace("pid")
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The time namespace of the calling process, where the system has such a thing.
pub(crate) fn time_namespace() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        namespace("time")
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The PID namespaces above this process's, nearest first, as far as the kernel lets this
/// process see (`ioctl(NS_GET_PARENT)` stops at the initial namespace, or at the edge of
/// this process's user namespace).
pub(crate) fn pid_namespace_parents() -> Option<Vec<u64>> {
    #[cfg(target_os = "linux")]
    {
        linux::pid_namespace_parents()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The device, inode and node of `/proc/self/ns/pid`'s parents, through `NS_GET_PARENT`.
#[cfg(target_os = "linux")]
mod linux {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;

    use rustix::ioctl::{Ioctl, IoctlOutput, Opcode};

    /// `ioctl(fd, NS_GET_PARENT)`: a new descriptor of the parent namespace.
    struct NsGetParent;

    // SAFETY: NS_GET_PARENT (`_IO(0xb7, 0x2)` from `<linux/nsfs.h>`) takes no argument and
    // writes no memory of ours; on success it returns a new descriptor, which nothing else
    // owns, and the output takes ownership of it once.
    unsafe impl Ioctl for NsGetParent {
        type Output = OwnedFd;
        const IS_MUTATING: bool = false;

        fn opcode(&self) -> Opcode {
            0xb702
        }

        fn as_ptr(&mut self) -> *mut std::ffi::c_void {
            std::ptr::null_mut()
        }

        unsafe fn output_from_ptr(
            out: IoctlOutput,
            _: *mut std::ffi::c_void,
        ) -> rustix::io::Result<OwnedFd> {
            // SAFETY: the ioctl succeeded, so `out` is a descriptor the kernel just opened
            // for this process.
            Ok(unsafe { OwnedFd::from_raw_fd(out) })
        }
    }

    pub(super) fn pid_namespace_parents() -> Option<Vec<u64>> {
        /// The kernel nests PID namespaces 32 deep at most.
        const MAX_DEPTH: usize = 32;
        let mut current = OwnedFd::from(std::fs::File::open("/proc/self/ns/pid").ok()?);
        let mut parents = Vec::new();
        while parents.len() < MAX_DEPTH {
            // SAFETY: see `NsGetParent`; `current` is an open namespace descriptor.
            let Ok(parent) = (unsafe { rustix::ioctl::ioctl(&current, NsGetParent) }) else {
                break;
            };
            current = parent;
            let file = std::fs::File::from(current.try_clone().ok()?);
            parents.push(file.metadata().ok()?.ino());
        }
        Some(parents)
    }
}

/// Whether `path` is the root of a mount of its own (a single file bind-mounted there):
/// `statx` says so from Linux 5.8 on; before, the path is looked for among the mount
/// points. Never, where the system cannot tell.
pub(crate) fn is_mount_root(path: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{AtFlags, StatxAttributes, StatxFlags, CWD};
        if let Ok(stat) = rustix::fs::statx(
            CWD,
            path,
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::BASIC_STATS,
        ) {
            let flag = StatxAttributes::MOUNT_ROOT.bits();
            if stat.stx_attributes_mask.bits() & flag != 0 {
                return stat.stx_attributes.bits() & flag != 0;
            }
        }
        mounted_at(path)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        false
    }
}

/// Whether `/proc/self/mountinfo` lists a mount at `path`.
#[cfg(target_os = "linux")]
fn mounted_at(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(info) = fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.as_os_str().as_bytes();
    info.split(|b| *b == b'\n').any(|line| {
        line.split(|b| *b == b' ')
            .nth(4)
            .is_some_and(|point| unescape_octal(point) == wanted)
    })
}

/// Undoes the `\ooo` escapes of mountinfo's fields.
#[cfg(target_os = "linux")]
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let digits = field.get(i + 1..i + 4);
        match digits {
            Some(d) if field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            _ => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// Whether this process, as its effective user, may read and write `path` (and search it,
/// for a directory).
pub(crate) fn can_read_write(path: &Path, is_dir: bool) -> bool {
    use rustix::fs::{Access, AtFlags, CWD};
    let mut how = Access::READ_OK | Access::WRITE_OK;
    if is_dir {
        how |= Access::EXEC_OK;
    }
    rustix::fs::accessat(CWD, path, how, AtFlags::EACCESS).is_ok()
}

/// Whether an IPv6 socket accepts IPv4 too (`IPV6_V6ONLY` is off), so that binding it
/// proves the port free for every IPv4 holder too. Asked on Linux only; elsewhere no.
pub(crate) fn is_dual_stack<S: AsFd>(socket: &S) -> bool {
    #[cfg(target_os = "linux")]
    {
        matches!(rustix::net::sockopt::ipv6_v6only(socket), Ok(false))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        false
    }
}

/// Makes `file` open in the process `command` executes, as the same open file description
/// (and so with the same `flock`). `keep` lives as long as the hook does: until `command`
/// is dropped.
pub(crate) fn keep_open_across_exec<K: Send + Sync + 'static>(
    command: &mut Command,
    file: File,
    keep: K,
) -> io::Result<()> {
    use rustix::io::FdFlags;
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the child between fork and exec, where it only calls fcntl
    // (a raw system call through rustix, async-signal-safe); it allocates nothing and takes
    // no lock. `file` is open in the child, since fork copies the descriptors and the hook
    // owns `file`, which keeps it open in the parent.
    unsafe {
        command.pre_exec(move || {
            let _ = &keep;
            let flags = rustix::io::fcntl_getfd(&file)?;
            rustix::io::fcntl_setfd(&file, flags - FdFlags::CLOEXEC)?;
            Ok(())
        });
    }
    Ok(())
}

/// Whether [`on_fork_child`] tells a forked child from its parent here.
pub(crate) const WATCHES_FORKS: bool = true;

/// Runs `handler` in the child of every later `fork` of this process; false if it could
/// not be installed. The handler must only touch atomics: it runs where little is safe.
pub(crate) fn on_fork_child(handler: extern "C" fn()) -> bool {
    // SAFETY: `handler` is a plain function that, as its callers promise, only touches
    // atomics, which is async-signal-safe and so safe in a child of a multi-threaded
    // process. pthread_atfork is not covered by rustix.
    unsafe { libc::pthread_atfork(None, None, Some(handler)) == 0 }
}

/// Whether a UDP socket is bound on `port`, from the kernel's socket tables, without binding
/// anything; `None` where the system cannot tell (no Linux `/proc/net`).
pub(crate) fn udp_port_bound(port: u16) -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        super::sockets::udp_bound(port)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = port;
        None
    }
}

/// Whether a listening TCP socket on `port` takes connections to `127.0.0.1` or `::1`, from
/// the kernel's socket tables; `None` where the system cannot tell (no Linux `/proc/net`).
pub(crate) fn tcp_loopback_listening(port: u16) -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        super::sockets::tcp_loopback_listening(port)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = port;
        None
    }
}

/// The processes with a listening TCP socket or a UDP socket bound on `port`, or `None`
/// where the system cannot tell (no Linux `/proc`, or its socket tables cannot be read).
pub(crate) fn socket_holders(port: u16) -> Option<Vec<super::SocketOwner>> {
    #[cfg(target_os = "linux")]
    {
        super::sockets::holders(port)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = port;
        None
    }
}

/// The text of the kernel's range of ephemeral ports, where the system says it.
pub(crate) fn ephemeral_port_range() -> Option<String> {
    #[cfg(target_os = "linux")]
    {
        fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_this_process_creates_belong_to_its_effective_user() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        private_file(&mut options);
        options.open(&file).unwrap();
        let meta = fs::metadata(&file).unwrap();
        assert_eq!(owner(&meta), euid());
        assert_eq!(mode(&meta), Some(0o600));
        assert_eq!(user_tag(), euid().unwrap().to_string());
        assert!(can_read_write(&file, false));
    }

    #[test]
    fn a_link_is_refused_with_no_follow() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        fs::write(&target, b"").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let mut options = OpenOptions::new();
        options.read(true);
        open_flags(&mut options, true, true);
        let error = options.open(&link).unwrap_err();
        assert!(is_link_refused(&error), "{error}");
    }

    #[test]
    fn an_unlinked_file_is_told_from_a_linked_one() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let file = File::create(&path).unwrap();
        let anchor = Anchor::at(&path).unwrap();
        assert!(!is_unlinked(&file).unwrap());
        assert!(!anchor.is_gone().unwrap());
        fs::remove_file(&path).unwrap();
        assert!(is_unlinked(&file).unwrap());
        assert!(anchor.is_gone().unwrap());
    }

    #[test]
    fn kill_says_this_process_exists_and_leaves_process_groups_alone() {
        assert_eq!(pid_exists(std::process::id()), Some(true));
        assert_eq!(pid_exists(0), None);
        assert_eq!(pid_exists(u32::MAX), None);
    }

    #[test]
    fn errnos_are_told_apart() {
        let os = |e: Errno| io::Error::from_raw_os_error(e.raw_os_error());
        assert!(is_out_of_descriptors(&os(Errno::MFILE)));
        assert!(is_out_of_descriptors(&os(Errno::NFILE)));
        assert!(!is_host_out_of_descriptors(&os(Errno::MFILE)));
        assert!(is_host_out_of_descriptors(&os(Errno::NFILE)));
        assert!(is_out_of_buffers(&os(Errno::NOBUFS)));
        assert!(!is_out_of_buffers(&os(Errno::ACCESS)));
        assert!(!is_link_refused(&io::Error::other("no errno")));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_octal(br"/a\040b\011c"), b"/a b\tc");
        assert_eq!(unescape_octal(br"/plain\9"), br"/plain\9");
    }
}
