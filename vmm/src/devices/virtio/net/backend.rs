//! The net device's backend: a nonblocking unix stream socket to passt or gvproxy, the frames
//! queued for it (with the length prefix) and the stream read from it, cut into frames.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::frame::{FrameBuffer, LEN_PREFIX};
use super::MAX_FRAME;

/// Bytes queued for the socket past which the device stops taking TX chains until it drains.
pub const TX_HIGH_WATER: usize = 256 * 1024;
/// Bytes read from the socket and not yet delivered that the device holds at most. The socket
/// is read on while the guest has no RX buffers, until this is full: passt drops a frame whose
/// write would block (a tap link may lose frames; its TCP then retransmits), and a unix socket
/// holds only a few 64 KiB frames, so a device that stopped reading at once turned every burst
/// into losses. QEMU queues for the same reason.
pub const RX_BUFFER: usize = 4 << 20;

/// What a read from the socket found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadResult {
    /// Bytes arrived (whole frames may now be in [`Backend::frames`]).
    Data,
    /// Nothing to read now.
    WouldBlock,
    /// The peer closed the stream or the socket failed: the connection is over.
    Closed,
}

/// The connection to the backend and the bytes in flight either way.
pub struct Backend {
    path: PathBuf,
    stream: Option<UnixStream>,
    /// Framed bytes for the socket; `tx[tx_sent..]` are not written yet.
    tx: Vec<u8>,
    tx_sent: usize,
    rx: FrameBuffer,
}

impl Backend {
    /// A backend that connects to `path` (not yet).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            stream: None,
            tx: Vec::with_capacity(TX_HIGH_WATER + LEN_PREFIX + MAX_FRAME),
            tx_sent: 0,
            rx: FrameBuffer::new(RX_BUFFER),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connects (nonblocking from then on); what was in flight on an earlier connection is gone.
    pub fn connect(&mut self) -> io::Result<()> {
        let stream = UnixStream::connect(&self.path)?;
        stream.set_nonblocking(true)?;
        self.disconnect();
        self.stream = Some(stream);
        Ok(())
    }

    /// Closes the connection and forgets the bytes in flight on it.
    pub fn disconnect(&mut self) {
        self.stream = None;
        self.tx.clear();
        self.tx_sent = 0;
        self.rx.clear();
    }

    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.stream.as_ref().map(AsFd::as_fd)
    }

    /// Whether another TX frame may be queued now.
    pub fn can_queue(&self) -> bool {
        self.tx.len() - self.tx_sent < TX_HIGH_WATER
    }

    /// Whether framed bytes wait for the socket to take them.
    pub fn tx_pending(&self) -> bool {
        self.tx_sent < self.tx.len()
    }

    /// Queues `frame` (at most `MAX_FRAME` bytes) with its length prefix.
    pub fn queue_frame(&mut self, frame: &[u8]) {
        if self.tx_sent == self.tx.len() {
            self.tx.clear();
            self.tx_sent = 0;
        }
        self.tx
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.tx.extend_from_slice(frame);
    }

    /// Writes what is queued until the socket would block. `Err` means the connection is over.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        while self.tx_sent < self.tx.len() {
            match stream.write(&self.tx[self.tx_sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_sent == self.tx.len() {
            self.tx.clear();
            self.tx_sent = 0;
        } else if self.tx_sent > TX_HIGH_WATER {
            // Keep the buffer from growing: drop what is written.
            self.tx.drain(..self.tx_sent);
            self.tx_sent = 0;
        }
        Ok(())
    }

    /// Whether the frame buffer can take more bytes from the socket.
    pub fn rx_room(&self) -> bool {
        self.rx.room() > 0
    }

    /// Reads once from the socket into the frame buffer (which must have room).
    pub fn read(&mut self) -> ReadResult {
        let Some(stream) = self.stream.as_mut() else {
            return ReadResult::Closed;
        };
        loop {
            match stream.read(self.rx.spare()) {
                Ok(0) => return ReadResult::Closed,
                Ok(n) => {
                    self.rx.filled(n);
                    return ReadResult::Data;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadResult::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn_rate_limited!("virtio-net: reading the backend socket failed: {e}");
                    return ReadResult::Closed;
                }
            }
        }
    }

    /// The stream read so far, cut into frames.
    pub fn frames(&mut self) -> &mut FrameBuffer {
        &mut self.rx
    }
}
