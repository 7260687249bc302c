//! Clean shutdown: stop every process, flush and unmount the disks, then power off or reboot.
//! Also the ctrl-alt-del setting and the last-resort power-off for a panicking agent.

use std::time::Duration;

use crate::{console, mounts, reaper};

/// How long processes get between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long SIGKILLed processes get to disappear.
const KILL_GRACE: Duration = Duration::from_secs(2);

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

/// Shuts the guest down cleanly and never returns.
pub fn shutdown(action: PowerAction) -> ! {
    console::say(action.announcement());
    terminate_all();
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
}
