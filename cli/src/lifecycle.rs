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
use berth_host_proxy::Layout;
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
    let Some(mut plan) = plan(&layout, &runtime, &client, restart)? else {
        return Ok(());
    };
    println!(
        "Starting Berth: {} vCPUs, {} MiB memory, {} GiB disk",
        settings.cpus, settings.memory_mib, settings.disk_size_gib
    );
    let started = Instant::now();
    let deadline = started + plan.stop_wait + Duration::from_secs(args.timeout);
    let socket = layout.docker_socket();
    let outcome = runtime.block_on(async {
        let outcome = follow(&client, plan.launched.as_mut(), plan.ask, deadline).await?;
        if outcome != Boot::Running {
            return Ok(outcome);
        }
        Ok::<_, anyhow::Error>(docker_answers(&socket, deadline).await)
    })?;
    let failure = match outcome {
        Boot::Running => None,
        Boot::Crashed(reason) => Some(format!(
            "Berth stopped during start ({reason}): see the log lines above"
        )),
        Boot::Exited(status) => Some(format!(
            "Berth stopped during start (host proxy {status}): see the log lines above"
        )),
        Boot::TimedOut(last) => Some(format!(
            "Docker did not answer within {} s ({last}); Berth is still starting: see \
             `berth logs`, or `berth stop`",
            args.timeout
        )),
    };
    if let Some(failure) = failure {
        plan.marks.print_tails(&layout);
        bail!(failure);
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

/// How a start goes on from here.
struct Plan {
    /// The host proxy this start launched.
    launched: Option<Child>,
    marks: LogMarks,
    ask: Ask,
    /// How long the restart's stop may take before the start's own timeout counts.
    stop_wait: Duration,
}

/// Launches the host proxy when none runs; `None` when the VM already runs and this is a
/// start (said to the user).
fn plan(
    layout: &Layout,
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    restart: Option<StopRequest>,
) -> anyhow::Result<Option<Plan>> {
    let Status::Running { pid } = lock::probe(layout)? else {
        layout.create_dirs()?;
        let marks = LogMarks::take(layout, true);
        return Ok(Some(Plan {
            launched: Some(host_proxy::launch(layout)?),
            marks,
            ask: Ask::Start,
            stop_wait: Duration::ZERO,
        }));
    };
    let status = runtime
        .block_on(when_up(|| client.status(), None, SOCKET_WAIT))
        .map_err(Unreachable::into_error)
        .with_context(|| format!("cannot reach the host proxy{}", pid_suffix(pid)))?;
    let running = status.state.state == VmState::Running;
    let (ask, stop_wait) = match restart {
        Some(request) if running => {
            let wait = Duration::from_secs(request.timeout_secs.unwrap_or(30));
            (Ask::Restart(request), wait)
        }
        None if running => {
            println!("Berth is already running{}", pid_suffix(Some(status.pid)));
            println!("Docker socket: unix://{}", status.sockets.docker.display());
            return Ok(None);
        }
        _ => (Ask::Start, Duration::ZERO),
    };
    Ok(Some(Plan {
        launched: None,
        // The host proxy writes its log: it is not moved aside under it.
        marks: LogMarks::take(layout, false),
        ask,
        stop_wait,
    }))
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
    // A host proxy we launched has until the deadline to open its socket (it may be slow to
    // get going on a busy machine); one that was running has `SOCKET_WAIT`.
    let wait = match launched {
        Some(_) => deadline.saturating_duration_since(Instant::now()),
        None => SOCKET_WAIT,
    };
    let mut events = match when_up(|| client.events(), launched.as_deref_mut(), wait).await {
        Ok(events) => events,
        Err(Unreachable::Exited(status)) => return Ok(Boot::Exited(status)),
        Err(Unreachable::NoSocket(_)) if launched.is_some() => {
            let last = "the host proxy has not opened its control socket";
            return Ok(Boot::TimedOut(last.into()));
        }
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
        match watch.next(&mut events).await? {
            Some(Boot::Exited(what)) => return Ok(Boot::Exited(exit_status(launched, what).await)),
            Some(outcome) => return Ok(outcome),
            None => {}
        }
    }
}

/// The exit status of the host proxy we launched, when it comes within a second, else `what`.
async fn exit_status(launched: Option<&mut Child>, what: String) -> String {
    let Some(child) = launched else { return what };
    for _ in 0..10 {
        if let Ok(Some(status)) = child.try_wait() {
            return status.to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    what
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
    stop_in(&Layout::from_env()?, args)
}

fn stop_in(layout: &Layout, args: &StopArgs) -> anyhow::Result<()> {
    let Status::Running { pid } = lock::probe(layout)? else {
        println!("Berth is not running");
        return Ok(());
    };
    let started = Instant::now();
    let client = host_proxy::client(layout);
    let request = StopRequest {
        timeout_secs: Some(args.timeout),
    };
    let asked =
        host_proxy::runtime()?.block_on(when_up(|| client.quit(&request), None, SOCKET_WAIT));
    match asked {
        Ok(_) => {
            let wait = Duration::from_secs(args.timeout) + QUIT_GRACE;
            if wait_stopped(layout, wait)? {
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
        Err(Unreachable::NoSocket(_)) => println!(
            "The host proxy has no control socket after {} s: stopping it",
            SOCKET_WAIT.as_secs()
        ),
        Err(e) => println!(
            "The host proxy does not answer ({:#}): stopping it",
            e.into_error()
        ),
    }
    let pid = pid
        .or_else(|| lock::read_pid(&layout.pid_file()))
        .context("Berth is starting (it has no pid file yet): try again in a moment")?;
    signal(pid, Signal::TERM)?;
    if wait_stopped(layout, SIGTERM_GRACE)? {
        println!("Berth stopped ({:.1} s)", started.elapsed().as_secs_f64());
        return Ok(());
    }
    println!("The host proxy did not exit: killing it");
    signal(pid, Signal::KILL)?;
    if wait_stopped(layout, Duration::from_secs(5))? {
        println!("Berth killed ({:.1} s)", started.elapsed().as_secs_f64());
        return Ok(());
    }
    bail!("Berth did not stop (host proxy pid {pid})")
}

/// Refuses a disk size below the existing data disk's.
pub fn check_disk_not_shrunk(size_gib: u64) -> anyhow::Result<()> {
    Ok(config::check_disk_not_shrunk(
        &Layout::from_env()?,
        size_gib,
    )?)
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
    use berth_host_proxy::control_api::model::StateChange;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    fn line(state: VmState, reason: &str) -> String {
        let event = ApiEvent::State(StateChange {
            state,
            reason: Some(reason.into()),
            since_ms: 1,
        });
        serde_json::to_string(&event).unwrap() + "\n"
    }

    /// A host proxy's control API as far as a start needs it: `/v1/events` sends `events` (the
    /// first at once, the others 50 ms apart, then ends unless `hold`), `/v1/start` and
    /// `/v1/restart` answer `accepted`.
    fn fake_api(events: Vec<String>, accepted: VmState, hold: bool) -> (tempfile::TempDir, Client) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("berth.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let events = events.clone();
                tokio::spawn(async move {
                    let mut head = vec![0u8; 4096];
                    let n = stream.read(&mut head).await.unwrap();
                    let head = String::from_utf8_lossy(&head[..n]).to_string();
                    if head.starts_with("GET /v1/events ") {
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                            .await
                            .unwrap();
                        for event in events {
                            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                            stream.write_all(chunk.as_bytes()).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        if hold {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        let _ = stream.write_all(b"0\r\n\r\n").await;
                    } else {
                        let body = serde_json::to_string(&Accepted {
                            state: StateChange {
                                state: accepted,
                                reason: None,
                                since_ms: 1,
                            },
                        })
                        .unwrap();
                        let answer = format!(
                            "HTTP/1.1 202 Accepted\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        stream.write_all(answer.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (dir, Client::new(socket))
    }

    async fn start_with(events: Vec<String>, ask: Ask, accepted: VmState) -> Boot {
        let (_dir, client) = fake_api(events, accepted, true);
        let deadline = Instant::now() + Duration::from_secs(2);
        follow(&client, None, ask, deadline).await.unwrap()
    }

    #[tokio::test]
    async fn a_start_follows_the_events_until_the_vm_runs() {
        let events = vec![
            line(VmState::Stopped, "not started"),
            line(VmState::Starting, "booting"),
            line(VmState::Running, "dockerd answers"),
        ];
        let boot = start_with(events, Ask::Start, VmState::Starting).await;
        assert_eq!(boot, Boot::Running);
    }

    #[tokio::test]
    async fn a_crash_during_start_is_told_with_its_reason_but_an_earlier_one_is_not() {
        let events = vec![
            line(VmState::Crashed, "the previous run's crash"),
            line(VmState::Starting, "booting"),
            line(
                VmState::Crashed,
                "the guest kernel panicked (see console.log)",
            ),
        ];
        let boot = start_with(events, Ask::Start, VmState::Starting).await;
        assert_eq!(
            boot,
            Boot::Crashed("the guest kernel panicked (see console.log)".into())
        );
    }

    #[tokio::test]
    async fn a_restart_passes_through_stopped_to_running() {
        let events = vec![
            line(VmState::Running, "dockerd answers"),
            line(VmState::Stopping, "restart requested"),
            line(VmState::Stopped, "stopped by request"),
            line(VmState::Starting, "booting"),
            line(VmState::Running, "dockerd answers"),
        ];
        let ask = Ask::Restart(StopRequest::default());
        let boot = start_with(events, ask, VmState::Stopping).await;
        assert_eq!(boot, Boot::Running);
    }

    #[tokio::test]
    async fn a_start_that_does_not_finish_in_time_says_where_it_was() {
        let events = vec![
            line(VmState::Stopped, "not started"),
            line(VmState::Starting, "waiting for dockerd"),
        ];
        let boot = start_with(events, Ask::Start, VmState::Starting).await;
        assert_eq!(boot, Boot::TimedOut("waiting for dockerd".into()));
    }

    #[tokio::test]
    async fn a_host_proxy_that_goes_during_start_ends_it() {
        let events = vec![
            line(VmState::Stopped, "not started"),
            line(VmState::Starting, "booting"),
        ];
        let (_dir, client) = fake_api(events, VmState::Starting, false);
        let deadline = Instant::now() + Duration::from_secs(30);
        let boot = follow(&client, None, Ask::Start, deadline).await.unwrap();
        assert_eq!(boot, Boot::Exited("closed its control socket".into()));
    }

    /// A host proxy holding `layout`'s lock whose control socket answers one request with
    /// `answer`, then lets the lock go when `quits`; the request, and the process whose pid it
    /// recorded.
    fn host_proxy_answering(
        layout: &Layout,
        answer: &'static str,
        quits: bool,
    ) -> (std::thread::JoinHandle<String>, std::process::Child) {
        use std::io::{Read, Write};
        layout.create_dirs().unwrap();
        let lock = lock::InstanceLock::acquire(layout, Duration::ZERO).unwrap();
        // Should the CLI fall back to signals, they reach a stand-in, not the tests.
        let stand_in = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        lock.write_pid(layout, stand_in.id()).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(layout.control_socket()).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = vec![0u8; 4096];
            let n = stream.read(&mut head).unwrap();
            stream.write_all(answer.as_bytes()).unwrap();
            if quits {
                drop(lock);
            } else {
                std::mem::forget(lock);
            }
            String::from_utf8_lossy(&head[..n]).into_owned()
        });
        (server, stand_in)
    }

    #[test]
    fn stop_asks_the_host_proxy_to_quit_and_waits_for_it_to_go() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let accepted = "HTTP/1.1 202 Accepted\r\ncontent-length: 47\r\n\r\n\
                        {\"state\":\"stopping\",\"reason\":null,\"since_ms\":1}";
        let (server, mut stand_in) = host_proxy_answering(&layout, accepted, true);
        stop_in(&layout, &StopArgs { timeout: 3 }).unwrap();
        let request = server.join().unwrap();
        assert!(request.starts_with("POST /v1/quit "), "{request}");
        assert!(request.ends_with(r#"{"timeout_secs":3}"#), "{request}");
        assert_eq!(lock::probe(&layout).unwrap(), Status::Stopped);
        // No signal was needed.
        assert!(stand_in.try_wait().unwrap().is_none());
        stand_in.kill().unwrap();
        stand_in.wait().unwrap();
    }

    #[test]
    fn a_refused_stop_is_the_host_proxys_message() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let conflict = "HTTP/1.1 409 Conflict\r\ncontent-length: 49\r\n\r\n\
                        {\"code\":\"conflict\",\"message\":\"Berth is starting\"}";
        let (server, mut stand_in) = host_proxy_answering(&layout, conflict, false);
        let err = stop_in(&layout, &StopArgs { timeout: 3 }).unwrap_err();
        assert_eq!(format!("{err:#}"), "cannot stop Berth: Berth is starting");
        server.join().unwrap();
        assert!(stand_in.try_wait().unwrap().is_none());
        stand_in.kill().unwrap();
        stand_in.wait().unwrap();
    }

    #[tokio::test]
    async fn a_start_of_a_running_vm_is_done_at_once() {
        let events = vec![line(VmState::Running, "dockerd answers")];
        let boot = start_with(events, Ask::Start, VmState::Running).await;
        assert_eq!(boot, Boot::Running);
    }

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
