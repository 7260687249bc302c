//! Which host folders the host should watch for changes: the sources of running containers' bind
//! mounts that lie inside a share, found by asking dockerd (minimal HTTP/1.1 on its socket),
//! refreshed on every container start and die from its event stream, and published to the host
//! as `Event::WatchPaths` (the whole set each time it changes, and again now and then, so a host
//! that subscribed late or again learns it too).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_protocol::Event;

use crate::events::Bus;
use crate::{console, daemons, notify};

/// dockerd's event stream, containers starting and dying only:
/// `filters={"type":["container"],"event":["start","die"]}`.
const EVENTS_TARGET: &str = "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%2C\
                             %22event%22%3A%5B%22start%22%2C%22die%22%5D%7D";
const LIST_TARGET: &str = "/containers/json";
/// A burst of starts (compose up) is answered with one refresh.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How long to wait between attempts while dockerd is not answering.
const RETRY: Duration = Duration::from_secs(1);
/// The set is published again this often even when unchanged.
const REPUBLISH: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses larger than this are refused (thousands of containers fit).
const MAX_RESPONSE: u64 = 16 << 20;
const STACK: usize = 256 * 1024;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to dockerd's socket")]
    Connect(#[source] std::io::Error),
    #[error("send the request to dockerd")]
    Send(#[source] std::io::Error),
    #[error("read dockerd's response")]
    Read(#[source] std::io::Error),
    #[error("dockerd's response is not HTTP/1.1: {0}")]
    Malformed(&'static str),
    #[error("dockerd answered HTTP status {0}")]
    Status(u16),
    #[error("dockerd's container list is not the JSON expected")]
    Json(#[source] serde_json::Error),
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
        .spawn(move || follow_events(&stream_socket, &kick))
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
        match kicked.recv_timeout(RETRY) {
            Ok(()) => {
                std::thread::sleep(DEBOUNCE);
                while kicked.try_recv().is_ok() {}
                stale = true;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let mut publish = false;
        if stale {
            match list_containers(socket).map(|list| bind_sources(&list, shares)) {
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

/// Follows dockerd's event stream for ever, kicking a refresh on every event and on every
/// (re)connection, since containers may have come and gone while dockerd was away.
fn follow_events(socket: &Path, kick: &Sender<()>) {
    loop {
        let result = (|| {
            let mut stream = request(socket, EVENTS_TARGET, None)?;
            read_head(&mut stream)?;
            if kick.send(()).is_err() {
                return Ok(());
            }
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        if kick.send(()).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::Read(e)),
                }
            }
        })();
        // Not answering yet, or restarted: a refresh once it is back (the kick above) covers it.
        let _: Result<(), Error> = result;
        std::thread::sleep(RETRY);
    }
}

/// Connects and sends `GET target`; the response is the caller's to read.
fn request(socket: &Path, target: &str, timeout: Option<Duration>) -> Result<UnixStream, Error> {
    let mut stream = UnixStream::connect(socket).map_err(Error::Connect)?;
    stream.set_read_timeout(timeout).map_err(Error::Connect)?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(Error::Connect)?;
    let head = format!("GET {target} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).map_err(Error::Send)?;
    Ok(stream)
}

/// Reads up to the end of a response's headers (byte by byte: the stream's body is not ours
/// to consume) and checks the status.
fn read_head(stream: &mut UnixStream) -> Result<(), Error> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err(Error::Malformed("headers too long"));
        }
        match stream.read(&mut byte) {
            Ok(0) => return Err(Error::Malformed("ends inside its headers")),
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Read(e)),
        }
    }
    parse_head(&head).map(|_| ())
}

/// The running containers as dockerd lists them (each with its `Mounts`).
fn list_containers(socket: &Path) -> Result<serde_json::Value, Error> {
    let mut stream = request(socket, LIST_TARGET, Some(REQUEST_TIMEOUT))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(Error::Read)?;
    let body = parse_response(&raw)?;
    serde_json::from_slice(&body).map_err(Error::Json)
}

/// Status and whether the body is chunked, from a response's head (through its blank line).
fn parse_head(head: &[u8]) -> Result<bool, Error> {
    let text = std::str::from_utf8(head).map_err(|_| Error::Malformed("headers are not text"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1."))
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(Error::Malformed("no status line"))?;
    if status != 200 {
        return Err(Error::Status(status));
    }
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    Ok(chunked)
}

/// The body of a whole `Connection: close` response (chunked or not).
fn parse_response(raw: &[u8]) -> Result<Vec<u8>, Error> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(Error::Malformed("no end of headers"))?
        + 4;
    let chunked = parse_head(&raw[..end])?;
    let body = &raw[end..];
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_vec())
    }
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, Error> {
    let bad = Error::Malformed;
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(bad("a chunk has no size line"))?;
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .map(|line| line.split(';').next().unwrap_or(line).trim())
            .and_then(|hex| usize::from_str_radix(hex, 16).ok())
            .ok_or(bad("a chunk size is not hexadecimal"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or(bad("a chunk is cut short"))?;
        body.extend_from_slice(chunk);
        rest = rest
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .ok_or(bad("a chunk does not end in CRLF"))?;
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
    fn chunked_and_plain_responses_are_read() {
        let chunked = b"HTTP/1.1 200 OK\r\nApi-Version: 1.45\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\n\r\n4\r\n[{\"I\r\n7;ext=1\r\nd\":1}]\n\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"[{\"Id\":1}]\n");
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[]\n";
        assert_eq!(parse_response(plain).unwrap(), b"[]\n");
        assert!(matches!(
            parse_response(b"HTTP/1.1 500 Internal Server Error\r\n\r\n{}"),
            Err(Error::Status(500))
        ));
        for broken in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"SSH-2.0\r\n\r\n",
        ] {
            assert!(
                matches!(parse_response(broken), Err(Error::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(broken)
            );
        }
    }

    #[test]
    fn a_list_comes_from_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("berth-bind-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let body = format!("[{INSPECT}]");
            let reply = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            );
            conn.write_all(reply.as_bytes()).unwrap();
            String::from_utf8(head).unwrap()
        });
        let list = list_containers(&socket).unwrap();
        let head = server.join().unwrap();
        assert!(
            head.starts_with("GET /containers/json HTTP/1.1\r\n"),
            "{head}"
        );
        assert_eq!(bind_sources(&list, &["/home".into()]).len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
