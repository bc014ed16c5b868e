//! Where the registry lives, and creating its directory and files privately.
//!
//! The default path is, in order: `$PORTDADDY_DB`; `$XDG_STATE_HOME/portdaddy/registry.sqlite3`;
//! `$HOME/.local/state/portdaddy/registry.sqlite3` (`%LOCALAPPDATA%\portdaddy\…` on Windows);
//! and last `<temp dir>/portdaddy-<uid>/registry.sqlite3`. Directories we create are `0700`
//! and files `0600`. In the shared temp directory a pre-existing `portdaddy-<uid>` is used only
//! if it is a real directory (not a symlink) owned by us and writable by nobody else, and the
//! registry's files in it only if they are regular files (not symlinks) of ours that nobody
//! else may write.

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
    let dir = std::env::temp_dir().join(format!("portdaddy-{}", user_tag()));
    (dir.join(FILE_NAME), true)
}

#[cfg(unix)]
fn user_tag() -> String {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }.to_string()
}

#[cfg(not(unix))]
fn user_tag() -> String {
    std::env::var("USERNAME").unwrap_or_else(|_| "user".into())
}

/// Makes sure the directory that will hold `path` exists and is ours.
pub(crate) fn prepare_parent(path: &Path, shared_tmp: bool) -> Result<()> {
    let open_err = |source: io::Error| Error::Open {
        path: path.to_owned(),
        source: source.into(),
    };
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if shared_tmp {
        // Create without `recursive`, so that a directory someone else made first (between
        // a check and the creation) fails with AlreadyExists and is inspected, not adopted.
        let mut builder = fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(open_err(e)),
        }
        let meta = fs::symlink_metadata(dir).map_err(open_err)?;
        check_private_dir(dir, &meta).map_err(open_err)?;
        // The files in it, if already there, must be as private: a link or someone else's file
        // would send the registry's writes wherever its author chose.
        for suffix in ["", ".lock", "-wal", "-shm", "-journal"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = Path::new(&name);
            match fs::symlink_metadata(file) {
                Ok(meta) => check_private_file(file, &meta).map_err(open_err)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(open_err(e)),
            }
        }
        return Ok(());
    }
    if !dir.is_dir() {
        create_dirs(dir).map_err(open_err)?;
    }
    Ok(())
}

fn create_dirs(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// A directory in a shared place must be a real directory, ours, and closed to others.
#[cfg(unix)]
fn check_private_dir(dir: &Path, meta: &fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing to use {}: {why}; remove it or set {ENV_VAR}",
                dir.display()
            ),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link");
    }
    if !meta.is_dir() {
        return refuse("it is not a directory");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if meta.uid() != unsafe { libc::getuid() } {
        return refuse("it belongs to another user");
    }
    if meta.mode() & 0o022 != 0 {
        return refuse("other users can write to it");
    }
    Ok(())
}

/// A file in the shared place must be a regular file, ours, and closed to others' writes.
#[cfg(unix)]
fn check_private_file(file: &Path, meta: &fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing to use {}: {why}; remove it or set {ENV_VAR}",
                file.display()
            ),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link");
    }
    if !meta.is_file() {
        return refuse("it is not a regular file");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if meta.uid() != unsafe { libc::getuid() } {
        return refuse("it belongs to another user");
    }
    if meta.mode() & 0o022 != 0 {
        return refuse("other users can write to it");
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_file(file: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if meta.file_type().is_symlink() || !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing to use {}: not a plain file", file.display()),
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_dir(dir: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing to use {}: not a plain directory", dir.display()),
        ));
    }
    Ok(())
}

/// Creates `path` empty with mode `0600` if it does not exist; leaves an existing file alone.
pub(crate) fn create_private_file(path: &Path) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
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
        prepare_parent(&path, false).unwrap();
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
        let err = prepare_parent(&dir.join(FILE_NAME), true).unwrap_err();
        assert!(err.to_string().contains("other users can write"), "{err}");
    }

    #[test]
    fn refuses_a_symlinked_shared_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("portdaddy-x");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = prepare_parent(&link.join(FILE_NAME), true).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn accepts_our_own_private_shared_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("portdaddy-x");
        prepare_parent(&dir.join(FILE_NAME), true).unwrap();
        prepare_parent(&dir.join(FILE_NAME), true).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
