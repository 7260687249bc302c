//! What the host proxy tells the agent on the kernel command line besides the data disk: the
//! guest's network (`berth.net=`) and the host folders shared with it (`berth.share=`, one per
//! share). Both sides use these types, so the text is written and parsed in one place.
//!
//! `berth.net=ADDRESS/PREFIX,GATEWAY,DNS,MTU` (IPv4): eth0's address, the gateway (which passt
//! maps to the host's loopback: `host.docker.internal`), the resolver the guest forwards to, and
//! the link MTU.
//!
//! `berth.share=TAG,rw|ro,PATH`: mount virtio-fs `TAG` at `PATH`, the host path; bytes of the
//! path outside `[A-Za-z0-9/._~-]` are written `%XX`, so spaces, commas and non-UTF-8 names
//! survive the command line.

use std::net::Ipv4Addr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// The kernel command line's parameter names.
pub const NET_PARAM: &str = "berth.net";
pub const SHARE_PARAM: &str = "berth.share";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNet {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub mtu: u16,
}

impl GuestNet {
    /// The value after `berth.net=`.
    pub fn to_param(&self) -> String {
        format!(
            "{}/{},{},{},{}",
            self.address, self.prefix_len, self.gateway, self.dns, self.mtu
        )
    }

    pub fn parse(value: &str) -> Result<GuestNet, String> {
        let bad = |what: &str| format!("{NET_PARAM}={value}: {what}");
        let parts: Vec<&str> = value.split(',').collect();
        let [cidr, gateway, dns, mtu] = parts[..] else {
            return Err(bad("expected ADDRESS/PREFIX,GATEWAY,DNS,MTU"));
        };
        let (address, prefix) = cidr.split_once('/').ok_or_else(|| bad("no /PREFIX"))?;
        let ip = |s: &str, what: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| bad(&format!("{what} {s:?} is not an IPv4 address")))
        };
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=30).contains(p))
            .ok_or_else(|| bad("the prefix length must be 1 to 30"))?;
        let net = GuestNet {
            address: ip(address, "address")?,
            prefix_len,
            gateway: ip(gateway, "gateway")?,
            dns: ip(dns, "dns")?,
            mtu: mtu
                .parse()
                .ok()
                .filter(|m| *m >= 576)
                .ok_or_else(|| bad("the MTU must be a number of at least 576"))?,
        };
        Ok(net)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestShare {
    pub tag: String,
    pub read_only: bool,
    /// Where the guest mounts it: the host path.
    pub path: PathBuf,
}

impl GuestShare {
    /// The value after `berth.share=`.
    pub fn to_param(&self) -> String {
        let mode = if self.read_only { "ro" } else { "rw" };
        let mut text = format!("{},{mode},", self.tag);
        for &b in self.path.as_os_str().as_bytes() {
            if b.is_ascii_alphanumeric() || b"/._~-".contains(&b) {
                text.push(char::from(b));
            } else {
                text.push_str(&format!("%{b:02X}"));
            }
        }
        text
    }

    pub fn parse(value: &str) -> Result<GuestShare, String> {
        let bad = |what: &str| format!("{SHARE_PARAM}={value}: {what}");
        let mut parts = value.splitn(3, ',');
        let (Some(tag), Some(mode), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected TAG,rw|ro,PATH"));
        };
        if tag.is_empty() {
            return Err(bad("empty tag"));
        }
        let read_only = match mode {
            "ro" => true,
            "rw" => false,
            _ => return Err(bad("the mode must be rw or ro")),
        };
        let mut bytes = Vec::with_capacity(path.len());
        let mut rest = path.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'%' {
                let hex = tail
                    .get(..2)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad("a % is not followed by two hex digits"))?;
                bytes.push(hex);
                rest = &tail[2..];
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        let path = PathBuf::from(std::ffi::OsString::from_vec(bytes));
        if !path.is_absolute() {
            return Err(bad("the path must be absolute"));
        }
        Ok(GuestShare {
            tag: tag.to_string(),
            read_only,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_network_round_trips_and_bad_values_say_why() {
        let net = GuestNet {
            address: Ipv4Addr::new(192, 168, 127, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(192, 168, 127, 1),
            dns: Ipv4Addr::new(192, 168, 127, 53),
            mtu: 65520,
        };
        assert_eq!(
            net.to_param(),
            "192.168.127.2/24,192.168.127.1,192.168.127.53,65520"
        );
        assert_eq!(GuestNet::parse(&net.to_param()).unwrap(), net);
        for (bad, why) in [
            ("192.168.127.2,1.1.1.1,1.1.1.1,1500", "PREFIX"),
            ("192.168.127.2/24,1.1.1.1,1500", "expected"),
            ("192.168.127.2/33,1.1.1.1,1.1.1.1,1500", "prefix"),
            ("192.168.127.2/24,gw,1.1.1.1,1500", "gateway \"gw\""),
            ("192.168.127.2/24,1.1.1.1,1.1.1.1,100", "MTU"),
        ] {
            let e = GuestNet::parse(bad).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn share_paths_with_any_bytes_survive_the_command_line() {
        let odd = std::ffi::OsStr::from_bytes(b"/home/u/My Files,%x/\xff\xfe");
        let share = GuestShare {
            tag: "berth-share-1".into(),
            read_only: true,
            path: PathBuf::from(odd),
        };
        let param = share.to_param();
        assert!(
            param.bytes().all(|b| b.is_ascii_graphic() && b != b'"'),
            "{param}"
        );
        assert!(
            param.starts_with("berth-share-1,ro,/home/u/My%20Files%2C%25x/%FF%FE"),
            "{param}"
        );
        assert_eq!(GuestShare::parse(&param).unwrap(), share);
        for (bad, why) in [
            ("t,rw", "expected"),
            ("t,rx,/a", "mode"),
            ("t,rw,a/b", "absolute"),
            ("t,rw,/a%G0", "hex"),
            (",rw,/a", "empty tag"),
        ] {
            let e = GuestShare::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
