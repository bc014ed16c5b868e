//! Leases a port for this crate's dev server and bakes it in as `DEV_SERVER_PORT`.
//!
//! The lease is detached (`keep`), because the build script exits long before the program
//! runs, and has a TTL, so an abandoned checkout does not hold the port forever. With
//! `reuse_detached` the next run of this script takes over its own lease: the port never
//! changes, so the baked-in value never forces a rebuild of anything that uses it.

use std::time::Duration;

use portdaddy::{PortDaddy, Request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={}", portdaddy::ENV_VAR);
    let registry = PortDaddy::open_default()?;
    let request = Request::new("baked-port/dev-server")
        .ttl(Duration::from_secs(7 * 24 * 3600))
        .reuse_detached();
    let lease = registry.acquire_with(&request)?.keep()?;
    println!("cargo:rustc-env=DEV_SERVER_PORT={}", lease.port());
    Ok(())
}
