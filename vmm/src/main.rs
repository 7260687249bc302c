//! `berth-vmm`: boots the machine a description (`--config run/vm.json`, or the hand-use flags)
//! asks for and exits with a status that says how the guest stopped (`berth_machine::VmmExit`):
//! 0 powered off, 1 VMM error (one line on stderr), 2 rebooted/reset, 3 kernel panic, 4 guest
//! crashed (triple fault), 5 stopped through the API socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use berth_machine::{
    DeviceConfig, DiskConfig, FsConfig, NetConfig, VmConfig, VmmExit, VsockConfig, GUEST_CID,
};
use berth_vmm::exit::ExitReason;
use clap::{ArgGroup, Parser};

#[derive(Parser, Debug)]
#[command(
    name = "berth-vmm",
    version,
    about = "Berth's VMM: boots a Linux guest under KVM",
    group(ArgGroup::new("flags").multiple(true).conflicts_with("config")),
    group(ArgGroup::new("machine").required(true).args(["config", "kernel"]))
)]
struct Args {
    /// The machine description (JSON, as the host proxy writes run/vm.json); the other flags
    /// build one by hand instead.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Guest kernel: PVH ELF vmlinux, ELF vmlinux or bzImage.
    #[arg(long, group = "flags")]
    kernel: Option<PathBuf>,
    /// Extra kernel command-line arguments (root=, init options, ...).
    #[arg(long, group = "flags")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, group = "flags", default_value_t = berth_machine::DEFAULT_CPUS)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, group = "flags", default_value_t = berth_machine::DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// A disk image: PATH, PATH,ro for read-only, ...,serial=NAME for the serial the guest reads.
    /// Repeat for more; they appear as vda, vdb, ...
    #[arg(long = "disk", value_name = "PATH[,ro][,serial=NAME]", group = "flags")]
    disks: Vec<DiskConfig>,
    /// Share a host directory with the guest (virtio-fs): `mount -t virtiofs TAG DIR` there.
    /// Repeat for more.
    #[arg(long = "fs", value_name = "TAG=PATH[,ro]", group = "flags")]
    shares: Vec<FsConfig>,
    /// Leave out the virtio entropy device.
    #[arg(long, group = "flags")]
    no_rng: bool,
    /// Write the guest console to this file.
    #[arg(long, value_name = "PATH", group = "flags")]
    serial_log: Option<PathBuf>,
    /// Copy the guest console to stdout.
    #[arg(long, group = "flags")]
    console: bool,
    /// Give the guest a virtio-vsock device exposed on the host at this unix socket: connect and
    /// write `CONNECT <port>` to reach a guest port; guest connections to host port P go to
    /// `PATH_P`.
    #[arg(long, value_name = "PATH", group = "flags")]
    vsock: Option<PathBuf>,
    /// Give the guest a virtio-net device whose backend is this unix stream socket (passt
    /// `-s SOCKET`, gvproxy): SOCKET[,mac=MAC][,mtu=MTU].
    #[arg(long, value_name = "SOCKET[,mac=MAC][,mtu=MTU]", group = "flags")]
    net: Option<NetConfig>,
    /// Serve the VMM API (ping, orderly stop) on this unix socket.
    #[arg(long, value_name = "PATH", group = "flags")]
    api_socket: Option<PathBuf>,
}

impl Args {
    /// The machine description: read from `--config`, or built from the flags (whose defaults
    /// are the description's).
    fn vm_config(self) -> anyhow::Result<VmConfig> {
        if let Some(path) = &self.config {
            return read_config(path);
        }
        let kernel = self.kernel.context("--kernel or --config is needed")?;
        let mut config = VmConfig::new(kernel);
        config.cmdline = self.cmdline.unwrap_or_default();
        config.cpus = self.cpus;
        config.memory_mib = self.memory;
        config
            .devices
            .extend(self.disks.into_iter().map(DeviceConfig::Disk));
        config
            .devices
            .extend(self.shares.into_iter().map(DeviceConfig::Fs));
        if !self.no_rng {
            config.devices.push(DeviceConfig::Rng);
        }
        if let Some(socket) = self.vsock {
            config.devices.push(DeviceConfig::Vsock(VsockConfig {
                cid: GUEST_CID,
                socket,
            }));
        }
        if let Some(net) = self.net {
            config.devices.push(DeviceConfig::Net(net));
        }
        config.serial_log = self.serial_log;
        config.console = self.console;
        config.api_socket = self.api_socket;
        Ok(config)
    }
}

/// Reads and checks a machine description (its files too), so that what is wrong in it is
/// reported as being in that file.
fn read_config(path: &Path) -> anyhow::Result<VmConfig> {
    let what = || format!("reading {}", path.display());
    let json = std::fs::read(path).with_context(what)?;
    let config = VmConfig::from_json(&json).with_context(what)?;
    berth_vmm::config::validate(&config).with_context(what)?;
    Ok(config)
}

/// A virtio-fs share holds one descriptor per file the guest has looked up (20,000 files of a
/// `node_modules` tree are 20,000 descriptors), so the usual soft limit of 1024 would starve the
/// other devices (vsock stops accepting): raise it to the hard limit, and as root the hard limit
/// to the kernel's `fs.nr_open`, as virtiofsd does.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the rlimit it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok());
    let mut wanted = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    if let Some(nr_open) = nr_open.filter(|&n| n > limit.rlim_max) {
        let root = libc::rlimit {
            rlim_cur: nr_open,
            rlim_max: nr_open,
        };
        // SAFETY: setrlimit reads only the rlimit it is given; refused unless privileged.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &root) } == 0 {
            wanted = root;
        }
    }
    // SAFETY: as above; the soft limit never exceeds the hard one here.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
        tracing::warn!(
            "cannot raise the open-file limit from {}: {}",
            limit.rlim_cur,
            std::io::Error::last_os_error()
        );
    } else {
        tracing::debug!(
            "open-file limit {} (was {})",
            wanted.rlim_cur,
            limit.rlim_cur
        );
    }
}

fn main() -> ExitCode {
    berth_errors::abort_on_panic();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    raise_open_file_limit();
    let run = args
        .vm_config()
        .and_then(|config| Ok(berth_vmm::vm::run(&config)?));
    let reason = match run {
        Ok(reason) => reason,
        Err(e) => {
            // `{:#}` prints the chain once: each cause after ": ".
            eprintln!("berth-vmm: error: {e:#}");
            return ExitCode::from(VmmExit::VmmError.code());
        }
    };
    match &reason {
        ExitReason::PowerOff => eprintln!("berth-vmm: guest powered off"),
        ExitReason::Halted => eprintln!("berth-vmm: guest halted"),
        ExitReason::Reset => eprintln!("berth-vmm: guest rebooted"),
        ExitReason::Panic => eprintln!("berth-vmm: guest kernel panicked (see the console log)"),
        ExitReason::Crashed(state) => eprintln!("berth-vmm: guest crashed: triple fault ({state})"),
        ExitReason::Stopped => eprintln!("berth-vmm: the VM was stopped through the API socket"),
        ExitReason::Error(e) => eprintln!("berth-vmm: error: {e}"),
    }
    ExitCode::from(reason.exit_code())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("berth-vmm").chain(args.iter().copied()))
    }

    #[test]
    fn the_net_flag_adds_a_net_device() {
        let config = parse(&["--kernel", "/k", "--net", "/p.sock,mtu=1500"])
            .unwrap()
            .vm_config()
            .unwrap();
        let net = config.devices.iter().find_map(|d| match d {
            DeviceConfig::Net(net) => Some(net),
            _ => None,
        });
        assert_eq!(net, Some(&"/p.sock,mtu=1500".parse::<NetConfig>().unwrap()));
        config.check().unwrap();
        assert!(parse(&["--kernel", "/k", "--net", "/p.sock,mtu=9"]).is_err());
    }

    #[test]
    fn flags_build_the_same_description_with_its_defaults() {
        let config = parse(&[
            "--kernel",
            "/k",
            "--disk",
            "/r.img,ro,serial=berth-root",
            "--disk",
            "/d.img",
            "--fs",
            "home=/home/u,ro",
            "--vsock",
            "/v.sock",
            "--api-socket",
            "/a.sock",
        ])
        .unwrap()
        .vm_config()
        .unwrap();
        let mut want = VmConfig::new("/k");
        want.devices = vec![
            DeviceConfig::Disk("/r.img,ro,serial=berth-root".parse().unwrap()),
            DeviceConfig::Disk("/d.img".parse().unwrap()),
            DeviceConfig::Fs(FsConfig {
                tag: "home".into(),
                path: "/home/u".into(),
                read_only: true,
                cache: berth_machine::ShareCache::Auto,
            }),
            DeviceConfig::Rng,
            DeviceConfig::Vsock(VsockConfig {
                cid: GUEST_CID,
                socket: "/v.sock".into(),
            }),
        ];
        want.api_socket = Some("/a.sock".into());
        assert_eq!(config, want);
        assert_eq!(config.cpus, berth_machine::DEFAULT_CPUS);

        let config = parse(&[
            "--kernel", "/k", "--cpus", "1", "--memory", "512", "--no-rng",
        ])
        .unwrap()
        .vm_config()
        .unwrap();
        assert_eq!((config.cpus, config.memory_mib), (1, 512));
        assert!(config.devices.is_empty());
    }

    #[test]
    fn config_conflicts_with_the_flags_and_one_of_them_is_needed() {
        assert!(parse(&["--config", "/vm.json"]).is_ok());
        let e = parse(&["--config", "/vm.json", "--cpus", "2"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = parse(&["--config", "/vm.json", "--console"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = parse(&[]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn a_bad_description_is_one_line_naming_the_field() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/berth-vmm-main-").unwrap();
        let path = dir.as_path().join("vm.json");
        let kernel = dir.as_path().join("vmlinux");
        std::fs::write(&kernel, b"not really a kernel").unwrap();
        std::fs::write(
            &path,
            format!(
                r#"{{"kernel": "{}", "devices": [{{"type": "disk", "path": "/no/disk.img", "read_only": true}}]}}"#,
                kernel.display()
            ),
        )
        .unwrap();
        let e = read_config(&path).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "reading {}: field `devices[0].path`: cannot open the disk image /no/disk.img read-only: No such file or directory (os error 2)",
                path.display()
            )
        );
        std::fs::write(
            &path,
            r#"{"kernel": "/k", "devices": [{"type": "rng"}, {"type": "disk", "path": ""}]}"#,
        )
        .unwrap();
        let e = read_config(&path).unwrap_err();
        let line = format!("{e:#}");
        assert_eq!(
            line,
            format!(
                "reading {}: field `devices[1].path`: a disk needs a path",
                path.display()
            )
        );
        let e = read_config(&dir.as_path().join("missing.json")).unwrap_err();
        assert!(
            format!("{e:#}").contains("missing.json: No such file"),
            "{e:#}"
        );
    }
}
