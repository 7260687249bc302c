//! The Docker API connection, HTTP/1.1-aware in the client→guest direction only: each request
//! head is parsed (bounded) to find where its body ends, every byte is forwarded verbatim, and
//! a request that creates a container or service is held until its JSON body is in, checked by
//! the [`MountPolicy`], and answered here with a `400` instead of forwarded when a bind mount
//! cannot work. Once a request upgrades the connection (attach, exec, build session), both
//! directions are a raw splice. The guest→client direction is always a raw splice.
//!
//! Assumption: clients do not pipeline (the docker CLI and the Docker SDKs send a request only
//! after reading the previous answer). So when a request arrives no guest answer is in flight
//! and an answer written here cannot land inside one; writes to the client are serialized, so
//! a pipelining client can at worst see our answer between two of dockerd's, never inside a
//! chunk of one.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::mounts::MountPolicy;

/// The longest request head accepted (Go's net/http default; `X-Registry-Config` carries every
/// registry credential of a build).
pub const MAX_HEAD: usize = 1024 * 1024;
/// The longest create body held for checking; a longer one is drained and answered `413`.
pub const MAX_CHECKED_BODY: usize = 4 * 1024 * 1024;
const MAX_HEADERS: usize = 256;
const MAX_CHUNK_LINE: usize = 4096;
/// Buffer per direction.
const BUF: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the client's request")]
    ReadClient(#[source] io::Error),
    #[error("the client closed the connection inside a request")]
    Truncated,
    #[error("the request head is longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("the request head does not parse")]
    ParseHead(#[source] httparse::Error),
    #[error("the request's body length is unclear: {0}")]
    BodyLength(&'static str),
    #[error("a chunk size line of the request body is malformed")]
    Chunk,
    #[error("writing to dockerd")]
    WriteGuest(#[source] io::Error),
    #[error("reading dockerd's answer")]
    ReadGuest(#[source] io::Error),
    #[error("writing to the client")]
    WriteClient(#[source] io::Error),
}

impl Error {
    /// The client sent something that is not HTTP/1.1 we can frame.
    fn bad_request(&self) -> bool {
        matches!(
            self,
            Error::HeadTooLong | Error::ParseHead(_) | Error::BodyLength(_) | Error::Chunk
        )
    }
}

/// Serves one client connection over an open guest connection until both sides are done.
pub async fn splice(
    client: UnixStream,
    guest: UnixStream,
    policy: &MountPolicy,
) -> Result<(), Error> {
    let (client_rd, client_wr) = client.into_split();
    let (mut guest_rd, mut guest_wr) = guest.into_split();
    let client_wr = Mutex::new(client_wr);
    let up = async {
        let ending = requests(client_rd, &mut guest_wr, &client_wr, policy).await?;
        if ending == Ending::Eof {
            // Half-close: dockerd sees the end of input and still finishes its answer.
            let _ = guest_wr.shutdown().await;
        }
        Ok::<_, Error>(ending)
    };
    let down = async {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = guest_rd.read(&mut buf).await.map_err(Error::ReadGuest)?;
            let mut client = client_wr.lock().await;
            if n == 0 {
                let _ = client.shutdown().await;
                return Ok::<_, Error>(());
            }
            client
                .write_all(&buf[..n])
                .await
                .map_err(Error::WriteClient)?;
        }
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            ending = &mut up, if !up_done => match ending? {
                Ending::Eof => up_done = true,
                Ending::Close => return Ok(()),
            },
            done = &mut down, if !down_done => {
                done?;
                down_done = true;
            }
        }
    }
    Ok(())
}

/// How the client→guest direction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The client half-closed (between requests, or in an upgraded stream).
    Eof,
    /// We answered and the connection closes now.
    Close,
}

/// What a request does to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Forwarded as it comes.
    Plain,
    /// A container or service create/update: held and checked first.
    Checked,
    /// Hijacks the connection: after it, raw bytes.
    Upgrade,
}

/// Where a request body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

#[derive(Debug)]
struct Head {
    /// Bytes of the head at the front of the buffer.
    len: usize,
    route: Route,
    framing: Framing,
    /// The client asked for the connection to close after this request.
    close: bool,
    expect_continue: bool,
}

/// The client→guest direction: request after request, until EOF, an upgrade's EOF or a close.
async fn requests<R, G, C>(
    client: R,
    guest: &mut G,
    answer: &Mutex<C>,
    policy: &MountPolicy,
) -> Result<Ending, Error>
where
    R: AsyncRead + Unpin,
    G: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    let mut inbound = Inbound::new(client);
    loop {
        let head = match read_head(&mut inbound).await {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(Ending::Eof),
            Err(e) if e.bad_request() => {
                refuse(answer, &e).await?;
                return Ok(Ending::Close);
            }
            Err(e) => return Err(e),
        };
        match head.route {
            Route::Checked => {
                if !checked(&mut inbound, head, guest, answer, policy).await? {
                    return Ok(Ending::Close);
                }
            }
            Route::Plain | Route::Upgrade => {
                let mut sink = Sink::Guest(&mut *guest);
                sink.put(&inbound.buffered()[..head.len]).await?;
                inbound.consume(head.len);
                forward_body(&mut inbound, head.framing, &mut sink).await?;
                if head.route == Route::Upgrade {
                    inbound.raw(guest).await?;
                    return Ok(Ending::Eof);
                }
            }
        }
    }
}

/// Holds a create request until its body is in, checks it, then forwards it or answers it.
/// Whether the connection goes on.
async fn checked<R, G, C>(
    inbound: &mut Inbound<R>,
    head: Head,
    guest: &mut G,
    answer: &Mutex<C>,
    policy: &MountPolicy,
) -> Result<bool, Error>
where
    R: AsyncRead + Unpin,
    G: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    if head.expect_continue && head.framing != Framing::Length(0) {
        // The client waits for this before it sends the body we must see.
        let mut client = answer.lock().await;
        client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(Error::WriteClient)?;
    }
    let mut sink: Sink<G> = Sink::Collect {
        raw: inbound.buffered()[..head.len].to_vec(),
        body: Vec::new(),
        overflow: false,
    };
    inbound.consume(head.len);
    match forward_body(inbound, head.framing, &mut sink).await {
        Err(e) if e.bad_request() => {
            refuse(answer, &e).await?;
            return Ok(false);
        }
        other => other?,
    }
    let Sink::Collect {
        raw,
        body,
        overflow,
    } = sink
    else {
        unreachable!("the sink is built as Collect above");
    };
    let (status, message) = if overflow {
        let message = format!(
            "Berth checks the mounts of a create request and this one's body is over \
             {MAX_CHECKED_BODY} bytes"
        );
        ("413 Payload Too Large", message)
    } else {
        match policy.check(&body) {
            Ok(()) => {
                guest.write_all(&raw).await.map_err(Error::WriteGuest)?;
                return Ok(true);
            }
            Err(denied) => ("400 Bad Request", crate::chain(&denied).to_string()),
        }
    };
    tracing::info!("refused a create request: {message}");
    let response = json_response(status, &message, head.close, false);
    write_client(answer, &response).await?;
    Ok(!head.close)
}

/// Answers a request we cannot frame with a `400` and closes.
async fn refuse<C: AsyncWrite + Unpin>(answer: &Mutex<C>, err: &Error) -> Result<(), Error> {
    tracing::debug!("closing a docker connection: {}", crate::chain(err));
    let message = format!("Berth cannot read this request: {}", crate::chain(err));
    write_client(
        answer,
        &json_response("400 Bad Request", &message, true, false),
    )
    .await
}

async fn write_client<C: AsyncWrite + Unpin>(answer: &Mutex<C>, bytes: &[u8]) -> Result<(), Error> {
    let mut client = answer.lock().await;
    client.write_all(bytes).await.map_err(Error::WriteClient)?;
    client.flush().await.map_err(Error::WriteClient)
}

/// A complete HTTP/1.1 response carrying `{"message": ...}`, as dockerd's errors do (the docker
/// CLI prints `Error response from daemon: <message>`).
pub fn json_response(status: &str, message: &str, close: bool, head_request: bool) -> Vec<u8> {
    let body = serde_json::json!({ "message": message }).to_string();
    let connection = if close { "Connection: close\r\n" } else { "" };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {connection}\r\n",
        body.len()
    )
    .into_bytes();
    if !head_request {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

/// Where body bytes go: to the guest as they come, or held for a check.
enum Sink<'a, G> {
    Guest(&'a mut G),
    Collect {
        /// The request as it came, head included, to forward if it passes.
        raw: Vec<u8>,
        /// The body without chunk framing, for the check.
        body: Vec<u8>,
        /// Over [`MAX_CHECKED_BODY`]: the rest is drained, not held.
        overflow: bool,
    },
}

impl<G: AsyncWrite + Unpin> Sink<'_, G> {
    /// Framing bytes (head, chunk lines): forwarded, not part of the body.
    async fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.put_data(bytes, false).await
    }

    async fn put_data(&mut self, bytes: &[u8], data: bool) -> Result<(), Error> {
        match self {
            Sink::Guest(guest) => guest.write_all(bytes).await.map_err(Error::WriteGuest),
            Sink::Collect {
                raw,
                body,
                overflow,
            } => {
                if raw.len() + bytes.len() > MAX_CHECKED_BODY {
                    *overflow = true;
                }
                if !*overflow {
                    raw.extend_from_slice(bytes);
                    if data {
                        body.extend_from_slice(bytes);
                    }
                }
                Ok(())
            }
        }
    }
}

/// Forwards one request body to `sink`.
async fn forward_body<R, G>(
    inbound: &mut Inbound<R>,
    framing: Framing,
    sink: &mut Sink<'_, G>,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    G: AsyncWrite + Unpin,
{
    match framing {
        Framing::Length(len) => inbound.copy(len, sink).await,
        Framing::Chunked => loop {
            let line = inbound.line().await?;
            let size = chunk_size(&inbound.buffered()[..line])?;
            sink.put(&inbound.buffered()[..line]).await?;
            inbound.consume(line);
            if size == 0 {
                return trailers(inbound, sink).await;
            }
            inbound.copy(size, sink).await?;
            let end = inbound.line().await?;
            if !matches!(&inbound.buffered()[..end], b"\r\n" | b"\n") {
                return Err(Error::Chunk);
            }
            sink.put(&inbound.buffered()[..end]).await?;
            inbound.consume(end);
        },
    }
}

/// The trailer section after the last chunk, up to its empty line.
async fn trailers<R, G>(inbound: &mut Inbound<R>, sink: &mut Sink<'_, G>) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    G: AsyncWrite + Unpin,
{
    let mut total = 0;
    loop {
        let line = inbound.line().await?;
        total += line;
        if total > MAX_HEAD {
            return Err(Error::Chunk);
        }
        let last = matches!(&inbound.buffered()[..line], b"\r\n" | b"\n");
        sink.put(&inbound.buffered()[..line]).await?;
        inbound.consume(line);
        if last {
            return Ok(());
        }
    }
}

/// `SIZE[;extensions]CRLF` → SIZE.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line.strip_suffix(b"\n").ok_or(Error::Chunk)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let size = std::str::from_utf8(size).map_err(|_| Error::Chunk)?;
    let size = size.trim_matches([' ', '\t']);
    if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Chunk);
    }
    u64::from_str_radix(size, 16).map_err(|_| Error::Chunk)
}

/// Reads and parses the next request head; `None` at a clean end between requests.
async fn read_head<R: AsyncRead + Unpin>(inbound: &mut Inbound<R>) -> Result<Option<Head>, Error> {
    loop {
        if !inbound.buffered().is_empty() {
            let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut request = httparse::Request::new(&mut headers);
            match request
                .parse(inbound.buffered())
                .map_err(Error::ParseHead)?
            {
                httparse::Status::Complete(len) => return head(&request, len).map(Some),
                httparse::Status::Partial if inbound.buffered().len() >= MAX_HEAD => {
                    return Err(Error::HeadTooLong);
                }
                httparse::Status::Partial => {}
            }
        }
        if inbound.fill().await? == 0 {
            return match inbound
                .buffered()
                .iter()
                .all(|b| matches!(b, b'\r' | b'\n'))
            {
                true => Ok(None),
                false => Err(Error::Truncated),
            };
        }
    }
}

/// What the connection needs to know of a parsed head.
fn head(request: &httparse::Request, len: usize) -> Result<Head, Error> {
    let (mut length, mut chunked, mut upgrade, mut close, mut expect_continue) =
        (None, false, false, request.version == Some(0), false);
    for header in request.headers.iter() {
        let name = header.name;
        let value = std::str::from_utf8(header.value).unwrap_or_default();
        let tokens = || value.split(',').map(|t| t.trim().to_ascii_lowercase());
        if name.eq_ignore_ascii_case("content-length") {
            let n = content_length(value)?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::BodyLength("two Content-Length headers differ"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked` as the last coding frames a request body.
            chunked = tokens().rfind(|t| !t.is_empty()).as_deref() == Some("chunked");
            if !chunked {
                return Err(Error::BodyLength("a Transfer-Encoding other than chunked"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            upgrade |= tokens().any(|t| t == "upgrade");
            close |= tokens().any(|t| t == "close");
            if request.version == Some(0) && tokens().any(|t| t == "keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.trim().eq_ignore_ascii_case("100-continue");
        }
    }
    let framing = match (length, chunked) {
        (Some(_), true) => {
            return Err(Error::BodyLength(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        (_, true) => Framing::Chunked,
        (length, false) => Framing::Length(length.unwrap_or(0)),
    };
    let route = match route(
        request.method.unwrap_or_default(),
        request.path.unwrap_or_default(),
    ) {
        Route::Plain if upgrade => Route::Upgrade,
        route => route,
    };
    Ok(Head {
        len,
        route,
        framing,
        close,
        expect_continue,
    })
}

fn content_length(value: &str) -> Result<u64, Error> {
    let n = value.trim();
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::BodyLength("a Content-Length is not a number"));
    }
    n.parse()
        .map_err(|_| Error::BodyLength("a Content-Length is too big"))
}

/// What dockerd's router would do with `method target`.
fn route(method: &str, target: &str) -> Route {
    if method != "POST" {
        return Route::Plain;
    }
    let path = request_path(target);
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // dockerd serves every route under an optional `/vNN.NN` prefix.
    let parts = match parts.split_first() {
        Some((v, rest))
            if v.len() > 1
                && v.starts_with('v')
                && v[1..].bytes().all(|b| b.is_ascii_digit() || b == b'.') =>
        {
            rest
        }
        _ => &parts[..],
    };
    match parts {
        ["containers", "create"] | ["services", "create"] | ["services", _, "update"] => {
            Route::Checked
        }
        // These hijack the connection even when an old client sends no Upgrade header.
        ["containers", _, "attach"] | ["exec", _, "start"] => Route::Upgrade,
        _ => Route::Plain,
    }
}

/// The request target's path as dockerd's router sees it: without scheme and authority or
/// query, percent-decoded, `.` and `..` resolved (its router redirects unclean paths).
fn request_path(target: &str) -> String {
    let mut path = target;
    for scheme in ["http://", "https://"] {
        if let Some(rest) = path.strip_prefix(scheme) {
            path = rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let decoded = percent_decode(path);
    let mut parts: Vec<&str> = Vec::new();
    for part in decoded.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The client's read half with a buffer: request heads and chunk lines are parsed in place,
/// body bytes pass through in buffer-sized slices.
struct Inbound<R> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    fn new(reader: R) -> Self {
        Inbound {
            reader,
            buf: vec![0; BUF],
            start: 0,
            end: 0,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Reads more; 0 at EOF. Grows the buffer when it is full of one unfinished head or line
    /// (callers bound those).
    async fn fill(&mut self) -> Result<usize, Error> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self
            .reader
            .read(&mut self.buf[self.end..])
            .await
            .map_err(Error::ReadClient)?;
        self.end += n;
        Ok(n)
    }

    /// The length of the next line (LF included), reading until it is buffered.
    async fn line(&mut self) -> Result<usize, Error> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buffered()[scanned..].iter().position(|&b| b == b'\n') {
                return Ok(scanned + i + 1);
            }
            scanned = self.buffered().len();
            if scanned > MAX_CHUNK_LINE {
                return Err(Error::Chunk);
            }
            if self.fill().await? == 0 {
                return Err(Error::Truncated);
            }
        }
    }

    /// Moves `len` body bytes to `sink` in buffer-sized slices.
    async fn copy<G: AsyncWrite + Unpin>(
        &mut self,
        mut len: u64,
        sink: &mut Sink<'_, G>,
    ) -> Result<(), Error> {
        while len > 0 {
            if self.buffered().is_empty() && self.fill().await? == 0 {
                return Err(Error::Truncated);
            }
            let n = self
                .buffered()
                .len()
                .min(usize::try_from(len).unwrap_or(usize::MAX));
            sink.put_data(&self.buf[self.start..self.start + n], true)
                .await?;
            self.consume(n);
            len -= n as u64;
        }
        Ok(())
    }

    /// After an upgrade: everything that comes, as it comes, until EOF.
    async fn raw<G: AsyncWrite + Unpin>(&mut self, guest: &mut G) -> Result<(), Error> {
        loop {
            if !self.buffered().is_empty() {
                guest
                    .write_all(self.buffered())
                    .await
                    .map_err(Error::WriteGuest)?;
                let n = self.buffered().len();
                self.consume(n);
            }
            if self.fill().await? == 0 {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_are_found_under_any_version_query_or_encoding() {
        for target in [
            "/containers/create",
            "/v1.43/containers/create?name=web",
            "/v1.24/containers/create",
            "http://docker/v1.43/containers/create",
            "/containers/%63reate",
            "/containers//create",
            "/x/../containers/create",
            "/services/create",
            "/v1.41/services/abc123/update?version=7",
        ] {
            assert_eq!(route("POST", target), Route::Checked, "{target}");
        }
        for (method, target) in [
            ("GET", "/containers/create"),
            ("POST", "/containers/abc/start"),
            ("POST", "/vx/containers/create"),
            ("POST", "/containers/create/extra"),
            ("POST", "/build"),
        ] {
            assert_eq!(route(method, target), Route::Plain, "{method} {target}");
        }
        assert_eq!(
            route("POST", "/v1.43/containers/abc/attach?stdin=1"),
            Route::Upgrade
        );
        assert_eq!(route("POST", "/exec/abc/start"), Route::Upgrade);
    }

    fn parse(head: &[u8]) -> Result<Head, Error> {
        let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(head).map_err(Error::ParseHead)? {
            httparse::Status::Complete(len) => super::head(&request, len),
            httparse::Status::Partial => panic!("partial head"),
        }
    }

    #[test]
    fn heads_give_the_body_framing_and_ambiguous_ones_are_refused() {
        let h = parse(b"POST /build HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let h = parse(b"POST /x HTTP/1.1\r\ncontent-length: 12\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(h.unwrap().framing, Framing::Length(12));
        let h = parse(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n").unwrap();
        assert_eq!(
            (h.framing, h.route, h.close),
            (Framing::Length(0), Route::Plain, false)
        );
        let h = parse(b"GET /_ping HTTP/1.0\r\n\r\n").unwrap();
        assert!(h.close, "HTTP/1.0 closes by default");
        let h = parse(b"POST /session HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n");
        assert_eq!(h.unwrap().route, Route::Upgrade);
        for bad in [
            &b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.bad_request(), "{err}");
        }
    }

    #[test]
    fn chunk_size_lines_parse_strictly() {
        assert_eq!(chunk_size(b"1a\r\n").unwrap(), 26);
        assert_eq!(chunk_size(b"0\r\n").unwrap(), 0);
        assert_eq!(chunk_size(b"10;name=value\r\n").unwrap(), 16);
        assert_eq!(chunk_size(b"ff\n").unwrap(), 255);
        for bad in [
            &b"\r\n"[..],
            b"zz\r\n",
            b"-1\r\n",
            b"1a",
            b"11111111111111111\r\n",
        ] {
            assert!(matches!(chunk_size(bad), Err(Error::Chunk)), "{bad:?}");
        }
    }

    #[test]
    fn the_json_answer_is_framed_and_says_whether_it_closes() {
        let kept = String::from_utf8(json_response("400 Bad Request", "no", false, false)).unwrap();
        let (head, body) = kept.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(!head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(body, r#"{"message":"no"}"#);
        let closing = String::from_utf8(json_response("413 Payload Too Large", "x", true, false));
        assert!(closing.unwrap().contains("Connection: close\r\n"));
    }
}
