//! The virtio-blk request path: guest-made queues of IN/OUT/FLUSH/GET_ID/DISCARD/WRITE_ZEROES
//! (and unknown) requests against a small scratch disk image.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth_vmm::devices::virtio::block::fuzzing::block_queue(data);
});
