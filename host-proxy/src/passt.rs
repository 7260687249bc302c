//! passt, the VM's network: the guest's addresses (kept here once: passt's options, the VMM's
//! net device and the agent's `berth.net=` all come from them), starting one passt per VM on
//! `run/passt/passt.sock`, restarting it with a backoff while the VM runs (the VMM's net device
//! reconnects by itself), and stopping it with the VM.
//!
//! Started as root, passt drops to nobody *before* it binds its socket (bookworm's 2023-03-09
//! does), so it could not create it in the owner-only `run/`: passt gets `run/passt/`, owned by
//! the user it becomes, as its working directory and the socket's path relative to it. The VMM
//! (root) still connects by the absolute path.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth_machine::{NetConfig, DEFAULT_NET_MTU};
use berth_protocol::cmdline::GuestNet;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::chain;
use crate::layout::Layout;

/// Names the passt binary to use instead of the one on `PATH`.
pub const PASST_ENV: &str = "BERTH_PASST";
/// Environment variable: TCP ports passt itself forwards into the guest (`-t` syntax, e.g.
/// `5203:5201`); unset, none. Only `tests/bench/ports-shares.sh` sets it, for its baseline.
pub const TCP_PORTS_ENV: &str = "BERTH_PASST_TCP_PORTS";
/// The socket's name in `Layout::passt_dir`.
pub const SOCKET_NAME: &str = "passt.sock";

/// The guest's eth0.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
pub const PREFIX_LEN: u8 = 24;
/// The gateway: passt maps connections to it to the host's loopback (`host.docker.internal`).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);
/// Where the guest's DNS forwarder sends queries: passt maps it to the host's resolver.
pub const DNS_FORWARD: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 53);
/// The guest's MAC address (its virtio-net device).
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// passt's MAC address towards the guest.
pub const HOST_MAC: &str = "52:54:00:12:34:01";
/// The link MTU: the largest frame passt takes less the Ethernet header.
pub const MTU: u16 = DEFAULT_NET_MTU;

/// How long a passt that is still running has to create its socket (one that exits is seen at
/// once). 5 s was too little from a cold page cache in the nested rig: the docker benchmark's
/// start after dropping the host's caches failed on it.
const SOCKET_WAIT: Duration = Duration::from_secs(30);
/// How long passt has to exit after SIGTERM before it is killed.
const TERM_WAIT: Duration = Duration::from_secs(3);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// passt dying `MAX_DEATHS` times within `DEATH_WINDOW` stops the VM.
const MAX_DEATHS: usize = 5;
const DEATH_WINDOW: Duration = Duration::from_secs(600);
/// nobody:nogroup, the user passt becomes when started as root.
const NOBODY: u32 = 65534;
/// What passt says when the host has no interface with a default route.
const NO_INTERFACE: &str = "External interface not usable";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("passt is not installed: apt-get install passt (or set {PASST_ENV})")]
    NotInstalled,
    #[error("passt {} (from ${PASST_ENV}) is not a file", path.display())]
    Missing { path: PathBuf },
    #[error("cannot prepare passt's directory {}", path.display())]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open passt's log {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start passt {}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "passt found no usable network interface: the host needs a network connection with a \
         default route (see {})", log.display()
    )]
    NoInterface { log: PathBuf },
    #[error("passt exited at start ({status}){}: see {}",
        last.as_deref().map(|l| format!(": {l}")).unwrap_or_default(), log.display())]
    Exited {
        status: ExitStatus,
        last: Option<String>,
        log: PathBuf,
    },
    #[error("passt did not create its socket {} within {timeout:?}: see {}",
        socket.display(), log.display())]
    NoSocket {
        socket: PathBuf,
        timeout: Duration,
        log: PathBuf,
    },
}

/// The agent's `berth.net=`: the guest's side of the addresses passt is started with.
pub fn guest_net() -> GuestNet {
    GuestNet {
        address: GUEST_ADDRESS,
        prefix_len: PREFIX_LEN,
        gateway: GATEWAY,
        dns: DNS_FORWARD,
        mtu: MTU,
    }
}

/// The VMM's net device, connected to passt's socket.
pub fn net_device(layout: &Layout) -> NetConfig {
    NetConfig {
        socket: layout.passt_socket(),
        mac: GUEST_MAC.into(),
        mtu: MTU,
    }
}

/// The passt binary: `$BERTH_PASST`, else `passt` on `PATH`.
pub fn find() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os(PASST_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::Missing { path })
        };
    }
    crate::config::on_path("passt").ok_or(Error::NotInstalled)
}

/// How to start passt for one Berth instance.
#[derive(Clone, Debug)]
pub struct Passt {
    binary: PathBuf,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Passt {
    /// passt for `layout`; fails when passt cannot be found.
    pub fn new(layout: &Layout) -> Result<Passt, Error> {
        Ok(Passt {
            binary: find()?,
            dir: layout.passt_dir(),
            socket: layout.passt_socket(),
            log: layout.passt_log(),
        })
    }

    /// passt's command line; the socket is relative to `dir`, its working directory.
    pub fn args(&self, as_root: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--foreground",
            "--quiet",
            // The guest is configured from the command line (berth.net=), IPv4 only.
            "--ipv4-only",
            "--no-dhcp",
            "--udp-ports",
            "none",
            "--socket",
            SOCKET_NAME,
        ]
        .iter()
        .map(OsString::from)
        .collect();
        // Published ports are the host proxy's: passt forwards none, except what the network
        // benchmark asks for as its baseline (`BERTH_PASST_TCP_PORTS`, passt's `-t` syntax).
        let tcp_ports = std::env::var(TCP_PORTS_ENV)
            .ok()
            .filter(|spec| !spec.trim().is_empty())
            .unwrap_or_else(|| "none".into());
        for (option, value) in [
            ("--tcp-ports", tcp_ports),
            ("--address", GUEST_ADDRESS.to_string()),
            ("--netmask", PREFIX_LEN.to_string()),
            ("--gateway", GATEWAY.to_string()),
            ("--dns-forward", DNS_FORWARD.to_string()),
            ("--mac-addr", HOST_MAC.to_string()),
            ("--mtu", MTU.to_string()),
        ] {
            args.push(option.into());
            args.push(value.into());
        }
        if as_root {
            args.push("--runas".into());
            args.push(format!("{NOBODY}:{NOBODY}").into());
        }
        args
    }

    /// Starts passt and waits for its socket; `passt` is killed if the handle drops.
    async fn launch(&self) -> Result<Child, Error> {
        let as_root = rustix::process::geteuid().is_root();
        self.prepare_dir(as_root)?;
        let (log, from) = self.open_log()?;
        let log_err = log.try_clone().map_err(|source| self.log_error(source))?;
        let mut child = Command::new(&self.binary)
            .args(self.args(as_root))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                path: self.binary.clone(),
                source,
            })?;
        let deadline = Instant::now() + SOCKET_WAIT;
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                return Err(self.exited(status, from));
            }
            if is_socket(&self.socket) {
                return Ok(child);
            }
            if Instant::now() > deadline {
                terminate(&mut child).await;
                return Err(Error::NoSocket {
                    socket: self.socket.clone(),
                    timeout: SOCKET_WAIT,
                    log: self.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `run/passt/`, owner-only, owned by the user passt runs as, without a stale socket.
    fn prepare_dir(&self, as_root: bool) -> Result<(), Error> {
        let prepare = || -> std::io::Result<()> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)?;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
            if as_root {
                std::os::unix::fs::chown(&self.dir, Some(NOBODY), Some(NOBODY))?;
            }
            match std::fs::remove_file(&self.socket) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        };
        prepare().map_err(|source| Error::Prepare {
            path: self.dir.clone(),
            source,
        })
    }

    /// The log, opened for appending with a line marking this start; and where this start's
    /// output begins.
    fn open_log(&self) -> Result<(std::fs::File, u64), Error> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| self.log_error(source))?;
        let from = file.metadata().map(|m| m.len()).unwrap_or(0);
        writeln!(
            file,
            "--- berth-host-proxy starts {}",
            self.binary.display()
        )
        .map_err(|source| self.log_error(source))?;
        Ok((file, from))
    }

    fn log_error(&self, source: std::io::Error) -> Error {
        Error::Log {
            path: self.log.clone(),
            source,
        }
    }

    /// Why passt exited at start, from what it wrote to the log since `from`.
    fn exited(&self, status: ExitStatus, from: u64) -> Error {
        let output = std::fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(from).unwrap_or(0).min(output.len());
        let output = String::from_utf8_lossy(&output[start..]);
        if output.contains(NO_INTERFACE) {
            return Error::NoInterface {
                log: self.log.clone(),
            };
        }
        let last = output
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty() && !l.starts_with("---") && !l.contains("to syslog"))
            .map(String::from);
        Error::Exited {
            status,
            last,
            log: self.log.clone(),
        }
    }

    /// Starts passt and supervises it until `Supervisor::stop`.
    pub async fn start(self) -> Result<Supervisor, Error> {
        let child = self.launch().await?;
        tracing::info!(
            "started passt (pid {}) on {}",
            child.id().unwrap_or(0),
            self.socket.display()
        );
        let (stop, stopped) = oneshot::channel();
        let (gave_up_tx, gave_up) = mpsc::channel(1);
        let task = tokio::spawn(supervise(self, child, stopped, gave_up_tx));
        Ok(Supervisor {
            stop: Some(stop),
            gave_up,
            task,
        })
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The running passt of one VM.
pub struct Supervisor {
    stop: Option<oneshot::Sender<()>>,
    gave_up: mpsc::Receiver<()>,
    task: JoinHandle<()>,
}

impl Supervisor {
    /// Returns when passt keeps exiting and the VM should stop; never otherwise.
    pub async fn failed(&mut self) {
        if self.gave_up.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// Stops passt (SIGTERM, then SIGKILL) and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await {
            tracing::warn!("passt's supervisor ended abnormally: {e}");
        }
    }
}

/// The reason a VM is stopped for when passt keeps exiting.
pub const GAVE_UP: &str = "passt keeps exiting: see logs/passt.log";

/// Watches passt; restarts it with a backoff when it dies, until asked to stop or until it died
/// `MAX_DEATHS` times within `DEATH_WINDOW`.
async fn supervise(
    passt: Passt,
    child: Child,
    mut stop: oneshot::Receiver<()>,
    gave_up: mpsc::Sender<()>,
) {
    let mut child = Some(child);
    let mut deaths: VecDeque<Instant> = VecDeque::new();
    loop {
        if let Some(running) = child.as_mut() {
            tokio::select! {
                status = running.wait() => {
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    tracing::warn!(
                        "passt exited while the VM runs ({status}): see {}",
                        passt.log.display()
                    );
                }
                _ = &mut stop => {
                    terminate(running).await;
                    return;
                }
            }
        }
        child = None;
        let now = Instant::now();
        deaths.push_back(now);
        while deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > DEATH_WINDOW)
        {
            deaths.pop_front();
        }
        if deaths.len() >= MAX_DEATHS {
            tracing::error!(
                "passt exited {} times within {} minutes: stopping the VM",
                deaths.len(),
                DEATH_WINDOW.as_secs() / 60
            );
            let _ = gave_up.send(()).await;
            let _ = stop.await;
            return;
        }
        let backoff = backoff(deaths.len());
        tracing::info!("restarting passt in {backoff:?}");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = &mut stop => return,
        }
        match passt.launch().await {
            Ok(started) => {
                tracing::info!("restarted passt (pid {})", started.id().unwrap_or(0));
                child = Some(started);
            }
            Err(e) => tracing::warn!("cannot restart passt: {}", chain(&e)),
        }
    }
}

/// The wait before the restart after the `deaths`th death in the window: 1 s, doubling, at most
/// 30 s.
fn backoff(deaths: usize) -> Duration {
    let doublings = u32::try_from(deaths.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(5);
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// SIGTERM, then SIGKILL after `TERM_WAIT`.
async fn terminate(child: &mut Child) {
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        if let Ok(Ok(status)) = tokio::time::timeout(TERM_WAIT, child.wait()).await {
            tracing::info!("passt exited: {status}");
            return;
        }
        tracing::warn!("passt did not exit within {TERM_WAIT:?} of SIGTERM: killing it");
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A passt that says what the real one says on a host without a default route (which this
    /// machine cannot be made into).
    #[tokio::test]
    async fn a_host_without_a_default_route_is_told_so_in_plain_words() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create_dirs().unwrap();
        let script = dir.path().join("passt");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'External interface not usable' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let passt = Passt {
            binary: script,
            dir: layout.passt_dir(),
            socket: layout.passt_socket(),
            log: layout.passt_log(),
        };
        let err = passt.start().await.err().unwrap().to_string();
        assert!(
            err.contains("the host needs a network connection with a default route"),
            "{err}"
        );
        assert!(err.contains("logs/passt.log"), "{err}");
        let log = std::fs::read_to_string(layout.passt_log()).unwrap();
        assert!(log.contains("External interface not usable"), "{log}");
    }

    #[test]
    fn the_backoff_doubles_from_one_second_to_thirty() {
        let waits: Vec<u64> = (1..=7).map(|d| backoff(d).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn passt_is_told_the_addresses_the_guest_is_given() {
        let passt = Passt {
            binary: "/usr/bin/passt".into(),
            dir: "/h/run/passt".into(),
            socket: "/h/run/passt/passt.sock".into(),
            log: "/h/logs/passt.log".into(),
        };
        let args: Vec<String> = passt
            .args(true)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        let net = guest_net();
        for wanted in [
            format!("--address {}", net.address),
            format!("--netmask {}", net.prefix_len),
            format!("--gateway {}", net.gateway),
            format!("--dns-forward {}", net.dns),
            format!("--mtu {}", net.mtu),
            "--socket passt.sock".into(),
            "--runas 65534:65534".into(),
        ] {
            assert!(line.contains(&wanted), "{wanted} missing from {line}");
        }
        assert!(!line.contains("--one-off"), "the VMM reconnects: {line}");
        assert!(!passt.args(false).iter().any(|a| a == "--runas"));
        assert_ne!(HOST_MAC, GUEST_MAC);
        berth_machine::parse_mac(HOST_MAC).unwrap();
    }
}
