//! Guest physical memory: the type every part of the VMM shares.

/// Guest memory as the VMM maps it: anonymous mmaps, no dirty-page bitmap.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
