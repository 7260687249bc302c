//! The agent's event bus: whatever happens in the guest that the host wants to hear of (a daemon
//! exited or is ready again; ports, clock and OOM later) is `publish`ed here as a protocol
//! `Event`, and every `Subscribe` connection gets its own copy, pushed as `Event` frames.
//!
//! Publishers never wait for subscribers: each subscriber has a bounded queue, and one whose
//! queue is full (a host that stopped reading) is closed, not skipped, so a host never holds a
//! silently wrong picture; it sees its subscription end and can resubscribe and ask again.

use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use berth_protocol::{write_frame, Event, Response};

use crate::console;
use crate::vsock::Duplex;

/// Events a subscriber may fall behind by before it is closed.
pub const QUEUE_LEN: usize = 64;
/// How often an idle subscription checks whether the host hung up.
const HANGUP_CHECK: Duration = Duration::from_millis(500);

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("share the subscriber's connection")]
    Clone(#[source] std::io::Error),
}

/// One subscriber as the bus sees it.
struct Subscriber {
    id: u64,
    queue: SyncSender<Event>,
    /// Ends the subscriber's connection (when it fell behind); taken when it is used.
    close: Option<Box<dyn FnOnce() + Send>>,
}

/// The publish side, shared by everything that produces events.
pub struct Bus {
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    queue_len: usize,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("subscribers", &self.subscriber_count())
            .field("queue_len", &self.queue_len)
            .finish()
    }
}

impl Bus {
    /// A bus whose subscribers may fall `queue_len` events behind (`QUEUE_LEN` in the agent).
    pub fn new(queue_len: usize) -> Bus {
        Bus {
            subscribers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            queue_len: queue_len.max(1),
        }
    }

    fn subscribers(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        // Every change to the list is a single push or retain: a panic leaves it consistent.
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many subscribers are registered (closed ones are forgotten).
    pub fn subscriber_count(&self) -> usize {
        self.subscribers().len()
    }

    /// Registers a subscriber; `close` ends its connection should it fall behind. The
    /// subscription is forgotten when the returned `Subscription` is dropped.
    pub fn subscribe(self: &Arc<Self>, close: impl FnOnce() + Send + 'static) -> Subscription {
        let (queue, events) = mpsc::sync_channel(self.queue_len);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subscribers().push(Subscriber {
            id,
            queue,
            close: Some(Box::new(close)),
        });
        Subscription {
            bus: Arc::clone(self),
            id,
            events,
        }
    }

    /// Hands `event` to every subscriber without waiting for any. A subscriber whose queue is
    /// full is closed and forgotten; one whose connection ended is forgotten.
    pub fn publish(&self, event: &Event) {
        let mut behind = Vec::new();
        self.subscribers()
            .retain_mut(|s| match s.queue.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Disconnected(_)) => false,
                Err(TrySendError::Full(_)) => {
                    behind.extend(s.close.take());
                    false
                }
            });
        // Outside the lock: closing is a syscall, and the console may be slow.
        for close in behind {
            console::warn(&format!(
                "closed an event subscriber that fell {} events behind",
                self.queue_len
            ));
            close();
        }
    }

    fn forget(&self, id: u64) {
        self.subscribers().retain(|s| s.id != id);
    }
}

/// The receiving side of one subscriber; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    bus: Arc<Bus>,
    id: u64,
    events: Receiver<Event>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.forget(self.id);
    }
}

/// Serves a `Subscribe` on `stream`: registers the subscriber, answers `Ack` (so every event
/// published after the host has the `Ack` reaches it), then writes each event as a frame until
/// the host hangs up, a write fails (the host went away: the normal end, not an error), or the
/// subscriber fell behind and was closed. Bytes the host sends after `Subscribe` are not read.
pub fn serve<S: Duplex>(bus: &Arc<Bus>, mut stream: S) -> Result<(), Error> {
    let closer = stream.try_clone().map_err(Error::Clone)?;
    let subscription = bus.subscribe(move || {
        let _ = closer.shutdown(Shutdown::Both);
    });
    if write_frame(&mut stream, &Response::Ack).is_err() {
        return Ok(());
    }
    loop {
        match subscription.events.recv_timeout(HANGUP_CHECK) {
            Ok(event) => {
                if write_frame(&mut stream, &event).is_err() {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Timeout) if hung_up(&stream) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {}
            // The bus closed this subscriber (it fell behind): the connection is shut already.
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Whether the peer of `stream` has hung up, without waiting.
fn hung_up(stream: &impl std::os::fd::AsFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: stream.as_fd().as_raw_fd(),
        // POLLHUP and POLLERR are always reported; nothing else is asked for.
        events: 0,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; a zero timeout.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::read_frame;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    fn exited(n: u64) -> Event {
        Event::DaemonExited {
            daemon: "fake".into(),
            status: "exit status 1".into(),
            restart_in_ms: n,
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A host connection with a subscription served on its own thread, `Ack` read.
    fn subscribe(bus: &Arc<Bus>) -> UnixStream {
        let (mut host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let before = bus.subscriber_count();
        let b = Arc::clone(bus);
        std::thread::spawn(move || serve(&b, guest));
        assert_eq!(
            read_frame::<Response>(&mut host).unwrap(),
            Some(Response::Ack)
        );
        assert_eq!(bus.subscriber_count(), before + 1);
        host
    }

    #[test]
    fn every_subscriber_gets_every_event_in_order() {
        let bus = Arc::new(Bus::new(QUEUE_LEN));
        let mut hosts = [subscribe(&bus), subscribe(&bus)];
        for n in 0..3 {
            bus.publish(&exited(n));
        }
        bus.publish(&Event::DaemonReady {
            daemon: "dockerd".into(),
        });
        for host in &mut hosts {
            for n in 0..3 {
                assert_eq!(read_frame::<Event>(host).unwrap(), Some(exited(n)));
            }
            assert_eq!(
                read_frame::<Event>(host).unwrap(),
                Some(Event::DaemonReady {
                    daemon: "dockerd".into()
                })
            );
        }
    }

    #[test]
    fn a_host_that_hangs_up_is_forgotten_without_any_event() {
        let bus = Arc::new(Bus::new(QUEUE_LEN));
        let host = subscribe(&bus);
        let mut other = subscribe(&bus);
        drop(host);
        wait_until("the closed subscriber forgotten", || {
            bus.subscriber_count() == 1
        });
        bus.publish(&exited(7));
        assert_eq!(read_frame::<Event>(&mut other).unwrap(), Some(exited(7)));
    }

    #[test]
    fn a_subscriber_that_stops_reading_is_closed_and_publishing_never_waits() {
        let bus = Arc::new(Bus::new(4));
        let mut stalled = subscribe(&bus);
        bus.publish(&exited(0));
        assert_eq!(read_frame::<Event>(&mut stalled).unwrap(), Some(exited(0)));
        // The host reads no more. Publish far more than its socket buffer and queue hold.
        let started = Instant::now();
        let mut published = 1;
        while bus.subscriber_count() == 1 {
            assert!(published < 100_000, "never closed");
            bus.publish(&exited(published));
            published += 1;
        }
        assert!(published > 5, "closed before its queue could fill");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "publishing waited"
        );
        // The stalled host gets what was written before the close, in order, then the end.
        let mut got = 1;
        while let Ok(Some(event)) = read_frame::<Event>(&mut stalled) {
            assert_eq!(event, exited(got));
            got += 1;
        }
        assert!(got < published, "{got} of {published}");
        // A new subscription works as before.
        let mut again = subscribe(&bus);
        bus.publish(&exited(1));
        assert_eq!(read_frame::<Event>(&mut again).unwrap(), Some(exited(1)));
    }
}
