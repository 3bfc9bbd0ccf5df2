//! Locus: a cluster that tracks vehicles in real time.
pub mod drivers;
pub mod geo;
pub mod keys;
