//! Where the registry lives, and creating its directory and files privately.
//!
//! The default path is, in order: `$PORTDADDY_DB`; `$XDG_STATE_HOME/portdaddy/registry.sqlite3`;
//! `$HOME/.local/state/portdaddy/registry.sqlite3` (`%LOCALAPPDATA%\portdaddy\…` on Windows);
//! and last `<temp dir>/portdaddy-<uid>/registry.sqlite3`. Directories we create are `0700`
//! and files `0600`. In the shared temp directory a pre-existing `portdaddy-<uid>` is used only
//! if it is a real directory (not a symlink) owned by us and writable by nobody else, and the
//! registry's files in it only if they are regular files (not symlinks) of ours that nobody
//! else may write.
//!
//! # One registry, one set of side files
//!
//! Wherever the registry lives, its path is first resolved to the real file ([`resolve`]),
//! following only symbolic links that belong to us or to root (nobody else can have planted
//! those), and every side file is named after the real file, as SQLite names its own:
//! `<real>.lock`, `<real>.owners/`, `<real>-wal`, `<real>-shm`, `<real>-journal`. So a
//! registry reached through a link, a linked directory or a bind-mounted directory has one
//! lock and one owners directory. A registry file that other names reach too, which no
//! resolution can see, is refused: one with a second hard link, and one that is a mount point
//! of its own (a single file bind-mounted, as `docker run -v file:file` does).
//!
//! # Files others could have planted
//!
//! The registry, its side files and the owners directory must be ours, never symbolic
//! links, and closed to the writes of group and others ([`check_files`]); the registry's
//! directory must be ours or root's, and closed to others unless it has the sticky bit (as
//! `/tmp`); a missing directory is created only inside one of ours or a sticky one of root's,
//! never in another user's (root with a user's `HOME` would lock the user out). Whatever is
//! refused is reported as [`Error::Refused`], naming the file and its owner, and left as it
//! was. These checks run when a handle opens, never per claim.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The environment variable that overrides the default registry path.
pub const ENV_VAR: &str = "PORTDADDY_DB";

const FILE_NAME: &str = "registry.sqlite3";

/// Where the default registry lives, and whether it is in a shared temp directory.
pub(crate) fn default_location() -> (PathBuf, bool) {
    if let Some(p) = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty()) {
        return (PathBuf::from(p), false);
    }
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(state) = absolute("XDG_STATE_HOME") {
        return (state.join("portdaddy").join(FILE_NAME), false);
    }
    if cfg!(windows) {
        if let Some(local) = absolute("LOCALAPPDATA") {
            return (local.join("portdaddy").join(FILE_NAME), false);
        }
    } else if let Some(home) = absolute("HOME") {
        return (
            home.join(".local")
                .join("state")
                .join("portdaddy")
                .join(FILE_NAME),
            false,
        );
    }
    let dir = std::env::temp_dir().join(format!("portdaddy-{}", crate::sys::user_tag()));
    (dir.join(FILE_NAME), true)
}

/// In the shared temp directory: creates `portdaddy-<uid>` for `path` if missing, and refuses
/// it, or the registry's files in it, unless they are ours and closed to others.
pub(crate) fn prepare_shared_dir(path: &Path) -> Result<()> {
    let open_err = |source: io::Error| Error::open(path, source);
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    create_dir_0700(dir).map_err(open_err)?;
    let meta = fs::symlink_metadata(dir).map_err(open_err)?;
    check_private_dir(path, dir, &meta)?;
    // The files in it, if already there, must be as private: a link or someone else's file
    // would send the registry's writes wherever its author chose.
    for suffix in ["", ".lock", "-wal", "-shm", "-journal"] {
        let file = sibling(path, suffix);
        match fs::symlink_metadata(&file) {
            Ok(meta) => check_private_file(path, &file, &meta)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(open_err(e)),
        }
    }
    Ok(())
}

/// Creates the one directory `dir` with mode `0700`; one that is already there is left for
/// the caller to inspect. Not `recursive`, so that a directory someone else made first
/// (between a check and the creation) is inspected, not adopted.
fn create_dir_0700(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    crate::sys::private_dir(&mut builder);
    match builder.create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        result => result,
    }
}

/// A directory in a shared place must be a real directory, ours, and closed to others.
fn check_private_dir(registry: &Path, dir: &Path, meta: &fs::Metadata) -> Result<()> {
    check_private(registry, dir, meta, true)
}

/// A file in the shared place must be a regular file, ours, and closed to others' writes.
fn check_private_file(registry: &Path, file: &Path, meta: &fs::Metadata) -> Result<()> {
    check_private(registry, file, meta, false)
}

fn check_private(registry: &Path, path: &Path, meta: &fs::Metadata, dir: bool) -> Result<()> {
    let refuse = |why: &str| Err(refused(registry, path, why.to_owned(), ADVICE_OWN));
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link");
    }
    if dir && !meta.is_dir() {
        return refuse("it is not a directory");
    }
    if !dir && !meta.is_file() {
        return refuse("it is not a regular file");
    }
    // Where the platform has no owners or modes, there is nothing more to check.
    if crate::sys::owner(meta).is_some_and(|owner| Some(owner) != crate::sys::euid()) {
        return refuse("it belongs to another user");
    }
    if crate::sys::mode(meta).is_some_and(|mode| mode & 0o022 != 0) {
        return refuse("other users can write to it");
    }
    Ok(())
}

/// `<path><suffix>`, as SQLite names its side files.
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The longest file name most filesystems allow, in bytes.
const NAME_MAX: usize = 255;

/// The suffixes of the files beside a registry: ours, then SQLite's.
const SIDE_SUFFIXES: [&str; 5] = [".lock", ".owners", "-wal", "-shm", "-journal"];

/// The longest of [`SIDE_SUFFIXES`], in bytes.
const LONGEST_SUFFIX: usize = "-journal".len();

/// The sticky bit of a mode: only a file's owner may remove or rename it in the directory.
const STICKY: u32 = 0o1000;

/// Advice for a file that another user planted or may change.
pub(crate) const ADVICE_OWN: &str =
    "remove it (as its owner), or set PORTDADDY_DB to a registry in a directory of your own";
/// Advice for a registry file reached by more than one name.
const ADVICE_SHARE_DIR: &str =
    "share the directory that holds the registry (bind-mount or link the directory), not the \
     file alone";
/// Advice for a registry path inside a directory of another user.
const ADVICE_OTHER_USER: &str =
    "run as the user who owns it, or set PORTDADDY_DB to a path of your own";

fn refused(registry: &Path, file: &Path, reason: String, advice: &'static str) -> Error {
    Error::Refused {
        path: registry.to_owned(),
        file: file.to_owned(),
        reason,
        advice,
    }
}

/// `user NAME (uid N)`, or `uid N` for a uid that `/etc/passwd` does not list.
fn owner_name(uid: u32) -> String {
    let listed = fs::read_to_string("/etc/passwd").ok().and_then(|passwd| {
        passwd.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id: u32 = fields.nth(1)?.parse().ok()?;
            (id == uid).then(|| name.to_owned())
        })
    });
    match listed {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// Resolves the symbolic links on `path` to the real file, following only links that belong
/// to us or to root (which no other user can have planted), so that every side file is named
/// after the real file, as SQLite names its own. A missing last component is fine (the file
/// is created later), and so are missing directories of the path as given (they are created
/// later); a link into a directory that does not exist is refused.
#[cfg(unix)]
pub(crate) fn resolve(path: &Path) -> Result<PathBuf> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    use std::os::unix::fs::MetadataExt;
    use std::path::Component;

    enum Part {
        Root,
        Parent,
        Name(OsString),
    }
    fn parts(path: &Path, from_link: bool) -> Vec<(Part, bool)> {
        path.components()
            .filter_map(|c| match c {
                Component::RootDir => Some(Part::Root),
                Component::ParentDir => Some(Part::Parent),
                Component::Normal(name) => Some(Part::Name(name.to_owned())),
                Component::CurDir | Component::Prefix(_) => None,
            })
            .map(|p| (p, from_link))
            .collect()
    }
    let open_err = |source: io::Error| Error::open(path, source);
    let mut out = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir().map_err(open_err)?
    };
    let mut pending: VecDeque<(Part, bool)> = parts(path, false).into();
    let mut hops = 0;
    // Once a component is missing, nothing below it exists: the rest is taken as written.
    let mut missing = false;
    while let Some((part, from_link)) = pending.pop_front() {
        let name = match part {
            Part::Root => {
                out = PathBuf::from("/");
                continue;
            }
            Part::Parent => {
                out.pop();
                continue;
            }
            Part::Name(name) => name,
        };
        let next = out.join(&name);
        if missing {
            out = next;
            continue;
        }
        match fs::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if Some(meta.uid()) != crate::sys::euid() && meta.uid() != 0 {
                    return Err(refused(
                        path,
                        &next,
                        format!(
                            "it is a symbolic link that belongs to {}, and links are followed \
                             only when they are ours or root's",
                            owner_name(meta.uid())
                        ),
                        ADVICE_OWN,
                    ));
                }
                hops += 1;
                if hops > 40 {
                    return Err(Error::open_because(
                        path,
                        "too many levels of symbolic links; give a path with fewer links",
                    ));
                }
                let target = fs::read_link(&next).map_err(open_err)?;
                for p in parts(&target, true).into_iter().rev() {
                    pending.push_front(p);
                }
            }
            Ok(_) => out = next,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let more = pending.iter().any(|(p, _)| matches!(p, Part::Name(_)));
                if from_link && more {
                    return Err(Error::open_because(
                        path,
                        format!(
                            "a symbolic link on the path leads into {}, which does not exist",
                            next.display()
                        ),
                    ));
                }
                missing = true;
                out = next;
            }
            Err(e) => return Err(open_err(e)),
        }
    }
    Ok(out)
}

#[cfg(not(unix))]
pub(crate) fn resolve(path: &Path) -> Result<PathBuf> {
    Ok(path.to_owned())
}

/// Refuses a registry whose name leaves no room for the longest side-file suffix.
pub(crate) fn check_name_length(registry: &Path, real: &Path) -> Result<()> {
    let len = real.file_name().map_or(0, |n| n.len());
    if len + LONGEST_SUFFIX > NAME_MAX {
        return Err(refused(
            registry,
            real,
            format!(
                "its name is {len} bytes long, and with the suffix of its side files (such as \
                 -journal) it would pass the {NAME_MAX}-byte limit of a file name"
            ),
            "choose a name of at most 247 bytes",
        ));
    }
    Ok(())
}

/// Creates the missing directories above the real registry file `real` (mode `0700`), never
/// inside a directory of another user, then refuses a registry directory that another user
/// owns, or that others may write without the sticky bit.
pub(crate) fn prepare_dirs(registry: &Path, real: &Path) -> Result<()> {
    let open_err = |source: io::Error| Error::open(registry, source);
    let Some(dir) = real.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let mut missing = Vec::new();
    let mut existing = dir;
    let mut meta = loop {
        match fs::symlink_metadata(existing) {
            Ok(meta) => break meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(existing);
                match existing.parent() {
                    Some(up) => existing = up,
                    None => return Err(open_err(e)),
                }
            }
            Err(e) => return Err(open_err(e)),
        }
    };
    let mut parent = existing;
    for new in missing.into_iter().rev() {
        may_create_in(registry, parent, &meta)?;
        create_dir_0700(new).map_err(open_err)?;
        meta = fs::symlink_metadata(new).map_err(open_err)?;
        parent = new;
    }
    if !meta.is_dir() {
        return Err(Error::open_because(
            registry,
            format!("{} is not a directory", dir.display()),
        ));
    }
    check_registry_dir(registry, dir, &meta)?;
    check_dirs_above(registry, dir)
}

/// Refuses a registry below a directory that another user may change: its owner, or anyone
/// who may write to it while it has no sticky bit, could rename the directories below it
/// and put their own in their place, with files of their choosing where the registry's
/// files are opened again by name (the owners' lock files, for one).
fn check_dirs_above(registry: &Path, dir: &Path) -> Result<()> {
    // Where the platform has no users, nobody else can own a directory above.
    if crate::sys::euid().is_none() {
        return Ok(());
    }
    for above in dir.ancestors().skip(1) {
        if above.as_os_str().is_empty() {
            break;
        }
        let meta = fs::symlink_metadata(above).map_err(|source| Error::open(registry, source))?;
        let Some((owner, mode)) = owner_and_mode(&meta) else {
            continue;
        };
        if Some(owner) != crate::sys::euid() && owner != 0 {
            return Err(refused(
                registry,
                above,
                format!(
                    "this directory above the registry belongs to {}, who could replace the \
                     directories below it",
                    owner_name(owner)
                ),
                ADVICE_OTHER_USER,
            ));
        }
        if mode & 0o022 != 0 && mode & STICKY == 0 {
            return Err(refused(
                registry,
                above,
                format!(
                    "group or other users can write to this directory above the registry \
                     (mode {mode:04o}) and it has no sticky bit, so they could replace the \
                     directories below it",
                ),
                "remove their write permission (chmod go-w), or set PORTDADDY_DB to a path \
                 in a directory of your own",
            ));
        }
    }
    Ok(())
}

/// The owner and mode of the file `meta` describes, where the platform has them.
fn owner_and_mode(meta: &fs::Metadata) -> Option<(u32, u32)> {
    Some((crate::sys::owner(meta)?, crate::sys::mode(meta)?))
}

/// A directory may be created in `parent` if it is ours, or root's with the sticky bit (as
/// `/tmp`): never in another user's, where it would lock its owner out.
fn may_create_in(registry: &Path, parent: &Path, meta: &fs::Metadata) -> Result<()> {
    let Some((owner, mode)) = owner_and_mode(meta) else {
        return Ok(());
    };
    let sticky = mode & STICKY != 0;
    if Some(owner) == crate::sys::euid() || (owner == 0 && sticky) {
        return Ok(());
    }
    Err(refused(
        registry,
        parent,
        format!(
            "it belongs to {}, and a directory of ours created in it would lock its owner out",
            owner_name(owner)
        ),
        ADVICE_OTHER_USER,
    ))
}

/// The directory of the registry must be ours (or root's), and closed to others' writes
/// unless sticky, where nobody may remove or rename another's files.
pub(crate) fn check_registry_dir(registry: &Path, dir: &Path, meta: &fs::Metadata) -> Result<()> {
    let Some((owner, mode)) = owner_and_mode(meta) else {
        return Ok(());
    };
    if Some(owner) != crate::sys::euid() && owner != 0 {
        return Err(refused(
            registry,
            dir,
            format!(
                "the registry's directory belongs to {}, who could replace its files",
                owner_name(owner)
            ),
            ADVICE_OTHER_USER,
        ));
    }
    let sticky = mode & STICKY != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(refused(
            registry,
            dir,
            format!(
                "group or other users can write to the registry's directory (mode {mode:04o}) \
                 and it has no sticky bit, so they could replace its files",
            ),
            "remove their write permission (chmod go-w), or set PORTDADDY_DB to a path in a \
             directory of your own",
        ));
    }
    Ok(())
}

/// Whether others may create files in the registry's directory (a sticky directory such as
/// `/tmp`), so that the side files should be created by us before SQLite opens them.
pub(crate) fn dir_open_to_others(real: &Path) -> bool {
    let dir = real.parent().filter(|d| !d.as_os_str().is_empty());
    dir.and_then(|d| fs::metadata(d).ok())
        .and_then(|m| crate::sys::mode(&m))
        .is_some_and(|mode| mode & 0o022 != 0)
}

/// Refuses, without changing anything, a registry file or side file that another user could
/// have planted or may change: a symbolic link, a file or directory of another user or that
/// group or others may write; and a registry file reached by other names too (a second hard
/// link, or a file mounted on its own). A registry path that is not a regular file is left
/// for the open to report.
pub(crate) fn check_files(registry: &Path, real: &Path) -> Result<()> {
    let open_err = |source: io::Error| Error::open(registry, source);
    let entries = std::iter::once((real.to_owned(), Kind::Registry)).chain(
        SIDE_SUFFIXES.iter().map(|suffix| {
            let kind = if *suffix == ".owners" {
                Kind::Dir
            } else {
                Kind::Side
            };
            (sibling(real, suffix), kind)
        }),
    );
    for (file, kind) in entries {
        match fs::symlink_metadata(&file) {
            Ok(meta) => check_meta(registry, &file, &meta, kind)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(open_err(e)),
        }
    }
    Ok(())
}

/// What a file beside the registry should be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Registry,
    Side,
    Dir,
}

fn check_meta(registry: &Path, file: &Path, meta: &fs::Metadata, kind: Kind) -> Result<()> {
    let refuse = |reason: String, advice| Err(refused(registry, file, reason, advice));
    if meta.file_type().is_symlink() {
        let of = crate::sys::owner(meta)
            .map(|owner| format!(" (of {})", owner_name(owner)))
            .unwrap_or_default();
        return refuse(
            format!("it is a symbolic link{of}, which is never followed there"),
            ADVICE_OWN,
        );
    }
    match kind {
        // Not a regular file: reported by the open, which says what a registry path must be.
        Kind::Registry if !meta.is_file() => return Ok(()),
        Kind::Side if !meta.is_file() => {
            return refuse("it is not a regular file".into(), ADVICE_OWN);
        }
        Kind::Dir if !meta.is_dir() => {
            return refuse("it is not a directory".into(), ADVICE_OWN);
        }
        _ => {}
    }
    if let Some((owner, mode)) = owner_and_mode(meta) {
        if Some(owner) != crate::sys::euid() {
            return refuse(format!("it belongs to {}", owner_name(owner)), ADVICE_OWN);
        }
        if mode & 0o022 != 0 {
            return refuse(
                format!("group or other users can write to it (mode {mode:04o})"),
                "remove their write permission (chmod go-w), or set PORTDADDY_DB to a path \
                 of your own",
            );
        }
    }
    if kind == Kind::Registry {
        if let Some(links) = crate::sys::links(meta).filter(|&n| n > 1) {
            return refuse(
                format!(
                    "it has {links} hard links, and each name would get a lock of its own, so \
                     two processes could lease one port"
                ),
                ADVICE_SHARE_DIR,
            );
        }
        if crate::sys::is_mount_root(file) {
            return refuse(
                "it is mounted on its own (a single-file bind mount), so its lock file and \
                 owners directory are not the ones beside the original"
                    .into(),
                ADVICE_SHARE_DIR,
            );
        }
    }
    Ok(())
}

/// A side file that [`precreate_side_files`] made: its path and identity (device, inode).
pub(crate) type Created = (PathBuf, Option<(u64, u64)>);

/// Creates SQLite's `-wal` and `-shm` beside `real` ourselves (`0600`, never through a link)
/// where they are missing, so that nobody else can create them first in a directory open to
/// others. Returns the files it created, for [`remove_created`].
///
/// No descriptor of them stays open: closing one after SQLite has locked the file would drop
/// SQLite's POSIX locks on it.
pub(crate) fn precreate_side_files(real: &Path) -> io::Result<Vec<Created>> {
    precreate(real, &["-wal", "-shm"])
}

/// Creates an empty rollback journal beside `real` (`0600`, never through a link) where it
/// is missing, for the moment SQLite first reads the registry: it then looks for a journal
/// to roll back into the file, and in a directory open to others nobody else may put one
/// there. Empty, it is rolled back never. A registry in WAL mode writes none: remove it with
/// [`remove_created`] once the registry is open.
pub(crate) fn precreate_journal(real: &Path) -> io::Result<Vec<Created>> {
    precreate(real, &["-journal"])
}

fn precreate(real: &Path, suffixes: &[&str]) -> io::Result<Vec<Created>> {
    let mut created = Vec::new();
    for suffix in suffixes {
        let file = sibling(real, suffix);
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        crate::sys::private_file(&mut options);
        crate::sys::open_flags(&mut options, true, false);
        match options.open(&file) {
            Ok(handle) => {
                let id = crate::sys::file_id(&handle.metadata()?);
                created.push((file, id));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// Removes the side files [`precreate_side_files`] made, if their names still lead to them.
pub(crate) fn remove_created(created: Vec<Created>) {
    for (file, id) in created {
        let still = fs::symlink_metadata(&file).is_ok_and(|meta| crate::sys::file_id(&meta) == id);
        if !still {
            continue;
        }
        if let Err(error) = fs::remove_file(&file) {
            tracing::debug!(file = %file.display(), %error, "could not remove a side file");
        }
    }
}

/// Creates `path` empty with mode `0600` if it does not exist; leaves an existing file alone.
pub(crate) fn create_private_file(path: &Path) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    crate::sys::private_file(&mut options);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn creates_private_directories_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/registry.sqlite3");
        prepare_dirs(&path, &path).unwrap();
        create_private_file(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert_eq!(mode(&tmp.path().join("a/b")), 0o700);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn refuses_a_world_writable_shared_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("portdaddy-x");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_shared_dir(&dir.join(FILE_NAME)).unwrap_err();
        let text = crate::error::Chain(&err).to_string();
        assert!(text.contains("other users can write"), "{text}");
    }

    #[test]
    fn refuses_a_symlinked_shared_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("portdaddy-x");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = prepare_shared_dir(&link.join(FILE_NAME)).unwrap_err();
        let text = crate::error::Chain(&err).to_string();
        assert!(text.contains("symbolic link"), "{text}");
    }

    #[test]
    fn resolves_our_links_to_the_real_file() {
        let tmp = tempfile::tempdir().unwrap();
        let real_dir = tmp.path().join("real");
        fs::create_dir(&real_dir).unwrap();
        std::os::unix::fs::symlink(&real_dir, tmp.path().join("dir-link")).unwrap();
        std::os::unix::fs::symlink("../real/r.sqlite3", real_dir.join("file-link")).unwrap();
        let real = resolve(&tmp.path().join("dir-link/file-link")).unwrap();
        let expected = fs::canonicalize(tmp.path()).unwrap().join("real/r.sqlite3");
        assert_eq!(real, expected);
        // Missing directories of the path as given are fine: they are created later.
        let fresh = resolve(&tmp.path().join("dir-link/new/r.sqlite3")).unwrap();
        assert_eq!(fresh, expected.with_file_name("new").join("r.sqlite3"));
    }

    #[test]
    fn a_link_into_a_missing_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("r.sqlite3");
        std::os::unix::fs::symlink(tmp.path().join("nowhere/r.sqlite3"), &link).unwrap();
        let err = resolve(&link).unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err:?}");
        assert!(!tmp.path().join("nowhere").exists());
    }

    #[test]
    fn a_name_without_room_for_the_journal_suffix_is_refused() {
        let ok = PathBuf::from("x".repeat(NAME_MAX - LONGEST_SUFFIX));
        check_name_length(&ok, &ok).unwrap();
        let long = PathBuf::from("x".repeat(NAME_MAX - LONGEST_SUFFIX + 1));
        let err = check_name_length(&long, &long).unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{err:?}");
    }

    #[test]
    fn accepts_our_own_private_shared_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("portdaddy-x");
        prepare_shared_dir(&dir.join(FILE_NAME)).unwrap();
        prepare_shared_dir(&dir.join(FILE_NAME)).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
