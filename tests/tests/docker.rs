//! The docker CLI on the host drives dockerd in a Berth VM: `berth start`, images made offline,
//! run/ps/logs/exec/stop/rm, `run -it` through a pty, `berth shell` (exit status, stderr apart,
//! a pty), `build` FROM scratch, the data disk's file shrinking on the host after an image is
//! removed, the VM started again on its own after a guest kernel panic and after its VMM is
//! killed (three times, with no fsync'd write lost: tests/e2e/durability.sh), the data disk
//! clean after it all. One VM-host session runs tests/e2e/docker.sh; this checks every step it
//! reports.

use std::time::Duration;

/// The whole script's limit: a passing run takes 8–11 min in the rig (five boots: the start and
/// four crash recoveries); each `berth start` in it gives up after 5 min, so a guest that never
/// gets ready still leaves time to print its logs.
const TIMEOUT: Duration = Duration::from_secs(1080);

#[test]
fn docker_cli_drives_dockerd_in_the_vm() {
    let run = berth_tests::run_e2e_script("docker.sh", TIMEOUT);
    let expect = |name: &str, needle: &str| run.expect(name, needle);
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
    expect("disk-grows", "data.img allocated");
    expect("disk-shrinks", "after docker image rm");
    // The control API's status document (host-proxy/API.md), as `berth status --json` prints it.
    expect("status-json", "\"state\": \"running\"");
    expect("status-json", "\"protocol_version\"");
    expect("balloon-stats", "not inflated; the guest reports");
    expect(
        "crash-panic",
        "restarting after a crash (the guest kernel panicked",
    );
    expect("crash-panic", "attempt 2");
    expect("crash-panic", "berth-always running true");
    // Then three kills of the VMM while a container writes fsync'd records: the second, third
    // and fourth crash in a row within ten minutes (attempts 3-5, after 2, 4 and 8 s), and
    // every record whose fsync returned still there.
    for (round, attempt) in [(1, 3), (2, 4), (3, 5)] {
        let name = format!("crash-kill-vmm-{round}");
        expect(&name, &format!("attempt {attempt}"));
        expect(&name, "berth-always running true");
        expect(&name, "lost 0, torn 0");
    }
    expect("data-disk-fsck", "files");
    expect("crash-status", "");
    expect("restart-always", "");
    expect("writeback-window", "300 100");
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
        "status-json-running",
        "api-status",
        "dockerd-back",
    ] {
        expect(step, "");
    }
    assert!(
        run.output.status.success(),
        "the VM host script failed: {}",
        run.output.status
    );
}
