//! virtio-rng: an entropy device that fills the guest's buffers from the host's getrandom(2).

mod device;

use std::io;

pub use device::Rng;

/// The one queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes given for one request; the driver asks again for more.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the host's getrandom(2) does not work")]
    GetRandom(#[source] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{TestQueue, DATA, OUTSIDE, WRITE};
    use crate::devices::virtio::{VirtioDevice, TYPE_RNG};

    fn start() -> (Rng, TestQueue) {
        let mut rng = Rng::new().unwrap();
        rng.set_acked_features(rng.avail_features());
        let queue = TestQueue::new();
        queue.activate(&mut rng, true);
        (rng, queue)
    }

    /// Random bytes: not all one value (a 1 in 2^800 chance for 100 bytes).
    fn looks_random(bytes: &[u8]) -> bool {
        bytes.iter().any(|&b| b != bytes[0])
    }

    #[test]
    fn fills_every_writable_buffer_and_reports_the_length() {
        let (rng, mut q) = start();
        assert_eq!(rng.device_type(), TYPE_RNG);
        assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
        q.write(DATA, &[0; 8192]);
        let head = q.add_chain(&[(DATA, 100, WRITE), (DATA + 0x1000, 4000, WRITE)]);
        assert_eq!(q.kick(1), vec![(u32::from(head), 4100)]);
        let first = q.read(DATA, 100);
        let second = q.read(DATA + 0x1000, 4000);
        assert!(looks_random(&first) && looks_random(&second));
        assert_ne!(&first[..], &second[..100]);
        assert_eq!(
            q.read(DATA + 100, 16),
            vec![0; 16],
            "nothing past the buffer"
        );
    }

    #[test]
    fn caps_the_bytes_given_per_request() {
        let (_rng, mut q) = start();
        let len = 2 * MAX_BYTES_PER_REQUEST;
        q.write(DATA, &vec![0; len as usize]);
        q.add_chain(&[(DATA, len, WRITE)]);
        assert_eq!(q.kick(1)[0].1, MAX_BYTES_PER_REQUEST);
        let cap = MAX_BYTES_PER_REQUEST as usize;
        assert!(looks_random(&q.read(DATA + cap as u64 - 100, 100)));
        assert!(q.read(DATA + cap as u64, cap).iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_chains_are_used_empty_and_the_device_keeps_serving() {
        let (_rng, mut q) = start();
        q.write(DATA, &[0; 256]);
        // A driver-readable buffer, a buffer outside memory, a loop, a bad `next`.
        q.add_chain(&[(DATA, 64, WRITE), (DATA + 64, 64, 0)]);
        q.add_chain(&[(DATA, 64, WRITE), (OUTSIDE, 64, WRITE)]);
        q.add_raw(&[(DATA, 64, WRITE | 1, 1), (DATA + 64, 64, WRITE | 1, 0)]);
        q.add_raw(&[(DATA, 64, WRITE | 1, 999)]);
        let used = q.kick(4);
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
        assert_eq!(q.read(DATA, 256), vec![0; 256], "nothing written");

        let head = q.add_chain(&[(DATA, 32, WRITE)]);
        assert_eq!(q.kick(1), vec![(u32::from(head), 32)]);
        assert!(looks_random(&q.read(DATA, 32)));
    }
}
