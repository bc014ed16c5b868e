//! What listens on a port: [`wait_until_listening`] for a server to start, and
//! [`socket_holders`] for the processes that have a socket bound on it.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::lease::Protocol;

/// The first pause between two checks; each pause doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
/// The longest pause between two checks.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// Waits until something listens on `port` on this host, for at most `timeout`.
///
/// - TCP: a connection to `127.0.0.1` or `::1` is accepted. The server sees that one
///   connection, which is closed at once without sending anything. On Linux, a connection
///   that is neither accepted nor refused in time counts too when the kernel's socket tables
///   show a listener bound there (or on all addresses): a busy server whose accept queue
///   is full.
/// - UDP: a UDP socket is bound on the port, on any address. UDP has no connection to
///   accept, so this is the one sign a server gives without being sent a packet. Linux's
///   socket tables (`/proc/net/udp`, `/proc/net/udp6`) tell, without touching the port;
///   elsewhere, binding the port on the unspecified address fails with "address in use"
///   (which takes the port for a moment each time).
/// - For [`Protocol::Both`], both of these.
///
/// It checks at once, then after pauses that double from 1 ms up to 100 ms, never past the
/// deadline: it neither spins nor oversleeps the moment the server starts by much.
///
/// ```
/// use std::time::Duration;
///
/// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
/// let guard = registry.acquire("api")?;
/// let port = guard.port();
/// let server = std::thread::spawn(move || std::net::TcpListener::bind(("127.0.0.1", port)));
/// portdaddy::wait_until_listening(port, portdaddy::Protocol::Tcp, Duration::from_secs(10))?;
/// // connect to the server now
/// # drop(server.join());
/// # Ok::<(), portdaddy::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::NotListening`], naming the port and how long was waited, once `timeout` has
/// passed.
pub fn wait_until_listening(port: u16, protocol: Protocol, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let deadline = start.checked_add(timeout);
    let mut pause = FIRST_PAUSE;
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if is_listening(port, protocol, left.unwrap_or(MAX_PAUSE)) {
            return Ok(());
        }
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => MAX_PAUSE,
        };
        if left.is_zero() {
            return Err(Error::NotListening {
                port,
                protocol,
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Whether something listens on `port` for `protocol` now; a TCP connection attempt waits at
/// most `budget` (a loopback connection is answered at once, accepted or refused).
fn is_listening(port: u16, protocol: Protocol, budget: Duration) -> bool {
    (!protocol.includes_tcp() || tcp_accepts(port, budget))
        && (!protocol.includes_udp() || udp_bound(port))
}

/// Both addresses share `budget`, so that the wait does not overrun its deadline. A connection
/// that is neither accepted nor refused in time is a busy server's whose accept queue is full
/// (the kernel drops the SYN), or a firewall's: the kernel's socket tables tell which, where
/// there are some.
fn tcp_accepts(port: u16, budget: Duration) -> bool {
    let budget = budget.clamp(Duration::from_millis(1), Duration::from_secs(1));
    let deadline = Instant::now() + budget;
    let mut unanswered = false;
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            unanswered = true;
            break;
        }
        match TcpStream::connect_timeout(&SocketAddr::new(ip, port), left) {
            Ok(_) => return true,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => unanswered = true,
            Err(_) => {}
        }
    }
    unanswered && crate::sys::tcp_loopback_listening(port).unwrap_or(false)
}

/// Read from the kernel's socket tables where there are some: binding the port to find out
/// would, for a moment, take it from the very server that is starting.
fn udp_bound(port: u16) -> bool {
    if let Some(bound) = crate::sys::udp_port_bound(port) {
        return bound;
    }
    [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()]
        .into_iter()
        .any(|ip| {
            UdpSocket::bind(SocketAddr::new(ip, port))
                .is_err_and(|e| e.kind() == io::ErrorKind::AddrInUse)
        })
}

/// A process with a socket bound on a port: a listening TCP socket, or a UDP socket.
/// Returned by [`socket_holders`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct SocketHolder {
    /// [`Protocol::Tcp`] for a listening TCP socket, [`Protocol::Udp`] for a UDP socket.
    pub protocol: Protocol,
    /// The process, or `None` for a socket on the port whose process cannot be seen: another
    /// user's process, or one hidden by `/proc`'s `hidepid` option.
    pub pid: Option<u32>,
    /// The process's command line (its arguments separated by spaces), or its name in
    /// brackets, where it can be read.
    pub command: Option<String>,
}

/// The processes with a listening TCP socket or a UDP socket bound on `port`, on any address
/// of this host's network namespace: what `ss -lptun` or `lsof -i :PORT` show. A process with
/// sockets of both kinds is listed once for each; a socket whose process cannot be seen is
/// listed once per protocol with no pid, so that it is never left out.
///
/// `None` where this cannot be told: on systems other than Linux, or when `/proc/net` cannot
/// be read. Linux reads `/proc/net/{tcp,tcp6,udp,udp6}` and each process's `/proc/PID/fd`.
///
/// ```
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let port = listener.local_addr()?.port();
/// if let Some(holders) = portdaddy::socket_holders(port) {
///     assert!(holders.iter().any(|h| h.pid == Some(std::process::id())));
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn socket_holders(port: u16) -> Option<Vec<SocketHolder>> {
    let owners = crate::sys::socket_holders(port)?;
    Some(
        owners
            .into_iter()
            .map(|o| SocketHolder {
                protocol: if o.udp { Protocol::Udp } else { Protocol::Tcp },
                pid: o.pid,
                command: o.command,
            })
            .collect(),
    )
}

/// The holders of `port` in a phrase for an error message, `pid 4242 (python3 -m
/// http.server)`, or `None` if none can be named.
pub(crate) fn describe_holders(port: u16) -> Option<String> {
    let holders = socket_holders(port)?;
    let mut names: Vec<String> = Vec::new();
    for holder in holders {
        let name = match (holder.pid, holder.command) {
            (Some(pid), Some(command)) => format!("pid {pid} ({command})"),
            (Some(pid), None) => format!("pid {pid}"),
            (None, _) => {
                "a process we cannot see (another user's, or hidden by hidepid)".to_owned()
            }
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    (!names.is_empty()).then(|| names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_nobody_listens_on_times_out_naming_the_port() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let error =
            wait_until_listening(port, Protocol::Tcp, Duration::from_millis(30)).unwrap_err();
        assert!(
            matches!(error, Error::NotListening { port: p, waited, .. }
                if p == port && waited >= Duration::from_millis(30)),
            "{error:?}"
        );
        assert!(error.to_string().contains(&port.to_string()), "{error}");
    }

    #[test]
    fn a_bound_udp_socket_counts_as_listening() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        wait_until_listening(port, Protocol::Udp, Duration::ZERO).unwrap();
        drop(socket);
        assert!(wait_until_listening(port, Protocol::Udp, Duration::ZERO).is_err());
    }

    #[test]
    fn both_protocols_need_both_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        wait_until_listening(port, Protocol::Tcp, Duration::ZERO).unwrap();
        // The UDP port of the same number may be taken by another test; only assert when free.
        if UdpSocket::bind(("0.0.0.0", port)).is_ok() {
            assert!(wait_until_listening(port, Protocol::Both, Duration::ZERO).is_err());
        }
    }
}
