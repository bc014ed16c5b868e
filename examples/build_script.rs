//! A real build script baking a port into a crate: builds and tests `examples/baked-port`,
//! whose `build.rs` leases its port from portdaddy, and shows that the port survives
//! rebuilds and never forces a recompile.
//!
//! ```text
//! cargo run --example build_script
//! ```
//!
//! The steps, each checked:
//!
//! 1. `cargo test` in `examples/baked-port`: the build script leases a detached port with a
//!    TTL and bakes it in (`cargo:rustc-env`); the crate's test finds that very port leased in
//!    the registry.
//! 2. The same command again: nothing is compiled, the build script does not run.
//! 3. `build.rs` touched, so the build script runs again: it takes over its own lease
//!    (`Request::reuse_detached`) and bakes in the same port, and the registry still holds one
//!    lease for the crate.
//!
//! The crate builds in `target/baked-port` against a temporary registry (`PORTDADDY_DB`),
//! with the dependency versions of portdaddy's own `Cargo.lock`, copied beside it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use portdaddy::{PortDaddy, ENV_VAR};

const NAME: &str = "baked-port/dev-server";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let krate = root.join("examples/baked-port");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("baked-port");
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("registry.sqlite3");
    // The versions portdaddy itself is built and tested with; cargo drops what is unused.
    std::fs::copy(root.join("Cargo.lock"), krate.join("Cargo.lock"))?;

    let first = cargo_test(&krate, &target, &db)?;
    let port = baked_port(&first.stdout)?;
    println!("1. first build baked in port {port}");

    let second = cargo_test(&krate, &target, &db)?;
    assert!(
        !second.stderr.contains("Compiling baked-port"),
        "an unchanged crate was recompiled:\n{}",
        second.stderr
    );
    assert_eq!(baked_port(&second.stdout)?, port);
    println!("2. second build: nothing recompiled, port {port}");

    std::fs::File::options()
        .append(true)
        .open(krate.join("build.rs"))?
        .set_modified(SystemTime::now())?;
    let third = cargo_test(&krate, &target, &db)?;
    assert!(
        third.stderr.contains("Compiling baked-port"),
        "touching build.rs should rerun the build script:\n{}",
        third.stderr
    );
    assert_eq!(
        baked_port(&third.stdout)?,
        port,
        "a rebuild must bake in the same port"
    );
    let leases = PortDaddy::open(&db)?.list()?;
    assert_eq!(leases.len(), 1, "the rebuild replaced its own lease");
    assert_eq!((leases[0].name(), leases[0].port()), (NAME, port));
    println!("3. build script ran again: same port {port}, one detached lease");
    Ok(())
}

struct Output {
    stdout: String,
    stderr: String,
}

/// `cargo test` in the example crate, against the registry `db`.
fn cargo_test(
    krate: &Path,
    target: &Path,
    db: &Path,
) -> Result<Output, Box<dyn std::error::Error>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(krate)
        .args(["test", "--", "--nocapture"])
        .env("CARGO_TARGET_DIR", target)
        .env("CARGO_TERM_COLOR", "never")
        .env(ENV_VAR, db)
        .output()?;
    let output = Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if !out.status.success() {
        return Err(format!("cargo test failed:\n{}\n{}", output.stdout, output.stderr).into());
    }
    Ok(output)
}

/// The port the crate's test printed.
fn baked_port(stdout: &str) -> Result<u16, Box<dyn std::error::Error>> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DEV_SERVER_PORT="))
        .ok_or("the crate's test printed no port")?;
    Ok(line.trim().parse()?)
}
