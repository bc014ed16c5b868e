//! What a caller asks for: a name, and optionally a port, a TTL, a protocol, an owner.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::lease::{Owner, Protocol};
use crate::text::needs_escape;

/// The longest name accepted, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 128;

/// The shortest TTL accepted: the registry's time resolution.
const MIN_TTL: Duration = Duration::from_millis(1);

/// A request for one port.
///
/// ```
/// use std::time::Duration;
/// use portdaddy::{PortDaddy, Protocol, Request};
///
/// let registry = PortDaddy::in_process();
/// let request = Request::new("metrics")
///     .preferred(19090)
///     .protocol(Protocol::Both)
///     .ttl(Duration::from_secs(600));
/// let guard = registry.acquire_with(&request)?;
/// assert!(guard.port() > 0);
/// # Ok::<(), portdaddy::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Request {
    pub(crate) name: String,
    pub(crate) preferred: Option<u16>,
    pub(crate) strict: bool,
    pub(crate) ttl: Option<Duration>,
    pub(crate) protocol: Protocol,
    pub(crate) owner: Option<Owner>,
    pub(crate) reuse_detached: bool,
    pub(crate) block_len: u16,
    pub(crate) listen_on: Option<IpAddr>,
}

impl Request {
    /// A request for a port under `name`.
    ///
    /// The name is a label shown in listings and a sticky preference: a name gets its last
    /// port back when that port is free. Names are not unique; two holders of `"db"` get two
    /// ports. A name is 1 to [`MAX_NAME_LEN`] bytes of UTF-8 without control characters
    /// and without the characters that reorder or break lines (bidirectional controls, line
    /// separators); anything else fails at acquire time with [`Error::InvalidName`].
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            preferred: None,
            strict: false,
            ttl: None,
            protocol: Protocol::Tcp,
            owner: None,
            reuse_detached: false,
            block_len: 1,
            listen_on: None,
        }
    }

    /// Asks for `port` if it is free; otherwise the normal choice is made.
    /// [`PortGuard::choice`](crate::PortGuard::choice) tells which happened. The port may lie
    /// outside the registry's range, but never on a reserved port.
    ///
    /// Default: no preference.
    pub fn preferred(mut self, port: u16) -> Self {
        self.preferred = Some(port);
        self.strict = false;
        self
    }

    /// Asks for exactly `port`, failing with [`Error::PortUnavailable`] if it is taken.
    ///
    /// Default: no required port.
    pub fn require(mut self, port: u16) -> Self {
        self.preferred = Some(port);
        self.strict = true;
        self
    }

    /// Gives the lease an expiry: once `ttl` has passed since it was taken, the lease can be
    /// reclaimed even if its owner is still alive. Pair with
    /// [`PortGuard::keep`](crate::PortGuard::keep) for a lease that outlives the process.
    ///
    /// The registry keeps times in whole milliseconds: a lease starts at the millisecond of
    /// its claim and lasts `ttl` rounded *up* to whole milliseconds. A TTL shorter than one
    /// millisecond, which would expire at once, fails at acquire time with
    /// [`Error::InvalidRequest`].
    ///
    /// A lease never lives longer than its TTL by the clock of whoever judges it: one stamped
    /// by a clock that was ahead (a machine whose clock is fixed by NTP later) starts again
    /// with its TTL when a claim or [`PortDaddy::reap`](crate::PortDaddy::reap) meets it.
    ///
    /// Default: no expiry.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The protocols the port must be free for on the host.
    ///
    /// Default: [`Protocol::Tcp`].
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Records another process as the lease's owner, for tools that take a port on behalf of
    /// their caller (see [`Owner::of_pid`]). The lease is then reclaimed when *that* process
    /// dies. The guard still releases on drop, unless it is detached.
    ///
    /// Default: the calling process.
    pub fn owner(mut self, owner: Owner) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Takes over this name's detached lease, if one holds the name's remembered port and has
    /// not expired: the claim gets that same port (without probing it, since the previous
    /// holder's server may still be listening there) and replaces the old lease.
    ///
    /// This is what a build script wants: each build re-claims its port with a fresh TTL and
    /// [`keep`](crate::PortGuard::keep)s it again, and the port never changes, so nothing
    /// that bakes it in is rebuilt.
    ///
    /// Default: off; a detached lease blocks its port like any other.
    pub fn reuse_detached(mut self) -> Self {
        self.reuse_detached = true;
        self
    }

    /// Asks for `len` consecutive ports in one lease, for servers that use `port`,
    /// `port + 1`, …: all of them are free and probed, and all are released together.
    /// [`PortGuard::port`](crate::PortGuard::port) is the first, and
    /// [`PortGuard::ports`](crate::PortGuard::ports) all of them. A preferred or required
    /// port is the first of the block; a searched block lies wholly inside the range.
    ///
    /// ```
    /// let registry = portdaddy::PortDaddy::builder().in_memory().open()?;
    /// let guard = registry.acquire_with(&portdaddy::Request::new("raft").block(3))?;
    /// let ports: Vec<u16> = guard.ports().collect();
    /// assert_eq!(ports, [guard.port(), guard.port() + 1, guard.port() + 2]);
    /// # Ok::<(), portdaddy::Error>(())
    /// ```
    ///
    /// Default: 1 (a single port). A length of 0, a block that runs past port 65535, or
    /// without a preferred port a block longer than the range fails with
    /// [`Error::InvalidRequest`]. When no run of `len` free ports is left,
    /// [`Error::Exhausted`] says so.
    pub fn block(mut self, len: u16) -> Self {
        self.block_len = len;
        self
    }

    /// Hands over the sockets that checked the port: the claim binds each port of the lease
    /// on `ip` (a TCP listener if the [`protocol`](Self::protocol) includes TCP, a UDP
    /// socket if it includes UDP) while it holds the registry, and the guard keeps them for
    /// [`PortGuard::take_tcp_listeners`](crate::PortGuard::take_tcp_listeners) and
    /// [`PortGuard::take_udp_sockets`](crate::PortGuard::take_udp_sockets). A server that
    /// takes such a socket leaves no moment in which another program could bind its port.
    ///
    /// A port that cannot be bound on `ip` counts as taken. With
    /// [`reuse_detached`](Self::reuse_detached), the port of the detached lease is bound as
    /// well, and the claim fails with [`Error::PortUnavailable`] if that is impossible (the
    /// previous server still listening, say).
    ///
    /// Default: no sockets; the guard holds only the port number.
    pub fn listen_on(mut self, ip: IpAddr) -> Self {
        self.listen_on = Some(ip);
        self
    }

    /// The requested name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if self.preferred == Some(0) {
            return Err(Error::InvalidRequest {
                reason: "port 0 cannot be preferred or required (it means \"any port\"); \
                         leave the preference out instead"
                    .into(),
            });
        }
        if self.block_len == 0 {
            return Err(Error::InvalidRequest {
                reason: "a block of 0 ports holds nothing; ask for a length of at least 1".into(),
            });
        }
        if let Some(port) = self.preferred {
            if u32::from(port) + u32::from(self.block_len) - 1 > u32::from(u16::MAX) {
                return Err(Error::InvalidRequest {
                    reason: format!(
                        "a block of {} ports from {port} runs past port 65535; prefer a lower \
                         first port or a shorter block",
                        self.block_len
                    ),
                });
            }
        }
        if self.ttl == Some(Duration::ZERO) {
            return Err(Error::InvalidRequest {
                reason: "a TTL of zero would expire the lease at once; give a positive TTL or none"
                    .into(),
            });
        }
        if let Some(ttl) = self.ttl.filter(|ttl| *ttl < MIN_TTL) {
            return Err(Error::InvalidRequest {
                reason: format!(
                    "a TTL of {ttl:?} is shorter than the registry's resolution of 1ms and \
                     would expire the lease at once; give a TTL of at least 1ms, or none"
                ),
            });
        }
        Ok(())
    }
}

impl From<&str> for Request {
    fn from(name: &str) -> Self {
        Request::new(name)
    }
}

impl From<String> for Request {
    fn from(name: String) -> Self {
        Request::new(name)
    }
}

/// Checks the naming rule: 1 to [`MAX_NAME_LEN`] bytes, no control characters.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidName {
            name: quote(name),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("a name must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("a name must be at most 128 bytes long");
    }
    if name.chars().any(needs_escape) {
        return invalid(
            "a name must not contain control characters (newlines, escapes, NUL) or \
             characters that reorder or break lines of text (U+2028, U+202E, …)",
        );
    }
    Ok(())
}

/// The name as a quoted, escaped string short enough for an error message.
fn quote(name: &str) -> String {
    const SHOWN: usize = 40;
    let head: String = name.chars().take(SHOWN).collect();
    if head.len() < name.len() {
        format!("{head:?}… ({} bytes)", name.len())
    } else {
        format!("{head:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rule() {
        assert!(validate_name("db").is_ok());
        assert!(validate_name("ünïcødé service #2").is_ok());
        assert!(validate_name(&"x".repeat(MAX_NAME_LEN)).is_ok());
        for bad in [
            "",
            "a\nb",
            "nul\0",
            "\u{1b}[31mred",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_ttl_below_the_registrys_resolution_is_refused() {
        for short in [Duration::from_nanos(1), Duration::from_micros(999)] {
            let err = Request::new("x").ttl(short).validate().unwrap_err();
            assert!(
                matches!(&err, Error::InvalidRequest { reason } if reason.contains("1ms")),
                "{err}"
            );
        }
        assert!(Request::new("x")
            .ttl(Duration::from_millis(1))
            .validate()
            .is_ok());
    }

    #[test]
    fn error_message_shortens_huge_names() {
        let err = validate_name(&"y".repeat(1 << 20)).unwrap_err();
        let text = err.to_string();
        assert!(text.len() < 200, "{text}");
        assert!(text.contains("1048576 bytes"), "{text}");
    }
}
