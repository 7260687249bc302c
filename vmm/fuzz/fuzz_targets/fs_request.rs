//! The virtio-fs request path: arbitrary FUSE messages, split over descriptors, served by a
//! share on a scratch directory. Oracles: no panic, a reply never longer than its buffer, and
//! nothing outside the share changes.

#![no_main]

use std::sync::OnceLock;

use berth_vmm::devices::virtio::fs::fuzz::FuzzShare;
use libfuzzer_sys::fuzz_target;

static SHARE: OnceLock<FuzzShare> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let share = SHARE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("berth-fuzz-fs-{}", std::process::id()));
        FuzzShare::new(&root)
    });
    share.run(data);
    share.check_confined();
});
