//! Socket handover ([`PortDaddy::acquire_listener`], [`Request::listen_on`]): the caller
//! gets the socket that proved the port free, so no other program can take the port between
//! the check and the server's start.
//!
//! Ports 30500-30999 belong to this file (see `common`).

use crate::common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::{all_free, temp_registry};
use portdaddy::{Choice, Error, PortDaddy, Protocol, Request};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn registry(range: std::ops::RangeInclusive<u16>) -> PortDaddy {
    PortDaddy::builder()
        .in_memory()
        .range(range)
        .open()
        .unwrap()
}

#[test]
fn acquire_listener_hands_over_the_listener_that_checked_the_port() {
    let (_dir, path) = temp_registry();
    let registry = PortDaddy::builder()
        .path(path)
        .range(30500..=30509)
        .open()
        .unwrap();
    let (guard, listener) = registry.acquire_listener("api").unwrap();
    assert_eq!(
        listener.local_addr().unwrap(),
        (Ipv4Addr::LOCALHOST, guard.port()).into()
    );
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.write_all(b"ping").unwrap();
    let (mut served, _) = listener.accept().unwrap();
    let mut buf = [0; 4];
    served.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

#[test]
fn no_other_program_can_bind_the_handed_over_port() {
    let registry = registry(30510..=30519);
    let (guard, listener) = registry.acquire_listener("api").unwrap();
    let err = TcpListener::bind((Ipv4Addr::LOCALHOST, guard.port())).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    drop(listener);
}

#[test]
fn the_guard_may_drop_before_or_after_the_listener() {
    let registry = registry(30520..=30529);

    let (guard, listener) = registry.acquire_listener("after").unwrap();
    drop(listener);
    drop(guard);
    assert!(registry.list().unwrap().is_empty());

    let (guard, listener) = registry.acquire_listener("before").unwrap();
    let port = guard.port();
    drop(guard);
    assert!(
        registry.list().unwrap().is_empty(),
        "the lease ended with the guard"
    );
    let _client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    listener.accept().expect("the listener still serves");
    // With the listener alive, the registry's probe sees the port taken.
    let next = registry
        .acquire_with(&Request::new("x").preferred(port))
        .unwrap();
    assert_ne!(next.port(), port);
}

#[test]
fn acquire_udp_socket_hands_over_the_udp_socket() {
    let registry = registry(30530..=30539);
    let (guard, socket) = registry.acquire_udp_socket("dns").unwrap();
    assert_eq!(guard.lease().protocol(), Protocol::Udp);
    assert_eq!(socket.local_addr().unwrap().port(), guard.port());
    let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    sender
        .send_to(b"query", (Ipv4Addr::LOCALHOST, guard.port()))
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0; 16];
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"query");
}

#[test]
fn a_port_that_cannot_be_bound_on_the_address_counts_as_taken() {
    // The registry's own probe is told every port is free; the handover bind still notices.
    let foreign = TcpListener::bind((Ipv4Addr::LOCALHOST, 30540)).expect("30540 free for the test");
    let registry = PortDaddy::builder()
        .in_memory()
        .range(30540..=30541)
        .port_probe(all_free)
        .open()
        .unwrap();
    let (guard, _listener) = registry.acquire_listener("api").unwrap();
    assert_eq!(guard.port(), 30541);
    let err = registry
        .acquire_with(&Request::new("x").require(30540).listen_on(LOOPBACK))
        .unwrap_err();
    assert!(
        matches!(err, Error::PortUnavailable { port: 30540, .. }),
        "{err}"
    );
    drop(foreign);
}

#[test]
fn a_block_hands_over_one_socket_per_port_and_protocol() {
    let registry = registry(30550..=30559);
    let request = Request::new("cluster")
        .block(3)
        .protocol(Protocol::Both)
        .listen_on(LOOPBACK);
    let mut guard = registry.acquire_with(&request).unwrap();
    let tcp: Vec<u16> = guard
        .take_tcp_listeners()
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let udp: Vec<u16> = guard
        .take_udp_sockets()
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    let ports: Vec<u16> = guard.ports().collect();
    assert_eq!((&tcp, &udp), (&ports, &ports));
    assert!(guard.take_tcp_listeners().is_empty(), "taken already");
}

#[test]
fn each_request_of_a_batch_gets_its_own_sockets() {
    let registry = registry(30560..=30569);
    let requests = [
        Request::new("a").listen_on(LOOPBACK),
        Request::new("b"),
        Request::new("c").listen_on(LOOPBACK),
    ];
    let mut guards = registry.acquire_many_with(&requests).unwrap();
    let counts: Vec<usize> = guards
        .iter_mut()
        .map(|g| {
            let listeners = g.take_tcp_listeners();
            assert!(listeners
                .iter()
                .all(|l| l.local_addr().unwrap().port() == g.port()));
            listeners.len()
        })
        .collect();
    assert_eq!(counts, [1, 0, 1]);
}

#[test]
fn a_failed_batch_closes_the_sockets_it_bound() {
    let registry = registry(30570..=30571);
    let requests = [
        Request::new("a").listen_on(LOOPBACK),
        Request::new("b").listen_on(LOOPBACK),
        Request::new("c").listen_on(LOOPBACK),
    ];
    assert!(matches!(
        registry.acquire_many_with(&requests),
        Err(Error::Exhausted { .. })
    ));
    for port in [30570, 30571] {
        TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .unwrap_or_else(|e| panic!("port {port} still bound after the failed batch: {e}"));
    }
}

#[test]
fn listen_on_binds_the_address_asked_for() {
    let registry = registry(30580..=30589);
    let ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
    if UdpSocket::bind((ip, 0)).is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let mut guard = registry
        .acquire_with(&Request::new("v6").listen_on(ip))
        .unwrap();
    let listener = guard.take_tcp_listeners().pop().unwrap();
    assert_eq!(listener.local_addr().unwrap(), (ip, guard.port()).into());
}

#[test]
fn taking_over_a_detached_lease_binds_its_port_or_fails_and_keeps_it() {
    let registry = registry(30590..=30599);
    let build = || {
        Request::new("build")
            .ttl(Duration::from_secs(600))
            .reuse_detached()
            .listen_on(LOOPBACK)
    };
    let kept = registry.acquire_with(&build()).unwrap().keep().unwrap();

    // The previous server still listens: the port cannot be handed over.
    let server = TcpListener::bind((Ipv4Addr::LOCALHOST, kept.port())).unwrap();
    let err = registry.acquire_with(&build()).unwrap_err();
    assert!(
        matches!(err, Error::PortUnavailable { port, .. } if port == kept.port()),
        "{err}"
    );
    assert_eq!(
        registry.list().unwrap(),
        std::slice::from_ref(&kept),
        "the old lease stays"
    );

    drop(server);
    let mut again = registry.acquire_with(&build()).unwrap();
    assert_eq!(
        (again.port(), again.choice()),
        (kept.port(), Choice::Remembered)
    );
    assert_eq!(again.take_tcp_listeners().len(), 1);
}

#[test]
fn an_address_of_another_host_is_an_invalid_request() {
    let registry = registry(30600..=30609);
    // 192.0.2.0/24 is reserved for documentation: no host has it.
    let ip: IpAddr = "192.0.2.1".parse().unwrap();
    match registry.acquire_with(&Request::new("x").listen_on(ip)) {
        Err(Error::InvalidRequest { reason, .. }) => {
            assert!(reason.contains("192.0.2.1"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(registry.list().unwrap().is_empty());
    assert_eq!(
        registry.stats().unwrap().errors,
        0,
        "refused before any claim"
    );
}
