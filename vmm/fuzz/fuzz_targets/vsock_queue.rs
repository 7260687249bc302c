//! The virtio-vsock TX and RX paths: guest-made queues of packets (REQUEST, RESPONSE, RW,
//! SHUTDOWN, RST, credit packets, unknown ops and bad headers) and RX buffers, against a real
//! muxer whose host side the same input drives.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth_vmm::devices::virtio::vsock::fuzzing::vsock_queue(data);
});
