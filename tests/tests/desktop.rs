//! The desktop app (desktop/, issue 13) driven like a person against a real Berth:
//! tests/e2e/desktop.sh runs desktop/tests/ui_test.py under Xvfb on the VM host (the rig's test
//! host here), through WebDriver and through its tray menu over D-Bus; this checks each step
//! (what it must print, not only that it passed).

use std::time::Duration;

/// Two Berth starts in the rig (one to three minutes each: Start clicked, then the restart after
/// the VMM is killed), WebKit's seconds per step there, and the app's own start (about a minute).
const TIMEOUT: Duration = Duration::from_secs(1200);

#[test]
fn the_desktop_app_starts_berth_lists_and_stops_a_container_saves_a_setting_and_shows_a_crash() {
    let run = berth_tests::run_e2e_script("desktop.sh", TIMEOUT);
    let expect = |name: &str, needle: &str| run.expect(name, needle);
    expect("dashboard-opens", "state 'absent'");
    expect(
        "tray-menu-not-running",
        "menu: Berth is not running | ---- | Start | Stop | Restart",
    );
    expect(
        "start-clicked-running",
        "berth status: running (dockerd answers)",
    );
    expect("tray-menu-running", "menu first line 'Berth is running");
    expect(
        "cli-container-listed-with-port",
        "answers 'hello-from-the-desktop-test'",
    );
    expect("container-stopped-from-window", "running=false");
    expect("setting-saved-to-config-file", "memory_mib = 1536");
    expect(
        "setting-saved-to-config-file",
        "bad cpus: 'cpus must be a whole number",
    );
    expect(
        "setting-saved-to-config-file",
        "cleared: 'shares = []' in the file, 'Use the defaults': no shares key",
    );
    expect("tray-settings-clicked", "settings view");
    expect(
        "tray-menu-running",
        "screenshot of the menu (XEmbed fallback)",
    );
    expect(
        "vmm-killed-app-says-restarting",
        "the dashboard said 'restarting after a crash (the VMM was killed by signal 9), attempt",
    );
    expect(
        "vmm-killed-app-says-restarting",
        "problem: \"Berth's VM crashed and is starting again\"",
    );
    expect(
        "vmm-killed-app-says-restarting",
        "then running again, the problem box gone",
    );
    expect("cli-stop-shows-in-tray", "nothing enabled meanwhile");
    expect(
        "cli-stop-shows-in-tray",
        "then 'Berth is not running: the host proxy ended' with Start enabled",
    );
    assert!(
        run.output.status.success(),
        "the VM host script failed: {}",
        run.output.status
    );
}
