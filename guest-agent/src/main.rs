//! `berth-agent`, the guest's PID 1: mounts the pseudo filesystems, reads its configuration from
//! the kernel command line, sets the host name and loopback, brings up the data disk, prints one
//! readiness line, starts and supervises containerd and dockerd, serves the host on vsock
//! (Docker API, control, shell), then reaps children and turns signals into clean power-offs
//! and reboots.
//!
//! A boot failure prints one `berth-agent: error: ...` line and powers off: PID 1 must never
//! exit or panic, since either panics the kernel.

mod bind_watch;
mod bootcount;
mod cgroups;
mod children;
mod config;
mod console;
mod control;
mod daemons;
mod datadisk;
mod dial;
mod disks;
mod dns;
mod docker_api;
mod events;
mod inet;
mod logfile;
mod mounts;
mod netlink;
mod network;
mod notify;
mod port_proxy;
mod power;
mod pty;
mod readiness;
mod reaper;
mod reclaim;
mod services;
mod shares;
mod shell;
mod signals;
mod splice;
mod supervisor;
mod swarm_ports;
mod vsock;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, OnReady, CMDLINE_PATH};
use crate::power::PowerAction;
use crate::signals::{Action, Signals};
use crate::supervisor::Supervisor;

/// What a successful boot produced.
struct Booted {
    config: Config,
    data: datadisk::Outcome,
}

fn main() {
    // dockerd's userland proxy is this binary under another name; nothing PID-1-ish runs then.
    if let Some(status) = port_proxy::dispatch() {
        std::process::exit(status);
    }
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
    // The uptime: the boot benchmark's "kernel entry → agent start".
    console::say(&format!(
        "starting v{} uptime={:.3}s",
        env!("CARGO_PKG_VERSION"),
        readiness::uptime()
    ));
    power::route_ctrl_alt_del_to_agent();

    let booted = signals
        .context("set up signal handling")
        .and_then(|signals| boot().map(|booted| (signals, booted)));
    let (signals, booted) = match booted {
        Ok(ok) => ok,
        Err(e) => {
            console::error(&format!("{e:#}"));
            power::shutdown(PowerAction::PowerOff, None)
        }
    };

    console::say(&readiness::line(
        readiness::uptime(),
        booted.data.boot_count,
        booted.data.state,
    ));
    let events = Arc::new(events::Bus::new(events::QUEUE_LEN));
    let supervisor = start_engine(booted.config.docker, &events);
    match booted.config.on_ready {
        OnReady::Stay => {
            if let Err(e) = reclaim::spawn(booted.config.idle_reclaim_secs) {
                console::warn(&format!("idle reclaim: {e}"));
            }
            if let Err(e) = bind_watch::spawn(&events) {
                console::warn(&format!("host file events: {}", console::chain(&e)));
            }
            if let (true, Some(net)) = (booted.config.docker, &booted.config.net) {
                if let Err(e) = swarm_ports::spawn(net.address) {
                    console::warn(&format!("swarm ports: {e}"));
                }
            }
            let guest = services::AgentGuest {
                supervisor: supervisor.clone(),
                events,
            };
            if let Err(e) = services::start(Arc::new(guest)) {
                console::error(&format!("vsock services: {}", console::chain(&e)));
            }
            serve(&signals, supervisor.as_deref())
        }
        OnReady::PowerOff => power::shutdown(PowerAction::PowerOff, supervisor.as_deref()),
        OnReady::Reboot => power::shutdown(PowerAction::Reboot, supervisor.as_deref()),
    }
}

/// Starts containerd and dockerd unless `berth.docker=off`. A failure is reported and the
/// guest stays up without them (the shell still works for a look inside).
fn start_engine(docker: bool, events: &Arc<events::Bus>) -> Option<Arc<Supervisor>> {
    if let Err(e) = children::raise_open_files_limit() {
        console::warn(&format!("raise the open-file limit: {e}"));
    }
    if !docker {
        console::say("docker is off (berth.docker=off)");
        return None;
    }
    match Supervisor::start(
        Path::new(daemons::RUN_DIR),
        Path::new(daemons::LOG_DIR),
        events,
    ) {
        Ok(supervisor) => Some(Arc::new(supervisor)),
        Err(e) => {
            console::error(&format!(
                "cannot start containerd and dockerd: {}",
                console::chain(&e)
            ));
            None
        }
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
    let data = datadisk::setup(&config.data)
        .with_context(|| format!("set up {}", datadisk::MOUNT_POINT))?;
    shares::mount_all(&config.shares);
    if let Some(net) = &config.net {
        match network::bring_up(net, &config.hostname) {
            Ok(()) => {
                console::say(&format!(
                    "{} {}/{} via {}, mtu {}",
                    network::GUEST_INTERFACE,
                    net.address,
                    net.prefix_len,
                    net.gateway,
                    net.mtu
                ));
                daemons::set_host_gateway(net.gateway);
            }
            Err(e) => console::warn(&format!("no network: {}", console::chain(&e))),
        }
    }
    Ok(Booted { config, data })
}

/// PID 1's life after the boot: reap children (handing exits to their owners), obey power
/// signals. Never returns.
fn serve(signals: &Signals, supervisor: Option<&Supervisor>) -> ! {
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
            Action::PowerOff => power::shutdown(PowerAction::PowerOff, supervisor),
            Action::Reboot => power::shutdown(PowerAction::Reboot, supervisor),
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
