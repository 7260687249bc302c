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
    fake_vmm_seen(path, guest).0
}

/// The request lines the fake dockerd received, in order.
type Seen = Arc<std::sync::Mutex<Vec<String>>>;

fn fake_vmm_seen(path: &Path, guest: Guest) -> (tokio::task::JoinHandle<()>, Seen) {
    let listener = UnixListener::bind(path).unwrap();
    let seen = Seen::default();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let log = log.clone();
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
                        fake_dockerd(stream, log).await;
                    }
                }
            });
        }
    });
    (task, seen)
}

/// Answers `GET /_ping` (keep-alive), and turns a request with `Upgrade: tcp` (or an attach)
/// into a raw stream that echoes until the client half-closes, then reports what it got and
/// closes. `POST /build` answers the length and checksum of the body it got; any other request
/// is answered `201` with the exact bytes it arrived as (head and body) as its body.
async fn fake_dockerd(mut stream: BufReader<UnixStream>, seen: Seen) {
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
        seen.lock()
            .unwrap()
            .push(head.lines().next().unwrap().to_string());
        let line = head.lines().next().unwrap();
        let hijack = line.starts_with("POST ") && line.contains("/attach");
        if head.starts_with("GET /_ping ") {
            stream
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nApi-Version: 1.43\r\nContent-Length: 2\r\n\r\nOK")
                .await
                .unwrap();
        } else if head.contains("Upgrade: tcp") || hijack {
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
        } else if line.starts_with("POST ") && line.contains("/build") {
            let (total, sum) = read_body(&mut stream, &head, |_| {}).await;
            let answer = format!("{total} {:016x}", sum.0);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                answer.len()
            );
            stream
                .get_mut()
                .write_all(response.as_bytes())
                .await
                .unwrap();
        } else {
            let mut raw = head.clone().into_bytes();
            raw.extend_from_slice(b"\r\n");
            read_body(&mut stream, &head, |bytes| raw.extend_from_slice(bytes)).await;
            let response = format!(
                "HTTP/1.1 201 Created\r\nContent-Length: {}\r\n\r\n",
                raw.len()
            );
            let mut response = response.into_bytes();
            response.extend_from_slice(&raw);
            stream.get_mut().write_all(&response).await.unwrap();
        }
    }
}

/// Reads a request body as it came (chunk framing included, handed to `raw`); the length and
/// checksum of its data.
async fn read_body(
    stream: &mut BufReader<UnixStream>,
    head: &str,
    mut raw: impl FnMut(&[u8]),
) -> (u64, Checksum) {
    let (mut total, mut sum) = (0u64, Checksum::default());
    let mut data = |stream_data: &[u8], raw: &mut dyn FnMut(&[u8])| {
        total += stream_data.len() as u64;
        sum.update(stream_data);
        raw(stream_data);
    };
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            raw(line.as_bytes());
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            if size == 0 {
                let mut end = String::new();
                stream.read_line(&mut end).await.unwrap();
                raw(end.as_bytes());
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            stream.read_exact(&mut chunk).await.unwrap();
            data(&chunk[..size], &mut raw);
            raw(&chunk[size..]);
        }
    } else {
        let len: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        let mut left = len;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = stream.read(&mut buf[..want]).await.unwrap();
            assert!(n > 0, "the body ended early");
            data(&buf[..n], &mut raw);
            left -= n as u64;
        }
    }
    (total, sum)
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
    rig_with(connect_timeout, MountPolicy::default())
}

fn rig_with(connect_timeout: Duration, mounts: MountPolicy) -> (Rig, tokio::task::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let docker_sock = dir.path().join("docker.sock");
    let vsock = dir.path().join("vsock.sock");
    let api = ApiSocket::bind(&docker_sock).unwrap();
    let forwarder = Arc::new(Forwarder {
        vsock: vsock.clone(),
        connect_timeout,
        mounts,
        state: None,
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
    let (status, _, body) = read_full_response(reader).await;
    (status, body)
}

/// Reads one response with a `Content-Length` body: (status line, header lines, body).
async fn read_full_response(reader: &mut BufReader<UnixStream>) -> (String, String, Vec<u8>) {
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    let mut len = 0;
    let mut headers = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            len = v.trim().parse().unwrap();
        }
        headers.push_str(&line);
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.unwrap();
    (status.trim_end().to_string(), headers, body)
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

/// A rig whose policy shares `/home/u` and `/tmp`, with a fake dockerd that logs requests.
fn shares_rig() -> (Rig, Seen, Vec<tokio::task::JoinHandle<()>>) {
    let policy = MountPolicy::new(vec!["/home/u".into(), "/tmp".into()]);
    let (rig, server) = rig_with(Duration::from_secs(5), policy);
    let (vmm, seen) = fake_vmm_seen(&rig.vsock, Guest::Dockerd);
    (rig, seen, vec![server, vmm])
}

fn create(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn binds(binds: &[&str]) -> String {
    serde_json::json!({"Image": "alpine", "HostConfig": {"Binds": binds}}).to_string()
}

async fn connect(rig: &Rig) -> BufReader<UnixStream> {
    BufReader::new(UnixStream::connect(&rig.docker_sock).await.unwrap())
}

async fn exchange(client: &mut BufReader<UnixStream>, request: &[u8]) -> (String, String, Vec<u8>) {
    client.get_mut().write_all(request).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_full_response(client))
        .await
        .expect("no answer")
}

/// The `message` of a refusal, checking it is the JSON error the docker CLI prints.
fn refusal(answer: &(String, String, Vec<u8>)) -> String {
    let (status, headers, body) = answer;
    assert_eq!(
        status,
        "HTTP/1.1 400 Bad Request",
        "{}",
        String::from_utf8_lossy(body)
    );
    assert!(
        headers.contains("Content-Type: application/json\r\n"),
        "{headers}"
    );
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    json["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn an_allowed_bind_reaches_dockerd_byte_identical() {
    let (rig, seen, _tasks) = shares_rig();
    let mut client = connect(&rig).await;
    let body = binds(&[
        "/home/u/project:/app",
        "data:/data",
        "/var/run/docker.sock:/s",
    ]);
    let request = create("/v1.43/containers/create?name=web", &body);
    let (status, _, echoed) = exchange(&mut client, &request).await;
    assert_eq!(status, "HTTP/1.1 201 Created");
    assert_eq!(
        echoed, request,
        "dockerd got other bytes than the client sent"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_bind_of_an_unshared_path_is_refused_here_naming_it_and_the_setting() {
    let (rig, seen, _tasks) = shares_rig();
    let mut client = connect(&rig).await;
    let answer = exchange(
        &mut client,
        &create("/containers/create", &binds(&["/opt/project:/app"])),
    )
    .await;
    assert_eq!(
        refusal(&answer),
        "Mounts denied: the path /opt/project is not shared from the host with Berth. Share it \
         with `berth config set shares ...` (now: /home/u, /tmp) and `berth restart`."
    );
    // Tricks, and a Mounts entry of type bind, on the same kept-alive connection.
    let mounts = |source: &str| {
        serde_json::json!({"HostConfig": {"Mounts": [
            {"Type": "volume", "Source": "data", "Target": "/data"},
            {"Type": "bind", "Source": source, "Target": "/x"}]}})
        .to_string()
    };
    for (body, path) in [
        (binds(&["/home/u/../../etc:/e"]), "/home/u/../../etc"),
        (binds(&["/home/ux:/x"]), "/home/ux"),
        (binds(&["/tmp/../root/.ssh:/k:ro"]), "/tmp/../root/.ssh"),
        (mounts("/srv/www"), "/srv/www"),
    ] {
        let path_v = format!("/v1.41/containers/create?name=n{}", path.len());
        let message = refusal(&exchange(&mut client, &create(&path_v, &body)).await);
        assert!(
            message.contains(&format!("the path {path} is not shared")),
            "{message}"
        );
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "dockerd saw {:?}",
        seen.lock().unwrap()
    );
}

#[tokio::test]
async fn a_kept_alive_connection_answers_ping_refusal_and_create_in_order() {
    let (rig, seen, _tasks) = shares_rig();
    let mut client = connect(&rig).await;
    let (status, _, body) = exchange(&mut client, b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n").await;
    assert_eq!(
        (status.as_str(), body.as_slice()),
        ("HTTP/1.1 200 OK", &b"OK"[..])
    );
    refusal(
        &exchange(
            &mut client,
            &create("/containers/create", &binds(&["/opt:/o"])),
        )
        .await,
    );
    let allowed = create("/containers/create", &binds(&["/tmp/x:/x"]));
    let (status, _, echoed) = exchange(&mut client, &allowed).await;
    assert_eq!(status, "HTTP/1.1 201 Created");
    assert_eq!(echoed, allowed);
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /_ping HTTP/1.1", "POST /containers/create HTTP/1.1"]
    );
}

fn chunked(path: &str, body: &[u8], chunk: usize) -> Vec<u8> {
    let mut request =
        format!("POST {path} HTTP/1.1\r\nHost: docker\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for part in body.chunks(chunk) {
        request.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        request.extend_from_slice(part);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

#[tokio::test]
async fn a_chunked_create_is_checked_and_forwarded_intact() {
    let (rig, seen, _tasks) = shares_rig();
    let mut client = connect(&rig).await;
    let allowed = chunked("/containers/create", binds(&["/home/u/a:/a"]).as_bytes(), 7);
    let (status, _, echoed) = exchange(&mut client, &allowed).await;
    assert_eq!(status, "HTTP/1.1 201 Created");
    assert_eq!(echoed, allowed);
    let denied = chunked("/containers/create", binds(&["/etc:/e"]).as_bytes(), 5);
    let message = refusal(&exchange(&mut client, &denied).await);
    assert!(message.contains("the path /etc is not shared"), "{message}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_attach_becomes_a_raw_splice_even_without_an_upgrade_header() {
    let (rig, _seen, _tasks) = shares_rig();
    let mut client = connect(&rig).await;
    client
        .get_mut()
        .write_all(
            b"POST /v1.43/containers/abc/attach?stream=1&stdin=1 HTTP/1.1\r\nHost: d\r\n\r\n",
        )
        .await
        .unwrap();
    let mut status = String::new();
    client.read_line(&mut status).await.unwrap();
    assert_eq!(status, "HTTP/1.1 101 UPGRADED\r\n");
    loop {
        let mut line = String::new();
        client.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    // What looks like a denied create after the upgrade is the container's stdin: untouched.
    let stdin = create("/containers/create", &binds(&["/opt:/o"]));
    client.get_mut().write_all(&stdin).await.unwrap();
    client.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("the stream stalled")
        .unwrap();
    let mut sum = Checksum::default();
    sum.update(&stdin);
    let trailer = format!("\nEND {} {:016x}\n", stdin.len(), sum.0);
    assert_eq!(rest, [stdin, trailer.into_bytes()].concat());
}

async fn build_through(rig: &Rig, data: &[u8], chunk: Option<usize>) -> String {
    let mut request = match chunk {
        Some(chunk) => chunked("/v1.43/build?t=x", data, chunk),
        None => {
            let mut r = format!(
                "POST /v1.43/build?t=x HTTP/1.1\r\nHost: d\r\nContent-Length: {}\r\n\r\n",
                data.len()
            )
            .into_bytes();
            r.extend_from_slice(data);
            r
        }
    };
    let (mut rd, mut wr) = UnixStream::connect(&rig.docker_sock)
        .await
        .unwrap()
        .into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&request).await.unwrap();
        request.clear();
        wr
    });
    let mut reader = BufReader::new(&mut rd);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK\r\n");
    let mut rest = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line).await.unwrap() > 0 && line != "\r\n" {
        line.clear();
    }
    let _wr = writer.await.unwrap();
    let mut body = vec![0u8; 64];
    let n = reader.read(&mut body).await.unwrap();
    rest.push_str(std::str::from_utf8(&body[..n]).unwrap());
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_build_context_streams_through_intact() {
    const BYTES: usize = 64 * 1024 * 1024;
    let (rig, _seen, _tasks) = shares_rig();
    let data = payload(7, BYTES);
    let mut sum = Checksum::default();
    sum.update(&data);
    let expected = format!("{BYTES} {:016x}", sum.0);
    for chunk in [None, Some(32 * 1024)] {
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(60), build_through(&rig, &data, chunk))
            .await
            .expect("the build context stalled");
        assert_eq!(got, expected, "chunked: {chunk:?}");
        eprintln!("64 MiB (chunks {chunk:?}) in {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn a_create_body_over_the_limit_is_refused_and_the_connection_goes_on() {
    let (rig, seen, _tasks) = shares_rig();
    let mut client = connect(&rig).await;
    let padding = "x".repeat(5 * 1024 * 1024);
    let body = serde_json::json!({"Image": "alpine", "Labels": {"pad": padding}}).to_string();
    let (status, _, body) = exchange(&mut client, &create("/containers/create", &body)).await;
    assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        json["message"].as_str().unwrap().contains("mounts"),
        "{json}"
    );
    let (status, _, _) = exchange(&mut client, b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "only the ping reached dockerd"
    );
}

#[tokio::test]
async fn malformed_request_heads_close_the_connection_and_the_proxy_goes_on() {
    let (rig, seen, _tasks) = shares_rig();
    let long = format!(
        "GET /_ping HTTP/1.1\r\nX-Long: {}",
        "a".repeat(2 * 1024 * 1024)
    );
    let garbage = "\x00\x01\x02 not http at all\r\n\r\n".to_string();
    let bad_length = "POST /containers/create HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_string();
    let smuggle = "POST /containers/create HTTP/1.1\r\nContent-Length: 3\r\n\
                   Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        .to_string();
    for request in [long, garbage, bad_length, smuggle] {
        let (mut rd, mut wr) = UnixStream::connect(&rig.docker_sock)
            .await
            .unwrap()
            .into_split();
        // The proxy may close while we still write the long head: that is fine.
        let writer = tokio::spawn(async move { wr.write_all(request.as_bytes()).await.is_ok() });
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut answer))
            .await
            .expect("the proxy kept a malformed connection open")
            .unwrap_or_default();
        let _ = writer.await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400 "),
            "{answer}"
        );
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    let mut client = connect(&rig).await;
    let (status, _, _) = exchange(&mut client, b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn a_create_that_expects_100_continue_gets_it_and_is_forwarded_whole() {
    let (rig, _seen, _tasks) = shares_rig();
    let mut client = connect(&rig).await;
    let body = binds(&["/home/u/a:/a"]);
    let head = format!(
        "POST /containers/create HTTP/1.1\r\nHost: d\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    client.get_mut().write_all(head.as_bytes()).await.unwrap();
    let mut interim = vec![0u8; b"HTTP/1.1 100 Continue\r\n\r\n".len()];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut interim))
        .await
        .expect("the client would wait for 100 Continue forever")
        .unwrap();
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    let (status, _, echoed) = exchange(&mut client, body.as_bytes()).await;
    assert_eq!(status, "HTTP/1.1 201 Created");
    assert_eq!(echoed, [head.into_bytes(), body.into_bytes()].concat());
}
