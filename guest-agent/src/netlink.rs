//! A minimal rtnetlink client written by hand on libc: the three requests the agent needs to
//! configure eth0 (link MTU and up, an IPv4 address, the default route), each sent with
//! `NLM_F_ACK` and checked against the kernel's acknowledgement.
//!
//! No crate: the netlink crates worth having (rtnetlink, netlink-packet-route) pull in an async
//! runtime or a large generated message model for what is three fixed messages here.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How long a request waits for its acknowledgement before giving up.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
const NLMSG_HDRLEN: usize = 16;
/// Enough for any acknowledgement (an error echoes at most our small request).
const RECV_BUF: usize = 8192;

const REQUEST: u16 = libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16;
/// Create, or replace what is there: a restarted agent configures the same link again.
const CREATE_OR_REPLACE: u16 = libc::NLM_F_CREATE as u16 | libc::NLM_F_REPLACE as u16;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open a netlink route socket")]
    Socket(#[source] std::io::Error),
    #[error("bind the netlink socket")]
    Bind(#[source] std::io::Error),
    #[error("send a netlink request")]
    Send(#[source] std::io::Error),
    #[error("receive the kernel's netlink answer")]
    Receive(#[source] std::io::Error),
    #[error("the kernel refused the request")]
    Refused(#[source] std::io::Error),
    #[error("malformed netlink answer ({0})")]
    Malformed(&'static str),
}

/// A netlink message under construction: header, fixed part, attributes.
#[derive(Debug)]
struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, flags: u16, seq: u32) -> Message {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        Message(bytes)
    }

    fn push(&mut self, bytes: &[u8]) -> &mut Message {
        self.0.extend_from_slice(bytes);
        self
    }

    /// Appends an rtattr, padded to 4 bytes.
    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Message {
        let len = u16::try_from(4 + payload.len()).expect("attributes here are a few bytes");
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).expect("messages here are under 100 bytes");
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        std::mem::take(&mut self.0)
    }
}

/// RTM_NEWLINK: set `mtu` on link `index` and bring it up.
pub fn link_up_request(seq: u32, index: u32, mtu: u32) -> Vec<u8> {
    let up = libc::IFF_UP as u32;
    let mut ifinfo = Vec::with_capacity(16);
    ifinfo.push(libc::AF_UNSPEC as u8); // ifi_family
    ifinfo.push(0); // pad
    ifinfo.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    ifinfo.extend_from_slice(&index.to_ne_bytes()); // ifi_index
    ifinfo.extend_from_slice(&up.to_ne_bytes()); // ifi_flags
    ifinfo.extend_from_slice(&up.to_ne_bytes()); // ifi_change: only IFF_UP
    Message::new(libc::RTM_NEWLINK, REQUEST, seq)
        .push(&ifinfo)
        .attr(libc::IFLA_MTU, &mtu.to_ne_bytes())
        .finish()
}

/// RTM_NEWADDR: `address/prefix_len` on link `index` (the kernel adds the subnet's route).
pub fn add_address_request(seq: u32, index: u32, address: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    let mut ifaddr = vec![
        libc::AF_INET as u8,     // ifa_family
        prefix_len,              // ifa_prefixlen
        0,                       // ifa_flags
        libc::RT_SCOPE_UNIVERSE, // ifa_scope
    ];
    ifaddr.extend_from_slice(&index.to_ne_bytes()); // ifa_index
    Message::new(libc::RTM_NEWADDR, REQUEST | CREATE_OR_REPLACE, seq)
        .push(&ifaddr)
        .attr(libc::IFA_LOCAL, &address.octets())
        .attr(libc::IFA_ADDRESS, &address.octets())
        .finish()
}

/// RTM_NEWROUTE: the IPv4 default route via `gateway` out of link `index`, main table.
pub fn default_route_request(seq: u32, index: u32, gateway: Ipv4Addr) -> Vec<u8> {
    let mut rtmsg = vec![
        libc::AF_INET as u8,     // rtm_family
        0,                       // rtm_dst_len: 0.0.0.0/0
        0,                       // rtm_src_len
        0,                       // rtm_tos
        libc::RT_TABLE_MAIN,     // rtm_table
        libc::RTPROT_BOOT,       // rtm_protocol
        libc::RT_SCOPE_UNIVERSE, // rtm_scope
        libc::RTN_UNICAST,       // rtm_type
    ];
    rtmsg.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    Message::new(libc::RTM_NEWROUTE, REQUEST | CREATE_OR_REPLACE, seq)
        .push(&rtmsg)
        .attr(libc::RTA_GATEWAY, &gateway.octets())
        .attr(libc::RTA_OIF, &index.to_ne_bytes())
        .finish()
}

/// What one received datagram says about request `seq`.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Acknowledged (NLMSG_ERROR with error 0).
    Ack,
    /// Refused with this errno.
    Errno(i32),
    /// Nothing about `seq` in this datagram (other messages, or other sequence numbers).
    NotYet,
}

/// Looks for the acknowledgement of `seq` among the messages of one datagram.
pub fn parse_answer(mut buf: &[u8], seq: u32) -> Result<Answer, Error> {
    let field =
        |b: &[u8], at: usize| -> [u8; 4] { b[at..at + 4].try_into().expect("a 4-byte slice") };
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            return Err(Error::Malformed("a header shorter than 16 bytes"));
        }
        let len = u32::from_ne_bytes(field(buf, 0)) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(Error::Malformed("a message length outside the datagram"));
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let msg_seq = u32::from_ne_bytes(field(buf, 8));
        if msg_seq == seq && kind == libc::NLMSG_ERROR as u16 {
            if len < NLMSG_HDRLEN + 4 {
                return Err(Error::Malformed("an error message without its code"));
            }
            let code = i32::from_ne_bytes(field(buf, NLMSG_HDRLEN));
            return Ok(match code {
                0 => Answer::Ack,
                e => Answer::Errno(e.saturating_neg()),
            });
        }
        // Messages are 4-byte aligned; the last one may end without its padding.
        let next = len.next_multiple_of(4).min(buf.len());
        buf = &buf[next..];
    }
    Ok(Answer::NotYet)
}

/// A bound NETLINK_ROUTE socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> Result<Socket, Error> {
        // SAFETY: plain socket(2) call with constant arguments.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(Error::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: socket just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero (port id 0: the kernel picks) is valid.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let addr_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_nl of `addr_len` bytes for the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                addr_len,
            )
        };
        if rc != 0 {
            return Err(Error::Bind(std::io::Error::last_os_error()));
        }
        let timeout = libc::timeval {
            tv_sec: ACK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Error::Bind(std::io::Error::last_os_error()));
        }
        Ok(Socket { fd, seq: 0 })
    }

    /// The sequence number for the next request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends a request built with sequence number `seq` and waits for the kernel's answer.
    pub fn request(&self, seq: u32, message: &[u8]) -> Result<(), Error> {
        // SAFETY: `message` is valid for reads of its length; an unconnected netlink socket
        // sends to the kernel.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(Error::Send(std::io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n =
                usize::try_from(n).map_err(|_| Error::Receive(std::io::Error::last_os_error()))?;
            match parse_answer(&buf[..n], seq)? {
                Answer::Ack => return Ok(()),
                Answer::Errno(errno) => {
                    return Err(Error::Refused(std::io::Error::from_raw_os_error(errno)))
                }
                Answer::NotYet => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn new_address_request_bytes() {
        let bytes = add_address_request(7, 2, Ipv4Addr::new(192, 168, 127, 2), 24);
        #[rustfmt::skip]
        let expected: [u8; 40] = [
            40, 0, 0, 0,  20, 0,  0x05, 0x05,  7, 0, 0, 0,  0, 0, 0, 0, // nlmsghdr
            2, 24, 0, 0,  2, 0, 0, 0,                                   // ifaddrmsg
            8, 0, 2, 0,  192, 168, 127, 2,                              // IFA_LOCAL
            8, 0, 1, 0,  192, 168, 127, 2,                              // IFA_ADDRESS
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn route_and_link_request_bytes() {
        let route = default_route_request(3, 2, Ipv4Addr::new(192, 168, 127, 1));
        assert_eq!(route.len(), 16 + 12 + 8 + 8);
        assert_eq!(&route[..8], &[44, 0, 0, 0, 24, 0, 0x05, 0x05]);
        assert_eq!(&route[16..28], &[2, 0, 0, 0, 254, 3, 0, 1, 0, 0, 0, 0]);
        assert_eq!(
            &route[28..],
            &[8, 0, 5, 0, 192, 168, 127, 1, 8, 0, 4, 0, 2, 0, 0, 0]
        );
        let link = link_up_request(4, 2, 65520);
        assert_eq!(link.len(), 16 + 16 + 8);
        assert_eq!(&link[4..8], &[16, 0, 0x05, 0x00]);
        assert_eq!(
            &link[16..32],
            &[0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(&link[32..], &[8, 0, 4, 0, 0xf0, 0xff, 0, 0]);
    }

    fn error_message(seq: u32, code: i32) -> Vec<u8> {
        let mut m = Message::new(libc::NLMSG_ERROR as u16, 0, seq);
        m.push(&code.to_ne_bytes());
        m.push(&[0; 16]); // the echoed request header
        m.finish()
    }

    #[test]
    fn acks_errors_and_other_messages() {
        assert_eq!(parse_answer(&error_message(5, 0), 5).unwrap(), Answer::Ack);
        assert_eq!(
            parse_answer(&error_message(5, -libc::EEXIST), 5).unwrap(),
            Answer::Errno(libc::EEXIST)
        );
        // Another request's answer, then ours, in one datagram.
        let mut two = error_message(4, -libc::EPERM);
        two.extend(error_message(5, 0));
        assert_eq!(parse_answer(&two, 5).unwrap(), Answer::Ack);
        assert_eq!(
            parse_answer(&error_message(4, 0), 5).unwrap(),
            Answer::NotYet
        );
        assert_eq!(parse_answer(&[], 5).unwrap(), Answer::NotYet);
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let good = error_message(5, 0);
        assert!(parse_answer(&good[..10], 5).is_err());
        let mut long = good.clone();
        long[0] = 200; // claims more than the datagram holds
        assert!(parse_answer(&long, 5).is_err());
        let mut short = good.clone();
        short[0] = 3; // shorter than a header
        assert!(parse_answer(&short, 5).is_err());
        let mut no_code = good[..16].to_vec();
        no_code[0] = 16;
        assert!(parse_answer(&no_code, 5).is_err());
    }

    #[test]
    fn the_kernel_refuses_an_unknown_link_with_its_errno() {
        let mut sock = Socket::open().unwrap();
        let seq = sock.next_seq();
        let err = sock
            .request(seq, &link_up_request(seq, 0x7fff_fff0, 1500))
            .unwrap_err();
        let Error::Refused(io) = &err else {
            panic!("not a refusal: {err:?}")
        };
        // ENODEV as root, EPERM for an unprivileged user: a kernel answer either way.
        assert!(
            [Some(libc::ENODEV), Some(libc::EPERM)].contains(&io.raw_os_error()),
            "{io}"
        );
    }
}
