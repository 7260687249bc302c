//! Why a VM stopped, and the channel through which devices and vCPUs say so.

use std::sync::mpsc;

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
    /// The VMM could not keep the guest running.
    Error(String),
}

impl ExitReason {
    /// The VMM process's exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Halted => 0,
            ExitReason::Error(_) => 1,
            ExitReason::Reset => 2,
            ExitReason::Panic => 3,
            ExitReason::Crashed(_) => 4,
        }
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
