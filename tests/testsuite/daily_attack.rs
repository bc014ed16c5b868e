//! The daily commands and their library calls (`who`, `wait`, `reserve`, `run`) met by a
//! hostile host: registries written by hand or by another version, processes with odd command
//! lines, ports nobody answers on.
//!
//! Ports 33150-33199 belong to this file (see `common`).

use crate::common;

use common::{all_free, temp_registry};
use std::time::{Duration, Instant};

use portdaddy::{Error, PortDaddy, PortRange, Protocol, Request};

fn range(start: u16, end: u16) -> PortRange {
    PortRange::new(start, end).unwrap()
}

/// Plants reserved rows with raw SQL, as a hand edit or another version could write them.
fn plant_reserved(path: &std::path::Path, rows: &[(u16, u16)]) {
    let conn = rusqlite::Connection::open(path).unwrap();
    for (first, last) in rows {
        conn.execute(
            "INSERT INTO reserved (first_port, last_port, added_at) VALUES (?1, ?2, 0)",
            [first, last],
        )
        .unwrap();
    }
}

#[test]
fn reserved_rows_that_overlap_still_keep_every_port_they_cover_from_claims() {
    let (_dir, path) = temp_registry();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(33150..=33159)
        .port_probe(all_free)
        .open()
        .unwrap();
    registry.reserve_ports(range(33150, 33158)).unwrap();
    // A row inside the first one: the schema lets it in (only the first port is a key).
    plant_reserved(&path, &[(33152, 33152)]);
    let mut handed_out = Vec::new();
    for name in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"] {
        match registry.acquire(name) {
            Ok(guard) => handed_out.push(guard.keep().unwrap().port()),
            Err(Error::Exhausted { .. }) => break,
            Err(error) => panic!("{error:?}"),
        }
    }
    assert_eq!(handed_out, [33159], "the only port no row reserves");
    // A request that names a port inside both rows but after the small one's end.
    let err = registry
        .acquire_with(&Request::new("named").require(33153))
        .unwrap_err();
    assert!(
        matches!(err, Error::PortUnavailable { port: 33153, .. }),
        "{err:?}"
    );
    assert_eq!(registry.reserved_ports().unwrap(), [range(33150, 33158)]);
}

#[test]
fn unreserving_part_of_overlapping_reserved_rows_frees_just_that_part() {
    let (_dir, path) = temp_registry();
    let registry = PortDaddy::builder()
        .path(&path)
        .range(33160..=33169)
        .port_probe(all_free)
        .open()
        .unwrap();
    plant_reserved(&path, &[(33160, 33168), (33163, 33164)]);
    let freed = registry.unreserve_ports(range(33163, 33163)).unwrap();
    assert_eq!(freed, [range(33163, 33163)]);
    assert_eq!(
        registry.reserved_ports().unwrap(),
        [range(33160, 33162), range(33164, 33168)]
    );
    registry.reserve_ports(range(33163, 33163)).unwrap();
    assert_eq!(registry.reserved_ports().unwrap(), [range(33160, 33168)]);
}

/// A dual-stack TCP listener on `port` whose accept queue is full: connections to it are
/// neither accepted nor refused (the kernel drops their SYN), as a busy server's are.
/// Returns the listener and the connections that fill its queue, once a new connection to
/// 127.0.0.1 goes unanswered.
fn listener_with_a_full_queue(port: u16) -> Vec<rustix::fd::OwnedFd> {
    use rustix::net::{
        sockopt, AddressFamily, SocketAddrV4, SocketAddrV6, SocketFlags, SocketType,
    };
    use std::net::{Ipv4Addr, Ipv6Addr};
    let listener = rustix::net::socket(AddressFamily::INET6, SocketType::STREAM, None).unwrap();
    sockopt::set_ipv6_v6only(&listener, false).unwrap();
    rustix::net::bind(
        &listener,
        &SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0),
    )
    .unwrap();
    rustix::net::listen(&listener, 0).unwrap();
    let mut fds = vec![listener];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let client = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        // In progress, or done at once while the queue had room.
        let _ = rustix::net::connect(&client, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        fds.push(client);
        let probe = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(200)) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return fds,
            _ => assert!(Instant::now() < deadline, "the accept queue never filled"),
        }
    }
}

#[test]
fn waiting_for_a_busy_server_whose_queue_is_full_sees_it_listening() {
    let port = 33170;
    let _busy = listener_with_a_full_queue(port);
    let result = portdaddy::wait_until_listening(port, Protocol::Tcp, Duration::from_secs(3));
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn a_range_reserved_whole_is_exhausted_saying_its_ports_are_reserved() {
    let registry = PortDaddy::builder()
        .in_memory()
        .range(33175..=33179)
        .reserve([33179])
        .port_probe(all_free)
        .open()
        .unwrap();
    registry.reserve_ports(range(33175, 33178)).unwrap();
    let err = registry.acquire("svc").unwrap_err();
    match &err {
        Error::Exhausted { held, reserved, .. } => {
            assert_eq!((*held, *reserved), (0, 5), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("5 reserved"), "{err}");
}
