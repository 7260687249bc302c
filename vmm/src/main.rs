//! `berth-vmm`: boots a Linux guest and exits with a status that says how the guest stopped:
//! 0 powered off, 2 rebooted/reset, 3 kernel panic, 4 guest crashed (triple fault), 1 VMM error
//! (one line on stderr).

use std::path::PathBuf;
use std::process::ExitCode;

use berth_vmm::config::{DiskConfig, VmConfig};
use berth_vmm::exit::ExitReason;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "berth-vmm",
    version,
    about = "Berth's VMM: boots a Linux guest under KVM"
)]
struct Args {
    /// Guest kernel: PVH ELF vmlinux, ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Extra kernel command-line arguments (root=, init options, ...).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// A disk image: PATH, or PATH,ro for read-only. Repeat for more; they appear as vda, vdb, ...
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskConfig>,
    /// Leave out the virtio entropy device.
    #[arg(long)]
    no_rng: bool,
    /// Write the guest console to this file.
    #[arg(long, value_name = "PATH")]
    serial_log: Option<PathBuf>,
    /// Copy the guest console to stdout.
    #[arg(long)]
    console: bool,
    /// Give the guest a virtio-vsock device exposed on the host at this unix socket: connect and
    /// write `CONNECT <port>` to reach a guest port; guest connections to host port P go to
    /// `PATH_P`.
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let config = VmConfig {
        kernel: args.kernel,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory_mib: args.memory,
        disks: args.disks,
        rng: !args.no_rng,
        serial_log: args.serial_log,
        console: args.console,
        vsock: args.vsock,
    };
    let reason = match berth_vmm::vm::run(&config) {
        Ok(reason) => reason,
        Err(e) => ExitReason::Error(e.to_string()),
    };
    match &reason {
        ExitReason::PowerOff => eprintln!("berth-vmm: guest powered off"),
        ExitReason::Halted => eprintln!("berth-vmm: guest halted"),
        ExitReason::Reset => eprintln!("berth-vmm: guest rebooted"),
        ExitReason::Panic => eprintln!("berth-vmm: guest kernel panicked (see the console log)"),
        ExitReason::Crashed(state) => eprintln!("berth-vmm: guest crashed: triple fault ({state})"),
        ExitReason::Error(e) => eprintln!("berth-vmm: error: {e}"),
    }
    ExitCode::from(reason.exit_code() as u8)
}
