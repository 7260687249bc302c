//! The dashboard's view of Docker, through the Docker socket the host proxy serves
//! (`~/.berth/run/docker.sock`) with bollard: containers with their published ports, images,
//! volumes, what can be done to each, and a container's log as it grows. Errors come back in
//! plain words (`plain`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::{
    ListContainersOptions, ListImagesOptions, LogsOptions, RemoveContainerOptions,
    RemoveImageOptions, RemoveVolumeOptions,
};
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use serde::Serialize;

/// Seconds a Docker API call may take (a `docker stop` waits 10 s for the container).
const TIMEOUT_SECS: u64 = 60;
/// How long a ping may take before Docker counts as not answering.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The log lines shown when a log view opens, before it follows.
const LOG_TAIL: &str = "500";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
    /// Docker's word: running, exited, created, paused, restarting, removing, dead.
    pub state: String,
    /// Docker's sentence: "Up 3 minutes", "Exited (0) 5 seconds ago".
    pub status: String,
    pub ports: Vec<PublishedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublishedPort {
    pub proto: String,
    pub host_port: u16,
    pub container_port: u16,
    /// Where a browser reaches it, for TCP ports: `http://localhost:P`.
    pub url: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Image {
    pub id: String,
    pub tags: Vec<String>,
    pub size_mib: u64,
    pub created_secs: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Volume {
    pub name: String,
    pub driver: String,
    pub mountpoint: String,
}

/// What can be done to a container from the dashboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Remove,
}

impl Action {
    pub fn parse(word: &str) -> Result<Action, String> {
        match word {
            "start" => Ok(Action::Start),
            "stop" => Ok(Action::Stop),
            "restart" => Ok(Action::Restart),
            "remove" => Ok(Action::Remove),
            other => Err(format!(
                "{other:?} is not something a container can do: start, stop, restart or remove"
            )),
        }
    }
}

/// One line of a container's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub stream: &'static str,
    pub line: String,
}

/// A client of the Docker socket at `socket`. Connecting opens nothing: each call dials.
pub fn connect(socket: &Path) -> Result<Docker, String> {
    if !socket.exists() {
        return Err(format!(
            "Docker's socket {} is not there: Berth is not running. Start it",
            socket.display()
        ));
    }
    let path = socket
        .to_str()
        .ok_or_else(|| format!("the Docker socket {} is not a UTF-8 path", socket.display()))?;
    Docker::connect_with_socket(path, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        .map_err(|e| plain(socket, &e))
}

/// Whether Docker answers within `PING_TIMEOUT`.
pub async fn ping(docker: &Docker, socket: &Path) -> Result<(), String> {
    match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(plain(socket, &e)),
        Err(_) => Err(format!(
            "Docker did not answer on {} within {} s",
            socket.display(),
            PING_TIMEOUT.as_secs()
        )),
    }
}

pub async fn containers(docker: &Docker, socket: &Path) -> Result<Vec<Container>, String> {
    let options = ListContainersOptions {
        all: true,
        ..Default::default()
    };
    let listed = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| plain(socket, &e))?;
    let mut containers: Vec<Container> = listed.into_iter().map(container).collect();
    containers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(containers)
}

fn container(c: bollard::models::ContainerSummary) -> Container {
    let name = c
        .names
        .unwrap_or_default()
        .into_iter()
        .next()
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default();
    let mut ports: Vec<PublishedPort> = Vec::new();
    for p in c.ports.unwrap_or_default() {
        let Some(host_port) = p.public_port else {
            continue; // exposed, not published
        };
        let proto = p.typ.map(|t| t.to_string()).unwrap_or_else(|| "tcp".into());
        let port = PublishedPort {
            url: (proto == "tcp").then(|| format!("http://localhost:{host_port}")),
            proto,
            host_port,
            container_port: p.private_port,
        };
        // Docker lists a port once per address family (0.0.0.0 and ::).
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports.sort_by_key(|p| (p.host_port, p.proto.clone()));
    Container {
        id: c.id.unwrap_or_default(),
        name,
        image: c.image.unwrap_or_default(),
        state: c.state.map(|s| s.to_string()).unwrap_or_default(),
        status: c.status.unwrap_or_default(),
        ports,
    }
}

pub async fn act(docker: &Docker, socket: &Path, id: &str, action: Action) -> Result<(), String> {
    let done = match action {
        Action::Start => {
            docker
                .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
                .await
        }
        Action::Stop => {
            docker
                .stop_container(id, None::<bollard::query_parameters::StopContainerOptions>)
                .await
        }
        Action::Restart => {
            docker
                .restart_container(
                    id,
                    None::<bollard::query_parameters::RestartContainerOptions>,
                )
                .await
        }
        Action::Remove => {
            let options = RemoveContainerOptions {
                force: true,
                ..Default::default()
            };
            docker.remove_container(id, Some(options)).await
        }
    };
    done.map_err(|e| plain(socket, &e))
}

pub async fn images(docker: &Docker, socket: &Path) -> Result<Vec<Image>, String> {
    let listed = docker
        .list_images(None::<ListImagesOptions>)
        .await
        .map_err(|e| plain(socket, &e))?;
    let mut images: Vec<Image> = listed
        .into_iter()
        .map(|i| Image {
            id: i.id,
            tags: i
                .repo_tags
                .into_iter()
                .filter(|t| t != "<none>:<none>")
                .collect(),
            size_mib: u64::try_from(i.size).unwrap_or(0).div_ceil(1 << 20),
            created_secs: i.created,
        })
        .collect();
    images.sort_by_key(|i| std::cmp::Reverse(i.created_secs));
    Ok(images)
}

pub async fn remove_image(docker: &Docker, socket: &Path, id: &str) -> Result<(), String> {
    docker
        .remove_image(id, None::<RemoveImageOptions>, None)
        .await
        .map(drop)
        .map_err(|e| plain(socket, &e))
}

pub async fn volumes(docker: &Docker, socket: &Path) -> Result<Vec<Volume>, String> {
    let listed = docker
        .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
        .await
        .map_err(|e| plain(socket, &e))?;
    let mut volumes: Vec<Volume> = listed
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| Volume {
            name: v.name,
            driver: v.driver,
            mountpoint: v.mountpoint,
        })
        .collect();
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(volumes)
}

pub async fn remove_volume(docker: &Docker, socket: &Path, name: &str) -> Result<(), String> {
    docker
        .remove_volume(name, None::<RemoveVolumeOptions>)
        .await
        .map_err(|e| plain(socket, &e))
}

/// The container's log: the last `LOG_TAIL` lines, then each new one until the container
/// ends (the stream ends) or the caller drops it.
pub fn follow_logs(
    docker: &Docker,
    socket: &Path,
    id: &str,
) -> impl Stream<Item = Result<Vec<LogLine>, String>> + Send + 'static {
    let options = LogsOptions {
        follow: true,
        stdout: true,
        stderr: true,
        tail: LOG_TAIL.into(),
        ..Default::default()
    };
    let socket = socket.to_owned();
    let mut partial: HashMap<&'static str, String> = HashMap::new();
    docker
        .logs(id, Some(options))
        .map(move |chunk| match chunk {
            Ok(output) => Ok(split_lines(&mut partial, output)),
            Err(e) => Err(plain(&socket, &e)),
        })
}

/// The whole lines in `output` (Docker's frames need not end at a newline; the rest waits for
/// the next frame of the same stream).
fn split_lines(partial: &mut HashMap<&'static str, String>, output: LogOutput) -> Vec<LogLine> {
    let (stream, bytes) = match output {
        LogOutput::StdOut { message } => ("stdout", message),
        LogOutput::StdErr { message } => ("stderr", message),
        LogOutput::Console { message } => ("stdout", message),
        LogOutput::StdIn { message } => ("stdin", message),
    };
    let pending = partial.entry(stream).or_default();
    pending.push_str(&String::from_utf8_lossy(&bytes));
    let mut lines = Vec::new();
    while let Some(end) = pending.find('\n') {
        let line: String = pending.drain(..=end).collect();
        lines.push(LogLine {
            stream,
            line: line.trim_end_matches(['\n', '\r']).to_string(),
        });
    }
    lines
}

/// A Docker error in words a person can act on.
pub fn plain(socket: &Path, error: &bollard::errors::Error) -> String {
    use bollard::errors::Error as E;
    match error {
        E::DockerResponseServerError {
            status_code,
            message,
        } => docker_message(*status_code, message),
        E::HyperResponseError { .. } | E::IOError { .. } | E::RequestTimeoutError => format!(
            "Docker does not answer on {} ({error}): is Berth running? Start it, or see Open Logs",
            socket.display()
        ),
        other => other.to_string(),
    }
}

/// What dockerd (or the host proxy's 503) said, with a next step where one is known.
fn docker_message(status: u16, message: &str) -> String {
    let message = message.trim();
    let lower = message.to_ascii_lowercase();
    if lower.contains("address already in use") || lower.contains("port is already allocated") {
        return format!(
            "{message}. Another program on this computer uses that port: stop it, or publish \
             the container on another port"
        );
    }
    if status == 409 && lower.contains("image is being used") {
        return format!("{message}. Remove the containers made from it first");
    }
    if status == 409 && lower.contains("volume is in use") {
        return format!("{message}. Remove the containers that use it first");
    }
    if status == 503 {
        return format!("Docker is not available: {message}");
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerSummary, Port, PortTypeEnum};

    #[test]
    fn published_ports_become_links_once_each_and_exposed_ones_do_not_show() {
        let port = |public, private, typ| Port {
            ip: Some("0.0.0.0".into()),
            private_port: private,
            public_port: public,
            typ: Some(typ),
        };
        let c = container(ContainerSummary {
            id: Some("abc".into()),
            names: Some(vec!["/web".into()]),
            image: Some("nginx".into()),
            ports: Some(vec![
                port(Some(8080), 80, PortTypeEnum::TCP),
                port(Some(8080), 80, PortTypeEnum::TCP),
                port(Some(5353), 53, PortTypeEnum::UDP),
                port(None, 443, PortTypeEnum::TCP),
            ]),
            status: Some("Up 3 minutes".into()),
            ..Default::default()
        });
        assert_eq!(c.name, "web");
        assert_eq!(
            c.ports,
            vec![
                PublishedPort {
                    proto: "udp".into(),
                    host_port: 5353,
                    container_port: 53,
                    url: None
                },
                PublishedPort {
                    proto: "tcp".into(),
                    host_port: 8080,
                    container_port: 80,
                    url: Some("http://localhost:8080".into())
                },
            ]
        );
    }

    #[test]
    fn log_frames_are_cut_into_whole_lines_per_stream() {
        let mut partial = HashMap::new();
        let out = |s: &str| LogOutput::StdOut {
            message: s.as_bytes().to_vec().into(),
        };
        assert_eq!(split_lines(&mut partial, out("hel")), vec![]);
        let lines = split_lines(&mut partial, out("lo\r\nworld\nagain"));
        let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["hello", "world"]);
        let err = split_lines(
            &mut partial,
            LogOutput::StdErr {
                message: b"oops\n".to_vec().into(),
            },
        );
        assert_eq!(err[0].stream, "stderr");
        assert_eq!(split_lines(&mut partial, out("\n"))[0].line, "again");
    }

    #[test]
    fn a_busy_port_and_a_missing_vm_get_a_next_step() {
        let busy = docker_message(
            500,
            "driver failed programming external connectivity: listen tcp4 0.0.0.0:8080: bind: address already in use",
        );
        assert!(
            busy.ends_with("publish the container on another port"),
            "{busy}"
        );
        let down = docker_message(503, "Berth's VM is stopped: run `berth start`");
        assert!(down.starts_with("Docker is not available: "), "{down}");
        assert_eq!(Action::parse("remove"), Ok(Action::Remove));
        assert!(Action::parse("explode").is_err());
    }
}
