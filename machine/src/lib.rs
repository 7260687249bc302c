//! The machine description: the one serde type the host proxy writes to `run/vm.json` and the
//! VMM boots (`berth-vmm --config run/vm.json`), every default it has, the guest's vsock CID, the
//! VMM's exit statuses and the messages of the VMM's API socket.
#![forbid(unsafe_code)]

mod api;
mod exit;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use api::{
    read_message, write_message, ApiRequest, BalloonRequest, BalloonStats, VmmRequest, VmmResponse,
    MAX_MESSAGE,
};
pub use exit::VmmExit;

/// The guest's vsock context ID (0-2 are reserved: hypervisor, local, host).
pub const GUEST_CID: u64 = 3;

/// vCPUs of a Berth VM unless the user's settings say otherwise.
pub const DEFAULT_CPUS: u8 = 2;
/// Guest memory of a Berth VM unless the user's settings say otherwise.
pub const DEFAULT_MEMORY_MIB: u64 = 2048;
/// Size of a new data disk unless the user's settings say otherwise.
pub const DEFAULT_DISK_SIZE_GIB: u64 = 64;

/// The least memory the VMM boots a Linux guest with.
pub const MIN_MEMORY_MIB: u64 = 64;
/// The most memory the VMM supports.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The most vCPUs the VMM supports.
pub const MAX_CPUS: u8 = 64;
/// A virtio-blk serial holds at most this many bytes (virtio 1.2, 5.2.6: VIRTIO_BLK_ID_BYTES).
pub const MAX_DISK_SERIAL: usize = 20;

/// The serial of the data disk; the agent finds the disk by it (`berth.data=serial:berth-data`).
pub const DATA_DISK_SERIAL: &str = "berth-data";
/// The serial of the read-only root image.
pub const ROOT_DISK_SERIAL: &str = "berth-root";

/// A whole VM: what the VMM needs to boot it, and nothing about what runs inside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Guest kernel: PVH ELF vmlinux, ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Appended to the VMM's own kernel arguments (console, devices).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// The guest's devices beyond the fixed legacy ones (serial port, ACPI power, i8042), in
    /// the order the guest sees them: disks become vda, vdb, ... in this order.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Write the guest console to this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<PathBuf>,
    /// Copy the guest console to the VMM's stdout.
    #[serde(default, skip_serializing_if = "is_false")]
    pub console: bool,
    /// The VMM's API socket (`VmmRequest`s), for the host proxy only; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
}

/// One virtio device: `{"type": "disk", ...}`. Decoded by hand (below) so that an error inside
/// a device names its field; serde's tagged enums lose the path there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceConfig {
    /// virtio-blk backed by a file.
    Disk(DiskConfig),
    /// virtio-rng fed by the host's getrandom.
    Rng,
    /// virtio-vsock exposed on the host as a unix socket (Firecracker's hybrid convention).
    Vsock(VsockConfig),
    /// virtio-net whose backend is a unix stream socket carrying Ethernet frames with QEMU's
    /// `-netdev stream` framing (passt, gvproxy).
    Net(NetConfig),
    /// virtio-fs: one host directory, served in the VMM, mounted by the guest by its tag.
    Fs(FsConfig),
    /// virtio-balloon with free page reporting: the guest hands back memory it does not use,
    /// and the host can ask for more through the VMM API.
    Balloon(BalloonConfig),
}

/// How often the balloon asks the guest for fresh memory statistics unless told otherwise.
pub const DEFAULT_BALLOON_STATS_PERIOD_S: u32 = 5;
/// The longest statistics period a balloon takes.
pub const MAX_BALLOON_STATS_PERIOD_S: u32 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Seconds between the guest's memory statistics reports; 0 offers no statistics queue.
    #[serde(default = "default_balloon_stats_period_s")]
    pub stats_period_s: u32,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            stats_period_s: DEFAULT_BALLOON_STATS_PERIOD_S,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// What the guest reads as the disk's serial (`/sys/block/vdX/serial`): at most
    /// `MAX_DISK_SERIAL` printable ASCII bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    #[serde(default = "default_cid")]
    pub cid: u64,
    /// Connect here and write `CONNECT <port>\n` to reach a guest port; a guest connection to
    /// host port P arrives at `<socket>_P`.
    pub socket: PathBuf,
}

/// The MTU of a Berth guest's network: the largest frame passt takes (65520 bytes) less the
/// Ethernet header.
pub const DEFAULT_NET_MTU: u16 = 65520 - 14;
/// The least MTU an IPv6-capable link may have (RFC 8200).
pub const MIN_NET_MTU: u16 = 1280;
/// The longest virtio-fs tag (virtio 1.2, 5.11.4: 36 bytes, no NUL needed).
pub const MAX_FS_TAG: usize = 36;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The backend: connect here (a unix stream socket); each frame is preceded by its length,
    /// 4 bytes big-endian.
    pub socket: PathBuf,
    /// The guest's MAC address, `52:54:00:12:34:56` style.
    pub mac: String,
    /// The link MTU the guest is offered (VIRTIO_NET_F_MTU).
    #[serde(default = "default_net_mtu")]
    pub mtu: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// What the guest mounts (`mount -t virtiofs TAG DIR`): at most `MAX_FS_TAG` bytes.
    pub tag: String,
    /// The host directory shared; nothing outside it is reachable through the device.
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// How long the guest may trust what it cached of the share.
    #[serde(default, skip_serializing_if = "ShareCache::is_default")]
    pub cache: ShareCache,
}

/// A share's cache mode (virtiofsd's `--cache`): what the guest kernel may keep between
/// requests. Host edits reach the guest at once under `Auto` and `Never`; under `Always` a file
/// a container has open keeps the pages it read until the host's change event drops them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareCache {
    /// Entries and attributes trusted for a second; an open re-reads a file the host changed
    /// (close-to-open).
    #[default]
    Auto,
    /// Entries and attributes trusted for ten seconds; page cache kept across opens.
    Always,
    /// Nothing cached: every lookup, attribute and read goes to the host.
    Never,
}

impl ShareCache {
    fn is_default(&self) -> bool {
        *self == ShareCache::Auto
    }
}

impl std::str::FromStr for ShareCache {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ShareCache::Auto),
            "always" => Ok(ShareCache::Always),
            "never" => Ok(ShareCache::Never),
            other => Err(format!("cache mode {other:?}: auto, always or never")),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut map = serde_json::Map::deserialize(d)?;
        let kind = match map.remove("type") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(_) => return Err(D::Error::custom("`type` must be a string")),
            None => return Err(D::Error::missing_field("type")),
        };
        fn fields<T: serde::de::DeserializeOwned, E: serde::de::Error>(
            map: serde_json::Map<String, serde_json::Value>,
        ) -> Result<T, E> {
            serde_path_to_error::deserialize(serde_json::Value::Object(map))
                .map_err(|e| E::custom(format!("{}: {}", e.path(), e.inner())))
        }
        match kind.as_str() {
            "disk" => fields::<_, D::Error>(map).map(DeviceConfig::Disk),
            "rng" if map.is_empty() => Ok(DeviceConfig::Rng),
            "rng" => Err(D::Error::custom("an rng device has no settings")),
            "vsock" => fields::<_, D::Error>(map).map(DeviceConfig::Vsock),
            "net" => fields::<_, D::Error>(map).map(DeviceConfig::Net),
            "fs" => fields::<_, D::Error>(map).map(DeviceConfig::Fs),
            "balloon" => fields::<_, D::Error>(map).map(DeviceConfig::Balloon),
            other => Err(D::Error::unknown_variant(
                other,
                &["disk", "rng", "vsock", "net", "fs", "balloon"],
            )),
        }
    }
}

fn default_cpus() -> u8 {
    DEFAULT_CPUS
}
fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_cid() -> u64 {
    GUEST_CID
}
fn default_net_mtu() -> u16 {
    DEFAULT_NET_MTU
}
fn default_balloon_stats_period_s() -> u32 {
    DEFAULT_BALLOON_STATS_PERIOD_S
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// Errors of this module: each names the field (as a path such as `devices[1].serial`) or the
/// operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("field `{field}`")]
    Parse {
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("field `{field}`: {problem}")]
    Invalid { field: String, problem: String },
    #[error("encode the machine description")]
    Encode(#[source] serde_json::Error),
}

impl VmConfig {
    /// A VM with `kernel` and the defaults: no devices, no console.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: kernel.into(),
            cmdline: String::new(),
            devices: Vec::new(),
            serial_log: None,
            console: false,
            api_socket: None,
        }
    }

    /// Parses and checks a machine description; the error names the field.
    pub fn from_json(json: &[u8]) -> Result<Self, Error> {
        let de = &mut serde_json::Deserializer::from_slice(json);
        let config: VmConfig = serde_path_to_error::deserialize(de).map_err(|e| Error::Parse {
            field: match e.path().to_string() {
                p if p == "." => "(top level)".into(),
                p => p,
            },
            source: e.into_inner(),
        })?;
        config.check()?;
        Ok(config)
    }

    /// The description as `run/vm.json` holds it.
    pub fn to_json(&self) -> Result<String, Error> {
        let mut json = serde_json::to_string_pretty(self).map_err(Error::Encode)?;
        json.push('\n');
        Ok(json)
    }

    /// Checks what can be checked without the file system: ranges, serials, one vsock device.
    /// The VMM checks the files (kernel, disks) before it starts anything.
    pub fn check(&self) -> Result<(), Error> {
        let invalid = |field: &str, problem: String| Error::Invalid {
            field: field.into(),
            problem,
        };
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(invalid(
                "cpus",
                format!("{} vCPUs: choose between 1 and {MAX_CPUS}", self.cpus),
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is too little: a Linux guest needs at least {MIN_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            ));
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is more than the {MAX_MEMORY_MIB} MiB this VMM supports",
                    self.memory_mib
                ),
            ));
        }
        if self.kernel.as_os_str().is_empty() {
            return Err(invalid("kernel", "a kernel path is needed".into()));
        }
        let mut vsock_seen = false;
        let mut balloon_seen = false;
        let mut fs_tags = std::collections::HashSet::new();
        for (i, device) in self.devices.iter().enumerate() {
            let field = |name: &str| format!("devices[{i}].{name}");
            match device {
                DeviceConfig::Disk(disk) => {
                    if disk.path.as_os_str().is_empty() {
                        return Err(invalid(&field("path"), "a disk needs a path".into()));
                    }
                    if let Some(serial) = &disk.serial {
                        check_serial(serial).map_err(|p| invalid(&field("serial"), p))?;
                    }
                }
                DeviceConfig::Rng => {}
                DeviceConfig::Vsock(vsock) => {
                    if vsock_seen {
                        return Err(invalid(
                            &format!("devices[{i}]"),
                            "a VM has at most one vsock device".into(),
                        ));
                    }
                    vsock_seen = true;
                    if vsock.cid <= 2 || vsock.cid >= u64::from(u32::MAX) {
                        return Err(invalid(
                            &field("cid"),
                            format!("{} is reserved or out of range: use 3 or more", vsock.cid),
                        ));
                    }
                    if vsock.socket.as_os_str().is_empty() {
                        return Err(invalid(&field("socket"), "a socket path is needed".into()));
                    }
                }
                DeviceConfig::Net(net) => {
                    if net.socket.as_os_str().is_empty() {
                        return Err(invalid(&field("socket"), "a socket path is needed".into()));
                    }
                    parse_mac(&net.mac).map_err(|p| invalid(&field("mac"), p))?;
                    if net.mtu < MIN_NET_MTU || net.mtu > DEFAULT_NET_MTU {
                        return Err(invalid(
                            &field("mtu"),
                            format!(
                                "{}: choose between {MIN_NET_MTU} and {DEFAULT_NET_MTU}",
                                net.mtu
                            ),
                        ));
                    }
                }
                DeviceConfig::Fs(fs) => {
                    check_fs_tag(&fs.tag).map_err(|p| invalid(&field("tag"), p))?;
                    if !fs_tags.insert(fs.tag.as_str()) {
                        return Err(invalid(
                            &field("tag"),
                            format!("{:?} is the tag of an earlier share", fs.tag),
                        ));
                    }
                    if !fs.path.is_absolute() {
                        return Err(invalid(
                            &field("path"),
                            format!("{}: a share's path must be absolute", fs.path.display()),
                        ));
                    }
                }
                DeviceConfig::Balloon(balloon) => {
                    if balloon_seen {
                        return Err(invalid(
                            &format!("devices[{i}]"),
                            "a VM has at most one balloon device".into(),
                        ));
                    }
                    balloon_seen = true;
                    if balloon.stats_period_s > MAX_BALLOON_STATS_PERIOD_S {
                        return Err(invalid(
                            &field("stats_period_s"),
                            format!(
                                "{} s: choose between 0 (no statistics) and {MAX_BALLOON_STATS_PERIOD_S}",
                                balloon.stats_period_s
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The disks, in the order the guest sees them.
    pub fn disks(&self) -> impl Iterator<Item = &DiskConfig> {
        self.devices.iter().filter_map(|d| match d {
            DeviceConfig::Disk(disk) => Some(disk),
            _ => None,
        })
    }

    /// The vsock device's host socket, if the VM has one.
    pub fn vsock_socket(&self) -> Option<&Path> {
        self.devices.iter().find_map(|d| match d {
            DeviceConfig::Vsock(v) => Some(v.socket.as_path()),
            _ => None,
        })
    }
}

/// The six bytes of a MAC address written `52:54:00:12:34:56`; `Err(problem)` otherwise.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{mac:?} is not a MAC address like 52:54:00:12:34:56");
    let mut bytes = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut bytes {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if bytes[0] & 1 != 0 {
        return Err(format!(
            "{mac:?} is a multicast address: a NIC needs a unicast one"
        ));
    }
    Ok(bytes)
}

/// `Err(problem)` unless `tag` is a usable virtio-fs tag: 1 to `MAX_FS_TAG` bytes of printable
/// ASCII without spaces or commas (the agent's command line lists tags).
pub fn check_fs_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > MAX_FS_TAG {
        return Err(format!(
            "{tag:?}: a virtio-fs tag is 1 to {MAX_FS_TAG} bytes"
        ));
    }
    if !tag.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(format!(
            "{tag:?}: a virtio-fs tag is printable ASCII without spaces or commas"
        ));
    }
    Ok(())
}

/// `Err(problem)` unless `serial` fits a virtio-blk serial: printable ASCII, at most
/// `MAX_DISK_SERIAL` bytes.
pub fn check_serial(serial: &str) -> Result<(), String> {
    if serial.len() > MAX_DISK_SERIAL {
        return Err(format!(
            "{serial:?} is {} bytes: a disk serial holds at most {MAX_DISK_SERIAL}",
            serial.len()
        ));
    }
    if !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{serial:?}: a disk serial is printable ASCII without spaces"
        ));
    }
    Ok(())
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// The VMM's hand-use `--disk` flag: `PATH[,ro|,rw][,serial=NAME]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            read_only: false,
            serial: None,
        };
        let mut rest = s;
        // Options are taken from the end, so a path may itself contain commas.
        while let Some((head, option)) = rest.rsplit_once(',') {
            match option {
                "ro" => disk.read_only = true,
                "rw" => disk.read_only = false,
                _ => match option.strip_prefix("serial=") {
                    Some(serial) => {
                        check_serial(serial)?;
                        disk.serial = Some(serial.to_string());
                    }
                    None => break,
                },
            }
            rest = head;
        }
        if rest.is_empty() {
            return Err("a disk needs a path: --disk PATH[,ro][,serial=NAME]".into());
        }
        disk.path = rest.into();
        Ok(disk)
    }
}

/// The MAC address the VMM's `--net` flag gives the guest unless told otherwise.
pub const DEFAULT_NET_MAC: &str = "52:54:00:12:34:56";

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// The VMM's hand-use `--net` flag: `SOCKET[,mac=MAC][,mtu=MTU]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut net = NetConfig {
            socket: PathBuf::new(),
            mac: DEFAULT_NET_MAC.into(),
            mtu: DEFAULT_NET_MTU,
        };
        let mut rest = s;
        // Options are taken from the end, so a path may itself contain commas.
        while let Some((head, option)) = rest.rsplit_once(',') {
            if let Some(mac) = option.strip_prefix("mac=") {
                parse_mac(mac)?;
                net.mac = mac.into();
            } else if let Some(mtu) = option.strip_prefix("mtu=") {
                net.mtu = mtu
                    .parse()
                    .ok()
                    .filter(|mtu| (MIN_NET_MTU..=DEFAULT_NET_MTU).contains(mtu))
                    .ok_or_else(|| {
                        format!("mtu {mtu:?}: choose between {MIN_NET_MTU} and {DEFAULT_NET_MTU}")
                    })?;
            } else {
                break;
            }
            rest = head;
        }
        if rest.is_empty() {
            return Err("a network needs a socket: --net SOCKET[,mac=MAC][,mtu=MTU]".into());
        }
        net.socket = rest.into();
        Ok(net)
    }
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    /// The VMM's hand-use `--fs` flag: `TAG=PATH[,ro|,rw][,cache=auto|always|never]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tag, mut rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: a share is TAG=PATH[,ro][,cache=MODE]"))?;
        check_fs_tag(tag)?;
        // Options are taken from the end, so a path may itself contain commas; the last one
        // given wins.
        let mut read_only = None;
        let mut cache = None;
        while let Some((head, option)) = rest.rsplit_once(',') {
            match option {
                "ro" => _ = read_only.get_or_insert(true),
                "rw" => _ = read_only.get_or_insert(false),
                _ => match option.strip_prefix("cache=") {
                    Some(mode) => _ = cache.get_or_insert(mode.parse::<ShareCache>()?),
                    None => break,
                },
            }
            rest = head;
        }
        if rest.is_empty() {
            return Err("a share needs a path: --fs TAG=PATH[,ro][,cache=MODE]".into());
        }
        Ok(FsConfig {
            tag: tag.to_string(),
            path: rest.into(),
            read_only: read_only.unwrap_or(false),
            cache: cache.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use berth_errors::chain;

    fn full() -> VmConfig {
        VmConfig {
            cpus: 1,
            memory_mib: 512,
            kernel: "/k/vmlinux".into(),
            cmdline: "root=/dev/vda ro".into(),
            devices: vec![
                DeviceConfig::Disk(DiskConfig {
                    path: "/r/root.ext4".into(),
                    read_only: true,
                    serial: Some(ROOT_DISK_SERIAL.into()),
                }),
                DeviceConfig::Disk(DiskConfig {
                    path: "/h/data.img".into(),
                    read_only: false,
                    serial: Some(DATA_DISK_SERIAL.into()),
                }),
                DeviceConfig::Rng,
                DeviceConfig::Vsock(VsockConfig {
                    cid: GUEST_CID,
                    socket: "/h/run/vsock.sock".into(),
                }),
                DeviceConfig::Net(NetConfig {
                    socket: "/h/run/passt.sock".into(),
                    mac: "52:54:00:12:34:56".into(),
                    mtu: DEFAULT_NET_MTU,
                }),
                DeviceConfig::Fs(FsConfig {
                    tag: "berth-share-0".into(),
                    path: "/home/u".into(),
                    read_only: false,
                    cache: ShareCache::Auto,
                }),
            ],
            serial_log: Some("/h/logs/console.log".into()),
            console: false,
            api_socket: Some("/h/run/vmm.sock".into()),
        }
    }

    #[test]
    fn a_description_round_trips_through_json() {
        let config = full();
        let json = config.to_json().unwrap();
        assert!(json.contains(r#""type": "disk""#), "{json}");
        assert!(json.contains(r#""type": "rng""#), "{json}");
        assert_eq!(VmConfig::from_json(json.as_bytes()).unwrap(), config);
        assert_eq!(config.vsock_socket(), Some(Path::new("/h/run/vsock.sock")));
        assert_eq!(config.disks().count(), 2);
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = VmConfig::from_json(br#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(config, VmConfig::new("/k"));
        assert_eq!(config.cpus, DEFAULT_CPUS);
        assert_eq!(config.memory_mib, DEFAULT_MEMORY_MIB);
        let vsock = VmConfig::from_json(
            br#"{"kernel": "/k", "devices": [{"type": "vsock", "socket": "/s"}]}"#,
        )
        .unwrap();
        assert_eq!(
            vsock.devices,
            [DeviceConfig::Vsock(VsockConfig {
                cid: GUEST_CID,
                socket: "/s".into()
            })]
        );
    }

    #[test]
    fn bad_descriptions_name_the_field() {
        let err = |json: &str| chain(&VmConfig::from_json(json.as_bytes()).unwrap_err());
        let e = err(r#"{"kernel": "/k", "cpu": 2}"#);
        assert!(e.contains("unknown field `cpu`"), "{e}");
        let e = err(
            r#"{"kernel": "/k", "devices": [{"type": "rng"}, {"type": "disk", "path": "/d", "read_only": "yes"}]}"#,
        );
        assert!(
            e.starts_with("field `devices[1]`: read_only: invalid type"),
            "{e}"
        );
        let e = err(r#"{"kernel": "/k", "devices": [{"type": "floppy"}]}"#);
        assert!(
            e.starts_with("field `devices[0]`: unknown variant `floppy`"),
            "{e}"
        );
        let e = err(r#"{"kernel": "/k", "devices": [{"type": "disk", "path": "/d", "size": 1}]}"#);
        assert!(
            e.starts_with("field `devices[0]`: size: unknown field `size`"),
            "{e}"
        );
        let e = err(r#"{"kernel": "/k", "cpus": 0}"#);
        assert_eq!(e, "field `cpus`: 0 vCPUs: choose between 1 and 64");
        let e = err(r#"{"kernel": "/k", "memory_mib": 1}"#);
        assert!(
            e.starts_with("field `memory_mib`: 1 MiB is too little"),
            "{e}"
        );
        let e = err(r#"{"cpus": 1}"#);
        assert!(e.contains("missing field `kernel`"), "{e}");
        let e = err(
            r#"{"kernel": "/k", "devices": [{"type": "disk", "path": "/d", "serial": "this serial is much too long"}]}"#,
        );
        assert!(e.starts_with("field `devices[0].serial`:"), "{e}");
        let e = err(
            r#"{"kernel": "/k", "devices": [{"type": "vsock", "socket": "/a"}, {"type": "vsock", "socket": "/b"}]}"#,
        );
        assert_eq!(e, "field `devices[1]`: a VM has at most one vsock device");
        let e =
            err(r#"{"kernel": "/k", "devices": [{"type": "vsock", "cid": 2, "socket": "/a"}]}"#);
        assert!(
            e.starts_with("field `devices[0].cid`: 2 is reserved"),
            "{e}"
        );
        let e = err("not json");
        assert!(e.starts_with("field `(top level)`: expected"), "{e}");
    }

    #[test]
    fn net_flags_parse() {
        let net: NetConfig = "/run/passt.sock".parse().unwrap();
        assert_eq!(net.socket, PathBuf::from("/run/passt.sock"));
        assert_eq!(
            (net.mac.as_str(), net.mtu),
            (DEFAULT_NET_MAC, DEFAULT_NET_MTU)
        );
        let net: NetConfig = "/a,b.sock,mac=02:00:00:00:00:01,mtu=1500".parse().unwrap();
        assert_eq!(net.socket, PathBuf::from("/a,b.sock"));
        assert_eq!((net.mac.as_str(), net.mtu), ("02:00:00:00:00:01", 1500));
        assert!("/s,mac=zz"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("not a MAC address"));
        assert!("/s,mtu=70000"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("choose between"));
        assert!(""
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("needs a socket"));
    }

    #[test]
    fn disk_flags_parse() {
        let disk = |s: &str| s.parse::<DiskConfig>();
        assert_eq!(
            disk("a.img").unwrap(),
            DiskConfig {
                path: "a.img".into(),
                read_only: false,
                serial: None
            }
        );
        assert_eq!(
            disk("/x/a,b.img,ro").unwrap(),
            DiskConfig {
                path: "/x/a,b.img".into(),
                read_only: true,
                serial: None
            }
        );
        assert_eq!(
            disk("/d.img,ro,serial=berth-data").unwrap(),
            DiskConfig {
                path: "/d.img".into(),
                read_only: true,
                serial: Some("berth-data".into())
            }
        );
        assert!(!disk("a.img,rw").unwrap().read_only);
        assert!(disk(",ro").is_err());
        assert!(disk("a.img,serial=has space").is_err());
        assert!(disk("a.img,serial=abcdefghijklmnopqrstu").is_err());
    }

    #[test]
    fn fs_flags_parse() {
        let fs = |s: &str| s.parse::<FsConfig>();
        assert_eq!(
            fs("home=/home/u").unwrap(),
            FsConfig {
                tag: "home".into(),
                path: "/home/u".into(),
                read_only: false,
                cache: ShareCache::Auto,
            }
        );
        assert_eq!(
            fs("src=/x/a,b=c,ro").unwrap(),
            FsConfig {
                tag: "src".into(),
                path: "/x/a,b=c".into(),
                read_only: true,
                cache: ShareCache::Auto,
            }
        );
        assert_eq!(fs("t=/p,ro").unwrap().cache, ShareCache::Auto);
        let never = fs("t=/p,a,cache=never,ro").unwrap();
        assert_eq!(
            (never.path.to_str(), never.read_only, never.cache),
            (Some("/p,a"), true, ShareCache::Never)
        );
        assert_eq!(fs("t=/p,cache=always").unwrap().cache, ShareCache::Always);
        let e = fs("t=/p,cache=sometimes").unwrap_err();
        assert!(e.contains("auto, always or never"), "{e}");
        assert!(!fs("t=/p,ro,rw").unwrap().read_only);
        assert!(fs("t=/p,rw,ro").unwrap().read_only);
        assert!(fs("/no/tag").is_err());
        assert!(fs("t=,ro").is_err());
        assert!(fs("=/p").is_err());
        assert!(fs("has space=/p").is_err());
    }

    #[test]
    fn net_and_fs_devices_are_checked_by_field() {
        let err = |json: &str| chain(&VmConfig::from_json(json.as_bytes()).unwrap_err());
        let net = |mac: &str, mtu: u32| {
            format!(
                r#"{{"kernel": "/k", "devices": [{{"type": "net", "socket": "/s", "mac": "{mac}", "mtu": {mtu}}}]}}"#
            )
        };
        assert!(VmConfig::from_json(net("52:54:00:12:34:56", 1500).as_bytes()).is_ok());
        let e = err(&net("52:54:00:12:34", 1500));
        assert!(
            e.contains("devices[0].mac") && e.contains("not a MAC address"),
            "{e}"
        );
        let e = err(&net("01:54:00:12:34:56", 1500));
        assert!(e.contains("multicast"), "{e}");
        let e = err(&net("52:54:00:12:34:56", 576));
        assert!(e.contains("devices[0].mtu") && e.contains("1280"), "{e}");
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );

        let fs = |tag: &str, path: &str| {
            format!(r#"{{"type": "fs", "tag": "{tag}", "path": "{path}"}}"#)
        };
        let two = format!(
            r#"{{"kernel": "/k", "devices": [{}, {}]}}"#,
            fs("home", "/home/u"),
            fs("home", "/tmp")
        );
        let e = err(&two);
        assert!(
            e.contains("devices[1].tag") && e.contains("earlier share"),
            "{e}"
        );
        let e = err(&format!(
            r#"{{"kernel": "/k", "devices": [{}]}}"#,
            fs("a", "rel/dir")
        ));
        assert!(
            e.contains("devices[0].path") && e.contains("absolute"),
            "{e}"
        );
        let long = "t".repeat(MAX_FS_TAG + 1);
        let e = err(&format!(
            r#"{{"kernel": "/k", "devices": [{}]}}"#,
            fs(&long, "/x")
        ));
        assert!(e.contains("devices[0].tag"), "{e}");
        let e = err(
            r#"{"kernel": "/k", "devices": [{"type": "fs", "tag": "a", "path": "/x", "cache": 1}]}"#,
        );
        assert!(e.contains("devices[0]") && e.contains("cache"), "{e}");
        let never = VmConfig::from_json(
            br#"{"kernel": "/k", "devices": [{"type": "fs", "tag": "a", "path": "/x", "cache": "never"}]}"#,
        )
        .unwrap();
        assert!(
            matches!(&never.devices[0], DeviceConfig::Fs(fs) if fs.cache == ShareCache::Never),
            "{never:?}"
        );
        assert!(never.to_json().unwrap().contains(r#""cache": "never""#));
        // The default is left out of a description, so older ones read the same.
        assert!(!full().to_json().unwrap().contains("cache"));
    }
}
