//! Helpers for the end-to-end tests: the environment `tests/setup.sh` makes, and running a bash
//! script on a "VM host" — this machine when it has hardware KVM, else the nested rig
//! (`tests/rig/run-in-rig.sh`), where a software-emulated test host has real KVM.
//!
//! Nothing here skips: a missing variable or file panics with what to run instead.
//!
//! A run repeated for the emulator's sake goes on the suite's record: [`record_retry`] appends to
//! `$BERTH_RETRY_LOG` the same lines as `tests/rig/retries.sh`, and `tests/run-tests.sh` prints
//! them all at its end.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// What `tests/setup.sh` built, from its `export` lines.
#[derive(Debug, Clone)]
pub struct Env {
    pub vmm: PathBuf,
    /// `vsock-stress`, the virtio-vsock stress tool (host and guest roles).
    pub vsock_stress: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// `rig` or `direct`.
    pub rig_mode: String,
    pub rig_run: PathBuf,
}

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("run tests/run-tests.sh: {name} not set (it comes from tests/setup.sh)"),
    }
}

fn existing(name: &str) -> PathBuf {
    let path = PathBuf::from(var(name));
    assert!(
        path.exists(),
        "run tests/run-tests.sh: {name}={} does not exist",
        path.display()
    );
    path
}

/// The environment, checked; panics with what to run when it is missing.
pub fn env() -> Env {
    Env {
        vmm: existing("BERTH_VMM"),
        vsock_stress: existing("BERTH_VSOCK_STRESS"),
        kernel: existing("BERTH_KERNEL"),
        rootfs: existing("BERTH_ROOTFS"),
        rig_mode: var("BERTH_RIG_MODE"),
        rig_run: existing("BERTH_RIG_RUN"),
    }
}

/// How long a whole script may take on the VM host before it is killed, unless it says otherwise.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `script` with bash on the VM host and returns its output (`\r` removed). In the rig,
/// stdout also carries the test host's console, and the script's stderr is merged into it; a
/// test host that died is booted again, and the retry recorded under the running test's name.
/// The script sees the BERTH_* variables; `$TMPDIR` is writable (a tmpfs in the rig).
pub fn run_in_vm_host(script: &str) -> Output {
    run_in_vm_host_for(script, SCRIPT_TIMEOUT)
}

/// [`run_in_vm_host`], killed after `timeout` instead of [`SCRIPT_TIMEOUT`].
pub fn run_in_vm_host_for(script: &str, timeout: Duration) -> Output {
    let env = env();
    let mut command = if env.rig_mode == "rig" {
        let mut c = Command::new(&env.rig_run);
        c.arg("--timeout")
            .arg(timeout.as_secs().to_string())
            .arg("--name")
            .arg(current_test())
            .arg("--")
            .arg("bash")
            .arg("-c")
            .arg(script);
        c
    } else {
        let mut c = Command::new("timeout");
        c.arg(timeout.as_secs().to_string())
            .arg("bash")
            .arg("-c")
            .arg(script);
        c
    };
    let started = Instant::now();
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start the VM host script: {e}"));
    eprintln!(
        "vm host ({}): script finished in {:.1?} with {}",
        env.rig_mode,
        started.elapsed(),
        output.status
    );
    Output {
        status: output.status,
        stdout: strip_cr(output.stdout),
        stderr: strip_cr(output.stderr),
    }
}

fn strip_cr(bytes: Vec<u8>) -> Vec<u8> {
    bytes.into_iter().filter(|&b| b != b'\r').collect()
}

/// The running test, as the retry log names it: `test NAME (BINARY)`. The test harness names each
/// test's thread after the test; a test binary is called `BINARY-HASH`.
fn current_test() -> String {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed");
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.file_stem()?.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let binary = binary
        .rsplit_once('-')
        .map_or(binary.as_str(), |(name, _)| name);
    format!("test {test} ({binary})")
}

/// Why a run was repeated: a failure of the emulated rig, not of Berth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// The guest reset itself, unasked (a triple fault or a panic under the rig's emulated CPU).
    GuestReset,
    /// The rig's emulated test host died without the command's status.
    TestHostDeath,
}

impl RetryKind {
    /// The kind as `tests/rig/retries.sh` writes and counts it.
    pub fn name(self) -> &'static str {
        match self {
            RetryKind::GuestReset => "guest reset",
            RetryKind::TestHostDeath => "test-host death",
        }
    }
}

/// One retry's line in the retry log, as `tests/rig/retries.sh` writes it:
/// `KIND: WHAT, attempt N of at most M: EVIDENCE`, where attempt N is the one repeated.
pub fn retry_line(kind: RetryKind, what: &str, attempt: u32, limit: u32, evidence: &str) -> String {
    let line = format!(
        "{}: {what}, attempt {attempt} of at most {limit}: {evidence}",
        kind.name()
    );
    line.replace(['\n', '\r', '\t'], " ")
}

/// Appends `line` to the retry log at `path`, in one write.
fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    file.write_all(format!("{line}\n").as_bytes())
}

/// Puts a retry on the suite's record: appends its [`retry_line`] to the file that
/// `$BERTH_RETRY_LOG` names (`tests/run-tests.sh` makes one per run); without the variable, does
/// nothing. Panics when the line cannot be written: a retry off the record would pass unseen.
pub fn record_retry(kind: RetryKind, what: &str, attempt: u32, limit: u32, evidence: &str) {
    let Some(path) = std::env::var_os("BERTH_RETRY_LOG").filter(|p| !p.is_empty()) else {
        return;
    };
    let line = retry_line(kind, what, attempt, limit, evidence);
    if let Err(e) = append_line(Path::new(&path), &line) {
        panic!(
            "cannot record this retry in BERTH_RETRY_LOG={}: {e}\n{line}",
            Path::new(&path).display()
        );
    }
}

/// Whether the docker e2e's guest reset itself, with the evidence: what follows its
/// `e2e: GUEST-RESET` line (`berth_report_guest_reset` in `tests/e2e/berth-home.sh`).
pub fn guest_reset(stdout: &str) -> Option<&str> {
    stdout.lines().find_map(|line| {
        let (_, evidence) = line.split_once("e2e: GUEST-RESET")?;
        Some(evidence.trim_start_matches(':').trim())
    })
}

/// One check of an e2e script: whether it passed and what it printed.
#[derive(Debug, Clone, Default)]
pub struct Check {
    pub ok: bool,
    pub output: String,
}

/// The checks an e2e script reported, by name, from its `ok NAME` / `FAIL NAME` lines and the
/// `  | ` lines of output under each.
pub fn e2e_checks(stdout: &str) -> HashMap<String, Check> {
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
            checks.insert(
                name.clone(),
                Check {
                    ok,
                    output: String::new(),
                },
            );
            current = Some(name);
        } else if let (Some(name), Some(out)) = (&current, line.strip_prefix("  | ")) {
            if let Some(check) = checks.get_mut(name) {
                check.output.push_str(out);
                check.output.push('\n');
            }
        }
    }
    checks
}

/// Runs of an e2e script at most, when the guest keeps resetting itself.
pub const E2E_ATTEMPTS: u32 = 3;

/// The outcome of an e2e script: its process output, its stdout as text, and its checks.
#[derive(Debug)]
pub struct E2eRun {
    pub output: Output,
    pub stdout: String,
    pub checks: HashMap<String, Check>,
}

impl E2eRun {
    /// Panics unless check `name` ran, passed and printed `needle`.
    pub fn expect(&self, name: &str, needle: &str) {
        let check = self
            .checks
            .get(name)
            .unwrap_or_else(|| panic!("step {name} never ran; output above"));
        assert!(check.ok, "step {name} failed:\n{}", check.output);
        assert!(
            check.output.contains(needle),
            "step {name}: expected {needle:?} in:\n{}",
            check.output
        );
    }

    /// What check `name` printed; panics unless it ran and passed.
    pub fn output_of(&self, name: &str) -> &str {
        self.expect(name, "");
        &self.checks[name].output
    }
}

/// Runs the e2e script `tests/e2e/NAME` (`bash`, on the VM host) with `timeout`, and prints its
/// stdout. A run in which the guest reset itself (the script says `e2e: GUEST-RESET`; nothing
/// asked for a reboot) is repeated, loudly and on the suite's record, up to [`E2E_ATTEMPTS`] runs
/// in all: the emulated rig's failure (see berth_guest_cpus in e2e/berth-home.sh). Any other
/// failure counts at once.
pub fn run_e2e_script(name: &str, timeout: Duration) -> E2eRun {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e").join(name);
    let mut attempt = 1;
    loop {
        let output = run_in_vm_host_for(&format!("bash {}", script.display()), timeout);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        println!("{stdout}");
        let reset = match guest_reset(&stdout) {
            Some(evidence) if attempt < E2E_ATTEMPTS => evidence.to_owned(),
            _ => {
                let checks = e2e_checks(&stdout);
                return E2eRun {
                    output,
                    stdout,
                    checks,
                };
            }
        };
        eprintln!(
            "WARNING: the guest reset itself during e2e run {attempt} of {name}; running it again"
        );
        record_retry(
            RetryKind::GuestReset,
            &format!("e2e tests/e2e/{name}"),
            attempt,
            E2E_ATTEMPTS,
            &reset,
        );
        attempt += 1;
    }
}

/// One `berth-vmm` run inside a script made by [`vmm_run_script`]: its console and exit status.
#[derive(Debug, Clone, Default)]
pub struct VmRun {
    pub console: String,
    pub status: Option<i32>,
}

/// A bash function `vm NAME ARGS...` that runs our VMM with the guest kernel and root image
/// (plus ARGS), and frames its console and status with markers that [`parse_runs`] reads.
pub const VM_FUNCTION: &str = r#"
vm() {
  local name=$1; shift
  echo "=== berth-test begin $name ==="
  timeout 180 "$BERTH_VMM" --kernel "$BERTH_KERNEL" --memory 512 --cpus 1 \
    --disk "$BERTH_ROOTFS,ro" "$@" --console 2>&1
  local status=$?
  echo "=== berth-test end $name status=$status ==="
}
CMDLINE_BASE="root=/dev/vda ro rootfstype=ext4 berth.docker=off"
"#;

/// Prepends [`VM_FUNCTION`] to `body`.
pub fn vmm_run_script(body: &str) -> String {
    format!("{VM_FUNCTION}\n{body}\n")
}

/// The runs framed in a script's output, by name.
pub fn parse_runs(stdout: &str) -> HashMap<String, VmRun> {
    let mut runs = HashMap::new();
    let mut current: Option<(String, VmRun)> = None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("=== berth-test begin ") {
            let name = name.trim_end_matches(" ===").to_owned();
            current = Some((name, VmRun::default()));
        } else if let Some(rest) = line.strip_prefix("=== berth-test end ") {
            let rest = rest.trim_end_matches(" ===");
            if let Some((name, mut run)) = current.take() {
                run.status = rest
                    .rsplit_once("status=")
                    .and_then(|(_, s)| s.trim().parse().ok());
                runs.insert(name, run);
            }
        } else if let Some((_, run)) = current.as_mut() {
            run.console.push_str(line);
            run.console.push('\n');
        }
    }
    runs
}

/// The value of `key=` in the agent's readiness line, if the console has one.
pub fn ready_field<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let line = console.lines().find(|l| l.contains("berth-agent: ready"))?;
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

/// A sparse file of `size` bytes at `path`, made fresh.
pub fn sparse_file(path: &Path, size: u64) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_parsed_by_name_with_status_and_console() {
        let out = "noise\n=== berth-test begin one ===\nberth-agent: ready uptime=1.2s boot=3 data=mounted\n\
                   === berth-test end one status=0 ===\n=== berth-test begin two ===\nx\n\
                   === berth-test end two status=2 ===\n";
        let runs = parse_runs(out);
        assert_eq!(runs["one"].status, Some(0));
        assert_eq!(runs["two"].status, Some(2));
        assert_eq!(ready_field(&runs["one"].console, "boot"), Some("3"));
        assert_eq!(ready_field(&runs["one"].console, "data"), Some("mounted"));
        assert_eq!(ready_field(&runs["two"].console, "boot"), None);
    }

    #[test]
    fn an_unfinished_run_has_no_entry() {
        let runs = parse_runs("=== berth-test begin one ===\nhang\n");
        assert!(runs.is_empty());
    }

    /// A fresh, empty directory under the system's temporary directory.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-tests-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        dir
    }

    /// Runs `script` with bash after sourcing `tests/<lib>`; its status and output.
    fn bash_with(lib: &str, script: &str, env: &[(&str, &Path)]) -> (bool, String) {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(lib);
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(". {}\n{script}", lib.display()))
            .envs(env.iter().copied())
            .env_remove("BERTH_RETRY_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run bash");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        (out.status.success(), format!("{stdout}{stderr}"))
    }

    #[test]
    fn the_suite_counts_and_shows_retries_recorded_from_rust_and_from_the_scripts() {
        let dir = scratch_dir("retry-summary");
        let log = dir.join("retries");
        std::fs::write(&log, "").expect("make the retry log");
        append_line(
            &log,
            &retry_line(
                RetryKind::GuestReset,
                "docker e2e",
                1,
                3,
                "host proxy: VMM exited: the guest crashed\nsecond line",
            ),
        )
        .expect("append to the retry log");
        let (ok, out) = bash_with(
            "rig/retries.sh",
            r#"BERTH_RETRY_LOG=$LOG berth_retry_record "test-host death" "tests/bench/boot.sh 5" 2 3 "QEMU status 0 after 9.5s"
               berth_retry_summary run-tests "$LOG""#,
            &[("LOG", &log)],
        );
        assert!(ok, "{out}");
        assert_eq!(
            out,
            "run-tests: retried 1 guest reset, 1 test-host death\n\
             run-tests: retried guest reset: docker e2e, attempt 1 of at most 3: host proxy: VMM exited: the guest crashed second line\n\
             run-tests: retried test-host death: tests/bench/boot.sh 5, attempt 2 of at most 3: QEMU status 0 after 9.5s\n"
        );

        std::fs::write(&log, "").expect("empty the retry log");
        let (ok, out) = bash_with(
            "rig/retries.sh",
            r#"berth_retry_summary run-tests "$LOG""#,
            &[("LOG", &log)],
        );
        assert!(ok, "{out}");
        assert_eq!(
            out,
            "run-tests: retried 0 guest resets, 0 test-host deaths\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stand-in for QEMU that runs the command as the test host's init would, except that
    /// its first boots die with an oops on the console, without the command's status.
    const FAKE_QEMU: &str = r#"#!/bin/bash
prev=
for arg; do
  case "$arg" in *logfile=*) console=${arg#*logfile=}; console=${console%%,*} ;; esac
  [ "$prev" = -append ] && for word in $arg; do
    case "$word" in berth.rig_scratch=*) scratch=${word#*=} ;; esac
  done
  prev=$arg
done
boots=$(($(cat "$FAKE_DIR/boots" 2>/dev/null || echo 0) + 1))
echo "$boots" > "$FAKE_DIR/boots"
if [ "$boots" -le "$FAKE_DEATHS" ]; then
  printf '[    1.5] int3: 0000 [#1] SMP
[    1.6] Kernel panic - not syncing: Fatal exception
' | tee "$console"
  exit 0
fi
: > "$console"
bash "$scratch/cmd"
echo $? > "$scratch/status"
"#;

    /// Runs `run-in-rig.sh -- sh -c 'exit 7'` against [`FAKE_QEMU`] whose first `deaths` boots die;
    /// the rig's exit status, its stderr, and the retry log.
    fn rig_with_dying_test_host(deaths: u32) -> (Option<i32>, String, String) {
        let dir = scratch_dir(&format!("rig-deaths-{deaths}"));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("make the fake QEMU's directory");
        let qemu = bin.join("qemu-system-x86_64");
        std::fs::write(&qemu, FAKE_QEMU).expect("write the fake QEMU");
        let status = Command::new("chmod")
            .arg("+x")
            .arg(&qemu)
            .status()
            .expect("chmod the fake QEMU");
        assert!(status.success());
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, "").expect("write a stand-in kernel");
        let log = dir.join("retries");
        std::fs::write(&log, "").expect("make the retry log");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("rig/run-in-rig.sh"))
            .args(["--name", "a dying test host", "--", "sh", "-c", "exit 7"])
            .env("PATH", path)
            .env("BERTH_CACHE", dir.join("cache"))
            .env("BERTH_TEST_HOST_KERNEL", &kernel)
            .env("BERTH_RETRY_LOG", &log)
            .env("FAKE_DIR", &dir)
            .env("FAKE_DEATHS", deaths.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("run run-in-rig.sh");
        let retries = std::fs::read_to_string(&log).expect("read the retry log");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let _ = std::fs::remove_dir_all(&dir);
        (out.status.code(), stderr, retries)
    }

    #[test]
    fn a_test_host_death_is_retried_and_recorded_with_the_console_evidence() {
        let (status, stderr, retries) = rig_with_dying_test_host(1);
        assert_eq!(
            status,
            Some(7),
            "the command's own status, after one retry:\n{stderr}"
        );
        let lines: Vec<&str> = retries.lines().collect();
        assert_eq!(lines.len(), 1, "one retry recorded:\n{retries}");
        assert!(
            lines[0].starts_with(
                "test-host death: a dying test host, attempt 1 of at most 3: QEMU status 0 after "
            ),
            "{retries}"
        );
        assert!(
            lines[0].ends_with("test-host-console.log: [    1.5] int3: 0000 [#1] SMP"),
            "the first oops line is the evidence:\n{retries}"
        );
        assert!(
            stderr.contains("run-in-rig: WARNING: the test host died"),
            "{stderr}"
        );
    }

    #[test]
    fn a_test_host_that_keeps_dying_fails_after_three_boots_and_two_recorded_retries() {
        let (status, stderr, retries) = rig_with_dying_test_host(3);
        assert_eq!(status, Some(125), "{stderr}");
        assert!(stderr.contains("three times"), "{stderr}");
        let attempts: Vec<&str> = retries
            .lines()
            .filter_map(|l| l.split(", attempt ").nth(1)?.split(':').next())
            .collect();
        assert_eq!(attempts, ["1 of at most 3", "2 of at most 3"], "{retries}");
    }

    const PROXY_POWER_OFF: &str =
        "2024-01-01T00:00:00Z  INFO berth_host_proxy: VMM exited: the guest powered off\n";
    const PROXY_CRASH: &str = "2024-01-01T00:01:00Z  WARN berth_host_proxy::daemon: \
        VMM exited: the guest crashed (a triple fault) (exit status: 4)\n";
    const OLD_CONSOLE: &str = "[    0.1] Linux version 6.1\nberth-agent: ready\n";

    /// `berth_report_guest_reset e2e` on a BERTH_HOME whose logs are these: whether it reported
    /// a reset, and its output.
    fn report_guest_reset(name: &str, proxy: &str, console: &str) -> (bool, String) {
        let home = scratch_dir(name);
        let logs = home.join("logs");
        std::fs::create_dir_all(&logs).expect("make the logs directory");
        std::fs::write(logs.join("host-proxy.log"), proxy).expect("write the proxy log");
        std::fs::write(logs.join("console.log.old"), OLD_CONSOLE).expect("write the old console");
        std::fs::write(logs.join("console.log"), console).expect("write the console");
        let report = bash_with(
            "e2e/berth-home.sh",
            "berth_report_guest_reset e2e",
            &[("BERTH_HOME", &home)],
        );
        let _ = std::fs::remove_dir_all(&home);
        report
    }

    #[test]
    fn a_guest_that_powered_off_did_not_reset() {
        let (reset, out) = report_guest_reset("power-off", PROXY_POWER_OFF, "[   12.0] BUG: x\n");
        assert!(!reset, "a power-off is no reset: {out}");
        assert_eq!(out, "");
    }

    #[test]
    fn a_guest_reset_is_reported_with_the_proxy_line_and_the_consoles_oops() {
        let console = "[    0.1] Linux version 6.1\r\n[   12.0] BUG: kernel NULL pointer dereference\r\nlater\r\n";
        let proxy = format!("{PROXY_POWER_OFF}{PROXY_CRASH}");
        let (reset, out) = report_guest_reset("reset-oops", &proxy, console);
        assert!(reset, "{out}");
        let evidence = "the guest reset itself during the run (no reboot was asked for); \
             host proxy: VMM exited: the guest crashed (a triple fault) (exit status: 4); \
             console.log: [   12.0] BUG: kernel NULL pointer dereference";
        assert_eq!(out, format!("e2e: GUEST-RESET: {evidence}\n"));
        assert_eq!(
            guest_reset(&out),
            Some(evidence),
            "what the docker e2e records"
        );
    }

    #[test]
    fn a_guest_reset_without_an_oops_is_reported_with_how_each_console_ends() {
        let console = "[    0.1] Linux version 6.1\n[    3.0] clocksource: tsc\n\n";
        let (reset, out) = report_guest_reset("reset-silent", PROXY_CRASH, console);
        assert!(reset, "{out}");
        assert!(
            out.ends_with(
                "exit status: 4); console.log.old ends: berth-agent: ready; \
                 console.log ends: [    3.0] clocksource: tsc\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn output_without_a_guest_reset_has_none() {
        assert_eq!(guest_reset("ok start\n  | Berth is running\n"), None);
    }
}
