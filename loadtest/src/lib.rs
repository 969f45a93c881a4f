//! Load tools of payswitch: an acquirer/issuer simulator and an open-loop load generator.
//!
//! - [`acquirer_sim`]: `payswitch acquirer-sim`, a deterministic acquirer that answers
//!   0100/0200/0800 over QUIC (and TCP) with approvals and rule-based declines.
//! - [`load`]: `payswitch load`, an open-loop generator with HdrHistogram percentiles and a
//!   JSON report.
//! - [`cards`]: synthetic card numbers (valid Luhn, chosen BINs) and request building.

pub mod acquirer_sim;
pub mod cards;
pub mod load;
