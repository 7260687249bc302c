//! How the VMM process ends: its exit status, what each status means to the host proxy and to
//! a user reading `berth status`.

use serde::{Deserialize, Serialize};

/// Why the VMM exited; `code` is its process exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmExit {
    /// The guest powered itself off (or, for payload guests, every vCPU halted).
    PowerOff,
    /// The VMM could not keep the guest running; its stderr has the one-line error.
    VmmError,
    /// The guest asked for a reboot or reset.
    Reset,
    /// The guest kernel panicked.
    Panic,
    /// The guest crashed: a triple fault nothing asked for.
    Crash,
    /// The host proxy stopped the VM through the VMM's API socket.
    Stopped,
}

impl VmmExit {
    pub const ALL: [VmmExit; 6] = [
        VmmExit::PowerOff,
        VmmExit::VmmError,
        VmmExit::Reset,
        VmmExit::Panic,
        VmmExit::Crash,
        VmmExit::Stopped,
    ];

    /// The VMM process's exit status.
    pub const fn code(self) -> u8 {
        match self {
            VmmExit::PowerOff => 0,
            VmmExit::VmmError => 1,
            VmmExit::Reset => 2,
            VmmExit::Panic => 3,
            VmmExit::Crash => 4,
            VmmExit::Stopped => 5,
        }
    }

    /// The reason an exit status stands for; `None` for a status the VMM never uses.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|e| i32::from(e.code()) == code)
    }

    /// What happened, in words for the user.
    pub const fn describe(self) -> &'static str {
        match self {
            VmmExit::PowerOff => "the guest powered off",
            VmmExit::VmmError => "the VMM failed (its error is in the host proxy's log)",
            VmmExit::Reset => "the guest rebooted",
            VmmExit::Panic => "the guest kernel panicked (see console.log)",
            VmmExit::Crash => "the guest crashed (a triple fault; the VMM logged its registers)",
            VmmExit::Stopped => "the VM was stopped by the host",
        }
    }

    /// Whether the guest stopped because something went wrong, not because it was asked to.
    pub const fn is_crash(self) -> bool {
        matches!(
            self,
            VmmExit::VmmError | VmmExit::Reset | VmmExit::Panic | VmmExit::Crash
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_has_its_own_code_and_the_code_maps_back() {
        for exit in VmmExit::ALL {
            assert_eq!(VmmExit::from_code(i32::from(exit.code())), Some(exit));
        }
        let mut codes: Vec<u8> = VmmExit::ALL.iter().map(|e| e.code()).collect();
        codes.dedup();
        assert_eq!(codes.len(), VmmExit::ALL.len());
        assert_eq!(VmmExit::from_code(9), None);
        assert_eq!(VmmExit::PowerOff.code(), 0, "a clean power-off is success");
        assert!(VmmExit::Panic.describe().contains("panicked"));
        assert!(!VmmExit::Stopped.is_crash() && !VmmExit::PowerOff.is_crash());
        assert!(VmmExit::Crash.is_crash());
    }
}
