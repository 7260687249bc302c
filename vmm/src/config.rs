//! What the user asks the VMM to run, and the checks that turn a bad request into one clear
//! line before anything is started.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
pub const MAX_CPUS: u8 = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} is not a regular file")]
    KernelNotFile(PathBuf),
    #[error("memory of {0} MiB is too little: a Linux guest needs at least {MIN_MEMORY_MIB} MiB")]
    TooLittleMemory(u64),
    #[error("memory of {0} MiB is more than the {MAX_MEMORY_MIB} MiB this VMM supports")]
    TooMuchMemory(u64),
    #[error("{0} vCPUs: choose between 1 and {MAX_CPUS}")]
    Cpus(u8),
    #[error("disk {path}: {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH` or `PATH,ro` (also `,rw`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err("a disk needs a path: --disk PATH[,ro]".into());
        }
        Ok(DiskConfig {
            path: path.into(),
            read_only,
        })
    }
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    /// Appended to the VMM's own arguments (console, devices).
    pub cmdline: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<DiskConfig>,
    pub rng: bool,
    pub serial_log: Option<PathBuf>,
    pub console: bool,
    /// Host unix socket for virtio-vsock (hybrid convention); no vsock device when `None`.
    pub vsock: Option<PathBuf>,
}

impl VmConfig {
    /// Checks everything that can be checked without starting the VM.
    pub fn validate(&self) -> Result<(), Error> {
        let meta = std::fs::metadata(&self.kernel).map_err(|source| Error::Kernel {
            path: self.kernel.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(Error::KernelNotFile(self.kernel.clone()));
        }
        File::open(&self.kernel).map_err(|source| Error::Kernel {
            path: self.kernel.clone(),
            source,
        })?;
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::TooLittleMemory(self.memory_mib));
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(Error::TooMuchMemory(self.memory_mib));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(Error::Cpus(self.cpus));
        }
        for disk in &self.disks {
            OpenOptions::new()
                .read(true)
                .write(!disk.read_only)
                .open(&disk.path)
                .map_err(|source| Error::Disk {
                    path: disk.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            cmdline: String::new(),
            cpus: 1,
            memory_mib: 256,
            disks: vec![],
            rng: true,
            serial_log: None,
            console: false,
            vsock: None,
        }
    }

    #[test]
    fn disk_arguments_parse() {
        assert_eq!(
            "a.img".parse(),
            Ok(DiskConfig {
                path: "a.img".into(),
                read_only: false
            })
        );
        assert_eq!(
            "/x/a,b.img,ro".parse(),
            Ok(DiskConfig {
                path: "/x/a,b.img".into(),
                read_only: true
            })
        );
        assert_eq!(
            "a.img,rw".parse(),
            Ok(DiskConfig {
                path: "a.img".into(),
                read_only: false
            })
        );
        assert!(",ro".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn bad_configurations_name_the_problem() {
        let kernel = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let good = config(kernel.as_path().into());
        good.validate().unwrap();

        let err = config("/no/such/vmlinux".into()).validate().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("kernel /no/such/vmlinux: No such file"),
            "{err}"
        );
        let err = config("/tmp".into()).validate().unwrap_err();
        assert!(matches!(err, Error::KernelNotFile(_)), "{err}");
        let err = VmConfig {
            memory_mib: 1,
            ..good.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("too little"), "{err}");
        let err = VmConfig {
            cpus: 0,
            ..good.clone()
        }
        .validate()
        .unwrap_err();
        assert!(matches!(err, Error::Cpus(0)), "{err}");
        let disks = vec![DiskConfig {
            path: "/no/disk.img".into(),
            read_only: true,
        }];
        let err = VmConfig { disks, ..good }.validate().unwrap_err();
        assert!(err.to_string().starts_with("disk /no/disk.img:"), "{err}");
    }
}
