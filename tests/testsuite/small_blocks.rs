//! A full file system whose blocks are smaller than a memory page (ext4 makes 1 KiB blocks
//! below 512 MB): SQLite maps its index of the write-ahead log (`-shm`) with holes there,
//! and a store into one on a full disk raised `SIGBUS`. Every process must fail with an
//! error instead, and work again once there is room. The same holes, in an index that
//! another process has open, must be allocated as soon as the index is mapped.
//!
//! Ports 33400-33449 belong to this file (see `common`).

use crate::common;

/// The ports of this file.
const RANGE: std::ops::RangeInclusive<u16> = 33400..=33449;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::process::{Command, Stdio};

/// What each step runs, in a mount namespace of its own (so that the ext4 image's mount,
/// and its loop device, go when the script ends, whatever happens): arguments are the
/// working directory and the `portdaddy` command. It prints `SKIP <why>` where it cannot
/// mount the image, else one line `<step> <free KiB> <exit code>` per call.
const SCRIPT: &str = r#"
set -u
work=$1 pd=$2
img=$work/img mnt=$work/mnt
truncate -s 16M "$img" && mkfs.ext4 -q -F -b 1024 "$img" >/dev/null 2>&1 &&
    mkdir "$mnt" && mount -o loop "$img" "$mnt" || { echo "SKIP cannot make and mount a small ext4 image"; exit 0; }
export PORTDADDY_DB=$mnt/r/registry.sqlite3 PORTDADDY_RANGE=33400-33449
# Fills the file system to its last block (root takes the reserved ones too), then frees
# $1 KiB of it.
fill() {
    rm -f "$mnt/fill"; sync
    fallocate -l $(( $(stat -f -c '%f*%S' "$mnt") - 1048576 )) "$mnt/fill"
    dd if=/dev/zero of="$mnt/fill" bs=1k oflag=append conv=notrunc status=none 2>/dev/null
    sync
    truncate -s $(( $(stat -c %s "$mnt/fill") - $1 * 1024 )) "$mnt/fill"; sync
}
call() {
    step=$1 free=$2; shift 2
    "$pd" "$@" >/dev/null 2>>"$work/stderr"; echo "$step $free $?"
}
# A new registry on a nearly full disk.
for free in 40 48 56 64; do
    rm -rf "$mnt/r"; mkdir "$mnt/r"; fill "$free"
    call new "$free" acquire web
    rm -f "$mnt/fill"; sync
    call new-then "$free" acquire web
done
# A registry that exists, whose index went (a cleaner, or a reboot of a tmpfs for it).
for free in 8 16 24 30; do
    rm -rf "$mnt/r" "$mnt/fill"; mkdir "$mnt/r"; sync
    "$pd" acquire --ttl 1h kept >/dev/null 2>>"$work/stderr"
    rm -f "$mnt/r/registry.sqlite3-shm"; fill "$free"
    call list "$free" list
    call doctor "$free" doctor
    call acquire "$free" acquire web
    rm -f "$mnt/fill"; sync
    call list-then "$free" list
    call acquire-then "$free" acquire web
done
"#;

/// On a full ext4 of 1 KiB blocks, `portdaddy` creating a registry, or opening one whose
/// index is gone (`list`, `doctor`, `acquire`), exits with its own code, never killed by a
/// signal; with room again, the next call works.
#[test]
fn a_full_filesystem_of_small_blocks_fails_calls_and_kills_no_process() {
    if !common::is_root() {
        println!("skipped: needs root to mount an ext4 image");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("steps.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    let mut command = Command::new("sh");
    command
        .arg(&script)
        .arg(tmp.path())
        .arg(env!("CARGO_BIN_EXE_portdaddy"));
    crate::common::held::in_new_mount_namespace(&mut command);
    let output = command
        .output()
        .expect("run the steps in a mount namespace");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = std::fs::read_to_string(tmp.path().join("stderr")).unwrap_or_default();
    if let Some(why) = stdout.lines().find_map(|l| l.strip_prefix("SKIP ")) {
        println!("skipped: {why}");
        return;
    }
    assert!(output.status.success(), "{output:?}");
    let steps: Vec<(&str, &str, i32)> = stdout
        .lines()
        .map(|line| {
            let mut parts = line.split(' ');
            let (Some(step), Some(free), Some(code)) = (parts.next(), parts.next(), parts.next())
            else {
                panic!("a line of the steps: {line:?}");
            };
            (step, free, code.parse().unwrap())
        })
        .collect();
    assert_eq!(steps.len(), 4 * 2 + 4 * 5, "{stdout}");
    println!("{stdout}");
    for &(step, free, code) in &steps {
        // 128 + N: killed by signal N (`SIGBUS` is 7). 1: `doctor` found a check failing.
        assert!(
            code < 128,
            "{step} with {free} KiB free was killed by signal {}\n{stdout}\n{stderr}",
            code - 128
        );
        match step {
            "new-then" | "list-then" | "acquire-then" => {
                assert_eq!(code, 0, "{step} with {free} KiB free\n{stdout}\n{stderr}");
            }
            "doctor" => assert!(code <= 1 || code == 4, "{step} {free}: {code}\n{stderr}"),
            _ => assert!(code == 0 || code == 4, "{step} {free}: {code}\n{stderr}"),
        }
    }
    // The disk was full where it mattered: some calls could not go on, and said why.
    assert!(steps.iter().any(|&(_, _, code)| code == 4), "{stdout}");
    assert!(
        stderr.contains("no room for the index") || stderr.contains("disk is full"),
        "{stderr}"
    );
}

/// An index with holes that another process has open (so that SQLite, finding it in use,
/// does not start it over) has every block once an open has mapped it: on a full disk, the
/// holes are where a store raised `SIGBUS`. Any file system shows it: the holes are made
/// by hand here.
#[test]
fn an_index_with_holes_found_in_use_has_every_block_once_mapped() {
    let (dir, path) = common::temp_registry();
    let registry = common::open_unprobed(&path, &RANGE);
    drop(registry.acquire("first").unwrap());
    drop(registry);
    // The last connection of plain SQLite to close folds the log into the file and removes
    // it and its index: with no frame to index, SQLite stores into the index's first page
    // alone, and the holes of the rest stay unless the map fills them.
    let plain = rusqlite::Connection::open(&path).unwrap();
    let _: i64 = plain
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .unwrap();
    drop(plain);
    let shm = dir.path().join("registry.sqlite3-shm");
    assert!(!shm.exists());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&shm)
        .unwrap();
    file.set_len(32 * 1024).unwrap();
    drop(file);
    if std::fs::metadata(&shm).unwrap().blocks() != 0 {
        println!("skipped: this file system allocates the blocks of a file made longer");
        return;
    }
    // SQLite's own sign that a process has the index open: a shared lock on its byte 128.
    let holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys\n\
             f = open(sys.argv[1], 'rb')\n\
             fcntl.lockf(f, fcntl.LOCK_SH, 1, 128)\n\
             print('locked', flush=True)\n\
             sys.stdin.read()",
        ])
        .arg(&shm)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let Ok(mut holder) = holder else {
        println!("skipped: python3, which holds the lock from another process, is missing");
        return;
    };
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "locked\n");
    // Read only: a write would have SQLite clear, and so allocate, the whole region itself.
    let registry = common::open_unprobed(&path, &RANGE);
    assert!(registry.list().unwrap().is_empty());
    let allocated = std::fs::metadata(&shm).unwrap().blocks() * 512;
    drop(registry);
    drop(holder.stdin.take());
    holder.wait().unwrap();
    assert!(
        allocated >= 32 * 1024,
        "{allocated} bytes of the index allocated"
    );
}
