//! The desktop app (desktop/, issue 13) driven like a person against a real Berth:
//! tests/e2e/desktop.sh runs desktop/tests/ui_test.py under Xvfb on the VM host (the rig's test
//! host here), through WebDriver and through its tray menu over D-Bus; this checks each step
//! (what it must print, not only that it passed).

use std::time::Duration;

/// One Berth start in the rig (one to three minutes), WebKit's seconds per step there, and the
/// app's own start (about a minute).
const TIMEOUT: Duration = Duration::from_secs(1200);

#[test]
fn the_desktop_app_starts_berth_lists_and_stops_a_container_and_saves_a_setting() {
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
    expect("tray-settings-clicked", "settings view");
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
