//! The in-memory store: a map behind a mutex, for threads of one process.
//!
//! A transaction works on the live maps and keeps an undo log; if the policy fails (or
//! panics) half-way, the log is replayed backwards, so a batch is all or nothing here too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use super::{first_gap, held_ports, Counter, Tx};
use crate::error::Result;
use crate::lease::{Lease, Owner};
use crate::range::PortRange;

#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    leases: BTreeMap<u16, Lease>,
    name_port: HashMap<String, u16>,
    /// The name that remembers each port, and when it recorded it.
    port_name: BTreeMap<u16, (String, SystemTime)>,
    cursor: Option<u16>,
    counters: HashMap<Counter, u64>,
    /// Reserved ranges by first port: the last port and when it was added.
    reserved: BTreeMap<u16, (u16, SystemTime)>,
}

type Undo = Box<dyn FnOnce(&mut State)>;

struct MemTx<'a> {
    state: &'a mut State,
    undo: Vec<Undo>,
    committed: bool,
}

impl Drop for MemTx<'_> {
    fn drop(&mut self) {
        if !self.committed {
            while let Some(undo) = self.undo.pop() {
                undo(self.state);
            }
        }
    }
}

impl MemoryStore {
    /// Runs `f` as one transaction: its changes stay only if it returns `Ok`.
    pub(crate) fn transact<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut tx = MemTx {
            state: &mut state,
            undo: Vec::new(),
            committed: false,
        };
        let result = f(&mut tx);
        tx.committed = result.is_ok();
        result
    }
}

impl MemTx<'_> {
    /// The lease holding `port`: the nearest one starting at or below it, if it reaches.
    fn holder_of(&self, port: u16) -> Option<&Lease> {
        self.state
            .leases
            .range(..=port)
            .next_back()
            .map(|(_, l)| l)
            .filter(|l| l.covers(port))
    }

    fn forget_port(&mut self, port: u16) {
        if let Some((old, at)) = self.state.port_name.remove(&port) {
            self.state.name_port.remove(&old);
            self.undo.push(Box::new(move |s| {
                s.name_port.insert(old.clone(), port);
                s.port_name.insert(port, (old, at));
            }));
        }
    }

    fn remove_lease(&mut self, port: u16) -> Option<Lease> {
        let lease = self.state.leases.remove(&port)?;
        let restore = lease.clone();
        self.undo.push(Box::new(move |s| {
            s.leases.insert(port, restore);
        }));
        Some(lease)
    }
}

impl Tx for MemTx<'_> {
    fn lease_on(&mut self, port: u16) -> Result<Option<Lease>> {
        Ok(self.holder_of(port).cloned())
    }

    fn remembered_port(&mut self, name: &str) -> Result<Option<(u16, SystemTime)>> {
        Ok(self.state.name_port.get(name).and_then(|port| {
            let (_, at) = self.state.port_name.get(port)?;
            Some((*port, *at))
        }))
    }

    fn first_vacant(&mut self, from: u16, to: u16, avoid_remembered: bool) -> Result<Option<u16>> {
        // A block starting below `from` may still hold it.
        let first = self.holder_of(from).map_or(from, |l| l.port);
        let leased = held_ports(
            self.state
                .leases
                .range(first..=to)
                .map(|(p, l)| Ok((*p, l.block_len))),
        );
        let remembered = self
            .state
            .port_name
            .range(from..=to)
            .filter(|_| avoid_remembered)
            .map(|(p, _)| Ok(*p));
        first_gap(from, to, leased, remembered)
    }

    fn insert_lease(&mut self, lease: &Lease) -> Result<()> {
        let port = lease.port;
        // The policy only inserts on vacant ports; keep the store consistent regardless.
        let overlaps = self.holder_of(port).is_some()
            || self
                .state
                .leases
                .range(port..=lease.last_port())
                .next()
                .is_some();
        if overlaps {
            return Err(crate::Error::PortUnavailable {
                port,
                reason: "already leased (store invariant)".into(),
            });
        }
        self.state.leases.insert(port, lease.clone());
        self.undo.push(Box::new(move |s| {
            s.leases.remove(&port);
        }));
        Ok(())
    }

    fn remember(&mut self, name: &str, port: u16, at: SystemTime) -> Result<()> {
        self.forget_port(port);
        if let Some(old_port) = self.state.name_port.get(name).copied() {
            self.forget_port(old_port);
        }
        self.state.name_port.insert(name.to_owned(), port);
        self.state.port_name.insert(port, (name.to_owned(), at));
        let name = name.to_owned();
        self.undo.push(Box::new(move |s| {
            s.name_port.remove(&name);
            s.port_name.remove(&port);
        }));
        Ok(())
    }

    fn forget_oldest(&mut self, range: PortRange, count: usize) -> Result<usize> {
        let mut oldest: Vec<(SystemTime, &str, u16)> = self
            .state
            .port_name
            .range(range.start()..=range.end())
            .filter(|(port, _)| self.holder_of(**port).is_none())
            .map(|(port, (name, at))| (*at, name.as_str(), *port))
            .collect();
        oldest.sort_unstable();
        let ports: Vec<u16> = oldest.iter().take(count).map(|(_, _, p)| *p).collect();
        for &port in &ports {
            self.forget_port(port);
        }
        Ok(ports.len())
    }

    fn delete_lease(&mut self, port: u16, id: u64) -> Result<bool> {
        if self.state.leases.get(&port).is_none_or(|l| l.id != id) {
            return Ok(false);
        }
        Ok(self.remove_lease(port).is_some())
    }

    fn delete_port(&mut self, port: u16) -> Result<bool> {
        let Some(first) = self.holder_of(port).map(|l| l.port) else {
            return Ok(false);
        };
        Ok(self.remove_lease(first).is_some())
    }

    fn detach(&mut self, port: u16, id: u64) -> Result<bool> {
        let Some(lease) = self.state.leases.get_mut(&port).filter(|l| l.id == id) else {
            return Ok(false);
        };
        let owner = lease.owner.take();
        self.undo.push(Box::new(move |s| {
            if let Some(l) = s.leases.get_mut(&port) {
                l.owner = owner;
            }
        }));
        Ok(true)
    }

    fn set_owner(&mut self, port: u16, id: u64, owner: Option<&Owner>) -> Result<bool> {
        let Some(lease) = self.state.leases.get_mut(&port).filter(|l| l.id == id) else {
            return Ok(false);
        };
        let was = std::mem::replace(&mut lease.owner, owner.cloned());
        self.undo.push(Box::new(move |s| {
            if let Some(l) = s.leases.get_mut(&port) {
                l.owner = was;
            }
        }));
        Ok(true)
    }

    fn restart(
        &mut self,
        port: u16,
        id: u64,
        acquired_at: SystemTime,
        expires_at: Option<SystemTime>,
    ) -> Result<bool> {
        let Some(lease) = self.state.leases.get_mut(&port).filter(|l| l.id == id) else {
            return Ok(false);
        };
        let was = (lease.acquired_at, lease.expires_at);
        (lease.acquired_at, lease.expires_at) = (acquired_at, expires_at);
        self.undo.push(Box::new(move |s| {
            if let Some(l) = s.leases.get_mut(&port) {
                (l.acquired_at, l.expires_at) = was;
            }
        }));
        Ok(true)
    }

    fn leases(&mut self, range: Option<PortRange>) -> Result<Vec<Lease>> {
        let (lo, hi) = range.map_or((0, u16::MAX), |r| (r.start(), r.end()));
        let first = self.holder_of(lo).map_or(lo, |l| l.port);
        let mut out: Vec<Lease> = self
            .state
            .leases
            .range(first..=hi)
            .map(|(_, l)| l.clone())
            .collect();
        out.sort_by_key(|l| (l.acquired_at, l.id));
        Ok(out)
    }

    fn reservations(&mut self) -> Result<Vec<(PortRange, SystemTime)>> {
        self.state
            .reserved
            .iter()
            .map(|(&first, &(last, at))| Ok((PortRange::new(first, last)?, at)))
            .collect()
    }

    fn insert_reservation(&mut self, range: PortRange, at: SystemTime) -> Result<()> {
        let first = range.start();
        self.state.reserved.insert(first, (range.end(), at));
        self.undo.push(Box::new(move |s| {
            s.reserved.remove(&first);
        }));
        Ok(())
    }

    fn delete_reservation(&mut self, first: u16) -> Result<bool> {
        let Some(was) = self.state.reserved.remove(&first) else {
            return Ok(false);
        };
        self.undo.push(Box::new(move |s| {
            s.reserved.insert(first, was);
        }));
        Ok(true)
    }

    fn cursor(&mut self) -> Result<Option<u16>> {
        Ok(self.state.cursor)
    }

    fn set_cursor(&mut self, port: u16) -> Result<()> {
        let old = self.state.cursor.replace(port);
        self.undo.push(Box::new(move |s| s.cursor = old));
        Ok(())
    }

    fn count(&mut self, counter: Counter, by: u64) -> Result<()> {
        let value = self.state.counters.entry(counter).or_insert(0);
        let old = *value;
        *value = old.saturating_add(by);
        self.undo.push(Box::new(move |s| {
            s.counters.insert(counter, old);
        }));
        Ok(())
    }

    fn counter(&mut self, counter: Counter) -> Result<u64> {
        Ok(self.state.counters.get(&counter).copied().unwrap_or(0))
    }
}
