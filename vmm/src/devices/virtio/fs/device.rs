//! The virtio-fs device model: the configuration space (tag and request queue count), the
//! passthrough file system it opens on the share, and the event loop's lifecycle.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use berth_machine::{FsConfig, ShareCache};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::link::Root;
use super::request::FsHandler;
use super::share::{Credentials, ShareFs};
use super::{
    Error, ALWAYS_TIMEOUT, ATTR_TIMEOUT, CONFIG_SIZE, NUM_QUEUES, QUEUE_SIZE, REQUEST_QUEUES,
    TAG_SIZE,
};
use crate::devices::virtio::event_loop::EventLoop;
use crate::devices::virtio::{
    feature, features, read_config_space, ActivateError, Interrupt, VirtioDevice,
};
use crate::memory::GuestMemory;

/// The virtio device type of a file system device (virtio 1.2 section 5.11).
pub const TYPE_FS: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_FS;

/// Numbers the event loop threads: "virtio-fs-0", "virtio-fs-1"...
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A virtio-fs device serving one host directory.
pub struct Fs {
    share: Arc<ShareFs>,
    server: Arc<Server<Arc<ShareFs>>>,
    config: [u8; CONFIG_SIZE],
    acked_features: u64,
    event_loop: EventLoop<FsHandler>,
}

impl Fs {
    /// Opens the share `config` describes. Files the guest creates belong to the VMM's user,
    /// or, when the VMM runs as root, to the owner of the share's root directory.
    pub fn new(config: &FsConfig) -> Result<Self, Error> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        Self::with_euid(config, euid)
    }

    /// [`new`](Self::new) for a VMM whose effective uid is `euid`.
    pub(crate) fn with_euid(config: &FsConfig, euid: u32) -> Result<Self, Error> {
        let share = Arc::new(open_share(config, euid)?);
        let server = Arc::new(Server::new(share.clone()));
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            tag = %config.tag,
            path = %config.path.display(),
            read_only = config.read_only,
            "virtio-fs share opened"
        );
        Ok(Self {
            share,
            server,
            config: config_space(&config.tag),
            acked_features: 0,
            event_loop: EventLoop::new(format!("virtio-fs-{id}"), NUM_QUEUES),
        })
    }
}

/// The share's file system: the passthrough file system rooted at the share's directory (its
/// canonical path: the passthrough refuses a root that is a symlink), behind [`ShareFs`].
pub(super) fn open_share(config: &FsConfig, euid: u32) -> Result<ShareFs, Error> {
    let path = config.path.as_path();
    let not_found = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let root = path.canonicalize().map_err(not_found)?;
    let meta = std::fs::metadata(&root).map_err(not_found)?;
    if !meta.is_dir() {
        return Err(Error::NotDirectory {
            path: path.to_owned(),
        });
    }
    let root_dir = root
        .to_str()
        .ok_or_else(|| Error::NotUtf8 {
            path: path.to_owned(),
        })?
        .to_string();
    let passthrough =
        PassthroughFs::new(passthrough_config(root_dir, config.cache)).map_err(|source| {
            Error::Passthrough {
                path: path.to_owned(),
                source,
            }
        })?;
    // The root is opened here, not at the guest's FUSE_INIT, so that a share that cannot be
    // opened fails the VM's start with its path.
    passthrough.import().map_err(|source| Error::Passthrough {
        path: path.to_owned(),
        source,
    })?;
    let owner = Credentials {
        uid: meta.uid(),
        gid: meta.gid(),
    };
    let root = Root::open(&root).map_err(not_found)?;
    Ok(ShareFs::new(
        passthrough,
        config.read_only,
        Credentials::for_share(euid, owner),
        root,
    ))
}

/// The passthrough's settings for a share in cache mode `cache` (see `ShareCache`).
fn passthrough_config(root_dir: String, cache: ShareCache) -> Config {
    let (cache_policy, timeout) = match cache {
        ShareCache::Auto => (CachePolicy::Auto, ATTR_TIMEOUT),
        ShareCache::Always => (CachePolicy::Always, ALWAYS_TIMEOUT),
        ShareCache::Never => (CachePolicy::Never, std::time::Duration::ZERO),
    };
    Config {
        root_dir,
        entry_timeout: timeout,
        attr_timeout: timeout,
        cache_policy,
        xattr: true,
        // No DAX window.
        dax_file_size: None,
        ..Config::default()
    }
}

/// The configuration space (virtio 1.2 section 5.11.4): the tag, NUL-padded to 36 bytes, and
/// the number of request queues, little endian. The tag was checked to fit
/// (`berth_machine::check_fs_tag`); a longer one is cut.
fn config_space(tag: &str) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    let len = tag.len().min(TAG_SIZE);
    config[..len].copy_from_slice(&tag.as_bytes()[..len]);
    config[TAG_SIZE..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
    config
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        feature(features::VERSION_1) | feature(features::RING_EVENT_IDX)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        warn_rate_limited!("virtio-fs: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let server = self.server.clone();
        self.event_loop
            .activate(mem, interrupt, queues, || Ok(FsHandler::new(server)))
    }

    /// The driver starts over: the inodes and open files of its last session are dropped.
    fn reset(&mut self) {
        if self.event_loop.stop().is_some() {
            self.share.forget_all();
        }
        self.acked_features = 0;
    }
}
