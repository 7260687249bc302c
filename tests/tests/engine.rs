//! The engine a user gets, end to end with the real docker CLI and Debian trixie's compose and
//! buildx plugins in one Berth VM: tests/e2e/engine.sh reports every step; this checks what each
//! must print, not only that it passed. Issue 11.

use std::time::Duration;

/// The whole script's limit: about 30 container runs at 15–20 s each in the rig, two builds of
/// a 200 MiB context, swarm's scheduling (about a minute) and three `berth start`s.
const TIMEOUT: Duration = Duration::from_secs(2700);

#[test]
fn buildkit_compose_registry_swarm_and_restart_policies_work_like_native_docker() {
    let run = berth_tests::run_e2e_script("engine.sh", TIMEOUT);
    let expect = |name: &str, needle: &str| run.expect(name, needle);
    expect("plugins", "Docker Compose version 2.");
    expect("plugins", "github.com/docker/buildx 0.");
    expect("start", "Berth is running");
    // Debian trixie's engine: 26.1, API 1.45, containerd 1.7.
    expect("context", "server 26.1");
    expect("version", "api 1.45 containerd 1.7");
    // BuildKit by default, with the docker driver.
    expect("buildx-default", "Driver:");
    expect("build-cold", "[build ");
    expect("build-cold", "naming to docker.io/berth-test/buildkit");
    expect("run-built", "hello-buildkit");
    expect("run-built", "bust 1 run 1");
    expect("run-built", "Dockerfile");
    expect("run-built", "big.bin");
    expect("history", "COPY /greeting /cache-runs / # buildkit");
    expect("history", "CMD [\"/bin/busybox\"");
    expect("build-warm", "cached steps: ");
    // The cache mount kept its count: the step ran a second time and saw the first run's file.
    expect("build-cache-mount", "bust 2 run 2");
    // Compose v2.
    expect("compose-up", "");
    expect("compose-ps", "web running");
    expect("compose-ps", "client running");
    expect("compose-port", "hello-compose from web");
    expect("compose-logs-f", "reached-web");
    expect("compose-exec", "hello-compose from web");
    expect("compose-down", "");
    expect("compose-volume-gone", "");
    // A private registry.
    expect("registry-push", "v1: digest: sha256:");
    expect(
        "registry-rmi",
        "Untagged: localhost:5000/berth-test/pushme:v1",
    );
    // The layer came back over the wire (it existed nowhere else in the engine).
    expect("registry-pull", "Pull complete");
    expect(
        "registry-pull",
        "Status: Downloaded newer image for localhost:5000/berth-test/pushme:v1",
    );
    expect("registry-pull", "pushed-");
    expect(
        "registry-catalog",
        "{\"repositories\":[\"berth-test/pushme\"]}",
    );
    // The engine's socket inside a container.
    expect("socket-in-container", "always");
    expect("socket-in-container", "unless");
    expect("socket-in-container", "never");
    // Limits and an OOM kill.
    // dockerd in the agent's cgroup for the daemons, so it honours --memory-swap (96m = 64m + 32m
    // of swap) and does not warn that swap limits are unsupported.
    expect("daemons-cgroup", "dockerd 0::/berth-daemons");
    expect("limits", "67108864\n50000 100000\n33554432");
    expect("oom-killed", "exit 137");
    expect("oom-killed", "oomkilled true");
    // Only the loopback device in a container without a network.
    let interfaces = run.output_of("network-none");
    assert_eq!(interfaces.trim(), "lo", "network-none: {interfaces}");
    // Swarm.
    expect("swarm-init", "Swarm initialized");
    expect("stack-deploy", "Creating service berthstack_web");
    expect("stack-answers", "hello-from-the-stack");
    expect("stack-services", "berthstack_web 1/1 *:8096->80/tcp");
    expect("swarm-leave", "swarm state: inactive");
    // Restart policies: `always` and `unless-stopped` come back, a container without one not.
    expect("restarted-after-restart", "running: always unless ");
    // A volume's data survives berth stop and berth start.
    expect("volume-write", "persisted-");
    expect("status-stopped", "not running");
    expect("volume-read", "persisted-");
    expect("restarted-after-stop-start", "running: always unless ");
    for step in [
        "config",
        "import",
        "registry-image",
        "registry-run",
        "registry-tag",
        "socket-image",
        "restart-always",
        "restart-unless-stopped",
        "restart-no",
        "stack-rm",
        "berth-restart",
        "stop-vm",
        "start-vm",
        "volume-create",
        "restart-timeline",
        "final-stop",
    ] {
        expect(step, "");
    }
}
