//! virtio-vsock under stress against a real Linux guest: `vsock-stress host` (tests/src/bin/
//! vsock-stress) runs next to `berth-vmm --vsock` and drives the guest's half through the agent:
//! bulk two-way transfers, hundreds of connections at once, slow readers on either side,
//! guest-dialed connections, a guest that goes away mid-transfer, and a driver reset
//! mid-transfer. Every byte is checked in both directions; the VMM must outlive all of it and
//! power off cleanly afterwards.

use berth_tests::{run_in_vm_host, vmm_run_script};

const SCENARIOS: [&str; 8] = [
    "bulk",
    "many",
    "host-slow-reader",
    "guest-slow-reader",
    "guest-dial",
    "peer-close",
    "peer-exit",
    "device-reset",
];

const SCRIPT: &str = r#"
sock="$TMPDIR/berth-vsock-test.sock"
console="$TMPDIR/berth-vsock-test.console"
rm -f "$sock" "$sock"_*
"$BERTH_VMM" --kernel "$BERTH_KERNEL" --memory 512 --cpus 2 --disk "$BERTH_ROOTFS,ro" \
  --vsock "$sock" --cmdline "$CMDLINE_BASE berth.data=none" --console >"$console" 2>&1 &
vmm=$!
ready=no
start=$SECONDS
while [ $((SECONDS - start)) -lt 180 ]; do
  if grep -q "berth-agent: ready" "$console"; then ready=yes; break; fi
  kill -0 "$vmm" 2>/dev/null || break
  sleep 0.2
done
echo "=== vsock-test ready=$ready after $((SECONDS - start)) s ==="
if [ "$ready" = yes ]; then
  timeout 330 "$BERTH_VSOCK_STRESS" host --socket "$sock" --self "$BERTH_VSOCK_STRESS" --vmm-pid "$vmm"
  echo "=== vsock-test stress status=$? ==="
fi
if kill -0 "$vmm" 2>/dev/null; then echo "=== vsock-test vmm alive after the stress ==="; fi
timeout 60 "$BERTH_VSOCK_STRESS" shell --socket "$sock" 'kill -TERM 1'
start=$SECONDS
while kill -0 "$vmm" 2>/dev/null && [ $((SECONDS - start)) -lt 60 ]; do sleep 0.2; done
if kill -0 "$vmm" 2>/dev/null; then
  echo "=== vsock-test vmm still running 60 s after the power-off request: killed ==="
  kill -KILL "$vmm"
fi
wait "$vmm"
echo "=== vsock-test vmm status=$? ==="
echo "--- guest console (last 80 lines) ---"
tail -n 80 "$console"
"#;

#[test]
fn vsock_survives_stress_against_a_linux_guest() {
    let output = run_in_vm_host(&vmm_run_script(SCRIPT));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let all = format!(
        "--- VM host stdout ---\n{stdout}--- VM host stderr ---\n{stderr}--- {} ---",
        output.status
    );
    let has = |line: &str| stdout.lines().any(|l| l.trim() == line);
    assert!(
        stdout.contains("=== vsock-test ready=yes"),
        "the guest never reported readiness:\n{all}"
    );
    let results: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("FAIL "))
        .collect();
    println!("{}", results.join("\n"));
    let failed: Vec<&&str> = results.iter().filter(|l| l.starts_with("FAIL ")).collect();
    assert!(failed.is_empty(), "scenarios failed: {failed:#?}\n{all}");
    for name in ["upload"].iter().chain(SCENARIOS.iter()) {
        let prefix = format!("ok {name} ");
        assert!(
            results.iter().any(|l| l.starts_with(&prefix)),
            "scenario {name} did not report ok:\n{all}"
        );
    }
    assert!(
        has("=== vsock-test stress status=0 ==="),
        "vsock-stress failed:\n{all}"
    );
    assert!(
        has("=== vsock-test vmm alive after the stress ==="),
        "berth-vmm died during the stress:\n{all}"
    );
    assert!(
        has("=== vsock-test vmm status=0 ==="),
        "berth-vmm should exit 0 when the guest powers off after the stress:\n{all}"
    );
}
