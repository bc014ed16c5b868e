//! The fixture pattern for `cargo nextest`, which runs every test in a process of its own:
//! each test leases the ports of its servers from the per-user file registry, which all
//! those processes share, and binds them.
//!
//! ```text
//! cargo run --example nextest_fixture
//! ```
//!
//! The example plays nextest: it starts eight copies of itself at once, each holding three
//! ports bound, and checks that no port went to two of them. `tests/nextest_fixture.rs`
//! runs the same fixture from real tests, under `cargo nextest run` as well as `cargo test`.
//!
//! In a test suite of your own, put [`TestPorts`] in `tests/common/mod.rs` and open the
//! registry with `PortDaddy::open_default()`; the fixed range here only keeps this crate's
//! own tests apart. A server that accepts a bound socket should get one from
//! `PortDaddy::acquire_listener` instead, which leaves no gap between check and bind.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, Stdio};

use portdaddy::{PortDaddy, PortGuard};

/// The ports of one test's servers, bound on loopback; released when dropped.
pub struct TestPorts {
    // Field order is drop order: close the sockets, then release the leases.
    listeners: Vec<TcpListener>,
    guards: Vec<PortGuard>,
}

impl TestPorts {
    /// Leases one port per name in a single batch and binds each, as the servers would.
    pub fn bind(names: &[&str]) -> Result<Self, Box<dyn std::error::Error>> {
        let registry = PortDaddy::builder().range(31000..=31499).open()?;
        let guards = registry.acquire_many(names)?;
        let listeners = guards
            .iter()
            .map(|g| TcpListener::bind((Ipv4Addr::LOCALHOST, g.port())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { listeners, guards })
    }

    /// The ports, in the order of the names.
    pub fn ports(&self) -> Vec<u16> {
        self.guards.iter().map(PortGuard::port).collect()
    }

    /// Sends a line to every port and reads it back: each port is served by our own socket.
    pub fn round_trip(&self) -> std::io::Result<()> {
        for listener in &self.listeners {
            let mut client = TcpStream::connect(listener.local_addr()?)?;
            let (mut served, _) = listener.accept()?;
            client.write_all(b"ping")?;
            let mut buf = [0; 4];
            served.read_exact(&mut buf)?;
            assert_eq!(&buf, b"ping");
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("child") {
        return child();
    }
    const PROCESSES: usize = 8;
    let exe = std::env::current_exe()?;
    let mut children = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .arg("child")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Every child reports its ports once it holds them, and holds them until its stdin closes,
    // so all of them hold their ports at the same time.
    let mut ports = Vec::new();
    for child in &mut children {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        let held: Vec<u16> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        assert_eq!(held.len(), 3, "a child failed: {line:?}");
        ports.extend(held);
    }
    for mut child in children {
        drop(child.stdin.take());
        assert!(child.wait()?.success(), "a child failed");
    }
    ports.sort_unstable();
    let all = ports.len();
    ports.dedup();
    assert_eq!(ports.len(), all, "a port went to two processes");
    println!("{PROCESSES} processes held {all} distinct ports at once: {ports:?}");
    Ok(())
}

/// One "test process": bind three ports, report them, hold them until told to stop.
fn child() -> Result<(), Box<dyn std::error::Error>> {
    let ports = TestPorts::bind(&["api", "db", "cache"])?;
    ports.round_trip()?;
    let line: Vec<String> = ports.ports().iter().map(u16::to_string).collect();
    println!("{}", line.join(" "));
    std::io::stdout().flush()?;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    Ok(())
}
