//! OS processes from `/proc`: listing, signalling, and CPU-percent sampling.

/// Keeps the previous CPU sample per pid, so percentages are real deltas.
#[derive(Debug, Default)]
pub struct CpuMeter {}
