//! A backend's fds on a plain epoll instead of a device event loop: for tests and fuzz targets
//! that drive a backend (the vsock muxer) by hand.

use std::os::fd::{AsRawFd, BorrowedFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::event_loop::{self, Backends};

/// A backend's fds watched on an epoll of the test's own, with the token as the event data, for
/// driving a backend (the vsock muxer) without a device event loop.
pub(crate) struct EpollBackends {
    pub(crate) epoll: Epoll,
}

impl EpollBackends {
    pub(crate) fn new() -> Self {
        Self {
            epoll: Epoll::new().expect("an epoll for the backends"),
        }
    }

    fn ctl(
        &self,
        op: ControlOperation,
        fd: BorrowedFd<'_>,
        token: u32,
        interest: EventSet,
    ) -> std::io::Result<()> {
        let event = EpollEvent::new(interest, u64::from(token));
        self.epoll.ctl(op, fd.as_raw_fd(), event)
    }
}

impl Backends for EpollBackends {
    fn add(
        &mut self,
        fd: BorrowedFd<'_>,
        token: u32,
        interest: EventSet,
    ) -> Result<(), event_loop::Error> {
        self.ctl(ControlOperation::Add, fd, token, interest)
            .map_err(|source| event_loop::Error::AddBackend {
                fd: fd.as_raw_fd(),
                token,
                source,
            })
    }

    fn modify(
        &mut self,
        fd: BorrowedFd<'_>,
        token: u32,
        interest: EventSet,
    ) -> Result<(), event_loop::Error> {
        self.ctl(ControlOperation::Modify, fd, token, interest)
            .map_err(|source| event_loop::Error::ModifyBackend {
                fd: fd.as_raw_fd(),
                token,
                source,
            })
    }

    fn remove(&mut self, fd: BorrowedFd<'_>, token: u32) {
        let _ = self.ctl(ControlOperation::Delete, fd, token, EventSet::empty());
    }
}
