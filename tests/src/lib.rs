//! Helpers for the end-to-end tests: the environment `tests/setup.sh` makes, and running a bash
//! script on a "VM host" — this machine when it has hardware KVM, else the nested rig
//! (`tests/rig/run-in-rig.sh`), where a software-emulated test host has real KVM.
//!
//! Nothing here skips: a missing variable or file panics with what to run instead.

use std::collections::HashMap;
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
/// stdout also carries the test host's console, and the script's stderr is merged into it.
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
}
