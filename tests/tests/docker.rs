//! The docker CLI on the host drives dockerd in a Berth VM: `berth start`, images made offline,
//! run/ps/logs/exec/stop/rm, `run -it` through a pty, `berth shell` (exit status, stderr apart,
//! a pty), `build` FROM scratch, a volume that survives `berth stop` + `berth start`. One
//! VM-host session runs tests/e2e/docker.sh; this checks every step it reports.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use berth_tests::RetryKind;

/// The whole script's limit: a passing run takes 4–6 min in the rig; each `berth start` in it
/// gives up after 5 min, so a guest that never gets ready still leaves time to print its logs.
const TIMEOUT: Duration = Duration::from_secs(720);

/// Runs of the script at most, when the guest keeps resetting itself.
const ATTEMPTS: u32 = 3;

/// Each check's verdict and output, from the script's `ok NAME` / `FAIL NAME` lines.
fn checks(stdout: &str) -> HashMap<String, (bool, String)> {
    let mut checks = HashMap::new();
    let mut current: Option<String> = None;
    for line in stdout.lines() {
        let verdict = line
            .strip_prefix("ok ")
            .map(|rest| (true, rest))
            .or_else(|| line.strip_prefix("FAIL ").map(|rest| (false, rest)));
        if let Some((ok, rest)) = verdict {
            let name = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            checks.insert(name.clone(), (ok, String::new()));
            current = Some(name);
        } else if let (Some(name), Some(out)) = (&current, line.strip_prefix("  | ")) {
            if let Some((_, text)) = checks.get_mut(name) {
                text.push_str(out);
                text.push('\n');
            }
        }
    }
    checks
}

#[test]
fn docker_cli_drives_dockerd_in_the_vm() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/docker.sh");
    // A run in which the guest reset itself (the script says GUEST-RESET; nothing asked for a
    // reboot) is repeated, loudly and on the suite's record, up to three runs in all: the
    // emulated rig's failure (see berth_guest_cpus in e2e/berth-home.sh). Any other failure
    // counts at once.
    let mut attempt = 1;
    let (output, stdout) = loop {
        let output =
            berth_tests::run_in_vm_host_for(&format!("bash {}", script.display()), TIMEOUT);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        println!("{stdout}");
        let reset = match berth_tests::guest_reset(&stdout) {
            Some(evidence) if attempt < ATTEMPTS => evidence,
            _ => break (output, stdout),
        };
        eprintln!("WARNING: the guest reset itself during e2e run {attempt}; running it again");
        berth_tests::record_retry(
            RetryKind::GuestReset,
            "docker e2e (tests/e2e/docker.sh)",
            attempt,
            ATTEMPTS,
            reset,
        );
        attempt += 1;
    };
    let checks = checks(&stdout);
    let expect = |name: &str, needle: &str| {
        let (ok, text) = checks
            .get(name)
            .unwrap_or_else(|| panic!("step {name} never ran; output above"));
        assert!(ok, "step {name} failed:\n{text}");
        assert!(
            text.contains(needle),
            "step {name}: expected {needle:?} in:\n{text}"
        );
    };
    expect("start", "Berth is running");
    expect("start-again", "already running");
    expect("version", "os linux");
    expect("info", "cgroup 2");
    expect("import", "sha256:");
    expect("run-rm", "hello-from-a-container");
    expect("logs", "tick 1");
    expect("exec", "exec-answer 42");
    expect("run-it", "tty-answer 5");
    expect("run-it", "/dev/pts/");
    expect("shell-status", "status 3 stdout [to-stdout]");
    expect("shell-missing", "status 127");
    expect("shell-tty", "shell-tty-answer 8");
    expect("shell-tty", "/dev/pts/");
    expect("build", "sha256:");
    expect("run-built", "built-from-scratch");
    expect("volume-write", "persisted-");
    expect("stop-vm", "");
    expect("status-stopped", "not running");
    expect("volume-read", "persisted-");
    // The control API's status document (host-proxy/API.md), as `berth status --json` prints it.
    expect("status-json", "\"state\": \"running\"");
    expect("status-json", "\"protocol_version\"");
    expect("api-not-found", "\"not_found\"");
    expect("api-bad-body", "timeout_secs");
    expect("final-stop", "");
    expect("kill-dockerd", "killed dockerd");
    expect("events-followed-the-stop", "\"daemon_exited\"");
    expect("events-followed-the-stop", "\"stopping\"");
    expect("stop-again", "not running");
    for step in [
        "config",
        "busybox",
        "run-d",
        "ps",
        "stop",
        "rm",
        "gone",
        "volume-create",
        "restart-vm",
        "status-json-running",
        "api-status",
        "dockerd-back",
    ] {
        expect(step, "");
    }
    assert!(
        output.status.success(),
        "the VM host script failed: {}",
        output.status
    );
}
