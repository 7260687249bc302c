//! Byte-for-byte relaying between two streams in both directions, with half-close propagation:
//! when one side reaches end of stream, the other side's write half is shut down, so HTTP
//! upgrades (attach, exec -it, build) and long streams (logs -f, events) pass unchanged.

use std::net::Shutdown;

use crate::vsock::Duplex;

/// Stack of a relay thread: the copy buffer lives on the heap, little else is needed.
pub const THREAD_STACK: usize = 128 * 1024;
const BUF_LEN: usize = 32 * 1024;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("share a stream between two threads")]
    Clone(#[source] std::io::Error),
    #[error("start a relay thread")]
    Thread(#[source] std::io::Error),
}

/// Bytes moved by `splice`, per direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moved {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Relays `a` ⇄ `b` until both directions have ended. A direction ends at end of stream
/// (the other side's write half is shut down) or on an error (both streams are shut down
/// completely, which ends the other direction too).
pub fn splice<A: Duplex, B: Duplex>(a: A, b: B) -> Result<Moved, Error> {
    let a_read = a.try_clone().map_err(Error::Clone)?;
    let b_write = b.try_clone().map_err(Error::Clone)?;
    let forward = std::thread::Builder::new()
        .name("splice".into())
        .stack_size(THREAD_STACK)
        .spawn(move || relay(a_read, b_write))
        .map_err(Error::Thread)?;
    let b_to_a = relay(b, a);
    // The thread's only panics would be bugs in `relay`; count nothing then.
    let a_to_b = forward.join().unwrap_or(0);
    Ok(Moved { a_to_b, b_to_a })
}

/// Copies `from` to `to`; see `splice`.
fn relay<F: Duplex, T: Duplex>(mut from: F, mut to: T) -> u64 {
    let mut buf = vec![0u8; BUF_LEN];
    let mut moved = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return moved;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        moved += n as u64;
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// client ⇄ (a | splice | b) ⇄ server
    fn rig() -> (UnixStream, UnixStream, std::thread::JoinHandle<Moved>) {
        let (client, a) = UnixStream::pair().unwrap();
        let (b, server) = UnixStream::pair().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let t = std::thread::spawn(move || splice(a, b).unwrap());
        (client, server, t)
    }

    #[test]
    fn bytes_flow_both_ways_and_half_close_propagates() {
        let (mut client, mut server, t) = rig();
        client.write_all(b"GET /events HTTP/1.1\r\n\r\n").unwrap();
        let mut got = [0u8; 24];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"GET /events HTTP/1.1\r\n\r\n");
        // The client is done sending; the server must see EOF but can still answer.
        client.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        server.write_all(&big).unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, big);
        let moved = t.join().unwrap();
        assert_eq!(
            moved,
            Moved {
                a_to_b: 24,
                b_to_a: 200_000
            }
        );
    }

    #[test]
    fn server_closing_first_ends_the_client_side_too() {
        let (mut client, server, t) = rig();
        drop(server);
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty());
        // The client's later bytes go nowhere; the splice ends once it closes.
        let _ = client.write_all(b"late");
        drop(client);
        t.join().unwrap();
    }
}
