//! One module per command of `hashistack-agent`; `main.rs` parses the command line and dispatches here.
//! `boot` (what systemd runs), `render` (offline), `disk` (`disk prepare`), `image` (`image verify`) and
//! `escrow` (operators: `escrow open` / `verify`), `snapshot` (the timer's run; operators' `snapshot list` /
//! `restore`). `status` and `smoke` live in the library (`status::cli`,
//! `smoke`), which main.rs calls directly.

pub mod boot;
pub mod disk;
pub mod escrow;
pub mod image;
pub mod render;
pub mod snapshot;

use std::process::ExitCode;

/// One line on stderr naming the problem, and the exit code (1 run-time failure, 2 bad input).
pub fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("hashistack-agent: {msg}");
    ExitCode::from(code)
}
