//! What a [`DeviceHandler`](super::DeviceHandler) hook works with: the device's queues (served
//! with notification suppression and one interrupt per batch), and the [`Registry`] of its
//! backend file descriptors and timers.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{Error, Source, WITHDRAWN};
use crate::devices::virtio::Interrupt;
use crate::memory::GuestMemory;

/// What became of a chain handed to a `drain_queue` closure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// Served: the chain goes to the used ring with this many bytes written into it.
    Used(u32),
    /// Not now (the backend has nothing to give, or cannot take more): the chain goes back to
    /// the queue and draining stops until the device drains the queue again.
    Later,
}

/// Where a backend watches the file descriptors it wants to hear about: the event loop's
/// [`Registry`], or a test's own epoll.
pub(crate) trait Backends {
    /// Watches `fd` for `interest`; its events reach `backend_event` with `token`.
    fn add(&mut self, fd: BorrowedFd<'_>, token: u32, interest: EventSet) -> Result<(), Error>;

    /// Changes what `fd`, watched with `token`, is watched for.
    #[allow(
        dead_code,
        reason = "for a net device's write interest; the muxer needs none"
    )]
    fn modify(&mut self, fd: BorrowedFd<'_>, token: u32, interest: EventSet) -> Result<(), Error>;

    /// Stops watching `fd`, and drops the events of `token` not delivered yet. Closing a
    /// watched fd also stops the watch, but events already taken from epoll would still come.
    fn remove(&mut self, fd: BorrowedFd<'_>, token: u32);
}

/// The backend fds and timers of one device's loop, as a hook sees them.
pub(crate) struct Registry<'a> {
    epoll: &'a Epoll,
    timers: &'a mut HashMap<u32, TimerFd>,
    /// The events of the current batch not delivered yet.
    pending: &'a mut [EpollEvent],
}

impl<'a> Registry<'a> {
    pub(super) fn new(
        epoll: &'a Epoll,
        timers: &'a mut HashMap<u32, TimerFd>,
        pending: &'a mut [EpollEvent],
    ) -> Self {
        Self {
            epoll,
            timers,
            pending,
        }
    }

    fn watch(
        &self,
        op: ControlOperation,
        fd: RawFd,
        source: Source,
        interest: EventSet,
    ) -> io::Result<()> {
        self.epoll
            .ctl(op, fd, EpollEvent::new(interest, source.data()))
    }

    /// Drops the undelivered events of `source` from the current batch.
    fn withdraw(&mut self, source: Source) {
        let data = source.data();
        for event in self.pending.iter_mut().filter(|e| e.data() == data) {
            *event = EpollEvent::new(EventSet::empty(), WITHDRAWN);
        }
    }

    /// Arms timer `token` to fire after `first` (at least a nanosecond), then every `period`
    /// if given. Arming a running timer restarts it.
    pub(crate) fn start_timer(
        &mut self,
        token: u32,
        first: Duration,
        period: Option<Duration>,
    ) -> Result<(), Error> {
        if !self.timers.contains_key(&token) {
            let timer = new_timer().map_err(|source| Error::CreateTimer { token, source })?;
            self.watch(
                ControlOperation::Add,
                timer.as_raw_fd(),
                Source::Timer(token),
                EventSet::IN,
            )
            .map_err(|source| Error::CreateTimer { token, source })?;
            self.timers.insert(token, timer);
        }
        // A restarted timer's expiration count is reset: an expiry already in this batch is
        // not one of the new arming.
        self.withdraw(Source::Timer(token));
        let timer = self
            .timers
            .get_mut(&token)
            .expect("the timer was inserted above if it was missing");
        // A zero duration would disarm the timer instead.
        let first = first.max(Duration::from_nanos(1));
        timer.reset(first, period).map_err(|e| Error::ArmTimer {
            token,
            source: e.into(),
        })
    }

    /// Stops timer `token`; an expiry not delivered yet is dropped.
    pub(crate) fn stop_timer(&mut self, token: u32) {
        if let Some(timer) = self.timers.remove(&token) {
            // Closing the timer removes it from the epoll.
            drop(timer);
            self.withdraw(Source::Timer(token));
        }
    }
}

impl Backends for Registry<'_> {
    fn add(&mut self, fd: BorrowedFd<'_>, token: u32, interest: EventSet) -> Result<(), Error> {
        self.watch(
            ControlOperation::Add,
            fd.as_raw_fd(),
            Source::Backend(token),
            interest,
        )
        .map_err(|source| Error::AddBackend {
            fd: fd.as_raw_fd(),
            token,
            source,
        })
    }

    fn modify(&mut self, fd: BorrowedFd<'_>, token: u32, interest: EventSet) -> Result<(), Error> {
        self.watch(
            ControlOperation::Modify,
            fd.as_raw_fd(),
            Source::Backend(token),
            interest,
        )
        .map_err(|source| Error::ModifyBackend {
            fd: fd.as_raw_fd(),
            token,
            source,
        })
    }

    fn remove(&mut self, fd: BorrowedFd<'_>, token: u32) {
        let removed = self.epoll.ctl(
            ControlOperation::Delete,
            fd.as_raw_fd(),
            EpollEvent::default(),
        );
        match removed {
            // ENOENT: it was not watched, or is already removed: what was asked.
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => warn_rate_limited!(
                "removing backend fd {} from the event loop failed: {e}",
                fd.as_raw_fd()
            ),
            _ => {}
        }
        self.withdraw(Source::Backend(token));
    }
}

/// A nonblocking timerfd: a read after a restart returns EAGAIN instead of blocking the loop.
fn new_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(io::Error::from)?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl on a descriptor the TimerFd owns; F_GETFL touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL only changes the descriptor's status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

/// The device's queues, with the eventfds their notifications arrive on.
pub(super) struct Queues {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<(Queue, EventFd)>,
    /// A used-ring interrupt is owed at the end of the batch.
    signal: bool,
}

impl Queues {
    pub(super) fn new(
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Self {
        Self {
            mem,
            interrupt,
            queues,
            signal: false,
        }
    }

    /// Resets queue `index`'s eventfd; nonblocking, so an error only means there was no
    /// notification pending.
    pub(super) fn consume_notification(&self, index: usize) {
        if let Some((_, event)) = self.queues.get(index) {
            let _ = event.read();
        }
    }

    /// Raises the used-ring interrupt if this batch owes one.
    pub(super) fn signal_if_used(&mut self, name: &str) {
        if std::mem::take(&mut self.signal) {
            if let Err(e) = self.interrupt.signal_used_queue() {
                warn_rate_limited!("{name}: raising the interrupt failed: {e}");
            }
        }
    }
}

/// What a [`DeviceHandler`](super::DeviceHandler) hook works with.
pub(crate) struct Context<'a> {
    queues: &'a mut Queues,
    registry: Registry<'a>,
}

impl<'a> Context<'a> {
    pub(super) fn new(queues: &'a mut Queues, registry: Registry<'a>) -> Self {
        Self { queues, registry }
    }

    /// The device's backend fds and timers.
    pub(crate) fn registry(&mut self) -> &mut Registry<'a> {
        &mut self.registry
    }

    /// Queue `index` itself and the guest memory, for a device that must place several chains
    /// in the used ring at once (net's mergeable RX buffers: the driver must see every buffer
    /// of a frame together). `serve` returns its result and whether it owes the driver a
    /// used-ring interrupt, which is raised once at the end of the batch.
    pub(crate) fn with_queue<R>(
        &mut self,
        index: usize,
        serve: impl FnOnce(&GuestMemory, &mut Queue) -> (R, bool),
    ) -> Option<R> {
        let Queues {
            mem,
            queues,
            signal,
            ..
        } = &mut *self.queues;
        let (queue, _) = queues.get_mut(index)?;
        let (result, owes_interrupt) = serve(mem, queue);
        *signal |= owes_interrupt;
        Some(result)
    }

    /// Serves queue `index`'s available chains with `serve` until the queue is empty or `serve`
    /// answers [`Served::Later`], with the driver's notifications off meanwhile; the used-ring
    /// interrupt this owes (per EVENT_IDX) is raised once at the end of the batch.
    pub(crate) fn drain_queue<F>(&mut self, index: usize, mut serve: F)
    where
        F: FnMut(&GuestMemory, DescriptorChain<&GuestMemory>, &mut Registry<'a>) -> Served,
    {
        let Queues {
            mem,
            queues,
            signal,
            ..
        } = &mut *self.queues;
        let mem: &GuestMemory = mem;
        let Some((queue, _)) = queues.get_mut(index) else {
            return;
        };
        let mut used_any = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                warn_rate_limited!("virtio queue {index}: disabling notifications failed: {e}");
                break;
            }
            let mut served = 0usize;
            let mut later = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = match serve(mem, chain, &mut self.registry) {
                    Served::Used(len) => len,
                    Served::Later => {
                        queue.go_to_previous_position();
                        later = true;
                        break;
                    }
                };
                served += 1;
                match queue.add_used(mem, head, len) {
                    Ok(()) => used_any = true,
                    Err(e) => warn_rate_limited!("virtio queue {index}: add_used failed: {e}"),
                }
            }
            match queue.enable_notification(mem) {
                // More chains arrived while notifications were off.
                Ok(true) if served > 0 && !later => continue,
                // Stopped by `serve`; or the avail index moved but no chain could be popped: a
                // broken ring, which pop_descriptor_chain has already logged. Wait for the next
                // notification.
                Ok(_) => break,
                Err(e) => {
                    warn_rate_limited!("virtio queue {index}: enabling notifications failed: {e}");
                    break;
                }
            }
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            *signal = true;
        }
    }
}
