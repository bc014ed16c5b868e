//! The default port probe: try to bind.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};

use super::PortProbe;
use crate::lease::Protocol;

/// The default [`PortProbe`]: a port is free when it can be bound on `0.0.0.0`, `127.0.0.1`
/// and `[::]` for each protocol asked for.
///
/// The sockets are closed at once. A host without IPv6 skips the `[::]` check. On Unix the
/// TCP sockets use `SO_REUSEADDR`, as servers do, so a port whose last connection lingers in
/// `TIME_WAIT` counts as free.
///
/// On Linux one bind usually answers for all three addresses: a dual-stack `[::]` socket
/// (the default unless `net.ipv6.bindv6only` is set) conflicts with every IPv4 holder of
/// the port, so when it binds, `0.0.0.0` and `127.0.0.1` would too. Elsewhere, and for an
/// IPv6-only socket, the IPv4 addresses are bound one by one.
///
/// A bind that fails because the port is in use (`EADDRINUSE`), not permitted (`EACCES`,
/// `EPERM`) or the address is not available (`EADDRNOTAVAIL`) counts against the port. Any
/// other failure (out of file descriptors, `EMFILE`/`ENFILE`, or memory,
/// `ENOBUFS`/`ENOMEM`) says nothing about the port: [`try_is_free`](PortProbe::try_is_free)
/// returns it, and [`is_free`](PortProbe::is_free) answers "not free".
#[derive(Clone, Copy, Debug, Default)]
pub struct BindProbe;

const V4: [Ipv4Addr; 2] = [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST];

impl PortProbe for BindProbe {
    fn is_free(&self, port: u16, protocol: Protocol) -> bool {
        self.try_is_free(port, protocol).unwrap_or(false)
    }

    fn try_is_free(&self, port: u16, protocol: Protocol) -> io::Result<bool> {
        Ok((!protocol.includes_tcp() || all_bind::<TcpListener>(port)?)
            && (!protocol.includes_udp() || all_bind::<UdpSocket>(port)?))
    }
}

/// Whether a failed bind says the port is taken (`Ok(false)`), or is a failure of the probe
/// itself (`Err`).
fn taken_or_failed(error: io::Error) -> io::Result<bool> {
    match error.kind() {
        io::ErrorKind::AddrInUse
        | io::ErrorKind::PermissionDenied
        | io::ErrorKind::AddrNotAvailable => Ok(false),
        _ => Err(error),
    }
}

/// Whether a failed bind means the system lacks resources (descriptors, memory) rather than
/// anything about the address or the port.
pub(crate) fn out_of_resources(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::OutOfMemory
        || crate::descriptors::exhausted(error)
        || crate::sys::is_out_of_buffers(error)
}

/// A socket type the probe binds.
trait Probed: Sized {
    fn bind(addr: SocketAddr) -> io::Result<Self>;
}

impl Probed for TcpListener {
    fn bind(addr: SocketAddr) -> io::Result<Self> {
        TcpListener::bind(addr)
    }
}

impl Probed for UdpSocket {
    fn bind(addr: SocketAddr) -> io::Result<Self> {
        UdpSocket::bind(addr)
    }
}

fn all_bind<S: Probed + AsDualStack>(port: u16) -> io::Result<bool> {
    let v4_free = || {
        for ip in V4 {
            if let Err(e) = S::bind(SocketAddr::from((ip, port))) {
                return taken_or_failed(e);
            }
        }
        Ok(true)
    };
    match S::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        // A dual-stack socket on `[::]` has answered for the IPv4 addresses as well.
        Ok(socket) if socket.is_dual_stack() => Ok(true),
        Ok(_) => v4_free(),
        // "In use" and "not allowed" count against the port, and a lack of descriptors or
        // memory is the probe's own failure; any other error means this host has no IPv6.
        Err(e) if out_of_resources(&e) => Err(e),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
            ) =>
        {
            Ok(false)
        }
        Err(_) => v4_free(),
    }
}

/// Whether an IPv6 socket also holds the port for IPv4. Only on Linux does its bind answer
/// for every IPv4 holder too; elsewhere this says no, and the IPv4 addresses are bound one
/// by one.
trait AsDualStack {
    fn is_dual_stack(&self) -> bool;
}

impl AsDualStack for std::net::TcpListener {
    fn is_dual_stack(&self) -> bool {
        crate::sys::is_dual_stack(self)
    }
}

impl AsDualStack for std::net::UdpSocket {
    fn is_dual_stack(&self) -> bool {
        crate::sys::is_dual_stack(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_tcp_listener_on_loopback() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!BindProbe.is_free(port, Protocol::Tcp));
        assert!(!BindProbe.is_free(port, Protocol::Both));
        drop(listener);
        assert!(BindProbe.is_free(port, Protocol::Tcp));
    }

    #[test]
    fn sees_a_tcp_listener_on_the_wildcard_address() {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!BindProbe.is_free(port, Protocol::Tcp));
    }

    #[test]
    fn sees_a_udp_socket_on_the_wildcard_address() {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(!BindProbe.is_free(port, Protocol::Udp));
        drop(socket);
        assert!(BindProbe.is_free(port, Protocol::Udp));
    }

    #[test]
    fn sees_a_tcp_listener_on_ipv6_loopback() {
        // A host without IPv6 has nothing to see here.
        let Ok(listener) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) else {
            return;
        };
        let port = listener.local_addr().unwrap().port();
        assert!(!BindProbe.is_free(port, Protocol::Tcp));
    }

    #[test]
    fn sees_a_udp_socket_only_when_asked_for_udp() {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(!BindProbe.is_free(port, Protocol::Udp));
        assert!(!BindProbe.is_free(port, Protocol::Both));
    }
}
