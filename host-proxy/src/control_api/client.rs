//! A client of the control API (`API.md`) over its unix socket: the `berth` CLI's and the tray
//! app's one way to ask the host proxy for its status, to start and stop the VM, to follow its
//! events and to open a shell in it.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1;
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

use super::model::{Accepted, ApiError, ApiEvent, Status, StopRequest, PREFIX};

/// The protocol name `POST /v1/shell` upgrades to.
pub const SHELL_UPGRADE: &str = "berth-shell";
/// The longest event line accepted: the host proxy's are a few hundred bytes.
pub const MAX_EVENT_LINE: usize = 1 << 20;
/// How long a client waits for one answer (the host proxy answers at once; the VM's work is
/// followed on the event stream).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing listens on the socket: no host proxy runs for this home.
    #[error("Berth is not running (nothing answers on {})", socket.display())]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path} on {}", socket.display())]
    Exchange {
        method: Method,
        path: String,
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    /// The host proxy refused the request; `error.code` says why to a program, `error.message`
    /// to the user.
    #[error("{}", error.message)]
    Api { status: StatusCode, error: ApiError },
    #[error("{path} answered {status} without an error body")]
    Status { path: String, status: StatusCode },
    #[error("the answer to {path} is not the JSON expected")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("an event line of more than {MAX_EVENT_LINE} bytes")]
    EventTooLong,
    #[error("the host proxy did not hand over the shell connection")]
    Upgrade(#[source] hyper::Error),
    #[error("cannot take over the shell connection's socket")]
    TakeOver(#[source] std::io::Error),
    /// It accepted the call but did not answer in time.
    #[error("the host proxy did not answer within {} s", CALL_TIMEOUT.as_secs())]
    TimedOut,
}

/// `call`, given up after `CALL_TIMEOUT`: a host proxy that hangs is an error like any other,
/// never a client that hangs with it.
pub async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or(Err(Error::TimedOut))
}

impl Error {
    /// The API's error code (`not_running`, `conflict`, ...) when the host proxy refused.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Error::Api { error, .. } => Some(&error.code),
            _ => None,
        }
    }
}

/// A client of one host proxy's control socket. Each call is one connection; the calls spawn
/// that connection's I/O on the tokio runtime they run in (current-thread or not).
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the API on `socket` (`Layout::control_socket()`); connects on each call.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, Error> {
        self.call(Method::GET, "/status", None).await
    }

    /// `POST /v1/start`: boots the VM with the config file's settings.
    pub async fn start(&self) -> Result<Accepted, Error> {
        self.call(Method::POST, "/start", None).await
    }

    /// `POST /v1/stop`: the stop sequence; the host proxy stays up.
    pub async fn stop(&self, request: &StopRequest) -> Result<Accepted, Error> {
        self.call(Method::POST, "/stop", Some(request)).await
    }

    /// `POST /v1/restart`: stop (if running), then start.
    pub async fn restart(&self, request: &StopRequest) -> Result<Accepted, Error> {
        self.call(Method::POST, "/restart", Some(request)).await
    }

    /// `POST /v1/quit`: stop (if running), then the host proxy exits.
    pub async fn quit(&self, request: &StopRequest) -> Result<Accepted, Error> {
        self.call(Method::POST, "/quit", Some(request)).await
    }

    /// `GET /v1/events`: the current state first, then every change, until either side goes.
    pub async fn events(&self) -> Result<Events, Error> {
        let path = format!("{PREFIX}/events");
        let request = self.request(Method::GET, &path, Full::default());
        let response = self.send(request, false).await?;
        let response = self.check(&path, response).await?;
        Ok(Events {
            body: response.into_body(),
            buf: Vec::new(),
        })
    }

    /// `POST /v1/shell` upgraded to `berth-shell`: the connection then carries the guest's
    /// shell protocol (one `ShellRequest` frame from us, then `ShellFrame`s both ways).
    pub async fn shell(&self) -> Result<ShellStream, Error> {
        let path = format!("{PREFIX}/shell");
        let mut request = self.request(Method::POST, &path, Full::default());
        let headers = request.headers_mut();
        headers.insert(
            CONNECTION,
            UPGRADE.as_str().parse().expect("a valid header"),
        );
        headers.insert(UPGRADE, SHELL_UPGRADE.parse().expect("a valid header"));
        let response = self.send(request, true).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.refusal(&path, response).await);
        }
        let io = hyper::upgrade::on(response).await.map_err(Error::Upgrade)?;
        Ok(ShellStream {
            io: TokioIo::new(io),
        })
    }

    fn request(&self, method: Method, path: &str, body: Full<Bytes>) -> Request<Full<Bytes>> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = path.parse().expect("our paths are valid URIs");
        request
            .headers_mut()
            .insert(HOST, "berth".parse().expect("a valid header"));
        request
    }

    /// One request on a fresh connection, and the answer's head.
    async fn send(
        &self,
        request: Request<Full<Bytes>>,
        upgrades: bool,
    ) -> Result<Response<Incoming>, Error> {
        let (method, path) = (request.method().clone(), request.uri().path().to_string());
        let exchange = |source| Error::Exchange {
            method: method.clone(),
            path: path.clone(),
            socket: self.socket.clone(),
            source,
        };
        let stream = self.connect().await?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(exchange)?;
        // The connection's I/O runs beside us; it ends with the exchange (or hands its socket
        // over on an upgrade). Its own error, if any, reaches us through `send_request`.
        if upgrades {
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
        sender.send_request(request).await.map_err(exchange)
    }

    async fn connect(&self) -> Result<UnixStream, Error> {
        UnixStream::connect(&self.socket).await.map_err(|source| {
            let socket = self.socket.clone();
            match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    Error::NotRunning { socket, source }
                }
                _ => Error::Connect { socket, source },
            }
        })
    }

    /// A request with an optional JSON body whose answer is JSON `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        endpoint: &str,
        body: Option<&StopRequest>,
    ) -> Result<T, Error> {
        let path = format!("{PREFIX}{endpoint}");
        let json = body.map(|body| serde_json::to_vec(body).expect("a StopRequest always encodes"));
        let has_body = json.is_some();
        let body = json.map_or_else(Full::default, |json| Full::new(Bytes::from(json)));
        let mut request = self.request(method.clone(), &path, body);
        if has_body {
            request.headers_mut().insert(
                CONTENT_TYPE,
                "application/json".parse().expect("a valid header"),
            );
        }
        let response = self.send(request, false).await?;
        let response = self.check(&path, response).await?;
        let bytes = self.read_body(&method, &path, response).await?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source })
    }

    /// The response when it is a success, else the error it carries.
    async fn check(
        &self,
        path: &str,
        response: Response<Incoming>,
    ) -> Result<Response<Incoming>, Error> {
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.refusal(path, response).await)
        }
    }

    /// What a non-success answer means: its `ApiError`, or its bare status.
    async fn refusal(&self, path: &str, response: Response<Incoming>) -> Error {
        let status = response.status();
        let bare = || Error::Status {
            path: path.to_string(),
            status,
        };
        match response.into_body().collect().await {
            Ok(body) => match serde_json::from_slice::<ApiError>(&body.to_bytes()) {
                Ok(error) => Error::Api { status, error },
                Err(_) => bare(),
            },
            Err(_) => bare(),
        }
    }

    async fn read_body(
        &self,
        method: &Method,
        path: &str,
        response: Response<Incoming>,
    ) -> Result<Bytes, Error> {
        match response.into_body().collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(source) => Err(Error::Exchange {
                method: method.clone(),
                path: path.to_string(),
                socket: self.socket.clone(),
                source,
            }),
        }
    }
}

/// The event stream of `GET /v1/events`, one `ApiEvent` per line.
#[derive(Debug)]
pub struct Events {
    body: Incoming,
    /// Bytes received after the last complete line.
    buf: Vec<u8>,
}

impl Events {
    /// The next event; `None` when the host proxy ended the stream or the connection broke
    /// (it exited, or went away mid-line). Lines of a type
    /// this client does not know (a newer host proxy's) are skipped. Cancel-safe: a dropped
    /// call loses nothing that was received.
    pub async fn next(&mut self) -> Result<Option<ApiEvent>, Error> {
        loop {
            while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                if let Some(event) = parse_event(&line)? {
                    return Ok(Some(event));
                }
            }
            if self.buf.len() > MAX_EVENT_LINE {
                return Err(Error::EventTooLong);
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(_)) => return Ok(None), // the host proxy went mid-stream
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// One line of the event stream: an event, `None` for a blank line or an unknown type.
fn parse_event(line: &[u8]) -> Result<Option<ApiEvent>, Error> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(None);
    }
    let json = |source| Error::Json {
        path: format!("{PREFIX}/events"),
        source,
    };
    match serde_json::from_slice::<ApiEvent>(line) {
        Ok(event) => Ok(Some(event)),
        Err(e) => {
            let value: serde_json::Value = serde_json::from_slice(line).map_err(json)?;
            match value.get("type").and_then(|t| t.as_str()) {
                Some(kind) if !matches!(kind, "state" | "guest") => {
                    tracing::debug!("skipped an event of unknown type {kind:?}");
                    Ok(None)
                }
                _ => Err(json(e)),
            }
        }
    }
}

/// The shell connection after the 101 (async); `into_std` gives the socket for blocking use.
#[derive(Debug)]
pub struct ShellStream {
    io: TokioIo<Upgraded>,
}

impl ShellStream {
    /// The unix socket underneath, made blocking, and the bytes the HTTP layer had already read
    /// from it (they come before what the socket gives next).
    pub fn into_std(self) -> Result<(StdUnixStream, Bytes), Error> {
        let parts = self
            .io
            .into_inner()
            .downcast::<TokioIo<UnixStream>>()
            .map_err(|_| Error::TakeOver(std::io::Error::other("not a unix socket")))?;
        let stream = parts.io.into_inner().into_std().map_err(Error::TakeOver)?;
        stream.set_nonblocking(false).map_err(Error::TakeOver)?;
        Ok((stream, parts.read_buf))
    }
}

impl AsyncRead for ShellStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ShellStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::io::{Read, Write};
    use std::time::Duration;

    use hyper::server::conn::http1 as server;
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;
    use crate::control_api::model::{Settings, Sockets, StateChange, VmState};

    fn change(state: VmState, reason: &str) -> StateChange {
        StateChange {
            state,
            reason: Some(reason.into()),
            since_ms: 1_764_640_000_000,
        }
    }

    fn a_status() -> Status {
        Status {
            api_version: 1,
            version: "0.1.0".into(),
            pid: 4242,
            vmm_pid: Some(4250),
            vmm_rss_kib: Some(150 << 10),
            balloon: None,
            state: change(VmState::Running, "dockerd answers"),
            uptime_secs: Some(42),
            home: "/h".into(),
            sockets: Sockets {
                docker: "/h/run/docker.sock".into(),
                control: "/h/run/berth.sock".into(),
                vsock: "/h/run/vsock.sock".into(),
                vmm_api: "/h/run/vmm.sock".into(),
            },
            settings: Settings {
                cpus: 2,
                memory_mib: 2048,
                disk_size_gib: 64,
                kernel: None,
                rootfs: None,
                vmm: None,
                cmdline_extra: String::new(),
                shares: Vec::new(),
                ports: Default::default(),
            },
            guest: None,
            ports: Vec::new(),
        }
    }

    fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())));
        *response.status_mut() = status;
        response
    }

    fn api_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
        let error = ApiError {
            code: code.into(),
            message: message.into(),
        };
        json(status, &error)
    }

    /// The endpoints as a host proxy would answer them, enough to see the client through.
    async fn serve(
        mut request: Request<Incoming>,
        vm: bool,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = request.uri().path().to_string();
        let response = match (request.method().clone(), path.as_str()) {
            (Method::GET, "/v1/status") => json(StatusCode::OK, &a_status()),
            (Method::POST, "/v1/start") => json(
                StatusCode::ACCEPTED,
                &Accepted {
                    state: change(VmState::Starting, "booting"),
                },
            ),
            (Method::POST, "/v1/stop" | "/v1/quit") => {
                let body = request.body_mut().collect().await.unwrap().to_bytes();
                let asked: StopRequest = serde_json::from_slice(&body).unwrap();
                let reason = format!("stopping within {:?} s", asked.timeout_secs);
                json(
                    StatusCode::ACCEPTED,
                    &Accepted {
                        state: change(VmState::Stopping, &reason),
                    },
                )
            }
            (Method::POST, "/v1/restart") => {
                api_error(StatusCode::CONFLICT, "conflict", "Berth is stopping")
            }
            (Method::POST, "/v1/shell") => shell(request, vm),
            (Method::GET, "/v1/garbage") => json(StatusCode::OK, &"not a status"),
            _ => {
                let mut response = Response::new(Full::new(Bytes::from_static(b"nope")));
                *response.status_mut() = StatusCode::NOT_FOUND;
                response
            }
        };
        Ok(response)
    }

    /// 101 and an echo of what the client sends; 503 without a VM; 400 without the headers.
    fn shell(request: Request<Incoming>, vm: bool) -> Response<Full<Bytes>> {
        let asks = request.headers().get(UPGRADE).and_then(|v| v.to_str().ok());
        if asks != Some(SHELL_UPGRADE) {
            return api_error(StatusCode::BAD_REQUEST, "bad_request", "no upgrade asked");
        }
        if !vm {
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_running",
                "Berth is not running",
            );
        }
        tokio::spawn(async move {
            let upgraded = hyper::upgrade::on(request).await.unwrap();
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 64];
            loop {
                let n = io.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                io.write_all(&buf[..n]).await.unwrap();
            }
        });
        let mut response = Response::new(Full::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert(UPGRADE, SHELL_UPGRADE.parse().unwrap());
        response
            .headers_mut()
            .insert(CONNECTION, "upgrade".parse().unwrap());
        response
    }

    fn server() -> (tempfile::TempDir, Client) {
        server_with(true)
    }

    /// A hyper server of `serve` on a socket in a fresh directory; `vm`: one runs.
    fn server_with(vm: bool) -> (tempfile::TempDir, Client) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("berth.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(
                    server::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(move |r| serve(r, vm)))
                        .with_upgrades(),
                );
            }
        });
        (dir, Client::new(socket))
    }

    /// A server that writes `pieces` as they are, pausing between them, on each connection.
    fn raw_server(pieces: Vec<Vec<u8>>) -> (tempfile::TempDir, Client) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("berth.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await.unwrap();
            for piece in pieces {
                stream.write_all(&piece).await.unwrap();
                stream.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        (dir, Client::new(socket))
    }

    #[tokio::test]
    async fn status_and_lifecycle_requests_get_their_answers() {
        let (_dir, client) = server();
        assert_eq!(client.status().await.unwrap(), a_status());
        assert_eq!(client.start().await.unwrap().state.state, VmState::Starting);
        let asked = StopRequest {
            timeout_secs: Some(7),
        };
        let stopping = client.stop(&asked).await.unwrap().state;
        assert_eq!(stopping.state, VmState::Stopping);
        assert_eq!(
            stopping.reason.as_deref(),
            Some("stopping within Some(7) s")
        );
        let quitting = client.quit(&StopRequest::default()).await.unwrap().state;
        assert_eq!(quitting.reason.as_deref(), Some("stopping within None s"));
    }

    #[tokio::test]
    async fn a_refusal_carries_the_apis_code_and_message() {
        let (_dir, client) = server();
        let err = client.restart(&StopRequest::default()).await.unwrap_err();
        assert_eq!(err.api_code(), Some("conflict"));
        assert_eq!(err.to_string(), "Berth is stopping");
        assert!(matches!(err, Error::Api { status, .. } if status == StatusCode::CONFLICT));
    }

    #[tokio::test]
    async fn answers_that_are_not_the_api_are_named_errors() {
        let (_dir, client) = server();
        let err = client
            .call::<Status>(Method::GET, "/nowhere", None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/v1/nowhere answered 404 Not Found without an error body"
        );
        let err = client
            .call::<Status>(Method::GET, "/garbage", None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the answer to /v1/garbage is not the JSON expected"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[tokio::test]
    async fn no_host_proxy_is_not_running_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("berth.sock");
        let err = Client::new(&socket).status().await.unwrap_err();
        assert!(matches!(err, Error::NotRunning { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "Berth is not running (nothing answers on {})",
                socket.display()
            )
        );
        // What a killed host proxy leaves: the socket file, nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let err = Client::new(&socket).start().await.unwrap_err();
        assert!(matches!(err, Error::NotRunning { .. }), "{err:?}");
    }

    const EVENTS_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                                 transfer-encoding: chunked\r\n\r\n";

    /// `data` as one HTTP chunk.
    fn chunk(data: &[u8]) -> Vec<u8> {
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.extend_from_slice(data);
        chunk.extend_from_slice(b"\r\n");
        chunk
    }

    #[tokio::test]
    async fn events_are_read_line_by_line_across_partial_reads() {
        let guest = br#"{"type":"guest","event":{"event":"daemon_ready","daemon":"dockerd"}}"#;
        let (_dir, client) = raw_server(vec![
            EVENTS_HEAD.to_vec(),
            // One line in two chunks, a blank line, a type this client does not know.
            chunk(br#"{"type":"state","sta"#),
            chunk(b"te\":\"starting\",\"reason\":null,\"since_ms\":1}\n\n"),
            chunk(b"{\"type\":\"ports\",\"added\":[]}\n"),
            // One line with the next one's start, then the rest with no newline yet.
            [chunk(guest), chunk(b"\n{\"type\":\"state\",")].concat(),
            chunk(br#""state":"running","reason":"dockerd answers","since_ms":2}"#),
            chunk(b"\n"),
            b"0\r\n\r\n".to_vec(),
        ]);
        let mut events = client.events().await.unwrap();
        assert_eq!(
            events.next().await.unwrap(),
            Some(ApiEvent::State(StateChange {
                state: VmState::Starting,
                reason: None,
                since_ms: 1
            }))
        );
        assert_eq!(
            events.next().await.unwrap(),
            Some(ApiEvent::Guest {
                event: berth_protocol::Event::DaemonReady {
                    daemon: "dockerd".into()
                }
            })
        );
        assert_eq!(
            events.next().await.unwrap(),
            Some(ApiEvent::State(StateChange {
                state: VmState::Running,
                reason: Some("dockerd answers".into()),
                since_ms: 2
            }))
        );
        assert_eq!(events.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_malformed_event_line_is_an_error() {
        let (_dir, client) = raw_server(vec![
            EVENTS_HEAD.to_vec(),
            chunk(b"{\"type\":\"state\",\"state\":\"ok\"}\n"),
        ]);
        let mut events = client.events().await.unwrap();
        let err = events.next().await.unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn the_shell_upgrade_hands_over_a_blocking_socket() {
        let (_dir, client) = server();
        let shell = client.shell().await.unwrap();
        let (mut stream, buffered) = shell.into_std().unwrap();
        assert!(buffered.is_empty());
        let echoed = tokio::task::spawn_blocking(move || {
            stream.write_all(b"frames both ways").unwrap();
            let mut back = [0u8; 16];
            stream.read_exact(&mut back).unwrap();
            back
        })
        .await
        .unwrap();
        assert_eq!(&echoed, b"frames both ways");
    }

    #[tokio::test]
    async fn a_refused_shell_upgrade_is_the_apis_error() {
        let (_dir, client) = server_with(false);
        let err = client.shell().await.unwrap_err();
        assert_eq!(err.api_code(), Some("not_running"));
        assert_eq!(err.to_string(), "Berth is not running");
    }
}
