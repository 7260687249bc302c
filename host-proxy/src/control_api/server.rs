//! The server of the control API (`API.md`): HTTP/1.1 on `run/berth.sock` with hyper, one
//! function per endpoint. Lifecycle requests are decided by `daemon::Shared::ask` and carried
//! out by the state machine; this file only speaks HTTP.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use berth_protocol::SHELL_PORT;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::model::{Accepted, ApiError, ApiEvent, StopRequest, VmState, PREFIX, SHELL_UPGRADE};
use crate::api::ApiSocket;
use crate::chain;
use crate::daemon::{self, Answer, Ask, Shared};
use crate::hybrid;

/// A request body larger than this is refused (the API's bodies are a few bytes).
const MAX_BODY: usize = 64 * 1024;
/// Lines an event client may have unsent before it waits (then it falls behind the broadcast,
/// never the daemon).
const EVENT_CLIENT_BUFFER: usize = 16;
/// Buffer per direction of a shell splice.
const SPLICE_BUF: usize = 16 * 1024;
/// How long a client has to send a request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What every answer's body is: a whole JSON document, or the event stream.
pub enum ApiBody {
    Full(Full<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(full) => Pin::new(full).poll_frame(cx),
            ApiBody::Stream(lines) => lines
                .poll_recv(cx)
                .map(|line| line.map(|l| Ok(Frame::data(l)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Full(full) => full.is_end_stream(),
            ApiBody::Stream(_) => false,
        }
    }

    /// The exact length of a whole document, so that it goes with a `Content-Length`.
    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ApiBody::Full(full) => full.size_hint(),
            ApiBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

type Answered = Response<ApiBody>;

/// Accepts control clients forever, each connection served on its own task.
pub async fn serve(socket: &ApiSocket, shared: Arc<Shared>) {
    loop {
        match socket.accept().await {
            Ok(client) => {
                let shared = shared.clone();
                tokio::spawn(async move { connection(client, shared).await });
            }
            Err(e) => {
                tracing::warn!("accept on {}: {e}", socket.path().display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(client: tokio::net::UnixStream, shared: Arc<Shared>) {
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let served = builder
        .serve_connection(TokioIo::new(client), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!("control client: {}", chain(&e));
    }
}

/// Routes one request.
pub async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Answered {
    let path = req.uri().path().to_string();
    let Some(endpoint) = path.strip_prefix(PREFIX).and_then(|p| p.strip_prefix('/')) else {
        return not_found(&path);
    };
    let method = req.method().clone();
    let wanted = match endpoint {
        "status" | "events" => Method::GET,
        "start" | "stop" | "restart" | "quit" | "shell" => Method::POST,
        _ => return not_found(&path),
    };
    if method != wanted {
        let mut answer = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} takes {wanted}, not {method}"),
        );
        answer
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow(&wanted)));
        return answer;
    }
    match endpoint {
        "status" => status(shared).await,
        "events" => events(shared),
        "start" => lifecycle(shared, Ask::Start, None),
        "shell" => shell(shared, req).await,
        _ => {
            let ask = match endpoint {
                "stop" => Ask::Stop,
                "restart" => Ask::Restart,
                _ => Ask::Quit,
            };
            match stop_request(req).await {
                Ok(body) => lifecycle(shared, ask, body.timeout_secs.map(Duration::from_secs)),
                Err(answer) => answer,
            }
        }
    }
}

fn allow(method: &Method) -> &'static str {
    if method == Method::GET {
        "GET"
    } else {
        "POST"
    }
}

fn not_found(path: &str) -> Answered {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no endpoint {path}: this is the control API {PREFIX} (see host-proxy/API.md)"),
    )
}

async fn status(shared: &Arc<Shared>) -> Answered {
    daemon::refresh_guest(shared).await;
    json(StatusCode::OK, &shared.status())
}

/// The current state, then every change and guest event, one JSON document per line.
fn events(shared: &Arc<Shared>) -> Answered {
    let (current, mut receiver) = shared.subscribe();
    let mut closing = shared.closing();
    let (lines, body) = mpsc::channel(EVENT_CLIENT_BUFFER);
    tokio::spawn(async move {
        let mut next = Some(ApiEvent::State(current));
        loop {
            if next.is_none() && *closing.borrow() {
                // What was published before the close still goes out; then the body ends.
                match receiver.try_recv() {
                    Ok(event) => next = Some(event),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
            }
            if let Some(event) = next.take() {
                let Ok(mut line) = serde_json::to_vec(&event) else {
                    continue;
                };
                line.push(b'\n');
                // Gone client: stop following.
                if lines.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            if *closing.borrow() {
                continue;
            }
            tokio::select! {
                () = lines.closed() => return,
                _ = closing.changed() => {}
                received = receiver.recv() => match received {
                    Ok(event) => next = Some(event),
                    // The oldest were dropped for it; it goes on with the ones still kept.
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::info!("an event client fell behind and missed {missed} events");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let mut answer = Response::new(ApiBody::Stream(body));
    answer.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    answer
}

fn lifecycle(shared: &Arc<Shared>, ask: Ask, timeout: Option<Duration>) -> Answered {
    match shared.ask(ask, timeout) {
        Answer::Accepted(state) => json(StatusCode::ACCEPTED, &Accepted { state }),
        Answer::Already(state) => json(StatusCode::OK, &Accepted { state }),
        Answer::Conflict(state) => error(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "the VM is {}: wait until it has stopped, then start it",
                state.state
            ),
        ),
    }
}

/// The optional `StopRequest` body; an answer of 400 naming the field when it is not one.
async fn stop_request(req: Request<Incoming>) -> Result<StopRequest, Answered> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("cannot read the body: {e}"),
            ))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(StopRequest::default());
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = match e.path().to_string() {
            p if p == "." => "(the body)".to_string(),
            p => format!("`{p}`"),
        };
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("field {field}: {}", e.inner()),
        )
    })
}

/// `POST /v1/shell`: connects to the guest's shell port, answers 101 and splices the upgraded
/// connection to it byte for byte.
async fn shell(shared: &Arc<Shared>, mut req: Request<Incoming>) -> Answered {
    let asks_upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(SHELL_UPGRADE));
    if !asks_upgrade {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("header `Upgrade`: a shell needs `Connection: Upgrade` and `Upgrade: {SHELL_UPGRADE}`"),
        );
    }
    if !matches!(shared.state().state, VmState::Starting | VmState::Running) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_running",
            "the Berth VM is not running: start it with `berth start`".into(),
        );
    }
    let guest = match hybrid::connect(&shared.vsock(), SHELL_PORT, shared.connect_timeout).await {
        Ok(guest) => guest,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the guest's shell service does not answer: {}", chain(&e)),
            )
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let mut guest = guest;
        match upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let copied = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut guest,
                    SPLICE_BUF,
                    SPLICE_BUF,
                )
                .await;
                match copied {
                    Ok((up, down)) => tracing::debug!("shell done: {up} B up, {down} B down"),
                    Err(e) => tracing::debug!("shell ended: {e}"),
                }
            }
            Err(e) => tracing::info!("a shell client went before the upgrade: {e}"),
        }
    });
    let mut answer = Response::new(ApiBody::Full(Full::new(Bytes::new())));
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    answer
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    answer
        .headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(SHELL_UPGRADE));
    answer
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Answered {
    match serde_json::to_vec(body) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            let mut answer = Response::new(ApiBody::Full(Full::new(Bytes::from(bytes))));
            *answer.status_mut() = status;
            answer
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            answer
        }
        Err(e) => {
            tracing::error!("cannot encode an answer: {e}");
            let mut answer = Response::new(ApiBody::Full(Full::new(Bytes::from_static(
                br#"{"code":"internal","message":"cannot encode the answer"}"#,
            ))));
            *answer.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            answer
        }
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Answered {
    json(
        status,
        &ApiError {
            code: code.into(),
            message,
        },
    )
}
