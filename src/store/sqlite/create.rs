//! Creating a registry that does not exist yet: made whole before anyone can see it.
//!
//! # The rule
//!
//! A missing registry file is never created empty and then built in place. Its whole
//! initial image — every migration, `application_id`, `user_version`, and WAL mode in the
//! header (bytes 18 and 19 = 2 in SQLite's file format) — is [`IMAGE`], built once by
//! running `schema::MIGRATIONS` in an in-memory database and kept in `new_registry.sqlite3`
//! beside this file. The image is written to a file of ours in the registry's directory,
//! synced once, and given the registry's path in one step that replaces nothing: a file
//! that appeared at the path meanwhile wins, ours goes, and the open goes on with that
//! file through the checks of any existing file. All of it runs under the registry's write
//! lock, which every version of portdaddy takes before it creates a registry, so an older
//! version creating the same registry at the same moment waits for this one (or this one
//! for it), and finds a complete registry.
//!
//! - On Linux the file is unnamed (`O_TMPFILE`, mode `0600`): nobody can see, open or plant
//!   anything at its name, since it has none, and it goes with its descriptor however the
//!   process ends, so a creator killed at any point leaves nothing. `linkat` names it; it
//!   fails if the path is taken. Naming it takes `AT_EMPTY_PATH` (allowed to the file's
//!   opener since Linux 6.10, before that to `CAP_DAC_READ_SEARCH` only) or else
//!   `/proc/self/fd`.
//! - Where there are no unnamed files (another system, a filesystem without them, or
//!   neither way of naming one), the file is `<registry>.~` followed by six random
//!   characters (created `O_CREAT | O_EXCL | O_NOFOLLOW`, mode `0600`), put in place with
//!   `renameat2(RENAME_NOREPLACE)` (see `sys::rename_no_replace`), or with a hard link and
//!   an unlink where that cannot be done (for that moment the registry has two names, which
//!   an open would refuse: an open that finds the registry refused removes a second name of
//!   our pattern that leads to the registry's own file, which is also what a creator killed
//!   between the two leaves; see [`remove_second_name`]); where there are no hard links
//!   either, the registry is created empty and built in place as before, which is safe for
//!   the same reasons as an existing empty file.
//!
//! A crash at any point leaves the path with no registry (before the link or rename) or a
//! complete one (after it): never an empty, torn or half-migrated file. The sync comes
//! before the link, so after a power loss too the path holds nothing or the complete image.
//! The directory is not synced: a power loss may forget the new name, which loses no more
//! than `synchronous=NORMAL` allows to be lost anyway (the last commits).
//!
//! Running the migrations costs a process about a millisecond of CPU (SQLite parses every
//! statement, and rewrites the schema for each `ALTER TABLE`), more than the rest of the
//! creation, so the image is built ahead. A unit test builds it again from
//! `schema::MIGRATIONS` and fails, saying how to write it anew, when the two differ in
//! anything but the SQLite version that wrote them: a migration added without the image
//! cannot go unnoticed.
//!
//! # A named file, left behind
//!
//! Every error path removes a named file of ours (if its name still leads to it). A process
//! killed between creating it and the rename leaves it behind; the next creation through a
//! named file, under the write lock, removes what is provably such a leftover: a name of
//! the pattern above for this registry, a regular file (not a link), of the effective user,
//! mode `0600`, one link, holding no more than the start of [`IMAGE`] and with none of the
//! side files an open makes (`.lock`, `-wal`, `-shm`): a registry whose name merely extends
//! this one's by the pattern (`ports.db.~abc123` beside `ports.db`) is no leftover. Under
//! the lock no creation of this registry is under way, so any such file is stale. Finding
//! them takes reading the whole directory, which in a directory of thousands of files (a
//! shared `/tmp`) costs more than the rest of the creation: one more reason to prefer an
//! unnamed file, which needs no such search.
//!
//! # The new log's first commit
//!
//! SQLite syncs a log's header when it writes the log's first frame (`syncHeader` in
//! `sqlite3WalFrames`), and the directory the first time it syncs a log it created. The
//! header sync guards against a log that is *started over*: the new header (new salts) must
//! be on disk before new frames overwrite the old ones in place, or frames of the two rounds
//! could mix after a power loss. A brand-new log has no old frames: after a power loss its
//! header and frames are there and valid, or the header is missing or does not match (its
//! checksum, its salts), and the frames after it are not used. Either way the registry file
//! is the synced image, and what is lost is commits, which `synchronous=NORMAL` allows.
//! So [`start_log`] makes the first commit to a log that is still empty with
//! `synchronous=OFF` (it writes `user_version` back unchanged, one page) and switches back
//! to `NORMAL` at once: every later restart of the log syncs its header as SQLite wants.
//! A log that is not empty (not ours, or not new) keeps the syncs.

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::error::{Error, Result};
use crate::paths::sibling;

/// What comes after the registry's file name in the name of our file: `.~`, then
/// [`RANDOM_LEN`] characters of [`ALPHABET`]; as long as the longest side-file suffix
/// (`-journal`), which `paths::check_name_length` leaves room for. Not a name people give
/// files, though a name alone proves nothing (see [`remove_leftovers`]).
const MARK: &str = ".~";
const RANDOM_LEN: usize = 6;
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// How many random names are tried before giving up (each taken one is another's file).
const ATTEMPTS: usize = 16;

/// A new registry, whole: what `schema::MIGRATIONS` make of an empty database of 4 KiB pages
/// (SQLite's default for a new file here, which the log's limits in the store assume), in
/// WAL mode. See "The rule" above for how it is kept in step with the migrations.
const IMAGE: &[u8] = include_bytes!("new_registry.sqlite3");

/// What [`create_missing`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Creation {
    /// The registry was created whole.
    Whole,
    /// Something is at the path: it was there, or appeared meanwhile (and was checked then).
    Found,
    /// Nothing is at the path, and this system cannot put a file in place without replacing
    /// one: the caller creates the file empty, to be built in place.
    Unable,
}

/// Creates the registry at `real` whole if nothing is there, and says what it did. For an
/// existing registry (every open but the first), one `stat`.
///
/// The caller holds the write lock, and has checked the path under it: `was_missing` says
/// that nothing was there then, so that a file there now appeared since, unchecked, and is
/// checked as one that appears while the registry is being linked. `path` names the
/// registry in errors.
pub(super) fn create_missing(path: &Path, real: &Path, was_missing: bool) -> Result<Creation> {
    match fs::symlink_metadata(real) {
        Ok(_) if was_missing => return lost(path, real).map(|()| Creation::Found),
        Ok(_) => return Ok(Creation::Found),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::open(path, e)),
    }
    let created = match create_unnamed(path, real)? {
        Some(created) => created,
        None => match create_named(path, real)? {
            Some(created) => created,
            None => return Ok(Creation::Unable),
        },
    };
    Ok(if created {
        Creation::Whole
    } else {
        Creation::Found
    })
}

/// [`create_missing`] through an unnamed file, linked to the registry's path once whole;
/// `None` where the system or filesystem has no unnamed files (nothing was created then).
fn create_unnamed(path: &Path, real: &Path) -> Result<Option<bool>> {
    let dir = directory_of(real);
    let err = |e| create_err(path, &format!("an unnamed file in {}", dir.display()), e);
    let mut file = match crate::sys::create_unnamed(dir) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    file.write_all(IMAGE)
        .and_then(|()| file.sync_data())
        .map_err(err)?;
    // Until it is linked, the file goes with its descriptor, however this process ends.
    match crate::sys::link_unnamed(&file, real) {
        Ok(()) => Ok(Some(true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            lost(path, real).map(|()| Some(false))
        }
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// [`create_missing`] through a file of ours with a random name, renamed to the registry's
/// path once whole; `None` where neither a rename nor a hard link can put it in place
/// without replacing (ours is removed then).
fn create_named(path: &Path, real: &Path) -> Result<Option<bool>> {
    remove_leftovers(real);
    let mut ours = Ours::create(real).map_err(|e| create_err(path, &real.display(), e))?;
    ours.file
        .write_all(IMAGE)
        .and_then(|()| ours.file.sync_data())
        .map_err(|e| create_err(path, &ours.path.display(), e))?;
    match crate::sys::rename_no_replace(&ours.path, real) {
        Ok(()) => {
            ours.placed = true;
            Ok(Some(true))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            lost(path, real).map(|()| Some(false))
        }
        Err(e) if e.kind() == io::ErrorKind::Unsupported => match fs::hard_link(&ours.path, real) {
            // Removing our name leaves the registry with one: an open refuses a registry
            // with two. Where it cannot go, neither does the registry stay.
            // (Gone already is as good: an open that found the registry with two names
            // removes ours, see `remove_second_name`.)
            Ok(()) => match fs::remove_file(&ours.path).or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }) {
                Ok(()) => {
                    ours.placed = true;
                    Ok(Some(true))
                }
                Err(e) => {
                    if let Err(error) = fs::remove_file(real) {
                        tracing::debug!(path = %real.display(), %error,
                            "could not remove the registry just linked");
                    }
                    Err(create_err(path, &ours.path.display(), e))
                }
            },
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                lost(path, real).map(|()| Some(false))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied
                ) =>
            {
                tracing::debug!(error = %e, path = %real.display(),
                    "no way to put a new registry in place whole; creating it in place");
                Ok(None)
            }
            Err(e) => Err(create_err(path, &real.display(), e)),
        },
        Err(e) => Err(create_err(path, &real.display(), e)),
    }
}

/// A file appeared at `real` while the registry was being created (put there by something
/// that does not take the write lock): it wins, and is checked as the open checked the path
/// before, so that SQLite never opens a file that is not ours (and might roll a journal
/// back into it).
fn lost(path: &Path, real: &Path) -> Result<()> {
    tracing::warn!(path = %real.display(),
        "a file appeared at the registry's path while the registry was being created");
    super::vet::check_existing_file(path, real, true).map(|_| ())
}

/// The directory of the file `real`.
fn directory_of(real: &Path) -> &Path {
    match real.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// [`Error::Open`] for a failure while creating the registry whole, naming the file.
fn create_err(path: &Path, file: &dyn std::fmt::Display, e: io::Error) -> Error {
    Error::Open {
        path: path.to_owned(),
        reason: Some(format!("while creating the new registry as {file}")),
        source: Some(e.into()),
    }
}

/// Our file beside the registry: removed on drop unless it was put in place, and only while
/// its name still leads to it.
struct Ours {
    path: PathBuf,
    file: File,
    placed: bool,
}

impl Ours {
    /// Creates our file beside `real` under a random name: never through a link, never a
    /// file that is there already, mode `0600`.
    fn create(real: &Path) -> io::Result<Self> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let path = sibling(real, &format!("{MARK}{}", random_name()));
            match open_new(&path) {
                Ok(file) => {
                    return Ok(Self {
                        path,
                        file,
                        placed: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()))
    }
}

/// Creates the file `path` for writing, mode `0600`: never through a symbolic link, never
/// a file that is there already (`ErrorKind::AlreadyExists` for either).
fn open_new(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    crate::sys::private_file(&mut options);
    crate::sys::open_flags(&mut options, true, false);
    options.open(path)
}

impl Drop for Ours {
    fn drop(&mut self) {
        if self.placed {
            return;
        }
        let mine = self
            .file
            .metadata()
            .ok()
            .and_then(|m| crate::sys::file_id(&m));
        let still =
            fs::symlink_metadata(&self.path).is_ok_and(|meta| crate::sys::file_id(&meta) == mine);
        if !still {
            return;
        }
        if let Err(error) = fs::remove_file(&self.path) {
            tracing::debug!(file = %self.path.display(), %error,
                "could not remove the file of a registry being created");
        }
    }
}

/// [`RANDOM_LEN`] characters of [`ALPHABET`], from std's randomly keyed hasher.
fn random_name() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    let mut bits = hasher.finish();
    (0..RANDOM_LEN)
        .map(|_| {
            let c = ALPHABET[(bits % ALPHABET.len() as u64) as usize];
            bits /= ALPHABET.len() as u64;
            char::from(c)
        })
        .collect()
}

/// Whether `name` is the name of one of our files for the registry named `registry`.
fn is_our_name(registry: &std::ffi::OsStr, name: &std::ffi::OsStr) -> bool {
    let (registry, name) = (registry.as_encoded_bytes(), name.as_encoded_bytes());
    name.strip_prefix(registry)
        .and_then(|rest| rest.strip_prefix(MARK.as_bytes()))
        .is_some_and(|random| {
            random.len() == RANDOM_LEN && random.iter().all(|c| ALPHABET.contains(c))
        })
}

/// Removes the files that creations of the registry at `real` killed before their rename
/// left behind: only names of our pattern that are regular files of the effective user,
/// mode `0600`, with one link, no side file of a registry beside them (no lock file, log or
/// index), and nothing in them but the start of [`IMAGE`] (a creator is killed before,
/// while or after writing it); a leftover of a version whose image differs stays. The
/// caller holds the write lock, so none is in use. A
/// failure is logged and changes nothing else.
fn remove_leftovers(real: &Path) {
    let Some(registry) = real.file_name() else {
        return;
    };
    let Ok(entries) = fs::read_dir(directory_of(real)) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        if !is_our_name(registry, &entry.file_name()) {
            continue;
        }
        let file = entry.path();
        let Ok(meta) = fs::symlink_metadata(&file) else {
            continue;
        };
        // A registry someone named so looks the same by its metadata, and a new one holds
        // the image itself (its commits are in its log): its side files tell it apart.
        let provably_ours = meta.file_type().is_file()
            && crate::sys::owner(&meta) == crate::sys::euid()
            && crate::sys::mode(&meta).is_none_or(|mode| mode == 0o600)
            && crate::sys::links(&meta).is_none_or(|n| n == 1)
            && holds_only_the_image(&file, &meta);
        if !provably_ours {
            continue;
        }
        tracing::warn!(file = %file.display(),
            "removing what a registry creation that was killed left behind");
        if let Err(error) = fs::remove_file(&file) {
            tracing::debug!(file = %file.display(), %error, "could not remove it");
        }
    }
}

/// Removes the second name that a creation killed between its hard link and its unlink (see
/// "The rule": where a rename cannot refuse to replace) left to the registry at `real`: a
/// name of our pattern for it that leads to the registry's own file, where the registry has
/// two links. Says whether it removed one. Only the name goes: the file is the registry.
/// Called only where the registry was refused, so it costs an open nothing otherwise; safe
/// without the write lock, as a creator still between its link and its unlink finds its
/// name gone and leaves it so.
pub(super) fn remove_second_name(real: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(real) else {
        return false;
    };
    let id = crate::sys::file_id(&meta);
    let Some(registry) = real.file_name() else {
        return false;
    };
    // A registry that a creation of ours made: a regular file of the effective user, mode
    // `0600`. Another user's file, in a directory open to others, is left as it is.
    let made_by_us = meta.is_file()
        && crate::sys::owner(&meta) == crate::sys::euid()
        && crate::sys::mode(&meta).is_none_or(|mode| mode == 0o600);
    if id.is_none() || !made_by_us || crate::sys::links(&meta) != Some(2) {
        return false;
    }
    let Ok(entries) = fs::read_dir(directory_of(real)) else {
        return false;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        if !is_our_name(registry, &entry.file_name()) {
            continue;
        }
        let file = entry.path();
        let same =
            fs::symlink_metadata(&file).is_ok_and(|m| m.is_file() && crate::sys::file_id(&m) == id);
        if !same {
            continue;
        }
        tracing::warn!(file = %file.display(), registry = %real.display(),
            "removing the second name a registry creation that was killed left to the registry");
        return match fs::remove_file(&file) {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(file = %file.display(), %error, "could not remove it");
                false
            }
        };
    }
    false
}

/// Whether `file` (whose metadata is `meta`) holds the start of [`IMAGE`] and nothing else,
/// and has none of the side files that opening a registry makes (`.lock`, `-wal`, `-shm`),
/// as a file of ours left before its rename does: a registry whose name only matches our
/// pattern (`ports.db.~abc123` beside `ports.db`) is never taken for one. Read without
/// following a link or blocking on a FIFO put there since.
fn holds_only_the_image(file: &Path, meta: &fs::Metadata) -> bool {
    if meta.len() > IMAGE.len() as u64
        || [".lock", "-wal", "-shm"]
            .iter()
            .any(|side| fs::symlink_metadata(sibling(file, side)).is_ok())
    {
        return false;
    }
    let mut options = OpenOptions::new();
    options.read(true);
    crate::sys::open_flags(&mut options, true, true);
    let Ok(opened) = options.open(file) else {
        return false;
    };
    let same = opened
        .metadata()
        .is_ok_and(|m| m.is_file() && crate::sys::file_id(&m) == crate::sys::file_id(meta));
    let mut bytes = Vec::with_capacity(IMAGE.len());
    same && opened
        .take(IMAGE.len() as u64 + 1)
        .read_to_end(&mut bytes)
        .is_ok()
        && IMAGE.starts_with(&bytes)
}

/// Makes the first commit to the brand-new, still empty log beside `real` without syncing
/// it (see "The new log's first commit" above), then sets `synchronous=NORMAL` again. A log
/// that is not empty is left to SQLite's syncs. The caller holds the write lock and has just
/// created the registry.
pub(super) fn start_log(conn: &Connection, real: &Path) -> rusqlite::Result<()> {
    let empty =
        fs::symlink_metadata(sibling(real, "-wal")).is_ok_and(|m| m.is_file() && m.len() == 0);
    if !empty {
        return Ok(());
    }
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    // `user_version` written back unchanged: page 1, the smallest write there is.
    let written = conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; PRAGMA user_version = {version}; COMMIT;"
    ));
    if written.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole initial image of a registry, built in memory from the migrations, then
    /// marked for WAL mode.
    fn initial_image() -> Vec<u8> {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "page_size", 4096).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let mut image = conn.serialize(rusqlite::MAIN_DB).unwrap().to_vec();
        // The file format's write and read versions: 2 is WAL mode, which the in-memory
        // database (journal in memory) cannot be switched to.
        image[18] = 2;
        image[19] = 2;
        image
    }

    /// The image without the SQLite version that wrote it (header bytes 92 to 99).
    fn without_version(image: &[u8]) -> Vec<u8> {
        let mut image = image.to_vec();
        if image.len() >= 100 {
            image[92..100].fill(0);
        }
        image
    }

    const WRITE_IMAGE: &str = "cargo test --lib -- --ignored write_the_new_registry_image";

    #[test]
    fn the_kept_image_is_what_the_migrations_make() {
        assert!(
            without_version(IMAGE) == without_version(&initial_image()),
            "src/store/sqlite/new_registry.sqlite3 is not what the migrations make: write it \
             anew with `{WRITE_IMAGE}`"
        );
    }

    /// Writes `new_registry.sqlite3` anew, from the migrations: `{WRITE_IMAGE}`.
    #[test]
    #[ignore = "writes the kept image; run when a migration is added"]
    fn write_the_new_registry_image() {
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/sqlite/new_registry.sqlite3");
        fs::write(file, initial_image()).unwrap();
    }

    #[test]
    fn the_initial_image_is_a_whole_registry_in_wal_mode() {
        let image = IMAGE;
        assert_eq!(&image[..16], b"SQLite format 3\0");
        assert_eq!((image[18], image[19]), (2, 2), "WAL mode in the header");
        assert_eq!(u16::from_be_bytes([image[16], image[17]]), 4096);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.sqlite3");
        fs::write(&file, image).unwrap();
        let conn = Connection::open(&file).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, super::super::schema::MIGRATIONS.len() as i64);
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    fn our_names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| is_our_name("r.sqlite3".as_ref(), n))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn both_ways_create_a_whole_registry_and_leave_no_file_of_ours() {
        for named in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let real = dir.path().join("r.sqlite3");
            let created = if named {
                create_named(&real, &real).unwrap().unwrap()
            } else {
                // Where the system has no unnamed files, that is said, and nothing is made.
                match create_unnamed(&real, &real).unwrap() {
                    Some(created) => created,
                    None => {
                        assert!(!real.exists());
                        continue;
                    }
                }
            };
            assert!(created, "named: {named}");
            assert_eq!(fs::read(&real).unwrap(), IMAGE, "named: {named}");
            assert_eq!(our_names(dir.path()), Vec::<std::ffi::OsString>::new());
            // A second creation finds the file and leaves it as it is.
            let second = if named {
                create_named(&real, &real).unwrap().unwrap()
            } else {
                create_unnamed(&real, &real).unwrap().unwrap()
            };
            assert!(!second, "named: {named}");
            assert_eq!(fs::read(&real).unwrap(), IMAGE);
            assert_eq!(our_names(dir.path()), Vec::<std::ffi::OsString>::new());
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_named_creation_removes_only_leftovers_that_are_provably_ours() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("r.sqlite3");
        let at = |name: &str| dir.path().join(format!("r.sqlite3{MARK}{name}"));
        // What a creator killed before its rename leaves.
        drop(open_new(&at("dead00")).unwrap());
        // Not provably ours: a link, a file others may write, another registry's.
        std::os::unix::fs::symlink(dir.path().join("target"), at("link00")).unwrap();
        fs::write(at("open00"), b"x").unwrap();
        fs::set_permissions(at("open00"), fs::Permissions::from_mode(0o666)).unwrap();
        let other = dir.path().join(format!("x.sqlite3{MARK}dead00"));
        drop(open_new(&other).unwrap());
        // Another registry that happens to be named so: a new one holds the image, with its
        // lock file beside it; one of another application holds other bytes.
        fs::write(at("live00"), IMAGE).unwrap();
        fs::set_permissions(at("live00"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(sibling(&at("live00"), ".lock"), b"").unwrap();
        fs::write(at("else00"), b"SQLite format 3\0 of something else").unwrap();
        fs::set_permissions(at("else00"), fs::Permissions::from_mode(0o600)).unwrap();
        // Another user's (only root can make one).
        let theirs = crate::sys::euid() == Some(0) && {
            drop(open_new(&at("them00")).unwrap());
            std::os::unix::fs::chown(at("them00"), Some(65534), Some(65534)).is_ok()
        };
        // A killed creator's file cut short is ours.
        open_new(&at("half00"))
            .unwrap()
            .write_all(&IMAGE[..4096])
            .unwrap();
        assert_eq!(create_named(&real, &real).unwrap(), Some(true));
        let mut expected = vec![
            "r.sqlite3.~else00",
            "r.sqlite3.~link00",
            "r.sqlite3.~live00",
        ];
        expected.push("r.sqlite3.~open00");
        if theirs {
            expected.push("r.sqlite3.~them00");
        }
        assert_eq!(our_names(dir.path()), expected);
        assert_eq!(
            fs::read(at("live00")).unwrap(),
            IMAGE,
            "a registry was changed"
        );
        assert!(other.exists(), "another registry's file was removed");
        assert!(!dir.path().join("target").exists());
    }

    #[cfg(unix)]
    #[test]
    fn a_link_planted_at_our_name_is_neither_followed_nor_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let name = dir.path().join(format!("r.sqlite3{MARK}abc123"));
        std::os::unix::fs::symlink(&target, &name).unwrap();
        let err = open_new(&name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(!target.exists(), "the link was followed");
        assert!(fs::symlink_metadata(&name)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[cfg(unix)]
    #[test]
    fn only_a_second_name_of_our_pattern_to_a_registry_of_ours_is_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("r.sqlite3");
        let second = dir.path().join(format!("r.sqlite3{MARK}kill01"));
        let other_name = dir.path().join("r.sqlite3.backup");
        open_new(&real).unwrap().write_all(IMAGE).unwrap();
        // Another name, not of our pattern: left.
        fs::hard_link(&real, &other_name).unwrap();
        assert!(!remove_second_name(&real));
        assert!(other_name.exists());
        fs::remove_file(&other_name).unwrap();
        // A file others may read (not what a creation makes): left.
        fs::hard_link(&real, &second).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!remove_second_name(&real));
        assert!(second.exists());
        // Another user's: left.
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
        if crate::sys::euid() == Some(0) {
            std::os::unix::fs::chown(&real, Some(65534), None).unwrap();
            assert!(!remove_second_name(&real));
            assert!(second.exists());
            std::os::unix::fs::chown(&real, Some(0), None).unwrap();
        }
        // Ours, as a creation killed between its link and its unlink leaves it: removed.
        assert!(remove_second_name(&real));
        assert!(!second.exists());
        assert_eq!(fs::read(&real).unwrap(), IMAGE);
    }

    #[test]
    fn only_names_of_our_pattern_for_this_registry_are_ours() {
        let ours = |name: &str| is_our_name("r.sqlite3".as_ref(), name.as_ref());
        assert!(ours("r.sqlite3.~ab12z9"));
        assert!(!ours("r.sqlite3.~ab12z"), "too short");
        assert!(!ours("r.sqlite3.~ab12z90"), "too long");
        assert!(!ours("r.sqlite3.~AB12z9"), "not of the alphabet");
        assert!(!ours("r.sqlite3.nightly"), "a name people give files");
        assert!(!ours("r.sqlite3.lock"));
        assert!(!ours("x.sqlite3.~ab12z9"), "another registry's");
        let name = random_name();
        assert!(ours(&format!("r.sqlite3{MARK}{name}")), "{name}");
    }
}
