//! The fixture pattern for integration tests: a server started on a leased port, stopped and
//! released when the fixture drops.
//!
//! ```text
//! cargo run --example test_fixture
//! ```
//!
//! The server binds its port itself, on a thread of its own, as most servers that take a port
//! number do; the fixture waits until it listens ([`PortGuard::wait_until_listening`]) before
//! handing it to the test, so the test never connects too early.
//!
//! In a real test suite the fixture lives in `tests/common/mod.rs` and each `#[test]` creates
//! its own; threads of one test binary and the separate processes of `cargo nextest` all
//! draw from the same registry, so no two servers ever get the same port.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use portdaddy::{PortDaddy, PortGuard};

/// A line-echo server on its own port.
struct EchoServer {
    // Field order is drop order: stop the server, then release the port.
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    guard: PortGuard,
}

impl EchoServer {
    fn start(registry: &PortDaddy, name: &str) -> portdaddy::Result<Self> {
        let guard = registry.acquire(name)?;
        let port = guard.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let listener =
                TcpListener::bind(("127.0.0.1", port)).expect("a leased port is free to bind");
            // Serve connections one after another, echoing lines until each client hangs up.
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let mut writer = stream.try_clone().expect("clone stream");
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = writeln!(writer, "{line}");
                }
            }
        });
        let server = Self {
            thread: Some(thread),
            stop,
            guard,
        };
        // The thread may not have bound the port yet: connecting now could be refused.
        server.guard.wait_until_listening(Duration::from_secs(10))?;
        Ok(server)
    }

    fn port(&self) -> u16 {
        self.guard.port()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // Unblock a server still waiting in `accept`, then join it.
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port()));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What one test does with its fixture.
fn a_test(registry: &PortDaddy, id: usize) -> portdaddy::Result<u16> {
    let server = EchoServer::start(registry, &format!("echo-{id}"))?;
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
    writeln!(stream, "hello from test {id}").expect("write");
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).expect("read");
    assert_eq!(reply.trim_end(), format!("hello from test {id}"));
    Ok(server.port())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Tests usually use the default registry (`portdaddy::acquire`); a temporary one keeps this
    // example from leaving anything behind.
    let dir = tempfile::tempdir()?;
    let registry = PortDaddy::open(dir.path().join("registry.sqlite3"))?;

    // Eight "tests" at once, as a test harness runs them.
    let handles: Vec<_> = (0..8)
        .map(|id| {
            let registry = registry.clone();
            std::thread::spawn(move || a_test(&registry, id))
        })
        .collect();
    let mut ports = Vec::new();
    for handle in handles {
        ports.push(handle.join().expect("test thread")?);
    }
    ports.sort_unstable();
    println!("8 echo servers ran at once on ports {ports:?}");
    ports.dedup();
    assert_eq!(ports.len(), 8, "every fixture had its own port");
    assert!(
        registry.list()?.is_empty(),
        "every fixture released its port"
    );
    Ok(())
}
