//! `berth status` and `berth config show`: the host proxy's status document (`GET /v1/status`)
//! as text or as it is, or, when no host proxy runs, the settings the next start uses.

use std::path::{Path, PathBuf};

use anyhow::Context;
use berth_host_proxy::config::{self, Artifact, Config};
use berth_host_proxy::control_api::model::{BalloonStatus, Settings, Status, VmState, API_VERSION};
use berth_host_proxy::lock;
use berth_host_proxy::Layout;
use serde::Serialize;

use crate::host_proxy::{self, when_up, Unreachable, SOCKET_WAIT};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `berth status --json` when no host proxy runs: the status document's `api_version`,
/// `state`, `reason`, `home` and `settings`, from the config file.
#[derive(Debug, Serialize)]
pub struct Stopped {
    api_version: u32,
    state: VmState,
    reason: String,
    home: PathBuf,
    settings: Settings,
}

pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    match report(&layout)? {
        Report::Stopped(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("Berth is not running");
                println!("settings:   {}", resources(&report.settings));
                println!("shares:     {}", shares(&report.settings));
            }
        }
        Report::Running(status) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
    }
    Ok(())
}

/// What `berth status` reports: the host proxy's status document, or the settings when none runs.
pub enum Report {
    Stopped(Box<Stopped>),
    Running(Box<Status>),
}

impl Report {
    /// As `berth status --json` prints it.
    pub fn to_json(&self) -> serde_json::Result<String> {
        match self {
            Report::Stopped(r) => serde_json::to_string_pretty(r),
            Report::Running(s) => serde_json::to_string_pretty(s),
        }
    }
}

pub fn report(layout: &Layout) -> anyhow::Result<Report> {
    match lock::probe(layout)? {
        lock::Status::Stopped => Ok(Report::Stopped(Box::new(stopped_report(
            layout,
            &Config::load(&config::path()?)?,
        )))),
        lock::Status::Running { pid } => {
            let client = host_proxy::client(layout);
            let status = host_proxy::runtime()?
                .block_on(when_up(|| client.status(), None, SOCKET_WAIT))
                .map_err(Unreachable::into_error)
                .with_context(|| {
                    format!(
                        "cannot get the status of the host proxy{}",
                        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
                    )
                })?;
            Ok(Report::Running(Box::new(status)))
        }
    }
}

fn stopped_report(layout: &Layout, config: &Config) -> Stopped {
    Stopped {
        api_version: API_VERSION,
        state: VmState::Stopped,
        reason: "the host proxy is not running".into(),
        home: layout.home().to_path_buf(),
        settings: config.status_settings(),
    }
}

fn resources(settings: &Settings) -> String {
    format!(
        "{} vCPUs, {} MiB memory, {} GiB disk",
        settings.cpus, settings.memory_mib, settings.disk_size_gib
    )
}

/// The shared folders, `PATH` or `PATH (read-only)`, comma-separated.
fn shares(settings: &Settings) -> String {
    if settings.shares.is_empty() {
        return "none".into();
    }
    let shares: Vec<String> = settings
        .shares
        .iter()
        .map(|s| {
            let mode = if s.read_only { " (read-only)" } else { "" };
            format!("{}{mode}", s.path.display())
        })
        .collect();
    shares.join(", ")
}

/// The first line: where the VM is, and why when it is not simply running.
fn headline(status: &Status) -> String {
    let reason = status.state.reason.as_deref().unwrap_or("");
    let why = if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    };
    match status.state.state {
        VmState::Running => "Berth is running".into(),
        VmState::Starting => format!("Berth is starting{why}"),
        VmState::Stopping => format!("Berth is stopping{why}"),
        VmState::Stopped => {
            format!("Berth is not running{why}: the host proxy waits for `berth start`")
        }
        VmState::Crashed => format!("Berth is not running: the VM crashed{why}"),
    }
}

/// The forwarded ports as `docker ps` writes them: `0.0.0.0:8080->172.17.0.2:80/tcp`.
fn ports(status: &Status) -> String {
    if status.ports.is_empty() {
        return "none published".into();
    }
    let addr = |ip: std::net::IpAddr, port: u16| match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
    };
    let ports: Vec<String> = status
        .ports
        .iter()
        .map(|p| {
            format!(
                "{}->{}/{}",
                addr(p.host_ip, p.host_port),
                addr(p.container_ip, p.container_port),
                p.proto
            )
        })
        .collect();
    ports.join(", ")
}

fn print_status(status: &Status) {
    println!("{}", headline(status));
    let vmm = status
        .vmm_pid
        .map_or_else(|| "none".to_string(), |p| p.to_string());
    println!("pid:        {} (VMM {vmm})", status.pid);
    if let Some(up) = status.uptime_secs {
        println!("uptime:     {}", human_duration(up));
    }
    println!("settings:   {}", resources(&status.settings));
    println!("shares:     {}", shares(&status.settings));
    if !matches!(status.state.state, VmState::Starting | VmState::Running) {
        return;
    }
    let docker = status.sockets.docker.display();
    let Some(guest) = &status.guest else {
        println!("docker:     not ready (the guest agent has not answered yet) on unix://{docker}");
        return;
    };
    if guest.dockerd {
        println!("docker:     ready on unix://{docker}");
    } else {
        println!(
            "docker:     not ready ({}) on unix://{docker}",
            guest.detail
        );
    }
    match &guest.stats {
        None => println!("guest:      no stats yet"),
        Some(stats) => {
            let mib = |kib: u64| kib / 1024;
            let total = mib(stats.mem_total_kib);
            let used = total.saturating_sub(mib(stats.mem_available_kib));
            match status.vmm_rss_kib {
                Some(rss) => println!(
                    "memory:     {used} MiB used of {total} MiB; the VM holds {} MiB of the host's",
                    mib(rss)
                ),
                None => println!("memory:     {used} MiB used of {total} MiB"),
            }
            if let Some(balloon) = &status.balloon {
                println!("balloon:    {}", balloon_line(balloon));
            }
            println!(
                "disk:       {} MiB used of {} MiB",
                mib(stats.disk_used_kib),
                mib(stats.disk_total_kib)
            );
            println!("load:       {}", stats.load_avg_1m);
        }
    }
    println!("ports:      {}", ports(status));
}

/// The balloon: what the host asked back and got, and the guest's own free and cache figures.
fn balloon_line(balloon: &BalloonStatus) -> String {
    let asked = if balloon.target_mib == 0 && balloon.actual_mib == 0 {
        "not inflated".to_string()
    } else {
        format!(
            "the guest gave back {} MiB of the {} MiB asked",
            balloon.actual_mib, balloon.target_mib
        )
    };
    let mib = |bytes: Option<u64>| bytes.map(|b| b >> 20);
    let stats = &balloon.stats;
    let mut reported = Vec::new();
    if let Some(free) = mib(stats.free_memory_bytes) {
        reported.push(format!("{free} MiB free"));
    }
    if let Some(cache) = mib(stats.disk_caches_bytes) {
        reported.push(format!("{cache} MiB page cache"));
    }
    if let Some(kills) = stats.oom_kills.filter(|&k| k > 0) {
        reported.push(format!("{kills} OOM kills"));
    }
    if reported.is_empty() {
        asked
    } else {
        format!("{asked}; the guest reports {}", reported.join(", "))
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// `berth config show`.
pub fn print_config(path: &Path, config: &Config) {
    println!("# {}", path.display());
    println!("cpus = {}", config.cpus);
    println!("memory_mib = {}", config.memory_mib);
    println!("disk_size_gib = {}", config.disk_size_gib);
    for artifact in [Artifact::Kernel, Artifact::Rootfs, Artifact::Vmm] {
        match config.artifact(artifact) {
            Some((path, from)) => println!("{} = {:?}  # from {from}", artifact.key(), path),
            None => println!(
                "# {} is not set: set {} or `berth config set {} PATH`",
                artifact.key(),
                artifact.env(),
                artifact.key()
            ),
        }
    }
    if !config.cmdline_extra.is_empty() {
        println!("cmdline_extra = {:?}", config.cmdline_extra);
    }
    let from = if config.shares.is_some() {
        "config file"
    } else {
        "the default: home and temporary directories"
    };
    match config.shares() {
        Ok(shares) => {
            let list: Vec<String> = shares
                .iter()
                .map(|s| {
                    let mode = if s.read_only { ":ro" } else { "" };
                    format!("{}{mode}", s.path.display())
                })
                .collect();
            println!("shares = {:?}  # from {from}", list.join(","));
        }
        Err(e) => println!("# shares cannot be used: {e}"),
    }
    match config.ports_bind_address() {
        Some(address) => println!("ports.bind_address = \"{address}\""),
        None => println!("# ports.bind_address is not set: published ports use the default"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use berth_host_proxy::control_api::model::{GuestStatus, Sockets, StateChange};

    #[test]
    fn the_stopped_report_has_the_status_documents_names_and_the_config_files_settings() {
        let config = Config {
            cpus: 3,
            kernel: Some("/k/vmlinux".into()),
            ..Config::default()
        };
        let report = stopped_report(&Layout::new("/h"), &config);
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["state"], "stopped");
        assert_eq!(json["api_version"], API_VERSION);
        assert_eq!(json["home"], "/h");
        assert_eq!(json["settings"]["cpus"], 3);
        assert_eq!(json["settings"]["memory_mib"], 2048);
        assert_eq!(json["settings"]["kernel"], "/k/vmlinux");
        // The same settings as a running host proxy's status document.
        let settings: Settings = serde_json::from_value(json["settings"].clone()).unwrap();
        assert_eq!(
            resources(&settings),
            "3 vCPUs, 2048 MiB memory, 64 GiB disk"
        );
    }

    fn status(state: VmState, reason: &str) -> Status {
        Status {
            api_version: API_VERSION,
            version: "0.1.0".into(),
            pid: 1,
            vmm_pid: None,
            vmm_rss_kib: None,
            balloon: None,
            state: StateChange {
                state,
                reason: Some(reason.into()),
                since_ms: 0,
            },
            uptime_secs: None,
            home: "/h".into(),
            sockets: Sockets {
                docker: "/h/run/docker.sock".into(),
                control: "/h/run/berth.sock".into(),
                vsock: "/h/run/vsock.sock".into(),
                vmm_api: "/h/run/vmm.sock".into(),
            },
            settings: stopped_report(&Layout::new("/h"), &Config::default()).settings,
            guest: Some(GuestStatus {
                protocol_version: 1,
                host_protocol_version: 1,
                agent_version: "0.1.0".into(),
                dockerd: true,
                containerd: true,
                detail: String::new(),
                stats: None,
            }),
            ports: Vec::new(),
        }
    }

    #[test]
    fn the_headline_says_where_the_vm_is_and_why() {
        assert_eq!(
            headline(&status(VmState::Running, "dockerd answers")),
            "Berth is running"
        );
        assert_eq!(
            headline(&status(VmState::Starting, "waiting for dockerd")),
            "Berth is starting (waiting for dockerd)"
        );
        assert_eq!(
            headline(&status(VmState::Crashed, "the guest kernel panicked")),
            "Berth is not running: the VM crashed (the guest kernel panicked)"
        );
        assert!(headline(&status(VmState::Stopped, "")).starts_with("Berth is not running"));
    }

    #[test]
    fn the_balloon_line_says_what_was_asked_and_what_the_guest_reports() {
        let mut balloon = BalloonStatus {
            target_mib: 0,
            actual_mib: 0,
            stats: Default::default(),
        };
        assert_eq!(balloon_line(&balloon), "not inflated");
        balloon.stats.free_memory_bytes = Some(700 << 20);
        balloon.stats.disk_caches_bytes = Some(12 << 20);
        balloon.stats.oom_kills = Some(0);
        assert_eq!(
            balloon_line(&balloon),
            "not inflated; the guest reports 700 MiB free, 12 MiB page cache"
        );
        balloon.target_mib = 512;
        balloon.actual_mib = 300;
        balloon.stats.oom_kills = Some(2);
        assert_eq!(
            balloon_line(&balloon),
            "the guest gave back 300 MiB of the 512 MiB asked; the guest reports 700 MiB free, \
             12 MiB page cache, 2 OOM kills"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(42), "42 s");
        assert_eq!(human_duration(125), "2 min 5 s");
        assert_eq!(human_duration(7_380), "2 h 3 min");
    }
}
