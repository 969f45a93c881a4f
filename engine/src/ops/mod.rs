//! What operators see and do: latency histograms per stage ([`metrics`]), the switch's
//! counters and the snapshots `/api/stats` and `/metrics` are made from ([`stats`]), and
//! the admin HTTP listener with the dashboard ([`admin`]).

pub mod admin;
pub mod metrics;
pub mod snapshot;
pub mod stats;
pub mod tls_reload;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::acquirer::AcquirerLink;
use crate::journal::Journal;
use crate::reversal::StoreAndForward;
use crate::routing::Router;
use crate::scoring::Scoring;
use crate::shard::ShardStats;

/// What operators read and act on: each part of the switch's own handle, shared, not the
/// switch itself. Built once by `crate::switch::start`.
#[derive(Clone)]
pub struct Sources {
    /// Models, rules and their counters (deploys and promotions act on it).
    pub scoring: Arc<Scoring>,
    /// The acquirer links, in configuration order (drain and enable act on them).
    pub links: Vec<Arc<AcquirerLink>>,
    /// The journal's writer, for its counters, when one is written.
    pub journal: Option<Journal>,
    /// The store-and-forward queue, for its counters.
    pub reversals: Arc<StoreAndForward>,
    /// Latency histograms.
    pub metrics: Arc<metrics::Metrics>,
    /// The routing table (and its routes), swapped whole on reload.
    pub router: Arc<ArcSwap<Router>>,
    /// The switch's counters.
    pub counters: Arc<stats::SwitchStats>,
    /// Per-shard counters.
    pub shard_stats: Vec<Arc<ShardStats>>,
    /// Requests queued per shard now.
    pub queue_depths: Arc<dyn Fn() -> Vec<usize> + Send + Sync>,
    /// The node's part in the cluster, with `[cluster]`.
    pub cluster: Option<crate::cluster::ClusterView>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("links", &self.links)
            .field("shards", &self.shard_stats.len())
            .finish()
    }
}
