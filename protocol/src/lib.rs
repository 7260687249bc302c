//! The whole host⇄guest control protocol in one place: the vsock ports the agent listens on, the
//! messages of the control channel, and their framing (a 4-byte big-endian length, then JSON).
#![forbid(unsafe_code)]

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

mod shell;
pub use shell::{
    read_shell_frame, write_shell_frame, write_stdin, ShellFrame, ShellOutput, EXIT_CANNOT_RUN,
    EXIT_NOT_FOUND, MAX_DATA,
};

/// Bumped on any incompatible change; `Hello` tells each side the other's.
pub const PROTOCOL_VERSION: u32 = 2;

/// The guest's context ID.
pub const GUEST_CID: u64 = 3;
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
    Ack,
    Error {
        message: String,
    },
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
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(u64),
    #[error("malformed message: {0}")]
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
    let mut len = [0u8; 4];
    if !read_header(r, &mut len)? {
        return Ok(None);
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge(u64::from(len)));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(Some(serde_json::from_slice(&body)?))
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
