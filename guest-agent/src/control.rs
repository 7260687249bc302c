//! The control channel (`CONTROL_PORT`): one `Request` frame in, one `Response` frame out, until
//! the host closes. The guest's facts come through the `Guest` trait so the answers can be
//! tested against a fake; the parsers of the /proc files live here too.

use berth_protocol::{read_frame, write_frame, Request, Response, PROTOCOL_VERSION};

use crate::vsock::Duplex;

/// Clock values before this (2020-01-01T00:00:00Z) are refused as absurd.
pub const MIN_CLOCK_SECS: u64 = 1_577_836_800;
/// ...and after this (2200-01-01T00:00:00Z).
pub const MAX_CLOCK_SECS: u64 = 7_258_118_400;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {0}")]
    Read(&'static str, #[source] std::io::Error),
    #[error("{0} has no {1} line")]
    Parse(&'static str, &'static str),
    #[error("statvfs {0}")]
    Statvfs(&'static str, #[source] std::io::Error),
    #[error("clock value {0} s is outside 2020..2200; refused")]
    AbsurdClock(u64),
    #[error("set the clock")]
    SetClock(#[source] std::io::Error),
}

/// What `Health` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub dockerd: bool,
    pub containerd: bool,
    pub detail: String,
}

/// Capacity and use of the data disk, in KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskUsage {
    pub total_kib: u64,
    pub used_kib: u64,
}

/// The guest as the control channel sees it.
pub trait Guest {
    fn uptime_ms(&self) -> u64;
    fn health(&self) -> Health;
    /// The text of /proc/meminfo.
    fn meminfo(&self) -> Result<String, Error>;
    /// The text of /proc/loadavg.
    fn loadavg(&self) -> Result<String, Error>;
    fn disk_usage(&self) -> Result<DiskUsage, Error>;
    /// Sets CLOCK_REALTIME; only called with values `validate_clock` accepted.
    fn set_clock(&self, secs: u64, nanos: u32) -> Result<(), Error>;
    /// Starts the clean shutdown (after the `Ack` went out); returns at once.
    fn shutdown(&self, timeout_secs: u32);
}

/// Answers one request. `Shutdown` is answered `Ack` here; `serve` starts it after sending.
pub fn answer(req: &Request, guest: &impl Guest) -> Response {
    let result = match req {
        Request::Hello { .. } => Ok(Response::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: guest.uptime_ms(),
        }),
        Request::Health => {
            let h = guest.health();
            Ok(Response::Health {
                dockerd: h.dockerd,
                containerd: h.containerd,
                detail: h.detail,
            })
        }
        Request::Stats => stats(guest),
        Request::SetClock { unix_nanos } => validate_clock(*unix_nanos)
            .and_then(|(secs, nanos)| guest.set_clock(secs, nanos))
            .map(|()| Response::Ack),
        Request::Shutdown { .. } => Ok(Response::Ack),
    };
    result.unwrap_or_else(|e| Response::Error {
        message: crate::console::chain(&e),
    })
}

fn stats(guest: &impl Guest) -> Result<Response, Error> {
    let (mem_total_kib, mem_available_kib) = parse_meminfo(&guest.meminfo()?)?;
    let disk = guest.disk_usage()?;
    let load_avg_1m = parse_loadavg(&guest.loadavg()?)?;
    Ok(Response::Stats {
        mem_total_kib,
        mem_available_kib,
        disk_total_kib: disk.total_kib,
        disk_used_kib: disk.used_kib,
        load_avg_1m,
    })
}

/// `(MemTotal, MemAvailable)` in KiB from /proc/meminfo text.
pub fn parse_meminfo(text: &str) -> Result<(u64, u64), Error> {
    let field = |name: &'static str| {
        text.lines()
            .find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .ok_or(Error::Parse("/proc/meminfo", name))
    };
    Ok((field("MemTotal")?, field("MemAvailable")?))
}

/// The one-minute load average, as the kernel wrote it, from /proc/loadavg text.
pub fn parse_loadavg(text: &str) -> Result<String, Error> {
    text.split_whitespace()
        .next()
        .filter(|v| v.parse::<f64>().is_ok())
        .map(str::to_string)
        .ok_or(Error::Parse("/proc/loadavg", "load average"))
}

/// Splits nanoseconds since the epoch into `(seconds, nanoseconds)`, refusing absurd values.
pub fn validate_clock(unix_nanos: u64) -> Result<(u64, u32), Error> {
    let secs = unix_nanos / 1_000_000_000;
    if !(MIN_CLOCK_SECS..=MAX_CLOCK_SECS).contains(&secs) {
        return Err(Error::AbsurdClock(secs));
    }
    Ok((secs, (unix_nanos % 1_000_000_000) as u32))
}

/// Serves one control connection until the host closes it. A malformed frame is answered with
/// `Error` and ends this connection only.
pub fn serve<S: Duplex>(mut stream: S, guest: &impl Guest) {
    loop {
        let req = match read_frame::<Request>(&mut stream) {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                let message = format!("bad request: {}", crate::console::chain(&e));
                let _ = write_frame(&mut stream, &Response::Error { message });
                let _ = stream.flush();
                return;
            }
        };
        let response = answer(&req, guest);
        if write_frame(&mut stream, &response).is_err() {
            return;
        }
        if let Request::Shutdown { timeout_secs } = req {
            guest.shutdown(timeout_secs);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    const MEMINFO: &str = "MemTotal:        2030652 kB\nMemFree:          1715012 kB\n\
                           MemAvailable:     1851234 kB\nBuffers:            1234 kB\n";

    #[derive(Default)]
    struct Fake {
        clock: RefCell<Option<(u64, u32)>>,
        shutdown: RefCell<Option<u32>>,
        meminfo: Option<&'static str>,
    }

    impl Guest for Fake {
        fn uptime_ms(&self) -> u64 {
            4321
        }
        fn health(&self) -> Health {
            Health {
                dockerd: false,
                containerd: true,
                detail: "dockerd: not answering".into(),
            }
        }
        fn meminfo(&self) -> Result<String, Error> {
            Ok(self.meminfo.unwrap_or(MEMINFO).to_string())
        }
        fn loadavg(&self) -> Result<String, Error> {
            Ok("0.42 0.10 0.03 1/123 4567\n".into())
        }
        fn disk_usage(&self) -> Result<DiskUsage, Error> {
            Ok(DiskUsage {
                total_kib: 8_000_000,
                used_kib: 1_000,
            })
        }
        fn set_clock(&self, secs: u64, nanos: u32) -> Result<(), Error> {
            *self.clock.borrow_mut() = Some((secs, nanos));
            Ok(())
        }
        fn shutdown(&self, timeout_secs: u32) {
            *self.shutdown.borrow_mut() = Some(timeout_secs);
        }
    }

    #[test]
    fn hello_and_health() {
        let fake = Fake::default();
        let hello = answer(
            &Request::Hello {
                protocol_version: 1,
            },
            &fake,
        );
        assert_eq!(
            hello,
            Response::Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                uptime_ms: 4321
            }
        );
        let Response::Health {
            dockerd,
            containerd,
            detail,
        } = answer(&Request::Health, &fake)
        else {
            panic!("not a health answer");
        };
        assert!(!dockerd && containerd);
        assert_eq!(detail, "dockerd: not answering");
    }

    #[test]
    fn stats_from_sample_proc_files() {
        let fake = Fake::default();
        assert_eq!(
            answer(&Request::Stats, &fake),
            Response::Stats {
                mem_total_kib: 2_030_652,
                mem_available_kib: 1_851_234,
                disk_total_kib: 8_000_000,
                disk_used_kib: 1_000,
                load_avg_1m: "0.42".into()
            }
        );
        let broken = Fake {
            meminfo: Some("MemTotal: 100 kB\n"),
            ..Fake::default()
        };
        assert_eq!(
            answer(&Request::Stats, &broken),
            Response::Error {
                message: "/proc/meminfo has no MemAvailable line".into()
            }
        );
        assert!(parse_loadavg("").is_err());
        assert!(parse_loadavg("x 1 2").is_err());
        // A prefix of another field's name is not that field.
        assert!(parse_meminfo("MemTotalX: 5 kB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn set_clock_accepts_sane_times_only() {
        let fake = Fake::default();
        let ok = Request::SetClock {
            unix_nanos: 1_700_000_000_123_456_789,
        };
        assert_eq!(answer(&ok, &fake), Response::Ack);
        assert_eq!(*fake.clock.borrow(), Some((1_700_000_000, 123_456_789)));
        for absurd in [0, 1_000_000_000_000_000_000, u64::MAX] {
            *fake.clock.borrow_mut() = None;
            let r = answer(&Request::SetClock { unix_nanos: absurd }, &fake);
            assert!(matches!(r, Response::Error { .. }), "{absurd}: {r:?}");
            assert_eq!(*fake.clock.borrow(), None, "clock touched for {absurd}");
        }
        assert!(validate_clock(MIN_CLOCK_SECS * 1_000_000_000).is_ok());
        assert!(validate_clock(MIN_CLOCK_SECS * 1_000_000_000 - 1).is_err());
    }

    #[test]
    fn serve_answers_in_order_then_acks_shutdown_before_starting_it() {
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        let fake = Fake::default();
        for req in [Request::Health, Request::Shutdown { timeout_secs: 9 }] {
            write_frame(&mut host, &req).unwrap();
        }
        serve(guest_side, &fake);
        let first: Response = read_frame(&mut host).unwrap().unwrap();
        assert!(matches!(first, Response::Health { .. }));
        let second: Response = read_frame(&mut host).unwrap().unwrap();
        assert_eq!(second, Response::Ack);
        assert_eq!(*fake.shutdown.borrow(), Some(9));
        assert_eq!(read_frame::<Response>(&mut host).unwrap(), None);
    }

    #[test]
    fn malformed_frames_get_an_error_and_close_the_connection() {
        for bad in [
            b"\x00\x00\x00\x05hello".to_vec(),
            b"\x00\x00\x00\x10{\"type\":\"reboot\"}".to_vec(),
            b"\xff\xff\xff\xff".to_vec(),
        ] {
            let (mut host, guest_side) = UnixStream::pair().unwrap();
            host.write_all(&bad).unwrap();
            // A frame after the bad one must not be answered.
            write_frame(&mut host, &Request::Health).unwrap();
            serve(guest_side, &Fake::default());
            let r: Response = read_frame(&mut host).unwrap().unwrap();
            let Response::Error { message } = r else {
                panic!("not an error: {r:?}");
            };
            assert!(message.starts_with("bad request: "), "{message}");
            // Closed: a clean end, or a reset since the request after it went unread.
            assert!(!matches!(read_frame::<Response>(&mut host), Ok(Some(_))));
        }
    }
}
