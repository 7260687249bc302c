//! The settings a VM is started with: artifacts (VMM, kernel, root filesystem) and resources.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Kernel command line every Berth guest gets; `VmSettings::cmdline_extra` is appended.
pub const BASE_CMDLINE: &str = "root=/dev/vda ro rootfstype=ext4 berth.data=serial:berth-data";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSettings {
    /// The `berth-vmm` binary.
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    /// The root filesystem image, attached read-only as `/dev/vda`.
    pub rootfs: PathBuf,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Size of the sparse data disk (`/dev/vdb`).
    pub disk_size_gib: u64,
    /// Appended to `BASE_CMDLINE`.
    #[serde(default)]
    pub cmdline_extra: String,
}

impl VmSettings {
    pub fn cmdline(&self) -> String {
        let extra = self.cmdline_extra.trim();
        if extra.is_empty() {
            BASE_CMDLINE.to_string()
        } else {
            format!("{BASE_CMDLINE} {extra}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_finds_the_data_disk_by_the_serial_the_host_gives_it() {
        let wanted = format!("berth.data=serial:{}", berth_machine::DATA_DISK_SERIAL);
        assert!(BASE_CMDLINE.ends_with(&wanted), "{BASE_CMDLINE}");
    }
}
