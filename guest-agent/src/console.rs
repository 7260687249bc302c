//! Console output: every line the agent prints, with its `berth-agent:` prefix.
//!
//! The kernel hands PID 1 `/dev/console` as stdout and stderr. Writes go to stderr unbuffered and
//! their errors are ignored: `eprintln!` would panic on a broken console, and PID 1 must not.

use std::io::Write;

/// The prefix of every line; tests and the boot benchmark grep for it.
pub const PREFIX: &str = "berth-agent:";

/// Prints `berth-agent: <message>`.
pub fn say(message: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{PREFIX} {message}");
}

/// Prints `berth-agent: warning: <message>`: something is off but the boot goes on.
pub fn warn(message: &str) {
    say(&format!("warning: {message}"));
}

/// Prints `berth-agent: error: <message>`: the boot cannot go on.
pub fn error(message: &str) {
    say(&format!("error: {message}"));
}

pub use berth_errors::chain;
