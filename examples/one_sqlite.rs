//! The floor of `one_claim`: the least a fresh process pays that keeps its lease in a shared
//! SQLite file and makes sure of the port, with nothing of portdaddy in it. It opens the
//! file (bundled SQLite, write-ahead log, `synchronous=NORMAL`, as the registry), binds one
//! TCP port on `[::]` (on `0.0.0.0` where there is no IPv6), records it in one one-row
//! write transaction and removes it in another, then exits. `benches/processes.rs` times it
//! beside `one_claim` and `one_pick`.
//!
//! ```text
//! cargo run --release --example one_sqlite -- /tmp/floor.sqlite3
//! ```
//!
//! Like the registry, it keeps the write-ahead log short (folded past 64 frames) and never
//! checkpoints when it closes, so that no process pays for a log that grew without bound, or
//! for creating it again.

use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, TransactionBehavior};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args_os()
        .nth(1)
        .ok_or("usage: one_sqlite PATH (an SQLite file, created if missing)")?;
    let mut conn = Connection::open(path)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA wal_autocheckpoint = 64;",
    )?;
    // Only the first process finds a file to set up (or one whose set-up was cut short); the
    // others pay one lookup.
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS leases (port INTEGER PRIMARY KEY, name TEXT NOT NULL);
             PRAGMA user_version = 1;",
        )?;
    }
    let probe = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0))
        .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
    let port = probe.local_addr()?.port();
    drop(probe);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO leases (port, name) VALUES (?1, 'floor')",
        [port],
    )?;
    tx.commit()?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("DELETE FROM leases WHERE port = ?1", [port])?;
    tx.commit()?;
    Ok(())
}
