//! The little of dockerd's API the agent itself reads, over its unix socket with minimal
//! HTTP/1.1: a JSON listing (`get_json`) and an event stream followed for ever, each event (and
//! each reconnection) a kick to the caller's refresh (`follow_events`). Used by the bind-mount
//! watcher (`bind_watch`) and the swarm port publisher (`swarm_ports`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

/// How long to wait between attempts while dockerd is not answering.
pub const RETRY: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses larger than this are refused (thousands of containers fit).
const MAX_RESPONSE: u64 = 16 << 20;

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
    #[error("dockerd's answer to {0} is not JSON")]
    Json(String, #[source] serde_json::Error),
}

/// `GET target`, its JSON body.
pub fn get_json(socket: &Path, target: &str) -> Result<serde_json::Value, Error> {
    let mut stream = request(socket, target, Some(REQUEST_TIMEOUT))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(Error::Read)?;
    let body = parse_response(&raw)?;
    serde_json::from_slice(&body).map_err(|e| Error::Json(target.to_owned(), e))
}

/// The `Swarm` header of dockerd's `GET /_ping` (`inactive`, `active/worker`, `active/manager`,
/// ...), or `None` from a dockerd that does not send it. Cheap, and unlike a request only a
/// manager may make it leaves no error in dockerd's log.
pub fn swarm_status(socket: &Path) -> Result<Option<String>, Error> {
    let mut stream = request(socket, "/_ping", Some(REQUEST_TIMEOUT))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(64 * 1024)
        .read_to_end(&mut raw)
        .map_err(Error::Read)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(Error::Malformed("no end of headers"))?;
    parse_head(&raw[..end + 4])?;
    let head =
        std::str::from_utf8(&raw[..end]).map_err(|_| Error::Malformed("headers are not text"))?;
    Ok(head.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("swarm")
            .then(|| value.trim().to_owned())
    }))
}

/// Follows the event stream at `target` for ever, kicking a refresh on every event and on every
/// (re)connection, since things may have come and gone while dockerd was away. Returns when
/// `kick`'s receiver is gone.
pub fn follow_events(socket: &Path, target: &str, kick: &Sender<()>) {
    loop {
        let result = (|| {
            let mut stream = request(socket, target, None)?;
            read_head(&mut stream)?;
            if kick.send(()).is_err() {
                return Ok(false);
            }
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(true),
                    Ok(_) => {
                        if kick.send(()).is_err() {
                            return Ok(false);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::Read(e)),
                }
            }
        })();
        // Not answering yet, or restarted: a refresh once it is back (the kick above) covers it.
        if let Ok(false) = result {
            return;
        }
        std::thread::sleep(RETRY);
    }
}

/// Waits up to `wait` for a kick of `follow_events`; after one, lets a burst settle for
/// `debounce` and takes every kick it brought. `Some(true)` when kicked, `Some(false)` when the
/// wait ran out, `None` when the events thread is gone.
pub fn next_kick(kicked: &Receiver<()>, wait: Duration, debounce: Duration) -> Option<bool> {
    match kicked.recv_timeout(wait) {
        Ok(()) => {
            std::thread::sleep(debounce);
            while kicked.try_recv().is_ok() {}
            Some(true)
        }
        Err(RecvTimeoutError::Timeout) => Some(false),
        Err(RecvTimeoutError::Disconnected) => None,
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

#[cfg(test)]
pub mod tests {
    use super::*;

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

    /// A one-shot server on a real unix socket answering `status` (`200 OK`) and `body`
    /// chunked; returns the socket and the thread that yields the request head it read.
    pub fn serve_once(
        name: &str,
        status: &'static str,
        body: String,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<String>) {
        let reply = format!(
            "HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        let (socket, server) = serve(name, vec![reply]);
        (
            socket,
            std::thread::spawn(move || server.join().unwrap().remove(0)),
        )
    }

    /// A server on a real unix socket answering one connection after another with each of
    /// `replies` (whole responses); the thread yields the request heads it read, in order.
    pub fn serve(
        name: &str,
        replies: Vec<String>,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let dir = std::env::temp_dir().join(format!("berth-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for reply in replies {
                let (mut conn, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    conn.read_exact(&mut byte).unwrap();
                    head.push(byte[0]);
                }
                conn.write_all(reply.as_bytes()).unwrap();
                heads.push(String::from_utf8(head).unwrap());
            }
            heads
        });
        (socket, server)
    }

    #[test]
    fn the_swarm_status_is_the_ping_header() {
        for (status, expected) in [
            (
                "200 OK\r\nApi-Version: 1.45\r\nSwarm: active/manager",
                Some("active/manager"),
            ),
            ("200 OK\r\nswarm:inactive", Some("inactive")),
            ("200 OK\r\nApi-Version: 1.41", None),
        ] {
            let (socket, server) = serve_once("swarm-status", status, "OK".into());
            assert_eq!(
                swarm_status(&socket).unwrap().as_deref(),
                expected,
                "{status}"
            );
            assert!(server
                .join()
                .unwrap()
                .starts_with("GET /_ping HTTP/1.1\r\n"));
            std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
        }
        let (socket, server) = serve_once("swarm-status", "500 Internal Server Error", "".into());
        assert!(matches!(swarm_status(&socket), Err(Error::Status(500))));
        server.join().unwrap();
        std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
    }

    #[test]
    fn json_comes_from_a_real_socket() {
        let (socket, server) = serve_once("docker-api", "200 OK", r#"[{"Id": "x"}]"#.into());
        let list = get_json(&socket, "/containers/json").unwrap();
        let head = server.join().unwrap();
        assert!(
            head.starts_with("GET /containers/json HTTP/1.1\r\n"),
            "{head}"
        );
        assert_eq!(list[0]["Id"], "x");
        std::fs::remove_dir_all(socket.parent().unwrap()).unwrap();
    }
}
