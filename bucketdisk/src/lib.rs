//! What the `bucketdisk` binary shares with other tools (the benchmarks): how sizes and
//! durations are written on its command line.

pub mod units;
