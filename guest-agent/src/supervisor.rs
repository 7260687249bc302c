//! Keeps containerd and dockerd running: one thread per daemon starts it with its output piped
//! into a rotated log file, waits for its exit (delivered by PID 1's reaper through the child
//! registry) and restarts it with backoff, publishing `DaemonExited` and, once dockerd answers
//! again, `DaemonReady` on the event bus; at shutdown `stop` ends dockerd, then containerd.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_protocol::Event;

use crate::children::{self, ExitWatch};
use crate::events::Bus;
use crate::logfile::{self, RotatingLog};
use crate::{cgroups, console, daemons, readiness};

/// First restart delay; it doubles per quick failure up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run at least this long resets the delay to `FIRST_BACKOFF`.
const RESET_AFTER: Duration = Duration::from_secs(60);
/// How long dockerd waits for containerd's socket before its first start. dockerd can do nothing
/// without containerd; containerd took 11 s to serve in the nested rig, after which a 10 s wait
/// started dockerd early, to dial containerd on its own, and lost the boot breakdown's mark.
const DEPENDENCY_WAIT: Duration = Duration::from_secs(60);
const READY_POLL: Duration = Duration::from_millis(200);

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] daemons::Error),
    #[error("open the log of {0}")]
    Log(&'static str, #[source] logfile::Error),
    #[error(transparent)]
    Child(#[from] children::Error),
    #[error("share the output pipe of {0}")]
    Pipe(&'static str, #[source] std::io::Error),
    #[error("start the supervisor thread of {0}")]
    Thread(&'static str, #[source] std::io::Error),
}

/// The restart delays: 1 s, 2 s, 4 s ... 30 s, back to 1 s after a run of a minute or more.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration) -> Backoff {
        Backoff { first, next: first }
    }

    /// The delay before the restart that follows a run of length `ran`.
    pub fn after_run(&mut self, ran: Duration) -> Duration {
        if ran >= RESET_AFTER {
            self.next = self.first;
        }
        let delay = self.next;
        self.next = (delay * 2).min(MAX_BACKOFF.max(self.first));
        delay
    }
}

/// How to run one daemon.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    /// A socket that must exist before the first start (dockerd needs containerd's).
    pub wait_for: Option<PathBuf>,
    /// A dockerd socket to `/_ping` after each start, announcing when it answers.
    pub ping: Option<PathBuf>,
    pub first_backoff: Duration,
    /// The `cgroup.procs` the daemon joins before it execs (`cgroups::daemon_group`).
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct State {
    pid: Option<libc::pid_t>,
    stopping: bool,
}

/// One supervised daemon.
#[derive(Debug)]
pub struct Service {
    spec: Spec,
    state: Mutex<State>,
    changed: Condvar,
    log: Mutex<RotatingLog>,
    events: Arc<Bus>,
}

impl Service {
    /// Opens the daemon's log and starts its supervisor thread, which publishes the daemon's
    /// exits and readiness on `events`.
    pub fn start(spec: Spec, events: Arc<Bus>) -> Result<Arc<Service>, Error> {
        let log = RotatingLog::open(&spec.log, logfile::MAX_BYTES)
            .map_err(|e| Error::Log(spec.name, e))?;
        let name = spec.name;
        let service = Arc::new(Service {
            spec,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            log: Mutex::new(log),
            events,
        });
        let run = Arc::clone(&service);
        std::thread::Builder::new()
            .name(format!("supervise-{name}"))
            .spawn(move || run.supervise())
            .map_err(|e| Error::Thread(name, e))?;
        Ok(service)
    }

    /// The daemon's PID while it runs.
    pub fn pid(&self) -> Option<libc::pid_t> {
        self.state().pid
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn supervise(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.spec.first_backoff);
        if let Some(socket) = &self.spec.wait_for {
            self.wait_for_socket(socket);
            // The boot benchmark's "containerd ready" mark.
            if socket.exists() {
                console::say(&format!(
                    "{} found {} uptime={:.3}s",
                    self.spec.name,
                    socket.display(),
                    readiness::uptime()
                ));
            } else if !self.state().stopping {
                console::warn(&format!(
                    "{} did not find {} within {DEPENDENCY_WAIT:?}; starting it anyway",
                    self.spec.name,
                    socket.display()
                ));
            }
        }
        loop {
            let started = Instant::now();
            let outcome = match self.run_once() {
                Ok(None) => return,
                Ok(Some(watch)) => watch.wait().map(|e| children::describe(e.status)),
                Err(e) => Some(format!("could not start: {}", console::chain(&e))),
            };
            self.state().pid = None;
            self.changed.notify_all();
            let delay = backoff.after_run(started.elapsed());
            if self.state().stopping {
                return;
            }
            let status = outcome.unwrap_or_else(|| "unknown status".to_string());
            console::say(&format!(
                "{} exited ({status}), restarting in {} s",
                self.spec.name,
                delay.as_secs_f64()
            ));
            self.events.publish(&Event::DaemonExited {
                daemon: self.spec.name.to_string(),
                status,
                restart_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            });
            if self.sleep_unless_stopping(delay) {
                return;
            }
        }
    }

    /// Starts the daemon once; `None` when a stop came first.
    fn run_once(self: &Arc<Self>) -> Result<Option<ExitWatch>, Error> {
        let mut state = self.state();
        if state.stopping {
            return Ok(None);
        }
        let (read, write) = children::pipe()?;
        let write_err = write
            .try_clone()
            .map_err(|e| Error::Pipe(self.spec.name, e))?;
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .env_clear()
            .env("PATH", daemons::PATH)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(write_err));
        if let Some(procs) = &self.spec.cgroup {
            join_cgroup_before_exec(&mut cmd, procs);
        }
        let spawned = children::spawn(&mut cmd)?;
        // Our copies of the pipe's write end go with `cmd`, so the pump sees the daemon's EOF.
        drop(cmd);
        state.pid = Some(spawned.pid);
        drop(state);
        self.changed.notify_all();
        console::say(&format!("started {} (pid {})", self.spec.name, spawned.pid));
        let header = format!(
            "--- berth-agent: started {} (pid {}) at uptime {:.3}s ---\n",
            self.spec.name,
            spawned.pid,
            readiness::uptime()
        );
        let _ = self.log.lock().map(|mut log| log.write(header.as_bytes()));
        self.spawn_helpers(File::from(read), spawned.pid);
        Ok(Some(spawned.exit))
    }

    /// The log pump for this run and, for dockerd, the readiness probe.
    fn spawn_helpers(self: &Arc<Self>, output: File, pid: libc::pid_t) {
        let me = Arc::clone(self);
        let pump = std::thread::Builder::new()
            .name(format!("log-{}", self.spec.name))
            .spawn(move || logfile::pump(output, &me.log));
        if let Err(e) = pump {
            console::warn(&format!("{}: no log pump: {e}", self.spec.name));
        }
        if let Some(socket) = self.spec.ping.clone() {
            let me = Arc::clone(self);
            let probe = std::thread::Builder::new()
                .name(format!("ready-{}", self.spec.name))
                .spawn(move || me.announce_ready(&socket, pid));
            if let Err(e) = probe {
                console::warn(&format!("{}: no readiness probe: {e}", self.spec.name));
            }
        }
    }

    /// Pings until this run of the daemon answers, then prints `<name> ready uptime=<s>s` and
    /// publishes `DaemonReady`.
    fn announce_ready(&self, socket: &Path, pid: libc::pid_t) {
        while self.pid() == Some(pid) {
            if daemons::ping(socket, Duration::from_secs(2)).unwrap_or(false) {
                console::say(&format!(
                    "{} ready uptime={:.3}s",
                    self.spec.name,
                    readiness::uptime()
                ));
                self.events.publish(&Event::DaemonReady {
                    daemon: self.spec.name.to_string(),
                });
                return;
            }
            std::thread::sleep(READY_POLL);
        }
    }

    fn wait_for_socket(&self, socket: &Path) {
        let deadline = Instant::now() + DEPENDENCY_WAIT;
        while !socket.exists() && Instant::now() < deadline && !self.state().stopping {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sleeps `delay` or until a stop; returns whether a stop came.
    fn sleep_unless_stopping(&self, delay: Duration) -> bool {
        let state = self.state();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, delay, |s| !s.stopping)
            .unwrap_or_else(|p| p.into_inner());
        state.stopping
    }

    /// Stops supervising, sends SIGTERM and waits up to `grace` for the exit (SIGKILL after
    /// it). `reap` runs between checks: the caller may be the thread that reaps for PID 1.
    /// Returns whether the daemon ended within `grace`.
    pub fn stop(&self, grace: Duration, mut reap: impl FnMut()) -> bool {
        let pid = {
            let mut state = self.state();
            state.stopping = true;
            state.pid
        };
        self.changed.notify_all();
        let Some(pid) = pid else { return true };
        console::say(&format!("stopping {} (pid {pid})", self.spec.name));
        for (sig, wait) in [
            (libc::SIGTERM, grace),
            (libc::SIGKILL, Duration::from_secs(2)),
        ] {
            // SAFETY: kill(2) on the daemon's PID, which stays ours until its exit is reaped.
            unsafe { libc::kill(pid, sig) };
            if self.wait_exited(wait, &mut reap) {
                console::say(&format!("{} stopped", self.spec.name));
                return sig == libc::SIGTERM;
            }
            if sig == libc::SIGTERM {
                console::warn(&format!(
                    "{} did not stop within {} s; killing it",
                    self.spec.name,
                    grace.as_secs()
                ));
            }
        }
        false
    }

    fn wait_exited(&self, timeout: Duration, reap: &mut impl FnMut()) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            reap();
            let state = self.state();
            if state.pid.is_none() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            drop(self.changed.wait_timeout(state, step));
        }
    }
}

/// containerd and dockerd.
#[derive(Debug)]
pub struct Supervisor {
    pub containerd: Arc<Service>,
    pub dockerd: Arc<Service>,
}

/// Makes the child write itself (`0`) into `procs` between fork and exec, so the daemon and all
/// it starts live in that group from their first instruction. A failed write leaves the child
/// where it was (the root group): the daemon still runs.
fn join_cgroup_before_exec(cmd: &mut Command, procs: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let Ok(path) = std::ffi::CString::new(procs.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: between fork and exec the closure only makes the async-signal-safe calls
    // open, write and close, on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            Ok(())
        });
    }
}

impl Supervisor {
    /// Writes the daemons' configuration and starts containerd, then dockerd (which waits for
    /// containerd's socket); both publish their exits and readiness on `events`.
    pub fn start(run_dir: &Path, log_dir: &Path, events: &Arc<Bus>) -> Result<Supervisor, Error> {
        daemons::write_config(run_dir, log_dir)?;
        let cgroup = match cgroups::daemon_group(Path::new(cgroups::ROOT)) {
            Ok((procs, refused)) => {
                if !refused.is_empty() {
                    console::warn(&format!(
                        "cgroups: the root group kept these controllers to itself: {}",
                        refused.join(" ")
                    ));
                }
                Some(procs)
            }
            Err(e) => {
                console::warn(&format!(
                    "cgroups: the daemons run in the root group: {}",
                    console::chain(&e)
                ));
                None
            }
        };
        let containerd = Service::start(
            Spec {
                name: "containerd",
                program: daemons::CONTAINERD.into(),
                args: daemons::containerd_args(run_dir),
                log: log_dir.join("containerd.log"),
                wait_for: None,
                ping: None,
                first_backoff: FIRST_BACKOFF,
                cgroup: cgroup.clone(),
            },
            Arc::clone(events),
        )?;
        let dockerd = Service::start(
            Spec {
                name: "dockerd",
                program: daemons::DOCKERD.into(),
                args: daemons::dockerd_args(run_dir),
                log: log_dir.join("dockerd.log"),
                wait_for: Some(daemons::CONTAINERD_SOCKET.into()),
                ping: Some(daemons::DOCKER_SOCKET.into()),
                first_backoff: FIRST_BACKOFF,
                cgroup,
            },
            Arc::clone(events),
        )?;
        Ok(Supervisor {
            containerd,
            dockerd,
        })
    }

    /// dockerd first (it stops the containers, through containerd, within `dockerd_grace`),
    /// then containerd.
    pub fn stop(&self, dockerd_grace: Duration, mut reap: impl FnMut()) {
        for (service, grace) in [
            (&self.dockerd, dockerd_grace),
            (&self.containerd, Duration::from_secs(5)),
        ] {
            service.stop(grace, &mut reap);
        }
    }

    /// Closes the daemons' log files (once they are gone), so the data disk under /var/log can
    /// be unmounted rather than left busy and needing a journal replay at the next boot.
    pub fn close_logs(&self) {
        for service in [&self.dockerd, &self.containerd] {
            service
                .log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_and_resets_after_a_minute() {
        let mut b = Backoff::new(FIRST_BACKOFF);
        let quick = Duration::from_secs(3);
        let secs: Vec<u64> = (0..8).map(|_| b.after_run(quick).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(b.after_run(Duration::from_secs(60)).as_secs(), 1);
        assert_eq!(b.after_run(Duration::from_secs(59)).as_secs(), 2);
    }

    fn test_spec(name: &'static str, script: &str, log: &Path) -> Spec {
        Spec {
            name,
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            log: log.to_path_buf(),
            wait_for: None,
            ping: None,
            first_backoff: Duration::from_millis(20),
            cgroup: None,
        }
    }

    fn bus() -> Arc<Bus> {
        Arc::new(Bus::new(crate::events::QUEUE_LEN))
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_dead_daemon_is_restarted_its_output_logged_and_stop_ends_it() {
        children::start_test_reaper();
        let log = std::env::temp_dir().join(format!("berth-agent-sup-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let service = Service::start(
            test_spec("fake", "echo hello from $$; exec sleep 30", &log),
            bus(),
        )
        .unwrap();
        wait_until("first start", || service.pid().is_some());
        let first = service.pid().unwrap();
        // Killed only once it has spoken: a shell killed before its echo logs nothing.
        wait_until("first run logged", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("hello from {first}\n"))
        });
        // SAFETY: signals the test's own child.
        unsafe { libc::kill(first, libc::SIGKILL) };
        wait_until("restart", || service.pid().is_some_and(|p| p != first));
        let second = service.pid().unwrap();
        wait_until("both runs logged", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains(&format!("hello from {first}\n"))
                && text.contains(&format!("hello from {second}\n"))
        });
        assert!(service.stop(Duration::from_secs(5), || {}));
        assert_eq!(service.pid(), None);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(service.pid(), None, "not restarted after stop");
        // SAFETY: probing with signal 0 only checks existence.
        assert_ne!(unsafe { libc::kill(second, 0) }, 0, "daemon still alive");
        let _ = std::fs::remove_file(log);
    }

    /// A regular file stands in for `cgroup.procs`: the child writes `0` (itself) before its exec.
    #[test]
    fn a_daemon_writes_itself_into_its_cgroup_before_it_runs() {
        children::start_test_reaper();
        let dir = std::env::temp_dir().join(format!("berth-agent-sup-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, "").unwrap();
        let mut spec = test_spec(
            "grouped",
            "cat \"$0\"; echo; exec sleep 30",
            &dir.join("log"),
        );
        spec.args.push(procs.to_str().unwrap().into());
        spec.cgroup = Some(procs.clone());
        let service = Service::start(spec, bus()).unwrap();
        // The daemon itself reads back what was written before it ran.
        wait_until("output", || {
            std::fs::read_to_string(dir.join("log"))
                .unwrap_or_default()
                .lines()
                .any(|l| l == "0")
        });
        assert!(service.stop(Duration::from_secs(2), || {}));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_daemon_ignoring_sigterm_is_killed() {
        children::start_test_reaper();
        let log =
            std::env::temp_dir().join(format!("berth-agent-sup-kill-{}.log", std::process::id()));
        let script = "trap '' TERM; echo up; while :; do sleep 0.05; done";
        let service = Service::start(test_spec("stubborn", script, &log), bus()).unwrap();
        wait_until("output", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("up\n")
        });
        assert!(!service.stop(Duration::from_millis(300), || {}));
        assert_eq!(service.pid(), None);
        let _ = std::fs::remove_file(log);
    }

    /// A guest end whose socket buffer is already full: anything written to it blocks until
    /// the host reads, which this host never does.
    fn stalled_guest_end() -> (
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
    ) {
        use std::io::Write;
        let (host, mut guest) = std::os::unix::net::UnixStream::pair().unwrap();
        guest.set_nonblocking(true).unwrap();
        let junk = [0u8; 4096];
        while guest.write(&junk).is_ok() {}
        guest.set_nonblocking(false).unwrap();
        (host, guest)
    }

    #[test]
    fn subscribers_hear_each_exit_and_restart_delay_and_a_stalled_one_blocks_nothing() {
        use berth_protocol::{read_frame, Response};
        use std::io::Read;
        children::start_test_reaper();
        // One event of slack: the stalled subscriber is closed at the second exit.
        let bus = Arc::new(Bus::new(1));
        let (mut stalled_host, stalled_guest) = stalled_guest_end();
        let b = Arc::clone(&bus);
        std::thread::spawn(move || crate::events::serve(&b, stalled_guest));
        let (mut host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let b = Arc::clone(&bus);
        std::thread::spawn(move || crate::events::serve(&b, guest));
        assert_eq!(
            read_frame::<Response>(&mut host).unwrap(),
            Some(Response::Ack)
        );
        wait_until("both subscribed", || bus.subscriber_count() == 2);

        let log =
            std::env::temp_dir().join(format!("berth-agent-sup-events-{}.log", std::process::id()));
        let service = Service::start(test_spec("flaky", "exit 3", &log), Arc::clone(&bus)).unwrap();
        for delay_ms in [20, 40, 80, 160] {
            assert_eq!(
                read_frame::<Event>(&mut host).unwrap(),
                Some(Event::DaemonExited {
                    daemon: "flaky".into(),
                    status: "exit status 3".into(),
                    restart_in_ms: delay_ms,
                })
            );
        }
        assert!(service.stop(Duration::from_secs(5), || {}));
        assert_eq!(bus.subscriber_count(), 1, "the stalled subscriber was kept");
        // Its connection was shut: the host reads the junk, then the end.
        stalled_host
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        stalled_host.read_to_end(&mut rest).unwrap();
        let _ = std::fs::remove_file(log);
    }
}
