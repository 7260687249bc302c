//! Host-side client of the guest agent: control connections on `CONTROL_PORT` (each opens with
//! the `Hello` exchange) and shell sessions on `SHELL_PORT`, framed as the protocol crate says
//! (4-byte big-endian length, then JSON).

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_protocol::files::FileEvent;
use berth_protocol::{Request, Response, CONTROL_PORT, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::hybrid::{self, ConnectError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the guest agent")]
    Connect(#[source] ConnectError),
    #[error("control channel")]
    Protocol(#[source] berth_protocol::Error),
    #[error("the guest agent closed the control channel without answering")]
    Closed,
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent answered Hello with {0}")]
    BadHello(String),
    #[error("the guest agent answered {request} with {answer}")]
    Refused {
        request: &'static str,
        answer: String,
    },
}

impl From<ConnectError> for Error {
    fn from(e: ConnectError) -> Self {
        Error::Connect(e)
    }
}

impl From<berth_protocol::Error> for Error {
    fn from(e: berth_protocol::Error) -> Self {
        Error::Protocol(e)
    }
}

/// What the agent said in answer to our `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub agent_version: String,
    pub uptime_ms: u64,
}

/// A control connection that has exchanged `Hello`; more requests may follow on it.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    pub hello: Hello,
}

impl Connection {
    /// Connects to the agent's control port and exchanges `Hello` (our `PROTOCOL_VERSION`),
    /// all within `timeout`.
    pub async fn open(vsock: &Path, timeout: Duration) -> Result<Connection, Error> {
        let exchange = async {
            let mut stream = hybrid::connect(vsock, CONTROL_PORT, timeout).await?;
            let hello = Request::Hello {
                protocol_version: PROTOCOL_VERSION,
            };
            write_frame(&mut stream, &hello).await?;
            let answer = read_frame::<_, Response>(&mut stream)
                .await?
                .ok_or(Error::Closed)?;
            match answer {
                Response::Hello {
                    protocol_version,
                    agent_version,
                    uptime_ms,
                } => Ok(Connection {
                    stream,
                    hello: Hello {
                        protocol_version,
                        agent_version,
                        uptime_ms,
                    },
                }),
                other => Err(Error::BadHello(describe(&other))),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(Error::Timeout(timeout)))
    }

    /// Sends one request and reads its answer, within `timeout`.
    pub async fn request(&mut self, req: &Request, timeout: Duration) -> Result<Response, Error> {
        let exchange = async {
            write_frame(&mut self.stream, req).await?;
            read_frame::<_, Response>(&mut self.stream)
                .await?
                .ok_or(Error::Closed)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(Error::Timeout(timeout)))
    }

    /// The stream, for a connection that now carries pushed `Event`s (after `Subscribe`).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }
}

/// A short name for an answer, for logs ("error: ...", "unsupported request stats").
pub fn describe(response: &Response) -> String {
    match response {
        Response::Hello { .. } => "hello".into(),
        Response::Health { .. } => "health".into(),
        Response::Stats { .. } => "stats".into(),
        Response::Clock { .. } => "clock".into(),
        Response::Ack => "ack".into(),
        Response::Error { message } => format!("error {message:?}"),
        Response::Unsupported { request } => format!("unsupported (request {request:?})"),
    }
}

/// Writes one frame holding `msg`.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut frame = Vec::new();
    berth_protocol::write_frame(&mut frame, msg)?;
    w.write_all(&frame)
        .await
        .map_err(berth_protocol::Error::Io)?;
    w.flush().await.map_err(berth_protocol::Error::Io)?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, Error>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let io = |e: std::io::Error| Error::Protocol(berth_protocol::Error::Io(e));
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]).await.map_err(io)? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
            n => got += n,
        }
    }
    let mut body = vec![0u8; berth_protocol::frame_len(len)?];
    r.read_exact(&mut body).await.map_err(io)?;
    let msg = serde_json::from_slice(&body).map_err(berth_protocol::Error::Decode)?;
    Ok(Some(msg))
}

/// Sends one request on a fresh control connection (after the `Hello` exchange) and returns
/// the agent's answer; the whole exchange (connecting included) is bounded by `timeout`.
pub async fn request(vsock: &Path, req: &Request, timeout: Duration) -> Result<Response, Error> {
    let exchange = async {
        let mut connection = Connection::open(vsock, timeout).await?;
        connection.request(req, timeout).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(Error::Timeout(timeout)))
}

/// Carries host file events (`watch::Watcher`'s batches) to the agent on one control
/// connection, opened on first use and again after a failure.
#[derive(Debug)]
pub struct FileEventSender {
    vsock: PathBuf,
    timeout: Duration,
    connection: Option<Connection>,
}

impl FileEventSender {
    /// A sender for the agent behind `vsock`; each request (connecting included) is bounded by
    /// `timeout`.
    pub fn new(vsock: PathBuf, timeout: Duration) -> FileEventSender {
        FileEventSender {
            vsock,
            timeout,
            connection: None,
        }
    }

    /// Sends `events` as one or more `FileEvents` requests (each fits a frame), in order. On
    /// an error the connection is dropped (the next call opens a new one) and the rest of
    /// `events` is not sent: a stale event is worth less than a prompt next one.
    pub async fn send(&mut self, events: &[FileEvent]) -> Result<(), Error> {
        for chunk in berth_protocol::files::request_chunks(events) {
            let connection = match &mut self.connection {
                Some(connection) => connection,
                None => self
                    .connection
                    .insert(Connection::open(&self.vsock, self.timeout).await?),
            };
            let req = Request::FileEvents {
                events: chunk.to_vec(),
            };
            let answer = connection.request(&req, self.timeout).await;
            match answer {
                Ok(Response::Ack) => {}
                Ok(other) => {
                    self.connection = None;
                    return Err(Error::Refused {
                        request: "file_events",
                        answer: describe(&other),
                    });
                }
                Err(e) => {
                    self.connection = None;
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_match_the_protocol_crate_byte_for_byte() {
        let req = Request::Shutdown { timeout_secs: 7 };
        let mut ours = Vec::new();
        write_frame(&mut ours, &req).await.unwrap();
        let mut theirs = Vec::new();
        berth_protocol::write_frame(&mut theirs, &req).unwrap();
        assert_eq!(ours, theirs);
        let mut r = ours.as_slice();
        assert_eq!(read_frame::<_, Request>(&mut r).await.unwrap(), Some(req));
        assert_eq!(read_frame::<_, Request>(&mut r).await.unwrap(), None);
    }

    /// A VMM with an agent behind it that answers each request with the next of `answers`.
    fn fake_agent(path: &Path, answers: Vec<Response>) -> tokio::task::JoinHandle<Vec<Request>> {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"CONNECT 1024\n");
            s.write_all(b"OK 1\n").await.unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                let Some(req) = read_frame::<_, Request>(&mut s).await.unwrap() else {
                    break;
                };
                seen.push(req);
                write_frame(&mut s, &answer).await.unwrap();
            }
            seen
        })
    }

    #[tokio::test]
    async fn every_connection_opens_with_hello_and_then_carries_requests() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let agent = fake_agent(
            &vsock,
            vec![
                Response::Hello {
                    protocol_version: 2,
                    agent_version: "0.0.9".into(),
                    uptime_ms: 5,
                },
                Response::Unsupported {
                    request: "stats".into(),
                },
            ],
        );
        let timeout = Duration::from_secs(5);
        let mut connection = Connection::open(&vsock, timeout).await.unwrap();
        assert_eq!(connection.hello.protocol_version, 2);
        assert_eq!(connection.hello.agent_version, "0.0.9");
        let answer = connection.request(&Request::Stats, timeout).await.unwrap();
        assert_eq!(describe(&answer), r#"unsupported (request "stats")"#);
        drop(connection);
        let seen = agent.await.unwrap();
        assert_eq!(
            seen,
            [
                Request::Hello {
                    protocol_version: PROTOCOL_VERSION
                },
                Request::Stats
            ]
        );
    }

    #[tokio::test]
    async fn file_events_go_out_in_frame_sized_requests_on_one_connection() {
        use berth_protocol::files::{FileEventKind, MAX_EVENTS_PER_REQUEST};
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let hello = Response::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            uptime_ms: 5,
        };
        let agent = fake_agent(
            &vsock,
            vec![hello, Response::Ack, Response::Ack, Response::Ack],
        );
        let events: Vec<FileEvent> = (0..MAX_EVENTS_PER_REQUEST + 1)
            .map(|i| FileEvent {
                kind: FileEventKind::Modify,
                path: format!("/home/u/app/f{i}").into(),
            })
            .collect();
        let mut sender = FileEventSender::new(vsock, Duration::from_secs(5));
        sender.send(&events).await.unwrap();
        sender.send(&events[..1]).await.unwrap();
        drop(sender);
        let seen = agent.await.unwrap();
        assert_eq!(seen.len(), 4, "hello and three requests on one connection");
        let sent: Vec<FileEvent> = seen[1..]
            .iter()
            .flat_map(|req| match req {
                Request::FileEvents { events } => events.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(sent.len(), events.len() + 1);
        assert_eq!(sent[..events.len()], events[..]);
    }

    #[tokio::test]
    async fn an_agent_refusing_file_events_is_an_error_naming_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let hello = Response::Hello {
            protocol_version: 3,
            agent_version: "0.0.9".into(),
            uptime_ms: 5,
        };
        let unsupported = Response::Unsupported {
            request: "file_events".into(),
        };
        let _agent = fake_agent(&vsock, vec![hello, unsupported]);
        let mut sender = FileEventSender::new(vsock, Duration::from_secs(5));
        let event = FileEvent {
            kind: berth_protocol::files::FileEventKind::Create,
            path: "/tmp/x".into(),
        };
        let err = sender.send(&[event]).await.unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{err}");
        assert!(err.to_string().contains("unsupported"), "{err}");
    }

    #[tokio::test]
    async fn an_agent_that_does_not_answer_hello_with_hello_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let _agent = fake_agent(
            &vsock,
            vec![Response::Error {
                message: "who are you".into(),
            }],
        );
        let err = Connection::open(&vsock, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::BadHello(_)), "{err}");
        assert!(err.to_string().contains("who are you"), "{err}");
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_refused() {
        let huge = (berth_protocol::MAX_FRAME + 1).to_be_bytes();
        let err = read_frame::<_, Response>(&mut huge.as_slice())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Protocol(berth_protocol::Error::FrameTooLarge(_))
        ));
        let truncated = [0u8, 0, 0, 9, b'{'];
        assert!(read_frame::<_, Response>(&mut truncated.as_slice())
            .await
            .is_err());
    }
}
