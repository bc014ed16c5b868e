//! The record of the last integrity check of a registry file, so that an open does not
//! check again a file that nothing has written since.
//!
//! `PRAGMA quick_check` reads every page of the file. On a long-lived registry, whose names
//! table remembers a port for thousands of names, that costs a fresh process (a test under
//! nextest, a call of the command) more than everything else it does, and every such process
//! used to pay it. What it found stays true while the file stays as it was: in WAL mode
//! SQLite writes the registry file only when it checkpoints, and every commit since it was
//! checked went to the log, through SQLite.
//!
//! So an open that checked the file in full records the file as it was checked
//! ([`FileStamp`]: device, inode, size, modification and change times) in the registry's
//! lock file, under the write lock; the next open that finds the file so, under the same
//! lock, checks only the tables of leases and reserved ports, which are small and are what
//! keeps a port from two holders (damage that no write reports, the disk's own, shows there
//! before a claim reads it). A write to the file moves its change time, which no program can
//! set back: a checkpoint by another program, a copy over it, damage by anything that is not
//! SQLite. The next open then checks it in full again. An open during which the file changed,
//! or that checkpointed the log into it, records nothing, and neither do a long-lived
//! process's automatic checkpoints, so the next open after any of these checks in full. What
//! a program of the user commits through SQLite is not damage the record sees, as it never
//! was: such a program can free any port with a valid `DELETE`.
//!
//! A file clock that moves only every few milliseconds, or every second (Linux before 6.13,
//! file systems with coarse times, and on later kernels a file whose times nobody asked for
//! since it last changed), gives a write in the tick of the file's last change no new time.
//! Two rules keep such a write from hiding behind a stamp, as git's rule for its index does:
//! - a full check first removes the record and reads the file clock (it touches the lock
//!   file), then stamps the file; it records the stamp only if the file last changed
//!   strictly before that reading, so that a write during the check, after the stamp, falls
//!   in a later tick and moves the file's times;
//! - a record counts only for a file that last changed strictly before the record was
//!   written (the lock file's own modification time).
//!
//! The record is one line of text, [`TAG`] then the numbers; anything else in the lock file
//! (older versions leave it empty, and never read it) counts as no record. So the first full
//! check after a change of the file often records nothing (the change and the check share a
//! tick), and the one after it does. It is written only
//! over nothing or over a record (of any version, or cut short): a lock file that holds
//! anything else, or that has another name too (a hard link), is left as it is, and every
//! open checks in full. Writing it is best effort: a failure costs the next open a check,
//! nothing else. Where files have no identity or change times, every open checks.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The first word of a record of any version of its format: what this module may write over.
const OURS: &str = "portdaddy-checked ";

/// The first words of a record, with its format's version.
const TAG: &str = "portdaddy-checked 1";

/// The most a record takes, with room to spare; more in the file is no record.
const MAX_LEN: u64 = 160;

/// What tells a file apart from itself after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileStamp {
    id: (u64, u64),
    size: u64,
    /// `mtime` and `ctime`, each in seconds and nanoseconds.
    times: [i64; 4],
}

impl FileStamp {
    /// The stamp of the file at `path` (not through a link); `None` where it cannot be read,
    /// or the platform does not tell.
    pub(super) fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(Self {
            id: crate::sys::file_id(&meta)?,
            size: meta.len(),
            times: crate::sys::change_times(&meta)?,
        })
    }

    /// When the file last changed, content or inode.
    fn changed(&self) -> (i64, i64) {
        (self.times[2], self.times[3])
    }

    fn to_line(self) -> String {
        let [ms, mns, cs, cns] = self.times;
        format!(
            "{TAG} {} {} {} {ms} {mns} {cs} {cns}\n",
            self.id.0, self.id.1, self.size
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(TAG)?.strip_suffix('\n')?;
        let mut words = rest.split(' ');
        if !words.next()?.is_empty() {
            return None;
        }
        let mut unsigned = || words.next()?.parse::<u64>().ok();
        let (dev, ino, size) = (unsigned()?, unsigned()?, unsigned()?);
        let mut times = [0i64; 4];
        for time in &mut times {
            *time = words.next()?.parse().ok()?;
        }
        words.next().is_none().then_some(Self {
            id: (dev, ino),
            size,
            times,
        })
    }
}

/// What the lock file says of the last check: the file as it was left, and when that was
/// written; and whether a record may be written there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct LastCheck {
    record: Option<FileStamp>,
    /// The lock file's modification time, in seconds and nanoseconds.
    written: Option<(i64, i64)>,
    /// The lock file has no other name, and holds nothing or what a record left: a file
    /// that is also another (a hard link) or holds something else is never written.
    writable: bool,
    /// The lock file holds nothing.
    empty: bool,
}

/// The file system's time when a full check began, by the lock file's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CheckStart((i64, i64));

impl LastCheck {
    /// Reads the record in the lock file `lock` (held); no record if it holds anything else,
    /// or has another name.
    pub(super) fn read(lock: &File) -> Self {
        let Ok(meta) = lock.metadata() else {
            return Self::default();
        };
        if crate::sys::links(&meta) != Some(1) {
            return Self::default();
        }
        let mut reader = lock;
        let mut text = String::new();
        let read = reader
            .seek(SeekFrom::Start(0))
            .and_then(|_| reader.take(MAX_LEN + 1).read_to_string(&mut text));
        if read.is_err() {
            return Self::default();
        }
        // A record cut short (a process killed as it wrote), or of another version of the
        // format, is ours to write over.
        let writable = text.is_empty() || text.starts_with(OURS);
        Self {
            record: FileStamp::parse(&text),
            written: crate::sys::change_times(&meta).map(|[s, ns, ..]| (s, ns)),
            writable,
            empty: text.is_empty(),
        }
    }

    /// Whether a file whose stamp is `now` is as the last check left it: the stamp is the
    /// one recorded, and the file last changed before the record was written.
    pub(super) fn covers(&self, now: Option<FileStamp>) -> bool {
        match (now, self.record, self.written) {
            (Some(now), Some(record), Some(written)) => now == record && now.changed() < written,
            _ => false,
        }
    }

    /// Before a full check, and before the file is stamped for it: removes the record, so
    /// that none counts if the check fails or the process dies, and reads the file system's
    /// clock by touching the lock file (`lock`, held, the one read). `None` where no record
    /// is to be written.
    pub(super) fn begin_check(&self, lock: &File) -> Option<CheckStart> {
        if !self.writable {
            return None;
        }
        if !self.empty {
            lock.set_len(0).ok()?;
        }
        crate::sys::touch(lock).ok()?;
        let [s, ns, ..] = crate::sys::change_times(&lock.metadata().ok()?)?;
        Some(CheckStart((s, ns)))
    }

    /// After a full check that began at `start` and passed, on a file stamped `stamp` just
    /// after `start` and found so after the check: records it in the lock file `lock` (held).
    /// Only if the file last changed before the check began: a write in the tick of `start`
    /// or later, during the check, would otherwise hide behind the stamp.
    pub(super) fn record(&self, lock: &File, stamp: FileStamp, start: CheckStart, path: &Path) {
        if stamp.changed() < start.0 {
            write(lock, stamp, path);
        }
    }
}

/// Writes `stamp` in the lock file `lock` (held), in place of what it held.
fn write(lock: &File, stamp: FileStamp, path: &Path) {
    let line = stamp.to_line();
    let mut writer = lock;
    let written = writer
        .seek(SeekFrom::Start(0))
        .and_then(|_| writer.write_all(line.as_bytes()))
        .and_then(|()| lock.set_len(line.len() as u64));
    if let Err(error) = written {
        tracing::debug!(path = %path.display(), %error,
            "could not record the integrity check in the lock file; the next open checks again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> FileStamp {
        FileStamp {
            id: (2049, 1_234_567),
            size: 28_672,
            times: [1_764_700_000, 123_456_789, 1_764_700_001, 987_654_321],
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let line = stamp().to_line();
        assert!(line.len() as u64 <= MAX_LEN, "{line}");
        assert_eq!(FileStamp::parse(&line), Some(stamp()));
    }

    #[test]
    fn anything_but_a_whole_record_is_no_record() {
        let line = stamp().to_line();
        for bad in [
            String::new(),
            "\n".into(),
            line.trim_end().to_owned(),
            line.replace("checked 1", "checked 2"),
            line.replacen(' ', "  ", 3),
            line.replace('\n', " 7\n"),
            line.replace("28672", "-28672"),
            line.replace("28672", "x"),
            format!("{line}{line}"),
            line[..line.len() / 2].to_owned(),
        ] {
            assert_eq!(FileStamp::parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_record_covers_only_its_file_changed_before_it_was_written() {
        let written = |record: Option<FileStamp>, written| LastCheck {
            record,
            written: Some(written),
            writable: true,
            empty: false,
        };
        let (s, ns) = stamp().changed();
        let after = written(Some(stamp()), (s, ns + 1));
        assert!(after.covers(Some(stamp())));
        // Changed in the tick the record was written, or after: a write may hide there.
        assert!(!written(Some(stamp()), (s, ns)).covers(Some(stamp())));
        assert!(!written(Some(stamp()), (s - 1, 999_999_999)).covers(Some(stamp())));
        let other = FileStamp {
            size: 4096,
            ..stamp()
        };
        assert!(!after.covers(Some(other)));
        assert!(!after.covers(None));
        assert!(!written(None, (s + 1, 0)).covers(Some(stamp())));
        assert!(!LastCheck::default().covers(Some(stamp())));
    }

    /// Begins a check on the lock file `file` and records `stamp` after it, as an open does.
    fn check_and_record(file: &File, stamp: FileStamp, path: &Path) {
        let last = LastCheck::read(file);
        if let Some(start) = last.begin_check(file) {
            last.record(file, stamp, start, path);
        }
    }

    #[test]
    fn the_lock_file_holds_the_last_record_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        std::fs::write(&path, vec![b'x'; 500]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        assert_eq!(LastCheck::read(&file).record, None, "garbage is no record");
        check_and_record(&file, stamp(), &path);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![b'x'; 500],
            "not ours to write"
        );

        std::fs::write(&path, b"").unwrap();
        check_and_record(&file, stamp(), &path);
        assert_eq!(LastCheck::read(&file).record, Some(stamp()));
        let newer = FileStamp {
            size: 4096,
            ..stamp()
        };
        check_and_record(&file, newer, &path);
        assert_eq!(LastCheck::read(&file).record, Some(newer));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), newer.to_line());

        // Cut short, as by a process killed while it wrote: written over.
        let line = stamp().to_line();
        std::fs::write(&path, &line[..line.len() / 2]).unwrap();
        assert_eq!(LastCheck::read(&file).record, None);
        check_and_record(&file, stamp(), &path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line);
    }

    #[cfg(unix)]
    #[test]
    fn a_check_removes_the_record_and_records_only_a_file_changed_before_it_began() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.lock");
        std::fs::write(&path, stamp().to_line()).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let last = LastCheck::read(&file);
        let start = last.begin_check(&file).expect("a lock file of ours");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"",
            "no record while checking"
        );
        let during = FileStamp {
            times: [start.0 .0, start.0 .1, start.0 .0, start.0 .1],
            ..stamp()
        };
        last.record(&file, during, start, &path);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"",
            "changed as the check began"
        );
        last.record(&file, stamp(), start, &path);
        assert_eq!(LastCheck::read(&file).record, Some(stamp()));
    }

    #[cfg(unix)]
    #[test]
    fn a_lock_file_with_another_name_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, b"").unwrap();
        let path = dir.path().join("r.lock");
        std::fs::hard_link(&other, &path).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        check_and_record(&file, stamp(), &path);
        assert_eq!(
            std::fs::read(&other).unwrap(),
            b"",
            "the other name's file was written"
        );
    }
}
