//! Published ports and host folders, end to end with the real docker CLI in one Berth VM:
//! tests/e2e/ports-shares.sh reports every step; this checks each (what it must print, not only
//! that it passed). Issues 9 and 10.

use std::time::Duration;

/// The whole script's limit: about 35 `docker run`s at 15–20 s each in the rig, the loads and
/// one `berth start`.
const TIMEOUT: Duration = Duration::from_secs(2700);

#[test]
fn published_ports_the_way_out_and_shares_work_like_native_docker() {
    let run = berth_tests::run_e2e_script("ports-shares.sh", TIMEOUT);
    let expect = |name: &str, needle: &str| run.expect(name, needle);
    expect("start", "Berth is running");
    // Published ports.
    expect(
        "two-ports-at-once",
        "hello-from-the-share\nhello-from-the-share",
    );
    expect("ipv6-loopback", "hello-from-the-share");
    expect("docker-port", "80/tcp -> 0.0.0.0:8080");
    expect("random-port", "hello-from-the-share");
    expect("loopback-only-answers", "hello-from-the-share");
    expect("loopback-only-not-elsewhere", "curl http://");
    expect("status-lists-ports", "8080");
    expect("stop-closes-port", "curl http://127.0.0.1:8081");
    expect("port-taken", "address already in use");
    expect("port-taken-not-running", "false");
    expect("next-port-works", "hello-from-the-share");
    expect("udp-round-trip", "1 bytes ok, 1400 bytes ok");
    // 1 MiB each way, 256 KiB in the rig.
    expect("parallel-200", "200/200 connections, ");
    expect(
        "parallel-200",
        " KiB each way each, checksums ok, beside a stalled reader",
    );
    expect("killed-mid-transfer", "20/20 connections");
    expect("killed-load-failed", "error");
    // Swarm's routing mesh.
    expect("service-port-answers", "hello-from-the-share");
    expect("service-port-listed", "true");
    expect("service-rm-closes-port", "curl http://127.0.0.1:8098");
    // The way out.
    expect("host-docker-internal", "served-by-the-test-host");
    expect(
        "host-docker-internal-user-network",
        "served-by-the-test-host",
    );
    expect("host-gateway", "served-by-the-test-host");
    expect("dns-default-bridge", "10.9.8.7");
    expect("dns-user-network", "10.9.8.7");
    expect("netns-server", "served-from-a-network-namespace");
    expect("kill-passt", "killed passt");
    expect("port-while-passt-restarts", "hello-from-the-share");
    expect("way-out-after-passt", "served-by-the-test-host");
    // Shares.
    expect("share-serves", "hello-from-the-share");
    expect("host-edit-seen-at-once", "changed-on-the-host");
    expect("single-file-first", "first-version");
    expect("single-file-edited", "changed");
    expect("container-writes", "chown-status 0");
    expect("host-reads-container-file", "from-a-container");
    expect("big-file-read", "host ");
    expect("big-file-write", "copied-128MiB-identical");
    expect("many-files", "files 2000 ");
    expect("read-only-share-reads", "read-only-content");
    expect("read-only-share-refuses", "ead-only");
    expect("escapes-refused", "absolute-link");
    for property in [
        "rename-over",
        "unlink-open",
        "big-sparse",
        "sparse-blocks",
        "long-name",
        "non-utf8-name",
        "flock-excludes",
        "mmap",
        "past-4GiB",
        "xattr",
        "fsync-read",
        "symlink-in-share",
        "hard-link",
        "rename-dir",
        "chmod",
    ] {
        expect("share-semantics", &format!("sem ok {property}\n"));
    }
    expect(
        "append-two-containers",
        "400 whole lines of 400, 400 in all",
    );
    // Host changes reach inotify watchers in a container, within 500 ms (1500 in the rig),
    // leaving the file as the host wrote it.
    for (step, what) in [
        ("inotify-create", "CREATE"),
        ("inotify-modify", "MODIFY"),
        ("inotify-mkdir", "CREATE,ISDIR"),
        ("inotify-create-in-new-dir", "CREATE"),
        ("inotify-rename-from", "MOVED_FROM"),
        ("inotify-rename-to", "MOVED_TO"),
        ("inotify-delete", "DELETE"),
        ("inotify-attrib", "ATTRIB"),
    ] {
        expect(step, what);
    }
    expect("inotify-modify-keeps-content-and-mtime", "in the container");
    expect("inotify-no-storm", "quiet after");
    expect("inotify-burst-bounded", "events for 2000 files");
    expect("ports-closed-after-stop", "curl http://127.0.0.1:8080");
    for step in [
        "unprivileged",
        "config",
        "config-shares",
        "swarm-init",
        "service-create",
        "swarm-leave",
        "import",
        "run-web1",
        "run-web2",
        "loopback-only",
        "run-udp",
        "run-echo",
        "run-echo2",
        "user-network",
        "run-seed",
        "container-files-owner",
        "no-root-owned-files",
        "import-inotify",
        "run-watcher",
        "watcher-ready",
        "final-stop",
    ] {
        expect(step, "");
    }
    assert!(
        run.output.status.success(),
        "the VM host script failed: {}",
        run.output.status
    );
}
