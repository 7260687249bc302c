//! Hard links for a VMM that is not root. The passthrough links an inode's `O_PATH` descriptor
//! with `linkat(fd, "", ..., AT_EMPTY_PATH)`, which needs CAP_DAC_READ_SEARCH: as an ordinary
//! user it fails with ENOENT, and `ln` in a container (pnpm's store, `cp -l`, ccache) breaks.
//! The unprivileged way is `linkat(AT_FDCWD, "/proc/self/fd/N", dir, name, AT_SYMLINK_FOLLOW)`
//! on an `O_PATH` descriptor of the very inode.
//!
//! The passthrough keeps its descriptors to itself and gives out only the host path one of them
//! names now (`readlinkat_proc_file`). That path is opened again *beneath the share's root*
//! (`openat2` with RESOLVE_BENEATH and no symlinks, so a path the guest raced into a symlink
//! cannot lead outside) and the result must be the same inode (device and inode number against
//! the passthrough's own `getattr`); anything else is refused. Nothing here follows a path out
//! of the share or links an inode the guest did not name.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use fuse_backend_rs::passthrough::PassthroughFs;

/// The share's root, opened once: what every re-opened path is resolved beneath.
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    fd: File,
}

impl Root {
    /// Opens `path` (canonical: the passthrough's root) as an `O_PATH` directory.
    pub fn open(path: &Path) -> io::Result<Root> {
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Root {
            path: path.to_owned(),
            // SAFETY: a descriptor just opened and owned by nobody else.
            fd: unsafe { File::from_raw_fd(fd) },
        })
    }

    /// `O_PATH` descriptor of `path` (absolute, inside the root), resolved beneath the root
    /// without following any symlink (a trailing one is opened itself).
    fn open_beneath(&self, path: &Path) -> io::Result<File> {
        let rel = path
            .strip_prefix(&self.path)
            .map_err(|_| io::Error::from_raw_os_error(libc::EXDEV))?;
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let c = CString::new(rel.as_os_str().as_bytes())?;
        // SAFETY: open_how is plain data; zero is "no flags, no mode, no resolve rules".
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 with a valid directory descriptor, C string and open_how of the size
        // given; the result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened and owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd as i32) })
    }
}

/// An `O_PATH` descriptor of `inode`, found again through its host path and checked to be the
/// same file the passthrough holds.
fn reopen(fs: &PassthroughFs<()>, ctx: &Context, root: &Root, inode: u64) -> io::Result<File> {
    let path = fs.readlinkat_proc_file(inode)?;
    let file = root.open_beneath(&path)?;
    let (want, _) = fs.getattr(ctx, inode, None)?;
    let got = fstat(&file)?;
    if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino) {
        // Renamed or replaced under us: the name no longer leads to the inode asked for.
        return Err(io::Error::from_raw_os_error(libc::ESTALE));
    }
    Ok(file)
}

fn fstat(file: &File) -> io::Result<libc::stat64> {
    // SAFETY: a zeroed stat64 is a valid buffer for fstat64 to fill.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and buffer.
    if unsafe { libc::fstat64(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Links `inode` as `newname` in `newparent` the unprivileged way.
pub fn link_through_proc(
    fs: &PassthroughFs<()>,
    ctx: &Context,
    root: &Root,
    inode: u64,
    newparent: u64,
    newname: &CStr,
) -> io::Result<()> {
    let source = reopen(fs, ctx, root, inode)?;
    let dir = reopen(fs, ctx, root, newparent)?;
    let proc_path = CString::new(format!("/proc/self/fd/{}", source.as_raw_fd()))?;
    // SAFETY: valid C strings and descriptors; the result is checked.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            dir.as_raw_fd(),
            newname.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
