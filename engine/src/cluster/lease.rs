//! Leases: which node holds whose books, in the key-value bucket `PAYSWITCH_LEASES`.
//!
//! Each node has one entry, `lease.{node}`, and renews it every quarter of the lease
//! time with a compare-and-set on the entry's revision. The value says who holds it:
//!
//! - `{"holder": node, "incarnation": id, "generation": g}`: held by the process
//!   `incarnation` of `node` since revision `g` (the *generation*, the node's fencing
//!   token; 0 on the write that starts a generation, whose own revision it is).
//! - `{"taken_over_by": survivor, "node": node, "generation": g}`: the lease lapsed and
//!   `survivor` took over generation `g`'s work (`cluster::takeover`).
//!
//! Every change is a compare-and-set on the revision read, so exactly one survivor takes
//! over a lapsed lease, and a node that comes back (a restart, or a pause past its
//! lease) finds out whether it still owns its earlier work: it renews from the revision it
//! last wrote; if that fails, someone took it over.
//!
//! The node's side is [`crate::fence::Fence`]: a renewal sent at `t` holds the lease
//! until `t + lease_ms` on this process's monotonic clock, so a paused node stops at its
//! deadline without asking anyone. A survivor counts from when it saw the last renewal
//! (later), waits out the lease there, and takes over with a compare-and-set that fails
//! if the node renewed meanwhile.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::store::{CasError, LeaseStore};
use super::ClusterConfig;
use crate::fence::Fence;

/// The bucket of leases (and of the STAN blocks nodes hold).
pub const LEASE_BUCKET: &str = "PAYSWITCH_LEASES";

/// A lease entry's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LeaseValue {
    /// Held by a node.
    Held {
        /// The node.
        holder: String,
        /// The process holding it (random per start).
        incarnation: u64,
        /// The revision that started this generation; 0 on that write itself.
        generation: u64,
        /// When it was written, Unix ms (for people reading the bucket).
        at_ms: i64,
    },
    /// Taken over by a survivor.
    TakenOver {
        /// The survivor.
        taken_over_by: String,
        /// The node whose lease lapsed.
        node: String,
        /// The generation taken over.
        generation: u64,
        /// When it was written, Unix ms.
        at_ms: i64,
    },
}

impl LeaseValue {
    /// Reads an entry's value; `None` for one this version does not know.
    pub fn parse(value: &[u8]) -> Option<LeaseValue> {
        serde_json::from_slice(value).ok()
    }

    pub(super) fn bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("a lease value serializes")
            .into()
    }

    /// The generation of a `Held` value written at `revision`.
    pub fn generation_at(&self, revision: u64) -> u64 {
        match self {
            LeaseValue::Held { generation: 0, .. } => revision,
            LeaseValue::Held { generation, .. } | LeaseValue::TakenOver { generation, .. } => {
                *generation
            }
        }
    }
}

/// The key of `node`'s lease.
pub fn lease_key(node: &str) -> String {
    format!("lease.{node}")
}

/// The key of STAN block `block`.
fn stan_key(block: u8) -> String {
    format!("stan.{block}")
}

/// Gets the bucket, creating it when missing (another node may create it meanwhile).
pub async fn bucket(
    context: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> anyhow::Result<kv::Store> {
    if let Ok(bucket) = context.get_key_value(name).await {
        return Ok(bucket);
    }
    let created = context
        .create_key_value(kv::Config {
            bucket: name.into(),
            history: 1,
            num_replicas: replicas,
            max_age,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(bucket) => Ok(bucket),
        Err(_) => context
            .get_key_value(name)
            .await
            .with_context(|| format!("the key-value bucket {name}")),
    }
}

fn unix_ms() -> i64 {
    crate::clock::now().unix_ms()
}

/// What the node found of its previous generation when it took its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Previous {
    /// No earlier lease: a new node.
    None,
    /// The previous generation's work is still this node's (nobody took it over; from
    /// now on nobody can).
    Own(u64),
    /// Another node took the previous generation's work over.
    HandedOver {
        /// The survivor.
        to: String,
        /// The generation it took.
        generation: u64,
    },
}

/// This node's lease: its entry, and the fence the rest of the switch reads. The store
/// is the lease bucket (`kv::Store`), or the simulator's.
pub struct Lease<S: LeaseStore = kv::Store> {
    bucket: S,
    node: String,
    key: String,
    incarnation: u64,
    ttl: Duration,
    fence: Arc<Fence>,
    /// The revision this node last wrote.
    revision: u64,
    generation: u64,
}

impl<S: LeaseStore> std::fmt::Debug for Lease<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("node", &self.node)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Takes the node's lease: waits out a lease another live process of the same name
    /// may hold (refusing to start if it is renewed meanwhile), then starts a new
    /// generation. Also holds the node's STAN block. Says what became of the previous
    /// generation.
    pub async fn acquire(
        context: &jetstream::Context,
        config: &ClusterConfig,
        fence: Arc<Fence>,
    ) -> anyhow::Result<(Lease, Previous)> {
        let bucket = bucket(context, LEASE_BUCKET, config.replicas, Duration::ZERO).await?;
        hold_stan_block(&bucket, &config.node, config.stan_block).await?;
        let ttl = Duration::from_millis(config.lease_ms);
        Lease::acquire_in(bucket, &config.node, ttl, fence).await
    }
}

impl<S: LeaseStore> Lease<S> {
    /// [`Lease::acquire`] in `store`, for `node`, with a lease of `ttl` (the STAN block
    /// aside).
    pub async fn acquire_in(
        store: S,
        node: &str,
        ttl: Duration,
        fence: Arc<Fence>,
    ) -> anyhow::Result<(Lease<S>, Previous)> {
        let mut lease = Lease {
            bucket: store,
            node: node.to_string(),
            key: lease_key(node),
            incarnation: rand_u64(),
            ttl,
            fence,
            revision: 0,
            generation: 0,
        };
        let previous = lease.start_generation(true).await?;
        Ok((lease, previous))
    }

    /// Writes a new generation, compare-and-set on what is there; `wait_out`: a `Held`
    /// entry written by another process is left to lapse first (it may be alive).
    async fn start_generation(&mut self, wait_out: bool) -> anyhow::Result<Previous> {
        loop {
            let entry = self
                .bucket
                .entry(&self.key)
                .await
                .context("reading the node's lease")?;
            let value = LeaseValue::Held {
                holder: self.node.clone(),
                incarnation: self.incarnation,
                generation: 0,
                at_ms: unix_ms(),
            };
            let Some((revision, current)) = entry.and_then(|e| Some((e.revision, e.value?))) else {
                let sent = Instant::now();
                match self.bucket.create(&self.key, value.bytes()).await {
                    Ok(revision) => {
                        self.started(revision, sent);
                        return Ok(Previous::None);
                    }
                    Err(CasError::Exists) => continue,
                    Err(e) => return Err(e).context("creating the node's lease"),
                }
            };
            let found = LeaseValue::parse(&current);
            let previous = match &found {
                Some(LeaseValue::TakenOver {
                    taken_over_by,
                    generation,
                    ..
                }) => Previous::HandedOver {
                    to: taken_over_by.clone(),
                    generation: *generation,
                },
                Some(held @ LeaseValue::Held { incarnation, .. }) => {
                    if wait_out && *incarnation != self.incarnation {
                        self.wait_out(revision).await?;
                    }
                    Previous::Own(held.generation_at(revision))
                }
                None => anyhow::bail!(
                    "the lease entry {} in {LEASE_BUCKET} holds something this version cannot read",
                    self.key
                ),
            };
            let sent = Instant::now();
            match self.bucket.update(&self.key, value.bytes(), revision).await {
                Ok(revision) => {
                    self.started(revision, sent);
                    return Ok(previous);
                }
                // A survivor took it over (or the other process renewed) meanwhile: read
                // again.
                Err(CasError::WrongRevision) => continue,
                Err(e) => return Err(e).context("writing the node's lease"),
            }
        }
    }

    /// Waits a lease time for the entry at `revision` to be renewed: refused if it is
    /// (another live process has this node's name).
    async fn wait_out(&self, revision: u64) -> anyhow::Result<()> {
        tracing::info!(node = %self.node, lease_ms = self.ttl.as_millis() as u64, "waiting out the node's previous lease before taking it");
        tokio::time::sleep(self.ttl).await;
        let now = self.bucket.entry(&self.key).await?;
        if let Some(entry) = now {
            if entry.revision != revision
                && matches!(
                    entry.value.as_deref().and_then(LeaseValue::parse),
                    Some(LeaseValue::Held { .. })
                )
            {
                anyhow::bail!(
                    "another process holds the lease of node {:?} and renews it: two switches \
                     must not share a cluster.node name",
                    self.node
                );
            }
        }
        Ok(())
    }

    fn started(&mut self, revision: u64, sent: Instant) {
        self.revision = revision;
        self.generation = revision;
        self.fence.hold(revision, sent + self.ttl);
        tracing::info!(node = %self.node, generation = revision, "lease held");
    }

    /// The lease bucket.
    pub fn bucket(&self) -> &S {
        &self.bucket
    }

    /// The generation (fencing token) held.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Renews the lease every quarter of its time until `shutdown`. A renewal refused
    /// means another node took the lease over (this one was paused or cut off past it):
    /// the node stops acting (the fence is lost), and takes a new generation, whose work
    /// starts afresh; the earlier work is the survivor's.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let every = self.ttl / 4;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let value = LeaseValue::Held {
                holder: self.node.clone(),
                incarnation: self.incarnation,
                generation: self.generation,
                at_ms: unix_ms(),
            };
            let sent = Instant::now();
            let renewed = tokio::time::timeout(
                every,
                self.bucket.update(&self.key, value.bytes(), self.revision),
            )
            .await;
            match renewed {
                Ok(Ok(revision)) => {
                    self.revision = revision;
                    self.fence.hold(self.generation, sent + self.ttl);
                }
                Ok(Err(CasError::WrongRevision)) => {
                    self.regain().await;
                }
                // The servers did not answer in time: the lease runs out on its own if
                // this goes on; the next renewal tries again.
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
                Err(_) => tracing::warn!("lease renewal timed out"),
            }
        }
    }

    /// After a refused renewal: what is there now? Our own write whose answer was lost
    /// (adopt it), or a survivor's takeover (stop, then start a new generation).
    async fn regain(&mut self) {
        let Ok(Some(entry)) = self.bucket.entry(&self.key).await else {
            return;
        };
        match entry.value.as_deref().and_then(LeaseValue::parse) {
            Some(held @ LeaseValue::Held { incarnation, .. })
                if incarnation == self.incarnation =>
            {
                // A write of ours whose answer was lost: a renewal, or the start of a new
                // generation after a takeover (then its generation is the one to hold
                // from now on, never the one taken over; the simulator found a node
                // renewing the old one).
                self.revision = entry.revision;
                let generation = held.generation_at(entry.revision);
                if generation != self.generation {
                    tracing::info!(node = %self.node, generation, "lease held");
                    self.generation = generation;
                }
            }
            Some(LeaseValue::TakenOver {
                taken_over_by,
                generation,
                ..
            }) => {
                self.fence.lose();
                tracing::error!(node = %self.node, generation, survivor = %taken_over_by, "lease lost: another node took over this node's work (it was paused or cut off past its lease); nothing more is sent for that work, and a new lease is taken");
                self.fence.handed_over_before(generation + 1);
                if let Err(e) = self.start_generation(false).await {
                    tracing::error!(error = %e, "taking a new lease failed; retried at the next renewal");
                }
            }
            _ => {
                self.fence.lose();
                tracing::error!(node = %self.node, "lease lost to another process with this node's name: nothing is sent until it is regained");
                if let Err(e) = self.start_generation(true).await {
                    tracing::error!(error = %e, "taking the lease again failed");
                }
            }
        }
    }
}

/// Holds STAN block `block` for `node` (`stan.{block}` = node): two nodes with the same
/// block would hand out the same STANs on an acquirer's links.
async fn hold_stan_block(bucket: &impl LeaseStore, node: &str, block: u8) -> anyhow::Result<()> {
    let key = stan_key(block);
    match bucket.create(&key, node.to_string().into()).await {
        Ok(_) => return Ok(()),
        Err(CasError::Exists) => {}
        Err(e) => return Err(e).context("holding the node's STAN block"),
    }
    let holder = bucket
        .entry(&key)
        .await?
        .and_then(|e| e.value)
        .unwrap_or_default();
    anyhow::ensure!(
        holder == node.as_bytes(),
        "cluster.stan_block = {block} is node {:?}'s: every node needs its own block (0 to 9)",
        String::from_utf8_lossy(&holder)
    );
    Ok(())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_values_read_back_and_name_their_generation() {
        let held = LeaseValue::Held {
            holder: "a".into(),
            incarnation: 9,
            generation: 0,
            at_ms: 1,
        };
        assert_eq!(LeaseValue::parse(&held.bytes()), Some(held.clone()));
        assert_eq!(held.generation_at(12), 12, "the write that starts it");
        let renewed = LeaseValue::Held {
            holder: "a".into(),
            incarnation: 9,
            generation: 12,
            at_ms: 3,
        };
        assert_eq!(renewed.generation_at(15), 12);
        let taken = LeaseValue::TakenOver {
            taken_over_by: "b".into(),
            node: "a".into(),
            generation: 12,
            at_ms: 2,
        };
        assert_eq!(LeaseValue::parse(&taken.bytes()), Some(taken.clone()));
        assert_eq!(taken.generation_at(20), 12);
        assert_eq!(LeaseValue::parse(b"{\"x\":1}"), None);
    }
}
