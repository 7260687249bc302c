//! The control channel (`CONTROL_PORT`): one `Request` frame in, one `Response` frame out, until
//! the host closes, or, after `Subscribe`, `Event` frames out. The guest's facts come through the
//! `Guest` trait so the answers can be tested against a fake; the parsers of the /proc files live
//! here too.

use std::sync::Arc;

use berth_protocol::files::FileEvent;
use berth_protocol::{
    decode_request, read_frame_body, write_frame, DecodeError, Request, Response, PROTOCOL_VERSION,
};

use crate::events::{self, Bus};
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
    /// Where `Subscribe` connections get their events.
    fn events(&self) -> &Arc<Bus>;
    /// Raises host file events in the guest (`notify`); failures are logged there, not answered.
    fn file_events(&self, events: &[FileEvent]) {
        crate::notify::raise(events);
    }
}

/// Answers one request. `Shutdown` and `Subscribe` are answered `Ack` here; `serve` starts the
/// shutdown after sending it, and serves a subscription itself.
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
        Request::Clock => Ok(Response::Clock {
            unix_nanos: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        }),
        Request::SetClock { unix_nanos } => validate_clock(*unix_nanos)
            .and_then(|(secs, nanos)| guest.set_clock(secs, nanos))
            .map(|()| Response::Ack),
        Request::FileEvents { events } => {
            guest.file_events(events);
            Ok(Response::Ack)
        }
        Request::Shutdown { .. } | Request::Subscribe => Ok(Response::Ack),
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
    let field =
        |name: &'static str| meminfo_kib(text, name).ok_or(Error::Parse("/proc/meminfo", name));
    Ok((field("MemTotal")?, field("MemAvailable")?))
}

/// The figure of field `name` (as `MemFree` or `Active(file)`) in /proc/meminfo text, in KiB.
pub fn meminfo_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse::<u64>().ok()
    })
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

/// Serves one control connection until the host closes it. A request of a `type` this agent
/// does not know is answered `Unsupported` and a frame whose body is not a request `Error`; the
/// connection lives on after both, since the frame's length kept the framing intact. A frame
/// that breaks the framing (too large, cut short) is answered `Error` and ends the connection,
/// as nothing after it can be trusted to start a frame. `Subscribe` turns the connection into an
/// event stream (`events::serve`) for the rest of its life.
pub fn serve<S: Duplex>(mut stream: S, guest: &impl Guest) {
    let mut told_version = false;
    loop {
        let body = match read_frame_body(&mut stream) {
            Ok(Some(body)) => body,
            Ok(None) => return,
            Err(e) => {
                let message = format!("bad request: {}", crate::console::chain(&e));
                let _ = write_frame(&mut stream, &Response::Error { message });
                let _ = stream.flush();
                return;
            }
        };
        let req = match decode_request(&body) {
            Ok(req) => req,
            Err(e) => {
                if write_frame(&mut stream, &undecodable(e)).is_err() {
                    return;
                }
                continue;
            }
        };
        if let Request::Hello { protocol_version } = req {
            if protocol_version != PROTOCOL_VERSION && !told_version {
                told_version = true;
                crate::console::say(&format!(
                    "host speaks control protocol {protocol_version}, this agent {PROTOCOL_VERSION}"
                ));
            }
        }
        if req == Request::Subscribe {
            if let Err(e) = events::serve(guest.events(), stream) {
                crate::console::warn(&format!("event subscriber: {}", crate::console::chain(&e)));
            }
            return;
        }
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

/// The answer to a frame that is not a request this agent serves.
fn undecodable(e: DecodeError) -> Response {
    match e {
        DecodeError::Unsupported(request) => Response::Unsupported { request },
        malformed @ DecodeError::Malformed(_) => Response::Error {
            message: format!("bad request: {}", crate::console::chain(&malformed)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::read_frame;
    use std::cell::RefCell;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    const MEMINFO: &str = "MemTotal:        2030652 kB\nMemFree:          1715012 kB\n\
                           MemAvailable:     1851234 kB\nBuffers:            1234 kB\n";

    struct Fake {
        clock: RefCell<Option<(u64, u32)>>,
        shutdown: RefCell<Option<u32>>,
        meminfo: Option<&'static str>,
        events: Arc<Bus>,
        file_events: RefCell<Vec<FileEvent>>,
    }

    impl Default for Fake {
        fn default() -> Self {
            Fake {
                clock: RefCell::default(),
                shutdown: RefCell::default(),
                meminfo: None,
                events: Arc::new(Bus::new(events::QUEUE_LEN)),
                file_events: RefCell::default(),
            }
        }
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
        fn file_events(&self, events: &[FileEvent]) {
            self.file_events.borrow_mut().extend_from_slice(events);
        }
        fn set_clock(&self, secs: u64, nanos: u32) -> Result<(), Error> {
            *self.clock.borrow_mut() = Some((secs, nanos));
            Ok(())
        }
        fn shutdown(&self, timeout_secs: u32) {
            *self.shutdown.borrow_mut() = Some(timeout_secs);
        }
        fn events(&self) -> &Arc<Bus> {
            &self.events
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
    fn file_events_over_the_wire_are_acked_and_raised_in_order() {
        use berth_protocol::files::FileEventKind;
        let fake = Fake::default();
        let (mut host, agent) = UnixStream::pair().unwrap();
        let events = vec![
            FileEvent {
                kind: FileEventKind::Create,
                path: "/home/u/app/a.js".into(),
            },
            FileEvent {
                kind: FileEventKind::Rename {
                    from: "/home/u/app/a.js".into(),
                },
                path: "/home/u/app/b.js".into(),
            },
        ];
        write_frame(
            &mut host,
            &Request::FileEvents {
                events: events.clone(),
            },
        )
        .unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        serve(agent, &fake);
        assert_eq!(
            read_frame::<Response>(&mut host).unwrap(),
            Some(Response::Ack)
        );
        assert_eq!(*fake.file_events.borrow(), events);
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
    fn clock_answers_the_wall_clock() {
        let Response::Clock { unix_nanos } = answer(&Request::Clock, &Fake::default()) else {
            panic!("not a clock answer");
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(
            now.abs_diff(unix_nanos) < 1_000_000_000,
            "{now} vs {unix_nanos}"
        );
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

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        frame
    }

    #[test]
    fn hello_over_the_wire_answers_our_version_whatever_the_host_speaks() {
        for host_version in [PROTOCOL_VERSION, PROTOCOL_VERSION + 1, 1] {
            let (mut host, guest_side) = UnixStream::pair().unwrap();
            for _ in 0..2 {
                write_frame(
                    &mut host,
                    &Request::Hello {
                        protocol_version: host_version,
                    },
                )
                .unwrap();
            }
            host.shutdown(std::net::Shutdown::Write).unwrap();
            serve(guest_side, &Fake::default());
            for _ in 0..2 {
                assert_eq!(
                    read_frame::<Response>(&mut host).unwrap(),
                    Some(Response::Hello {
                        protocol_version: PROTOCOL_VERSION,
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                        uptime_ms: 4321,
                    })
                );
            }
            assert_eq!(read_frame::<Response>(&mut host).unwrap(), None);
        }
    }

    #[test]
    fn an_unsupported_request_is_named_and_the_connection_lives() {
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        host.write_all(&frame(br#"{"type":"balloon","target_mib":512}"#))
            .unwrap();
        write_frame(&mut host, &Request::Health).unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        serve(guest_side, &Fake::default());
        assert_eq!(
            read_frame::<Response>(&mut host).unwrap(),
            Some(Response::Unsupported {
                request: "balloon".into()
            })
        );
        let next: Response = read_frame(&mut host).unwrap().unwrap();
        assert!(matches!(next, Response::Health { .. }), "{next:?}");
        assert_eq!(read_frame::<Response>(&mut host).unwrap(), None);
    }

    #[test]
    fn a_malformed_body_gets_an_error_and_the_connection_lives() {
        for bad in [
            &b"hello"[..],
            br#"{"type":"shutdown","timeout_secs":"soon"}"#,
            br#"{"no_type":1}"#,
            b"",
        ] {
            let (mut host, guest_side) = UnixStream::pair().unwrap();
            host.write_all(&frame(bad)).unwrap();
            write_frame(&mut host, &Request::Health).unwrap();
            host.shutdown(std::net::Shutdown::Write).unwrap();
            let fake = Fake::default();
            serve(guest_side, &fake);
            let r: Response = read_frame(&mut host).unwrap().unwrap();
            let Response::Error { message } = r else {
                panic!("{bad:?}: not an error: {r:?}");
            };
            assert!(message.starts_with("bad request: "), "{message}");
            let next: Response = read_frame(&mut host).unwrap().unwrap();
            assert!(matches!(next, Response::Health { .. }), "{next:?}");
            assert_eq!(*fake.shutdown.borrow(), None, "a bad shutdown ran");
        }
    }

    #[test]
    fn broken_framing_gets_an_error_and_closes_the_connection() {
        for bad in [
            b"\xff\xff\xff\xff".to_vec(),
            // The length says 16; the body is 17 bytes, so its last byte starts a bogus header.
            b"\x00\x00\x00\x10{\"type\":\"reboot\"}".to_vec(),
        ] {
            let (mut host, guest_side) = UnixStream::pair().unwrap();
            host.write_all(&bad).unwrap();
            // A frame after the bad one must not be answered.
            write_frame(&mut host, &Request::Health).unwrap();
            serve(guest_side, &Fake::default());
            let mut errors = 0;
            // Closed: a clean end, or a reset since the request after it went unread.
            while let Ok(Some(r)) = read_frame::<Response>(&mut host) {
                let Response::Error { message } = r else {
                    panic!("not an error: {r:?}");
                };
                assert!(message.starts_with("bad request: "), "{message}");
                errors += 1;
            }
            assert!(errors >= 1, "no error answer");
        }
    }

    #[test]
    fn subscribe_is_acked_then_events_are_pushed() {
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        let fake = Fake::default();
        let bus = Arc::clone(&fake.events);
        write_frame(
            &mut host,
            &Request::Hello {
                protocol_version: PROTOCOL_VERSION,
            },
        )
        .unwrap();
        write_frame(&mut host, &Request::Subscribe).unwrap();
        let served = std::thread::spawn(move || serve(guest_side, &fake));
        let hello: Response = read_frame(&mut host).unwrap().unwrap();
        assert!(matches!(hello, Response::Hello { .. }), "{hello:?}");
        assert_eq!(
            read_frame::<Response>(&mut host).unwrap(),
            Some(Response::Ack)
        );
        let ready = berth_protocol::Event::DaemonReady {
            daemon: "dockerd".into(),
        };
        bus.publish(&ready);
        assert_eq!(
            read_frame::<berth_protocol::Event>(&mut host).unwrap(),
            Some(ready)
        );
        drop(host);
        served.join().unwrap();
        assert_eq!(bus.subscriber_count(), 0);
    }
}
