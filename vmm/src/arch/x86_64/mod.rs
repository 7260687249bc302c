//! The x86_64 guest platform: physical memory layout, boot structures and CPU setup.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
