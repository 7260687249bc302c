//! virtio-fs: one host directory shared with the guest, served by fuse-backend-rs's
//! passthrough file system inside the VMM (no DAX window), one device per share.
//!
//! # Ownership
//!
//! Berth normally runs as an ordinary user. fuse-backend-rs's passthrough switches the thread's
//! effective uid/gid to the guest caller's (`setresuid`/`setresgid`, raw syscalls, per thread)
//! around the calls that create something (create, mkdir, mknod, symlink), and skips the switch
//! when the caller's id is 0; a non-root process cannot switch, so every creation by a guest
//! process that is not uid 0 would fail with EPERM. [`ShareFs`](share::ShareFs) therefore
//! rewrites every request's credentials (`FileSystem::id_remap`):
//!
//! - **VMM not root**: the credentials become 0, so the passthrough never switches and every
//!   file a guest process creates, whatever its uid, belongs to the host user running Berth.
//! - **VMM root** (the test rig): the credentials become the owner of the share's root
//!   directory, so files are created as that user (thread-local switch) and a root VMM never
//!   leaves root-owned files in a user's folder. A share whose root belongs to root gets
//!   root-owned files, as it would natively. Other requests (write, unlink...) run as root.
//!
//! The guest kernel mounts virtio-fs with `default_permissions`: it checks the guest caller
//! against the owner and mode we report (the host's), and the host checks the VMM's user.
//!
//! # chown
//!
//! Accepted and ignored: a SETATTR that changes the owner or group succeeds, any mode, size or
//! time change in the same request is applied, and the reply carries the file's current
//! attributes (still the host user's). npm, git, pip and `tar` extracting as root call
//! chown/fchown and only fail if it fails; a real chown would either be refused (non-root VMM)
//! or hand the user's files to other host uids (root VMM). Storing the guest's owner in an
//! xattr (`user.berth.owner`) and reporting it back would let `chown -R www-data` then running
//! as www-data pass the guest's permission checks, but costs an xattr read on every
//! lookup/getattr/readdirplus (the hot path of an npm install) and fails on host file systems
//! without user xattrs; left for later if measurements allow.
//!
//! # Confinement
//!
//! What the passthrough already guarantees (read in its 0.14 source and tested below): inodes
//! exist only through LOOKUP (and the entries CREATE/MKDIR/... return) below the root; a LOOKUP
//! name holding `/` is refused, `..` at the root is looked up as `.`; every lookup is an
//! `openat(dir, name, O_PATH | O_NOFOLLOW)` relative to the parent's O_PATH fd, so a symlink
//! becomes an inode of its own and is never followed on the host (the guest kernel resolves it
//! with READLINK); OPEN of anything but a regular file or a directory is refused (EBADF);
//! reopening goes through `/proc/self/fd/N` of the inode's own fd, which names that inode and
//! nothing else (a guest cannot name a `/proc` path: names never reach the host as paths);
//! LINK and RENAME take inodes and names inside the share only. What it does not guard: a
//! directory that a *host* process moves out of the share while the guest holds its inode stays
//! reachable (its `..` too); host-side renames are the user's own.
//!
//! Read-only shares are refused by [`ShareFs`](share::ShareFs) itself, request by request, with
//! EROFS (every opcode that writes, and OPEN with a write access mode or O_TRUNC), not by a flag
//! of the passthrough.
//!
//! # Caching
//!
//! Per share, from the machine description's `cache` (`berth_machine::ShareCache`): by default
//! `CachePolicy::Auto` (close-to-open: an open re-reads a file a host process changed) with
//! entries and attributes valid for [`ATTR_TIMEOUT`]; `always` keeps page cache across opens and
//! trusts entries for [`ALWAYS_TIMEOUT`]; `never` caches nothing. xattrs are passed through.

mod device;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod link;
mod request;
mod share;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use device::{Fs, TYPE_FS};
pub use request::serve;
pub use share::{Credentials, ShareFs};

/// Each queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The hiprio queue (0) and one request queue.
pub const NUM_QUEUES: usize = 2;
/// The request queues the configuration space announces.
pub const REQUEST_QUEUES: u32 = NUM_QUEUES as u32 - 1;
/// The tag's field in the configuration space.
pub const TAG_SIZE: usize = 36;
/// The configuration space: the tag, then `num_request_queues`.
pub const CONFIG_SIZE: usize = TAG_SIZE + 4;
/// How long the guest may trust an entry or attributes before asking again.
pub const ATTR_TIMEOUT: Duration = Duration::from_secs(1);
/// The same under `ShareCache::Always`.
pub const ALWAYS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the shared directory {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the shared path {path} is not a directory")]
    NotDirectory { path: PathBuf },
    #[error("the shared path {path} is not UTF-8, which the passthrough file system needs")]
    NotUtf8 { path: PathBuf },
    #[error("starting the passthrough file system on {path}")]
    Passthrough {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests;
