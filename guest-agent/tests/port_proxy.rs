//! The agent binary run as dockerd runs its userland proxy: argv[0] the proxy path, the flags
//! of dockerd 20.10/26, a pipe on fd 3; the host proxy stood in for by a unix socket
//! (`BERTH_PORT_PROXY_PUBLISH_SOCKET`).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_protocol::ports::{Publish, PublishReply};
use berth_protocol::{read_frame, write_frame};

struct Rig {
    dir: PathBuf,
    host: UnixListener,
    container_port: u16,
    host_port: u16,
}

impl Rig {
    fn new(name: &str) -> Rig {
        let dir =
            std::env::temp_dir().join(format!("berth-port-proxy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let host = UnixListener::bind(dir.join("publish.sock")).unwrap();
        let container = TcpListener::bind("127.0.0.1:0").unwrap();
        let container_port = container.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in container.incoming() {
                let mut conn = conn.unwrap();
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                conn.write_all(&got).unwrap();
            }
        });
        let host_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Rig {
            dir,
            host,
            container_port,
            host_port,
        }
    }

    /// Starts the proxy as dockerd does; returns it and the read end of its fd 3.
    fn spawn(&self) -> (Child, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just returned these and nothing else owns them.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let w_raw = w.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth-agent"));
        cmd.arg0("/usr/libexec/berth/port-proxy")
            .args(["-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port"])
            .arg(self.host_port.to_string())
            .args(["-container-ip", "127.0.0.1", "-container-port"])
            .arg(self.container_port.to_string())
            .env(
                "BERTH_PORT_PROXY_PUBLISH_SOCKET",
                self.dir.join("publish.sock"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: dup2 and fcntl are async-signal-safe; they only touch the child's fds.
        unsafe {
            cmd.pre_exec(move || {
                if w_raw == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0);
                } else if libc::dup2(w_raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(w);
        (child, std::fs::File::from(r))
    }

    /// The host's side of one publish: reads the request and answers `reply`.
    fn answer(&self, reply: &PublishReply) -> (Publish, UnixStream) {
        self.host.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut conn = loop {
            match self.host.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the proxy never asked the host");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let asked: Publish = read_frame(&mut conn).unwrap().unwrap();
        write_frame(&mut conn, reply).unwrap();
        (asked, conn)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn report(mut pipe: std::fs::File) -> String {
    let mut text = String::new();
    pipe.read_to_string(&mut text).unwrap();
    text
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the proxy did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_published_port_reports_ready_forwards_and_stops_on_sigint() {
    let rig = Rig::new("bound");
    let (mut child, pipe) = rig.spawn();
    let (asked, _conn) = rig.answer(&PublishReply::Bound {
        host_ip: "127.0.0.1".parse().unwrap(),
        host_port: rig.host_port,
    });
    assert_eq!(asked.host_port, rig.host_port);
    assert_eq!(asked.container_port, rig.container_port);
    assert_eq!(report(pipe), "0\n");
    let mut client = TcpStream::connect(("127.0.0.1", rig.host_port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"through the guest").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    client.read_to_string(&mut back).unwrap();
    assert_eq!(back, "through the guest");
    // dockerd's stop.
    // SAFETY: signals the child this test started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(wait(&mut child).code(), Some(0));
}

#[test]
fn a_refused_publish_reports_the_hosts_words_and_exits() {
    let rig = Rig::new("refused");
    let (mut child, pipe) = rig.spawn();
    let message = "listen tcp4 127.0.0.1:8080: bind: address already in use";
    rig.answer(&PublishReply::Refused {
        message: message.into(),
    });
    assert_eq!(report(pipe), format!("1\n{message}"));
    assert_eq!(wait(&mut child).code(), Some(1));
    // Its guest listener went with it.
    assert!(TcpListener::bind(("127.0.0.1", rig.host_port)).is_ok());
}

#[test]
fn the_host_ending_the_publish_ends_the_proxy() {
    let rig = Rig::new("ended");
    let (mut child, pipe) = rig.spawn();
    let (_, conn) = rig.answer(&PublishReply::Bound {
        host_ip: "127.0.0.1".parse().unwrap(),
        host_port: rig.host_port,
    });
    assert_eq!(report(pipe), "0\n");
    drop(conn);
    assert_eq!(wait(&mut child).code(), Some(1));
}
