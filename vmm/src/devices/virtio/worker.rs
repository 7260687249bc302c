//! The worker thread shared by the virtio devices: it waits on the queues' notification eventfds
//! and a kill eventfd, hands each available descriptor chain to the device, fills the used ring
//! and raises one interrupt per batch (honouring EVENT_IDX).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, Interrupt};
use crate::memory::GuestMemory;

/// The epoll token of the kill eventfd; queue eventfds use their queue index.
const KILL_TOKEN: u64 = u64::MAX;

/// What a device does with one descriptor chain.
pub(crate) trait ChainHandler: Send + 'static {
    /// Serves one chain popped from queue `queue_index` and returns the used length: the number
    /// of bytes written into the chain's device-writable buffers. Must not panic on any chain.
    fn handle_chain(
        &mut self,
        mem: &GuestMemory,
        queue_index: usize,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32;
}

/// A running worker thread; dropping it stops the thread.
pub(crate) struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts a thread called `name` that serves `queues` with `handler`.
    pub(crate) fn spawn<H: ChainHandler>(
        name: String,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
        handler: H,
    ) -> Result<Self, ActivateError> {
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::CreateKillEvent)?;
        let epoll = Epoll::new().map_err(ActivateError::CreateEpoll)?;
        let register = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ActivateError::RegisterEvent)
        };
        register(kill.as_raw_fd(), KILL_TOKEN)?;
        for (index, (_, event)) in queues.iter().enumerate() {
            register(event.as_raw_fd(), index as u64)?;
        }
        let worker_kill = kill.try_clone().map_err(ActivateError::CreateKillEvent)?;
        let mut queue_loop = QueueLoop {
            mem,
            interrupt,
            queues,
            handler,
            epoll,
            kill: worker_kill,
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || queue_loop.run())
            .map_err(ActivateError::SpawnWorker)?;
        Ok(Self {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it to end.
    pub(crate) fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.kill.write(1) {
                tracing::error!("waking a virtio worker to stop it failed: {e}");
                return;
            }
            if thread.join().is_err() {
                tracing::error!("a virtio worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct QueueLoop<H> {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<(Queue, EventFd)>,
    handler: H,
    epoll: Epoll,
    kill: EventFd,
}

impl<H: ChainHandler> QueueLoop<H> {
    fn run(&mut self) {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio worker: waiting for events failed, stopping: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                if event.data() == KILL_TOKEN {
                    // Consume the kill so a clone of it is not left readable.
                    let _ = self.kill.read();
                    return;
                }
                self.serve_queue(event.data() as usize);
            }
        }
    }

    /// Drains queue `index` and signals the driver once if it needs it.
    fn serve_queue(&mut self, index: usize) {
        let Some((queue, event)) = self.queues.get_mut(index) else {
            return;
        };
        // Nonblocking: an error only means there was no pending notification.
        let _ = event.read();
        let mem = &self.mem;
        let mut used_any = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                warn_rate_limited!("virtio queue {index}: disabling notifications failed: {e}");
                break;
            }
            let mut popped = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let len = self.handler.handle_chain(mem, index, chain);
                match queue.add_used(mem, head, len) {
                    Ok(()) => used_any = true,
                    Err(e) => warn_rate_limited!("virtio queue {index}: add_used failed: {e}"),
                }
            }
            match queue.enable_notification(mem) {
                // More chains arrived while notifications were off.
                Ok(true) if popped > 0 => continue,
                // The avail index moved but no chain could be popped: a broken ring, which
                // pop_descriptor_chain has already logged. Wait for the next notification.
                Ok(true) => break,
                Ok(false) => break,
                Err(e) => {
                    warn_rate_limited!("virtio queue {index}: enabling notifications failed: {e}");
                    break;
                }
            }
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_used_queue() {
                warn_rate_limited!("virtio queue {index}: raising the interrupt failed: {e}");
            }
        }
    }
}
