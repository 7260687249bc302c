//! Clean shutdown: stop dockerd (which stops the containers), then containerd, then every other
//! process; flush and unmount the disks, then power off or reboot. Also the ctrl-alt-del
//! setting, the host's shutdown request and the last-resort power-off for a panicking agent.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::supervisor::Supervisor;
use crate::{children, console, daemons, mounts, reaper};

/// How long processes get between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long SIGKILLed processes get to disappear.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// What the rest of the shutdown takes after dockerd, subtracted from the host's timeout.
const AFTER_DOCKERD: u32 = 4;

/// The host's `Shutdown { timeout_secs }`, 0 when the host asked nothing.
static REQUESTED_TIMEOUT: AtomicU32 = AtomicU32::new(0);

/// How the VM ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

impl PowerAction {
    /// The console line announcing it.
    pub fn announcement(self) -> &'static str {
        match self {
            PowerAction::PowerOff => "powering off",
            PowerAction::Reboot => "rebooting",
        }
    }

    fn reboot_cmd(self) -> libc::c_int {
        match self {
            PowerAction::PowerOff => libc::RB_POWER_OFF,
            PowerAction::Reboot => libc::RB_AUTOBOOT,
        }
    }
}

/// Makes ctrl-alt-del send SIGINT to PID 1 instead of rebooting the kernel on the spot.
pub fn route_ctrl_alt_del_to_agent() {
    // SAFETY: reboot(2) with RB_DISABLE_CAD only changes a kernel flag.
    if unsafe { libc::reboot(libc::RB_DISABLE_CAD) } != 0 {
        console::warn(&format!(
            "disable ctrl-alt-del reboot: {}",
            std::io::Error::last_os_error()
        ));
    }
}

/// Asks PID 1's signal loop for a clean power-off (the host's `Shutdown` request), giving the
/// whole shutdown `timeout_secs`. Returns at once; the power-off runs on the main thread.
pub fn request_power_off(timeout_secs: u32) {
    REQUESTED_TIMEOUT.store(timeout_secs, Ordering::SeqCst);
    // SAFETY: kill(2) to our own PID; SIGTERM is blocked in every agent thread, so it is queued
    // and read from the signalfd by the main loop.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

/// How long dockerd gets to stop: its own shutdown-timeout plus margin, or what the host's
/// timeout leaves after the rest of the shutdown.
pub fn dockerd_grace(requested_secs: u32) -> Duration {
    let secs = match requested_secs {
        0 => daemons::SHUTDOWN_TIMEOUT_SECS + 5,
        t => t.saturating_sub(AFTER_DOCKERD).max(1),
    };
    Duration::from_secs(u64::from(secs))
}

/// Shuts the guest down cleanly and never returns.
pub fn shutdown(action: PowerAction, services: Option<&Supervisor>) -> ! {
    console::say(action.announcement());
    if let Some(services) = services {
        let grace = dockerd_grace(REQUESTED_TIMEOUT.load(Ordering::SeqCst));
        // This is the thread that reaps for PID 1, so it reaps while it waits.
        services.stop(grace, || {
            reaper::reap(children::dispatch);
        });
    }
    terminate_all();
    if let Some(services) = services {
        // Every daemon is gone, so their log pumps have drained.
        services.close_logs();
    }
    sync();
    mounts::unmount_for_shutdown();
    sync();
    halt(action)
}

/// Last resort when the agent itself is broken (panic hook): flush and power off without
/// walking the mount table, so PID 1 never exits (that would panic the kernel).
pub fn emergency_power_off() -> ! {
    sync();
    halt(PowerAction::PowerOff)
}

/// SIGTERM to every other process, a grace period, then SIGKILL.
fn terminate_all() {
    for (sig, grace) in [(libc::SIGTERM, TERM_GRACE), (libc::SIGKILL, KILL_GRACE)] {
        // SAFETY: kill(-1) signals every process but PID 1 (us); no memory is involved.
        let rc = unsafe { libc::kill(-1, sig) };
        // ESRCH: there was no other process.
        if rc != 0 || reaper::reap_until_none(grace) {
            return;
        }
    }
    console::warn("some processes survived SIGKILL; unmounting anyway");
}

fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn halt(action: PowerAction) -> ! {
    // SAFETY: reboot(2) with a valid command; on success it does not return.
    unsafe { libc::reboot(action.reboot_cmd()) };
    console::error(&format!(
        "{} failed: {}; halting here",
        action.announcement(),
        std::io::Error::last_os_error()
    ));
    loop {
        // SAFETY: pause(2) just sleeps until a signal; PID 1 must never return or exit.
        unsafe { libc::pause() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_and_commands() {
        assert_eq!(PowerAction::PowerOff.announcement(), "powering off");
        assert_eq!(PowerAction::Reboot.announcement(), "rebooting");
        assert_eq!(PowerAction::PowerOff.reboot_cmd(), libc::RB_POWER_OFF);
        assert_eq!(PowerAction::Reboot.reboot_cmd(), libc::RB_AUTOBOOT);
    }

    #[test]
    fn dockerd_gets_its_shutdown_timeout_or_what_the_host_leaves() {
        assert_eq!(dockerd_grace(0), Duration::from_secs(15));
        assert_eq!(dockerd_grace(25), Duration::from_secs(21));
        assert_eq!(dockerd_grace(2), Duration::from_secs(1));
    }
}
