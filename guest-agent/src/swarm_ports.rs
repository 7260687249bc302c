//! Ports that swarm services publish through the routing mesh (`docker service create -p
//! 8095:80`, `docker stack deploy`). dockerd programs those with iptables in the guest and starts
//! no userland proxy, so without this nothing would listen on the host. The agent follows
//! dockerd's service events, lists the services, and holds one publish — the port proxy's vsock
//! request to the host (`port_proxy::publish`) — per ingress port for as long as a service
//! publishes it. The host proxy then carries each connection to eth0's address and that port,
//! where the mesh takes it (its DNAT matches every local address). Ports in `host` publish mode
//! belong to a task's container and go through the userland proxy like `docker run -p`.
//!
//! dockerd says nothing when a node leaves the swarm (its services vanish without an event), so
//! the list is also read again every `REFRESH`; outside a swarm that is one `/_ping`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use berth_protocol::ports::{Proto, Publish};

use crate::docker_api::{self, Error};
use crate::vsock::VsockStream;
use crate::{console, daemons, port_proxy};

/// dockerd's service events: `filters={"type":["service"]}`.
const EVENTS_TARGET: &str = "/events?filters=%7B%22type%22%3A%5B%22service%22%5D%7D";
const LIST_TARGET: &str = "/services";
/// The list is read again this often even without an event.
const REFRESH: Duration = Duration::from_secs(5);
/// A burst of service updates (a stack deploy) is answered with one refresh.
const DEBOUNCE: Duration = Duration::from_millis(200);
const STACK: usize = 256 * 1024;

/// One port the mesh publishes.
pub type MeshPort = (Proto, u16);

/// Starts the publisher for a guest whose eth0 has `address`.
pub fn spawn(address: Ipv4Addr) -> std::io::Result<()> {
    let socket = PathBuf::from(daemons::DOCKER_SOCKET);
    let (kick, kicked) = mpsc::channel();
    let stream_socket = socket.clone();
    std::thread::Builder::new()
        .name("swarm-events".into())
        .stack_size(STACK)
        .spawn(move || docker_api::follow_events(&stream_socket, EVENTS_TARGET, &kick))?;
    std::thread::Builder::new()
        .name("swarm-ports".into())
        .stack_size(STACK)
        .spawn(move || publish_loop(&socket, address, &kicked))?;
    Ok(())
}

/// The ingress ports of a service list (`GET /services`): `Endpoint.Ports`, which holds the
/// ports swarm assigned as well as the ones asked for.
pub fn mesh_ports(services: &serde_json::Value) -> BTreeSet<MeshPort> {
    let Some(list) = services.as_array() else {
        return BTreeSet::new();
    };
    list.iter()
        .filter_map(|s| s.get("Endpoint")?.get("Ports")?.as_array())
        .flatten()
        .filter(|p| {
            p.get("PublishMode")
                .and_then(|m| m.as_str())
                .is_none_or(|m| m == "ingress")
        })
        .filter_map(|p| {
            let proto = p.get("Protocol")?.as_str()?.parse().ok()?;
            let port = u16::try_from(p.get("PublishedPort")?.as_u64()?).ok()?;
            (port != 0).then_some((proto, port))
        })
        .collect()
}

/// The services' ports, or none when this node is not a swarm manager: `/_ping`'s `Swarm` header
/// says so without the error a `/services` refused with 503 leaves in dockerd's log every
/// `REFRESH`; a dockerd without the header is asked for the list.
fn list(socket: &Path) -> Result<BTreeSet<MeshPort>, Error> {
    if docker_api::swarm_status(socket)?.is_some_and(|status| status != "active/manager") {
        return Ok(BTreeSet::new());
    }
    match docker_api::get_json(socket, LIST_TARGET) {
        Ok(services) => Ok(mesh_ports(&services)),
        Err(Error::Status(503)) => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

fn publish_loop(socket: &Path, address: Ipv4Addr, kicked: &mpsc::Receiver<()>) {
    let mut held: BTreeMap<MeshPort, VsockStream> = BTreeMap::new();
    let mut refused: BTreeSet<MeshPort> = BTreeSet::new();
    loop {
        if docker_api::next_kick(kicked, REFRESH, DEBOUNCE).is_none() {
            return;
        }
        // dockerd starting or restarting: the next kick or refresh tries again.
        let Ok(wanted) = list(socket) else { continue };
        // A publish the host ended (its listener closed) is made again below.
        held.retain(|port, conn| wanted.contains(port) && still_open(conn));
        refused.retain(|port| wanted.contains(port));
        let missing: Vec<MeshPort> = wanted
            .iter()
            .filter(|p| !held.contains_key(*p))
            .copied()
            .collect();
        for port in missing {
            match publish(address, port) {
                Ok((conn, bound)) => {
                    console::say(&format!(
                        "swarm: publishing {}/{} on the host at {bound}",
                        port.1, port.0
                    ));
                    refused.remove(&port);
                    held.insert(port, conn);
                }
                // Said once; tried again on every refresh (the host port may come free).
                Err(e) => {
                    if refused.insert(port) {
                        console::warn(&format!(
                            "swarm: the host did not publish {}/{}: {}",
                            port.1,
                            port.0,
                            console::chain(&e)
                        ));
                    }
                }
            }
        }
    }
}

fn publish(
    address: Ipv4Addr,
    (proto, port): MeshPort,
) -> Result<(VsockStream, std::net::SocketAddr), port_proxy::Error> {
    let request = Publish {
        proto,
        host_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        host_port: port,
        container_ip: IpAddr::V4(address),
        container_port: port,
    };
    let mut conn = port_proxy::connect_host()?;
    let bound = port_proxy::publish(&mut conn, &request)?;
    Ok((conn, bound))
}

/// Whether the host still holds the publish: the connection has nothing to read (the host says
/// nothing after its reply) and is not at its end.
fn still_open(conn: &VsockStream) -> bool {
    let mut fd = libc::pollfd {
        fd: conn.as_fd().as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_ports_of_a_service_list_are_kept() {
        // `docker service create -p 8095:80 -p 5353:53/udp -p mode=host,target=81,published=8096
        // -p 90`, as 20.10 and 26 list it (trimmed).
        let services = serde_json::json!([
            {"ID": "a", "Endpoint": {"Spec": {}, "Ports": [
                {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8095, "PublishMode": "ingress"},
                {"Protocol": "udp", "TargetPort": 53, "PublishedPort": 5353, "PublishMode": "ingress"},
                {"Protocol": "tcp", "TargetPort": 81, "PublishedPort": 8096, "PublishMode": "host"},
                {"Protocol": "tcp", "TargetPort": 90, "PublishedPort": 30000, "PublishMode": "ingress"},
                {"Protocol": "sctp", "TargetPort": 9, "PublishedPort": 9, "PublishMode": "ingress"}
            ]}},
            {"ID": "b", "Endpoint": {"Spec": {}}},
            {"ID": "c"}
        ]);
        let want: BTreeSet<MeshPort> =
            [(Proto::Tcp, 8095), (Proto::Udp, 5353), (Proto::Tcp, 30000)]
                .into_iter()
                .collect();
        assert_eq!(mesh_ports(&services), want);
        assert!(mesh_ports(&serde_json::json!({"message": "not a list"})).is_empty());
    }

    #[test]
    fn a_node_outside_a_swarm_publishes_nothing_and_is_not_asked_for_services() {
        let (socket, server) =
            crate::docker_api::tests::serve_once("swarm", "200 OK\r\nSwarm: inactive", "OK".into());
        assert!(list(&socket).unwrap().is_empty());
        let head = server.join().unwrap();
        assert!(head.starts_with("GET /_ping HTTP/1.1\r\n"), "{head}");
        std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
    }

    /// A dockerd whose `/_ping` has no `Swarm` header is asked for the list; its 503 is no swarm.
    #[test]
    fn without_the_ping_header_the_list_is_asked_for() {
        let (socket, server) = crate::docker_api::tests::serve(
            "swarm-old",
            vec![
                "HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\n\r\nOK".into(),
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}".into(),
            ],
        );
        assert!(list(&socket).unwrap().is_empty());
        let heads = server.join().unwrap();
        assert!(heads[0].starts_with("GET /_ping HTTP/1.1\r\n"), "{heads:?}");
        assert!(
            heads[1].starts_with("GET /services HTTP/1.1\r\n"),
            "{heads:?}"
        );
        std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
    }
}
