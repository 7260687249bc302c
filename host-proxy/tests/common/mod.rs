//! What the daemon tests share: a Berth home with a config file pointing at the fake VMM
//! (`examples/fake_vmm.rs`, which `cargo test` builds next to the test executables), the
//! `berth-host-proxy` binary started on it, and a small HTTP client for the control API.
#![allow(clippy::unwrap_used, dead_code)] // test helpers panic on purpose; not every test uses all

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODE_ENV: &str = "BERTH_FAKE_VMM_MODE";

/// The fake VMM: `target/<profile>/examples/fake_vmm`, built by `cargo test` with the tests.
pub fn fake_vmm() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples/fake_vmm");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test -p berth-host-proxy`, which builds the examples",
        path.display()
    );
    path
}

/// The real passt on `PATH`: the daemon starts one per VM, the tests use it as it is (this
/// machine has a default route, which passt needs).
pub fn passt() -> PathBuf {
    berth_host_proxy::config::on_path("passt")
        .expect("the daemon tests run the real passt: apt-get install passt")
}

/// The pids of the passts the host proxy said it started, in order.
pub fn passt_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("started passt (pid "))
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .collect()
}

pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.path().join("rootfs.img"), b"rootfs").unwrap();
        let config = format!(
            "cpus = 1\nmemory_mib = 256\ndisk_size_gib = 1\nkernel = {:?}\nrootfs = {:?}\nvmm = {:?}\n",
            dir.path().join("vmlinux"),
            dir.path().join("rootfs.img"),
            fake_vmm()
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        Home { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn layout(&self) -> berth_host_proxy::Layout {
        berth_host_proxy::Layout::new(self.path("home"))
    }

    pub fn control(&self) -> PathBuf {
        self.path("home/run/berth.sock")
    }

    pub fn host_proxy(&self, mode: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth-host-proxy"));
        cmd.arg("--home")
            .arg(self.path("home"))
            .args(["--shutdown-timeout-secs", "10"])
            .env("BERTH_CONFIG", self.path("config.toml"))
            .env("BERTH_PASST", passt())
            .env(MODE_ENV, mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the host proxy and waits for its control socket.
    pub fn spawn(&self, mode: &str, extra: &[&str]) -> Proxy {
        let child = self.host_proxy(mode).args(extra).spawn().unwrap();
        self.wait_control();
        Proxy { child }
    }

    /// Waits for the control socket to accept.
    pub fn wait_control(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.control()).is_err() {
            assert!(
                Instant::now() < deadline,
                "no control socket; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("home/logs/host-proxy.log")).unwrap_or_default()
    }

    /// Polls the status until its state is `state`.
    pub fn wait_state(&self, state: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = get(&self.control(), "/v1/status").json();
            if status["state"] == state {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "never {state}: {status}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The host proxy under test; killed if the test fails before it exits.
pub struct Proxy {
    pub child: Child,
}

impl Proxy {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the host proxy did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// Sends one request (with `Connection: close`) and reads the whole answer.
pub fn request(socket: &Path, method: &str, path: &str, body: &str) -> Answer {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

pub fn get(socket: &Path, path: &str) -> Answer {
    request(socket, "GET", path, "")
}

pub fn post(socket: &Path, path: &str, body: &str) -> Answer {
    request(socket, "POST", path, body)
}

/// A client following `GET /v1/events` (a chunked stream of JSON lines).
pub struct Events {
    reader: BufReader<UnixStream>,
    /// The stream ended with HTTP's last chunk (not a broken connection).
    pub ended_cleanly: bool,
}

impl Events {
    pub fn open(socket: &Path) -> Events {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: berth\r\n\r\n")
            .unwrap();
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("application/x-ndjson"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        Events {
            reader,
            ended_cleanly: false,
        }
    }

    /// The next event; `None` when the stream ended.
    pub fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            let mut size = String::new();
            if self.reader.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                self.ended_cleanly = true;
                return None;
            }
            let mut chunk = vec![0u8; size + 2];
            self.reader.read_exact(&mut chunk).unwrap();
            let text = String::from_utf8(chunk[..size].to_vec()).unwrap();
            if let Some(line) = text.lines().find(|l| !l.trim().is_empty()) {
                return Some(serde_json::from_str(line).unwrap());
            }
        }
    }

    /// Events until one for which `until` holds (included).
    pub fn until(&mut self, until: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let mut seen = Vec::new();
        while let Some(event) = self.next() {
            let done = until(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
        panic!("the event stream ended after {seen:?}");
    }
}

/// `GET /_ping` on the Docker socket; the whole answer.
pub fn docker_ping(socket: &Path) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    Some(response)
}
