//! One claim in a fresh process: lease a port from the registry, then release it by dropping
//! the guard. `benches/processes.rs` times this whole process (start, open, claim, release,
//! exit) against `one_pick`, its `portpicker` counterpart.
//!
//! ```text
//! cargo run --release --example one_claim
//! ```
//!
//! The registry is `$PORTDADDY_DB` or the per-user default path.

fn main() -> Result<(), portdaddy::Error> {
    let guard = portdaddy::acquire("one_claim")?;
    drop(guard);
    Ok(())
}
