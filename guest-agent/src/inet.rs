//! IP sockets shared by the port proxy and the dial service: listeners bound the way Go's `net`
//! package binds them for docker-proxy (IPv6 only on an IPv6 address, `SO_REUSEADDR` on TCP),
//! and socket errors in Go's words ("listen tcp4 0.0.0.0:8080: bind: address already in use"),
//! which is what dockerd's users see from a native proxy.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use berth_protocol::ports::Proto;

/// A socket call that failed, with what Go would call its `OpError`: the operation (`listen`,
/// `dial`), the network (`tcp4`, `udp`), the address and the system call.
#[derive(Debug, thiserror::Error)]
#[error("{op} {net} {addr}: {syscall}: {}", errno_text(.cause))]
pub struct NetError {
    pub op: &'static str,
    pub net: String,
    pub addr: SocketAddr,
    pub syscall: &'static str,
    /// Not a `#[source]`: the message above already says it, in Go's words.
    pub cause: std::io::Error,
}

impl NetError {
    /// Whether the address is not one of this machine's (`EADDRNOTAVAIL`).
    pub fn is_foreign_address(&self) -> bool {
        self.cause.raw_os_error() == Some(libc::EADDRNOTAVAIL)
    }
}

/// An OS error as Go prints it: the C library's text with a lower-case first letter and no
/// "(os error N)"; other errors as they display.
pub fn errno_text(e: &std::io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        return e.to_string();
    };
    let text = std::io::Error::from_raw_os_error(code).to_string();
    let text = text
        .strip_suffix(&format!(" (os error {code})"))
        .unwrap_or(&text);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text.to_string(),
    }
}

/// Go's network name for a listener on `addr`: `tcp4`, `tcp6`, `udp4`, `udp6`.
pub fn listen_net(proto: Proto, addr: &SocketAddr) -> String {
    let family = if addr.is_ipv4() { "4" } else { "6" };
    format!("{proto}{family}")
}

/// A listening TCP socket on `addr`, as docker-proxy's `net.ListenTCP("tcp4"|"tcp6")` makes it.
pub fn listen_tcp(addr: SocketAddr) -> Result<TcpListener, NetError> {
    let fd = bound_socket(Proto::Tcp, addr)?;
    // SAFETY: listen(2) on a socket this function owns.
    if unsafe { libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) } != 0 {
        return Err(listen_error(Proto::Tcp, addr, "listen"));
    }
    Ok(TcpListener::from(fd))
}

/// A UDP socket bound to `addr`, as docker-proxy's `net.ListenUDP("udp4"|"udp6")` makes it.
pub fn listen_udp(addr: SocketAddr) -> Result<UdpSocket, NetError> {
    bound_socket(Proto::Udp, addr).map(UdpSocket::from)
}

fn listen_error(proto: Proto, addr: SocketAddr, syscall: &'static str) -> NetError {
    NetError {
        op: "listen",
        net: listen_net(proto, &addr),
        addr,
        syscall,
        cause: std::io::Error::last_os_error(),
    }
}

fn bound_socket(proto: Proto, addr: SocketAddr) -> Result<OwnedFd, NetError> {
    let (domain, ty) = match (addr, proto) {
        (SocketAddr::V4(_), Proto::Tcp) => (libc::AF_INET, libc::SOCK_STREAM),
        (SocketAddr::V4(_), Proto::Udp) => (libc::AF_INET, libc::SOCK_DGRAM),
        (SocketAddr::V6(_), Proto::Tcp) => (libc::AF_INET6, libc::SOCK_STREAM),
        (SocketAddr::V6(_), Proto::Udp) => (libc::AF_INET6, libc::SOCK_DGRAM),
    };
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let raw = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(listen_error(proto, addr, "socket"));
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if addr.is_ipv6() {
        // Go binds "tcp6"/"udp6" IPv6-only, so [::]:P and 0.0.0.0:P are two separate ports.
        set_flag(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
            .map_err(|_| listen_error(proto, addr, "setsockopt"))?;
    }
    if proto == Proto::Tcp {
        set_flag(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
            .map_err(|_| listen_error(proto, addr, "setsockopt"))?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes for the duration of the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(listen_error(proto, addr, "bind"));
    }
    Ok(fd)
}

fn set_flag(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int and the length passed is its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `addr` as a C socket address and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is plain data; all-zero is valid.
            let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            // SAFETY: sockaddr_storage is larger than and aligned for any sockaddr.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_in6 is plain data; all-zero is valid.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: sockaddr_storage is larger than and aligned for any sockaddr.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_fails_in_the_words_of_docker_proxy() {
        let first = listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let err = listen_tcp(addr).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("listen tcp4 {addr}: bind: address already in use")
        );
        assert!(!err.is_foreign_address());
        let udp = listen_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let uaddr = udp.local_addr().unwrap();
        let err = listen_udp(uaddr).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("listen udp4 {uaddr}: bind: address already in use")
        );
        // An address this machine does not have is told apart.
        let err = listen_tcp("192.0.2.77:0".parse().unwrap()).unwrap_err();
        assert!(err.is_foreign_address(), "{err}");
    }

    #[test]
    fn ipv6_listeners_leave_the_ipv4_port_free() {
        let Ok(v6) = listen_tcp("[::]:0".parse().unwrap()) else {
            return; // no IPv6 on this machine
        };
        let port = v6.local_addr().unwrap().port();
        let v4 = listen_tcp(SocketAddr::from(([0, 0, 0, 0], port)));
        assert!(v4.is_ok(), "{:?}", v4.err());
    }

    #[test]
    fn errno_text_is_go_like() {
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(errno_text(&e), "connection refused");
        let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out");
        assert_eq!(errno_text(&e), "connection timed out");
    }
}
