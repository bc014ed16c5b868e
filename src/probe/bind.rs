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
#[derive(Clone, Copy, Debug, Default)]
pub struct BindProbe;

const V4: [Ipv4Addr; 2] = [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST];

impl PortProbe for BindProbe {
    fn is_free(&self, port: u16, protocol: Protocol) -> bool {
        (!protocol.tcp() || all_bind(port, |a| TcpListener::bind(a).map(drop)))
            && (!protocol.udp() || all_bind(port, |a| UdpSocket::bind(a).map(drop)))
    }
}

fn all_bind(port: u16, bind: impl Fn(SocketAddr) -> io::Result<()>) -> bool {
    V4.iter()
        .all(|ip| bind(SocketAddr::from((*ip, port))).is_ok())
        && match bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
            Ok(()) => true,
            // "In use" and "not allowed" count against the port; any other error means this
            // host has no IPv6.
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
            ),
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
    fn sees_a_udp_socket_only_when_asked_for_udp() {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(!BindProbe.is_free(port, Protocol::Udp));
        assert!(!BindProbe.is_free(port, Protocol::Both));
    }
}
