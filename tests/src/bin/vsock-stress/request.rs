//! The one line the host sends first on each connection to `guest-serve`, saying what to do.
//! Sizes are bytes; every reply that carries a verdict ends the stream with one text line.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Both directions at once: the host sends `size` bytes of stream `seed`, the guest sends
    /// `size` bytes of `guest_seed(seed)`, then the guest's verdict on what it received.
    Bidir { size: u64, seed: u64 },
    /// The guest only sends `size` bytes, then `sent <ms>` (how long its writes took).
    Send { size: u64, seed: u64 },
    /// The guest waits `delay_ms` before reading `size` bytes, then its verdict.
    SlowRead { size: u64, seed: u64, delay_ms: u64 },
    /// The guest dials `count` connections to host port `port`; each starts with `conn <i>` and
    /// then goes as `Bidir` with seed `seed + i` (guest verdict last). Then one summary line
    /// here: `dialed ok=<n> of=<count>` plus a `dial-fail` line per failure.
    Dial {
        count: u32,
        size: u64,
        seed: u64,
        port: u32,
    },
    /// The guest sends `after` bytes of `guest_seed(seed)` and closes the socket without
    /// reading what the host sends.
    Abort { seed: u64, after: u64 },
    /// Like `Abort`, but the whole guest-serve process exits.
    Exit { seed: u64, after: u64 },
    /// `stats active=<n> peak=<n> total=<n>`: connections open now, at most, and ever.
    Stats,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Bidir { size, seed } => write!(f, "BIDIR {size} {seed}"),
            Request::Send { size, seed } => write!(f, "SEND {size} {seed}"),
            Request::SlowRead {
                size,
                seed,
                delay_ms,
            } => write!(f, "SLOWREAD {size} {seed} {delay_ms}"),
            Request::Dial {
                count,
                size,
                seed,
                port,
            } => write!(f, "DIAL {count} {size} {seed} {port}"),
            Request::Abort { seed, after } => write!(f, "ABORT {seed} {after}"),
            Request::Exit { seed, after } => write!(f, "EXIT {seed} {after}"),
            Request::Stats => write!(f, "STATS"),
        }
    }
}

impl Request {
    pub fn parse(line: &str) -> Result<Request, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("argument {i} of {line:?} is not a number"))
        };
        let port = |i: usize| num(i).and_then(|n| u32::try_from(n).map_err(|e| e.to_string()));
        let want = |n: usize| {
            if words.len() == n {
                Ok(())
            } else {
                Err(format!("{line:?}: want {} arguments", n - 1))
            }
        };
        match words.first().copied() {
            Some("BIDIR") => want(3).and(Ok(Request::Bidir {
                size: num(1)?,
                seed: num(2)?,
            })),
            Some("SEND") => want(3).and(Ok(Request::Send {
                size: num(1)?,
                seed: num(2)?,
            })),
            Some("SLOWREAD") => want(4).and(Ok(Request::SlowRead {
                size: num(1)?,
                seed: num(2)?,
                delay_ms: num(3)?,
            })),
            Some("DIAL") => want(5).and(Ok(Request::Dial {
                count: port(1)?,
                size: num(2)?,
                seed: num(3)?,
                port: port(4)?,
            })),
            Some("ABORT") => want(3).and(Ok(Request::Abort {
                seed: num(1)?,
                after: num(2)?,
            })),
            Some("EXIT") => want(3).and(Ok(Request::Exit {
                seed: num(1)?,
                after: num(2)?,
            })),
            Some("STATS") => want(1).and(Ok(Request::Stats)),
            _ => Err(format!("unknown request {line:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_junk_is_refused() {
        let all = [
            Request::Bidir { size: 5, seed: 6 },
            Request::Send { size: 1, seed: 2 },
            Request::SlowRead {
                size: 1,
                seed: 2,
                delay_ms: 3,
            },
            Request::Dial {
                count: 4,
                size: 5,
                seed: 6,
                port: 7,
            },
            Request::Abort { seed: 1, after: 9 },
            Request::Exit { seed: 1, after: 9 },
            Request::Stats,
        ];
        for r in all {
            assert_eq!(Request::parse(&r.to_string()), Ok(r));
        }
        assert!(Request::parse("BIDIR 1").is_err());
        assert!(Request::parse("BIDIR x 1").is_err());
        assert!(Request::parse("DIAL 1 2 3 99999999999").is_err());
        assert!(Request::parse("NOPE").is_err());
    }
}
