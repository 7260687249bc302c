//! The host proxy from the CLI's side: where its control socket is, launching it detached, and
//! reaching its control API (the CLI's only way to the VM).

use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_host_proxy::config;
use berth_host_proxy::control_api::client::{self, Client};
use berth_host_proxy::Layout;

/// Environment variable naming the `berth-host-proxy` binary.
const HOST_PROXY_ENV: &str = "BERTH_HOST_PROXY";
/// How long a host proxy that holds the instance lock has to open its control socket.
pub const SOCKET_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// A runtime for the CLI's async calls.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn client(layout: &Layout) -> Client {
    Client::new(layout.control_socket())
}

/// `call` bounded by the client's `CALL_TIMEOUT`, its error said with `what`.
pub async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, client::Error>>,
) -> anyhow::Result<T> {
    client::bounded(call)
        .await
        .with_context(|| what.to_string())
}

/// Retries `call` while the control socket is not there yet (a host proxy just launched, or
/// one that holds the lock but is still starting), for up to `wait`; `child`, when given, is
/// the host proxy we launched: its exit ends the wait.
pub async fn when_up<T, F, Fut>(
    mut call: F,
    mut child: Option<&mut Child>,
    wait: Duration,
) -> Result<T, Unreachable>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, client::Error>>,
{
    let deadline = Instant::now() + wait;
    loop {
        let error = match client::bounded(call()).await {
            Ok(answer) => return Ok(answer),
            Err(e @ client::Error::NotRunning { .. }) => e,
            Err(e) => return Err(Unreachable::Refused(e)),
        };
        if let Some(child) = child.as_deref_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Unreachable::Exited(status.to_string()));
            }
        }
        if Instant::now() >= deadline {
            return Err(Unreachable::NoSocket(error));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Why `when_up` got no answer.
#[derive(Debug)]
pub enum Unreachable {
    /// Nothing listens on the control socket.
    NoSocket(client::Error),
    /// It answered with an error (the API's refusal, a broken exchange) or not in time.
    Refused(client::Error),
    /// The host proxy we launched exited; its status in words.
    Exited(String),
}

impl Unreachable {
    /// The reason as an error to print or to add context to.
    pub fn into_error(self) -> anyhow::Error {
        match self {
            Unreachable::NoSocket(e) => anyhow::Error::new(e).context(format!(
                "the host proxy has not opened its control socket within {SOCKET_WAIT:?}"
            )),
            Unreachable::Refused(e) => anyhow::Error::new(e),
            Unreachable::Exited(status) => anyhow::anyhow!("the host proxy exited ({status})"),
        }
    }
}

/// Launches `berth-host-proxy --detach --home H --no-start` with its output appended to
/// `logs/host-proxy.log`; the caller asks it to boot the VM.
pub fn launch(layout: &Layout) -> anyhow::Result<Child> {
    let host_proxy = binary();
    let log_path = layout.host_proxy_log();
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    Command::new(&host_proxy)
        .arg("--detach")
        .arg("--home")
        .arg(layout.home())
        .arg("--no-start")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot share the log file")?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "cannot run {} (set {HOST_PROXY_ENV}, or install it next to berth)",
                host_proxy.display()
            )
        })
}

fn binary() -> PathBuf {
    std::env::var_os(HOST_PROXY_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| config::sibling_executable("berth-host-proxy"))
        .unwrap_or_else(|| "berth-host-proxy".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_for_a_socket_that_never_comes_gives_up_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let client = client(&layout);
        let started = Instant::now();
        let outcome = runtime().unwrap().block_on(when_up(
            || client.status(),
            None,
            Duration::from_millis(300),
        ));
        assert!(started.elapsed() >= Duration::from_millis(300));
        let Err(Unreachable::NoSocket(e)) = outcome else {
            panic!("{outcome:?}");
        };
        assert!(e.to_string().contains("run/berth.sock"), "{e}");
    }

    #[test]
    fn a_launched_host_proxy_that_exits_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let client = client(&Layout::new(dir.path()));
        let mut child = Command::new("false").spawn().unwrap();
        let outcome = runtime().unwrap().block_on(when_up(
            || client.status(),
            Some(&mut child),
            Duration::from_secs(30),
        ));
        assert!(
            matches!(outcome, Err(Unreachable::Exited(ref s)) if s.contains("exit status: 1")),
            "{outcome:?}"
        );
    }
}
