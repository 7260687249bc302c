//! The daemons' own cgroup, `/sys/fs/cgroup/berth-daemons`, beside the `/docker/<id>` groups
//! dockerd makes for containers. dockerd judges the memory controller by its own group: from
//! the root group, which has no `memory.swap.max`, it concludes "No swap limit support", warns
//! at every `docker run -m` and drops `--memory-swap`. In a group of their own, containerd,
//! dockerd and the shims also become one place to account and limit Berth's own overhead.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where cgroup2 is mounted (`mounts::mount_early`).
pub const ROOT: &str = "/sys/fs/cgroup";
/// The daemons' group, under [`ROOT`].
pub const DAEMONS: &str = "berth-daemons";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("create {}", .0.display())]
    Create(PathBuf, #[source] std::io::Error),
}

/// Hands every controller the root offers to its children (one at a time where the whole line
/// is refused; the ones refused are returned) and creates the daemons' group. Returns the
/// group's `cgroup.procs`, which a daemon writes itself into before it execs.
pub fn daemon_group(root: &Path) -> Result<(PathBuf, Vec<String>), Error> {
    let offered = root.join("cgroup.controllers");
    let controllers = std::fs::read_to_string(&offered).map_err(|e| Error::Read(offered, e))?;
    let subtree = root.join("cgroup.subtree_control");
    let wanted: Vec<String> = controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    let mut refused = Vec::new();
    if !wanted.is_empty() && write(&subtree, &wanted.join(" ")).is_err() {
        for enable in &wanted {
            if write(&subtree, enable).is_err() {
                refused.push(enable[1..].to_owned());
            }
        }
    }
    let group = root.join(DAEMONS);
    match std::fs::create_dir(&group) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::Create(group, e)),
    }
    Ok((group.join("cgroup.procs"), refused))
}

fn write(path: &Path, line: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-cgroups-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn every_offered_controller_is_enabled_and_the_group_made_once() {
        let root = scratch("enable");
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let (procs, refused) = daemon_group(&root).unwrap();
        assert_eq!(procs, root.join("berth-daemons/cgroup.procs"));
        assert!(refused.is_empty());
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+cpuset +cpu +io +memory +pids"
        );
        assert!(root.join("berth-daemons").is_dir());
        // Found again (a group that outlived a restarted supervisor) is no error.
        daemon_group(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn without_cgroup2_it_is_an_error_naming_the_file() {
        let root = scratch("none");
        let err = daemon_group(&root).unwrap_err();
        assert!(err.to_string().contains("cgroup.controllers"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
