//! The `berth-vmm` child: its command line, and what its exit status means.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::layout::Layout;
use crate::settings::VmSettings;

/// The VMM's arguments for `settings` in `layout`.
pub fn args(settings: &VmSettings, layout: &Layout) -> Vec<OsString> {
    let mut rootfs = settings.rootfs.clone().into_os_string();
    rootfs.push(",ro");
    vec![
        "--kernel".into(),
        settings.kernel.clone().into(),
        "--cpus".into(),
        settings.cpus.to_string().into(),
        "--memory".into(),
        settings.memory_mib.to_string().into(),
        "--disk".into(),
        rootfs,
        "--disk".into(),
        layout.data_disk().into(),
        "--vsock".into(),
        layout.vsock_socket().into(),
        "--serial-log".into(),
        layout.console_log().into(),
        "--cmdline".into(),
        settings.cmdline().into(),
    ]
}

/// Starts the VMM; its stdout and stderr lines go to our log. It is killed if the handle drops.
pub fn spawn(settings: &VmSettings, layout: &Layout) -> std::io::Result<Child> {
    let mut child = Command::new(&settings.vmm)
        .args(args(settings, layout))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(err));
    }
    Ok(child)
}

async fn log_lines(from: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        tracing::info!(target: "berth_vmm", "{line}");
    }
}

/// What a VMM exit status says about the guest.
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(0), _) => "the guest powered off".into(),
        (Some(2), _) => "the guest rebooted".into(),
        (Some(3), _) => "the guest kernel panicked (see console.log)".into(),
        (Some(4), _) => {
            "the guest crashed (a triple fault; the VMM's line above has its registers)".into()
        }
        (Some(1), _) => "the VMM failed (its error is logged above)".into(),
        (Some(code), _) => format!("the VMM exited with unexpected status {code}"),
        (None, Some(sig)) => format!("the VMM was killed by signal {sig}"),
        (None, None) => "the VMM exited".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_is_read_only_and_data_disk_second() {
        let layout = Layout::new("/h");
        let settings = VmSettings {
            vmm: "/bin/berth-vmm".into(),
            kernel: "/k/bzImage".into(),
            rootfs: "/r/rootfs.ext4".into(),
            cpus: 2,
            memory_mib: 1024,
            disk_size_gib: 8,
            cmdline_extra: "quiet".into(),
        };
        let args: Vec<String> = args(&settings, &layout)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "--kernel /k/bzImage --cpus 2 --memory 1024 --disk /r/rootfs.ext4,ro \
             --disk /h/data.img --vsock /h/run/vsock.sock --serial-log /h/logs/console.log \
             --cmdline root=/dev/vda ro rootfstype=ext4 berth.data=/dev/vdb quiet"
        );
    }

    #[test]
    fn exit_statuses_are_named() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(0)),
            "the guest powered off"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(2 << 8)),
            "the guest rebooted"
        );
        assert!(describe_exit(ExitStatus::from_raw(3 << 8)).contains("panicked"));
        assert!(describe_exit(ExitStatus::from_raw(4 << 8)).contains("triple fault"));
        assert!(describe_exit(ExitStatus::from_raw(9)).contains("signal 9"));
    }
}
