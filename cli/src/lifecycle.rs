//! `berth start` and `berth stop`: launching the host proxy detached and waiting for Docker,
//! and shutting the guest down (falling back to signals when it does not comply).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_host_proxy::lock::{self, Status};
use berth_host_proxy::state::State;
use berth_host_proxy::{control, disk, Layout};
use berth_protocol::{Request, Response};
use rustix::process::{kill_process, Pid, Signal};

use crate::config::{self, Config};
use crate::docker::{self, Ping};

/// Environment variable naming the `berth-host-proxy` binary.
const HOST_PROXY_ENV: &str = "BERTH_HOST_PROXY";
/// How long the guest agent has to acknowledge a control request.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// The host proxy's own grace period after SIGTERM (its `--shutdown-timeout-secs` is 20).
const SIGTERM_GRACE: Duration = Duration::from_secs(25);
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

/// A runtime for the few async calls the CLI makes.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn start(args: &StartArgs) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    if let Status::Running { pid } = lock::probe(&layout)? {
        println!("Berth is already running{}", pid_suffix(pid));
        println!("Docker socket: unix://{}", layout.docker_socket().display());
        return Ok(());
    }
    let config = Config::load(&config::path()?)?;
    let settings = config.vm_settings()?;
    check_disk_not_shrunk(settings.disk_size_gib)?;
    layout.create_dirs()?;
    let marks = LogMarks::take(&layout);
    let host_proxy = host_proxy_binary();
    let log_path = layout.host_proxy_log();
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut child = Command::new(&host_proxy)
        .arg("--detach")
        .arg("--home")
        .arg(layout.home())
        .arg("--vmm")
        .arg(&settings.vmm)
        .arg("--kernel")
        .arg(&settings.kernel)
        .arg("--rootfs")
        .arg(&settings.rootfs)
        .args(["--cpus", &settings.cpus.to_string()])
        .args(["--memory-mib", &settings.memory_mib.to_string()])
        .args(["--disk-size-gib", &settings.disk_size_gib.to_string()])
        .args(["--cmdline-extra", &settings.cmdline_extra])
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot share the log file")?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (set {HOST_PROXY_ENV}, or install it next to berth)",
                host_proxy.display()
            )
        })?;
    println!(
        "Starting Berth: {} vCPUs, {} MiB memory, {} GiB disk",
        settings.cpus, settings.memory_mib, settings.disk_size_gib
    );

    let runtime = runtime()?;
    let socket = layout.docker_socket();
    let started = Instant::now();
    let mut last = String::from("the Docker socket is not there yet");
    loop {
        if let Some(status) = child.try_wait().context("cannot watch the host proxy")? {
            marks.print_tails(&layout);
            bail!("Berth stopped during start (host proxy {status}): see the log lines above");
        }
        if socket.exists() {
            match runtime.block_on(docker::ping(&socket, Duration::from_secs(10))) {
                Ok(Ping::Ready) => break,
                Ok(Ping::NotReady(message)) => last = message,
                Err(e) => last = e.to_string(),
            }
        }
        if started.elapsed() >= Duration::from_secs(args.timeout) {
            marks.print_tails(&layout);
            bail!(
                "Docker did not answer within {} s ({last}); Berth is still starting: see \
                 `berth logs`, or `berth stop`",
                args.timeout
            );
        }
        std::thread::sleep(POLL);
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

pub fn stop(args: &StopArgs) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    let Status::Running { pid } = lock::probe(&layout)? else {
        println!("Berth is not running");
        return Ok(());
    };
    let pid = match pid {
        Some(pid) => pid,
        None => {
            std::thread::sleep(Duration::from_secs(1));
            lock::read_pid(&layout.pid_file())
                .context("Berth is starting (it has no pid file yet): try again in a moment")?
        }
    };
    let vmm_pid = State::read(&layout.state_file())
        .ok()
        .flatten()
        .and_then(|s| s.vmm_pid);
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let guest_timeout = u32::try_from(args.timeout.saturating_sub(5).max(1)).unwrap_or(u32::MAX);
    let request = Request::Shutdown {
        timeout_secs: guest_timeout,
    };
    let answer = runtime()?.block_on(control::request(
        &layout.vsock_socket(),
        &request,
        CONTROL_TIMEOUT,
    ));
    let mut terminated = false;
    match answer {
        Ok(Response::Ack) => println!("Asked the guest to shut down"),
        Ok(other) => {
            println!("The guest refused to shut down ({other:?}): stopping the host proxy");
            signal(pid, Signal::TERM)?;
            terminated = true;
        }
        Err(e) => {
            println!("The guest did not take the shutdown request ({e}): stopping the host proxy");
            signal(pid, Signal::TERM)?;
            terminated = true;
        }
    }
    let wait = if terminated { SIGTERM_GRACE } else { timeout };
    if wait_stopped(&layout, wait)? {
        println!("Berth stopped ({:.1} s)", started.elapsed().as_secs_f64());
        return Ok(());
    }
    if !terminated {
        println!(
            "The guest did not power off within {} s: stopping the host proxy",
            args.timeout
        );
        signal(pid, Signal::TERM)?;
        if wait_stopped(&layout, SIGTERM_GRACE)? {
            println!("Berth stopped ({:.1} s)", started.elapsed().as_secs_f64());
            return Ok(());
        }
    }
    println!("The host proxy did not exit: killing it and the VMM");
    signal(pid, Signal::KILL)?;
    if let Some(vmm) = vmm_pid.filter(|&p| is_our_vmm(p, &layout.vsock_socket())) {
        signal(vmm, Signal::KILL)?;
    }
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

fn host_proxy_binary() -> PathBuf {
    std::env::var_os(HOST_PROXY_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| config::sibling_executable("berth-host-proxy"))
        .unwrap_or_else(|| "berth-host-proxy".into())
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

/// Guards against pid reuse: only a process whose command line names our vsock socket.
fn is_our_vmm(pid: u32, vsock: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = vsock.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
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
    /// Also starts a new host proxy log when the current one has grown large.
    fn take(layout: &Layout) -> Self {
        let log = layout.host_proxy_log();
        let len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if len > MAX_LOG {
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

    #[test]
    fn only_a_process_naming_our_socket_counts_as_our_vmm() {
        let me = std::process::id();
        assert!(!is_our_vmm(me, Path::new("/no/such/berth/run/vsock.sock")));
        let exe = std::env::current_exe().unwrap();
        assert!(is_our_vmm(me, &exe));
    }
}
