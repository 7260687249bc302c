//! The Docker socket end to end against a fake VMM (a unix listener speaking the hybrid vsock
//! convention, with a small HTTP "dockerd" behind guest port 2375): plain requests, upgraded
//! streams with half-close, many parallel connections, and the 503 when the guest is not there.
#![allow(clippy::unwrap_used)] // test helpers panic on purpose

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_host_proxy::api::{ApiSocket, Forwarder, MountPolicy};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// How the fake VMM treats a `CONNECT`.
#[derive(Clone, Copy)]
enum Guest {
    /// Answers `OK` and serves the fake dockerd.
    Dockerd,
    /// Closes without `OK`: nothing listens on the port.
    Refuses,
    /// Never answers: a guest still booting.
    Silent,
}

fn fake_vmm(path: &Path, guest: Guest) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                assert_eq!(line, "CONNECT 2375\n");
                match guest {
                    Guest::Refuses => {}
                    Guest::Silent => {
                        let mut sink = Vec::new();
                        let _ = stream.read_to_end(&mut sink).await;
                    }
                    Guest::Dockerd => {
                        stream
                            .get_mut()
                            .write_all(b"OK 1073741824\n")
                            .await
                            .unwrap();
                        fake_dockerd(stream).await;
                    }
                }
            });
        }
    })
}

/// Answers `GET /_ping` (keep-alive), and turns a request with `Upgrade: tcp` into a raw
/// stream that echoes until the client half-closes, then reports what it got and closes.
async fn fake_dockerd(mut stream: BufReader<UnixStream>) {
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if stream.read_line(&mut line).await.unwrap() == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        if head.starts_with("GET /_ping ") {
            stream
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nApi-Version: 1.43\r\nContent-Length: 2\r\n\r\nOK")
                .await
                .unwrap();
        } else if head.contains("Upgrade: tcp") {
            stream
                .get_mut()
                .write_all(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 32 * 1024];
            let (mut total, mut sum) = (0u64, Checksum::default());
            loop {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                total += n as u64;
                sum.update(&buf[..n]);
                stream.get_mut().write_all(&buf[..n]).await.unwrap();
            }
            // The client's half-close reached us; our answer must still reach it.
            let trailer = format!("\nEND {total} {:016x}\n", sum.0);
            stream
                .get_mut()
                .write_all(trailer.as_bytes())
                .await
                .unwrap();
            stream.get_mut().shutdown().await.unwrap();
            return;
        } else {
            stream
                .get_mut()
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
        }
    }
}

/// FNV-1a, 64 bits.
#[derive(Clone, Copy)]
struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Rig {
    _dir: tempfile::TempDir,
    docker_sock: PathBuf,
    vsock: PathBuf,
}

fn rig(connect_timeout: Duration) -> (Rig, tokio::task::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let docker_sock = dir.path().join("docker.sock");
    let vsock = dir.path().join("vsock.sock");
    let api = ApiSocket::bind(&docker_sock).unwrap();
    let forwarder = Arc::new(Forwarder {
        vsock: vsock.clone(),
        connect_timeout,
        mounts: MountPolicy::default(),
    });
    let server = tokio::spawn(async move { api.serve(forwarder).await });
    (
        Rig {
            _dir: dir,
            docker_sock,
            vsock,
        },
        server,
    )
}

/// Sends `request` and reads until the proxy closes.
async fn http(sock: &Path, request: &str) -> String {
    let mut client = UnixStream::connect(sock).await.unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    client.read_to_end(&mut response).await.unwrap();
    String::from_utf8(response).unwrap()
}

#[tokio::test]
async fn a_ping_goes_through_and_keep_alive_works() {
    let (rig, _server) = rig(Duration::from_secs(5));
    let _vmm = fake_vmm(&rig.vsock, Guest::Dockerd);
    let mut client = BufReader::new(UnixStream::connect(&rig.docker_sock).await.unwrap());
    for _ in 0..3 {
        client
            .get_mut()
            .write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
            .await
            .unwrap();
        let (status, body) =
            tokio::time::timeout(Duration::from_secs(10), read_response(&mut client))
                .await
                .expect("no answer");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, b"OK");
    }
}

/// Reads one response with a `Content-Length` body: (status line, body).
async fn read_response(reader: &mut BufReader<UnixStream>) -> (String, Vec<u8>) {
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    let mut len = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.unwrap();
    (status.trim_end().to_string(), body)
}

#[tokio::test]
async fn an_upgraded_stream_is_bidirectional_and_half_close_propagates() {
    let (rig, _server) = rig(Duration::from_secs(5));
    let _vmm = fake_vmm(&rig.vsock, Guest::Dockerd);
    let mut client = UnixStream::connect(&rig.docker_sock).await.unwrap();
    client
        .write_all(
            b"POST /exec/abc/start HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\n\
              Upgrade: tcp\r\nContent-Length: 0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut reader = BufReader::new(client);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert_eq!(status, "HTTP/1.1 101 UPGRADED\r\n");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    // Interactive: each line comes back before the next is sent.
    for word in ["ls\n", "echo hi\n"] {
        reader.get_mut().write_all(word.as_bytes()).await.unwrap();
        let mut echoed = String::new();
        reader.read_line(&mut echoed).await.unwrap();
        assert_eq!(echoed, word);
    }
    // Half-close (stdin EOF): the guest must see EOF and its final output must still arrive.
    reader.get_mut().shutdown().await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_to_string(&mut rest))
        .await
        .expect("the guest's answer after half-close never arrived")
        .unwrap();
    let mut sum = Checksum::default();
    sum.update(b"ls\necho hi\n");
    assert_eq!(rest, format!("\nEND 11 {:016x}\n", sum.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parallel_streams_move_their_bytes_intact() {
    const CONNECTIONS: u64 = 24;
    const BYTES: usize = 512 * 1024;
    let (rig, _server) = rig(Duration::from_secs(5));
    let _vmm = fake_vmm(&rig.vsock, Guest::Dockerd);
    let mut tasks = Vec::new();
    for seed in 0..CONNECTIONS {
        let sock = rig.docker_sock.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = UnixStream::connect(&sock).await.unwrap();
            client
                .write_all(b"POST /containers/x/attach HTTP/1.1\r\nUpgrade: tcp\r\n\r\n")
                .await
                .unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                client.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let data = payload(seed, BYTES);
            let mut sent = Checksum::default();
            sent.update(&data);
            let (mut rd, mut wr) = client.into_split();
            let writer = tokio::spawn(async move {
                for chunk in data.chunks(7919) {
                    wr.write_all(chunk).await.unwrap();
                }
                wr.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            let trailer = format!("\nEND {BYTES} {:016x}\n", sent.0);
            assert!(
                got.ends_with(trailer.as_bytes()),
                "connection {seed}: guest saw other bytes"
            );
            let mut echoed = Checksum::default();
            echoed.update(&got[..got.len() - trailer.len()]);
            assert_eq!(got.len() - trailer.len(), BYTES, "connection {seed}");
            assert_eq!(echoed.0, sent.0, "connection {seed}: echoed bytes differ");
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("a stream stalled")
            .unwrap();
    }
}

fn parse_503(response: &str) -> String {
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    let json: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    json["message"].as_str().expect("a message").to_string()
}

#[tokio::test]
async fn no_vmm_socket_answers_503_at_once() {
    let (rig, _server) = rig(Duration::from_secs(5));
    let started = Instant::now();
    let response = http(
        &rig.docker_sock,
        "GET /v1.43/containers/json HTTP/1.1\r\nHost: d\r\n\r\n",
    )
    .await;
    let message = parse_503(&response);
    assert!(message.contains("Berth VM is not running"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_guest_without_dockerd_answers_503() {
    let (rig, _server) = rig(Duration::from_secs(5));
    let _vmm = fake_vmm(&rig.vsock, Guest::Refuses);
    let response = http(&rig.docker_sock, "GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n").await;
    let message = parse_503(&response);
    assert!(
        message.contains("dockerd in it is not ready yet"),
        "{message}"
    );
}

#[tokio::test]
async fn a_guest_that_never_answers_gets_503_after_the_timeout_not_a_hang() {
    let (rig, _server) = rig(Duration::from_millis(500));
    let _vmm = fake_vmm(&rig.vsock, Guest::Silent);
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        http(&rig.docker_sock, "HEAD /_ping HTTP/1.1\r\nHost: d\r\n\r\n"),
    )
    .await
    .expect("the proxy hung");
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(
        response.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {response}"
    );
}
