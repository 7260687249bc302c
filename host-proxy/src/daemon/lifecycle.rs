//! The state machine that owns the VMM and the VM's network: starts passt and then the VMM
//! from the config file as it is at that moment, notices when the VMM exits unasked (`crashed`,
//! with the reason; then starts it again after a pause, `recovery.rs`) or passt keeps exiting,
//! and runs the one stop sequence: ask the guest to power off, then the VMM's orderly stop on
//! its API socket, then SIGKILL; passt goes after the VMM.

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_protocol::{Request, Response};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::guest;
use super::recovery::{Decision, Recovery};
use super::shared::{Command, Shared};
use crate::chain;
use crate::config::{self, Config};
use crate::control;
use crate::control_api::model::VmState;
use crate::layout::Layout;
use crate::settings::VmSettings;
use crate::{disk, passt, ports, vmm};

/// How long the guest agent has to acknowledge the shutdown request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the VMM's API socket has to acknowledge a stop.
const VMM_API_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the VMM has to exit after it acknowledged a stop (it flushes the disks first).
const VMM_STOP_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the settings")]
    Config(#[source] config::Error),
    #[error("cannot prepare the data disk")]
    Disk(#[source] disk::Error),
    #[error("cannot start the VM's network")]
    Net(#[source] passt::Error),
    #[error("cannot start the VMM")]
    Vmm(#[source] vmm::Error),
    #[error("cannot listen for published ports")]
    Ports(#[source] ports::Error),
}

/// The running VM of one run.
struct Vm {
    child: Child,
    run: u64,
    started: Instant,
    guest: JoinHandle<()>,
    /// passt, the VM's network.
    net: passt::Supervisor,
    /// The host ends of the ports the guest publishes.
    ports: ports::Forwarder,
}

/// How the state machine ended (on a quit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    /// The last stop had to kill the VMM.
    pub killed: bool,
}

enum Next {
    Exited(std::io::Result<ExitStatus>),
    /// passt keeps exiting: the VM stops.
    NetFailed,
    /// The pause after a crash is over.
    Recover,
    Command(Option<Command>),
}

/// Works off the commands until a quit; the VM is stopped before it returns.
pub async fn run(shared: Arc<Shared>, mut commands: mpsc::UnboundedReceiver<Command>) -> Ended {
    let mut vm: Option<Vm> = None;
    let mut killed = false;
    let mut recovery = Recovery::default();
    // What the last crash was, for the state while the VM starts again.
    let mut last_crash = String::new();
    loop {
        let next = match (vm.as_mut(), recovery.due()) {
            (Some(running), _) => tokio::select! {
                status = running.child.wait() => Next::Exited(status),
                () = running.net.failed() => Next::NetFailed,
                command = commands.recv() => Next::Command(command),
            },
            (None, Some(due)) => tokio::select! {
                () = tokio::time::sleep_until(due.into()) => Next::Recover,
                command = commands.recv() => Next::Command(command),
            },
            (None, None) => Next::Command(commands.recv().await),
        };
        let command = match next {
            Next::Exited(status) => {
                if let Some(done) = vm.take() {
                    let ran_for = done.started.elapsed();
                    if let Some(crash) = exited_unasked(&shared, done, status).await {
                        after_crash(&shared, &mut recovery, &crash, ran_for);
                        last_crash = crash;
                    }
                }
                continue;
            }
            Next::Recover => {
                if let Some(attempt) = recovery.take() {
                    let reason =
                        format!("restarting after a crash ({last_crash}), attempt {attempt}");
                    shared.set_state(VmState::Starting, reason);
                    vm = start(&shared).await;
                }
                continue;
            }
            Next::NetFailed => {
                shared.set_state(VmState::Stopping, passt::GAVE_UP);
                let timeout = shared.default_stop_timeout;
                killed = stop_because(&shared, vm.take(), timeout, Some(passt::GAVE_UP)).await;
                continue;
            }
            // Every sender is gone: nobody can ask for anything any more.
            Next::Command(None) => Command::Quit {
                timeout: shared.default_stop_timeout,
            },
            Next::Command(Some(command)) => command,
        };
        // What a user asks for ends a series of restarts after crashes.
        recovery.reset();
        match command {
            Command::Start => {
                if vm.is_none() {
                    vm = start(&shared).await;
                }
            }
            Command::Stop { timeout } => killed = stop(&shared, vm.take(), timeout).await,
            Command::Restart { timeout } => {
                killed = stop(&shared, vm.take(), timeout).await;
                shared.set_state(VmState::Starting, "restarting");
                vm = start(&shared).await;
            }
            Command::Quit { timeout } => {
                if vm.is_some() {
                    shared.set_state(VmState::Stopping, "the host proxy is quitting");
                    killed = stop(&shared, vm.take(), timeout).await;
                }
                return Ended { killed };
            }
        }
    }
}

/// Boots a VM with the settings of the config file as it is now; on failure the state says
/// why and no VM runs.
async fn start(shared: &Arc<Shared>) -> Option<Vm> {
    let run = shared.begin_run();
    match spawn(shared, run).await {
        Ok((child, settings, net, ports)) => {
            let pid = child.id();
            tracing::info!(
                "started the VMM (pid {}): {} vCPUs, {} MiB, kernel {}",
                pid.unwrap_or(0),
                settings.cpus,
                settings.memory_mib,
                settings.kernel.display()
            );
            shared.vmm_started(run, pid, settings);
            let guest = tokio::spawn(guest::watch(shared.clone(), run));
            Some(Vm {
                child,
                run,
                started: Instant::now(),
                guest,
                net,
                ports,
            })
        }
        Err(e) => {
            let reason = format!("cannot start the VM: {}", chain(&e));
            tracing::error!("{reason}");
            shared.set_state(VmState::Stopped, reason);
            None
        }
    }
}

/// What `spawn` starts: the VMM, with the settings it got, and the network around it.
type Started = (Child, VmSettings, passt::Supervisor, ports::Forwarder);

/// passt and the published-port listener, then the VMM: the VMM's net device connects to
/// passt's socket as it starts, and the guest's port proxies reach the listener from the first
/// container on.
async fn spawn(shared: &Arc<Shared>, run: u64) -> Result<Started, StartError> {
    let layout = &shared.layout;
    let path = config::path().map_err(StartError::Config)?;
    let settings = Config::load(&path)
        .and_then(|config| config.vm_settings())
        .map_err(StartError::Config)?;
    let passt = passt::Passt::new(layout).map_err(StartError::Net)?;
    prepare_disk(layout, settings.disk_size_gib)?;
    let config = vmm::vm_config(&settings, layout);
    let config_path = vmm::write_config(&config, layout).map_err(StartError::Vmm)?;
    let forwarder = start_ports(shared, run, settings.ports_bind_address)?;
    let net = match passt.start().await {
        Ok(net) => net,
        Err(e) => {
            forwarder.stop().await;
            return Err(StartError::Net(e));
        }
    };
    keep_previous_console(layout);
    match vmm::spawn(&settings.vmm, &config_path) {
        Ok(child) => Ok((child, settings, net, forwarder)),
        Err(e) => {
            net.stop().await;
            forwarder.stop().await;
            Err(StartError::Vmm(e))
        }
    }
}

/// The published-port listener of run `run`; its events reach the status and the event streams
/// until it stops.
fn start_ports(
    shared: &Arc<Shared>,
    run: u64,
    bind_address: Option<std::net::IpAddr>,
) -> Result<ports::Forwarder, StartError> {
    let (events, mut received) = mpsc::unbounded_channel();
    let forwarder = ports::Forwarder::start(&shared.layout.vsock_socket(), bind_address, events)
        .map_err(StartError::Ports)?;
    let shared = shared.clone();
    tokio::spawn(async move {
        while let Some(event) = received.recv().await {
            shared.port_event(run, event);
        }
    });
    Ok(forwarder)
}

fn prepare_disk(layout: &Layout, size_gib: u64) -> Result<(), StartError> {
    match disk::ensure(&layout.data_disk(), size_gib).map_err(StartError::Disk)? {
        disk::Outcome::Created => tracing::info!(
            "created the {size_gib} GiB data disk {}",
            layout.data_disk().display()
        ),
        disk::Outcome::Grown { from_bytes } => tracing::info!(
            "grew the data disk from {} to {size_gib} GiB",
            from_bytes / disk::GIB
        ),
        disk::Outcome::Unchanged => {}
    }
    Ok(())
}

/// Keeps the previous boot's console as `console.log.old` (the VMM truncates `console.log`).
fn keep_previous_console(layout: &Layout) {
    let console = layout.console_log();
    if console.exists() {
        let mut old = console.clone().into_os_string();
        old.push(".old");
        if let Err(e) = std::fs::rename(&console, &old) {
            tracing::warn!("cannot keep the previous console log: {e}");
        }
    }
}

/// The VM crashed, for `crash`: it starts again after a pause (the state says so, with the
/// attempt), or stays down after too many crashes.
fn after_crash(shared: &Shared, recovery: &mut Recovery, crash: &str, ran_for: Duration) {
    match recovery.crashed(Instant::now(), ran_for) {
        Decision::Restart { attempt, pause } => {
            let reason = format!(
                "restarting after a crash ({crash}), attempt {attempt} in {} s",
                pause.as_secs()
            );
            tracing::warn!("{reason}");
            shared.set_state(VmState::Starting, reason);
        }
        Decision::GiveUp { crashes } => {
            let reason = format!(
                "{crash}; stayed down after {crashes} crashes in {} minutes (berth start tries again)",
                super::recovery::WINDOW.as_secs() / 60
            );
            tracing::error!("{reason}");
            shared.set_state(VmState::Crashed, reason);
        }
    }
}

/// The VMM exited while nobody asked it to (or while a stop was on its way); returns what
/// crashed it, when it crashed, leaving the state to `after_crash`.
async fn exited_unasked(
    shared: &Shared,
    vm: Vm,
    status: std::io::Result<ExitStatus>,
) -> Option<String> {
    let (state, reason) = match status {
        Ok(status) => {
            let exit = vmm::Exit::from_status(status);
            let what = exit.describe();
            let asked = shared.state().state == VmState::Stopping;
            if exit.is_crash() && !asked {
                tracing::warn!("VMM exited: {what} ({status})");
                (VmState::Crashed, what)
            } else {
                tracing::info!("VMM exited: {what}");
                (VmState::Stopped, what)
            }
        }
        Err(e) => {
            tracing::error!("cannot wait for the VMM: {e}");
            (VmState::Crashed, "the VMM could not be watched".into())
        }
    };
    finish(shared, vm).await;
    if state == VmState::Crashed {
        // after_crash says what comes next: no `crashed` in between for a restart to follow.
        return Some(reason);
    }
    shared.set_state(state, reason);
    None
}

/// What a run leaves behind goes: the guest task, passt, the sockets.
async fn finish(shared: &Shared, vm: Vm) {
    vm.guest.abort();
    vm.ports.stop().await;
    vm.net.stop().await;
    let layout = &shared.layout;
    for path in [
        layout.vsock_socket(),
        layout.vmm_api_socket(),
        layout.passt_socket(),
    ] {
        let _ = std::fs::remove_file(path);
    }
    shared.vmm_gone();
    tracing::debug!("run {} finished", vm.run);
}

/// The stop sequence; `true` when the VMM had to be killed. The state is `stopping` already.
async fn stop(shared: &Shared, vm: Option<Vm>, timeout: Duration) -> bool {
    stop_because(shared, vm, timeout, None).await
}

/// The stop sequence, ending in `stopped` for `why` (else for how the VMM exited).
async fn stop_because(
    shared: &Shared,
    vm: Option<Vm>,
    timeout: Duration,
    why: Option<&str>,
) -> bool {
    let Some(mut vm) = vm else {
        if shared.state().state == VmState::Stopping {
            shared.set_state(VmState::Stopped, "stopped by request");
        }
        return false;
    };
    let started = Instant::now();
    let (status, killed) = stop_vmm(shared, &mut vm.child, timeout).await;
    let reason = match status {
        Some(status) => {
            let what = vmm::Exit::from_status(status).describe();
            tracing::info!(
                "VMM exited: {what} (stopped in {:.1} s)",
                started.elapsed().as_secs_f64()
            );
            what
        }
        None => "the VMM could not be watched".into(),
    };
    finish(shared, vm).await;
    shared.set_state(VmState::Stopped, why.map_or(reason, String::from));
    killed
}

async fn stop_vmm(
    shared: &Shared,
    child: &mut Child,
    timeout: Duration,
) -> (Option<ExitStatus>, bool) {
    if ask_guest(shared, timeout).await {
        if let Some(status) = wait(child, timeout).await {
            return (Some(status), false);
        }
        tracing::warn!("the guest did not power off within {timeout:?}");
    }
    tracing::info!("asking the VMM to stop");
    match vmm::api_stop(&shared.layout.vmm_api_socket(), VMM_API_TIMEOUT).await {
        Ok(()) => {
            if let Some(status) = wait(child, VMM_STOP_WAIT).await {
                return (Some(status), false);
            }
            tracing::warn!("the VMM did not stop within {VMM_STOP_WAIT:?}");
        }
        Err(e) => tracing::warn!("cannot stop the VMM through its API socket: {}", chain(&e)),
    }
    tracing::warn!("killing the VMM");
    let _ = child.start_kill();
    (child.wait().await.ok(), true)
}

/// Asks the guest agent to power off; `true` when it acknowledged.
async fn ask_guest(shared: &Shared, timeout: Duration) -> bool {
    let timeout_secs = u32::try_from(timeout.as_secs().saturating_sub(5))
        .unwrap_or(u32::MAX)
        .max(1);
    let request = Request::Shutdown { timeout_secs };
    match control::request(&shared.vsock(), &request, CONTROL_TIMEOUT).await {
        Ok(Response::Ack) => {
            tracing::info!("the guest acknowledged the shutdown request");
            true
        }
        Ok(other) => {
            tracing::warn!(
                "the guest answered the shutdown request with {}",
                control::describe(&other)
            );
            false
        }
        Err(e) => {
            tracing::warn!("cannot ask the guest to shut down: {}", chain(&e));
            false
        }
    }
}

/// The VMM's exit status, if it exits within `timeout`.
async fn wait(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        Ok(Err(e)) => {
            tracing::error!("cannot wait for the VMM: {e}");
            None
        }
        Err(_) => None,
    }
}
