//! Binding a published port's host socket with native (Go, dockerd) semantics: IPv6 sockets
//! are IPv6-only, TCP sets SO_REUSEADDR (never SO_REUSEPORT), failures read as Go prints them,
//! and the `ports.bind_address` setting narrows an unspecified address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use berth_protocol::ports::Proto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

/// Go's listen backlog on Linux is somaxconn; this is what the kernel caps most hosts at.
const BACKLOG: i32 = 4096;

/// A bound host socket.
#[derive(Debug)]
pub enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr(),
            Bound::Udp(s) => s.local_addr(),
        }
    }
}

/// Where to bind when the guest asked for `asked` and the user's setting is `setting`.
///
/// No setting, an unspecified setting or a specific address asked: what was asked. An
/// unspecified address asked (`0.0.0.0`, `::`) with a loopback setting: the loopback of the
/// asked family (`127.0.0.1`, `::1`), so `-p 8080:80`'s pair of publishes both stay on loopback.
/// With a specific setting: the setting when it is of the asked family, else the asked family's
/// loopback (never wider than the setting, and the pair's other half does not fail).
pub fn effective_address(asked: IpAddr, setting: Option<IpAddr>) -> IpAddr {
    let Some(setting) = setting else {
        return asked;
    };
    if !asked.is_unspecified() || setting.is_unspecified() {
        return asked;
    }
    let same_family = asked.is_ipv4() == setting.is_ipv4();
    if same_family && !setting.is_loopback() {
        return setting;
    }
    match asked {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Binds `proto` on `addr`; the error is the message Go's `net.Listen` would give
/// (`listen tcp4 0.0.0.0:8080: bind: address already in use`).
pub fn bind(proto: Proto, addr: SocketAddr) -> Result<Bound, String> {
    let network = format!("{}{}", proto, if addr.is_ipv4() { "4" } else { "6" });
    let fail =
        |op: &str, e: std::io::Error| format!("listen {network} {addr}: {op}: {}", go_errno(&e));
    let (kind, protocol) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))
        .map_err(|e| fail("socket", e))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(|e| fail("setsockopt", e))?;
    }
    if proto == Proto::Tcp {
        socket
            .set_reuse_address(true)
            .map_err(|e| fail("setsockopt", e))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| fail("setsockopt", e))?;
    socket.bind(&addr.into()).map_err(|e| fail("bind", e))?;
    match proto {
        Proto::Tcp => {
            socket.listen(BACKLOG).map_err(|e| fail("listen", e))?;
            TcpListener::from_std(socket.into())
                .map(Bound::Tcp)
                .map_err(|e| fail("listen", e))
        }
        Proto::Udp => UdpSocket::from_std(socket.into())
            .map(Bound::Udp)
            .map_err(|e| fail("bind", e)),
    }
}

/// An OS error in Go's words: the C library's text with a lower-case first letter and no
/// "(os error N)" ("address already in use").
fn go_errno(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(at) => &text[..at],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_setting_narrows_only_unspecified_addresses() {
        let loopback = Some(ip("127.0.0.1"));
        assert_eq!(effective_address(ip("0.0.0.0"), None), ip("0.0.0.0"));
        assert_eq!(effective_address(ip("::"), None), ip("::"));
        assert_eq!(effective_address(ip("0.0.0.0"), loopback), ip("127.0.0.1"));
        assert_eq!(effective_address(ip("::"), loopback), ip("::1"));
        assert_eq!(effective_address(ip("::"), Some(ip("::1"))), ip("::1"));
        assert_eq!(
            effective_address(ip("0.0.0.0"), Some(ip("::1"))),
            ip("127.0.0.1")
        );
        assert_eq!(
            effective_address(ip("192.0.2.2"), loopback),
            ip("192.0.2.2")
        );
        assert_eq!(
            effective_address(ip("0.0.0.0"), Some(ip("192.0.2.2"))),
            ip("192.0.2.2")
        );
        assert_eq!(
            effective_address(ip("::"), Some(ip("192.0.2.2"))),
            ip("::1")
        );
        assert_eq!(
            effective_address(ip("::"), Some(ip("0.0.0.0"))),
            ip("::"),
            "an unspecified setting is no narrowing"
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_refused_in_gos_words() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(Proto::Tcp, addr).unwrap_err();
        assert_eq!(
            err,
            format!(
                "listen tcp4 127.0.0.1:{}: bind: address already in use",
                addr.port()
            )
        );
        let taken = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(Proto::Udp, addr).unwrap_err();
        assert_eq!(
            err,
            format!(
                "listen udp6 [::1]:{}: bind: address already in use",
                addr.port()
            )
        );
    }

    #[tokio::test]
    async fn an_address_the_host_does_not_have_is_refused() {
        let err = bind(Proto::Tcp, "203.0.113.77:8080".parse().unwrap()).unwrap_err();
        assert_eq!(
            err,
            "listen tcp4 203.0.113.77:8080: bind: cannot assign requested address"
        );
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_wildcards_are_independent_and_port_zero_is_ephemeral() {
        let v4 = bind(Proto::Tcp, "0.0.0.0:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        assert_ne!(port, 0);
        let v6 = bind(Proto::Tcp, SocketAddr::new(ip("::"), port)).unwrap();
        assert_eq!(v6.local_addr().unwrap().port(), port);
        let u4 = bind(Proto::Udp, SocketAddr::new(ip("0.0.0.0"), port)).unwrap();
        let u6 = bind(Proto::Udp, SocketAddr::new(ip("::"), port)).unwrap();
        assert_eq!(u4.local_addr().unwrap().port(), port);
        assert_eq!(u6.local_addr().unwrap().port(), port);
    }
}
