//! What the `fs_request` fuzz target drives (feature `fuzzing`): a share on a scratch directory
//! and a driver that puts arbitrary bytes into guest memory as FUSE requests, split over
//! descriptors as the input says, and serves them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_machine::FsConfig;
use fuse_backend_rs::api::server::Server;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::{device::open_share, serve, ShareFs};
use crate::memory::GuestMemory;

const MEM_SIZE: usize = 4 << 20;
const IN: u64 = 0x10_0000;
const OUT: u64 = 0x20_0000;
const MAX_OUT: u32 = 0x10_0000;
const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// A share on `root/share` with a few files, a directory and symlinks out, beside a sentinel
/// outside it that no request may change.
pub struct FuzzShare {
    root: PathBuf,
    server: Server<Arc<ShareFs>>,
    mem: GuestMemory,
}

impl FuzzShare {
    pub fn new(root: &Path) -> Self {
        let share = root.join("share");
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(share.join("dir")).expect("a scratch directory");
        std::fs::write(root.join("sentinel"), b"outside").expect("the sentinel");
        std::fs::write(share.join("file"), b"inside the share").expect("a file");
        let _ = std::os::unix::fs::symlink("/etc/passwd", share.join("abs"));
        let _ = std::os::unix::fs::symlink("../sentinel", share.join("rel"));
        let config = FsConfig {
            tag: "fuzz".into(),
            path: share,
            read_only: false,
            cache: Default::default(),
        };
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let fs = open_share(&config, euid).expect("the share opens");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("guest memory for the requests");
        Self {
            root: root.to_owned(),
            server: Server::new(Arc::new(fs)),
            mem,
        }
    }

    /// Serves the requests in `data`: each is `[in_parts: u8][out_len: u16 le][len: u16 le]`
    /// then `len` bytes, split into up to four readable descriptors. Returns the used lengths.
    pub fn run(&self, mut data: &[u8]) -> Vec<u32> {
        let mut used = Vec::new();
        while data.len() >= 5 && used.len() < 16 {
            let parts = usize::from(data[0] % 4) + 1;
            let out_len = u32::from(u16::from_le_bytes([data[1], data[2]])) * 16 % MAX_OUT;
            let len = usize::from(u16::from_le_bytes([data[3], data[4]])).min(data.len() - 5);
            let request = &data[5..5 + len];
            data = &data[5 + len..];
            used.push(self.serve_one(request, parts, out_len));
        }
        used
    }

    fn serve_one(&self, request: &[u8], parts: usize, out_len: u32) -> u32 {
        self.mem
            .write_slice(request, GuestAddress(IN))
            .expect("the request fits guest memory");
        let mut descs = Vec::new();
        let step = request.len().div_ceil(parts).max(1);
        for (i, chunk) in request.chunks(step).enumerate() {
            let addr = IN + (i * step) as u64;
            descs.push(RawDescriptor::from(Descriptor::new(
                addr,
                chunk.len() as u32,
                0,
                0,
            )));
        }
        descs.push(RawDescriptor::from(Descriptor::new(OUT, out_len, WRITE, 0)));
        let queue = MockSplitQueue::create(&self.mem, GuestAddress(0), 16);
        let Ok(chain) = queue.build_desc_chain(&descs) else {
            return 0;
        };
        let len = serve(&self.server, &self.mem, chain);
        assert!(len <= out_len, "the reply fits its buffer");
        len
    }

    /// Panics if anything outside the share changed.
    pub fn check_confined(&self) {
        let sentinel = std::fs::read(self.root.join("sentinel")).expect("the sentinel is there");
        assert_eq!(
            sentinel, b"outside",
            "the sentinel outside the share changed"
        );
        let outside = std::fs::read_dir(&self.root)
            .expect("the scratch directory")
            .count();
        assert_eq!(outside, 2, "something was created beside the share");
    }
}
