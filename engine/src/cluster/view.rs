//! What operators see of the cluster: the node's counters and lease, every node's lease,
//! the journal stream's state (`/api/cluster`, `/api/stats` `cluster`, `/metrics`,
//! `payswitch cluster status`).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::Serialize;

use super::lease::LeaseValue;
use crate::fence::Fence;

/// Counters of the node's part in the cluster.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Leases of other nodes this node took over.
    pub takeovers: AtomicU64,
    /// Reversals and advices moved into this node's books by those takeovers.
    pub moved: AtomicU64,
    /// Records read from other nodes' journals for them.
    pub records_read: AtomicU64,
    /// Milliseconds from taking over a lease to its work being queued here, last one.
    pub last_takeover_ms: AtomicU64,
    /// Requests not sent because the node had lost its lease since they came in.
    pub fenced: AtomicU64,
    /// Requests another node had claimed first: answered from its answer.
    pub claims_lost: AtomicU64,
    /// Requests that could not be claimed (no server, no lease): answered 91.
    pub claims_failed: AtomicU64,
    /// Claims of other nodes' requests this node settled, taking them over.
    pub claims_settled: AtomicU64,
    /// Other nodes' scored requests recorded into this node's velocity state.
    pub followed: AtomicU64,
    /// Other nodes' scored requests dropped because the card's shard was behind.
    pub follow_dropped: AtomicU64,
    /// Messages of the journal stream not yet read by this node's follower (its lag).
    pub follow_lag: AtomicU64,
}

/// The node's part in the cluster, as operators read it.
#[derive(Clone)]
pub struct ClusterView {
    /// This node.
    pub node: String,
    /// Its counters.
    pub stats: Arc<ClusterStats>,
    /// Its lease.
    pub fence: Arc<Fence>,
    /// Every node's lease.
    pub leases: kv::Store,
    /// The JetStream context, for the stream's state.
    pub context: jetstream::Context,
    /// The journal stream's name.
    pub stream: String,
    /// The lease time.
    pub lease: Duration,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("node", &self.node)
            .finish()
    }
}

/// One node's lease as the bucket holds it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeaseRow {
    /// The node.
    pub node: String,
    /// `held`, or `taken_over` (by `taken_over_by`).
    pub state: &'static str,
    /// The generation (fencing token) held or taken over.
    pub generation: u64,
    /// The survivor, when taken over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken_over_by: Option<String>,
    /// Milliseconds since the entry was last written (a held lease is renewed every
    /// quarter of the lease time), by the server's clock.
    pub age_ms: i64,
}

/// The journal stream's state.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Messages held.
    pub messages: u64,
    /// Bytes held.
    pub bytes: u64,
    /// First and last sequence numbers.
    pub first_seq: u64,
    /// The last.
    pub last_seq: u64,
    /// Replicas configured.
    pub replicas: usize,
    /// The current leader (server name), if known.
    pub leader: Option<String>,
    /// Replicas that are current / all replicas other than the leader.
    pub replicas_current: usize,
}

/// How long an operator's read of the bucket or stream may take.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Every node's lease, by node.
pub async fn leases(bucket: &kv::Store) -> anyhow::Result<Vec<LeaseRow>> {
    let read = async {
        let mut rows = Vec::new();
        let mut entries = bucket.watch_with_history("lease.>").await?;
        while let Some(entry) = entries.next().await {
            let entry = entry?;
            let age_ms =
                (time::OffsetDateTime::now_utc() - entry.created).whole_milliseconds() as i64;
            let node = entry.key.trim_start_matches("lease.").to_string();
            let row = match LeaseValue::parse(&entry.value) {
                Some(value @ LeaseValue::Held { .. }) => LeaseRow {
                    node,
                    state: "held",
                    generation: value.generation_at(entry.revision),
                    taken_over_by: None,
                    age_ms,
                },
                Some(LeaseValue::TakenOver {
                    taken_over_by,
                    generation,
                    ..
                }) => LeaseRow {
                    node,
                    state: "taken_over",
                    generation,
                    taken_over_by: Some(taken_over_by),
                    age_ms,
                },
                None => continue,
            };
            rows.push(row);
            if entry.delta == 0 {
                break;
            }
        }
        rows.sort_by(|a, b| a.node.cmp(&b.node));
        anyhow::Ok(rows)
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("the lease bucket did not answer in {READ_TIMEOUT:?}"))?
}

/// The journal stream's state.
pub async fn stream_state(context: &jetstream::Context, name: &str) -> anyhow::Result<StreamState> {
    let read = async {
        let mut stream = context.get_stream(name).await?;
        let info = stream.info().await?;
        let cluster = info.cluster.as_ref();
        anyhow::Ok(StreamState {
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            replicas: info.config.num_replicas,
            leader: cluster.and_then(|c| c.leader.clone()),
            replicas_current: cluster
                .map_or(0, |c| c.replicas.iter().filter(|r| r.current).count()),
        })
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("the stream did not answer in {READ_TIMEOUT:?}"))?
}
