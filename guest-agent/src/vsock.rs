//! AF_VSOCK sockets in the guest (listener, stream, a connection to the host, on libc
//! directly), and `Duplex`, the byte stream the services are written against so that tests can
//! drive them over a `UnixStream` pair instead.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The host's context ID: where the guest connects to reach the host proxy.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// Pending connections per listener.
const BACKLOG: libc::c_int = 1024;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create a vsock socket")]
    Socket(#[source] std::io::Error),
    #[error("bind vsock port {0}")]
    Bind(u32, #[source] std::io::Error),
    #[error("listen on vsock port {0}")]
    Listen(u32, #[source] std::io::Error),
    #[error("connect to vsock CID {0} port {1}")]
    Connect(u32, u32, #[source] std::io::Error),
}

/// A connected byte stream that can be shared between a reading and a writing thread.
pub trait Duplex: Read + Write + AsFd + Send + Sized + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()>;
}

impl Duplex for UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

impl Duplex for TcpStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

/// Sets (or with `None` clears) the receive timeout of any socket: a read that waits longer
/// fails with `WouldBlock`.
pub fn set_read_timeout(socket: &impl AsFd, timeout: Option<Duration>) -> std::io::Result<()> {
    let timeout = timeout.unwrap_or(Duration::ZERO);
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: `tv` is a valid timeval and the length passed is its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A listening AF_VSOCK socket bound to `VMADDR_CID_ANY:<port>`.
/// A fresh AF_VSOCK stream socket and the address of `cid:port`.
fn socket(cid: u32, port: u32) -> Result<(OwnedFd, libc::sockaddr_vm), Error> {
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Error::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid and fills the reserved fields.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    Ok((fd, addr))
}

#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

impl VsockListener {
    pub fn bind(port: u32) -> Result<VsockListener, Error> {
        let (fd, addr) = socket(libc::VMADDR_CID_ANY, port)?;
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its exact size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::Bind(port, std::io::Error::last_os_error()));
        }
        // SAFETY: listen(2) on a socket this function owns.
        if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
            return Err(Error::Listen(port, std::io::Error::last_os_error()));
        }
        Ok(VsockListener { fd, port })
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> std::io::Result<VsockStream> {
        loop {
            // SAFETY: null address pointers are allowed (the peer's address is not needed).
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: accept4 just returned this descriptor and nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                return Ok(VsockStream {
                    file: File::from(fd),
                });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// A connected AF_VSOCK stream. Reads and writes are plain read(2)/write(2), which `File`
/// issues for any descriptor.
#[derive(Debug)]
pub struct VsockStream {
    file: File,
}

impl VsockStream {
    /// Connects to `port` of context `cid` (`HOST_CID` for the host proxy). The kernel bounds
    /// the wait (vsock's connect timeout, 2 s by default); no listener there is `ECONNRESET`
    /// or `ECONNREFUSED`, depending on the VMM.
    pub fn connect(cid: u32, port: u32) -> Result<VsockStream, Error> {
        let (fd, addr) = socket(cid, port)?;
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its exact size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::Connect(cid, port, std::io::Error::last_os_error()));
        }
        Ok(VsockStream {
            file: File::from(fd),
        })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Duplex for VsockStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(VsockStream {
            file: self.file.try_clone()?,
        })
    }

    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown(2) on a socket descriptor this stream owns.
        if unsafe { libc::shutdown(self.file.as_raw_fd(), how) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Blocks until the peer of `stream` has hung up completely (both directions), or our own side
/// was shut down both ways. Read-side EOF alone (a half-close) does not count.
pub fn wait_for_hangup(stream: &impl AsFd) {
    let mut pfd = libc::pollfd {
        fd: stream.as_fd().as_raw_fd(),
        // POLLHUP and POLLERR are always reported; nothing else is asked for.
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc > 0
            || (rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
        {
            return;
        }
    }
}
