//! The 16550 UART at COM1 (vm-superio): the guest console, copied to a log file and, when
//! asked, to stdout. It also watches the console for a kernel panic.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORTS_LEN: u64 = 8;

const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
/// Longest console line kept for the panic check; longer lines are checked in pieces.
const MAX_LINE: usize = 4096;

/// Raises the UART's interrupt line by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console bytes go: an optional log file and stdout, with the panic check on the way.
pub struct ConsoleSink {
    log: Option<File>,
    stdout: bool,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl ConsoleSink {
    pub fn new(log: Option<File>, stdout: bool, panicked: Arc<AtomicBool>) -> Self {
        Self {
            log,
            stdout,
            line: Vec::new(),
            panicked,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || self.line.len() >= MAX_LINE {
                if self
                    .line
                    .windows(PANIC_MARKER.len())
                    .any(|w| w == PANIC_MARKER)
                {
                    self.panicked.store(true, Ordering::SeqCst);
                }
                self.line.clear();
            }
            if b != b'\n' {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        // A console that cannot be written (disk full, closed stdout) must not stop the guest.
        if let Some(log) = self.log.as_mut() {
            if let Err(e) = log.write_all(buf) {
                tracing::warn!("console log write failed, no longer logging: {e}");
                self.log = None;
            }
        }
        if self.stdout {
            let _ = io::stdout().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.stdout {
            let _ = io::stdout().flush();
        }
        Ok(())
    }
}

pub struct Serial {
    uart: Uart<IrqTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl Serial {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            uart: Uart::new(IrqTrigger(irq), sink),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(offset, value) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_reaches_the_log_and_a_panic_is_noticed() {
        let log = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let panicked = Arc::new(AtomicBool::new(false));
        let sink = ConsoleSink::new(
            Some(log.as_file().try_clone().unwrap()),
            false,
            panicked.clone(),
        );
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(irq, sink);
        for b in b"booting\nKernel panic - not syncing: VFS: Unable to mount root fs\n" {
            serial.write(0, &[*b]);
        }
        assert!(panicked.load(Ordering::SeqCst));
        let text = std::fs::read_to_string(log.as_path()).unwrap();
        assert!(text.starts_with("booting\nKernel panic"), "{text}");
    }

    #[test]
    fn ordinary_output_is_no_panic() {
        let panicked = Arc::new(AtomicBool::new(false));
        let mut sink = ConsoleSink::new(None, false, panicked.clone());
        sink.write_all(b"Kernel panic\nnot syncing\n").unwrap();
        assert!(!panicked.load(Ordering::SeqCst));
    }
}
