//! The host side of the guest protocol for one VM run: wait for the agent's `Hello` and a
//! healthy dockerd (`starting` → `running`), then keep a `Subscribe` connection and pass every
//! pushed `Event` on to the control API's event stream — except `WatchPaths`, the shared paths
//! containers bind-mount, which the host's file watcher follows, its changes sent back to the
//! agent as `FileEvents`; the guest's clock kept with the host's (`clock.rs`); and the bounded
//! refresh of health and stats the status asks for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_protocol::{Event, Request, Response, PROTOCOL_VERSION};

use berth_protocol::files::FileEvent;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::shared::Shared;
use crate::chain;
use crate::control::{self, Connection};
use crate::control_api::model::GuestStats;
use crate::watch::Watcher;

/// How often a booting guest is asked whether it is up.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long one probe (connect, `Hello`, `Health`) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a lost event subscription waits before it is opened again.
const RESUBSCRIBE: Duration = Duration::from_secs(1);
/// The status waits at most this long for the guest's health and stats.
pub const STATUS_WAIT: Duration = Duration::from_millis(1500);
/// At most this many guest events are logged per minute (the guest can cause them).
const EVENT_LOGS_PER_MINUTE: u32 = 30;
/// Batches of host file events waiting to be sent to the agent.
const FILE_EVENT_BATCHES: usize = 16;
/// How long the agent has to take one batch of file events.
const FILE_EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Follows the guest of `run` until the task is aborted (when the VM stops).
pub async fn watch(shared: Arc<Shared>, run: u64) {
    wait_until_running(&shared, run).await;
    // Ends with this task: aborted with it when the VM stops.
    let _clock = AbortOnDrop(tokio::spawn(super::clock::keep(shared.vsock())));
    let mut files = FileEvents::start(&shared);
    let mut events = RateLimit::new(EVENT_LOGS_PER_MINUTE);
    // The guest decides how often its stream ends: log a few of those, not every one.
    let mut ends = RateLimit::new(EVENT_LOGS_PER_MINUTE / 10);
    loop {
        let ended = match subscribe(&shared, run, &mut events, files.as_mut()).await {
            Ok(Subscription::Unsupported) => {
                tracing::info!("the guest agent does not push events (an older agent)");
                return;
            }
            Ok(Subscription::Ended) => "the guest agent closed the event stream".to_string(),
            Err(e) => format!("guest event stream: {}", chain(&e)),
        };
        if ends.allow() {
            tracing::info!("{ended}");
        }
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}

/// A task that ends when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn wait_until_running(shared: &Shared, run: u64) {
    let mut last_error = String::new();
    loop {
        match probe(shared, run).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                let text = chain(&e);
                if text != last_error {
                    tracing::debug!("the guest agent is not up yet: {text}");
                    last_error = text;
                }
            }
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// One `Hello` + `Health` exchange; `true` when dockerd answers.
async fn probe(shared: &Shared, run: u64) -> Result<bool, control::Error> {
    let mut connection = hello(shared, run, PROBE_TIMEOUT).await?;
    let answer = connection.request(&Request::Health, PROBE_TIMEOUT).await?;
    Ok(record_health(shared, run, &answer))
}

/// Opens a control connection and records the agent's `Hello`.
async fn hello(shared: &Shared, run: u64, timeout: Duration) -> Result<Connection, control::Error> {
    let connection = Connection::open(&shared.vsock(), timeout).await?;
    let hello = &connection.hello;
    if shared.record_hello(run, hello) {
        tracing::info!(
            "guest agent {} answered Hello: protocol {}, ours {PROTOCOL_VERSION}",
            hello.agent_version,
            hello.protocol_version
        );
        if hello.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(
                "the guest agent speaks protocol {}, this host proxy {PROTOCOL_VERSION}: \
                 requests it does not know are answered as unsupported",
                hello.protocol_version
            );
        }
    }
    Ok(connection)
}

fn record_health(shared: &Shared, run: u64, answer: &Response) -> bool {
    match answer {
        Response::Health {
            dockerd,
            containerd,
            detail,
        } => {
            shared.record_health(run, *dockerd, *containerd, detail.clone());
            *dockerd
        }
        other => {
            tracing::warn!(
                "the guest agent answered Health with {}",
                control::describe(other)
            );
            false
        }
    }
}

enum Subscription {
    Ended,
    Unsupported,
}

async fn subscribe(
    shared: &Shared,
    run: u64,
    limiter: &mut RateLimit,
    mut files: Option<&mut FileEvents>,
) -> Result<Subscription, control::Error> {
    let mut connection = hello(shared, run, PROBE_TIMEOUT).await?;
    match connection
        .request(&Request::Subscribe, PROBE_TIMEOUT)
        .await?
    {
        Response::Ack => {}
        Response::Unsupported { .. } => return Ok(Subscription::Unsupported),
        other => {
            tracing::warn!(
                "the guest agent answered Subscribe with {}",
                control::describe(&other)
            );
            return Ok(Subscription::Ended);
        }
    }
    let mut stream = connection.into_stream();
    while let Some(event) = control::read_frame::<_, Event>(&mut stream).await? {
        if let Event::WatchPaths { paths } = event {
            tracing::debug!(
                "the guest's containers bind-mount {} shared paths",
                paths.len()
            );
            if let Some(files) = files.as_deref_mut() {
                files.watcher.set_paths(paths);
            }
            continue;
        }
        if limiter.allow() {
            tracing::info!("guest event: {event:?}");
        }
        shared.guest_event(run, event);
    }
    Ok(Subscription::Ended)
}

/// Host file events for the guest of one run: the watcher of the paths the agent names, and the
/// task that sends its batches to the agent (aborted when this goes).
struct FileEvents {
    watcher: Watcher,
    sender: JoinHandle<()>,
}

impl FileEvents {
    /// `None` (logged) when the host cannot watch files: containers then see no host changes.
    fn start(shared: &Shared) -> Option<FileEvents> {
        let (batches, mut received) = mpsc::channel::<Vec<FileEvent>>(FILE_EVENT_BATCHES);
        let watcher = match Watcher::start(batches) {
            Ok(watcher) => watcher,
            Err(e) => {
                tracing::warn!("containers will not see host file changes: {}", chain(&e));
                return None;
            }
        };
        let mut agent = control::FileEventSender::new(shared.vsock(), FILE_EVENT_TIMEOUT);
        let sender = tokio::spawn(async move {
            let mut failures = RateLimit::new(EVENT_LOGS_PER_MINUTE / 10);
            while let Some(batch) = received.recv().await {
                if let Err(e) = agent.send(&batch).await {
                    if failures.allow() {
                        tracing::warn!(
                            "cannot pass {} host file events to the guest: {}",
                            batch.len(),
                            chain(&e)
                        );
                    }
                }
            }
        });
        Some(FileEvents { watcher, sender })
    }
}

impl Drop for FileEvents {
    fn drop(&mut self) {
        self.sender.abort();
    }
}

/// Asks the guest for its health and stats for the status, within `STATUS_WAIT`; on a timeout
/// or an error the status shows what the guest last said.
pub async fn refresh(shared: &Shared) {
    let Some(run) = shared.guest_run() else {
        return;
    };
    // The VMM's balloon report, asked meanwhile: the VMM answers whatever the guest does.
    let balloon = async {
        match crate::vmm::api_balloon_status(&shared.vmm_api_socket(), STATUS_WAIT).await {
            Ok(balloon) => shared.record_balloon(run, Some(balloon)),
            Err(e) => {
                tracing::debug!("status: no balloon report from the VMM: {}", chain(&e));
                shared.record_balloon(run, None);
            }
        }
    };
    let exchange = async {
        let mut connection = hello(shared, run, STATUS_WAIT).await?;
        let health = connection.request(&Request::Health, STATUS_WAIT).await?;
        record_health(shared, run, &health);
        let stats = match connection.request(&Request::Stats, STATUS_WAIT).await? {
            Response::Stats {
                mem_total_kib,
                mem_available_kib,
                disk_total_kib,
                disk_used_kib,
                load_avg_1m,
            } => Some(GuestStats {
                mem_total_kib,
                mem_available_kib,
                disk_total_kib,
                disk_used_kib,
                load_avg_1m,
            }),
            other => {
                tracing::info!(
                    "the guest agent answered Stats with {}",
                    control::describe(&other)
                );
                None
            }
        };
        shared.record_stats(run, stats);
        Ok::<(), control::Error>(())
    };
    let (guest, ()) = tokio::join!(tokio::time::timeout(STATUS_WAIT, exchange), balloon);
    match guest {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("status: the guest did not answer: {}", chain(&e)),
        Err(_) => tracing::debug!("status: the guest did not answer within {STATUS_WAIT:?}"),
    }
}

/// Lets through at most `per_minute` events a minute.
struct RateLimit {
    per_minute: u32,
    window: Instant,
    count: u32,
}

impl RateLimit {
    fn new(per_minute: u32) -> Self {
        RateLimit {
            per_minute,
            window: Instant::now(),
            count: 0,
        }
    }

    fn allow(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(60) {
            if self.count > self.per_minute {
                tracing::warn!(
                    "{} guest events were not logged in the last minute",
                    self.count - self.per_minute
                );
            }
            self.window = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.per_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_lets_a_burst_through_up_to_its_budget() {
        let mut limit = RateLimit::new(3);
        let allowed = (0..10).filter(|_| limit.allow()).count();
        assert_eq!(allowed, 3);
    }
}
