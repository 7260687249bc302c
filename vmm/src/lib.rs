//! Berth's virtual machine monitor: boots a Linux guest under a hypervisor backend (KVM today)
//! with virtio-mmio devices.

pub mod devices;
pub mod memory;
