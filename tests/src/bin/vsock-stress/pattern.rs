//! The deterministic byte streams both sides send, and the checks that every received byte is
//! the one expected at its offset.

use std::io::{ErrorKind, Read, Write};

/// The guest answers with a different stream than the host sends: same seed, salted.
pub const GUEST_SALT: u64 = 0x6a09_e667_f3bc_c909;

/// Bytes moved per read or write.
pub const CHUNK: usize = 64 * 1024;

/// The guest's stream for a connection whose host stream is `seed`.
pub fn guest_seed(seed: u64) -> u64 {
    seed ^ GUEST_SALT
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with stream `seed` from byte `offset` on. Every 8-byte word is a hash of the seed
/// and the word's index, so any offset can be produced (and checked) on its own.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(seed ^ splitmix64(pos / 8)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// How a received stream compared with the expected one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Exactly the expected bytes.
    Complete(u64),
    /// The first byte that differed, at this offset.
    Mismatch(u64),
    /// The stream ended (EOF or an error) after this many correct bytes.
    Short(u64, String),
}

impl Received {
    pub fn is_complete(&self) -> bool {
        matches!(self, Received::Complete(_))
    }

    /// The stream did not end: a read timed out.
    pub fn timed_out(&self) -> bool {
        matches!(self, Received::Short(_, why) if why.starts_with(TIMED_OUT))
    }

    /// Correct bytes before the stream ended or went wrong.
    pub fn good_bytes(&self) -> u64 {
        match self {
            Received::Complete(n) | Received::Mismatch(n) | Received::Short(n, _) => *n,
        }
    }
}

impl std::fmt::Display for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Received::Complete(n) => write!(f, "ok {n}"),
            Received::Mismatch(at) => write!(f, "bad {at}"),
            Received::Short(n, why) => write!(f, "short {n} ({why})"),
        }
    }
}

const TIMED_OUT: &str = "timed out";

/// A socket timeout (SO_RCVTIMEO/SO_SNDTIMEO), as opposed to the peer ending the stream.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Writes `size` bytes of stream `seed`; calls `progress` with the running count.
pub fn send(
    w: &mut impl Write,
    seed: u64,
    size: u64,
    progress: &dyn Fn(u64),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < size {
        let n = (size - sent).min(CHUNK as u64) as usize;
        fill(seed, sent, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        sent += n as u64;
        progress(sent);
    }
    Ok(())
}

/// Reads and checks `size` bytes of stream `seed` (not more); calls `progress` with the count
/// of correct bytes so far.
pub fn receive(r: &mut impl Read, seed: u64, size: u64, progress: &dyn Fn(u64)) -> Received {
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < size {
        let max = (size - got).min(CHUNK as u64) as usize;
        let n = match r.read(&mut buf[..max]) {
            Ok(0) => return Received::Short(got, "end of stream".into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Received::Short(got, format!("{TIMED_OUT}: {e}")),
            Err(e) => return Received::Short(got, e.to_string()),
        };
        fill(seed, got, &mut want[..n]);
        if buf[..n] != want[..n] {
            let at = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Received::Mismatch(got + at as u64);
        }
        got += n as u64;
        progress(got);
    }
    Received::Complete(got)
}

/// Reads a line of at most `max` bytes, byte by byte (nothing after it is consumed).
/// `Ok(None)` at a clean end of stream before any byte.
pub fn read_line(r: &mut impl Read, max: usize) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < max => line.push(byte[0]),
            Ok(_) => return Err(std::io::Error::new(ErrorKind::InvalidData, "line too long")),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| ErrorKind::InvalidData.into())
}

/// Reads to the end of stream, keeping at most `max` bytes.
pub fn read_rest(r: &mut impl Read, max: usize) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if out.len() < max => out.extend_from_slice(&buf[..n.min(max - out.len())]),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_offset_yields_the_same_bytes() {
        let mut whole = vec![0u8; 1000];
        fill(7, 0, &mut whole);
        for start in [0usize, 1, 7, 8, 9, 333, 999] {
            let mut part = vec![0u8; 1000 - start];
            fill(7, start as u64, &mut part);
            assert_eq!(part, whole[start..]);
        }
        let mut other = vec![0u8; 1000];
        fill(guest_seed(7), 0, &mut other);
        assert_ne!(other, whole, "the guest's stream differs from the host's");
    }

    #[test]
    fn receive_finds_the_first_bad_byte_and_short_streams() {
        let mut data = vec![0u8; 200_000];
        fill(1, 0, &mut data);
        let none = |_| {};
        assert_eq!(
            receive(&mut data.as_slice(), 1, 200_000, &none),
            Received::Complete(200_000)
        );
        data[150_001] ^= 0x40;
        assert_eq!(
            receive(&mut data.as_slice(), 1, 200_000, &none),
            Received::Mismatch(150_001)
        );
        let short = receive(&mut &data[..1000], 1, 200_000, &none);
        assert!(matches!(short, Received::Short(1000, _)), "{short:?}");
        assert!(!receive(&mut data.as_slice(), 2, 10, &none).is_complete());
    }
}
