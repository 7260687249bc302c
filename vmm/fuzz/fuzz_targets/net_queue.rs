//! The net device's TX and RX paths on guest-made queues and a backend-made stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth_vmm::devices::virtio::net::fuzzing::net_queue(data);
});
