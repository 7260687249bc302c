//! `berth`: start, stop and inspect the Berth VM (being written).
#![forbid(unsafe_code)]

fn main() {}
