//! Host identity and the loopback interface, set with plain syscalls (no external tools; the
//! root is read-only, so the host name never touches /etc).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sethostname {0:?}")]
    SetHostname(String, #[source] std::io::Error),
    #[error("open a socket to configure lo")]
    Socket(#[source] std::io::Error),
    #[error("read the flags of lo")]
    GetFlags(#[source] std::io::Error),
    #[error("bring lo up")]
    SetFlags(#[source] std::io::Error),
}

/// Sets the kernel's host name (UTS namespace of PID 1).
pub fn set_hostname(name: &str) -> Result<(), Error> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(Error::SetHostname(
            name.to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets IFF_UP on `lo`; the kernel then gives it 127.0.0.1/8 and ::1 by itself.
pub fn loopback_up() -> Result<(), Error> {
    // SAFETY: plain socket(2) call with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Error::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data (a name and a union of integers); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS writes only ifru_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(Error::GetFlags(std::io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS just filled ifru_flags, the union member read and written here.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: `req` is a valid ifreq for "lo" with the flags to set.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(Error::SetFlags(std::io::Error::last_os_error()));
    }
    Ok(())
}
