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

#[test]
fn worker_entry() {
    use common::workers::{parse_range, read_line, say, var, MODE, RANGE, REGISTRY};
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    if mode == "listen" {
        let port: u16 = var("DAILY_ATTACK_PORT").parse().unwrap();
        let _listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
        say("LISTENING");
        common::workers::wait_for_eof();
        return;
    }
    assert_eq!(mode, "reserve", "unknown worker mode");
    let registry = PortDaddy::builder()
        .path(var(REGISTRY))
        .range(parse_range(&var(RANGE)))
        .port_probe(all_free)
        .lock_timeout(Duration::from_secs(30))
        .open()
        .unwrap();
    say("OPEN");
    while let Some(line) = read_line() {
        let (verb, ranges) = line.split_once(' ').expect("verb and ranges");
        if verb == "claim" {
            for k in 0..ranges.parse::<u32>().unwrap() {
                match registry.acquire(&format!("c{k}")) {
                    Ok(guard) => say(&format!("PORT {}", guard.keep().unwrap().port())),
                    Err(Error::Exhausted { .. }) => break,
                    Err(error) => panic!("{error:?}"),
                }
            }
            say("DONE");
            continue;
        }
        for part in ranges.split(',') {
            let ports = parse_range(part);
            let ports = range(*ports.start(), *ports.end());
            match verb {
                "reserve" => drop(registry.reserve_ports(ports).unwrap()),
                "unreserve" => drop(registry.unreserve_ports(ports).unwrap()),
                other => panic!("unknown verb {other}"),
            }
        }
        say("DONE");
    }
}

/// The ranges of `ports` as `a-b,c-d`, for a worker.
fn ranges_text(ranges: &[(u16, u16)]) -> String {
    let parts: Vec<String> = ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
    parts.join(",")
}

/// `ports` as ascending ranges of consecutive ports.
fn as_ranges(ports: &std::collections::BTreeSet<u16>) -> Vec<PortRange> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &port in ports {
        match out.last_mut() {
            Some((_, end)) if u32::from(*end) + 1 == u32::from(port) => *end = port,
            _ => out.push((port, port)),
        }
    }
    out.into_iter().map(|(a, b)| range(a, b)).collect()
}

#[test]
fn processes_reserving_and_unreserving_overlapping_ranges_at_once_lose_no_change() {
    let (_dir, path) = temp_registry();
    let ports = 33150..=33199;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut workers: Vec<_> = (0..4)
        .map(|i| {
            common::workers::Worker::spawn(format!("reserver-{i}"), "reserve", &path, &ports, &[])
        })
        .collect();
    for worker in &workers {
        worker.expect_line("OPEN", deadline);
    }
    // Each worker reserves ranges of 3 that overlap or touch the others' (and its own).
    let reserving: Vec<Vec<(u16, u16)>> = (0..4u16)
        .map(|i| {
            (0..10u16)
                .map(|k| {
                    let start = 33150 + (k * 7 + i * 3) % 48;
                    (start, start + 2)
                })
                .collect()
        })
        .collect();
    for (worker, ranges) in workers.iter_mut().zip(&reserving) {
        worker.send(&format!("reserve {}", ranges_text(ranges)));
    }
    for worker in &workers {
        assert_eq!(
            worker.expect_line("DONE", deadline),
            "DONE",
            "{}",
            worker.stderr()
        );
    }
    let mut expected: std::collections::BTreeSet<u16> = reserving
        .iter()
        .flatten()
        .flat_map(|&(a, b)| a..=b)
        .collect();
    let registry = PortDaddy::builder().path(&path).open().unwrap();
    assert_eq!(registry.reserved_ports().unwrap(), as_ranges(&expected));
    // Then each frees ports of its own, split out of the merged ranges at the same time.
    let freeing: Vec<Vec<(u16, u16)>> = (0..4u16)
        .map(|i| {
            (0..5u16)
                .map(|k| 33151 + i + k * 8)
                .map(|p| (p, p))
                .collect()
        })
        .collect();
    for (worker, ports) in workers.iter_mut().zip(&freeing) {
        worker.send(&format!("unreserve {}", ranges_text(ports)));
    }
    for worker in &workers {
        assert_eq!(
            worker.expect_line("DONE", deadline),
            "DONE",
            "{}",
            worker.stderr()
        );
    }
    for &(port, _) in freeing.iter().flatten() {
        expected.remove(&port);
    }
    assert_eq!(registry.reserved_ports().unwrap(), as_ranges(&expected));
    for worker in &mut workers {
        worker.close_stdin();
        let (_, status) = worker.finish(deadline);
        assert!(status.success(), "{}", worker.stderr());
    }
}

#[test]
fn a_claim_racing_a_reservation_in_another_process_is_either_before_it_or_skips_it() {
    let (_dir, path) = temp_registry();
    let ports = 33150..=33199;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut worker = common::workers::Worker::spawn("claimer", "reserve", &path, &ports, &[]);
    worker.expect_line("OPEN", deadline);
    let registry = PortDaddy::builder()
        .path(&path)
        .range(ports.clone())
        .lock_timeout(Duration::from_secs(30))
        .open()
        .unwrap();
    worker.send("claim 50");
    // Once the worker has a port or two, reserve the whole range under its claims.
    let first = worker.expect_line("PORT", deadline);
    let before: std::collections::BTreeSet<u16> = registry
        .reserve_ports(range(33150, 33199))
        .unwrap()
        .iter()
        .flat_map(|lease| lease.ports())
        .collect();
    worker.close_stdin();
    let (mut lines, status) = worker.finish(deadline);
    assert!(status.success(), "{}", worker.stderr());
    lines.push(first);
    let handed_out: std::collections::BTreeSet<u16> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("PORT "))
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(lines.iter().any(|l| l == "DONE"), "{lines:?}");
    assert!(
        handed_out.is_subset(&before),
        "ports handed out after the reservation committed: {:?}",
        handed_out.difference(&before).collect::<Vec<_>>()
    );
    assert!(!handed_out.is_empty());
}

/// Runs `portdaddy who PORT` on the registry at `path`: its exit code and stdout.
#[cfg(feature = "cli")]
fn who(path: &std::path::Path, port: u16) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portdaddy"))
        .arg("--db")
        .arg(path)
        .args(["who", &port.to_string()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[cfg(feature = "cli")]
#[test]
fn who_names_a_listener_of_this_network_namespace_and_not_one_of_another() {
    let (_dir, path) = temp_registry();
    let port = 33185;
    let ports = port..=port;
    let deadline = Instant::now() + Duration::from_secs(30);
    let extra = [("DAILY_ATTACK_PORT", port.to_string())];
    let mut here = common::workers::Worker::spawn("here", "listen", &path, &ports, &extra);
    here.expect_line("LISTENING", deadline);
    let (code, text) = who(&path, port);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&here.pid().to_string()), "{text}");
    here.close_stdin();
    assert!(here.finish(deadline).1.success(), "{}", here.stderr());

    let usable = std::process::Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        println!("skipped: unshare -n is not permitted here");
        return;
    }
    let elsewhere =
        common::workers::Worker::spawn_with("elsewhere", "listen", &path, &ports, &extra, |c| {
            let program = c.get_program().to_owned();
            let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
            let mut wrapped = std::process::Command::new("unshare");
            wrapped.arg("-n").arg(program).args(args);
            *c = wrapped;
        });
    elsewhere.expect_line("LISTENING", deadline);
    let (code, text) = who(&path, port);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("processes: none"), "{text}");
}
