//! What the lifecycle does after a crash (a guest kernel panic, a triple fault, a VMM that died
//! or was killed): start the VM again after a pause that doubles from 1 s to 30 s with each
//! crash in a row (a run that lasted [`WINDOW`] ends the row), and stay down, saying why, after
//! [`GIVE_UP_AFTER`] crashes within [`WINDOW`]. Pure policy; the lifecycle (`lifecycle.rs`)
//! owns the clock and the VM.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The crashes that count towards giving up are those this recent.
pub const WINDOW: Duration = Duration::from_secs(10 * 60);
/// This many crashes within [`WINDOW`] and the VM stays down.
pub const GIVE_UP_AFTER: usize = 5;
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// What to do after one crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start again after `pause`; `attempt` counts the VM's runs in this series (the crashed
    /// one was attempt `attempt - 1`).
    Restart { attempt: usize, pause: Duration },
    /// Stay down: `crashes` crashes within the window.
    GiveUp { crashes: usize },
}

#[derive(Debug, Default)]
pub struct Recovery {
    crashes: VecDeque<Instant>,
    /// Crashes in a row, each after a run shorter than the window.
    in_a_row: u32,
    /// When the pending restart is due, and its attempt number.
    pending: Option<(Instant, usize)>,
}

impl Recovery {
    /// A crash at `now` of a run that lasted `ran_for`: the decision, with the restart (if any)
    /// pending.
    pub fn crashed(&mut self, now: Instant, ran_for: Duration) -> Decision {
        if ran_for >= WINDOW {
            self.in_a_row = 0;
        }
        self.in_a_row = self.in_a_row.saturating_add(1);
        while let Some(&first) = self.crashes.front() {
            if now.saturating_duration_since(first) < WINDOW {
                break;
            }
            self.crashes.pop_front();
        }
        self.crashes.push_back(now);
        let crashes = self.crashes.len();
        if crashes >= GIVE_UP_AFTER {
            self.pending = None;
            return Decision::GiveUp { crashes };
        }
        let pause = FIRST_PAUSE
            .checked_mul(2u32.saturating_pow(self.in_a_row - 1))
            .map_or(MAX_PAUSE, |p| p.min(MAX_PAUSE));
        let attempt = usize::try_from(self.in_a_row)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        self.pending = Some((now + pause, attempt));
        Decision::Restart { attempt, pause }
    }

    /// When the pending restart is due, if one is.
    pub fn due(&self) -> Option<Instant> {
        self.pending.map(|(at, _)| at)
    }

    /// The pending restart is being made: its attempt number.
    pub fn take(&mut self) -> Option<usize> {
        self.pending.take().map(|(_, attempt)| attempt)
    }

    /// A user's start, stop or restart: no pending restart, and the count starts again.
    pub fn reset(&mut self) {
        self.crashes.clear();
        self.in_a_row = 0;
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_secs(20);

    fn restart(attempt: usize, secs: u64) -> Decision {
        Decision::Restart {
            attempt,
            pause: Duration::from_secs(secs),
        }
    }

    #[test]
    fn the_pause_doubles_from_one_second_and_the_fifth_crash_in_the_window_gives_up() {
        let t0 = Instant::now();
        let mut r = Recovery::default();
        let decisions: Vec<_> = (0..5)
            .map(|i| r.crashed(t0 + Duration::from_secs(i * 20), SHORT))
            .collect();
        assert_eq!(
            decisions,
            [
                restart(2, 1),
                restart(3, 2),
                restart(4, 4),
                restart(5, 8),
                Decision::GiveUp { crashes: 5 }
            ]
        );
        assert_eq!(r.due(), None);
    }

    #[test]
    fn crashes_in_a_row_spread_past_the_window_pause_up_to_thirty_seconds() {
        let t0 = Instant::now();
        let mut r = Recovery::default();
        // Three minutes apart: never five in ten minutes, but every run was short.
        let pauses: Vec<_> = (0..8)
            .map(
                |i| match r.crashed(t0 + Duration::from_secs(i * 180), SHORT) {
                    Decision::Restart { pause, .. } => pause.as_secs(),
                    other => panic!("gave up: {other:?}"),
                },
            )
            .collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_run_as_long_as_the_window_ends_the_row() {
        let t0 = Instant::now();
        let mut r = Recovery::default();
        r.crashed(t0, SHORT);
        r.crashed(t0 + SHORT, SHORT);
        assert_eq!(r.crashed(t0 + WINDOW * 2, WINDOW), restart(2, 1));
    }

    #[test]
    fn crashes_older_than_the_window_no_longer_count_towards_giving_up() {
        let t0 = Instant::now();
        let mut r = Recovery::default();
        for i in 0..4 {
            r.crashed(t0 + Duration::from_secs(i), SHORT);
        }
        // The row goes on (the pause is 16 s) but only two crashes are in the window.
        assert_eq!(
            r.crashed(t0 + WINDOW + Duration::from_secs(2), SHORT),
            restart(6, 16)
        );
        assert_eq!(r.crashes.len(), 2);
    }

    #[test]
    fn the_pending_restart_is_due_once_and_a_reset_forgets_everything() {
        let t0 = Instant::now();
        let mut r = Recovery::default();
        r.crashed(t0, SHORT);
        assert_eq!(r.due(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(r.take(), Some(2));
        assert_eq!(r.take(), None);
        assert_eq!(r.due(), None);
        r.crashed(t0, SHORT);
        r.reset();
        assert_eq!(r.due(), None);
        assert_eq!(r.crashed(t0, SHORT), restart(2, 1));
    }
}
