//! Load tools of payswitch: an acquirer/issuer simulator and an open-loop load generator.
//!
//! - [`cards`]: the synthetic workload — cards with chosen BINs and valid Luhn digits,
//!   terminals, STAN and RRN sequences, amounts — and the 0100 built from them.
//! - [`acquirer_sim`]: `payswitch acquirer-sim`, a deterministic acquirer that answers
//!   0100/0200/0400/0420/0800 over QUIC (and TCP): its decisions ([`acquirer_sim::Issuer`])
//!   are pure functions of a seed and the request, its latency a seeded log-normal.
//! - [`load`]: `payswitch load`, an open-loop generator (latency measured from each
//!   request's intended send time, so a slow server cannot hide its queueing) with
//!   HdrHistogram percentiles and a JSON report.
//!   With `--data` it replays a labeled file and reports fraud caught and legitimate declined.
//! - [`workload`]: `payswitch gen-data`, a seeded population and a time-ordered stream of
//!   labeled transactions with fraud scenarios, in the `payswitch_models::data` format.
//!
//! Full PANs exist here only to go on the wire; anything printed shows them masked.

pub mod acquirer_sim;
pub mod cards;
pub mod load;
pub mod workload;
