//! What the daemon's tasks share: the lifecycle's state (one lock), the event stream every
//! control API client follows, and the queue of lifecycle commands the state machine works off.
//! Transitions a client asks for are decided here, under the lock, so that the answer a client
//! gets and the events every other client sees agree.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_protocol::PROTOCOL_VERSION;
use tokio::sync::{broadcast, mpsc, watch};

use crate::api::MountPolicy;
use crate::config::{self, Config};
use crate::control::Hello;
use crate::control_api::model::{
    ApiEvent, BalloonStatus, GuestStats, GuestStatus, Settings, Sockets, StateChange, Status,
    VmState, API_VERSION,
};
use crate::layout::Layout;
use crate::ports::{ForwardedPort, PortEvent};
use crate::settings::VmSettings;

/// Events a slow client may fall behind by before it misses some (it is then sent the current
/// state again).
const EVENT_BACKLOG: usize = 256;

/// A lifecycle step for the state machine (`lifecycle::run`), queued by `Shared::ask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Start,
    Stop { timeout: Duration },
    Restart { timeout: Duration },
    Quit { timeout: Duration },
}

/// What a client asked the lifecycle for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    Start,
    Stop,
    Restart,
    Quit,
}

/// How `Shared::ask` took a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Queued: the VM is on its way (202).
    Accepted(StateChange),
    /// Nothing to do: the VM already is where it was asked to go (200).
    Already(StateChange),
    /// Not now (409): a start while it stops.
    Conflict(StateChange),
}

pub struct Shared {
    pub layout: Layout,
    /// How long a Docker client or a shell waits for the guest to accept a connection.
    pub connect_timeout: Duration,
    /// How long the guest has to power off when a stop names no timeout.
    pub default_stop_timeout: Duration,
    /// Which host paths containers may bind-mount: the running VM's shares (the Docker API
    /// socket refuses the others).
    pub mounts: MountPolicy,
    inner: Mutex<Inner>,
    events: broadcast::Sender<ApiEvent>,
    /// Turns true when the host proxy quits: event streams then end cleanly.
    closing: watch::Sender<bool>,
    commands: mpsc::UnboundedSender<Command>,
}

struct Inner {
    state: StateChange,
    /// Counts VM runs, so that a late report from a previous run's guest task is ignored.
    run: u64,
    vmm_pid: Option<u32>,
    started: Option<Instant>,
    /// The settings the running VM was started with.
    settings: Option<VmSettings>,
    guest: Option<GuestStatus>,
    /// The VMM's last balloon report in this run.
    balloon: Option<BalloonStatus>,
    /// The ports forwarded from the host in this run, oldest first.
    ports: Vec<ForwardedPort>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Shared {
    pub fn new(
        layout: Layout,
        connect_timeout: Duration,
        default_stop_timeout: Duration,
    ) -> (Arc<Shared>, mpsc::UnboundedReceiver<Command>) {
        let (commands, queue) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let shared = Shared {
            layout,
            connect_timeout,
            default_stop_timeout,
            mounts: MountPolicy::default(),
            inner: Mutex::new(Inner {
                state: StateChange {
                    state: VmState::Stopped,
                    reason: Some("the host proxy started".into()),
                    since_ms: now_ms(),
                },
                run: 0,
                vmm_pid: None,
                started: None,
                settings: None,
                guest: None,
                balloon: None,
                ports: Vec::new(),
            }),
            events,
            closing: watch::Sender::new(false),
            commands,
        };
        (Arc::new(shared), queue)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> StateChange {
        self.lock().state.clone()
    }

    /// Moves to `state` and tells every event client.
    pub fn set_state(&self, state: VmState, reason: impl Into<String>) {
        let mut inner = self.lock();
        Self::enter(&mut inner, &self.events, state, reason.into());
    }

    fn enter(
        inner: &mut Inner,
        events: &broadcast::Sender<ApiEvent>,
        state: VmState,
        reason: String,
    ) -> StateChange {
        // Entering the state the VM is in, for the same reason, changes nothing: no event.
        if inner.state.state == state && inner.state.reason.as_deref() == Some(reason.as_str()) {
            return inner.state.clone();
        }
        tracing::info!("state: {state} ({reason})");
        inner.state = StateChange {
            state,
            reason: Some(reason),
            since_ms: now_ms(),
        };
        // No receivers is fine: nobody follows the stream.
        let _ = events.send(ApiEvent::State(inner.state.clone()));
        inner.state.clone()
    }

    /// The current state and a receiver of every later event, taken together so that nothing
    /// is missed or seen twice.
    pub fn subscribe(&self) -> (StateChange, broadcast::Receiver<ApiEvent>) {
        let inner = self.lock();
        (inner.state.clone(), self.events.subscribe())
    }

    /// Ends every event stream once it has sent what was published before (the host proxy is
    /// quitting), so clients see the stream end, not the connection break.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Changes to true when the event streams are to end.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Passes on an event the guest agent pushed.
    pub fn guest_event(&self, run: u64, event: berth_protocol::Event) {
        let mut inner = self.lock();
        if inner.run != run {
            return;
        }
        if let Some(guest) = inner.guest.as_mut() {
            match &event {
                berth_protocol::Event::DaemonExited { daemon, .. } if daemon == "dockerd" => {
                    guest.dockerd = false;
                }
                berth_protocol::Event::DaemonReady { daemon } if daemon == "dockerd" => {
                    guest.dockerd = true;
                }
                _ => {}
            }
        }
        let _ = self.events.send(ApiEvent::Guest { event });
    }

    /// Decides a client's request and queues the work for the state machine.
    pub fn ask(&self, ask: Ask, timeout: Option<Duration>) -> Answer {
        let timeout = timeout.unwrap_or(self.default_stop_timeout);
        let mut inner = self.lock();
        let current = inner.state.state;
        let (answer, command) = match (ask, current) {
            (Ask::Start, VmState::Starting | VmState::Running) => {
                (Answer::Already(inner.state.clone()), None)
            }
            (Ask::Start | Ask::Restart, VmState::Stopping) => {
                (Answer::Conflict(inner.state.clone()), None)
            }
            (Ask::Start | Ask::Restart, VmState::Stopped | VmState::Crashed) => {
                let why = "start requested".to_string();
                let state = Self::enter(&mut inner, &self.events, VmState::Starting, why);
                (Answer::Accepted(state), Some(Command::Start))
            }
            (Ask::Stop, VmState::Stopped | VmState::Crashed) => {
                (Answer::Already(inner.state.clone()), None)
            }
            (Ask::Stop | Ask::Quit, VmState::Stopping) => (
                Answer::Accepted(inner.state.clone()),
                (ask == Ask::Quit).then_some(Command::Quit { timeout }),
            ),
            (Ask::Stop | Ask::Restart | Ask::Quit, VmState::Starting | VmState::Running) => {
                let why = match ask {
                    Ask::Restart => "restart requested",
                    Ask::Quit => "the host proxy is quitting",
                    _ => "stop requested",
                };
                let state = Self::enter(&mut inner, &self.events, VmState::Stopping, why.into());
                let command = match ask {
                    Ask::Restart => Command::Restart { timeout },
                    Ask::Quit => Command::Quit { timeout },
                    _ => Command::Stop { timeout },
                };
                (Answer::Accepted(state), Some(command))
            }
            (Ask::Quit, VmState::Stopped | VmState::Crashed) => (
                Answer::Accepted(inner.state.clone()),
                Some(Command::Quit { timeout }),
            ),
        };
        if let Some(command) = command {
            // The receiver lives as long as the state machine, which outlives every client.
            let _ = self.commands.send(command);
        }
        answer
    }

    /// A new run begins: forget what the previous one's guest said.
    pub fn begin_run(&self) -> u64 {
        let mut inner = self.lock();
        inner.run += 1;
        inner.guest = None;
        inner.balloon = None;
        inner.run
    }

    /// The VMM of `run` is up.
    pub fn vmm_started(&self, run: u64, pid: Option<u32>, settings: VmSettings) {
        let mut shared_paths = Vec::new();
        for share in &settings.shares {
            shared_paths.push(share.path.clone());
            shared_paths.extend(share.alias.clone());
        }
        self.mounts.set_shares(shared_paths);
        let mut inner = self.lock();
        if inner.run == run {
            inner.vmm_pid = pid;
            inner.started = Some(Instant::now());
            inner.settings = Some(settings);
        }
    }

    /// The VMM of the current run is gone.
    pub fn vmm_gone(&self) {
        let mut inner = self.lock();
        inner.vmm_pid = None;
        inner.started = None;
        inner.settings = None;
        inner.guest = None;
        inner.balloon = None;
        inner.ports.clear();
    }

    /// Records a port event of `run` (a late one of an earlier run is dropped) and passes it
    /// to every event stream.
    pub fn port_event(&self, run: u64, event: PortEvent) {
        {
            let mut inner = self.lock();
            if inner.run != run {
                return;
            }
            match &event {
                PortEvent::PortPublished(port) => inner.ports.push(port.clone()),
                PortEvent::PortUnpublished(port) => inner.ports.retain(|p| p != port),
            }
        }
        let _ = self.events.send(ApiEvent::Port { event });
    }

    /// Records the agent's `Hello` for `run`; `true` the first time in this run.
    pub fn record_hello(&self, run: u64, hello: &Hello) -> bool {
        let mut inner = self.lock();
        if inner.run != run {
            return false;
        }
        let first = inner.guest.is_none();
        let stats = inner.guest.as_ref().and_then(|g| g.stats.clone());
        let health = inner
            .guest
            .as_ref()
            .map(|g| (g.dockerd, g.containerd, g.detail.clone()))
            .unwrap_or((false, false, String::new()));
        inner.guest = Some(GuestStatus {
            protocol_version: hello.protocol_version,
            host_protocol_version: PROTOCOL_VERSION,
            agent_version: hello.agent_version.clone(),
            dockerd: health.0,
            containerd: health.1,
            detail: health.2,
            stats,
        });
        first
    }

    /// Records the agent's health answer for `run`; a healthy dockerd makes `starting` into
    /// `running`.
    pub fn record_health(&self, run: u64, dockerd: bool, containerd: bool, detail: String) {
        let mut inner = self.lock();
        if inner.run != run {
            return;
        }
        if let Some(guest) = inner.guest.as_mut() {
            guest.dockerd = dockerd;
            guest.containerd = containerd;
            guest.detail = detail;
        }
        if dockerd && inner.state.state == VmState::Starting {
            Self::enter(
                &mut inner,
                &self.events,
                VmState::Running,
                "dockerd answers".into(),
            );
        }
    }

    pub fn record_stats(&self, run: u64, stats: Option<GuestStats>) {
        let mut inner = self.lock();
        if inner.run != run {
            return;
        }
        if let Some(guest) = inner.guest.as_mut() {
            guest.stats = stats;
        }
    }

    pub fn record_balloon(&self, run: u64, balloon: Option<BalloonStatus>) {
        let mut inner = self.lock();
        if inner.run == run && inner.vmm_pid.is_some() {
            inner.balloon = balloon;
        }
    }

    /// The current run, when its guest agent has answered `Hello` (worth asking for stats).
    pub fn guest_run(&self) -> Option<u64> {
        let inner = self.lock();
        let runs = matches!(inner.state.state, VmState::Starting | VmState::Running);
        (runs && inner.guest.is_some()).then_some(inner.run)
    }

    /// The status document, as it is this moment.
    pub fn status(&self) -> Status {
        let running = self.lock().settings.clone();
        // Read outside the lock: the file system may be slow, the lifecycle must not wait.
        let settings = match running {
            Some(running) => running.status_settings(),
            None => next_settings(),
        };
        let inner = self.lock();
        let layout = &self.layout;
        Status {
            api_version: API_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            vmm_pid: inner.vmm_pid,
            vmm_rss_kib: inner.vmm_pid.and_then(crate::vmm::rss_kib),
            balloon: inner.balloon.clone(),
            state: inner.state.clone(),
            uptime_secs: inner.started.map(|s| s.elapsed().as_secs()),
            home: layout.home().to_path_buf(),
            sockets: Sockets {
                docker: layout.docker_socket(),
                control: layout.control_socket(),
                vsock: layout.vsock_socket(),
                vmm_api: layout.vmm_api_socket(),
            },
            settings,
            guest: inner.guest.clone(),
            ports: inner.ports.clone(),
        }
    }

    pub fn vsock(&self) -> PathBuf {
        self.layout.vsock_socket()
    }

    pub fn vmm_api_socket(&self) -> PathBuf {
        self.layout.vmm_api_socket()
    }
}

/// The settings the next start uses, from the config file as it is now (the defaults when it
/// cannot be read: the start will say why).
fn next_settings() -> Settings {
    let config = config::path()
        .and_then(|path| Config::load(&path))
        .unwrap_or_default();
    config.status_settings()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> (Arc<Shared>, mpsc::UnboundedReceiver<Command>) {
        Shared::new(
            Layout::new("/h"),
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
    }

    fn state(answer: &Answer) -> VmState {
        match answer {
            Answer::Accepted(s) | Answer::Already(s) | Answer::Conflict(s) => s.state,
        }
    }

    #[test]
    fn requests_move_the_state_or_say_why_not() {
        let (shared, mut queue) = shared();
        let (first, mut events) = shared.subscribe();
        assert_eq!(first.state, VmState::Stopped);

        let stop = shared.ask(Ask::Stop, None);
        assert!(matches!(stop, Answer::Already(_)), "{stop:?}");
        let start = shared.ask(Ask::Start, None);
        assert!(matches!(start, Answer::Accepted(_)), "{start:?}");
        assert_eq!(state(&start), VmState::Starting);
        assert_eq!(queue.try_recv().unwrap(), Command::Start);
        assert!(matches!(shared.ask(Ask::Start, None), Answer::Already(_)));
        assert!(queue.try_recv().is_err(), "nothing more to do");

        let stop = shared.ask(Ask::Stop, Some(Duration::from_secs(3)));
        assert_eq!(state(&stop), VmState::Stopping);
        assert_eq!(
            queue.try_recv().unwrap(),
            Command::Stop {
                timeout: Duration::from_secs(3)
            }
        );
        let start = shared.ask(Ask::Start, None);
        assert!(matches!(start, Answer::Conflict(_)), "{start:?}");
        let quit = shared.ask(Ask::Quit, None);
        assert!(matches!(quit, Answer::Accepted(_)), "{quit:?}");
        assert_eq!(
            queue.try_recv().unwrap(),
            Command::Quit {
                timeout: Duration::from_secs(30)
            },
            "a quit while stopping waits for the stop, with the default timeout"
        );

        let seen: Vec<VmState> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| match e {
                ApiEvent::State(s) => s.state,
                other => panic!("only state changes here: {other:?}"),
            })
            .collect();
        assert_eq!(seen, [VmState::Starting, VmState::Stopping]);
    }

    #[test]
    fn a_previous_runs_guest_cannot_change_this_runs_state() {
        let (shared, _queue) = shared();
        shared.ask(Ask::Start, None);
        let old = shared.begin_run();
        let new = shared.begin_run();
        let hello = Hello {
            protocol_version: 3,
            agent_version: "a".into(),
            uptime_ms: 1,
        };
        assert!(!shared.record_hello(old, &hello));
        shared.record_health(old, true, true, String::new());
        assert_eq!(shared.state().state, VmState::Starting);
        assert!(shared.record_hello(new, &hello));
        assert!(!shared.record_hello(new, &hello), "recorded once per run");
        shared.record_health(new, true, true, "ok".into());
        assert_eq!(shared.state().state, VmState::Running);
        assert_eq!(shared.state().reason.as_deref(), Some("dockerd answers"));
    }
}
