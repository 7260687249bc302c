//! The shell stream on `SHELL_PORT` after its `ShellRequest`: small binary frames both ways
//! (1-byte kind, 4-byte big-endian length, payload), so the session carries stdin, stdout and
//! stderr apart, window resizes, and the command's exit status at its end.

use std::io::{Read, Write};

use crate::{read_header, Error};

/// Largest payload of one frame; a longer length is a corrupt or hostile stream.
pub const MAX_DATA: usize = 64 * 1024;

/// Exit status reported for a command that could not be started because it does not exist,
/// and for one that exists but could not run (as POSIX shells do).
pub const EXIT_NOT_FOUND: i32 = 127;
pub const EXIT_CANNOT_RUN: i32 = 126;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShellFrame {
    /// Host → guest: bytes for the command's stdin (or its terminal).
    Stdin(Vec<u8>),
    /// Host → guest: the host's input ended; a pipe session's stdin is closed.
    StdinEnd,
    /// Host → guest: the host terminal's new size.
    Resize { rows: u16, cols: u16 },
    /// Guest → host: the command's stdout (on a pty: everything it writes).
    Stdout(Vec<u8>),
    /// Guest → host: the command's stderr (pipe sessions only).
    Stderr(Vec<u8>),
    /// Guest → host, the last frame: the exit status as a shell reports it (128 + N when the
    /// command was killed by signal N).
    Exit(i32),
}

const STDIN: u8 = 1;
const STDIN_END: u8 = 2;
const RESIZE: u8 = 3;
const STDOUT: u8 = 4;
const STDERR: u8 = 5;
const EXIT: u8 = 6;

impl ShellFrame {
    /// The frame as it goes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            ShellFrame::Stdin(data) => (STDIN, data.into()),
            ShellFrame::StdinEnd => (STDIN_END, (&[][..]).into()),
            ShellFrame::Resize { rows, cols } => {
                let mut p = rows.to_be_bytes().to_vec();
                p.extend_from_slice(&cols.to_be_bytes());
                (RESIZE, p.into())
            }
            ShellFrame::Stdout(data) => (STDOUT, data.into()),
            ShellFrame::Stderr(data) => (STDERR, data.into()),
            ShellFrame::Exit(code) => (EXIT, code.to_be_bytes().to_vec().into()),
        };
        if payload.len() > MAX_DATA {
            return Err(Error::FrameTooLarge(payload.len() as u64));
        }
        let mut wire = Vec::with_capacity(5 + payload.len());
        wire.push(kind);
        wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        wire.extend_from_slice(&payload);
        Ok(wire)
    }

    fn decode(kind: u8, payload: Vec<u8>) -> Result<ShellFrame, Error> {
        let fixed = |want: usize| -> Result<&[u8], Error> {
            if payload.len() == want {
                Ok(&payload)
            } else {
                Err(Error::ShellFrame(format!(
                    "kind {kind} carries {} bytes, not {want}",
                    payload.len()
                )))
            }
        };
        Ok(match kind {
            STDIN => ShellFrame::Stdin(payload),
            STDIN_END => {
                fixed(0)?;
                ShellFrame::StdinEnd
            }
            RESIZE => {
                let p = fixed(4)?;
                ShellFrame::Resize {
                    rows: u16::from_be_bytes([p[0], p[1]]),
                    cols: u16::from_be_bytes([p[2], p[3]]),
                }
            }
            STDOUT => ShellFrame::Stdout(payload),
            STDERR => ShellFrame::Stderr(payload),
            EXIT => {
                let p = fixed(4)?;
                ShellFrame::Exit(i32::from_be_bytes([p[0], p[1], p[2], p[3]]))
            }
            other => return Err(Error::ShellFrame(format!("unknown kind {other}"))),
        })
    }
}

/// Writes one frame in a single `write_all`, so writers sharing a stream behind a lock never
/// interleave.
pub fn write_shell_frame(w: &mut impl Write, frame: &ShellFrame) -> Result<(), Error> {
    w.write_all(&frame.encode()?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_shell_frame(r: &mut impl Read) -> Result<Option<ShellFrame>, Error> {
    let mut header = [0u8; 5];
    if !read_header(r, &mut header)? {
        return Ok(None);
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len as usize > MAX_DATA {
        return Err(Error::FrameTooLarge(u64::from(len)));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    ShellFrame::decode(header[0], payload).map(Some)
}

/// Sends `data` as `Stdin` frames of at most `MAX_DATA` bytes each.
pub fn write_stdin(w: &mut impl Write, data: &[u8]) -> Result<(), Error> {
    for chunk in data.chunks(MAX_DATA) {
        write_shell_frame(w, &ShellFrame::Stdin(chunk.to_vec()))?;
    }
    Ok(())
}

/// The output side of a session as one byte stream: stdout and stderr in the order they came,
/// until the `Exit` frame, whose status is then in `exit()`. For callers that only read what a
/// command prints (tests, log tails).
#[derive(Debug)]
pub struct ShellOutput<R> {
    inner: R,
    pending: Vec<u8>,
    offset: usize,
    exit: Option<i32>,
}

impl<R: Read> ShellOutput<R> {
    pub fn new(inner: R) -> Self {
        ShellOutput {
            inner,
            pending: Vec::new(),
            offset: 0,
            exit: None,
        }
    }

    /// The command's exit status, once the stream has been read to its end.
    pub fn exit(&self) -> Option<i32> {
        self.exit
    }
}

impl<R: Read> Read for ShellOutput<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.offset == self.pending.len() {
            if self.exit.is_some() {
                return Ok(0);
            }
            let frame = read_shell_frame(&mut self.inner).map_err(|e| match e {
                Error::Io(io) => io,
                other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
            })?;
            match frame {
                Some(ShellFrame::Stdout(data) | ShellFrame::Stderr(data)) => {
                    self.pending = data;
                    self.offset = 0;
                }
                Some(ShellFrame::Exit(code)) => self.exit = Some(code),
                Some(other) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("unexpected {other:?} from the guest"),
                    ))
                }
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the shell session ended without an exit status",
                    ))
                }
            }
        }
        let n = buf.len().min(self.pending.len() - self.offset);
        buf[..n].copy_from_slice(&self.pending[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips() {
        let frames = vec![
            ShellFrame::Stdin(b"ls\n".to_vec()),
            ShellFrame::Stdin(Vec::new()),
            ShellFrame::StdinEnd,
            ShellFrame::Resize {
                rows: 50,
                cols: 200,
            },
            ShellFrame::Stdout(vec![0xff; MAX_DATA]),
            ShellFrame::Stderr(b"oops\n".to_vec()),
            ShellFrame::Exit(-1),
            ShellFrame::Exit(137),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            write_shell_frame(&mut wire, f).unwrap();
        }
        let mut r = wire.as_slice();
        for f in &frames {
            assert_eq!(read_shell_frame(&mut r).unwrap().as_ref(), Some(f));
        }
        assert_eq!(read_shell_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn the_wire_format_is_kind_length_payload() {
        let wire = ShellFrame::Exit(3).encode().unwrap();
        assert_eq!(wire, [6, 0, 0, 0, 4, 0, 0, 0, 3]);
        let wire = ShellFrame::Resize { rows: 1, cols: 2 }.encode().unwrap();
        assert_eq!(wire, [3, 0, 0, 0, 4, 0, 1, 0, 2]);
    }

    #[test]
    fn bad_frames_are_refused() {
        let too_long = ShellFrame::Stdout(vec![0; MAX_DATA + 1]).encode();
        assert!(matches!(too_long, Err(Error::FrameTooLarge(_))));
        let mut huge = vec![STDOUT];
        huge.extend_from_slice(&(MAX_DATA as u32 + 1).to_be_bytes());
        assert!(matches!(
            read_shell_frame(&mut huge.as_slice()),
            Err(Error::FrameTooLarge(_))
        ));
        for bad in [
            vec![99, 0, 0, 0, 0],           // unknown kind
            vec![EXIT, 0, 0, 0, 2, 0, 1],   // short exit status
            vec![RESIZE, 0, 0, 0, 0],       // resize without a size
            vec![STDIN_END, 0, 0, 0, 1, 7], // end of input with data
        ] {
            assert!(
                matches!(
                    read_shell_frame(&mut bad.as_slice()),
                    Err(Error::ShellFrame(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            read_shell_frame(&mut [STDOUT, 0, 0, 0, 9, 1].as_slice()),
            Err(Error::Io(_))
        ));
    }

    #[test]
    fn output_reads_both_streams_then_the_exit_status() {
        let mut wire = Vec::new();
        for f in [
            ShellFrame::Stdout(b"out ".to_vec()),
            ShellFrame::Stderr(b"err".to_vec()),
            ShellFrame::Exit(2),
            ShellFrame::Stdout(b"after exit".to_vec()),
        ] {
            write_shell_frame(&mut wire, &f).unwrap();
        }
        let mut out = ShellOutput::new(wire.as_slice());
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert_eq!(text, "out err");
        assert_eq!(out.exit(), Some(2));
    }

    #[test]
    fn output_without_an_exit_status_is_an_error() {
        let wire = ShellFrame::Stdout(b"partial".to_vec()).encode().unwrap();
        let mut out = ShellOutput::new(wire.as_slice());
        let mut text = Vec::new();
        let err = out.read_to_end(&mut text).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(text, b"partial");
        assert_eq!(out.exit(), None);
    }
}
