//! One transaction on the SQLite store: [`SqlTx`], the store's statements, and the write
//! transaction around it.
//!
//! # What a transaction writes
//!
//! A write transaction costs others in proportion to the pages it changes: each changed
//! page is one frame of the write-ahead log, written and checksummed at commit while the
//! registry's lock is held, and every 1,000 frames SQLite copies the log into the file and
//! syncs both (two `fsync`s, under the lock too, while every other writer waits). The
//! common pair, a name getting its own port back and releasing it, changes two pages in
//! each transaction: the lease's page of `leases`, and `meta`, which holds the counters
//! (and the search cursor, so a search changes no further page for it). A name's memory is
//! written again only once a day (see the policy's "Forgotten ports"); a claim that
//! searches also writes its name's memory: `names` and its index by port. The
//! `contention` tests hold these counts, so that a statement or an index added to the hot
//! path shows up as the cost it is.
//!
//! # Counting claims
//!
//! So that a claim writes the lease's page alone, `count.acquired` is not written by the
//! claim: the lease is inserted with `acquire_uncounted = 1`, and its claim is added to the
//! counter by the transaction that deletes the lease (a release or a reap, in the statement
//! that bumps its own counter in `meta` anyway; any other transaction just before it
//! commits). Reading the counter adds the leases still marked, so every process reads every
//! committed claim, once. Leases of versions that counted at the claim carry no mark and are
//! not counted again.

use std::path::Path;
use std::time::SystemTime;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{busy_timeout, sql_err, Opened};
use crate::error::{Error, Result};
use crate::lease::{from_millis, to_millis, Lease, Owner, Protocol};
use crate::lock::Deadline;
use crate::range::PortRange;
use crate::store::{first_gap, held_ports, Counter, Tx};

/// The columns of a lease, in the order [`SqlTx::lease_from_row`] reads them.
macro_rules! lease_columns {
    () => {
        "id, port, name, protocol, owner_pid, owner_start, owner_boot, acquired_at, expires_at, \
         block_len, owner_ns, owner_lock, owner_time_ns, owner_ns_parents"
    };
}

/// The lease starting nearest at or below `?1`: the only one that can hold port `?1`, since
/// leases never overlap.
const SELECT_LEASE_AT_OR_BELOW: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM leases WHERE port <= ?1 ORDER BY port DESC LIMIT 1"
);
const SELECT_LEASES_IN: &str = concat!(
    "SELECT ",
    lease_columns!(),
    " FROM leases WHERE port <= ?2 AND port + block_len > ?1 ORDER BY acquired_at, id"
);
/// A new lease, its claim to be counted when it ends (see "Counting claims" above).
const INSERT_LEASE: &str = concat!(
    "INSERT INTO leases (",
    lease_columns!(),
    ", acquire_uncounted) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 1)"
);

/// The transaction of [`SqliteStore::write`](super::SqliteStore::write), once the lock is
/// held on the right file.
pub(super) fn run_write<R>(
    conn: &mut Connection,
    path: &Path,
    deadline: Deadline,
    opened: Opened,
    f: impl FnOnce(&mut dyn Tx, Opened) -> Result<R>,
) -> Result<R> {
    let sql = |e| sql_err(path, deadline, e);
    conn.busy_timeout(busy_timeout(deadline)).map_err(sql)?;
    // BEGIN and COMMIT as cached statements: parsed once per connection, not per call.
    let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
    run("BEGIN IMMEDIATE").map_err(sql)?;
    let _open = RollbackUnlessCommitted(conn);
    let mut tx = SqlTx::new(conn, path, deadline);
    let value = f(&mut tx, opened)?;
    // Claims of ended leases that no other count of the transaction took along.
    tx.flush_uncounted()?;
    run("COMMIT").map_err(sql)?;
    Ok(value)
}

/// An owner as the `owner_*` columns of a lease store it; all `NULL` for none.
struct OwnerColumns<'a> {
    pid: Option<u32>,
    start: Option<i64>,
    boot: Option<&'a str>,
    namespace: Option<i64>,
    lock: Option<&'a str>,
    time_namespace: Option<i64>,
    parents: Option<String>,
}

impl<'a> OwnerColumns<'a> {
    fn of(owner: Option<&'a Owner>) -> Self {
        Self {
            pid: owner.map(Owner::pid),
            start: owner.map(|o| o.start_time() as i64),
            boot: owner.map(Owner::boot_id),
            namespace: owner.and_then(Owner::pid_namespace).map(|ns| ns as i64),
            lock: owner.and_then(Owner::lock_name),
            time_namespace: owner.and_then(Owner::time_namespace).map(|ns| ns as i64),
            parents: owner.and_then(Owner::namespace_parents).map(|parents| {
                parents
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            }),
        }
    }
}

/// The PID namespaces stored in `owner_ns_parents`: inode numbers separated by spaces;
/// `None` if the text is anything else.
fn parse_parents(text: &str) -> Option<Vec<u64>> {
    text.split_ascii_whitespace()
        .map(|n| n.parse().ok())
        .collect()
}

/// Rolls back the connection's open transaction when dropped (an error or a panic came
/// before the commit); does nothing after a commit.
struct RollbackUnlessCommitted<'a>(&'a Connection);

impl Drop for RollbackUnlessCommitted<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            if let Err(error) = self.0.execute_batch("ROLLBACK") {
                tracing::warn!(%error, "could not roll back a registry transaction");
            }
        }
    }
}

/// One transaction: the connection, inside `BEGIN … COMMIT`.
pub(super) struct SqlTx<'a> {
    tx: &'a Connection,
    path: &'a Path,
    deadline: Deadline,
    /// Claims of leases this transaction deleted, still to be added to `count.acquired`
    /// (see "Counting claims" above).
    uncounted: u64,
}

impl<'t> SqlTx<'t> {
    /// A transaction on `tx`, open already; `path` names the registry in errors.
    pub(super) fn new(tx: &'t Connection, path: &'t Path, deadline: Deadline) -> Self {
        Self {
            tx,
            path,
            deadline,
            uncounted: 0,
        }
    }

    /// The first column of `rows` as ports, read lazily so that a search stops at the first
    /// gap instead of loading every row.
    fn port_column<'a, 'r>(
        &'a self,
        rows: &'a mut rusqlite::Rows<'r>,
    ) -> impl Iterator<Item = Result<u16>> + use<'a, 'r, 't> {
        std::iter::from_fn(move || match rows.next() {
            Ok(Some(row)) => Some(row.get::<_, u16>(0).map_err(|e| self.err(e))),
            Ok(None) => None,
            Err(e) => Some(Err(self.err(e))),
        })
    }

    /// The first two columns of `rows` as `(first port, block length)`, read lazily.
    fn block_column<'a, 'r>(
        &'a self,
        rows: &'a mut rusqlite::Rows<'r>,
    ) -> impl Iterator<Item = Result<(u16, u16)>> + use<'a, 'r, 't> {
        std::iter::from_fn(move || match rows.next() {
            Ok(Some(row)) => Some(
                row.get::<_, u16>(0)
                    .and_then(|port| Ok((port, row.get::<_, u16>(1)?)))
                    .map_err(|e| self.err(e)),
            ),
            Ok(None) => None,
            Err(e) => Some(Err(self.err(e))),
        })
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        sql_err(self.path, self.deadline, e)
    }

    fn lease_from_row(&self, row: &Row<'_>) -> rusqlite::Result<Result<Lease>> {
        let id: i64 = row.get(0)?;
        let port: i64 = row.get(1)?;
        let protocol: i64 = row.get(3)?;
        let pid: Option<i64> = row.get(4)?;
        let start: Option<i64> = row.get(5)?;
        let boot: Option<String> = row.get(6)?;
        let expires: Option<i64> = row.get(8)?;
        let block_len: i64 = row.get(9)?;
        let namespace: Option<i64> = row.get(10)?;
        let lock: Option<String> = row.get(11)?;
        let time_namespace: Option<i64> = row.get(12)?;
        let parents: Option<String> = row.get(13)?;
        let bad = |what: &str| Error::Corrupt {
            path: self.path.to_owned(),
            detail: format!("lease {id} has an invalid {what}"),
        };
        let port = match u16::try_from(port) {
            Ok(p) => p,
            Err(_) => return Ok(Err(bad("port"))),
        };
        let Some(protocol) = Protocol::from_code(protocol) else {
            return Ok(Err(bad("protocol")));
        };
        let block_len = match u16::try_from(block_len) {
            Ok(n) if n >= 1 && u32::from(port) + u32::from(n) - 1 <= u32::from(u16::MAX) => n,
            _ => return Ok(Err(bad("block length"))),
        };
        let parents = match parents.as_deref().map(parse_parents) {
            None => None,
            Some(Some(parents)) => Some(parents),
            Some(None) => return Ok(Err(bad("owner namespace"))),
        };
        let owner = match (pid, start) {
            (Some(pid), Some(start)) => match (u32::try_from(pid), u64::try_from(start)) {
                (Ok(pid), Ok(start)) => Some(
                    Owner::new(pid, start, boot.unwrap_or_default())
                        .in_namespace(namespace.map(|ns| ns as u64))
                        .with_lock(lock)
                        .in_time_namespace(time_namespace.map(|ns| ns as u64))
                        .with_namespace_parents(parents),
                ),
                _ => return Ok(Err(bad("owner"))),
            },
            _ => None,
        };
        Ok(Ok(Lease {
            id: id as u64,
            port,
            block_len,
            name: row.get(2)?,
            protocol,
            owner,
            acquired_at: from_millis(row.get(7)?),
            expires_at: expires.map(from_millis),
        }))
    }
}

impl Tx for SqlTx<'_> {
    fn lease_on(&mut self, port: u16) -> Result<Option<Lease>> {
        let mut stmt = self
            .tx
            .prepare_cached(SELECT_LEASE_AT_OR_BELOW)
            .map_err(|e| self.err(e))?;
        let nearest = stmt
            .query_row([port], |row| self.lease_from_row(row))
            .optional()
            .map_err(|e| self.err(e))?
            .transpose()?;
        Ok(nearest.filter(|l| l.covers(port)))
    }

    fn remembered_port(&mut self, name: &str) -> Result<Option<(u16, SystemTime)>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT port, used_at FROM names WHERE name = ?1")
            .map_err(|e| self.err(e))?;
        stmt.query_row([name], |r| Ok((r.get(0)?, from_millis(r.get(1)?))))
            .optional()
            .map_err(|e| self.err(e))
    }

    fn first_vacant(&mut self, from: u16, to: u16, avoid_remembered: bool) -> Result<Option<u16>> {
        // From the lease starting nearest at or below `from`, which may be a block holding it.
        let mut leased = self
            .tx
            .prepare_cached(
                "SELECT port, block_len FROM leases
                 WHERE port >= coalesce((SELECT max(port) FROM leases WHERE port <= ?1), 0)
                   AND port <= ?2
                 ORDER BY port",
            )
            .map_err(|e| self.err(e))?;
        let mut leased_rows = leased.query(params![from, to]).map_err(|e| self.err(e))?;
        let leased_iter = held_ports(self.block_column(&mut leased_rows));
        if !avoid_remembered {
            return first_gap(from, to, leased_iter, std::iter::empty());
        }
        let mut named = self
            .tx
            .prepare_cached("SELECT port FROM names WHERE port BETWEEN ?1 AND ?2 ORDER BY port")
            .map_err(|e| self.err(e))?;
        let mut named_rows = named.query(params![from, to]).map_err(|e| self.err(e))?;
        let named_iter = self.port_column(&mut named_rows);
        first_gap(from, to, leased_iter, named_iter)
    }

    fn insert_lease(&mut self, lease: &Lease) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached(INSERT_LEASE)
            .map_err(|e| self.err(e))?;
        let owner = OwnerColumns::of(lease.owner.as_ref());
        stmt.execute(params![
            lease.id as i64,
            lease.port,
            lease.name,
            lease.protocol.code(),
            owner.pid,
            owner.start,
            owner.boot,
            to_millis(lease.acquired_at),
            lease.expires_at.map(to_millis),
            lease.block_len,
            owner.namespace,
            owner.lock,
            owner.time_namespace,
            owner.parents,
        ])
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn set_owner(&mut self, port: u16, id: u64, owner: Option<&Owner>) -> Result<bool> {
        // In place: the columns a newer version added to the row stay.
        let mut stmt = self
            .tx
            .prepare_cached(
                "UPDATE leases SET owner_pid = ?3, owner_start = ?4, owner_boot = ?5,
                                  owner_ns = ?6, owner_lock = ?7,
                                  owner_time_ns = ?8, owner_ns_parents = ?9
                 WHERE port = ?1 AND id = ?2",
            )
            .map_err(|e| self.err(e))?;
        let owner = OwnerColumns::of(owner);
        Ok(stmt
            .execute(params![
                port,
                id as i64,
                owner.pid,
                owner.start,
                owner.boot,
                owner.namespace,
                owner.lock,
                owner.time_namespace,
                owner.parents,
            ])
            .map_err(|e| self.err(e))?
            > 0)
    }

    fn remember(&mut self, name: &str, port: u16, at: SystemTime) -> Result<()> {
        let mut forget = self
            .tx
            .prepare_cached("DELETE FROM names WHERE port = ?1 AND name <> ?2")
            .map_err(|e| self.err(e))?;
        forget
            .execute(params![port, name])
            .map_err(|e| self.err(e))?;
        let mut upsert = self
            .tx
            .prepare_cached(
                "INSERT INTO names (name, port, used_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET port = excluded.port, used_at = excluded.used_at",
            )
            .map_err(|e| self.err(e))?;
        upsert
            .execute(params![name, port, to_millis(at)])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn forget_oldest(&mut self, range: PortRange, count: usize) -> Result<usize> {
        // One scan of the range's memories and a sort: this runs once per many claims (see
        // the policy's "Forgotten ports"), so `used_at` has no index to keep up on every claim.
        let mut stmt = self
            .tx
            .prepare_cached(
                "DELETE FROM names WHERE name IN (
                     SELECT n.name FROM names AS n
                     WHERE n.port BETWEEN ?1 AND ?2
                       AND NOT EXISTS (
                           SELECT 1 FROM leases AS l
                           WHERE l.port = (SELECT max(port) FROM leases WHERE port <= n.port)
                             AND l.port + l.block_len > n.port)
                     ORDER BY n.used_at, n.name LIMIT ?3)",
            )
            .map_err(|e| self.err(e))?;
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        stmt.execute(params![range.start(), range.end(), count])
            .map_err(|e| self.err(e))
    }

    fn delete_lease(&mut self, port: u16, id: u64) -> Result<bool> {
        self.delete_counting(
            "DELETE FROM leases WHERE port = ?1 AND id = ?2 AND acquire_uncounted = 1",
            "DELETE FROM leases WHERE port = ?1 AND id = ?2",
            params![port, id as i64],
        )
    }

    fn delete_port(&mut self, port: u16) -> Result<bool> {
        self.delete_counting(
            "DELETE FROM leases
             WHERE port = (SELECT max(port) FROM leases WHERE port <= ?1)
               AND port + block_len > ?1 AND acquire_uncounted = 1",
            "DELETE FROM leases
             WHERE port = (SELECT max(port) FROM leases WHERE port <= ?1)
               AND port + block_len > ?1",
            params![port],
        )
    }

    fn detach(&mut self, port: u16, id: u64) -> Result<bool> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "UPDATE leases SET owner_pid = NULL, owner_start = NULL, owner_boot = NULL,
                                  owner_ns = NULL, owner_lock = NULL,
                                  owner_time_ns = NULL, owner_ns_parents = NULL
                 WHERE port = ?1 AND id = ?2",
            )
            .map_err(|e| self.err(e))?;
        Ok(stmt
            .execute(params![port, id as i64])
            .map_err(|e| self.err(e))?
            > 0)
    }

    fn restart(
        &mut self,
        port: u16,
        id: u64,
        acquired_at: SystemTime,
        expires_at: Option<SystemTime>,
    ) -> Result<bool> {
        // In place: the columns a newer version added to the row stay.
        let mut stmt = self
            .tx
            .prepare_cached(
                "UPDATE leases SET acquired_at = ?3, expires_at = ?4 WHERE port = ?1 AND id = ?2",
            )
            .map_err(|e| self.err(e))?;
        Ok(stmt
            .execute(params![
                port,
                id as i64,
                to_millis(acquired_at),
                expires_at.map(to_millis)
            ])
            .map_err(|e| self.err(e))?
            > 0)
    }

    fn reservations(&mut self) -> Result<Vec<(PortRange, SystemTime)>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT first_port, last_port, added_at FROM reserved ORDER BY first_port",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (first, last, at) = row.map_err(|e| self.err(e))?;
            let range = u16::try_from(first)
                .ok()
                .zip(u16::try_from(last).ok())
                .and_then(|(first, last)| PortRange::new(first, last).ok())
                .ok_or_else(|| Error::Corrupt {
                    path: self.path.to_owned(),
                    detail: format!("the reserved range {first}-{last} is not a port range"),
                })?;
            out.push((range, from_millis(at)));
        }
        Ok(out)
    }

    fn insert_reservation(&mut self, range: PortRange, at: SystemTime) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO reserved (first_port, last_port, added_at) VALUES (?1, ?2, ?3)",
            )
            .map_err(|e| self.err(e))?;
        stmt.execute(params![range.start(), range.end(), to_millis(at)])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn delete_reservation(&mut self, first: u16) -> Result<bool> {
        let mut stmt = self
            .tx
            .prepare_cached("DELETE FROM reserved WHERE first_port = ?1")
            .map_err(|e| self.err(e))?;
        Ok(stmt.execute([first]).map_err(|e| self.err(e))? > 0)
    }

    fn leases(&mut self, range: Option<PortRange>) -> Result<Vec<Lease>> {
        let (lo, hi) = range.map_or((0, u16::MAX), |r| (r.start(), r.end()));
        let mut stmt = self
            .tx
            .prepare_cached(SELECT_LEASES_IN)
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![lo, hi], |row| self.lease_from_row(row))
            .map_err(|e| self.err(e))?;
        rows.map(|r| r.map_err(|e| self.err(e))?).collect()
    }

    fn cursor(&mut self) -> Result<Option<u16>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT value FROM meta WHERE key = 'cursor'")
            .map_err(|e| self.err(e))?;
        let value: Option<i64> = stmt
            .query_row([], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(value.and_then(|v| u16::try_from(v).ok()))
    }

    fn set_cursor(&mut self, port: u16) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('cursor', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .map_err(|e| self.err(e))?;
        stmt.execute([port]).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn count(&mut self, counter: Counter, by: u64) -> Result<()> {
        // Every claim inserts one lease, which counts it when it ends (see "Counting
        // claims" above).
        if counter == Counter::Acquired {
            return Ok(());
        }
        if self.uncounted == 0 {
            return self.add_to(counter, by);
        }
        // The claims of the leases the transaction ended go along, in the same statement.
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2), (?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            )
            .map_err(|e| self.err(e))?;
        let by = i64::try_from(by).unwrap_or(i64::MAX);
        let claims = i64::try_from(self.uncounted).unwrap_or(i64::MAX);
        stmt.execute(params![counter.key(), by, Counter::Acquired.key(), claims])
            .map_err(|e| self.err(e))?;
        self.uncounted = 0;
        Ok(())
    }

    fn counter(&mut self, counter: Counter) -> Result<u64> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .map_err(|e| self.err(e))?;
        let value: Option<i64> = stmt
            .query_row([counter.key()], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        // A negative count can only come from a damaged row; show it as none.
        let value = value.map_or(0, |v| u64::try_from(v).unwrap_or(0));
        if counter != Counter::Acquired {
            return Ok(value);
        }
        // The claims of the leases that are still there.
        let mut stmt = self
            .tx
            .prepare_cached("SELECT count(*) FROM leases WHERE acquire_uncounted = 1")
            .map_err(|e| self.err(e))?;
        let live: i64 = stmt.query_row([], |r| r.get(0)).map_err(|e| self.err(e))?;
        Ok(value.saturating_add(u64::try_from(live).unwrap_or(0)))
    }
}

impl SqlTx<'_> {
    /// Deletes leases with `marked`, the deletion of those that carry the mark of a claim
    /// still to be counted, which most do, and otherwise with `plain`; whether a lease was
    /// deleted. The claims of marked ones are counted with the transaction's next count, or
    /// before it commits.
    fn delete_counting(
        &mut self,
        marked: &str,
        plain: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<bool> {
        let mut stmt = self.tx.prepare_cached(marked).map_err(|e| self.err(e))?;
        let claims = stmt.execute(params).map_err(|e| self.err(e))?;
        if claims > 0 {
            self.uncounted += claims as u64;
            return Ok(true);
        }
        let mut stmt = self.tx.prepare_cached(plain).map_err(|e| self.err(e))?;
        Ok(stmt.execute(params).map_err(|e| self.err(e))? > 0)
    }

    /// Counts the claims of the leases deleted since the last count.
    fn flush_uncounted(&mut self) -> Result<()> {
        let claims = std::mem::take(&mut self.uncounted);
        if claims > 0 {
            self.add_to(Counter::Acquired, claims)?;
        }
        Ok(())
    }

    /// Adds `by` to `counter` in `meta`: one statement.
    fn add_to(&mut self, counter: Counter, by: u64) -> Result<()> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            )
            .map_err(|e| self.err(e))?;
        let by = i64::try_from(by).unwrap_or(i64::MAX);
        stmt.execute(params![counter.key(), by])
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::schema::{migrate, MIGRATIONS};
    use super::*;

    #[test]
    fn owners_keep_their_time_namespace_and_namespace_parents() {
        let mut conn = Connection::open_in_memory().unwrap();
        for migration in &MIGRATIONS[..4] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        // A lease written before the time namespace was recorded.
        conn.execute_batch(
            "INSERT INTO leases (id, port, name, protocol, owner_pid, owner_start, owner_boot,
                                 acquired_at, block_len, owner_ns)
             VALUES (1, 20000, 'old', 1, 42, 777, 'boot', 0, 1, 7)",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let path = Path::new("memory");
        let deadline = Deadline::after(Duration::from_secs(5));
        let mut tx = SqlTx::new(&conn, path, deadline);
        let old = tx.lease_on(20000).unwrap().unwrap();
        let owner = old.owner().unwrap();
        assert_eq!(
            (owner.time_namespace(), owner.namespace_parents()),
            (None, None)
        );
        let recorded = Owner::new(43, 778, "boot")
            .in_namespace(Some(7))
            .in_time_namespace(Some(9))
            .with_namespace_parents(Some(vec![5, 3]));
        let top = Owner::new(44, 779, "boot").with_namespace_parents(Some(Vec::new()));
        for (port, owner) in [(20001, &recorded), (20002, &top)] {
            tx.insert_lease(&Lease {
                owner: Some(owner.clone()),
                port,
                id: u64::from(port),
                ..old.clone()
            })
            .unwrap();
        }
        let read = tx.lease_on(20001).unwrap().unwrap();
        let owner = read.owner().unwrap();
        assert_eq!(owner.time_namespace(), Some(9));
        assert_eq!(owner.namespace_parents(), Some(&[5, 3][..]));
        let read = tx.lease_on(20002).unwrap().unwrap();
        assert_eq!(read.owner().unwrap().namespace_parents(), Some(&[][..]));
        conn.execute_batch("UPDATE leases SET owner_ns_parents = '5 x' WHERE port = 20001")
            .unwrap();
        let mut tx = SqlTx::new(&conn, path, deadline);
        assert!(matches!(tx.lease_on(20001), Err(Error::Corrupt { .. })));
    }
}
