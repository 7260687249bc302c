//! The host proxy's life: take the instance lock, prepare the data disk, listen on the Docker
//! socket, run the VMM, and stop when it exits or when asked to (SIGTERM, SIGINT).

use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use berth_protocol::{Request, Response};
use tokio::process::Child;
use tokio::signal::unix::{signal, SignalKind};

use crate::api::{ApiSocket, Forwarder};
use crate::layout::Layout;
use crate::settings::VmSettings;
use crate::state::{self, State};
use crate::{control, disk, lock, vmm};

/// How long a running instance's lock may be contended (a status probe) before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// How long the guest agent has to acknowledge a shutdown request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Layout(#[from] crate::layout::Error),
    #[error(transparent)]
    Lock(#[from] lock::Error),
    #[error(transparent)]
    Disk(#[from] disk::Error),
    #[error(transparent)]
    Api(#[from] crate::api::Error),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error("cannot start the VMM {path}: {source}")]
    SpawnVmm {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for the VMM: {0}")]
    WaitVmm(std::io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub layout: Layout,
    pub settings: VmSettings,
    /// How long a Docker client waits for the guest before it gets a 503.
    pub connect_timeout: Duration,
    /// How long the guest has to power off after a stop request before the VMM is killed.
    pub shutdown_timeout: Duration,
}

/// How the run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The VMM exited by itself (the guest powered off, rebooted, panicked, or the VMM failed).
    VmmExited(ExitStatus),
    /// We were asked to stop; `killed` when the guest did not power off in time.
    Stopped { status: ExitStatus, killed: bool },
}

impl Outcome {
    /// The host proxy's own exit code: the VMM's, or 0 for a clean stop.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::VmmExited(status) => status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1),
            Outcome::Stopped { killed: false, .. } => 0,
            Outcome::Stopped { killed: true, .. } => 1,
        }
    }
}

/// Removes the pid and state files when the run ends, before the lock is released, and the
/// vsock socket a killed VMM leaves.
struct RunFiles<'a>(&'a Layout);

impl Drop for RunFiles<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.state_file());
        let _ = std::fs::remove_file(self.0.pid_file());
        let _ = std::fs::remove_file(self.0.vsock_socket());
    }
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

enum Event {
    VmmExited(std::io::Result<ExitStatus>),
    StopRequested(&'static str),
}

/// Runs one instance to its end.
pub async fn run(config: Config) -> Result<Outcome, Error> {
    let layout = &config.layout;
    layout.create_dirs()?;
    let lock = lock::InstanceLock::acquire(layout, LOCK_WAIT)?;
    let pid = std::process::id();
    lock.write_pid(layout, pid)?;
    let _files = RunFiles(layout);

    match disk::ensure(&layout.data_disk(), config.settings.disk_size_gib)? {
        disk::Outcome::Created => tracing::info!(
            "created the {} GiB data disk {}",
            config.settings.disk_size_gib,
            layout.data_disk().display()
        ),
        disk::Outcome::Grown { from_bytes } => tracing::info!(
            "grew the data disk from {} to {} GiB",
            from_bytes / disk::GIB,
            config.settings.disk_size_gib
        ),
        disk::Outcome::Unchanged => {}
    }
    // Listen before the VM boots: clients get a clear 503 instead of "no such file".
    let api = ApiSocket::bind(&layout.docker_socket())?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;

    keep_previous_console(layout);
    let mut child = vmm::spawn(&config.settings, layout).map_err(|source| Error::SpawnVmm {
        path: config.settings.vmm.clone(),
        source,
    })?;
    tracing::info!(
        "started the VMM (pid {}): {} vCPUs, {} MiB, kernel {}",
        child.id().unwrap_or(0),
        config.settings.cpus,
        config.settings.memory_mib,
        config.settings.kernel.display()
    );
    State {
        pid,
        vmm_pid: child.id(),
        started_at: state::now_unix(),
        docker_socket: layout.docker_socket(),
        vsock_socket: layout.vsock_socket(),
        settings: config.settings.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
    .write(&layout.state_file())?;
    tracing::info!("serving the Docker API on {}", api.path().display());

    let forwarder = Arc::new(Forwarder {
        vsock: layout.vsock_socket(),
        connect_timeout: config.connect_timeout,
    });
    let event = tokio::select! {
        () = api.serve(forwarder) => Event::StopRequested("the Docker socket closed"),
        status = child.wait() => Event::VmmExited(status),
        _ = sigterm.recv() => Event::StopRequested("SIGTERM"),
        _ = sigint.recv() => Event::StopRequested("SIGINT"),
    };
    let outcome = match event {
        Event::VmmExited(status) => {
            let status = status.map_err(Error::WaitVmm)?;
            let what = vmm::describe_exit(status);
            if status.success() {
                tracing::info!("VMM exited: {what}");
            } else {
                tracing::warn!("VMM exited: {what} ({status})");
            }
            Outcome::VmmExited(status)
        }
        Event::StopRequested(why) => {
            tracing::info!("stopping on {why}");
            stop_guest(&mut child, &config).await?
        }
    };
    drop(api);
    tracing::info!("host proxy exiting");
    Ok(outcome)
}

/// Asks the guest to power off and waits for the VMM; kills it when the guest does not comply.
async fn stop_guest(child: &mut Child, config: &Config) -> Result<Outcome, Error> {
    let timeout_secs = u32::try_from(config.shutdown_timeout.as_secs().saturating_sub(5))
        .unwrap_or(u32::MAX)
        .max(1);
    let request = Request::Shutdown { timeout_secs };
    let asked =
        match control::request(&config.layout.vsock_socket(), &request, CONTROL_TIMEOUT).await {
            Ok(Response::Ack) => {
                tracing::info!("the guest acknowledged the shutdown request");
                true
            }
            Ok(other) => {
                tracing::warn!("the guest answered the shutdown request with {other:?}");
                false
            }
            Err(e) => {
                tracing::warn!("cannot ask the guest to shut down: {e}");
                false
            }
        };
    if asked {
        if let Ok(status) = tokio::time::timeout(config.shutdown_timeout, child.wait()).await {
            let status = status.map_err(Error::WaitVmm)?;
            tracing::info!("VMM exited: {}", vmm::describe_exit(status));
            return Ok(Outcome::Stopped {
                status,
                killed: false,
            });
        }
        tracing::warn!(
            "the guest did not power off within {:?}: killing the VMM",
            config.shutdown_timeout
        );
    } else {
        tracing::warn!("killing the VMM");
    }
    let _ = child.start_kill();
    let status = child.wait().await.map_err(Error::WaitVmm)?;
    tracing::info!("VMM exited: {}", vmm::describe_exit(status));
    Ok(Outcome::Stopped {
        status,
        killed: true,
    })
}
