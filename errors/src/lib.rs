//! Berth's error convention, the part that is code: a message names what failed and never
//! repeats its cause; the cause is the error's `source()`; whoever reports the error prints the
//! whole chain once, on one line: "starting the VM: reading run/vm.json: field `cpus`: ...".
#![forbid(unsafe_code)]

use std::error::Error;
use std::fmt;

/// Displays an error and each of its causes, joined by ": ". For log fields and `format!`:
/// `tracing::warn!("{}", Chain(&e))`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The error and its causes on one line, as `Chain` displays them.
pub fn chain(e: &dyn Error) -> String {
    Chain(e).to_string()
}

/// Makes a panic on any thread end the whole process, as `panic = "abort"` would: the panic's
/// message is printed as usual, then the process aborts. The release profile unwinds, so that the
/// binaries and the tests share one build of every dependency (a test needs unwinding, and with
/// `abort` cargo built tauri and the rest twice); Berth's long-running processes call this first
/// thing, so a panicked vCPU, device or proxy thread never leaves a half-working process behind —
/// whoever supervises it sees it die.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Failed {
        what: &'static str,
        source: Option<Box<Failed>>,
    }

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.what)
        }
    }

    impl Error for Failed {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source.as_deref().map(|s| s as &(dyn Error + 'static))
        }
    }

    #[test]
    fn every_cause_is_printed_once_in_order() {
        let root = Failed {
            what: "No such file or directory",
            source: None,
        };
        let middle = Failed {
            what: "opening /x/config.toml",
            source: Some(Box::new(root)),
        };
        let top = Failed {
            what: "starting the VM",
            source: Some(Box::new(middle)),
        };
        assert_eq!(
            chain(&top),
            "starting the VM: opening /x/config.toml: No such file or directory"
        );
        assert_eq!(format!("{}", Chain(&top)), chain(&top));
        let alone = Failed {
            what: "alone",
            source: None,
        };
        assert_eq!(chain(&alone), "alone");
    }
}
