//! The `berth-vmm` child: the machine description it boots (`run/vm.json`), starting it, what
//! its exit status means, and the client side of its API socket (`run/vmm.sock`).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use berth_machine::{
    ApiRequest, BalloonConfig, BalloonRequest, DeviceConfig, DiskConfig, VmConfig, VmmExit,
    VmmRequest, VmmResponse, VsockConfig, DATA_DISK_SERIAL, GUEST_CID, MAX_MESSAGE,
    ROOT_DISK_SERIAL,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::control_api::model::BalloonStatus;
use crate::layout::Layout;
use crate::settings::VmSettings;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the settings do not make a machine the VMM boots")]
    Describe(#[source] berth_machine::Error),
    #[error("cannot write {}", path.display())]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VMM {}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the VMM's API socket {}", path.display())]
    ApiConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's API socket")]
    ApiIo(#[source] std::io::Error),
    #[error("the VMM's API socket did not answer within {0:?}")]
    ApiTimeout(Duration),
    #[error("the VMM's API socket closed without answering")]
    ApiClosed,
    #[error("the VMM's API socket answered with something else than JSON")]
    ApiDecode(#[source] serde_json::Error),
    #[error("the VMM refused {request}: {answer:?}")]
    ApiRefused {
        request: &'static str,
        answer: VmmResponse,
    },
}

/// The machine `settings` describe, with its files in `layout`.
pub fn vm_config(settings: &VmSettings, layout: &Layout) -> VmConfig {
    VmConfig {
        cpus: settings.cpus,
        memory_mib: settings.memory_mib,
        kernel: settings.kernel.clone(),
        cmdline: settings.cmdline(),
        devices: vec![
            DeviceConfig::Disk(DiskConfig {
                path: settings.rootfs.clone(),
                read_only: true,
                serial: Some(ROOT_DISK_SERIAL.into()),
            }),
            DeviceConfig::Disk(DiskConfig {
                path: layout.data_disk(),
                read_only: false,
                serial: Some(DATA_DISK_SERIAL.into()),
            }),
            DeviceConfig::Rng,
            DeviceConfig::Vsock(VsockConfig {
                cid: GUEST_CID,
                socket: layout.vsock_socket(),
            }),
            DeviceConfig::Net(crate::passt::net_device(layout)),
            // Free page reporting hands what the guest frees back to the host at once.
            DeviceConfig::Balloon(BalloonConfig::default()),
        ]
        .into_iter()
        .chain(
            crate::settings::fs_devices(&settings.shares, settings.share_cache)
                .into_iter()
                .map(DeviceConfig::Fs),
        )
        .collect(),
        serial_log: Some(layout.console_log()),
        console: false,
        api_socket: Some(layout.vmm_api_socket()),
    }
}

/// Writes `config` to `layout.vm_config()` so that a reader sees the old file or the new one.
pub fn write_config(config: &VmConfig, layout: &Layout) -> Result<PathBuf, Error> {
    let path = layout.vm_config();
    config.check().map_err(Error::Describe)?;
    let json = config.to_json().map_err(Error::Describe)?;
    crate::layout::write_atomic(&path, json.as_bytes()).map_err(|source| Error::WriteConfig {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Starts `vmm --config <config>`; its stdout and stderr lines go to our log. It is killed if
/// the handle drops.
pub fn spawn(vmm: &Path, config: &Path) -> Result<Child, Error> {
    let mut child = Command::new(vmm)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn {
            path: vmm.into(),
            source,
        })?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(err));
    }
    Ok(child)
}

async fn log_lines(from: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        tracing::info!(target: "berth_vmm", "{line}");
    }
}

/// How a VMM process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// One of the statuses the VMM uses.
    Known(VmmExit),
    /// A status the VMM never uses.
    Unexpected(i32),
    /// Killed by a signal (our SIGKILL, the OOM killer, a user).
    Signal(i32),
}

impl Exit {
    pub fn from_status(status: ExitStatus) -> Exit {
        match (status.code(), status.signal()) {
            (Some(code), _) => VmmExit::from_code(code).map_or(Exit::Unexpected(code), Exit::Known),
            (None, Some(sig)) => Exit::Signal(sig),
            (None, None) => Exit::Unexpected(-1),
        }
    }

    /// What happened, in words (the log's "VMM exited: ..." line and the state's reason).
    pub fn describe(self) -> String {
        match self {
            Exit::Known(exit) => exit.describe().into(),
            Exit::Unexpected(code) => format!("the VMM exited with unexpected status {code}"),
            Exit::Signal(sig) => format!("the VMM was killed by signal {sig}"),
        }
    }

    /// Whether the VM ended by failure rather than by a power-off or a stop.
    pub fn is_crash(self) -> bool {
        match self {
            Exit::Known(exit) => exit.is_crash(),
            Exit::Unexpected(_) | Exit::Signal(_) => true,
        }
    }
}

/// How long a VMM that is just starting may take to listen on its API socket: the socket's file
/// exists from `bind`, connections are refused until `listen`.
const API_LISTEN_GRACE: Duration = Duration::from_secs(1);

/// Connects to the API socket, waiting up to [`API_LISTEN_GRACE`] for a VMM that is not listening
/// yet (a stop asked for right after the start).
async fn api_connect(socket: &Path) -> Result<UnixStream, Error> {
    let started = std::time::Instant::now();
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && started.elapsed() < API_LISTEN_GRACE =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(source) => {
                return Err(Error::ApiConnect {
                    path: socket.into(),
                    source,
                })
            }
        }
    }
}

/// The resident memory of process `pid` in KiB (`VmRSS` in /proc; `None` where there is no
/// /proc or no such process).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sends one request on the VMM's API socket and reads its answer, within `timeout`.
pub async fn api_request(
    socket: &Path,
    request: impl Into<ApiRequest>,
    timeout: Duration,
) -> Result<VmmResponse, Error> {
    let request = request.into();
    let exchange = async {
        let mut stream = BufReader::new(api_connect(socket).await?);
        let mut line = serde_json::to_vec(&request).map_err(Error::ApiDecode)?;
        line.push(b'\n');
        stream
            .get_mut()
            .write_all(&line)
            .await
            .map_err(Error::ApiIo)?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_MESSAGE as u64 + 1)
            .read_until(b'\n', &mut answer)
            .await
            .map_err(Error::ApiIo)?;
        if answer.last() != Some(&b'\n') {
            return Err(Error::ApiClosed);
        }
        serde_json::from_slice(&answer).map_err(Error::ApiDecode)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(Error::ApiTimeout(timeout)))
}

/// Asks the VMM for its orderly stop (it flushes the disks and exits with `VmmExit::Stopped`).
pub async fn api_stop(socket: &Path, timeout: Duration) -> Result<(), Error> {
    match api_request(socket, VmmRequest::Stop, timeout).await? {
        VmmResponse::Ack => Ok(()),
        answer => Err(Error::ApiRefused {
            request: "stop",
            answer,
        }),
    }
}

/// Asks the VMM for its balloon's target, what the guest gave and the guest's statistics.
pub async fn api_balloon_status(socket: &Path, timeout: Duration) -> Result<BalloonStatus, Error> {
    match api_request(socket, BalloonRequest::BalloonStats, timeout).await? {
        VmmResponse::BalloonStatus {
            target_mib,
            actual_mib,
            stats,
        } => Ok(BalloonStatus {
            target_mib,
            actual_mib,
            stats: *stats,
        }),
        answer => Err(Error::ApiRefused {
            request: "balloon_stats",
            answer,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_for_a_live_process_and_none_for_a_gone_one() {
        let rss = rss_kib(std::process::id()).expect("this test's own RSS");
        assert!(rss > 0);
        assert_eq!(rss_kib(u32::MAX), None);
    }

    #[tokio::test]
    async fn a_stop_asked_before_the_vmm_listens_waits_for_it() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.sock");
        // Bound but not listening: what a starting VMM's socket is between bind and listen.
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        socket.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        assert_eq!(
            std::os::unix::net::UnixStream::connect(&path)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        let vmm = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            socket.listen(1).unwrap();
            let listener: std::os::unix::net::UnixListener = socket.into();
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line).unwrap();
            assert_eq!(
                serde_json::from_str::<VmmRequest>(&line).unwrap(),
                VmmRequest::Stop
            );
            let mut answer = serde_json::to_vec(&VmmResponse::Ack).unwrap();
            answer.push(b'\n');
            std::io::Write::write_all(&mut &stream, &answer).unwrap();
        });
        api_stop(&path, Duration::from_secs(5)).await.unwrap();
        vmm.join().unwrap();
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_an_error_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.sock");
        let started = std::time::Instant::now();
        let err = api_stop(&path, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, Error::ApiConnect { .. }), "{err:?}");
        assert!(started.elapsed() >= API_LISTEN_GRACE);
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn the_root_image_is_read_only_first_and_the_data_disk_has_its_serial() {
        let layout = Layout::new("/h");
        let settings = VmSettings {
            vmm: "/bin/berth-vmm".into(),
            kernel: "/k/bzImage".into(),
            rootfs: "/r/rootfs.ext4".into(),
            cpus: 2,
            memory_mib: 1024,
            disk_size_gib: 8,
            cmdline_extra: "quiet".into(),
            shares: Vec::new(),
            ports_bind_address: None,
            share_cache: Default::default(),
        };
        let config = vm_config(&settings, &layout);
        config.check().unwrap();
        assert_eq!(
            config.cmdline,
            "root=/dev/vda ro rootfstype=ext4 berth.data=serial:berth-data \
             berth.net=192.168.127.2/24,192.168.127.1,192.168.127.53,65506 quiet"
        );
        let disks: Vec<_> = config.disks().collect();
        assert_eq!(disks[0].path, Path::new("/r/rootfs.ext4"));
        assert!(disks[0].read_only);
        assert_eq!(disks[0].serial.as_deref(), Some(ROOT_DISK_SERIAL));
        assert_eq!(disks[1].path, Path::new("/h/data.img"));
        assert!(!disks[1].read_only);
        assert_eq!(disks[1].serial.as_deref(), Some(DATA_DISK_SERIAL));
        assert!(config.devices.contains(&DeviceConfig::Rng));
        assert!(config
            .devices
            .contains(&DeviceConfig::Balloon(BalloonConfig::default())));
        assert_eq!(config.vsock_socket(), Some(Path::new("/h/run/vsock.sock")));
        assert_eq!(
            config.api_socket.as_deref(),
            Some(Path::new("/h/run/vmm.sock"))
        );
        assert_eq!(
            config.serial_log.as_deref(),
            Some(Path::new("/h/logs/console.log"))
        );
    }

    #[test]
    fn the_vm_gets_passts_socket_as_its_network_and_one_fs_device_per_share() {
        let layout = Layout::new("/h");
        let settings = VmSettings {
            vmm: "/bin/berth-vmm".into(),
            kernel: "/k/bzImage".into(),
            rootfs: "/r/rootfs.ext4".into(),
            cpus: 1,
            memory_mib: 512,
            disk_size_gib: 8,
            cmdline_extra: String::new(),
            shares: vec![
                crate::settings::Share {
                    path: "/home/u".into(),
                    alias: None,
                    read_only: false,
                },
                crate::settings::Share {
                    path: "/data".into(),
                    alias: None,
                    read_only: true,
                },
            ],
            ports_bind_address: None,
            share_cache: Default::default(),
        };
        let config = vm_config(&settings, &layout);
        config.check().unwrap();
        let nets: Vec<_> = config
            .devices
            .iter()
            .filter_map(|d| match d {
                DeviceConfig::Net(net) => Some(net),
                _ => None,
            })
            .collect();
        assert_eq!(nets.len(), 1);
        assert_eq!(nets[0].socket, Path::new("/h/run/passt/passt.sock"));
        assert_eq!(nets[0].mac, "52:54:00:12:34:56");
        let fs: Vec<_> = config
            .devices
            .iter()
            .filter_map(|d| match d {
                DeviceConfig::Fs(fs) => {
                    Some((fs.tag.as_str(), fs.path.to_str().unwrap(), fs.read_only))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            fs,
            [
                ("berth-share-0", "/home/u", false),
                ("berth-share-1", "/data", true)
            ]
        );
        assert!(
            config
                .cmdline
                .contains(" berth.share=berth-share-1,ro,/data"),
            "{}",
            config.cmdline
        );
    }

    #[test]
    fn exit_statuses_are_named() {
        let exit = |raw| Exit::from_status(ExitStatus::from_raw(raw));
        assert_eq!(exit(0).describe(), "the guest powered off");
        assert!(!exit(0).is_crash());
        assert_eq!(exit(2 << 8).describe(), "the guest rebooted");
        assert!(exit(3 << 8).describe().contains("panicked"));
        assert!(exit(3 << 8).is_crash());
        assert!(exit(4 << 8).describe().contains("triple fault"));
        assert!(
            !exit(5 << 8).is_crash(),
            "a stop through the API is no crash"
        );
        assert!(exit(9).describe().contains("signal 9"));
        assert!(exit(9).is_crash());
        assert!(exit(77 << 8).describe().contains("unexpected status 77"));
    }
}
