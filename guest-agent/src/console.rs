//! Console output: every line the agent prints, with its `berth-agent:` prefix.
//!
//! The kernel hands PID 1 `/dev/console` as stdout and stderr. Writes go to stderr unbuffered and
//! their errors are ignored: `eprintln!` would panic on a broken console, and PID 1 must not.

use std::io::Write;

/// The prefix of every line; tests and the boot benchmark grep for it.
pub const PREFIX: &str = "berth-agent:";

/// Prints `berth-agent: <message>` in one write: `writeln!` on unbuffered stderr makes a write per
/// piece, and the kernel's own console messages land between them, splitting the line.
pub fn say(message: &str) {
    let line = format!("{PREFIX} {message}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
