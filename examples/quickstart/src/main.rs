//! Lease a port from the default registry, look at the registry, and release.
//!
//! ```text
//! cargo run -p quickstart
//! ```
//!
//! No configuration: the registry is `$PORTDADDY_DB` or the per-user default path. A package
//! of its own (`examples/quickstart`), so that it compiles portdaddy and its dependencies
//! only, not the dev-dependencies of portdaddy's tests and benches.

use std::net::TcpListener;

use portdaddy::PortDaddy;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Zero set-up: lease a port under a name.
    let guard = portdaddy::acquire("quickstart")?;
    println!(
        "leased port {} as {:?} ({:?})",
        guard.port(),
        guard.name(),
        guard.choice()
    );

    // Nobody else on this host gets the port while the guard lives; use it.
    let listener = TcpListener::bind(("127.0.0.1", guard.port()))?;
    println!("listening on {}", listener.local_addr()?);

    // Every participant sees the same registry.
    let registry = PortDaddy::open_default()?;
    println!("registry: {}", PortDaddy::default_path().display());
    for lease in registry.list()? {
        let owner = lease
            .pid()
            .map_or("detached".to_owned(), |pid| format!("pid {pid}"));
        println!("  {:>5}  {:<24}  {owner}", lease.port(), lease.name());
    }

    // Release explicitly to see errors; dropping the guard would release quietly.
    drop(listener);
    let port = guard.port();
    guard.release()?;
    println!("released port {port}; next run gets it back (the name remembers it)");
    Ok(())
}
