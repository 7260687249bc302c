//! Why a VM stopped, and the channel through which devices and vCPUs say so.

use std::sync::mpsc;

use berth_machine::VmmExit;

/// The reason the VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off.
    PowerOff,
    /// The guest asked for a reboot or reset (keyboard controller, ACPI reset register).
    Reset,
    /// A vCPU took a triple fault that nothing asked for: the guest crashed. The text is the
    /// vCPU's state at that moment.
    Crashed(String),
    /// The guest kernel panicked (and then reset, as `panic=-1` makes it).
    Panic,
    /// Every vCPU halted with no interrupt controller to wake it (payload guests only).
    Halted,
    /// The host proxy stopped the VM through the VMM's API socket.
    Stopped,
    /// The VMM could not keep the guest running.
    Error(String),
}

impl ExitReason {
    /// What the VMM's exit status says about this reason.
    pub fn vmm_exit(&self) -> VmmExit {
        match self {
            ExitReason::PowerOff | ExitReason::Halted => VmmExit::PowerOff,
            ExitReason::Error(_) => VmmExit::VmmError,
            ExitReason::Reset => VmmExit::Reset,
            ExitReason::Panic => VmmExit::Panic,
            ExitReason::Crashed(_) => VmmExit::Crash,
            ExitReason::Stopped => VmmExit::Stopped,
        }
    }

    /// The VMM process's exit status for this reason (`berth_machine::VmmExit`'s table).
    pub fn exit_code(&self) -> u8 {
        self.vmm_exit().code()
    }
}

/// A handle devices and vCPU threads use to stop the VM. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ExitNotifier(mpsc::Sender<ExitReason>);

impl ExitNotifier {
    pub fn new() -> (Self, mpsc::Receiver<ExitReason>) {
        let (tx, rx) = mpsc::channel();
        (Self(tx), rx)
    }

    pub fn notify(&self, reason: ExitReason) {
        // The receiver is gone only once the VM is already stopping: nothing left to tell.
        let _ = self.0.send(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_come_from_the_machine_descriptions_table() {
        let all = [
            ExitReason::PowerOff,
            ExitReason::Reset,
            ExitReason::Crashed(String::new()),
            ExitReason::Panic,
            ExitReason::Halted,
            ExitReason::Stopped,
            ExitReason::Error(String::new()),
        ];
        for reason in &all {
            let code = i32::from(reason.exit_code());
            assert_eq!(
                VmmExit::from_code(code),
                Some(reason.vmm_exit()),
                "{reason:?}"
            );
        }
        assert_eq!(ExitReason::Stopped.exit_code(), VmmExit::Stopped.code());
        assert_eq!(
            ExitReason::Halted.exit_code(),
            0,
            "a halted payload is a clean stop"
        );
        assert_eq!(ExitReason::Error(String::new()).exit_code(), 1);
    }
}
