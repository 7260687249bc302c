//! A published TCP port: every accepted host connection is dialled through to the container
//! on its own task and spliced both ways, half-closes included; a connection whose other end
//! fails, or that is cut by the publish closing, is reset rather than closed cleanly.

use std::sync::Arc;
use std::time::Duration;

use berth_protocol::ports::Proto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::Target;

/// Buffer per direction of a splice.
const SPLICE_BUF: usize = 64 * 1024;
/// Pause after a failed accept (out of descriptors, most likely) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts host connections forever, each forwarded on a task in `conns` (which the caller
/// shuts down when the publish ends: dropping a connection's task resets it).
pub(super) async fn serve(listener: &TcpListener, target: &Arc<Target>, conns: &mut JoinSet<()>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    conns.spawn(forward(client, target.clone()));
                }
                Err(e) => {
                    if let Some(suppressed) = target.warns.check() {
                        tracing::warn!(
                            "accept on published port {}: {e} ({suppressed} more suppressed)",
                            target.port
                        );
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A host connection that is reset (SO_LINGER 0) when dropped, unless it ended cleanly.
struct Client {
    stream: TcpStream,
    clean: bool,
}

impl Drop for Client {
    fn drop(&mut self) {
        if !self.clean {
            let _ = self.stream.set_zero_linger();
        }
    }
}

async fn forward(stream: TcpStream, target: Arc<Target>) {
    // Go (so native dockerd's proxy) sets TCP_NODELAY on every connection.
    let _ = stream.set_nodelay(true);
    let mut client = Client {
        stream,
        clean: false,
    };
    let mut guest = match target.dial(Proto::Tcp).await {
        Ok(guest) => guest,
        Err(e) => return target.dial_failed(&e),
    };
    match tokio::io::copy_bidirectional_with_sizes(
        &mut client.stream,
        &mut guest,
        SPLICE_BUF,
        SPLICE_BUF,
    )
    .await
    {
        Ok((up, down)) => {
            client.clean = true;
            tracing::debug!("{} connection done: {up} B up, {down} B down", target.port);
        }
        Err(e) => tracing::debug!("{} connection reset: {e}", target.port),
    }
}
