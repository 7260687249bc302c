//! Boots our kernel and image with `berth-vmm`: readiness and power-off, a data disk that keeps
//! its contents across boots, reboot, and invalid configurations.
//!
//! The booting tests share one script on the VM host (one rig boot costs ~10 s): it is run by
//! whichever test gets there first, and each test asserts on its own VM runs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_tests::{env, parse_runs, ready_field, run_in_vm_host, vmm_run_script, VmRun};

/// The VM runs that the booting tests look at, and the whole output to show on a failure.
struct Session {
    output: String,
    runs: std::collections::HashMap<String, VmRun>,
}

const SCRIPT: &str = r#"
data="$TMPDIR/berth-test-data.img"
rm -f "$data" && truncate -s 8G "$data"
vm ready --cmdline "$CMDLINE_BASE berth.data=none berth.on_ready=poweroff"
vm first --disk "$data" --cmdline "$CMDLINE_BASE berth.data=/dev/vdb berth.on_ready=poweroff"
vm second --disk "$data" --cmdline "$CMDLINE_BASE berth.data=/dev/vdb berth.on_ready=poweroff"
vm reboot --cmdline "$CMDLINE_BASE berth.data=none berth.on_ready=reboot"
rm -f "$data"
"#;

fn session() -> &'static Session {
    static SESSION: OnceLock<Session> = OnceLock::new();
    SESSION.get_or_init(|| {
        let output = run_in_vm_host(&vmm_run_script(SCRIPT));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let output_text = format!(
            "--- VM host stdout (guest consoles) ---\n{stdout}--- VM host stderr ---\n{stderr}--- {} ---",
            output.status
        );
        Session {
            runs: parse_runs(&stdout),
            output: output_text,
        }
    })
}

/// The named run, or a panic that shows everything the VM host printed.
fn run(name: &str) -> (&'static VmRun, &'static str) {
    let s = session();
    match s.runs.get(name) {
        Some(run) => (run, &s.output),
        None => panic!(
            "the VM run {name:?} did not finish on the VM host\n{}",
            s.output
        ),
    }
}

#[test]
fn guest_boots_to_the_agent_and_powers_off() {
    let (run, _) = run("ready");
    let console = &run.console;
    assert!(
        console.contains("berth-agent: ready"),
        "no readiness line:\n{console}"
    );
    assert_eq!(ready_field(console, "data"), Some("none"), "{console}");
    assert_eq!(
        run.status,
        Some(0),
        "berth-vmm should exit 0 when the guest powers off:\n{console}"
    );
}

#[test]
fn data_disk_written_in_one_boot_is_read_in_the_next() {
    let (first, _) = run("first");
    let c = &first.console;
    assert!(c.contains("berth-agent: formatted /dev/vdb as ext4"), "{c}");
    assert_eq!(ready_field(c, "data"), Some("formatted"), "{c}");
    assert_eq!(ready_field(c, "boot"), Some("1"), "{c}");
    assert_eq!(first.status, Some(0), "{c}");

    let (second, _) = run("second");
    let c = &second.console;
    assert!(!c.contains("formatted /dev/vdb"), "formatted again:\n{c}");
    assert_eq!(ready_field(c, "data"), Some("mounted"), "{c}");
    assert_eq!(ready_field(c, "boot"), Some("2"), "{c}");
    assert_eq!(second.status, Some(0), "{c}");
}

#[test]
fn reboot_on_ready_exits_with_status_2() {
    let (run, _) = run("reboot");
    let c = &run.console;
    assert!(c.contains("berth-agent: ready"), "{c}");
    assert_eq!(
        run.status,
        Some(2),
        "berth-vmm should exit 2 when the guest reboots:\n{c}"
    );
}

/// Runs berth-vmm directly (no guest boots) and checks it fails fast with one clear line.
fn assert_refused(args: &[&str], what: &str) {
    let env = env();
    let started = Instant::now();
    let mut child = Command::new(&env.vmm)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth-vmm");
    let limit = Duration::from_secs(10);
    while child.try_wait().expect("wait for berth-vmm").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("berth-vmm {args:?} ({what}) still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect berth-vmm output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_ne!(out.status.code(), Some(0), "{what}: berth-vmm succeeded");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: a VMM error exits 1; stderr:\n{stderr}"
    );
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one clear line on stderr, got:\n{stderr}"
    );
    assert!(
        lines[0].starts_with("berth-vmm: error: "),
        "{what}: {:?}",
        lines[0]
    );
}

#[test]
fn invalid_configurations_fail_fast_with_one_line() {
    let env = env();
    let kernel = env.kernel.to_str().expect("utf-8 kernel path");
    let rootfs = format!("{},ro", env.rootfs.display());
    assert_refused(
        &["--kernel", "/nonexistent/berth/vmlinux"],
        "missing kernel file",
    );
    assert_refused(
        &["--kernel", kernel, "--memory", "1", "--disk", &rootfs],
        "--memory 1",
    );
    let missing_disk = "/nonexistent/berth/disk.img";
    assert!(!Path::new(missing_disk).exists());
    assert_refused(
        &[
            "--kernel",
            kernel,
            "--disk",
            &rootfs,
            "--disk",
            missing_disk,
        ],
        "unreadable disk",
    );
}
