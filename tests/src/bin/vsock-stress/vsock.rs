//! AF_VSOCK sockets on libc (the guest's side), and `Conn`, the stream the guest's handlers are
//! written against so that unit tests can drive them over a unix socket pair.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connected byte stream that a reader and a writer thread can share.
pub trait Conn: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
    fn shutdown_write(&self) -> std::io::Result<()>;
}

impl Conn for UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid and fills the reserved fields.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    addr
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A listening AF_VSOCK socket on `VMADDR_CID_ANY:<port>`.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    pub fn bind(port: u32) -> std::io::Result<VsockListener> {
        let fd = socket()?;
        let addr = addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm and ADDR_LEN its exact size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: listen(2) on a socket this function owns.
        if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(VsockListener { fd })
    }

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
                return Ok(VsockStream::from(unsafe { OwnedFd::from_raw_fd(raw) }));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// A connected AF_VSOCK stream; reads and writes are plain read(2)/write(2).
pub struct VsockStream {
    file: File,
}

impl From<OwnedFd> for VsockStream {
    fn from(fd: OwnedFd) -> Self {
        VsockStream {
            file: File::from(fd),
        }
    }
}

impl VsockStream {
    pub fn connect(cid: u32, port: u32) -> std::io::Result<VsockStream> {
        let fd = socket()?;
        let addr = addr(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm and ADDR_LEN its exact size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(VsockStream::from(fd))
    }

    /// Send and receive timeouts (SO_SNDTIMEO, SO_RCVTIMEO), so a dead peer shows as an error.
    pub fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
            // SAFETY: `tv` is a valid timeval and the length passed is its exact size.
            let rc = unsafe {
                libc::setsockopt(
                    self.file.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
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

impl Conn for VsockStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(VsockStream {
            file: self.file.try_clone()?,
        })
    }

    fn shutdown_write(&self) -> std::io::Result<()> {
        // SAFETY: shutdown(2) on a socket descriptor this stream owns.
        if unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Raises the open-file limit as far as allowed: hundreds of connections need more than 1024.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    let want = libc::rlimit {
        rlim_cur: 65_536,
        rlim_max: lim.rlim_max.max(65_536),
    };
    // SAFETY: setrlimit reads one valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
        return want.rlim_cur;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        return lim.rlim_cur;
    }
    0
}
