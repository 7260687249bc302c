//! `berth-desktop`: Berth's tray icon and dashboard. A client of the control API
//! (`~/.berth/run/berth.sock`, `host-proxy/API.md`) and of the Docker socket; it holds no
//! lifecycle logic of its own.
//!
//!   berth-desktop [--hidden] [--start]
//!
//! `--hidden` starts in the tray without opening the dashboard; `--start` starts Berth too (the
//! login entry uses both). Closing the dashboard leaves the app in the tray; Quit leaves the VM
//! running unless the settings say otherwise.

// The dashboard's commands take `State` by value, as Tauri hands it.
#![allow(clippy::needless_pass_by_value)]

mod app;
mod commands;
mod docker;
mod host;
mod icons;
mod settings;
mod state;
mod tray;
mod vm;

fn main() -> std::process::ExitCode {
    berth_errors::abort_on_panic();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "berth_desktop=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut options = app::Options::default();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--hidden" => options.hidden = true,
            "--start" => options.start = true,
            "-h" | "--help" => {
                println!("usage: berth-desktop [--hidden] [--start]");
                return std::process::ExitCode::SUCCESS;
            }
            other => {
                eprintln!("berth-desktop: unknown argument {other:?}\nusage: berth-desktop [--hidden] [--start]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    match app::run(options) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-desktop: {}", berth_host_proxy::chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
