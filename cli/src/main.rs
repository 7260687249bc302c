//! `berth`: starts, stops and inspects the Berth VM, in which a real dockerd serves the
//! unmodified `docker` CLI through `~/.berth/run/docker.sock`.
#![forbid(unsafe_code)]

mod diagnose;
mod docker;
mod host_proxy;
mod lifecycle;
mod logs;
mod shell;
mod status;
mod terminal;

use std::process::ExitCode;

use berth_host_proxy::config;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    about = "Run Docker in a small Linux VM",
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the VM and wait until Docker answers.
    Start(lifecycle::StartArgs),
    /// Shut the VM down cleanly (killing it if it does not comply).
    Stop(lifecycle::StopArgs),
    /// Stop, then start.
    Restart {
        /// Seconds the guest has to shut down before it is stopped by force.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        stop_timeout: u64,
        #[command(flatten)]
        start: lifecycle::StartArgs,
    },
    /// Is it running; its settings, uptime and what the guest uses.
    Status(status::StatusArgs),
    /// Show a log: the VM console (kernel and agent), the host proxy, or dockerd.
    Logs(logs::LogsArgs),
    /// A shell in the VM, or run a command there: `berth shell -- CMD ARGS...`.
    Shell(shell::ShellArgs),
    /// Collect the logs, settings and state that explain a problem into one tarball.
    Diagnose(diagnose::DiagnoseArgs),
    /// Show or change the settings.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the settings in effect and where each comes from.
    Show,
    /// Change a setting: cpus, memory_mib, disk_size_gib, kernel, rootfs, vmm, cmdline_extra,
    /// shares ("/home/u,/data:ro"; "" shares nothing), ports.bind_address (an IP address).
    Set { key: String, value: String },
    /// Reset a setting to its default.
    Unset { key: String },
}

fn main() -> ExitCode {
    berth_errors::abort_on_panic();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Start(args) => lifecycle::start(&args),
        Command::Stop(args) => lifecycle::stop(&args),
        Command::Restart {
            stop_timeout,
            start,
        } => lifecycle::restart(stop_timeout, &start),
        Command::Status(args) => status::status(&args),
        Command::Logs(args) => logs::logs(&args),
        Command::Shell(args) => match shell::shell(&args) {
            // The command's own status, as a shell would report it.
            Ok(code) => return ExitCode::from(u8::try_from(code).unwrap_or(255)),
            Err(e) => Err(e),
        },
        Command::Diagnose(args) => diagnose::diagnose(&args),
        Command::Config(cmd) => config_command(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes, each once (no message repeats its source).
            eprintln!("berth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_command(cmd: ConfigCommand) -> anyhow::Result<()> {
    let path = config::path()?;
    match cmd {
        ConfigCommand::Show => {
            let config = config::Config::load(&path)?;
            status::print_config(&path, &config);
        }
        ConfigCommand::Set { key, value } => {
            let mut config = config::Config::load(&path)?;
            config.set(&key, &value)?;
            if key.starts_with("disk_size") {
                lifecycle::check_disk_not_shrunk(config.disk_size_gib)?;
            }
            config.save(&path)?;
            println!("{key} set; it applies from the next `berth start` (or `berth restart`)");
        }
        ConfigCommand::Unset { key } => {
            let mut config = config::Config::load(&path)?;
            config.unset(&key)?;
            config.save(&path)?;
            println!("{key} reset to its default");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses() {
        Cli::command_for_test().debug_assert();
        let cli = Cli::try_parse_from(["berth", "shell", "--", "ls", "-l"]).unwrap();
        assert!(matches!(cli.command, Command::Shell(ref a) if a.command == ["ls", "-l"]));
        let cli = Cli::try_parse_from(["berth", "logs", "-f", "--source", "dockerd"]).unwrap();
        assert!(matches!(cli.command, Command::Logs(ref a) if a.follow));
        assert!(Cli::try_parse_from(["berth", "logs", "--source", "kernel"]).is_err());
    }

    impl Cli {
        fn command_for_test() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
