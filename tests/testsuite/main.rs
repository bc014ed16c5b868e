//! The integration tests, in one binary (one link of the bundled SQLite instead of one per
//! file): a module per file, sharing the helpers in `common`.
//!
//! Tests that need real processes start this binary again with one test selected by its full
//! name (`processes::worker_entry`); [`common::workers`] and [`sibling_test!`] build it.
//! `cargo nextest run` (README.md's test command) runs every test in a process of its own.

#[macro_use]
mod common;

mod api;
mod api_freeze;
mod bad_input;
mod blocks;
mod claim_speed;
#[cfg(feature = "cli")]
mod cli;
#[cfg(feature = "cli")]
mod cli_first;
#[cfg(feature = "cli")]
mod cli_tools;
mod contention;
#[cfg(target_os = "linux")]
mod create_attack;
#[cfg(target_os = "linux")]
mod creation;
mod daily_attack;
mod durability;
mod faults;
mod format;
mod freeze_attack;
mod handover;
mod hostile;
#[cfg(feature = "cli")]
mod hostile_cli;
mod inspection;
mod limits;
mod liveness;
mod logging;
mod model;
mod open_cost;
mod processes;
mod registry_files;
mod replaced;
mod reserved;
#[cfg(all(target_os = "linux", feature = "cli"))]
mod small_blocks;
mod sys;
