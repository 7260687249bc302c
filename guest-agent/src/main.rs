//! `berth-agent`, the guest's PID 1: mounts the pseudo filesystems, reads its configuration from
//! the kernel command line, sets the host name and loopback, brings up the data disk, prints one
//! readiness line, then reaps orphans and turns signals into clean power-offs and reboots.
//!
//! A boot failure prints one `berth-agent: error: ...` line and powers off: PID 1 must never
//! exit or panic, since either panics the kernel.

mod bootcount;
mod children;
mod config;
mod console;
mod datadisk;
mod mounts;
mod network;
mod power;
mod readiness;
mod reaper;
mod signals;

use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, OnReady, CMDLINE_PATH};
use crate::power::PowerAction;
use crate::signals::{Action, Signals};

/// What a successful boot produced.
struct Booted {
    config: Config,
    data: datadisk::Outcome,
}

fn main() {
    if std::process::id() != 1 {
        console::error("must run as PID 1 (the guest's /sbin/init); refusing to touch this system");
        std::process::exit(1);
    }
    // Blocked before anything else, so no SIGCHLD or SIGTERM is lost during the boot.
    let signals = Signals::block_and_open();
    std::panic::set_hook(Box::new(|info| {
        console::error(&format!("internal error: {info}"));
        power::emergency_power_off()
    }));
    console::say(concat!("starting v", env!("CARGO_PKG_VERSION")));
    power::route_ctrl_alt_del_to_agent();

    let booted = signals
        .context("set up signal handling")
        .and_then(|signals| boot().map(|booted| (signals, booted)));
    let (signals, booted) = match booted {
        Ok(ok) => ok,
        Err(e) => {
            console::error(&format!("{e:#}"));
            power::shutdown(PowerAction::PowerOff)
        }
    };

    console::say(&readiness::line(
        readiness::uptime(),
        booted.data.boot_count,
        booted.data.state,
    ));
    match booted.config.on_ready {
        OnReady::Stay => serve(&signals),
        OnReady::PowerOff => power::shutdown(PowerAction::PowerOff),
        OnReady::Reboot => power::shutdown(PowerAction::Reboot),
    }
}

/// The init sequence, up to (not including) the readiness line.
fn boot() -> anyhow::Result<Booted> {
    mounts::mount_early().context("mount the early filesystems")?;
    let cmdline =
        std::fs::read_to_string(CMDLINE_PATH).with_context(|| format!("read {CMDLINE_PATH}"))?;
    let parsed = Config::parse(&cmdline);
    for warning in &parsed.warnings {
        console::warn(warning);
    }
    let config = parsed.config;
    network::set_hostname(&config.hostname)?;
    network::loopback_up()?;
    let data = datadisk::setup(config.data_disk.as_deref())
        .with_context(|| format!("set up {}", datadisk::MOUNT_POINT))?;
    Ok(Booted { config, data })
}

/// PID 1's life after the boot: reap children, obey power signals. Never returns.
fn serve(signals: &Signals) -> ! {
    loop {
        let signo = match signals.wait() {
            Ok(signo) => signo,
            Err(e) => {
                console::warn(&format!("{e:#}; polling for exited children from now on"));
                poll_forever()
            }
        };
        match signals::action_for(signo) {
            Action::Reap => drop(reaper::reap(children::dispatch)),
            Action::PowerOff => power::shutdown(PowerAction::PowerOff),
            Action::Reboot => power::shutdown(PowerAction::Reboot),
            Action::Ignore => {}
        }
    }
}

/// Fallback if the signalfd breaks: reap once a second. Power signals stay blocked and pending.
fn poll_forever() -> ! {
    loop {
        reaper::reap(children::dispatch);
        std::thread::sleep(Duration::from_secs(1));
    }
}
