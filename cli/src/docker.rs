//! The Docker side of things from the host: is dockerd answering on our socket (`/_ping`), and
//! the `berth` docker context that points the `docker` CLI at it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The docker context `berth start` creates or updates.
pub const CONTEXT: &str = "berth";

/// What `GET /_ping` got.
#[derive(Debug, PartialEq, Eq)]
pub enum Ping {
    Ready,
    /// The proxy or dockerd answered something else (the proxy's 503 message, say).
    NotReady(String),
}

/// `GET /_ping` over the unix socket at `socket`, bounded by `timeout`.
pub async fn ping(socket: &Path, timeout: Duration) -> std::io::Result<Ping> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream
            .write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok(parse_ping(&response))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Ok(Ping::NotReady(format!("no answer within {timeout:?}"))))
}

fn parse_ping(response: &[u8]) -> Ping {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") && body.contains("OK") {
        return Ping::Ready;
    }
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| status.to_string());
    Ping::NotReady(message)
}

/// Points the `berth` docker context at `socket` (creating it if needed) when a `docker` CLI is
/// installed; the user's current context is left alone. Returns what to tell the user.
pub fn ensure_context(socket: &Path) -> Option<String> {
    let host = format!("host=unix://{}", socket.display());
    let quiet = |args: &[&str]| {
        Command::new("docker")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    let exists = match quiet(&["context", "inspect", CONTEXT]) {
        Ok(out) => out.status.success(),
        Err(_) => return None, // no docker CLI
    };
    let verb = if exists { "update" } else { "create" };
    let mut args = vec!["context", verb, CONTEXT, "--docker", &host];
    if !exists {
        args.extend(["--description", "Berth VM"]);
    }
    match quiet(&args) {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            return Some(format!(
                "could not {verb} the docker context `{CONTEXT}`: {}",
                err.trim()
            ));
        }
        Err(e) => return Some(format!("could not run docker: {e}")),
    }
    let current = Command::new("docker")
        .args(["context", "show"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    if current.as_deref() == Some(CONTEXT) {
        Some(format!("The docker CLI uses it (context `{CONTEXT}`)."))
    } else {
        Some(format!(
            "Use it with `docker context use {CONTEXT}` (or `export DOCKER_HOST=unix://{}`).",
            socket.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_answers_are_read() {
        assert_eq!(
            parse_ping(b"HTTP/1.1 200 OK\r\nApi-Version: 1.43\r\nContent-Length: 2\r\n\r\nOK"),
            Ping::Ready
        );
        let proxy_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 30\r\n\r\n\
                          {\"message\":\"dockerd not ready\"}";
        assert_eq!(
            parse_ping(proxy_503),
            Ping::NotReady("dockerd not ready".into())
        );
        assert!(matches!(parse_ping(b""), Ping::NotReady(_)));
    }
}
