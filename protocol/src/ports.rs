//! Published ports: what the guest's port proxy (dockerd's userland proxy) asks the host proxy,
//! and how the host proxy reaches a container for each connection or UDP flow it accepts.
//!
//! Publish: the port proxy connects to the host (vsock CID 2) on `PUBLISH_PORT`, which the VMM
//! delivers to the host proxy at `<vsock socket>_<PUBLISH_PORT>`; it sends one `Publish` frame
//! and reads one `PublishReply`. A bound publish lives exactly as long as that connection: the
//! host listener closes when it closes, so a crash cannot leak a port.
//!
//! Dial: for each accepted TCP connection or new UDP peer the host proxy connects to the guest's
//! `DIAL_PORT`, sends one `Dial` frame and reads one `DialReply`. After `Connected` the stream
//! carries the connection's bytes (TCP) or datagrams, each preceded by its length in 2 bytes
//! big-endian (UDP; `write_datagram`, `read_datagram`).
//!
//! Frames are the control channel's (`write_frame`, `read_frame`).

use std::io::{Read, Write};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Host-side vsock port the port proxy connects to.
pub const PUBLISH_PORT: u32 = 1030;
/// Guest port of the agent's dial service.
pub const DIAL_PORT: u32 = 1026;
/// The largest UDP payload a datagram frame carries.
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?}: tcp or udp")),
        }
    }
}

/// One published port, as dockerd hands it to its userland proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub proto: Proto,
    /// What the user asked to bind on (`0.0.0.0`, `::`, `127.0.0.1`, ...).
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PublishReply {
    /// Listening on the host (on `host_ip`, which the host's `ports.bind_address` setting may
    /// have narrowed from what was asked).
    Bound { host_ip: IpAddr, host_port: u16 },
    /// The host refused, in the words native Docker would use
    /// ("listen tcp4 0.0.0.0:8080: bind: address already in use").
    Refused { message: String },
}

/// Reach `ip:port` in the guest (a container's address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dial {
    pub proto: Proto,
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DialReply {
    Connected,
    Failed { message: String },
}

/// Writes one datagram frame; a payload over `MAX_DATAGRAM` bytes is refused.
pub fn write_datagram(w: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(payload.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "a {}-byte datagram is over {MAX_DATAGRAM} bytes",
                payload.len()
            ),
        )
    })?;
    let mut frame = Vec::with_capacity(2 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    w.write_all(&frame)
}

/// Reads one datagram frame into `buf` (at least `MAX_DATAGRAM` bytes) and returns its length;
/// `None` at a clean end of stream, an error if the stream ends inside a frame.
pub fn read_datagram(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    let mut header = [0u8; 2];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = usize::from(u16::from_be_bytes(header));
    let dst = buf.get_mut(..len).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the datagram buffer is smaller than MAX_DATAGRAM",
        )
    })?;
    r.read_exact(dst)?;
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{read_frame, write_frame};

    #[test]
    fn publish_messages_round_trip_with_readable_fields() {
        let publish = Publish {
            proto: Proto::Udp,
            host_ip: "::".parse().unwrap(),
            host_port: 5353,
            container_ip: "172.17.0.2".parse().unwrap(),
            container_port: 53,
        };
        let mut wire = Vec::new();
        write_frame(&mut wire, &publish).unwrap();
        let text = String::from_utf8_lossy(&wire[4..]).to_string();
        assert!(
            text.contains(r#""proto":"udp""#) && text.contains(r#""host_ip":"::""#),
            "{text}"
        );
        assert_eq!(
            read_frame::<Publish>(&mut &wire[..]).unwrap(),
            Some(publish)
        );
        let refused = PublishReply::Refused {
            message: "listen tcp4 0.0.0.0:80: bind: permission denied".into(),
        };
        let mut wire = Vec::new();
        write_frame(&mut wire, &refused).unwrap();
        assert_eq!(
            read_frame::<PublishReply>(&mut &wire[..]).unwrap(),
            Some(refused)
        );
        assert_eq!("tcp".parse::<Proto>(), Ok(Proto::Tcp));
        assert!("sctp".parse::<Proto>().unwrap_err().contains("sctp"));
    }

    #[test]
    fn datagrams_keep_their_boundaries_and_a_torn_one_is_an_error() {
        let mut wire = Vec::new();
        for len in [1usize, 0, 1400, MAX_DATAGRAM] {
            write_datagram(&mut wire, &vec![len as u8; len]).unwrap();
        }
        assert!(write_datagram(&mut wire.clone(), &vec![0; MAX_DATAGRAM + 1]).is_err());
        let mut r = &wire[..];
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for len in [1usize, 0, 1400, MAX_DATAGRAM] {
            assert_eq!(read_datagram(&mut r, &mut buf).unwrap(), Some(len));
            assert!(buf[..len].iter().all(|&b| b == len as u8));
        }
        assert_eq!(read_datagram(&mut r, &mut buf).unwrap(), None);
        let mut one = Vec::new();
        write_datagram(&mut one, &[7; 1400]).unwrap();
        let mut torn = &one[..one.len() - 1];
        assert!(read_datagram(&mut torn, &mut buf).is_err());
    }
}
