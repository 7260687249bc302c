//! `berth-host-proxy`: the background daemon `berth start` launches. It owns the VM's
//! lifecycle (booting it from the config file, stopping it), serves the Docker API socket and
//! the control API (`run/berth.sock`) until it is told to quit; logs go to
//! `<home>/logs/host-proxy.log`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use berth_host_proxy::daemon::{self, Config};
use berth_host_proxy::Layout;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "berth-host-proxy",
    version,
    about = "Berth's host daemon: owns the VM, serves the Docker API socket and the control API"
)]
struct Args {
    /// Berth's home (run/, logs/, data.img); default $BERTH_HOME, else ~/.berth.
    #[arg(long)]
    home: Option<PathBuf>,
    /// Seconds a Docker client waits for the guest before getting a 503.
    #[arg(long, default_value_t = 5)]
    connect_timeout_secs: u64,
    /// Seconds the guest has to power off when a stop names no timeout (and on SIGTERM).
    #[arg(long, default_value_t = 30)]
    shutdown_timeout_secs: u64,
    /// Start a new session (no controlling terminal), as `berth start` does.
    #[arg(long)]
    detach: bool,
    /// Do not boot the VM at launch: wait for `POST /v1/start`.
    #[arg(long)]
    no_start: bool,
}

fn main() -> ExitCode {
    berth_errors::abort_on_panic();
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("berth-host-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
        start: !args.no_start,
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
