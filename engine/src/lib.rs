//! The payswitch engine: the switch between gateways and acquirers, as a library.
//!
//! Read in this order:
//! - [`config`]: the TOML configuration (listeners, TLS, pipeline limits, acquirers, routes).
//! - [`validate`]: what a request must carry (30/14/12) and how responses are built — pure.
//! - [`router`]: BIN / currency / MCC rules to an ordered acquirer list — pure.
//! - [`switch`]: the ingress handler, the shards (one owner per card's state, bounded
//!   queues), forwarding, and [`switch::start`] which runs it all.
//! - [`acquirer`]: long-lived pipelined QUIC links to acquirers, with the switch's own STAN
//!   per link, timeouts and reconnects.
//! - [`scoring`], [`rules`]: features, models, challengers and the risk team's rules.
//! - [`journal`]: checksummed segments, group commit, verify and export;
//!   [`duplicates`]: each shard's window of recent requests; [`reversals`]: the
//!   store-and-forward queue; [`recovery`]: what the journal says at start.
//! - [`metrics`]: latency histograms per stage; [`stats`]: `/api/stats` and `/metrics`;
//!   [`admin`]: the admin HTTP listener and the dashboard.
//! - [`iso`]: ISO 8583 messages as JSON lines and back (`payswitch iso`).
//!
//! The wire format and its UTC time live in `payswitch-protocol` (sans-IO), sockets in
//! `payswitch-net`. The `payswitch` binary is the `payswitch-cli` crate: argument parsing,
//! logging set-up and the runner of every subcommand (`serve`, `demo`, `model`, `journal`,
//! …) over this library; nothing here knows about the command line or the load tools.

pub mod acquirer;
pub mod admin;
pub mod config;
pub mod duplicates;
pub mod ingress;
pub mod iso;
pub mod journal;
pub mod lifecycle;
pub mod metrics;
pub mod recovery;
pub mod reversals;
pub mod router;
pub mod rules;
pub mod scoring;
pub mod shard;
pub mod sim;
pub mod stats;
pub mod switch;
pub mod validate;
