//! What operators see and do: latency histograms per stage ([`metrics`]), the switch's
//! counters and the snapshots `/api/stats` and `/metrics` are made from ([`stats`]), and
//! the admin HTTP listener with the dashboard ([`admin`]).

pub mod admin;
pub mod metrics;
pub mod stats;
