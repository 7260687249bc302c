//! Architecture-specific guest setup. x86_64 is the only architecture today.

pub mod x86_64;
