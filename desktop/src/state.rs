//! What the tray shows for a state of the VM: its icon, its tooltip in words, and which of
//! Start / Stop / Restart make sense. Pure, so that each state's look is tested without a
//! desktop.

use berth_host_proxy::control_api::model::VmState;
use serde::Serialize;

use crate::icons::Look;

/// The VM's state as the app sees it: no host proxy answers, or the state it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shown {
    /// Nothing answers on `berth.sock`: Berth is not running at all (as good as stopped).
    Absent,
    #[serde(untagged)]
    Vm(VmState),
}

impl Shown {
    pub fn look(self) -> Look {
        match self {
            Shown::Absent | Shown::Vm(VmState::Stopped) => Look::Stopped,
            Shown::Vm(VmState::Starting) => Look::Starting,
            Shown::Vm(VmState::Running) => Look::Running,
            Shown::Vm(VmState::Stopping) => Look::Stopping,
            Shown::Vm(VmState::Crashed) => Look::Crashed,
        }
    }

    /// Which lifecycle actions the menu and the dashboard offer.
    pub fn actions(self) -> Actions {
        let (start, stop, restart) = match self {
            Shown::Absent | Shown::Vm(VmState::Stopped) => (true, false, false),
            Shown::Vm(VmState::Starting) => (false, true, false),
            Shown::Vm(VmState::Running) => (false, true, true),
            Shown::Vm(VmState::Stopping) => (false, false, false),
            Shown::Vm(VmState::Crashed) => (true, false, true),
        };
        Actions {
            start,
            stop,
            restart,
        }
    }

    /// The tooltip and the menu's first line: the state in words, with the reason.
    pub fn tooltip(self, reason: Option<&str>) -> String {
        let words = match self {
            Shown::Absent => "Berth is not running",
            Shown::Vm(VmState::Stopped) => "Berth is stopped",
            Shown::Vm(VmState::Starting) => "Berth is starting",
            Shown::Vm(VmState::Running) => "Berth is running",
            Shown::Vm(VmState::Stopping) => "Berth is stopping",
            Shown::Vm(VmState::Crashed) => "Berth crashed",
        };
        match reason.map(str::trim).filter(|r| !r.is_empty()) {
            Some(reason) => format!("{words}: {reason}"),
            None => words.to_string(),
        }
    }
}

/// Start / Stop / Restart, each enabled only when it makes sense.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Actions {
    pub start: bool,
    pub stop: bool,
    pub restart: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Shown; 6] = [
        Shown::Absent,
        Shown::Vm(VmState::Stopped),
        Shown::Vm(VmState::Starting),
        Shown::Vm(VmState::Running),
        Shown::Vm(VmState::Stopping),
        Shown::Vm(VmState::Crashed),
    ];

    #[test]
    fn each_state_offers_only_what_makes_sense() {
        let offered = |s: Shown| {
            let a = s.actions();
            (a.start, a.stop, a.restart)
        };
        assert_eq!(offered(Shown::Absent), (true, false, false));
        assert_eq!(offered(Shown::Vm(VmState::Stopped)), (true, false, false));
        assert_eq!(offered(Shown::Vm(VmState::Starting)), (false, true, false));
        assert_eq!(offered(Shown::Vm(VmState::Running)), (false, true, true));
        assert_eq!(offered(Shown::Vm(VmState::Stopping)), (false, false, false));
        assert_eq!(offered(Shown::Vm(VmState::Crashed)), (true, false, true));
    }

    #[test]
    fn every_vm_state_has_its_own_icon_and_absent_looks_stopped() {
        let looks: Vec<Look> = ALL[1..].iter().map(|s| s.look()).collect();
        assert_eq!(looks, Look::ALL);
        assert_eq!(Shown::Absent.look(), Look::Stopped);
    }

    #[test]
    fn the_tooltip_says_the_state_and_why_in_words() {
        assert_eq!(
            Shown::Vm(VmState::Crashed)
                .tooltip(Some("the guest kernel panicked (see console.log)")),
            "Berth crashed: the guest kernel panicked (see console.log)"
        );
        assert_eq!(
            Shown::Vm(VmState::Running).tooltip(Some("  ")),
            "Berth is running"
        );
        assert_eq!(Shown::Absent.tooltip(None), "Berth is not running");
        assert_eq!(serde_json::to_string(&Shown::Absent).unwrap(), "\"absent\"");
        assert_eq!(
            serde_json::to_string(&Shown::Vm(VmState::Starting)).unwrap(),
            "\"starting\""
        );
    }
}
