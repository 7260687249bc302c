//! The checks that turn a bad machine description into one clear line before anything is
//! started: the description's own ranges (`berth_machine::VmConfig::check`) and the files it
//! names (the kernel exists and is a regular file, each disk opens with its mode). Each error
//! names the field.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

pub use berth_machine::{DeviceConfig, DiskConfig, VmConfig, VsockConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Description(#[from] berth_machine::Error),
    #[error("field `kernel`: cannot read the kernel {path}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("field `kernel`: {path} is not a regular file")]
    KernelNotFile { path: PathBuf },
    #[error("field `{field}`: cannot open the disk image {path} {mode}")]
    Disk {
        field: String,
        path: PathBuf,
        mode: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Checks everything that can be checked without starting the VM.
pub fn validate(config: &VmConfig) -> Result<(), Error> {
    config.check()?;
    let kernel_error = |source| Error::Kernel {
        path: config.kernel.clone(),
        source,
    };
    let meta = std::fs::metadata(&config.kernel).map_err(kernel_error)?;
    if !meta.is_file() {
        return Err(Error::KernelNotFile {
            path: config.kernel.clone(),
        });
    }
    File::open(&config.kernel).map_err(kernel_error)?;
    for (i, device) in config.devices.iter().enumerate() {
        if let DeviceConfig::Disk(disk) = device {
            OpenOptions::new()
                .read(true)
                .write(!disk.read_only)
                .open(&disk.path)
                .map_err(|source| Error::Disk {
                    field: format!("devices[{i}].path"),
                    path: disk.path.clone(),
                    mode: if disk.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    source,
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use berth_errors::chain;

    #[test]
    fn bad_configurations_name_the_field() {
        let kernel = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let good = VmConfig::new(kernel.as_path());
        validate(&good).unwrap();

        let err = validate(&VmConfig::new("/no/such/vmlinux")).unwrap_err();
        assert_eq!(
            chain(&err),
            "field `kernel`: cannot read the kernel /no/such/vmlinux: No such file or directory (os error 2)"
        );
        let err = validate(&VmConfig::new("/tmp")).unwrap_err();
        assert_eq!(chain(&err), "field `kernel`: /tmp is not a regular file");
        let err = validate(&VmConfig {
            memory_mib: 1,
            ..good.clone()
        })
        .unwrap_err();
        assert!(
            chain(&err).starts_with("field `memory_mib`: 1 MiB is too little"),
            "{err}"
        );
        let err = validate(&VmConfig {
            cpus: 0,
            ..good.clone()
        })
        .unwrap_err();
        assert!(chain(&err).starts_with("field `cpus`:"), "{err}");

        let devices = vec![
            DeviceConfig::Rng,
            DeviceConfig::Disk(DiskConfig {
                path: "/no/disk.img".into(),
                read_only: true,
                serial: None,
            }),
        ];
        let err = validate(&VmConfig { devices, ..good }).unwrap_err();
        assert_eq!(
            chain(&err),
            "field `devices[1].path`: cannot open the disk image /no/disk.img read-only: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_balloon_is_described_with_its_stats_period() {
        let json = br#"{"kernel": "/k", "devices": [{"type": "balloon"},
            {"type": "balloon", "stats_period_s": 0}]}"#;
        let err = VmConfig::from_json(json).unwrap_err();
        assert_eq!(
            chain(&err),
            "field `devices[1]`: a VM has at most one balloon device"
        );
        let json = br#"{"kernel": "/k", "devices": [{"type": "balloon"}]}"#;
        let config = VmConfig::from_json(json).unwrap();
        assert_eq!(
            config.devices,
            [DeviceConfig::Balloon(berth_machine::BalloonConfig {
                stats_period_s: 5
            })]
        );
        let json =
            br#"{"kernel": "/k", "devices": [{"type": "balloon", "stats_period_s": 86400}]}"#;
        let err = VmConfig::from_json(json).unwrap_err();
        assert!(
            chain(&err).starts_with("field `devices[0].stats_period_s`: 86400 s"),
            "{err}"
        );
    }

    #[test]
    fn a_disk_the_vmm_cannot_write_is_refused_unless_read_only() {
        if nix_is_root() {
            return; // root opens anything; the mode check cannot fail there.
        }
        let kernel = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut perms = image.as_file().metadata().unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o400);
        std::fs::set_permissions(image.as_path(), perms).unwrap();
        let with = |read_only| VmConfig {
            devices: vec![DeviceConfig::Disk(DiskConfig {
                path: image.as_path().into(),
                read_only,
                serial: None,
            })],
            ..VmConfig::new(kernel.as_path())
        };
        validate(&with(true)).unwrap();
        let err = validate(&with(false)).unwrap_err();
        assert!(
            chain(&err).starts_with("field `devices[0].path`: cannot open the disk image"),
            "{err}"
        );
        assert!(
            chain(&err).contains("read-write: Permission denied"),
            "{err}"
        );
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
}
