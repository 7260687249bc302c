//! `berth status` and `berth config show`: what is running, with which settings, and what the
//! guest uses.

use std::path::Path;
use std::time::Duration;

use berth_host_proxy::lock::{self, Status};
use berth_host_proxy::state::{self, State};
use berth_host_proxy::{control, Layout};
use berth_protocol::{Request, Response};
use serde_json::json;

use crate::config::{self, Artifact, Config};
use crate::docker::{self, Ping};
use crate::lifecycle::{runtime, CONTROL_TIMEOUT};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    let report = match lock::probe(&layout)? {
        Status::Stopped => stopped_report(&layout)?,
        Status::Running { pid } => running_report(&layout, pid)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn stopped_report(layout: &Layout) -> anyhow::Result<serde_json::Value> {
    let config = Config::load(&config::path()?)?;
    Ok(json!({
        "running": false,
        "home": layout.home(),
        "settings": {
            "cpus": config.cpus,
            "memory_mib": config.memory_mib,
            "disk_size_gib": config.disk_size_gib,
        },
    }))
}

fn running_report(layout: &Layout, pid: Option<u32>) -> anyhow::Result<serde_json::Value> {
    let state = State::read(&layout.state_file())?;
    let runtime = runtime()?;
    let docker = match runtime.block_on(docker::ping(
        &layout.docker_socket(),
        Duration::from_secs(10),
    )) {
        Ok(Ping::Ready) => json!({ "ready": true }),
        Ok(Ping::NotReady(message)) => json!({ "ready": false, "detail": message }),
        Err(e) => json!({ "ready": false, "detail": e.to_string() }),
    };
    let stats = match runtime.block_on(control::request(
        &layout.vsock_socket(),
        &Request::Stats,
        CONTROL_TIMEOUT,
    )) {
        Ok(Response::Stats {
            mem_total_kib,
            mem_available_kib,
            disk_total_kib,
            disk_used_kib,
            load_avg_1m,
        }) => json!({
            "mem_total_kib": mem_total_kib,
            "mem_available_kib": mem_available_kib,
            "disk_total_kib": disk_total_kib,
            "disk_used_kib": disk_used_kib,
            "load_avg_1m": load_avg_1m,
        }),
        Ok(other) => json!({ "error": format!("unexpected answer {other:?}") }),
        Err(e) => json!({ "error": e.to_string() }),
    };
    let mut report = json!({
        "running": true,
        "home": layout.home(),
        "pid": pid,
        "docker_socket": layout.docker_socket(),
        "docker": docker,
        "guest": stats,
    });
    if let Some(state) = state {
        report["vmm_pid"] = json!(state.vmm_pid);
        report["started_at"] = json!(state.started_at);
        report["uptime_secs"] = json!(state::now_unix().saturating_sub(state.started_at));
        report["settings"] = json!({
            "cpus": state.settings.cpus,
            "memory_mib": state.settings.memory_mib,
            "disk_size_gib": state.settings.disk_size_gib,
            "kernel": state.settings.kernel,
            "rootfs": state.settings.rootfs,
        });
    }
    Ok(report)
}

fn print_report(r: &serde_json::Value) {
    let settings = &r["settings"];
    let resources = format!(
        "{} vCPUs, {} MiB memory, {} GiB disk",
        settings["cpus"], settings["memory_mib"], settings["disk_size_gib"]
    );
    if r["running"] != true {
        println!("Berth is not running");
        println!("settings:   {resources}");
        return;
    }
    println!("Berth is running");
    println!("pid:        {} (VMM {})", r["pid"], r["vmm_pid"]);
    if let Some(up) = r["uptime_secs"].as_u64() {
        println!("uptime:     {}", human_duration(up));
    }
    println!("settings:   {resources}");
    let docker = &r["docker"];
    if docker["ready"] == true {
        println!(
            "docker:     ready on unix://{}",
            str_of(&r["docker_socket"])
        );
    } else {
        println!(
            "docker:     not ready ({}) on unix://{}",
            str_of(&docker["detail"]),
            str_of(&r["docker_socket"])
        );
    }
    let guest = &r["guest"];
    match guest["error"].as_str() {
        Some(error) => println!("guest:      no stats ({error})"),
        None => {
            let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) / 1024;
            let total = mib(&guest["mem_total_kib"]);
            let used = total.saturating_sub(mib(&guest["mem_available_kib"]));
            println!("memory:     {used} MiB used of {total} MiB");
            println!(
                "disk:       {} MiB used of {} MiB",
                mib(&guest["disk_used_kib"]),
                mib(&guest["disk_total_kib"])
            );
            println!("load:       {}", str_of(&guest["load_avg_1m"]));
        }
    }
}

fn str_of(v: &serde_json::Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(42), "42 s");
        assert_eq!(human_duration(125), "2 min 5 s");
        assert_eq!(human_duration(7_380), "2 h 3 min");
    }
}
