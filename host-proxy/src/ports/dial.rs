//! Reaching a container through the agent's dial service: connect to the guest's `DIAL_PORT`,
//! send one `Dial`, read one `DialReply`; after `Connected` the stream is the connection (TCP)
//! or carries length-prefixed datagrams (UDP).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use berth_protocol::ports::{Dial, DialReply, Proto, DIAL_PORT, MAX_DATAGRAM};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::control;
use crate::hybrid::{self, ConnectError};

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot reach the guest's dial service")]
    Connect(#[source] ConnectError),
    #[error("dial exchange with the guest")]
    Exchange(#[source] control::Error),
    #[error("the guest closed the dial connection without answering")]
    Closed,
    #[error("the guest did not answer the dial within {0:?}")]
    Timeout(Duration),
    #[error("the guest cannot reach the container: {0}")]
    Failed(String),
}

/// Opens a stream to `ip:port` over `proto` in the guest, all within `timeout`.
pub async fn dial(
    vsock: &Path,
    proto: Proto,
    ip: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<UnixStream, DialError> {
    let exchange = async {
        let mut stream = connect(vsock, timeout).await?;
        control::write_frame(&mut stream, &Dial { proto, ip, port })
            .await
            .map_err(DialError::Exchange)?;
        let reply = control::read_frame::<_, DialReply>(&mut stream)
            .await
            .map_err(DialError::Exchange)?;
        match reply {
            Some(DialReply::Connected) => Ok(stream),
            Some(DialReply::Failed { message }) => Err(DialError::Failed(message)),
            None => Err(DialError::Closed),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(DialError::Timeout(timeout)))
}

/// Connects to the dial service. A burst of connections can overflow the guest listener's
/// backlog, which the guest answers with a reset (`Refused`): that is tried again, a little later
/// each time, until `timeout` (the caller's bound) runs out.
async fn connect(vsock: &Path, timeout: Duration) -> Result<UnixStream, DialError> {
    let mut pause = Duration::from_millis(20);
    loop {
        match hybrid::connect(vsock, DIAL_PORT, timeout).await {
            Err(ConnectError::Refused { .. }) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            other => return other.map_err(DialError::Connect),
        }
    }
}

/// Writes one datagram frame (2-byte big-endian length, then the payload) in one write.
pub async fn write_datagram<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(2 + payload.len());
    berth_protocol::ports::write_datagram(&mut frame, payload)?;
    w.write_all(&frame).await
}

/// Reads one datagram frame into `buf` (at least `MAX_DATAGRAM` bytes); `None` at a clean end
/// of stream. Not cancel-safe: keep the future alive across wake-ups.
pub async fn read_datagram<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    let mut header = [0u8; 2];
    match r.read(&mut header[..1]).await? {
        0 => return Ok(None),
        _ => r.read_exact(&mut header[1..]).await?,
    };
    let len = usize::from(u16::from_be_bytes(header));
    let dst = buf.get_mut(..len).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the datagram buffer is smaller than {MAX_DATAGRAM} bytes"),
        )
    })?;
    r.read_exact(dst).await?;
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_match_the_protocol_crate_and_keep_their_boundaries() {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for len in [1usize, 0, 1400, MAX_DATAGRAM] {
            write_datagram(&mut ours, &vec![len as u8; len])
                .await
                .unwrap();
            berth_protocol::ports::write_datagram(&mut theirs, &vec![len as u8; len]).unwrap();
        }
        assert_eq!(ours, theirs);
        let mut r = ours.as_slice();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for len in [1usize, 0, 1400, MAX_DATAGRAM] {
            assert_eq!(read_datagram(&mut r, &mut buf).await.unwrap(), Some(len));
            assert!(buf[..len].iter().all(|&b| b == len as u8));
        }
        assert_eq!(read_datagram(&mut r, &mut buf).await.unwrap(), None);
        let mut one = Vec::new();
        write_datagram(&mut one, &[7; 1400]).await.unwrap();
        for cut in [1, one.len() - 1] {
            let mut torn = &one[..cut];
            assert!(
                read_datagram(&mut torn, &mut buf).await.is_err(),
                "cut at {cut}"
            );
        }
    }
}
