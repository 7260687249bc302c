//! The host end of Firecracker's "hybrid vsock": connect to the VMM's unix socket, write
//! `CONNECT <port>\n`, read `OK <hostport>\n`; the socket is then a byte stream to the guest port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// The answer line is `OK <u32>`; anything longer is not the VMM.
const MAX_REPLY: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach the VMM at {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest port {port} refused the connection (nothing listens there yet)")]
    Refused { port: u32 },
    #[error("guest port {port} did not answer within {timeout:?}")]
    Timeout { port: u32, timeout: Duration },
    #[error("unexpected answer to CONNECT {port}: {reply:?}")]
    BadReply { port: u32, reply: String },
    #[error("vsock handshake for guest port {port}")]
    Handshake {
        port: u32,
        #[source]
        source: std::io::Error,
    },
}

impl ConnectError {
    /// True when the VMM itself is not there (as opposed to a guest that is not ready).
    pub fn vmm_down(&self) -> bool {
        matches!(self, ConnectError::Socket { .. })
    }
}

/// Opens a stream to guest `port` through the VMM's hybrid vsock socket at `socket`, giving up
/// after `timeout` (a guest that is still booting never answers).
pub async fn connect(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, ConnectError> {
    let attempt = async {
        let mut stream =
            UnixStream::connect(socket)
                .await
                .map_err(|source| ConnectError::Socket {
                    path: socket.into(),
                    source,
                })?;
        handshake(&mut stream, port).await?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ConnectError::Timeout { port, timeout }))
}

/// Sends `CONNECT port` on `stream` and reads the `OK` line, nothing more: the guest's first
/// bytes stay in the stream.
pub async fn handshake<S>(stream: &mut S, port: u32) -> Result<u32, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |source| ConnectError::Handshake { port, source };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut line = Vec::with_capacity(MAX_REPLY);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            // The VMM closes the socket when the guest resets the connection.
            Ok(0) => return Err(ConnectError::Refused { port }),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_REPLY => line.push(byte[0]),
            Ok(_) => {
                return Err(ConnectError::BadReply {
                    port,
                    reply: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(ConnectError::Refused { port })
            }
            Err(e) => return Err(io(e)),
        }
    }
    let reply = String::from_utf8_lossy(&line);
    reply
        .trim_end_matches('\r')
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| ConnectError::BadReply {
            port,
            reply: reply.into_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    async fn vmm_answers(answer: &'static [u8]) -> (Result<u32, ConnectError>, Vec<u8>, Vec<u8>) {
        let (mut host, mut vmm) = duplex(1024);
        let vmm_side = tokio::spawn(async move {
            let mut line = [0u8; 13];
            vmm.read_exact(&mut line).await.unwrap();
            vmm.write_all(answer).await.unwrap();
            drop(vmm);
            line.to_vec()
        });
        let result = handshake(&mut host, 2375).await;
        let mut rest = Vec::new();
        let _ = host.read_to_end(&mut rest).await;
        (result, vmm_side.await.unwrap(), rest)
    }

    #[tokio::test]
    async fn ok_line_is_parsed_and_payload_after_it_is_left_in_the_stream() {
        let (result, sent, rest) = vmm_answers(b"OK 1073741824\nHTTP/1.1").await;
        assert_eq!(sent, b"CONNECT 2375\n");
        assert_eq!(result.unwrap(), 1 << 30);
        assert_eq!(rest, b"HTTP/1.1");
    }

    #[tokio::test]
    async fn close_without_ok_is_a_refusal() {
        let (result, _, _) = vmm_answers(b"").await;
        assert!(matches!(result, Err(ConnectError::Refused { port: 2375 })));
    }

    #[tokio::test]
    async fn garbage_is_a_bad_reply() {
        let (result, _, _) = vmm_answers(b"NOPE\n").await;
        assert!(matches!(result, Err(ConnectError::BadReply { .. })));
        let (result, _, _) = vmm_answers(b"OK 1 OK 1 OK 1 OK 1 OK 1 OK 1 OK 1 OK 1 OK 1\n").await;
        assert!(matches!(result, Err(ConnectError::BadReply { .. })));
    }

    #[tokio::test]
    async fn a_missing_socket_means_the_vmm_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect(&dir.path().join("vsock.sock"), 1024, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.vmm_down(), "{err}");
    }

    #[tokio::test]
    async fn a_guest_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Accepts and reads, never answers: a guest that has not brought up its vsock driver.
        let _vmm = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        let started = std::time::Instant::now();
        let err = connect(&path, 2375, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnectError::Timeout { port: 2375, .. }),
            "{err}"
        );
        assert!(!err.vmm_down());
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
