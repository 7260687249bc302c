//! Keeps the guest's wall clock with the host's: every few seconds the agent is asked for its
//! clock (`Request::Clock`), and when it is more than a second off (the host slept, the VMM was
//! stopped, someone set it) it is set (`Request::SetClock`). The guest's own timekeeping does the
//! rest in between.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_protocol::{Request, Response};

use crate::chain;
use crate::control::Connection;

/// How often the guest's clock is compared with the host's.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// A guest clock this far off is set.
pub const TOLERANCE: Duration = Duration::from_secs(1);
/// An exchange slower than this says too little about the offset to act on.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(500);
/// How long one exchange may take.
const TIMEOUT: Duration = Duration::from_secs(2);

fn nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// The guest's clock minus the host's, from a guest reading taken between `sent` and
/// `received` on the host (the midpoint is the host's best guess of that moment), in ns.
pub fn offset_ns(sent: SystemTime, guest_unix_nanos: u64, received: SystemTime) -> i128 {
    let (sent, received) = (nanos(sent), nanos(received));
    let mid = sent + (received - sent) / 2;
    i128::from(guest_unix_nanos) - mid
}

/// Whether an offset calls for setting the clock.
pub fn needs_setting(offset_ns: i128) -> bool {
    offset_ns.unsigned_abs() > TOLERANCE.as_nanos()
}

/// Compares and sets the clock until the task is aborted (with the VM run). An agent that does
/// not know `Clock` (an older one) ends it.
pub async fn keep(vsock: PathBuf) {
    let mut connection: Option<Connection> = None;
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        if connection.is_none() {
            match Connection::open(&vsock, TIMEOUT).await {
                Ok(c) => connection = Some(c),
                Err(e) => {
                    note(&mut last_error, format!("guest clock: {}", chain(&e)));
                    continue;
                }
            }
        }
        let Some(c) = connection.as_mut() else {
            continue;
        };
        match check(c).await {
            Ok(Checked::Supported) => last_error.clear(),
            Ok(Checked::Unsupported) => {
                tracing::info!("the guest agent does not tell its clock (an older agent)");
                return;
            }
            Err(e) => {
                note(&mut last_error, e);
                connection = None;
            }
        }
    }
}

enum Checked {
    Supported,
    Unsupported,
}

/// One comparison, and the setting it calls for.
async fn check(c: &mut Connection) -> Result<Checked, String> {
    let sent = SystemTime::now();
    let answer = c.request(&Request::Clock, TIMEOUT).await;
    let received = SystemTime::now();
    let guest = match answer {
        Ok(Response::Clock { unix_nanos }) => unix_nanos,
        Ok(Response::Unsupported { .. }) => return Ok(Checked::Unsupported),
        Ok(other) => return Err(format!("guest clock: unexpected answer {other:?}")),
        Err(e) => return Err(format!("guest clock: {}", chain(&e))),
    };
    let round_trip = received.duration_since(sent).unwrap_or_default();
    let offset = offset_ns(sent, guest, received);
    if round_trip > MAX_ROUND_TRIP || !needs_setting(offset) {
        return Ok(Checked::Supported);
    }
    let now = nanos(SystemTime::now());
    let unix_nanos =
        u64::try_from(now).map_err(|_| "the host's clock is before 1970".to_string())?;
    match c.request(&Request::SetClock { unix_nanos }, TIMEOUT).await {
        Ok(Response::Ack) => {
            tracing::info!(
                "the guest's clock was {:.1} s off the host's; set it",
                offset as f64 / 1e9
            );
            Ok(Checked::Supported)
        }
        Ok(other) => Err(format!("setting the guest's clock: {other:?}")),
        Err(e) => Err(format!("setting the guest's clock: {}", chain(&e))),
    }
}

/// Logs `error` unless it is the one logged last.
fn note(last: &mut String, error: String) {
    if *last != error {
        tracing::debug!("{error}");
        *last = error;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(ns)
    }

    #[test]
    fn the_offset_is_taken_against_the_midpoint_of_the_exchange() {
        let s = 1_800_000_000_000_000_000;
        assert_eq!(offset_ns(at(s), s + 50, at(s + 100)), 0);
        assert_eq!(
            offset_ns(at(s), s + 3_600_000_000_050, at(s + 100)),
            3_600_000_000_000
        );
        assert_eq!(
            offset_ns(at(s), s - 1_999_999_950, at(s + 100)),
            -2_000_000_000
        );
    }

    #[test]
    fn only_more_than_a_second_either_way_is_set() {
        assert!(!needs_setting(0));
        assert!(!needs_setting(1_000_000_000));
        assert!(!needs_setting(-1_000_000_000));
        assert!(needs_setting(1_000_000_001));
        assert!(needs_setting(-3_600_000_000_000));
    }
}
