//! Host identity, the loopback interface and eth0, set with plain syscalls and rtnetlink (no
//! external tools; the root is read-only, so the host name never touches /etc).
//!
//! eth0 is configured statically from `berth.net` (no DHCP client): MTU, address, up, then the
//! default route via the gateway, each request checked against the kernel's answer.

use std::ffi::CString;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_protocol::cmdline::GuestNet;

use crate::{console, dns, mounts, netlink};

/// Where the guest's resolver files are written (tmpfs) and bound over /etc's empty ones.
pub const RESOLV_CONF: &str = "/run/berth/resolv.conf";
pub const HOSTS: &str = "/run/berth/hosts";
const DNS_PORT: u16 = 53;

/// The virtio-net interface's name (the only NIC the VMM gives the guest).
pub const GUEST_INTERFACE: &str = "eth0";
/// How long the boot waits for the interface to appear (virtio-net probes before init runs;
/// this only covers a slow probe).
pub const INTERFACE_WAIT: Duration = Duration::from_secs(5);
const INTERFACE_POLL: Duration = Duration::from_millis(50);

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
    #[error("no interface {name} after {waited:?}")]
    NoInterface { name: String, waited: Duration },
    #[error("open a netlink socket to configure {0}")]
    Netlink(String, #[source] netlink::Error),
    #[error("set MTU {mtu} on {name} and bring it up")]
    LinkUp {
        name: String,
        mtu: u16,
        #[source]
        source: netlink::Error,
    },
    #[error("add address {address} to {name}")]
    AddAddress {
        name: String,
        address: String,
        #[source]
        source: netlink::Error,
    },
    #[error("write {0}")]
    WriteResolver(PathBuf, #[source] std::io::Error),
    #[error("put {0} in place")]
    BindResolver(&'static str, #[source] mounts::Error),
    #[error("add the default route via {gateway} on {name}")]
    AddRoute {
        name: String,
        gateway: std::net::Ipv4Addr,
        #[source]
        source: netlink::Error,
    },
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

/// The index of interface `name`, waiting up to `wait` for it to appear.
pub fn wait_for_interface(name: &str, wait: Duration) -> Result<u32, Error> {
    let c_name = CString::new(name).map_err(|_| Error::NoInterface {
        name: name.to_string(),
        waited: Duration::ZERO,
    })?;
    let start = Instant::now();
    loop {
        // SAFETY: c_name is a valid NUL-terminated string for the call.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if index != 0 {
            return Ok(index);
        }
        if start.elapsed() >= wait {
            return Err(Error::NoInterface {
                name: name.to_string(),
                waited: wait,
            });
        }
        std::thread::sleep(INTERFACE_POLL);
    }
}

/// Configures interface `name` as `net` says: MTU and up, the address, the default route.
pub fn configure(name: &str, net: &GuestNet, wait: Duration) -> Result<(), Error> {
    let index = wait_for_interface(name, wait)?;
    let mut sock = netlink::Socket::open().map_err(|e| Error::Netlink(name.to_string(), e))?;
    let seq = sock.next_seq();
    sock.request(
        seq,
        &netlink::link_up_request(seq, index, u32::from(net.mtu)),
    )
    .map_err(|source| Error::LinkUp {
        name: name.to_string(),
        mtu: net.mtu,
        source,
    })?;
    let seq = sock.next_seq();
    sock.request(
        seq,
        &netlink::add_address_request(seq, index, net.address, net.prefix_len),
    )
    .map_err(|source| Error::AddAddress {
        name: name.to_string(),
        address: format!("{}/{}", net.address, net.prefix_len),
        source,
    })?;
    let seq = sock.next_seq();
    sock.request(
        seq,
        &netlink::default_route_request(seq, index, net.gateway),
    )
    .map_err(|source| Error::AddRoute {
        name: name.to_string(),
        gateway: net.gateway,
        source,
    })?;
    Ok(())
}

/// The guest's network from `berth.net`: eth0 configured, the DNS forwarder on eth0's address,
/// `/etc/resolv.conf` and `/etc/hosts` pointing at it. An error means eth0 is not usable; a
/// forwarder that cannot start only costs the local names (the resolver then points straight
/// at the upstream).
pub fn bring_up(net: &GuestNet, hostname: &str) -> Result<(), Error> {
    configure(GUEST_INTERFACE, net, INTERFACE_WAIT)?;
    let forwarder = dns::Forwarder {
        listen: SocketAddr::new(net.address.into(), DNS_PORT),
        upstream: SocketAddr::new(net.dns.into(), DNS_PORT),
        gateway: net.gateway,
    };
    let nameserver = match dns::start(forwarder) {
        Ok(running) => {
            console::say(&format!(
                "DNS forwarder on udp {} and tcp {}, upstream {}",
                running.udp, running.tcp, forwarder.upstream
            ));
            net.address
        }
        Err(e) => {
            console::warn(&format!(
                "DNS forwarder: {}; host.docker.internal will not resolve in containers",
                console::chain(&e)
            ));
            net.dns
        }
    };
    for (path, text, etc) in [
        (RESOLV_CONF, resolv_conf(nameserver), "/etc/resolv.conf"),
        (HOSTS, hosts(hostname, net.gateway), "/etc/hosts"),
    ] {
        let path = Path::new(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::WriteResolver(dir.to_path_buf(), e))?;
        }
        std::fs::write(path, text).map_err(|e| Error::WriteResolver(path.to_path_buf(), e))?;
        mounts::bind(path, Path::new(etc)).map_err(|e| Error::BindResolver(etc, e))?;
    }
    Ok(())
}

/// The guest's resolv.conf. dockerd copies non-loopback nameservers into containers on the
/// default bridge, and its embedded DNS (user networks) forwards to them: eth0's address is
/// reachable from both.
pub fn resolv_conf(nameserver: Ipv4Addr) -> String {
    format!("# written by berth-agent\nnameserver {nameserver}\n")
}

/// The guest's /etc/hosts (containers get their own from dockerd).
pub fn hosts(hostname: &str, gateway: Ipv4Addr) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         127.0.1.1\t{hostname}\n{gateway}\thost.docker.internal gateway.docker.internal\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn resolver_files_point_at_the_forwarder_and_the_gateway() {
        let conf = resolv_conf(Ipv4Addr::new(192, 168, 127, 2));
        let servers: Vec<_> = conf
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver "))
            .collect();
        assert_eq!(servers, ["192.168.127.2"]);
        let hosts = hosts("berth", Ipv4Addr::new(192, 168, 127, 1));
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"));
        assert!(hosts.contains("127.0.1.1\tberth\n"));
        assert!(hosts.contains("192.168.127.1\thost.docker.internal gateway.docker.internal\n"));
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// The whole configuration against the real kernel, on the loopback of a network namespace
    /// of this test thread (children inherit it, so `ip` reads it back).
    #[test]
    fn configures_an_interface_in_a_fresh_network_namespace() {
        let outcome = std::thread::spawn(|| {
            // SAFETY: unshare with a constant flag; it only changes this thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let net = GuestNet {
                address: Ipv4Addr::new(10, 9, 8, 7),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 9, 8, 1),
                dns: Ipv4Addr::new(10, 9, 8, 53),
                mtu: 65520,
            };
            configure("lo", &net, Duration::ZERO).unwrap();
            // Twice: a restarted agent finds the configuration there and replaces it.
            configure("lo", &net, Duration::ZERO).unwrap();
            let link = ip(&["-o", "link", "show", "dev", "lo"]);
            assert!(link.contains("mtu 65520") && link.contains(",UP"), "{link}");
            let addr = ip(&["-o", "-4", "addr", "show", "dev", "lo"]);
            assert!(addr.contains("inet 10.9.8.7/24"), "{addr}");
            let route = ip(&["-4", "route", "show", "default"]);
            assert!(route.contains("default via 10.9.8.1 dev lo"), "{route}");
            let missing = wait_for_interface("eth9", Duration::from_millis(120)).unwrap_err();
            assert!(
                missing.to_string().contains("no interface eth9"),
                "{missing}"
            );
            Ok(())
        })
        .join()
        .unwrap();
        if let Err(e) = outcome {
            // Without CAP_SYS_ADMIN there is no namespace to try it in.
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
            eprintln!("skipped: unshare(CLONE_NEWNET): {e}");
        }
    }
}
