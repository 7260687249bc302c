//! The byte formats of the net device, with no queue or socket in them: the `virtio_net_hdr_v1`
//! before every frame in the queues, the checksum the device completes for a TX frame that asks
//! for it, and the reassembly of the backend's stream (a 4-byte big-endian length before each
//! frame) into whole frames.

use super::{MAX_FRAME, NET_HDR_LEN};

/// `virtio_net_hdr_v1.flags`: the driver left the checksum at `csum_start + csum_offset` to the
/// device (only with VIRTIO_NET_F_CSUM).
pub const HDR_F_NEEDS_CSUM: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `virtio_net_hdr_v1.flags`: the frame's checksums are known to be right (VIRTIO_NET_F_GUEST_CSUM).
pub const HDR_F_DATA_VALID: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;
/// `virtio_net_hdr_v1.gso_type` of a frame that is not a GSO frame.
const HDR_GSO_NONE: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;
/// The length prefix of a frame on the backend stream.
pub const LEN_PREFIX: usize = 4;
/// The shortest frame worth sending: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Why a TX packet from the guest is not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("the chain is shorter than the {NET_HDR_LEN}-byte virtio_net_hdr")]
    ShortHeader,
    #[error("the frame is {0} bytes, shorter than an Ethernet header")]
    ShortFrame(usize),
    #[error("the chain holds more than a {MAX_FRAME}-byte frame")]
    LongFrame,
    #[error("a GSO frame (gso_type {0}), which the device never offered")]
    Gso(u8),
    #[error("the checksum at {start}+{offset} lies outside the {len}-byte frame")]
    ChecksumOutside { start: u16, offset: u16, len: usize },
}

/// Checks a TX packet (the header, then the frame, as read from the chain) and completes the
/// frame's checksum if the driver asked for it; returns the frame.
pub fn tx_frame(packet: &mut [u8]) -> Result<&[u8], TxError> {
    if packet.len() < NET_HDR_LEN {
        return Err(TxError::ShortHeader);
    }
    let (hdr, frame) = packet.split_at_mut(NET_HDR_LEN);
    if frame.len() > MAX_FRAME {
        return Err(TxError::LongFrame);
    }
    if frame.len() < MIN_FRAME {
        return Err(TxError::ShortFrame(frame.len()));
    }
    let (flags, gso_type) = (hdr[0], hdr[1]);
    // The ECN bit (0x80) means nothing without a GSO type.
    if gso_type & !0x80 != HDR_GSO_NONE {
        return Err(TxError::Gso(gso_type));
    }
    if flags & HDR_F_NEEDS_CSUM != 0 {
        let start = u16::from_le_bytes([hdr[6], hdr[7]]);
        let offset = u16::from_le_bytes([hdr[8], hdr[9]]);
        complete_checksum(frame, start, offset)?;
    }
    Ok(frame)
}

/// Writes the Internet checksum of `frame[start..]` at `start + offset`, where the driver left
/// the pseudo-header's sum (virtio 1.2, 5.1.6.2). A computed 0 is sent as 0xffff, which is the
/// same value in ones' complement and is what UDP needs (0 there means "no checksum").
fn complete_checksum(frame: &mut [u8], start: u16, offset: u16) -> Result<(), TxError> {
    let outside = TxError::ChecksumOutside {
        start,
        offset,
        len: frame.len(),
    };
    let start = usize::from(start);
    let at = start + usize::from(offset);
    if at + 2 > frame.len() {
        return Err(outside);
    }
    let sum = !ones_complement_sum(&frame[start..]);
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The 16-bit ones' complement sum of `bytes` (big-endian words, an odd last byte padded).
pub fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The header the device puts before a frame it hands the guest.
pub fn rx_header(num_buffers: u16, data_valid: bool) -> [u8; NET_HDR_LEN] {
    let mut hdr = [0u8; NET_HDR_LEN];
    if data_valid {
        hdr[0] = HDR_F_DATA_VALID;
    }
    hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    hdr
}

/// What the stream held next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// A whole frame, still in the buffer until [`FrameBuffer::consume`].
    Frame(&'a [u8]),
    /// A frame that cannot be delivered (longer than `MAX_FRAME`, or empty) was skipped.
    Dropped(usize),
    /// No whole frame yet: read more.
    Partial,
}

/// The backend stream's bytes not yet delivered, cut into frames. Room for a frame of
/// `MAX_FRAME` bytes is always there, so the stream never stalls on a frame it can deliver;
/// a longer one is skipped as its bytes arrive.
pub struct FrameBuffer {
    buf: Vec<u8>,
    /// The undelivered bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes of a skipped frame still to come.
    skip: usize,
}

impl FrameBuffer {
    /// A buffer that takes up to `capacity` bytes per read (at least one whole frame).
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity.max(LEN_PREFIX + MAX_FRAME)],
            start: 0,
            end: 0,
            skip: 0,
        }
    }

    /// Bytes a read may still add (after moving what is undelivered to the front).
    pub fn room(&self) -> usize {
        self.buf.len() - (self.end - self.start)
    }

    /// Where the next read goes; empty only when [`room`](Self::room) is 0, and never while
    /// [`next`](Self::next) answers `Partial`.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.start < LEN_PREFIX + MAX_FRAME || self.end == self.buf.len()
        {
            // The frame under way might not fit after `start`: move it to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `len` bytes were read into [`spare`](Self::spare).
    pub fn filled(&mut self, len: usize) {
        self.end = (self.end + len).min(self.buf.len());
        let skipped = self.skip.min(self.end - self.start);
        self.skip -= skipped;
        self.start += skipped;
    }

    /// The next frame, if it is all here; a frame that can never be delivered is skipped.
    pub fn next(&mut self) -> Next<'_> {
        let Some(len) = self.frame_len() else {
            return Next::Partial;
        };
        if len == 0 || len > MAX_FRAME {
            self.start += LEN_PREFIX;
            self.skip = len;
            self.filled(0);
            return Next::Dropped(len);
        }
        match self.buf[self.start..self.end].get(LEN_PREFIX..LEN_PREFIX + len) {
            Some(frame) => Next::Frame(frame),
            None => Next::Partial,
        }
    }

    /// The length prefix of the next frame, once it is all here (and no frame is being
    /// skipped).
    fn frame_len(&self) -> Option<usize> {
        let held = &self.buf[self.start..self.end];
        match held {
            [a, b, c, d, ..] if self.skip == 0 => {
                Some(u32::from_be_bytes([*a, *b, *c, *d]) as usize)
            }
            _ => None,
        }
    }

    /// Drops the frame [`next`](Self::next) returned.
    pub fn consume(&mut self) {
        if let Some(len) = self.frame_len() {
            if self.end - self.start >= LEN_PREFIX + len {
                self.start += LEN_PREFIX + len;
            }
        }
    }

    /// Forgets everything: the stream it came from is gone.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.skip = 0;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for frame in frames {
            bytes.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            bytes.extend_from_slice(frame);
        }
        bytes
    }

    /// Feeds `stream` in pieces of `chunk` bytes and returns every frame and drop seen.
    fn feed(stream: &[u8], chunk: usize) -> Vec<Result<Vec<u8>, usize>> {
        let mut buffer = FrameBuffer::new(0);
        let mut seen = Vec::new();
        let mut rest = stream;
        while !rest.is_empty() {
            let spare = buffer.spare();
            let n = rest.len().min(chunk).min(spare.len());
            spare[..n].copy_from_slice(&rest[..n]);
            buffer.filled(n);
            rest = &rest[n..];
            loop {
                match buffer.next() {
                    Next::Frame(frame) => {
                        seen.push(Ok(frame.to_vec()));
                        buffer.consume();
                    }
                    Next::Dropped(len) => seen.push(Err(len)),
                    Next::Partial => break,
                }
            }
        }
        seen
    }

    /// The ones' complement sum of two sums.
    pub(crate) fn fold(a: u16, b: u16) -> u16 {
        ones_complement_sum(&[a.to_be_bytes(), b.to_be_bytes()].concat())
    }

    #[test]
    fn frames_split_at_every_byte_and_packed_together_come_out_whole() {
        let a = [0xaa; 60];
        let b = [0xbb; 17];
        let stream = framed(&[&a, &b]);
        for chunk in 1..=stream.len() {
            assert_eq!(
                feed(&stream, chunk),
                vec![Ok(a.to_vec()), Ok(b.to_vec())],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn an_oversized_or_empty_frame_is_skipped_and_the_stream_stays_in_step() {
        let big = vec![7u8; MAX_FRAME + 1];
        let after = [1u8; 20];
        let stream = framed(&[&big, &[], &after]);
        for chunk in [1, 1000, 65536, stream.len()] {
            assert_eq!(
                feed(&stream, chunk),
                vec![Err(MAX_FRAME + 1), Err(0), Ok(after.to_vec())],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn max_size_frames_back_to_back_fit() {
        let a = vec![1u8; MAX_FRAME];
        let b = vec![2u8; MAX_FRAME];
        let stream = framed(&[&a, &b]);
        assert_eq!(feed(&stream, 70_000), vec![Ok(a), Ok(b)]);
    }

    #[test]
    fn the_tx_checksum_is_completed_where_the_driver_asks() {
        // A UDP-like frame: checksum field at 14+6, pseudo-header sum 0x1234 left there.
        let mut packet = vec![0u8; NET_HDR_LEN + 40];
        packet[0] = HDR_F_NEEDS_CSUM;
        packet[6..8].copy_from_slice(&14u16.to_le_bytes());
        packet[8..10].copy_from_slice(&6u16.to_le_bytes());
        for (i, b) in packet[NET_HDR_LEN + 14..].iter_mut().enumerate() {
            *b = i as u8 * 3;
        }
        packet[NET_HDR_LEN + 20..NET_HDR_LEN + 22].copy_from_slice(&0x1234u16.to_be_bytes());
        let frame = tx_frame(&mut packet).unwrap().to_vec();
        // What the checksum covers, the checksum included, plus the pseudo-header: all ones.
        assert_eq!(fold(ones_complement_sum(&frame[14..]), 0x1234), 0xffff);
        assert_eq!(&frame[..14], &[0u8; 14][..]);
    }

    #[test]
    fn bad_tx_packets_are_refused() {
        assert_eq!(tx_frame(&mut [0u8; 11]), Err(TxError::ShortHeader));
        assert_eq!(
            tx_frame(&mut [0u8; NET_HDR_LEN + 3]),
            Err(TxError::ShortFrame(3))
        );
        let mut long = vec![0u8; NET_HDR_LEN + MAX_FRAME + 1];
        assert_eq!(tx_frame(&mut long), Err(TxError::LongFrame));
        let mut gso = vec![0u8; NET_HDR_LEN + 60];
        gso[1] = 1;
        assert_eq!(tx_frame(&mut gso), Err(TxError::Gso(1)));
        let mut csum = vec![0u8; NET_HDR_LEN + 60];
        csum[0] = HDR_F_NEEDS_CSUM;
        csum[6..8].copy_from_slice(&50u16.to_le_bytes());
        csum[8..10].copy_from_slice(&9u16.to_le_bytes());
        assert!(matches!(
            tx_frame(&mut csum),
            Err(TxError::ChecksumOutside { .. })
        ));
    }
}
