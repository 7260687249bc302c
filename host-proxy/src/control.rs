//! Host-side client of the guest agent: control requests on `CONTROL_PORT` and shell sessions
//! on `SHELL_PORT`, framed as the protocol crate says (4-byte big-endian length, then JSON).

use std::path::Path;
use std::time::Duration;

use berth_protocol::{Request, Response, ShellRequest, CONTROL_PORT, MAX_FRAME, SHELL_PORT};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::hybrid::{self, ConnectError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("control channel: {0}")]
    Protocol(#[from] berth_protocol::Error),
    #[error("the guest agent closed the control channel without answering")]
    Closed,
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
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
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(berth_protocol::Error::FrameTooLarge(u64::from(len)).into());
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await.map_err(io)?;
    let msg = serde_json::from_slice(&body).map_err(berth_protocol::Error::Decode)?;
    Ok(Some(msg))
}

/// Sends one request on a fresh control connection and returns the agent's answer; the whole
/// exchange (connecting included) is bounded by `timeout`.
pub async fn request(vsock: &Path, req: &Request, timeout: Duration) -> Result<Response, Error> {
    let exchange = async {
        let mut stream = hybrid::connect(vsock, CONTROL_PORT, timeout).await?;
        write_frame(&mut stream, req).await?;
        read_frame::<_, Response>(&mut stream)
            .await?
            .ok_or(Error::Closed)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(Error::Timeout(timeout)))
}

/// Opens a shell session: after the `ShellRequest` frame the stream carries `ShellFrame`s.
pub async fn open_shell(
    vsock: &Path,
    shell: &ShellRequest,
    timeout: Duration,
) -> Result<UnixStream, Error> {
    let mut stream = hybrid::connect(vsock, SHELL_PORT, timeout).await?;
    write_frame(&mut stream, shell).await?;
    Ok(stream)
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

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_refused() {
        let huge = (MAX_FRAME + 1).to_be_bytes();
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
