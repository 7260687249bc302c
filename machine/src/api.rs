//! The VMM's API socket (`run/vmm.sock`), used only by the host proxy: one JSON message per
//! line each way, a `VmmRequest` answered by one `VmmResponse`, on a connection that stays open
//! for more.

use std::io::{BufRead, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A line longer than this is refused (a corrupt or hostile peer).
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VmmRequest {
    /// Is the VMM serving? Answered with `Pong`.
    Ping,
    /// Orderly stop: answered `Ack`, then the vCPUs stop, the disks are flushed and the VMM
    /// exits with `VmmExit::Stopped`. For a guest that did not power off when asked.
    Stop,
}

/// The memory balloon's requests, on the same socket and in the same form as `VmmRequest`'s
/// (`{"op":"balloon","mib":512}`). A type of their own so that a client matching every
/// `VmmRequest` keeps building; the VMM decodes both as an [`ApiRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum BalloonRequest {
    /// Sets how much memory the guest should give back, in MiB (0 lets it have all of it
    /// again); at most the guest's memory. Answered `Ack`, or `Error` with nothing changed.
    Balloon { mib: u64 },
    /// The balloon's target, what the guest has given and its latest memory statistics.
    /// Answered with `BalloonStatus`.
    BalloonStats,
}

/// Every request the VMM's API socket answers, told apart by `op`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ApiRequest {
    Vmm(VmmRequest),
    Balloon(BalloonRequest),
}

impl From<VmmRequest> for ApiRequest {
    fn from(request: VmmRequest) -> Self {
        ApiRequest::Vmm(request)
    }
}

impl From<BalloonRequest> for ApiRequest {
    fn from(request: BalloonRequest) -> Self {
        ApiRequest::Balloon(request)
    }
}

impl<'de> Deserialize<'de> for ApiRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let value = serde_json::Value::deserialize(d)?;
        let op = value
            .get("op")
            .and_then(|op| op.as_str())
            .unwrap_or_default()
            .to_owned();
        match op.as_str() {
            "ping" | "stop" => serde_json::from_value(value).map(ApiRequest::Vmm),
            "balloon" | "balloon_stats" => serde_json::from_value(value).map(ApiRequest::Balloon),
            "" => return Err(D::Error::missing_field("op")),
            other => {
                return Err(D::Error::unknown_variant(
                    other,
                    &["ping", "stop", "balloon", "balloon_stats"],
                ))
            }
        }
        .map_err(|e| D::Error::custom(format!("op `{op}`: {e}")))
    }
}

/// The guest's latest memory statistics (virtio 1.2 section 5.5.6.3); a field the guest has
/// not reported is absent. Amounts are in bytes, the rest are counts since the guest booted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stalls: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VmmResponse {
    Pong {
        pid: u32,
        cpus: u8,
        memory_mib: u64,
    },
    Ack,
    /// The balloon: the memory the host asked back and what the guest has given (both MiB,
    /// rounded down), and the guest's latest statistics.
    BalloonStatus {
        target_mib: u64,
        actual_mib: u64,
        // Boxed: the statistics would make every answer (and host-proxy errors holding one) large.
        stats: Box<BalloonStats>,
    },
    /// The request was understood and failed.
    Error {
        message: String,
    },
    /// The request was not understood (an unknown `op`, or not JSON); the connection lives.
    Unsupported {
        message: String,
    },
}

/// Writes `msg` as one line.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one line and decodes it; `Ok(None)` at a clean end of stream. A line over
/// `MAX_MESSAGE` is an `InvalidData` error; a line that does not decode is
/// `Ok(Some(Err(..)))`, so a server can answer `Unsupported` and go on.
pub fn read_message<T: DeserializeOwned>(
    r: &mut impl BufRead,
) -> std::io::Result<Option<Result<T, serde_json::Error>>> {
    let mut line = Vec::new();
    let n = r
        .take(MAX_MESSAGE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        let what = if line.len() > MAX_MESSAGE {
            "a VMM API message is longer than 64 KiB"
        } else {
            "the VMM API connection ended inside a message"
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
    }
    Ok(Some(serde_json::from_slice(&line)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn messages_are_json_lines() {
        let mut wire = Vec::new();
        write_message(&mut wire, &VmmRequest::Stop).unwrap();
        write_message(&mut wire, &VmmRequest::Ping).unwrap();
        assert_eq!(wire, b"{\"op\":\"stop\"}\n{\"op\":\"ping\"}\n");
        let mut r = wire.as_slice();
        let first: VmmRequest = read_message(&mut r).unwrap().unwrap().unwrap();
        assert_eq!(first, VmmRequest::Stop);
        let second: VmmRequest = read_message(&mut r).unwrap().unwrap().unwrap();
        assert_eq!(second, VmmRequest::Ping);
        assert!(read_message::<VmmRequest>(&mut r).unwrap().is_none());
    }

    #[test]
    fn unknown_truncated_and_huge_messages_are_told_apart() {
        let mut unknown = &b"{\"op\":\"fly\"}\n"[..];
        assert!(read_message::<VmmRequest>(&mut unknown)
            .unwrap()
            .unwrap()
            .is_err());
        let mut truncated = &b"{\"op\":\"st"[..];
        assert!(read_message::<VmmRequest>(&mut truncated).is_err());
        let huge = vec![b'x'; MAX_MESSAGE + 10];
        assert!(read_message::<VmmRequest>(&mut huge.as_slice()).is_err());
    }
}
