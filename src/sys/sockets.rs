//! Linux: which processes have a socket bound on a port, read from `/proc` with plain file
//! reads. `/proc/net/{tcp,tcp6,udp,udp6}` give the socket inodes by local port (TCP sockets
//! in state LISTEN only; UDP sockets in any state), and each process's `/proc/PID/fd`
//! links to `socket:[INODE]` say whose they are.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::SocketOwner;

/// TCP's state LISTEN as `/proc/net/tcp` writes it.
const TCP_LISTEN: &str = "0A";

/// The processes with a socket bound on `port`; `None` if the socket tables cannot be read.
pub(crate) fn holders(port: u16) -> Option<Vec<SocketOwner>> {
    // Inode → whether it is a UDP socket.
    let mut sockets: BTreeMap<u64, bool> = BTreeMap::new();
    let mut read_any = false;
    for (file, udp) in [
        ("/proc/net/tcp", false),
        ("/proc/net/tcp6", false),
        ("/proc/net/udp", true),
        ("/proc/net/udp6", true),
    ] {
        match fs::read_to_string(file) {
            Ok(text) => {
                read_any = true;
                for inode in bound_inodes(&text, port, udp) {
                    sockets.insert(inode, udp);
                }
            }
            // A host without IPv6 has no tcp6/udp6.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
    }
    if !read_any {
        return None;
    }
    if sockets.is_empty() {
        return Some(Vec::new());
    }
    let mut found: BTreeSet<(bool, u32)> = BTreeSet::new();
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let entries = fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Another user's process (or `hidepid`) cannot be read: its sockets stay unmatched
        // and are reported as a process we cannot see.
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(&target.to_string_lossy()) else {
                continue;
            };
            if let Some(&udp) = sockets.get(&inode) {
                found.insert((udp, pid));
                seen.insert(inode);
            }
        }
    }
    let mut owners: Vec<SocketOwner> = found
        .into_iter()
        .map(|(udp, pid)| SocketOwner {
            udp,
            pid: Some(pid),
            command: command_of(pid),
        })
        .collect();
    // One entry per protocol for the sockets whose process could not be seen.
    let unseen: BTreeSet<bool> = sockets
        .iter()
        .filter(|(inode, _)| !seen.contains(inode))
        .map(|(_, &udp)| udp)
        .collect();
    owners.extend(unseen.into_iter().map(|udp| SocketOwner {
        udp,
        pid: None,
        command: None,
    }));
    Some(owners)
}

/// Whether a UDP socket is bound on `port`; `None` if the tables cannot be read.
pub(crate) fn udp_bound(port: u16) -> Option<bool> {
    let mut read_any = false;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        match fs::read_to_string(file) {
            Ok(text) => {
                if !bound_inodes(&text, port, true).is_empty() {
                    return Some(true);
                }
                read_any = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
    }
    read_any.then_some(false)
}

/// Whether a TCP socket in state LISTEN on `port` takes connections to `127.0.0.1` or `::1`:
/// one bound on a loopback address of those or on the unspecified one; `None` if the tables
/// cannot be read.
pub(crate) fn tcp_loopback_listening(port: u16) -> Option<bool> {
    let addresses: Vec<String> = [
        &Ipv4Addr::LOCALHOST.octets()[..],
        &Ipv4Addr::UNSPECIFIED.octets()[..],
        &Ipv6Addr::LOCALHOST.octets()[..],
        &Ipv6Addr::UNSPECIFIED.octets()[..],
        &Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets()[..],
    ]
    .into_iter()
    .map(proc_hex)
    .collect();
    let mut read_any = false;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match fs::read_to_string(file) {
            Ok(text) => {
                read_any = true;
                let found = text.lines().skip(1).any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                        return false;
                    };
                    let Some((address, hex_port)) = local.rsplit_once(':') else {
                        return false;
                    };
                    u16::from_str_radix(hex_port, 16).ok() == Some(port)
                        && state.eq_ignore_ascii_case(TCP_LISTEN)
                        && addresses.iter().any(|a| a.eq_ignore_ascii_case(address))
                });
                if found {
                    return Some(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
    }
    read_any.then_some(false)
}

/// An address as `/proc/net/tcp` writes it: each 32-bit word in the machine's byte order, in
/// hexadecimal.
fn proc_hex(octets: &[u8]) -> String {
    octets
        .chunks(4)
        .map(|word| {
            let word: [u8; 4] = word.try_into().unwrap_or_default();
            format!("{:08X}", u32::from_ne_bytes(word))
        })
        .collect()
}

/// The inodes of the sockets in one `/proc/net/{tcp,udp}[6]` table bound on `port`: for
/// TCP only those in state LISTEN.
fn bound_inodes(table: &str, port: u16, udp: bool) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode: u64 = fields.get(9)?.parse().ok()?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let local_port = u16::from_str_radix(hex_port, 16).ok()?;
            let listening = udp || state.eq_ignore_ascii_case(TCP_LISTEN);
            (local_port == port && listening && inode != 0).then_some(inode)
        })
        .collect()
}

/// The inode in a descriptor link's text `socket:[INODE]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The command line of `pid`, its arguments separated by spaces, or its name in brackets
/// (as `ps` shows a process without arguments); `None` if neither can be read.
fn command_of(pid: u32) -> Option<String> {
    if let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) {
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() {
            return Some(args.join(" "));
        }
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(format!("[{}]", comm.trim_end()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
   3: 0100007F:1F90 0100007F:C351 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0000000000000000
";

    #[test]
    fn only_listening_tcp_sockets_on_the_port_count() {
        assert_eq!(bound_inodes(TCP, 8080, false), vec![4242]);
        assert_eq!(bound_inodes(TCP, 80, false), vec![4444]);
        assert!(bound_inodes(TCP, 81, false).is_empty());
    }

    #[test]
    fn every_udp_socket_on_the_port_counts_whatever_its_state() {
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 777 2 0000000000000000 0
";
        assert_eq!(bound_inodes(udp, 8080, true), vec![777]);
    }

    #[test]
    fn addresses_are_written_as_proc_net_tcp_writes_them() {
        if cfg!(target_endian = "little") {
            assert_eq!(proc_hex(&Ipv4Addr::LOCALHOST.octets()), "0100007F");
            assert_eq!(
                proc_hex(&Ipv6Addr::LOCALHOST.octets()),
                "00000000000000000000000001000000"
            );
        }
    }

    #[test]
    fn a_listener_on_loopback_takes_loopback_connections_and_one_elsewhere_does_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(tcp_loopback_listening(port), Some(true));
        drop(listener);
        let Ok(elsewhere) = std::net::TcpListener::bind(("127.0.0.2", port)) else {
            return; // the port went to another test meanwhile
        };
        assert_eq!(tcp_loopback_listening(port), Some(false));
        drop(elsewhere);
    }

    #[test]
    fn socket_links_give_their_inode_and_other_links_none() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn a_listener_of_this_process_is_found_with_its_pid_and_command() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let owners = holders(port).expect("/proc is readable");
        let me = owners
            .iter()
            .find(|o| o.pid == Some(std::process::id()))
            .unwrap_or_else(|| panic!("{owners:?}"));
        assert!(!me.udp);
        assert!(me.command.is_some());
    }
}
