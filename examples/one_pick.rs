//! The baseline of `one_claim`: a fresh process that calls `portpicker::pick_unused_port()`
//! once. `benches/processes.rs` times both.
//!
//! ```text
//! cargo run --release --example one_pick
//! ```

fn main() {
    if portpicker::pick_unused_port().is_none() {
        std::process::exit(1);
    }
}
