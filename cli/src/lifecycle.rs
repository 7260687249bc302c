//! `berth start`, `stop` and `restart`: launching the host proxy detached when none runs, asking
//! it through its control API to boot, restart or stop the VM, and following its events until
//! the VM is running (or says why not). The stop sequence itself is the host proxy's.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_host_proxy::config::{self, Config};
use berth_host_proxy::control_api::client::{Client, Events};
use berth_host_proxy::control_api::model::{Accepted, ApiEvent, StopRequest, VmState};
use berth_host_proxy::lock::{self, Status};
use berth_host_proxy::{disk, Layout};
use rustix::process::{kill_process, Pid, Signal};

use crate::docker::{self, Ping};
use crate::host_proxy::{self, bounded, when_up, Unreachable, SOCKET_WAIT};

/// A host proxy that does not answer its control socket gets this long after SIGTERM.
const SIGTERM_GRACE: Duration = Duration::from_secs(25);
/// What the host proxy's stop sequence may take beyond the guest's own timeout (the VMM's
/// orderly stop, then a kill) before `berth stop` falls back to signals.
const QUIT_GRACE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(250);
/// A host proxy log larger than this is moved to `host-proxy.log.old` at start.
const MAX_LOG: u64 = 8 << 20;

#[derive(clap::Args, Debug)]
pub struct StartArgs {
    /// Seconds to wait for Docker to answer.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub timeout: u64,
    /// Do not create or update the `berth` docker context.
    #[arg(long)]
    pub no_docker_context: bool,
}

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// Seconds the guest has to shut down before it is stopped by force.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub timeout: u64,
}

/// `berth start`.
pub fn start(args: &StartArgs) -> anyhow::Result<()> {
    bring_up(args, None)
}

/// `berth restart`: the host proxy's restart when the VM runs, else a start.
pub fn restart(stop_timeout: u64, args: &StartArgs) -> anyhow::Result<()> {
    bring_up(
        args,
        Some(StopRequest {
            timeout_secs: Some(stop_timeout),
        }),
    )
}

/// What the host proxy is asked for once it answers.
#[derive(Clone, Debug)]
enum Ask {
    Start,
    Restart(StopRequest),
}

fn bring_up(args: &StartArgs, restart: Option<StopRequest>) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    let config = Config::load(&config::path()?)?;
    let settings = config.vm_settings()?;
    check_disk_not_shrunk(settings.disk_size_gib)?;
    let runtime = host_proxy::runtime()?;
    let client = host_proxy::client(&layout);
    let mut stop_wait = Duration::ZERO;
    let (mut launched, marks, ask) = match lock::probe(&layout)? {
        Status::Running { pid } => {
            let status = runtime
                .block_on(when_up(|| client.status(), None, SOCKET_WAIT))
                .map_err(Unreachable::into_error)
                .with_context(|| format!("cannot reach the host proxy{}", pid_suffix(pid)))?;
            let running = status.state.state == VmState::Running;
            let ask = match restart {
                Some(request) if running => {
                    stop_wait = Duration::from_secs(request.timeout_secs.unwrap_or(30));
                    Ask::Restart(request)
                }
                None if running => {
                    println!("Berth is already running{}", pid_suffix(Some(status.pid)));
                    println!("Docker socket: unix://{}", status.sockets.docker.display());
                    return Ok(());
                }
                _ => Ask::Start,
            };
            // The host proxy writes its log: it is not moved aside under it.
            (None, LogMarks::take(&layout, false), ask)
        }
        Status::Stopped => {
            layout.create_dirs()?;
            let marks = LogMarks::take(&layout, true);
            (Some(host_proxy::launch(&layout)?), marks, Ask::Start)
        }
    };
    println!(
        "Starting Berth: {} vCPUs, {} MiB memory, {} GiB disk",
        settings.cpus, settings.memory_mib, settings.disk_size_gib
    );
    let started = Instant::now();
    let deadline = started + stop_wait + Duration::from_secs(args.timeout);
    let socket = layout.docker_socket();
    let outcome = runtime.block_on(async {
        let outcome = follow(&client, launched.as_mut(), ask, deadline).await?;
        if outcome != Boot::Running {
            return Ok(outcome);
        }
        Ok::<_, anyhow::Error>(docker_answers(&socket, deadline).await)
    })?;
    match outcome {
        Boot::Running => {}
        Boot::Crashed(reason) => {
            marks.print_tails(&layout);
            bail!("Berth stopped during start ({reason}): see the log lines above");
        }
        Boot::Exited(status) => {
            marks.print_tails(&layout);
            bail!("Berth stopped during start (host proxy {status}): see the log lines above");
        }
        Boot::TimedOut(last) => {
            marks.print_tails(&layout);
            bail!(
                "Docker did not answer within {} s ({last}); Berth is still starting: see \
                 `berth logs`, or `berth stop`",
                args.timeout
            );
        }
    }
    println!(
        "Berth is running (docker ready in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("Docker socket: unix://{}", socket.display());
    if !args.no_docker_context {
        if let Some(message) = docker::ensure_context(&socket) {
            println!("{message}");
        }
    }
    Ok(())
}

/// How a start ended.
#[derive(Debug, PartialEq, Eq)]
enum Boot {
    Running,
    /// The VM crashed or was stopped; the host proxy's reason.
    Crashed(String),
    /// The host proxy itself went; its exit status when we launched it.
    Exited(String),
    /// Still not running at the deadline; the last thing known.
    TimedOut(String),
}

/// Waits for the control API, subscribes to its events, asks for `ask` and follows the events
/// until the VM runs, fails, or `deadline` passes.
async fn follow(
    client: &Client,
    mut launched: Option<&mut Child>,
    ask: Ask,
    deadline: Instant,
) -> anyhow::Result<Boot> {
    let mut events = match when_up(|| client.events(), launched.as_deref_mut(), SOCKET_WAIT).await {
        Ok(events) => events,
        Err(Unreachable::Exited(status)) => return Ok(Boot::Exited(status)),
        Err(e) => return Err(e.into_error()).context("cannot follow the host proxy's events"),
    };
    // The first line is the state before our request: a crash of an earlier run is not ours.
    bounded("reading the host proxy's events", events.next()).await?;
    let accepted: Accepted = match &ask {
        Ask::Start => bounded("cannot start the VM", client.start()).await?,
        Ask::Restart(request) => bounded("cannot restart the VM", client.restart(request)).await?,
    };
    let mut watch = Watch {
        last: accepted.state.reason.clone().unwrap_or_default(),
        starting: accepted.state.state == VmState::Starting,
    };
    if accepted.state.state == VmState::Running {
        return Ok(Boot::Running);
    }
    loop {
        if let Some(child) = launched.as_deref_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(Boot::Exited(status.to_string()));
            }
        }
        if Instant::now() >= deadline {
            return Ok(Boot::TimedOut(watch.last));
        }
        if let Some(outcome) = watch.next(&mut events).await? {
            return Ok(outcome);
        }
    }
}

/// What the event stream said so far.
struct Watch {
    /// The last reason given, for a timeout's message.
    last: String,
    /// The VM has been starting since our request (a `stopped` after that is a failure).
    starting: bool,
}

impl Watch {
    /// Reads the events for up to `POLL`; an outcome when they decide one.
    async fn next(&mut self, events: &mut Events) -> anyhow::Result<Option<Boot>> {
        let event = match tokio::time::timeout(POLL, events.next()).await {
            Err(_) => return Ok(None),
            Ok(event) => event.context("cannot follow the host proxy's events")?,
        };
        let Some(event) = event else {
            return Ok(Some(Boot::Exited("closed its control socket".into())));
        };
        let ApiEvent::State(change) = event else {
            return Ok(None);
        };
        let reason = change.reason.unwrap_or_else(|| change.state.to_string());
        match change.state {
            VmState::Running => return Ok(Some(Boot::Running)),
            VmState::Crashed => return Ok(Some(Boot::Crashed(reason))),
            VmState::Stopped if self.starting => return Ok(Some(Boot::Crashed(reason))),
            VmState::Starting => self.starting = true,
            VmState::Stopped | VmState::Stopping => {}
        }
        self.last = reason;
        Ok(None)
    }
}

/// The Docker socket answers `/_ping` from here, as the user's `docker` will use it.
async fn docker_answers(socket: &Path, deadline: Instant) -> Boot {
    loop {
        let last = match docker::ping(socket, Duration::from_secs(10)).await {
            Ok(Ping::Ready) => return Boot::Running,
            Ok(Ping::NotReady(message)) => message,
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Boot::TimedOut(last);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `berth stop`: the host proxy's `quit` (its stop sequence, then it exits); signals only
/// when it does not answer at all.
pub fn stop(args: &StopArgs) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    let Status::Running { pid } = lock::probe(&layout)? else {
        println!("Berth is not running");
        return Ok(());
    };
    let started = Instant::now();
    let client = host_proxy::client(&layout);
    let request = StopRequest {
        timeout_secs: Some(args.timeout),
    };
    let asked =
        host_proxy::runtime()?.block_on(when_up(|| client.quit(&request), None, SOCKET_WAIT));
    match asked {
        Ok(_) => {
            let wait = Duration::from_secs(args.timeout) + QUIT_GRACE;
            if wait_stopped(&layout, wait)? {
                println!("Berth stopped ({:.1} s)", started.elapsed().as_secs_f64());
                return Ok(());
            }
            println!(
                "The host proxy did not exit within {} s: stopping it",
                wait.as_secs()
            );
        }
        Err(Unreachable::Refused(e)) if e.api_code().is_some() => {
            return Err(e).context("cannot stop Berth");
        }
        Err(e) => println!(
            "The host proxy does not answer ({:#}): stopping it",
            e.into_error()
        ),
    }
    let pid = pid
        .or_else(|| lock::read_pid(&layout.pid_file()))
        .context("Berth is starting (it has no pid file yet): try again in a moment")?;
    signal(pid, Signal::TERM)?;
    if wait_stopped(&layout, SIGTERM_GRACE)? {
        println!("Berth stopped ({:.1} s)", started.elapsed().as_secs_f64());
        return Ok(());
    }
    println!("The host proxy did not exit: killing it");
    signal(pid, Signal::KILL)?;
    if wait_stopped(&layout, Duration::from_secs(5))? {
        println!("Berth killed ({:.1} s)", started.elapsed().as_secs_f64());
        return Ok(());
    }
    bail!("Berth did not stop (host proxy pid {pid})")
}

/// Refuses a disk size below the existing data disk's.
pub fn check_disk_not_shrunk(size_gib: u64) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    let path = layout.data_disk();
    if let Ok(meta) = std::fs::metadata(&path) {
        let current = meta.len().div_ceil(disk::GIB);
        if current > size_gib {
            bail!(
                "the data disk {} is {current} GiB: shrinking it to {size_gib} GiB is refused \
                 (delete it to start over with an empty disk)",
                path.display()
            );
        }
    }
    Ok(())
}

fn pid_suffix(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

fn signal(pid: u32, sig: Signal) -> anyhow::Result<()> {
    let target = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .with_context(|| format!("invalid pid {pid}"))?;
    match kill_process(target, sig) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Ok(()), // already gone
        Err(e) => Err(std::io::Error::from(e)).with_context(|| format!("cannot signal pid {pid}")),
    }
}

fn wait_stopped(layout: &Layout, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if lock::probe(layout)? == Status::Stopped {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where the logs ended before this start, so that a failure shows only this run's lines.
struct LogMarks {
    host_proxy: u64,
    console: u64,
}

impl LogMarks {
    /// With `rotate`, also starts a new host proxy log when the current one has grown large.
    fn take(layout: &Layout, rotate: bool) -> Self {
        let log = layout.host_proxy_log();
        let len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if rotate && len > MAX_LOG {
            let mut old = log.clone().into_os_string();
            old.push(".old");
            let _ = std::fs::rename(&log, old);
        }
        LogMarks {
            host_proxy: std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0),
            // The host proxy moves the previous console log aside: all of it is this run's.
            console: 0,
        }
    }

    fn print_tails(&self, layout: &Layout) {
        for (path, mark, lines) in [
            (layout.console_log(), self.console, 30),
            (layout.host_proxy_log(), self.host_proxy, 20),
        ] {
            let tail = tail_since(&path, mark, lines);
            if !tail.is_empty() {
                eprintln!("--- {} (last lines) ---", path.display());
                for line in tail {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// The last `lines` lines written to `path` after byte `mark` (all of it if the file shrank).
pub fn tail_since(path: &Path, mark: u64, lines: usize) -> Vec<String> {
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let from = if len < mark { 0 } else { mark };
    let mut text = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut text).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_show_only_what_this_run_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "old boot\n").unwrap();
        let mark = std::fs::metadata(&path).unwrap().len();
        std::fs::write(&path, "old boot\na\nb\nKernel panic\n").unwrap();
        assert_eq!(tail_since(&path, mark, 2), ["b", "Kernel panic"]);
        assert_eq!(tail_since(&path, mark, 10), ["a", "b", "Kernel panic"]);
        // Truncated and rewritten by the new run: all of it is new.
        std::fs::write(&path, "x\n").unwrap();
        assert_eq!(tail_since(&path, mark, 10), ["x"]);
        assert!(tail_since(&dir.path().join("none"), 0, 10).is_empty());
    }
}
