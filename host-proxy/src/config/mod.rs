//! `config.toml` (in the platform's config directory, or `$BERTH_CONFIG`): the VM's resources,
//! where its artifacts are, the host folders it shares (`shares`) and how published ports
//! listen (`[ports]`). The host proxy reads it at every start; the CLI edits it. Every value is
//! validated before the file is written.

mod shares;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use berth_machine::{DEFAULT_CPUS, DEFAULT_DISK_SIZE_GIB, DEFAULT_MEMORY_MIB};
use serde::{Deserialize, Serialize};

use crate::settings::VmSettings;

/// Environment variable naming the config file (tests use it).
pub const CONFIG_ENV: &str = "BERTH_CONFIG";

/// The least memory Berth starts a VM with: dockerd needs it.
pub const MIN_MEMORY_MIB: u64 = 256;
pub const KEYS: &str =
    "cpus, memory_mib, disk_size_gib, kernel, rootfs, vmm, cmdline_extra, shares, ports.bind_address";
/// The largest data disk accepted, in GiB.
const MAX_DISK_SIZE_GIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot find the config directory: set {CONFIG_ENV} to a file path")]
    NoConfigDir,
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML parser's own message, trimmed to one line (its `Display` quotes the file).
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: Invalid,
    },
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the config")]
    Encode(#[source] toml::ser::Error),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no {what} configured: set {env} (`eval \"$(tests/setup.sh)\"` in the Berth repo builds \
         and exports it) or run `berth config set {key} PATH`"
    )]
    NoArtifact {
        what: &'static str,
        env: &'static str,
        key: &'static str,
    },
    #[error("the {what} {} (from {from}) does not exist", path.display())]
    MissingArtifact {
        what: &'static str,
        path: PathBuf,
        from: String,
    },
    /// A value the file holds that cannot be used now (a shared folder gone).
    #[error(transparent)]
    Setting(Invalid),
    /// A measuring knob from the environment that does not parse.
    #[error("{0}")]
    Environment(String),
}

/// A value the config cannot hold.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("cpus must be between 1 and 255, not {0}")]
    Cpus(u64),
    #[error("memory_mib must be at least {MIN_MEMORY_MIB} (dockerd needs it), not {0}")]
    Memory(u64),
    #[error("disk_size_gib must be at least 1")]
    DiskTooSmall,
    #[error("disk_size_gib {0} is beyond any real disk")]
    DiskTooLarge(u64),
    #[error(
        "the data disk {} is {current_gib} GiB: shrinking it to {size_gib} GiB is refused \
         (delete it to start over with an empty disk)", path.display()
    )]
    DiskShrink {
        path: PathBuf,
        current_gib: u64,
        size_gib: u64,
    },
    #[error("{key} must be a whole number, not {value:?}")]
    NotANumber { key: String, value: String },
    #[error("{key}: {value} is not a file")]
    NotAFile { key: String, value: String },
    #[error("{key}: cannot resolve {value}")]
    Resolve {
        key: String,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown setting {0:?}: the settings are {KEYS}")]
    UnknownKey(String),
    #[error("shares: {} is not an absolute path", .0.display())]
    ShareNotAbsolute(PathBuf),
    #[error("shares: {} does not exist", .0.display())]
    ShareMissing(PathBuf),
    #[error("shares: {} is not a directory", .0.display())]
    ShareNotADirectory(PathBuf),
    #[error("shares: cannot resolve {}", path.display())]
    ShareResolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shares: {} is listed twice{}", path.display(), same_as(path, other))]
    ShareDuplicate { path: PathBuf, other: PathBuf },
    #[error(
        "shares: {} is inside {}, which is shared already: list only one of them",
        inner.display(), outer.display()
    )]
    ShareNested { inner: PathBuf, outer: PathBuf },
    #[error("shares: {} is where the guest's own system lives: share a folder below it", .0.display())]
    ShareSystem(PathBuf),
    #[error("shares: {0:?} is not PATH, PATH:ro or PATH:rw")]
    ShareSpec(String),
    #[error("ports.bind_address: {0:?} is not an IP address (like 127.0.0.1 or ::1)")]
    BindAddress(String),
    #[error(
        "the kernel command line would be {len} bytes, more than the {max} Linux takes: share \
         fewer folders or shorten cmdline_extra", max = crate::settings::MAX_CMDLINE
    )]
    CmdlineTooLong { len: usize },
}

/// ` (as OTHER)` when a duplicate share was written differently.
fn same_as(path: &Path, other: &Path) -> String {
    if path == other {
        String::new()
    } else {
        format!(" (as {})", other.display())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_cpus")]
    pub cpus: u64,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_disk_size_gib")]
    pub disk_size_gib: u64,
    /// Guest kernel; default `$BERTH_KERNEL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Guest root filesystem image; default `$BERTH_ROOTFS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// The `berth-vmm` binary; default `$BERTH_VMM`, else next to this program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<PathBuf>,
    /// Appended to the guest kernel command line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline_extra: String,
    /// The host folders the guest mounts at the same paths; `None` (absent): the home directory
    /// and the temporary directory. An empty list shares nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<Vec<ShareConfig>>,
    #[serde(default, skip_serializing_if = "PortsConfig::is_default")]
    pub ports: PortsConfig,
}

/// One entry of `shares`: `{ path = "/home/u", read_only = false }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    /// An absolute path to a directory; symlinks are resolved at every start.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// `[ports]`: how published ports listen on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortsConfig {
    /// The host address published ports bind; unset: the ports module's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_address: Option<IpAddr>,
}

impl PortsConfig {
    fn is_default(&self) -> bool {
        *self == PortsConfig::default()
    }
}

fn default_cpus() -> u64 {
    u64::from(DEFAULT_CPUS)
}
fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_disk_size_gib() -> u64 {
    DEFAULT_DISK_SIZE_GIB
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cpus: default_cpus(),
            memory_mib: default_memory_mib(),
            disk_size_gib: default_disk_size_gib(),
            kernel: None,
            rootfs: None,
            vmm: None,
            cmdline_extra: String::new(),
            shares: None,
            ports: PortsConfig::default(),
        }
    }
}

/// An artifact the VM needs, and where its default comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    Kernel,
    Rootfs,
    Vmm,
}

impl Artifact {
    pub fn key(self) -> &'static str {
        match self {
            Artifact::Kernel => "kernel",
            Artifact::Rootfs => "rootfs",
            Artifact::Vmm => "vmm",
        }
    }
    pub fn env(self) -> &'static str {
        match self {
            Artifact::Kernel => "BERTH_KERNEL",
            Artifact::Rootfs => "BERTH_ROOTFS",
            Artifact::Vmm => "BERTH_VMM",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Artifact::Kernel => "guest kernel",
            Artifact::Rootfs => "guest root filesystem image",
            Artifact::Vmm => "berth-vmm binary",
        }
    }
}

/// The config file's path.
pub fn path() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Ok(path.into());
    }
    dirs::config_dir()
        .map(|dir| dir.join("berth").join("config.toml"))
        .ok_or(Error::NoConfigDir)
}

impl Config {
    /// The file at `path`, or the defaults when there is none.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => {
                return Err(Error::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let config: Config = toml::from_str(&text).map_err(|e| Error::Parse {
            path: path.into(),
            message: e.message().trim_end().replace('\n', " "),
        })?;
        config.validate().map_err(|source| Error::Invalid {
            path: path.into(),
            source,
        })?;
        Ok(config)
    }

    /// Writes the file atomically, creating its directory.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.into(),
                source,
            })?;
        }
        let text = toml::to_string(self).map_err(Error::Encode)?;
        crate::layout::write_atomic(path, text.as_bytes()).map_err(|source| Error::Write {
            path: path.into(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if !(1..=u64::from(u8::MAX)).contains(&self.cpus) {
            return Err(Invalid::Cpus(self.cpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Invalid::Memory(self.memory_mib));
        }
        if self.disk_size_gib < 1 {
            return Err(Invalid::DiskTooSmall);
        }
        if self.disk_size_gib > MAX_DISK_SIZE_GIB {
            return Err(Invalid::DiskTooLarge(self.disk_size_gib));
        }
        // Whether the folders exist is checked at each start: a folder gone must not make the
        // whole file unreadable.
        for share in self.shares.iter().flatten() {
            if !share.path.is_absolute() {
                return Err(Invalid::ShareNotAbsolute(share.path.clone()));
            }
        }
        Ok(())
    }

    /// The host address published ports bind, when one is configured.
    pub fn ports_bind_address(&self) -> Option<IpAddr> {
        self.ports.bind_address
    }

    /// The shares, resolved as a start resolves them: the configured ones checked strictly, or
    /// the defaults (those that exist).
    pub fn shares(&self) -> Result<Vec<crate::settings::Share>, Invalid> {
        match &self.shares {
            Some(configured) => shares::resolve(configured),
            None => Ok(shares::defaults()),
        }
    }

    /// Fails when the command line these shares and `cmdline_extra` make is too long.
    fn check_cmdline(&self, shares: &[crate::settings::Share]) -> Result<(), Invalid> {
        let len = crate::settings::cmdline(shares, &self.cmdline_extra).len();
        if len > crate::settings::MAX_CMDLINE {
            return Err(Invalid::CmdlineTooLong { len });
        }
        Ok(())
    }

    /// Sets `key` to `value` (text as typed on the command line), validating it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), Invalid> {
        let number = || -> Result<u64, Invalid> {
            value
                .trim()
                .parse::<u64>()
                .map_err(|_| Invalid::NotANumber {
                    key: key.into(),
                    value: value.into(),
                })
        };
        match key {
            "cpus" => self.cpus = number()?,
            "memory_mib" | "memory" => self.memory_mib = number()?,
            "disk_size_gib" | "disk_size" => self.disk_size_gib = number()?,
            "kernel" => self.kernel = Some(existing_file(key, value)?),
            "rootfs" => self.rootfs = Some(existing_file(key, value)?),
            "vmm" => self.vmm = Some(existing_file(key, value)?),
            "cmdline_extra" => {
                self.cmdline_extra = value.trim().to_string();
                self.check_cmdline(&self.shares()?)?;
            }
            "shares" => {
                let configured = shares::parse_list(value)?;
                let resolved = shares::resolve(&configured)?;
                self.shares = Some(configured);
                self.check_cmdline(&resolved)?;
            }
            "ports.bind_address" => {
                let address = value.trim();
                let address = address
                    .parse()
                    .map_err(|_| Invalid::BindAddress(address.into()))?;
                self.ports.bind_address = Some(address);
            }
            _ => return Err(Invalid::UnknownKey(key.into())),
        }
        self.validate()
    }

    /// Resets `key` to its default.
    pub fn unset(&mut self, key: &str) -> Result<(), Invalid> {
        let default = Config::default();
        match key {
            "cpus" => self.cpus = default.cpus,
            "memory_mib" | "memory" => self.memory_mib = default.memory_mib,
            "disk_size_gib" | "disk_size" => self.disk_size_gib = default.disk_size_gib,
            "kernel" => self.kernel = None,
            "rootfs" => self.rootfs = None,
            "vmm" => self.vmm = None,
            "cmdline_extra" => self.cmdline_extra.clear(),
            "shares" => self.shares = None,
            "ports.bind_address" => self.ports.bind_address = None,
            _ => return Err(Invalid::UnknownKey(key.into())),
        }
        Ok(())
    }

    /// The settings as the control API's status shows them (artifacts resolved as a start
    /// would resolve them).
    pub fn status_settings(&self) -> crate::control_api::model::Settings {
        let artifact = |a| self.artifact(a).map(|(path, _)| path);
        crate::control_api::model::Settings {
            // `validate` keeps cpus within 1..=255.
            cpus: u8::try_from(self.cpus).unwrap_or(u8::MAX),
            memory_mib: self.memory_mib,
            disk_size_gib: self.disk_size_gib,
            kernel: artifact(Artifact::Kernel),
            rootfs: artifact(Artifact::Rootfs),
            vmm: artifact(Artifact::Vmm),
            cmdline_extra: self.cmdline_extra.clone(),
            shares: crate::settings::status_shares(&self.shares().unwrap_or_else(|_| {
                // The start will say what is wrong; show them as written meanwhile.
                self.shares
                    .iter()
                    .flatten()
                    .map(|s| crate::settings::Share {
                        path: s.path.clone(),
                        alias: None,
                        read_only: s.read_only,
                    })
                    .collect()
            })),
            ports: crate::control_api::model::PortSettings {
                bind_address: self.ports.bind_address,
            },
        }
    }

    /// Where `artifact` is: the config file, else its environment variable, else (the VMM) next
    /// to this executable; with the place it came from.
    pub fn artifact(&self, artifact: Artifact) -> Option<(PathBuf, String)> {
        let configured = match artifact {
            Artifact::Kernel => &self.kernel,
            Artifact::Rootfs => &self.rootfs,
            Artifact::Vmm => &self.vmm,
        };
        if let Some(path) = configured {
            return Some((path.clone(), "config file".into()));
        }
        if let Some(path) = std::env::var_os(artifact.env()).filter(|p| !p.is_empty()) {
            return Some((path.into(), format!("${}", artifact.env())));
        }
        if artifact == Artifact::Vmm {
            let sibling = sibling_executable("berth-vmm")?;
            return Some((sibling, "next to this program".into()));
        }
        None
    }

    /// The settings to start the VM with; a missing artifact is one clear error.
    pub fn vm_settings(&self) -> Result<VmSettings, Error> {
        let resolve = |artifact: Artifact| -> Result<PathBuf, Error> {
            let Some((path, from)) = self.artifact(artifact) else {
                return Err(Error::NoArtifact {
                    what: artifact.what(),
                    env: artifact.env(),
                    key: artifact.key(),
                });
            };
            if !path.is_file() {
                return Err(Error::MissingArtifact {
                    what: artifact.what(),
                    path,
                    from,
                });
            }
            Ok(path)
        };
        let cpus = u8::try_from(self.cpus).map_err(|_| Error::Invalid {
            path: PathBuf::from("config"),
            source: Invalid::Cpus(self.cpus),
        })?;
        let shares = self.shares().map_err(Error::Setting)?;
        self.check_cmdline(&shares).map_err(Error::Setting)?;
        Ok(VmSettings {
            vmm: resolve(Artifact::Vmm)?,
            kernel: resolve(Artifact::Kernel)?,
            rootfs: resolve(Artifact::Rootfs)?,
            cpus,
            memory_mib: self.memory_mib,
            disk_size_gib: self.disk_size_gib,
            cmdline_extra: self.cmdline_extra.clone(),
            shares,
            ports_bind_address: self.ports.bind_address,
            share_cache: crate::settings::share_cache_from_env().map_err(Error::Environment)?,
        })
    }
}

fn existing_file(key: &str, value: &str) -> Result<PathBuf, Invalid> {
    let path = Path::new(value);
    if !path.is_file() {
        return Err(Invalid::NotAFile {
            key: key.into(),
            value: value.into(),
        });
    }
    std::fs::canonicalize(path).map_err(|source| Invalid::Resolve {
        key: key.into(),
        value: value.into(),
        source,
    })
}

/// Refuses a disk size below that of the data disk the home has (`berth config set` and the
/// tray's settings ask before they write; a start asks again).
pub fn check_disk_not_shrunk(layout: &crate::layout::Layout, size_gib: u64) -> Result<(), Invalid> {
    let path = layout.data_disk();
    if let Ok(meta) = std::fs::metadata(&path) {
        let current_gib = meta.len().div_ceil(crate::disk::GIB);
        if current_gib > size_gib {
            return Err(Invalid::DiskShrink {
                path,
                current_gib,
                size_gib,
            });
        }
    }
    Ok(())
}

/// The first `name` in the directories of `$PATH` that is a file.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `name` in the directory of the running executable, if it is there.
pub fn sibling_executable(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.join(name);
    candidate.is_file().then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    use berth_errors::chain;

    #[test]
    fn a_missing_file_gives_the_defaults_and_a_partial_one_fills_them_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        std::fs::write(&path, "cpus = 4\nkernel = \"/k/vmlinux\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.cpus, 4);
        assert_eq!(config.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(config.kernel, Some(PathBuf::from("/k/vmlinux")));
    }

    #[test]
    fn bad_files_are_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        for (text, wanted) in [
            ("cpus = 0\n", "cpus must be between 1 and 255"),
            ("memory_mib = 100\n", "memory_mib must be at least 256"),
            ("cpu = 2\n", "unknown field `cpu`"),
            ("cpus = \"two\"\n", "invalid type"),
            ("cpus = = 2\n", ""),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = chain(&Config::load(&path).unwrap_err());
            assert!(err.contains(wanted), "{text:?} gave {err:?}");
            assert!(err.starts_with(&path.display().to_string()), "{err}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn set_validates_and_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"ELF").unwrap();
        let mut config = Config::default();
        config.set("cpus", "3").unwrap();
        config.set("memory_mib", "4096").unwrap();
        config.set("disk_size_gib", "1").unwrap();
        config.set("kernel", kernel.to_str().unwrap()).unwrap();
        config.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), config);

        for (key, value, wanted) in [
            ("cpus", "0", "cpus must be between 1 and 255"),
            ("cpus", "256", "cpus must be between 1 and 255"),
            ("cpus", "-1", "whole number"),
            ("memory_mib", "255", "at least 256"),
            ("memory_mib", "lots", "whole number"),
            ("disk_size_gib", "0", "at least 1"),
            ("rootfs", "/no/such/rootfs.img", "is not a file"),
            ("colour", "blue", "unknown setting"),
        ] {
            let mut copy = config.clone();
            let err = copy.set(key, value).unwrap_err().to_string();
            assert!(err.contains(wanted), "{key}={value} gave {err:?}");
        }
        config.unset("cpus").unwrap();
        assert_eq!(config.cpus, u64::from(DEFAULT_CPUS));
    }

    #[test]
    fn shares_and_the_bind_address_round_trip_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let data = dir.path().join("data");
        let other = dir.path().join("other");
        std::fs::create_dir(&data).unwrap();
        std::fs::create_dir(&other).unwrap();
        let mut config = Config::default();
        assert_eq!(config.ports_bind_address(), None);
        config
            .set(
                "shares",
                &format!("{},{}:ro", data.display(), other.display()),
            )
            .unwrap();
        config.set("ports.bind_address", "127.0.0.1").unwrap();
        config.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("bind_address = \"127.0.0.1\""), "{text}");
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded, config);
        assert_eq!(
            loaded.ports_bind_address(),
            Some("127.0.0.1".parse().unwrap())
        );
        let shares = loaded.shares().unwrap();
        assert_eq!(shares.len(), 2);
        assert!(shares[1].read_only);
        let status = loaded.status_settings();
        assert_eq!(status.shares.len(), 2);
        assert_eq!(status.ports.bind_address, loaded.ports_bind_address());

        let mut copy = config.clone();
        let err = copy.set("ports.bind_address", "localhost").unwrap_err();
        assert!(
            err.to_string()
                .contains("\"localhost\" is not an IP address"),
            "{err}"
        );
        let err = copy.set("shares", "/no/such/dir").unwrap_err();
        assert_eq!(err.to_string(), "shares: /no/such/dir does not exist");
        assert_eq!(
            copy.shares, config.shares,
            "a refused value changes nothing"
        );
        let err = copy.set("cmdline_extra", &"x".repeat(2000)).unwrap_err();
        assert!(
            err.to_string().contains("more than the 2047 Linux takes"),
            "{err}"
        );

        config.set("shares", "").unwrap();
        assert!(
            config.shares().unwrap().is_empty(),
            "an empty list shares nothing"
        );
        config.unset("shares").unwrap();
        assert_eq!(config.shares, None, "back to the defaults");
        config.unset("ports.bind_address").unwrap();
        assert_eq!(config.ports_bind_address(), None);

        std::fs::write(&path, "shares = [{ path = \"rel\" }]\n").unwrap();
        let err = chain(&Config::load(&path).unwrap_err());
        assert!(
            err.ends_with("shares: rel is not an absolute path"),
            "{err}"
        );
        std::fs::write(&path, "[ports]\nbind_address = \"nope\"\n").unwrap();
        assert!(Config::load(&path).is_err());
    }

    #[test]
    fn a_missing_artifact_says_how_to_get_it() {
        let config = Config {
            vmm: Some("/bin/sh".into()),
            kernel: Some("/no/such/kernel".into()),
            ..Config::default()
        };
        let err = config.vm_settings().unwrap_err().to_string();
        assert!(
            err.contains("/no/such/kernel") && err.contains("does not exist"),
            "{err}"
        );
    }
}
