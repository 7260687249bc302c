//! Host folders at the same path: every `berth.share` is mounted (virtio-fs, source = its tag)
//! at its host path before dockerd starts, so `-v "$PWD":/app` names the same folder inside.
//!
//! The rule for mount points, the root being read-only:
//! - a path that exists in the guest as a directory is mounted over directly (`/tmp`, an empty
//!   `/home`, `/mnt`);
//! - a path inside an earlier share (shares are mounted shallowest first) is mounted where the
//!   host has it: the agent never creates directories on the host;
//! - a path below `/tmp` (a tmpfs) is created there;
//! - otherwise, if the deepest ancestor the image has is an empty directory other than `/`
//!   (`/home`, `/mnt`, `/media`, `/srv`, `/opt`), a small tmpfs goes on it and the path is
//!   created below; once every share is mounted that tmpfs is remounted read-only, so that a
//!   container's bind of an unshared path under it fails instead of getting an empty directory;
//! - anything else is refused with one console line: a path that is not plain (relative, `..`,
//!   `/`), that is, holds or sits below a guest system directory (`SYSTEM_DIRS`), whose missing
//!   part lies under a non-empty image directory or under `/` itself, or that passes a symlink.
//!
//! Mount options: `ro` for a read-only share; `nosuid,nodev` (host files are no guest devices or
//! set-uid programs); `host_permissions` (our kernel's option; Linux otherwise forces
//! `default_permissions` on virtio-fs): permission checks are the host's, so a container of any
//! uid may read and write exactly what the host user may. A share that fails to mount is one console line;
//! the boot goes on.

use std::collections::BTreeSet;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use berth_protocol::cmdline::GuestShare;

use crate::{console, mounts};

/// Guest directories a share may neither shadow nor sit below.
pub const SYSTEM_DIRS: [&str; 17] = [
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib",
    "/var/log",
    "/var/run",
    "/var/cache",
];
/// Guest directories on a writable tmpfs where missing mount points are simply created.
pub const WRITABLE_DIRS: [&str; 1] = ["/tmp"];
const TMPFS_OPTIONS: &str = "mode=0755,size=1m,nr_inodes=4096";
/// The virtio-fs mount option of Berth's guest kernel that leaves permission checks to the host.
const HOST_PERMISSIONS: &str = "host_permissions";
const DIR_MODE: u32 = 0o755;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create mount point {0}")]
    MakeDirs(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Mount(#[from] mounts::Error),
}

/// What the guest has at a path, without following symlinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Missing,
    EmptyDir,
    Dir,
    /// A symlink, a file, or unreadable.
    Other,
}

/// Why a share is not mounted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a plain absolute path (no '..', not '/')")]
    NotPlain,
    #[error("it would shadow or sit below the guest's {0}")]
    System(&'static str),
    #[error("another share is already at this path")]
    Duplicate,
    #[error("{0} is a symlink or not a directory in the guest")]
    NotDirectory(PathBuf),
    #[error("{missing} cannot be created: {under} is read-only and not empty in the guest")]
    NoMountPoint { missing: PathBuf, under: PathBuf },
}

/// How one share gets its mount point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub share: GuestShare,
    /// A tmpfs to put on this empty image directory first (shared by later shares).
    pub tmpfs: Option<PathBuf>,
    /// Whether the path's missing directories are created (on `/tmp` or on `tmpfs`).
    pub make_dirs: bool,
}

/// The plan for every share, shallowest path first: planned, or refused with the reason.
pub fn plan(
    shares: &[GuestShare],
    find: impl Fn(&Path) -> Found,
) -> Vec<Result<Planned, (GuestShare, Refusal)>> {
    let mut sorted: Vec<&GuestShare> = shares.iter().collect();
    sorted.sort_by_key(|s| s.path.components().count());
    let mut accepted: Vec<PathBuf> = Vec::new();
    let mut tmpfs: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for share in sorted {
        let result = plan_one(&share.path, &accepted, &tmpfs, &find);
        match result {
            Ok((new_tmpfs, make_dirs)) => {
                accepted.push(share.path.clone());
                if let Some(t) = &new_tmpfs {
                    if !tmpfs.contains(t) {
                        tmpfs.push(t.clone());
                    }
                }
                out.push(Ok(Planned {
                    share: share.clone(),
                    tmpfs: new_tmpfs,
                    make_dirs,
                }));
            }
            Err(why) => out.push(Err((share.clone(), why))),
        }
    }
    out
}

/// Whether `path` is `/` followed by plain names only.
fn is_plain(path: &Path) -> bool {
    let mut parts = path.components();
    parts.next() == Some(Component::RootDir)
        && path.components().count() > 1
        && parts.all(|c| matches!(c, Component::Normal(_)))
}

/// The tmpfs (if any) and whether to make directories, for one share.
fn plan_one(
    path: &Path,
    accepted: &[PathBuf],
    tmpfs: &[PathBuf],
    find: &impl Fn(&Path) -> Found,
) -> Result<(Option<PathBuf>, bool), Refusal> {
    if !is_plain(path) {
        return Err(Refusal::NotPlain);
    }
    if let Some(dir) = SYSTEM_DIRS
        .iter()
        .find(|d| path.starts_with(d) || Path::new(d).starts_with(path))
    {
        return Err(Refusal::System(dir));
    }
    if accepted.iter().any(|a| a == path) {
        return Err(Refusal::Duplicate);
    }
    if accepted.iter().any(|a| path.starts_with(a)) {
        return Ok((None, false));
    }
    let mut parent = PathBuf::from("/");
    let mut parent_found = Found::Dir;
    for ancestor in path
        .ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .skip(1)
    {
        if let Some(t) = tmpfs.iter().find(|t| ancestor.starts_with(t)) {
            return Ok((Some(t.clone()), true));
        }
        if ancestor != path && WRITABLE_DIRS.iter().any(|w| ancestor == Path::new(w)) {
            return Ok((None, true));
        }
        match find(ancestor) {
            Found::Dir | Found::EmptyDir if ancestor == path => return Ok((None, false)),
            found @ (Found::Dir | Found::EmptyDir) => {
                parent = ancestor.to_path_buf();
                parent_found = found;
            }
            Found::Other => return Err(Refusal::NotDirectory(ancestor.to_path_buf())),
            Found::Missing => {
                if parent_found != Found::EmptyDir || parent == Path::new("/") {
                    return Err(Refusal::NoMountPoint {
                        missing: ancestor.to_path_buf(),
                        under: parent,
                    });
                }
                return Ok((Some(parent), true));
            }
        }
    }
    Ok((None, false))
}

/// What the running guest has at `path`.
pub fn find_in_guest(path: &Path) -> Found {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Found::Missing,
        Err(_) => Found::Other,
        Ok(meta) if !meta.is_dir() => Found::Other,
        Ok(_) => match std::fs::read_dir(path).map(|mut entries| entries.next().is_none()) {
            Ok(true) => Found::EmptyDir,
            Ok(false) => Found::Dir,
            Err(_) => Found::Other,
        },
    }
}

/// Mounts every share as `plan` says; each refusal or failure is one console line.
pub fn mount_all(shares: &[GuestShare]) {
    let mut tmpfs_done: BTreeSet<PathBuf> = BTreeSet::new();
    for planned in plan(shares, find_in_guest) {
        match planned {
            Err((share, why)) => console::warn(&format!(
                "share {} ({}) not mounted: {why}",
                share.path.display(),
                share.tag
            )),
            Ok(p) => match mount_one(&p, &mut tmpfs_done) {
                Ok(()) => console::say(&format!(
                    "share {} mounted at {}{}",
                    p.share.tag,
                    p.share.path.display(),
                    if p.share.read_only {
                        " (read-only)"
                    } else {
                        ""
                    }
                )),
                Err(e) => console::warn(&format!(
                    "share {} ({}) not mounted: {}",
                    p.share.path.display(),
                    p.share.tag,
                    console::chain(&e)
                )),
            },
        }
    }
    for dir in tmpfs_done {
        if let Err(e) = remount_read_only(&dir) {
            console::warn(&format!(
                "keep {} read-only: {}",
                dir.display(),
                console::chain(&e)
            ));
        }
    }
}

fn mount_one(p: &Planned, tmpfs_done: &mut BTreeSet<PathBuf>) -> Result<(), Error> {
    if let Some(dir) = &p.tmpfs {
        if !tmpfs_done.contains(dir) {
            mounts::mount(&mounts::Mount {
                source: "tmpfs",
                target: dir,
                fstype: "tmpfs",
                flags: libc::MS_NOSUID | libc::MS_NODEV,
                data: TMPFS_OPTIONS,
            })?;
            tmpfs_done.insert(dir.clone());
        }
    }
    if p.make_dirs {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&p.share.path)
            .map_err(|e| Error::MakeDirs(p.share.path.clone(), e))?;
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if p.share.read_only {
        flags |= libc::MS_RDONLY;
    }
    let mount = |data| {
        mounts::mount(&mounts::Mount {
            source: &p.share.tag,
            target: &p.share.path,
            fstype: "virtiofs",
            flags,
            data,
        })
    };
    // Berth's guest kernel takes `host_permissions` (kernel-config/patches): the host decides
    // every access as the user Berth runs as. A kernel without it checks against the owner and
    // mode the host reports, so only root and the host user's uid may write there.
    if let Err(e) = mount(HOST_PERMISSIONS) {
        console::warn(&format!(
            "{}: the kernel refused {HOST_PERMISSIONS} ({}); mounting with the guest's own \
             permission checks",
            p.share.path.display(),
            console::chain(&e)
        ));
        mount("")?;
    }
    Ok(())
}

fn remount_read_only(dir: &Path) -> Result<(), Error> {
    mounts::mount(&mounts::Mount {
        source: "tmpfs",
        target: dir,
        fstype: "tmpfs",
        flags: libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        data: TMPFS_OPTIONS,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(tag: &str, path: &str) -> GuestShare {
        GuestShare {
            tag: tag.into(),
            read_only: false,
            path: path.into(),
        }
    }

    /// The debootstrap image: empty /home, /mnt, /media, /srv, /opt; /tmp a tmpfs; /root with
    /// dot files; /bin a symlink.
    fn image(path: &Path) -> Found {
        match path.to_str().unwrap() {
            "/home" | "/mnt" | "/media" | "/srv" | "/opt" => Found::EmptyDir,
            "/tmp" | "/root" | "/var" => Found::Dir,
            "/bin" | "/opt/link" => Found::Other,
            _ => Found::Missing,
        }
    }

    fn planned(p: &Result<Planned, (GuestShare, Refusal)>) -> (&str, Option<&str>, bool) {
        let p = p.as_ref().unwrap();
        (
            p.share.path.to_str().unwrap(),
            p.tmpfs.as_deref().map(|t| t.to_str().unwrap()),
            p.make_dirs,
        )
    }

    #[test]
    fn home_directories_get_a_tmpfs_on_home_once() {
        let plan = plan(
            &[
                share("a", "/home/alice/src"),
                share("b", "/home/bob"),
                share("c", "/mnt"),
            ],
            image,
        );
        let got: Vec<_> = plan.iter().map(planned).collect();
        assert_eq!(
            got,
            [
                ("/mnt", None, false),
                ("/home/bob", Some("/home"), true),
                ("/home/alice/src", Some("/home"), true),
            ]
        );
    }

    #[test]
    fn tmp_is_mounted_over_and_paths_below_it_are_created() {
        let p = plan(&[share("t2", "/tmp/build/x"), share("t", "/tmp")], image);
        let got: Vec<_> = p.iter().map(planned).collect();
        // /tmp first (shallower); the deeper share then lives inside it: nothing is created.
        assert_eq!(got, [("/tmp", None, false), ("/tmp/build/x", None, false)]);
        let p = plan(&[share("t2", "/tmp/build/x")], image);
        assert_eq!(planned(&p[0]), ("/tmp/build/x", None, true));
    }

    #[test]
    fn system_directories_and_odd_paths_are_refused() {
        let refused = |path: &str| {
            let p = plan(&[share("x", path)], image);
            p.into_iter().next().unwrap().unwrap_err().1
        };
        for (path, dir) in [
            ("/usr/local/src", "/usr"),
            ("/etc", "/etc"),
            ("/var/lib/docker", "/var/lib"),
            ("/var", "/var/lib"),
            ("/run/user/1000", "/run"),
            ("/proc", "/proc"),
            ("/dev/shm/x", "/dev"),
            ("/lib64", "/lib64"),
        ] {
            assert_eq!(refused(path), Refusal::System(dir), "{path}");
        }
        assert_eq!(refused("/"), Refusal::NotPlain);
        assert_eq!(refused("/home/../etc"), Refusal::NotPlain);
        assert_eq!(refused("home/alice"), Refusal::NotPlain);
        // Missing part under a non-empty directory or right under the read-only root.
        assert_eq!(
            refused("/root/project"),
            Refusal::NoMountPoint {
                missing: "/root/project".into(),
                under: "/root".into()
            }
        );
        assert_eq!(
            refused("/Users/alice"),
            Refusal::NoMountPoint {
                missing: "/Users".into(),
                under: "/".into()
            }
        );
        assert_eq!(
            refused("/opt/link/x"),
            Refusal::NotDirectory("/opt/link".into())
        );
    }

    #[test]
    fn a_second_share_at_the_same_path_is_refused() {
        let p = plan(
            &[share("a", "/home/alice"), share("b", "/home/alice")],
            image,
        );
        assert!(p[0].is_ok());
        let (second, why) = p[1].as_ref().unwrap_err();
        assert_eq!(second.tag, "b");
        assert_eq!(*why, Refusal::Duplicate);
        // A name that only starts like a system directory is no system directory.
        let p = plan(&[share("u", "/usrlocal")], image);
        assert_eq!(
            p[0].as_ref().unwrap_err().1,
            Refusal::NoMountPoint {
                missing: "/usrlocal".into(),
                under: "/".into()
            }
        );
    }

    #[test]
    fn the_guest_probe_tells_empty_from_full_and_symlinks() {
        let base = std::env::temp_dir().join(format!("berth-agent-shares-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("empty")).unwrap();
        std::fs::create_dir_all(base.join("full/x")).unwrap();
        std::os::unix::fs::symlink("full", base.join("link")).unwrap();
        assert_eq!(find_in_guest(&base.join("empty")), Found::EmptyDir);
        assert_eq!(find_in_guest(&base.join("full")), Found::Dir);
        assert_eq!(find_in_guest(&base.join("link")), Found::Other);
        assert_eq!(find_in_guest(&base.join("nothing")), Found::Missing);
        std::fs::remove_dir_all(base).unwrap();
    }

    /// The mount steps against the real kernel, in a private mount namespace of a test thread:
    /// the tmpfs, the directories on it, a virtio-fs mount that fails here (no such device or
    /// tag) with a message naming its target, and the read-only remount.
    #[test]
    fn mount_steps_in_a_private_mount_namespace() {
        let base = std::env::temp_dir().join(format!("berth-agent-mnt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("home")).unwrap();
        let home = base.join("home");
        let outcome = std::thread::spawn(move || {
            // SAFETY: unshare with a constant flag; it only changes this thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: null source, type and data are allowed for a propagation change.
            let rc = unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let target = home.join("alice/src");
            let p = Planned {
                share: share("berth-no-such-tag", target.to_str().unwrap()),
                tmpfs: Some(home.clone()),
                make_dirs: true,
            };
            let mut done = BTreeSet::new();
            let err = mount_one(&p, &mut done).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("mount virtiofs on") && text.contains("alice/src"),
                "{text}"
            );
            assert!(done.contains(&home));
            assert!(target.is_dir(), "the mount point was made on the tmpfs");
            let table = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            let tmpfs = mounts::parse_mountinfo(&table)
                .into_iter()
                .any(|e| e.mount_point == home && e.fstype == "tmpfs");
            assert!(tmpfs, "{table}");
            remount_read_only(&home).unwrap();
            let write = std::fs::create_dir(home.join("bob")).unwrap_err();
            assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");
            Ok(())
        })
        .join()
        .unwrap();
        // The namespace went with the thread: the tmpfs and what was made on it are gone.
        assert!(!base.join("home/alice").exists());
        std::fs::remove_dir_all(&base).unwrap();
        if let Err(e) = outcome {
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
            eprintln!("skipped: unshare(CLONE_NEWNS): {e}");
        }
    }
}
