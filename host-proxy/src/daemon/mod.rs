//! The host proxy's life: take the instance lock, serve the Docker socket and the control API
//! for as long as it runs, and drive the VM's state machine (`lifecycle`) from the control
//! API's requests and from SIGTERM/SIGINT (a quit), until a quit.

mod clock;
mod guest;
mod lifecycle;
mod recovery;
mod shared;

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

pub use guest::refresh as refresh_guest;
pub use shared::{Answer, Ask, Shared};

use crate::api::{ApiSocket, Forwarder};
use crate::layout::Layout;
use crate::lock;

/// How long a running instance's lock may be contended (a status probe) before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// How long the answer to a quit has to reach its client before the sockets go.
const QUIT_GRACE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare Berth's home")]
    Layout(#[source] crate::layout::Error),
    #[error("cannot become the Berth instance")]
    Lock(#[source] lock::Error),
    #[error("cannot serve the Docker socket")]
    DockerSocket(#[source] crate::api::Error),
    #[error("cannot serve the control API")]
    ControlSocket(#[source] crate::api::Error),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
}

impl Error {
    /// The lock is held by another instance ("Berth is already running").
    pub fn already_running(&self) -> bool {
        matches!(self, Error::Lock(lock::Error::Held { .. }))
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub layout: Layout,
    /// How long a Docker client waits for the guest before it gets a 503.
    pub connect_timeout: Duration,
    /// How long the guest has to power off when a stop (or SIGTERM) names no timeout.
    pub shutdown_timeout: Duration,
    /// Boot the VM at launch.
    pub start: bool,
}

/// How the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The last stop had to kill the VMM.
    pub killed: bool,
}

impl Outcome {
    /// The host proxy's own exit code: 0, or 1 when the VM had to be killed.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.killed)
    }
}

/// Removes the pid file and what a VM run may leave when the host proxy ends, before the lock
/// is released.
struct RunFiles<'a>(&'a Layout);

impl Drop for RunFiles<'_> {
    fn drop(&mut self) {
        for path in [
            self.0.pid_file(),
            self.0.vsock_socket(),
            self.0.vmm_api_socket(),
        ] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs one instance until it is told to quit.
pub async fn run(config: Config) -> Result<Outcome, Error> {
    let layout = &config.layout;
    layout.create_dirs().map_err(Error::Layout)?;
    let lock = lock::InstanceLock::acquire(layout, LOCK_WAIT).map_err(Error::Lock)?;
    lock.write_pid(layout, std::process::id())
        .map_err(Error::Lock)?;
    let _files = RunFiles(layout);
    // Listen before the VM boots: clients get a clear 503 instead of "no such file".
    let docker = ApiSocket::bind(&layout.docker_socket()).map_err(Error::DockerSocket)?;
    let control = ApiSocket::bind(&layout.control_socket()).map_err(Error::ControlSocket)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;

    let (shared, commands) = Shared::new(
        layout.clone(),
        config.connect_timeout,
        config.shutdown_timeout,
    );
    tracing::info!("serving the Docker API on {}", docker.path().display());
    tracing::info!("serving the control API on {}", control.path().display());
    let forwarder = Arc::new(Forwarder {
        vsock: layout.vsock_socket(),
        connect_timeout: config.connect_timeout,
        mounts: shared.mounts.clone(),
        state: Some({
            let shared = shared.clone();
            Arc::new(move || shared.state())
        }),
    });
    if config.start {
        shared.ask(Ask::Start, None);
    }
    let signals = {
        let shared = shared.clone();
        async move {
            let why = tokio::select! {
                _ = sigterm.recv() => "SIGTERM",
                _ = sigint.recv() => "SIGINT",
            };
            tracing::info!("quitting on {why}");
            shared.ask(Ask::Quit, None);
            std::future::pending::<()>().await;
        }
    };
    let ended = tokio::select! {
        ended = lifecycle::run(shared.clone(), commands) => ended,
        () = docker.serve(forwarder) => unreachable_serve(),
        () = crate::control_api::server::serve(&control, shared.clone()) => unreachable_serve(),
        () = signals => unreachable_serve(),
    };
    drop(docker);
    drop(control);
    shared.close_streams();
    tokio::time::sleep(QUIT_GRACE).await;
    tracing::info!("host proxy exiting");
    Ok(Outcome {
        killed: ended.killed,
    })
}

/// The accept loops and the signal watcher never end; should one, the host proxy quits as if
/// asked.
fn unreachable_serve() -> lifecycle::Ended {
    tracing::error!("a listener ended: the host proxy quits");
    lifecycle::Ended { killed: false }
}
