//! The settings a VM is started with: artifacts (VMM, kernel, root filesystem), resources, the
//! host folders it shares, and the kernel command line they make.

use std::net::IpAddr;
use std::path::PathBuf;

use berth_machine::{FsConfig, ShareCache};
use berth_protocol::cmdline::{GuestShare, NET_PARAM, SHARE_PARAM};
use serde::{Deserialize, Serialize};

/// Kernel command line every Berth guest gets; the network, the shares and
/// `VmSettings::cmdline_extra` are appended.
pub const BASE_CMDLINE: &str = "root=/dev/vda ro rootfstype=ext4 berth.data=serial:berth-data";
/// The longest kernel command line x86 Linux takes (COMMAND_LINE_SIZE 2048, with its NUL).
pub const MAX_CMDLINE: usize = 2047;

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
    /// Appended to the command line.
    #[serde(default)]
    pub cmdline_extra: String,
    /// The host folders the guest mounts, in the order of their tags (`berth-share-0`, ...).
    #[serde(default)]
    pub shares: Vec<Share>,
    /// The host address published ports listen on (`None`: the ports module's default).
    #[serde(default)]
    pub ports_bind_address: Option<IpAddr>,
    /// Every share's cache mode (`BERTH_SHARE_CACHE`; the default unless measuring).
    #[serde(default)]
    pub share_cache: ShareCache,
}

/// One host folder shared with the guest, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The directory, canonical (no symlinks): the VMM serves it and the guest mounts it at
    /// this same path.
    pub path: PathBuf,
    /// The path as configured, when a symlink made it differ from `path` (a symlinked `$HOME`):
    /// the guest mounts the same share there too, so that paths a client names either way
    /// exist in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<PathBuf>,
    #[serde(default)]
    pub read_only: bool,
}

/// The virtio-fs tag of the `index`th share.
pub fn share_tag(index: usize) -> String {
    format!("berth-share-{index}")
}

/// Environment variable: every share's cache mode (`auto`, the default, `always` or `never`),
/// for measuring them against each other (`tests/bench/share-cache.sh`); not a setting.
pub const SHARE_CACHE_ENV: &str = "BERTH_SHARE_CACHE";

/// The cache mode `BERTH_SHARE_CACHE` asks for; unset or empty, the default.
pub fn share_cache_from_env() -> Result<ShareCache, String> {
    match std::env::var(SHARE_CACHE_ENV) {
        Ok(mode) if !mode.trim().is_empty() => mode
            .trim()
            .parse()
            .map_err(|e| format!("{SHARE_CACHE_ENV}: {e}")),
        _ => Ok(ShareCache::default()),
    }
}

/// The VMM's virtio-fs devices for `shares`, each in cache mode `cache`.
pub fn fs_devices(shares: &[Share], cache: ShareCache) -> Vec<FsConfig> {
    shares
        .iter()
        .enumerate()
        .map(|(i, share)| FsConfig {
            tag: share_tag(i),
            path: share.path.clone(),
            read_only: share.read_only,
            cache,
        })
        .collect()
}

/// What the agent mounts: each share at its path, and again at its alias.
pub fn guest_shares(shares: &[Share]) -> Vec<GuestShare> {
    let mut mounts = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        for path in std::iter::once(&share.path).chain(share.alias.as_ref()) {
            mounts.push(GuestShare {
                tag: share_tag(i),
                read_only: share.read_only,
                path: path.clone(),
            });
        }
    }
    mounts
}

/// The guest kernel's command line: the base, the network, the shares, then `extra`.
pub fn cmdline(shares: &[Share], extra: &str) -> String {
    let mut line = format!(
        "{BASE_CMDLINE} {NET_PARAM}={}",
        crate::passt::guest_net().to_param()
    );
    for share in guest_shares(shares) {
        line.push_str(&format!(" {SHARE_PARAM}={}", share.to_param()));
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        line.push(' ');
        line.push_str(extra);
    }
    line
}

impl VmSettings {
    pub fn cmdline(&self) -> String {
        cmdline(&self.shares, &self.cmdline_extra)
    }

    /// The settings as the control API's status shows them.
    pub fn status_settings(&self) -> crate::control_api::model::Settings {
        use crate::control_api::model;
        model::Settings {
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_size_gib: self.disk_size_gib,
            kernel: Some(self.kernel.clone()),
            rootfs: Some(self.rootfs.clone()),
            vmm: Some(self.vmm.clone()),
            cmdline_extra: self.cmdline_extra.clone(),
            shares: status_shares(&self.shares),
            ports: model::PortSettings {
                bind_address: self.ports_bind_address,
            },
        }
    }
}

/// `shares` as the status shows them.
pub fn status_shares(shares: &[Share]) -> Vec<crate::control_api::model::Share> {
    shares
        .iter()
        .map(|s| crate::control_api::model::Share {
            path: s.path.clone(),
            alias: s.alias.clone(),
            read_only: s.read_only,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use berth_protocol::cmdline::GuestNet;

    #[test]
    fn the_agent_finds_the_data_disk_by_the_serial_the_host_gives_it() {
        let wanted = format!("berth.data=serial:{}", berth_machine::DATA_DISK_SERIAL);
        assert!(BASE_CMDLINE.ends_with(&wanted), "{BASE_CMDLINE}");
    }

    /// The value of every `name=` parameter on `line`.
    fn params<'a>(line: &'a str, name: &str) -> Vec<&'a str> {
        line.split(' ')
            .filter_map(|p| p.strip_prefix(name)?.strip_prefix('='))
            .collect()
    }

    #[test]
    fn the_command_line_carries_the_network_and_every_share_and_they_parse_back() {
        let shares = [
            Share {
                path: "/usr/home/u".into(),
                alias: Some("/home/u".into()),
                read_only: false,
            },
            Share {
                path: "/data/my files, old".into(),
                alias: None,
                read_only: true,
            },
        ];
        let line = cmdline(&shares, " quiet ");
        assert!(line.starts_with(BASE_CMDLINE), "{line}");
        assert!(line.ends_with(" quiet"), "{line}");
        let net = params(&line, NET_PARAM);
        assert_eq!(net.len(), 1, "{line}");
        let net = GuestNet::parse(net[0]).unwrap();
        assert_eq!(net, crate::passt::guest_net());
        assert_eq!(net.address.to_string(), "192.168.127.2");
        assert_eq!(net.gateway.to_string(), "192.168.127.1");
        assert_eq!(net.dns.to_string(), "192.168.127.53");

        let mounts: Vec<GuestShare> = params(&line, SHARE_PARAM)
            .into_iter()
            .map(|v| GuestShare::parse(v).unwrap())
            .collect();
        let seen: Vec<(&str, bool, &str)> = mounts
            .iter()
            .map(|m| (m.tag.as_str(), m.read_only, m.path.to_str().unwrap()))
            .collect();
        assert_eq!(
            seen,
            [
                ("berth-share-0", false, "/usr/home/u"),
                ("berth-share-0", false, "/home/u"),
                ("berth-share-1", true, "/data/my files, old"),
            ]
        );
        let devices = fs_devices(&shares, ShareCache::Auto);
        assert_eq!(devices.len(), 2, "one device per share, not per mount");
        assert_eq!(devices[1].tag, "berth-share-1");
        assert!(devices[1].read_only);
        for device in &devices {
            berth_machine::check_fs_tag(&device.tag).unwrap();
        }
    }
}
