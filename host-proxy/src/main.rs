//! `berth-host-proxy`: the background daemon `berth start` launches. It runs the VMM, serves
//! the Docker API socket and exits when the VMM does; logs go to `<home>/logs/host-proxy.log`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use berth_host_proxy::daemon::{self, Config};
use berth_host_proxy::{Layout, VmSettings};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "berth-host-proxy",
    version,
    about = "Berth's host daemon: runs the VM and serves the Docker API socket"
)]
struct Args {
    /// Berth's home (run/, logs/, data.img); default $BERTH_HOME, else ~/.berth.
    #[arg(long)]
    home: Option<PathBuf>,
    /// The berth-vmm binary.
    #[arg(long)]
    vmm: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest root filesystem image (attached read-only).
    #[arg(long)]
    rootfs: PathBuf,
    #[arg(long, default_value_t = 2)]
    cpus: u8,
    #[arg(long, default_value_t = 2048)]
    memory_mib: u64,
    /// Size of the data disk, created sparse if missing.
    #[arg(long, default_value_t = 64)]
    disk_size_gib: u64,
    /// Appended to the guest kernel command line.
    #[arg(long, default_value = "")]
    cmdline_extra: String,
    /// Seconds a Docker client waits for the guest before getting a 503.
    #[arg(long, default_value_t = 5)]
    connect_timeout_secs: u64,
    /// Seconds the guest has to power off on SIGTERM before the VMM is killed.
    #[arg(long, default_value_t = 20)]
    shutdown_timeout_secs: u64,
    /// Start a new session (no controlling terminal), as `berth start` does.
    #[arg(long)]
    detach: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let line = one_line(&e);
            tracing::error!("{line}");
            eprintln!("berth-host-proxy: {line}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text is already there (our
/// errors quote their source).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(args: Args) -> anyhow::Result<u8> {
    if args.detach {
        // Fails only when we already lead a session: then we are detached anyway.
        let _ = rustix::process::setsid();
    }
    let layout = match args.home {
        Some(home) => Layout::new(home),
        None => Layout::from_env()?,
    };
    layout.create_dirs()?;
    init_logging(&layout)?;
    let config = Config {
        layout,
        settings: VmSettings {
            vmm: args.vmm,
            kernel: args.kernel,
            rootfs: args.rootfs,
            cpus: args.cpus,
            memory_mib: args.memory_mib,
            disk_size_gib: args.disk_size_gib,
            cmdline_extra: args.cmdline_extra,
        },
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
    };
    tracing::info!(
        "host proxy {} starting (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(daemon::run(config))?;
    Ok(outcome.exit_code())
}

fn init_logging(layout: &Layout) -> anyhow::Result<()> {
    let path = layout.host_proxy_log();
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    Ok(())
}
