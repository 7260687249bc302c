//! The vCPU threads: each runs its vCPU, routes port and MMIO exits to the buses, and reports
//! why the guest stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::hypervisor::{Vcpu, VmExit};

/// KVM_SYSTEM_EVENT_* kinds.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

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
        // Linux reboots through the keyboard controller or ACPI (`reboot=k`), never by triple
        // fault unless those fail, and it says `reboot:` first: this is a crash.
        VmExit::Shutdown => return Some(ExitReason::Crashed(String::new())),
        VmExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN) => return Some(ExitReason::PowerOff),
        VmExit::SystemEvent(SYSTEM_EVENT_RESET) => return Some(ExitReason::Reset),
        VmExit::SystemEvent(SYSTEM_EVENT_CRASH) => return Some(ExitReason::Panic),
        VmExit::SystemEvent(kind) => tracing::warn!("ignored system event {kind}"),
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
            Err(e) => Some(ExitReason::Error(format!("vCPU {id}: {e}"))),
        };
        if let Some(reason) = stop {
            let reason = match reason {
                ExitReason::Crashed(_) => {
                    let state = format!("vCPU {id}: {}", vcpu.describe_state());
                    tracing::error!("triple fault: {state}");
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
            handle_exit(VmExit::Shutdown, &ctx),
            Some(ExitReason::Crashed(String::new()))
        );
        assert_eq!(
            handle_exit(VmExit::SystemEvent(SYSTEM_EVENT_RESET), &ctx),
            Some(ExitReason::Reset)
        );
        assert_eq!(
            handle_exit(VmExit::SystemEvent(SYSTEM_EVENT_CRASH), &ctx),
            Some(ExitReason::Panic)
        );
        assert_eq!(ExitReason::Crashed(String::new()).exit_code(), 4);
    }
}
