//! The registry's schema, its migrations, and the format policy that lets versions old and
//! new share one registry.
//!
//! # Schema
//!
//! [`MIGRATIONS`] is an append-only list; `PRAGMA user_version` counts how many have run.
//! Never edit or reorder an entry: add a new one. Entries 1 to 5 come from before the first
//! release (one of them rebuilds the `leases` table); they stay, so that the registries made
//! by development builds (`user_version` 1 to 5) are still recognised and migrated. Every
//! entry from here on follows the format policy below; entry 6, the table of reserved
//! ports, is the first.
//!
//! # Registry format
//!
//! One per-user registry is shared by every project of the user, and each project pins its
//! own portdaddy version, so versions old and new use one file at the same time. As in
//! cargo's tracker databases, the format grows only by addition:
//!
//! - A newer version may add tables, columns with a default (or nullable), and `meta` rows.
//!   An older version opens a registry with a higher `user_version` than it knows and keeps
//!   working; it does not migrate anything backwards and never lowers `user_version`.
//! - This version names its columns in every statement (no `SELECT *`, no insert without a
//!   column list), updates rows in place instead of replacing them, and never rebuilds or
//!   drops a table, nor deletes a row or column it does not understand: what a newer version
//!   wrote survives this one. Releasing or reaping a lease deletes its row, with whatever a
//!   newer version added to it; that is what releasing means. Likewise a name's memory
//!   (its `names` row) is deleted when another name takes its port or when it is forgotten
//!   as one of the oldest (the policy's "Forgotten ports").
//! - A newer version's columns on a lease are its own business: this version writes and
//!   clears only the columns it knows (clearing a lease's owner clears the owner columns it
//!   knows), so a newer one must read its own owner columns only together with `owner_pid`.
//! - Only a change to how a port is judged free or an owner alive may lock older versions
//!   out, and it says so with the `meta` row [`MIN_READER_KEY`] (`min_reader_version`): the
//!   oldest format generation that may use the file. This build is generation
//!   [`READER_GENERATION`]; without the row every generation may. A build whose generation
//!   is below it refuses the file with [`Error::SchemaTooNew`], at open and before anything
//!   is written, and leaves the file byte for byte as it was. The row is read once per open
//!   (not per claim, to keep the claim's statements as they are): a version that raises it
//!   must expect handles of older versions opened before to go on until they open again.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::open_sql_err;
use crate::error::{Error, Result};
use crate::lock::Deadline;

/// Marks a database as a portdaddy registry (`PRAGMA application_id`): ASCII "PtDy".
pub(super) const APPLICATION_ID: i32 = 0x5074_4479;

/// The schema, one migration per entry; entry `i` takes `user_version` from `i` to `i + 1`.
///
/// A new registry is not built by running these but written from the image kept in
/// `new_registry.sqlite3` (see `create`): a migration added here is added there with
/// `cargo test --lib -- --ignored write_the_new_registry_image`, and a unit test fails
/// until it is.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: leases, the sticky port of each name, and small settings such as the search cursor.
    "CREATE TABLE leases (
        id          INTEGER PRIMARY KEY,
        port        INTEGER NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
        name        TEXT    NOT NULL,
        protocol    INTEGER NOT NULL,
        owner_pid   INTEGER,
        owner_start INTEGER,
        owner_boot  TEXT,
        acquired_at INTEGER NOT NULL,
        expires_at  INTEGER
    ) STRICT;
    CREATE TABLE names (
        name    TEXT PRIMARY KEY,
        port    INTEGER NOT NULL,
        used_at INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX names_port ON names (port);
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;",
    // 2: blocks of consecutive ports; a lease holds `block_len` ports from `port` on.
    "ALTER TABLE leases ADD COLUMN block_len INTEGER NOT NULL DEFAULT 1
        CHECK (block_len BETWEEN 1 AND 65535);",
    // 3: the PID namespace in which `owner_pid` is meaningful, and the owner's lock file in
    // `<registry>.owners/`, by which other namespaces tell whether it lives.
    "ALTER TABLE leases ADD COLUMN owner_ns INTEGER;
     ALTER TABLE leases ADD COLUMN owner_lock TEXT;",
    // 4: leases stored in port order (the port is the key), so that a claim writes one page
    // of the table instead of a table page and an index page, and the search for a vacant
    // port reads each lease's `port` and `block_len` in one pass, without a lookup per row.
    "CREATE TABLE leases_by_port (
        port        INTEGER PRIMARY KEY CHECK (port BETWEEN 1 AND 65535),
        id          INTEGER NOT NULL,
        name        TEXT    NOT NULL,
        protocol    INTEGER NOT NULL,
        owner_pid   INTEGER,
        owner_start INTEGER,
        owner_boot  TEXT,
        acquired_at INTEGER NOT NULL,
        expires_at  INTEGER,
        block_len   INTEGER NOT NULL DEFAULT 1 CHECK (block_len BETWEEN 1 AND 65535),
        owner_ns    INTEGER,
        owner_lock  TEXT
    ) STRICT, WITHOUT ROWID;
    INSERT INTO leases_by_port (port, id, name, protocol, owner_pid, owner_start, owner_boot,
                                acquired_at, expires_at, block_len, owner_ns, owner_lock)
        SELECT port, id, name, protocol, owner_pid, owner_start, owner_boot,
               acquired_at, expires_at, block_len, owner_ns, owner_lock
        FROM leases;
    DROP TABLE leases;
    ALTER TABLE leases_by_port RENAME TO leases;",
    // 5: the time namespace through which `owner_start` was read (start times read through
    // another one are not compared), and the PID namespaces above `owner_ns` (space-separated,
    // nearest first), which tell who sees every process of the owner's namespace.
    "ALTER TABLE leases ADD COLUMN owner_time_ns INTEGER;
     ALTER TABLE leases ADD COLUMN owner_ns_parents TEXT;",
    // 6: ports reserved for the whole registry: no claim of this version or a later one
    // hands them out. Ranges never overlap nor touch (adjacent ones are stored as one), and
    // are keyed by their first port. Additive: a version before this one does not know the
    // table and hands the ports out as before, which gives no port to two holders, so the
    // min-reader marker is not raised.
    "CREATE TABLE reserved (
        first_port INTEGER PRIMARY KEY CHECK (first_port BETWEEN 1 AND 65535),
        last_port  INTEGER NOT NULL CHECK (last_port BETWEEN first_port AND 65535),
        added_at   INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;",
    // 7: a lease whose claim is still to be added to `count.acquired`: 1 when the claim left
    // the counter for the lease's end, so that a claim writes the lease's page alone (see
    // the `tx` module, "What a transaction writes"); NULL (every lease of a version before
    // this one) when the claim counted it. Additive: a version before this one neither
    // writes nor reads it, so its `stats` leave out the live leases of this one, and a lease
    // of this one that it releases or reaps is never counted as acquired.
    "ALTER TABLE leases ADD COLUMN acquire_uncounted INTEGER;",
];

/// The key of the `meta` row that names the oldest format generation that may read and
/// write the registry (see "Registry format" above). No such row: every generation may.
pub(crate) const MIN_READER_KEY: &str = "min_reader_version";

/// The format generation this build reads and writes: it judges ports free and owners alive
/// by the rules of generation 1. A registry whose [`MIN_READER_KEY`] is above it is refused.
pub(crate) const READER_GENERATION: u32 = 1;

/// The schema version of an empty database or a registry of ours, read-only; a database of
/// another application, or a `user_version` no version of ours writes, is an error. The one
/// test of what makes a database ours, for the store and the examination alike.
pub(super) fn identify(conn: &Connection, path: &Path, deadline: Deadline) -> Result<u32> {
    let query = |sql: &str| -> Result<i64> {
        conn.query_row(sql, [], |r| r.get(0))
            .map_err(|e| open_sql_err(path, deadline, e))
    };
    let app_id = query("PRAGMA application_id")?;
    let version = query("PRAGMA user_version")?;
    let corrupt = |detail: String| Error::Corrupt {
        path: path.to_owned(),
        detail,
    };
    // Only a database without our mark can be a new one: one without any table (counted
    // only then, as each statement costs a fresh process its parsing).
    let fresh = || -> Result<bool> {
        Ok(app_id == 0 && version == 0 && query("SELECT count(*) FROM sqlite_schema")? == 0)
    };
    if app_id != i64::from(APPLICATION_ID) && !fresh()? {
        return Err(corrupt(format!(
            "an SQLite database of another application (application_id {app_id:#x})"
        )));
    }
    u32::try_from(version)
        .map_err(|_| corrupt(format!("its schema version {version} is not valid")))
}

/// Read-only checks: is this an empty database or one of ours, that does not demand a newer
/// reader, intact? Returns its schema version (`user_version`). `integrity` is asked how far
/// to check the integrity once the file is known to be one this build may use.
pub(super) fn inspect(
    conn: &Connection,
    path: &Path,
    deadline: Deadline,
    integrity: impl FnOnce() -> Integrity,
) -> Result<u32> {
    let found = identify(conn, path, deadline)?;
    // A newer `user_version` is no reason to refuse (see "Registry format" above); only the
    // marker is.
    if found > 0 {
        check_demands(conn, path, deadline)?;
    }
    // Asked only of a registry of ours that this build may use: one refused above is left
    // as it was, its lock file too.
    let checks: &[&str] = match integrity() {
        Integrity::Check => {
            tracing::debug!(path = %path.display(),
                "checking the integrity of the registry file in full");
            &["PRAGMA quick_check(1)"]
        }
        // Whatever the record says, the tables that keep ports from two holders: damage
        // that no write reports (the disk's own) shows there before a claim reads it.
        Integrity::AsLastChecked => {
            tracing::debug!(path = %path.display(),
                "the registry file is as its last integrity check left it: not checked again \
                 but for its leases and reserved ports");
            &["PRAGMA quick_check(leases)", "PRAGMA quick_check(reserved)"]
        }
    };
    for sql in checks {
        // A registry of an older schema has no table of reserved ports.
        if sql.ends_with("(reserved)")
            && !conn
                .table_exists(Some("main"), "reserved")
                .map_err(|e| open_sql_err(path, deadline, e))?
        {
            continue;
        }
        let check: String = conn
            .query_row(sql, [], |r| r.get(0))
            .map_err(|e| open_sql_err(path, deadline, e))?;
        if check != "ok" {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                detail: format!("integrity check failed: {check}"),
            });
        }
    }
    Ok(found)
}

/// Whether [`inspect`] checks the file's integrity (see `last_check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Integrity {
    /// `PRAGMA quick_check`, which reads every page of the file.
    Check,
    /// Nothing wrote the file since an open checked it: only the tables of leases and
    /// reserved ports, which are small, are checked again.
    AsLastChecked,
}

/// What a registry of ours (`user_version` above 0) demands of its reader, read-only: its
/// tables must be there, and its `min_reader_version` must not be above this build's
/// generation. The one test for the store's open and the examination alike, so that the
/// examination never calls fine what the open refuses.
pub(super) fn check_demands(conn: &Connection, path: &Path, deadline: Deadline) -> Result<()> {
    let sql = |e| open_sql_err(path, deadline, e);
    let missing = || Error::Corrupt {
        path: path.to_owned(),
        detail: "tables of the registry are missing".into(),
    };
    // The marker first: its statement loads the schema, or fails where `meta` is missing.
    // Then the tables are looked up in the schema SQLite has loaded, with no statement to
    // parse (a view by one of their names is no table of ours).
    let required = match min_reader_version(conn) {
        Ok(required) => required,
        Err(e) => {
            let tables: i64 = conn
                .query_row(
                    "SELECT count(*) FROM sqlite_schema
                     WHERE type = 'table' AND name IN ('leases', 'names', 'meta')",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            return Err(if tables == 3 { sql(e) } else { missing() });
        }
    };
    for table in ["leases", "names", "meta"] {
        if !conn.table_exists(Some("main"), table).map_err(sql)? {
            return Err(missing());
        }
    }
    check_reader(path, required)
}

/// Applies the pending migrations in one transaction.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version < MIGRATIONS.len() {
        for migration in &MIGRATIONS[version..] {
            tx.execute_batch(migration)?;
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    }
    tx.commit()
}

/// The `min_reader_version` a registry demands ([`MIN_READER_KEY`] in `meta`): `None` when
/// it demands none. The caller has checked that the `meta` table exists.
///
/// Our `meta` stores integers, but a newer version may have rebuilt it: a whole number in
/// any type (`2`, `2.0`, `'2'`) is that number, a fraction is rounded up, and anything else
/// (`NULL`, a blob, other text) is no generation this build knows, so it demands more than
/// any ([`Demand::Unreadable`]): when in doubt, the registry is not used.
pub(super) fn min_reader_version(conn: &Connection) -> rusqlite::Result<Option<Demand>> {
    use rusqlite::types::Value;
    let value: Option<Value> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [MIN_READER_KEY],
            |r| r.get(0),
        )
        .optional()?;
    Ok(value.map(|value| {
        let whole = match &value {
            Value::Integer(n) => Some(*n),
            Value::Real(r) if r.is_finite() => Some(r.ceil() as i64),
            Value::Text(t) => t.trim().parse::<i64>().ok(),
            _ => None,
        };
        whole.map_or_else(
            || Demand::Unreadable(format!("{value:?}")),
            Demand::Generation,
        )
    }))
}

/// What a registry's `min_reader_version` demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Demand {
    /// The oldest format generation that may use the registry.
    Generation(i64),
    /// A value that names no generation (shown as SQLite returned it).
    Unreadable(String),
}

/// Refuses a registry whose `min_reader_version` is above [`READER_GENERATION`], or names no
/// generation: a newer portdaddy judges ports or owners there by rules this one does not know.
pub(super) fn check_reader(path: &Path, required: Option<Demand>) -> Result<()> {
    let too_new = |required: u32| Error::SchemaTooNew {
        path: path.to_owned(),
        required,
        supported: READER_GENERATION,
    };
    match required {
        Some(Demand::Generation(required)) if required > i64::from(READER_GENERATION) => {
            Err(too_new(u32::try_from(required).unwrap_or(u32::MAX)))
        }
        Some(Demand::Unreadable(value)) => {
            tracing::warn!(path = %path.display(), %value,
                "the registry's min_reader_version names no format generation; refusing it");
            Err(too_new(u32::MAX))
        }
        _ => Ok(()),
    }
}

/// The newest schema version this build knows.
pub(crate) fn schema_supported() -> u32 {
    MIGRATIONS.len() as u32
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::params;

    use super::*;

    #[test]
    fn migrating_twice_is_a_no_op() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let app: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(app, APPLICATION_ID);
    }

    #[test]
    fn a_newer_user_version_is_neither_refused_nor_lowered() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let newer = MIGRATIONS.len() as i64 + 3;
        conn.pragma_update(None, "user_version", newer).unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        inspect(&conn, Path::new("memory"), deadline, || Integrity::Check).unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, newer);
    }

    #[test]
    fn only_a_min_reader_version_above_this_generation_refuses_a_registry() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        let mark = |generation: i64| {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![MIN_READER_KEY, generation],
            )
            .unwrap();
            inspect(&conn, Path::new("memory"), deadline, || Integrity::Check)
        };
        mark(i64::from(READER_GENERATION)).unwrap();
        let err = mark(i64::from(READER_GENERATION) + 1).unwrap_err();
        assert!(
            matches!(err, Error::SchemaTooNew { required, supported, .. }
                if required == READER_GENERATION + 1 && supported == READER_GENERATION),
            "{err:?}"
        );
    }

    #[test]
    fn leases_written_before_blocks_existed_hold_one_port() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO leases (id, port, name, protocol, acquired_at) VALUES (7, 20000, 'x', 1, 0)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let len: i64 = conn
            .query_row("SELECT block_len FROM leases WHERE id = 7", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(len, 1);
    }

    #[test]
    fn leases_keep_every_column_when_stored_in_port_order() {
        let mut conn = Connection::open_in_memory().unwrap();
        for migration in &MIGRATIONS[..3] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        let row = concat!(
            "(9, 20010, 'svc', 3, 4242, 777, 'boot', 1000, 2000, 4, 4026531836, 'owner.lock'),",
            "(8, 20001, 'old', 1, NULL, NULL, NULL, 500, NULL, 1, NULL, NULL)"
        );
        // The columns as they were at version 3.
        let columns = "id, port, name, protocol, owner_pid, owner_start, owner_boot, \
                       acquired_at, expires_at, block_len, owner_ns, owner_lock";
        conn.execute_batch(&format!("INSERT INTO leases ({columns}) VALUES {row}"))
            .unwrap();
        let read = |conn: &Connection| -> Vec<String> {
            let mut stmt = conn
                .prepare(&format!("SELECT {columns} FROM leases ORDER BY id"))
                .unwrap();
            let rows = stmt
                .query_map([], |r| {
                    (0..12)
                        .map(|i| r.get::<_, rusqlite::types::Value>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .unwrap();
            rows.map(|r| format!("{:?}", r.unwrap())).collect()
        };
        let before = read(&conn);
        migrate(&mut conn).unwrap();
        assert_eq!(read(&conn), before);
        let without_rowid: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_index_list('leases') WHERE origin = 'pk'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(without_rowid, 1, "the port is the table's key");
    }

    #[test]
    fn the_schema_refuses_reserved_ranges_that_are_not_port_ranges() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let insert = |first: i64, last: i64| {
            conn.execute(
                "INSERT INTO reserved (first_port, last_port, added_at) VALUES (?1, ?2, 0)",
                [first, last],
            )
        };
        for (first, last) in [(0, 5), (10, 9), (1, 65536), (65536, 65536)] {
            assert!(insert(first, last).is_err(), "{first}-{last}");
        }
        insert(9, 9).unwrap();
        assert!(insert(9, 20).is_err(), "one range per first port");
    }

    #[test]
    fn the_schema_refuses_two_leases_on_one_port() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let insert = "INSERT INTO leases (id, port, name, protocol, acquired_at)
                      VALUES (?1, 20000, 'x', 1, 0)";
        conn.execute(insert, [1]).unwrap();
        assert!(conn.execute(insert, [2]).is_err());
    }
}
