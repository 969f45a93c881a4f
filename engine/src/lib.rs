//! The payswitch engine: the switch between gateways and acquirers, and its binary.
//!
//! Read in this order:
//! - [`config`]: the TOML configuration (listeners, TLS, pipeline limits, acquirers, routes).
//! - [`validate`]: what a request must carry (30/14/12) and how responses are built — pure.
//! - [`router`]: BIN / currency / MCC rules to an ordered acquirer list — pure.
//! - [`switch`]: the ingress handler, the shards (one owner per card's state, bounded
//!   queues), forwarding, and [`switch::start`] which runs it all.
//! - [`acquirer`]: long-lived pipelined QUIC links to acquirers, with the switch's own STAN
//!   per link, timeouts and reconnects.
//! - [`admin`]: the admin HTTP listener.
//! - [`serve`], [`demo`], [`iso`]: the `payswitch serve`, `demo` and `iso` subcommands.
//!
//! The wire format lives in `payswitch-protocol` (sans-IO), sockets in `payswitch-net`.

pub mod acquirer;
pub mod admin;
pub mod config;
pub mod demo;
pub mod duplicates;
pub mod iso;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod model_cli;
pub mod recovery;
pub mod reversals;
pub mod router;
pub mod rules;
pub mod scoring;
pub mod serve;
pub mod stats;
pub mod switch;
pub mod validate;
