//! The guest's data disk: a sparse file created at the configured size, grown when the size is
//! raised, never shrunk (that would cut off the guest's filesystem).

use std::fs::File;
use std::path::{Path, PathBuf};

pub const GIB: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare the data disk {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the data disk {} is {current_gib} GiB, larger than the configured {wanted_gib} GiB: \
         shrinking is refused (set disk_size_gib to at least {current_gib}, or delete the disk \
         to start over)",
        path.display()
    )]
    Shrink {
        path: PathBuf,
        current_gib: u64,
        wanted_gib: u64,
    },
}

/// What `ensure` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Grown { from_bytes: u64 },
    Unchanged,
}

/// Makes `path` a disk of `size_gib` GiB: created sparse if missing, grown if smaller.
pub fn ensure(path: &Path, size_gib: u64) -> Result<Outcome, Error> {
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let wanted = size_gib.checked_mul(GIB).ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "disk size overflows",
        ))
    })?;
    // Never `truncate(true)`: an existing disk holds the user's images and volumes.
    let existed = path.exists();
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    let current = file.metadata().map_err(io)?.len();
    if current > wanted {
        return Err(Error::Shrink {
            path: path.into(),
            current_gib: current.div_ceil(GIB),
            wanted_gib: size_gib,
        });
    }
    if current == wanted {
        return Ok(Outcome::Unchanged);
    }
    file.set_len(wanted).map_err(io)?;
    Ok(if existed && current > 0 {
        Outcome::Grown {
            from_bytes: current,
        }
    } else {
        Outcome::Created
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn created_sparse_then_grown_keeping_data_and_never_shrunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.img");
        assert_eq!(ensure(&path, 2).unwrap(), Outcome::Created);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 2 * GIB);
        assert!(meta.blocks() * 512 < 1 << 20, "the disk must be sparse");

        let mut f = File::options().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"ext4 lives here").unwrap();
        drop(f);

        assert_eq!(ensure(&path, 2).unwrap(), Outcome::Unchanged);
        assert_eq!(
            ensure(&path, 3).unwrap(),
            Outcome::Grown {
                from_bytes: 2 * GIB
            }
        );
        let err = ensure(&path, 1).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Shrink {
                    current_gib: 3,
                    wanted_gib: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("shrinking is refused"));

        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * GIB);
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        let mut buf = [0u8; 15];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ext4 lives here");
    }
}
