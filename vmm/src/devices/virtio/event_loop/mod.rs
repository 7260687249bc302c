//! The event loop every virtio device runs on while it is active: one thread per device that
//! waits on the queues' notification eventfds, the device's backend file descriptors (sockets,
//! files) and its timers, and calls the device's [`DeviceHandler`] hooks for each. Used-ring
//! interrupts are collected over a batch of events and raised at most once per batch, as
//! EVENT_IDX asks.
//!
//! A device plugs in with a handler: blk and rng serve chains (`handle_chain`); vsock moves guest
//! packets to its muxer (`queue_ready`), host sockets to the muxer (`backend_event`) and the
//! muxer's packets to the RX queue once per batch (`batch_done`). A net device is the same shape
//! as vsock with one backend socket; a balloon adds a stats [`Registry::start_timer`] and signals
//! configuration changes through [`Interrupt::signal_config_changed`].
//!
//! Why not rust-vmm's `event-manager` (0.4.2), which Firecracker uses: it dispatches by file
//! descriptor number through a side table, and that table goes stale when a descriptor is closed
//! before it is removed: the number is then refused ("already registered") for the rest of the
//! loop's life, and removing it fails on the closed descriptor before the table is cleaned. vsock
//! opens and closes thousands of connection sockets, so one missed removal would silently refuse
//! every later connection that reuses the number. It has no point after a batch where a
//! subscriber may still change its registrations (vsock and net fill the RX queue there), only 32
//! bits of user data per event, and `unreachable!`/`lock().unwrap()` on its dispatch path. The
//! epoll part it would save is about fifty lines; this loop keys everything by its own tokens and
//! lets epoll drop closed descriptors by itself.

mod context;

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

pub(crate) use context::{Backends, Context, Registry, Served};

use super::{ActivateError, Interrupt};
use crate::memory::GuestMemory;
use context::Queues;

/// Events taken from epoll per wakeup.
const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("watching backend fd {fd} (token {token}) in the device's event loop failed")]
    AddBackend {
        fd: RawFd,
        token: u32,
        #[source]
        source: io::Error,
    },
    #[error("changing the events watched on backend fd {fd} (token {token}) failed")]
    ModifyBackend {
        fd: RawFd,
        token: u32,
        #[source]
        source: io::Error,
    },
    #[error("creating timer {token} of the device's event loop failed")]
    CreateTimer {
        token: u32,
        #[source]
        source: io::Error,
    },
    #[error("arming timer {token} of the device's event loop failed")]
    ArmTimer {
        token: u32,
        #[source]
        source: io::Error,
    },
}

/// What a device does when its event loop wakes. Every hook runs on the loop's thread and must
/// not block for long or panic on anything the guest or a backend does.
pub(crate) trait DeviceHandler: Send + 'static {
    /// Called once before the loop starts: the place to watch backend fds and start timers.
    /// An error fails the device's activation.
    fn start(&mut self, _ctx: &mut Context<'_>) -> Result<(), Error> {
        Ok(())
    }

    /// The driver notified queue `index`. The default serves every available chain with
    /// [`handle_chain`](Self::handle_chain).
    fn queue_ready(&mut self, ctx: &mut Context<'_>, index: usize) {
        ctx.drain_queue(index, |mem, chain, _| {
            Served::Used(self.handle_chain(mem, index, chain))
        });
    }

    /// Serves one chain popped from queue `queue_index` by the default `queue_ready` and returns
    /// the used length: the bytes written into the chain's device-writable buffers.
    fn handle_chain(
        &mut self,
        _mem: &GuestMemory,
        queue_index: usize,
        _chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        warn_rate_limited!("virtio queue {queue_index}: the device serves no chains there");
        0
    }

    /// A backend fd watched with `token` is ready; `readiness` may hold `HANG_UP` or `ERROR`
    /// even if they were not asked for. A level-triggered fd that stays ready wakes the loop
    /// again: a handler that cannot make progress on it must change or remove its watch.
    fn backend_event(&mut self, _ctx: &mut Context<'_>, _token: u32, _readiness: EventSet) {}

    /// Timer `token` expired.
    fn timer(&mut self, _ctx: &mut Context<'_>, _token: u32) {}

    /// After every batch of events, before the batch's used-ring interrupt: where a device
    /// moves what its backends produced into its queues (vsock's and net's RX).
    fn batch_done(&mut self, _ctx: &mut Context<'_>) {}
}

/// What woke the loop, as stored in an epoll event's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Kill,
    Queue(usize),
    Timer(u32),
    Backend(u32),
}

/// The data of an event withdrawn from the current batch (its source was removed).
const WITHDRAWN: u64 = 0;

impl Source {
    fn data(self) -> u64 {
        let (kind, value) = match self {
            Source::Kill => (1, 0),
            // Queue indices are below the few queues a device has.
            Source::Queue(index) => (2, index as u32),
            Source::Timer(token) => (3, token),
            Source::Backend(token) => (4, token),
        };
        (kind << 32) | u64::from(value)
    }

    fn from_data(data: u64) -> Option<Self> {
        let value = data as u32;
        match data >> 32 {
            1 => Some(Source::Kill),
            2 => Some(Source::Queue(value as usize)),
            3 => Some(Source::Timer(value)),
            4 => Some(Source::Backend(value)),
            _ => None,
        }
    }
}

/// A device's event loop: stopped until [`activate`](Self::activate), then a thread serving the
/// device's queues and backends until [`stop`](Self::stop).
pub(crate) struct EventLoop<H> {
    name: String,
    queue_count: usize,
    running: Option<Running<H>>,
}

struct Running<H> {
    kill: EventFd,
    thread: JoinHandle<H>,
}

impl<H: DeviceHandler> EventLoop<H> {
    /// The loop of a device with `queue_count` queues; its thread will be called `name`.
    pub(crate) fn new(name: String, queue_count: usize) -> Self {
        Self {
            name,
            queue_count,
            running: None,
        }
    }

    /// Changes the number of queues the next activation takes, for a device whose queues
    /// depend on the features the driver acked (the balloon).
    pub(crate) fn set_queue_count(&mut self, queue_count: usize) {
        self.queue_count = queue_count;
    }

    /// The activation every device shares: refuses a second activation and a wrong number of
    /// queues, makes the handler with `make_handler`, lets it [`start`](DeviceHandler::start)
    /// and starts the thread.
    pub(crate) fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
        make_handler: impl FnOnce() -> Result<H, ActivateError>,
    ) -> Result<(), ActivateError> {
        if self.running.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_count {
            return Err(ActivateError::QueueCount {
                expected: self.queue_count,
                got: queues.len(),
            });
        }
        let mut state = LoopState::new(self.name.clone(), mem, interrupt, queues)?;
        let mut handler = make_handler()?;
        state
            .start(&mut handler)
            .map_err(ActivateError::StartBackend)?;
        let kill = state
            .kill
            .try_clone()
            .map_err(ActivateError::CreateKillEvent)?;
        let thread = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                state.run(&mut handler);
                handler
            })
            .map_err(ActivateError::SpawnThread)?;
        self.running = Some(Running { kill, thread });
        Ok(())
    }

    /// Stops the thread, waits for it to end and returns the handler (with its backends);
    /// `None` when the loop was not running or its thread panicked.
    pub(crate) fn stop(&mut self) -> Option<H> {
        let Running { kill, thread } = self.running.take()?;
        if let Err(e) = kill.write(1) {
            // Without the kill the thread cannot be joined; it ends with the process.
            tracing::error!(
                "{}: waking the event loop to stop it failed: {e}",
                self.name
            );
            return None;
        }
        match thread.join() {
            Ok(handler) => Some(handler),
            Err(_) => {
                tracing::error!("{}: the event loop thread panicked", self.name);
                None
            }
        }
    }
}

impl<H> Drop for EventLoop<H> {
    fn drop(&mut self) {
        if let Some(Running { kill, thread }) = self.running.take() {
            if kill.write(1).is_ok() {
                let _ = thread.join();
            }
        }
    }
}

/// Everything the loop's thread owns besides the handler.
struct LoopState {
    name: String,
    epoll: Epoll,
    kill: EventFd,
    queues: Queues,
    timers: HashMap<u32, TimerFd>,
}

impl LoopState {
    fn new(
        name: String,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<Self, ActivateError> {
        let epoll = Epoll::new().map_err(ActivateError::CreateEpoll)?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::CreateKillEvent)?;
        let watch = |fd: RawFd, source: Source| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, source.data()),
            )
        };
        watch(kill.as_raw_fd(), Source::Kill).map_err(ActivateError::WatchKillEvent)?;
        for (index, (_, event)) in queues.iter().enumerate() {
            watch(event.as_raw_fd(), Source::Queue(index))
                .map_err(|source| ActivateError::WatchQueue { index, source })?;
        }
        Ok(Self {
            name,
            epoll,
            kill,
            queues: Queues::new(mem, interrupt, queues),
            timers: HashMap::new(),
        })
    }

    /// A context for a hook; `pending` are the batch's events not delivered yet.
    fn context<'a>(&'a mut self, pending: &'a mut [EpollEvent]) -> Context<'a> {
        Context::new(
            &mut self.queues,
            Registry::new(&self.epoll, &mut self.timers, pending),
        )
    }

    fn start<H: DeviceHandler>(&mut self, handler: &mut H) -> Result<(), Error> {
        handler.start(&mut self.context(&mut []))
    }

    fn run<H: DeviceHandler>(&mut self, handler: &mut H) {
        let mut events = vec![EpollEvent::default(); BATCH];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(
                        "{}: waiting for events failed, the device stops: {e}",
                        self.name
                    );
                    return;
                }
            };
            for i in 0..count {
                let (current, rest) = events[..count].split_at_mut(i + 1);
                if self.dispatch(handler, current[i], rest).is_break() {
                    return;
                }
            }
            handler.batch_done(&mut self.context(&mut []));
            self.queues.signal_if_used(&self.name);
        }
    }

    /// Hands one event to its hook; `rest` are the batch's events after it. Breaks on the kill.
    fn dispatch<H: DeviceHandler>(
        &mut self,
        handler: &mut H,
        event: EpollEvent,
        rest: &mut [EpollEvent],
    ) -> ControlFlow<()> {
        match Source::from_data(event.data()) {
            Some(Source::Kill) => {
                // Consume the kill so that a clone of it is not left readable.
                let _ = self.kill.read();
                return ControlFlow::Break(());
            }
            Some(Source::Queue(index)) => {
                self.queues.consume_notification(index);
                handler.queue_ready(&mut self.context(rest), index);
            }
            Some(Source::Timer(token)) => self.fire_timer(handler, token, rest),
            Some(Source::Backend(token)) => {
                handler.backend_event(&mut self.context(rest), token, event.event_set());
            }
            // Withdrawn earlier in this batch.
            None => {}
        }
        ControlFlow::Continue(())
    }

    /// Calls the timer hook if timer `token` has expired: not if it was restarted since.
    fn fire_timer<H: DeviceHandler>(
        &mut self,
        handler: &mut H,
        token: u32,
        rest: &mut [EpollEvent],
    ) {
        let Some(timer) = self.timers.get_mut(&token) else {
            return;
        };
        match timer.wait() {
            Ok(count) if count > 0 => handler.timer(&mut self.context(rest), token),
            Ok(_) => {}
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => warn_rate_limited!("{}: reading timer {token} failed: {e}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
    use std::time::Duration;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, wait_for, TestQueue, DATA, WRITE};
    use berth_errors::Chain;

    /// Long enough for a loop that should stay quiet to have spun many times if it did not.
    const QUIET: Duration = Duration::from_millis(150);
    const WAIT: Duration = Duration::from_secs(5);

    /// What a probe handler saw, in order.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Data(u32, Vec<u8>),
        HangUp(u32),
        Timer(u32, usize),
        Chain(usize),
    }

    /// A handler whose hooks report to the test; `on_*` say what it does besides.
    struct Probe {
        seen: Sender<Seen>,
        /// Backend sockets, with their tokens, watched when the loop starts.
        sockets: Vec<(u32, UnixStream)>,
        /// Timers started with the loop: (token, first expiry, period).
        timers: Vec<(u32, Duration, Option<Duration>)>,
        /// On a socket's first event, stop watching the other sockets.
        remove_others: bool,
        /// Watch the first socket a second time when the loop starts.
        add_twice: bool,
        fired: usize,
    }

    impl Probe {
        fn new() -> (Self, Receiver<Seen>) {
            let (seen, events) = mpsc::channel();
            let probe = Probe {
                seen,
                sockets: Vec::new(),
                timers: Vec::new(),
                remove_others: false,
                add_twice: false,
                fired: 0,
            };
            (probe, events)
        }

        fn report(&self, seen: Seen) {
            // The test may have stopped listening; nothing to report to then.
            let _ = self.seen.send(seen);
        }
    }

    impl DeviceHandler for Probe {
        fn start(&mut self, ctx: &mut Context<'_>) -> Result<(), Error> {
            for (token, socket) in &self.sockets {
                socket.set_nonblocking(true).unwrap();
                ctx.registry().add(socket.as_fd(), *token, EventSet::IN)?;
            }
            if let Some((token, socket)) = self.sockets.first().filter(|_| self.add_twice) {
                ctx.registry().add(socket.as_fd(), *token, EventSet::IN)?;
            }
            for &(token, first, period) in &self.timers {
                ctx.registry().start_timer(token, first, period)?;
            }
            Ok(())
        }

        fn handle_chain(
            &mut self,
            _mem: &GuestMemory,
            queue_index: usize,
            _chain: DescriptorChain<&GuestMemory>,
        ) -> u32 {
            self.report(Seen::Chain(queue_index));
            0
        }

        fn backend_event(&mut self, ctx: &mut Context<'_>, token: u32, readiness: EventSet) {
            let Some(index) = self.sockets.iter().position(|(t, _)| *t == token) else {
                panic!("an event for token {token}, which is not watched");
            };
            let mut data = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = self.sockets[index].1.read(&mut buf) {
                data.extend_from_slice(&buf[..n]);
            }
            if !data.is_empty() {
                self.report(Seen::Data(token, data));
            }
            if readiness.contains(EventSet::HANG_UP) {
                let (token, socket) = self.sockets.remove(index);
                ctx.registry().remove(socket.as_fd(), token);
                self.report(Seen::HangUp(token));
            } else if std::mem::take(&mut self.remove_others) {
                for (other, socket) in self.sockets.iter().filter(|(t, _)| *t != token) {
                    ctx.registry().remove(socket.as_fd(), *other);
                }
            }
        }

        fn timer(&mut self, ctx: &mut Context<'_>, token: u32) {
            self.fired += 1;
            self.report(Seen::Timer(token, self.fired));
            if self.fired == 1 {
                // Timer 2 was due long after: stopped, it never fires.
                ctx.registry().stop_timer(2);
            }
            if self.fired == 3 {
                // Once more, 10 ms from now, and then never again.
                ctx.registry()
                    .start_timer(token, Duration::from_millis(10), None)
                    .unwrap();
            }
        }
    }

    fn interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()))
    }

    /// Starts `probe` on a loop without queues.
    fn run(probe: Probe) -> EventLoop<Probe> {
        let mut event_loop = EventLoop::new("test-loop".into(), 0);
        event_loop
            .activate(guest_memory(), interrupt(), Vec::new(), || Ok(probe))
            .unwrap();
        event_loop
    }

    fn next(events: &Receiver<Seen>) -> Seen {
        events.recv_timeout(WAIT).expect("an event within 5 s")
    }

    fn assert_quiet(events: &Receiver<Seen>) {
        match events.recv_timeout(QUIET) {
            Err(RecvTimeoutError::Timeout) => {}
            other => panic!("expected no more events, got {other:?}"),
        }
    }

    #[test]
    fn a_backend_socket_that_becomes_readable_reaches_its_hook_and_so_does_a_hang_up() {
        let (mut probe, events) = Probe::new();
        let (ours, mut peer) = UnixStream::pair().unwrap();
        probe.sockets.push((7, ours));
        let mut event_loop = run(probe);
        assert_quiet(&events);

        peer.write_all(b"ping").unwrap();
        assert_eq!(next(&events), Seen::Data(7, b"ping".to_vec()));
        peer.write_all(b"pong").unwrap();
        assert_eq!(next(&events), Seen::Data(7, b"pong".to_vec()));
        // The peer goes away: HANG_UP arrives although only IN was asked for; the hook
        // removes the socket, and the loop does not wake for it again.
        drop(peer);
        assert_eq!(next(&events), Seen::HangUp(7));
        assert_quiet(&events);
        let probe = event_loop.stop().expect("the handler back");
        assert!(probe.sockets.is_empty());
    }

    #[test]
    fn a_backend_removed_while_running_gets_no_more_events_even_from_the_same_batch() {
        let (mut probe, events) = Probe::new();
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, mut b_peer) = UnixStream::pair().unwrap();
        // Both readable before the loop's first wait: their events come in one batch, and the
        // first one handled removes the other's watch.
        a_peer.write_all(b"a").unwrap();
        b_peer.write_all(b"b").unwrap();
        probe.sockets = vec![(1, a), (2, b)];
        probe.remove_others = true;
        let mut event_loop = run(probe);

        let first = next(&events);
        let (kept, removed_peer) = match &first {
            Seen::Data(1, data) if data == b"a" => (1, &mut b_peer),
            Seen::Data(2, data) if data == b"b" => (2, &mut a_peer),
            other => panic!("unexpected {other:?}"),
        };
        // The removed socket stays readable (level-triggered) and gets more data: no event.
        removed_peer.write_all(b"more").unwrap();
        assert_quiet(&events);
        // The kept one is still served.
        let kept_peer = if kept == 1 { &mut a_peer } else { &mut b_peer };
        kept_peer.write_all(b"again").unwrap();
        assert_eq!(next(&events), Seen::Data(kept, b"again".to_vec()));
        assert_quiet(&events);
        event_loop.stop().expect("the handler back");
    }

    #[test]
    fn timers_fire_periodically_restart_and_stop() {
        let (mut probe, events) = Probe::new();
        probe.timers = vec![
            (1, Duration::from_millis(5), Some(Duration::from_millis(5))),
            (2, Duration::from_millis(400), None),
        ];
        let mut event_loop = run(probe);
        // Timer 1 fires every 5 ms; its third expiry restarts it as a one-shot.
        for fired in 1..=4 {
            assert_eq!(next(&events), Seen::Timer(1, fired));
        }
        // The one-shot fired once, and timer 2 was stopped by the first expiry.
        std::thread::sleep(Duration::from_millis(400));
        assert_quiet(&events);
        let probe = event_loop.stop().expect("the handler back");
        assert_eq!(probe.fired, 4);
    }

    #[test]
    fn stop_ends_the_thread_and_hands_the_handler_back_for_the_next_activation() {
        let (probe, events) = Probe::new();
        let mut event_loop = run(probe);
        let probe = event_loop.stop().expect("the handler back");
        assert!(event_loop.stop().is_none(), "stopped already");
        // The loop's thread is gone: only this handler's sender is left.
        drop(probe);
        assert!(matches!(
            events.recv_timeout(WAIT),
            Err(RecvTimeoutError::Disconnected)
        ));
        let (probe, _events) = Probe::new();
        event_loop
            .activate(guest_memory(), interrupt(), Vec::new(), || Ok(probe))
            .unwrap();
        assert!(event_loop.stop().is_some());
    }

    #[test]
    fn activation_checks_come_before_the_handler_is_made() {
        let mut event_loop = EventLoop::<Probe>::new("test-loop".into(), 1);
        let q = TestQueue::new();
        let never = || -> Result<Probe, ActivateError> { panic!("handler made") };
        let err = event_loop
            .activate(q.mem.clone(), q.interrupt.clone(), Vec::new(), never)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ActivateError::QueueCount {
                    expected: 1,
                    got: 0
                }
            ),
            "{err}"
        );
        let queues = vec![q.queue_and_event(false)];
        let (probe, _events) = Probe::new();
        event_loop
            .activate(q.mem.clone(), q.interrupt.clone(), queues, || Ok(probe))
            .unwrap();
        let queues = vec![q.queue_and_event(false)];
        let err = event_loop
            .activate(q.mem.clone(), q.interrupt.clone(), queues, never)
            .unwrap_err();
        assert!(matches!(err, ActivateError::AlreadyActive), "{err}");
    }

    #[test]
    fn a_backend_that_cannot_be_watched_fails_the_activation_and_the_loop_can_start_later() {
        let (mut probe, _events) = Probe::new();
        let (ours, _peer) = UnixStream::pair().unwrap();
        probe.sockets = vec![(1, ours)];
        probe.add_twice = true;
        let mut event_loop = EventLoop::new("test-loop".into(), 0);
        let err = event_loop
            .activate(guest_memory(), interrupt(), Vec::new(), || Ok(probe))
            .unwrap_err();
        assert!(matches!(err, ActivateError::StartBackend(_)), "{err}");
        let message = Chain(&err).to_string();
        assert!(
            message.contains("starting the device's backend") && message.contains("(token 1)"),
            "{message}"
        );
        assert!(event_loop.stop().is_none(), "nothing runs");
        let (probe, _events) = Probe::new();
        event_loop
            .activate(guest_memory(), interrupt(), Vec::new(), || Ok(probe))
            .unwrap();
        assert!(event_loop.stop().is_some());
    }

    #[test]
    fn chains_on_two_queues_in_one_batch_raise_one_interrupt() {
        let mut first = TestQueue::new();
        let mut second = TestQueue::at(first.mem, first.interrupt.clone(), GuestAddress(0x1_0000));
        first.add_chain(&[(DATA, 16, WRITE)]);
        second.add_chain(&[(DATA + 0x100, 16, WRITE)]);
        // Both notified before the loop's first wait: one batch.
        first.notify();
        second.notify();
        let queues = vec![first.queue_and_event(false), second.queue_and_event(false)];
        let (probe, events) = Probe::new();
        let mut event_loop = EventLoop::new("test-loop".into(), 2);
        event_loop
            .activate(first.mem.clone(), first.interrupt.clone(), queues, || {
                Ok(probe)
            })
            .unwrap();
        let mut chains = vec![next(&events), next(&events)];
        chains.sort_by_key(|seen| format!("{seen:?}"));
        assert_eq!(chains, vec![Seen::Chain(0), Seen::Chain(1)]);
        assert_eq!(second.wait_used(1), vec![(0, 0)]);
        // Also waits for (and acknowledges) the used-ring bit of the shared interrupt.
        assert_eq!(first.wait_used(1), vec![(0, 0)]);
        let irq = first.interrupt.irq();
        let mut count = 0;
        wait_for(
            || {
                count = irq.read().unwrap_or(0);
                count > 0
            },
            "the interrupt",
        );
        std::thread::sleep(QUIET);
        assert_eq!(count, 1, "one interrupt for the batch");
        assert!(irq.read().is_err(), "and none after it");
        event_loop.stop().expect("the handler back");
    }
}
