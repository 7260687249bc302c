//! The vCPU threads: each runs its vCPU, routes port and MMIO exits to the buses, and reports
//! why the guest stopped.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use berth_errors::chain;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::hypervisor::{Crash, Vcpu, VmExit};

/// How many requests the VMM does not model are logged, over all vCPUs: the guest can repeat
/// them.
const UNSUPPORTED_LOGGED: u32 = 10;
static UNSUPPORTED_SEEN: AtomicU32 = AtomicU32::new(0);

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: ExitNotifier,
    pub stop: Arc<AtomicBool>,
}

/// The signal that interrupts a vCPU blocked in the guest.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Handles one exit; returns the reason the VM must stop, if it must.
fn handle_exit(exit: VmExit<'_>, ctx: &VcpuContext) -> Option<ExitReason> {
    match exit {
        VmExit::IoIn { port, data } => {
            if !ctx.io_bus.read(u64::from(port), data) {
                // No device: the bus floats high, as on a PC.
                data.fill(0xff);
            }
        }
        VmExit::IoOut { port, data } => {
            if !ctx.io_bus.write(u64::from(port), data) {
                tracing::trace!("write to unowned port {port:#x}");
            }
        }
        VmExit::MmioRead { addr, data } => {
            if !ctx.mmio_bus.read(addr, data) {
                data.fill(0);
            }
        }
        VmExit::MmioWrite { addr, data } => {
            if !ctx.mmio_bus.write(addr, data) {
                tracing::trace!("write to unowned MMIO address {addr:#x}");
            }
        }
        VmExit::Hlt => return Some(ExitReason::Halted),
        VmExit::PowerOff => return Some(ExitReason::PowerOff),
        VmExit::Reset => return Some(ExitReason::Reset),
        // Linux reboots through the keyboard controller or ACPI (`reboot=k`), never by triple
        // fault unless those fail, and it says `reboot:` first: this is a crash.
        VmExit::Crash(Crash::CpuFault) => return Some(ExitReason::Crashed(String::new())),
        VmExit::Crash(Crash::GuestReported) => return Some(ExitReason::Panic),
        VmExit::Unsupported(what) => {
            if UNSUPPORTED_SEEN.fetch_add(1, Ordering::Relaxed) < UNSUPPORTED_LOGGED {
                tracing::warn!("the guest asked for {what}, which the VMM ignores");
            }
        }
        VmExit::Interrupted => {}
        VmExit::Failed(why) => return Some(ExitReason::Error(why)),
    }
    None
}

/// Runs `vcpu` until the VM stops or `ctx.stop` is set.
pub fn run_vcpu(id: u8, mut vcpu: Box<dyn Vcpu>, ctx: VcpuContext) {
    while !ctx.stop.load(Ordering::SeqCst) {
        let stop = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &ctx),
            Err(e) => Some(ExitReason::Error(format!("vCPU {id}: {}", chain(&e)))),
        };
        if let Some(reason) = stop {
            let reason = match reason {
                ExitReason::Crashed(_) => {
                    let state = format!("vCPU {id}: {}", vcpu.describe_state());
                    tracing::error!("the guest crashed on a fault it could not deliver: {state}");
                    ExitReason::Crashed(state)
                }
                other => other,
            };
            tracing::info!("vCPU {id} stops the VM: {reason:?}");
            ctx.exit.notify(reason);
            return;
        }
    }
}

/// Starts vCPU `id` on a thread of its own.
pub fn spawn_vcpu(
    id: u8,
    vcpu: Box<dyn Vcpu>,
    ctx: VcpuContext,
) -> std::io::Result<JoinHandle<()>> {
    // Installing the same no-op handler again is harmless; its default action would kill us.
    register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run_vcpu(id, vcpu, ctx))
}

/// Stops the vCPU threads: sets `stop`, then interrupts each thread until it has returned.
pub fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        // A signal landing just before the thread re-enters the guest is lost, so repeat it.
        while !thread.is_finished() {
            let _ = thread.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Bus;

    #[test]
    fn a_triple_fault_is_a_crash_and_only_asked_resets_are_reboots() {
        let (exit, _rx) = crate::exit::ExitNotifier::new();
        let ctx = VcpuContext {
            io_bus: Arc::new(Bus::new()),
            mmio_bus: Arc::new(Bus::new()),
            exit,
            stop: Arc::new(AtomicBool::new(false)),
        };
        assert_eq!(
            handle_exit(VmExit::Crash(Crash::CpuFault), &ctx),
            Some(ExitReason::Crashed(String::new()))
        );
        assert_eq!(handle_exit(VmExit::Reset, &ctx), Some(ExitReason::Reset));
        assert_eq!(
            handle_exit(VmExit::Crash(Crash::GuestReported), &ctx),
            Some(ExitReason::Panic)
        );
        assert_eq!(
            handle_exit(VmExit::PowerOff, &ctx),
            Some(ExitReason::PowerOff)
        );
        assert_eq!(handle_exit(VmExit::Unsupported("a suspend"), &ctx), None);
        assert_eq!(ExitReason::Crashed(String::new()).exit_code(), 4);
    }

    #[test]
    fn a_failed_run_reports_the_operation_and_its_cause() {
        let e = crate::hypervisor::Error::Call {
            op: "VCPU_RUN",
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        };
        let text = chain(&e);
        assert!(text.starts_with("VCPU_RUN failed: "), "{text}");
        assert!(text.contains("Bad address"), "{text}");
    }
}
