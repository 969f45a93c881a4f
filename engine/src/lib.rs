//! The payswitch engine: the switch between gateways and acquirers, as a library.
//!
//! The modules follow a request through the pipeline (`docs/architecture.md` tells the
//! whole story):
//! - [`ingress`]: a frame from a gateway's stream: decode, validate ([`ingress::validate`])
//!   and the duplicate key ([`ingress::admit`]) — pure.
//! - [`shard`]: the owner of a card's state: the duplicate window ([`shard::duplicates`])
//!   and velocity; decides retransmission, new authorization or reversal — pure.
//! - [`scoring`]: features, models, challengers and the risk team's rules
//!   ([`scoring::rules`]).
//! - [`routing`]: BIN / currency / MCC rules to an ordered acquirer list, or one ordered
//!   per request by the acquirers' health on a balanced route — pure.
//! - [`lifecycle`]: one request from the shard's verdict to the reply, as a state machine
//!   with no I/O and no clock: journal before send, timeout → reversal, retransmission
//!   answered from its original.
//! - [`journal`]: checksummed segments, group commit, verify and export.
//! - [`recovery`]: what the journal says at start (pure: [`recovery::Replay`]).
//! - [`acquirer`]: long-lived pipelined QUIC links to acquirers, with the switch's own STAN
//!   per link, timeouts and reconnects; each judged by its circuit breaker ([`breaker`],
//!   pure: a stall, a failure ratio or a failed probe takes it out of routing).
//! - [`reversal`]: the store-and-forward queue of reversals, each delivered by a pure
//!   state machine ([`reversal::Delivery`]).
//! - [`ops`]: latency histograms ([`ops::metrics`]), the counters and snapshots operators
//!   read ([`ops::stats`]), the admin HTTP listener, dashboard and audit log
//!   ([`ops::admin`]), and the reload of the listeners' certificates ([`ops::tls_reload`]).
//! - [`switch`]: wires them together and runs them ([`switch::start`]); its driver is the
//!   ingress handler that puts each request in its card's shard and carries out its
//!   lifecycle's steps ([`switch::Switch`]).
//! - [`sim`]: the deterministic simulator, driving the same pure parts on a simulated
//!   clock, network and disk.
//! - [`config`], [`clock`], [`iso`]: the configuration, the switch's clock, and ISO 8583
//!   messages as JSON lines and back (`payswitch iso`).
//!
//! The wire format and its UTC time live in `payswitch-protocol` (sans-IO), sockets in
//! `payswitch-net`. The `payswitch` binary is the `payswitch-cli` crate: argument parsing,
//! logging set-up and the runner of every subcommand (`serve`, `demo`, `model`, `journal`,
//! `sim`, …) over this library; nothing here knows about the command line or the load
//! tools.

pub mod acquirer;
pub mod breaker;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod fence;
pub mod ingress;
pub mod iso;
pub mod journal;
pub mod lifecycle;
pub mod ops;
pub mod recovery;
pub mod reversal;
pub mod routing;
pub mod scoring;
pub mod shard;
pub mod sim;
pub mod switch;
