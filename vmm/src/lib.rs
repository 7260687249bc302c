//! Berth's virtual machine monitor: boots a Linux guest under a hypervisor backend (KVM today)
//! with virtio-mmio devices.

pub mod api;
pub mod arch;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod hypervisor;
pub mod memory;
pub mod vcpu;
pub mod vm;
