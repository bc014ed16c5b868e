//! What a registry tells about itself: counters, the state of each lease, releasing a name,
//! handing a lease to its owner, and the diagnosis of a registry file. Each behaviour is
//! checked over both backends where it applies.
//!
//! Ports 27000-27499 belong to this file (see `common`); most tests use a port probe that
//! says every port is free and bind nothing.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{all_free, temp_registry, FakeClock, FakeProcesses};
use portdaddy::{Error, LeaseState, Owner, PortDaddy, PortRange, Request, Stats, Status};

/// A registry of each backend over `range`, with fake processes and a fake clock. The
/// temp dir of the file registry lives as long as the returned value.
fn both(
    range: std::ops::RangeInclusive<u16>,
    procs: &FakeProcesses,
    clock: &FakeClock,
) -> Vec<(&'static str, PortDaddy, Option<tempfile::TempDir>)> {
    let (dir, path) = temp_registry();
    let file = PortDaddy::builder()
        .path(&path)
        .range(range.clone())
        .port_probe(all_free)
        .process_probe(procs.probe())
        .clock(clock.as_fn())
        .open()
        .unwrap();
    let memory = PortDaddy::builder()
        .in_memory()
        .range(range)
        .port_probe(all_free)
        .process_probe(procs.probe())
        .clock(clock.as_fn())
        .open()
        .unwrap();
    vec![("file", file, Some(dir)), ("memory", memory, None)]
}

fn counters(s: &Stats) -> [u64; 5] {
    [s.acquired, s.released, s.reaped, s.exhausted, s.errors]
}

#[test]
fn stats_count_acquisitions_releases_reclaims_and_failures() {
    let procs = FakeProcesses::default();
    let clock = FakeClock::new();
    for (kind, registry, _dir) in both(27000..=27002, &procs, &clock) {
        assert_eq!(
            registry.stats().unwrap(),
            Stats::default(),
            "{kind}: starts at zero"
        );

        let a = registry.acquire("a").unwrap();
        let batch = registry.acquire_many(&["b", "c"]).unwrap();
        // The range is full: a failed claim counts as exhausted, not as acquired.
        assert!(matches!(
            registry.acquire("d"),
            Err(Error::Exhausted { .. })
        ));
        // Refused before the registry is touched: counts nothing.
        assert!(matches!(
            registry.acquire("bad\nname"),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            registry.acquire_with(&Request::new("d").require(a.port())),
            Err(Error::PortUnavailable { .. })
        ));
        let s = registry.stats().unwrap();
        assert_eq!(counters(&s), [3, 0, 0, 1, 1], "{kind}: {s:?}");
        assert_eq!((s.live, s.detached, s.stale), (3, 0, 0), "{kind}");

        a.release().unwrap();
        let [b, c]: [portdaddy::PortGuard; 2] = batch.try_into().unwrap();
        assert!(registry.release_port(b.port()).unwrap());
        drop(b); // already released by port: counts nothing more
        let kept = c.keep().unwrap();
        let s = registry.stats().unwrap();
        assert_eq!(counters(&s), [3, 2, 0, 1, 1], "{kind}: {s:?}");
        assert_eq!((s.live, s.detached), (0, 1), "{kind}");
        assert!(registry.release_lease(&kept).unwrap());

        // Two leases of a process that then dies: one reclaimed by reap, one by a claim.
        let ghost = procs.spawn(4_000_001);
        let g1 = registry
            .acquire_with(&Request::new("g1").owner(ghost.clone()))
            .unwrap()
            .into_lease();
        procs.kill(&ghost);
        assert_eq!(registry.stats().unwrap().stale, 1, "{kind}");
        assert_eq!(registry.reap().unwrap(), 1);
        let ghost = procs.spawn(4_000_002);
        let g2 = registry
            .acquire_with(&Request::new("g2").owner(ghost.clone()).require(g1.port()))
            .unwrap()
            .into_lease();
        procs.kill(&ghost);
        let taker = registry
            .acquire_with(&Request::new("taker").require(g2.port()))
            .unwrap();
        let s = registry.stats().unwrap();
        assert_eq!(counters(&s), [6, 3, 2, 1, 1], "{kind}: {s:?}");
        assert_eq!((s.live, s.stale), (1, 0), "{kind}");
        drop(taker);
    }
}

#[test]
fn a_failed_batch_counts_one_failure_and_no_acquisition() {
    let procs = FakeProcesses::default();
    let clock = FakeClock::new();
    for (kind, registry, _dir) in both(27010..=27011, &procs, &clock) {
        assert!(registry.acquire_many(&["a", "b", "c"]).is_err());
        let s = registry.stats().unwrap();
        assert_eq!(counters(&s), [0, 0, 0, 1, 0], "{kind}: {s:?}");
        assert_eq!(s.live, 0, "{kind}: the batch left nothing behind");
    }
}

#[test]
fn stats_persist_in_the_file_for_every_handle() {
    let (_dir, path) = temp_registry();
    let open = || {
        PortDaddy::builder()
            .path(&path)
            .range(27020..=27029)
            .port_probe(all_free)
            .open()
            .unwrap()
    };
    {
        let first = open();
        drop(first.acquire_many(&["x", "y"]).unwrap());
    }
    let s = open().stats().unwrap();
    assert_eq!(counters(&s), [2, 2, 0, 0, 0], "{s:?}");
}

#[test]
fn state_of_tells_live_dead_expired_and_detached_apart() {
    let procs = FakeProcesses::default();
    let clock = FakeClock::new();
    for (kind, registry, _dir) in both(27030..=27039, &procs, &clock) {
        let owner = procs.spawn(4_000_010);
        let owned = registry
            .acquire_with(&Request::new("owned").owner(owner.clone()))
            .unwrap()
            .into_lease();
        let mine = registry
            .acquire_with(&Request::new("mine").ttl(Duration::from_secs(60)))
            .unwrap();
        let detached = registry.acquire("detached").unwrap().keep().unwrap();
        assert_eq!(registry.state_of(&owned), LeaseState::Live, "{kind}");
        assert_eq!(registry.state_of(mine.lease()), LeaseState::Live, "{kind}");
        assert_eq!(registry.state_of(&detached), LeaseState::Detached, "{kind}");

        procs.kill(&owner);
        clock.advance(Duration::from_secs(61));
        assert_eq!(registry.state_of(&owned), LeaseState::Dead, "{kind}");
        assert_eq!(
            registry.state_of(mine.lease()),
            LeaseState::Expired,
            "{kind}"
        );
        assert!(!LeaseState::Dead.holds_port() && !LeaseState::Expired.holds_port());
        assert_eq!(LeaseState::Detached.to_string(), "detached");
        drop(mine);
    }
}

#[test]
fn release_name_releases_every_lease_of_that_name_and_nothing_else() {
    let procs = FakeProcesses::default();
    let clock = FakeClock::new();
    for (kind, registry, _dir) in both(27040..=27049, &procs, &clock) {
        let other = procs.spawn(4_000_020);
        let web1 = registry.acquire("web").unwrap().keep().unwrap();
        clock.advance(Duration::from_secs(1)); // oldest first: web1, then web2
        let web2 = registry
            .acquire_with(&Request::new("web").owner(other))
            .unwrap()
            .into_lease();
        let db = registry.acquire("db").unwrap();
        assert_eq!(
            registry.release_name("web").unwrap(),
            [web1, web2],
            "{kind}"
        );
        assert_eq!(registry.list().unwrap(), [db.lease().clone()], "{kind}");
        assert!(registry.release_name("web").unwrap().is_empty(), "{kind}");
        assert!(
            registry.release_name("nobody").unwrap().is_empty(),
            "{kind}"
        );
        assert_eq!(registry.stats().unwrap().released, 2, "{kind}");
    }
}

#[test]
fn into_lease_leaves_the_lease_to_its_owner_until_that_owner_dies() {
    let procs = FakeProcesses::default();
    let clock = FakeClock::new();
    for (kind, registry, _dir) in both(27050..=27050, &procs, &clock) {
        let caller = procs.spawn(4_000_030);
        let lease = registry
            .acquire_with(&Request::new("svc").owner(caller.clone()))
            .unwrap()
            .into_lease();
        assert_eq!(lease.owner(), Some(&caller), "{kind}");
        assert_eq!(
            registry.list().unwrap(),
            std::slice::from_ref(&lease),
            "{kind}: not released"
        );
        assert!(
            matches!(registry.acquire("next"), Err(Error::Exhausted { .. })),
            "{kind}: the port stays held while the owner lives"
        );
        procs.kill(&caller);
        assert_eq!(
            registry.acquire("next").unwrap().port(),
            lease.port(),
            "{kind}"
        );
    }
}

#[test]
fn a_lease_left_to_this_process_keeps_its_owner_lock_file_held_after_the_handle_drops() {
    // Other PID namespaces judge this process by that lock file: it must stay locked as long
    // as the process runs, not only as long as the handle that took the lease.
    let (dir, path) = temp_registry();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(27060..=27060)
        .port_probe(all_free)
        .open()
        .unwrap();
    let lease = registry.acquire("svc").unwrap().into_lease();
    drop(registry);
    let owners: Vec<_> = std::fs::read_dir(dir.path().join("registry.sqlite3.owners"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(owners.len(), 1, "{owners:?}");
    let err = std::fs::File::open(&owners[0])
        .unwrap()
        .try_lock()
        .expect_err("the owner lock file must still be locked");
    assert!(matches!(err, std::fs::TryLockError::WouldBlock), "{err:?}");
    let reopened = PortDaddy::open(&path).unwrap();
    assert_eq!(reopened.list().unwrap(), std::slice::from_ref(&lease));
}

#[cfg(target_os = "linux")]
#[test]
fn diagnose_judges_owners_of_another_pid_namespace_by_their_lock_files_and_removes_none() {
    use std::os::unix::fs::MetadataExt;
    let (dir, path) = temp_registry();
    // This handle's lock file stands for a live owner in another namespace.
    let registry = PortDaddy::builder()
        .path(&path)
        .range(27110..=27119)
        .port_probe(all_free)
        .open()
        .unwrap();
    let owners = dir.path().join("registry.sqlite3.owners");
    let held = std::fs::read_dir(&owners).unwrap().next().unwrap().unwrap();
    let held = held.file_name().into_string().unwrap();
    // A lock file nobody holds stands for a dead one.
    let unheld = "7-4000001-1-abc";
    std::fs::write(owners.join(unheld), b"").unwrap();
    let ns = std::fs::metadata("/proc/self/ns/pid").unwrap().ino() as i64;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    for (port, lock) in [(27110, held.as_str()), (27111, unheld)] {
        conn.execute(
            "INSERT INTO leases (port, id, name, protocol, owner_pid, owner_start, owner_boot,
                                 acquired_at, owner_ns, owner_lock)
             VALUES (?1, ?1, 'container', 1, 4000001, 1, ?2, 0, ?3, ?4)",
            rusqlite::params![port, boot.trim(), ns + 1, lock],
        )
        .unwrap();
    }
    drop(conn);
    let before = snapshot(&owners);
    let d = PortDaddy::diagnose(&path, range(27110, 27119));
    let stale = d.check("stale leases").unwrap();
    assert_eq!(stale.status, Status::Warn, "{d}");
    assert!(stale.detail.contains("1 of 2"), "{d}");
    assert_eq!(snapshot(&owners), before, "diagnosing removed a lock file");
    drop(registry);
}

fn range(start: u16, end: u16) -> PortRange {
    PortRange::new(start, end).unwrap()
}

/// Every file in `dir` with a digest of its bytes, to show that diagnosing changed nothing.
fn snapshot(dir: &Path) -> Vec<(String, u64)> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let mut h = DefaultHasher::new();
            std::fs::read(e.path()).unwrap_or_default().hash(&mut h);
            (e.file_name().to_string_lossy().into_owned(), h.finish())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn diagnose_passes_a_healthy_registry_and_changes_nothing() {
    let (dir, _) = temp_registry();
    // In a directory the registry creates itself, so that its mode is the one portdaddy sets.
    let path = dir.path().join("state").join("registry.sqlite3");
    let open = || {
        PortDaddy::builder()
            .path(&path)
            .range(27060..=27069)
            .port_probe(all_free)
            .open()
            .unwrap()
    };
    drop(open().acquire("kept").unwrap().keep().unwrap());
    let state = path.parent().unwrap();
    // The `-shm` beside it is SQLite's index of the log, which a reader rebuilds from the log
    // when no process has the registry open (as the next process would): its bytes may
    // change, the files may not.
    let without_index = |mut files: Vec<(String, u64)>| {
        for (name, digest) in &mut files {
            if name.ends_with("-shm") {
                *digest = 0;
            }
        }
        files
    };
    let before = without_index(snapshot(state));
    let d = PortDaddy::diagnose(&path, range(27060, 27069));
    assert_eq!(
        without_index(snapshot(state)),
        before,
        "diagnosing wrote nothing"
    );
    for topic in [
        "registry path",
        "directory permissions",
        "file permissions",
        "schema version",
        "journal mode",
        "integrity",
        "port range",
        "stale leases",
    ] {
        assert_eq!(
            d.check(topic).map(|c| c.status),
            Some(Status::Ok),
            "{topic}: {d}"
        );
    }
    assert_eq!(d.journal_mode.as_deref(), Some("wal"));
    assert_eq!(d.schema_found, Some(d.schema_supported));

    // The same while another handle has the registry open (its WAL file exists).
    let registry = open();
    let _held = registry.acquire("held").unwrap();
    let d = PortDaddy::diagnose(&path, range(27060, 27069));
    assert!(!d.has_failures(), "{d}");
    assert!(
        d.check("stale leases").unwrap().detail.contains("2 leases"),
        "{d}"
    );
}

#[test]
fn diagnose_warns_of_a_missing_registry_without_creating_it() {
    let (dir, path) = temp_registry();
    let d = PortDaddy::diagnose(&path, range(27070, 27079));
    assert!(!d.has_failures(), "{d}");
    assert_eq!(d.check("registry path").unwrap().status, Status::Warn);
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing created"
    );
}

#[test]
fn diagnose_fails_a_foreign_file_and_leaves_it_untouched() {
    let (dir, path) = temp_registry();
    std::fs::write(&path, b"not a database at all").unwrap();
    let before = snapshot(dir.path());
    let d = PortDaddy::diagnose(&path, range(27080, 27089));
    assert!(d.has_failures(), "{d}");
    assert_eq!(d.check("integrity").unwrap().status, Status::Fail, "{d}");
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn diagnose_fails_a_registry_that_needs_a_newer_reader() {
    let (_dir, path) = temp_registry();
    drop(PortDaddy::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('min_reader_version', 99)",
        [],
    )
    .unwrap();
    drop(conn);
    let d = PortDaddy::diagnose(&path, range(27090, 27099));
    assert_eq!(d.schema_found, Some(d.schema_supported));
    let check = d.check("schema version").unwrap();
    assert_eq!(check.status, Status::Fail, "{d}");
    assert!(check.detail.contains("min_reader_version"), "{d}");
}

#[test]
fn diagnose_warns_of_stale_leases_and_an_ephemeral_overlap() {
    let (_dir, path) = temp_registry();
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let owner = Owner::of_pid(child.id()).unwrap();
    {
        let registry = PortDaddy::builder()
            .path(&path)
            .range(27100..=27109)
            .port_probe(all_free)
            .open()
            .unwrap();
        let _ = registry
            .acquire_with(&Request::new("orphan").owner(owner))
            .unwrap()
            .into_lease();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let eph = PortRange::ephemeral();
    let d = PortDaddy::diagnose(&path, eph);
    assert_eq!(d.check("stale leases").unwrap().status, Status::Warn, "{d}");
    assert!(
        d.check("stale leases").unwrap().detail.contains("1 of 1"),
        "{d}"
    );
    assert_eq!(d.check("port range").unwrap().status, Status::Warn, "{d}");
    assert!(!d.has_failures(), "{d}");
}

#[cfg(unix)]
#[test]
fn diagnose_warns_of_a_registry_other_users_can_reach() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, path) = temp_registry();
    drop(PortDaddy::open(&path).unwrap());
    assert_eq!(
        PortDaddy::diagnose(&path, range(27110, 27119))
            .check("file permissions")
            .unwrap()
            .status,
        Status::Ok
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = PortDaddy::diagnose(&path, range(27110, 27119));
    assert_eq!(
        d.check("file permissions").unwrap().status,
        Status::Warn,
        "{d}"
    );
    assert!(
        d.check("file permissions").unwrap().detail.contains("0644"),
        "{d}"
    );
    assert_eq!(
        d.check("directory permissions").unwrap().status,
        Status::Warn,
        "{d}"
    );
    assert!(!d.has_failures(), "{d}");
}
