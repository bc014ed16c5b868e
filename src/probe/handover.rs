//! Socket handover: a port probe that keeps the sockets it binds, so that the caller gets
//! the very socket that proved the port free.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, TcpListener, UdpSocket};
use std::sync::Mutex;

use super::PortProbe;
use crate::lease::Protocol;

/// The sockets bound on the ports of one lease, in port order.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    pub(crate) tcp: Vec<TcpListener>,
    pub(crate) udp: Vec<UdpSocket>,
}

#[derive(Debug)]
struct Bound {
    tcp: Option<TcpListener>,
    udp: Option<UdpSocket>,
}

/// Wraps the registry's port probe: a port is free if that probe says so *and* it can be
/// bound on `ip`, and the socket bound for the answer is kept.
pub(crate) struct Handover<'a> {
    probe: &'a dyn PortProbe,
    ip: IpAddr,
    bound: Mutex<BTreeMap<u16, Bound>>,
}

impl<'a> Handover<'a> {
    pub(crate) fn new(probe: &'a dyn PortProbe, ip: IpAddr) -> Self {
        Self {
            probe,
            ip,
            bound: Mutex::new(BTreeMap::new()),
        }
    }

    /// The sockets of `ports`, in order: those the probe bound, and any the claim did not
    /// probe (a detached lease taken over) bound now. The first port that cannot be bound
    /// fails the whole handover.
    pub(crate) fn take(
        &self,
        ports: impl Iterator<Item = u16>,
        protocol: Protocol,
    ) -> Result<Sockets, (u16, io::Error)> {
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        let mut sockets = Sockets::default();
        for port in ports {
            let b = match bound.remove(&port) {
                Some(b) => b,
                None => bind(self.ip, port, protocol).map_err(|e| (port, e))?,
            };
            sockets.tcp.extend(b.tcp);
            sockets.udp.extend(b.udp);
        }
        Ok(sockets)
    }
}

impl PortProbe for Handover<'_> {
    fn is_free(&self, port: u16, protocol: Protocol) -> bool {
        self.try_is_free(port, protocol).unwrap_or(false)
    }

    fn try_is_free(&self, port: u16, protocol: Protocol) -> io::Result<bool> {
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        if bound.contains_key(&port) {
            // Bound by this claim already (an earlier candidate block overlapping this one).
            return Ok(true);
        }
        if !self.probe.try_is_free(port, protocol)? {
            return Ok(false);
        }
        match bind(self.ip, port, protocol) {
            Ok(b) => {
                bound.insert(port, b);
                Ok(true)
            }
            Err(error) if super::bind::out_of_resources(&error) => Err(error),
            Err(error) => {
                tracing::debug!(port, ip = %self.ip, %error, "cannot bind the port to hand it over");
                Ok(false)
            }
        }
    }
}

/// Whether sockets for `protocol` can be bound on `ip` at all (on a port the system picks),
/// so that an address of another host fails at once instead of making every port of the
/// range look taken.
pub(crate) fn check_address(ip: IpAddr, protocol: Protocol) -> io::Result<()> {
    bind(ip, 0, protocol).map(drop)
}

fn bind(ip: IpAddr, port: u16, protocol: Protocol) -> io::Result<Bound> {
    Ok(Bound {
        tcp: protocol
            .includes_tcp()
            .then(|| TcpListener::bind((ip, port)))
            .transpose()?,
        udp: protocol
            .includes_udp()
            .then(|| UdpSocket::bind((ip, port)))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn keeps_the_listener_that_proved_the_port_free() {
        let all_free = |_: u16, _: Protocol| true;
        let handover = Handover::new(&all_free, Ipv4Addr::LOCALHOST.into());
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = probe.local_addr().unwrap().port();
        assert!(
            !handover.is_free(port, Protocol::Tcp),
            "bound by another socket"
        );
        drop(probe);
        assert!(handover.is_free(port, Protocol::Tcp));
        assert!(
            handover.is_free(port, Protocol::Tcp),
            "asking again reuses the socket"
        );
        let sockets = handover.take(std::iter::once(port), Protocol::Tcp).unwrap();
        assert_eq!(sockets.tcp.len(), 1);
        assert!(sockets.udp.is_empty());
        assert_eq!(sockets.tcp[0].local_addr().unwrap().port(), port);
    }
}
