//! What a `build.rs` does to bake a port into a crate: a detached, sticky lease.
//!
//! ```text
//! cargo run --example build_script
//! ```
//!
//! A build script exits long before the program it builds runs, so its lease must not end
//! with the build script: [`PortGuard::keep`] detaches it, and a TTL lets the registry reclaim
//! it if the project is abandoned. [`Request::reuse_detached`] makes the next build take over
//! the same lease, so the port never changes and `cargo:rustc-env` never triggers a rebuild.
//!
//! In a real `build.rs`, add `portdaddy` to `[build-dependencies]` and call [`bake_port`]
//! from `main` with the default registry (`PortDaddy::open_default()`).
//!
//! [`PortGuard::keep`]: portdaddy::PortGuard::keep
//! [`Request::reuse_detached`]: portdaddy::Request::reuse_detached

use std::time::Duration;

use portdaddy::{PortDaddy, Request};

/// Leases (or re-leases) the port for `name` and tells cargo about it.
fn bake_port(registry: &PortDaddy, name: &str, env_var: &str) -> portdaddy::Result<u16> {
    let request = Request::new(name)
        .ttl(Duration::from_secs(7 * 24 * 3600))
        .reuse_detached();
    let lease = registry.acquire_with(&request)?.keep()?;
    println!("cargo:rustc-env={env_var}={}", lease.port());
    Ok(lease.port())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let registry = PortDaddy::open(dir.path().join("registry.sqlite3"))?;

    let first = bake_port(&registry, "my-crate/dev-server", "DEV_SERVER_PORT")?;
    // ... the build ends; later, another build runs the script again ...
    let second = bake_port(&registry, "my-crate/dev-server", "DEV_SERVER_PORT")?;
    assert_eq!(
        first, second,
        "the same port every build, so nothing recompiles"
    );

    let leases = registry.list()?;
    assert_eq!(leases.len(), 1, "the new lease replaced the old one");
    assert!(leases[0].is_detached());
    println!("port {first} is held for the crate until released or expired");
    Ok(())
}
