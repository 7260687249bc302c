//! One vsock stream connection between a guest port and a host unix socket: its state, the
//! credit-based flow control in both directions, and the bytes the host has not taken yet.

use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// How many bytes from the guest each connection buffers when the host side reads slowly.
/// It is also the credit (`buf_alloc`) the guest gets, so the buffer can never overflow.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Send a credit update once the host has taken this much since the last one.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host asked (`CONNECT`); the guest has not answered yet.
    LocalInit,
    /// Both sides may send.
    Established,
    /// The connection is over; an RST to the guest may still be owed.
    Closed,
}

/// Something the connection owes the guest, in the order it must be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    Request,
    Response,
    CreditUpdate,
    Shutdown(u32),
    Reset,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the guest sent {0} bytes beyond the credit it was given")]
    CreditOverrun(usize),
    #[error("writing to the host socket failed")]
    HostWrite(#[source] std::io::Error),
}

pub struct Connection {
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: State,
    /// Control packets owed to the guest.
    pending: Vec<Pending>,
    /// The host stream has data we have not read (as last reported by epoll).
    pub host_readable: bool,
    /// The host closed its sending side: nothing more to read.
    host_eof: bool,
    /// The guest will send no more / read no more.
    peer_shut_send: bool,
    peer_shut_recv: bool,
    /// Guest bytes the host socket has not accepted yet.
    tx_buf: Vec<u8>,
    /// Guest→host bytes forwarded to the host, and the value last told to the guest.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Host→guest: bytes sent, and the guest's buffer and forward count.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The guest asked to hear about write space (EPOLLOUT interest needed).
    pub wants_writable: bool,
}

impl Connection {
    /// A connection the host started with `CONNECT <peer_port>`: the guest is asked first.
    pub fn new_local(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::LocalInit, 0, 0);
        c.pending.push(Pending::Request);
        c
    }

    /// A connection the guest asked for and the host accepted: it is answered at once.
    pub fn new_peer(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        let mut c = Self::new(
            stream,
            local_port,
            peer_port,
            State::Established,
            peer_buf_alloc,
            peer_fwd_cnt,
        );
        c.pending.push(Pending::Response);
        c
    }

    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        state: State,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            pending: Vec::new(),
            host_readable: false,
            host_eof: false,
            peer_shut_send: false,
            peer_shut_recv: false,
            tx_buf: Vec::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: buf_alloc,
            peer_fwd_cnt: Wrapping(fwd_cnt),
            wants_writable: false,
        }
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records the guest's view of its receive buffer, carried by every packet it sends.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// True while the connection has something to send to the guest right now.
    pub fn has_rx(&self) -> bool {
        !self.pending.is_empty() || self.can_send_data()
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && !self.peer_shut_recv
            && self.peer_credit() > 0
    }

    pub fn push_pending(&mut self, p: Pending) {
        if !self.pending.contains(&p) {
            self.pending.push(p);
        }
    }

    /// The guest answered our request.
    pub fn on_response(&mut self, stream_ok_line: bool) -> std::io::Result<()> {
        self.state = State::Established;
        if stream_ok_line {
            let line = format!("OK {}\n", self.local_port);
            // The line is tiny and the socket freshly connected: it fits the socket buffer.
            self.stream.write_all(line.as_bytes())?;
        }
        Ok(())
    }

    /// Guest data for the host: written straight through, the rest kept until the host reads.
    pub fn send_to_host(&mut self, data: &VolatileSlice<'_>) -> Result<(), Error> {
        let len = data.len();
        let buffered = self.tx_buf.len();
        if buffered + len > CONN_BUF_SIZE as usize {
            return Err(Error::CreditOverrun(
                buffered + len - CONN_BUF_SIZE as usize,
            ));
        }
        let mut written = 0;
        if buffered == 0 {
            written = match self.stream.write_volatile(data) {
                Ok(n) => n,
                Err(VolatileMemoryError::IOError(e)) if is_would_block(&e) => 0,
                Err(e) => return Err(Error::HostWrite(std::io::Error::other(e))),
            };
            self.fwd_cnt += Wrapping(written as u32);
        }
        if written < len {
            let rest = data
                .offset(written)
                .map_err(|e| Error::HostWrite(std::io::Error::other(e)))?;
            let start = self.tx_buf.len();
            self.tx_buf.resize(start + rest.len(), 0);
            rest.copy_to(&mut self.tx_buf[start..]);
            self.wants_writable = true;
        }
        self.maybe_credit_update();
        Ok(())
    }

    /// The host socket can take more: flush what the guest sent earlier.
    pub fn flush_to_host(&mut self) -> Result<(), Error> {
        while !self.tx_buf.is_empty() {
            match self.stream.write(&self.tx_buf) {
                Ok(0) => return Err(Error::HostWrite(ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if is_would_block(&e) => break,
                Err(e) => return Err(Error::HostWrite(e)),
            }
        }
        self.wants_writable = !self.tx_buf.is_empty();
        self.maybe_credit_update();
        self.maybe_finish_host_write();
        Ok(())
    }

    fn maybe_credit_update(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.push_pending(Pending::CreditUpdate);
        }
    }

    /// The guest shut down one or both directions.
    pub fn on_peer_shutdown(&mut self, flags: u32) {
        self.peer_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.peer_shut_recv |= flags & SHUTDOWN_RCV != 0;
        self.maybe_finish_host_write();
        if self.peer_shut_send && self.peer_shut_recv && self.tx_buf.is_empty() {
            self.close_with_reset();
        }
    }

    /// Once the guest sends no more and all it sent reached the host, the host sees EOF.
    fn maybe_finish_host_write(&mut self) {
        if self.peer_shut_send && self.tx_buf.is_empty() {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            if self.host_eof || self.peer_shut_recv {
                self.close_with_reset();
            }
        }
    }

    pub fn close_with_reset(&mut self) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.pending.clear();
            self.pending.push(Pending::Reset);
        }
    }

    /// True once the connection can be forgotten.
    pub fn is_done(&self) -> bool {
        self.state == State::Closed && self.pending.is_empty()
    }

    /// Fills `hdr` (addresses already set by the caller) and `data` with the next packet for the
    /// guest; returns false when there is nothing to send.
    pub fn recv_pkt(&mut self, hdr: &mut Header, data: Option<&VolatileSlice<'_>>) -> bool {
        hdr.src_port = self.local_port;
        hdr.dst_port = self.peer_port;
        hdr.buf_alloc = CONN_BUF_SIZE;
        hdr.fwd_cnt = self.fwd_cnt.0;
        hdr.len = 0;
        hdr.flags = 0;
        if !self.pending.is_empty() {
            let p = self.pending.remove(0);
            hdr.op = match p {
                Pending::Request => Op::Request,
                Pending::Response => Op::Response,
                Pending::CreditUpdate => Op::CreditUpdate,
                Pending::Shutdown(flags) => {
                    hdr.flags = flags;
                    Op::Shutdown
                }
                Pending::Reset => Op::Rst,
            } as u16;
            self.last_fwd_cnt_sent = self.fwd_cnt;
            return true;
        }
        let Some(data) = data.filter(|_| self.can_send_data()) else {
            return false;
        };
        let max = (self.peer_credit() as usize).min(data.len());
        let slice = match data.subslice(0, max) {
            Ok(s) => s,
            Err(_) => return false,
        };
        let mut slice = slice;
        match self.stream.read_volatile(&mut slice) {
            Ok(0) => {
                // The host closed its sending side: tell the guest it will get no more.
                self.host_eof = true;
                self.host_readable = false;
                hdr.op = Op::Shutdown as u16;
                hdr.flags = SHUTDOWN_SEND;
                if self.peer_shut_send && self.tx_buf.is_empty() {
                    self.close_with_reset();
                }
                true
            }
            Ok(n) => {
                self.rx_cnt += Wrapping(n as u32);
                self.last_fwd_cnt_sent = self.fwd_cnt;
                hdr.op = Op::Rw as u16;
                hdr.len = n as u32;
                true
            }
            Err(VolatileMemoryError::IOError(e)) if is_would_block(&e) => {
                self.host_readable = false;
                false
            }
            Err(_) => {
                self.host_readable = false;
                self.close_with_reset();
                self.recv_pkt(hdr, None)
            }
        }
    }
}

fn is_would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// Reads the host's `CONNECT <port>\n` line; `Ok(None)` until the whole line has arrived.
pub fn read_connect_line(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<u32>> {
    const MAX_LINE: usize = 32;
    let mut byte = [0u8; 1];
    // Byte by byte, so nothing after the line (the host's first payload) is consumed here.
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if buf.len() < MAX_LINE => buf.push(byte[0]),
            Ok(_) => {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    "CONNECT line too long",
                ))
            }
            Err(e) if is_would_block(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let line = std::str::from_utf8(buf)
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "CONNECT line is not text"))?;
    line.trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .and_then(|port| port.trim().parse::<u32>().ok())
        .map(Some)
        .ok_or_else(|| {
            std::io::Error::new(
                ErrorKind::InvalidData,
                format!("expected `CONNECT <port>`, got {line:?}"),
            )
        })
}
