//! The whole host⇄guest control protocol in one place: the vsock ports the agent listens on, the
//! messages of the control channel, and their framing (a 4-byte big-endian length, then JSON).
#![forbid(unsafe_code)]

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub mod cmdline;
pub mod files;
pub mod ports;
mod shell;
pub use shell::{
    read_shell_frame, write_shell_frame, write_stdin, ShellFrame, ShellOutput, EXIT_CANNOT_RUN,
    EXIT_NOT_FOUND, MAX_DATA,
};

/// Bumped on any incompatible change; `Hello` tells each side the other's. 3: `Subscribe` and
/// `Event`s, `Unsupported` answers. 4: `FileEvents` and `Event::WatchPaths` (host file events).
pub const PROTOCOL_VERSION: u32 = 5;
/// Guest port spliced byte for byte to dockerd's `/var/run/docker.sock`.
pub const DOCKER_API_PORT: u32 = 2375;
/// Guest port of the control channel (these messages).
pub const CONTROL_PORT: u32 = 1024;
/// Guest port that runs a command or an interactive shell: one `ShellRequest` frame, then
/// `ShellFrame`s both ways (stdin, resizes; stdout, stderr, the exit status).
pub const SHELL_PORT: u32 = 1025;

/// Frames larger than this are refused (a corrupt or hostile length).
pub const MAX_FRAME: u32 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello {
        protocol_version: u32,
    },
    /// Is dockerd answering?
    Health,
    /// What the guest uses: memory, disk, load.
    Stats,
    /// Stop containers, sync, unmount, power off. Answered with `Ack` before it starts.
    Shutdown {
        timeout_secs: u32,
    },
    /// Set the guest's wall clock (after the host slept), in nanoseconds since the epoch.
    SetClock {
        unix_nanos: u64,
    },
    /// What the guest's wall clock says: answered with `Clock` (protocol 5).
    Clock,
    /// Answered `Ack`; from then on the agent pushes `Event` frames on this connection (and
    /// takes no more requests on it) until either side closes it.
    Subscribe,
    /// Changes the host made under the paths of the last `Event::WatchPaths`, for the agent to
    /// raise as inotify events in the guest. Answered `Ack` (events it cannot raise are logged,
    /// not reported: a watcher missing one event is no reason to fail the batch).
    FileEvents {
        events: Vec<files::FileEvent>,
    },
}

impl Request {
    /// The `type` of every request this side knows, as on the wire.
    pub const TYPES: [&'static str; 8] = [
        "hello",
        "health",
        "stats",
        "shutdown",
        "set_clock",
        "clock",
        "subscribe",
        "file_events",
    ];
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol_version: u32,
        agent_version: String,
        uptime_ms: u64,
    },
    Health {
        dockerd: bool,
        containerd: bool,
        detail: String,
    },
    Stats {
        mem_total_kib: u64,
        mem_available_kib: u64,
        disk_total_kib: u64,
        disk_used_kib: u64,
        load_avg_1m: String,
    },
    /// The guest's wall clock, in nanoseconds since the epoch.
    Clock {
        unix_nanos: u64,
    },
    Ack,
    /// The request was understood and failed.
    Error {
        message: String,
    },
    /// The request's `type` is one this agent does not know (a newer host); the connection
    /// lives on.
    Unsupported {
        request: String,
    },
}

/// What the agent pushes on a `Subscribe` connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A supervised daemon (containerd, dockerd) exited; the supervisor starts it again after
    /// `restart_in_ms`.
    DaemonExited {
        daemon: String,
        /// How it ended, in words ("exit status 1", "killed by signal 9").
        status: String,
        restart_in_ms: u64,
    },
    /// A supervised daemon is ready to serve again (dockerd answers on its socket).
    DaemonReady { daemon: String },
    /// The host folders the host should watch for changes: the sources of running containers'
    /// bind mounts that lie inside a share (the whole set, each time it changes).
    WatchPaths { paths: Vec<std::path::PathBuf> },
}

/// Why a frame's body is not a `Request` this side can serve.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Well-formed, but of a `type` this side does not know: answer `Unsupported`.
    #[error("unsupported request type {0:?}")]
    Unsupported(String),
    /// Not a request at all.
    #[error("malformed request")]
    Malformed(#[source] serde_json::Error),
}

/// Decodes a control request, telling a request of an unknown `type` (answered `Unsupported`,
/// the connection lives) from garbage.
pub fn decode_request(body: &[u8]) -> Result<Request, DecodeError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(DecodeError::Malformed)?;
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    serde_json::from_value(value).map_err(|e| match kind {
        Some(kind) if !Request::TYPES.contains(&kind.as_str()) => DecodeError::Unsupported(kind),
        _ => DecodeError::Malformed(e),
    })
}

/// The first frame on `SHELL_PORT`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellRequest {
    /// Program and arguments; empty for a login shell.
    pub command: Vec<String>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    pub term: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(u64),
    #[error("malformed message")]
    Decode(#[from] serde_json::Error),
    #[error("malformed shell frame: {0}")]
    ShellFrame(String),
}

/// Writes one frame holding `msg`.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), Error> {
    let body = serde_json::to_vec(msg)?;
    if body.len() as u64 > u64::from(MAX_FRAME) {
        return Err(Error::FrameTooLarge(body.len() as u64));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<Option<T>, Error> {
    match read_frame_body(r)? {
        Some(body) => Ok(Some(serde_json::from_slice(&body)?)),
        None => Ok(None),
    }
}

/// Reads one frame's body, undecoded (for `decode_request`); `Ok(None)` on a clean end of
/// stream before a frame starts.
pub fn read_frame_body(r: &mut impl Read) -> Result<Option<Vec<u8>>, Error> {
    let mut len = [0u8; 4];
    if !read_header(r, &mut len)? {
        return Ok(None);
    }
    let len = frame_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

/// The body length a frame header announces, refused over `MAX_FRAME`.
pub fn frame_len(header: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge(u64::from(len)));
    }
    Ok(len as usize)
}

/// Fills `header`; `Ok(false)` on a clean end of stream before its first byte, an error when
/// the stream ends inside it.
fn read_header(r: &mut impl Read, header: &mut [u8]) -> Result<bool, Error> {
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_frames() {
        let mut wire = Vec::new();
        let msgs = vec![
            Request::Hello {
                protocol_version: PROTOCOL_VERSION,
            },
            Request::Health,
            Request::Shutdown { timeout_secs: 10 },
            Request::SetClock {
                unix_nanos: 1_700_000_000_123_456_789,
            },
        ];
        for m in &msgs {
            write_frame(&mut wire, m).unwrap();
        }
        let mut r = wire.as_slice();
        for m in &msgs {
            assert_eq!(read_frame::<Request>(&mut r).unwrap().as_ref(), Some(m));
        }
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), None);
    }

    #[test]
    fn the_wire_format_is_length_then_tagged_json() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Response::Ack).unwrap();
        assert_eq!(&wire[..4], &[0, 0, 0, 14]);
        assert_eq!(&wire[4..], br#"{"type":"ack"}"#);
    }

    #[test]
    fn unknown_request_types_are_unsupported_and_garbage_is_malformed() {
        for req in [
            Request::Hello {
                protocol_version: 1,
            },
            Request::Health,
            Request::Stats,
            Request::Shutdown { timeout_secs: 1 },
            Request::SetClock { unix_nanos: 1 },
            Request::Clock,
            Request::Subscribe,
            Request::FileEvents {
                events: vec![files::FileEvent {
                    kind: files::FileEventKind::Modify,
                    path: "/home/u/app/index.js".into(),
                }],
            },
        ] {
            let body = serde_json::to_vec(&req).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let kind = value["type"].as_str().unwrap();
            assert!(Request::TYPES.contains(&kind), "{kind} missing from TYPES");
            assert_eq!(decode_request(&body).unwrap(), req);
        }
        assert!(matches!(
            decode_request(br#"{"type":"balloon","target_mib":5}"#),
            Err(DecodeError::Unsupported(kind)) if kind == "balloon"
        ));
        // A known type with bad fields is malformed, not unsupported.
        assert!(matches!(
            decode_request(br#"{"type":"shutdown","timeout_secs":"soon"}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_request(b"[1,2]"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_request(b"{"),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn events_are_tagged_json() {
        let event = Event::DaemonExited {
            daemon: "dockerd".into(),
            status: "killed by signal 9".into(),
            restart_in_ms: 1000,
        };
        let json = serde_json::to_string(&event).unwrap();
        assert!(json.starts_with(r#"{"event":"daemon_exited""#), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);

        let event = Event::WatchPaths {
            paths: vec!["/home/u/app".into(), "/tmp/test.txt".into()],
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"event":"watch_paths","paths":["/home/u/app","/tmp/test.txt"]}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
    }

    #[test]
    fn hostile_frames_are_refused() {
        let huge = (MAX_FRAME + 1).to_be_bytes();
        assert!(matches!(
            read_frame::<Request>(&mut huge.as_slice()),
            Err(Error::FrameTooLarge(_))
        ));
        let mut truncated = vec![0, 0, 0, 10];
        truncated.extend_from_slice(b"{\"ty");
        assert!(matches!(
            read_frame::<Request>(&mut truncated.as_slice()),
            Err(Error::Io(_))
        ));
        let mut garbage = Vec::new();
        write_frame(&mut garbage, &"not a request").unwrap();
        assert!(matches!(
            read_frame::<Request>(&mut garbage.as_slice()),
            Err(Error::Decode(_))
        ));
        assert!(matches!(
            read_frame::<Request>(&mut [0u8, 0].as_slice()),
            Err(Error::Io(_))
        ));
    }
}
