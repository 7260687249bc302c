//! Berth's VM from the app's side, through the control API (`host-proxy/API.md`) only: its
//! state and figures for the dashboard, Start / Stop / Restart, and the problems worth a
//! sentence. Starting when no host proxy runs is the `berth` CLI's job (`berth start`), so the
//! app holds no lifecycle logic of its own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_host_proxy::chain;
use berth_host_proxy::control_api::client::{bounded, Client, Error as ClientError};
use berth_host_proxy::control_api::model::{StateChange, Status, StopRequest, VmState};
use berth_host_proxy::ports::ForwardedPort;
use berth_host_proxy::Layout;
use serde::Serialize;

use crate::host;
use crate::state::Shown;

/// The `berth` CLI's output lines kept for a failed start's message.
const START_TAIL_LINES: usize = 6;
/// How long `berth start` may wait for Docker: the window shows the progress meanwhile, and a
/// start that fails (the VM crashed, the host proxy exited) ends it sooner.
const START_TIMEOUT_SECS: &str = "900";

/// Something a problem's button does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Remedy {
    Start,
    Restart,
    OpenLogs,
    Diagnose,
}

/// A problem in plain words, with what to do next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub title: String,
    pub detail: String,
    pub actions: Vec<Remedy>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Used {
    pub used_mib: u64,
    pub total_mib: u64,
}

/// What the dashboard's overview shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overview {
    pub state: Shown,
    pub reason: Option<String>,
    pub since_ms: Option<u64>,
    pub uptime_secs: Option<u64>,
    pub version: Option<String>,
    /// The VMM's CPU use since the last overview, in % of one host core.
    pub cpu_percent: Option<f64>,
    pub guest_memory: Option<Used>,
    pub host_rss: Option<host::Rss>,
    pub disk: Option<Used>,
    pub ports: Vec<ForwardedPort>,
    pub problem: Option<Problem>,
}

pub struct Berth {
    pub layout: Layout,
    client: Client,
    /// The VMM's last CPU sample: (pid, when, CPU time).
    cpu: Mutex<Option<(u32, Instant, Duration)>>,
}

impl Berth {
    pub fn new(layout: Layout) -> Berth {
        Berth {
            client: Client::new(layout.control_socket()),
            layout,
            cpu: Mutex::new(None),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The status, or `None` when no host proxy runs.
    pub async fn status(&self) -> Result<Option<Status>, String> {
        match bounded(self.client.status()).await {
            Ok(status) => Ok(Some(status)),
            Err(ClientError::NotRunning { .. }) => Ok(None),
            Err(e) => Err(chain(&e)),
        }
    }

    /// The overview; `docker_answers` is asked only while the VM runs.
    pub async fn overview<F>(&self, docker_answers: F) -> Overview
    where
        F: std::future::Future<Output = Result<(), String>>,
    {
        let status = match self.status().await {
            Ok(Some(status)) => status,
            Ok(None) => return absent(&self.layout),
            Err(e) => {
                let mut overview = absent(&self.layout);
                overview.problem = Some(Problem {
                    title: "Berth does not answer".into(),
                    detail: format!(
                        "{e}. The host proxy may be stuck: see its log, or run `berth stop` and \
                         start again"
                    ),
                    actions: vec![Remedy::OpenLogs, Remedy::Diagnose],
                });
                return overview;
            }
        };
        let docker = if status.state.state == VmState::Running {
            Some(docker_answers.await)
        } else {
            None
        };
        let cpu_percent = status.vmm_pid.and_then(|pid| self.cpu_percent(pid));
        let stats = status.guest.as_ref().and_then(|g| g.stats.as_ref());
        Overview {
            state: Shown::Vm(status.state.state),
            reason: status.state.reason.clone(),
            since_ms: Some(status.state.since_ms),
            uptime_secs: status.uptime_secs,
            version: Some(status.version.clone()),
            cpu_percent,
            guest_memory: stats.map(|s| Used {
                used_mib: s.mem_total_kib.saturating_sub(s.mem_available_kib) / 1024,
                total_mib: s.mem_total_kib / 1024,
            }),
            host_rss: host::rss(status.pid, status.vmm_pid),
            disk: stats.map(|s| Used {
                used_mib: s.disk_used_kib / 1024,
                total_mib: s.disk_total_kib / 1024,
            }),
            ports: status.ports.clone(),
            problem: problem(&status.state, docker, &self.layout),
        }
    }

    fn cpu_percent(&self, pid: u32) -> Option<f64> {
        let now = (Instant::now(), host::cpu_time(pid)?);
        let mut last = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let percent = match *last {
            Some((last_pid, at, time)) if last_pid == pid && now.0 > at => {
                let busy = now.1.saturating_sub(time).as_secs_f64();
                Some((100.0 * busy / (now.0 - at).as_secs_f64() * 10.0).round() / 10.0)
            }
            _ => None,
        };
        *last = Some((pid, now.0, now.1));
        percent
    }

    /// Starts the VM: through the control API when the host proxy runs, else with `berth
    /// start`, which launches it (and waits until Docker answers).
    pub async fn start(&self) -> Result<(), String> {
        match bounded(self.client.start()).await {
            Ok(_) => Ok(()),
            Err(ClientError::NotRunning { .. }) => berth_start(&self.layout).await,
            Err(e) => Err(chain(&e)),
        }
    }

    pub async fn stop(&self) -> Result<(), String> {
        bounded(self.client.stop(&StopRequest::default()))
            .await
            .map(drop)
            .map_err(|e| chain(&e))
    }

    /// Restarts a VM that runs or crashed; starts one that does not.
    pub async fn restart(&self) -> Result<(), String> {
        match bounded(self.client.restart(&StopRequest::default())).await {
            Ok(_) => Ok(()),
            Err(ClientError::NotRunning { .. }) => berth_start(&self.layout).await,
            Err(e) => Err(chain(&e)),
        }
    }

    /// Stops the VM and ends the host proxy, as `berth stop` does; nothing to do when none runs.
    pub async fn quit(&self) -> Result<(), String> {
        match bounded(self.client.quit(&StopRequest::default())).await {
            Ok(_) | Err(ClientError::NotRunning { .. }) => Ok(()),
            Err(e) => Err(chain(&e)),
        }
    }
}

fn absent(layout: &Layout) -> Overview {
    Overview {
        state: Shown::Absent,
        reason: Some(format!(
            "nothing answers on {}",
            layout.control_socket().display()
        )),
        since_ms: None,
        uptime_secs: None,
        version: None,
        cpu_percent: None,
        guest_memory: None,
        host_rss: None,
        disk: None,
        ports: Vec::new(),
        problem: None,
    }
}

/// The problem a state shows, if any; `docker` is the Docker socket's answer while running.
pub fn problem(
    state: &StateChange,
    docker: Option<Result<(), String>>,
    layout: &Layout,
) -> Option<Problem> {
    let reason = state.reason.clone().unwrap_or_default();
    let console = layout.console_log();
    match state.state {
        VmState::Crashed => Some(Problem {
            title: "Berth's VM crashed".into(),
            detail: format!(
                "{reason}. The guest's console is in {}; Restart starts it again",
                console.display()
            ),
            actions: vec![Remedy::Restart, Remedy::OpenLogs, Remedy::Diagnose],
        }),
        // The host proxy restarts a crashed VM by itself (with backoff): say so, so that nobody
        // clicks Start into the middle of it; the crashed boot's console was kept aside.
        VmState::Starting if reason.starts_with("restarting after a crash") => Some(Problem {
            title: "Berth's VM crashed and is starting again".into(),
            detail: format!(
                "Berth is {reason}; containers with a restart policy come back with it. The \
                 crashed boot's console is in {}.old",
                console.display()
            ),
            actions: vec![Remedy::OpenLogs, Remedy::Diagnose],
        }),
        VmState::Stopped if reason.starts_with("cannot start the VM") => Some(Problem {
            title: "Berth cannot start".into(),
            detail: format!("{reason}. Fix that (Settings, or `berth config`), then Start"),
            actions: vec![Remedy::Start, Remedy::OpenLogs],
        }),
        VmState::Stopped if reason.contains("passt") => Some(Problem {
            title: "The VM's network stopped".into(),
            detail: format!("{reason}. {} says why", layout.passt_log().display()),
            actions: vec![Remedy::Start, Remedy::OpenLogs],
        }),
        VmState::Running => match docker {
            Some(Err(e)) => Some(Problem {
                title: "Docker does not answer".into(),
                detail: format!("{e}. Restart Berth, or see its logs"),
                actions: vec![Remedy::Restart, Remedy::OpenLogs],
            }),
            _ => None,
        },
        _ => None,
    }
}

/// The `berth` CLI: beside this program, else on `PATH`.
pub fn berth_cli() -> Option<PathBuf> {
    berth_host_proxy::config::sibling_executable("berth")
        .or_else(|| berth_host_proxy::config::on_path("berth"))
}

/// Runs the `berth` CLI with `args` for this home and waits for it; `missing` is what to say
/// when there is no CLI to run. Returns the CLI's path and what it printed.
pub async fn run_berth(
    layout: &Layout,
    args: &[&str],
    missing: &str,
) -> Result<(PathBuf, std::process::Output), String> {
    let cli = berth_cli().ok_or(missing)?;
    let output = tokio::process::Command::new(&cli)
        .args(args)
        .env("BERTH_HOME", layout.home())
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
    Ok((cli, output))
}

/// `berth start`, waited for; a failure is its last output lines.
async fn berth_start(layout: &Layout) -> Result<(), String> {
    let (cli, output) = run_berth(
        layout,
        &["start", "--timeout", START_TIMEOUT_SECS],
        "Berth is not running and the `berth` command was not found beside this app or on \
         PATH: install Berth's CLI, or start Berth with `berth start`",
    )
    .await?;
    if output.status.success() {
        return Ok(());
    }
    Err(start_failure(&cli, &output.stdout, &output.stderr))
}

fn start_failure(cli: &Path, stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(START_TAIL_LINES)..].join("\n");
    format!("`{} start` failed:\n{tail}", cli.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(state: VmState, reason: &str) -> StateChange {
        StateChange {
            state,
            reason: Some(reason.into()),
            since_ms: 0,
        }
    }

    #[test]
    fn a_crash_a_failed_start_and_a_silent_docker_are_sentences_with_a_next_step() {
        let layout = Layout::new("/home/u/.berth");
        let crashed = problem(
            &change(
                VmState::Crashed,
                "the guest kernel panicked (see console.log)",
            ),
            None,
            &layout,
        )
        .unwrap();
        assert_eq!(crashed.title, "Berth's VM crashed");
        assert!(
            crashed.detail.contains("/home/u/.berth/logs/console.log"),
            "{}",
            crashed.detail
        );
        assert_eq!(
            crashed.actions,
            [Remedy::Restart, Remedy::OpenLogs, Remedy::Diagnose]
        );

        let kernel = problem(
            &change(
                VmState::Stopped,
                "cannot start the VM: the guest kernel /k/vmlinux (from config) does not exist",
            ),
            None,
            &layout,
        )
        .unwrap();
        assert_eq!(kernel.title, "Berth cannot start");
        assert!(kernel.detail.contains("/k/vmlinux"));

        let docker = problem(
            &change(VmState::Running, "dockerd answers"),
            Some(Err("Docker did not answer on /s within 2 s".into())),
            &layout,
        )
        .unwrap();
        assert_eq!(docker.title, "Docker does not answer");

        assert_eq!(
            problem(
                &change(VmState::Running, "dockerd answers"),
                Some(Ok(())),
                &layout
            ),
            None
        );
        assert_eq!(
            problem(
                &change(VmState::Stopped, "stopped by request"),
                None,
                &layout
            ),
            None
        );
        assert_eq!(
            problem(&change(VmState::Starting, "booting"), None, &layout),
            None
        );

        let restarting = problem(
            &change(
                VmState::Starting,
                "restarting after a crash (the VMM was killed by signal 9), attempt 2 in 2 s",
            ),
            None,
            &layout,
        )
        .unwrap();
        assert_eq!(restarting.title, "Berth's VM crashed and is starting again");
        assert_eq!(
            restarting.detail,
            "Berth is restarting after a crash (the VMM was killed by signal 9), attempt 2 in 2 \
             s; containers with a restart policy come back with it. The crashed boot's console \
             is in /home/u/.berth/logs/console.log.old"
        );
        assert_eq!(restarting.actions, [Remedy::OpenLogs, Remedy::Diagnose]);
    }

    #[test]
    fn a_failed_start_says_the_clis_last_lines() {
        let out = b"Starting Berth: 2 vCPUs\n\nline a\nline b\nline c\nline d\nline e\n";
        let message = start_failure(
            Path::new("/usr/bin/berth"),
            out,
            b"error: the guest kernel /k does not exist\n",
        );
        assert_eq!(
            message,
            "`/usr/bin/berth start` failed:\nline a\nline b\nline c\nline d\nline e\nerror: the guest kernel /k does not exist"
        );
    }
}
