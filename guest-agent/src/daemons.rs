//! What the agent runs as the guest's container engine: the paths, command lines and generated
//! configuration of containerd and dockerd (written to `/run/berth/`, the root being
//! read-only), and a `GET /_ping` probe of dockerd's socket.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the agent writes the daemons' configuration (tmpfs).
pub const RUN_DIR: &str = "/run/berth";
/// Where the daemons' output goes (on the data disk through the /var/log bind).
pub const LOG_DIR: &str = "/var/log/berth";
pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const DOCKERD: &str = "/usr/sbin/dockerd";
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// dockerd's `shutdown-timeout`: how long it lets containers stop before killing them.
pub const SHUTDOWN_TIMEOUT_SECS: u32 = 10;
/// PATH of the daemons and shell sessions (dockerd finds runc, iptables, the shims on it).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DAEMON_JSON: &str = "daemon.json";
/// dockerd settings an older image needs besides the agent's (the bookworm baseline's 20.10
/// writes a key into the read-only /etc/docker unless told `deprecated-key-path`).
pub const IMAGE_DAEMON_JSON: &str = "/etc/berth/daemon.json";
const CONTAINERD_TOML: &str = "containerd.toml";

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create {0}")]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("encode daemon.json")]
    Encode(#[source] serde_json::Error),
    #[error("{IMAGE_DAEMON_JSON} is not a JSON object")]
    ImageSettings(#[source] serde_json::Error),
    #[error("ask dockerd for /_ping")]
    Ping(#[source] std::io::Error),
}

/// The gateway address dockerd puts for `host-gateway` (`--add-host=x:host-gateway`); set once
/// by the init sequence when eth0 is up, before the supervisor writes daemon.json.
static HOST_GATEWAY: std::sync::OnceLock<Ipv4Addr> = std::sync::OnceLock::new();

/// Records the address `host-gateway` stands for (the first call wins).
pub fn set_host_gateway(gateway: Ipv4Addr) {
    let _ = HOST_GATEWAY.set(gateway);
}

/// Adds `host-gateway-ip` to a daemon.json value when the guest has a network.
fn add_host_gateway(value: &mut serde_json::Value, gateway: Option<Ipv4Addr>) {
    if let (Some(gateway), Some(map)) = (gateway, value.as_object_mut()) {
        map.insert("host-gateway-ip".into(), gateway.to_string().into());
    }
}

/// dockerd's configuration for a VM: state on the data disk, runtime state on tmpfs, the one
/// socket the vsock splice serves, rotated container logs and a bounded shutdown.
pub fn daemon_json() -> Result<String, Error> {
    let mut value = serde_json::json!({
        "data-root": "/var/lib/docker",
        "exec-root": "/run/docker",
        "pidfile": "/run/docker.pid",
        "hosts": [format!("unix://{DOCKER_SOCKET}")],
        "containerd": CONTAINERD_SOCKET,
        "storage-driver": "overlay2",
        "log-driver": "json-file",
        "log-opts": { "max-size": "10m", "max-file": "3" },
        "shutdown-timeout": SHUTDOWN_TIMEOUT_SECS,
        // One port proxy per published port: it listens in the guest as docker-proxy does and
        // has the host proxy listen on the host for as long as it runs.
        "userland-proxy": true,
        "userland-proxy-path": crate::port_proxy::PATH,
    });
    add_host_gateway(&mut value, HOST_GATEWAY.get().copied());
    add_image_settings(
        &mut value,
        std::fs::read_to_string(IMAGE_DAEMON_JSON).ok().as_deref(),
    )?;
    serde_json::to_string_pretty(&value).map_err(Error::Encode)
}

/// Adds the settings the image's own dockerd needs (`IMAGE_DAEMON_JSON`, an object; absent in
/// the current image) to a daemon.json value. The agent's own keys win: an image cannot move
/// dockerd's sockets or state off where the agent and the host proxy expect them.
fn add_image_settings(value: &mut serde_json::Value, image: Option<&str>) -> Result<(), Error> {
    let Some(text) = image else { return Ok(()) };
    let extra: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(Error::ImageSettings)?;
    if let Some(map) = value.as_object_mut() {
        for (key, v) in extra {
            map.entry(key).or_insert(v);
        }
    }
    Ok(())
}

/// containerd's configuration: its state on the data disk, no CRI plugin (no Kubernetes here).
pub fn containerd_toml() -> String {
    format!(
        "version = 2\n\
         root = \"/var/lib/containerd\"\n\
         state = \"/run/containerd\"\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         \n\
         [grpc]\n  address = \"{CONTAINERD_SOCKET}\"\n"
    )
}

/// Writes both configurations into `dir` and creates `log_dir`.
pub fn write_config(dir: &Path, log_dir: &Path) -> Result<(), Error> {
    for d in [dir, log_dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::CreateDir(d.to_path_buf(), e))?;
    }
    for (name, text) in [
        (DAEMON_JSON, daemon_json()?),
        (CONTAINERD_TOML, containerd_toml()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::Write(path, e))?;
    }
    Ok(())
}

/// containerd's arguments for a configuration in `dir`.
pub fn containerd_args(dir: &Path) -> Vec<String> {
    vec![
        "--config".into(),
        dir.join(CONTAINERD_TOML).to_string_lossy().into_owned(),
    ]
}

/// dockerd's arguments for a configuration in `dir`.
pub fn dockerd_args(dir: &Path) -> Vec<String> {
    vec![
        "--config-file".into(),
        dir.join(DAEMON_JSON).to_string_lossy().into_owned(),
    ]
}

/// Whether dockerd at `socket` answers `GET /_ping` with `200` and body `OK`.
pub fn ping(socket: &Path, timeout: Duration) -> Result<bool, Error> {
    let mut stream = UnixStream::connect(socket).map_err(Error::Ping)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(Error::Ping)?;
    // HTTP/1.0: dockerd closes after the answer, so the reply ends at end of stream.
    stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .map_err(Error::Ping)?;
    let mut reply = Vec::new();
    stream
        .take(8192)
        .read_to_end(&mut reply)
        .map_err(Error::Ping)?;
    Ok(is_ping_ok(&reply))
}

/// Whether an HTTP reply is `200` with the body `OK`.
pub fn is_ping_ok(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let status = head.lines().next().unwrap_or("");
    let mut parts = status.split_whitespace();
    parts.next().is_some_and(|v| v.starts_with("HTTP/"))
        && parts.next() == Some("200")
        && body.trim() == "OK"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn daemon_json_is_valid_and_suits_a_vm() {
        let text = daemon_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["data-root"], "/var/lib/docker");
        assert_eq!(v["exec-root"], "/run/docker");
        assert_eq!(
            v["hosts"],
            serde_json::json!(["unix:///var/run/docker.sock"])
        );
        assert_eq!(v["containerd"], "/run/containerd/containerd.sock");
        assert_eq!(v["storage-driver"], "overlay2");
        assert_eq!(v["log-driver"], "json-file");
        assert_eq!(v["log-opts"]["max-size"], "10m");
        assert_eq!(v["log-opts"]["max-file"], "3");
        assert_eq!(v["shutdown-timeout"], 10);
        assert_eq!(v["userland-proxy"], true);
        assert_eq!(v["userland-proxy-path"], "/usr/libexec/berth/port-proxy");
        // Nothing may point at the read-only root (but the proxy program on it).
        for (key, value) in v.as_object().unwrap() {
            if key == "userland-proxy-path" {
                continue;
            }
            if let Some(s) = value.as_str().filter(|s| s.starts_with('/')) {
                assert!(
                    s.starts_with("/var/lib/") || s.starts_with("/run/"),
                    "{key} = {s}"
                );
            }
        }
    }

    #[test]
    fn image_settings_add_keys_but_never_replace_the_agents() {
        let mut value = serde_json::json!({ "data-root": "/var/lib/docker" });
        add_image_settings(&mut value, None).unwrap();
        assert_eq!(value, serde_json::json!({ "data-root": "/var/lib/docker" }));
        add_image_settings(
            &mut value,
            Some(r#"{ "deprecated-key-path": "/var/lib/docker/key.json", "data-root": "/etc" }"#),
        )
        .unwrap();
        assert_eq!(value["deprecated-key-path"], "/var/lib/docker/key.json");
        assert_eq!(value["data-root"], "/var/lib/docker");
        let err = add_image_settings(&mut value, Some("[1, 2]")).unwrap_err();
        assert!(err.to_string().contains("/etc/berth/daemon.json"), "{err}");
    }

    #[test]
    fn host_gateway_ip_only_with_a_network() {
        let mut without = serde_json::json!({ "data-root": "/var/lib/docker" });
        add_host_gateway(&mut without, None);
        assert!(without.get("host-gateway-ip").is_none(), "{without}");
        let mut with = without.clone();
        add_host_gateway(&mut with, Some(Ipv4Addr::new(192, 168, 127, 1)));
        assert_eq!(with["host-gateway-ip"], "192.168.127.1");
        assert_eq!(with["data-root"], "/var/lib/docker");
    }

    #[test]
    fn containerd_config_and_command_lines() {
        let toml = containerd_toml();
        assert!(toml.starts_with("version = 2\n"));
        assert!(toml.contains("root = \"/var/lib/containerd\""));
        assert!(toml.contains("address = \"/run/containerd/containerd.sock\""));
        let dir = Path::new(RUN_DIR);
        assert_eq!(
            dockerd_args(dir),
            ["--config-file", "/run/berth/daemon.json"]
        );
        assert_eq!(
            containerd_args(dir),
            ["--config", "/run/berth/containerd.toml"]
        );
    }

    #[test]
    fn write_config_creates_both_files() {
        let base = std::env::temp_dir().join(format!("berth-agent-daemons-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        write_config(&base.join("run"), &base.join("log")).unwrap();
        let json = std::fs::read_to_string(base.join("run/daemon.json")).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
        assert!(base.join("run/containerd.toml").is_file());
        assert!(base.join("log").is_dir());
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn ping_reply_parsing() {
        let ok = b"HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\n\r\nOK";
        assert!(is_ping_ok(ok));
        assert!(!is_ping_ok(b"HTTP/1.0 500 Internal Server Error\r\n\r\nOK"));
        assert!(!is_ping_ok(b"HTTP/1.0 200 OK\r\n\r\nnot ok"));
        assert!(!is_ping_ok(b"HTTP/1.0 200 OK\r\n"));
        assert!(!is_ping_ok(b""));
    }

    #[test]
    fn ping_against_a_fake_dockerd() {
        let path =
            std::env::temp_dir().join(format!("berth-agent-ping-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        assert!(
            ping(&path, Duration::from_secs(1)).is_err(),
            "no socket yet"
        );
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 256];
            let n = conn.read(&mut req).unwrap();
            assert!(req[..n].starts_with(b"GET /_ping HTTP/1.0\r\n"));
            conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                .unwrap();
        });
        assert!(ping(&path, Duration::from_secs(5)).unwrap());
        server.join().unwrap();
        std::fs::remove_file(path).unwrap();
    }
}
