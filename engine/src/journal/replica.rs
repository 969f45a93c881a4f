//! The journal's copy on a replicated NATS JetStream stream (`[cluster]`).
//!
//! With a replica the writer thread hands each group commit's sealed frames here just
//! before it writes (and syncs) them to the local segment, so the publish and the local
//! sync overlap, and leaves the answers to the replica: a caller is answered once the
//! stream has acknowledged its group and the local write has succeeded.
//! They are published, in the writer's order, as messages on `{prefix}.journal.{node}` —
//! each message a run of whole frames, as in a segment, at most [`MAX_MESSAGE_BYTES`] —
//! and each caller is answered once every message holding its records is acknowledged by
//! the stream. Publishes are pipelined: a request waits for one replication round, not
//! one per record or per group. A message carries `Nats-Msg-Id: {node}:{first sequence}`,
//! so a publish retried after a lost acknowledgement is stored once.
//!
//! What an acknowledgement guarantees is the stream's: with R=3 a quorum of servers has
//! the message (in memory, or on disk where the servers sync on every write:
//! `sync_interval: always`); see the README's "Several nodes".
//!
//! Nothing is published while the node does not hold its lease (`crate::fence`): its
//! callers get `Unreplicated`. Each message carries the lease's fencing token in the
//! header [`LEASE_HEADER`].
//!
//! A caller whose records are not acknowledged within the ack timeout gets
//! [`JournalError::Unreplicated`] (answered 91: try again); its records are in the local
//! segment, which stays the node's own complete journal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::writer::JournalError;
use crate::fence::Fence;

/// Largest message published: well under NATS's default `max_payload` (1 MiB). A group
/// commit larger than this goes as several messages.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Group commits handed to the publisher and not yet published. Beyond it the writer
/// thread waits, its queue fills and requests are answered 91: the stream sets the pace.
pub const MAX_GROUPS_QUEUED: usize = 1024;

/// Group commits published and waiting for their acknowledgements.
pub const MAX_GROUPS_IN_FLIGHT: usize = 1024;

/// Counters of the replica.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Messages acknowledged by the stream.
    pub acknowledged: AtomicU64,
    /// Group commits not acknowledged in time (their callers got `Unreplicated`).
    pub failed: AtomicU64,
    /// Nanoseconds from handing a group over to its last acknowledgement, summed.
    pub ack_ns: AtomicU64,
    /// Groups acknowledged (for the mean of `ack_ns`).
    pub groups: AtomicU64,
    /// When the last group not acknowledged in time was given up on (milliseconds since
    /// the Unix epoch); 0 once a later group is acknowledged.
    pub failed_at_ms: AtomicU64,
}

/// How long a group not acknowledged in time keeps `/ready` failing unless a later one
/// is acknowledged: long enough for a load balancer to notice, short enough that a node
/// the balancer then sends nothing to (so no group can succeed) is tried again.
pub const FAILURE_HOLD: Duration = Duration::from_secs(5);

impl ReplicaStats {
    /// Whether a group went unacknowledged within the last [`FAILURE_HOLD`] and none has
    /// been acknowledged since.
    pub fn failing(&self) -> bool {
        let at = self.failed_at_ms.load(Ordering::Relaxed);
        at != 0 && unix_ms().saturating_sub(at) < FAILURE_HOLD.as_millis() as u64
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One caller of a group commit, with what the local write gave it.
pub(super) struct Answer {
    pub done: oneshot::Sender<Result<u64, JournalError>>,
    pub first_seq: u64,
}

/// A group commit to replicate, handed over before it is written locally: the publish
/// and the local write (and sync) overlap.
pub(super) struct Group {
    /// Each caller's sealed frames, in order, with its answer.
    pub parts: Vec<(Vec<u8>, Answer)>,
    pub handed: Instant,
    /// How the local write of the same group went.
    pub local: oneshot::Receiver<Result<(), JournalError>>,
}

/// Where the journal's groups go to be replicated.
#[derive(Clone)]
pub struct Replica {
    groups: mpsc::Sender<Group>,
    stats: Arc<ReplicaStats>,
    client: async_nats::Client,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").finish_non_exhaustive()
    }
}

impl Replica {
    /// Starts publishing to `subject` through `context`, on the current runtime; only
    /// while `fence` holds the node's lease, each message carrying its fencing token.
    pub fn start(
        context: jetstream::Context,
        subject: String,
        node: String,
        ack_timeout: Duration,
        fence: Arc<Fence>,
    ) -> Replica {
        let (groups, queued) = mpsc::channel(MAX_GROUPS_QUEUED);
        let (published, in_flight) = mpsc::channel(MAX_GROUPS_IN_FLIGHT);
        let stats = Arc::new(ReplicaStats::default());
        let client = context.client();
        tokio::spawn(publish(
            context,
            Destination {
                subject,
                node,
                fence,
            },
            ack_timeout,
            queued,
            published,
        ));
        tokio::spawn(acknowledge(in_flight, ack_timeout, Arc::clone(&stats)));
        Replica {
            groups,
            stats,
            client,
        }
    }

    /// Whether the client is connected to a NATS server now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The replica's counters.
    pub fn stats(&self) -> &Arc<ReplicaStats> {
        &self.stats
    }

    /// Hands a group over from the writer thread (not a runtime thread): waits while the
    /// publisher is [`MAX_GROUPS_QUEUED`] behind. A stopped publisher answers the group's
    /// callers `Unreplicated`.
    pub(super) fn hand_over(&self, group: Group) {
        if let Err(mpsc::error::SendError(group)) = self.groups.blocking_send(group) {
            for (_, answer) in group.parts {
                let _ = answer.done.send(Err(JournalError::Unreplicated));
            }
        }
    }
}

/// A group published: its messages' acknowledgements to wait for, and its callers.
struct Published {
    acks: Vec<Option<jetstream::context::PublishAckFuture>>,
    local: oneshot::Receiver<Result<(), JournalError>>,
    answers: Vec<Answer>,
    handed: Instant,
}

/// Where the publisher sends, and under which lease.
struct Destination {
    subject: String,
    node: String,
    fence: Arc<Fence>,
}

/// The header naming the fencing token (the node's lease generation) a message was
/// published under: the books show which holder of the node's lease wrote what.
pub const LEASE_HEADER: &str = "Payswitch-Lease";

async fn publish(
    context: jetstream::Context,
    Destination {
        subject,
        node,
        fence,
    }: Destination,
    ack_timeout: Duration,
    mut queued: mpsc::Receiver<Group>,
    published: mpsc::Sender<Published>,
) {
    while let Some(group) = queued.recv().await {
        // With no server reachable the client buffers what is published, and once its
        // buffer is full a publish waits: bounded by the group's own deadline, so the
        // writer thread behind this never waits longer than the ack timeout for a group
        // and the requests in it are answered 91 in time.
        let deadline = tokio::time::Instant::from_std(group.handed + ack_timeout);
        let mut acks = Vec::new();
        let mut answers = Vec::with_capacity(group.parts.len());
        let mut message = BytesMut::new();
        let mut message_first = None;
        let count = group.parts.len();
        for (i, (frames, answer)) in group.parts.into_iter().enumerate() {
            message_first.get_or_insert(answer.first_seq);
            message.extend_from_slice(&frames);
            answers.push(answer);
            let last = i + 1 == count;
            if message.len() >= MAX_MESSAGE_BYTES || last {
                let first = message_first.take().unwrap_or_default();
                let payload: Bytes = std::mem::take(&mut message).freeze();
                // Fenced: a node whose lease ran out (paused, or cut off from the
                // servers) publishes nothing; its callers are answered 91, and what it
                // sent before is the survivor's to settle.
                if !fence.held() {
                    acks.push(None);
                    continue;
                }
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{node}:{first}").as_str());
                headers.insert(LEASE_HEADER, fence.token().to_string().as_str());
                let sent = tokio::time::timeout_at(
                    deadline,
                    context.publish_with_headers(subject.clone(), headers, payload),
                )
                .await;
                acks.push(sent.ok().and_then(Result::ok));
            }
        }
        let group = Published {
            acks,
            local: group.local,
            answers,
            handed: group.handed,
        };
        if published.send(group).await.is_err() {
            return;
        }
    }
}

async fn acknowledge(
    mut in_flight: mpsc::Receiver<Published>,
    ack_timeout: Duration,
    stats: Arc<ReplicaStats>,
) {
    while let Some(group) = in_flight.recv().await {
        // Acknowledgements come in publish order; the deadline counts from the hand-over.
        let deadline = tokio::time::Instant::from_std(group.handed + ack_timeout);
        let mut acknowledged = true;
        for ack in group.acks {
            let ok = match ack {
                Some(ack) => matches!(
                    tokio::time::timeout_at(deadline, std::future::IntoFuture::into_future(ack))
                        .await,
                    Ok(Ok(_))
                ),
                None => false,
            };
            if ok {
                stats.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            acknowledged &= ok;
        }
        stats.failed_at_ms.store(
            if acknowledged { 0 } else { unix_ms().max(1) },
            Ordering::Relaxed,
        );
        if acknowledged {
            stats.groups.fetch_add(1, Ordering::Relaxed);
            stats
                .ack_ns
                .fetch_add(group.handed.elapsed().as_nanos() as u64, Ordering::Relaxed);
        } else {
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        // The local write came first in the writer; its result is there or on its way.
        let local = group.local.await.unwrap_or(Err(JournalError::Failed));
        for answer in group.answers {
            let result = match (&local, acknowledged) {
                (Err(e), _) => Err(*e),
                (Ok(()), false) => Err(JournalError::Unreplicated),
                (Ok(()), true) => Ok(answer.first_seq),
            };
            let _ = answer.done.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_acknowledgement_fails_readiness_for_the_hold_only() {
        let stats = ReplicaStats::default();
        assert!(!stats.failing(), "nothing missed yet");
        stats.failed_at_ms.store(unix_ms(), Ordering::Relaxed);
        assert!(stats.failing());
        let hold = FAILURE_HOLD.as_millis() as u64;
        stats
            .failed_at_ms
            .store(unix_ms() - hold - 1_000, Ordering::Relaxed);
        assert!(!stats.failing(), "past the hold, the node is tried again");
        stats.failed_at_ms.store(0, Ordering::Relaxed);
        assert!(!stats.failing(), "a later group was acknowledged");
    }
}
