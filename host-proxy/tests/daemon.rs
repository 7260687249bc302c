//! The `berth-host-proxy` binary against a fake VMM: this test executable re-run through a
//! small script (so that it takes the VMM's arguments), speaking the hybrid vsock convention
//! with a fake guest agent behind it. Covers the lock, the state files, the Docker socket, the
//! shutdown over the control channel on SIGTERM, and passing on the VMM's exit status.
#![allow(clippy::unwrap_used)] // test helpers panic on purpose

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_protocol::{
    read_frame, write_frame, write_shell_frame, Request, Response, ShellFrame, ShellRequest,
};

const MODE_ENV: &str = "BERTH_FAKE_VMM_MODE";
const ARGS_ENV: &str = "BERTH_FAKE_VMM_ARGS";

/// Not a test: the fake VMM's body, run when this executable is started as the VMM.
#[test]
fn fake_vmm() {
    let Ok(args) = std::env::var(ARGS_ENV) else {
        return;
    };
    let args: Vec<&str> = args.split(' ').collect();
    let value = |flag: &str| {
        let i = args.iter().position(|a| *a == flag).unwrap();
        PathBuf::from(args[i + 1])
    };
    let (vsock, console) = (value("--vsock"), value("--serial-log"));
    std::fs::write(&console, "fake kernel booting\n").unwrap();
    if std::env::var(MODE_ENV).as_deref() == Ok("panic") {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&console, "Kernel panic - not syncing: fake\n").unwrap();
        std::process::exit(3);
    }
    let _ = std::fs::remove_file(&vsock); // as the real VMM does with a stale socket
    let listener = UnixListener::bind(&vsock).unwrap();
    for stream in listener.incoming() {
        let stream = stream.unwrap();
        std::thread::spawn(move || fake_guest(stream));
    }
}

fn fake_guest(stream: UnixStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let port: u32 = line
        .trim()
        .strip_prefix("CONNECT ")
        .unwrap()
        .parse()
        .unwrap();
    let deaf = std::env::var(MODE_ENV).as_deref() == Ok("deaf");
    if deaf && port == berth_protocol::CONTROL_PORT {
        return; // an agent that is not up: the VMM closes without OK
    }
    stream.write_all(b"OK 1073741824\n").unwrap();
    match port {
        berth_protocol::DOCKER_API_PORT => {
            // Reads the request head, answers one ping and closes.
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                .unwrap();
        }
        berth_protocol::CONTROL_PORT => {
            let request: Request = read_frame(&mut reader).unwrap().unwrap();
            match request {
                Request::Shutdown { .. } => {
                    write_frame(&mut stream, &Response::Ack).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    std::process::exit(0); // powered off
                }
                other => {
                    let answer = Response::Error {
                        message: format!("fake guest: {other:?}"),
                    };
                    write_frame(&mut stream, &answer).unwrap();
                }
            }
        }
        berth_protocol::SHELL_PORT => {
            let shell: ShellRequest = read_frame(&mut reader).unwrap().unwrap();
            let ran = format!("ran {}\n", shell.command.join(" "));
            write_shell_frame(&mut stream, &ShellFrame::Stdout(ran.into_bytes())).unwrap();
            write_shell_frame(&mut stream, &ShellFrame::Exit(0)).unwrap();
        }
        _ => {}
    }
}

struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-vmm.sh");
        let exe = std::env::current_exe().unwrap();
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n{ARGS_ENV}=\"$*\" exec '{}' --exact fake_vmm --nocapture --test-threads 1 -q\n",
                exe.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.path().join("rootfs.img"), b"rootfs").unwrap();
        Home { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn host_proxy(&self, mode: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth-host-proxy"));
        cmd.arg("--home")
            .arg(self.path("home"))
            .arg("--vmm")
            .arg(self.path("fake-vmm.sh"))
            .arg("--kernel")
            .arg(self.path("vmlinux"))
            .arg("--rootfs")
            .arg(self.path("rootfs.img"))
            .args(["--cpus", "1", "--memory-mib", "256", "--disk-size-gib", "1"])
            .args(["--shutdown-timeout-secs", "10"])
            .env(MODE_ENV, mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("home/logs/host-proxy.log")).unwrap_or_default()
    }
}

fn ping(socket: &Path) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    Some(response)
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the host proxy did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serves_docker_refuses_a_second_instance_and_shuts_the_guest_down_on_sigterm() {
    let home = Home::new();
    let mut proxy = home.host_proxy("normal").spawn().unwrap();
    let socket = home.path("home/run/docker.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let response = loop {
        match ping(&socket) {
            Some(r) if r.starts_with("HTTP/1.1 200") => break r,
            _ if Instant::now() > deadline => panic!("no ping; log:\n{}", home.log()),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert!(response.ends_with("OK"), "{response}");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the Docker socket is owner-only");

    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path("home/run/state.json")).unwrap()).unwrap();
    assert_eq!(state["pid"], proxy.id());
    assert!(state["vmm_pid"].as_u64().is_some());
    assert_eq!(state["settings"]["memory_mib"], 256);
    let pid = std::fs::read_to_string(home.path("home/run/berth.pid")).unwrap();
    assert_eq!(pid.trim(), proxy.id().to_string());
    assert_eq!(
        std::fs::metadata(home.path("home/data.img")).unwrap().len(),
        1 << 30
    );

    let second = home.host_proxy("normal").output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    assert!(
        ping(&socket).is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "the first one still serves"
    );

    let pid = rustix::process::Pid::from_raw(proxy.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = wait_exit(&mut proxy, Duration::from_secs(20));
    let log = home.log();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(log.contains("acknowledged the shutdown request"), "{log}");
    assert!(log.contains("the guest powered off"), "{log}");
    for gone in ["run/docker.sock", "run/state.json", "run/berth.pid"] {
        assert!(
            !home.path(&format!("home/{gone}")).exists(),
            "{gone} is left behind"
        );
    }
}

#[test]
fn a_guest_that_cannot_be_asked_to_shut_down_is_killed_on_sigterm() {
    let home = Home::new();
    let mut proxy = home.host_proxy("deaf").spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !home.path("home/run/state.json").exists() {
        assert!(
            Instant::now() < deadline,
            "no state file; log:\n{}",
            home.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path("home/run/state.json")).unwrap()).unwrap();
    let vmm_pid = state["vmm_pid"].as_u64().unwrap() as i32;
    let pid = rustix::process::Pid::from_raw(proxy.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = wait_exit(&mut proxy, Duration::from_secs(20));
    let log = home.log();
    assert_eq!(
        status.code(),
        Some(1),
        "a forced stop is not a clean one; log:\n{log}"
    );
    assert!(log.contains("cannot ask the guest to shut down"), "{log}");
    assert!(log.contains("killed by signal 9"), "{log}");
    let vmm = rustix::process::Pid::from_raw(vmm_pid).unwrap();
    assert!(
        rustix::process::test_kill_process(vmm).is_err(),
        "the VMM must not outlive the host proxy"
    );
    assert!(!home.path("home/run/vsock.sock").exists());
}

#[test]
fn exits_with_the_vmms_status_and_cleans_up_when_the_guest_panics() {
    let home = Home::new();
    let mut proxy = home.host_proxy("panic").spawn().unwrap();
    let status = wait_exit(&mut proxy, Duration::from_secs(20));
    let log = home.log();
    assert_eq!(status.code(), Some(3), "log:\n{log}");
    assert!(log.contains("panicked"), "{log}");
    assert!(!home.path("home/run/docker.sock").exists());
    assert!(!home.path("home/run/berth.pid").exists());
    // The next start is not blocked by anything the first one left.
    let mut again = home.host_proxy("panic").spawn().unwrap();
    assert_eq!(
        wait_exit(&mut again, Duration::from_secs(20)).code(),
        Some(3)
    );
}
