//! Which host folders the host should watch for changes: the sources of running containers' bind
//! mounts that lie inside a share, found by asking dockerd (`docker_api`),
//! refreshed on every container start and die from its event stream, and published to the host
//! as `Event::WatchPaths` (the whole set each time it changes, and again now and then, so a host
//! that subscribed late or again learns it too).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_protocol::Event;

use crate::docker_api::{self, RETRY};
use crate::events::Bus;
use crate::{console, daemons, notify};

/// dockerd's event stream, containers starting and dying only:
/// `filters={"type":["container"],"event":["start","die"]}`.
const EVENTS_TARGET: &str = "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%2C\
                             %22event%22%3A%5B%22start%22%2C%22die%22%5D%7D";
const LIST_TARGET: &str = "/containers/json";
/// A burst of starts (compose up) is answered with one refresh.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The set is published again this often even when unchanged.
const REPUBLISH: Duration = Duration::from_secs(10);
const STACK: usize = 256 * 1024;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("start the bind-mount watcher thread")]
    Thread(#[source] std::io::Error),
}

/// Starts the watcher: shares from /proc/cmdline, dockerd at its usual socket. With no share
/// there is nothing to watch and no thread is started.
pub fn spawn(events: &Arc<Bus>) -> Result<(), Error> {
    let cmdline = std::fs::read_to_string(crate::config::CMDLINE_PATH).unwrap_or_default();
    let shares = notify::shares_from_cmdline(&cmdline);
    if shares.is_empty() {
        return Ok(());
    }
    let socket = PathBuf::from(daemons::DOCKER_SOCKET);
    let (kick, kicked) = mpsc::channel();
    let stream_socket = socket.clone();
    std::thread::Builder::new()
        .name("docker-events".into())
        .stack_size(STACK)
        .spawn(move || docker_api::follow_events(&stream_socket, EVENTS_TARGET, &kick))
        .map_err(Error::Thread)?;
    let events = events.clone();
    std::thread::Builder::new()
        .name("bind-watch".into())
        .stack_size(STACK)
        .spawn(move || publish_loop(&socket, &shares, &events, &kicked))
        .map_err(Error::Thread)?;
    Ok(())
}

/// Keeps the published set current: refreshes when kicked (and until the first refresh works),
/// publishes on change, on a new subscriber and every `REPUBLISH`.
fn publish_loop(socket: &Path, shares: &[PathBuf], bus: &Bus, kicked: &mpsc::Receiver<()>) {
    let mut current: Option<BTreeSet<PathBuf>> = None;
    let mut stale = true;
    let mut subscribers = 0;
    let mut published = Instant::now();
    let mut last_error: Option<Instant> = None;
    loop {
        match docker_api::next_kick(kicked, RETRY, DEBOUNCE) {
            Some(true) => stale = true,
            Some(false) => {}
            None => return,
        }
        let mut publish = false;
        if stale {
            match docker_api::get_json(socket, LIST_TARGET).map(|list| bind_sources(&list, shares))
            {
                Ok(set) => {
                    stale = false;
                    publish = current.as_ref() != Some(&set);
                    current = Some(set);
                }
                // dockerd is starting or restarting; say so at most once a minute.
                Err(e) => {
                    if last_error.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                        console::say(&format!("bind mounts: {}", console::chain(&e)));
                        last_error = Some(Instant::now());
                    }
                }
            }
        }
        let now_subscribed = bus.subscriber_count();
        publish |= now_subscribed > subscribers || published.elapsed() > REPUBLISH;
        subscribers = now_subscribed;
        if let (true, Some(set)) = (publish, &current) {
            bus.publish(&Event::WatchPaths {
                paths: set.iter().cloned().collect(),
            });
            published = Instant::now();
        }
    }
}

/// The bind-mount sources inside `shares` of a container list (`/containers/json`) or of one
/// container (`/containers/{id}/json`).
pub fn bind_sources(containers: &serde_json::Value, shares: &[PathBuf]) -> BTreeSet<PathBuf> {
    let one = std::slice::from_ref(containers);
    let list = containers.as_array().map_or(one, Vec::as_slice);
    list.iter()
        .filter_map(|c| c.get("Mounts")?.as_array())
        .flatten()
        .filter(|m| m.get("Type").and_then(|t| t.as_str()) == Some("bind"))
        .filter_map(|m| m.get("Source")?.as_str())
        .map(PathBuf::from)
        .filter(|source| notify::inside_shares(source, shares))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mounts of `docker inspect` for `docker run -v /home/u/app:/app -v /home/u/a.txt:/a
    /// -v data:/data -v /etc/hosts:/h` (trimmed to the fields dockerd sends about mounts).
    const INSPECT: &str = r#"{
      "Id": "5c0f",
      "Mounts": [
        {"Type": "bind", "Source": "/home/u/app", "Destination": "/app", "Mode": "",
         "RW": true, "Propagation": "rprivate"},
        {"Type": "bind", "Source": "/home/u/a.txt", "Destination": "/a", "Mode": "",
         "RW": true, "Propagation": "rprivate"},
        {"Type": "volume", "Name": "data", "Source": "/var/lib/docker/volumes/data/_data",
         "Destination": "/data", "Driver": "local", "Mode": "z", "RW": true, "Propagation": ""},
        {"Type": "bind", "Source": "/etc/hosts", "Destination": "/h", "Mode": "", "RW": false,
         "Propagation": "rprivate"}
      ]
    }"#;

    #[test]
    fn only_bind_sources_inside_a_share_are_kept() {
        let shares = vec![PathBuf::from("/home/u"), PathBuf::from("/tmp")];
        let one: serde_json::Value = serde_json::from_str(INSPECT).unwrap();
        let want: BTreeSet<PathBuf> = ["/home/u/a.txt", "/home/u/app"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(bind_sources(&one, &shares), want);
        // The list endpoint: an array of containers, one without mounts.
        let list = serde_json::json!([one, {"Id": "x"}, {"Id": "y", "Mounts": [
            {"Type": "bind", "Source": "/tmp/t", "Destination": "/t"}]}]);
        let mut want = want;
        want.insert("/tmp/t".into());
        assert_eq!(bind_sources(&list, &shares), want);
        assert!(bind_sources(&one, &[]).is_empty());
    }

    #[test]
    fn a_list_comes_from_a_real_socket() {
        let (socket, server) =
            crate::docker_api::tests::serve_once("bind-watch", "200 OK", format!("[{INSPECT}]"));
        let list = docker_api::get_json(&socket, LIST_TARGET).unwrap();
        server.join().unwrap();
        assert_eq!(bind_sources(&list, &["/home".into()]).len(), 2);
        std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
    }
}
