//! The VMM's API socket: a unix socket (mode 0600) the host proxy uses instead of signals,
//! speaking `berth_machine`'s `VmmRequest`/`VmmResponse` JSON lines. `Ping` is answered with
//! the VMM's pid and size; `Stop` is acknowledged, then the VM stops in order through the exit
//! notifier; `Balloon` sets the balloon's target and `BalloonStats` reads it back with the
//! guest's statistics. A request the VMM does not understand gets `Unsupported` and the
//! connection lives.

use std::io::{BufReader, ErrorKind};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use berth_machine::{
    read_message, write_message, ApiRequest, BalloonRequest, VmmRequest, VmmResponse,
};

use crate::device_manager::Controls;
use crate::devices::virtio::balloon::PAGES_PER_MIB;
use crate::exit::{ExitNotifier, ExitReason};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("VMM API socket {path} exists and is not a socket: refusing to replace it")]
    NotSocket { path: PathBuf },
    #[error("VMM API socket {path} is served by another process")]
    InUse { path: PathBuf },
    #[error("removing the stale VMM API socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on the VMM API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the VMM API thread")]
    Spawn(#[source] std::io::Error),
}

/// What `Ping` reports.
#[derive(Clone, Copy, Debug)]
pub struct VmInfo {
    pub cpus: u8,
    pub memory_mib: u64,
}

/// The devices the API drives, known once they are built: the socket serves from before.
#[derive(Clone, Default)]
pub struct DeviceControls(Arc<OnceLock<Controls>>);

impl DeviceControls {
    /// Hands the API the built devices' controls; only the first call counts.
    pub fn set(&self, controls: Controls) {
        let _ = self.0.set(controls);
    }
}

/// The serving API socket; dropping it stops accepting and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    closing: Arc<AtomicBool>,
}

impl ApiServer {
    /// Listens on `path` (replacing a stale socket there) and serves it on a thread of its own;
    /// each connection gets a thread, so connections may come one after another or at once.
    pub fn start(
        path: &Path,
        info: VmInfo,
        exit: ExitNotifier,
        devices: DeviceControls,
    ) -> Result<Self, Error> {
        let listener = bind(path)?;
        let closing = Arc::new(AtomicBool::new(false));
        let server = ApiServer {
            path: path.to_owned(),
            closing: closing.clone(),
        };
        std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || accept_loop(listener, info, exit, devices, closing))
            .map_err(Error::Spawn)?;
        tracing::info!(path = %path.display(), "VMM API socket serving");
        Ok(server)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `closing` and returns.
        let _ = UnixStream::connect(&self.path);
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "removing the VMM API socket failed: {e}");
        }
    }
}

/// Binds `path`, replacing a socket nobody serves; refuses a live socket or any other file.
fn bind(path: &Path) -> Result<UnixListener, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::NotSocket {
                path: path.to_owned(),
            })
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        Err(_) => {}
    }
    let bind_error = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

fn accept_loop(
    listener: UnixListener,
    info: VmInfo,
    exit: ExitNotifier,
    devices: DeviceControls,
    closing: Arc<AtomicBool>,
) {
    for stream in listener.incoming() {
        if closing.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("accepting a VMM API connection failed: {e}");
                continue;
            }
        };
        let exit = exit.clone();
        let devices = devices.clone();
        let spawned = std::thread::Builder::new()
            .name("vmm-api-conn".into())
            .spawn(move || serve(stream, info, &exit, &devices));
        if let Err(e) = spawned {
            tracing::warn!("starting a VMM API connection thread failed: {e}");
        }
    }
}

/// Answers requests on one connection until the peer closes it.
fn serve(stream: UnixStream, info: VmInfo, exit: &ExitNotifier, devices: &DeviceControls) {
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(e) => {
            tracing::warn!("cloning a VMM API connection failed: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    loop {
        let request = match read_message::<ApiRequest>(&mut reader) {
            Ok(None) => return,
            Ok(Some(request)) => request,
            Err(e) => {
                // Framing is lost (an over-long or cut line): say why, then hang up.
                let answer = VmmResponse::Unsupported {
                    message: e.to_string(),
                };
                let _ = write_message(&mut writer, &answer);
                return;
            }
        };
        let (answer, stop) = match request {
            Ok(ApiRequest::Vmm(VmmRequest::Ping)) => (
                VmmResponse::Pong {
                    pid: std::process::id(),
                    cpus: info.cpus,
                    memory_mib: info.memory_mib,
                },
                false,
            ),
            Ok(ApiRequest::Vmm(VmmRequest::Stop)) => (VmmResponse::Ack, true),
            Ok(ApiRequest::Balloon(request)) => (balloon(request, info, devices), false),
            Err(e) => (
                VmmResponse::Unsupported {
                    message: format!("not a VMM API request: {e}"),
                },
                false,
            ),
        };
        if let Err(e) = write_message(&mut writer, &answer) {
            if e.kind() != ErrorKind::BrokenPipe {
                tracing::warn!("answering on the VMM API socket failed: {e}");
            }
            return;
        }
        if stop {
            tracing::info!("stop requested on the VMM API socket");
            exit.notify(ExitReason::Stopped);
        }
    }
}

/// Answers a balloon request; a bad one changes nothing.
fn balloon(request: BalloonRequest, info: VmInfo, devices: &DeviceControls) -> VmmResponse {
    let error = |message: String| VmmResponse::Error { message };
    let Some(balloon) = devices.0.get().and_then(|c| c.balloon.as_ref()) else {
        return error("the VM has no balloon device".into());
    };
    match request {
        BalloonRequest::Balloon { mib } => {
            let pages = (mib <= info.memory_mib)
                .then(|| mib.checked_mul(PAGES_PER_MIB))
                .flatten()
                .and_then(|pages| u32::try_from(pages).ok());
            let Some(pages) = pages else {
                return error(format!(
                    "a balloon of {mib} MiB is more than the guest's {} MiB of memory: nothing changed",
                    info.memory_mib
                ));
            };
            balloon.set_target_pages(pages);
            VmmResponse::Ack
        }
        BalloonRequest::BalloonStats => {
            let status = balloon.status();
            VmmResponse::BalloonStatus {
                target_mib: u64::from(status.target_pages) / PAGES_PER_MIB,
                actual_mib: u64::from(status.actual_pages) / PAGES_PER_MIB,
                stats: Box::new(status.stats),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{BufRead, Write};
    use std::sync::mpsc::Receiver;
    use std::time::Duration;

    use super::*;

    const INFO: VmInfo = VmInfo {
        cpus: 2,
        memory_mib: 2048,
    };

    struct Client {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl Client {
        fn connect(path: &Path) -> Self {
            let stream = UnixStream::connect(path).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            Client {
                writer: stream.try_clone().unwrap(),
                reader: BufReader::new(stream),
            }
        }

        fn send_raw(&mut self, bytes: &[u8]) -> VmmResponse {
            self.writer.write_all(bytes).unwrap();
            read_message(&mut self.reader).unwrap().unwrap().unwrap()
        }

        /// Sends one request (a `VmmRequest` or a `BalloonRequest`) and reads its answer.
        fn ask(&mut self, request: &(impl Clone + Into<ApiRequest>)) -> VmmResponse {
            write_message(&mut self.writer, &request.clone().into()).unwrap();
            read_message(&mut self.reader).unwrap().unwrap().unwrap()
        }
    }

    fn start(dir: &Path) -> (ApiServer, Receiver<ExitReason>, PathBuf) {
        let path = dir.join("vmm.sock");
        let (exit, exits) = ExitNotifier::new();
        (
            ApiServer::start(&path, INFO, exit, DeviceControls::default()).unwrap(),
            exits,
            path,
        )
    }

    fn tempdir() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/berth-vmm-api-").unwrap()
    }

    #[test]
    fn ping_answers_with_the_vmms_pid_and_size_on_connection_after_connection() {
        let dir = tempdir();
        let (_server, exits, path) = start(dir.as_path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "only the host proxy's user may connect"
        );
        for _ in 0..3 {
            let mut client = Client::connect(&path);
            for _ in 0..2 {
                assert_eq!(
                    client.ask(&VmmRequest::Ping),
                    VmmResponse::Pong {
                        pid: std::process::id(),
                        cpus: 2,
                        memory_mib: 2048
                    }
                );
            }
        }
        assert!(exits.try_recv().is_err(), "a ping stops nothing");
    }

    #[test]
    fn unknown_and_malformed_requests_are_unsupported_and_the_connection_lives() {
        let dir = tempdir();
        let (_server, exits, path) = start(dir.as_path());
        let mut client = Client::connect(&path);
        let answer = client.send_raw(b"{\"op\":\"hibernate\"}\n");
        assert!(
            matches!(&answer, VmmResponse::Unsupported { message } if message.contains("hibernate")),
            "{answer:?}"
        );
        // A known op with a bad field names the op.
        let answer = client.send_raw(b"{\"op\":\"balloon\",\"mib\":\"lots\"}\n");
        assert!(
            matches!(&answer, VmmResponse::Unsupported { message } if message.contains("op `balloon`")),
            "{answer:?}"
        );
        let answer = client.send_raw(b"this is not json\n");
        assert!(
            matches!(answer, VmmResponse::Unsupported { .. }),
            "{answer:?}"
        );
        assert!(matches!(
            client.ask(&VmmRequest::Ping),
            VmmResponse::Pong { .. }
        ));
        assert!(exits.try_recv().is_err());

        // A line too long to frame is answered, then the connection ends; the server lives.
        let mut huge = vec![b'x'; berth_machine::MAX_MESSAGE + 10];
        huge.push(b'\n');
        let answer = client.send_raw(&huge);
        assert!(
            matches!(answer, VmmResponse::Unsupported { .. }),
            "{answer:?}"
        );
        let mut rest = String::new();
        assert_eq!(client.reader.read_line(&mut rest).unwrap(), 0, "{rest}");
        assert!(matches!(
            Client::connect(&path).ask(&VmmRequest::Ping),
            VmmResponse::Pong { .. }
        ));
    }

    #[test]
    fn balloon_sets_the_target_in_mib_and_balloon_stats_reads_it_back() {
        use crate::devices::virtio::{Balloon, Interrupt, VirtioDevice, INT_CONFIG};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

        let dir = tempdir();
        let path = dir.as_path().join("vmm.sock");
        let (exit, _exits) = ExitNotifier::new();
        let devices = DeviceControls::default();
        let _server = ApiServer::start(&path, INFO, exit, devices.clone()).unwrap();
        let mut client = Client::connect(&path);
        let balloon_of = |mib| BalloonRequest::Balloon { mib };

        // Before the devices are built, or in a VM without a balloon: a clear error.
        let answer = client.ask(&balloon_of(512));
        assert!(
            matches!(&answer, VmmResponse::Error { message } if message.contains("no balloon")),
            "{answer:?}"
        );

        let mut balloon = Balloon::new(None);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        balloon.attach_interrupt(&interrupt);
        devices.set(Controls {
            balloon: Some(balloon.handle()),
        });
        assert_eq!(client.ask(&balloon_of(512)), VmmResponse::Ack);
        assert_eq!(interrupt.status(), INT_CONFIG, "the guest is told");
        let mut num_pages = [0u8; 4];
        balloon.read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 512 * 256);
        interrupt.ack(INT_CONFIG);

        // The guest says it gave 100 MiB.
        balloon.write_config(4, &(100u32 * 256).to_le_bytes());
        assert_eq!(
            client.ask(&BalloonRequest::BalloonStats),
            VmmResponse::BalloonStatus {
                target_mib: 512,
                actual_mib: 100,
                stats: Default::default(),
            }
        );

        // More than the guest's memory: refused, nothing changed, no interrupt.
        let answer = client.ask(&balloon_of(INFO.memory_mib + 1));
        assert!(
            matches!(&answer, VmmResponse::Error { message }
                if message.contains("2049 MiB is more than the guest's 2048 MiB")),
            "{answer:?}"
        );
        assert!(matches!(
            client.ask(&balloon_of(u64::MAX)),
            VmmResponse::Error { .. }
        ));
        assert_eq!(interrupt.status(), 0);
        assert!(matches!(
            client.ask(&BalloonRequest::BalloonStats),
            VmmResponse::BalloonStatus {
                target_mib: 512,
                ..
            }
        ));
        // All of the guest's memory is a valid target; 0 gives it all back.
        assert_eq!(client.ask(&balloon_of(INFO.memory_mib)), VmmResponse::Ack);
        assert_eq!(client.ask(&balloon_of(0)), VmmResponse::Ack);
        balloon.read_config(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 0);
    }

    #[test]
    fn stop_is_acknowledged_then_stops_the_vm() {
        let dir = tempdir();
        let (_server, exits, path) = start(dir.as_path());
        let mut client = Client::connect(&path);
        assert_eq!(client.ask(&VmmRequest::Stop), VmmResponse::Ack);
        assert_eq!(
            exits.recv_timeout(Duration::from_secs(5)).unwrap(),
            ExitReason::Stopped
        );
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_or_a_file_is_refused_and_exit_removes_it() {
        let dir = tempdir();
        let path = dir.as_path().join("vmm.sock");
        // A socket left by a VMM that died: bound, then its listener closed.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (exit, _exits) = ExitNotifier::new();
        let server =
            ApiServer::start(&path, INFO, exit.clone(), DeviceControls::default()).unwrap();
        assert!(matches!(
            Client::connect(&path).ask(&VmmRequest::Ping),
            VmmResponse::Pong { .. }
        ));

        let e = ApiServer::start(&path, INFO, exit.clone(), DeviceControls::default())
            .err()
            .unwrap();
        assert!(matches!(e, Error::InUse { .. }), "{e}");

        drop(server);
        assert!(!path.exists(), "the socket file is removed at exit");

        std::fs::write(&path, b"not a socket").unwrap();
        let e = ApiServer::start(&path, INFO, exit, DeviceControls::default())
            .err()
            .unwrap();
        assert!(matches!(e, Error::NotSocket { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}
