//! The agent's configuration, read from the kernel command line (`/proc/cmdline`).
//!
//! Linux keeps dotted parameters such as `berth.data=serial:berth-data` out of init's argv and
//! environment, so the agent reads the whole command line after mounting proc. Every key is
//! optional. A PID 1 must not die on a typo: an unknown `berth.*` key or a bad value yields one
//! warning and the default (for `berth.net`: no network; a bad `berth.share` is skipped, the
//! others are kept, since every occurrence of that key adds a share).

use std::path::PathBuf;

use berth_machine::{DATA_DISK_SERIAL, MAX_DISK_SERIAL};
use berth_protocol::cmdline::{GuestNet, GuestShare, NET_PARAM, SHARE_PARAM};

/// The command line as the kernel exposes it.
pub const CMDLINE_PATH: &str = "/proc/cmdline";

const KEY_HOSTNAME: &str = "berth.hostname";
const KEY_DATA: &str = "berth.data";
const KEY_ON_READY: &str = "berth.on_ready";
const KEY_DOCKER: &str = "berth.docker";
const KEY_IDLE_RECLAIM: &str = "berth.idle_reclaim";

/// Host name used when `berth.hostname` is absent or invalid.
pub const DEFAULT_HOSTNAME: &str = "berth";
/// How a `berth.data` value names a disk by its virtio-blk serial.
const SERIAL_PREFIX: &str = "serial:";
/// Longest host name sethostname(2) accepts (`HOST_NAME_MAX`).
const HOSTNAME_MAX: usize = 64;

/// What the agent does once it has printed its readiness line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReady {
    /// Stay up as PID 1 (the normal case).
    Stay,
    /// Shut down cleanly and power off (tests, boot benchmark).
    PowerOff,
    /// Shut down cleanly and reboot (tests).
    Reboot,
}

/// `berth.data`: which disk holds Docker's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataDisk {
    /// `berth.data=none`: state on a tmpfs, nothing kept.
    None,
    /// `berth.data=/dev/vdb`: this device node.
    Device(PathBuf),
    /// `berth.data=serial:NAME`: the virtio disk whose serial is NAME (the default, with the
    /// serial the host gives its data disk).
    Serial(String),
}

impl Default for DataDisk {
    fn default() -> Self {
        DataDisk::Serial(DATA_DISK_SERIAL.to_string())
    }
}

impl DataDisk {
    /// Parses a `berth.data` value; `None` if it is not one.
    fn parse(value: &str) -> Option<DataDisk> {
        if value == "none" {
            return Some(DataDisk::None);
        }
        if let Some(serial) = value.strip_prefix(SERIAL_PREFIX) {
            return is_valid_serial(serial).then(|| DataDisk::Serial(serial.to_string()));
        }
        (value.starts_with('/') && !value.contains("/../"))
            .then(|| DataDisk::Device(PathBuf::from(value)))
    }
}

impl std::fmt::Display for DataDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataDisk::None => f.write_str("none"),
            DataDisk::Device(path) => write!(f, "{}", path.display()),
            DataDisk::Serial(serial) => write!(f, "{SERIAL_PREFIX}{serial}"),
        }
    }
}

/// Everything the command line configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `berth.hostname`
    pub hostname: String,
    /// `berth.data`
    pub data: DataDisk,
    /// `berth.on_ready`
    pub on_ready: OnReady,
    /// `berth.docker=on|off`: whether containerd and dockerd are started after the readiness
    /// line (boot tests and the boot benchmark turn them off).
    pub docker: bool,
    /// `berth.net`: eth0's address, gateway, upstream resolver and MTU; `None` (absent or
    /// malformed) leaves the guest with loopback only.
    pub net: Option<GuestNet>,
    /// Every valid `berth.share` in command-line order (each occurrence adds one).
    pub shares: Vec<GuestShare>,
    /// `berth.idle_reclaim=SECONDS`: after this long idle the agent reclaims the page cache
    /// (`reclaim`); 0 never does.
    pub idle_reclaim_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: DEFAULT_HOSTNAME.to_string(),
            data: DataDisk::default(),
            on_ready: OnReady::Stay,
            docker: true,
            net: None,
            shares: Vec::new(),
            idle_reclaim_secs: crate::reclaim::DEFAULT_IDLE_SECS,
        }
    }
}

/// A parsed command line: the configuration and one warning per key that was ignored.
#[derive(Debug)]
pub struct Parsed {
    pub config: Config,
    pub warnings: Vec<String>,
}

impl Config {
    /// Parses a kernel command line. Never fails: problems become `warnings`.
    /// Non-`berth.` parameters are the kernel's business and are skipped silently; the
    /// last occurrence of a key wins, as for kernel parameters.
    pub fn parse(cmdline: &str) -> Parsed {
        let mut config = Config::default();
        let mut warnings = Vec::new();
        for (key, value) in params(cmdline) {
            if !key.starts_with("berth.") {
                continue;
            }
            if let Err(warning) = config.apply(&key, value.as_deref()) {
                warnings.push(warning);
            }
        }
        Parsed { config, warnings }
    }

    /// Applies one `berth.*` parameter; on a bad value the field is reset to its default.
    fn apply(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        let default = Config::default();
        let shown = value.map_or_else(|| key.to_string(), |v| format!("{key}={v:?}"));
        match key {
            KEY_HOSTNAME => match value.filter(|v| is_valid_hostname(v)) {
                Some(name) => self.hostname = name.to_string(),
                None => {
                    self.hostname = default.hostname;
                    return Err(format!(
                        "{shown}: not a host name (1-{HOSTNAME_MAX} letters, digits, '-', '.'); \
                         using {DEFAULT_HOSTNAME:?}"
                    ));
                }
            },
            KEY_DATA => match value.and_then(DataDisk::parse) {
                Some(data) => self.data = data,
                None => {
                    self.data = default.data;
                    return Err(format!(
                        "{shown}: expected serial:NAME (1-{MAX_DISK_SERIAL} letters, digits, \
                         '-', '_', '.'), a device path such as /dev/vdb, or \"none\"; using {}",
                        DataDisk::default()
                    ));
                }
            },
            KEY_ON_READY => match value {
                Some("none") => self.on_ready = OnReady::Stay,
                Some("poweroff") => self.on_ready = OnReady::PowerOff,
                Some("reboot") => self.on_ready = OnReady::Reboot,
                _ => {
                    self.on_ready = default.on_ready;
                    return Err(format!(
                        "{shown}: expected poweroff, reboot or none; using none"
                    ));
                }
            },
            KEY_DOCKER => match value {
                Some("on") => self.docker = true,
                Some("off") => self.docker = false,
                _ => {
                    self.docker = default.docker;
                    return Err(format!("{shown}: expected on or off; using on"));
                }
            },
            KEY_IDLE_RECLAIM => match value.and_then(|v| v.parse::<u64>().ok()) {
                Some(secs) => self.idle_reclaim_secs = secs,
                None => {
                    self.idle_reclaim_secs = default.idle_reclaim_secs;
                    return Err(format!(
                        "{shown}: expected seconds (0 for never); using {}",
                        default.idle_reclaim_secs
                    ));
                }
            },
            NET_PARAM => match value.map(GuestNet::parse) {
                Some(Ok(net)) => self.net = Some(net),
                Some(Err(why)) => {
                    self.net = None;
                    return Err(format!("{why}; no network"));
                }
                None => {
                    self.net = None;
                    return Err(format!(
                        "{shown}: expected ADDRESS/PREFIX,GATEWAY,DNS,MTU; no network"
                    ));
                }
            },
            SHARE_PARAM => match value.map(GuestShare::parse) {
                Some(Ok(share)) => self.shares.push(share),
                Some(Err(why)) => return Err(format!("{why}; share not mounted")),
                None => return Err(format!("{shown}: expected TAG,rw|ro,PATH; ignored")),
            },
            _ => {
                return Err(format!(
                    "unknown command-line key {key} (known: {KEY_HOSTNAME}, {KEY_DATA}, \
                     {KEY_ON_READY}, {KEY_DOCKER}, {KEY_IDLE_RECLAIM}, {NET_PARAM}, \
                     {SHARE_PARAM}); ignored"
                ))
            }
        }
        Ok(())
    }
}

/// A virtio-blk serial the host can have set: what the VMM accepts, and nothing a path or a
/// console line could trip on.
fn is_valid_serial(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= MAX_DISK_SERIAL
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// RFC 1123 host name (or a dotted FQDN) that fits `HOST_NAME_MAX`.
fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= HOSTNAME_MAX
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Splits a command line into `(key, value)` pairs the way the kernel's `next_arg` does:
/// whitespace separates parameters except inside double quotes, a quote around the whole
/// parameter or around the value is removed, and `--` ends the kernel's part (what follows
/// belongs to init's argv).
fn params(cmdline: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for token in tokens(cmdline) {
        if token == "--" {
            break;
        }
        let token = strip_quotes(&token);
        match token.split_once('=') {
            Some((key, value)) => {
                out.push((key.to_string(), Some(strip_quotes(value).to_string())))
            }
            None => out.push((token.to_string(), None)),
        }
    }
    out
}

/// Whitespace-separated tokens; whitespace inside double quotes does not separate.
fn tokens(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_quote = false;
    for c in cmdline.chars() {
        if c == '"' {
            in_quote = !in_quote;
        }
        if c.is_whitespace() && !in_quote {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Removes one leading double quote and, if present, one trailing one.
fn strip_quotes(s: &str) -> &str {
    match s.strip_prefix('"') {
        Some(inner) => inner.strip_suffix('"').unwrap_or(inner),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(cmdline: &str) -> Parsed {
        Config::parse(cmdline)
    }

    #[test]
    fn empty_command_line_gives_defaults() {
        let p = parse("");
        assert_eq!(p.config, Config::default());
        assert_eq!(p.config.hostname, "berth");
        // Deliberately changed: the data disk is found by its serial, not by probe order.
        assert_eq!(p.config.data, DataDisk::Serial("berth-data".into()));
        assert_eq!(p.config.on_ready, OnReady::Stay);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn typical_vmm_command_line() {
        let p = parse(
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro \
             virtio_mmio.device=4K@0xd0000000:5 berth.hostname=dev-box \
             berth.data=/dev/vdc berth.on_ready=poweroff\n",
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.config.hostname, "dev-box");
        assert_eq!(p.config.data, DataDisk::Device(PathBuf::from("/dev/vdc")));
        assert_eq!(p.config.on_ready, OnReady::PowerOff);
    }

    #[test]
    fn data_none_and_reboot() {
        let p = parse("berth.data=none berth.on_ready=reboot");
        assert!(p.warnings.is_empty());
        assert_eq!(p.config.data, DataDisk::None);
        assert_eq!(p.config.on_ready, OnReady::Reboot);
        assert_eq!(parse("berth.on_ready=none").config.on_ready, OnReady::Stay);
    }

    #[test]
    fn quoted_values_are_unquoted_and_keep_spaces_together() {
        let p = parse(r#"foo="a b c" berth.hostname="quoted" "berth.data=/dev/vdd" x"#);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.config.hostname, "quoted");
        assert_eq!(p.config.data, DataDisk::Device(PathBuf::from("/dev/vdd")));
        // A quoted value with a space is one parameter, and not a valid host name.
        let p = parse(r#"berth.hostname="my host" berth.on_ready=poweroff"#);
        assert_eq!(p.config.hostname, "berth");
        assert_eq!(p.config.on_ready, OnReady::PowerOff);
        assert_eq!(p.warnings.len(), 1);
        assert!(
            p.warnings[0].contains("berth.hostname=\"my host\""),
            "{}",
            p.warnings[0]
        );
    }

    #[test]
    fn parameters_after_double_dash_belong_to_init_argv() {
        let p = parse("ro -- berth.hostname=ignored berth.bogus=1");
        assert_eq!(p.config, Config::default());
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn unknown_berth_key_warns_once_and_changes_nothing() {
        let p = parse("berth.hostnme=typo quiet berth.debug");
        assert_eq!(p.config, Config::default());
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings[0].contains("unknown command-line key berth.hostnme"));
        assert!(p.warnings[1].contains("unknown command-line key berth.debug"));
        // Other subsystems' keys are not ours to judge.
        assert!(parse("agent.log=debug quiet loglevel=3")
            .warnings
            .is_empty());
    }

    #[test]
    fn bad_values_warn_and_fall_back_to_defaults() {
        let p = parse("berth.on_ready=halt berth.data=vdb berth.hostname=-bad-");
        assert_eq!(p.config, Config::default());
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("expected poweroff, reboot or none"));
        assert!(p.warnings[1].contains("/dev/vdb"));
        assert!(p.warnings[2].contains("not a host name"));
        // A key without a value is a bad value too.
        let p = parse("berth.data berth.on_ready= berth.hostname=");
        assert_eq!(p.config, Config::default());
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
    }

    #[test]
    fn bad_value_after_good_one_resets_to_default() {
        let p = parse("berth.on_ready=poweroff berth.on_ready=sometimes");
        assert_eq!(p.config.on_ready, OnReady::Stay);
        let p = parse("berth.on_ready=sometimes berth.on_ready=reboot");
        assert_eq!(p.config.on_ready, OnReady::Reboot);
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn docker_on_off() {
        assert!(parse("").config.docker);
        assert_eq!(parse("berth.idle_reclaim=0").config.idle_reclaim_secs, 0);
        let p = parse("berth.idle_reclaim=soon");
        assert_eq!(
            p.config.idle_reclaim_secs,
            crate::reclaim::DEFAULT_IDLE_SECS
        );
        assert!(
            p.warnings[0].contains("expected seconds"),
            "{:?}",
            p.warnings
        );
        let p = parse("berth.docker=off");
        assert!(p.warnings.is_empty());
        assert!(!p.config.docker);
        assert!(parse("berth.docker=off berth.docker=on").config.docker);
        let p = parse("berth.docker=no");
        assert!(p.config.docker);
        assert_eq!(p.warnings.len(), 1);
        assert!(
            p.warnings[0].contains("expected on or off"),
            "{}",
            p.warnings[0]
        );
    }

    #[test]
    fn data_disk_by_serial() {
        let p = parse("berth.data=serial:scratch-1");
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.config.data, DataDisk::Serial("scratch-1".into()));
        assert_eq!(p.config.data.to_string(), "serial:scratch-1");
        assert_eq!(
            parse("berth.data=serial:berth-data").config,
            Config::default()
        );
        let longest = format!("berth.data=serial:{}", "s".repeat(MAX_DISK_SERIAL));
        assert!(parse(&longest).warnings.is_empty());
        for bad in [
            "berth.data=serial:",
            "berth.data=serial:../../etc",
            "berth.data=serial:a/b",
            "berth.data=serial:with\"quote",
            &format!("berth.data=serial:{}", "s".repeat(MAX_DISK_SERIAL + 1)),
        ] {
            let p = parse(bad);
            assert_eq!(p.config.data, DataDisk::default(), "{bad}");
            assert_eq!(p.warnings.len(), 1, "{bad}");
            assert!(
                p.warnings[0].contains("using serial:berth-data"),
                "{}",
                p.warnings[0]
            );
        }
    }

    #[test]
    fn network_from_the_command_line() {
        assert_eq!(parse("").config.net, None);
        let p = parse("ro berth.net=192.168.127.2/24,192.168.127.1,192.168.127.53,65520 quiet");
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let net = p.config.net.expect("berth.net was given");
        assert_eq!(net.address, std::net::Ipv4Addr::new(192, 168, 127, 2));
        assert_eq!(net.prefix_len, 24);
        assert_eq!(net.gateway, std::net::Ipv4Addr::new(192, 168, 127, 1));
        assert_eq!(net.dns, std::net::Ipv4Addr::new(192, 168, 127, 53));
        assert_eq!(net.mtu, 65520);
        // Malformed: one line that says so, and no network rather than a half-configured one.
        for bad in [
            "berth.net=192.168.127.2/24,192.168.127.1,192.168.127.53,65520 \
             berth.net=192.168.127.2/24,gw,1.1.1.1,1500",
            "berth.net",
            "berth.net=",
        ] {
            let p = parse(bad);
            assert_eq!(p.config.net, None, "{bad}");
            assert_eq!(p.warnings.len(), 1, "{bad}: {:?}", p.warnings);
            assert!(p.warnings[0].contains("berth.net"), "{}", p.warnings[0]);
            assert!(p.warnings[0].ends_with("no network"), "{}", p.warnings[0]);
        }
    }

    #[test]
    fn every_share_is_kept_and_a_bad_one_is_skipped() {
        let p = parse(
            "berth.share=berth-share-0,rw,/home/alice berth.share=bad \
             berth.share=berth-share-1,ro,/tmp/My%20Dir",
        );
        assert_eq!(p.config.shares.len(), 2, "{:?}", p.config.shares);
        assert_eq!(p.config.shares[0].tag, "berth-share-0");
        assert!(!p.config.shares[0].read_only);
        assert_eq!(p.config.shares[0].path, Path::new("/home/alice"));
        assert_eq!(p.config.shares[1].path, Path::new("/tmp/My Dir"));
        assert!(p.config.shares[1].read_only);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(
            p.warnings[0].contains("berth.share=bad"),
            "{}",
            p.warnings[0]
        );
        assert!(parse("").config.shares.is_empty());
    }

    #[test]
    fn hostname_rules() {
        assert!(is_valid_hostname("berth"));
        assert!(is_valid_hostname("a-1.example.com"));
        assert!(is_valid_hostname(&"a".repeat(64)));
        assert!(!is_valid_hostname(&"a".repeat(65)));
        assert!(!is_valid_hostname(""));
        assert!(!is_valid_hostname("a..b"));
        assert!(!is_valid_hostname("under_score"));
        assert!(!is_valid_hostname("trailing-"));
        assert!(!is_valid_hostname("sp ace"));
    }
}
